"""``--compile``: the model's forward through torch.compile, the same steps to float rounding
for every algorithm, and a one-line refusal before MPI where TorchInductor cannot work."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import SYNTHETIC, horovod_missing, run_commands
from torch import nn
from torch.nn import functional as F

from hpctrain import compiled, microbatch, options
from hpctrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from hpctrain.errors import UsageError
from hpctrain.sim import SimConfig, simulate

WHY_NOT = compiled.problem("cpu")  # e.g. torch 2.1 (scripts/compat-check.sh) has no Module.compile
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"--compile {WHY_NOT}")
IN_THREADS = compiled.problem("cpu", in_threads=True)  # the simulator's workers are threads


def test_check_refuses_a_cpu_without_a_cxx_compiler(tmp_path, monkeypatch):
    compiled.check(True, "cpu")  # this machine has g++ and Python's headers
    compiled.check(False, "cpu")
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no compiler on PATH
    monkeypatch.delenv("CXX", raising=False)
    compiled.check(False, "cpu")  # nothing is asked without --compile
    with pytest.raises(UsageError, match="^--compile on the CPU needs a C\\+\\+ compiler"), \
            options.command_line():  # as typed (tests/test_devices.py: from Python too)
        compiled.check(True, "cpu")
    assert "C++ compiler" in compiled.problem("cpu")  # what hpctrain info says


@pytest.mark.parametrize("names, cxx", [(["c++"], None), (["clang++"], None),
                                        (["g++"], "/nonexistent/g++")])
def test_check_refuses_a_cxx_compiler_torchinductor_does_not_run(tmp_path, monkeypatch, names,
                                                                 cxx):
    """Inductor runs CXX, else g++, and no other name: c++ or clang++ alone on PATH, or a CXX
    that is not there beside a g++, were taken and failed at the first step, after MPI."""
    for name in names:
        (tmp_path / name).symlink_to("/usr/bin/true")
    monkeypatch.setenv("PATH", str(tmp_path))
    if cxx is None:
        monkeypatch.delenv("CXX", raising=False)
    else:
        monkeypatch.setenv("CXX", cxx)
    why = compiled.problem("cpu")
    assert why is not None and why.startswith("on the CPU needs a C++ compiler (CXX, else g++ "
                                              "on PATH)"), why
    assert why.endswith(f"CXX={cxx!r} was not found" if cxx else "none was found"), why


def test_check_refuses_a_gpu_without_a_c_compiler_for_triton(tmp_path, monkeypatch):
    """Triton builds its CUDA driver module with CC, gcc or clang the first time it runs:
    after MPI started, unless the check finds none before. (No GPU here: Triton is taken as
    present to reach that check.)"""
    monkeypatch.setattr(compiled, "_has_triton", lambda: True)
    assert compiled.problem("cuda") is None  # gcc and Python's headers are here
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(UsageError, match="^--compile on a GPU needs a C compiler .*Triton"), \
            options.command_line():
        compiled.check(True, "cuda")


def test_the_compiled_model_computes_the_plain_one_and_keeps_its_state_names():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    model = copy.deepcopy(plain)
    compiled.apply(True, model)
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    for m in (plain, model):
        F.cross_entropy(m(x), y).backward()
    torch.testing.assert_close(model(x), plain(x))
    for p, q in zip(plain.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    assert list(model.state_dict()) == list(plain.state_dict())  # checkpoints read the same
    # A copy (the simulator's workers, the online scorer's scratch model) runs its own weights
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    assert torch.count_nonzero(other(x)) == 0 and torch.count_nonzero(model(x)) > 0


def _compiling() -> bool:
    return getattr(torch.compiler, "is_compiling", torch._dynamo.is_compiling)()


class CompiledOtherwise(nn.Module):
    """Computes otherwise when compiled, as a wrong kernel does: torch 2.13's Inductor got
    LeNet's CPU convolution gradients 0.39 off at some batch sizes, and a run trained on
    them, silently (sgd, batch 32: 0.58 against 0.998). ``float32_inside``: its forward
    makes float32 of its input, so it cannot run in float64."""

    def __init__(self, dropout: float = 0.0, float32_inside: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Dropout(dropout),
                                 nn.Linear(5, 3))
        self.float32_inside = float32_inside

    def forward(self, x):
        return self.net(x.float() if self.float32_inside else x) * (1.5 if _compiling() else 1)


class RoundsInFloat32(nn.Module):
    """Off float64 by 3e-2 uncompiled in float32, as a deep model's rounding can be (float32
    leaves ResNet-20's gradients 4e-3 off float64's at its start), and right compiled."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))

    def forward(self, x):
        y = self.net(x)
        return y * 1.03 if y.dtype == torch.float32 and not _compiling() else y


