"""Placeholder until its issue lands."""

from bias_lab.errors import UserError


def run_submit(*_args, **_kwargs):
    raise UserError("the kaggle_submit entry point is not implemented yet: use train for now")
