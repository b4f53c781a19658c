"""Resuming on another number of workers (hpctrain.checkpoint.resize), in one process: the
loop's rules for progress and counts, each algorithm's rule for its own per-worker state (loaded
back into the real objects), and a Checkpointer restoring a 3-worker checkpoint on 1 worker.
The whole jobs (4 ranks resumed on 2) are in test_resize_jobs.py."""

import numpy as np
import pytest
import torch

from hpctrain import checkpoint
from hpctrain.algorithm import Algorithm
from hpctrain.checkpoint import resize
from hpctrain.checkpoint.format import encode_parts
from hpctrain.config import RunConfig
from hpctrain.errors import UsageError
from hpctrain.metrics import Tally, write_atomic


def part(r: int, **own) -> dict:
    """Old worker ``r``'s per-worker state as the loop saves it, with distinct numbers."""
    return {**own, "guard": {"skipped": 2, "consecutive": 1, "bad_here": r},
            "straggler": {"slept": 0.5 * r, "rng": [3, [r], None]}, "rng": {"torch": r},
            "counters": {"samples": 1000 + r, "local_steps": 64, "local_epoch": 2, "i": 0,
                         "elapsed": 10.0 + r, "updates": 64}}


def algorithm(name: str):
    config = RunConfig(algo=name)
    return config.algorithm_class(config)


def test_rescale_keeps_the_fraction_of_the_run():
    assert resize.rescale(64, 32, 64) == 128      # 4 ranks -> 2: twice the steps per epoch
    assert resize.rescale(64, 64, 43) == 43       # 2 -> 3 at an epoch boundary
    assert resize.rescale(10, 64, 43) == 7        # 6.72 rounds to 7
    assert resize.rescale(1, 2, 1) == 1           # a half rounds up
    assert resize.fold([0, 1, 2, 3], 2) == [[0, 2], [1, 3]]
    assert resize.fold([0, 1], 3) == [[0], [1], []]
    assert resize.source(["a", "b"], 3) == ["a", "b", "a"]


@pytest.mark.parametrize("old, new, per_epoch, position, epoch, i", [
    # lock-step, 2048 samples, batch 16: 4 ranks have 32 steps an epoch, 2 ranks 64
    (4, 2, "lockstep", 128, 2, 0),
    # async: an epoch is steps x workers updates (128 either way): the count stays
    (4, 2, "async", 64, 0, 32),
])
def test_resizer_progress_and_counts(old, new, per_epoch, position, epoch, i):
    steps = 2048 // new // 16
    updates = {"lockstep": lambda s, w: s, "async": lambda s, w: s * w}[per_epoch]
    seen = []

    def own_rule(parts, workers, at):
        seen.append((len(parts), workers, at, parts[0]))
        return [{"own": j} for j in range(workers)]

    resizer = resize.Resizer(num_samples=2048, batch_size=16, workers=new, steps=steps,
                             per_epoch=updates, resize_state=own_rule)
    header = {"updates": 64 if per_epoch == "lockstep" else 64, "workers": old}
    parts, record = resizer(header, [part(r, mine=r) for r in range(old)])
    assert seen == [(old, new, position, {"mine": 0})]  # only the algorithm's own entries
    assert record.record() == {"from_workers": old, "to_workers": new, "updates": 64,
                               "resumed_at": position}
    assert [p["own"] for p in parts] == list(range(new))
    c = parts[1]["counters"]
    assert (c["updates"], c["local_epoch"], c["i"], c["local_steps"]) == \
        (position, epoch, i, epoch * steps + i)
    assert [p["counters"]["samples"] for p in parts] == [2002, 2004]  # totals kept
    assert [p["counters"]["elapsed"] for p in parts] == [10.0, 10.0]  # rank 0's clock
    assert [p["guard"] for p in parts] == [{"skipped": 2, "consecutive": 1, "bad_here": 2},
                                           {"skipped": 2, "consecutive": 1, "bad_here": 4}]
    assert [p["straggler"]["slept"] for p in parts] == [1.0, 2.0]
    assert [p["rng"] for p in parts] == [{"torch": 0}, {"torch": 1}]


