"""The learning-rate schedules, and the update whose rate a step takes."""

import math

import pytest
from test_sim import config, sim

from hpctrain import algorithm_options, registry
from hpctrain.async_.algorithm import ASGD
from hpctrain.config import OptimConfig, StragglerConfig
from hpctrain.schedule import learning_rate
from hpctrain.sim import simulate


@pytest.mark.parametrize("epoch, expected", [(0, 0.2), (1, 0.1), (2, 0.0), (0.5, 0.2 * 0.5 * (
    1 + math.cos(math.pi / 4))), (3, 0.0)])
def test_cosine_decays_to_zero_over_the_run_and_stays_there(epoch, expected):
    assert learning_rate(0.2, epoch, 2, "cosine") == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("epoch, expected", [(0, 0.2), (0.99, 0.2), (1, 0.1), (2.5, 0.1),
                                             (3, 0.05), (10, 0.05)])
def test_step_multiplies_by_gamma_at_each_milestone_reached(epoch, expected):
    assert learning_rate(0.2, epoch, 4, "step", (1, 3), 0.5) == pytest.approx(expected)


def test_constant_keeps_the_base_rate():
    assert learning_rate(0.2, 3.5, 4, "constant", (1,), 0.5) == 0.2


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
