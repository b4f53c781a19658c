"""Collapse detection (hpctrain.collapse): a run that starts slowly is not a collapse, a dead one
still is; and what rank 0's Watch says about it. The rules one by one: test_plugins.py."""

import json
import math
import random
import signal

import pytest
import torch
from conftest import SYNTHETIC, run_job

from hpctrain import collapse, data, live
from hpctrain.collapse import CollapseDetector
from hpctrain.config import OptimConfig, RunConfig
from hpctrain.metrics import progress as progress_bar

CHANCE = math.log(10)
WINDOW = 32  # a quarter epoch of 128 steps; four windows: an epoch


def noisy(values, seed: int = 0) -> list[float]:
    """``values`` with a batch's noise (rank 0's loss of 16 samples near chance: ~0.04)."""
    rng = random.Random(seed)
    return [v + rng.gauss(0.0, 0.04) for v in values]


def first_collapse(detector: CollapseDetector, losses, start: int = 1) -> int | None:
    found = [u for u, v in enumerate(losses, start) if detector.loss(u, v)]
    return found[0] if found else None


def test_a_run_at_chance_while_warming_up_is_not_collapsed():
    """--warmup-epochs 5 of 8: the loss sat at chance for the first epoch (the rate still a
    fraction of --lr) and --stop-on-collapse ended a run that then reached 100%."""
    warming = [CHANCE] * 150 + [CHANCE * math.exp(-i / 30) for i in range(100)]
    assert first_collapse(CollapseDetector(10, WINDOW, warmup=160), warming) is None
    assert first_collapse(CollapseDetector(10, WINDOW), warming) == 4 * WINDOW  # as before
    # A run dead at chance after its warm-up still is one, four windows after it.
    dead = [CHANCE + 0.002] * 400
    assert first_collapse(CollapseDetector(10, WINDOW, warmup=160), dead) == 160 + 4 * WINDOW - 1


def test_a_loss_falling_slowly_within_the_band_is_learning():
    """--lr 0.0005: the loss crept from 2.30 to 2.27 in 128 steps, within 2% of ln(10) but
    for noise, while test accuracy rose from 0.10 to 0.17; the run was stopped as collapsed
    at update 128. A run that stays at chance is still caught (a few windows later, where
    its noise looked like a fall). Noise makes either verdict a chance: 20 runs of each."""
    seeds = range(20)
    slow = [CHANCE - 0.0003 * i for i in range(400)]
    stopped = [s for s in seeds if first_collapse(CollapseDetector(10, WINDOW), noisy(slow, s))]
    assert len(stopped) <= 1, stopped  # all 20 at update 128 before (1 in 200 now)
    dead = [CHANCE + 0.002] * 1000
    assert all(first_collapse(CollapseDetector(10, WINDOW), noisy(dead, s)) for s in seeds)


def test_a_flat_loss_is_not_a_collapse_while_snapshots_score_above_chance():
    """--eval online: test accuracy rising (0.10, then 0.14) with the loss still at chance."""
    detector = CollapseDetector(10, WINDOW)
    assert detector.accuracy(0, 0.10) is None and detector.accuracy(40, 0.14) is None
    assert first_collapse(detector, [CHANCE] * 300) is None  # the last snapshot: 0.14
    assert detector.accuracy(300, 0.11) is None  # not the "back at chance" rule: never 0.28
    # Now a collapse, at the end of the stretch judged afresh at update 256.
    assert first_collapse(detector, [CHANCE] * 200, start=301) == 256 + 4 * WINDOW


# Ten classes: a score of at least 0.1 + LEARNED x 0.9 = 0.28 was learning, and a later one
# of at most 0.1 + CHANCE_MARGIN = 0.12 is back at chance (both bounds as the detector sums).
LEARNT, AT_CHANCE = 0.1 + collapse.LEARNED * (1 - 0.1), 0.1 + collapse.CHANCE_MARGIN


@pytest.mark.parametrize("best, then, collapsed", [
    (LEARNT - 1e-4, 0.1, False), (LEARNT, AT_CHANCE + 1e-4, False), (LEARNT, AT_CHANCE, True),
    (0.9, 0.05, True)])
