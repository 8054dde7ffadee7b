"""The one exception users see: a problem with what they asked for, and how to fix it."""


class UserError(Exception):
    """Bad input. The CLI prints `error: <message>` on one line and exits 2, without a traceback.

    Messages name the problem and the fix, e.g. "train.csv has no 'label' column: ... add it".
    """


def check(ok: bool, message: str) -> None:
    """Raise UserError(message) unless ok."""
    if not ok:
        raise UserError(message)
