"""Fused gradient buckets, reduced while backward is still running.

Each parameter's gradient is packed into its bucket by a hook that fires once autograd has
accumulated it; a bucket's non-blocking ``Iallreduce`` starts as soon as all its gradients are
in. Buckets hold parameters in reverse order (backward reaches the last layers first), of one
wire dtype, up to ``bucket_bytes`` each. They are launched strictly in bucket order on every
rank, so MPI sees the same sequence of collectives everywhere, even when gradients arrive in
a different order or not at all (missing ones are sent as zeros at synchronize, as Horovod
does).

Without compression a parameter's ``.grad`` is re-pointed at its slice of the bucket when it
is packed, so the reduced values land in ``.grad`` with no copy back (as DDP's
``gradient_as_bucket_view``); if ``.grad`` already is that slice, packing copies nothing.

A parameter whose gradient comes sparse (an embedding's) leaves the buckets: from the
step it is first seen sparse its gradient is reduced by allgather (sparse.py), as Horovod
does, unless ``sparse_as_dense``; the buckets are planned again without it for the next step.
With ``sparse_as_dense`` it is reduced in its bucket and handed back sparse, as Horovod does
(a sparse optimizer such as SparseAdam takes nothing else).

The hooks hold their reducer weakly: a dropped optimizer's reducer goes, and its finalizer
removes its hooks and frees its transport, so a new optimizer can take the parameters over.
While it lives, another reducer on the same parameters is refused (both would reduce them).

Under a torch profiler (``--profile``, or a script's own) each launch is a
``hpctrain.allreduce_bucket`` span and each progress call a ``hpctrain.allreduce_progress``
one, inside the ``AccumulateGrad`` whose hook made them.

Buckets live where the parameters are. A transport that cannot move them there (an MPI
that is not CUDA-aware, or Open MPI's non-blocking collectives) gets a pinned host copy of
each. A CUDA bucket's copy starts, without waiting, when its last gradient is packed: queued
on the current stream with a CUDA event after it (``HostStage.start_to_host``), as Horovod
records an event at the hook. The bucket launches once that event has completed, as seen by
a later hook's progress call or, at synchronize, waited for; so the autograd thread never
waits for the GPU, and a later bucket's copy may be under way while an earlier one's is, but
the launches keep bucket order. A CPU bucket's copy is done at once: it launches as soon as
it and every earlier bucket are packed. After the reduction the copy back is queued from
pinned memory without waiting: the optimizer step and the next backward's packing and copy
into the same pinned buffer are queued after it on the same stream (torch's one-stream
order; work moved to another stream must be ordered by the user, as for any tensor), and
the host touches that buffer again only through MPI, after the next copy's event.
"""

from __future__ import annotations

import functools
import gc
import itertools
import os
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from hpctrain.devices import Copying, HostStage
from hpctrain.errors import UsageError
from hpctrain.profiling import span
from hpctrain.sync import timeline
from hpctrain.sync.collective_check import Call
from hpctrain.sync.collectives import Average, ReduceOp, Sum, scale_
from hpctrain.sync.sparse import SparseAllgather, contribution
from hpctrain.sync.transport import Request, Transport, test_all, wait_all

DEFAULT_BUCKET_BYTES = 25 * 2**20  # DDP's bucket_cap_mb
FUSION_ENV = "HOROVOD_FUSION_THRESHOLD"
# Reducers by (channel label, creation count on it): what a joined rank looks up to take part
# in a DistributedOptimizer step (join.py).
_reducers: dict[tuple[str, int], weakref.ref] = {}
_created: dict[str, itertools.count] = defaultdict(itertools.count)
_owners: dict[int, weakref.ref] = {}  # id(parameter): the live reducer that hooks it
# Buckets (and transports) of reducers dropped between backward and synchronize: MPI may
# still write into them, so they are kept, never freed.
_abandoned: list[tuple[Any, list]] = []


def default_bucket_bytes() -> int:
    """The bucket size when none is given: Horovod's ``HOROVOD_FUSION_THRESHOLD`` (bytes; 0
    turns fusion off, so each parameter has a bucket of its own) where it is set, as a job
    script leaving Horovod sets it, else :data:`DEFAULT_BUCKET_BYTES`."""
    raw = os.environ.get(FUSION_ENV, "").strip()
    if not raw:
        return DEFAULT_BUCKET_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"{FUSION_ENV} must be a whole number of bytes >= 0, got {raw!r}")
    return max(value, 1)