def test_a_snapshot_back_at_chance_after_learning_is_a_collapse_at_the_bounds(best, then,
                                                                               collapsed):
    detector = CollapseDetector(10, WINDOW)
    assert detector.accuracy(16, best) is None
    said = detector.accuracy(32, then)
    assert (detector.collapsed_at, said) == ((32, f"test accuracy {then:.4f} back at chance "
                                              f"(1/10) after {best:.4f}") if collapsed
                                             else (None, None))


def test_a_collapse_after_learning_is_caught_as_fast_during_warm_up():
    detector = CollapseDetector(10, 20, warmup=1000)
    seq = [2.0] * 30 + [CHANCE] * 60  # below chance, then back at it for one window
    found = first_collapse(detector, seq)
    assert found is not None and found < 30 + 40 and "flat at chance" in detector.reason


def watch_of(out, *, per_epoch: int = 32, world=None, **options) -> live.Watch:
    """Rank 0's Watch of a one-worker sgd run on the synthetic set, as the loop makes it, in
    this process (``options``: RunConfig's; ``warmup_epochs`` OptimConfig's)."""
    optim = OptimConfig(epochs=8, warmup_epochs=options.pop("warmup_epochs", 0.0))
    config = RunConfig(algo="sgd", out=str(out), progress=False, optim=optim, **options)
    test_set = data.load("synthetic", "test")
    bar = progress_bar(8 * per_epoch, 0, "sgd", enabled=False)
    return live.Watch(config, config.algorithm_class(config), None, test_set=test_set,
                      per_epoch=per_epoch, steps=per_epoch, samples_per_epoch=16 * per_epoch,
                      bar=bar, world=world)


def feed(watch: live.Watch, losses, start: int = 1) -> int | None:
    """``losses`` as rank 0's steps from update ``start``; the update at which the run
    stops (--stop-on-collapse), or None."""
    for update, value in enumerate(losses, start):
        watch.step(update, update, torch.tensor(value), 0.05, update * 0.01)
        if watch.stop(update):
            return update
    return None


def test_the_watch_waits_for_the_warm_up_and_says_the_run_stops(tmp_path, capsys):
    # 32 updates an epoch: warm-up to update 64, a window of 20 (a quarter epoch, at least 20)
    watch = watch_of(tmp_path, warmup_epochs=2, stop_on_collapse=True)
    assert feed(watch, [CHANCE] * 100) is None and capsys.readouterr().err == ""
    assert feed(watch, [CHANCE] * 100, start=101) == 64 + 4 * 20 - 1
    warning = capsys.readouterr().err.strip()
    assert warning == ("hpctrain: warning: training collapsed at update 143: training loss "
                       "flat at chance, ln(10) = 2.303, for 80 steps")  # the run says it stopped
    unasked = watch_of(tmp_path)
    assert feed(unasked, [CHANCE] * 100) is None
    assert capsys.readouterr().err.strip().endswith("(--stop-on-collapse ends a run there)")


def test_a_collapse_found_scoring_after_training_ends_the_run_for_it(tmp_path, capsys):
    """With --eval after, the accuracy check runs on the curve once the loop is over: a
    final point back at chance was only recorded, and the run exited 0 (stopped_on_collapse
    false) although --stop-on-collapse was given."""
    watch = watch_of(tmp_path, stop_on_collapse=True)
    assert feed(watch, [1.0] * 64) is None
    watch.finish()
    watch.after([{"t": 1.0, "epoch": 1.0, "updates": 32, "test_acc": 0.9, "test_loss": 0.3},
                 {"t": 2.0, "epoch": 2.0, "updates": 64, "test_acc": 0.1, "test_loss": 2.3}])
    fields = watch.fields()
    assert (fields["collapsed_at"], fields["stopped_on_collapse"]) == (64, True)
    assert "--stop-on-collapse ends" not in capsys.readouterr().err  # the exit's line follows
    unasked = watch_of(tmp_path)
    unasked.finish()
    unasked.after([{"t": 1.0, "epoch": 1.0, "updates": 32, "test_acc": 0.9, "test_loss": 0.3},
                   {"t": 2.0, "epoch": 2.0, "updates": 64, "test_acc": 0.1, "test_loss": 2.3}])
    assert unasked.fields()["collapsed_at"] == 64
    assert unasked.fields()["stopped_on_collapse"] is False

