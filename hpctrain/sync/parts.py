"""Parts of a v-collective that one MPI-3 call cannot count.

An MPI-3 library (Open MPI 4) takes counts and displacements as C ints, and its reduce-scatter
adds every rank's count into one too. A reduce-scatter's send buffer and an allgather's
receive buffer are every rank's block in rank order; where their total passes the limit, the
call is made once per window of at most ``piece`` units of that buffer: each rank's count in
a window is its block's overlap with it, and every displacement is counted from the window's
start, so no count, displacement or total of one call passes ``piece``. What fits is one part,
the call it was. An alltoall's blocks past the limit go point to point, each in pieces of
rows (:func:`block_pieces`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    """One call's window ``[start, stop)`` of the whole buffer (in units of its datatype)."""

    start: int
    stop: int
    counts: tuple[int, ...]  # each rank's units in the window
    displs: tuple[int, ...]  # where each rank's units start, counted from ``start``
    offsets: tuple[int, ...]  # where each rank's units start in its own block
    # (a rank with none in the window: where its block meets the window's edge)


def window_parts(counts: list[int], limit: int, piece: int) -> list[Part]:
    """The calls that move blocks of ``counts[r]`` units: one where their total is at most
    ``limit``, else windows of ``piece`` units (the last shorter)."""
    if not 1 <= piece <= limit:
        raise ValueError(f"piece must be in [1, limit={limit}], got {piece}")
    if any(c < 0 for c in counts):
        raise ValueError(f"counts must be >= 0, got {counts}")
    starts = list(itertools.accumulate([0, *counts[:-1]])) if counts else []
    total = sum(counts)
    if total <= limit:
        return [Part(0, total, tuple(counts), tuple(starts), (0,) * len(counts))]
    parts = []
    for start in range(0, total, piece):
        stop = min(start + piece, total)
        lows = [min(max(start, s), stop) for s in starts]
        highs = [max(min(stop, s + c), lo) for s, c, lo in zip(starts, counts, lows, strict=True)]
        parts.append(Part(start, stop,
                          tuple(h - lo for lo, h in zip(lows, highs, strict=True)),
                          tuple(lo - start for lo in lows),
                          tuple(min(max(lo - s, 0), c)
                                for lo, s, c in zip(lows, starts, counts, strict=True))))
    return parts


def block_pieces(rows: list[int], piece: int) -> list[tuple[int, int, int]]:
    """``(rank, start, stop)``: the rows of a buffer that holds ``rows[r]`` rows for each rank r
    in rank order, in pieces of at most ``piece`` rows (a rank with none has no piece).

    An alltoall past the limit sends each block point to point in these pieces: the sender
    (planning its send rows) and the receiver (its receive rows) cut a block of the same size
    at the same rows, since both count from the block's start."""
    if piece < 1:
        raise ValueError(f"piece must be >= 1, got {piece}")
    if any(c < 0 for c in rows):
        raise ValueError(f"rows must be >= 0, got {rows}")
    starts = itertools.accumulate([0, *rows])  # one more than rows: the total, unused
    return [(r, a, min(a + piece, start + count))
            for r, (start, count) in enumerate(zip(starts, rows, strict=False))
            for a in range(start, start + count, piece)]
