"""The one exception type for mistakes a user can make and fix."""


class UserError(ValueError):
    """Bad input: the message names the problem and what would be valid. The CLI prints it and exits 2."""


def first_line(e: BaseException) -> str:
    """A library exception's message cut to fit in a one-line error: its first non-empty line, with the next one
    when it ends in a colon (at most 200 characters), or the exception's type name."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return " ".join(lines[:2] if lines[0].endswith(":") else lines[:1])[:200]