def plan_buckets(sizes: list[tuple[int, torch.dtype]], bucket_bytes: int) -> list[list[int]]:
    """Group parameter indices into buckets, given each parameter's (numel, wire dtype).

    Reverse order; a new bucket starts at a dtype change or when ``bucket_bytes`` would be
    exceeded; a parameter larger than ``bucket_bytes`` gets a bucket of its own.
    """
    buckets: list[list[int]] = []
    current: list[int] = []
    filled, dtype = 0, None
    for i in reversed(range(len(sizes))):
        numel, wire = sizes[i]
        nbytes = numel * wire.itemsize
        if current and (wire != dtype or filled + nbytes > bucket_bytes):
            buckets.append(current)
            current, filled = [], 0
        current.append(i)
        filled += nbytes
        dtype = wire
    if current:
        buckets.append(current)
    return buckets


def plan_groups(sizes: list[tuple[int, torch.dtype]], bucket_bytes: int,
                groups: list[list[int]]) -> list[list[int]]:
    """Buckets when the user chose fusion groups (DistributedOptimizer's ``groups``).

    Each group is a bucket (split where the wire dtype changes); the parameters in no group
    are bucketed by :func:`plan_buckets`. Buckets go out in reverse order of their last
    parameter, so the ones backward finishes first go first.
    """
    grouped = {i for g in groups for i in g}
    rest = [i for i in range(len(sizes)) if i not in grouped]
    buckets = [[rest[j] for j in b] for b in plan_buckets([sizes[i] for i in rest],
                                                          bucket_bytes)]
    for group in groups:
        for _, members in itertools.groupby(sorted(group, reverse=True),
                                            key=lambda i: sizes[i][1]):
            buckets.append(list(members))
    return sorted(buckets, key=lambda b: -max(b))


def check_unowned(params: list[torch.Tensor], names: dict[torch.Tensor, str]) -> None:
    """UsageError naming the first of ``params`` that a live reducer already hooks: both
    would reduce its gradient (Horovod fails at backward then, on a duplicate name)."""
    if any(_owner(p) is not None for p in params):
        gc.collect()  # an optimizer dropped in a reference cycle is not live
    owned = next((p for p in params if _owner(p) is not None), None)
    if owned is not None:
        raise UsageError(f"DistributedOptimizer: parameter {names[owned]!r} belongs to a live "
                         "DistributedOptimizer already, whose hooks reduce its gradient too; "
                         "drop that one first (del it)")


def _owner(param: torch.Tensor) -> BucketedAllreduce | None:
    # A live reducer holds its parameters, so an id it is registered under is not reused.
    ref = _owners.get(id(param))
    return None if ref is None else ref()


def _call_weakly(method: weakref.WeakMethod, i: int, param: torch.Tensor) -> None:
    """A gradient hook that does not keep its reducer alive (the reducer's finalizer removes
    it; until then a dead reducer's hook does nothing)."""
    bound = method()
    if bound is not None:
        bound(i, param)


def _release(ref: weakref.ref, handles: list, transport: Transport, buckets: list) -> None:
    """A dropped reducer's finalizer: unhook it, forget it, free its transport."""
    for handle in handles:
        handle.remove()
    registries: tuple[dict[Any, weakref.ref], ...] = (_owners, _reducers)
    for registry in registries:
        for key in [k for k, v in registry.items() if v is ref]:
            del registry[key]
    if any(b.request is not None for b in buckets):  # launched, not synchronized
        _abandoned.append((transport, buckets))
    else:
        transport.free()


def take_part_with_zeros(key: tuple[str, int], sparse: list[tuple[int, int]]
                         ) -> list[tuple[torch.Tensor, Request]]:
    """A joined rank's share of a step of the reducer ``key``: zeros for every bucket, no
    entries for the step's sparse gradients (``sparse``: (index, sparse_dim) pairs)."""
    ref = _reducers.get(key)
    reducer = ref() if ref is not None else None
    if reducer is None:
        raise UsageError(f"join(): the other ranks step DistributedOptimizer #{key[1] + 1} of "
                         f"{key[0]}, which this rank no longer has; keep the optimizer alive "
                         "until join() returns")
    return reducer.zeros_for_every_bucket(sparse)


