"""The one error type for bad user input."""


class UsageError(ValueError):
    """Bad configuration or input: reported as one line, exit status 2, no traceback.

    A ValueError, as torch raises for bad arguments: library callers may catch either.
    """
