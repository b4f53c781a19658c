"""hpctrain.sync's mpi transport and MPI-3's C int counts: a broadcast of one tensor past 2 GiB
(a 152k x 4096 embedding is 2.3 GiB), and the row counts, pieces and windows (parts.py) that
keep every count under 2**31.

MPI tests: mpirun -np 2|4 python -m pytest --with-mpi -m mpi tests/test_sync_large.py
The tensor past 2 GiB runs on two ranks of an MPI-3 library only (Open MPI 4 refused it with
``MPI_ERR_ARG``; MPI-4 libraries such as MPICH take it whole): each rank holds 2 GiB and the
broadcast takes tens of seconds.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import hpctrain.sync as sync
from hpctrain import comm
from hpctrain.sync import adasum, grouped, parts, transport
from hpctrain.sync.parts import Part, block_pieces, window_parts
from hpctrain.sync.transport import MPITransport

mpi = pytest.mark.mpi(min_size=2)


def _pattern(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Distinct small values for each rank, row and column (every dtype holds them)."""
    return ((torch.arange(math.prod(shape)) * 7 + seed) % 97).reshape(shape).to(dtype)


@pytest.fixture
def world_transport():
    t = MPITransport(comm.world())
    yield t
    t.free()


@mpi
@pytest.mark.timeout(300)
def test_broadcast_parameters_of_one_tensor_past_2_gib():
    """One tensor of 2**31 + 4 bytes (one Ibcast of MPI_BYTE before: MPI_ERR_ARG); the values
    on both sides of each 1 GiB piece's edge and the last 4 bytes are rank 0's."""
    MPI = comm.mpi()
    if MPI.COMM_WORLD.size != 2 or MPI.Get_version() >= (4, 0):
        pytest.skip("gigabytes per rank: two ranks of an MPI-3 library only")
    n = 2**29 + 1  # float32: 2**31 + 4 bytes
    edges = [2**28 - 1, 2**28, 2**29 - 1, 2**29]  # pieces end at 2**30 and 2**31 bytes
    sync.init(backend="mpi")
    try:
        if sync.rank() == 0:
            table = torch.full((n,), 1.5)
            table[edges] = torch.tensor([2.0, 3.0, 4.0, 5.0])
        else:
            table = torch.zeros(n)
        sync.broadcast_parameters({"table": table}, root_rank=0)
        assert table[edges].tolist() == [2.0, 3.0, 4.0, 5.0]
        assert int((table == 1.5).sum()) == n - len(edges)
    finally:
        sync.shutdown()


@mpi
@pytest.mark.timeout(120)
def test_allgather_counts_rows_of_odd_byte_sizes(world_transport):
    """Counts in rows of one datatype per row size (3, 6, 10 bytes; 0-byte rows), where some
    ranks give no rows."""
    t, r, n = world_transport, world_transport.rank(), world_transport.size()
    rows = [k % 3 for k in range(n)]  # rank 0 gives none
    for dtype, tail in ((torch.uint8, (3,)), (torch.int16, (3, 1)), (torch.int16, (5,)),
                        (torch.float64, ()), (torch.int32, (0,))):
        mine = _pattern(rows[r], *tail, dtype=dtype, seed=r)
        out = torch.empty(sum(rows), *tail, dtype=dtype)
        t.iallgather(mine, out, rows).wait()
        expected = torch.cat([_pattern(rows[k], *tail, dtype=dtype, seed=k) for k in range(n)])
        assert torch.equal(out, expected), (dtype, tail)


@mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("pieces", [False, True], ids=["one-call", "in-pieces"])
def test_alltoall_counts_rows_with_empty_parts(world_transport, monkeypatch, pieces):
    """Rank r sends (r + k) % 3 rows of 6 bytes to rank k: some parts are empty. In pieces: a
    limit of 1 row, and pieces of 7 bytes (one row each, the row past the byte cap)."""
    t, r, n = world_transport, world_transport.rank(), world_transport.size()
    if pieces:
        monkeypatch.setattr(transport, "MAX_COUNT", 1)
        monkeypatch.setattr(transport, "PIECE_BYTES", 7)
    send_rows = [(r + k) % 3 for k in range(n)]
    recv_rows = [(k + r) % 3 for k in range(n)]
    send = torch.cat([_pattern(send_rows[k], 3, dtype=torch.int16, seed=10 * r + k)
                      for k in range(n)])
    out = torch.full((sum(recv_rows), 3), -1, dtype=torch.int16)
    total = sum((j + k) % 3 for j in range(n) for k in range(n))
    t.ialltoall(send, out, send_rows, recv_rows, total=total).wait()
    expected = torch.cat([_pattern(recv_rows[k], 3, dtype=torch.int16, seed=10 * k + r)
                          for k in range(n)])
    assert torch.equal(out, expected)


