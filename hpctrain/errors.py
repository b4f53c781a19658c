"""The one error type for bad user input, the parser that raises it, and the mark of an error
every rank raises alike."""

from __future__ import annotations

import argparse


class UsageError(ValueError):
    """Bad configuration or input: reported as one line, exit status 2, no traceback.

    A ValueError, as torch raises for bad arguments: library callers may catch either.
    """


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n word`` with the plural a count other than one takes (``many``, else ``word + s``),
    so that a message about one rank does not say "1 ranks"."""
    return f"{n} {word if n == 1 else many or word + 's'}"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageErrors: one line, exit 2, rank 0 speaking."""

    def error(self, message: str):
        raise UsageError(message)  # printed as "hpctrain: error: <message>"


# The mark :func:`on_every_rank` puts on any exception (not only hpctrain's own classes).
_ON_EVERY_RANK = "on_every_rank"


def on_every_rank(error: BaseException) -> BaseException:
    """Mark ``error`` as raised on every rank alike (the ranks share its verdict, as ssgd's
    workers share the reduced gradient): rank 0 alone says it as the job ends, and the run
    releases what it holds first, so a script that catches it may train again."""
    setattr(error, _ON_EVERY_RANK, True)
    return error


def raised_on_every_rank(error: BaseException) -> bool:
    return getattr(error, _ON_EVERY_RANK, False)