@pytest.mark.parametrize("algo", ["ma", "ec", "ssgd"])
def test_fp16_scale_goes_on_and_its_overflows_are_folded(algo):
    """MA's rule dropped the loss scaler (a resumed run started again at 65536 and counted no
    overflow); EC's and the default copied it, a new worker counting overflows it never had."""
    resizer = resize.Resizer(num_samples=2048, batch_size=16, workers=3, steps=2048 // 3 // 16,
                             per_epoch=lambda s, w: s,
                             resize_state=algorithm(algo).resize_state)
    own = {"ma": lambda r: {"model": {"w": torch.full((2,), float(r))},
                            "optimizer": {"m": torch.zeros(2)}, "agg": {"steps": 64}},
           "ec": lambda r: {"model": {}, "optimizer": {}, "agg": {"steps": 64,
                                                                  "round_start": 60}},
           "ssgd": lambda r: {"optimizer": {}}}[algo]
    scalers = [{"scale": 2048.0 * (r + 1), "_growth_tracker": 7 + r, "overflows": 5 + r,
                "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}
               for r in range(2)]
    parts, _ = resizer({"updates": 64, "workers": 2},
                       [part(r, **own(r), scaler=scalers[r]) for r in range(2)])
    assert [p["scaler"]["scale"] for p in parts] == [2048.0, 4096.0, 2048.0]  # j mod K's
    assert [p["scaler"]["_growth_tracker"] for p in parts] == [7, 8, 7]
    assert [p["scaler"]["overflows"] for p in parts] == [5, 6, 0]  # 11 in all, as before
    unscaled, _ = resizer({"updates": 64, "workers": 2}, [part(r, **own(r)) for r in range(2)])
    assert all("scaler" not in p for p in unscaled)  # a run without fp16 gets none


def model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 4)).square().sum().backward()
    opt.step()
    return model, opt


def test_ma_starts_every_worker_from_the_average():
    olds = [model_and_optimizer(s) for s in range(3)]
    parts = [{"model": m.state_dict(), "optimizer": o.state_dict(),
              "agg": {"steps": 5, "stats": {"bytes": [r], "seconds": [], "parts": {}}}}
             for r, (m, o) in enumerate(olds)]
    new = algorithm("ma").resize_state(parts, 2, 9)
    assert len(new) == 2
    model, opt = model_and_optimizer(7)
    model.load_state_dict(new[1]["model"])
    opt.load_state_dict(new[1]["optimizer"])
    weight = torch.stack([m[0].weight for m, _ in olds]).mean(0)
    assert torch.allclose(model[0].weight, weight)
    assert torch.allclose(model[1].running_var,
                          torch.stack([m[1].running_var for m, _ in olds]).mean(0))
    assert model[1].num_batches_tracked == 1  # integer buffers are not averaged
    momentum = torch.stack([o.state[o.param_groups[0]["params"][0]]["momentum_buffer"]
                            for _, o in olds]).mean(0)
    assert torch.allclose(opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"],
                          momentum)
    assert [p["agg"]["steps"] for p in new] == [9, 9]
    assert [p["agg"]["stats"]["bytes"] for p in new] == [[0], [1]]


def test_ma_keeps_frozen_parameters_as_the_members_hold_them():
    """Resized, MA averaged frozen parameters too, as its rounds did: the members' equal
    values came back changed by rounding."""
    members = []
    for r in range(3):
        torch.manual_seed(r)
        members.append(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)))
        members[-1][0].requires_grad_(False)
    parts = [{"model": m.state_dict(), "optimizer": {}, "agg": {"steps": 5}} for m in members]
    ma = algorithm("ma")
    ma.model = members[0]
    new = ma.resize_state(parts, 2, 9)[1]["model"]
    assert list(new) == list(parts[0]["model"])
    assert torch.equal(new["0.weight"], members[0][0].weight)  # the first member's
    assert torch.equal(new["1.weight"], torch.stack([m[1].weight for m in members]).mean(0))


def test_ec_keeps_or_copies_members_and_the_round():
    parts = [{"model": {"w": torch.full((2,), float(r))}, "optimizer": {"r": r},
              "agg": {"steps": 30, "round_start": 28, "rounds": 4, "relabelled": None,
                      "distilled": r, "stats": {}}} for r in range(2)]
    new = algorithm("ec").resize_state(parts, 3, 50)
    assert [float(p["model"]["w"][0]) for p in new] == [0.0, 1.0, 0.0]
    assert [(p["agg"]["steps"], p["agg"]["round_start"], p["agg"]["distilled"])
            for p in new] == [(50, 48, 0), (50, 48, 1), (50, 48, 0)]


