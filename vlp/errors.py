"""Errors the user can fix: printed as one line by the CLI, exit status 2."""


class UserError(Exception):
    """Bad input from the user (a path, a value, a file), phrased as one line."""
