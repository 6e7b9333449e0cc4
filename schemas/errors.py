"""Errors a user can act on. The CLI prints these as one line and exits non-zero; anything
else is a bug and keeps its traceback."""


class ShowtellError(Exception):
    """A bad input, config or environment, with a message that says what and where."""
