"""The simulator (hpctrain simulate): virtual workers in one process, no MPI."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import heapq
import json
import math
import random
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import LOUD_MODEL, SYNTHETIC, run_commands, run_job, run_program

from hpctrain import algorithm_options, checkpoint, kernels, options, run_folders, steptimes
from hpctrain.async_ import ParameterStore
from hpctrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig, StragglerConfig
from hpctrain.errors import UsageError
from hpctrain.guard import TooManyBadSteps
from hpctrain.run import marks_taken
from hpctrain.sim import SimConfig, simulate
from hpctrain.sim.network import Network
from hpctrain.sim.scheduler import Scheduler, SimulationStuck, WorkerStreams
from hpctrain.sim.steptime import StepTimeModel
from hpctrain.sim.store import LocalStore, SharedStore


def config(algo: str, out, **kw) -> RunConfig:
    optim = kw.pop("optim", OptimConfig(epochs=1, batch_size=32))
    return RunConfig(algo=algo, seed=kw.pop("seed", 3), out=out and str(out), progress=False,
                     data=kw.pop("data", DataConfig(dataset="synthetic")),
                     model=kw.pop("model", ModelConfig(name="mlp")), optim=optim, **kw)


def sim(workers: int, **kw) -> SimConfig:
    return SimConfig(workers=workers, **kw)


def test_the_same_seed_gives_the_same_summary_bit_for_bit(tmp_path):
    def once(name):
        c = config("dcasgd-a", tmp_path / name, optim=OptimConfig(epochs=1, batch_size=64),
                   stragglers=StragglerConfig(slowdown="1:2", jitter=0.3))
        summary = simulate(c, sim(4, step_time="lognormal:0.01:0.5"))
        return summary, (tmp_path / name / "model.pt").read_bytes(), \
            (tmp_path / name / "metrics.jsonl").read_text()

    (a, model_a, curve_a), (b, model_b, curve_b) = once("a"), once("b")
    assert a["simulated"] is True and a["workers"] == 4
    assert json.dumps({**a, "out": None}, sort_keys=True) == \
        json.dumps({**b, "out": None}, sort_keys=True)
    assert model_a == model_b and curve_a == curve_b
    assert sum(a["pushes_per_worker"]) == a["updates"]
    # worker 1 is twice as slow: it makes fewer pushes than the others' mean
    others = [p for i, p in enumerate(a["pushes_per_worker"]) if i != 1]
    assert a["pushes_per_worker"][1] < sum(others) / len(others)
    for f in ("config.json", "model.pt", "metrics.jsonl", "step_times.json"):
        assert (tmp_path / "a" / f).is_file()


def test_events_are_applied_in_virtual_time_order_ties_by_worker():
    sched = Scheduler(5)
    seen = []

    def body(k):
        rng = random.Random(k)
        t = 0.0
        for _ in range(30):
            t += rng.choice([0.5, 1.0, 1.5])  # many ties
            sched.at(k, t)
            seen.append((sched.now[k], k))

    sched.run(body)
    assert len(seen) == 150 and seen == sorted(seen)


def test_a_worker_that_never_comes_is_an_error_not_a_hang():
    sched = Scheduler(2)

    def body(k):
        if k == 0:
            sched.block(0)  # waits for a wake nobody sends

    with pytest.raises(SimulationStuck):
        sched.run(body)


def test_local_store_applies_pushes_in_order_with_the_kernel():
    torch.manual_seed(0)
    values = torch.randn(100)
    shared = SharedStore(values, 2, shards=3)
    sched = Scheduler(2)
    net = Network(0.0, 1e30, 0.0, 1e30)
    grads = [[torch.randn(100) for _ in range(4)] for _ in range(2)]
    log = []

    def body(k):
        store = LocalStore(shared, k, consistency="locked", scheduler=sched, network=net)
        w, ms = torch.empty(100), torch.zeros(100)
        store.pull(w)
        # The model, the update counter and (locked) the 3 shard counts, as a real (not
        # shared) pull reads them.
        assert (store.bytes_read, store.mpi_bytes) == (4 * 100 + 8 + 3 * 8, 4 * 100 + 8 + 3 * 8)
        for i, g in enumerate(grads[k]):
            sched.now[k] += 0.01 * (k + 1)  # worker 1 is slower
            p = store.push(w, g, ms, lr=0.1, lam=2.0)
            log.append((p.index, p.tau, k, i))

    sched.run(body)
    log.sort()
    # Replay the pushes in index order with the kernel itself.
    expect = values.clone()
    baks = {0: values.clone(), 1: values.clone()}
    mss = {0: torch.zeros(100), 1: torch.zeros(100)}
    for _, _, k, i in log:
        kernels.dc_update(expect, grads[k][i], baks[k], mss[k], lr=0.1, lam=2.0,
                          out2=baks[k])
    assert torch.equal(shared.values, expect)
    assert [x[0] for x in log] == list(range(8))
    # Worker 0 pushes at 0.01, 0.02, 0.03, 0.04 s, worker 1 at 0.02, 0.04, 0.06, 0.08 s; ties
    # go to worker 0. Staleness: the other's pushes since this worker's previous one.
    assert [k for _, _, k, _ in log] == [0, 0, 1, 0, 0, 1, 1, 1]
    assert [tau for _, tau, _, _ in log] == [0, 0, 2, 1, 0, 2, 0, 0]


def push_end_times(starts: list[float], net: Network) -> list[float]:
    """Two workers on a 64-float store of 2 equal shards pull at 0, then each pushes once at
    its start time: when each push ends, in virtual seconds."""
    shared = SharedStore(torch.zeros(64), 2, shards=2)
    sched = Scheduler(2)
    ends = [0.0, 0.0]

    def body(k):
        store = LocalStore(shared, k, consistency="locked", scheduler=sched, network=net)
        w = torch.empty(64)
        store.pull(w)
        sched.now[k] = starts[k]
        store.push(w, torch.ones(64), lr=0.1)
        ends[k] = sched.now[k]

    sched.run(body)
    return ends


def test_pushes_on_rotated_shards_at_once_run_side_by_side():
    """Both push at once: worker 0 holds shard 0 then 1, worker 1 shard 1 then 0, as real
    locks let them, so neither waits (each push booked its later shard when applied; the
    other's first hold fits before it). A push: 2 shards of a read and a write, and the
    update counter."""
    net = Network(0.0, 1e30, 0.004, 1e9)
    hold = 2 * net.shard(4 * 32)
    t = 0.02615
    assert push_end_times([t, t], net) == pytest.approx([t + 2 * hold + net.store_latency] * 2)


def test_a_push_wanting_a_held_shard_waits_one_hold():
    """Worker 1 comes one hold later, when worker 0 moves to shard 1, worker 1's first: it
    waits for that hold, then takes shard 0, free by then."""
    net = Network(0.0, 1e30, 0.004, 1e9)
    hold = 2 * net.shard(4 * 32)
    t = 0.02615
    ends = push_end_times([t, t + hold], net)
    assert ends == pytest.approx([t + 2 * hold + net.store_latency,
                                  t + hold + hold + 2 * hold + net.store_latency])


class Overlapping(LocalStore):
    """A worker's store that logs every shard write (who wrote, in lock order) and can run
    another worker's whole push right after one of its own shard writes: the overlap real
    workers make, placed where the test wants it."""

    def __init__(self, shared, rank, writes, consistency):
        super().__init__(shared, rank, consistency=consistency, scheduler=Scheduler(1),
                         network=Network(0.0, 1e30, 0.0, 1e30))
        self.writes, self.then = writes, None

    def _wrote(self, s: int) -> None:
        self.writes[s].append(self.rank)
        if self.then is not None:
            then, self.then = self.then, None
            then()

    def _write(self, s, count, values):
        super()._write(s, count, values)
        self._wrote(s)

    def _accumulate(self, s, delta):
        super()._accumulate(s, delta)
        self._wrote(s)


@pytest.mark.parametrize("consistency", ["locked", "atomic"])
def test_locked_staleness_is_exact_when_pushes_overlap(consistency):
    """Worker b pushes inside a's push (after a's first shard), then a inside b's. locked: a
    push's tau is the most updates by others any shard took between this worker's read of it
    and this push, here counted independently from each shard's writes in lock order. The
    count of finished pushes (what atomic reports) under-counts b's first push and a's second
    (a shard already held the other's update when read) and over-counts b's second (a's
    push finished in between, but on shard 1 after b had written it)."""
    shared = SharedStore(torch.zeros(32), 2, shards=2)
    writes: list[list[int]] = [[], []]
    a, b = (Overlapping(shared, k, writes, consistency) for k in (0, 1))
    assert (a.order, b.order) == ((0, 1), (1, 0))
    models = {0: torch.zeros(32), 1: torch.zeros(32)}  # both read the initial model
    pushes = []  # (worker, Push) in the order the pushes finished

    def push(store):  # the store's own push, without the simulator's virtual time
        pushes.append((store.rank, ParameterStore.push(store, models[store.rank],
                                                       torch.ones(32), lr=0.1)))

    a.then = lambda: push(b)
    push(a)
    b.then = lambda: push(a)
    push(b)
    assert [(k, p.index) for k, p in pushes] == [(1, 0), (0, 1), (0, 2), (1, 3)]
    seen, counted = {0: 0, 1: 0}, []  # the finished pushes since the worker's last one
    for k, p in pushes:
        counted.append(p.index - seen[k])
        seen[k] = p.index + 1
    assert counted == [0, 1, 0, 2]
    # Independently: push n of worker k wrote its n-th entry in each shard's write log; the
    # others' entries since its (n-1)-th are the updates its model lacked there.
    nth = {0: 0, 1: 0}
    true = []
    for k, _ in pushes:
        nth[k] += 1
        lacked = []
        for log in writes:
            mine = [i for i, w in enumerate(log) if w == k]
            lo = mine[nth[k] - 2] + 1 if nth[k] > 1 else 0
            lacked.append(sum(w != k for w in log[lo:mine[nth[k] - 1]]))
        true.append(max(lacked))
    assert true == [1, 1, 1, 1]
    assert [p.tau for _, p in pushes] == (true if consistency == "locked" else counted)


@pytest.mark.parametrize("seed", range(3))
def test_the_mean_of_counted_staleness_is_set_by_the_push_counts(seed):
    """Why a run's mean staleness is no evidence (of fidelity, or of one run against
    another): tau = index - seen, with seen = the worker's previous index + 1 (0 at its first
    pull), so worker w's taus sum to last_w - (n_w - 1), and the mean over N pushes by M
    workers is (M-1) - sum_w (N-1-last_w)/N, whatever the timing: about M-1. p90, p99 and the
    maximum are what timing changes. (locked's exact tau sums, shard by shard, the same way.)"""
    rng = random.Random(seed)
    m, numel = 4, 64
    shared = SharedStore(torch.zeros(numel), m, shards=m)
    sched = Scheduler(m)
    net = Network(0.0, 1e30, 0.0, 1e30)
    steps = [[rng.expovariate(1.0) * (k + 1) for _ in range(rng.randint(5, 15))]
             for k in range(m)]
    log = []

    def body(k):
        store = LocalStore(shared, k, consistency="atomic", scheduler=sched, network=net)
        w = torch.empty(numel)
        store.pull(w)
        for dt in steps[k]:
            sched.now[k] += dt
            p = store.push(w, torch.ones(numel), lr=0.1)
            log.append((k, p.index, p.tau))

    sched.run(body)
    n = len(log)
    last = [max(i for w, i, _ in log if w == k) for k in range(m)]
    assert sum(t for *_, t in log) / n == pytest.approx((m - 1) - sum(n - 1 - x for x in last) / n)


def test_ssgd_simulated_is_sgd_with_k_times_the_batch(tmp_path):
    optim = OptimConfig(epochs=1, batch_size=16, lr=0.05, momentum=0.0)
    a = simulate(config("ssgd", tmp_path / "ssgd", optim=optim), sim(4))
    b = simulate(config("sgd", tmp_path / "sgd",
                        optim=OptimConfig(epochs=1, batch_size=64, lr=0.05, momentum=0.0)),
                 sim(1))
    assert a["updates"] == b["updates"]
    assert a["algo_label"] == "ssgd"  # not the real run's "ssgd (mpi backend)": none here
    ma, mb = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("ssgd", "sgd"))
    assert all(torch.allclose(ma[k], mb[k], atol=1e-5) for k in ma)