@mpi
@pytest.mark.timeout(120)
def test_broadcast_and_sendrecv_in_pieces(world_transport, monkeypatch):
    """Pieces of 7 bytes stand for 1 GiB ones: several outstanding Ibcasts, and Isends and
    Irecvs of one tag, each matched with the peer's piece in the order posted."""
    monkeypatch.setattr(transport, "PIECE_BYTES", 7)
    t, r, n = world_transport, world_transport.rank(), world_transport.size()
    root = n - 1
    for size in (15, 3, 0):  # 30 bytes (5 pieces), one piece, an empty one
        tensor = _pattern(size, dtype=torch.int16, seed=r)
        t.ibcast(tensor, root).wait()
        assert torch.equal(tensor, _pattern(size, dtype=torch.int16, seed=root)), size
    peer = r ^ 1
    if peer < n:
        for length in (lambda k: (k + 1) * 5, lambda k: 4 * (k % 2), lambda k: 0):
            send = _pattern(length(r), dtype=torch.int16, seed=r)  # the peer's sizes mirror
            out = torch.empty(length(peer), dtype=torch.int16)  # these
            t.isendrecv(send, out, peer).wait()
            assert torch.equal(out, _pattern(length(peer), dtype=torch.int16, seed=peer))


@mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "send-buffer"])
def test_allreduce_in_pieces(world_transport, monkeypatch, in_place):
    """Pieces of 7 elements stand for 2**30 ones: several outstanding Iallreduces, each
    reducing its piece with the others' (every op, a 16-bit float reduced on the host)."""
    monkeypatch.setattr(transport, "PIECE_ELEMENTS", 7)
    t, r, n = world_transport, world_transport.rank(), world_transport.size()
    for op, combine in ((sync.Sum, torch.add), (sync.Min, torch.minimum),
                        (sync.Max, torch.maximum), (sync.Product, torch.mul)):
        for dtype, shape in ((torch.int32, (5, 6)), (torch.float16, (16,)), (torch.int64, (3,)),
                             (torch.float32, (0,))):
            mine = _pattern(*shape, dtype=dtype, seed=r) % 5 + 1  # products stay exact
            out = mine.clone() if in_place else torch.empty_like(mine)
            t.iallreduce(None if in_place else mine, out, op).wait()
            expected = _pattern(*shape, dtype=dtype, seed=0) % 5 + 1
            for k in range(1, n):
                expected = combine(expected, _pattern(*shape, dtype=dtype, seed=k) % 5 + 1)
            assert torch.equal(out, expected), (op, dtype, shape)


@mpi
@pytest.mark.timeout(300)
def test_allreduce_of_one_tensor_past_2_31_elements():
    """2**31 + 8 int8 elements (one Iallreduce before: MPI_ERR_ARG); the sums on both sides of
    each piece's edge and at the end are both ranks'."""
    MPI = comm.mpi()
    if MPI.COMM_WORLD.size != 2 or MPI.Get_version() >= (4, 0):
        pytest.skip("gigabytes per rank: two ranks of an MPI-3 library only")
    n = 2**31 + 8
    edges = [2**30 - 1, 2**30, 2**31 - 1, 2**31, n - 1]
    sync.init(backend="mpi")
    try:
        counts = torch.ones(n, dtype=torch.int8)
        counts[edges] = torch.tensor([2, 3, 4, 5, 6], dtype=torch.int8) * (sync.rank() + 1)
        sync.allreduce_(counts, op=sync.Sum)
        assert counts[edges].tolist() == [6, 9, 12, 15, 18]
        counts[edges] = 2
        assert bool((counts == 2).all())  # not .sum(): a bool sum counts in int64 (16 GB)
    finally:
        sync.shutdown()


