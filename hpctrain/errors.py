"""The one error type for bad user input."""


class UsageError(Exception):
    """Bad configuration or input: reported as one line, exit status 2, no traceback."""
