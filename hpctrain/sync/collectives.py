"""The mpi backend's world and tensor collectives, with ``horovod.torch``'s names and semantics.

Everything runs on a private duplicate of the communicator given to :func:`init`, as a
non-blocking mpi4py call on a numpy view of the tensor's memory. Handles are integers, as in
Horovod: ``synchronize(handle)`` waits and returns the output tensor, ``poll(handle)`` tests.
Differences from Horovod: CPU tensors only, no process sets, no Adasum; ``name`` is accepted
and ignored (collectives are matched by call order, as in MPI, not by name).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch

from hpctrain import comm as mpicomm
from hpctrain.errors import UsageError
from hpctrain.sync import nbc_tuning
from hpctrain.sync.compression import Compression, NoneCompressor


class ReduceOp(IntEnum):
    """Reductions; the values are Horovod's, so the horovod backend takes them unchanged."""

    Average = 0
    Sum = 1
    Adasum = 2
    Min = 3
    Max = 4
    Product = 5


Average, Sum, Adasum, Min, Max, Product = ReduceOp
ADASUM_ERROR = ("op=Adasum is not supported by the mpi backend; use op=Average or op=Sum, "
                "or init(backend='horovod')")
_MPI_OPS = {Average: "SUM", Sum: "SUM", Min: "MIN", Max: "MAX", Product: "PROD"}
_TORCH_OPS = {Average: torch.add, Sum: torch.add, Min: torch.minimum, Max: torch.maximum,
              Product: torch.mul}
_HALF_TYPES = (torch.float16, torch.bfloat16)


@dataclass
class World:
    comm: Any  # a duplicate of the user's communicator: our traffic never meets theirs
    local_comm: Any
    iallreduce_algorithm: str


@dataclass
class _Pending:
    request: Any
    output: torch.Tensor
    finish: Callable[[], torch.Tensor] | None = None


_world: World | None = None
_pending: dict[int, _Pending] = {}
_handles = itertools.count(1)


def init(comm: Any = None) -> None:
    """Start the mpi backend on ``comm`` (default ``COMM_WORLD``); a second call does nothing.

    Also selects a fast non-blocking allreduce algorithm for the process (see nbc_tuning).
    """
    global _world
    if _world is not None:
        return
    MPI = mpicomm.mpi()
    comm = MPI.COMM_WORLD if comm is None else comm
    if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
        raise UsageError(f"comm must be an mpi4py intracommunicator or None, got "
                         f"{type(comm).__name__}")
    dup = comm.Dup()
    local = dup.Split_type(MPI.COMM_TYPE_SHARED, key=dup.Get_rank())
    _world = World(dup, local, nbc_tuning.prefer_fast_iallreduce())


def shutdown() -> None:
    """Finish outstanding operations and release the backend's communicators."""
    global _world
    if _world is None:
        return
    mpicomm.mpi().Request.Waitall([p.request for p in _pending.values()])
    _pending.clear()
    _world.local_comm.Free()
    _world.comm.Free()
    _world = None


def is_initialized() -> bool:
    return _world is not None


def world(caller: str = "world") -> World:
    """The running backend's world; UsageError naming ``caller`` before :func:`init`."""
    if _world is None:
        raise UsageError(f"hpctrain.sync.{caller}() called before hpctrain.sync.init()")
    return _world


def size() -> int:
    return world("size").comm.Get_size()


def rank() -> int:
    return world("rank").comm.Get_rank()


def local_size() -> int:
    return world("local_size").local_comm.Get_size()


def local_rank() -> int:
    return world("local_rank").local_comm.Get_rank()


def mpi_threads_supported() -> bool:
    """Whether MPI runs at ``MPI_THREAD_MULTIPLE``."""
    world("mpi_threads_supported")
    MPI = mpicomm.mpi()
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def mpi_enabled() -> bool:
    return True


def mpi_built() -> bool:
    return True


def nccl_built() -> bool:
    return False


def gloo_built() -> bool:
    return False


def resolve_op(op: Any, average: bool | None = None) -> ReduceOp:
    """``op`` as a ReduceOp, from Horovod's deprecated ``average`` when ``op`` is None."""
    if op is not None and average is not None:
        raise UsageError("give op or the deprecated average, not both")
    if op is None:
        return Sum if average is False else Average
    try:
        op = ReduceOp(op)
    except ValueError:
        raise UsageError(f"unknown reduction op {op!r}; use Average, Sum, Min, Max or Product"
                         ) from None
    if op is Adasum:
        raise UsageError(ADASUM_ERROR)
    return op


