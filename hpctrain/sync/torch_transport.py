"""``--sync-backend torch``: hpctrain's collectives on ``torch.distributed`` (NCCL and gloo).

:class:`TorchTransport` moves tensors over a group that :mod:`hpctrain.sync.torch_group`
made (the default group) or that this module made from one (``dup``, ``split``). CUDA tensors
go through NCCL where the group has it; where it is gloo alone (ranks of one node sharing a
GPU, or a rank without NCCL: :func:`hpctrain.sync.torch_group.backend_for`),
:meth:`TorchTransport.takes` declines CUDA tensors, which the caller stages through pinned
host memory (:class:`hpctrain.devices.HostStage`) as for a host-only MPI.

torch.distributed makes a group on every rank of the job at once (``new_group``), so
:meth:`TorchTransport.split` (a process set, registered by every rank) makes two groups: the
set's, and a spare that the set's one ``DistributedOptimizer`` takes through ``dup()``.
"""

from __future__ import annotations

import atexit
import math
import pickle
import socket
import sys
import threading
import time
import weakref
from typing import Any

import torch
import torch.distributed as dist

from hpctrain.errors import UsageError
from hpctrain.sync.transport import MAX, MIN, PRODUCT, SUM, Request

_OPS = {SUM: dist.ReduceOp.SUM, MIN: dist.ReduceOp.MIN, MAX: dist.ReduceOp.MAX,
        PRODUCT: dist.ReduceOp.PRODUCT}
# Integer types gloo and NCCL have no type for: moved as their bytes (_raw), and reduced in
# int64 (_wide), which holds every 16- and 32-bit value (uint64 is refused for reductions).
# (torch.uint16 and wider came with torch 2.3.)
_UNTYPED = tuple(getattr(torch, t) for t in ("int16", "uint16", "uint32", "uint64")
                 if hasattr(torch, t))
# gloo took bfloat16 from torch 2.2 (torch 2.1: "Invalid scalar type"): moved as its bytes
# and reduced in float32 before that.
if torch.torch_version.TorchVersion(torch.__version__) < "2.2":
    _UNTYPED += (torch.bfloat16,)
# The tensors lent to each operation (_lend) that a work of torch.distributed may still hold.
_LENT: list[tuple[torch.Tensor, ...]] = []
_LENT_LOCK = threading.Lock()  # a CUDA parameter's gradient hook lends from autograd's thread
# Tensor._use_count tells when no work holds a lent tensor any more; a torch without it
# keeps the last operations' tensors instead: more than a group has worker threads (gloo's
# two), each holding at most the one operation it runs.
_COUNTS_USES = hasattr(torch.Tensor, "_use_count")
_WINDOW = 16
_SETTLE_S = 1.0  # at most this long, at shutdown and exit, for the workers to let go:
# they do within milliseconds of an operation's end; a tensor Python itself still holds (a
# work never waited for) keeps the count up for the whole wait, and Python drops it later


