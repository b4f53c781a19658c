"""``hpctrain train`` under torchrun: no MPI world, torch.distributed for the loop and ssgd.

torchrun (shipped with torch) starts each worker with RANK/WORLD_SIZE/MASTER_ADDR; each is an
MPI singleton, so the loop runs on torch.distributed's default group and ssgd's allreduce goes
through --sync-backend torch. Algorithms that need MPI are refused in one line.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from dataclasses import replace

import pytest
import torch
from conftest import ROOT, SYNTHETIC, refusal, run_job, run_program, torchrun

import hpctrain
from hpctrain import arguments, cli, comm, launch_checks, options, registry
from hpctrain.config import DataConfig, RunConfig
from hpctrain.errors import UsageError
from hpctrain.sync.torch_group import rendezvous_host

COMMON = [*SYNTHETIC, "--epochs", "1", "--seed", "5", "--momentum", "0.9"]


# ssgd on 2 torchrun ranks, 16 steps an epoch, a checkpoint every 4 (update 32 is the last
# before step 40); --resume auto finds none and starts the run.
RESUMABLE = ["train", "--algo", "ssgd", *COMMON, "--batch-size", "16", "--epochs", "2",
             "--checkpoint-every", "0.25e", "--resume", "auto"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The uninterrupted torchrun ssgd run: sgd's equal, and the restarted run's target."""
    out = tmp_path_factory.mktemp("clean") / "run"
    proc = torchrun([*RESUMABLE, "--out", str(out)], 2, out.parent / "torch-logs")
    assert proc.returncode == 0, proc.stderr
    assert "--resume auto: no checkpoint yet, starting the run" in proc.stdout
    return out


@pytest.mark.timeout(300)
def test_ssgd_under_torchrun_equals_sgd_with_twice_the_batch(tmp_path, clean):
    sgd = run_job(["train", "--algo", "sgd", *COMMON, "--batch-size", "32", "--epochs", "2",
                   "--out", str(tmp_path / "sgd")], np=0)
    assert sgd.returncode == 0, sgd.stderr
    summary = json.loads((clean / "summary.json").read_text())
    config = json.loads((clean / "config.json").read_text())
    assert summary["workers"] == 2 and config["algorithm"]["sync_backend"] == "torch"
    assert config["run_info"]["process_group"] == "gloo"  # what reduced the gradients
    # Each rank trained on its own half of the data.
    assert summary["samples_per_worker"][0] == summary["samples_per_worker"][1]
    whole = json.loads((tmp_path / "sgd" / "summary.json").read_text())["samples_per_worker"]
    assert sum(summary["samples_per_worker"]) == whole[0]
    a = torch.load(tmp_path / "sgd" / "model.pt", weights_only=True)
    b = torch.load(clean / "model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(120)
def test_an_algorithm_that_needs_mpi_is_refused_under_torchrun(tmp_path):
    proc = torchrun(["train", "--algo", "ma", *COMMON, "--out", str(tmp_path / "run")], 1,
                    tmp_path / "torch-logs")
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hpctrain: error")]
    assert lines and "--algo ma" in lines[0] and "mpirun" in lines[0], proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
    # torchrun's report names the line as the root cause, not hpctrain's traceback (it
    # showed the error file's py_callstack: 30 lines from runpy to check_launch)
    root = proc.stderr[proc.stderr.index("Root Cause"):]
    assert f"traceback : {lines[0].removeprefix('hpctrain: error: ')}\n" in root, root
    assert "Traceback" not in root and "File " not in root, root


@pytest.mark.timeout(300)
def test_torchrun_names_the_rank_that_raised_as_the_root_cause(tmp_path):
    """Rank 1 raises; rank 0 then fails in its allreduce ("Connection closed by peer"). With
    no error file torchrun went by exit order, and named rank 0 in 1 run of 3. Now the rank
    that raised writes torchrun's error file, the other lets it end first (and is ended)."""
    import re

    proc = torchrun(["train", "--algo", "ssgd", *COMMON, "--batch-size", "16", "--out",
                     str(tmp_path / "run")], 2, tmp_path / "torch-logs",
                    env={"HPCTRAIN_INJECT": "raise@1:10"})
    assert proc.returncode != 0
    assert "hpctrain: error (rank 1 of 2): RuntimeError: injected fault at step 10" \
        in proc.stderr, proc.stderr
    root = proc.stderr[proc.stderr.index("Root Cause"):]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root), root
    assert "error_file: <N/A>" not in root and "injected fault at step 10" in root, root
    assert "rank 0 of 2" not in proc.stderr, proc.stderr  # ended by torchrun, quietly


