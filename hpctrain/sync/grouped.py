"""Grouped collectives: a list of tensors reduced or gathered as one fused operation.

Horovod's ``grouped_*`` functions negotiate a list of tensors together and run them in one
fusion buffer. Here a group is one agreement round and, per dtype, one operation of the
process set's transport on a packed buffer (staged through host memory where the transport
cannot move it): ``grouped_allreduce`` one allreduce, ``grouped_allgather`` one allgather of
every tensor's bytes, ``grouped_reducescatter`` one reduce-scatter whose block for rank r
holds each tensor's r-th slice (the first ``rows % size`` ranks get a row more, as in
Horovod). ``reducescatter`` is the group of one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch

from hpctrain.errors import UsageError
from hpctrain.sync import adasum
from hpctrain.sync import collectives as C
from hpctrain.sync.collective_check import Call
from hpctrain.sync.compression import Compression
from hpctrain.sync.errors import UsageTypeError
from hpctrain.sync.process_sets import ProcessSet, global_process_set


def _check_list(tensors: Sequence[torch.Tensor], caller: str, in_place: bool) -> list:
    """``tensors`` as a list; one-line errors unless it is a non-empty list (or tuple) of
    tensors the transport can take."""
    if not isinstance(tensors, list | tuple):  # a tensor would be iterated by its rows
        raise UsageTypeError(f"{caller}: expected a list of tensors, got "
                             f"{type(tensors).__name__}")
    tensors = list(tensors)
    if not tensors:
        raise UsageError(f"{caller}: needs a non-empty list of tensors, got []")
    for t in tensors:
        C.check_tensor(t, caller, in_place)
    return tensors


def _checked(tensors: Sequence[torch.Tensor], kind: str, caller: str, name: Any,
             process_set: ProcessSet | None, in_place: bool = False,
             at_least_1d: bool = False) -> list:
    """The grouped cores' checks, run so that a rank whose list is bad tells the others
    (collectives.rejecting): the tensors as a list."""
    m = C.member(process_set, caller)
    with C.rejecting(m, kind, name):
        tensors = _check_list(tensors, caller, in_place)
        C.check_name(name, caller)
        if at_least_1d and any(t.dim() == 0 for t in tensors):
            raise UsageError(f"{caller}: needs tensors with at least one dimension, got a "
                             "0-dim one")
    return tensors


def _by_dtype(tensors: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of the tensors packed together: of one dtype on one device."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


def _group_call(kind: str, tensors: list[torch.Tensor], name: str | None, op: Any,
                agree: tuple, join_plan: Any = None, scales: str = "") -> Call:
    first = tensors[0]
    extra = ", ".join(filter(None, (f"{len(tensors)} tensors", scales)))
    return Call(kind, name, None if op is None else C.ReduceOp(op).name, first.dtype,
                tuple(first.shape), (*agree, scales), join_plan, extra=extra)


# ------------------------------------------------------------------ allreduce

def _grouped_allreduce_start(tensors: list[torch.Tensor], outputs: list[torch.Tensor],
                             name: str | None, op: Any, prescale: float, postscale: float,
                             process_set: ProcessSet | None, caller: str) -> int:
    m = C.member(process_set, caller)
    with C.rejecting(m, "grouped_allreduce", name):
        C.check_scale(prescale, "prescale_factor", caller)
        C.check_scale(postscale, "postscale_factor", caller)
        for t in tensors:
            C.check_op(op, t, m, caller)
    groups = _by_dtype(tensors)
    buffers = {d: torch.cat([tensors[i].detach().reshape(-1) for i in idx])
               for d, idx in groups.items()}
    stages = {d: C.stage(b, m) for d, b in buffers.items()}
    counts = {d: [tensors[i].numel() for i in idx] for d, idx in groups.items()}
    plan = C.allreduce_plan([s.buffer for s in stages.values()], op, list(counts.values()))
    agree = tuple((str(t.dtype), tuple(t.shape)) for t in tensors)
    call = _group_call(caller.removesuffix("_async_").removesuffix("_async"), tensors, name,
                       op, agree, plan, C.scale_words(prescale, postscale))
    m.channel.agree(call)
    post = postscale / m.transport.size() if op is C.Average else postscale
    requests = []
    for d, buffer in buffers.items():
        C.scale_(buffer, prescale)
        if op is C.Adasum:  # each tensor with its own coefficients; done before the handle
            adasum.adasum_(stages[d].to_host(), counts[d], m.transport)
        else:
            requests.append(m.transport.iallreduce(None, stages[d].to_host(), C.wire_op(op)))

    def finish() -> tuple:
        for d, idx in groups.items():
            buffer = C.scale_(stages[d].to_device(), post)
            offset = 0
            for i in idx:
                n = tensors[i].numel()
                outputs[i].copy_(buffer[offset:offset + n].view_as(outputs[i]))
                offset += n
        return tuple(outputs)

    return C.register(requests, outputs, finish, call, m=m)


def grouped_allreduce_async(tensors: Sequence[torch.Tensor], average: bool | None = None,
                            name: str | None = None, op: Any = None,
                            prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                            process_set: ProcessSet = global_process_set) -> int:
    """Start reducing every tensor of the list in one fused operation; inputs unchanged."""
    tensors = _checked(tensors, "grouped_allreduce", "grouped_allreduce_async", name,
                       process_set)
    op = _resolved(op, average, "grouped_allreduce", name, process_set)
    outputs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
    return _grouped_allreduce_start(tensors, outputs, name, op, prescale_factor,
                                    postscale_factor, process_set, "grouped_allreduce_async")


def grouped_allreduce_async_(tensors: Sequence[torch.Tensor], average: bool | None = None,
                             name: str | None = None, op: Any = None,
                             prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                             process_set: ProcessSet = global_process_set) -> int:
    """Start reducing every tensor of the list in place, as one fused operation."""
    tensors = _checked(tensors, "grouped_allreduce", "grouped_allreduce_async_", name,
                       process_set, in_place=True)
    op = _resolved(op, average, "grouped_allreduce", name, process_set)
    return _grouped_allreduce_start(tensors, tensors, name, op, prescale_factor,
                                    postscale_factor, process_set, "grouped_allreduce_async_")


def grouped_allreduce_(tensors: Sequence[torch.Tensor], average: bool | None = None,
                       name: str | None = None, op: Any = None, prescale_factor: float = 1.0,
                       postscale_factor: float = 1.0,
                       process_set: ProcessSet = global_process_set) -> tuple:
    """Reduce every tensor of the list in place; return them."""
    _checked(tensors, "grouped_allreduce", "grouped_allreduce_", name, process_set,
             in_place=True)  # its errors named grouped_allreduce_async_
    return C.synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor,
                                                  postscale_factor, process_set))


def grouped_allreduce(tensors: Sequence[torch.Tensor], average: bool | None = None,
                      name: str | None = None, compression: Any = Compression.none,
                      op: Any = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0,
                      process_set: ProcessSet = global_process_set) -> list:
    """Reduced copies of the tensors, as one fused operation (differentiable)."""
    C.check_compression(compression, "grouped_allreduce")
    tensors = _checked(tensors, "grouped_allreduce", "grouped_allreduce", name, process_set)
    compressed, ctxs = zip(*(compression.compress(t) for t in tensors), strict=True)
    reduced = _GroupedAllreduce.apply(average, name, op, prescale_factor, postscale_factor,
                                      process_set, *compressed)
    return [compression.decompress(t, c) for t, c in zip(reduced, ctxs, strict=True)]


class _GroupedAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, average, name, op, prescale, postscale, process_set, *tensors):
        ctx.args = (average, op, prescale, postscale, process_set)
        return C.synchronize(grouped_allreduce_async(list(tensors), average, name, op,
                                                     prescale, postscale, process_set))

    @staticmethod
    def backward(ctx, *grads):
        average, op, prescale, postscale, process_set = ctx.args
        reduced = grouped_allreduce([g.contiguous() for g in grads], average, None,
                                    Compression.none, op, prescale, postscale, process_set)
        return (None,) * 6 + tuple(reduced)


# ------------------------------------------------------------------ allgather

def grouped_allgather_async(tensors: Sequence[torch.Tensor], name: str | None = None,
                            process_set: ProcessSet = global_process_set) -> int:
    """Start gathering every tensor of the list along dimension 0, as one operation."""
    tensors = _checked(tensors, "grouped_allgather", "grouped_allgather_async", name,
                       process_set, at_least_1d=True)
    m = C.member(process_set, "grouped_allgather_async")
    srcs = [t.detach().contiguous() for t in tensors]
    agree = tuple((str(t.dtype), tuple(t.shape[1:])) for t in srcs)
    call = _group_call("grouped_allgather", srcs, name, None, agree)
    m.channel.agree(call)
    rows = m.transport.allgather_object([t.shape[0] for t in srcs])  # rows[rank][tensor]
    row_bytes = [math.prod(t.shape[1:]) * t.element_size() for t in srcs]
    counts = [sum(r * b for r, b in zip(rr, row_bytes, strict=True)) for rr in rows]
    displs = list(itertools.accumulate([0, *counts[:-1]]))
    send = torch.cat([t.reshape(-1).view(torch.uint8) for t in srcs])
    recv = send.new_empty(sum(counts))
    moved = C.stage(recv, m)
    if moved.staged:
        send = send.cpu()
    request = m.transport.iallgather(send, moved.buffer, counts)

    def finish() -> tuple:
        moved.to_device()
        outputs = []
        for i, t in enumerate(srcs):
            parts = []
            for r, rr in enumerate(rows):
                start = displs[r] + sum(rr[j] * row_bytes[j] for j in range(i))
                part = recv[start:start + rr[i] * row_bytes[i]]
                parts.append(part.clone().view(t.dtype).view(rr[i], *t.shape[1:]))
            outputs.append(torch.cat(parts))
        return tuple(outputs)

    return C.register(request, recv, finish, call, keep=send, m=m)


def grouped_allgather(tensors: Sequence[torch.Tensor], name: str | None = None,
                      process_set: ProcessSet = global_process_set) -> tuple:
    """Each tensor concatenated over the processes along dimension 0 (differentiable)."""
    tensors = _checked(tensors, "grouped_allgather", "grouped_allgather", name, process_set,
                       at_least_1d=True)
    return _GroupedAllgather.apply(name, process_set, *tensors)


class _GroupedAllgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, process_set, *tensors):
        ctx.rows, ctx.process_set = [t.shape[0] for t in tensors], process_set
        return C.synchronize(grouped_allgather_async(list(tensors), name, process_set))

    @staticmethod
    def backward(ctx, *grads):
        ps = ctx.process_set
        reduced = grouped_allreduce([g.contiguous() for g in grads], op=C.Average,
                                    process_set=ps)
        rows = C.allgather(torch.tensor([ctx.rows]), process_set=ps)  # [size, tensors]
        me = C.member(ps, "grouped_allgather").transport.rank()
        starts = rows[:me].sum(0).tolist()
        return (None, None) + tuple(g.narrow(0, int(s), n) for g, s, n
                                    in zip(reduced, starts, ctx.rows, strict=True))


# ------------------------------------------------------------------ reducescatter

def scatter_rows(rows: int, size: int) -> list[int]:
    """Rows of each rank's slice: equal, the first ``rows % size`` ranks one more (Horovod)."""
    return [rows // size + (1 if r < rows % size else 0) for r in range(size)]


def grouped_reducescatter_async(tensors: Sequence[torch.Tensor], name: str | None = None,
                                op: Any = C.Average,
                                process_set: ProcessSet = global_process_set,
                                prescale_factor: float = 1.0,
                                postscale_factor: float = 1.0) -> int:
    """Start reducing each tensor over the processes and scattering its rows among them."""
    return _reducescatter_start(tensors, name, op, process_set, prescale_factor,
                                postscale_factor, "grouped_reducescatter", single=False)


def _reducescatter_start(tensors: Sequence[torch.Tensor], name: str | None, op: Any,
                         process_set: ProcessSet | None, prescale: float, postscale: float,
                         kind: str, single: bool) -> int:
    caller = f"{kind}_async"
    tensors = _checked(tensors, kind, caller, name, process_set, at_least_1d=True)
    m = C.member(process_set, caller)
    with C.rejecting(m, kind, name):
        op = C.resolve_op(op)
        if op is C.Adasum:
            raise UsageError(f"{caller}: op=Adasum is an allreduce only (as in Horovod)")
        if op not in (C.Average, C.Sum):  # Horovod: "only supports AVERAGE and SUM"
            raise UsageError(f"{caller}: op must be Average or Sum, got {op.name} (as in "
                             "Horovod; allreduce takes Min, Max and Product)")
        C.check_scale(prescale, "prescale_factor", caller)
        C.check_scale(postscale, "postscale_factor", caller)
        for t in tensors:
            C.check_op(op, t, m, caller)
    n, me = m.transport.size(), m.transport.rank()
    agree = tuple((str(t.dtype), tuple(t.shape)) for t in tensors)
    call = _group_call(kind, tensors, name, op, agree, scales=C.scale_words(prescale, postscale))
    m.channel.agree(call)
    post = postscale / n if op is C.Average else postscale
    splits = [scatter_rows(t.shape[0], n) for t in tensors]
    requests, layouts, sends = [], [], []
    for idx in _by_dtype(tensors).values():
        blocks = []  # rank r's block: each tensor's r-th slice
        for r in range(n):
            for i in idx:
                start = sum(splits[i][:r])
                blocks.append(tensors[i].detach().narrow(0, start, splits[i][r]).reshape(-1))
        send = torch.cat(blocks)
        C.scale_(send, prescale)
        counts = [sum(splits[i][r] * math.prod(tensors[i].shape[1:]) for i in idx)
                  for r in range(n)]
        moved = C.stage(send.new_empty(counts[me]), m)
        sends.append(send.cpu() if moved.staged else send)
        requests.append(m.transport.ireducescatter(sends[-1], moved.buffer, counts,
                                                   C.wire_op(op)))
        layouts.append((idx, moved))

    def finish() -> Any:
        outputs: list[Any] = [None] * len(tensors)
        for idx, moved in layouts:
            recv = C.scale_(moved.to_device(), post)
            offset = 0
            for i in idx:
                shape = (splits[i][me], *tensors[i].shape[1:])
                count = math.prod(shape)
                outputs[i] = recv[offset:offset + count].view(shape)
                offset += count
        return outputs[0] if single else tuple(outputs)

    return C.register(requests, None, finish, call, keep=sends, m=m)


def grouped_reducescatter(tensors: Sequence[torch.Tensor], name: str | None = None,
                          compression: Any = Compression.none, op: Any = C.Average,
                          process_set: ProcessSet = global_process_set,
                          prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> list:
    """This rank's slice of each reduced tensor (differentiable)."""
    C.check_compression(compression, "grouped_reducescatter")
    tensors = _checked(tensors, "grouped_reducescatter", "grouped_reducescatter", name,
                       process_set, at_least_1d=True)
    return _reducescatter_list(tensors, name, compression, op, process_set,
                               prescale_factor, postscale_factor, "grouped_reducescatter")


def _reducescatter_list(tensors: list[torch.Tensor], name: str | None, compression: Any,
                        op: Any, process_set: ProcessSet | None, prescale: float,
                        postscale: float, kind: str) -> list:
    compressed, ctxs = zip(*(compression.compress(t) for t in tensors), strict=True)
    reduced = _GroupedReducescatter.apply(kind, name, op, process_set, prescale, postscale,
                                          *compressed)
    return [compression.decompress(t, c) for t, c in zip(reduced, ctxs, strict=True)]


class _GroupedReducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kind, name, op, process_set, prescale, postscale, *tensors):
        ctx.args = (op, process_set, prescale, postscale)
        return C.synchronize(_reducescatter_start(list(tensors), name, op, process_set,
                                                  prescale, postscale, kind, single=False))

    @staticmethod
    def backward(ctx, *grads):
        op, ps, prescale, postscale = ctx.args
        factor = prescale * postscale * (C.member(ps, "reducescatter").transport.size()
                                         if C.resolve_op(op) is C.Sum else 1)
        grads = [(g * factor if factor != 1 else g).contiguous() for g in grads]
        return (None,) * 6 + tuple(grouped_allgather(grads, process_set=ps))


def reducescatter_async(tensor: torch.Tensor, name: str | None = None, op: Any = C.Average,
                        process_set: ProcessSet = global_process_set,
                        prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> int:
    """Start reducing ``tensor`` over the processes and scattering its rows among them."""
    return _reducescatter_start([tensor_of(tensor, "reducescatter_async")], name, op,
                                process_set, prescale_factor, postscale_factor, "reducescatter",
                                single=True)


def reducescatter(tensor: torch.Tensor, name: str | None = None,
                  compression: Any = Compression.none, op: Any = C.Average,
                  process_set: ProcessSet = global_process_set, prescale_factor: float = 1.0,
                  postscale_factor: float = 1.0) -> torch.Tensor:
    """This rank's rows of ``tensor`` reduced over the processes (differentiable)."""
    C.check_compression(compression, "reducescatter")
    _checked([tensor_of(tensor, "reducescatter")], "reducescatter", "reducescatter", name,
             process_set, at_least_1d=True)
    return _reducescatter_list([tensor], name, compression, op, process_set, prescale_factor,
                               postscale_factor, "reducescatter")[0]


def tensor_of(tensor: Any, caller: str) -> torch.Tensor:
    """``tensor`` of a one-tensor call; UsageTypeError for a list (use the grouped call)."""
    if isinstance(tensor, list | tuple):
        raise UsageTypeError(f"{caller}: expected a torch.Tensor, got {type(tensor).__name__} "
                             "(grouped_reducescatter takes a list)")
    return tensor


def _resolved(op: Any, average: Any, kind: str, name: Any,
              process_set: ProcessSet | None) -> C.ReduceOp:
    """``op`` resolved as collectives.resolve_op does, a bad one told to the other ranks."""
    with C.rejecting(C.member(process_set, kind), kind, name):
        return C.resolve_op(op, average)