@pytest.mark.parametrize("saved, round_start, position", [
    (32, 24, 22),  # 2 workers -> 3 (the next multiple of tau, 24, cut the round short)
    (22, 14, 37),  # 3 -> 2 (the round ran on to 48: steps past tau were plain cross-entropy)
])
def test_ec_resized_round_keeps_its_tau_steps_and_distils_every_slice(saved, round_start,
                                                                      position):
    """A round saved 8 of its tau 12 steps in, resumed at ``position``, distils its slices 8
    to 11, one a step, and the next round comes 4 steps on. Rounds fell where ``steps % tau
    == 0`` instead, which is elsewhere in the round after a resize."""
    from hpctrain.comm import mpi
    from hpctrain.data import Dataset
    from hpctrain.ec.compression import EnsembleCompression

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    local = Dataset("mine", torch.randn(24, 4), torch.randint(0, 3, (24,)), torch.arange(24),
                    num_classes=3)

    def aggregator() -> EnsembleCompression:
        return EnsembleCompression(model, mpi().COMM_SELF, tau=12, alpha=0.5, temperature=2.0,
                                   distill_size=12, local=local)

    old = aggregator()
    slice_of = torch.arange(12.0)[:, None].expand(12, 4)  # relabelled sample j's inputs: j
    old.load_state_dict({"steps": saved, "rounds": 2, "round_start": round_start,
                         "relabelled": (slice_of, torch.zeros(12), torch.full((12, 3), 1 / 3)),
                         "distilled": 0, "stats": old.stats.state_dict()})
    parts = [{"agg": old.state_dict()} for _ in range(2)]
    new = aggregator()
    new.load_state_dict(algorithm("ec").resize_state(parts, 3, position)[0]["agg"])
    distilled = []
    while True:
        x, _, _ = new.distill_batch()
        distilled += x[:, 0].int().tolist()
        if new.after_step():
            break
    assert distilled == [8, 9, 10, 11] and new.steps == position + 4
    assert new.rounds == 3 and new.distill_batch()[0].shape == (1, 4)  # the next round's first


@pytest.mark.parametrize("form", ["tally", "list"])
@pytest.mark.parametrize("name", ["asgd", "dcasgd-a", "ssp"])
def test_async_workers_share_mean_squares_keep_velocities_and_level_clocks(name, form):
    """``form``: the staleness as checkpoints hold it (a tally's counts), or as those written
    before tallies did (every push's, a list): both fold into tallies."""
    adaptive = name == "dcasgd-a"
    parts = []
    for r in range(2):
        stale = [r] * (r + 1) + [5] * r
        worker = {"ms": torch.full((3,), float(r + 1)) if adaptive else None,
                  "v": torch.full((3,), 10.0 + r),
                  "staleness": Tally.of(stale).state() if form == "tally" else stale}
        parts.append({"opt": {"state": {}, "param_groups": [{"lr": 0.1}], "worker": worker}})
        if name == "ssp":
            parts[-1]["ssp"] = {"clock": 40 + r, "waits": r, "wait_s": 0.5, "max_gap": r + 1}
    new = algorithm(name).resize_state(parts, 3, 80)
    workers = [p["opt"]["worker"] for p in new]
    if adaptive:
        assert all(torch.equal(w["ms"], torch.full((3,), 1.5)) for w in workers)
    else:
        assert all(w["ms"] is None for w in workers)
    assert [w["v"].tolist() for w in workers] == [[10.0] * 3, [11.0] * 3, [0.0] * 3]
    assert [w["staleness"] for w in workers] == [{0: 1}, {1: 2, 5: 1}, {}]
    shrunk = algorithm(name).resize_state(parts, 1, 80)  # one worker counts every push
    assert shrunk[0]["opt"]["worker"]["staleness"] == {0: 1, 1: 2, 5: 1}
    if name == "ssp":
        assert [p["ssp"] for p in new] == [
            {"clock": 40, "waits": 0, "wait_s": 0.5, "max_gap": 1},
            {"clock": 40, "waits": 1, "wait_s": 0.5, "max_gap": 2},
            {"clock": 40, "waits": 0, "wait_s": 0, "max_gap": 0}]


