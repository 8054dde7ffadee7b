"""Placeholder until its issue lands."""

from bias_lab.errors import UserError


def run_bias_eval(*_args, **_kwargs):
    raise UserError("the bias_eval entry point is not implemented yet: use train for now")
