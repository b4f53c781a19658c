"""``--mixed-precision fp16``: a step the loss scale overflowed is skipped but is not a bad step.

torch's GradScaler starts at 65,536 and halves after each overflow, so a model whose gradients
need a scale of 2 overflows 15 times in a row first; counted as NaN/Inf steps, those ended
the run at ``--max-bad-steps`` (10 by default) before it trained one step.

Run the MPI test: mpirun -np 2 python -m pytest --with-mpi -m mpi tests/test_fp16_overflow.py
"""

from __future__ import annotations

import pytest
import torch

from hpctrain import precision
from hpctrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from hpctrain.guard import GradientGuard, TooManyBadSteps
from hpctrain.sim import SimConfig, simulate

needs_fp16 = pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"),
                                reason="torch < 2.3: no fp16 on the CPU")

INF, NAN = float("inf"), float("nan")


def above_1() -> bool:  # LossScaler.amplifies at a scale above 1
    return True


def at_most_1() -> bool:  # and at 1 or below
    return False


def bad_gradients(model: torch.nn.Module, value: float = INF) -> None:
    model.zero_grad()
    (model(torch.ones(2, 3)).sum() * value).backward()


def test_an_overflow_at_a_scale_above_1_is_skipped_but_not_counted_as_bad():
    model = torch.nn.Linear(3, 2)
    guard = GradientGuard(model.parameters(), max_bad_steps=2)
    for update in range(5):  # more than --max-bad-steps in a row
        bad_gradients(model)
        assert not guard.check(update, amplified=above_1, loss=torch.tensor(2.0))
        assert guard.overflowed and guard.consecutive == 0
    assert guard.summary()["skipped_steps"] == 5 and guard.bad_here == 5
    bad_gradients(model)
    assert not guard.check(5, amplified=at_most_1, loss=2.0)  # bf16, fp32, or a scale of 1 or below
    assert not guard.overflowed and guard.consecutive == 1
    bad_gradients(model, NAN)
    with pytest.raises(TooManyBadSteps, match=r"2 consecutive steps \(local steps 5-6\)"):
        guard.check(6, amplified=above_1, loss=torch.tensor(NAN))  # the loss itself is not finite


@needs_fp16
def test_the_scaler_amplifies_above_1_and_keeps_its_overflow_count():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = precision.LossScaler("fp16")
    overflows = 0
    while scaler.amplifies():
        model.zero_grad()
        scaler.scale(model(torch.ones(2, 3)).sum() * INF).backward()
        scaler.unscale(opt)
        scaler.update(True, overflowed=True)
        overflows += 1
    assert overflows == 16 and scaler.get_scale() == 1.0  # 65,536 halved to 1
    assert scaler.overflows == scaler.overflow_steps() == 16
    again = precision.LossScaler("fp16")
    again.load_state_dict(scaler.state_dict())  # a checkpoint keeps the count and the scale
    assert again.overflows == 16 and again.get_scale() == 1.0
    older = {k: v for k, v in scaler.state_dict().items() if k != "overflows"}
    again.load_state_dict(older)  # a checkpoint from before the count
    assert again.overflows == 0 and again.get_scale() == 1.0
    off = precision.LossScaler("bf16")
    assert not off.amplifies() and off.overflow_steps() is None


AMP = '''
import torch
from torch import nn


class Amp(nn.Module):
    """A linear classifier whose logits are its output times 20,000: the gradient at the
    layer's float16 output is 20,000 times the loss's, so the scaler must fall to 1."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        c, h, w = input_shape
        self.fc = nn.Linear(c * h * w, num_classes)
        with torch.no_grad():
            self.fc.weight.mul_(1e-4)
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.flatten(1)) * 20000.0
'''


@needs_fp16
@pytest.mark.parametrize("algo, workers", [("sgd", 1), ("ssgd", 2), ("ma", 2)])
def test_a_model_that_needs_a_low_scale_trains_through_its_overflows(tmp_path, algo, workers):
    """Simulated (the real loop, one process), --max-bad-steps 10: the scale falls from 65,536
    to 1 in 16 overflows in a row, each skipped and counted apart, and the run goes on. ssgd's
    ranks see the same reduced gradient: the same overflows, skipped together."""
    (tmp_path / "amp.py").write_text(AMP)

    def run(mixed: str) -> dict:
        config = RunConfig(algo=algo, seed=0, out=str(tmp_path / mixed), progress=False,
                           data=DataConfig(dataset="synthetic"),
                           model=ModelConfig(name=f"{tmp_path}/amp.py:Amp"),
                           optim=OptimConfig(epochs=1, batch_size=8, lr=1e-12),
                           mixed_precision=mixed, max_bad_steps=10)
        return simulate(config, SimConfig(workers=workers, step_time="constant:0.01"))

    summary = run("fp16")
    assert summary["overflow_steps_per_worker"] == [16] * workers
    assert summary["loss_scale_per_worker"] == [1.0] * workers
    alone = algo == "ma"  # each worker skips its own: skipped_steps sums them
    assert summary["skipped_steps"] == 16 * (workers if alone else 1)
    assert run("no")["overflow_steps_per_worker"] == [None] * workers


def world():
    from hpctrain import comm

    return comm.world()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_with_adasum_the_ranks_agree_whether_a_step_overflowed():
    """Adasum's gradients stay local, so the ranks agree on the verdict: rank 1's overflow is
    one on every rank; its NaN loss is a bad step on every rank, stopped on rank 0."""
    comm = world()
    rank = comm.Get_rank()
    model = torch.nn.Linear(3, 2)
    guard = GradientGuard(model.parameters(), max_bad_steps=2, comm=comm, agree=True)
    for update in range(3):
        bad_gradients(model, INF if rank == 1 else 1.0)
        assert not guard.check(update, amplified=above_1, loss=torch.tensor(2.0))
        assert guard.overflowed and guard.consecutive == 0
    bad_gradients(model, NAN if rank == 1 else 1.0)
    loss = torch.tensor(NAN if rank == 1 else 2.0)
    assert not guard.check(3, amplified=above_1, loss=loss)
    assert not guard.overflowed and guard.consecutive == 1
    assert guard.summary()["bad_gradients_per_worker"][:2] == [0, 4]


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_with_adasum_every_ranks_scale_follows_the_agreed_verdict():
    """Rank 1's overflow skips the step on every rank, and every rank's scale halves with it:
    torch's GradScaler looked at each rank's own gradient, so only rank 1's halved and the
    ranks' scales drifted apart."""
    comm = world()
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GradientGuard(model.parameters(), max_bad_steps=2, comm=comm, agree=True)
    scaler = precision.LossScaler("fp16")
    for step, factor in enumerate((INF if comm.Get_rank() == 1 else 1.0, 1.0)):
        model.zero_grad()  # run.py's order of calls
        scaler.scale(model(torch.ones(2, 3)).sum() * factor).backward()
        scaler.unscale(opt)
        applied = guard.check(step, amplified=scaler.amplifies, loss=torch.tensor(2.0))
        scaler.update(not applied, guard.overflowed)
        assert applied == (step == 1)  # the first skipped on every rank
    assert comm.allgather((scaler.get_scale(), scaler.overflows)) == \
        [(32768.0, 1)] * comm.Get_size()
