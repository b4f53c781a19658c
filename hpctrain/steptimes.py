"""Each worker's step times, recorded in every run (``step_times.json`` in the run folder).

A step's time is what one worker spends computing it: forward, backward and any injected
straggler sleep (the batch is on the device already), without waiting for or talking to the
others.
Its *rest* is everything from the end of that compute to the start of the next step's (the
last step's: to the end of training): the push or allreduce, waiting for locks or for the
others, and the loop's bookkeeping. Its *lead-in* is what comes before its first step, from
the training loop's start: the first epoch's data and the first ticket; it differs between
workers (0.07 and 0.22 s on Fashion-MNIST), and which worker starts first sets the early
staleness. ``hpctrain simulate --step-time replay:RUN`` replays the step times, so a
simulation can take the stragglers, jitter and operating-system noise of a real run on a
real machine; ``--comm-time replay`` replays an async run's rests and lead-ins too. Times
are rounded to the microsecond. A worker keeps its first :data:`KEPT_STEPS` steps (a replay
cycles through them), so that a long run's file and rank 0's gather of it stay small; the
file says how many steps each worker made.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from hpctrain import paths
from hpctrain.errors import UsageError
from hpctrain.metrics import read_json, write_json_atomic
from hpctrain.options import HUGE
from hpctrain.pickled import large_messages

FILE = "step_times.json"
FORMAT = "hpctrain-step-times/1"
# 20,000 steps: 0.5 MB of JSON and about 1.3 MB held per worker; a run of 1M steps kept
# every one, 26 MB of JSON per worker, all of it gathered to rank 0.
KEPT_STEPS = 20_000


class Record(NamedTuple):
    """A run's recorded times, one list per worker in rank order."""

    compute: list[list[float]]
    rest: list[list[float]] | None  # None: recorded before rests were
    lead_in: list[float] | None = None  # None: recorded before lead-ins were


class StepTimes:
    """One worker's step times, rests and lead-in, gathered to rank 0 and written at the
    end."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.rest: list[float] = []
        self.lead_in: float | None = None  # None: :meth:`start` not called
        self.steps = 0  # made, of which the first KEPT_STEPS are kept
        self._started: float | None = None
        self._began = 0.0
        self._ended: float | None = None

    def start(self, now: float) -> None:
        """The training loop starts at ``now``: the lead-in to the first step begins."""
        self._started = now

    def begin(self, now: float) -> None:
        """A step's compute begins at ``now``; the previous step's rest (or the lead-in)
        ends."""
        self._close(now)
        self._began = now

    def end(self, now: float) -> None:
        """The step's compute ends at ``now``."""
        self.steps += 1
        if self.steps <= KEPT_STEPS:
            self.seconds.append(round(now - self._began, 6))
            self._ended = now  # its rest is kept too

    def finish(self, now: float) -> None:
        """Training ends at ``now``: the last step's rest ends (a worker that made no step:
        its lead-in)."""
        self._close(now)

    def _close(self, now: float) -> None:
        if self.lead_in is None and self._started is not None:
            self.lead_in = round(now - self._started, 6)
        if self._ended is not None:
            self.rest.append(round(now - self._ended, 6))
            self._ended = None

    def write(self, out_dir: str | Path, comm, rank: int) -> None:
        """Collective over ``comm`` (None: one process); rank 0 writes ``step_times.json``.
        The gather goes in parts past 2 GiB (:func:`hpctrain.pickled.large_messages`): each
        worker's kept steps pickle to ~0.4 MB, past 2 GiB in all on ~6,000 workers, which
        an MPI-3 library refuses whole."""
        mine = (self.seconds, self.rest, self.lead_in, self.steps)
        every = large_messages(comm).gather(mine, root=0) if comm is not None else [mine]
        if rank == 0:
            lead_ins = [lead_in for _, _, lead_in, _ in every]
            write_json_atomic(Path(out_dir) / FILE, {
                "format": FORMAT, "unit": "s",
                "what": "per worker (rank order), each step's compute: forward, backward and "
                        "straggler sleep",
                "workers": [seconds for seconds, _, _, _ in every],
                "steps_what": f"per worker, the steps made: the first {KEPT_STEPS} are kept",
                "steps": [steps for _, _, _, steps in every],
                "rest_what": "per worker, from the end of each step's compute to the start of "
                             "the next one's (the last: to the end of training): "
                             "communication, waiting and bookkeeping",
                "rest": [rest for _, rest, _, _ in every],
                **({"lead_in_what": "per worker, from the training loop's start to its first "
                                    "step's compute: the first epoch's data, the first ticket",
                    "lead_in": lead_ins} if None not in lead_ins else {})})