def reduce_spec(flat: torch.Tensor, op: ReduceOp) -> tuple[Any, Any]:
    """mpi4py buffer (numpy view of contiguous 1-d ``flat``) and MPI op that reduce it by ``op``."""
    if flat.dtype in _HALF_TYPES:  # MPI has no 16-bit float type: reduce the words with torch
        return flat.view(torch.int16).numpy(), _half_op(op, flat.dtype)
    if flat.dtype == torch.bool:
        raise UsageError("allreduce of torch.bool tensors is not supported; use an integer dtype")
    return flat.numpy(), getattr(mpicomm.mpi(), _MPI_OPS[op])


@functools.cache
def _half_op(op: ReduceOp, dtype: torch.dtype) -> Any:
    combine = _TORCH_OPS[op]

    def reduce(inbuf, inoutbuf, datatype) -> None:
        acc = torch.frombuffer(inoutbuf, dtype=dtype)
        combine(acc, torch.frombuffer(inbuf, dtype=dtype), out=acc)

    return mpicomm.mpi().Op.Create(reduce, commute=True)


def scale_(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply in place; integer tensors are scaled in float64 and truncated, as Horovod does."""
    if factor == 1:
        return tensor
    if tensor.is_floating_point() or tensor.is_complex():
        return tensor.mul_(factor)
    return tensor.copy_(tensor.double().mul_(factor))


def _check_tensor(tensor: torch.Tensor, caller: str, in_place: bool) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise UsageError(f"{caller}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise UsageError(f"{caller}: the mpi backend works on CPU tensors, got {tensor.device}")
    if in_place and not tensor.is_contiguous():
        raise UsageError(f"{caller}: in-place operations need a contiguous tensor")


def _check_root(root_rank: int, caller: str) -> None:
    n = world(caller).comm.Get_size()
    if not isinstance(root_rank, int) or not 0 <= root_rank < n:
        raise UsageError(f"{caller}: root_rank {root_rank!r} is not a rank of the {n} processes")


def _register(request: Any, output: torch.Tensor, finish=None) -> int:
    handle = next(_handles)
    _pending[handle] = _Pending(request, output, finish)
    return handle


def _bytes(tensor: torch.Tensor) -> Any:
    """numpy uint8 view of a contiguous tensor's memory."""
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


def _start_allreduce(send: torch.Tensor | None, output: torch.Tensor, op: ReduceOp,
                     prescale: float, postscale: float, caller: str) -> int:
    """Iallreduce ``send`` into ``output`` (in place on ``output`` when ``send`` is None)."""
    w = world(caller)
    post = postscale / w.comm.Get_size() if op is Average else postscale
    MPI = mpicomm.mpi()
    out_buf, mpi_op = reduce_spec(output.detach().reshape(-1), op)
    if send is None:
        scale_(output.detach(), prescale)
        request = w.comm.Iallreduce(MPI.IN_PLACE, out_buf, mpi_op)
    else:
        send_buf, _ = reduce_spec(send.detach().reshape(-1), op)
        request = w.comm.Iallreduce(send_buf, out_buf, mpi_op)
    return _register(request, output, lambda: scale_(output.detach(), post))


def allreduce_async(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                    op: Any = None, prescale_factor: float = 1.0,
                    postscale_factor: float = 1.0) -> int:
    """Start reducing ``tensor`` over all processes (input unchanged); return a handle."""
    _check_tensor(tensor, "allreduce_async", in_place=False)
    op = resolve_op(op, average)
    src = tensor.detach()
    if prescale_factor == 1:
        output = torch.empty_like(src, memory_format=torch.contiguous_format)
        return _start_allreduce(src.contiguous(), output, op, 1.0, postscale_factor,
                                "allreduce_async")
    return _start_allreduce(None, src.clone(memory_format=torch.contiguous_format), op,
                            prescale_factor, postscale_factor, "allreduce_async")


def allreduce_async_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                     op: Any = None, prescale_factor: float = 1.0,
                     postscale_factor: float = 1.0) -> int:
    """Start reducing ``tensor`` in place over all processes; return a handle."""
    _check_tensor(tensor, "allreduce_async_", in_place=True)
    op = resolve_op(op, average)
    return _start_allreduce(None, tensor, op, prescale_factor, postscale_factor,
                            "allreduce_async_")