def test_a_compiled_model_whose_gradients_are_wrong_trains_uncompiled(capsys):
    torch.manual_seed(0)
    right = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    x = torch.randn(8, 6)
    for model, kept in ((right, True), (RoundsInFloat32(), True), (CompiledOtherwise(), False),
                        (CompiledOtherwise(float32_inside=True), False)):
        compiled.apply(True, model)
        before, rng = copy.deepcopy(model.state_dict()), torch.get_rng_state()
        assert compiled.verify(model, x, rank=1) is kept and compiled.is_compiled(model) is kept
        # nothing changed: batch norm's statistics, the generator, the gradients
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(p.grad is None for p in model.parameters())
        if not kept:
            assert not compiled.first_call(model, "train", 16)  # plain from here: no compiling
    # Held to float64's where the model runs in float64, else to the uncompiled ones.
    said = capsys.readouterr().err.splitlines()
    start = "hpctrain: rank 1: --compile: the compiled model's gradients for a batch of 8 differ "
    assert [line[:len(start)] for line in said] == [start, start]
    assert re.search(r"from float64's by 0\.5 \(relative\), its uncompiled ones' by [0-9.e-]+: "
                     r"TorchInductor computed them wrong, so this rank trains uncompiled from "
                     r"here$", said[0]), said[0]
    assert re.search(r"from its uncompiled ones by 0\.5 \(relative; allowed: 0\.01\): ",
                     said[1]), said[1]
    # Dropout draws otherwise compiled: nothing to compare, left compiled and unsaid.
    random = CompiledOtherwise(dropout=0.5)
    compiled.apply(True, random)
    assert compiled.verify(random, x) and compiled.is_compiled(random)
    assert capsys.readouterr().err == ""


def test_a_float64_copy_that_does_not_fit_falls_back_to_the_plain_gradients(monkeypatch,
                                                                              capsys):
    """Out of memory making the float64 copy (a full GPU) ended the rank mid-training;
    verify then judges by the plain gradients alone (an OOM cannot be made here: stubbed)."""
    torch.manual_seed(0)
    model = CompiledOtherwise()
    compiled.apply(True, model)

    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.Tensor, "double", out_of_memory)
    assert compiled.verify(model, torch.randn(8, 6), rank=0) is False
    assert "differ from its uncompiled ones by 0.5" in capsys.readouterr().err


WRONG_AT_EIGHT = """
import torch
from torch import nn


class WrongAtEight(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, num_classes))

    def forward(self, x):
        compiling = getattr(torch.compiler, "is_compiling", torch._dynamo.is_compiling)()
        return self.net(x) * (1.5 if compiling and x.shape[0] == 8 else 1.0)
"""


@pytest.mark.skipif(IN_THREADS is not None, reason=f"--compile {IN_THREADS}")
def test_a_run_whose_compiled_gradients_are_wrong_trains_as_the_plain_one(tmp_path, capsys):
    """The loop checks each new input size's compiled gradients: a wrong compiled model
    trains uncompiled from its first step, the plain run's model bit for bit, and says so
    once. In micro-batches, at the parts' size: batches of 24 in parts of at most 10 are
    three parts of 8, and the check ran the model on 10 samples, a size training never
    used, so a compiled model wrong at 8 trained wrong until the last batch (8) was checked."""
    (tmp_path / "eight.py").write_text(WRONG_AT_EIGHT)
    assert microbatch.part_sizes(24, 10) == [8] and microbatch.part_sizes(64, 30) == [22, 21]
    assert microbatch.part_sizes(24, None) == [24] == microbatch.part_sizes(24, 24)

    def run(name: str, on: bool) -> dict:
        config = RunConfig(algo="sgd", seed=3, out=str(tmp_path / name), progress=False,
                           data=DataConfig(dataset="synthetic"), optim=OptimConfig(
                               epochs=1, batch_size=24, micro_batch_size=10), compile=on,
                           model=ModelConfig(name=f"{tmp_path / 'eight.py'}:WrongAtEight"))
        simulate(config, SimConfig(workers=1, step_time="constant:0.01"))
        return torch.load(tmp_path / name / "model.pt", weights_only=True)

    plain, fixed = run("plain", False), run("compiled", True)
    assert all(torch.equal(plain[k], fixed[k]) for k in plain)
    said = capsys.readouterr().err
    assert said.count("TorchInductor computed them wrong") == 1
    assert "gradients for a batch of 8 differ" in said


