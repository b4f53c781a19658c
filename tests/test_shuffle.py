"""Shuffling without MPI: option checks, the samplers simulated for K ranks in one process,
reading arbitrary shards from the data files, and one-line errors from whole jobs."""

import dataclasses
import functools
import gzip
import json
import math
import struct
import types

import numpy as np
import pytest
import torch
from conftest import run_commands, run_job

from hpctrain import data, options, shuffle
from hpctrain.config import DataConfig
from hpctrain.errors import UsageError
from hpctrain.shuffle import order
from hpctrain.shuffle.options import canonical_strategy
from hpctrain.shuffle.train_data import make_sampler

STRATEGIES = ["global", "local", "partial:0", "partial:0.3", "partial:1"]


def spec(**kw) -> shuffle.TrainDataSpec:
    """The default spec on the synthetic set, seed 7, with ``kw`` changed."""
    return shuffle.TrainDataSpec(**{"dataset": "synthetic", "seed": 7, **kw})


def rank_indices(strategy, n, ranks, epoch, labels=None, seed=7):
    out = []
    for r in range(ranks):
        s = make_sampler(strategy, n, ranks, r, seed, labels)
        s.set_epoch(epoch)
        out.append(torch.tensor(list(s)))
    return out


@pytest.mark.parametrize("value, message", [
    ("partial:1.5", "--shuffle partial:1.5: fraction 1.5 outside [0, 1]"),
    ("partial:-0.1", "--shuffle partial:-0.1: fraction -0.1 outside [0, 1]"),
    ("partial:nan", "fraction nan outside [0, 1]"),
    ("partial:x", "--shuffle partial:x: 'x' is not a number"),
    ("partial", "unknown --shuffle 'partial'"),
    ("global:0.5", "unknown --shuffle 'global:0.5'"),
    ("random", "unknown --shuffle 'random'; choose from global, local, partial:Q"),
])
def test_bad_strategy_is_one_line(value, message):
    with pytest.raises(UsageError) as err, options.command_line():  # as typed
        spec(shuffle=value)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError) as err:  # from Python it said --shuffle too: the field
        DataConfig(dataset="synthetic", shuffle=value)
    field = f"DataConfig.shuffle={value!r}"
    assert str(err.value).startswith(field + (" is unknown; " if "unknown" in message else ":"))


@pytest.mark.parametrize("field, value, typed", [
    ("data_placement", "everywhere", "unknown --data-placement 'everywhere'; choose from "
                                     "replicated, sharded"),
    ("partition", "by-colour", "unknown --partition 'by-colour'; choose from iid, label-skew"),
    ("shuffle_chunk_mb", 0.0, "--shuffle-chunk-mb 0.0 must be in (0, 1e+06]")])
def test_bad_placement_partition_chunk(field, value, typed):
    """Named as typed on the command line; from Python by DataConfig's field, which said
    the flag too (``unknown --partition 'by-colour'``) to a caller who typed none."""
    with pytest.raises(UsageError) as err, options.command_line():
        spec(**{field: value})
    assert str(err.value) == typed
    with pytest.raises(UsageError) as err:
        spec(**{field: value})
    assert str(err.value).startswith(f"DataConfig.{field}={value!r} ")