def _check_windows(counts: list[int], plan: list[Part]) -> None:
    """Windows tile the buffer in order, and each rank's units in them tile its block."""
    starts = [sum(counts[:r]) for r in range(len(counts))]
    assert [p.start for p in plan] == [0, *[p.stop for p in plan[:-1]]]
    assert plan[-1].stop == sum(counts)
    for r, (start, count) in enumerate(zip(starts, counts, strict=True)):
        got = [(p.offsets[r], p.counts[r]) for p in plan if p.counts[r]]
        assert [o for o, _ in got] == list(itertools.accumulate([0, *[c for _, c in got]]))[:-1]
        assert sum(c for _, c in got) == count
        for p in plan:
            assert 0 <= p.offsets[r] <= count
            if p.counts[r]:  # the window's units of rank r are its block's, where they lie
                assert p.start + p.displs[r] == start + p.offsets[r]


def test_window_parts_one_call_up_to_the_limit_exactly():
    """A total of exactly the limit is the one call it was: counts and displacements as given."""
    assert window_parts([3, 0, 4], limit=7, piece=2) == [Part(0, 7, (3, 0, 4), (0, 3, 3),
                                                              (0, 0, 0))]
    assert window_parts([0, 0], limit=7, piece=2) == [Part(0, 0, (0, 0), (0, 0), (0, 0))]
    assert window_parts([], limit=7, piece=2) == [Part(0, 0, (), (), ())]


def test_window_parts_one_over_the_limit_is_windows_of_a_piece():
    plan = window_parts([3, 0, 5], limit=7, piece=3)
    assert plan == [Part(0, 3, (3, 0, 0), (0, 3, 3), (0, 0, 0)),
                    Part(3, 6, (0, 0, 3), (0, 0, 0), (3, 0, 0)),
                    Part(6, 8, (0, 0, 2), (0, 0, 0), (3, 0, 3))]
    _check_windows([3, 0, 5], plan)


@pytest.mark.parametrize("counts", [[10, 1, 0, 7], [0, 0, 9], [25, 0], [1] * 12, [0, 30, 0]])
@pytest.mark.parametrize("piece", [1, 4, 7])
def test_window_parts_keep_every_count_and_displacement_within_a_piece(counts, piece):
    """Displacements past the limit in the whole buffer are counted from each window's start."""
    plan = window_parts(counts, limit=8, piece=piece)
    assert len(plan) == -(-sum(counts) // piece)
    for p in plan:
        assert p.stop - p.start == sum(p.counts) <= piece
        assert all(0 <= d <= piece and d + c <= piece
                   for d, c in zip(p.displs, p.counts, strict=True))
    _check_windows(counts, plan)


def test_window_parts_at_mpi_3s_limit():
    """A rank's share of 2**31 - 1 fits one call; one more, or a total past it, does not."""
    assert len(window_parts([2**31 - 1, 0], transport.MAX_COUNT, 2**30)) == 1
    assert len(window_parts([2**31, 0], transport.MAX_COUNT, 2**30)) == 2
    plan = window_parts([2**30, 2**30, 8], transport.MAX_COUNT, 2**30)
    assert [p.counts for p in plan] == [(2**30, 0, 0), (0, 2**30, 0), (0, 0, 8)]


def test_window_parts_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="piece must be in"):
        window_parts([1], limit=4, piece=5)
    with pytest.raises(ValueError, match=r"counts must be >= 0, got \[1, -1\]"):
        window_parts([1, -1], limit=4, piece=2)


def _grouped_results(tensors: list[torch.Tensor]) -> list:
    """grouped_allgather (rows differ by rank), grouped_reducescatter (Sum, Average, a
    float16) and an uneven reducescatter."""
    r, n = sync.rank(), sync.size()
    same = [_pattern(2 * n + 1, 3, dtype=torch.float16, seed=r + 1),
            _pattern(n, 0, dtype=torch.float32, seed=r),  # zero-size rows
            _pattern(n + 2, dtype=torch.float64, seed=2 * r)]
    return [*sync.grouped_allgather(tensors),
            *sync.grouped_reducescatter(same, op=sync.Sum),
            *sync.grouped_reducescatter(same, op=sync.Average),
            sync.reducescatter(_pattern(3 * n + 1, 4, dtype=torch.int64, seed=r), op=sync.Sum)]


