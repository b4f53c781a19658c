"""Adasum, Horovod's ``op=Adasum``: a reduction that adds orthogonal vectors and averages
parallel ones, so that more workers need no retuned learning rate (Maleki et al., MLSys 2021).

Two vectors combine as ``(1 - a·b / 2|a|²) a + (1 - a·b / 2|b|²) b`` (a coefficient is 1
where its vector is zero), each tensor of a fused buffer with its own coefficients. 2^m ranks
combine up a binary tree, as in Horovod: rank r with r ^ 1, then those pairs with the pairs at
distance 2, and so on, the side whose ranks have bit l clear being ``a``.

The reduction is Horovod's vector halving, distance doubling: at level l each rank keeps half
of the slice it holds and swaps the other half with rank r ^ 2^l; the 2^(l+1) ranks of one
subtree then hold its two vectors in pieces, and sum their pieces' dot products in one small
allreduce. After m levels each rank holds 1/2^m of the result, and m swaps in reverse order
give every rank all of it. Each element is computed on one rank only, so every rank ends with
the same bits; a rank sends about 2N elements, as in a ring allreduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hpctrain import devices
from hpctrain.errors import UsageError
from hpctrain.sync.errors import UsageNotImplementedError
from hpctrain.sync.transport import SUM, Transport

TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NATIVE = (torch.float32, torch.float64)  # combined in their own type; dot products in float64
_CHUNK = 1 << 16  # elements converted to float64 at a time (in cache: twice as fast as 1M)
_TINY = torch.finfo(torch.float64).tiny ** 0.5  # Horovod's sqrt(DBL_MIN): "a zero vector"


@dataclass(frozen=True)
class Level:
    """One halving step of one rank: swap ``give`` for the peer's ``keep``, then combine."""

    peer: int
    keep: tuple[int, int]  # [start, stop) of the buffer this rank holds afterwards
    give: tuple[int, int]  # [start, stop) sent to the peer (and received back at the end)
    left: bool  # this rank's side of the subtree is ``a``


def plan(n: int, size: int, rank: int) -> list[Level]:
    """``rank``'s halving levels for an ``n``-element buffer over ``size`` = 2^m ranks (the
    lower rank of a pair keeps the first half, the shorter one when ``n`` is odd)."""
    levels, start, stop, distance = [], 0, n, 1
    while distance < size:
        mid = start + (stop - start) // 2
        left = not rank & distance
        keep, give = ((start, mid), (mid, stop)) if left else ((mid, stop), (start, mid))
        levels.append(Level(rank ^ distance, keep, give, left))
        start, stop = keep
        distance <<= 1
    return levels


def pieces(counts: Sequence[int], span: tuple[int, int]) -> list[tuple[int, int, int]]:
    """``(tensor, start, stop)`` for each tensor of a buffer fused from tensors of ``counts``
    elements that overlaps ``span``, clipped to it."""
    out, offset = [], 0
    for i, count in enumerate(counts):
        start, stop = max(offset, span[0]), min(offset + count, span[1])
        if start < stop:
            out.append((i, start, stop))
        offset += count
    return out


def coefficients(dot: float, a_sq: float, b_sq: float) -> tuple[float, float]:
    """The factors of ``a`` and ``b`` in their Adasum, from a·b, |a|² and |b|²."""
    a = 1.0 - dot / a_sq * 0.5 if a_sq >= _TINY else 1.0
    b = 1.0 - dot / b_sq * 0.5 if b_sq >= _TINY else 1.0
    return a, b


def tree(vectors: Sequence[torch.Tensor], counts: Sequence[int]) -> torch.Tensor:
    """The Adasum of 2^m ranks' 1-d buffers in one process, up the same tree (what
    :func:`adasum_` computes, up to rounding; ``hpctrain simulate``'s). A new tensor."""
    level = list(vectors)
    while len(level) > 1:
        level = [_pair(level[i], level[i + 1], counts) for i in range(0, len(level), 2)]
    return level[0].clone() if len(vectors) == 1 else level[0]


