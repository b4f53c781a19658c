"""hpctrain's own backends' world and tensor collectives, with ``horovod.torch``'s semantics.

The semantics (ops, scaling, handles, autograd) are here once; the bytes move through a
:class:`hpctrain.sync.transport.Transport`: mpi4py on a private duplicate of the communicator
given to :func:`init` (backend ``mpi``), or ``torch.distributed`` (backend ``torch``). CUDA
tensors a transport cannot move where they are go through pinned host memory. Handles are
integers, as in Horovod: ``synchronize(handle)`` waits and returns the output tensor,
``poll(handle)`` tests. Differences from Horovod: no process sets, no Adasum; ``name`` is
accepted and ignored (collectives are matched by call order, as in MPI, not by name).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch

from hpctrain import comm as mpicomm
from hpctrain.devices import HostStage
from hpctrain.errors import UsageError
from hpctrain.sync import nbc_tuning
from hpctrain.sync.compression import Compression, NoneCompressor
from hpctrain.sync.transport import MPITransport, Request, Transport, wait_all


class ReduceOp(IntEnum):
    """Reductions; the values are Horovod's, so the horovod backend takes them unchanged."""

    Average = 0
    Sum = 1
    Adasum = 2
    Min = 3
    Max = 4
    Product = 5


Average, Sum, Adasum, Min, Max, Product = ReduceOp
ADASUM_ERROR = ("op=Adasum is not supported by hpctrain's backends; use op=Average or op=Sum, "
                "or init(backend='horovod')")
TRANSPORTS = ("mpi", "torch")


@dataclass
class World:
    transport: Transport  # its own traffic: never matched with the user's
    iallreduce_algorithm: str | None  # mpi: the Iallreduce algorithm chosen (nbc_tuning)


@dataclass
class _Pending:
    request: Request
    output: torch.Tensor
    finish: Callable[[], torch.Tensor] | None = None


_world: World | None = None
_pending: dict[int, _Pending] = {}
_handles = itertools.count(1)


def init(comm: Any = None, transport: str = "mpi") -> None:
    """Start the collectives on ``transport`` over ``comm`` (default: the MPI world, or for
    ``torch`` under torchrun the launcher's); a second call does nothing.

    ``mpi`` also selects a fast non-blocking allreduce algorithm for the process (see
    nbc_tuning); ``torch`` sets up torch.distributed's default group unless the script did.
    """
    global _world
    if _world is not None:
        return
    if transport == "mpi":
        MPI = mpicomm.mpi()
        moving = MPITransport(MPI.COMM_WORLD if comm is None else comm)
        _world = World(moving, nbc_tuning.prefer_fast_iallreduce())
        return
    from hpctrain.sync import torch_transport

    created = torch_transport.start_process_group(comm)
    _world = World(torch_transport.TorchTransport(owns_default=created), None)


def shutdown() -> None:
    """Finish outstanding operations and release the backend's communicators."""
    global _world
    if _world is None:
        return
    wait_all([p.request for p in _pending.values()])
    _pending.clear()
    _world.transport.free()
    _world = None


def is_initialized() -> bool:
    return _world is not None


def world(caller: str = "world") -> World:
    """The running backend's world; UsageError naming ``caller`` before :func:`init`."""
    if _world is None:
        raise UsageError(f"hpctrain.sync.{caller}() called before hpctrain.sync.init()")
    return _world


def size() -> int:
    return world("size").transport.size()


def rank() -> int:
    return world("rank").transport.rank()


def local_size() -> int:
    return world("local_size").transport.local_size()


def local_rank() -> int:
    return world("local_rank").transport.local_rank()


def mpi_threads_supported() -> bool:
    """Whether MPI runs at ``MPI_THREAD_MULTIPLE`` (False where MPI is not running)."""
    world("mpi_threads_supported")
    MPI = sys.modules.get("mpi4py.MPI")
    return bool(MPI is not None and MPI.Is_initialized() and
                MPI.Query_thread() == MPI.THREAD_MULTIPLE)