def allreduce_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
               op: Any = None, prescale_factor: float = 1.0,
               postscale_factor: float = 1.0) -> torch.Tensor:
    """Reduce ``tensor`` in place over all processes and return it."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor,
                                        postscale_factor))


def allreduce(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
              compression=Compression.none, op: Any = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0) -> torch.Tensor:
    """Reduced copy of ``tensor`` (differentiable: the gradient is reduced the same way)."""
    compressed, ctx = compression.compress(tensor)
    reduced = _Allreduce.apply(compressed, average, op, prescale_factor, postscale_factor)
    return compression.decompress(reduced, ctx)


class _Allreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, average, op, prescale, postscale):
        ctx.args = (average, op, prescale, postscale)
        return synchronize(allreduce_async(tensor, average, None, op, prescale, postscale))

    @staticmethod
    def backward(ctx, grad):
        average, op, prescale, postscale = ctx.args
        return (allreduce(grad, average, None, NoneCompressor, op, prescale, postscale),
                None, None, None, None)


def allgather_async(tensor: torch.Tensor, name: str | None = None) -> int:
    """Start concatenating every process's ``tensor`` along dimension 0; return a handle.

    First dimensions may differ between processes; the others must agree.
    """
    _check_tensor(tensor, "allgather_async", in_place=False)
    w = world("allgather_async")
    if tensor.dim() == 0:
        raise UsageError("allgather_async: needs a tensor with at least one dimension")
    src = tensor.detach().contiguous()
    shapes = w.comm.allgather((tuple(src.shape), src.dtype))
    if any(s[1:] != src.shape[1:] or d != src.dtype for s, d in shapes):
        raise UsageError(f"allgather_async: shapes and dtypes must agree except in dimension 0, "
                         f"got {[(list(s), str(d)) for s, d in shapes]}")
    rows = [s[0] for s, _ in shapes]
    output = src.new_empty((sum(rows), *src.shape[1:]))
    row_bytes = math.prod(src.shape[1:]) * src.element_size()
    counts = [r * row_bytes for r in rows]
    displs = list(itertools.accumulate([0, *counts[:-1]]))
    MPI = mpicomm.mpi()
    request = w.comm.Iallgatherv(_bytes(src), [_bytes(output), counts, displs, MPI.BYTE])
    return _register(request, output)


def allgather(tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Concatenation of every process's ``tensor`` along dimension 0 (differentiable)."""
    return _Allgather.apply(tensor)


class _Allgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        ctx.rows = tensor.shape[0]
        return synchronize(allgather_async(tensor))

    @staticmethod
    def backward(ctx, grad):
        reduced = allreduce(grad, op=Average)
        rows = allgather(torch.tensor([ctx.rows]))
        start = int(rows[:rank()].sum())
        return reduced.narrow(0, start, ctx.rows)


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> int:
    """Start overwriting ``tensor`` with root_rank's, in place; return a handle."""
    _check_tensor(tensor, "broadcast_async_", in_place=True)
    _check_root(root_rank, "broadcast_async_")
    request = world().comm.Ibcast(_bytes(tensor), root=root_rank)
    return _register(request, tensor)


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> int:
    """Start broadcasting root_rank's ``tensor`` into a new tensor; return a handle."""
    _check_tensor(tensor, "broadcast_async", in_place=False)
    return broadcast_async_(tensor.detach().clone(memory_format=torch.contiguous_format),
                            root_rank)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> torch.Tensor:
    """Overwrite ``tensor`` with root_rank's, in place, and return it."""
    return synchronize(broadcast_async_(tensor, root_rank))


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> torch.Tensor:
    """root_rank's ``tensor`` on every process (differentiable)."""
    return _Broadcast.apply(tensor, root_rank)


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank):
        ctx.root_rank = root_rank
        return synchronize(broadcast_async(tensor, root_rank))

    @staticmethod
    def backward(ctx, grad):
        reduced = allreduce(grad, op=Average)
        return (reduced if rank() == ctx.root_rank else torch.zeros_like(reduced)), None


def poll(handle: int) -> bool:
    """Whether the operation behind ``handle`` has finished (then synchronize does not block)."""
    if handle not in _pending:
        raise UsageError(f"poll: unknown handle {handle!r}")
    return _pending[handle].request.Test()


def synchronize(handle: int) -> torch.Tensor | None:
    """Wait for ``handle`` and return its output tensor (None for an unknown handle, as Horovod)."""
    pending = _pending.pop(handle, None)
    if pending is None:
        return None
    pending.request.Wait()
    return pending.finish() if pending.finish else pending.output


def barrier() -> None:
    world("barrier").comm.Barrier()


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None) -> Any:
    """root_rank's ``obj`` (pickled) on every process."""
    _check_root(root_rank, "broadcast_object")
    return world().comm.bcast(obj, root=root_rank)


def allgather_object(obj: Any, name: str | None = None) -> list:
    """Every process's ``obj`` (pickled), in rank order."""
    return world("allgather_object").comm.allgather(obj)