def scale_factors(op: ReduceOp, predivide: float, size: int, cast: bool) -> tuple[float, float]:
    """Factors applied to a bucket before and after the sum.

    Average is Horovod's split: 1/predivide before, predivide/size after. With the default
    predivide of 1 and no cast to a narrower type, all of 1/size goes before the sum, into
    the pack copy: the same value up to rounding, one pass over the gradients fewer.
    """
    if op is Sum:
        return 1.0, 1.0
    if op is not Average:
        raise UsageError(f"gradients are reduced with op=Average or op=Sum, got {op.name}")
    if predivide == 1 and not cast:
        return 1.0 / size, 1.0
    return 1.0 / predivide, predivide / size


def plan_without(sizes: list[tuple[int, torch.dtype]], bucket_bytes: int,
                 groups: list[list[int]] | None, skip: set[int]) -> list[list[int]]:
    """:func:`plan_buckets` or :func:`plan_groups` of the parameters not in ``skip``."""
    keep = [i for i in range(len(sizes)) if i not in skip]
    local = {i: j for j, i in enumerate(keep)}
    kept = [sizes[i] for i in keep]
    if groups is None:
        plan = plan_buckets(kept, bucket_bytes)
    else:
        plan = plan_groups(kept, bucket_bytes, [m for g in groups
                                                if (m := [local[i] for i in g if i in local])])
    return [[keep[j] for j in b] for b in plan]


@dataclass
class _Slot:
    param: torch.Tensor
    bucket: int | None  # None: reduced as a sparse gradient
    view: torch.Tensor | None  # the parameter's slice of its bucket, shaped like the parameter
    passes: int = 0
    packed: bool = False
    sparse_now: bool = False  # this step reduces its gradient sparse
    densified: int | None = None  # sparse_as_dense: the sparse_dim its gradient came in


@dataclass
class _Bucket:
    buffer: torch.Tensor
    slots: list[int]
    cast: bool  # some gradient changes dtype on the way (compression)
    pre: float
    post: float
    stage: HostStage  # what the transport moves: the buffer, or its pinned host copy
    packed: int = 0
    copied: Copying | None = None  # its host copy, started when its last gradient is packed
    request: Request | None = None
    token: Any = None  # its timeline phase, while the timeline runs


def _requests(buckets: list[_Bucket]) -> list[Request]:
    """The requests of ``buckets``, every one launched (launching sets its request)."""
    requests = []
    for b in buckets:
        assert b.request is not None  # launched
        requests.append(b.request)
    return requests


