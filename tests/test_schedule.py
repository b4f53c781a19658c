"""The learning-rate schedules, and the update whose rate a step takes."""

import math

import pytest
import torch
from test_sim import config, sim

from hpctrain import algorithm_options, registry
from hpctrain.async_.algorithm import ASGD
from hpctrain.config import OptimConfig, StragglerConfig
from hpctrain.optimizers import scheduled_lr
from hpctrain.schedule import learning_rate, set_lr
from hpctrain.sim import simulate


@pytest.mark.parametrize("epoch, expected", [(0, 0.2), (1, 0.1), (2, 0.0), (0.5, 0.2 * 0.5 * (
    1 + math.cos(math.pi / 4))), (3, 0.0)])
def test_cosine_decays_to_zero_over_the_run_and_stays_there(epoch, expected):
    assert learning_rate(0.2, epoch, 2, "cosine") == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("epoch, expected", [(0, 0.2), (0.99, 0.2), (1, 0.1), (2.5, 0.1),
                                             (3, 0.05), (10, 0.05)])
def test_step_multiplies_by_gamma_at_each_milestone_reached(epoch, expected):
    assert learning_rate(0.2, epoch, 4, "step", (1, 3), 0.5) == pytest.approx(expected)


def test_a_step_decays_at_the_update_that_starts_at_its_milestone():
    """Update 34 of 25 an epoch starts at epoch 34/25 = 1.36, but the epoch was computed as
    1 + 9/25 = 1.3599999999999999 < 1.36: --lr-milestones 1.36 decayed at update 35."""
    optim = OptimConfig(epochs=3, lr_schedule="step", lr_milestones=(1.36, 2.72))
    rates = [scheduled_lr(optim, 0.2, 25, i) for i in (33, 34, 67, 68)]
    assert rates == [0.2, 0.2 * 0.1, 0.2 * 0.1, 0.2 * 0.1 ** 2]


def test_constant_keeps_the_base_rate():
    assert learning_rate(0.2, 3.5, 4, "constant", (1,), 0.5) == 0.2



def test_set_lr_sets_every_parameter_group():
    """A model with its own groups (weights and biases apart, as a script's optimizer may
    have) must follow the schedule in all of them, not in the first alone."""
    w, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([{"params": [w]}, {"params": [b], "lr": 0.5}], lr=0.1)
    set_lr(optimizer, 0.02)
    assert [g["lr"] for g in optimizer.param_groups] == [0.02, 0.02]

class RecordingASGD(ASGD):
    """asgd, recording each applied step's ticket and learning rate."""

    name = "asgd-recording"
    seen: list[tuple[int, float]] = []

    def apply(self):
        RecordingASGD.seen.append((self.ticket, self.optimizer.param_groups[0]["lr"]))
        return super().apply()


def test_an_async_step_takes_the_rate_of_the_update_it_makes(tmp_path, monkeypatch):
    """The rate comes from the step's ticket (its place in the global count), not from the
    worker's last push, which lags it by the pushes made since, a straggler's most: a slow
    worker met a milestone late (b6e801b)."""
    monkeypatch.setitem(registry.ALGORITHMS, RecordingASGD.name, RecordingASGD)
    RecordingASGD.seen = []
    optim = OptimConfig(epochs=2, batch_size=64, lr=0.1, lr_schedule="step",
                        lr_milestones=(1,), lr_gamma=0.5)
    c = config(RecordingASGD.name, tmp_path / "run", optim=optim,
               algorithm=algorithm_options("asgd")(),
               stragglers=StragglerConfig(slowdown="1:4"))
    summary = simulate(c, sim(3))
    per_epoch = summary["updates"] // 2
    assert len(RecordingASGD.seen) == summary["updates"]
    assert {t for t, _ in RecordingASGD.seen} == set(range(summary["updates"]))
    for ticket, lr in RecordingASGD.seen:
        assert lr == pytest.approx(0.1 if ticket < per_epoch else 0.05), ticket


@pytest.mark.parametrize("algo, workers, optim", [
    ("ssgd", 2, OptimConfig(epochs=2, batch_size=64, lr=0.1, warmup_epochs=0.5,
                            scale_lr=True)),
    ("asgd", 3, OptimConfig(epochs=2, batch_size=64, lr=0.1, lr_schedule="step",
                            lr_milestones=(1,), lr_gamma=0.5))])
def test_each_curve_point_records_the_rate_of_the_update_before_it(tmp_path, algo, workers,
                                                                   optim):
    """metrics.jsonl had no learning rate (TensorBoard's train/lr only): each point's ``lr``
    is the scheduled rate (warm-up and --scale-lr in) of update ``updates - 1``, the one
    the last step before it made, and at update 0 the first update's."""
    from hpctrain.metrics import read_points

    summary = simulate(config(algo, tmp_path / "run", optim=optim), sim(workers))
    points = read_points(tmp_path / "run")
    per_epoch = summary["updates"] // 2
    base = optim.lr * (workers if optim.scale_lr else 1)
    for point in points:
        update = max(point["updates"] - 1, 0)
        rate = learning_rate(base, update / per_epoch, 2, optim.lr_schedule or "cosine",
                             optim.lr_milestones, optim.lr_gamma)
        if optim.warmup_epochs:
            rate *= min(1.0, (update + 1) / per_epoch / optim.warmup_epochs)
        assert point["lr"] == pytest.approx(rate, rel=1e-12), point
    assert [p["updates"] for p in points][0] == 0 and points[-1]["updates"] == 2 * per_epoch
    last = 2 * per_epoch - 1
    assert points[-1]["lr"] == pytest.approx(
        0.2 * 0.5 * (1 + math.cos(math.pi * last / (2 * per_epoch))) if algo == "ssgd"
        else 0.05)