def test_the_simulator_refuses_a_torch_whose_dynamo_crashes_in_threads(monkeypatch):
    """torch 2.11 segfaulted in Dynamo when a simulated worker (a thread) recompiled; the
    simulator checks the version before it starts (scripts/compat-check.sh 3.12 2.11.0)."""
    assert compiled.problem("cpu", in_threads=False) is None
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    with pytest.raises(UsageError, match=r"^RunConfig\.compile=True in the simulator needs "
                       r"torch >= 2\.13.*"
                       r"torch 2\.11\.0\+cu130 here"):
        simulate(RunConfig(algo="sgd", compile=True, data=DataConfig(dataset="synthetic"),
                           model=ModelConfig(name="mlp")), SimConfig(workers=2))
    assert compiled.problem("cpu") is None  # hpctrain train --compile still runs



@pytest.mark.skipif(IN_THREADS is not None, reason=f"--compile {IN_THREADS}")
@pytest.mark.parametrize("algo", ["sgd", "ssgd", "ma", "ec", "dcasgd-a"])
def test_every_algorithm_takes_the_same_steps_compiled(tmp_path, algo):
    """In the simulator: the compiled run ends at the plain run's model, to float rounding,
    also in micro-batches of 10 of 24 (new input sizes: the parts, the last batch of 8)."""
    def run(name: str, on: bool, micro: int | None = None) -> dict:
        optim = OptimConfig(epochs=1, batch_size=24, micro_batch_size=micro)
        config = RunConfig(algo=algo, seed=3, out=str(tmp_path / name), progress=False,
                           data=DataConfig(dataset="synthetic"), model=ModelConfig(name="mlp"),
                           optim=optim, compile=on)
        workers = 1 if algo == "sgd" else 4
        summary = simulate(config, SimConfig(workers=workers, step_time="constant:0.01"))
        return summary, torch.load(tmp_path / name / "model.pt", weights_only=True)

    torch._dynamo.reset()  # forget graphs an earlier test compiled, and the counters
    (plain, a), (fast, b), (_, c) = run("plain", False), run("compiled", True), \
        run("micro", True, 10)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # Dynamo traced it
    assert plain["updates"] == fast["updates"] > 0
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["compile"] is True
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-5)
    assert abs(plain["final_test_acc"] - fast["final_test_acc"]) <= 0.02


SSGD_TWO_RANKS = ["train", "--algo", "ssgd", *SYNTHETIC, "--epochs", "1", "--batch-size", "24",
                  "--seed", "4"]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory) -> dict:
    """ssgd on 2 ranks without --compile (MPI backend; Horovod's allreduce averages the same
    two gradients), the reference, and with it on each backend, in one launch: {name: folder};
    no "horovod" where Horovod cannot run."""
    root = tmp_path_factory.mktemp("ssgd2")
    runs = {"plain": ["--sync-backend", "mpi"], "mpi": ["--sync-backend", "mpi", "--compile"]}
    if not horovod_missing():
        runs["horovod"] = ["--sync-backend", "horovod", "--compile"]
    proc = run_commands([[*SSGD_TWO_RANKS, *extra, "--out", str(root / name)]
                         for name, extra in runs.items()], np=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "differ from its uncompiled ones" not in proc.stderr  # the MLP's are right
    return {name: root / name for name in runs}


@pytest.mark.parametrize("backend", ["mpi", "horovod"], ids=["mpi-backend", "horovod"])
def test_ssgd_allreduces_the_compiled_backward(two_rank_runs, backend):
    """Real ranks: the gradient hooks that launch the buckets fire after a compiled backward
    too, so ssgd on 2 ranks compiled ends where the plain run does."""
    if backend not in two_rank_runs:
        pytest.skip(horovod_missing())
    a, b = (torch.load(two_rank_runs[name] / "model.pt", weights_only=True)
            for name in ("plain", backend))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