def test_policy_allows_another_number_of_ranks_only_when_resizing(tmp_path):
    checkpoint.save(tmp_path, 5, {"x": 1}, {"algo": "ssgd", "ranks": 4, "workers": 4,
                                            "args": {"lr": 0.1}})
    given = {"algo": "ssgd", "ranks": 2, "every": None, "checkpoint_dir": None,
             "resume": str(tmp_path), "out": None, "run_config": {"lr": 0.1},
             "may_change": checkpoint.MAY_CHANGE}
    with pytest.raises(UsageError, match="of 4 ranks, not 2, and this run cannot be resized$"):
        checkpoint.check(**given)
    assert checkpoint.check(**given, resize=True).resume == str(tmp_path)
    with pytest.raises(UsageError, match="of --algo ssgd, not --algo ma$"):  # ranks allowed
        checkpoint.check(**{**given, "algo": "ma"}, resize=True)


def test_checkpointer_restores_three_workers_on_one(tmp_path):
    """A per-rank (ma-like) checkpoint of 3 workers resumed on 1: the resizer's states, worker
    0's snapshots, progress and the record; the next checkpoint keeps the record."""
    folder = tmp_path / "ckpts"
    (folder / "snapshots").mkdir(parents=True)
    refs = []
    for r in range(3):
        head, parts = encode_parts({"w": torch.full((2,), float(r))}, {"info": {"updates": 0}})
        write_atomic(folder / f"snapshots/000000-r{r}.pt", parts)
        refs.append([{"file": f"snapshots/000000-r{r}.pt", "sha256": head["sha256"],
                      "info": {"updates": 0}}])
    payload = {"shared": {}, "ranks": [{**part(r, agg={"r": r}), "rng": checkpoint.rng_state()}
                                       for r in range(3)],
               "snapshots": refs,
               "book": {"checkpoints": 2, "checkpoint_s": 0.1, "resumed_from": []}}
    checkpoint.save(folder, 60, payload, {"algo": "ma", "ranks": 3, "workers": 3, "args": {}})

    class Agg:
        def load_state_dict(self, state):
            self.state = state

        def state_dict(self):
            return self.state

    agg = Agg()
    resizer = resize.Resizer(num_samples=1200, batch_size=10, workers=1, steps=120,
                             per_epoch=lambda s, w: s, resize_state=lambda p, w, at: p[:w])
    ckpt = checkpoint.Checkpointer(None, 120, 360, shared={}, per_rank={"agg": agg},
                                   per_rank_snapshots=True, every="1e", folder=folder,
                                   resume=str(folder), resize=resizer,
                                   header={"algo": "ma", "ranks": 1, "args": {}})
    back = []
    done = ckpt.restore(back)
    # 3 workers had 40 steps an epoch: update 60 is epoch 1.5, update 180 of 120-step epochs
    assert (done["updates"], done["local_epoch"], done["i"]) == (180, 1, 60)
    assert agg.state == {"r": 0} and [float(s.state["w"][0]) for s in back] == [0.0]
    assert ckpt.next_due == 240
    record = {"from_workers": 3, "to_workers": 1, "updates": 60, "resumed_at": 180}
    assert ckpt.summary()["resized"] == [record]
    # The checkpoint's count, as config.json's resumes say (it held the rescaled 180)
    assert ckpt.summary()["resumed_from_updates"] == [60]
    ckpt.save(240, {"elapsed": 1.0}, back)
    again = checkpoint.newest(folder)
    assert again.payload["book"]["resized"] == [record] and len(again.payload["ranks"]) == 1

    refused = checkpoint.Checkpointer(None, 120, 360, shared={}, per_rank={"agg": agg},
                                      every=None, folder=folder, resume=str(folder),
                                      header={"algo": "ma", "ranks": 1, "args": {}})
    checkpoint.save(folder, 300, payload, {"algo": "ma", "ranks": 3, "workers": 3, "args": {}})
    with pytest.raises(UsageError, match="checkpoint is of 3 workers, not 1, and this run "
                                         "cannot be resized"):
        refused.restore([])


class Residual(Algorithm):
    """A user's algorithm with per-worker state that must not be duplicated (error feedback)
    and no resize_state of its own."""

    name = "residual"

    def checkpoint_state(self):
        shared, _ = super().checkpoint_state()
        return shared, {"feedback": self.model}


