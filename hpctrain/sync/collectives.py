"""The mpi backend's world and tensor collectives, with ``horovod.torch``'s names and semantics.

Everything runs on a private duplicate of the communicator given to :func:`init`, as a
non-blocking mpi4py call on a numpy view of the tensor's memory. Handles are integers, as in
Horovod: ``synchronize(handle)`` waits and returns the output tensor, ``poll(handle)`` tests.
Every call takes ``process_set=`` (process_sets.py) and first runs an agreement round on the
set's communicator (collective_check.py): ranks that call different collectives get one error,
not a hang, and ranks inside ``join()`` take part. Differences from Horovod: CPU tensors only,
no Adasum; collectives are matched by call order, as in MPI: ``name`` is checked to agree
between ranks, not used to reorder calls.
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
from hpctrain.sync import nbc_tuning, stall, timeline
from hpctrain.sync import process_sets as psets
from hpctrain.sync.collective_check import Call
from hpctrain.sync.compression import Compression, NoneCompressor
from hpctrain.sync.process_sets import ProcessSet, global_process_set


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
    cross_comm: Any = None  # the ranks with this rank's local rank, one per node


@dataclass
class _Pending:
    request: Any
    output: torch.Tensor
    finish: Callable[[], Any] | None = None
    token: Any = None  # the timeline's
    keep: Any = None  # buffers MPI reads until the request finishes (mpi4py does not hold them)


_world: World | None = None
_pending: dict[int, _Pending] = {}
_handles = itertools.count(1)


def init(comm: Any = None, process_sets: list[ProcessSet] | None = None, *,
         stall_check_s: float | None = None, stall_timeout_s: float | None = None) -> None:
    """Start the mpi backend on ``comm`` (default ``COMM_WORLD``); a second call does nothing.

    Registers ``process_sets``, starts the stall check (stall.py), and selects a fast
    non-blocking allreduce algorithm for the process (see nbc_tuning).
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
    cross = dup.Split(local.Get_rank(), key=dup.Get_rank())
    _world = World(dup, local, nbc_tuning.prefer_fast_iallreduce(), cross)
    psets.setup(dup, process_sets)
    stall.start(dup, *stall.settings(stall_check_s, stall_timeout_s))


def shutdown() -> None:
    """Finish outstanding operations and release the backend's communicators."""
    global _world
    if _world is None:
        return
    mpicomm.mpi().Request.Waitall([r for p in _pending.values() for r in _requests(p)])
    _pending.clear()
    stall.stop()
    timeline.stop()
    psets.teardown()
    _world.cross_comm.Free()
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


def cross_size() -> int:
    """Number of nodes with a process of this local rank (Horovod's cross size)."""
    return world("cross_size").cross_comm.Get_size()


def cross_rank() -> int:
    """This node's index among those (Horovod's cross rank)."""
    return world("cross_rank").cross_comm.Get_rank()


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


def _check_root(root_rank: int, caller: str, process_set: ProcessSet | None = None) -> int:
    """``root_rank`` (a global rank) as a rank of ``process_set``'s communicator."""
    n = world(caller).comm.Get_size()
    if not isinstance(root_rank, int) or not 0 <= root_rank < n:
        raise UsageError(f"{caller}: root_rank {root_rank!r} is not a rank of the {n} processes")
    return psets.set_rank(process_set, root_rank, caller)


def member(process_set: ProcessSet | None, caller: str) -> psets.Member:
    """The communicator and agreement channel of ``process_set`` for this rank."""
    world(caller)
    return psets.member(process_set, caller)


def register(request: Any, output: Any, finish=None, call: Call | None = None,
             keep: Any = None) -> int:
    """A handle for ``request`` (or a list of them); ``synchronize`` returns ``finish()``
    or ``output``. ``keep``: send buffers to hold until then."""
    return _register(request, output, finish, call, keep)


def _register(request: Any, output: Any, finish=None, call: Call | None = None,
              keep: Any = None) -> int:
    handle = next(_handles)
    token = timeline.started(call) if call is not None else None
    _pending[handle] = _Pending(request, output, finish, token, keep)
    return handle


def tensor_call(kind: str, tensor: torch.Tensor, name: str | None, op: Any = None,
                agree_shape: tuple | None = None, join_plan: Any = None,
                extra: str = "") -> Call:
    """The Call describing a collective on ``tensor`` (``agree_shape``: the part that must
    agree; the whole shape by default)."""
    shape = tuple(tensor.shape)
    return Call(kind, name, None if op is None else ReduceOp(op).name, tensor.dtype, shape,
                (shape if agree_shape is None else agree_shape, extra), join_plan, extra)


