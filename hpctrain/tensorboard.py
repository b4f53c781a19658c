"""TensorBoard event files of a run (``--tensorboard``): ``<out>/tensorboard/events.*``.

Rank 0 writes, through torch's ``SummaryWriter`` (which needs the ``tensorboard`` package):

- ``train/loss`` (rank 0's mean over the last :data:`LOG_EVERY` steps, and at the end over
  the run's last few), ``train/lr``, ``train/samples_per_s`` (all workers, from global
  progress since the last entry) and, for asynchronous runs, ``train/staleness`` (mean over
  rank 0's pushes since the last entry), at the global update count;
- ``train/loss_scale`` (fp16's loss scale), at the same steps;
- ``test/accuracy`` and ``test/loss`` per snapshot, at its update count and wall time (when
  it was taken, so after-training scores line up with the training curves).

A resumed run writes a new event file in the same folder: the earlier run's entries from
the checkpoint's update on are purged (TensorBoard's ``purge_step``), its online scores before
it kept, not logged twice. A run resumed on another number of workers counts its updates in
epochs of another length (:mod:`hpctrain.checkpoint.resize`), so the step axis changes units
at the checkpoint: the earlier entries are in the earlier run's updates, purged from the
checkpoint's own count, the resumed run's in its own (grown, it goes on below that count, its
first entries beside the earlier run's last).

``tensorboard --logdir runs/`` shows every run of a folder side by side.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from hpctrain.errors import UsageError

LOG_EVERY = 10  # rank 0's steps between training entries
SUBDIR = "tensorboard"


def check_installed() -> None:
    """UsageError (before MPI starts) when ``--tensorboard`` cannot write."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(make setup installs it)")


class Board:
    """The run's event file; every method is a no-op unless ``enabled`` (rank 0 asked).

    A run resumed from the checkpoint of update ``resumed`` (the earlier run's count, also
    after a resize) after ``elapsed`` seconds of training purges the earlier run's entries
    from that update on (they were trained again), and stamps its own at the wall time they
    happen. A fresh run (``resumed`` 0) purges every earlier entry: a failed attempt's, in a
    folder it left without a summary.
    """

    def __init__(self, out: str | Path, enabled: bool, resumed: int = 0,
                 elapsed: float = 0.0) -> None:
        self.writer = None
        self.start = time.time() - elapsed  # wall time = start + seconds into training
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out) / SUBDIR), purge_step=resumed)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def scalar(self, tag: str, value: float | None, step: int, t: float | None = None) -> None:
        """``value`` of ``tag`` at global update ``step`` (``t``: seconds into training)."""
        if self.writer is None or value is None:
            return
        self.writer.add_scalar(tag, value, step,
                               walltime=None if t is None else self.start + t)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
