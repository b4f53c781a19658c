"""The one error type for bad user input, and the parser that raises it."""

from __future__ import annotations

import argparse


class UsageError(ValueError):
    """Bad configuration or input: reported as one line, exit status 2, no traceback.

    A ValueError, as torch raises for bad arguments: library callers may catch either.
    """


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageErrors: one line, exit 2, rank 0 speaking."""

    def error(self, message: str):
        raise UsageError(message)  # printed as "hpctrain: error: <message>"
