"""Straggler injection: make a worker's steps take FACTOR times as long, or DELAY longer, with
seeded jitter.

``--slowdown RANK:SPEC[,RANK:SPEC...]`` slows given workers (RANK is a worker's index among
the ranks that train: with ``--eval-rank R``, world rank r > R is worker r - 1; ``--servers``
are the last ranks and train not). SPEC is one of

- ``FACTOR`` (``0:3``): a step that took ``t`` takes ``FACTOR * t``: it is padded with a sleep
  of ``(FACTOR - 1) * t``. The pad follows the measured time, so the machine's own noise in
  ``t`` (a loaded node) is multiplied by FACTOR too, and one run's times compare noisily with
  another's;
- ``+DELAY`` (``0:+20ms``, ``1:+0.5s``; an unsigned number, unit ``ms`` or ``s``, at most one
  hour; ``9ms`` is the same float as ``0.009s``): a fixed sleep of DELAY after every step,
  whatever the step took: a straggler that is the same on a quiet node and a loaded one;
- ``FACTOR+DELAY`` (``0:2+10ms``): both, ``FACTOR * t + DELAY``.

``--jitter SIGMA`` multiplies every worker's step by a log-normal factor ``exp(SIGMA * z)``,
``z ~ N(0, 1)``, drawn per step from a generator seeded with (seed, rank): the step then takes
``draw * (FACTOR * t + DELAY)`` (the delay jitters with the step), and the sleep is that less
``t``. No sleep when that is not above ``t``: a step cannot be made faster.
:func:`parse_slowdown` is the one reader of every form.
"""

from __future__ import annotations

import math
import random
import re
import time
from decimal import Decimal, InvalidOperation, localcontext
from typing import NamedTuple

from hpctrain.errors import UsageError

# The largest log-normal SIGMA (--jitter, a simulation's lognormal step times): exp(5 z) is
# already e^5 (148x) at one standard deviation; far beyond it the draws overflow.
MAX_SIGMA = 5.0
MAX_FACTOR = 1e6  # the largest --slowdown factor: a 10 ms step then sleeps for hours
MAX_DELAY_S = 3600.0  # the largest --slowdown +DELAY: an hour's sleep per step
DELAY_UNITS = {"ms": -3, "s": 0}  # powers of ten; longest first: "20ms" is not "20m" seconds
FORMS = "RANK:FACTOR, RANK:+DELAY or RANK:FACTOR+DELAY (DELAY in ms or s, e.g. 0:+20ms)"


class Slowdown(NamedTuple):
    """One worker's slowdown: a step of ``t`` seconds takes ``factor * t + delay``."""

    factor: float = 1.0
    delay: float = 0.0  # seconds


def _split(spec: str) -> tuple[str, str | None]:
    """``"2+10ms"`` -> ("2", "10ms"); the ``+`` of an exponent (``1e+3``) splits nothing."""
    for i, char in enumerate(spec):
        if char == "+" and not (i > 0 and spec[i - 1] in "eE"):
            return spec[:i].strip(), spec[i + 1:].strip()
    return spec.strip(), None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _decimal(text: str) -> Decimal | None:
    """``text`` as an exact decimal (what :func:`float` reads, but sNaN), None if no number."""
    with localcontext() as context:
        context.traps[InvalidOperation] = True  # a syntax error raises, not a NaN
        try:
            return Decimal(text)
        except (InvalidOperation, ValueError):
            return None


def _delay(text: str, what: str, item: str, rank: int, factor_text: str) -> float:
    """``"20ms"`` -> 0.02: an unsigned number and a unit of :data:`DELAY_UNITS`, in
    [0, 1 h]. The number is scaled as a decimal, then made a float once: ``9ms`` is the float
    of ``0.009s``, as a resume compares them (``1e-3 * 9.0`` is not)."""
    letters = re.search(r"[^\W\d_]*$", text)
    tail = letters.group() if letters else ""
    unit = next((u for u in DELAY_UNITS if tail.endswith(u)
                 and _decimal(text[:-len(u)]) is not None), None)
    if unit is None:
        unit = tail if tail in DELAY_UNITS else None
        alone = _number(text)  # 20, nan: a number without a unit
        if unit is not None:
            why = f"has no number before {unit}; give one"
        elif alone is not None and math.isfinite(alone):
            as_factor = ("" if factor_text
                         else f"; a factor is written without '+', as {rank}:{text}")
            raise UsageError(f"{what}: delay {text!r} of {item!r} has no unit: write "
                             f"{rank}:{factor_text}+{text}ms or {rank}:{factor_text}+{text}s "
                             f"for a delay{as_factor}")
        elif alone is not None or not tail:
            why = ("has no unit; give ms or s" if alone is not None
                   else "is not a number with ms or s")
        else:
            why = f"has an unknown unit {tail!r}; give ms or s"
        raise UsageError(f"{what}: delay {text!r} of {item!r} {why} (e.g. +20ms, +0.5s)")
    if text[:1] in "+-":
        raise UsageError(f"{what}: delay {text!r} of {item!r} has a sign; write the number "
                         f"alone after the one '+' (e.g. {rank}:{factor_text}+20ms)")
    number = _decimal(text[:-len(unit)])
    assert number is not None  # the unit was taken only before a number
    if number.is_finite():  # the exponent moved: exact, whatever the precision
        sign, digits, exponent = number.as_tuple()
        number = Decimal((sign, digits, int(exponent) + DELAY_UNITS[unit]))
    seconds = math.nan if number.is_nan() else float(number)
    if math.isnan(seconds) or not 0.0 <= seconds <= MAX_DELAY_S:
        raise UsageError(f"{what}: delay {text!r} of {item!r} must be in [0, 3600s] "
                         "(an hour)")
    return seconds


