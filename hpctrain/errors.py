"""The one error type for bad user input, the parser that raises it, and the mark of an error
every rank raises alike."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable, Iterable


class UsageError(ValueError):
    """Bad configuration or input: reported as one line, exit status 2, no traceback.

    A ValueError, as torch raises for bad arguments: library callers may catch either.
    """


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n word`` with the plural a count other than one takes (``many``, else ``word + s``),
    so that a message about one rank does not say "1 ranks"."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def close_match(word: str, choices: Iterable[object]) -> str | None:
    """The choice closest to ``word`` if it is close enough to be a typo of it (difflib's
    ratio at least 0.6, as Python 3.14's argparse suggests), else None."""
    names = [c for c in choices if isinstance(c, str)]
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: object, choices: Iterable[object]) -> str:
    """``"; did you mean 'fashion-mnist'?"`` to end a refusal of ``word`` that lists the
    ``choices``, where one is close to it (see :func:`close_match`), else "": in a long list
    the choice meant is easy to miss."""
    close = close_match(word, choices) if isinstance(word, str) else None
    return f"; did you mean {close!r}?" if close is not None else ""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageErrors: one line, exit 2, rank 0 speaking;
    an invalid choice or unknown flag is followed by the close choice or flag, if any."""

    unknown_hint: Callable[[dict[str, object]], str] | None = None
    """Where this (sub)command's options come from, said with an unknown flag close to none
    of them (train's: a user's algorithm's options exist only with its --algo); given the
    values parsed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.suggest_on_error = False  # Python 3.14's own suggestion: ours is on 3.10+ too

    def error(self, message: str):
        raise UsageError(message)  # printed as "hpctrain: error: <message>"

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown flag's refusal says what may be meant."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error(self._unrecognized(extra, vars(parsed)))
        return parsed

    def _check_value(self, action: argparse.Action, value) -> None:
        """argparse's choice check (the one place every choice flag goes through), with the
        close choice added to its refusal."""
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as refused:
            if action.choices is None:
                raise
            raise argparse.ArgumentError(
                action, refused.message + did_you_mean(value, action.choices)) from None

    def _unrecognized(self, extra: list[str], parsed: dict[str, object]) -> str:
        """argparse's "unrecognized arguments: ..." with, for each unknown flag, the known
        flag it is close to, and else the chosen command's :attr:`unknown_hint`."""
        chain = _chosen(self, parsed)
        known = [flag for parser in chain for action in parser._actions
                 for flag in action.option_strings if flag.startswith("--")]
        unknown = [word.split("=", 1)[0] for word in extra if word.startswith("--")]
        names = {flag[2:]: flag for flag in known}  # "--" alike in all: ratio of the names
        guesses = {flag: names.get(close_match(flag[2:], names) or "") for flag in unknown}
        message = f"unrecognized arguments: {' '.join(extra)}"
        hint = next((p.unknown_hint for p in reversed(chain)
                     if isinstance(p, Parser) and p.unknown_hint is not None), None)
        if hint is not None and (not unknown or None in guesses.values()):
            message += f" ({hint(parsed)})"
        meant = {flag: close for flag, close in guesses.items() if close is not None}
        if len(meant) == 1 and len(unknown) == 1:
            message += f"; did you mean {next(iter(meant.values()))}?"
        elif meant:
            message += "; did you mean " + ", ".join(f"{close} for {flag}"
                                                    for flag, close in meant.items()) + "?"
        return message


def _chosen(parser: argparse.ArgumentParser,
            parsed: dict[str, object]) -> list[argparse.ArgumentParser]:
    """``parser`` and the subcommands' parsers ``parsed`` went through (``bench compare``:
    the top one, bench's and compare's), whose flags an unknown one may be a typo of."""
    chain = [parser]
    while True:
        sub = next((a for a in chain[-1]._actions
                    if isinstance(a, argparse._SubParsersAction)), None)
        name = parsed.get(sub.dest) if sub is not None else None
        if sub is None or not isinstance(name, str) or name not in sub.choices:
            return chain
        chain.append(sub.choices[name])


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
