"""``--mixed-precision bf16``: the forward in bfloat16 under autocast, the rest in float32."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SYNTHETIC, run_job
from torch import nn

from hpctrain import precision
from hpctrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from hpctrain.microbatch import mean_in_parts
from hpctrain.sim import SimConfig, simulate


def test_the_forward_runs_in_bfloat16_and_backward_leaves_float32_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    seen = []
    model[2].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))

    def loss(a, b):
        return nn.functional.cross_entropy(model(a), b)

    cpu = torch.device("cpu")
    for choice, dtype in (("no", torch.float32), ("bf16", torch.bfloat16)):
        seen.clear()
        model.zero_grad()
        parts = list(precision.each_under(choice, cpu, mean_in_parts(loss, x, y, 5)))
        assert seen == [dtype] * 3  # every part's forward
        for part in parts:
            assert part.dtype == torch.float32  # autocast keeps the loss in float32
            part.backward()
        assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
        assert not torch.is_autocast_enabled("cpu")  # nothing leaks past the loop


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="--mixed-precision"):
        RunConfig(algo="sgd", mixed_precision="fp16")


@pytest.mark.parametrize("algo", ["sgd", "ssgd", "ec", "dcasgd-a"])
def test_every_algorithm_trains_in_bf16(tmp_path, algo):
    """Simulated (real algorithms, one process): the bf16 run learns as the float32 one does,
    its model stays float32, and it is not the float32 run's model (the option took effect)."""
    def run(name: str, mixed: str) -> tuple[dict, dict]:
        config = RunConfig(algo=algo, seed=2, out=str(tmp_path / name), progress=False,
                           data=DataConfig(dataset="synthetic"), model=ModelConfig(name="mlp"),
                           optim=OptimConfig(epochs=1, batch_size=24), mixed_precision=mixed)
        workers = 1 if algo == "sgd" else 4
        summary = simulate(config, SimConfig(workers=workers, step_time="constant:0.01"))
        return summary, torch.load(tmp_path / name / "model.pt", weights_only=True)

    (full, a), (half, b) = run("fp32", "no"), run("bf16", "bf16")
    assert half["final_test_acc"] >= full["final_test_acc"] - 0.05 > 0.5
    assert all(t.dtype == torch.float32 for t in b.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_bf16_from_the_command_line(tmp_path):
    proc = run_job(["train", "--algo", "ssgd", *SYNTHETIC, "--epochs", "1",
                    "--mixed-precision", "bf16", "--out", str(tmp_path)], np=2)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["mixed_precision"] == "bf16"
    assert json.loads((tmp_path / "summary.json").read_text())["final_test_acc"] > 0.5
