"""Each worker's step times, recorded in every run (``step_times.json`` in the run folder).

A step's time is what one worker spends computing it: the batch to the device, forward,
backward and any injected straggler sleep, without waiting for or talking to the others.
``hpctrain simulate --step-time replay:RUN`` replays them, so a simulation can take the
stragglers, jitter and operating-system noise of a real run on a real machine. Times are
rounded to the microsecond.
"""

from __future__ import annotations

import json
from pathlib import Path

from hpctrain.errors import UsageError
from hpctrain.metrics import write_json_atomic

FILE = "step_times.json"
FORMAT = "hpctrain-step-times/1"


class StepTimes:
    """One worker's step times, gathered to rank 0 and written at the end of the run."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def record(self, seconds: float) -> None:
        self.seconds.append(round(seconds, 6))

    def write(self, out_dir: str | Path, comm, rank: int) -> None:
        """Collective over ``comm`` (None: one process); rank 0 writes ``step_times.json``."""
        every = comm.gather(self.seconds, root=0) if comm is not None else [self.seconds]
        if rank == 0:
            write_json_atomic(Path(out_dir) / FILE, {
                "format": FORMAT, "unit": "s",
                "what": "per worker (rank order), each step's compute: forward, backward and "
                        "straggler sleep",
                "workers": every})


def read(path: str | Path) -> list[list[float]]:
    """Every worker's step times from a run folder or a ``step_times.json`` file."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read step times from {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UsageError(f"{path} is not a {FORMAT} file")
    workers = [[float(t) for t in w] for w in doc["workers"]]
    if not workers or any(not w for w in workers) or \
            any(not t >= 0 for w in workers for t in w):
        raise UsageError(f"{path}: need at least one step time >= 0 for every worker")
    return workers