# A launcher that sets torch.distributed's env:// variables and no torchrun's (DeepSpeed's,
# a Kubeflow PyTorchJob's): two processes of ``hpctrain <argv>`` with the port given first.
ENV_LAUNCHER = """
import os, subprocess, sys
port, argv = sys.argv[1], [sys.executable, "-m", "hpctrain", *sys.argv[2:]]
procs = [subprocess.Popen(argv, env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r),
                                     "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
         for r in (0, 1)]
sys.exit(max(p.wait() for p in procs))
"""


@pytest.mark.timeout(300)
def test_a_launch_by_envs_variables_runs_as_torchruns_does(tmp_path, clean):
    """Each process trained alone into the same --out (both exit 0, 1 worker in the
    summary); now the job is torchrun's, to the bit."""
    with socket.socket() as s:  # a free port, released for rank 0's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    proc = run_program([sys.executable, "-c", ENV_LAUNCHER, str(port), *RESUMABLE, "--out",
                        str(out)], timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("hpctrain train: finished") == 1, proc.stdout  # rank 0 only
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["updates"] == \
        json.loads((clean / "summary.json").read_text())["updates"]
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (clean, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


KILLED_ONCE = """
import os, runpy, sys
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":  # the first attempt loses rank 1
    os.environ["HPCTRAIN_INJECT"] = "kill@1:40"
sys.argv[0] = "hpctrain"
runpy.run_module("hpctrain", run_name="__main__")
"""


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    """torchrun --max-restarts 1 with rank 1 killed at step 40 of the first attempt."""
    folder = tmp_path_factory.mktemp("restarted")
    script = folder / "killed_once.py"
    script.write_text(KILLED_ONCE)
    proc = torchrun([*RESUMABLE, "--out", str(folder / "run")], 2, folder / "torch-logs",
                    script=str(script), options=("--max-restarts", "1"))
    return proc, folder / "run"


@pytest.mark.timeout(300)
def test_torchrun_restarts_continue_from_the_checkpoints_with_resume_auto(clean, restarted):
    """torchrun restarts both ranks, and ``--resume auto`` continues from the checkpoint of
    update 32 to the uninterrupted run's model, bit for bit."""
    proc, out = restarted
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("hpctrain train: finished") == 1, proc.stdout  # rank 0 only
    assert "resuming from the checkpoints in" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_updates"] == [32]
    assert summary["updates"] == json.loads((clean / "summary.json").read_text())["updates"]
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (clean, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(300)
def test_a_finished_run_started_again_with_resume_auto_is_left_as_it_is(restarted, tmp_path):
    proc, out = restarted
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    again = torchrun([*RESUMABLE, "--out", str(out)], 2, tmp_path / "torch-logs")
    assert again.returncode == 0, again.stderr
    assert "holds a finished run; nothing to train" in again.stdout
    assert json.loads((out / "summary.json").read_text()) == summary


STALL_SCRIPT = """
import time
import torch
import torch.distributed as dist
import hpctrain.sync as hvd
from hpctrain.sync import torch_group

hvd.init(backend="torch", stall_check_s=0.5)
# The group's backend was chosen from both workers' views, posted on torchrun's store
views = torch_group.views_seen()
assert [local for _, local, _, _ in views] == [0, 1] and views[0][0] == views[1][0], views
dist.barrier()  # untimed: the ranks start the timed collectives together
hvd.allreduce(torch.ones(1), name="before")
if hvd.rank() == 1:
    time.sleep(3)
hvd.allreduce(torch.ones(2), name="late")
hvd.shutdown()
"""


@pytest.mark.timeout(120)
def test_the_stall_check_under_torchrun_names_the_late_rank(tmp_path):
    """No MPI world under torchrun: the ranks' statuses go through torch's store (as the
    views of their GPUs did, which every rank chose the group's backend from)."""
    script = tmp_path / "stall.py"
    script.write_text(STALL_SCRIPT)
    proc = torchrun([], 2, tmp_path / "torch-logs", script=str(script))
    assert proc.returncode == 0, proc.stderr
    # The wait for "late" only: ranks that reach "before" more than 0.5 s apart (a slow
    # machine) are reported there too.
    reports = [ln for ln in proc.stderr.splitlines()
               if "hpctrain.sync: stall:" in ln and "allreduce(name='late'" in ln]
    # The lowest waiting rank reports, every check time while the wait lasts (as Horovod's)
    assert reports and all(r.startswith("hpctrain.sync: stall: rank 0 waited")
                           for r in reports), proc.stderr
    assert "not arrived: rank 1 (last called allreduce(name='before', op=Average, " \
           "float32[1])" in reports[0]


# Two torchrun agents on this host as two nodes (c10d rendezvous, each attempt a store of
# its own, as README says to start torchrun across nodes), --max-restarts 1: node a's worker
# fails in its first attempt, so its agent counts a restart (TORCHELASTIC_RESTART_COUNT=1)
# and node b's, whose worker was healthy, restarts it without counting (0).
TWO_AGENTS = """
import os, subprocess, sys
port, script, folder = sys.argv[1:]
env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI"))}
agents = [subprocess.Popen(
    [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
     "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two",
     "--max-restarts", "1", "--monitor-interval", "0.1", "--log-dir", f"{folder}/logs-{node}",
     script, folder],
    env={**env, "NODE": node, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}) for node in "ab"]
sys.exit(max(a.wait() for a in agents))
"""
RESTARTED_STALL_SCRIPT = """
import os, sys, time
import torch
import hpctrain.sync as hvd

node, folder = os.environ["NODE"], sys.argv[1]
first = not os.path.exists(f"{folder}/{node}.started")
open(f"{folder}/{node}.started", "w").close()
hvd.init(backend="torch", stall_check_s=0.5)
print(f"node {node}: rank {hvd.rank()}, restart count "
      f"{os.environ['TORCHELASTIC_RESTART_COUNT']}", file=sys.stderr, flush=True)
hvd.allreduce(torch.ones(1), name="first" if first else "before")
if first:
    time.sleep(1)  # its thread posts on the store
    if node == "a":
        os._exit(1)
    time.sleep(120)  # ended by its agent, which restarts it
if node == "b":
    time.sleep(3)
hvd.allreduce(torch.ones(2), name="late")
hvd.shutdown()
"""


@pytest.mark.timeout(180)
def test_the_stall_check_after_a_restart_on_two_nodes_hears_every_rank(tmp_path):
    """After node a's restart its agent's count was 1, node b's 0: the stall check's keys on
    the store were under the restart count, and every report said "rank 1 (no answer)" of a
    rank that was alive and posting. Now under a token rank 0 draws at each start."""
    (tmp_path / "launch.py").write_text(TWO_AGENTS)
    (tmp_path / "stall.py").write_text(RESTARTED_STALL_SCRIPT)
    with socket.socket() as s:  # a free port, released for the rendezvous's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_program([sys.executable, str(tmp_path / "launch.py"), str(port),
                        str(tmp_path / "stall.py"), str(tmp_path)], timeout=150)
    assert proc.returncode == 0, proc.stderr
    counts = re.findall(r"node (a|b): rank (\d), restart count (\d)", proc.stderr)
    assert sorted((node, count) for node, _, count in counts) == \
        [("a", "0"), ("a", "1"), ("b", "0"), ("b", "0")], proc.stderr  # the counts differ
    reports = [ln for ln in proc.stderr.splitlines()
               if "hpctrain.sync: stall:" in ln and "allreduce(name='late'" in ln]
    assert reports, proc.stderr
    # node b's rank of the second attempt, alive: its last call, not "no answer"
    b = next(rank for node, rank, count in counts[::-1] if node == "b")
    assert all(f"not arrived: rank {b} (last called allreduce(name='before', op=Average, "
               "float32[1])" in r for r in reports), reports


