"""How long a virtual worker's step (forward and backward) takes: step-time models.

``--step-time`` names one:

- ``constant:S``: every step takes S seconds;
- ``lognormal:MEAN:SIGMA``: ``exp(mu + SIGMA z)``, ``z ~ N(0, 1)``, with ``mu`` chosen so the
  mean is MEAN (heavy right tail: occasional slow steps);
- ``gamma:MEAN:SHAPE``: a gamma distribution of mean MEAN (SHAPE large: nearly constant;
  SHAPE 1: exponential);
- ``replay:RUN``: the step times a real run recorded (``RUN/step_times.json``, see
  :mod:`hpctrain.steptimes`); virtual worker k replays worker ``k mod R`` of the R recorded
  (a worker that made no step, which has nothing to replay, left out),
  from its first step, starting over when the record runs out. The recorded times include
  the recorded run's own ``--slowdown`` and ``--jitter`` (a real straggler's sleep is part
  of its step): replay a run without repeating them, or they count twice (``--config`` of a
  real run's ``config.json`` has its own left out, :func:`hpctrain.sim.arguments.build`). With
  ``--comm-time replay``, :meth:`StepTimeModel.rest` gives each replayed step's rest too
  (what the real worker spent between that compute and the next: its push, lock waits and
  bookkeeping), and :meth:`StepTimeModel.lead_in` each worker's lead-in to its first step
  (where recorded; else none).

Draws come from one generator per worker, seeded with (seed, worker), so a simulation is
deterministic; the seed is ``--timing-seed`` (default ``--seed``), which seeds nothing else.
``--slowdown`` (its factor and fixed ``+DELAY``) and ``--jitter`` stretch the drawn time exactly
as they pad a real step (:mod:`hpctrain.stragglers`, ``Straggler.stretched``).
"""

from __future__ import annotations

import math
import random

from hpctrain import options, steptimes
from hpctrain.errors import UsageError
from hpctrain.options import HUGE, Range
from hpctrain.stragglers import MAX_SIGMA

KINDS = ("constant", "lognormal", "gamma", "replay")


# Each number's bounds: a step of at most options.HUGE seconds (past it the virtual times
# overflow to inf), a lognormal SIGMA as --jitter's, a gamma SHAPE in [1/HUGE, HUGE] (Python's
# gammavariate loops forever on a SHAPE of 1e308; a tiny one makes the scale MEAN/SHAPE inf).
_BOUNDS = {"S": Range(0, HUGE, low_open=True), "MEAN": Range(0, HUGE, low_open=True),
           "SIGMA": Range(0, MAX_SIGMA), "SHAPE": Range(1 / HUGE, HUGE)}


def named(spec: str) -> str:
    """``--step-time SPEC`` in a refusal: as typed on the command line, from Python the field
    given (``SimConfig.step_time='x'``, :func:`hpctrain.options.named`), who typed no flag."""
    return options.named(f"--step-time {spec}", "SimConfig", "step_time", spec)


def _numbers(spec: str, parts: list[str], names: tuple[str, ...]) -> list[float]:
    if len(parts) != len(names):
        kind = spec.partition(":")[0]
        raise UsageError(f"{named(spec)}: want {kind}:{':'.join(names)}")
    values = []
    for name, text in zip(names, parts, strict=True):
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"{named(spec)}: {name} {text!r} is not a number") from None
        if (problem := _BOUNDS[name].problem(value)) is not None:
            raise UsageError(f"{named(spec)}: {name} {problem}, got {text}")
        values.append(value)
    return values


class StepTimeModel:
    """Step times of every virtual worker; :meth:`next` draws worker k's next one."""

    def __init__(self, spec: str, workers: int, seed: int = 0):
        self.spec = spec
        kind, _, rest = spec.partition(":")
        if kind not in KINDS:
            raise UsageError(f"{named(spec)}: unknown model {kind!r}; choose from "
                             f"{', '.join(KINDS)} (e.g. constant:0.01, lognormal:0.01:0.3, "
                             "gamma:0.01:4, replay:RUN_DIR)")
        self.kind = kind
        self._rng = [random.Random(f"steptime:{seed}:{k}") for k in range(workers)]
        self._step = [0] * workers
        parts = rest.split(":") if rest else []
        if kind == "constant":
            (self.mean,) = _numbers(spec, parts, ("S",))
        elif kind == "lognormal":
            self.mean, self.sigma = _numbers(spec, parts, ("MEAN", "SIGMA"))
            self._mu = math.log(self.mean) - self.sigma ** 2 / 2
        elif kind == "gamma":
            self.mean, self.shape = _numbers(spec, parts, ("MEAN", "SHAPE"))
        else:
            if not rest:
                raise UsageError(f"{named(spec)}: want replay:RUN_DIR (a run folder with "
                                 f"{steptimes.FILE})")
            self.recorded, self.rests, self.lead_ins = steptimes.read(rest)
            flat = [t for w in self.recorded for t in w]
            self.mean = sum(flat) / len(flat)

    def next(self, k: int) -> float:
        """Worker ``k``'s next step time in seconds."""
        n = self._step[k]
        self._step[k] = n + 1
        if self.kind == "constant":
            return self.mean
        if self.kind == "lognormal":
            return self._rng[k].lognormvariate(self._mu, self.sigma)
        if self.kind == "gamma":
            return self._rng[k].gammavariate(self.shape, self.mean / self.shape)
        record = self.recorded[k % len(self.recorded)]
        return record[n % len(record)]

    def rest(self, k: int) -> float:
        """The recorded rest of worker ``k``'s latest step (a replay with rests only)."""
        if self.kind != "replay" or self.rests is None:
            raise UsageError(f"{named(self.spec)}: no recorded rests to replay")
        record = self.rests[k % len(self.rests)]
        return record[(self._step[k] - 1) % len(record)]

    def lead_in(self, k: int) -> float:
        """The recorded lead-in of worker ``k`` (``k mod R``), from the training loop's start
        to its first step; 0 where none was recorded (a replay with rests only)."""
        if self.kind != "replay" or self.rests is None:
            raise UsageError(f"{named(self.spec)}: no recorded rests to replay")
        return 0.0 if self.lead_ins is None else self.lead_ins[k % len(self.lead_ins)]

    def describe(self) -> dict:
        return {"model": self.spec, "mean_s": self.mean}