def allreduce_plan(tensors: list[torch.Tensor], op: ReduceOp) -> tuple:
    """What a joined rank does for an allreduce of ``tensors``: one of zeros per dtype group."""
    return ("allreduce", int(op), [(str(t.dtype), t.numel()) for t in tensors])


def check_tensor(tensor: torch.Tensor, caller: str, in_place: bool) -> None:
    """UsageError unless ``tensor`` is a CPU tensor (contiguous when written in place)."""
    _check_tensor(tensor, caller, in_place)


def as_bytes(tensor: torch.Tensor) -> Any:
    """numpy uint8 view of a contiguous tensor's memory."""
    return _bytes(tensor)


def _bytes(tensor: torch.Tensor) -> Any:
    """numpy uint8 view of a contiguous tensor's memory."""
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


def _start_allreduce(send: torch.Tensor | None, output: torch.Tensor, op: ReduceOp,
                     prescale: float, postscale: float, caller: str, name: str | None,
                     process_set: ProcessSet | None) -> int:
    """Iallreduce ``send`` into ``output`` (in place on ``output`` when ``send`` is None)."""
    m = member(process_set, caller)
    call = tensor_call("allreduce", output, name, op,
                       join_plan=allreduce_plan([output], op))
    m.channel.agree(call)
    post = postscale / m.comm.Get_size() if op is Average else postscale
    MPI = mpicomm.mpi()
    out_buf, mpi_op = reduce_spec(output.detach().reshape(-1), op)
    if send is None:
        scale_(output.detach(), prescale)
        request = m.comm.Iallreduce(MPI.IN_PLACE, out_buf, mpi_op)
    else:
        send_buf, _ = reduce_spec(send.detach().reshape(-1), op)
        request = m.comm.Iallreduce(send_buf, out_buf, mpi_op)
    return _register(request, output, lambda: scale_(output.detach(), post), call, send)


def allreduce_async(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                    op: Any = None, prescale_factor: float = 1.0,
                    postscale_factor: float = 1.0,
                    process_set: ProcessSet = global_process_set) -> int:
    """Start reducing ``tensor`` over all processes (input unchanged); return a handle."""
    _check_tensor(tensor, "allreduce_async", in_place=False)
    op = resolve_op(op, average)
    src = tensor.detach()
    if prescale_factor == 1:
        output = torch.empty_like(src, memory_format=torch.contiguous_format)
        return _start_allreduce(src.contiguous(), output, op, 1.0, postscale_factor,
                                "allreduce_async", name, process_set)
    return _start_allreduce(None, src.clone(memory_format=torch.contiguous_format), op,
                            prescale_factor, postscale_factor, "allreduce_async", name,
                            process_set)


def allreduce_async_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                     op: Any = None, prescale_factor: float = 1.0,
                     postscale_factor: float = 1.0,
                     process_set: ProcessSet = global_process_set) -> int:
    """Start reducing ``tensor`` in place over all processes; return a handle."""
    _check_tensor(tensor, "allreduce_async_", in_place=True)
    op = resolve_op(op, average)
    return _start_allreduce(None, tensor, op, prescale_factor, postscale_factor,
                            "allreduce_async_", name, process_set)


def allreduce_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
               op: Any = None, prescale_factor: float = 1.0,
               postscale_factor: float = 1.0,
               process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Reduce ``tensor`` in place over all processes and return it."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor,
                                        postscale_factor, process_set))


