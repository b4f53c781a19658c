"""hpctrain's own backends' world and tensor collectives, with ``horovod.torch``'s semantics.

The semantics (ops, scaling, handles, autograd, process sets, agreement) are here once; the
bytes move through a :class:`hpctrain.sync.transport.Transport`: mpi4py on a private duplicate
of the communicator given to :func:`init` (backend ``mpi``), or ``torch.distributed`` (backend
``torch``). A process set's member (process_sets.py) holds a transport on the set's ranks
and its agreement channel (collective_check.py): every call takes ``process_set=`` and first
runs an agreement round on the set, so ranks that call different collectives get one error,
not a hang, and ranks inside ``join()`` take part. CUDA tensors a transport cannot move where
they are go through a host copy (:class:`hpctrain.devices.HostStage`). Handles are integers,
as in Horovod: ``synchronize(handle)`` waits and returns the output, ``poll(handle)`` tests.
Differences from Horovod: collectives are matched by call order, as in MPI: ``name`` is
checked to agree between ranks, not used to reorder calls; ``op=Adasum`` (adasum.py) is done
when the call returns its handle, and works on any process set of 2^m ranks.
"""

from __future__ import annotations

import functools
import io
import itertools
import numbers
import operator
import pickle
import secrets
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, SupportsIndex

import torch

from hpctrain import comm as mpicomm
from hpctrain import nbc_tuning, pickled
from hpctrain.devices import HostStage
from hpctrain.errors import UsageError, plural
from hpctrain.launch_env import as_integer
from hpctrain.sync import adasum, collective_check, stall, timeline
from hpctrain.sync import process_sets as psets
from hpctrain.sync.collective_check import Call
from hpctrain.sync.compression import Compression, NoneCompressor
from hpctrain.sync.errors import HorovodInternalError, UsageTypeError, not_initialized
from hpctrain.sync.process_sets import ProcessSet, global_process_set
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
TRANSPORTS = ("mpi", "torch")


@dataclass
class World:
    transport: Transport  # its own traffic: never matched with the user's
    iallreduce_algorithm: str | None  # mpi: the Iallreduce algorithm chosen (nbc_tuning)
    cross: tuple[int, int] = (1, 0)  # (size, rank) among the ranks of this local rank
    homogeneous: bool = True  # every node runs as many ranks


@dataclass
class _Pending:
    requests: list[Request]
    output: Any
    finish: Callable[[], Any] | None = None
    token: Any = None  # the timeline's
    keep: Any = None  # send buffers the transport reads until the requests finish
    name: str | None = None  # the call's: taken on its process set until synchronized
    member: Any = None


_world: World | None = None
_pending: dict[int, _Pending] = {}
_handles = itertools.count(1)


def init(comm: Any = None, transport: str = "mpi", process_sets: list[ProcessSet] | None = None,
         *, stall_check_s: float | None = None, stall_timeout_s: float | None = None) -> None:
    """Start the collectives on ``transport`` over ``comm`` (default: the MPI world, or for
    ``torch`` under torchrun the launcher's); a second call does nothing.

    Registers ``process_sets`` and starts the stall check (stall.py). ``mpi`` records the
    non-blocking allreduce algorithm chosen as MPI started (nbc_tuning); ``torch`` sets up
    torch.distributed's default group unless the script did.
    """
    global _world
    if _world is not None:
        return
    if transport == "mpi":
        # libnbc's algorithm is chosen where every rank of the job is here together; a
        # script that starts the backend on some ranks (init(comm=sub)) set it on those only,
        # and the next new communicator of the world hung in its id's agreement
        whole = comm is None or comm.Get_size() == mpicomm.mpi().COMM_WORLD.Get_size()
        MPI = mpicomm.init(every_rank=whole)
        moving: Transport = MPITransport(MPI.COMM_WORLD if comm is None else comm)
        algorithm = nbc_tuning.in_effect()
    else:
        from hpctrain.sync import torch_group, torch_transport

        created = torch_group.start_process_group(comm)
        moving, algorithm = torch_transport.TorchTransport(owns_default=created), None
    check_s, timeout_s = stall.settings(stall_check_s, stall_timeout_s)
    # Rank 0's token: the stall check's keys on the group's store (below) for this start alone
    token = secrets.token_hex(8) if moving.rank() == 0 else None
    seen = moving.allgather_object((moving.local_rank(), moving.local_size(),
                                    _must_agree(check_s, timeout_s), token))
    _refuse_disagreement([agreed for _, _, agreed, _ in seen])
    locals_ = [local for local, _, _, _ in seen]
    mine = [r for r, lr in enumerate(locals_) if lr == locals_[moving.rank()]]
    _world = World(moving, algorithm, (len(mine), mine.index(moving.rank())),
                   len({node_size for _, node_size, _, _ in seen}) == 1)
    ranks_comm = _mpi_comm_of(moving, comm)
    psets.setup(moving, process_sets, ranks_comm)
    # No MPI world (torch under torchrun): the stall check goes through the group's store.
    store = torch_group.stall_store(seen[0][3]) if ranks_comm is None else None
    stall.start(ranks_comm, check_s, timeout_s, store=store, rank=moving.rank(),
                asked_for=stall.asked(stall_check_s, stall_timeout_s),
                rounds=collective_check.enabled() or moving.size() == 1)


