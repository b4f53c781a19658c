"""``hpctrain.train(config)`` from a user's own script under mpirun: the same run as the
command line, bad settings as ValueError before any MPI call."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SYNTHETIC, run_commands, run_job, run_program

from hpctrain import Summary, arguments, cli, launch_checks, run_folders

SCRIPT = """
import json, sys
import hpctrain
from hpctrain import DataConfig, ModelConfig, OptimConfig, RunConfig

def make_config(out):
    return RunConfig(algo="ma", seed=5, out=out, progress=False,
                     data=DataConfig(dataset="synthetic"), model=ModelConfig(name="mlp"),
                     optim=OptimConfig(epochs=1, batch_size=32),
                     algorithm=hpctrain.algorithm_options("ma")(tau=8))

if __name__ == "__main__":
    summary = hpctrain.train(make_config(sys.argv[1]))
    print(json.dumps({"acc": summary["final_test_acc"], "tau": summary["tau"],
                      "type": type(summary).__name__, "keys": sorted(summary)}))
"""


OWN_SCRIPT = """
import sys
import torch
from torch import nn
import hpctrain
from hpctrain import DataConfig, ModelConfig, OptimConfig, RunConfig

print("script loaded", flush=True)

class Net(nn.Module):
    def __init__(self, input_shape, num_classes, width=16):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], width), nn.ReLU(),
                                  nn.Linear(width, num_classes))

    def forward(self, x):
        return self.body(x)

def load():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return {"train": (x[:160], y[:160]), "test": (x[160:], y[160:]), "num_classes": 3}

if __name__ == "__main__":
    config = RunConfig(algo="ssgd", seed=2, out=sys.argv[1], progress=False,
                       data=DataConfig(dataset=load),
                       model=ModelConfig(name=Net, args={"width": 8}),
                       optim=OptimConfig(epochs=2, batch_size=16))
    summary = hpctrain.train(config)
    print(f"acc {summary['final_test_acc']}", flush=True)  # one write: ranks share stdout
