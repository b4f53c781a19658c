"""``--mixed-precision bf16|fp16``: the forward under autocast, the rest in float32; fp16 with
loss scaling."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SYNTHETIC, run_job
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from hpctrain import precision
from hpctrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from hpctrain.microbatch import mean_in_parts
from hpctrain.sim import SimConfig, simulate

FP16_CPU = hasattr(torch.amp, "GradScaler")  # what precision.check asks (torch >= 2.3)
needs_fp16 = pytest.mark.skipif(not FP16_CPU, reason="torch < 2.3: no CPU loss scaler")


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def test_the_forward_runs_in_the_half_type_and_backward_leaves_float32_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    seen = []
    model[2].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))

    def loss(a, b):
        return nn.functional.cross_entropy(model(a), b)

    cpu = torch.device("cpu")
    for choice, dtype in (("no", torch.float32), ("bf16", torch.bfloat16),
                          ("fp16", torch.float16))[:3 if FP16_CPU else 2]:
        seen.clear()
        model.zero_grad()
        parts = list(precision.each_under(choice, cpu, mean_in_parts(loss, x, y, 5)))
        assert seen == [dtype] * 3  # every part's forward
        for part in parts:
            assert part.dtype == torch.float32  # autocast keeps the loss in float32
            part.backward()
        assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
        assert not _autocast_on()  # nothing leaks past the loop


@needs_fp16
def test_fp16_scales_the_loss_divides_it_out_and_halves_after_an_overflow():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    plain = [p.grad.clone() for p in model.parameters()]

    scaler = precision.LossScaler("fp16")
    assert scaler.on and scaler.get_scale() == 65536.0
    model.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    assert not torch.allclose(model.weight.grad, plain[0])  # scaled
    scaler.unscale(opt)
    for p, g in zip(model.parameters(), plain, strict=True):
        torch.testing.assert_close(p.grad, g)  # divided out before the guard sees it
    scaler.update(skipped=False)
    assert scaler.get_scale() == 65536.0  # a clean step keeps it

    model.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y) * float("inf")).backward()
    scaler.unscale(opt)
    assert not torch.isfinite(model.weight.grad).all()  # the guard skips this step
    scaler.update(skipped=True)
    assert scaler.get_scale() == 32768.0
    again = precision.LossScaler("fp16")
    again.load_state_dict(scaler.state_dict())  # a checkpoint keeps the scale
    assert again.get_scale() == 32768.0

    off = precision.LossScaler("bf16")
    loss = torch.tensor(2.0)
    assert not off.on and off.scale(loss) is loss and off.state_dict() == {}


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="RunConfig.mixed_precision='fp8' is unknown"):
        RunConfig(algo="sgd", mixed_precision="fp8")


@pytest.mark.parametrize("mixed", ["bf16", pytest.param("fp16", marks=needs_fp16)])
@pytest.mark.parametrize("algo", ["sgd", "ssgd", "ec", "dcasgd-a"])
def test_every_algorithm_trains_in_half_precision(tmp_path, algo, mixed):
    """Simulated (real algorithms, one process): the bf16 or fp16 run learns as the float32
    one does, its model stays float32, and it is not the float32 run's model (the option took
    effect)."""
    def run(name: str, mixed: str) -> tuple[dict, dict]:
        config = RunConfig(algo=algo, seed=2, out=str(tmp_path / name), progress=False,
                           data=DataConfig(dataset="synthetic"), model=ModelConfig(name="mlp"),
                           optim=OptimConfig(epochs=1, batch_size=24), mixed_precision=mixed)
        workers = 1 if algo == "sgd" else 4
        summary = simulate(config, SimConfig(workers=workers, step_time="constant:0.01"))
        return summary, torch.load(tmp_path / name / "model.pt", weights_only=True)

    (full, a), (half, b) = run("fp32", "no"), run(mixed, mixed)
    workers = 1 if algo == "sgd" else 4
    assert full["loss_scale_per_worker"] == [None] * workers
    assert all((s is None) == (mixed == "bf16") for s in half["loss_scale_per_worker"])
    assert half["final_test_acc"] >= full["final_test_acc"] - 0.05 > 0.5
    assert all(t.dtype == torch.float32 for t in b.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)


@needs_fp16
def test_fp16_from_the_command_line_skips_an_overflowing_step(tmp_path):
    """ssgd on 2 ranks in fp16, an Inf loss injected at step 3 on rank 1: the reduced
    gradient overflows, every rank skips that step together, and training goes on."""
    proc = run_job(["train", "--algo", "ssgd", *SYNTHETIC, "--epochs", "1",
                    "--mixed-precision", "fp16", "--tensorboard", "--out", str(tmp_path)], np=2,
                   env={"HPCTRAIN_INJECT": "inf@1:3"})
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["mixed_precision"] == "fp16"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped_steps"] >= 1 and summary["bad_gradients_per_worker"][1] >= 1
    scales = summary["loss_scale_per_worker"]  # halved at least once, the same on both ranks
    assert scales[0] == scales[1] <= 32768.0
    assert summary["final_test_acc"] > 0.5
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    logged = [e.value for e in board.Scalars("train/loss_scale")]  # rank 0's, as it went
    assert logged and logged[-1] == scales[0] and max(logged) <= 65536.0


@needs_fp16
def test_the_scaler_follows_torchs_grad_scaler_step_for_step():
    """The same scale as ``torch.amp.GradScaler`` after every step (growth interval shortened
    on both), overflows at random places, and its state dict under the same names."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    theirs = torch.amp.GradScaler("cpu", growth_interval=5)
    ours = precision.LossScaler("fp16")
    ours.GROWTH_INTERVAL = 5
    overflows = torch.rand(120) < 0.15
    for bad in overflows.tolist():
        opt.zero_grad()
        theirs.scale(model(torch.randn(4, 3)).sum()).backward()
        if bad:
            model.weight.grad[0, 0] = float("inf")
        theirs.unscale_(opt)
        theirs.step(opt)
        theirs.update()
        ours.update(skipped=bad)
        assert ours.get_scale() == theirs.get_scale()
    assert ours.get_scale() != 65536.0  # it moved
    mine = ours.state_dict()
    assert {k: mine[k] for k in theirs.state_dict()} == theirs.state_dict()


@needs_fp16
def test_a_grad_scaler_state_past_the_growth_interval_still_grows():
    """Read from a ``GradScaler`` with a longer growth interval (5,000 here), whose count of
    clean steps is past this scaler's 2,000: the scale doubles at the next clean step. It
    compared the count for equality and never grew again."""
    theirs = torch.amp.GradScaler("cpu", growth_interval=5000)
    state = {**theirs.state_dict(), "_growth_tracker": 2100}
    ours = precision.LossScaler("fp16")
    ours.load_state_dict(state)
    ours.update(skipped=False)
    assert ours.get_scale() == 2 * 65536.0
    ours.update(skipped=False)
    assert ours.get_scale() == 2 * 65536.0  # the count starts again