class BatchNormNet(torch.nn.Module):
    """Running statistics that differ per worker: each sees its own batches."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 16),
                                       torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, num_classes))

    def forward(self, x):
        return self.net(x)


def test_ssgd_scores_the_model_it_saves_whichever_worker_scores(tmp_path):
    """Worker 1 scored the last of two snapshots with its own BatchNorm statistics: the
    summary's final accuracy and loss were of another model than model.pt (rank 0's)."""
    from hpctrain import data, evaluate

    c = config("ssgd", tmp_path / "x", eval_every=1.0, model=ModelConfig(name=BatchNormNet),
               optim=OptimConfig(epochs=1, batch_size=64, lr=0.01))
    summary = simulate(c, sim(2))
    model = BatchNormNet((1, 16, 16), 10)
    model.load_state_dict(torch.load(tmp_path / "x" / "model.pt", weights_only=True))
    assert summary["final_test_loss"] == evaluate.evaluate(model, data.load("synthetic", "test",
                                                                            None))[1]


class FrozenNet(torch.nn.Module):
    """A frozen first layer (fine-tuning's backbone) and an integer counter parameter."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.body = torch.nn.Linear(256, 16).requires_grad_(False)
        self.head = torch.nn.Linear(16, num_classes)
        self.count = torch.nn.Parameter(torch.tensor([7]), requires_grad=False)

    def forward(self, x):
        return self.head(torch.relu(self.body(x.flatten(1))))


@pytest.mark.parametrize("algo", ["asgd", "dcasgd-a"])
def test_async_workers_leave_frozen_parameters_as_they_were(tmp_path, algo):
    """The store held every parameter, so weight decay shrank the frozen ones (torch's
    optimizers skip them), and an integer one made the run fail after MPI started."""
    optim = OptimConfig(epochs=1, batch_size=64, weight_decay=0.1, momentum=0.5)
    simulate(config(algo, tmp_path / "x", model=ModelConfig(name=FrozenNet), optim=optim),
             sim(2))
    torch.manual_seed(3)  # the run's seed: its initial model
    before = FrozenNet((1, 16, 16), 10).state_dict()
    after = torch.load(tmp_path / "x" / "model.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in ("body.weight", "body.bias", "count"))
    assert not torch.equal(before["head.weight"], after["head.weight"])


@pytest.mark.parametrize("slowdown", ["2:3", "2:+40ms", "2:2+20ms"])
def test_ssgd_time_is_the_slowest_worker_plus_the_allreduce(tmp_path, slowdown):
    """Worker 2's 0.02 s steps take 0.06 s: three times as long, 40 ms longer (a fixed
    delay, added to the simulated step as a real straggler sleeps it), or both."""
    s = sim(4, step_time="constant:0.02", latency=1e-4, bandwidth=1e9)
    summary = simulate(config("ssgd", tmp_path / "x",
                              stragglers=StragglerConfig(slowdown=slowdown)), s)
    params = summary["params"]
    allreduce = Network(1e-4, 1e9).allreduce(4 * params, 4)
    steps = summary["updates"]
    # each step: 3 x 0.02 s (worker 2's), then the allreduce
    assert summary["wall_s"] == pytest.approx(steps * (0.06 + allreduce), rel=1e-9)
    assert 0 <= summary["scoring_s"] < 1e-3  # virtual: the scoring's collectives only
    assert summary["straggler_sleep_s_per_worker"][2] == pytest.approx(steps * 0.04)


def test_async_workers_clip_the_gradient_they_push(tmp_path):
    def run(name: str, clip: float | None):
        c = config("dcasgd-a", tmp_path / name,
                   optim=OptimConfig(epochs=1, batch_size=32, clip_grad_norm=clip))
        summary = simulate(c, sim(4, step_time="constant:0.01"))
        return summary, torch.load(tmp_path / name / "model.pt", weights_only=True)

    (plain, a), (loose, b), (tight, c) = run("a", None), run("b", 1e6), run("c", 0.05)
    assert plain["clipped_steps_per_worker"] == loose["clipped_steps_per_worker"] == [0] * 4
    assert all(torch.equal(a[k], b[k]) for k in a)  # a bound never reached changes nothing
    assert min(tight["clipped_steps_per_worker"]) > 0 and tight["clip_grad_norm"] == 0.05
    assert sum(tight["clipped_steps_per_worker"]) <= tight["updates"]
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the pushes were the clipped ones


def test_staleness_of_lockstep_workers_is_m_minus_1(tmp_path):
    # No store time at all: with any, the pushes overlap on rotated shards and end
    # nanoseconds apart (shards differ by 16 floats), which reorders the next round's.
    summary = simulate(config("asgd", tmp_path / "a"),
                       sim(8, step_time="constant:0.01", latency=0.0, store_latency=0.0,
                           store_bandwidth=1e30))
    st = summary["staleness"]
    assert st["max"] == 7 and st["p50"] == 7
    assert summary["pushes_per_worker"] == [summary["updates"] // 8] * 8


def test_the_bar_ends_at_every_workers_updates(tmp_path, monkeypatch):
    """Worker 0's last step saw the count before the others' last pushes: its bar ended at
    57 of 64 updates (8 workers) though all 64 were made."""
    with (tmp_path / "log").open("w", encoding="utf-8") as log:
        monkeypatch.setattr("sys.stderr", log)
        summary = simulate(replace(config("dcasgd-a", tmp_path / "a"), progress=True), sim(8))
    bars = [line for line in (tmp_path / "log").read_text(encoding="utf-8").splitlines()
            if line.startswith("dcasgd-a:")]
    n = summary["updates"]
    assert bars[-1].startswith("dcasgd-a: 100%|") and f" {n}/{n} " in bars[-1], bars


def test_ssp_bound_holds_and_waits_in_virtual_time(tmp_path):
    c = config("ssp", tmp_path / "s", stragglers=StragglerConfig(slowdown="0:4"),
               algorithm=algorithm_options("ssp")(max_staleness=1))
    summary = simulate(c, sim(4, step_time="constant:0.01"))
    assert summary["ssp_max_gap"] <= 1
    assert summary["staleness"]["max"] <= (2 * 1 + 1) * (4 - 1)  # async_/ssp.py's bound
    assert sum(summary["ssp_waits_per_worker"]) > 0
    assert max(summary["ssp_wait_s_per_worker"]) > 0.01  # virtual seconds, waiting for worker 0


def test_ssp_workers_read_the_store_after_the_bound(tmp_path):
    """SSP's read guarantee (Ho et al. 2013): a worker with clock c computes its gradient at a
    model holding every running worker's first c - S pushes. With S = 0 the workers take
    turns in rounds and a worker reads after the others' pushes of its round, so a push lacks
    at most one push of each other worker: M - 1. A worker that went on computing at the
    model of its own last push lacked up to 2 (M - 1) = 6 (also where it pulled only after
    a wait that slept)."""
    c = config("ssp", tmp_path / "s", algorithm=algorithm_options("ssp")(max_staleness=0))
    summary = simulate(c, sim(4, step_time="lognormal:0.01:0.5"))
    assert summary["ssp_max_gap"] == 0
    assert summary["staleness"]["max"] == 4 - 1


@pytest.mark.parametrize("algo", ["asgd", "ssp"])
def test_async_workers_stop_on_collapse(tmp_path, algo):
    # rank 0's stop signal reaches the others through the local communicator's Dup and
    # Ibcast (an AttributeError before they had them)
    c = config(algo, tmp_path / algo, stop_on_collapse=True, max_bad_steps=1000,
               optim=OptimConfig(epochs=2, batch_size=64, lr=20.0))
    summary = simulate(c, sim(4))
    assert summary["stopped_on_collapse"] is True and summary["collapsed_at"] is not None
    assert summary["updates"] < 2 * 32 and sum(summary["pushes_per_worker"]) == \
        summary["updates"]


def test_a_simulated_run_repeats_from_its_config_json(tmp_path, capsys):
    """config.json kept none of the simulator's options: --config repeated a 3-worker run of
    lognormal step times on 4 workers of constant ones, with no word."""
    from hpctrain import cli

    cli.main(["simulate", "--algo", "asgd", *SYNTHETIC, "--epochs", "1", "--workers", "3",
              "--step-time", "lognormal:0.01:0.5", "--out", str(tmp_path / "a")])
    cli.main(["simulate", "--config", str(tmp_path / "a" / "config.json"), "--out",
              str(tmp_path / "b")])
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab")
    assert a["simulation"]["workers"] == 3 and a["simulation"]["step_time"].startswith("lognormal")
    assert {**a, "out": None} == {**b, "out": None}
    cli.main(["simulate", "--config", str(tmp_path / "a" / "config.json"), "--workers", "2",
              "--out", str(tmp_path / "c")])  # an option given wins over the file
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["workers"] == 2


def test_a_checkpointed_runs_config_is_simulated_without_its_checkpoints(tmp_path, capsys):
    """simulate refuses checkpoints, --eval-rank and --profile, so a real run's config.json
    with them was refused, with no way to turn them off: the file's are left out (said),
    typed ones still refused, and train's --checkpoint-every off turns the file's off."""
    from hpctrain import arguments, cli

    config = tmp_path / "config.toml"
    config.write_text('algo = "ssgd"\neval_mode = "online"\neval_rank = 2\nprofile = "2:3"\n'
                      '[checkpoint]\nevery = "0.5e"\n')
    cli.main(["simulate", "--config", str(config), *SYNTHETIC, "--epochs", "1", "--workers",
              "2", "--out", str(tmp_path / "sim")])
    assert f"leaving out {config}'s checkpoint settings and --eval-rank and --profile (a " \
           "real run's only)" in capsys.readouterr().err
    with pytest.raises(UsageError, match="drop --eval-rank 1"):
        cli.main(["simulate", "--config", str(config), *SYNTHETIC, "--eval-rank", "1",
                  "--out", str(tmp_path / "sim3")])
    assert not (tmp_path / "sim" / "checkpoints").exists()
    with pytest.raises(UsageError, match="hpctrain simulate takes no checkpoints"):
        cli.main(["simulate", "--config", str(config), *SYNTHETIC, "--checkpoint-dir",
                  str(tmp_path / "ck"), "--out", str(tmp_path / "sim2")])
    for every, expected in (([], "0.5e"), (["--checkpoint-every", "off"], "off")):
        parsed = cli.build_parser().parse_args(["train", "--config", str(config), *every])
        built = arguments.build(parsed).checkpoint
        assert built.every == expected and built.interval == (expected if expected != "off"
                                                               else None)


def test_a_sharded_runs_config_is_simulated_as_replicated(tmp_path, capsys):
    """Sharded data holds each rank's part, in the same order as replicated data: a real
    sharded run's config.json was refused ("use --data-placement replicated"), unlike its
    other real-run-only settings. Left out now (its chunk size with it), said once; typed,
    still refused."""
    from hpctrain import cli

    config = tmp_path / "config.toml"
    config.write_text('algo = "ma"\n[data]\ndata_placement = "sharded"\nshuffle = "local"\n'
                      'shuffle_chunk_mb = 0.5\n')
    cli.main(["simulate", "--config", str(config), *SYNTHETIC, "--epochs", "1", "--workers",
              "2", "--out", str(tmp_path / "sim")])
    assert f"leaving out {config}'s --data-placement sharded (a real run's only)" in \
        capsys.readouterr().err
    recorded = json.loads((tmp_path / "sim" / "config.json").read_text())["data"]
    assert (recorded["data_placement"], recorded["shuffle"]) == ("replicated", "local")
    with pytest.raises(UsageError, match="use --data-placement replicated"):
        cli.main(["simulate", "--config", str(config), *SYNTHETIC, "--data-placement",
                  "sharded", "--out", str(tmp_path / "typed")])


def test_a_horovod_backend_runs_config_says_the_model_is_an_mpi_runs(tmp_path, capsys):
    """Simulated ssgd adds as the mpi backend does: a real --sync-backend horovod (or torch)
    run's model differs from its simulation by rounding (4.5e-8), which nothing said. The
    file's backend is left out now, said once, and the simulation records mpi."""
    from hpctrain import cli

    config = tmp_path / "config.toml"
    config.write_text('algo = "ssgd"\n[algorithm]\nsync_backend = "horovod"\n')
    cli.main(["simulate", "--config", str(config), *SYNTHETIC, "--epochs", "1", "--workers",
              "2", "--out", str(tmp_path / "sim")])
    err = capsys.readouterr().err
    assert f"hpctrain simulate: leaving out {config}'s --sync-backend horovod: the virtual " \
           "workers add as --sync-backend mpi does, so the final model is an mpi run's bit " \
           "for bit, and a horovod run's to rounding only\n" in err and err.count("\n") == 1
    recorded = json.loads((tmp_path / "sim" / "config.json").read_text())
    assert recorded["algorithm"]["sync_backend"] == "mpi"


def test_simulate_stopped_on_collapse_exits_4_as_train_does(tmp_path, capsys):
    from hpctrain import cli

    with pytest.raises(SystemExit) as stopped:
        cli.main(["simulate", "--algo", "asgd", *SYNTHETIC, "--epochs", "2", "--workers", "4",
                  "--lr", "20", "--stop-on-collapse", "--out", str(tmp_path / "run")])
    assert stopped.value.code == cli.STOPPED_ON_COLLAPSE
    assert "stopped (--stop-on-collapse): training collapsed" in capsys.readouterr().err
    assert (tmp_path / "run" / "summary.json").exists()  # outputs kept


@pytest.mark.parametrize("workers, slowdown", [(2, "1:3"), (3, "1:3")])
def test_ssp_worker_out_of_budget_holds_nobody_back(tmp_path, workers, slowdown):
    # Worker 0 ends S+1 pushes ahead of slow worker 1 (17 to 15 on two workers); worker 1,
    # out of tickets, waited for rank 0's --stop-on-collapse signal before parking while
    # rank 0 waited for worker 1's clock: stuck (a hang in a real run). It parks at once.
    # No store time: worker 0's read after each wait would then put its claims after worker
    # 1's at the same instant, and both would end with 16 pushes.
    def once(name, stop):
        c = config("ssp", tmp_path / name, stop_on_collapse=stop,
                   stragglers=StragglerConfig(slowdown=slowdown),
                   optim=OptimConfig(epochs=1, batch_size=64),
                   algorithm=algorithm_options("ssp")(max_staleness=1))
        return simulate(c, sim(workers, step_time="constant:0.01", store_latency=0.0,
                               store_bandwidth=1e30))

    stopping, plain = once("stop", True), once("plain", False)
    assert stopping["stopped_on_collapse"] is False
    assert max(plain["pushes_per_worker"]) - min(plain["pushes_per_worker"]) >= 2
    waits = "ssp_wait_s_per_worker"  # the signal's Dup shifts every clock: float rounding
    assert stopping[waits] == pytest.approx(plain[waits])
    assert {**stopping, "out": None, waits: None} == {**plain, "out": None, waits: None}


def test_ma_and_ec_run_the_real_aggregators(tmp_path):
    ma = simulate(config("ma", tmp_path / "ma", algorithm=algorithm_options("ma")(tau=4)),
                  sim(4))
    ec = simulate(config("ec", tmp_path / "ec", algorithm=algorithm_options("ec")(
        tau=4, ec_distill_size=16)), sim(4))
    assert ma["aggregation"]["rounds"] == ma["updates"] // 4
    assert ma["final_averaged_acc"] == ma["final_member_acc"]  # averaged after the last step
    assert ec["aggregation"]["rounds"] >= 2 and ec["distilled_samples_per_rank"] > 0
    assert ec["aggregation"]["inference_s"] > 0  # modelled, virtual
    shared = simulate(config("ec", tmp_path / "ec-all", algorithm=algorithm_options("ec")(
        tau=4, ec_distill_size=16, ec_distill_from="all")), sim(4))
    # The same rounds and relabelled samples; sample ids go to 3 workers as before, and the
    # probabilities of all 64 samples come back to every worker (a ring allreduce's bytes).
    assert shared["distilled_samples_per_rank"] == ec["distilled_samples_per_rank"]
    assert ec["aggregation"]["bytes_per_round"] == 16 * 8 * 3 + 48 * 10 * 4
    assert shared["aggregation"]["bytes_per_round"] == 16 * 8 * 3 + 2 * 3 * 64 * 10 * 4 // 4


def test_ec_counts_no_relabelled_samples_of_a_dropped_step(tmp_path, monkeypatch):
    """A step the NaN guard drops trains on nothing, its slice of the round's relabelled
    samples included (the next step takes the next slice): it was counted in
    distilled_samples_per_rank all the same."""
    ec = algorithm_options("ec")(tau=8, ec_distill_size=40)  # slices of 5 over 8 steps
    plain = simulate(config("ec", tmp_path / "plain", algorithm=ec), sim(2))
    monkeypatch.setenv("HPCTRAIN_INJECT", "nan@0:10")  # rank 0, within the first round's slices
    dropped = simulate(config("ec", tmp_path / "nan", algorithm=ec), sim(2))
    assert dropped["skipped_steps"] == 1
    assert dropped["distilled_samples_per_rank"] == plain["distilled_samples_per_rank"] - 5


def test_replaying_an_ec_run_charges_its_inference_rate(tmp_path):
    """EC's inference cost a third of a step's time per sample of its batch: at batch 16
    the MLP's simulated inference was 11x the real run's, which runs the model in batches of
    256. Replaying an ec run that counted its inferred samples, the simulation charges that
    run's rate (aggregation.inference_s over inferred_samples); else the step-time model."""
    from hpctrain.ec.stats import AggregationStats

    ec = algorithm_options("ec")(tau=4, ec_distill_size=16)
    run = tmp_path / "run"
    first = simulate(config("ec", run, algorithm=ec), sim(2, step_time="constant:0.01"))
    samples = first["aggregation"]["inferred_samples"]
    assert samples == first["aggregation"]["rounds"] * 16 * 2  # 16 per worker, both workers'
    assert first["simulation"]["inference_from"] == "step time"
    assert first["simulation"]["inference_s_per_sample"] == pytest.approx(0.01 / 32 / 3)
    summary = json.loads((run / "summary.json").read_text())
    summary["aggregation"]["inference_s"] = samples * 2e-6  # as a real run measured it
    (run / "summary.json").write_text(json.dumps(summary))
    replayed = simulate(config("ec", tmp_path / "replay", algorithm=ec),
                        sim(2, step_time=f"replay:{run / steptimes.FILE}"))
    assert replayed["simulation"]["inference_from"] == "replayed"
    assert replayed["simulation"]["inference_s_per_sample"] == pytest.approx(2e-6)
    assert replayed["aggregation"]["inference_s"] == pytest.approx(samples * 2e-6)
    (run / "summary.json").unlink()  # none to say: the model
    assert simulate(config("ec", tmp_path / "none", algorithm=ec), sim(
        2, step_time=f"replay:{run}"))["simulation"]["inference_from"] == "step time"
    stats = AggregationStats()  # a checkpoint's statistics from before the count
    stats.load_state_dict({"bytes": [8], "seconds": [0.5], "parts": {}})
    assert stats.inferred is None and "inferred_samples" not in stats.summary()


def test_ec_default_distill_size_is_capped_at_a_workers_samples(tmp_path):
    """Workers holding fewer samples than the default 512 relabel all of them each round
    instead of being refused; a size given is checked against --train-subset's samples, not
    the whole data set's, before anything runs."""
    ec = algorithm_options("ec")
    summary = simulate(config("ec", tmp_path / "a", algorithm=ec(tau=2)),
                       sim(4, train_subset=400))
    assert summary["distill_size"] == 100  # 400 samples over 4 workers
    assert "distill=100" in summary["algo_label"]
    assert summary["distilled_samples_per_rank"] > 0
    with pytest.raises(UsageError, match="^CompressionOptions.ec_distill_size=101 exceeds the "
                                         "100 training samples each of the 4 ranks holds"):
        simulate(config("ec", tmp_path / "b", algorithm=ec(tau=2, ec_distill_size=101)),
                 sim(4, train_subset=400))
    assert not (tmp_path / "b").exists()


def test_partial_shuffle_of_label_skewed_data_at_128_workers(tmp_path):
    c = config("ma", tmp_path / "x", data=DataConfig(dataset="synthetic", shuffle="partial:0.1",
                                                    partition="label-skew"),
               optim=OptimConfig(epochs=2, batch_size=8), eval_every=2.0,
               algorithm=algorithm_options("ma")(tau=2))
    summary = simulate(c, sim(128))
    assert summary["workers"] == 128 and summary["samples_per_worker"] == [32] * 128


def test_bad_input_is_one_line_before_anything_runs(tmp_path):
    with pytest.raises(UsageError, match="replicated"):
        simulate(config("ma", tmp_path / "a", data=DataConfig(dataset="synthetic",
                                                              data_placement="sharded")), sim(2))
    with pytest.raises(UsageError, match="unknown model 'weibull'"):
        simulate(config("asgd", tmp_path / "b"), sim(2, step_time="weibull:1"))
    with pytest.raises(UsageError, match="^RunConfig.algo='sgd' runs on one process, not "
                                         "SimConfig.workers=2"):  # from Python: the fields
        simulate(config("sgd", tmp_path / "c"), sim(2))
    with pytest.raises(UsageError, match="checkpoints"):
        from hpctrain.config import CheckpointConfig
        simulate(config("ma", tmp_path / "d", checkpoint=CheckpointConfig(every="1e")), sim(2))
    with pytest.raises(UsageError, match="^SynchronousOptions.reduce_op='adasum' needs a "
                                         "power-of-2 number of workers, got 3"):
        simulate(config("ssgd", tmp_path / "f", algorithm=algorithm_options("ssgd")(
            reduce_op="adasum")), sim(3))
    recorded = tmp_path / steptimes.FILE
    recorded.write_text(json.dumps({"format": steptimes.FORMAT, "workers": [[0.1]],
                                    "rest": [[0.2]]}))
    ssgd_torch = algorithm_options("ssgd")(sync_backend="torch")  # no MPI, still collectives
    for algo, given in (("ssp", None), ("ma", None), ("ssgd", ssgd_torch)):
        with pytest.raises(UsageError, match=f"not RunConfig.algo='{algo}': use "
                                             "SimConfig.comm_time='model'$"):  # from Python
            simulate(config(algo, tmp_path / "e", algorithm=given),
                     sim(2, step_time=f"replay:{recorded}", comm_time="replay"))
    (tmp_path / "config.json").write_text(json.dumps({"algo": "ssgd"}))  # who recorded them
    with pytest.raises(UsageError, match="is an --algo ssgd run, whose rests are not pushes"):
        simulate(config("asgd", tmp_path / "e"),
                 sim(2, step_time=f"replay:{recorded}", comm_time="replay"))
    # Named as typed on the command line; from Python (it said the flags too) the fields.
    for typed, said in ((True, "^--train-subset 2049 is more than"),
                        (False, "^SimConfig.train_subset=2049 is more than")):
        with pytest.raises(UsageError, match=f"{said} the 2048 training samples in "
                                             "synthetic$"), \
                options.command_line() if typed else contextlib.nullcontext():
            simulate(config("ssgd", tmp_path / "g"), sim(2, train_subset=2049))  # trained 2048
    # The subset is what is too small, not synthetic's 2048 samples (the line named those).
    for typed, said in ((True, r"^--workers 64 but only 10 training samples "
                               r"\(--train-subset 10\)$"),
                        (False, r"^SimConfig.workers=64 but only 10 training samples "
                                r"\(SimConfig.train_subset=10\)$")):
        with pytest.raises(UsageError, match=said), \
                options.command_line() if typed else contextlib.nullcontext():
            simulate(config("asgd", tmp_path / "g"), sim(64, train_subset=10))
    assert not any((tmp_path / d).exists() for d in "abcdefg")


def test_what_train_refuses_before_mpi_the_simulator_refuses_too(tmp_path, monkeypatch):
    """An optimizer the algorithm does not take was a TypeError, an --out that is a file a
    FileExistsError (both exit 1); a run into a folder another run holds went on, and the
    two runs' files mixed. More store hosts than parameters left the folder it made."""
    from hpctrain.config import OptimConfig

    with pytest.raises(UsageError, match="^OptimConfig.optimizer='adam': the algorithm asgd "
                       "keeps its own"):
        simulate(config("asgd", tmp_path / "a", optim=OptimConfig(optimizer="adam")), sim(2))
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is a file, not a folder$"):
        simulate(config("asgd", tmp_path / "file" / "run"), sim(2))
    held = tmp_path / "held"
    held.mkdir()
    with open(held / run_folders.LOCK, "a") as other:  # another run's, going on
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UsageError, match="is in use by another run going on now"):
            simulate(config("asgd", held), sim(2))
    assert sorted(p.name for p in held.iterdir()) == [run_folders.LOCK]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="more hosts of the store"):
        simulate(config("asgd", None, algorithm=algorithm_options("asgd")(servers=10**20)),
                 sim(2))
    assert not any((tmp_path / "runs").iterdir())  # the folder made for it is gone
    for fault in ("hang@1:3", "kill@1:3"):  # the simulation hung for ever, or was killed
        monkeypatch.setenv("HPCTRAIN_INJECT", fault)
        with pytest.raises(UsageError, match=f"^HPCTRAIN_INJECT {fault}: hpctrain simulate "
                                             "runs its workers in one process"):
            simulate(config("ma", tmp_path / "f"), sim(2))
    assert not (tmp_path / "f").exists()


def test_the_train_subset_is_what_the_sample_checks_see(tmp_path, capsys):
    """--train-subset 66 on 2 workers, batch 32: a last batch of one sample, which a batch-norm
    model cannot train on; the check counted the whole set's samples, and the run crashed
    mid-way (exit 1, a folder holding only config.json). The batch-size warning likewise."""
    from test_micro_batches import BATCH_NORM_MLP

    (tmp_path / "bn.py").write_text(BATCH_NORM_MLP)
    model = ModelConfig(name=f"{tmp_path}/bn.py:build")
    with pytest.raises(UsageError, match="cannot train on one sample"):
        simulate(config("ma", tmp_path / "a", model=model), sim(2, train_subset=66))
    assert not (tmp_path / "a").exists()
    simulate(config("ma", tmp_path / "b", optim=OptimConfig(epochs=1, batch_size=64)),
             sim(2, train_subset=40))
    assert ("OptimConfig.batch_size=64: each worker has 20 training samples"  # from Python
            in capsys.readouterr().err)


def test_an_out_of_a_compare_or_of_checkpoints_is_refused(tmp_path):
    """simulate wrote its run among a bench compare's files, or among a run's checkpoints."""
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "compare.json").write_text("{}")
    with pytest.raises(UsageError, match="holds a bench compare"):
        simulate(config("ma", tmp_path / "cmp"), sim(2))
    ckpts = tmp_path / "unfinished" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "ckpt-00000004.pt").write_bytes(b"")
    for out, said in ((ckpts.parent, "holds the checkpoints of an unfinished run"),
                      (ckpts, "is a folder of checkpoints")):
        with pytest.raises(UsageError, match=said):
            simulate(config("ma", out), sim(2))
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt-00000004.pt"]


