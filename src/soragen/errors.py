"""The one exception type for mistakes a user can make and fix."""


class UserError(ValueError):
    """Bad input: the message names the problem and what would be valid. The CLI prints it and exits 2."""
