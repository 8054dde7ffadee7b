"""Placeholder until its issue lands."""

from bias_lab.errors import UserError


def run_tune(*_args, **_kwargs):
    raise UserError("the tune entry point is not implemented yet: use train for now")