EXIT_SCRIPT = """
import os, sys, time
from datetime import timedelta
import torch.distributed as dist
from hpctrain.sync import stall

for attempt in range(5):  # forked children: each exits as a script does, torch imported once
    child = os.fork()
    if child == 0:
        store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=30))
        stall.start(None, 0.004, 0, store=store, rank=0)  # posts on the store every millisecond
        time.sleep(0.05)
        sys.exit(0)  # without stall.stop(), as a script that never calls shutdown() does
    status = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    if status != 0:
        sys.exit(f"exit {attempt + 1} of 5 ended with status {status}")
"""


@pytest.mark.timeout(120)
def test_a_process_that_exits_with_the_check_running_ends_cleanly(tmp_path):
    """The stall thread is stopped at exit: ended inside the store's C++ call it aborted the
    process (CI saw it under torchrun; 19 exits of 30 aborted here before the fix)."""
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    proc = run_program([sys.executable, str(script)], timeout=60)
    assert proc.returncode == 0, proc.stderr


TORCHRUN_ENV = {"TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
                "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}


@pytest.mark.parametrize("algo, extra, named", [
    ("dcasgd-a", {}, "--algo dcasgd-a"),
    ("ssgd", {"sync_backend": "horovod"}, "--sync-backend horovod"),
    ("ssgd", {"data_placement": "sharded"}, "--data-placement sharded"),
])
def test_launch_check_under_torchrun_environment(monkeypatch, algo, extra, named):
    """What torchrun's environment makes check_launch refuse, and ssgd's switch to torch."""
    for k, v in TORCHRUN_ENV.items():
        monkeypatch.setenv(k, v)
    assert comm.launcher() == "torchrun" and comm.launch_size() == 2
    given = hpctrain.algorithm_options(algo)()
    algorithm = replace(given, **{k: v for k, v in extra.items() if hasattr(given, k)})
    data = DataConfig(dataset="synthetic", **{k: v for k, v in extra.items()
                                              if k == "data_placement"})
    with pytest.raises(UsageError, match=named + ".*mpirun"), \
            options.command_line():  # the flags typed; from Python: test_launch_checks
        launch_checks.check_launch(RunConfig(algo=algo, data=data, algorithm=algorithm), 2)
    ok = launch_checks.check_launch(RunConfig(algo="ssgd", data=DataConfig(dataset="synthetic")), 2)
    assert ok.algorithm.sync_backend == "torch"


# A user's loader that says when it is called: the refusal must come before it.
LOADER = """
import pathlib, torch
def load():
    pathlib.Path(__file__).with_name("loaded").touch()
    return ((torch.rand(8, 1, 4, 4), torch.arange(8) % 2),
            (torch.rand(4, 1, 4, 4), torch.arange(4) % 2))
"""
# README's "Launchers": what torchrun runs (sgd, ssgd) and what it refuses.
_UNDER_TORCHRUN = {"sgd": True, "ssgd": True, "asgd": False, "dcasgd-c": False,
                   "dcasgd-a": False, "ssp": False, "ma": False, "ec": False}


@pytest.mark.parametrize("algo", [*_UNDER_TORCHRUN,
                                  f"{ROOT / 'examples' / 'signum_vote.py'}:SignumVote"])
def test_torchrun_refuses_an_mpi_algorithm_before_reading_the_data(monkeypatch, tmp_path, algo):
    """``--algo ma`` under torchrun was refused after a user's data set was loaded (and its
    sizes said): its loader ran, for minutes on a real data set, before the one line."""
    for k, v in TORCHRUN_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(registry, "_LOADED", dict(registry._LOADED))  # the user's: this test's
    assert set(_UNDER_TORCHRUN) == set(registry.names())  # a new one: say which it is
    (tmp_path / "loader.py").write_text(LOADER)
    args = ["--algo", algo, "--dataset", f"{tmp_path / 'loader.py'}:load", "--model", "mlp"]
    if _UNDER_TORCHRUN.get(algo):  # sgd: on one process
        ok = launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(
            ["train", *args])), 1 if algo == "sgd" else 2)
        assert ok.algo == algo and (tmp_path / "loaded").exists()
        return
    said = refusal(args, 2)
    assert f"{algo.split('/')[-1]} moves data through MPI" in said and "mpirun" in said
    assert not (tmp_path / "loaded").exists()


