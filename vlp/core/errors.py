"""Errors the user can fix: printed as one line by the CLI, exit status 2."""


class UserError(Exception):
    """Bad input from the user (a path, a value, a file), phrased as one line."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error message (its type's name when it has none)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
class RowFailure(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
