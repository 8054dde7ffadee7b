"""The one exception users see: a problem with what they asked for, and how to fix it."""


class UserError(Exception):
    """Bad input. The CLI prints `error: <message>` on one line and exits 2, without a traceback.

    Messages name the problem and the fix, e.g. "train.csv has no 'label' column: ... add it".
    """


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def check(ok: bool, message: str) -> None:
    """Raise UserError(message) unless ok."""
    if not ok:
        raise UserError(message)
