"""User-facing errors: raised for bad input, printed by the CLI and the nodes without a traceback."""


class UserError(ValueError):
    """Bad input from the user. The message names the problem and the fix."""