def test_the_detector_goes_on_from_its_state():
    """A checkpoint keeps the detector: a resumed run forgot a collapse found before its
    checkpoint (summary.json's collapsed_at null), and restarted the count of non-finite
    losses (--stop-on-collapse let a run go on that an uninterrupted one stopped)."""
    first = CollapseDetector(10, WINDOW)
    for u, v in enumerate([2.0, 1.5, float("nan"), float("nan")], 1):
        assert first.loss(u, v) is None
    again = CollapseDetector(10, WINDOW)
    again.load_state_dict(first.state_dict())
    assert again.loss(5, float("nan")) == "training loss nan for 3 steps in a row"
    done = CollapseDetector(10, WINDOW)
    done.load_state_dict(again.state_dict())
    assert (done.collapsed_at, done.reason) == (5, "training loss nan for 3 steps in a row")


@pytest.mark.timeout(200)
def test_a_resumed_run_keeps_a_collapse_found_before_its_checkpoint(tmp_path):
    """sgd collapses (3 NaN losses) at update 13; killed at 40 after a checkpoint at 32 and
    resumed, its summary said no collapse."""
    train = ["train", "--algo", "sgd", *SYNTHETIC, "--epochs", "1", "--batch-size", "16",
             "--checkpoint-every", "0.25e"]
    nan = "nan@0:10,nan@0:11,nan@0:12"
    whole = run_job([*train, "--out", str(tmp_path / "whole")], np=0,
                    env={"HPCTRAIN_INJECT": nan})
    assert whole.returncode == 0, whole.stderr
    out = str(tmp_path / "cut")
    assert run_job([*train, "--out", out], np=0,
                   env={"HPCTRAIN_INJECT": f"{nan},kill@0:40"}).returncode != 0
    resumed = run_job([*train, "--out", out, "--resume", "auto"], np=0)
    assert resumed.returncode == 0, resumed.stderr
    fields = [{k: json.loads((tmp_path / d / "summary.json").read_text())[k]
               for k in ("collapsed_at", "collapse_reason")} for d in ("whole", "cut")]
    assert fields[0] == fields[1] == {"collapsed_at": 13, "collapse_reason":
                                      "training loss nan for 3 steps in a row"}


@pytest.mark.timeout(120)
def test_lock_step_workers_exit_4_for_a_collapse_at_the_last_update(tmp_path):
    """ssgd on 2 workers, rank 0's loss NaN at updates 14-16 of 16: rank 0's stop word would
    reach the others at update 17, past the end, so the run exited 0 with
    stopped_on_collapse false (one worker, the same collapse exited 4)."""
    out = tmp_path / "last"
    proc = run_job(["train", "--algo", "ssgd", *SYNTHETIC, "--epochs", "1",
                    "--stop-on-collapse", "--out", str(out)], np=2,
                   env={"HPCTRAIN_INJECT": "nan@0:13,nan@0:14,nan@0:15"})
    assert proc.returncode == 4, proc.stderr
    s = json.loads((out / "summary.json").read_text())
    assert (s["collapsed_at"], s["updates"], s["stopped_on_collapse"]) == (16, 16, True)
    lines = proc.stderr.splitlines()
    warning = [x for x in lines if "warning: training collapsed" in x]
    errors = [x for x in lines if x.startswith("hpctrain: error")]
    assert len(warning) == 1 and "--stop-on-collapse ends" not in warning[0], proc.stderr
    assert len(errors) == 1 and "collapsed at update 16" in errors[0], proc.stderr