class ResidualSplit(Residual):
    name = "residual-split"

    def resize_state(self, parts, workers, position):  # a rule of its own, built on the default
        return super().resize_state(parts, workers, position)


def residuals(k: int, same: bool = False) -> list[dict]:
    return [{"feedback": {"e": torch.full((2,), 0.0 if same else float(r))}} for r in range(k)]


def test_a_users_default_rule_warns_when_it_copies_or_drops_per_worker_state(capsys):
    """A user's class relying on the default rule: 2 -> 4 workers copied each residual to two
    workers (applied twice, silently); 3 -> 2 dropped worker 2's. One line each, on stderr."""
    algo = Residual(RunConfig(algo=Residual))
    grown = algo.resize_state(residuals(2), 4, 10)
    assert [float(p["feedback"]["e"][0]) for p in grown] == [0.0, 1.0, 0.0, 1.0]
    assert capsys.readouterr().err == (
        "hpctrain: warning: resized from 2 to 4 workers, and Residual has no resize_state of "
        "its own: new worker j took old worker j mod 2's per-worker state, so workers 2..3 "
        "hold copies; state that must not be duplicated (an error-feedback residual, a count) "
        "needs one (README, \"An algorithm of your own\"; docs/DESIGN.md §7)\n")
    algo.resize_state(residuals(3), 2, 10)
    err = capsys.readouterr().err
    assert err.startswith("hpctrain: warning: resized from 3 to 2 workers, and Residual ") \
        and "old worker 2's was dropped; state that must not be lost" in err \
        and err.count("\n") == 1
    algo.resize_state(residuals(1), 2, 10)  # one worker's state: a copy cannot be told apart
    assert "1 to 2 workers" in capsys.readouterr().err
    # Quiet: nothing that differs (empty, or the same on every worker), the same count, a
    # class with a rule of its own (even one calling the default), the built-ins.
    algo.resize_state(residuals(2, same=True), 4, 10)
    algo.resize_state([{"feedback": {}}, {"feedback": {"e": None}}], 4, 10)
    algo.resize_state(residuals(2), 2, 10)
    ResidualSplit(RunConfig(algo=ResidualSplit)).resize_state(residuals(2), 4, 10)
    for name in ("sgd", "ssgd"):  # the built-ins on the default (ssgd: Adasum's momentum)
        algorithm(name).resize_state(residuals(2), 4, 10)
    assert capsys.readouterr().err == ""


def test_the_resizer_warns_once_for_a_users_default_rule(capsys):
    """Through the resize path the loop builds (Resizer with the algorithm's rule): 2 -> 3."""
    resizer = resize.Resizer(num_samples=2048, batch_size=16, workers=3, steps=2048 // 3 // 16,
                             per_epoch=lambda s, w: s,
                             resize_state=Residual(RunConfig(algo=Residual)).resize_state)
    parts, _ = resizer({"updates": 64, "workers": 2},
                       [part(r, **residuals(2)[r]) for r in range(2)])
    assert [float(p["feedback"]["e"][0]) for p in parts] == [0.0, 1.0, 0.0]
    err = capsys.readouterr().err.splitlines()
    assert err == [line for line in err if line.startswith("hpctrain: warning: resized from 2 "
                                                           "to 3 workers, and Residual ")] \
        and len(err) == 1 and "so worker 2 holds a copy;" in err[0]


def test_the_default_rules_warning_never_stops_a_resume():
    """Its comparison of the old workers' states raised through the resume: sparse and meta
    tensors (aten::equal has no kernel), an object whose == raises, a state holding itself.
    Such states now count as differing (a warning); equal NumPy arrays as equal."""
    from hpctrain.checkpoint import resize

    class Odd:
        def __eq__(self, other):
            raise KeyError("no")

    looped: dict = {}
    looped["self"] = looped
    sparse = torch.eye(2).to_sparse()
    for state in (sparse, torch.empty(2, device="meta"), Odd(), looped):
        assert resize.default_rule_warning("Mine", [{"s": state}, {"s": state}], 4)
    arrays = [{"s": np.arange(3)}, {"s": np.arange(3)}]
    assert resize.default_rule_warning("Mine", arrays, 4) is None
    arrays[1]["s"] = np.arange(1, 4)
    assert resize.default_rule_warning("Mine", arrays, 4)