def file_of(path: str | Path) -> Path:
    """The ``step_times.json`` a run folder or a file path names: what :func:`read` reads, and
    what a simulation that replays it hashes (``step_times_sha256``)."""
    path = Path(expanded(path))
    return path / FILE if path.is_dir() else path


def expanded(path: str | Path) -> str:
    """A replayed run's path with ``~`` expanded, as in every path option
    (``--step-time replay:~/runs/x``; from Python the field, ``SimConfig.step_time``)."""
    return paths.home_expanded(path, "--step-time")  # the path is a part of the value


def read(path: str | Path) -> Record:
    """Every worker's step times (and rests and lead-ins, where recorded) from a run folder
    or a ``step_times.json`` file."""
    path = file_of(path)
    doc = read_json(path, f"a {FILE} ({FORMAT})", ("format", "workers"))
    if doc["format"] != FORMAT:
        raise UsageError(f"{path} is not a {FILE}: its format is {doc['format']!r}, not {FORMAT}")
    workers = _times(path, doc["workers"])
    rest = _times(path, doc["rest"]) if "rest" in doc else None
    if rest is not None and [len(w) for w in rest] != [len(w) for w in workers]:
        raise UsageError(f"{path}: need one rest per step time for every worker")
    lead_in = _lead_ins(path, doc["lead_in"], len(workers)) if "lead_in" in doc else None
    # A worker of a real run may have made no step (an async worker that never got a ticket,
    # with a batch larger than its data): it has no times to replay, and is left out.
    stepped = [k for k, w in enumerate(workers) if w]
    if not stepped:
        raise UsageError(f"{path}: no worker recorded a step (a run that trained nothing); "
                         "need at least one finite step time >= 0")
    workers = [workers[k] for k in stepped]
    rest = None if rest is None else [rest[k] for k in stepped]
    lead_in = None if lead_in is None else [lead_in[k] for k in stepped]
    return Record(workers, rest, lead_in)


def _seconds(values) -> list[float]:
    """A JSON list of numbers as floats; ValueError for anything else (a string, whose
    characters float() read as numbers: "12" was two workers; a boolean; a whole number
    past a float's range, whose OverflowError was a traceback)."""
    if not isinstance(values, list) \
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in values):
        raise ValueError("not a list of numbers")
    try:
        return [float(t) for t in values]
    except OverflowError:  # an int of 309 digits or more
        raise ValueError("a number past a float's range") from None


def _times(path: Path, lists) -> list[list[float]]:
    try:
        if not isinstance(lists, list):
            raise ValueError("not a list")
        workers = [_seconds(w) for w in lists]
    except ValueError:  # not a list of lists of numbers
        workers = []
    # A step of at most HUGE seconds, as the simulator's constant:S: past it a replay's
    # virtual times overflow to inf (and summary.json gets Infinity).
    if not workers or any(not 0 <= t <= HUGE for w in workers for t in w):
        raise UsageError(f"{path}: need at least one finite step time >= 0 for every worker, "
                         f"each at most {HUGE:g} s")
    return workers


def _lead_ins(path: Path, values, workers: int) -> list[float]:
    try:
        lead_in = _seconds(values)
    except ValueError:  # not a list of numbers
        lead_in = []
    if len(lead_in) != workers or any(not 0 <= t <= HUGE for t in lead_in):
        raise UsageError(f"{path}: need one lead_in for every worker, each a finite time >= 0 "
                         f"of at most {HUGE:g} s")
    return lead_in


def recorded_inference_rate(path: str | Path) -> float | None:
    """Seconds per sample that the EC run whose step times are at ``path`` took to run its
    model in the ensemble's inference (rank 0's ``aggregation.inference_s`` over its
    ``inferred_samples``, from the ``summary.json`` beside them); None where none says: not
    an ec run, one from before the samples were counted, or no such file."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        aggregation = json.loads((folder / "summary.json").read_text()).get("aggregation")
        seconds, samples = aggregation["inference_s"], aggregation["inferred_samples"]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None
    if type(samples) is not int or samples <= 0 or not isinstance(seconds, (int, float)) \
            or not 0 <= seconds <= HUGE:
        return None
    return seconds / samples


def recorded_algo(path: str | Path) -> str | None:
    """The ``--algo`` of the run whose step times are at ``path`` (from the ``config.json``
    beside them); None where none says, as for a bare ``step_times.json``."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        algo = json.loads((folder / "config.json").read_text()).get("algo")
    except (OSError, ValueError, AttributeError):
        return None
    return algo if isinstance(algo, str) else None