@pytest.mark.timeout(200)
def test_a_resumed_run_finds_no_collapse_in_the_snapshots_before_its_checkpoint(tmp_path):
    """Scored online, the restored snapshots were fed to the restored detector again: the
    first one's chance accuracy, after the best, was a collapse at update 0, and with
    --stop-on-collapse the resumed run ended there as finished (exit 4)."""
    out = str(tmp_path / "cut")
    train = ["train", "--algo", "sgd", *SYNTHETIC, "--epochs", "3", "--batch-size", "16",
             "--checkpoint-every", "1e", "--eval", "online", "--stop-on-collapse",
             "--out", out]
    killed = run_job(train, np=0, env={"HPCTRAIN_INJECT": "kill@0:300"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_job([*train, "--resume", "auto"], np=0)
    assert resumed.returncode == 0 and "collapsed" not in resumed.stderr, resumed.stderr
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    # resumed from the checkpoint at epoch 2 (128 steps an epoch), not started afresh
    assert summary["resumed_from_updates"] == [256], summary["resumed_from_updates"]
    assert summary["collapsed_at"] is None and summary["final_test_acc"] > 0.9
    points = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").open()]
    assert points[0]["test_acc"] < 0.2 and points[-1]["epoch"] == 3  # chance, then learned


# A model whose snapshot after its 64th training step scores at chance (a buffer flags it;
# training is untouched; a marker file keeps the resumed run from flagging again), scored
# slowly, so that --eval-rank's score of it is still on its way when rank 0 is killed.
ZAPPED_AT_64 = """
import os
import time
import torch
from torch import nn


class Zap(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.ReLU(),
                                 nn.Linear(64, num_classes))
        self.register_buffer("zap", torch.zeros(()))
        self.calls, self.classes = 0, num_classes

    def forward(self, x):
        if self.training:
            self.calls += 1
            marker = os.environ["ZAP_MARKER"]
            flag = self.calls == 64 and not os.path.exists(marker)
            if flag:
                open(marker, "w").close()
            self.zap.fill_(1.0 if flag else 0.0)
        else:
            time.sleep(0.3)
            if self.zap.item() == 1.0:
                return torch.zeros(x.shape[0], self.classes)
        return self.net(x)
"""


@pytest.mark.timeout(300)
def test_a_score_on_its_way_at_the_checkpoint_is_judged_after_the_resume(tmp_path):
    """With --eval-rank the checkpoint's detector may not have seen the last snapshots: the
    resumed run judges those (skipping every restored one missed this collapse at 64)."""
    (tmp_path / "zap.py").write_text(ZAPPED_AT_64)
    out = str(tmp_path / "run")
    train = ["train", "--algo", "sgd", "--dataset", "synthetic", "--model",
             f"{tmp_path / 'zap.py'}:Zap", "--epochs", "2", "--batch-size", "16", "--eval",
             "online", "--eval-every", "0.25", "--eval-rank", "1", "--checkpoint-every",
             "0.5e", "--no-progress", "--out", out]
    env = {"ZAP_MARKER": str(tmp_path / "zapped")}
    killed = run_job(train, np=2, timeout=120, env={**env, "HPCTRAIN_INJECT": "kill@0:64"})
    assert killed.returncode != 0 and (tmp_path / "zapped").exists(), killed.stderr
    resumed = run_job([*train, "--resume", "auto"], np=2, timeout=120, env=env)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["collapsed_at"] == 64, summary["collapse_reason"]


def test_a_long_stretch_at_chance_keeps_at_most_four_windows_of_losses():
    """The losses at chance go into every checkpoint (``flat``): a run sitting there for
    100 windows without collapsing (its snapshots score above chance) judges and clears them
    every four windows (an epoch's steps), and one that never learned is stopped there, so
    the checkpoint holds at most four windows' losses, not the whole stretch's."""
    detector = CollapseDetector(10, WINDOW)
    assert detector.accuracy(0, 0.3) is None
    kept = []
    for update, value in enumerate(noisy([CHANCE] * 100 * WINDOW), 1):
        assert detector.loss(update, value) is None
        kept.append(len(detector.state_dict()["flat"]))
    assert max(kept) == 4 * WINDOW - 1 and kept.count(0) == 25
    dead = CollapseDetector(10, WINDOW)
    assert first_collapse(dead, [CHANCE] * 100 * WINDOW) == 4 * WINDOW
    assert len(dead.state_dict()["flat"]) == 4 * WINDOW  # and no more after the collapse