# How MPI starts in a process torchrun's variables describe (hpctrain.comm.init): its world
# size, and whether srun's step and PMIx's variables are there once it runs.
MPI_START = """
import json, os, sys
from hpctrain import comm
MPI = comm.init()
found = {"size": MPI.COMM_WORLD.Get_size(), "step": os.environ.get("SLURM_STEP_ID"),
         "pmix": os.environ.get("PMIX_NAMESPACE")}
with open(f"{sys.argv[1]}/{os.environ['RANK']}.json", "w") as f:  # not stdout: mpirun mixes
    json.dump(found, f)
"""
SRUN_TASK = {"SLURM_JOBID": "7", "SLURM_NODELIST": "node1", "SLURM_STEP_ID": "0",
             "SLURM_STEPID": "0", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
             "PMIX_NAMESPACE": "slurm.pmix.7.0", "PMIX_RANK": "0",
             "PMIX_SERVER_URI2": "pmix-server.1;tcp4://127.0.0.1:9"}  # no server there


@pytest.mark.timeout(120)
def test_a_torchrun_worker_started_by_srun_starts_mpi_alone(tmp_path):
    """Inheriting the srun task's step and PMIx variables, Open MPI took the worker for an
    srun task and failed in MPI_Init (docs/SLURM.md, torchrun under srun; test_slurm runs
    the real thing where Slurm runs). The step is back afterwards, PMIx's stay hidden."""
    script = tmp_path / "start.py"
    script.write_text(MPI_START)
    proc = run_program([sys.executable, str(script), str(tmp_path)], timeout=60,
                       env={**SRUN_TASK, **TORCHRUN_ENV, "RANK": "1"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "1.json").read_text()) == \
        {"size": 1, "step": "0", "pmix": None}