def test_simulates_folder_refusals_name_the_fields_given_from_python(tmp_path):
    """From Python, simulate's checks of its folder and of the checkpoint options said the
    command line's flags (--out, --resume, --checkpoint-dir) to a caller who typed none;
    the command line's words are unchanged."""
    from hpctrain import cli
    from hpctrain.config import CheckpointConfig

    for given, named in ((CheckpointConfig(every="1e"), "CheckpointConfig.every='1e'"),
                         (CheckpointConfig(dir="ck/", resume="ck"),
                          "CheckpointConfig.dir='ck/', CheckpointConfig.resume='ck'")):
        with pytest.raises(UsageError) as e:
            simulate(config("ma", tmp_path / "a", checkpoint=given), sim(2))
        assert str(e.value) == (f"hpctrain simulate takes no checkpoints ({named}): a "
                                "simulation is rerun, not resumed")
    with pytest.raises(UsageError) as e:
        cli.main(["simulate", "--algo", "ma", *SYNTHETIC, "--checkpoint-every", "1e", "--out",
                  str(tmp_path / "a")])
    assert str(e.value) == ("hpctrain simulate takes no checkpoints (--checkpoint-every, "
                            "--checkpoint-dir, --resume): a simulation is rerun, not resumed")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    checkpoint.save(run / "checkpoints", 5, {"x": 1}, {"algo": "ma", "ranks": 2,
                                                       "workers": 2, "args": {}})
    with pytest.raises(UsageError) as e:
        simulate(config("ma", run), sim(2))
    assert str(e.value) == (f"RunConfig.out={str(run)!r} holds the checkpoints of an "
                            "unfinished run; continue it with "
                            f"CheckpointConfig.resume={str(run)!r} or choose another folder")
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError) as e:
        simulate(config("ma", tmp_path / "file" / "sim"), sim(2))
    assert str(e.value) == (f"RunConfig.out={str(tmp_path / 'file' / 'sim')!r}: "
                            f"{tmp_path / 'file'} is a file, not a folder")
    for out, said in ((run, f"--out {run} holds the checkpoints of an unfinished run; "
                            f"continue it with --resume {run} or choose another folder"),
                      (tmp_path / "file" / "sim", f"--out {tmp_path / 'file' / 'sim'}: "
                                                  f"{tmp_path / 'file'} is a file, not a folder")):
        with pytest.raises(UsageError) as e:
            cli.main(["simulate", "--algo", "ma", *SYNTHETIC, "--out", str(out)])
        assert str(e.value) == said