def test_spec_defaults_frozen_and_required():
    s = shuffle.TrainDataSpec()
    assert (s.dataset, s.data_dir, s.seed, s.shuffle, s.data_placement, s.partition,
            s.shuffle_chunk_mb) == ("fashion-mnist", None, 0, "global", "replicated", "iid", 16.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.shuffle = "local"
    with pytest.raises(TypeError, match="TrainDataSpec"):
        shuffle.make_train_data(types.SimpleNamespace(**dataclasses.asdict(spec())))


def test_parse_strategy():
    assert shuffle.parse_strategy("global") == ("global", 0.0)
    assert shuffle.parse_strategy("local") == ("local", 0.0)
    assert shuffle.parse_strategy("partial:0.25") == ("partial", 0.25)
    assert shuffle.parse_strategy("partial:1") == ("partial", 1.0)


def test_a_negative_zero_fraction_is_partial_zero():
    """partial:-0 kept its sign: canonical_strategy wrote partial:-0, which a resume of a
    partial:0 run compared as text and refused, one value with two spellings."""
    for text in ("partial:-0", "partial:-0.0", "partial:-1e-400"):
        name, q = shuffle.parse_strategy(text)
        assert (name, math.copysign(1.0, q)) == ("partial", 1.0)
        assert canonical_strategy(text) == canonical_strategy("partial:0") == "partial:0"


def test_bad_strategy_from_a_job_fails_before_mpi(tmp_path):
    proc = run_job(["train", "--algo", "ssgd", "--dataset", "synthetic", "--model", "mlp",
                    "--shuffle", "partial:1.5", "--out", str(tmp_path / "run")], np=2, timeout=90)
    assert proc.returncode == 2, proc.stderr  # bad input's status
    lines = [x for x in proc.stderr.splitlines() if x.startswith("hpctrain")]
    assert len(lines) == 1 and "partial:1.5" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_training_job_sees_the_same_data_replicated_or_sharded(tmp_path):
    """ssgd on 2 ranks: global shuffling gives the same run whichever rank holds the data; the
    sharded run reports the bytes it moved per epoch."""
    placements = ("replicated", "sharded")
    proc = run_commands([["train", "--algo", "ssgd", "--dataset", "synthetic", "--model", "mlp",
                          "--epochs", "2", "--seed", "3", "--no-progress", "--partition",
                          "iid" if placement == "replicated" else "label-skew",
                          "--data-placement", placement,
                          "--out", str(tmp_path / placement)] for placement in placements],
                        np=2, timeout=180)
    assert proc.returncode == 0, proc.stderr
    rep, sh = (json.loads((tmp_path / p / "summary.json").read_text()) for p in placements)
    assert rep["final_test_loss"] == sh["final_test_loss"]
    assert rep["bytes_moved"] == 0
    assert [x["epoch"] for x in sh["exchange_per_epoch"]] == [0, 1]
    assert all(x["bytes_moved"] > 0 for x in sh["exchange_per_epoch"])


def test_global_matches_one_process_order():
    n, seed = 1000, 3
    for epoch in range(3):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        assert torch.equal(rank_indices("global", n, 1, epoch, seed=seed)[0], perm)
        parts = rank_indices("global", n, 4, epoch, seed=seed)
        # The union of the ranks' i-th batches of size b is the one-process batch of size 4b.
        b = 8
        for i in range(n // 4 // b):
            union = torch.cat([p[i * b:(i + 1) * b] for p in parts]).sort().values
            assert torch.equal(union, perm[i * 4 * b:(i + 1) * 4 * b].sort().values)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("skew", [False, True])
def test_every_epoch_is_a_partition_of_the_set(strategy, skew):
    n, ranks = 600, 4
    labels = torch.arange(n) % 10 if skew else None
    for epoch in range(3):
        parts = rank_indices(strategy, n, ranks, epoch, labels)
        assert [len(p) for p in parts] == [n // ranks] * ranks
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(n))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tail_is_dropped_not_padded(strategy):
    n, ranks = 603, 4
    parts = rank_indices(strategy, n, ranks, 1)
    assert [len(p) for p in parts] == [150] * 4
    assert len(torch.cat(parts).unique()) == 600


def test_deterministic_and_epochs_differ():
    for strategy in STRATEGIES[:4]:
        a, b = rank_indices(strategy, 500, 2, 1), rank_indices(strategy, 500, 2, 1)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        c = rank_indices(strategy, 500, 2, 2)
        assert not torch.equal(a[0], c[0])
        d = rank_indices(strategy, 500, 2, 1, seed=8)
        assert not torch.equal(a[0], d[0])


def test_local_keeps_each_rank_on_its_block():
    labels = torch.arange(400) % 4
    for epoch in range(3):
        parts = rank_indices("local", 400, 4, epoch, labels)
        for r, p in enumerate(parts):
            assert set(labels[p].tolist()) == {r}  # label-skew: sorted by label, then cut
        iid = rank_indices("local", 400, 4, epoch)
        for r, p in enumerate(iid):
            assert torch.equal(p.sort().values, torch.arange(100 * r, 100 * (r + 1)))


def test_partial_zero_equals_local():
    labels = torch.arange(800) % 10
    for epoch in range(4):
        assert all(torch.equal(a, b) for a, b in zip(
            rank_indices("partial:0", 800, 4, epoch, labels),
            rank_indices("local", 800, 4, epoch, labels), strict=True))


def moved(strategy, n, ranks, epoch):
    """Per rank: samples held in ``epoch`` that were not held in ``epoch - 1``."""
    before, after = rank_indices(strategy, n, ranks, epoch - 1), rank_indices(strategy, n, ranks,
                                                                                epoch)
    return [len(set(a.tolist()) - set(b.tolist())) for a, b in zip(after, before, strict=True)]


@pytest.mark.parametrize("q", [0.1, 0.3, 0.5])
def test_partial_moves_fraction_q_to_random_other_ranks(q):
    n, ranks = 2000, 4
    per = n // ranks
    assert moved(f"partial:{q}", n, ranks, 2) == [round(q * per)] * ranks
    # Destinations: uniform over the other ranks (binomial tolerance, 5 sigma).
    sampler = make_sampler(f"partial:{q}", n, ranks, 0, 7)
    sampler.set_epoch(0)
    before = sampler.holdings()
    sampler.set_epoch(1)
    after = sampler.holdings()
    owner = torch.empty(n, dtype=torch.long)
    for r, held in enumerate(after):
        owner[held] = r
    m = round(q * per)
    for r, held in enumerate(before):
        counts = torch.bincount(owner[held], minlength=ranks)
        assert counts[r] == per - m
        others = [counts[d].item() for d in range(ranks) if d != r]
        expect, sigma = m / (ranks - 1), (m * (1 / 3) * (2 / 3)) ** 0.5
        assert all(abs(c - expect) <= 5 * sigma for c in others), others


def test_partial_one_is_a_full_redistribution():
    n, ranks = 1200, 3
    per = n // ranks
    assert moved("partial:1", n, ranks, 1) == [per] * ranks
    assert moved("partial:1", n, ranks, 3) == [per] * ranks


def test_partial_routes_are_derangements():
    routes = order.partial_routes(1, 2, 5, 300)
    assert torch.equal(routes.sort(dim=1).values, torch.arange(5).expand(300, 5))
    assert not (routes == torch.arange(5)).any()
    assert torch.equal(routes, order.partial_routes(1, 2, 5, 300))


@pytest.mark.parametrize("seed", range(6))
def test_few_partial_routes_are_derangements_too(seed):
    """A fixed point in the first draw must be drawn again even when no row is the identity:
    with m = 1 or 2 rows that is the common case, not the rare one."""
    for ranks, m in ((2, 1), (3, 1), (3, 2), (4, 2)):
        routes = order.partial_routes(seed, 0, ranks, m)
        assert not (routes == torch.arange(ranks)).any(), (ranks, m, routes)


def test_seeds_are_reduced_mod_2_64_and_the_orders_they_give_stay_put():
    """Seeds take any sign (--seed -1): -1 and 1 must not share their local orders (abs()
    would), and a seed's orders are pinned: a run repeated or resumed by a later version
    trains on the same samples in the same order."""
    assert order.generator(1, 2, 3).initial_seed() == 6498626229777268288
    assert order.generator(-1).initial_seed() == 6295558014972089990
    assert order.generator(-1).initial_seed() != order.generator(1).initial_seed()
    assert order.generator(-1).initial_seed() == order.generator(2**64 - 1).initial_seed()
    assert order.local_permutation(7, 0, 0, 10).tolist() == [7, 0, 2, 1, 8, 3, 6, 9, 4, 5]


def test_the_random_streams_differ_by_rank_and_by_use():
    """Each rank reorders and selects with its own stream (the same one would give every
    rank the same pattern), and the selection is not the local order's head (the stream tags
    keep the uses apart)."""
    n, m = 50, 10
    assert not torch.equal(order.local_permutation(3, 1, 0, n), order.local_permutation(3, 1, 1, n))
    assert not torch.equal(order.partial_selection(3, 1, 0, n, m),
                           order.partial_selection(3, 1, 1, n, m))
    assert not torch.equal(order.partial_selection(3, 1, 0, n, m),
                           order.local_permutation(3, 1, 0, n)[:m])


@pytest.mark.parametrize("q, n, ranks, expected", [
    (0.5, 5, 2, 3), (0.25, 10, 3, 3), (0.1, 15, 4, 2), (0.3, 10, 2, 3), (1.0, 7, 2, 7),
    (0.5, 5, 1, 0),
    # A tie of the decimal q: 0.009 x 1500 is 13.5, but 13.4999... in floats (it was 13).
    (0.009, 1500, 2, 14), (0.018, 750, 4, 14), (0.036, 1625, 2, 59)])
def test_moved_count_rounds_half_up(q, n, ranks, expected):
    """2.5 samples is 3, not Python's round-half-even 2; one rank sends nothing; a tie of
    the fraction as written (partial:0.009) rounds up too."""
    assert order.moved_count(q, n, ranks) == expected


def test_a_partial_step_keeps_order_and_appends_by_source_rank():
    """A rank keeps its unselected samples in their order and appends what it receives by
    source rank then route row: the order the sharded ranks receive them in, which the
    replicated samplers must match. One sample moved (m = 1) is an exchange too."""
    ranks, n = 4, 40
    before = [torch.arange(r * n, (r + 1) * n) for r in range(ranks)]
    for q in (1 / n, 0.3):
        m = order.moved_count(q, n, ranks)
        after = order.partial_step(before, 5, 2, q)
        routes = order.partial_routes(5, 2, ranks, m)
        for d in range(ranks):
            sel = order.partial_selection(5, 2, d, n, m)
            keep = torch.ones(n, dtype=torch.bool)
            keep[sel] = False
            assert torch.equal(after[d][:n - m], before[d][keep])
            sources = after[d][n - m:] // n
            assert torch.equal(sources, sources.sort().values) and (sources != d).all()
            received = [before[s][order.partial_selection(5, 2, s, n, m)][routes[:, s] == d]
                        for s in range(ranks)]
            assert torch.equal(after[d][n - m:], torch.cat(received))


def test_a_partial_step_costs_torch_calls_in_proportion_to_the_ranks():
    """Every replicated rank, and the simulator for all its workers, computes all K holdings
    each epoch: picked out per (destination, source) pair, that was K * K masks (17 s an
    epoch at K = 1024, 78 s at 2048). Counted in torch calls, not timed: linear in K."""

    class Count(torch.overrides.TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    def calls(ranks: int) -> int:
        held = [order.block(torch.arange(8 * ranks), ranks, r) for r in range(ranks)]
        Count.calls = 0
        with Count():
            order.partial_step(held, 3, 1, 0.5)
        return Count.calls

    small, large = calls(16), calls(128)  # 8x the ranks
    assert large < 12 * small, (small, large)  # about 8x; K * K's would be 64x


@pytest.mark.parametrize("n, ranks", [(103, 4), (100, 4), (7, 3)])
def test_global_destinations_name_the_rank_that_consumes_each_sample(n, ranks):
    """Sharded global shuffling moves each sample to the rank whose global_indices hold it;
    the tail not consumed this epoch goes one per rank from rank 0 on."""
    seed, epoch = 2, 3
    dest, pos = order.global_destinations(seed, epoch, n, ranks, torch.arange(n))
    perm = order.global_permutation(seed, epoch, n)
    assert torch.equal(perm[pos], torch.arange(n))
    for r in range(ranks):
        mine = order.global_indices(seed, epoch, n, ranks, r)
        assert (dest[mine] == r).all()
    tail = perm[n // ranks * ranks:]
    assert dest[tail].tolist() == list(range(n % ranks))
    assert torch.equal(torch.bincount(dest, minlength=ranks),
                       torch.tensor([n // ranks + (r < n % ranks) for r in range(ranks)]))


def test_a_label_skew_partition_keeps_the_file_order_within_a_label():
    """The sort by label is stable: ties keep their order, so the blocks are the same on
    every machine and torch version (an unstable sort shuffles them)."""
    labels = torch.arange(1000) % 10
    got = order.partition(1000, labels)
    assert torch.equal(got, torch.tensor(sorted(range(1000), key=lambda i: (i % 10, i))))


def test_partial_sampler_replays_any_epoch():
    s = make_sampler("partial:0.2", 500, 2, 1, 7)
    seq = []
    for e in range(4):
        s.set_epoch(e)
        seq.append(s.indices())
    fresh = make_sampler("partial:0.2", 500, 2, 1, 7)
    for e in (3, 1, 2):
        fresh.set_epoch(e)
        assert torch.equal(fresh.indices(), seq[e])


def test_a_numpy_whole_number_of_samples_is_a_number_of_samples():
    """The samplers took an int or a sized dataset: numpy's np.int64(100) (as
    np.count_nonzero gives) raised TypeError (no len()), though its num_replicas and rank
    were taken as numpy's; True (1 sample) reached torch.randperm and raised there."""
    for cls in (shuffle.GlobalShuffleSampler, shuffle.LocalShuffleSampler,
                functools.partial(shuffle.PartialShuffleSampler, 0.5)):
        s = cls(np.int64(100), num_replicas=3, rank=2, seed=1, drop_last=True)
        plain = cls(100, num_replicas=3, rank=2, seed=1, drop_last=True)
        assert len(s) == 33 and list(s) == list(plain)
    assert list(shuffle.GlobalShuffleSampler(True, num_replicas=1, rank=0)) == [0]


def test_samplers_interface():
    s = shuffle.GlobalShuffleSampler(100, num_replicas=3, rank=2, seed=1, drop_last=True)
    assert len(s) == 33 and len(list(s)) == 33
    assert isinstance(s, torch.utils.data.Sampler)
    # A dataset works in place of its length, as with DistributedSampler.
    ds = data.load("synthetic", "test")
    s = shuffle.LocalShuffleSampler(ds, num_replicas=2, rank=1, labels=ds.labels)
    assert len(s) == 256 and set(ds.labels[list(s)].tolist()) <= set(range(4, 10))
    with pytest.raises(UsageError, match="rank 3"):
        shuffle.LocalShuffleSampler(100, num_replicas=3, rank=3)
    with pytest.raises(UsageError, match="1.5"):
        shuffle.PartialShuffleSampler(1.5, 100, num_replicas=2, rank=0)
    # The old positional seed (fourth argument) is refused, not taken as shuffle=True.
    with pytest.raises(TypeError, match="shuffle must be True or False, not 7"):
        shuffle.GlobalShuffleSampler(100, 2, 0, 7)


@pytest.mark.parametrize("n, ranks", [(100, 3), (101, 4), (96, 4), (5, 4), (7, 7)])
@pytest.mark.parametrize("shuffled", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_global_sampler_is_torchs_distributed_sampler(n, ranks, shuffled, drop_last):
    from torch.utils.data import DistributedSampler

    for rank in range(ranks):
        ours = shuffle.GlobalShuffleSampler(range(n), ranks, rank, shuffled, 3, drop_last)
        theirs = DistributedSampler(range(n), ranks, rank, shuffled, 3, drop_last)
        assert (len(ours), ours.num_samples, ours.total_size) == \
            (len(theirs), theirs.num_samples, theirs.total_size)
        for epoch in (0, 2):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs), (rank, epoch)


@pytest.mark.parametrize("strategy", ["local", "partial:0.3"])
@pytest.mark.parametrize("labels", [None, "skew"])
def test_local_and_partial_pad_with_their_own_samples(strategy, labels):
    n, ranks = 103, 4  # three tail samples: ranks 0-2 take one each, rank 3 repeats one
    skew = data.load("synthetic", "test").labels[:n] if labels else None
    name, q = shuffle.parse_strategy(strategy)
    make = shuffle.LocalShuffleSampler if name == "local" else \
        functools.partial(shuffle.PartialShuffleSampler, q)
    for epoch in (0, 1):
        got = []
        for rank in range(ranks):
            s = make(n, ranks, rank, seed=5, labels=skew)
            s.set_epoch(epoch)
            mine = s.indices()
            assert len(mine) == len(s) == 26
            kept = make(n, ranks, rank, seed=5, drop_last=True, labels=skew)
            kept.set_epoch(epoch)
            # The block is the drop_last block (same samples), plus the tail sample or a repeat.
            assert set(kept.indices().tolist()) <= set(mine.tolist())
            if rank == 3:
                assert len(set(mine.tolist())) == 25 and mine[-1] == mine[0]
            got.append(mine)
            unshuffled = make(n, ranks, rank, shuffle=False, seed=5, labels=skew)
            unshuffled.set_epoch(epoch)
            assert torch.equal(unshuffled.indices()[:25], s.block())
        assert sorted(set(torch.cat(got).tolist())) == list(range(n))  # nothing dropped


@pytest.mark.parametrize("strategy", ["global", "local", "partial:0.5"])
@pytest.mark.parametrize("partition", ["iid", "label-skew"])
def test_single_process_train_data(strategy, partition):
    outs = {}
    for placement in ("replicated", "sharded"):
        td = shuffle.make_train_data(spec(shuffle=strategy, partition=partition,
                                          data_placement=placement))
        assert (td.num_samples, td.samples_per_rank) == (2048, 2048)
        assert td.input_shape == data.SYNTHETIC_SHAPE and td.num_classes == 10
        outs[placement] = [td.epoch(e).subset(range(td.samples_per_rank)) for e in range(2)]
        assert td.stats()["bytes_moved"] == 0
    full = data.load("synthetic")
    for rep, sh in zip(outs["replicated"], outs["sharded"], strict=True):
        assert torch.equal(rep.ids, sh.ids)
        assert torch.equal(sh.images, full.images[sh.ids])
        assert torch.equal(sh.labels, full.labels[sh.ids])


def test_nothing_exchanged_is_zero_seconds_as_a_float():
    """summary.json's exchange_s, typed float seconds, was the integer 0 in every replicated
    run (a sum of no exchanges)."""
    td = shuffle.make_train_data(spec(data_placement="replicated"))
    td.epoch(0)
    stats = td.stats()
    assert stats["exchange_per_epoch"] == [] and stats["bytes_moved"] == 0
    assert stats["exchange_s"] == 0.0 and type(stats["exchange_s"]) is float


@pytest.mark.parametrize("placement, strategy", [("replicated", "global"),
                                                 ("replicated", "partial:0.5"),
                                                 ("sharded", "local"), ("sharded", "partial:0.5")])
def test_each_epoch_reuses_the_last_ones_memory(placement, strategy):
    """A fresh copy per epoch kept the old one alive while the next was made (the loop's
    ``local``): one share more per rank at each switch. Now each epoch's samples go into the
    same buffers, with the values a fresh copy had."""
    td = shuffle.make_train_data(spec(shuffle=strategy, data_placement=placement))
    first = td.epoch(0)
    where = [t.data_ptr() for t in (first.images, first.labels, first.ids)]
    full = data.load("synthetic")
    for epoch in (1, 2):
        now = td.epoch(epoch)
        assert [t.data_ptr() for t in (now.images, now.labels, now.ids)] == where
        assert torch.equal(now.images, full.images[now.ids])
        assert torch.equal(now.labels, full.labels[now.ids])
    if placement == "replicated":
        td.sampler.set_epoch(2)
        assert torch.equal(now.ids, td.sampler.indices())


def write_idx(path, arr, compress):
    head = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(head + arr.tobytes())


@pytest.mark.parametrize("compress", [True, False])
def test_load_indices_idx(tmp_path, compress):
    rng = np.random.default_rng(0)
    ext = ".gz" if compress else ""
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte{ext}",
                  rng.integers(0, 256, (300, 28, 28), dtype=np.uint8), compress)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte{ext}",
                  rng.integers(0, 10, 300, dtype=np.uint8), compress)
    full = data.load("mnist", "train", str(tmp_path))
    assert torch.equal(data.load_labels("mnist", "train", str(tmp_path)), full.labels)
    idx = [299, 0, 17, 150, 16]
    part = data.load_indices("mnist", "train", idx, str(tmp_path))
    assert torch.equal(part.ids, torch.tensor(idx))
    assert torch.equal(part.images, full.images[idx])
    assert torch.equal(part.labels, full.labels[idx])
    with pytest.raises(UsageError, match="outside"):
        data.load_indices("mnist", "train", [300], str(tmp_path))


def test_load_indices_cifar(tmp_path):
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = rng.integers(0, 256, (40, 1 + 3 * 32 * 32), dtype=np.uint8)
        rec[:, 0] %= 10
        (tmp_path / name).write_bytes(rec.tobytes())
    full = data.load("cifar10", "train", str(tmp_path))
    assert torch.equal(data.load_labels("cifar10", "train", str(tmp_path)), full.labels)
    idx = [199, 3, 41, 40, 80, 39]  # across file boundaries, unsorted
    part = data.load_indices("cifar10", "train", idx, str(tmp_path))
    assert torch.equal(part.images, full.images[idx])
    assert torch.equal(part.labels, full.labels[idx])


def _plotted_run(folder, algo: str, seed: int, acc=(0.1, 0.5, 0.7)) -> str:
    """A finished run's folder as hpctrain.shuffle.plot reads it: global shuffle, K = 2."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"algo": algo, "seed": seed, "data": {"shuffle": "global", "partition": "iid"}}))
    (folder / "summary.json").write_text(json.dumps(
        {"algo": algo, "algo_label": algo, "workers": 2, "final_test_acc": acc[-1],
         "best_test_acc": max(acc), "bytes_moved": 0, "exchange_s": 0.0, "epochs": 1}))
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"t": e, "epoch": e, "test_acc": a}) + "\n"
        for e, a in zip((0.0, 0.5, 1.0), acc, strict=True)))
    return str(folder)


def _drawn(run_dirs: list[str]) -> tuple[list[str], int]:
    """The shuffle plot's legend labels for ``run_dirs`` and how many ranges it shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpctrain.shuffle import plot

    fig, ax = plt.subplots()
    try:
        plot.draw(ax, run_dirs)
        return ax.get_legend_handles_labels()[1], len(ax.collections)
    finally:
        plt.close(fig)


def test_the_shuffle_plot_keeps_algorithms_apart_and_counts_seeds(tmp_path):
    """ssgd, ma and ec runs, all seed 0, were one line "global (mean of 3 seeds)" with their
    range shaded as a spread over seeds, and one row of the spread table."""
    from hpctrain.shuffle import plot

    algos = [_plotted_run(tmp_path / a, a, 0, (0.1, 0.2, acc))
             for a, acc in (("ssgd", 0.9), ("ma", 0.8), ("ec", 0.7))]
    assert _drawn(algos) == (["ssgd, global", "ma, global", "ec, global"], 0)
    table = plot.spread_table(algos)
    assert "| 2 | ma, global | 1 | 0.8000 | 0.0000 | 0.8000 | 0.8000 | 1 |" in table
    repeated = [_plotted_run(tmp_path / f"r{i}", "asgd", 0, (0.1, 0.2, 0.3 + i / 10))
                for i in range(3)]
    assert _drawn(repeated) == (["global (mean of 3 runs of seed 0)"], 0)  # not a spread
    seeds = [*repeated, *(_plotted_run(tmp_path / f"s{s}", "asgd", s) for s in (1, 2))]
    assert _drawn(seeds) == (["global (mean of 5 runs, 3 seeds)"], 1)
    assert _drawn(seeds[2:]) == (["global (mean of 3 seeds)"], 1)
    assert plot.spread_table(seeds).splitlines()[2].endswith("| 0.7000 | 3 |")
