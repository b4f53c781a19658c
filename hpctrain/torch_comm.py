"""The training loop's communicator when the job has no MPI world: torch.distributed (gloo).

Under ``torchrun`` every process is its own MPI singleton, so the loop's rank, size,
barriers and object collectives come from torch.distributed's default group instead
(:class:`TorchComm`, the few mpi4py ``Intracomm`` methods the loop calls, with mpi4py's
names). Algorithms that move buffers through MPI (RMA windows, Alltoallv, Allreduce of
numpy arrays) need an MPI launch; :func:`hpctrain.launch_checks.check_launch` refuses them here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hpctrain.sync.torch_group import start_process_group
from hpctrain.sync.torch_transport import TorchTransport


class _Wait:
    __slots__ = ("_request",)

    def __init__(self, request):
        self._request = request

    def Wait(self) -> None:  # noqa: N802 (mpi4py's name)
        self._request.wait()


class TorchComm:
    """Rank, size, barrier and object collectives of torch.distributed's default group."""

    def __init__(self):
        created = start_process_group(None)
        self._transport = TorchTransport(owns_default=created)

    def Get_rank(self) -> int:  # noqa: N802
        return self._transport.rank()

    def Get_size(self) -> int:  # noqa: N802
        return self._transport.size()

    def Barrier(self) -> None:  # noqa: N802
        self._transport.barrier()

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self._transport.bcast_object(obj, root)

    def allgather(self, obj: Any) -> list:
        return self._transport.allgather_object(obj)

    def gather(self, obj: Any, root: int = 0) -> list | None:
        return self._transport.gather_object(obj, root)

    def scatter(self, parts: list | None, root: int = 0) -> Any:
        return self._transport.bcast_object(parts, root)[self.Get_rank()]

    def Ibcast(self, buf: np.ndarray, root: int = 0) -> _Wait:  # noqa: N802
        return _Wait(self._transport.ibcast(torch.from_numpy(buf), root))

    def Free(self) -> None:  # noqa: N802
        self._transport.free()