def test_simulate_launched_as_several_processes_is_refused(tmp_path, monkeypatch):
    """mpirun -np 2 hpctrain simulate: without --out rank 1 failed after simulating
    (TypeError), with it both simulated into one folder, rank 1 without its lock."""
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    with pytest.raises(UsageError) as refused:
        simulate(config("asgd", tmp_path / "run"), sim(2))
    assert str(refused.value) == (
        "hpctrain simulate runs in one process, not 2 (Open MPI (OMPI_COMM_WORLD_SIZE=2, "
        "OMPI_COMM_WORLD_RANK=1)): run it without mpirun, srun or torchrun (--workers K gives "
        "it K virtual workers)")
    assert not (tmp_path / "run").exists()


def test_a_step_is_never_shorter_than_drawn_nor_zero(tmp_path):
    """--jitter made half of the simulated steps faster, which a real straggler never does;
    a gamma of tiny shape draws 0.0, and a run of zero virtual time ended in a division by
    zero after writing its model."""
    summary = simulate(config("sgd", tmp_path / "zero"), sim(1, step_time="gamma:0.01:1e-6"))
    assert 0 < summary["wall_s"] and math.isfinite(summary["samples_per_s"])
    jittered = simulate(config("asgd", tmp_path / "j", stragglers=StragglerConfig(jitter=1.0)),
                        sim(2))
    times = json.loads((tmp_path / "j" / steptimes.FILE).read_text())["workers"]
    assert min(t for w in times for t in w) >= 0.01  # constant:0.01, padded only upwards
    assert jittered["straggler_sleep_s_per_worker"][0] > 0