@mpi
@pytest.mark.timeout(120)
def test_grouped_collectives_in_windows_match_one_call(monkeypatch):
    """A limit of 11 units stands for 2**31 - 1 (windows of 5): grouped_allgather's byte buffer,
    grouped_reducescatter's blocks and an uneven reducescatter move in several calls, each
    result bit-for-bit the one call's."""
    sync.init(backend="mpi")
    try:
        r, n = sync.rank(), sync.size()
        tensors = [_pattern(r + 3, 2, dtype=torch.int32, seed=r),
                   _pattern(2 * n + 1, 3, dtype=torch.float16, seed=r + 1),
                   _pattern(n, 0, dtype=torch.float32, seed=r),  # zero-size rows
                   _pattern(n + 2, dtype=torch.float64, seed=2 * r)]
        whole = _grouped_results(tensors)
        calls: dict[str, list[int]] = {"ireducescatter": [], "iallgather": []}

        def counting(name):  # the real call, its windows counted as it plans them
            real = getattr(MPITransport, name)

            def call(self, send, out, counts, *rest):
                rows = counts if name == "ireducescatter" or transport._row_bytes(send) \
                    else [0] * len(counts)
                calls[name].append(len(parts.window_parts(rows, transport.MAX_COUNT,
                                                          transport.PIECE_ELEMENTS)))
                return real(self, send, out, counts, *rest)
            return call

        for name in calls:
            monkeypatch.setattr(MPITransport, name, counting(name))
        monkeypatch.setattr(transport, "MAX_COUNT", 11)
        monkeypatch.setattr(transport, "PIECE_ELEMENTS", 5)
        windowed = _grouped_results(tensors)
        assert max(calls["ireducescatter"]) > 1 and max(calls["iallgather"]) > 1  # windows
        for a, b in zip(whole, windowed, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert torch.equal(whole[0], torch.cat([_pattern(k + 3, 2, dtype=torch.int32, seed=k)
                                                for k in range(n)]))
        assert grouped.scatter_rows(3 * n + 1, n)[r] == whole[-1].shape[0]
    finally:
        sync.shutdown()


def test_block_pieces_cut_each_block_from_its_start():
    assert block_pieces([3, 0, 5], piece=2) == [(0, 0, 2), (0, 2, 3), (2, 3, 5), (2, 5, 7),
                                                (2, 7, 8)]
    assert block_pieces([0, 0], piece=2) == []
    assert block_pieces([], piece=2) == []


@pytest.mark.parametrize("rows", [[10, 1, 0, 7], [0, 0, 9], [25, 0], [1] * 5, [0, 30, 0]])
@pytest.mark.parametrize("piece", [1, 4, 7, 100])
def test_block_pieces_tile_every_block_in_order(rows, piece):
    """Each block's pieces follow one another from its start to its end, none past ``piece``;
    a sender and a receiver of one block (other offsets) cut it at the same rows."""
    plan = block_pieces(rows, piece)
    starts = [sum(rows[:r]) for r in range(len(rows))]
    for r, (start, count) in enumerate(zip(starts, rows, strict=True)):
        mine = [(a, b) for k, a, b in plan if k == r]
        assert [a for a, _ in mine] == [start, *[b for _, b in mine[:-1]]][:len(mine)]
        assert sum(b - a for a, b in mine) == count
        assert all(0 < b - a <= piece for a, b in mine)
        other = block_pieces([5] * r + [count], piece)  # the same block elsewhere
        assert [(a - start, b - start) for a, b in mine] == \
            [(a - 5 * r, b - 5 * r) for k, a, b in other if k == r]
    assert [k for k, _, _ in plan] == sorted(k for k, _, _ in plan)


def test_block_pieces_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="piece must be >= 1, got 0"):
        block_pieces([1], piece=0)
    with pytest.raises(ValueError, match=r"rows must be >= 0, got \[1, -1\]"):
        block_pieces([1, -1], piece=2)


_ALLTOALL_TAILS = [(torch.int16, (3, 2)), (torch.float16, ()), (torch.float64, (3,)),
                   (torch.uint8, (5,)), (torch.int64, (0,))]  # 2-D rows, ..., zero-size rows


