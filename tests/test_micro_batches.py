"""Gradient accumulation (``--micro-batch-size``): a batch forwarded and backwarded in parts
gives the update of the whole batch, to float rounding, for every algorithm."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from conftest import SYNTHETIC, refusal, run_commands
from torch import nn
from torch.nn import functional as F

from hpctrain import arguments, cli, devices, launch_checks
from hpctrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from hpctrain.ec.compression import EnsembleCompression
from hpctrain.errors import UsageError
from hpctrain.microbatch import mean_in_parts, one_sample, parts
from hpctrain.result import Summary
from hpctrain.sim import SimConfig, simulate


def parse(args: list[str]) -> RunConfig:
    return arguments.build(cli.build_parser().parse_args(["train", *args]))


def _grads(model: nn.Module, parts) -> list[torch.Tensor]:
    model.zero_grad()
    total = 0.0
    for part in parts:
        part.backward()
        total += part.detach()
    return [total, *(p.grad.clone() for p in model.parameters())]


def test_parts_add_up_to_the_batch_loss_and_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(11, 6), torch.randint(0, 3, (11,))

    def loss(a, b):
        return F.cross_entropy(model(a), b)

    whole = _grads(model, mean_in_parts(loss, x, y, None))
    assert len(list(mean_in_parts(loss, x, y, 11))) == 1
    for size in (1, 4, 10):  # 11 in parts of 4: 4, 4, 3 (unequal parts are weighted)
        assert len(list(mean_in_parts(loss, x, y, size))) == -(-11 // size)
        for a, b in zip(whole, _grads(model, mean_in_parts(loss, x, y, size)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # unweighted parts (a plain mean per part) would not add up: the check can fail
    plain = _grads(model, (loss(a, b) for a, b in zip(x.split(4), y.split(4), strict=True)))
    assert not torch.allclose(whole[0], plain[0])


def test_a_batch_is_split_into_near_equal_parts():
    """As many parts as before (ceil(batch / size), what ssgd's backward_passes_per_step
    counts), each at most ``size``, but near-equal: 64 in parts of at most 7 had a last part
    of 1 sample, on which batch norm raised after MPI started."""
    x, y = torch.arange(64.0).unsqueeze(1), torch.zeros(64, dtype=torch.long)
    seen = []
    list(mean_in_parts(lambda a, b: seen.append(len(b)) or a.sum(), x, y, 7))
    assert seen == [7, 7, 7, 7, 6, 6, 6, 6, 6, 6] and parts(64, 7) == 10
    for n, size in ((11, 4), (24, 10), (16, 10), (5, 2)):
        seen.clear()
        list(mean_in_parts(lambda a, b: seen.append(len(b)) or a.sum(), x[:n], y[:n], size))
        assert len(seen) == parts(n, size) == -(-n // size) and sum(seen) == n
        assert max(seen) <= size and max(seen) - min(seen) <= 1


def test_the_batches_and_parts_of_one_sample_a_run_meets_are_found():
    assert one_sample(2048, 64, 7) is None and one_sample(2048, 64, None) is None
    assert one_sample(2048, 64, 2) is None and one_sample(1024, 24, 10) is None
    assert "--batch-size 89 leaves 1 sample in each epoch's last batch (2048 samples" in \
        one_sample(2048, 89, None)
    assert one_sample(2048, 1, None) == "--batch-size 1 trains on one sample at a time"
    assert "--micro-batch-size 2 splits a batch of 63 (--batch-size 63) into 32 parts" in \
        one_sample(2048, 63, 2)
    # 2047 = 21 x 96 + 31: batches of 96 split evenly in 2s, the last one of 31 does not
    assert "splits each epoch's last batch of 31 (--batch-size 96)" in one_sample(2047, 96, 2)
    assert one_sample(2047, 96, 3) is None
    assert "each worker gets 1 sample per epoch" in one_sample(1, 64, None)


BATCH_NORM_MLP = """
from torch import nn


