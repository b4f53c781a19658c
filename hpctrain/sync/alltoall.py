"""``alltoall``: each rank sends a slice of its tensor's rows to every rank (Horovod's).

``splits[r]`` rows go to rank r (without ``splits``: equal parts, which must divide the
rows). After the agreement round the counts are exchanged with a blocking all-to-all of one
int64 per rank, and the rows with one non-blocking all-to-all of the transport's
(``Ialltoallv`` of bytes on MPI, ``all_to_all_single`` on torch.distributed). ``synchronize``
returns (rows received, splits received), as in Horovod; ``alltoall`` returns the rows alone
when no ``splits`` was given.
"""

from __future__ import annotations

from typing import Any

import torch

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
    n = m.transport.size()
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
    received = torch.empty(n, dtype=torch.int64)
    m.transport.ialltoall(torch.tensor(counts, dtype=torch.int64), received, [1] * n,
                          [1] * n).wait()
    recv_rows = received.tolist()
    output = src.new_empty((sum(recv_rows), *src.shape[1:]))
    moved = C.stage(output, m)
    send = src if not moved.staged else src.cpu()
    request = m.transport.ialltoall(send, moved.buffer, counts, recv_rows)

    def finish() -> tuple:
        return moved.to_device(), received.to(torch.int32)

    return C.register(request, None, finish, call, keep=send, m=m)


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