@pytest.mark.timeout(120)
def test_a_script_under_mpirun_given_torchruns_variables_keeps_its_world(tmp_path):
    """mpirun's processes given torchrun's variables by hand (RANK and WORLD_SIZE as mpirun
    numbers them): MPI's world is theirs, nothing is hidden."""
    script = tmp_path / "start.py"
    script.write_text(MPI_START)
    wrapper = ("RANK=$OMPI_COMM_WORLD_RANK WORLD_SIZE=$OMPI_COMM_WORLD_SIZE "
               f"exec {sys.executable} {script} {tmp_path}")
    env = {k: v for k, v in TORCHRUN_ENV.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = run_program(["bash", "-c", wrapper], np=2, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads((tmp_path / f"{r}.json").read_text())["size"] for r in (0, 1)] == [2, 2]


@pytest.mark.timeout(120)
def test_a_script_of_torchruns_worker_under_mpirun_is_refused_before_mpi_init(tmp_path):
    """``mpirun -np 1 torchrun ...`` running a script that starts MPI itself (the library's
    ``comm.init``, as ``hpctrain.sync.init(backend="mpi")`` does): Open MPI's MPI_Init died
    in "OPAL ERROR: Unreachable"; now hpctrain's one line, exit status 2, as ``train`` says."""
    script = tmp_path / "start.py"
    script.write_text(MPI_START)
    proc = run_program([sys.executable, str(script), str(tmp_path)], np=1, timeout=60,
                       env=TORCHRUN_ENV)
    assert proc.returncode == 2, proc.stderr
    assert "hpctrain: error: torchrun's worker (WORLD_SIZE=2, RANK=0) under Open MPI's " \
        "mpirun" in proc.stderr and "OPAL ERROR" not in proc.stderr, proc.stderr
    assert not (tmp_path / "0.json").exists()


@pytest.mark.timeout(120)
def test_info_under_torchrun_prints_every_workers_placement_once(tmp_path):
    """Each worker is an MPI world of its own: info gathers over torch.distributed instead."""
    proc = torchrun(["info"], 2, tmp_path / "torch-logs")
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)  # one object: rank 0's
    assert (facts["ranks"], facts["local_size"], facts["launcher"]) == (2, 2, "torchrun")
    assert [(p["rank"], p["local_rank"]) for p in facts["placement"]] == [(0, 0), (1, 1)]