"""


def assert_typed_summary(printed: dict) -> None:
    """What a script's ``hpctrain.train`` returned (its type's name and keys) is a plain dict
    with the keys ``hpctrain.Summary`` requires, and none it does not know."""
    required, optional = Summary.__required_keys__, Summary.__optional_keys__
    keys = set(printed["keys"])
    assert printed["type"] == "dict"
    assert required <= keys, sorted(required - keys)
    assert keys <= required | optional, sorted(keys - required - optional)


def same_model(a, b) -> bool:
    ma, mb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    return ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def printed_results(stdout: str) -> list[dict]:
    """The scripts' ``{"acc": ...}`` objects: mpirun may put two ranks' lines on one line."""
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(stdout, m.start())[0] for m in re.finditer(r'\{"acc"', stdout)]


def run_script(script, text: str, out) -> subprocess.CompletedProcess:
    """``mpirun -np 2 python script out`` with ``text`` as the script; it must succeed."""
    script.write_text(text)
    proc = run_program([sys.executable, str(script), str(out)], np=2, timeout=200)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def scripts_and_commands(tmp_path_factory) -> dict:
    """SCRIPT and OWN_SCRIPT run under ``mpirun -np 2``, each with the run the command line
    should match: SCRIPT's options given as `train`'s, OWN_SCRIPT's config.json given to
    `train --config` (both commands in one launch). {name: (script, its launch, its folder,
    the command's folder)}."""
    root = tmp_path_factory.mktemp("api")
    runs = {}
    for name, text in (("mine", SCRIPT), ("own", OWN_SCRIPT)):
        folder = root / name
        folder.mkdir()
        proc = run_script(folder / f"{name}.py", text, folder / "api")
        runs[name] = folder / f"{name}.py", proc, folder / "api", folder / "cli"
    proc = run_commands([
        ["train", "--algo", "ma", "--seed", "5", *SYNTHETIC, "--epochs", "1",
         "--batch-size", "32", "--tau", "8", "--out", str(runs["mine"][3])],
        ["train", "--config", str(runs["own"][2] / "config.json"), "--out", str(runs["own"][3])],
    ], np=2)
    assert proc.returncode == 0, proc.stderr
    return runs


@pytest.mark.timeout(300)  # the fixture's three launches
def test_a_script_trains_as_the_command_line_does(scripts_and_commands):
    script, proc, api, cli_out = scripts_and_commands["mine"]
    printed = printed_results(proc.stdout)
    assert len(printed) == 2 and printed[0] == printed[1]  # every rank gets the summary
    assert_typed_summary(printed[0])
    assert "tau" in printed[0]["keys"] and "allreduce_bytes_per_rank" not in printed[0]["keys"]
    a = json.loads((api / "summary.json").read_text())
    b = json.loads((cli_out / "summary.json").read_text())
    assert a["final_test_acc"] == b["final_test_acc"] == printed[0]["acc"]
    assert same_model(api, cli_out)
    # config.json repeats the run: `train --config` on it is the script's run, as the launch
    # resolves both (checked in process: that equal runs give the same model is the
    # CLI == API check above; a real `--config` rerun is the own-model test's).
    again = str(script.parent / "again")
    args = cli.build_parser().parse_args(["train", "--config", str(api / "config.json"),
                                          "--out", again])
    script_config = runpy.run_path(str(script))["make_config"](again)
    assert launch_checks.check_launch(arguments.build(args), 2) == \
        launch_checks.check_launch(script_config, 2)


@pytest.mark.timeout(200)
def test_readmes_script_prints_its_accuracy_once(tmp_path):
    """README's "Training from Python" printed the summary on every rank: ``0.8890.889`` on
    two. Its script, on synthetic data for one epoch, on 2 ranks: one line, rank 0's."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text[text.index("\n## Training from Python\n"):]
    start = section.index("```python\n") + len("```python\n")
    script = section[start:section.index("```", start)]
    out = tmp_path / "mine"
    for old, new in (("from hpctrain import OptimConfig, RunConfig",
                      "from hpctrain import DataConfig, ModelConfig, OptimConfig, RunConfig"),
                     ('out="runs/mine",', f'out={str(out)!r}, progress=False, data=DataConfig('
                      'dataset="synthetic"), model=ModelConfig(name="mlp"),'),
                     ("epochs=3", "epochs=1")):
        assert old in script, old  # README's script changed: change what this test swaps
        script = script.replace(old, new)
    (tmp_path / "my_script.py").write_text(script)
    proc = run_program([sys.executable, str(tmp_path / "my_script.py")], np=2, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = json.loads((out / "summary.json").read_text())["final_test_acc"]
    printed = [line for line in proc.stdout.splitlines() if not line.startswith("hpctrain")]
    assert printed == [str(acc)], proc.stdout


SWEEP_SCRIPT = """
import sys
import hpctrain
from hpctrain import DataConfig, ModelConfig, OptimConfig, RunConfig

for i, backend in enumerate(sys.argv[2].split(",")):
    options = hpctrain.algorithm_options("ssgd")(sync_backend=backend)
    hpctrain.train(RunConfig(algo="ssgd", seed=5, out=f"{sys.argv[1]}/{i}", progress=False,
                             data=DataConfig(dataset="synthetic"), model=ModelConfig(name="mlp"),
                             optim=OptimConfig(epochs=1, batch_size=32), algorithm=options))
"""


@pytest.mark.timeout(400)
def test_a_script_trains_ssgd_once_per_backend(tmp_path):
    """Each train() stops the backend it started, so the next may take another; the models
    are the same bit for bit (the behaviour check's hashes agree across backends)."""
    backends = ["mpi", "torch", *(["horovod"] if importlib.util.find_spec("horovod") else []),
                "mpi"]
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP_SCRIPT)
    proc = run_program([sys.executable, str(script), str(tmp_path), ",".join(backends)], np=2,
                       timeout=360)
    assert proc.returncode == 0, proc.stderr
    for i, backend in enumerate(backends):
        config = json.loads((tmp_path / str(i) / "config.json").read_text())
        assert config["algorithm"]["sync_backend"] == backend
        assert same_model(tmp_path / str(i), tmp_path / "0"), backend


@pytest.mark.timeout(120)
def test_a_bad_setting_in_a_script_is_a_value_error_before_mpi(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text("import hpctrain\n"
                      "try:\n"
                      "    hpctrain.train(hpctrain.RunConfig(algo='ssgd', optim="
                      "hpctrain.OptimConfig(momentum=1.5)))\n"
                      "except ValueError as e:\n"
                      "    import sys\n"
                      "    print(e)\n"
                      "    print('mpi4py.MPI' in sys.modules)\n")
    proc = run_program([sys.executable, str(script)], timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["OptimConfig.momentum=1.5 must be in [0, 1)", "False"]


@pytest.mark.timeout(300)
def test_a_script_passes_its_own_model_class_and_data_function(scripts_and_commands):
    script, proc, api, again = scripts_and_commands["own"]
    # Resolving the script's own names did not run it a second time on any rank.
    assert proc.stdout.count("script loaded") == 2 and proc.stdout.count("acc ") == 2
    recorded = json.loads((api / "config.json").read_text())
    assert recorded["model"] == {"name": f"{script}:Net", "args": {"width": 8}, "init_from": None}
    assert recorded["data"]["dataset"] == f"{script}:load"
    # config.json repeated the run from the command line, which loads the file by its path.
    assert same_model(again, api)


NETS = """
import math
from torch import nn

class Net(nn.Module):
    def __init__(self, input_shape, num_classes, width=16):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width),
                                  nn.Linear(width, num_classes))

    def forward(self, x):
        return self.body(x)
"""

SWEEP = """
import atexit, json, math, sys
import numpy as np
import hpctrain
from hpctrain import DataConfig, ModelConfig, OptimConfig, RunConfig
from nets import Net  # beside the script, not in the working folder

atexit.register(lambda: print("atexit ran", flush=True))
rows = open(sys.argv[2], "w")
summary = hpctrain.train(RunConfig(
    algo="sgd", out=sys.argv[1], progress=False, tensorboard=np.bool_(False),
    data=DataConfig(dataset="synthetic", data_dir=None),
    model=ModelConfig(name=Net, args={"width": np.int64(8)}),
    optim=OptimConfig(epochs=np.int64(1), batch_size=32)))
rows.write(f"{summary['final_test_acc']}\\n")
print(json.dumps({"acc": summary["final_test_acc"], "type": type(summary).__name__,
                  "keys": sorted(summary)}), flush=True)
{}["mean"]  # the sweep's own bug, after the run
"""


@pytest.mark.timeout(200)
def test_a_sweeps_own_error_after_a_run_is_its_own(tmp_path):
    """After train() returned, a script's own uncaught error ended the process in one line
    without flushing its files or running atexit (train's abort hook stayed); a model
    imported from a module beside it was recorded as nets:Net, which config.json could not
    import from the working folder; NumPy values in model args and a bool were refused."""
    folder = tmp_path / "sub"
    folder.mkdir()
    (folder / "nets.py").write_text(NETS)
    (folder / "sweep.py").write_text(SWEEP)
    proc = run_program([sys.executable, str(folder / "sweep.py"), str(tmp_path / "run"),
                        str(tmp_path / "rows.txt")], timeout=150)  # from the checkout
    assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "KeyError: 'mean'"
    assert "atexit ran" in proc.stdout and float((tmp_path / "rows.txt").read_text()) > 0
    assert_typed_summary(printed_results(proc.stdout)[0])  # sgd's, one rank
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert recorded["name"] == f"{folder / 'nets.py'}:Net" and recorded["args"] == {"width": 8}
    again = run_job(["train", "--config", str(tmp_path / "run" / "config.json"), "--out",
                     str(tmp_path / "again")], np=0)
    assert again.returncode == 0, again.stderr
    assert same_model(tmp_path / "run", tmp_path / "again")


@pytest.mark.timeout(120)
def test_a_run_stopped_on_collapse_at_a_snapshot_has_one_final_point(tmp_path):
    # lr 1 with momentum 0.99 diverges within a few updates; a snapshot every update puts one
    # where --stop-on-collapse ends the loop, which is then the final model: no second point.
    out = tmp_path / "stopped"
    proc = run_job(["train", "--algo", "sgd", *SYNTHETIC, "--epochs", "1", "--lr", "1.0",
                    "--momentum", "0.99", "--stop-on-collapse", "--eval-every", "0.001",
                    "--out", str(out)], np=0)
    assert proc.returncode == 4, proc.stderr
    points = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    updates = [p["updates"] for p in points]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_on_collapse"] and updates[-1] == summary["updates"]
    assert updates == sorted(set(updates)), updates  # one point per update, in order


RUNNING_BACKEND_SCRIPT = """
import sys
import hpctrain
import hpctrain.sync as hvd
from hpctrain import DataConfig, ModelConfig, OptimConfig, RunConfig, comm

def refused(name, **settings):
    config = RunConfig(algo="ssgd", seed=3, out=f"{sys.argv[1]}/{name}", progress=False,
                       data=DataConfig(dataset="synthetic"), model=ModelConfig(name="mlp"),
                       optim=OptimConfig(epochs=1), **settings)
    try:
        hpctrain.train(config)
    except ValueError as error:
        print(f"{name} refused: {error}", flush=True)

comm.init("multiple")
hvd.init()  # the script's own backend, on all 3 ranks
refused("torch", algorithm=hpctrain.algorithm_options("ssgd")(sync_backend="torch"))
refused("eval", eval_rank=2, eval_mode="online")
hvd.shutdown()
world = comm.mpi().COMM_WORLD
hvd.init(world.Split(int(world.Get_rank() == 2)))  # ranks 0-1, and rank 2 alone
refused("part")
"""


@pytest.mark.timeout(120)
def test_a_scripts_running_backend_that_is_not_the_runs_is_refused_before_mpi_calls(tmp_path):
    """train() would take the script's hpctrain.sync backend as it is (init is idempotent):
    one that spans the evaluating rank hung in the model's broadcast, one of another name was
    refused only once training started. Each is one line on every rank, the same, and nothing
    hangs."""
    script = tmp_path / "own_backend.py"
    script.write_text(RUNNING_BACKEND_SCRIPT)
    proc = run_program([sys.executable, str(script), str(tmp_path)], np=3, timeout=100)
    assert proc.returncode == 0, proc.stderr
    expected = {  # each line: on how many ranks
        "torch refused: SynchronousOptions.sync_backend='torch': the script's hpctrain.sync "
        "runs the 'mpi' backend; call hpctrain.sync.shutdown() before train(), or give "
        "SynchronousOptions.sync_backend='mpi'": 3,  # the fields the script gave
        "eval refused: RunConfig.eval_rank=2: the script's running hpctrain.sync backend spans "
        "the evaluating rank; call hpctrain.sync.shutdown() before train()": 3,
        "part refused: the script's running hpctrain.sync backend has size 2, the run trains "
        "on 3 ranks;": 3}  # rank 0's verdict on every rank (rank 2's backend has size 1)
    assert {line: proc.stdout.count(line) for line in expected} == expected, proc.stdout
    assert not any((tmp_path / name).exists() for name in ("torch", "eval", "part"))


FIRST_RUN_REFUSED_SCRIPT = """
import sys
import hpctrain
from hpctrain import DataConfig, ModelConfig, OptimConfig, RunConfig

def my_hook(*info):
    print("the script's hook", flush=True)

sys.excepthook = my_hook
for name in ("held", "free"):  # rank 0 alone finds "held" in use: no MPI call made yet
    config = RunConfig(algo="ssgd", seed=3, out=f"{sys.argv[1]}/{name}", progress=False,
                       data=DataConfig(dataset="synthetic"), model=ModelConfig(name="mlp"),
                       optim=OptimConfig(epochs=1))
    try:
        print(f"{name} trained {hpctrain.train(config)['updates']}", flush=True)
    except ValueError as error:
        print(f"{name} refused: {error}", flush=True)
        print(f"hook after the refusal is the script's: {sys.excepthook is my_hook}", flush=True)
print(f"hook at the end is the script's: {sys.excepthook is my_hook}", flush=True)
"""


@pytest.mark.timeout(120)
def test_a_sweeps_first_run_refused_on_one_rank_is_refused_on_every_rank(tmp_path):
    """A script's first train() checked before MPI started: rank 0 alone refused a folder
    another run holds, and its sweep went on to the next run while rank 1 trained the first
    (then both hung). MPI now starts first, so the refusal is every rank's; and the abort
    hook the refusal left stayed the process's, a later successful run kept it as the
    script's own."""
    (tmp_path / "held").mkdir()
    script = tmp_path / "sweep.py"
    script.write_text(FIRST_RUN_REFUSED_SCRIPT)
    with open(tmp_path / "held" / run_folders.LOCK, "a") as lock:  # another run's, going on
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_program([sys.executable, str(script), str(tmp_path)], np=2, timeout=100)
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout.count  # mpirun may put one rank's line inside another's
    # named by the field the script gave (RunConfig.out=...), not a flag it never typed
    assert said("held refused: RunConfig.out=") == 2 and said("is in use by another run") == 2, \
        proc.stdout
    assert said("hook after the refusal is the script's: False") == 2, proc.stdout
    assert said("free trained 16") == 2, proc.stdout  # 2048 samples / (2 x 64)
    assert said("hook at the end is the script's: True") == 2, proc.stdout


GIT_BEFORE_MPI_SCRIPT = """
import subprocess, sys
import hpctrain
from hpctrain import DataConfig, ModelConfig, OptimConfig, RunConfig

run = subprocess.run

def noted(args, *rest, **kw):  # rank 0 asks git of the checkout: before MPI starts?
    if args and args[0] == "git":
        mpi = sys.modules.get("mpi4py.MPI")
        print(f"git with MPI running: {bool(mpi and mpi.Is_initialized())}", flush=True)
    return run(args, *rest, **kw)

subprocess.run = noted
hpctrain.train(RunConfig(algo="ssgd", out=sys.argv[1], progress=False,
                         data=DataConfig(dataset="synthetic"), model=ModelConfig(name="mlp"),
                         optim=OptimConfig(epochs=1)))
"""


@pytest.mark.timeout(120)
def test_a_scripts_first_run_asks_git_before_mpi_starts(tmp_path):
    """Starting MPI before a script's first run's checks moved rank 0's git fork (the
    run's hpctrain_commit) after MPI_Init, which some networks' drivers dislike."""
    script = tmp_path / "first.py"
    script.write_text(GIT_BEFORE_MPI_SCRIPT)
    proc = run_program([sys.executable, str(script), str(tmp_path / "run")], np=2, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert "git with MPI running: False" in proc.stdout, proc.stdout
    assert "git with MPI running: True" not in proc.stdout, proc.stdout


BROKEN_THEN_GOOD_SCRIPT = """
import json, signal, sys, threading
import torch
from torch import nn
import hpctrain
import hpctrain.sync
from hpctrain import CheckpointConfig, DataConfig, ModelConfig, OptimConfig, RunConfig

class Breaks(nn.Module):
    # Its fifth forward is interrupted.
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(256, num_classes))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 5:
            raise KeyboardInterrupt  # Ctrl-C in a notebook, mid-step
        return self.body(x)

class StartFails(RunConfig(algo="sgd").algorithm_class):
    name = "start-fails"  # a user's algorithm whose start (in set-up) has a bug

    def start(self, position):
        raise RuntimeError("start's own bug")

class EvalFails(RunConfig(algo="sgd").algorithm_class):
    name = "eval-fails"  # one whose scoring, after training, has a bug

    def evaluate(self, *args, **kwargs):
        raise RuntimeError("evaluate's own bug")

def run(name, model, algo):
    return hpctrain.train(RunConfig(
        algo=algo, seed=1, out=f"{sys.argv[1]}/{name}", progress=False, tensorboard=True,
        profile="2:10", data=DataConfig(dataset="synthetic"), model=ModelConfig(name=model),
        optim=OptimConfig(epochs=1), checkpoint=CheckpointConfig(every="1e")))

def held():
    return {"sigusr1": str(signal.getsignal(signal.SIGUSR1)),
            "threads": sorted(t.name for t in threading.enumerate()),
            "profiling": torch.autograd._profiler_enabled(),
            "backend": hpctrain.sync.is_initialized()}

before = held()
try:
    run("broken", Breaks, "ssgd")
except KeyboardInterrupt:
    print("caught: interrupted", flush=True)
for algo in (StartFails, EvalFails):
    try:
        run(algo.name, "mlp", algo)
    except RuntimeError as error:
        print("caught:", error, flush=True)
after = held()
after["threads"] = [t for t in after["threads"] if t not in ("tqdm_monitor",)]
print(json.dumps({"before": before, "after": after,
                  "good": run("good", "mlp", "sgd")["final_test_acc"]}), flush=True)
"""


@pytest.mark.timeout(200)
def test_a_run_raising_on_its_own_lets_go_of_what_it_held(tmp_path):
    """A run that raised on its rank alone (Ctrl-C in a notebook, a bug in the user's model,
    sgd's too many bad steps) left SIGUSR1's handler installed (the script's next signal was
    swallowed), TensorBoard's writer thread running (one more per failed run), the profiler
    recording everything the script did next and (KeyboardInterrupt, in one process) the
    hpctrain.sync backend ssgd started up; an error in set-up (an algorithm's start) left
    SIGUSR1's handler too, and one in scoring after training TensorBoard's writer."""
    script = tmp_path / "broken.py"
    script.write_text(BROKEN_THEN_GOOD_SCRIPT)
    proc = run_program([sys.executable, str(script), str(tmp_path)], timeout=150)
    assert proc.returncode == 0, proc.stderr
    for caught in ("interrupted", "start's own bug", "evaluate's own bug"):
        assert f"caught: {caught}" in proc.stdout, proc.stdout
    held = json.loads(proc.stdout.strip().splitlines()[-1])
    assert held["after"] == held["before"] and held["good"] > 0, held
