"""Option value checks shared by the command lines (training options, the micro-benchmarks).

Each is an argparse ``type``: a bad value fails while the command line is parsed, before MPI
starts, so it is one line naming the value and exit status 2 with rank 0 speaking for all
(``hpctrain.cli`` turns argparse errors into :class:`hpctrain.errors.UsageError`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def _number(kind, text: str):
    try:
        value = float(text) if kind is float else int(float(text))
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if kind is int and float(text) != value:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return value


def at_least(minimum: float, kind=int):
    """A number of ``kind`` (int accepts ``1e6``) that is >= ``minimum``."""
    def parse(text: str):
        value = _number(kind, text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g}, got {text}")
        return value
    return parse


def positive(kind=float):
    """A finite number of ``kind`` > 0."""
    def parse(text: str):
        value = _number(kind, text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def number_list(minimum: int = 1):
    """Comma-separated integers (``1e6`` allowed), each >= ``minimum``: ``"1,2"`` -> [1, 2]."""
    def parse(text: str) -> list[int]:
        words = [w.strip() for w in str(text).split(",") if w.strip()]
        if not words:
            raise argparse.ArgumentTypeError(f"{text!r}: want comma-separated numbers")
        values = []
        for word in words:
            try:
                values.append(_number(int, word))
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
        bad = [w for w, v in zip(words, values, strict=True) if v < minimum]
        if bad:
            raise argparse.ArgumentTypeError(f"{text!r}: {bad[0]} is below {minimum}")
        return values
    return parse


def name_list(choices: tuple[str, ...]):
    """Comma-separated names from ``choices``, each once: ``"locked,atomic"`` -> [...]."""
    def parse(text: str) -> list[str]:
        names = list(dict.fromkeys(w.strip() for w in str(text).split(",") if w.strip()))
        bad = [n for n in names if n not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {'unknown ' + repr(bad[0]) if bad else 'empty'}; choose from "
                f"{', '.join(choices)}")
        return names
    return parse


def existing_dir(text: str) -> str:
    """A folder that exists."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return text
