"""Errors the user can fix: printed as one line by the CLI, exit status 2."""


class UserError(Exception):
    """Bad input from the user (a path, a value, a file), phrased as one line."""
class RowFailure(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