def test_step_time_models_are_seeded_and_have_their_mean(tmp_path, monkeypatch):
    for spec in ("lognormal:0.02:0.5", "gamma:0.02:4"):
        m = StepTimeModel(spec, 2, seed=1)
        draws = [m.next(0) for _ in range(4000)]
        assert sum(draws) / len(draws) == pytest.approx(0.02, rel=0.05)
        again = StepTimeModel(spec, 2, seed=1)
        assert [again.next(0) for _ in range(5)] == draws[:5]
        assert [again.next(1) for _ in range(5)] != draws[:5]
    path = tmp_path / steptimes.FILE
    path.write_text(json.dumps({"format": steptimes.FORMAT, "workers": [[1.0, 2.0], [3.0]]}))
    m = StepTimeModel(f"replay:{tmp_path}", 3)
    assert [m.next(0) for _ in range(3)] == [1.0, 2.0, 1.0]
    assert [m.next(1), m.next(2)] == [3.0, 1.0]
    with pytest.raises(UsageError, match="no recorded rests"):
        m.rest(0)
    with pytest.raises(UsageError, match="recorded its rests"):
        sim(3, step_time=f"replay:{tmp_path}", comm_time="replay")
    with pytest.raises(UsageError) as e:  # from Python it said the flags: the fields
        sim(3, comm_time="replay")
    assert str(e.value) == ("SimConfig.comm_time='replay' needs SimConfig.step_time='replay:RUN' "
                            "of a run that recorded its rests (step_times.json with \"rest\"); "
                            "got SimConfig.step_time='constant:0.01'")
    with pytest.raises(UsageError) as e, options.command_line():
        sim(3, comm_time="replay")
    assert str(e.value) == ("--comm-time replay needs --step-time replay:RUN of a run that "
                            "recorded its rests (step_times.json with \"rest\"); got "
                            "--step-time constant:0.01")
    monkeypatch.chdir(tmp_path.parent)  # a relative RUN: config.json keeps it absolute
    assert sim(3, step_time=f"replay:{tmp_path.name}").step_time == f"replay:{tmp_path}"
    monkeypatch.setenv("HOME", str(tmp_path.parent))  # ~ as in every path option (a ./~ before)
    assert sim(3, step_time=f"replay:~/{tmp_path.name}").step_time == f"replay:{tmp_path}"
    nobody = "~hpctrain-no-such-user"  # from Python it said --step-time: the field
    with pytest.raises(UsageError) as e:
        sim(3, step_time=f"replay:{nobody}/run")
    assert str(e.value) == f"SimConfig.step_time: no home folder for {nobody}"
    with pytest.raises(UsageError) as e, options.command_line():
        sim(3, step_time=f"replay:{nobody}/run")
    assert str(e.value) == f"--step-time {nobody}/run: no home folder for {nobody}"
    with pytest.raises(UsageError, match=re.escape("SIGMA must be in [0, 5], got 1e308")):
        StepTimeModel("lognormal:0.02:1e308", 2)  # exp(SIGMA z) overflows


def test_timing_seed_seeds_the_step_times_and_jitter_alone(tmp_path):
    """--seed seeded both the model and the step-time and jitter draws, so a seed study
    changed the staleness pattern with the model; --timing-seed seeds the draws alone
    (default: --seed, bit for bit as before)."""
    def run(name: str, seed: int, timing_seed: int | None = None):
        c = config("asgd", tmp_path / name, seed=seed, stragglers=StragglerConfig(jitter=0.3))
        summary = simulate(c, sim(3, step_time="lognormal:0.01:0.5", timing_seed=timing_seed))
        recorded = json.loads((tmp_path / name / "config.json").read_text())["sim"]
        return (summary, steptimes.read(tmp_path / name).compute,
                (tmp_path / name / "model.pt").read_bytes(), recorded["timing_seed"])

    default, given = run("default", 1), run("given", 1, timing_seed=1)
    assert json.dumps({**default[0], "out": None}, sort_keys=True) == \
        json.dumps({**given[0], "out": None}, sort_keys=True)
    assert default[1:3] == given[1:3]
    assert (default[3], given[3]) == (None, 1)  # as given: None follows --seed on a repeat
    assert default[0]["simulation"]["timing_seed"] == 1  # the one in effect
    held = run("held", 2, timing_seed=1)  # another model seed, the same timing
    assert held[1] == default[1] and held[2] != default[2]
    varied = run("varied", 1, timing_seed=2)  # the same model seed, another timing
    assert varied[1] != default[1]
    from hpctrain import cli
    from hpctrain.sim import arguments as sim_arguments

    parsed = cli.build_parser().parse_args(["simulate", "--algo", "asgd", "--timing-seed", "5"])
    assert sim_arguments.build(parsed).timing_seed == 5


@pytest.mark.parametrize("spec, message", [
    # Virtual times of inf, or NaN, in summary.json before (exit 0).
    ("constant:1e308", "S must be in (0, 1e+06], got 1e308"),
    ("lognormal:1e308:1", "MEAN must be in (0, 1e+06], got 1e308"),  # an OverflowError, exit 1
    ("gamma:1e308:1", "MEAN must be in (0, 1e+06], got 1e308"),
    ("gamma:0.01:1e308", "SHAPE must be in [1e-06, 1e+06], got 1e308"),  # gammavariate hung
    ("gamma:0.01:5e-324", "SHAPE must be in [1e-06, 1e+06], got 5e-324"),  # MEAN/SHAPE is inf
    ("constant:nan", "S must be in (0, 1e+06], got nan"),
    ("constant:-1", "S must be in (0, 1e+06], got -1"),
])
def test_step_times_that_overflow_or_hang_are_refused(spec, message):
    """Named as typed on the command line; from Python (it said --step-time there too) by
    the field given."""
    with pytest.raises(UsageError) as e, options.command_line():
        StepTimeModel(spec, 2)
    assert str(e.value) == f"--step-time {spec}: {message}"
    with pytest.raises(UsageError) as e:
        sim(2, step_time=spec)
    assert str(e.value) == f"SimConfig.step_time={spec!r}: {message}"


@pytest.mark.parametrize("argv, message", [
    # NaN virtual times in summary.json before (exit 0).
    (["--latency", "1e308"], "--latency 1e+308 must be in [0, 1e+06]"),
    (["--store-latency", "1e308"], "--store-latency 1e+308 must be in [0, 1e+06]"),
    (["--latency", "nan"], "argument --latency: 'nan' is not a finite number"),
    (["--latency", "-1"], "argument --latency: must be >= 0, got -1"),
    # 1e307 virtual seconds before, a step from inf.
    (["--store-bandwidth", "1e-300"], "argument --store-bandwidth: must be >= 1, got 1e-300"),
    (["--bandwidth", "0"], "argument --bandwidth: must be >= 1, got 0"),
    # 309 digits in the message before.
    (["--workers", "1e308"], "--workers 1e+308 must be in [1, 1e+06]"),
    (["--timing-seed", "2.5"], "argument --timing-seed: '2.5' is not a whole number"),
])
def test_simulator_options_that_overflow_are_one_line(argv, message):
    from hpctrain import cli
    from hpctrain.sim import arguments as sim_arguments

    with pytest.raises(UsageError) as e:
        sim_arguments.build(cli.build_parser().parse_args(["simulate", "--algo", "asgd", *argv]))
    assert str(e.value) == message


def test_online_scoring_is_outside_the_virtual_clock(tmp_path):
    """The summary said eval_in_clock (as a real run's rank 0 scoring between its steps),
    and the report then said the wall times held the scoring."""
    summary = simulate(config("ssgd", tmp_path / "a", eval_mode="online"), sim(2))
    assert summary["eval_mode"] == "online" and summary["eval_in_clock"] is False


