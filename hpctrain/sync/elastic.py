"""``hvd.elastic`` on hpctrain's backends (mpi, torch): not provided.

Horovod Elastic re-forms the job when hosts come and go, driven by ``horovodrun`` with a
host-discovery script. They run under ``mpirun``/``srun`` or torchrun, whose jobs have a
fixed size; ``hpctrain train --resume`` continues a run on another number of ranks instead,
and ``--resume auto`` does it for jobs restarted with the same command line (torchrun
``--max-restarts``, a requeued Slurm job).
With ``init(backend="horovod")``, ``hvd.elastic`` is Horovod's own.
"""

from __future__ import annotations

from typing import Any

from hpctrain.errors import UsageError

_WHY = ("hvd.elastic needs Horovod Elastic (horovodrun with host discovery): use "
        "init(backend='horovod'), or resume the run on the new number of ranks")


def run(func: Any) -> Any:
    raise UsageError(_WHY)


class State:
    def __init__(self, *args: Any, **kwargs: Any):
        raise UsageError(_WHY)


TorchState = ObjectState = State