class BucketedAllreduce:
    """Allreduce of the gradients of ``params`` through ``transport``, started from backward
    hooks."""

    def __init__(self, params: list[torch.Tensor], transport: Transport, compression: Any,
                 op: ReduceOp, predivide: float, passes: int, bucket_bytes: int,
                 groups: list[list[int]] | None = None, sparse_as_dense: bool = False,
                 channel: Any = None, names: list[str] | None = None):
        self._transport = transport
        self._names = names or [f"#{i}" for i in range(len(params))]  # for error messages
        self.passes = passes
        self.sparse_as_dense = sparse_as_dense
        self._params = params
        self._op, self._predivide, self._bucket_bytes, self._groups = (op, predivide,
                                                                        bucket_bytes, groups)
        self._wire = [compression.wire_dtype(p.dtype) for p in params]
        self._sparse_dims: dict[int, int] = {}  # parameters reduced sparse: their sparse_dim
        self._channel = channel
        ref = weakref.ref(self)
        if channel is not None:
            self.key = (channel.label, next(_created[channel.label]))
            _reducers[self.key] = ref
        self._buckets: list[_Bucket] = []  # one list for life: the finalizer holds it
        self._build()
        self._next = 0  # the next bucket to launch
        self.in_flight = False  # a gradient was counted since the last synchronize
        method = weakref.WeakMethod(self._on_grad)
        handles = [p.register_post_accumulate_grad_hook(functools.partial(_call_weakly,
                                                                          method, i))
                   for i, p in enumerate(params)]
        _owners.update((id(p), ref) for p in params)
        finalizer = weakref.finalize(self, _release, ref, handles, transport, self._buckets)
        finalizer.atexit = False  # MPI may be finalized by then

    def _build(self) -> None:
        """Plan the buckets of the dense gradients and make their buffers and slots."""
        params, wire = self._params, self._wire
        sizes = [(p.numel(), w) for p, w in zip(params, wire, strict=True)]
        plan = plan_without(sizes, self._bucket_bytes, self._groups, set(self._sparse_dims))
        self.plan = [[(sizes[i][0], str(sizes[i][1])) for i in b] for b in plan]
        self._dense_step: Call | None = None  # made by the first step on this plan
        self._slots: list[_Slot] = [_Slot(p, None, None) for p in params]
        self._buckets.clear()
        for b, members in enumerate(plan):
            dtype = wire[members[0]]
            buffer = torch.zeros(sum(params[i].numel() for i in members), dtype=dtype,
                                 device=params[members[0]].device)
            offset = 0
            for i in members:
                n = params[i].numel()
                self._slots[i] = _Slot(params[i], b, buffer[offset:offset + n].view_as(params[i]))
                offset += n
            cast = any(params[i].dtype != dtype for i in members)
            pre, post = scale_factors(self._op, self._predivide, self._transport.size(), cast)
            stage = HostStage(buffer, direct=self._transport.takes(buffer))
            self._buckets.append(_Bucket(buffer, members, cast, pre, post, stage))

    @property
    def bucket_sizes(self) -> list[int]:
        """Bytes of each bucket, in launch order."""
        return [b.buffer.numel() * b.buffer.element_size() for b in self._buckets]

    @property
    def started(self) -> int:
        """Buckets whose allreduce has started since the last synchronize."""
        return self._next

    def set_passes(self, passes: int) -> None:
        """Horovod's ``set_backward_passes_per_step``: the gradients not yet packed count
        their passes anew."""
        self.passes = passes
        for slot in self._slots:
            if not slot.packed:
                slot.passes = 0

    def _on_grad(self, i: int, param: torch.Tensor) -> None:
        slot = self._slots[i]
        if slot.packed:
            raise UsageError(f"gradients were computed more than backward_passes_per_step="
                             f"{self.passes} times before step(); increase "
                             "backward_passes_per_step to accumulate them locally")
        self.in_flight = True
        slot.passes += 1
        if slot.passes >= self.passes:
            self._pack(i)
        self._launch_ready()
        self._progress()

    def _pack(self, i: int) -> None:
        """Pack parameter ``i``'s gradient; the last of its bucket starts the host copy."""
        slot = self._slots[i]
        slot.packed = True
        if slot.bucket is None:  # reduced sparse, at synchronize
            slot.sparse_now = True
            return
        bucket = self._buckets[slot.bucket]
        self._write(i, bucket)
        bucket.packed += 1
        if bucket.packed == len(bucket.slots):
            bucket.copied = bucket.stage.start_to_host()

    def _write(self, i: int, bucket: _Bucket) -> None:
        """Parameter ``i``'s gradient into its slice of ``bucket``."""
        slot = self._slots[i]
        grad, view = slot.param.grad, slot.view
        assert view is not None  # a bucket's slot has its slice
        if grad is None:
            view.zero_()
        elif grad.is_sparse and not self.sparse_as_dense:
            # First seen sparse: reduced sparse from this step on; its slice carries zeros.
            self._sparse_dims[i] = grad.sparse_dim()
            slot.sparse_now = True
            view.zero_()
            return
        elif grad.is_sparse:
            slot.densified = grad.sparse_dim()
            torch.mul(grad.to_dense(), bucket.pre, out=view)
        elif grad.data_ptr() == view.data_ptr() and grad.dtype == view.dtype:
            scale_(view, bucket.pre)
        elif bucket.pre != 1:
            torch.mul(grad, bucket.pre, out=view)
        else:
            view.copy_(grad)
        if view.dtype == slot.param.dtype:
            slot.param.grad = view

    def _launch_ready(self, wait: bool = False) -> None:
        """Launch, in bucket order, the buckets whose host copy is done; ``wait`` (at
        synchronize, every bucket packed): wait for each copy instead of stopping there."""
        while self._next < len(self._buckets):
            bucket = self._buckets[self._next]
            if bucket.copied is None:  # not every gradient packed yet
                return
            if not bucket.copied.query():
                if not wait:
                    return
                bucket.copied.synchronize()
            with span("hpctrain.allreduce_bucket"):  # a profiler's label, else nothing
                bucket.request = self._transport.iallreduce(None, bucket.stage.buffer, Sum)
            call = Call("allreduce", name=f"DistributedOptimizer.bucket{self._next}",
                        dtype=bucket.buffer.dtype, shape=tuple(bucket.buffer.shape))
            bucket.token = timeline.started(call, self._transport.name.upper())
            self._next += 1

    def _progress(self) -> None:
        # Open MPI advances non-blocking collectives only inside MPI calls.
        if self._next:
            with span("hpctrain.allreduce_progress"):
                test_all(_requests(self._buckets[:self._next]))

    def zeros_for_every_bucket(self, sparse: list[tuple[int, int]]
                               ) -> list[tuple[torch.Tensor, Request]]:
        """Post an allreduce of zeros per bucket and take part in the sparse reductions with
        nothing (this rank has joined; the others step). A gradient the others reduce sparse
        for the first time leaves this rank's buckets too."""
        posted = []
        for bucket in self._buckets:
            zeros = torch.zeros_like(bucket.stage.buffer)  # where the transport moves it from
            posted.append((zeros, self._transport.iallreduce(None, zeros, Sum)))
        if sparse:
            SparseAllgather(self._transport, [contribution(None, self._params[i], dim)
                                              for i, dim in sparse], average=False).results()
            if any(i not in self._sparse_dims for i, _ in sparse):
                self._sparse_dims.update(sparse)
                self._build()
        return posted

    def synchronize(self) -> None:
        """Send what backward did not (current or zero gradients), wait, write the results."""
        for i, slot in enumerate(self._slots):
            if not slot.packed:
                self._pack(i)
        sparse = [i for i, slot in enumerate(self._slots) if slot.sparse_now]
        if self._channel is not None:  # every rank is at this step, or a rank has joined
            self._channel.agree(self._step_call(sparse))
        self._launch_ready(wait=True)
        reduced = SparseAllgather(self._transport, [
            contribution(self._params[i].grad, self._params[i], self._sparse_dims[i])
            for i in sparse], average=self._op is Average) if sparse else None
        wait_all(_requests(self._buckets))
        for bucket in self._buckets:
            timeline.finished(bucket.token)  # from posting it until seen done, as Horovod's
            bucket.stage.to_device(non_blocking=True)  # see the module docstring
            self._unpack(bucket)
        if reduced is not None:
            for i, grad in zip(sparse, reduced.results(), strict=True):
                own = self._params[i].grad
                if own is not None and own.is_sparse:  # into it, as Horovod: a reference
                    own.zero_().add_(grad)  # kept since backward sees the reduction
                else:
                    self._params[i].grad = grad
        replan = any(self._slots[i].bucket is not None for i in sparse)
        self._clear()
        if replan:
            self._build()

    def _step_call(self, sparse: list[int]) -> Call:
        """The step's round: a step without sparse gradients makes the same Call until the
        plan changes, and its key (a hash of the plan) is computed once."""
        if not sparse and self._dense_step is not None:
            return self._dense_step
        dims = [(i, self._sparse_dims[i]) for i in sparse]
        call = Call("DistributedOptimizer.step", agree=(self.plan, dims),
                    join_plan=("step", self.key, dims), extra=self._sparse_note(sparse),
                    row="DistributedOptimizer.step")
        if not sparse:
            self._dense_step = call
        return call

    def _sparse_note(self, sparse: list[int]) -> str:
        return f"sparse gradients: {', '.join(self._names[i] for i in sparse)}" if sparse else ""

    def _unpack(self, bucket: _Bucket) -> None:
        dense = [self._slots[i] for i in bucket.slots if not self._slots[i].sparse_now]
        if not bucket.cast:
            scale_(bucket.buffer, bucket.post)
            for slot in dense:  # .grad views the buffer unless reassigned since packing
                assert slot.view is not None  # a bucket's slot has its slice
                if slot.param.grad is None or slot.param.grad.data_ptr() != slot.view.data_ptr():
                    slot.param.grad = slot.view
        else:
            for slot in dense:
                assert slot.view is not None  # a bucket's slot has its slice
                if slot.param.grad is None or slot.param.grad.is_sparse:
                    slot.param.grad = torch.empty_like(slot.param)
                torch.mul(slot.view, bucket.post, out=slot.param.grad)
        for slot in dense:
            if slot.densified is not None:
                assert slot.param.grad is not None  # written just above
                slot.param.grad = slot.param.grad.to_sparse(slot.densified)

    def reset(self) -> None:
        """Wait for launched buckets and forget this step's gradients (for load_state_dict)."""
        wait_all(_requests(self._buckets[:self._next]))
        self._clear()

    def _clear(self) -> None:
        for slot in self._slots:
            slot.passes, slot.packed, slot.sparse_now, slot.densified = 0, False, False, None
        for bucket in self._buckets:
            bucket.packed, bucket.copied, bucket.request, bucket.token = 0, None, None, None
        self._next = 0
        self.in_flight = False
