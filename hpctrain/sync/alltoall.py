"""``alltoall``: each rank sends a slice of its tensor's rows to every rank (Horovod's).

``splits[r]`` rows go to rank r (without ``splits``: equal parts, which must divide the
rows); rows past ``sum(splits)`` are not sent, as in Horovod. After the agreement round the
counts are exchanged with a blocking all-to-all of two int64 per rank (the rows for it and the
sender's total, so that every rank knows the rows all ranks move), and the rows with one
non-blocking all-to-all of the transport's (on MPI one ``Ialltoallv`` of rows, or where the
total passes MPI-3's C int count, ``Isend``s and ``Irecv``s of pieces; ``all_to_all_single``
on torch.distributed). ``synchronize``
returns (rows received, splits received), as in Horovod; ``alltoall`` returns the rows alone
when no ``splits`` was given.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hpctrain.errors import UsageError
from hpctrain.sync import collectives as C
from hpctrain.sync.errors import UsageTypeError
from hpctrain.sync.process_sets import ProcessSet, global_process_set


def alltoall_async(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
                   process_set: ProcessSet = global_process_set) -> int:
    """Start the exchange; ``synchronize`` returns (output, received_splits)."""
    return _alltoall_start(tensor, splits, name, process_set, "alltoall_async")


def _alltoall_start(tensor: torch.Tensor, splits: Any, name: str | None,
                    process_set: ProcessSet, caller: str) -> int:
    """:func:`alltoall_async`, its errors naming ``caller``, the function the user called."""
    m = C.member(process_set, caller)
    with C.rejecting(m, "alltoall", name):
        counts = _check_alltoall(tensor, splits, name, m.transport.size(), caller)
    n = m.transport.size()
    src = tensor.detach().narrow(0, 0, sum(counts)).contiguous()
    call = C.tensor_call("alltoall", src, name, agree_shape=tuple(src.shape[1:]))
    m.channel.agree(call)
    # Each peer gets its rows and this rank's total: every rank then knows the same total
    # of rows moved, and so takes the same path past MPI-3's count (transport.ialltoall).
    mine = torch.tensor([[c, sum(counts)] for c in counts], dtype=torch.int64)
    exchanged = torch.empty((n, 2), dtype=torch.int64)
    m.transport.ialltoall(mine, exchanged, [1] * n, [1] * n, total=n * n).wait()
    received, total = exchanged[:, 0], int(exchanged[:, 1].sum())
    recv_rows = received.tolist()
    output = src.new_empty((sum(recv_rows), *src.shape[1:]))
    moved = C.stage(output, m)
    send = src if not moved.staged else src.cpu()
    request = m.transport.ialltoall(send, moved.buffer, counts, recv_rows, total=total)

    def finish() -> tuple:
        return moved.to_device(), received_splits(received, total)

    return C.register(request, None, finish, call, keep=send, m=m)


def received_splits(counts: torch.Tensor, total: int) -> torch.Tensor:
    """The rows each peer sent (a tensor of its own), int32 as Horovod gives them; int64
    where ``total``, the rows all ranks moved, passes int32, so that a peer's count cannot
    wrap (its backward's splits were refused, or past 2**32 rows moved the gradients wrong
    without a word). ``total`` is the same on every rank, and so is the dtype: splits
    gathered or reduced between ranks mismatched where each rank chose by its own."""
    wide = total > torch.iinfo(torch.int32).max
    return counts.to(torch.int64 if wide else torch.int32, memory_format=torch.contiguous_format,
                     copy=True)


def _check_alltoall(tensor: Any, splits: Any, name: Any, n: int, caller: str) -> list[int]:
    """The rows each of the ``n`` ranks gets, or a one-line error naming the bad argument."""
    C.check_tensor(tensor, caller, in_place=False)
    C.check_name(name, caller)
    if tensor.dim() == 0:
        raise UsageError(f"{caller}: needs a tensor with at least one dimension, got a "
                         "0-dim one")
    rows = tensor.shape[0]
    if splits is None:
        if rows % n:
            raise UsageError(f"{caller}: {rows} rows do not split equally among {n} "
                             "processes; pass splits")
        return [rows // n] * n
    counts = _split_counts(splits, caller)
    # Horovod sends the first sum(splits) rows: a buffer may have room to spare
    if len(counts) != n or any(c < 0 for c in counts) or sum(counts) > rows:
        raise UsageError(f"{caller}: splits must be {n} non-negative counts summing "
                         f"to at most the {rows} rows, got {counts}")
    return counts


def _split_counts(splits: Any, caller: str) -> list[int]:
    """``splits`` (a 1-d tensor or array of integers, or a list of ints) as a list of ints."""
    if isinstance(splits, torch.Tensor | np.ndarray):
        if splits.ndim != 1 or not _integral(splits.dtype):
            raise UsageTypeError(f"{caller}: splits must be a 1-d tensor of integers, "
                                 f"got {splits.ndim}-d {splits.dtype}")
        return [int(x) for x in splits.tolist()]
    if isinstance(splits, list | tuple):
        counts = [n for n in map(C.as_integer, splits) if n is not None]
        if len(counts) == len(splits):
            return counts
    raise UsageTypeError(f"{caller}: splits must be a list of integers or a 1-d "
                         f"integer tensor, got {splits!r}")


def _integral(dtype: Any) -> bool:
    """Whether a torch or numpy dtype holds integers (not bools: Horovod takes int32)."""
    if isinstance(dtype, torch.dtype):
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    return dtype.kind in "iu"


def alltoall(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
             process_set: ProcessSet = global_process_set) -> Any:
    """Rows received from every rank, in rank order (differentiable); with ``splits``
    also the received splits."""
    return _Alltoall.apply(tensor, splits, name, process_set)


class _Alltoall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name, process_set):
        output, received = C.synchronize(_alltoall_start(tensor, splits, name, process_set,
                                                         "alltoall"))
        ctx.process_set, ctx.received, ctx.rows = process_set, received, tensor.shape[0]
        if splits is None:
            return output
        ctx.mark_non_differentiable(received)
        return output, received

    @staticmethod
    def backward(ctx, grad, *unused):
        back, _ = alltoall(grad.contiguous(), splits=ctx.received, process_set=ctx.process_set)
        unsent = ctx.rows - back.shape[0]  # rows past sum(splits): no gradient
        if unsent:
            back = torch.cat([back, back.new_zeros((unsent, *back.shape[1:]))])
        return back, None, None, None