def build(input_shape, num_classes):
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, num_classes))
"""


def test_a_batch_norm_model_is_refused_before_mpi_where_it_would_meet_one_sample(tmp_path):
    """2,048 synthetic samples per worker: --batch-size 89 leaves a last batch of 1, and
    --micro-batch-size 2 splits a batch of 63 into parts of 2 and one of 1. BatchNorm1d raises
    on one sample in training mode: refused in one line before MPI starts, exit 2 (it was an
    error on every rank at that step, after MPI started)."""
    (tmp_path / "bn.py").write_text(BATCH_NORM_MLP)
    common = ["--algo", "sgd", *SYNTHETIC, "--model", f"{tmp_path}/bn.py:build"]
    message = refusal([*common, "--batch-size", "89"])
    assert message.startswith(f"--model {tmp_path}/bn.py:build cannot train on one sample")
    assert "Expected more than 1 value per channel" in message
    assert "--batch-size 89 leaves 1 sample in each epoch's last batch" in message
    message = refusal([*common, "--batch-size", "63", "--micro-batch-size", "2"])
    assert "--micro-batch-size 2 splits a batch of 63 (--batch-size 63)" in message
    # On 2 ranks each holds 1,024: 89 leaves a last batch of 45, which trains.
    launch_checks.check_launch(parse(["--algo", "ssgd", *common[2:], "--batch-size", "89"]), 2)
    # no BN
    launch_checks.check_launch(parse(["--algo", "sgd", *SYNTHETIC, "--batch-size", "89"]), 1)


def test_a_batch_norm_model_trains_in_micro_batches_that_left_one_sample(tmp_path):
    """--batch-size 64 --micro-batch-size 7 made parts of 7 and a last one of 1, and the run
    failed at its first step; the near-equal parts are of 6 and 7."""
    (tmp_path / "bn.py").write_text(BATCH_NORM_MLP)
    config = RunConfig(algo="sgd", seed=3, out=str(tmp_path / "run"), progress=False,
                       data=DataConfig(dataset="synthetic"),
                       model=ModelConfig(name=f"{tmp_path}/bn.py:build"),
                       optim=OptimConfig(epochs=1, batch_size=64, micro_batch_size=7))
    summary = simulate(config, SimConfig(workers=1, step_time="constant:0.01"))
    assert summary["updates"] == 32 and summary["final_test_acc"] > 0.5


def test_ec_splits_its_relabelled_samples_across_the_parts():
    """EC's step batch is the ordinary samples then the relabelled ones; parts may straddle
    the two, and the distillation samples are counted once per step, not once per part."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    xd, yd = torch.randn(7, 6), torch.randint(0, 3, (7,))
    teacher = torch.softmax(torch.randn(7, 3), dim=1)

    def ec() -> EnsembleCompression:
        agg = EnsembleCompression(model, comm=None, tau=1, alpha=0.7, temperature=2.0,
                                  distill_size=7)
        agg.relabelled = (xd, yd, teacher)  # as aggregate() leaves them: all for this step
        return agg

    one = ec()
    whole = _grads(model, [one.loss(x, y)])
    assert one.distilled == 7
    for size in (3, 5, 8, 14):  # 5: parts 5 | 3 ordinary + 2 relabelled | 5 relabelled
        agg = ec()
        parts = list(agg.losses(x, y, size))
        assert len(parts) == -(-15 // size) and agg.distilled == 7
        for a, b in zip(whole, _grads(model, parts), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ec_parts_are_near_equal_so_batch_norm_never_sees_one_sample():
    """EC cut its batch and relabelled samples into parts of exactly --micro-batch-size and a
    remainder: 8 + 7 samples in parts of 14 made a last part of 1, on which BatchNorm1d
    raises in training mode, after MPI started (the launch check sees the ordinary batch
    only). Near-equal parts, as for the other algorithms: 8 and 7, the same gradient."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    xd, yd = torch.randn(7, 6), torch.randint(0, 3, (7,))
    agg = EnsembleCompression(model, comm=None, tau=1, alpha=0.7, temperature=2.0,
                              distill_size=7)
    agg.relabelled = (xd, yd, torch.softmax(torch.randn(7, 3), dim=1))
    sizes = []
    model.register_forward_pre_hook(lambda _, args: sizes.append(len(args[0])))
    parts = list(agg.losses(x, y, 14))
    _grads(model, parts)
    assert sizes == [8, 7] and agg.distilled == 7


def test_peak_memory_on_the_cpu_is_the_resident_peak():
    before = devices.peak_memory(torch.device("cpu"))
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written, so resident
    assert devices.peak_memory(torch.device("cpu")) >= max(before, 60 * 2**20)
    del block


def test_a_micro_batch_larger_than_the_batch_is_refused():
    # From Python the fields the caller gave (the command line's flags: test_option_checks)
    with pytest.raises(UsageError, match="^OptimConfig.micro_batch_size=65 exceeds "
                       "OptimConfig.batch_size=64$"):
        OptimConfig(batch_size=64, micro_batch_size=65)
    with pytest.raises(ValueError, match="OptimConfig.micro_batch_size=0 must be"):
        OptimConfig(micro_batch_size=0)


@pytest.mark.parametrize("algo", ["sgd", "ssgd", "ma", "ec", "dcasgd-a", "ssp"])
def test_every_algorithm_takes_the_same_steps_in_micro_batches(tmp_path, algo):
    """In the simulator (the real algorithms on one process, a fixed virtual schedule): the
    same run with micro-batches of 10 out of 24 ends at the same model. 2,048 samples over 4
    workers leave a last batch of 8, a single part."""
    def run(name: str, micro: int | None) -> dict:
        optim = OptimConfig(epochs=1, batch_size=24, micro_batch_size=micro)
        config = RunConfig(algo=algo, seed=3, out=str(tmp_path / name), progress=False,
                           data=DataConfig(dataset="synthetic"), model=ModelConfig(name="mlp"),
                           optim=optim)
        workers = 1 if algo == "sgd" else 4
        summary = simulate(config, SimConfig(workers=workers, step_time="constant:0.01"))
        return summary, torch.load(tmp_path / name / "model.pt", weights_only=True)

    workers = 1 if algo == "sgd" else 4
    (plain, a), (micro, b) = run("plain", None), run("micro", 10)
    assert plain["updates"] == micro["updates"] > 0
    typed = Summary.__required_keys__  # train()'s type: the keys every run and algo has
    assert typed <= plain.keys() <= typed | Summary.__optional_keys__
    assert plain["samples_per_worker"] == micro["samples_per_worker"]
    assert micro["peak_memory_per_worker"] == [None] * workers  # one process for them all
    # a simulation's times are virtual: no load recorded (it made two summaries differ);
    # the node's CPUs are (a real run's load: test_cli's finished run)
    assert plain["load_average_start"] is plain["load_average_end"] is None
    assert plain["machine_cpus"] == os.cpu_count()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    if algo == "ec":  # relabelled samples rode along, split into the parts
        assert micro["distilled_samples_per_rank"] == \
            plain["distilled_samples_per_rank"] > 0


def test_training_forwards_the_parts_not_the_batch(tmp_path):
    """The loop really splits: a model that logs its training forwards' batch sizes sees
    parts of 8 (24 in near-equal parts of at most 10; the last batch of 2,048 samples is 8),
    and without --micro-batch-size the whole batches of 24."""
    sizes = tmp_path / "sizes.txt"
    (tmp_path / "logged.py").write_text(f"""
import math

from torch import nn


class Logged(nn.Sequential):
    def forward(self, x):
        if self.training:
            with open({str(sizes)!r}, "a") as log:
                log.write(f"{{x.shape[0]}}\\n")
        return super().forward(x)


def build(input_shape, num_classes):
    return Logged(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
""")

    def seen(micro: int | None) -> set[int]:
        sizes.write_text("")
        optim = OptimConfig(epochs=1, batch_size=24, micro_batch_size=micro)
        config = RunConfig(algo="sgd", seed=3, out=str(tmp_path / f"run-{micro}"),
                           progress=False, data=DataConfig(dataset="synthetic"),
                           model=ModelConfig(name=f"{tmp_path / 'logged.py'}:build"),
                           optim=optim)
        simulate(config, SimConfig(workers=1, step_time="constant:0.01"))
        logged = [int(n) for n in sizes.read_text().split()]
        assert logged[0] == 2  # the model's check before the run (model_checks.check_model)
        return set(logged[1:])

    assert seen(10) == {8}
    assert seen(None) == {24, 8}


@pytest.fixture(scope="module")
def ssgd_jobs(tmp_path_factory):
    """ssgd on 2 ranks with and without micro-batches, per backend (Horovod's where it is
    installed), all in one launch: {backend: (launch, folder with plain/ and micro/)}."""
    folder = tmp_path_factory.mktemp("ssgd")
    backends = ["mpi", *(["horovod"] if importlib.util.find_spec("horovod") else [])]
    runs = []
    for backend in backends:
        common = ["--algo", "ssgd", *SYNTHETIC, "--epochs", "1", "--batch-size", "24",
                  "--sync-backend", backend, "--seed", "4"]
        runs += [["train", *common, "--out", str(folder / backend / "plain")],
                 ["train", *common, "--micro-batch-size", "10",
                  "--out", str(folder / backend / "micro")]]
    proc = run_commands(runs, np=2, timeout=280)
    return {backend: (proc, folder / backend) for backend in backends}


@pytest.mark.parametrize("backend", ["mpi", "horovod"], ids=["mpi-backend", "horovod"])
def test_ssgd_accumulates_micro_batches_before_the_allreduce(ssgd_jobs, backend):
    """Real ranks: DistributedOptimizer's backward_passes_per_step holds each bucket until the
    last micro-batch (three parts of 8 of a batch of 24; the last batch of 16 makes two
    parts, fewer than the passes, and step() sends what backward did not)."""
    if backend == "horovod":
        pytest.importorskip("horovod")
    proc, out = ssgd_jobs[backend]
    assert proc.returncode == 0, proc.stderr
    a, b = (torch.load(out / n / "model.pt", weights_only=True) for n in ("plain", "micro"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    config = json.loads((out / "micro" / "config.json").read_text())
    assert config["optim"]["micro_batch_size"] == 10
    peaks = json.loads((out / "micro" / "summary.json").read_text())["peak_memory_per_worker"]
    assert len(peaks) == 2 and all(p > 2**20 for p in peaks)  # each rank's resident peak