def _splits(sender: int, receiver: int) -> int:
    """Rows ``sender`` sends ``receiver``: uneven, some blocks empty."""
    return (sender + 2 * receiver) % 4


def _alltoall_results() -> list:
    """alltoall with uneven splits (and a row left unsent) of every dtype and row shape in
    _ALLTOALL_TAILS, and one of equal parts without splits."""
    r, n = sync.rank(), sync.size()
    splits = [_splits(r, k) for k in range(n)]
    results: list = []
    for dtype, tail in _ALLTOALL_TAILS:
        send = torch.cat([*[_pattern(splits[k], *tail, dtype=dtype, seed=10 * r + k)
                            for k in range(n)], _pattern(1, *tail, dtype=dtype, seed=99)])
        results += sync.alltoall(send, splits=splits)
    results.append(sync.alltoall(_pattern(2 * n, 3, dtype=torch.int32, seed=r)))
    return results


def _received_weights(r: int, n: int) -> torch.Tensor:
    """A weight per row rank r receives: 1000 * its sender + 1 + its place in the block."""
    return torch.cat([1000.0 * k + 1 + torch.arange(float(_splits(k, r))) for k in range(n)])


@mpi
@pytest.mark.timeout(120)
def test_alltoall_in_pieces_matches_one_call(monkeypatch):
    """A limit of 3 rows stands for 2**31 - 1 (pieces of 2): alltoalls whose rows all ranks
    move pass it go point to point, each result and received split bit-for-bit the one
    call's; one that stays under it is still one call; the backward goes in pieces too."""
    sync.init(backend="mpi")
    try:
        r, n = sync.rank(), sync.size()
        whole = _alltoall_results()
        calls = []
        real = MPITransport._alltoall_in_pieces

        def counting(self, send, out, send_rows, recv_rows, row):
            calls.append((send.dtype, tuple(send.shape[1:])))
            return real(self, send, out, send_rows, recv_rows, row)

        monkeypatch.setattr(MPITransport, "_alltoall_in_pieces", counting)
        monkeypatch.setattr(transport, "MAX_COUNT", 3)
        monkeypatch.setattr(transport, "PIECE_ELEMENTS", 2)
        in_pieces = _alltoall_results()
        # In pieces: each count exchange (n * n rows of two int64), the four uneven calls of
        # rows with bytes (6 rows or more at n >= 2) and the equal parts (2 * n * n rows);
        # zero-size rows have nothing to count: one call.
        counts = (torch.int64, (2,))
        assert calls == [counts, (torch.int16, (3, 2)), counts, (torch.float16, ()), counts,
                         (torch.float64, (3,)), counts, (torch.uint8, (5,)), counts, counts,
                         (torch.int32, (3,))]
        for a, b in zip(whole, in_pieces, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        expected_splits = [_splits(k, r) for k in range(n)]
        for (dtype, tail), out, received in zip(_ALLTOALL_TAILS, in_pieces[0:-1:2],
                                                in_pieces[1::2], strict=True):
            assert received.dtype == torch.int32 and received.tolist() == expected_splits
            assert torch.equal(out, torch.cat([_pattern(_splits(k, r), *tail, dtype=dtype,
                                                        seed=10 * k + r) for k in range(n)]))
        assert torch.equal(in_pieces[-1], torch.cat([_pattern(2 * n, 3, dtype=torch.int32,
                                                              seed=k)[2 * r:2 * r + 2]
                                                     for k in range(n)]))

        calls.clear()
        sync.alltoall(torch.ones(n, 2), splits=[1] + [0] * (n - 1))  # n rows: under 3 at n < 4
        assert calls == [counts] + [(torch.float32, (2,))] * (n > 3)

        calls.clear()
        x = torch.ones(sum(_splits(r, k) for k in range(n)) + 1, 3, dtype=torch.float64,
                       requires_grad=True)
        y, _ = sync.alltoall(x, splits=[_splits(r, k) for k in range(n)])
        (y * _received_weights(r, n)[:, None]).sum().backward()
        assert calls == [counts, (torch.float64, (3,))] * 2  # forward and backward
        expected = torch.cat([*[1000.0 * r + 1 + torch.arange(float(_splits(r, k)))
                                for k in range(n)], torch.zeros(1)])  # the unsent row: 0
        assert torch.equal(x.grad, expected[:, None].expand(-1, 3).to(torch.float64))
    finally:
        sync.shutdown()


def test_received_splits_are_int32_unless_the_total_passes_it():
    """Horovod's int32, but a peer's 2**31 rows wrapped to a negative split (its backward
    refused), 2**32 to 0 (its gradients moved wrong): past int32 in all ranks' total they are
    int64, on every rank alike (chosen by the total, which they share), never a view of the
    exchange's buffer."""
    from hpctrain.sync.alltoall import received_splits

    exchanged = torch.tensor([[3, 9], [0, 9], [2, 9]], dtype=torch.int64)
    small = received_splits(exchanged[:, 0], 2**31 - 1)
    assert small.dtype == torch.int32 and small.tolist() == [3, 0, 2]
    for total in (2**31, 2**33):
        wide = received_splits(exchanged[:, 0], total)  # a rank that itself got few rows
        assert wide.dtype == torch.int64 and wide.tolist() == [3, 0, 2]
        assert wide.is_contiguous() and wide.data_ptr() != exchanged.data_ptr()
    big = torch.tensor([1, 2**32], dtype=torch.int64)
    assert received_splits(big, 2**32 + 1).tolist() == [1, 2**32]
    assert received_splits(torch.zeros(0, dtype=torch.int64), 0).dtype == torch.int32


def _lower_to_pieces(monkeypatch) -> list:
    """Limits that put the tests' small alltoalls on the point-to-point path (3 rows stand for
    2**31 - 1, pieces of 2 rows) and isendrecv in 8-byte pieces; the parted alltoalls are
    listed by their rows' dtype as they start."""
    calls: list = []
    real = MPITransport._alltoall_in_pieces

    def counting(self, send, out, send_rows, recv_rows, row):
        calls.append(send.dtype)
        return real(self, send, out, send_rows, recv_rows, row)

    monkeypatch.setattr(MPITransport, "_alltoall_in_pieces", counting)
    monkeypatch.setattr(transport, "MAX_COUNT", 3)
    monkeypatch.setattr(transport, "PIECE_ELEMENTS", 2)
    monkeypatch.setattr(transport, "PIECE_BYTES", 8)
    return calls


# Two alltoalls: the same splits and rows (a swap of their messages changes only values), or
# other splits and row sizes (blocks empty in one call and not the other, 3 rows: 2 + 1).
_TWO_ALLTOALLS = {
    "same": ((torch.int16, (3, 2), _splits), (torch.int16, (3, 2), _splits)),
    "crossed": ((torch.int16, (3, 2), _splits),
                (torch.float64, (3,), lambda s, r: (3 * s + r + 1) % 4 if s != r else 3)),
}


def _alltoall_send(r: int, n: int, which: int, dtype, tail, splits) -> tuple:
    """Rank r's rows for alltoall ``which`` and its splits (one row past them, unsent)."""
    counts = [splits(r, k) for k in range(n)]
    rows = [_pattern(counts[k], *tail, dtype=dtype, seed=10 * r + k + 50 * which)
            for k in range(n)]
    return torch.cat([*rows, _pattern(1, *tail, dtype=dtype, seed=99)]), counts


@mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("pattern", sorted(_TWO_ALLTOALLS))
def test_two_alltoalls_in_pieces_synchronized_in_reverse_order(monkeypatch, pattern):
    """Both in flight at once, on one tag between the same ranks (the second's count exchange
    too): messages are matched in the order posted, so each result, synchronized last one
    first, is bit-for-bit the one call's."""
    sync.init(backend="mpi")
    try:
        r, n = sync.rank(), sync.size()
        sends = [_alltoall_send(r, n, i, *spec) for i, spec in enumerate(_TWO_ALLTOALLS[pattern])]
        whole = [sync.alltoall(x, splits=s) for x, s in sends]
        calls = _lower_to_pieces(monkeypatch)
        handles = [sync.alltoall_async(x, splits=s) for x, s in sends]
        in_pieces = [sync.synchronize(h) for h in reversed(handles)][::-1]
        assert [c for c in calls if c != torch.int64] == [x.dtype for x, _ in sends]
        for i, ((out, received), (w_out, w_received)) in enumerate(
                zip(in_pieces, whole, strict=True)):
            dtype, tail, splits = _TWO_ALLTOALLS[pattern][i]
            assert out.dtype == w_out.dtype and torch.equal(out, w_out)
            assert torch.equal(received, w_received)
            assert received.tolist() == [splits(k, r) for k in range(n)]
            assert torch.equal(out, torch.cat([
                _pattern(splits(k, r), *tail, dtype=dtype, seed=10 * k + r + 50 * i)
                for k in range(n)]))
    finally:
        sync.shutdown()


@mpi
@pytest.mark.timeout(120)
def test_alltoall_in_pieces_in_flight_with_adasum(monkeypatch):
    """A blocking Adasum allreduce (isendrecv swaps in 8-byte pieces, small allreduces)
    while an alltoall's pieces are in flight between the same ranks: each result is the one
    it gets alone, bit for bit."""
    n = comm.mpi().COMM_WORLD.size
    if n & (n - 1):
        pytest.skip("Adasum needs a power-of-2 number of ranks")
    sync.init(backend="mpi")
    try:
        r = sync.rank()
        x, splits = _alltoall_send(r, n, 0, torch.float64, (3,), _splits)
        whole = sync.alltoall(x, splits=splits)
        # Small integers: every dot product is exact, whatever order the ranks add them in.
        grads = [_pattern(11, dtype=torch.float64, seed=k) - 40 for k in range(n)]
        calls = _lower_to_pieces(monkeypatch)
        alone = sync.allreduce(grads[r], op=sync.Adasum)
        handle = sync.alltoall_async(x, splits=splits)
        together = sync.allreduce(grads[r], op=sync.Adasum)
        out, received = sync.synchronize(handle)
        assert calls[-1] == torch.float64  # the alltoall went in pieces
        assert torch.equal(out, whole[0]) and torch.equal(received, whole[1])
        assert torch.equal(together, alone)
        assert torch.allclose(together, adasum.tree(grads, [11]), rtol=1e-12, atol=0)
    finally:
        sync.shutdown()


@mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("first", ["lower", "higher"])
def test_alltoall_in_pieces_in_flight_with_isendrecv(world_transport, monkeypatch, first):
    """The transport's two point-to-point operations in flight at once between the same
    ranks, r and r ^ 1: the ``first`` rank of the pair posts the alltoall first, its peer
    the isendrecv (a rank without a peer only alltoalls), each waits in reverse. Their own
    tags keep each operation's messages apart (one tag: the pieces met the other's receives,
    truncated or wrong)."""
    _lower_to_pieces(monkeypatch)
    t, r, n = world_transport, world_transport.rank(), world_transport.size()
    send_rows = [_splits(r, k) for k in range(n)]
    recv_rows = [_splits(k, r) for k in range(n)]
    total = sum(_splits(s, k) for s in range(n) for k in range(n))
    assert total > transport.MAX_COUNT
    send = torch.cat([_pattern(c, 3, dtype=torch.int32, seed=10 * r + k)
                      for k, c in enumerate(send_rows)])
    out = torch.empty(sum(recv_rows), 3, dtype=torch.int32)
    peer = r ^ 1
    mine = _pattern(5 + r, dtype=torch.float64, seed=r)  # 40 + 8r bytes: 5 pieces or more
    theirs = torch.empty(5 + peer, dtype=torch.float64)

    def alltoall():
        return t.ialltoall(send, out, send_rows, recv_rows, total=total)

    def sendrecv():
        return t.isendrecv(mine, theirs, peer)

    starts = [alltoall] if peer >= n else \
        [alltoall, sendrecv] if (r < peer) == (first == "lower") else [sendrecv, alltoall]
    posted = [start() for start in starts]
    for request in reversed(posted):
        request.wait()
    assert torch.equal(out, torch.cat([_pattern(_splits(k, r), 3, dtype=torch.int32,
                                                seed=10 * k + r) for k in range(n)]))
    if peer < n:
        assert torch.equal(theirs, _pattern(5 + peer, dtype=torch.float64, seed=peer))