@pytest.mark.parametrize("env, resolved, outward, host", [
    ({"MASTER_ADDR": "node0-ib"}, "127.0.1.1", None, "node0-ib"),  # given
    ({}, "10.0.0.5", "10.0.0.5", "10.0.0.5"),  # the host name's address
    # Debian's /etc/hosts (127.0.1.1 node0): the address rank 0 reaches node1 from, where
    # gloo is told an interface too
    ({"GLOO_SOCKET_IFNAME": "eth0"}, "127.0.1.1", "10.0.0.5", "10.0.0.5"),
    ({"GLOO_SOCKET_IFNAME": "eth0"}, None, "10.0.0.5", "10.0.0.5"),  # no address of its name
])
def test_rank_0s_rendezvous_address_on_several_nodes_is_one_they_reach(env, resolved, outward,
                                                                        host):
    """mpirun with --sync-backend torch on several nodes: a loopback address of rank 0's
    host name kept the other nodes waiting for torch's timeout (30 minutes)."""
    assert rendezvous_host("node0", 2, resolved, outward, env) == host
    assert rendezvous_host("node0", 1, None, None, {}) == "127.0.0.1"  # one node


@pytest.mark.parametrize("env, outward, such", [
    ({}, "10.0.0.5", ", such as 10.0.0.5,"),  # gloo would bind to 127.0.1.1 all the same
    ({"GLOO_SOCKET_IFNAME": "eth0"}, None, ""),  # no route to node1 found
    ({"GLOO_SOCKET_IFNAME": "eth0"}, "127.0.0.1", ""),
])
def test_a_rendezvous_address_the_other_nodes_cannot_reach_is_refused(env, outward, such):
    with pytest.raises(UsageError) as refused, options.command_line():  # hpctrain train's
        rendezvous_host("node0", 3, "127.0.1.1", outward, env)
    said = (
        "--sync-backend torch on 3 nodes: rank 0's host node0 resolves to 127.0.1.1, which the "
        f"other nodes cannot reach: set MASTER_ADDR to an address of node0 they reach{such} "
        "and GLOO_SOCKET_IFNAME to its network interface (gloo binds to the host name's "
        "address otherwise)")
    assert str(refused.value) == said
    with pytest.raises(UsageError) as refused:  # a script's: it typed no flag
        rendezvous_host("node0", 3, "127.0.1.1", outward, env)
    assert str(refused.value) == said.replace("--sync-backend torch",
                                              "hpctrain.sync's torch backend")