def _must_agree(check_s: float, timeout_s: float) -> dict:
    """What each rank reads from its own environment that decides which collectives it makes
    (the agreement rounds, the stall check's Dup, the fusion buckets): the ranks must read it
    alike."""
    from hpctrain.sync.buckets import FUSION_ENV, default_bucket_bytes  # it imports this module

    return {collective_check.CHECK_ENV: collective_check.enabled(),
            "the stall check (HOROVOD_STALL_CHECK_*)": check_s > 0 or timeout_s > 0,
            # DistributedOptimizer's default buckets: sized apart, they are allreduces that
            # do not match (a script giving bucket_bytes ignores it, but should set it alike)
            f"{FUSION_ENV} (bytes)": default_bucket_bytes()}


def _refuse_disagreement(seen: list[dict]) -> None:
    """UsageError on every rank (each sees ``seen``) naming a setting the ranks read apart:
    one rank's agreement round met another's data allreduce and garbled it, or hung."""
    found = mpicomm.first_difference(seen)
    if found is not None:
        key, other = found
        raise UsageError(f"{key}: {_shown(seen[0][key])} for rank 0 but "
                         f"{_shown(seen[other][key])} for rank {other}; set it alike for "
                         "every rank")


def _shown(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def _mpi_comm_of(transport: Transport, comm: Any) -> Any:
    """An MPI communicator whose ranks are ``transport``'s (None where MPI does not run the
    job, as under torchrun): for process sets made from communicators and the stall check."""
    if isinstance(transport, MPITransport):
        return transport.comm
    MPI = sys.modules.get("mpi4py.MPI")
    candidate = None
    if MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized():
        # ``comm`` may be torch_comm.TorchComm (the loop's under torchrun): not MPI's
        candidate = comm if isinstance(comm, MPI.Intracomm) else MPI.COMM_WORLD
    same = candidate is not None and candidate.Get_size() == transport.size() and \
        candidate.Get_rank() == transport.rank()
    return candidate if all(transport.allgather_object(same)) else None


def shutdown() -> None:
    """Finish outstanding operations and release the backend's communicators."""
    global _world
    if _world is None:
        return
    wait_all([r for p in _pending.values() for r in p.requests])
    _pending.clear()
    stall.stop()
    timeline.stop()
    psets.teardown()
    if _world.transport.name == "torch":  # every group (optimizers' too), then what they ran
        from hpctrain.sync import torch_transport

        transport = _world.transport
        assert isinstance(transport, torch_transport.TorchTransport)  # the one named "torch"
        torch_transport.release(transport)
    else:
        _world.transport.free()
    _world = None


def is_initialized() -> bool:
    return _world is not None


def pending() -> bool:
    """Whether an operation was started and not synchronized yet."""
    return bool(_pending)


def world(caller: str = "world") -> World:
    """The running backend's world; UsageError naming ``caller`` before :func:`init`."""
    if _world is None:
        raise not_initialized(caller)
    return _world


def size() -> int:
    return world("size").transport.size()


def rank() -> int:
    return world("rank").transport.rank()


def local_size() -> int:
    return world("local_size").transport.local_size()


def local_rank() -> int:
    return world("local_rank").transport.local_rank()


def cross_size() -> int:
    """Number of nodes with a process of this local rank (Horovod's cross size)."""
    return world("cross_size").cross[0]


def cross_rank() -> int:
    """This node's index among those (Horovod's cross rank)."""
    return world("cross_rank").cross[1]


def is_homogeneous() -> bool:
    """Whether every node runs the same number of processes (Horovod's)."""
    return world("is_homogeneous").homogeneous


def mpi_threads_supported() -> bool:
    """Whether MPI runs at ``MPI_THREAD_MULTIPLE`` (False where MPI is not running)."""
    world("mpi_threads_supported")
    MPI = sys.modules.get("mpi4py.MPI")
    return bool(MPI is not None and MPI.Is_initialized() and
                MPI.Query_thread() == MPI.THREAD_MULTIPLE)


def _transport_name() -> str | None:
    return None if _world is None else _world.transport.name


def mpi_enabled() -> bool:
    """Whether collectives go through MPI (the mpi transport); False before ``init()`` and
    after ``shutdown()``, as Horovod's (which backend ``init`` picks is not known yet)."""
    return _transport_name() == "mpi"


def mpi_built() -> bool:
    return True


def nccl_built() -> int:
    """NCCL's version code (``NCCL_VERSION_CODE``, 22105 for 2.21.5) when collectives can use
    NCCL (the torch transport, with NCCL in torch), else 0: Horovod's int, not a bool."""
    import torch.distributed as dist

    if _transport_name() != "torch" or not dist.is_nccl_available():
        return 0
    version = torch.cuda.nccl.version()
    if isinstance(version, int):  # older torch gives the code itself
        return version
    major, minor, patch = version[:3]
    return major * 10000 + minor * 100 + patch


def gloo_built() -> bool:
    """Whether collectives can use gloo (the torch transport)."""
    import torch.distributed as dist

    return _transport_name() == "torch" and dist.is_gloo_available()


def resolve_op(op: Any, average: bool | None = None) -> ReduceOp:
    """``op`` as a ReduceOp, from Horovod's deprecated ``average`` when ``op`` is None (with
    Horovod's DeprecationWarning)."""
    if op is not None and average is not None:
        raise UsageError("give op or the deprecated average, not both")
    if op is None:
        if average is None:
            return Average
        warnings.warn("Parameter `average` has been replaced with `op` and will be removed in "
                      "v1.0", DeprecationWarning, stacklevel=2)
        return Average if average else Sum
    if not isinstance(op, int) or isinstance(op, bool):  # ReduceOp is an int; so are Horovod's
        raise UsageTypeError(f"op must be one of hpctrain.sync's Average, Sum, Adasum, Min, Max "
                             f"or Product, got {op!r}")
    try:
        op = ReduceOp(op)
    except ValueError:
        raise UsageError(f"unknown reduction op {op!r}; use Average, Sum, Adasum, Min, Max "
                         f"or Product") from None
    return op


def wire_op(op: ReduceOp) -> ReduceOp:
    """What the transport reduces with: Average is a Sum, scaled afterwards."""
    return Sum if op is Average else op


def scale_(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply in place; integer tensors are scaled in float64 and truncated, as Horovod does."""
    if factor == 1:
        return tensor
    if tensor.is_floating_point() or tensor.is_complex():
        return tensor.mul_(factor)
    return tensor.copy_(tensor.double().mul_(factor))


def check_tensor(tensor: torch.Tensor, caller: str, in_place: bool) -> None:
    """UsageError unless ``tensor`` is a dense CPU or CUDA tensor (contiguous when written in
    place); UsageTypeError for something else than a tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise UsageTypeError(f"{caller}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:  # Horovod refuses them too; sparse has its own call
        raise UsageError(f"{caller}: needs a dense tensor, got layout {tensor.layout}"
                         + (" (use sparse_allreduce_async)" if tensor.is_sparse else ""))
    if tensor.device.type not in ("cpu", "cuda"):
        raise UsageError(f"{caller}: needs a CPU or CUDA tensor, got {tensor.device}")
    if in_place and not tensor.is_contiguous():
        raise UsageError(f"{caller}: in-place operations need a contiguous tensor")


def check_name(name: Any, caller: str) -> None:
    """UsageTypeError unless ``name`` is a str or None (Horovod encodes it)."""
    if name is not None and not isinstance(name, str):
        raise UsageTypeError(f"{caller}: name must be a str or None, got {name!r}")


def check_scale(factor: Any, what: str, caller: str) -> None:
    """UsageTypeError unless ``factor`` is a real number (or a one-element tensor)."""
    if isinstance(factor, torch.Tensor) and factor.numel() == 1 and \
            not factor.is_complex():
        return
    if not isinstance(factor, numbers.Real):
        raise UsageTypeError(f"{caller}: {what} must be a real number, got {factor!r}")


def check_compression(compression: Any, caller: str) -> None:
    """UsageTypeError unless ``compression`` has Horovod's compressor interface."""
    if not all(hasattr(compression, f) for f in ("compress", "decompress")):
        raise UsageTypeError(f"{caller}: compression must be hpctrain.sync.Compression.none or "
                             f".fp16, got {compression!r}")


def check_root(root_rank: Any, caller: str, process_set: ProcessSet | None = None) -> int:
    """``root_rank`` (a global rank) as a rank of ``process_set``'s transport."""
    n = world(caller).transport.size()
    root = as_integer(root_rank)
    if root is None:
        raise UsageTypeError(f"{caller}: root_rank must be an integer rank, got {root_rank!r}")
    if not 0 <= root < n:
        raise UsageError(f"{caller}: root_rank {root_rank!r} is not a rank of the "
                         f"{plural(n, 'process', 'processes')}")
    return psets.set_rank(process_set, root, caller)


def member(process_set: ProcessSet | None, caller: str) -> psets.Member:
    """The transport and agreement channel of ``process_set`` for this rank."""
    world(caller)
    return psets.member(process_set, caller)


def stage(tensor: torch.Tensor, m: psets.Member) -> HostStage:
    """Where ``m``'s transport moves ``tensor``: the tensor itself, or a host copy."""
    return HostStage(tensor, direct=m.transport.takes(tensor))


def register(requests: Request | list[Request], output: Any, finish=None,
             call: Call | None = None, keep: Any = None, m: psets.Member | None = None) -> int:
    """A handle for ``requests``; ``synchronize`` returns ``finish()`` or ``output``.
    ``keep``: send buffers to hold until then (mpi4py does not hold them)."""
    handle = next(_handles)
    wire = "MPI" if m is None else m.transport.name.upper()
    token = timeline.started(call, wire) if call is not None else None
    listed = requests if isinstance(requests, list) else [requests]
    _pending[handle] = _Pending(listed, output, finish, token, keep,
                                None if call is None else call.name, m)
    return handle


def check_name_free(m: psets.Member, kind: str, name: Any) -> None:
    """UsageError (a ValueError, as Horovod's) when an operation named ``name`` was started on
    ``m``'s set and not synchronized yet: Horovod refuses a second one of the same name while
    the first is processed. Here the name is taken until ``synchronize``, alike on every
    rank, where Horovod's is free once the operation is done."""
    if isinstance(name, str) and any(p.name == name and p.member is m
                                     for p in _pending.values()):
        raise UsageError(f"{kind}: an operation named {name!r} is still in flight on "
                         f"{m.channel.label} (started, not synchronized); synchronize it "
                         "first or give this one another name (Horovod refuses it too)")


def tensor_call(kind: str, tensor: torch.Tensor, name: str | None, op: Any = None,
                agree_shape: tuple | None = None, join_plan: Any = None,
                extra: str = "") -> Call:
    """The Call describing a collective on ``tensor`` (``agree_shape``: the part that must
    agree; the whole shape by default)."""
    shape = tuple(tensor.shape)
    return Call(kind, name, None if op is None else ReduceOp(op).name, tensor.dtype, shape,
                (shape if agree_shape is None else agree_shape, extra), join_plan, extra)


def scale_words(prescale: float, postscale: float) -> str:
    """A reduction's factors as its call says them (none when both are 1): part of what the
    ranks agree on, as Horovod refuses factors that differ ("Mismatched prescale and/or
    postscale factors") rather than return a weighted sum."""
    if prescale == 1 and postscale == 1:
        return ""
    return f"prescale_factor={prescale!r}, postscale_factor={postscale!r}"


def allreduce_plan(moved: list[torch.Tensor], op: ReduceOp,
                   counts: list[list[int]] | None = None) -> tuple:
    """What a joined rank does for an allreduce of the buffers ``moved`` (as the transport
    gets them): one of zeros each, of the same dtype, size and device type; for Adasum, fused
    from tensors of ``counts`` elements (one list a buffer; default: one tensor each)."""
    parts = [(str(t.dtype), t.numel(), t.device.type) for t in moved]
    if op is Adasum:
        counts = [[t.numel()] for t in moved] if counts is None else counts
        return ("adasum", [(*p, c) for p, c in zip(parts, counts, strict=True)])
    return ("allreduce", int(wire_op(op)), parts)


@contextmanager
def rejecting(m: psets.Member, kind: str, name: Any = None) -> Iterator[None]:
    """Check a call's arguments inside; when a check fails, first tell the set's other ranks.

    A rank whose arguments are bad (its splits, its dtype, ...) would otherwise leave while
    the others wait in the agreement round of a call it never makes. It runs that round for
    a "rejected" call instead: a rank with good arguments then raises CollectiveMismatchError
    naming the rejection, a rank with the same bad arguments passes it, and each bad rank
    raises its own error. The round costs nothing when no check fails. The first check:
    ``name`` is not in flight (:func:`check_name_free`).
    """
    try:
        check_name_free(m, kind, name)
        yield
    except (TypeError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        call = Call(kind, name if isinstance(name, str) else None, agree=("rejected", reason),
                    extra=f"rejected: {reason}")
        try:
            m.channel.agree(call)
        except HorovodInternalError:
            pass  # the others are told; this rank's own error is the one to raise
        raise


# Integers whose sum over a few ranks overflows: an average of them would come back wrapped.
_NARROW_INTS = (torch.uint8, torch.int8, torch.int16)


def check_op(op: ReduceOp, tensor: torch.Tensor, m: psets.Member, caller: str) -> None:
    """UsageError (on every rank alike) for a reduction ``m``'s ranks cannot do."""
    if op is Adasum:
        adasum.check(m.transport.size(), tensor.dtype, caller)
    if tensor.is_complex() and op in (Min, Max):  # no order on complex numbers
        raise UsageError(f"{caller}: op={op.name} cannot reduce complex tensors "
                         f"({tensor.dtype}); use Sum, Average or Product")
    if tensor.dtype == torch.bool:  # MPI has no boolean reduction; Horovod refuses them too
        raise UsageError(f"{caller}: cannot reduce torch.bool tensors; use an integer dtype")
    if op is Average and tensor.dtype in _NARROW_INTS:  # Horovod refuses these dtypes
        raise UsageError(f"{caller}: op=Average of a {tensor.dtype} tensor would sum in "
                         f"{str(tensor.dtype).removeprefix('torch.')} and wrap around; "
                         "reduce a wider integer or floating-point copy")


def check_reduction(tensor: Any, op: Any, average: Any, prescale: Any, postscale: Any,
                    name: Any, m: psets.Member, caller: str, in_place: bool) -> ReduceOp:
    """The allreduce core's checks, Horovod's ``_check_function`` and more: the op it
    resolves to, or one-line errors naming the bad argument."""
    check_tensor(tensor, caller, in_place)
    check_name(name, caller)
    check_scale(prescale, "prescale_factor", caller)
    check_scale(postscale, "postscale_factor", caller)
    op = resolve_op(op, average)
    check_op(op, tensor, m, caller)
    return op


def _start_allreduce(send: torch.Tensor | None, output: torch.Tensor, op: ReduceOp,
                     prescale: float, postscale: float, caller: str, name: str | None,
                     process_set: ProcessSet | None, counts: list[int] | None = None) -> int:
    """Start reducing ``send`` into ``output`` (in place on ``output`` when ``send`` is None).
    ``counts``: for Adasum, the sizes of the tensors packed in 1-d ``output``."""
    m = member(process_set, caller)
    check_op(op, output, m, caller)
    counts = [output.numel()] if counts is None else counts
    moved = stage(output.detach(), m)
    call = tensor_call("allreduce", output, name, op,
                       join_plan=allreduce_plan([moved.buffer], op, [counts]),
                       extra=scale_words(prescale, postscale))
    m.channel.agree(call)
    post = postscale / m.transport.size() if op is Average else postscale
    if send is not None and (moved.staged or op is Adasum):  # reduce a copy in place
        output.detach().copy_(send)
        send = None
    if send is None:
        scale_(output.detach(), prescale)
    if op is Adasum:  # blocking: the handle is finished when it is made
        adasum.adasum_(moved.to_host().view(-1), counts, m.transport)
        request: Request | list[Request] = []
    else:
        request = m.transport.iallreduce(send, moved.to_host(), wire_op(op))

    def finish() -> torch.Tensor:  # ``output`` itself: an in-place call returns its tensor
        moved.to_device()
        scale_(output.detach(), post)
        return output

    return register(request, output, finish, call, keep=send, m=m)


def allreduce_async(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                    op: Any = None, prescale_factor: float = 1.0,
                    postscale_factor: float = 1.0,
                    process_set: ProcessSet = global_process_set) -> int:
    """Start reducing ``tensor`` over all processes (input unchanged); return a handle."""
    return _allreduce_copy(tensor, average, name, op, prescale_factor, postscale_factor,
                           process_set, "allreduce_async")


def _allreduce_copy(tensor: torch.Tensor, average: bool | None, name: str | None, op: Any,
                    prescale_factor: float, postscale_factor: float, process_set: ProcessSet,
                    caller: str) -> int:
    """:func:`allreduce_async`, its errors naming ``caller``, the function the user called
    (``allreduce`` said "allreduce_async: expected a torch.Tensor")."""
    m = member(process_set, caller)
    with rejecting(m, "allreduce", name):
        op = check_reduction(tensor, op, average, prescale_factor, postscale_factor, name, m,
                             caller, in_place=False)
    src = tensor.detach()
    if prescale_factor == 1:
        output = torch.empty_like(src, memory_format=torch.contiguous_format)
        return _start_allreduce(src.contiguous(), output, op, 1.0, postscale_factor,
                                caller, name, process_set)
    return _start_allreduce(None, src.clone(memory_format=torch.contiguous_format), op,
                            prescale_factor, postscale_factor, caller, name, process_set)


def fused_adasum_(buffer: torch.Tensor, counts: list[int], name: str,
                  process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Adasum of 1-d ``buffer``, packed from tensors of ``counts`` elements (each with its own
    coefficients), in place: the Adasum optimizer's changes, packed already."""
    return synchronize(_start_allreduce(None, buffer, Adasum, 1.0, 1.0, "DistributedOptimizer",
                                        name, process_set, counts))


def allreduce_async_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                     op: Any = None, prescale_factor: float = 1.0,
                     postscale_factor: float = 1.0,
                     process_set: ProcessSet = global_process_set) -> int:
    """Start reducing ``tensor`` in place over all processes; return a handle."""
    return _allreduce_in_place(tensor, average, name, op, prescale_factor, postscale_factor,
                               process_set, "allreduce_async_")


def _allreduce_in_place(tensor: torch.Tensor, average: bool | None, name: str | None, op: Any,
                        prescale_factor: float, postscale_factor: float,
                        process_set: ProcessSet, caller: str) -> int:
    """:func:`allreduce_async_`, its errors naming ``caller``."""
    m = member(process_set, caller)
    with rejecting(m, "allreduce", name):
        op = check_reduction(tensor, op, average, prescale_factor, postscale_factor, name, m,
                             caller, in_place=True)
    return _start_allreduce(None, tensor, op, prescale_factor, postscale_factor, caller, name,
                            process_set)


def allreduce_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
               op: Any = None, prescale_factor: float = 1.0,
               postscale_factor: float = 1.0,
               process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Reduce ``tensor`` in place over all processes and return it."""
    return synchronize(_allreduce_in_place(tensor, average, name, op, prescale_factor,
                                           postscale_factor, process_set, "allreduce_"))


def allreduce(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
              compression=Compression.none, op: Any = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Reduced copy of ``tensor`` (differentiable: the gradient is reduced the same way)."""
    check_compression(compression, "allreduce")
    compressed, ctx = compression.compress(tensor)
    reduced = _Allreduce.apply(compressed, average, name, op, prescale_factor,
                               postscale_factor, process_set)
    return compression.decompress(reduced, ctx)


class _Allreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, average, name, op, prescale, postscale, process_set):
        ctx.args = (average, op, prescale, postscale, process_set)
        return synchronize(_allreduce_copy(tensor, average, name, op, prescale, postscale,
                                           process_set, "allreduce"))

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
    return _allgather_start(tensor, name, process_set, "allgather_async")


def _allgather_start(tensor: torch.Tensor, name: str | None, process_set: ProcessSet,
                     caller: str) -> int:
    """:func:`allgather_async`, its errors naming ``caller``."""
    m = member(process_set, caller)
    with rejecting(m, "allgather", name):
        check_tensor(tensor, caller, in_place=False)
        check_name(name, caller)
        if tensor.dim() == 0:
            raise UsageError(f"{caller}: needs a tensor with at least one dimension, "
                             "got a 0-dim one")
    src = tensor.detach().contiguous()
    call = tensor_call("allgather", src, name, agree_shape=tuple(src.shape[1:]))
    m.channel.agree(call)
    shapes = m.transport.allgather_object((tuple(src.shape), src.dtype))
    if any(s[1:] != src.shape[1:] or d != src.dtype for s, d in shapes):
        raise UsageError(f"{caller}: shapes and dtypes must agree except in dimension 0, "
                         f"got {[(list(s), str(d)) for s, d in shapes]}")
    rows = [s[0] for s, _ in shapes]
    output = src.new_empty((sum(rows), *src.shape[1:]))
    moved = stage(output, m)
    send = src if not moved.staged else src.cpu()
    request = m.transport.iallgather(send, moved.buffer, rows)
    return register(request, output, moved.to_device, call, keep=send, m=m)


def allgather(tensor: torch.Tensor, name: str | None = None,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Concatenation of every process's ``tensor`` along dimension 0 (differentiable)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
        return synchronize(_allgather_start(tensor, name, process_set, "allgather"))  # its
        # one-line error
    return _Allgather.apply(tensor, name, process_set)


class _Allgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, process_set):
        ctx.rows, ctx.process_set = tensor.shape[0], process_set
        return synchronize(_allgather_start(tensor, name, process_set, "allgather"))

    @staticmethod
    def backward(ctx, grad):
        ps = ctx.process_set
        reduced = allreduce(grad, op=Average, process_set=ps)
        rows = allgather(torch.tensor([ctx.rows]), process_set=ps)
        start = int(rows[:member(ps, "allgather").transport.rank()].sum())
        return reduced.narrow(0, start, ctx.rows), None, None


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> int:
    """Start overwriting ``tensor`` with root_rank's, in place; return a handle."""
    return _broadcast_in_place(tensor, root_rank, name, process_set, "broadcast_async_")


def _broadcast_in_place(tensor: torch.Tensor, root_rank: int, name: str | None,
                        process_set: ProcessSet, caller: str) -> int:
    """:func:`broadcast_async_`, its errors naming ``caller``."""
    m = member(process_set, caller)
    with rejecting(m, "broadcast", name):
        check_tensor(tensor, caller, in_place=True)
        check_name(name, caller)
        root = check_root(root_rank, caller, process_set)
    call = tensor_call("broadcast", tensor, name, extra=f"root_rank={int(root_rank)}")
    m.channel.agree(call)
    moved = stage(tensor.detach(), m)
    request = m.transport.ibcast(moved.to_host(), root)

    def finish() -> torch.Tensor:
        moved.to_device()
        return tensor

    return register(request, tensor, finish, call, m=m)


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                    process_set: ProcessSet = global_process_set) -> int:
    """Start broadcasting root_rank's ``tensor`` into a new tensor; return a handle."""
    return _broadcast_copy(tensor, root_rank, name, process_set, "broadcast_async")


def _broadcast_copy(tensor: torch.Tensor, root_rank: int, name: str | None,
                    process_set: ProcessSet, caller: str) -> int:
    """:func:`broadcast_async`, its errors naming ``caller``."""
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
        return _broadcast_in_place(tensor, root_rank, name, process_set, caller)  # its
        # one-line error
    return _broadcast_in_place(tensor.detach().clone(memory_format=torch.contiguous_format),
                               root_rank, name, process_set, caller)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
               process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Overwrite ``tensor`` with root_rank's, in place, and return it."""
    return synchronize(_broadcast_in_place(tensor, root_rank, name, process_set, "broadcast_"))


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """root_rank's ``tensor`` on every process (differentiable)."""
    return _Broadcast.apply(tensor, root_rank, name, process_set)


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name, process_set):
        ctx.root_rank, ctx.process_set = root_rank, process_set
        return synchronize(_broadcast_copy(tensor, root_rank, name, process_set, "broadcast"))

    @staticmethod
    def backward(ctx, grad):
        reduced = allreduce(grad, op=Average, process_set=ctx.process_set)
        mine = rank() == ctx.root_rank
        return (reduced if mine else torch.zeros_like(reduced)), None, None, None


def poll(handle: int) -> bool:
    """Whether the operation behind ``handle`` has finished (then synchronize does not block)."""
    if handle not in _pending:
        raise UsageError(f"poll: unknown handle {handle!r}")
    return all([r.test() for r in _pending[handle].requests])  # test every one: progress


def synchronize(handle: int) -> Any:
    """Wait for ``handle`` and return its output (None for an unknown handle, as Horovod)."""
    pending = _pending.pop(handle, None)
    if pending is None:
        return None
    wait_all(pending.requests)
    timeline.finished(pending.token)
    return pending.finish() if pending.finish else pending.output


def barrier(process_set: ProcessSet = global_process_set) -> None:
    """Wait until every process of ``process_set`` gets here."""
    m = member(process_set, "barrier")
    m.channel.agree(Call("barrier", join_plan=("barrier",)))
    m.transport.barrier()


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> Any:
    """root_rank's ``obj`` (pickled, its CPU tensors' memory out of band) on every process.

    The root pickles before anything moves and sends its bytes, or why it could not: an
    object it cannot pickle is then an error on every rank, not a root that leaves while
    the others wait for its bytes.
    """
    m = member(process_set, "broadcast_object")
    with rejecting(m, "broadcast_object", name):
        check_name(name, "broadcast_object")
        root = check_root(root_rank, "broadcast_object", process_set)
    root_rank = int(root_rank)
    m.channel.agree(Call("broadcast_object", name, agree=(root_rank,),
                         extra=f"root_rank={root_rank}"))
    mine = _pickled(obj) if m.transport.rank() == root else None
    kind, data = m.transport.bcast_object(mine, root)
    if kind == "error":
        who = "" if m.transport.rank() == root else f"root_rank {root_rank}: "
        raise UsageTypeError(f"broadcast_object: {who}cannot pickle the object: {data}")
    return obj if m.transport.rank() == root else data.loads()  # the root's own, as Horovod


def allgather_object(obj: Any, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> list:
    """Every process's ``obj`` (pickled, as :func:`broadcast_object`'s), in rank order; an
    object some rank cannot pickle is an error on every rank (each sends its bytes or why it
    has none)."""
    m = member(process_set, "allgather_object")
    with rejecting(m, "allgather_object", name):
        check_name(name, "allgather_object")
    m.channel.agree(Call("allgather_object", name))
    parts = m.transport.allgather_object(_pickled(obj))
    failed = [(r, data) for r, (kind, data) in enumerate(parts) if kind == "error"]
    if failed:
        r, why = failed[0]
        raise UsageTypeError(f"allgather_object: rank {m.channel.global_rank(r)} cannot pickle "
                             f"its object: {why}")
    return [data.loads() for _, data in parts]


class Pickled:
    """An object's pickle and its tensors' memory beside it (``PickleBuffer``s: see
    :func:`_pickled`). Pickled again at protocol 5 (the mpi transport: ``pkl5``), the
    buffers go out of band, sent as they are; below 5 (the torch transport's plain
    ``pickle.dumps``), in band, as bytes."""

    __slots__ = ("data", "buffers")

    def __init__(self, data: bytes, *buffers: Any) -> None:
        self.data, self.buffers = data, list(buffers)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple:
        buffers = self.buffers if operator.index(protocol) >= 5 \
            else [bytearray(b) for b in self.buffers]
        return Pickled, (self.data, *buffers)

    def loads(self) -> Any:
        """The object: its tensors use the buffers received (the sender's own are copied)."""
        return pickle.loads(self.data, buffers=self.buffers)


def _pickled(obj: Any, out_of_band: bool = True) -> tuple[str, Any]:
    """("ok", :class:`Pickled`) or ("error", why ``obj`` cannot be pickled). Pickled by
    cloudpickle where installed, as Horovod does, so that lambdas and the classes and functions
    of a user's script travel by value (any rank can load them: they load with pickle). Plain
    CPU tensors' memory goes beside the pickle (``hpctrain.pickled.tensor_reduction``): torch's
    own pickling of it was most of a large object's time. ``out_of_band`` False: inside it
    (one blob: an elastic commit)."""
    try:
        import cloudpickle

        base = cloudpickle.Pickler
    except ImportError:
        base = pickle.Pickler
    buffers: list[pickle.PickleBuffer] = []
    data = io.BytesIO()
    try:
        _pickler(base)(data, protocol=5,
                       buffer_callback=buffers.append if out_of_band else None).dump(obj)
    except Exception as err:  # pickling runs the object's own code: anything may come
        why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if base is pickle.Pickler:
            why += " (plain pickle: cloudpickle, which sends functions by value, is missing)"
        return "error", why
    return "ok", Pickled(data.getvalue(), *buffers)


@functools.cache
def _pickler(base: type) -> type:
    """``base`` (cloudpickle's Pickler or pickle's) with pickled's tensor reducer first: one
    pass, tensors out of band and the rest as ``base`` pickles it."""
    chained = base is not pickle.Pickler  # cloudpickle's own: functions and classes by value

    class ObjectPickler(base):
        def reducer_override(self, obj: Any) -> Any:
            reduced = pickled.tensor_reduction(obj)
            if reduced is NotImplemented and chained:
                return super().reducer_override(obj)
            return reduced

    return ObjectPickler