def test_train_options_the_simulator_has_no_worker_for_are_refused(tmp_path):
    """--eval-rank was an AttributeError after training started (exit 1); --checkpoint-dir
    was taken and no checkpoint written. From Python the fields given are named (it said
    --eval-rank and --profile there too, to a caller who typed no flag); the command line's
    words: tests/test_option_checks.py."""
    from hpctrain.config import CheckpointConfig

    with pytest.raises(UsageError) as e:
        simulate(config("ssgd", tmp_path / "a", eval_mode="online", eval_rank=1), sim(2))
    assert str(e.value) == ("hpctrain simulate scores snapshots on worker 0 "
                            "(RunConfig.eval_mode='online'): drop RunConfig.eval_rank=1, which "
                            "needs a real run's extra rank")
    with pytest.raises(UsageError) as e:
        simulate(config("ssgd", tmp_path / "a", profile="20:5"), sim(2))
    assert str(e.value) == ("hpctrain simulate runs every worker in one process, which one "
                            "profiler cannot tell apart: drop RunConfig.profile='20:5' (profile "
                            "a real run)")
    with pytest.raises(UsageError) as e:
        simulate(config("ssgd", tmp_path / "a",
                        data=DataConfig(dataset="synthetic", data_placement="sharded")), sim(2))
    assert str(e.value) == ("hpctrain simulate holds one copy of the data for all virtual "
                            "workers: use DataConfig.data_placement='replicated' (the samples "
                            "each worker sees are those of the same DataConfig.shuffle and "
                            "DataConfig.partition)")  # typed: test_a_sharded_runs_config_...
    with pytest.raises(UsageError, match=re.escape(  # from Python: the field given
            f"(CheckpointConfig.dir={str(tmp_path / 'ck')!r})")):
        simulate(config("ssgd", tmp_path / "b",
                        checkpoint=CheckpointConfig(dir=str(tmp_path / "ck"))), sim(2))
    assert not any((tmp_path / d).exists() for d in ("a", "b", "ck"))


def test_more_virtual_servers_than_parameters_name_the_servers(tmp_path):
    """The store's default shards (one per host) came from --servers 1e20: the message named
    "shards=100000000000000000000", an option not given."""
    many = algorithm_options("asgd")(servers=10**20)
    with pytest.raises(UsageError, match=r"^--servers 1e\+20: more hosts of the store than "
                                         r"the model's \d+ parameters"):
        simulate(config("asgd", tmp_path / "a", algorithm=many), sim(2))


BEYOND_FLOAT = "1" + "0" * 400  # a JSON whole number that no float holds


@pytest.mark.parametrize("content, message", [
    ("{bad", "cannot read a step_times.json"),
    ("[1, 2]", "is not a step_times.json (hpctrain-step-times/1): it holds a JSON list"),
    ('{"format": "hpctrain-step-times/1"}', "it has no 'workers'"),
    ('{"format": "other/1", "workers": [[1]]}', "its format is 'other/1'"),
    ('{"format": "hpctrain-step-times/1", "workers": [["slow"]]}', "finite step time >= 0"),
    ('{"format": "hpctrain-step-times/1", "workers": 3}', "finite step time >= 0"),
    ('{"format": "hpctrain-step-times/1", "workers": [[Infinity]]}', "finite step time >= 0"),
    ('{"format": "hpctrain-step-times/1", "workers": [[1e308, 0.1]]}', "each at most 1e+06 s"),
    ('{"format": "hpctrain-step-times/1", "workers": [[0.1]], "rest": [[1e308]]}',
     "each at most 1e+06 s"),
    # A whole number past a float's range raised OverflowError (a traceback); a string's
    # characters were read as numbers ("12": two workers of 1 s and 2 s), a boolean as 1.
    ('{"format": "hpctrain-step-times/1", "workers": [[' + BEYOND_FLOAT + ']]}',
     "at most 1e+06 s"),
    ('{"format": "hpctrain-step-times/1", "workers": [[0.1]], "rest": [[' + BEYOND_FLOAT
     + ']]}', "at most 1e+06 s"),
    ('{"format": "hpctrain-step-times/1", "workers": [[0.1]], "rest": [[0.1]], "lead_in": ['
     + BEYOND_FLOAT + ']}', "need one lead_in for every worker"),
    ('{"format": "hpctrain-step-times/1", "workers": "12"}', "finite step time >= 0"),
    ('{"format": "hpctrain-step-times/1", "workers": [["0.5"]]}', "finite step time >= 0"),
    ('{"format": "hpctrain-step-times/1", "workers": [[true]]}', "finite step time >= 0"),
])
def test_a_step_times_file_that_is_not_one_is_named(content, message, tmp_path):
    (tmp_path / steptimes.FILE).write_text(content)
    with pytest.raises(UsageError, match=re.escape(message)):
        StepTimeModel(f"replay:{tmp_path}", 2)


def test_adasum_steps_whose_combined_update_is_not_finite_are_skipped(tmp_path):
    """Finite gradients at lr 1e6 step each worker's float32 parameters to Inf: the combined
    update is NaN. Every such step is skipped on every worker (no gradient was bad) and the
    model stays finite; it was NaN from the first step before the guard heard of it."""
    (tmp_path / "nets.py").write_text(LOUD_MODEL)
    c = config("ssgd", tmp_path / "a", algorithm=algorithm_options("ssgd")(reduce_op="adasum"),
               model=ModelConfig(name=f"{tmp_path / 'nets.py'}:build"), max_bad_steps=1000,
               optim=OptimConfig(epochs=1, batch_size=32, lr=1e6))
    summary = simulate(c, sim(2))
    assert summary["skipped_steps"] == summary["updates"] == 32
    assert summary["bad_gradients_per_worker"] == [0, 0]
    state = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    assert all(bool(torch.isfinite(v).all()) for v in state.values())
    c = config("ssgd", tmp_path / "b", algorithm=algorithm_options("ssgd")(reduce_op="adasum"),
               model=ModelConfig(name=f"{tmp_path / 'nets.py'}:build"), max_bad_steps=3,
               optim=OptimConfig(epochs=1, batch_size=32, lr=1e6))
    stop = (r"3 consecutive steps \(local steps 0-2\) had NaN/Inf gradients \(per worker: "
            r"\[0, 0\]\) or combined Adasum updates; stopping \(--max-bad-steps 3\)")
    with pytest.raises(TooManyBadSteps, match=stop):
        simulate(c, sim(2))


def test_a_worker_that_made_no_step_is_left_out_of_a_replay(tmp_path):
    # an async worker whose batch exceeded its data never got a ticket: its list is empty
    (tmp_path / steptimes.FILE).write_text(json.dumps({
        "format": steptimes.FORMAT, "workers": [[], [0.5, 0.25]], "rest": [[], [0.1, 0.2]]}))
    assert steptimes.read(tmp_path) == ([[0.5, 0.25]], [[0.1, 0.2]], None)
    m = StepTimeModel(f"replay:{tmp_path}", 2)
    assert [m.next(0), m.next(1), m.next(0)] == [0.5, 0.5, 0.25] and m.rest(0) == 0.2
    (tmp_path / steptimes.FILE).write_text(json.dumps({
        "format": steptimes.FORMAT, "workers": [[], []]}))
    with pytest.raises(UsageError, match="no worker recorded a step"):
        StepTimeModel(f"replay:{tmp_path}", 2)


def test_step_times_record_each_steps_compute_and_rest(tmp_path):
    times = steptimes.StepTimes()
    times.start(-0.25)  # the loop starts: its lead-in to the first step
    for begin, end in ((0.0, 1.0), (1.5, 2.0), (4.0, 4.25)):
        times.begin(begin)
        times.end(end)
    times.finish(5.0)
    assert (times.seconds, times.rest, times.lead_in) == ([1.0, 0.5, 0.25], [0.5, 2.0, 0.75],
                                                          0.25)
    times.write(tmp_path, None, 0)
    assert steptimes.read(tmp_path) == ([[1.0, 0.5, 0.25]], [[0.5, 2.0, 0.75]], [0.25])
    m = StepTimeModel(f"replay:{tmp_path}", 2)
    assert [(m.next(1), m.rest(1)) for _ in range(4)] == \
        [(1.0, 0.5), (0.5, 2.0), (0.25, 0.75), (1.0, 0.5)]
    assert m.lead_in(1) == 0.25
    # A file from before lead-ins were recorded: none to replay.
    doc = json.loads((tmp_path / steptimes.FILE).read_text())
    del doc["lead_in"]
    (tmp_path / steptimes.FILE).write_text(json.dumps(doc))
    assert steptimes.read(tmp_path).lead_in is None
    assert StepTimeModel(f"replay:{tmp_path}", 2).lead_in(1) == 0.0


def test_a_long_runs_step_times_keep_each_workers_first_steps(tmp_path, monkeypatch):
    """Every step was kept: a run of 1M steps wrote 26 MB of JSON per worker, all of it
    gathered to rank 0. The first KEPT_STEPS are kept, each with its rest; the file says
    how many steps were made."""
    monkeypatch.setattr(steptimes, "KEPT_STEPS", 2)
    times = steptimes.StepTimes()
    times.start(0.0)
    for k in range(5):
        times.begin(float(k))
        times.end(k + 0.5)
    times.finish(5.0)
    times.write(tmp_path, None, 0)
    assert steptimes.read(tmp_path) == ([[0.5, 0.5]], [[0.5, 0.5]], [0.0])
    assert json.loads((tmp_path / steptimes.FILE).read_text())["steps"] == [5]


