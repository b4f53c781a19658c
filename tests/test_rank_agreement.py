"""Ranks that see different files (node-local folders) or call hpctrain on some ranks only:
one verdict on every rank, never a hang. Each job gives its ranks folders of their own, as
nodes' local disks would be."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from conftest import ROOT, SYNTHETIC, run_job, run_program

# A script that started MPI itself, then three things a sweep does, each rank writing what
# it saw to its own file (mpirun may merge ranks' lines).
SCRIPT = """
import json, os, sys
from mpi4py import MPI
import hpctrain, hpctrain.comm
from hpctrain import DataConfig, ModelConfig, OptimConfig, RunConfig

rank = MPI.COMM_WORLD.Get_rank()
base = sys.argv[1]
if rank == 0:  # a first use of hpctrain's MPI helpers on one rank: no second algorithm
    hpctrain.comm.library_info()
MPI.COMM_WORLD.Dup().Free()  # (it deadlocked the script's next communicator)
os.chdir(os.path.join(base, f"node{rank}"))
seen = {}
for out in ("a", None, "b"):  # "a": a file on rank 1's node; None: "runs" a file on rank 0's
    config = RunConfig(algo="ssgd", out=out, progress=False, seed=1,
                       data=DataConfig(dataset="synthetic"), model=ModelConfig(name="mlp"),
                       optim=OptimConfig(epochs=1, batch_size=64))
    try:
        seen[str(out)] = hpctrain.train(config)["final_test_acc"]
    except ValueError as e:
        seen[str(out)] = str(e)
with open(os.path.join(base, f"rank{rank}.json"), "w") as f:
    json.dump(seen, f)
"""


@pytest.mark.timeout(180)
def test_a_scripts_runs_refused_on_one_rank_are_refused_on_every_rank(tmp_path):
    """Rank 1's refusal left rank 0 training run "a" alone until it hung, or trained it with
    rank 1's next run; rank 0's failure to make a run folder escaped the shared refusal."""
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    (tmp_path / "node1" / "a").write_text("")  # rank 1's --out is a file
    (tmp_path / "node0" / "runs").write_text("")  # rank 0 cannot make runs/ssgd-...
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    proc = run_program([sys.executable, str(script), str(tmp_path)], np=2, timeout=150,
                       env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1]  # every rank the same verdicts, and then the same run
    assert seen[0]["a"] == "RunConfig.out='a': a is a file, not a folder (found on rank 1)"
    assert seen[0]["None"].startswith("cannot make the run's folder runs/ssgd-")
    assert isinstance(seen[0]["b"], float)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("other", ["size", "labels", "pixels"])
def test_ranks_that_read_different_data_are_refused_in_one_line(tmp_path, other):
    """--dataset mnist from each node's own $HPCTRAIN_DATA, 96 samples on one node and 64 on
    the other: the ranks' allreduces fell out of step and the job hung until --stall-timeout.
    With 96 on both but other labels, or other pixels in the last sample, each rank trained
    on its own data and nothing was said."""
    from test_data import write_idx

    g = np.random.default_rng(1)
    x, y = g.integers(0, 256, (96, 28, 28)), g.integers(0, 10, 96)
    changed = {"size": (x[:64], y[:64]), "labels": (x, (y + 1) % 10),
               "pixels": (np.concatenate([x[:95], 255 - x[95:]]), y)}
    for rank, (images, labels) in ((0, (x, y)), (1, changed[other])):
        folder = tmp_path / f"node{rank}"
        folder.mkdir()
        for split, xs, ys in (("train", images, labels), ("t10k", x[:20], y[:20])):
            write_idx(folder / f"{split}-images-idx3-ubyte.gz", xs)
            write_idx(folder / f"{split}-labels-idx1-ubyte.gz", ys)
    script = tmp_path / "job.py"
    script.write_text("import os, sys\n"
                      "os.environ['HPCTRAIN_DATA'] = os.path.join(sys.argv[1], 'node' + "
                      "os.environ['OMPI_COMM_WORLD_RANK'])\n"
                      "from hpctrain import cli\n"
                      "cli.main(sys.argv[2:])\n")
    proc = run_program([sys.executable, str(script), str(tmp_path), "train", "--algo", "ssgd",
                        *SYNTHETIC[2:], "--dataset", "mnist",
                        "--out", str(tmp_path / "run")], np=2, timeout=90,
                       env={"PYTHONPATH": str(ROOT)})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpctrain: error")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    key = "training samples" if other == "size" else "the data (its labels and a few samples)"
    assert errors[0].startswith("hpctrain: error (rank 0 of 2): the ranks resolved different "
                                f"runs: {key} is "), errors[0]
    assert errors[0].endswith("; do the ranks see the same files?")
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.timeout(120)
def test_a_loader_drawing_unseeded_random_numbers_is_refused_naming_that_cause(tmp_path):
    """A loader with a generator of its own and no seed (README: refused once MPI runs) was
    refused with "do the ranks see the same files?", which sent the user to the file
    system, not to the generator."""
    (tmp_path / "unseeded.py").write_text(
        "import numpy as np\n"
        "def load():\n"
        "    g = np.random.default_rng()\n"
        "    x = g.normal(size=(64, 1, 4, 4)).astype(np.float32)\n"
        "    return (x[:48], g.integers(0, 3, 48)), (x[48:], g.integers(0, 3, 16))\n")
    proc = run_job(["train", "--algo", "ssgd", "--model", "mlp", "--dataset",
                    f"{tmp_path}/unseeded.py:load", "--epochs", "1", "--no-progress",
                    "--out", str(tmp_path / "run")], np=2, timeout=90)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpctrain: error")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "the ranks resolved different runs: the data (its labels and a few samples) is " \
        in errors[0], errors[0]
    assert errors[0].endswith("; do the ranks see the same files, and does the loader draw "
                              "random numbers without a fixed seed (np.random.default_rng() "
                              "with no seed: give it one)?"), errors[0]
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.timeout(120)
def test_ranks_that_build_different_models_are_refused_in_one_line(tmp_path):
    """The same --model nets:build, 4 hidden units on one node and 5 on the other: ma failed
    with MPI_ERR_TRUNCATE, dcasgd-a with a tensor size error, and ssgd with a mismatch whose
    two calls read alike, each exit 1."""
    for rank, width in ((0, 4), (1, 5)):
        (tmp_path / f"node{rank}").mkdir()
        (tmp_path / f"node{rank}" / "nets.py").write_text(
            "import math\nfrom torch import nn\n\n\ndef build(input_shape, num_classes):\n"
            f"    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), {width}),"
            f"\n                         nn.Tanh(), nn.Linear({width}, num_classes))\n")
    script = tmp_path / "job.py"
    script.write_text("import os, sys\n"
                      "os.chdir(os.path.join(sys.argv[1], 'node' + os.environ["
                      "'OMPI_COMM_WORLD_RANK']))\n"
                      "sys.path.insert(0, os.getcwd())  # nets is this node's nets.py\n"
                      "from hpctrain import cli\n"
                      "cli.main(sys.argv[2:])\n")
    proc = run_program([sys.executable, str(script), str(tmp_path), "train", "--algo", "ma",
                        "--dataset", "synthetic", "--no-progress", "--model", "nets:build",
                        "--out", str(tmp_path / "run")], np=2, timeout=90,
                       env={"PYTHONPATH": str(ROOT)})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpctrain: error")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert re.fullmatch(r"hpctrain: error \(rank 0 of 2\): the ranks resolved different runs: "
                        r"the model is '4 tensors of 1078 values \(layout \w{12}\)' on rank 0 "
                        r"but '4 tensors of 1345 values \(layout \w{12}\)' on rank 1; do the "
                        r"ranks see the same files\?", errors[0]), errors[0]
    assert not (tmp_path / "run" / "model.pt").exists()


def test_the_first_difference_names_the_key_and_the_first_rank_that_differs():
    from hpctrain.comm import first_difference

    same = {"a": 1, "b": "x"}
    assert first_difference([same, dict(same), dict(same)]) is None
    assert first_difference([same, same, {"a": 1, "b": "y"}, {"a": 2, "b": "y"}]) == ("a", 3)


def test_ranks_that_resolve_auto_to_different_devices_are_refused():
    """--device auto on a node whose GPUs are hidden (CUDA_VISIBLE_DEVICES="") trained that
    rank on the CPU with gloo beside NCCL on the others. No GPU here: the verdict on the
    values an allgather would bring."""
    from hpctrain.errors import raised_on_every_rank
    from hpctrain.run import _DEVICE, _refuse_different

    values = [{"algo": "ssgd", _DEVICE: "cuda"}, {"algo": "ssgd", _DEVICE: "cpu"}]
    with pytest.raises(ValueError) as refused:
        _refuse_different(values)
    assert str(refused.value) == (
        "the ranks resolved different runs: the device (--device auto) is 'cuda' on rank 0 "
        "but 'cpu' on rank 1; does every node see a GPU (CUDA_VISIBLE_DEVICES)? --device cpu "
        "or cuda says which")
    assert raised_on_every_rank(refused.value)
    _refuse_different([values[0], dict(values[0])])  # alike: nothing said


BACKEND_SCRIPT = """
import os, sys, torch
from mpi4py import MPI
import hpctrain.sync as hvd
rank = MPI.COMM_WORLD.Get_rank()
name, apart, alike = sys.argv[2:5]
os.environ[name] = alike if rank == 0 else apart
try:
    hvd.init()
