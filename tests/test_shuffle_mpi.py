"""Shuffling under mpirun (-np 2 and 4): samples really move between ranks.

Run: mpirun -np 4 python -m pytest --with-mpi -m mpi tests/test_shuffle_mpi.py
"""

import argparse

import pytest
import torch

from hpctrain import data, shuffle

STRATEGIES = ["global", "local", "partial:0", "partial:0.3", "partial:1"]


def world():
    from hpctrain import comm

    return comm.world()


def spec(**kw) -> shuffle.TrainDataSpec:
    """Synthetic set, seed 11, small exchange rounds (several per epoch), with ``kw`` changed."""
    return shuffle.TrainDataSpec(**{"dataset": "synthetic", "seed": 11,
                                    "shuffle_chunk_mb": 0.1, **kw})


def gathered_ids(comm, ds: data.Dataset) -> list[torch.Tensor]:
    return comm.allgather(ds.ids)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_a_rank_can_receive_more_rows_than_any_rank_sends():
    """The round buffers were sized by the most rows a rank sends: every rank sending its
    three rows to rank 1 wrote six rows into a buffer of three (a segmentation fault)."""
    from hpctrain.shuffle.exchange import Exchanger

    comm = world()
    r, n = comm.Get_rank(), comm.Get_size()
    ids = torch.arange(3 * r, 3 * r + 3)
    mine = data.Dataset("x", ids.float().view(3, 1, 1, 1).expand(3, 1, 4, 4).contiguous(),
                        ids % 10, ids)
    out = data.Dataset("x", torch.zeros(3 * n, 1, 4, 4), torch.zeros(3 * n, dtype=torch.long),
                       torch.full((3 * n,), -1))
    Exchanger(comm, chunk_bytes=1 << 20).move(mine, torch.arange(3), torch.ones(3,
                                              dtype=torch.long), out, lambda got: got)
    if r == 1:
        assert out.ids.tolist() == list(range(3 * n))
        assert torch.equal(out.images[:, 0, 0, 0], torch.arange(3 * n).float())
    else:
        assert out.ids.tolist() == [-1] * (3 * n)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_a_rank_holding_or_receiving_no_rows_takes_part():
    """reshape(0, -1) of a rank's empty holdings raised ("cannot reshape tensor of 0
    elements") on that rank, and the others waited in the exchange."""
    from hpctrain.shuffle.exchange import Exchanger

    comm = world()
    r, n = comm.Get_rank(), comm.Get_size()
    held = 0 if r == 0 else 2  # rank 0 holds nothing and receives nothing
    ids = torch.arange(2 * r, 2 * r + held)
    mine = data.Dataset("x", ids.float().view(held, 1, 1, 1).expand(held, 1, 4, 4).contiguous(),
                        ids % 10, ids)
    into = 0 if r == 0 else 2
    out = data.Dataset("x", torch.zeros(into, 1, 4, 4), torch.zeros(into, dtype=torch.long),
                       torch.full((into,), -1))
    def to(s: int) -> int:  # ranks 1.. send their rows one rank on, among themselves
        return s % (n - 1) + 1

    sent = Exchanger(comm, chunk_bytes=1 << 20).move(
        mine, torch.arange(held), torch.full((held,), to(r)), out,
        lambda got: torch.arange(len(got)))
    assert out.ids.tolist() == [i for s in range(1, n) if r and to(s) == r
                                for i in (2 * s, 2 * s + 1)]
    assert sent == (0 if r == 0 or to(r) == r else 2 * (4 * 16 + 16))  # 2 rows, ids, labels


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("partition", ["iid", "label-skew"])
def test_every_epoch_every_placement_is_the_whole_set(strategy, partition):
    comm = world()
    full = data.load("synthetic")
    runs = {}
    for placement in ("replicated", "sharded"):
        td = shuffle.make_train_data(spec(shuffle=strategy, partition=partition,
                                          data_placement=placement), comm)
        assert td.samples_per_rank == len(full) // comm.Get_size()
        epochs = []
        for e in range(3):
            ds = td.epoch(e)
            parts = gathered_ids(comm, ds)
            assert [len(p) for p in parts] == [td.samples_per_rank] * comm.Get_size()
            assert torch.equal(torch.cat(parts).sort().values, torch.arange(len(full)))
            # Images and labels travelled with their ids.
            assert torch.equal(ds.images, full.images[ds.ids])
            assert torch.equal(ds.labels, full.labels[ds.ids])
            epochs.append(ds.ids.clone())  # the next epochs reuse the buffers
        runs[placement] = epochs
    # Same seed: the same order on every rank whether the data are replicated or sharded.
    for rep, sh in zip(runs["replicated"], runs["sharded"], strict=True):
        assert torch.equal(rep, sh)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_global_order_is_the_one_process_permutation_dealt_out():
    comm = world()
    k, r = comm.Get_size(), comm.Get_rank()
    td = shuffle.make_train_data(spec(data_placement="sharded"), comm)
    for e in range(2):
        perm = torch.randperm(2048, generator=torch.Generator().manual_seed(11 + e))
        assert torch.equal(td.epoch(e).ids, perm[r::k][:2048 // k])


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("q", [0.25, 1.0])
def test_partial_moves_fraction_q_and_counts_bytes(q):
    comm = world()
    k = comm.Get_size()
    td = shuffle.make_train_data(
        spec(shuffle=f"partial:{q}", data_placement="sharded", partition="label-skew"), comm)
    n = td.samples_per_rank
    m = round(q * n)
    row_bytes = 4 * 16 * 16 + 16  # float32 image, int64 label, int64 id
    prev = set(td.epoch(0).ids.tolist())
    for e in range(1, 3):
        ids = set(td.epoch(e).ids.tolist())
        assert len(ids - prev) == m  # what left was replaced by as many from other ranks
        prev = ids
    assert td.stats()["bytes_moved"] == 3 * m * row_bytes
    assert td.stats()["exchange_s"] > 0
    per_epoch = td.stats()["exchange_per_epoch"]
    assert [(x["epoch"], x["bytes_moved"]) for x in per_epoch] == [(e, m * row_bytes)
                                                                   for e in range(3)]
    moved = sum(comm.allgather(td.stats()["bytes_moved"]))
    assert moved == 3 * k * m * row_bytes


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_local_and_partial_zero_move_nothing():
    comm = world()
    runs = []
    for strategy in ("local", "partial:0"):
        td = shuffle.make_train_data(spec(shuffle=strategy, data_placement="sharded",
                                          partition="label-skew"), comm)
        runs.append([td.epoch(e).ids.clone() for e in range(3)])
        assert td.stats()["bytes_moved"] == 0
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.mpi(min_size=4)
@pytest.mark.timeout(180)
@pytest.mark.parametrize("strategy", ["global", "partial:0.5"])
def test_uneven_split_keeps_the_tail_on_three_ranks(strategy):
    """2048 samples on 3 ranks: 682 per epoch each, the 2 left over dropped from the epoch but
    kept by the sharded holdings, so the next global epoch can draw them."""
    sub = world().Split(0 if world().Get_rank() < 3 else 1, world().Get_rank())
    if world().Get_rank() >= 3:
        sub.Free()
        return
    runs = {}
    for placement in ("replicated", "sharded"):
        td = shuffle.make_train_data(spec(shuffle=strategy, data_placement=placement), sub)
        runs[placement] = [td.epoch(e).ids.clone() for e in range(3)]
        for ids in runs[placement]:
            every = torch.cat(sub.allgather(ids))
            assert len(every) == 3 * 682 and len(every.unique()) == 3 * 682
        if placement == "sharded" and strategy == "global":
            held = torch.cat(sub.allgather(td.held.ids)).sort().values
            assert torch.equal(held, torch.arange(2048))
    assert all(torch.equal(a, b) for a, b in zip(runs["replicated"], runs["sharded"],
                                                 strict=True))
    sub.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(300)
def test_fashion_mnist_sharded_global_reads_only_its_shard():
    comm = world()
    k, r = comm.Get_size(), comm.Get_rank()
    td = shuffle.make_train_data(spec(dataset="fashion-mnist", data_placement="sharded",
                                      partition="label-skew", shuffle_chunk_mb=4.0), comm)
    n = td.samples_per_rank
    assert len(td.held) == n  # 60000 divides by 2 and 4: no tail
    labels = data.load_labels("fashion-mnist")
    assert labels[td.held.ids].unique().numel() <= -(-10 // k) + 1  # label-skew shard
    ds = td.epoch(0)
    perm = torch.randperm(60000, generator=torch.Generator().manual_seed(11))
    assert torch.equal(ds.ids, perm[r::k][:n])
    assert torch.equal(ds.labels, labels[ds.ids])
    sample = torch.arange(0, n, 997)
    ref = data.load_indices("fashion-mnist", "train", ds.ids[sample])
    assert torch.equal(ds.images[sample], ref.images)
    assert td.stats()["bytes_moved"] > 0


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_benchmark_moves_the_bytes_it_reports():
    from hpctrain.bench import shuffle as bench

    comm = world()
    args = argparse.Namespace(dataset="synthetic", data_dir=None, partition="label-skew",
                              epochs=2, shuffle_chunk_mb=0.05, seed=0, json=None)
    result = bench.run(args)
    k = comm.Get_size()
    # Global reshuffle: about (K-1)/K of a rank's 2048/K samples leave it each epoch.
    expect = 2048 / k * (k - 1) / k * 1040 / 1e6
    assert 0.7 * expect < result["mb_sent_per_rank"] < 1.3 * expect
    assert 0.7 * expect < result["first_mb_sent_per_rank"] < 1.3 * expect  # the label-skew split
    assert len(result["per_rank"]) == k
    assert all(v > 0 for r in result["per_rank"] for v in r.values())


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_sampler_takes_the_mpi_world_and_refuses_a_contradicting_launcher(monkeypatch):
    from hpctrain.errors import UsageError

    comm = world()
    size, rank = comm.Get_size(), comm.Get_rank()
    s = shuffle.GlobalShuffleSampler(1000, seed=1)  # Open MPI's variables and MPI agree
    assert (s.num_replicas, s.rank) == (size, rank)
    assert sorted(sum(comm.allgather(list(s)), [])) == list(range(1000))
    monkeypatch.setenv("WORLD_SIZE", str(size + 1))  # e.g. left over from another launch
    monkeypatch.setenv("RANK", str(rank))
    with pytest.raises(UsageError, match=rf"torchrun \(WORLD_SIZE={size + 1}, RANK={rank}\) "
                       rf"says rank {rank} of {size + 1}, (Open MPI|PMI|MPI) \(.*\) "
                       rf"says rank {rank} of {size};"):
        shuffle.GlobalShuffleSampler(1000)
