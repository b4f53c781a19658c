"""Which sample each rank consumes, as pure functions of (seed, epoch, ranks).

Everything here is deterministic and free of MPI, so replicated ranks compute their order
locally, sharded ranks compute the same order and move only the data, and tests can replay
any epoch. Epochs have ``N // K`` samples on every rank: the tail of ``N % K`` samples is
dropped (for global shuffling a different tail each epoch, for the fixed partitions of local
and partial shuffling always the same one).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

# Stream tags so that the random numbers of the different uses never coincide.
_LOCAL, _SELECT, _ROUTE = 1, 2, 3


def generator(*key: int) -> torch.Generator:
    """A torch generator seeded from a tuple of integers (any sign) via numpy's SeedSequence."""
    state = np.random.SeedSequence([k % (1 << 64) for k in key]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def global_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The whole data set's order for ``epoch``; depends only on (seed, epoch, n).

    Seeded with ``seed + epoch``, as ``DistributedSampler`` is (the global sampler matches it
    index for index): seed s's epoch e is seed s+1's epoch e-1. Runs compared over seeds
    share their orders unless the seeds are further apart than the epochs.
    """
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def global_indices(seed: int, epoch: int, n: int, ranks: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s samples for ``epoch``: ``perm[rank::ranks]`` truncated to ``n // ranks``.

    Interleaved like DistributedSampler, so the union of the ranks' i-th batches of size b is
    the one-process i-th batch of size ``ranks * b``.
    """
    return global_permutation(seed, epoch, n)[rank::ranks][: n // ranks]


def global_destinations(seed: int, epoch: int, n: int, ranks: int,
                        ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For samples ``ids``: the rank that holds each in ``epoch`` and its position in the
    epoch's permutation. Position p goes to rank ``p % ranks``; the tail beyond
    ``n // ranks * ranks`` (not consumed this epoch) is kept one per rank from rank 0 on.
    """
    perm = global_permutation(seed, epoch, n)
    where = torch.empty_like(perm)
    where[perm] = torch.arange(n)
    pos = where[ids]
    used = n // ranks * ranks
    return torch.where(pos < used, pos % ranks, pos - used), pos


def pad(indices: torch.Tensor, length: int) -> torch.Tensor:
    """``indices`` extended to ``length`` by repeating them from the start, as torch's
    DistributedSampler pads (unchanged when already that long; cut when longer)."""
    if len(indices) >= length:
        return indices[:length]
    repeats = -(-(length - len(indices)) // len(indices))
    return torch.cat([indices, indices.repeat(repeats)[:length - len(indices)]])


def partition(n: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The order in which the data set is cut into ranks' blocks: its samples' order (iid: a
    built-in set's file order; a user's set's training samples are numbered in a seeded
    pseudo-random order, :mod:`hpctrain.userdata`), or by label (stable, so ties keep that
    order) when ``labels`` are given (label-skew)."""
    if labels is None:
        return torch.arange(n)
    return torch.sort(torch.as_tensor(labels), stable=True).indices


def block(order: torch.Tensor, ranks: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s fixed block of ``len(order) // ranks`` samples."""
    per = len(order) // ranks
    return order[rank * per:(rank + 1) * per]


def spare(order: torch.Tensor, ranks: int, rank: int) -> torch.Tensor:
    """The tail samples (at most one) a sharded rank stores beyond its block."""
    start = len(order) // ranks * ranks + rank
    return order[start:start + 1]


def local_permutation(seed: int, epoch: int, rank: int, n: int) -> torch.Tensor:
    """How rank ``rank`` reorders its own ``n`` samples in ``epoch``."""
    return torch.randperm(n, generator=generator(seed, epoch, rank, _LOCAL))


def moved_count(q: float, n: int, ranks: int) -> int:
    """Samples each rank sends away per epoch under partial(q): ``q * n`` rounded half up
    (not Python's ``round``, which rounds half to even), 0 alone. ``q`` counts as the decimal
    it is written as (its repr, which ``--shuffle`` records): 0.009 is 0.00899999... as a
    float, and 0.009 x 1500, 13.5, was 13 in floats, not 14."""
    if ranks == 1:
        return 0
    return math.floor(Fraction(repr(float(q))) * n + Fraction(1, 2))


def partial_routes(seed: int, epoch: int, ranks: int, m: int) -> torch.Tensor:
    """``(m, ranks)`` destinations: row j is a random derangement of the ranks, and rank r sends
    its j-th outgoing sample to ``routes[j, r]``.

    Each row is a permutation, so every rank receives exactly as many samples as it sends
    (counts stay equal), and has no fixed point, so no sample is "sent" to its own rank.
    The same on every rank (it depends on seed and epoch only).
    """
    g = generator(seed, epoch, _ROUTE)
    routes = torch.rand(m, ranks, generator=g).argsort(dim=1)
    ident = torch.arange(ranks)
    bad = (routes == ident).any(dim=1)
    while bad.any():  # rejection sampling: about 1/e of random permutations are derangements
        routes[bad] = torch.rand(int(bad.sum()), ranks, generator=g).argsort(dim=1)
        bad = (routes == ident).any(dim=1)
    return routes


def partial_selection(seed: int, epoch: int, rank: int, n: int, m: int) -> torch.Tensor:
    """Positions (in its current holding) of the ``m`` samples rank ``rank`` sends away, in the
    order of their route rows."""
    return torch.randperm(n, generator=generator(seed, epoch, rank, _SELECT))[:m]


def partial_step(holdings: list[torch.Tensor], seed: int, epoch: int,
                 q: float) -> list[torch.Tensor]:
    """Every rank's holding after partial(q)'s exchange in ``epoch``.

    A rank keeps its unselected samples in their order and appends what it receives, ordered
    by source rank then route row: the order in which sharded ranks receive them.

    Every rank sends ``m`` and, each route row being a permutation, receives ``m``: the
    arrivals are all ranks' outgoing samples, in (source, row) order, sorted stably by
    destination, ``m`` for each. (Picked out per (destination, source) pair, K * K masks,
    a replicated rank or the simulator spent 17 s an epoch on it at K = 1024, 78 s at 2048.)
    """
    ranks, n = len(holdings), len(holdings[0])
    m = moved_count(q, n, ranks)
    if m == 0:
        return holdings
    routes = partial_routes(seed, epoch, ranks, m)
    kept, outgoing = [], []
    for r, held in enumerate(holdings):
        sel = partial_selection(seed, epoch, r, n, m)
        keep = torch.ones(n, dtype=torch.bool)
        keep[sel] = False
        kept.append(held[keep])
        outgoing.append(held[sel])
    sent = torch.stack(outgoing)  # (source, row)
    by_dest = torch.sort(routes.t().reshape(-1), stable=True).indices
    arrivals = sent.reshape(-1)[by_dest].view(ranks, m)  # row d: what rank d receives
    return [torch.cat([kept[d], arrivals[d]]) for d in range(ranks)]