def real_ssgd(reduce_op: str, out) -> list[str]:
    return ["train", "--algo", "ssgd", *SYNTHETIC, "--epochs", "1", "--batch-size", "16",
            "--eval-every", "1", "--seed", "3", "--reduce-op", reduce_op, "--out", str(out)]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory) -> dict:
    """The real 2-rank runs the simulator is held against, in one launch: asgd (recording
    its step times) and ssgd with Adasum."""
    # Launched again (up to three times) where the OS starved one rank: its step times do not
    # say when it was descheduled mid-step (a CI run's asgd pushed 55:9 with staleness 1.2,
    # which replaying its cycles gave as 0.61); the replay is held against a run both ranks
    # ran.
    for _ in range(3):
        root = tmp_path_factory.mktemp("real2")
        proc = run_commands([["train", "--algo", "asgd", *SYNTHETIC, "--epochs", "1",
                              "--batch-size", "32", "--eval-every", "1", "--out",
                              str(root / "asgd")],
                             real_ssgd("adasum", root / "adasum")], np=2, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        pushes = json.loads((root / "asgd" / "summary.json").read_text())["pushes_per_worker"]
        if max(pushes) <= 3 * min(pushes):
            break
    return {"asgd": root / "asgd", "adasum": root / "adasum"}


@pytest.mark.timeout(200)
def test_replayed_real_async_run_matches_its_staleness(tmp_path, two_rank_runs):
    """A real 2-rank asgd run records step times; the simulator replays them."""
    real = two_rank_runs["asgd"]
    recorded = steptimes.read(real)
    summary = json.loads((real / "summary.json").read_text())
    assert [len(w) for w in recorded.compute] == summary["pushes_per_worker"]
    assert [len(w) for w in recorded.rest] == summary["pushes_per_worker"]
    for comm_time in ("model", "replay"):
        out = tmp_path / comm_time
        simulated = simulate(config("asgd", out, optim=OptimConfig(epochs=1, batch_size=32),
                                    eval_every=1.0),
                             sim(2, step_time=f"replay:{real}", comm_time=comm_time))
        assert simulated["updates"] == summary["updates"]
        # two workers: staleness is 0 or 1 almost always, in both
        assert abs(simulated["staleness"]["mean"] - summary["staleness"]["mean"]) < 0.5
    # --comm-time replay: each virtual worker's cycle is exactly the recorded one, after the
    # recorded lead-in (from the loop's start to its first step; all workers started at 0 and
    # the staleness early on was not the real run's)
    replayed = steptimes.read(tmp_path / "replay")
    for k in range(2):
        for times, real_times in zip(replayed[:2], recorded[:2], strict=True):
            n = len(real_times[k])
            assert times[k] == [real_times[k][i % n] for i in range(len(times[k]))]
    assert len(recorded.lead_in) == 2 and all(t > 0 for t in recorded.lead_in)
    assert replayed.lead_in == recorded.lead_in
    # the network model's: only the first ticket's store access
    assert steptimes.read(tmp_path / "model").lead_in == [Network().store_latency] * 2


@pytest.mark.timeout(200)
@pytest.mark.parametrize("reduce_op, k", [("average", 4), ("adasum", 2)])
def test_simulated_ssgd_is_the_real_run(tmp_path, two_rank_runs, reduce_op, k):
    """Average: the local allreduce adds in Open MPI's order, so nothing rounds differently
    (bit for bit). Adasum: the simulator combines up the tree in one process, the real run
    halves vectors across ranks; the same up to rounding (the tree itself is checked against
    the real reduction at 4 ranks in test_sync_adasum.py)."""
    if reduce_op == "adasum":
        real = two_rank_runs["adasum"]
    else:
        real = tmp_path / "real"
        proc = run_job(real_ssgd(reduce_op, real), np=k, timeout=150)
        assert proc.returncode == 0, proc.stderr[-3000:]
    simulate(config("ssgd", tmp_path / "sim", optim=OptimConfig(epochs=1, batch_size=16),
                    eval_every=1.0, algorithm=algorithm_options("ssgd")(reduce_op=reduce_op)),
             sim(k))
    real_model, sim_model = (torch.load(p / "model.pt") for p in (real, tmp_path / "sim"))
    if reduce_op == "average":
        assert all(torch.equal(real_model[k], sim_model[k]) for k in real_model)
    else:
        for k in real_model:
            torch.testing.assert_close(sim_model[k], real_model[k], rtol=1e-4, atol=1e-5)


# MLPs of 17k parameters (68 KB) on the synthetic set: with dropout (``dropout``) and without.
SMALL_MODELS = """
import math

from torch import nn


def plain(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 64), nn.ReLU(),
                         nn.Linear(64, num_classes))


def dropout(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 64), nn.ReLU(),
                         nn.Dropout(0.3), nn.Linear(64, num_classes))
"""


def small_models(folder) -> str:
    """The file of :data:`SMALL_MODELS`, written in ``folder``."""
    path = folder / "small_models.py"
    path.write_text(SMALL_MODELS)
    return str(path)


def real_and_simulated(algo: str, model: str, k: int, tmp_path, **options) -> list[dict]:
    """``algo`` on ``k`` real ranks and ``k`` virtual workers alike (seed 3, batch 16, one
    epoch; ``options``: the algorithm's, as ``--tau 4`` is tau=4); the two model.pt states."""
    words = [w for name, v in options.items() for w in (f"--{name.replace('_', '-')}", str(v))]
    real = tmp_path / f"{algo}-real"
    proc = run_job(["train", "--algo", algo, "--dataset", "synthetic", "--model", model,
                    "--no-progress", "--epochs", "1", "--batch-size", "16", "--eval-every", "1",
                    "--seed", "3", *words, "--out", str(real)], np=k, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    simulate(config(algo, tmp_path / f"{algo}-sim", model=ModelConfig(name=model),
                    optim=OptimConfig(epochs=1, batch_size=16), eval_every=1.0,
                    algorithm=algorithm_options(algo)(**options)), sim(k))
    return [torch.load(p / "model.pt", weights_only=True)
            for p in (real, tmp_path / f"{algo}-sim")]


@pytest.mark.timeout(200)
def test_simulated_ma_at_3_workers_is_the_real_run(tmp_path):
    """At 3 ranks Open MPI's blocking Allreduce adds 4-247 KB in an order of its own, and the
    simulated ma of a 68 KB model (LeNet's 247 KB too) rounded otherwise; averaging reduces
    through the non-blocking allreduce now, as ssgd does, whose order the simulator's is."""
    real, simulated = real_and_simulated("ma", f"{small_models(tmp_path)}:plain", 3, tmp_path,
                                         tau=4)
    assert all(torch.equal(real[k], simulated[k]) for k in real)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("algo, options", [("ssgd", {}), ("ma", {"tau": 4})])
def test_a_model_with_dropout_simulates_as_it_trains(tmp_path, algo, options):
    """Each real rank draws its dropout masks from its own generator, seeded with --seed; the
    virtual workers shared one, in event order, and their models differed from the real
    run's (0.045 at most after an epoch). Each now draws from its own stream."""
    real, simulated = real_and_simulated(algo, f"{small_models(tmp_path)}:dropout", 2,
                                         tmp_path, **options)
    assert all(torch.equal(real[k], simulated[k]) for k in real)


def test_each_virtual_worker_draws_from_its_own_stream():
    """Worker k's draws are those of one stream from the state at the start, however the
    workers' turns interleave."""
    torch.manual_seed(7)
    streams = WorkerStreams(3)
    alone = [torch.rand(1).item() for _ in range(4)]  # a worker's draws in a process alone
    scheduler = Scheduler(3)

    def body(k: int) -> list:
        draws = []
        for step in range(4):
            draws.append(torch.rand(1).item())
            scheduler.at(k, step * (k + 1))  # worker 0 steps fastest: turns interleave
        return draws

    assert scheduler.run(body, streams) == [alone] * 3


def test_heap_order_is_time_then_worker():
    q = [(1.0, 3), (1.0, 1), (0.5, 2)]
    heapq.heapify(q)
    assert [heapq.heappop(q) for _ in range(3)] == [(0.5, 2), (1.0, 1), (1.0, 3)]


def test_compare_simulate_plans_simulator_runs(tmp_path):
    from hpctrain import cli
    from hpctrain.bench.compare import planning

    def parse(*argv):
        return cli.build_parser().parse_args(["bench", "compare", *argv, "--out",
                                              str(tmp_path)])

    sgd, ma = planning.plan(parse("--algos", "sgd,ma", "--simulate", "16", "--tau", "5",
                                 "--step-time", "gamma:0.01:2"))
    assert (sgd.np, ma.np) == (1, 16)
    assert ma.command[2:4] == ["hpctrain.cli", "simulate"]
    assert ma.command[ma.command.index("--workers") + 1] == "16"
    assert ma.command[ma.command.index("--step-time") + 1] == "gamma:0.01:2"
    assert sgd.command[sgd.command.index("--workers") + 1] == "1"
    with pytest.raises(UsageError, match="--latency is an option of the simulator"):
        planning.plan(parse("--algos", "ma", "--latency", "1e-5"))
    with pytest.raises(UsageError, match="want constant:S"):
        planning.plan(parse("--algos", "ma", "--simulate", "4", "--step-time", "constant"))
    recorded = tmp_path / "real"
    recorded.mkdir()
    (recorded / steptimes.FILE).write_text(json.dumps(
        {"format": steptimes.FORMAT, "workers": [[0.1]], "rest": [[0.2]]}))
    replay = ("--simulate", "4", "--step-time", f"replay:{recorded}", "--comm-time", "replay")
    assert len(planning.plan(parse("--algos", "sgd,asgd", *replay))) == 2  # sgd: nothing to replay
    with pytest.raises(UsageError, match="not --algo ssgd"):  # up front, not as a failed row
        planning.plan(parse("--algos", "asgd,ssgd", *replay))


def test_a_slow_rank_0_says_its_curve_misses_marks(tmp_path, capsys):
    """Rank 0 takes an async run's snapshots between its own steps: 20 times slower than
    the others, several --eval-every marks pass within one of its steps, and the curve has
    no point there, which the run now says instead of leaving it to be found."""
    c = config("asgd", tmp_path / "a", optim=OptimConfig(epochs=2, batch_size=64),
               stragglers=StragglerConfig(slowdown="0:20"))
    summary = simulate(c, sim(3))
    points = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    every = max(1, round(c.eval_every * summary["updates"] / 2))  # updates between marks
    # the marks before the end (but one within half an interval of it), each one point
    inside = marks_taken(summary["updates"], every)
    assert len(points) < inside + 2 and points[-1]["updates"] == summary["updates"]
    found = re.search(r"rank 0 took the snapshots between its steps, and (\d+) --eval-every "
                      r"marks passed within one of them: up to (\d+) updates \(all workers' "
                      r"pushes\) came within one step of rank 0, more than the (\d+) between "
                      r"two marks; the curve has no point there\n", capsys.readouterr().err)
    assert found and int(found.group(1)) == inside - (len(points) - 2)  # first, last: no mark
    assert int(found.group(2)) > int(found.group(3)) == every


def test_many_workers_make_rank_0s_steps_span_marks(tmp_path, capsys):
    """16 workers of constant step times, 2 batches each an epoch: no worker is slower, but
    each step of rank 0 spans the 16 workers' pushes, more than the 8 updates between
    marks. The warning said rank 0 "is slower than the other workers"."""
    c = config("asgd", tmp_path / "a", optim=OptimConfig(epochs=2, batch_size=64))
    # No store time, so the lockstep holds (test_staleness_of_lockstep_workers_is_m_minus_1)
    simulate(c, sim(16, step_time="constant:0.01", store_latency=0.0, store_bandwidth=1e30))
    err = capsys.readouterr().err
    assert "slower" not in err
    assert re.search(r"marks passed within one of them: up to 16 updates \(all workers' pushes\) "
                     r"came within one step of rank 0, more than the 8 between two marks", err)


def test_a_real_runs_config_is_simulated_on_its_workers(tmp_path):
    """A real 2-rank run's config.json was simulated on the default 4 workers (its recorded
    step times replayed in a cycle), without a word; an unknown key in a sim table said
    "SimConfig.__init__() got an unexpected keyword argument"."""
    from hpctrain import cli
    from hpctrain.sim import arguments as sim_arguments

    def built(values: dict, *argv: str):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({"algo": "ssgd", **values}))
        return sim_arguments.build(cli.build_parser().parse_args(
            ["simulate", "--config", str(path), *argv]))

    assert built({"run_info": {"workers": 2}}).workers == 2
    assert built({"run_info": {"workers": 2}}, "--workers", "8").workers == 8
    assert built({"run_info": {"workers": 2}, "sim": {"workers": 16}}).workers == 16
    with pytest.raises(UsageError, match=r"config.json: unknown configuration key sim.foo; sim "
                                         r"has: .*workers"):
        built({"sim": {"foo": 1}})


@pytest.mark.timeout(200)
def test_a_repeat_whose_replayed_step_times_changed_is_refused(tmp_path, two_rank_runs):
    """A simulation's config.json recorded only replay:RUN: repeated after RUN's
    step_times.json changed (a run resumed into RUN rewrites it), it simulated other times
    without a word. Its sha256 is recorded now (one file: the step times and the rests
    --comm-time replay reads), and a repeat whose file differs is one line naming the file
    and both hashes, before anything runs; --step-time given anew replays it as it is."""
    from hpctrain import cli

    run = tmp_path / "real"
    shutil.copytree(two_rank_runs["asgd"], run)
    times = run / steptimes.FILE
    replay = ["--step-time", f"replay:{run}"]
    cli.main(["simulate", "--config", str(run / "config.json"), *replay, "--comm-time",
              "replay", "--out", str(tmp_path / "a")])
    first = hashlib.sha256(times.read_bytes()).hexdigest()
    doc = json.loads(times.read_text())
    doc["rest"][0][0] += 1.0  # a rest only: the step times are the same
    times.write_text(json.dumps(doc))
    now = hashlib.sha256(times.read_bytes()).hexdigest()
    repeat = ["simulate", "--config", str(tmp_path / "a" / "config.json")]
    with pytest.raises(UsageError, match=rf"^--step-time replay:{re.escape(str(run))}: "
                                         rf"{re.escape(str(times))} changed since it was "
                                         rf"replayed \(now sha256 {now}, recorded {first}\)"):
        cli.main([*repeat, "--out", str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()
    cli.main([*repeat, *replay, "--out", str(tmp_path / "c")])
    assert json.loads((tmp_path / "c" / "config.json").read_text())["sim"] == {
        **json.loads((tmp_path / "a" / "config.json").read_text())["sim"],
        "step_times_sha256": now}
    said = "step_times_sha256 'abc' hashes a replayed run's step times, not "
    with pytest.raises(UsageError, match=re.escape(f"{said}SimConfig.step_time='constant:0.01'")):
        sim(2, step_times_sha256="abc")  # from Python: the field (747fff9), typed no flag
    with pytest.raises(UsageError, match=re.escape(f"{said}--step-time constant:0.01")), \
            options.command_line():
        sim(2, step_times_sha256="abc")


@pytest.fixture(scope="module")
def slowed_run(tmp_path_factory):
    """A real one-process sgd run with a straggler's --slowdown and --jitter: its recorded
    step times hold their delays."""
    out = tmp_path_factory.mktemp("slowed") / "sgd"
    proc = run_job(["train", "--algo", "sgd", *SYNTHETIC, "--epochs", "1", "--slowdown", "0:3",
                    "--jitter", "0.2", "--out", str(out)], np=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_a_real_runs_stragglers_are_not_applied_again_to_its_replayed_times(
        tmp_path, slowed_run, capsys):
    """--config RUN/config.json --step-time replay:RUN applied the run's --slowdown 0:3 and
    --jitter 0.2 again, on step times that hold them (three times slower and more). The
    file's are left out now, said once; one typed is applied on top; and a simulation's
    config.json, which records what it applied, repeats it."""
    from hpctrain import cli

    real = steptimes.read(slowed_run).compute
    given = ["simulate", "--config", str(slowed_run / "config.json"), "--step-time",
             f"replay:{slowed_run}"]
    cli.main([*given, "--out", str(tmp_path / "a")])
    said = f"leaving out {slowed_run / 'config.json'}'s --slowdown 0:3 and --jitter 0.2 (a " \
           "real run's stragglers, whose delays the replayed step times already hold"
    assert said in capsys.readouterr().err
    assert steptimes.read(tmp_path / "a").compute == [pytest.approx(real[0], abs=2e-6)]
    recorded = json.loads((tmp_path / "a" / "config.json").read_text())["stragglers"]
    assert recorded == {"slowdown": None, "jitter": 0.0}
    cli.main([*given, "--slowdown", "0:2", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert "'s --jitter 0.2 (a real run's stragglers" in err and "--slowdown 0:3" not in err
    doubled = [2 * t for t in real[0]]
    assert steptimes.read(tmp_path / "b").compute == [pytest.approx(doubled, abs=2e-6)]
    cli.main(["simulate", "--config", str(tmp_path / "b" / "config.json"), "--out",
              str(tmp_path / "c")])
    assert "leaving out" not in capsys.readouterr().err
    b, c = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "bc")
    assert {**b, "out": None} == {**c, "out": None}
    # Another run's times to replay: they hold none of this run's sleeps, which stay.
    other = tmp_path / "other"
    shutil.copytree(slowed_run, other)
    cli.main(["simulate", "--config", str(slowed_run / "config.json"), "--step-time",
              f"replay:{other}", "--out", str(tmp_path / "d")])
    assert "leaving out" not in capsys.readouterr().err
    recorded = json.loads((tmp_path / "d" / "config.json").read_text())["stragglers"]
    assert recorded == {"slowdown": "0:3", "jitter": 0.2}


def test_a_replay_of_the_runs_own_step_times_file_leaves_its_stragglers_out(
        tmp_path, slowed_run, capsys):
    """--step-time replay:RUN/step_times.json (the file, not the folder) applied the run's
    --slowdown 0:3 and --jitter 0.2 again, silently: only the folder was compared with
    --config's. The file form is the same replay, and leaves them out alike."""
    from hpctrain import cli

    real = steptimes.read(slowed_run).compute
    cli.main(["simulate", "--config", str(slowed_run / "config.json"), "--step-time",
              f"replay:{slowed_run / steptimes.FILE}", "--out", str(tmp_path / "a")])
    assert f"leaving out {slowed_run / 'config.json'}'s --slowdown 0:3 and --jitter 0.2" in \
        capsys.readouterr().err
    assert steptimes.read(tmp_path / "a").compute == [pytest.approx(real[0], abs=2e-6)]


def test_comm_time_replay_on_other_workers_than_recorded_says_so(tmp_path, capsys):
    """--comm-time replay on K workers replays the pushes and lock waits measured at the R
    recorded, which at K != R mean nothing physical: it ran without a word. Now one line says
    so; at K == R nothing is said. Each worker starts after its recorded lead-in."""
    n = 40
    (tmp_path / steptimes.FILE).write_text(json.dumps({
        "format": steptimes.FORMAT, "workers": [[0.01] * n, [0.01] * n],
        "rest": [[0.002] * n, [0.002] * n], "lead_in": [0.0, 0.05]}))
    replay = {"step_time": f"replay:{tmp_path}", "comm_time": "replay"}
    simulate(config("asgd", tmp_path / "two", eval_every=1.0), sim(2, **replay))
    assert "--comm-time replay" not in capsys.readouterr().err
    assert steptimes.read(tmp_path / "two").lead_in == [0.0, 0.05]
    simulate(config("asgd", tmp_path / "three", eval_every=1.0), sim(3, **replay))
    said = capsys.readouterr().err
    assert "hpctrain simulate: --comm-time replay on 3 virtual workers replays the rests " \
           "(communication and waiting) and lead-ins 2 real workers had (worker k: worker k " \
           "mod 2's), measured at 2, not 3: use --comm-time model" in said \
        and said.count("\n") == 1
    simulate(config("sgd", tmp_path / "one", eval_every=1.0), sim(1, **replay))
    assert "--comm-time replay on 1 virtual worker replays" in capsys.readouterr().err
    assert steptimes.read(tmp_path / "three").lead_in == [0.0, 0.05, 0.0]


_NAMED_CLASSES = '''
import torch


class Named(torch.utils.data.Dataset):
    classes = ["cat", "dog"]

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.arange(n) % 2

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def load():
    return {"train": Named(64, 0), "test": Named(32, 1), "num_classes": 2}
'''


def test_a_simulation_records_the_datas_class_names_as_a_run_does(tmp_path):
    """config.json's run_info.classes, model.pt's outputs by name: a simulation trains
    through the run's loop and writes config.json as hpctrain train does, so it records
    them too where the data name them."""
    (tmp_path / "named.py").write_text(_NAMED_CLASSES)
    data = DataConfig(dataset=f"{tmp_path / 'named.py'}:load")
    simulate(config("ssgd", tmp_path / "out", data=data,
                    optim=OptimConfig(epochs=1, batch_size=16)), sim(2))
    info = json.loads((tmp_path / "out" / "config.json").read_text())["run_info"]
    assert info["classes"] == ["cat", "dog"] and info["simulator"] == "hpctrain simulate"


def test_sim_study_refuses_what_it_cannot_run_in_one_line(tmp_path):
    """RESULTS' study script: no arguments was an IndexError, and --report-only on a folder
    with no runs a KeyError deep in the table (a docs reproduction found it)."""
    script = str(Path(__file__).parent.parent / "scripts" / "sim_study.py")
    empty = tmp_path / "empty"
    done = run_program([sys.executable, script, "dcasgd", str(empty), "--report-only"])
    assert (done.returncode, done.stderr) == (2, f"--report-only: {empty} holds no "
                                              "runs.jsonl: no run of a study to report\n")
    assert not empty.exists()
    done = run_program([sys.executable, script, "no-such-study", str(empty)])
    assert done.returncode == 2 and done.stderr.startswith("usage: scripts/sim_study.py {")