def _pair(a: torch.Tensor, b: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    out = torch.empty_like(a)
    for _, lo, hi in pieces(counts, (0, a.numel())):
        x, y = a[lo:hi].double(), b[lo:hi].double()
        ca, cb = coefficients(float(x @ y), float(x @ x), float(y @ y))
        out[lo:hi] = x * ca + y * cb
    return out


def check(size: int, dtype: torch.dtype, caller: str) -> None:
    """UsageError unless Adasum can reduce ``dtype`` over ``size`` ranks (every rank raises
    alike, before any communication)."""
    if size & (size - 1):
        raise UsageNotImplementedError(f"{caller}: op=Adasum needs a power-of-2 number of "
                                       f"processes, got {size} (as in Horovod)")
    if dtype not in TYPES:
        raise UsageError(f"{caller}: op=Adasum reduces floating-point tensors, got {dtype}")


def adasum_(buffer: torch.Tensor, counts: Sequence[int], transport: Transport) -> torch.Tensor:
    """Replace 1-d ``buffer`` by the Adasum of every rank's, in place; it is fused from tensors
    of ``counts`` elements, each combined with its own coefficients. Blocking; every rank of
    ``transport`` calls it with the same ``counts``."""
    size, rank = transport.size(), transport.rank()
    levels = plan(buffer.numel(), size, rank)
    for depth, level in enumerate(levels):
        received = buffer.new_empty(level.keep[1] - level.keep[0])
        _swap(transport, buffer[slice(*level.give)], received, level.peer)
        _combine(buffer[slice(*level.keep)], received, counts, level, depth, transport)
    for level in reversed(levels):
        _swap(transport, buffer[slice(*level.keep)], buffer[slice(*level.give)], level.peer)
    return buffer


def _swap(transport: Transport, send: torch.Tensor, out: torch.Tensor, peer: int) -> None:
    devices.synchronize(send.device)  # a CUDA-aware MPI reads memory a kernel may still write
    transport.isendrecv(send, out, peer).wait()


def _dots(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x·y, |x|² and |y|² summed in float64, as Horovod's Adasum sums them: float32's own
    (torch.dot) lost small elements after large ones, 2e-4 of |x|² on a 256k-element tensor
    (tests/test_sync_adasum.py). A CPU tensor converts in chunks of ``_CHUNK``, which stay
    in cache; float64 needs no conversion, and a GPU's would make small kernels by the
    thousand: those in one piece."""
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)
    chunk = _CHUNK if x.device.type == "cpu" and x.dtype != torch.float64 else max(x.numel(), 1)
    for lo in range(0, x.numel(), chunk):
        a, b = x[lo:lo + chunk].double(), y[lo:lo + chunk].double()
        sums += torch.stack([torch.dot(a, b), torch.dot(a, a), torch.dot(b, b)])
    return sums[0], sums[1], sums[2]


def _combine(mine: torch.Tensor, theirs: torch.Tensor, counts: Sequence[int], level: Level,
             depth: int, transport: Transport) -> None:
    """Overwrite ``mine`` (the ``level.keep`` slice) with its Adasum with ``theirs``, the
    peer's values of that slice, per tensor, with the dot products of the whole subtree."""
    start = level.keep[0]
    parts = pieces(counts, level.keep)
    # 16-bit floats are combined in float32 (as Horovod does); the others where they are.
    own, other = (mine, theirs) if mine.dtype in _NATIVE else (mine.float(), theirs.float())
    # One row per subtree of this level; each rank fills its own subtree's: [a·b, |a|², |b|²]
    sums = torch.zeros(transport.size() >> (depth + 1), len(counts), 3, dtype=torch.float64)
    row = sums[transport.rank() >> (depth + 1)]
    for i, lo, hi in parts:
        x_y, x_sq, y_sq = _dots(own[lo - start:hi - start], other[lo - start:hi - start])
        a_sq, b_sq = (x_sq, y_sq) if level.left else (y_sq, x_sq)
        row[i] = torch.stack([x_y, a_sq, b_sq]).cpu()
    transport.iallreduce(None, sums, SUM).wait()
    for i, lo, hi in parts:
        dot, a_sq, b_sq = row[i].tolist()
        a, b = coefficients(dot, a_sq, b_sq)
        mine_c, theirs_c = (a, b) if level.left else (b, a)
        own[lo - start:hi - start].mul_(mine_c).add_(other[lo - start:hi - start],
                                                     alpha=theirs_c)
    if own is not mine:
        mine.copy_(own)