def parse_slowdown(text: str | None, workers: int,
                   what: str | None = None) -> dict[int, Slowdown]:
    """``"0:3,2:+20ms,3:2+1s"`` -> {0: (3, 0), 2: (1, 0.02), 3: (2, 1)}; ranks must be
    workers, factors in [1, 1e6], delays in [0, 1 h]. The one reader of ``--slowdown``'s
    forms. ``what`` names the option in a refusal (the flag and its value on the command
    line, the config field from Python: :func:`hpctrain.options.named`); default the flag."""
    what = what if what is not None else f"--slowdown {text}"
    slowdowns: dict[int, Slowdown] = {}
    items = [s.strip() for s in text.split(",")] if text else []
    if not all(items):  # refused as --seeds refuses one, not skipped
        raise UsageError(f"{what}: an empty entry; want RANK:FACTOR|RANK:+DELAY[,...]")
    for item in items:
        try:
            rank_text, spec = item.split(":")
            rank = int(rank_text)
        except ValueError:
            raise UsageError(f"{what}: cannot parse {item!r}; want {FORMS}") from None
        factor_text, delay_text = _split(spec)
        if (not factor_text and delay_text is None) or delay_text == "":
            raise UsageError(f"{what}: cannot parse {item!r}; want {FORMS}")
        try:
            factor = float(factor_text) if factor_text else 1.0
        except ValueError:
            raise UsageError(f"{what}: cannot parse {item!r}; want {FORMS}") from None
        if not 0 <= rank < workers:
            among = "ranks count from 0" if rank < 0 else f"0..{workers - 1}"
            raise UsageError(f"{what}: rank {rank} is not a worker ({among}); RANK "
                             "is a worker's index among the ranks that train: with "
                             "--eval-rank R, world rank r > R is worker r - 1")
        if not 1.0 <= factor <= MAX_FACTOR:  # False for NaN
            raise UsageError(f"{what}: factor {factor_text} must be in [1, "
                             f"{MAX_FACTOR:g}]")
        delay = (0.0 if delay_text is None
                 else _delay(delay_text, what, item, rank, factor_text))
        if rank in slowdowns:
            raise UsageError(f"{what}: rank {rank} given twice")
        slowdowns[rank] = Slowdown(factor, delay)
    return slowdowns


class Straggler:
    """Pads each step of one worker to ``factor`` times its length plus ``delay`` seconds,
    the whole times a jitter draw."""

    def __init__(self, factor: float = 1.0, jitter: float = 0.0, seed: int = 0, rank: int = 0,
                 delay: float = 0.0):
        self.factor, self.jitter, self.delay = factor, jitter, delay
        self._rng = random.Random(f"straggler:{seed}:{rank}")
        self.slept = 0.0

    @property
    def active(self) -> bool:
        return self.factor != 1.0 or self.delay > 0.0 or self.jitter > 0.0

    def draw(self) -> float:
        """The next step's jitter draw, ``exp(SIGMA z)`` (1 without jitter)."""
        return self._rng.lognormvariate(0.0, self.jitter) if self.jitter else 1.0

    def step_factor(self) -> float:
        """The slowdown factor of the next step (the fixed delay aside)."""
        return self.factor * self.draw()

    def stretched(self, step_seconds: float) -> float:
        """How long the next step, which took ``step_seconds``, is to take:
        ``draw * (factor * t + delay)``, never less than ``t``."""
        draw = self.draw()
        return max(step_seconds, step_seconds * (self.factor * draw) + self.delay * draw)

    def pad(self, step_seconds: float) -> float:
        """Sleep so a step that took ``step_seconds`` takes as long as :meth:`stretched`
        says; returns the sleep requested (also added to ``slept``)."""
        if not self.active:
            return 0.0
        extra = self.stretched(step_seconds) - step_seconds
        if extra > 0:
            time.sleep(extra)
            self.slept += extra
            return extra
        return 0.0

    def state_dict(self) -> dict:
        """Time slept and the jitter generator's state, so a resumed run draws on."""
        version, internal, gauss = self._rng.getstate()
        return {"slept": self.slept, "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self.slept = state["slept"]
