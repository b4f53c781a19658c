"""Straggler injection: make a worker's steps take FACTOR times as long, with seeded jitter.

``--slowdown RANK:FACTOR[,RANK:FACTOR...]`` slows given workers by a fixed factor (RANK is a
worker's index among the ranks that train: with ``--eval-rank R``, world rank r > R is worker
r - 1; ``--servers`` are the last ranks and train not);
``--jitter SIGMA`` multiplies every worker's step by a log-normal factor ``exp(SIGMA * z)``,
``z ~ N(0, 1)``, drawn per step from a generator seeded with (seed, rank). A step that should
take ``f`` times its measured time ``t`` is padded with a sleep of ``(f - 1) * t`` (no sleep
when ``f <= 1``: a step cannot be made faster). The pad follows the measured time, so the
machine's own noise in ``t`` (a loaded node) is multiplied by ``f`` too: one run's times
compare noisily with another's, and there is no fixed-delay mode.
"""

from __future__ import annotations

import random
import time

from hpctrain.errors import UsageError

# The largest log-normal SIGMA (--jitter, a simulation's lognormal step times): exp(5 z) is
# already e^5 (148x) at one standard deviation; far beyond it the draws overflow.
MAX_SIGMA = 5.0
MAX_FACTOR = 1e6  # the largest --slowdown factor: a 10 ms step then sleeps for hours


def parse_slowdown(text: str | None, workers: int) -> dict[int, float]:
    """``"0:3,2:1.5"`` -> {0: 3.0, 2: 1.5}; ranks must be workers, factors in [1, 1e6]."""
    factors: dict[int, float] = {}
    items = [s.strip() for s in text.split(",")] if text else []
    if not all(items):  # refused as --seeds refuses one, not skipped
        raise UsageError(f"--slowdown {text}: an empty entry; want RANK:FACTOR[,...]")
    for item in items:
        try:
            rank_text, factor_text = item.split(":")
            rank, factor = int(rank_text), float(factor_text)
        except ValueError:
            raise UsageError(f"--slowdown {text}: cannot parse {item!r}; want RANK:FACTOR") \
                from None
        if not 0 <= rank < workers:
            among = "ranks count from 0" if rank < 0 else f"0..{workers - 1}"
            raise UsageError(f"--slowdown {text}: rank {rank} is not a worker ({among}); RANK "
                             "is a worker's index among the ranks that train: with "
                             "--eval-rank R, world rank r > R is worker r - 1")
        if not 1.0 <= factor <= MAX_FACTOR:  # False for NaN
            raise UsageError(f"--slowdown {text}: factor {factor_text} must be in [1, "
                             f"{MAX_FACTOR:g}]")
        if rank in factors:
            raise UsageError(f"--slowdown {text}: rank {rank} given twice")
        factors[rank] = factor
    return factors


class Straggler:
    """Pads each step of one worker to ``factor`` (times a jitter draw) times its length."""

    def __init__(self, factor: float = 1.0, jitter: float = 0.0, seed: int = 0, rank: int = 0):
        self.factor, self.jitter = factor, jitter
        self._rng = random.Random(f"straggler:{seed}:{rank}")
        self.slept = 0.0

    @property
    def active(self) -> bool:
        return self.factor != 1.0 or self.jitter > 0.0

    def step_factor(self) -> float:
        """The slowdown of the next step."""
        return self.factor * (self._rng.lognormvariate(0.0, self.jitter) if self.jitter else 1.0)

    def pad(self, step_seconds: float) -> float:
        """Sleep so a step that took ``step_seconds`` takes its factor times as long."""
        if not self.active:
            return 0.0
        extra = (self.step_factor() - 1.0) * step_seconds
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