except ValueError as e:
    said = str(e)
os.environ[name] = alike
hvd.init()
model = torch.nn.Linear(40, 30)  # two parameters: one bucket for rank 0, two for rank 1
opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                               named_parameters=model.named_parameters())
model(torch.ones(2, 40)).sum().backward()
opt.step()
total = hvd.allreduce(torch.ones(3), op=hvd.Sum)
with open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w") as f:
    f.write(f"{said}\\n{total.tolist()}")
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,apart,alike,said", [
    ("HPCTRAIN_CHECK_COLLECTIVES", "0", "1", "on for rank 0 but off for rank 1"),
    ("HOROVOD_FUSION_THRESHOLD", "4096", "1048576", "1048576 for rank 0 but 4096 for rank 1"),
])
def test_collective_settings_read_apart_are_refused_on_every_rank(tmp_path, name, apart, alike,
                                                                  said):
    """HPCTRAIN_CHECK_COLLECTIVES on for rank 0 and off for rank 1: rank 0's agreement round
    met rank 1's allreduce (garbled sums, then a hang). A fusion threshold apart gave the
    ranks buckets that do not match: the collective check (on) refused the optimizer's first
    step without naming the variable; with the check off, nothing did. Refused at init on
    both ranks; set alike, a step runs."""
    script = tmp_path / "job.py"
    script.write_text(BACKEND_SCRIPT)
    proc = run_program([sys.executable, str(script), str(tmp_path), name, apart, alike], np=2,
                       timeout=90, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    key = "HOROVOD_FUSION_THRESHOLD (bytes)" if name.startswith("HOROVOD") else name
    for rank in (0, 1):
        text, total = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert text == f"{key}: {said}; set it alike for every rank"
        assert total == "[2.0, 2.0, 2.0]"