def _transport_name() -> str | None:
    return None if _world is None else _world.transport.name


def mpi_enabled() -> bool:
    """Whether collectives go through MPI (the mpi transport)."""
    return _transport_name() in (None, "mpi")


def mpi_built() -> bool:
    return True


def nccl_built() -> bool:
    """Whether collectives can use NCCL (the torch transport, with NCCL in torch)."""
    import torch.distributed as dist

    return _transport_name() == "torch" and dist.is_nccl_available()


def gloo_built() -> bool:
    """Whether collectives can use gloo (the torch transport)."""
    import torch.distributed as dist

    return _transport_name() == "torch" and dist.is_gloo_available()


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
    if tensor.device.type not in ("cpu", "cuda"):
        raise UsageError(f"{caller}: needs a CPU or CUDA tensor, got {tensor.device}")
    if in_place and not tensor.is_contiguous():
        raise UsageError(f"{caller}: in-place operations need a contiguous tensor")


def _check_root(root_rank: int, caller: str) -> None:
    n = world(caller).transport.size()
    if not isinstance(root_rank, int) or not 0 <= root_rank < n:
        raise UsageError(f"{caller}: root_rank {root_rank!r} is not a rank of the {n} processes")


def _register(request: Any, output: torch.Tensor, finish=None) -> int:
    handle = next(_handles)
    _pending[handle] = _Pending(request, output, finish)
    return handle


def _stage(tensor: torch.Tensor) -> HostStage:
    """Where the transport moves ``tensor``: the tensor itself, or a pinned host copy."""
    return HostStage(tensor, direct=world().transport.takes(tensor))


def _start_allreduce(send: torch.Tensor | None, output: torch.Tensor, op: ReduceOp,
                     prescale: float, postscale: float, caller: str) -> int:
    """Start reducing ``send`` into ``output`` (in place on ``output`` when ``send`` is None)."""
    w = world(caller)
    post = postscale / w.transport.size() if op is Average else postscale
    stage = _stage(output.detach())
    if send is not None and stage.staged:  # reduce the host copy in place
        output.detach().copy_(send)
        send = None
    if send is None:
        scale_(output.detach(), prescale)
    request = w.transport.iallreduce(send, stage.to_host(), Sum if op is Average else op)

    def finish() -> torch.Tensor:
        stage.to_device()
        return scale_(output.detach(), post)

    return _register(request, output, finish)


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
    shapes = w.transport.allgather_object((tuple(src.shape), src.dtype))
    if any(s[1:] != src.shape[1:] or d != src.dtype for s, d in shapes):
        raise UsageError(f"allgather_async: shapes and dtypes must agree except in dimension 0, "
                         f"got {[(list(s), str(d)) for s, d in shapes]}")
    rows = [s[0] for s, _ in shapes]
    output = src.new_empty((sum(rows), *src.shape[1:]))
    stage = _stage(output)
    send = src if not stage.staged else src.cpu()
    request = w.transport.iallgather(send, stage.buffer, rows)
    return _register(request, output, stage.to_device)


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
    stage = _stage(tensor.detach())
    request = world().transport.ibcast(stage.to_host(), root_rank)

    def finish() -> torch.Tensor:
        stage.to_device()
        return tensor

    return _register(request, tensor, finish)


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
    return _pending[handle].request.test()


def synchronize(handle: int) -> torch.Tensor | None:
    """Wait for ``handle`` and return its output tensor (None for an unknown handle, as Horovod)."""
    pending = _pending.pop(handle, None)
    if pending is None:
        return None
    pending.request.wait()
    return pending.finish() if pending.finish else pending.output


def barrier() -> None:
    world("barrier").transport.barrier()


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None) -> Any:
    """root_rank's ``obj`` (pickled) on every process."""
    _check_root(root_rank, "broadcast_object")
    return world().transport.bcast_object(obj, root_rank)


def allgather_object(obj: Any, name: str | None = None) -> list:
    """Every process's ``obj`` (pickled), in rank order."""
    return world("allgather_object").transport.allgather_object(obj)