def _lend(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Aliases of ``tensors`` (sharing their memory) to hand to one torch.distributed
    operation, which Python holds until no work holds them, so that Python's thread, not a
    worker's, drops the last reference to them.

    A tensor whose last reference goes in a worker thread (gloo's runLoop) needs the GIL
    there (its Python object, or a ``frombuffer`` storage): at interpreter exit that aborted
    the process ("terminate called without an active exception"), and before torch 2.8 a
    group's destructor, which joins its workers holding the GIL, hung. Destroying the groups
    first does not end their workers where something else still holds a group:
    torch.distributed.nn.functional, which ``torch.optim`` imports with Dynamo, takes the
    default group as a default argument when it is imported after init. So each operation
    gets aliases only this module knows, which no work holds any more once :func:`_held`
    says so. Call it once per operation, after the previous operation was started (it forgets the
    settled ones first)."""
    aliases = [t.detach() for t in tensors]
    with _LENT_LOCK:
        _forget_settled()
        _LENT.append(tuple(aliases))
    return aliases


def _held(lent: tuple[torch.Tensor, ...]) -> bool:
    """Whether a work may still hold one of ``lent``'s tensors: its use count, or (torch >=
    2.9) the reference to its Python object that C++ holds while the count is above 1 and
    gives back just after the count drops, in the worker's thread, with the GIL. A tensor
    forgotten between the two (at exit: finalizing) aborted the process the same way."""
    return any(t._use_count() > 1  # type: ignore[attr-defined]  # private, not in the stubs
               or sys.getrefcount(t) > _FREE_REFS for t in lent)


# What sys.getrefcount says in _held of a tensor only a tuple holds (the tuple, the loop's
# name, the call's argument), measured the same way.
_FREE_REFS = max(sys.getrefcount(t) for t in (torch.empty(0),))


def _forget_settled() -> None:
    if _COUNTS_USES:
        _LENT[:] = [lent for lent in _LENT if _held(lent)]
    elif len(_LENT) >= _WINDOW:
        del _LENT[:len(_LENT) - _WINDOW + 1]


def settle(timeout_s: float = _SETTLE_S) -> None:
    """Wait up to ``timeout_s`` until no work holds a lent tensor (at shutdown, and at exit
    for groups the script or the training loop leave running); where the use count is
    unknown, forget the last operations' tensors, as before."""
    if not _COUNTS_USES:
        with _LENT_LOCK:
            _LENT.clear()
        return
    deadline = time.monotonic() + timeout_s
    while True:
        with _LENT_LOCK:
            _forget_settled()
            if not _LENT or time.monotonic() > deadline:
                return
        time.sleep(0.001)


if _COUNTS_USES:
    atexit.register(settle)


def _raw(t: torch.Tensor) -> torch.Tensor:
    """A contiguous ``t`` of an untyped dtype as its bytes (a view, rows kept as the first
    dimension, so that row counts and writes stay those of ``t``); other tensors as given."""
    if t.dtype not in _UNTYPED:
        return t
    rows = t.shape[0] if t.dim() else 1
    cols = math.prod(t.shape[1:]) if t.dim() else 1  # not -1: no rows would give width 0
    return t.reshape(rows, cols).view(torch.uint8)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` to reduce an untyped dtype in: int64, float32 for bfloat16."""
    if t.dtype == getattr(torch, "uint64", None):
        raise UsageError("backend 'torch': reducing torch.uint64 tensors is not supported "
                         "(gloo and NCCL have no such type); use the mpi backend")
    return t.to(torch.float32 if t.is_floating_point() else torch.int64)


def release(world: TorchTransport) -> None:
    """At shutdown: free every transport made from another (``dup``, ``split``) and not freed
    yet, then ``world`` (whose default group, if it owns it, takes every group with it), then
    wait until the workers let go of what :func:`_lend` lent them. A DistributedOptimizer's
    own transport (``dup``) has no other owner to free it: its group and the group's worker
    threads lived on to interpreter exit. The loop's own transport under torchrun
    (:class:`hpctrain.torch_comm.TorchComm`) is made from none and stays."""
    for transport in list(_DERIVED):
        transport.free()
    world.free()
    settle()


class _Work:
    __slots__ = ("_work", "_then")

    def __init__(self, work: Any, then=None):
        self._work, self._then = work, then

    def wait(self) -> None:
        self._work.wait()
        if self._then is not None:
            self._then()
            self._then = None

    def test(self) -> bool:
        return self._work.is_completed()


class _Works:
    __slots__ = ("_works",)

    def __init__(self, works: list):
        self._works = works

    def wait(self) -> None:
        for work in self._works:
            work.wait()

    def test(self) -> bool:
        return all([work.is_completed() for work in self._works])


_FREED = object()  # a freed transport's group: neither a group nor None (the default group)
_DERIVED: weakref.WeakSet = weakref.WeakSet()  # made by dup/split, not freed yet (release)


class TorchTransport:
    """torch.distributed collectives on ``group`` (None: the default group)."""

    name = "torch"

    def __init__(self, group: Any = None, *, owns_default: bool = False, spare: Any = None):
        self.group = group
        self._owns_default = owns_default
        self._spare = spare  # a second group on the same ranks, for dup() (see split)
        self.nccl = "nccl" in str(dist.get_backend(group)).lower()
        nodes = self.allgather_object(socket.gethostname())
        me = nodes[self.rank()]
        self._local = (sum(1 for n in nodes[:self.rank()] if n == me), nodes.count(me))

    def takes(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu" or self.nccl

    def size(self) -> int:
        return dist.get_world_size(self.group)

    def rank(self) -> int:
        return dist.get_rank(self.group)

    def local_size(self) -> int:
        return self._local[1]

    def local_rank(self) -> int:
        return self._local[0]

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def iallreduce(self, send: torch.Tensor | None, out: torch.Tensor, op: int) -> Request:
        if out.dtype in _UNTYPED:
            wide = _wide(out if send is None else send)
            (lent,) = _lend(wide)
            work = dist.all_reduce(lent, op=_OPS[int(op)], group=self.group, async_op=True)
            return _Work(work, lambda: out.copy_(wide))
        if send is not None:
            out.copy_(send)
        (lent,) = _lend(out)
        return _Work(dist.all_reduce(lent, op=_OPS[int(op)], group=self.group, async_op=True))

    def iallgather(self, send: torch.Tensor, out: torch.Tensor, rows: list[int]) -> Request:
        send, out = _raw(send), _raw(out)
        most = max(rows)
        padded = send.new_zeros((most, *send.shape[1:]))
        padded[:len(send)] = send
        parts = [torch.empty_like(padded) for _ in rows]
        lent, *lent_parts = _lend(padded, *parts)
        work = dist.all_gather(lent_parts, lent, group=self.group, async_op=True)

        def unpad() -> None:
            torch.cat([p[:r] for p, r in zip(parts, rows, strict=True)], out=out)

        return _Work(work, unpad)

    def ibcast(self, tensor: torch.Tensor, root: int) -> Request:
        (lent,) = _lend(_raw(tensor))
        return _Work(dist.broadcast(lent, src=self._global(root), group=self.group,
                                    async_op=True))

    def ialltoall(self, send: torch.Tensor, out: torch.Tensor, send_rows: list[int],
                  recv_rows: list[int], *, total: int) -> Request:
        # One call whatever ``total``: torch.distributed takes split sizes as int64.
        out, send = _lend(_raw(out), _raw(send))
        return _Work(dist.all_to_all_single(out, send, output_split_sizes=recv_rows,
                                            input_split_sizes=send_rows, group=self.group,
                                            async_op=True))

    def isendrecv(self, send: torch.Tensor, out: torch.Tensor, peer: int) -> Request:
        peer = self._global(peer)
        moved = [(f, t) for f, t in ((dist.isend, _raw(send)), (dist.irecv, _raw(out)))
                 if t.numel()]
        lent = _lend(*(t for _, t in moved))
        ops = [dist.P2POp(f, t, peer, self.group) for (f, _), t in zip(moved, lent, strict=True)]
        return _Works(dist.batch_isend_irecv(ops) if ops else [])

    def ireducescatter(self, send: torch.Tensor, out: torch.Tensor, counts: list[int],
                       op: int) -> Request:
        if self.nccl and send.device.type != "cpu" and send.dtype not in _UNTYPED:
            lent, *parts = _lend(out, *send.split(counts))
            return _Work(dist.reduce_scatter(lent, parts, op=_OPS[int(op)], group=self.group,
                                             async_op=True))
        # gloo: one allreduce of the whole vector, this rank's rows kept. gloo has no
        # reduce_scatter before torch 2.8, and from 2.8 runs one allreduce per rank.
        whole = _wide(send) if send.dtype in _UNTYPED else send.clone()
        (lent,) = _lend(whole)
        work = dist.all_reduce(lent, op=_OPS[int(op)], group=self.group, async_op=True)
        mine = whole.narrow(0, sum(counts[:self.rank()]), counts[self.rank()])
        return _Work(work, lambda: out.copy_(mine))

    def barrier(self) -> None:
        # An allreduce of a CPU tensor: gloo's, whatever backend CUDA tensors use.
        self.iallreduce(None, torch.zeros(1), SUM).wait()

    def bcast_object(self, obj: Any, root: int) -> Any:
        data = _pickle(obj) if self.rank() == root else torch.empty(0, dtype=torch.uint8)
        length = torch.tensor([data.numel()])
        self.ibcast(length, root).wait()
        if self.rank() != root:
            data = torch.empty(int(length), dtype=torch.uint8)
        self.ibcast(data, root).wait()
        return pickle.loads(data.numpy().tobytes())

    def _lengths(self, data: torch.Tensor) -> list[int]:
        """Every rank's ``data.numel()`` (collective): the sizes of pickled objects."""
        lengths = torch.empty(self.size(), dtype=torch.int64)
        self.iallgather(torch.tensor([data.numel()]), lengths, [1] * self.size()).wait()
        return lengths.tolist()

    def allgather_object(self, obj: Any) -> list:
        data = _pickle(obj)
        rows = self._lengths(data)
        out = torch.empty(sum(rows), dtype=torch.uint8)
        self.iallgather(data, out, rows).wait()
        return [pickle.loads(part.numpy().tobytes()) for part in out.split(rows)]

    def gather_object(self, obj: Any, root: int) -> list | None:
        """Every rank's ``obj`` at ``root`` (None elsewhere); only the lengths go to all."""
        data = _pickle(obj)
        rows = self._lengths(data)
        padded = data.new_zeros(max(rows))
        padded[:len(data)] = data
        parts = [torch.empty_like(padded) for _ in rows] if self.rank() == root else None
        lent, *lent_parts = _lend(padded, *(parts or []))
        dist.gather(lent, lent_parts if parts is not None else None, dst=self._global(root),
                    group=self.group, async_op=True).wait()
        if parts is None:
            return None
        return [pickle.loads(p[:r].numpy().tobytes()) for p, r in zip(parts, rows, strict=True)]

    def dup(self) -> TorchTransport:
        """torch.distributed makes a group on every rank of the job at once; so a set of
        fewer ranks (split) has one group made for dup() in advance, and no more."""
        if self._spare is not None:
            group, self._spare = self._spare, None
            return _derived(TorchTransport(group))
        if self.size() != dist.get_world_size():
            raise UsageError("backend 'torch': a process set other than the global one takes "
                             "one DistributedOptimizer (torch.distributed makes groups on "
                             "every rank at once); use the mpi backend for more")
        ranks = [self._global(r) for r in range(self.size())]
        return _derived(TorchTransport(dist.new_group(ranks,
                                                      backend=dist.get_backend(self.group))))

    def split(self, ranks: list[int]) -> TorchTransport | None:
        members = [self._global(r) for r in ranks]
        backend = dist.get_backend(self.group)
        group = dist.new_group(members, backend=backend)
        spare = dist.new_group(members, backend=backend)
        if dist.get_rank() not in members:
            return None
        return _derived(TorchTransport(group, spare=spare))

    def free(self) -> None:
        """Destroy the groups, and drop this transport's references to them: the last one
        going ends a group's worker threads now, where nothing else holds the group (what
        they ran, :func:`_lend` holds until they let go of it)."""
        if self.group is _FREED:
            return
        if self._spare is not None:
            dist.destroy_process_group(self._spare)
        if self.group is not None:
            dist.destroy_process_group(self.group)
        elif self._owns_default:
            dist.destroy_process_group()
        self.group = self._spare = _FREED
        _DERIVED.discard(self)


def _derived(transport: TorchTransport) -> TorchTransport:
    _DERIVED.add(transport)
    return transport


def _pickle(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