def allreduce(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
              compression=Compression.none, op: Any = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Reduced copy of ``tensor`` (differentiable: the gradient is reduced the same way)."""
    compressed, ctx = compression.compress(tensor)
    reduced = _Allreduce.apply(compressed, average, name, op, prescale_factor,
                               postscale_factor, process_set)
    return compression.decompress(reduced, ctx)


class _Allreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, average, name, op, prescale, postscale, process_set):
        ctx.args = (average, op, prescale, postscale, process_set)
        return synchronize(allreduce_async(tensor, average, name, op, prescale, postscale,
                                           process_set))

    @staticmethod
    def backward(ctx, grad):
        average, op, prescale, postscale, process_set = ctx.args
        return (allreduce(grad, average, None, NoneCompressor, op, prescale, postscale,
                          process_set), None, None, None, None, None, None)


def allgather_async(tensor: torch.Tensor, name: str | None = None,
                    process_set: ProcessSet = global_process_set) -> int:
    """Start concatenating every process's ``tensor`` along dimension 0; return a handle.

    First dimensions may differ between processes; the others must agree.
    """
    _check_tensor(tensor, "allgather_async", in_place=False)
    w = member(process_set, "allgather_async")
    if tensor.dim() == 0:
        raise UsageError("allgather_async: needs a tensor with at least one dimension")
    src = tensor.detach().contiguous()
    call = tensor_call("allgather", src, name, agree_shape=tuple(src.shape[1:]))
    w.channel.agree(call)
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
    return _register(request, output, call=call, keep=src)


def allgather(tensor: torch.Tensor, name: str | None = None,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Concatenation of every process's ``tensor`` along dimension 0 (differentiable)."""
    return _Allgather.apply(tensor, name, process_set)


class _Allgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, process_set):
        ctx.rows, ctx.process_set = tensor.shape[0], process_set
        return synchronize(allgather_async(tensor, name, process_set))

    @staticmethod
    def backward(ctx, grad):
        ps = ctx.process_set
        reduced = allreduce(grad, op=Average, process_set=ps)
        rows = allgather(torch.tensor([ctx.rows]), process_set=ps)
        start = int(rows[:member(ps, "allgather").comm.Get_rank()].sum())
        return reduced.narrow(0, start, ctx.rows), None, None


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> int:
    """Start overwriting ``tensor`` with root_rank's, in place; return a handle."""
    _check_tensor(tensor, "broadcast_async_", in_place=True)
    m = member(process_set, "broadcast_async_")
    root = _check_root(root_rank, "broadcast_async_", process_set)
    call = tensor_call("broadcast", tensor, name, extra=f"root_rank={root_rank}")
    m.channel.agree(call)
    request = m.comm.Ibcast(_bytes(tensor), root=root)
    return _register(request, tensor, call=call)


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                    process_set: ProcessSet = global_process_set) -> int:
    """Start broadcasting root_rank's ``tensor`` into a new tensor; return a handle."""
    _check_tensor(tensor, "broadcast_async", in_place=False)
    return broadcast_async_(tensor.detach().clone(memory_format=torch.contiguous_format),
                            root_rank, name, process_set)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
               process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Overwrite ``tensor`` with root_rank's, in place, and return it."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """root_rank's ``tensor`` on every process (differentiable)."""
    return _Broadcast.apply(tensor, root_rank, name, process_set)


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name, process_set):
        ctx.root_rank, ctx.process_set = root_rank, process_set
        return synchronize(broadcast_async(tensor, root_rank, name, process_set))

    @staticmethod
    def backward(ctx, grad):
        reduced = allreduce(grad, op=Average, process_set=ctx.process_set)
        mine = rank() == ctx.root_rank
        return (reduced if mine else torch.zeros_like(reduced)), None, None, None


def poll(handle: int) -> bool:
    """Whether the operation behind ``handle`` has finished (then synchronize does not block)."""
    if handle not in _pending:
        raise UsageError(f"poll: unknown handle {handle!r}")
    return mpicomm.mpi().Request.Testall(_requests(_pending[handle]))


def _requests(pending: _Pending) -> list:
    r = pending.request
    return r if isinstance(r, list) else [r]


def synchronize(handle: int) -> torch.Tensor | None:
    """Wait for ``handle`` and return its output tensor (None for an unknown handle, as Horovod)."""
    pending = _pending.pop(handle, None)
    if pending is None:
        return None
    mpicomm.mpi().Request.Waitall(_requests(pending))
    timeline.finished(pending.token)
    return pending.finish() if pending.finish else pending.output


def barrier(process_set: ProcessSet = global_process_set) -> None:
    """Wait until every process of ``process_set`` gets here."""
    m = member(process_set, "barrier")
    m.channel.agree(Call("barrier", join_plan=("barrier",)))
    m.comm.Barrier()


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> Any:
    """root_rank's ``obj`` (pickled) on every process."""
    m = member(process_set, "broadcast_object")
    root = _check_root(root_rank, "broadcast_object", process_set)
    m.channel.agree(Call("broadcast_object", name, agree=(root_rank,),
                         extra=f"root_rank={root_rank}"))
    return m.comm.bcast(obj, root=root)


def allgather_object(obj: Any, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> list:
    """Every process's ``obj`` (pickled), in rank order."""
    m = member(process_set, "allgather_object")
    m.channel.agree(Call("allgather_object", name))
    return m.comm.allgather(obj)
