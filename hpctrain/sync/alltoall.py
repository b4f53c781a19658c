"""``alltoall``: each rank sends a slice of its tensor's rows to every rank (Horovod's).

``splits[r]`` rows go to rank r (without ``splits``: equal parts, which must divide the
rows). The counts are exchanged with a blocking ``Alltoall`` after the agreement round, the
rows with one ``Ialltoallv`` of bytes. ``synchronize`` returns (rows received, splits
received), as in Horovod; ``alltoall`` returns the rows alone when no ``splits`` was given.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch

from hpctrain import comm as mpicomm
from hpctrain.errors import UsageError
from hpctrain.sync import collectives as C
from hpctrain.sync.process_sets import ProcessSet, global_process_set


def alltoall_async(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
                   process_set: ProcessSet = global_process_set) -> int:
    """Start the exchange; ``synchronize`` returns (output, received_splits)."""
    C.check_tensor(tensor, "alltoall_async", in_place=False)
    if tensor.dim() == 0:
        raise UsageError("alltoall_async: needs a tensor with at least one dimension")
    m = C.member(process_set, "alltoall_async")
    n = m.comm.Get_size()
    rows = tensor.shape[0]
    if splits is None:
        if rows % n:
            raise UsageError(f"alltoall_async: {rows} rows do not split equally among {n} "
                             "processes; pass splits")
        counts = [rows // n] * n
    else:
        counts = [int(x) for x in (splits.tolist() if torch.is_tensor(splits) else splits)]
        if len(counts) != n or any(c < 0 for c in counts) or sum(counts) != rows:
            raise UsageError(f"alltoall_async: splits must be {n} non-negative counts summing "
                             f"to the {rows} rows, got {counts}")
    src = tensor.detach().contiguous()
    call = C.tensor_call("alltoall", src, name, agree_shape=tuple(src.shape[1:]))
    m.channel.agree(call)
    received = np.empty(n, dtype=np.int64)
    m.comm.Alltoall(np.asarray(counts, dtype=np.int64), received)
    row_bytes = math.prod(src.shape[1:]) * src.element_size()
    send_counts = [c * row_bytes for c in counts]
    recv_counts = [int(c) * row_bytes for c in received]
    output = src.new_empty((int(received.sum()), *src.shape[1:]))
    MPI = mpicomm.mpi()
    request = m.comm.Ialltoallv(
        [C.as_bytes(src), send_counts, list(itertools.accumulate([0, *send_counts[:-1]])),
         MPI.BYTE],
        [C.as_bytes(output), recv_counts, list(itertools.accumulate([0, *recv_counts[:-1]])),
         MPI.BYTE])
    received_splits = torch.from_numpy(received.astype(np.int32))
    return C.register(request, (output, received_splits), call=call, keep=src)


def alltoall(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
             process_set: ProcessSet = global_process_set) -> Any:
    """Rows received from every rank, in rank order (differentiable); with ``splits``
    also the received splits."""
    return _Alltoall.apply(tensor, splits, name, process_set)


class _Alltoall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name, process_set):
        output, received = C.synchronize(alltoall_async(tensor, splits, name, process_set))
        ctx.process_set, ctx.received = process_set, received
        if splits is None:
            return output
        ctx.mark_non_differentiable(received)
        return output, received

    @staticmethod
    def backward(ctx, grad, *unused):
        back, _ = alltoall(grad.contiguous(), splits=ctx.received, process_set=ctx.process_set)
        return back, None, None, None
