"""Where the job's size and rank come from (hpctrain.launch_env), and the samplers under a real
``torchrun --nproc-per-node 2``: each process gets its own half, never all of the data."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, SYNTHETIC, run_job

from hpctrain import launch_env, shuffle
from hpctrain.errors import UsageError

TORCHRUN = ROOT / ".venv" / "bin" / "torchrun"


@pytest.mark.unit  # the word for Slurm's launcher in its comments is no launch
@pytest.mark.parametrize("env, seat", [
    ({}, None),
    ({"WORLD_SIZE": "4", "RANK": "3"}, (4, 3, "torchrun")),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, (2, 1, "Open MPI")),
    ({"PMI_SIZE": "3", "PMI_RANK": "2"}, (3, 2, "PMI")),
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_STEP_ID": "0"}, (8, 5, "Slurm")),
    # salloc's interactive step (a shell, one task) and srun --preserve-env inherit the
    # allocation's SLURM_NTASKS; the step's own count is SLURM_STEP_NUM_TASKS.
    ({"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0",
      "SLURM_STEP_ID": "4294967290"}, (1, 0, "Slurm (SLURM_STEP_NUM_TASKS=1")),
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1",
      "SLURM_STEP_ID": "3"}, (2, 1, "Slurm")),
    # A batch script's own environment (no step) describes the allocation: not a launch.
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}, None),
    # The innermost launcher wins: torchrun under srun, mpirun inside an allocation.
    ({"WORLD_SIZE": "8", "RANK": "6", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
      "SLURM_STEP_ID": "0"}, (8, 6, "torchrun")),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0", "SLURM_NTASKS": "1",
      "SLURM_PROCID": "0", "SLURM_STEPID": "1"}, (4, 0, "Open MPI")),
])
def test_launcher_environment(env, seat):
    found = launch_env.from_launcher(env)
    if seat is None:
        assert found is None
    else:
        assert (found.size, found.rank) == seat[:2] and found.source.startswith(seat[2])


@pytest.mark.unit  # the launchers named in comments are not launched
@pytest.mark.parametrize("env, local", [
    ({}, 0),
    ({"LOCAL_RANK": "2"}, 2),  # no known launcher's rank: the first local rank set
    # srun started one torchrun on the node: its workers all inherit SLURM_LOCALID=0
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0",
      "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, 1),
    # mpirun, with a LOCAL_RANK a batch script exported for something else
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_RANK": "1", "LOCAL_RANK": "0"}, 1),
    # mpirun inside an allocation: the batch script's own SLURM_LOCALID is 0
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
      "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3",
      "OMPI_COMM_WORLD_LOCAL_RANK": "3"}, 3),
    ({"PMI_SIZE": "4", "PMI_RANK": "3", "MPI_LOCALRANKID": "1"}, 1),  # Hydra
    ({"PMI_SIZE": "8", "PMI_RANK": "5", "PMI_LOCAL_RANK": "1", "PALS_LOCAL_RANKID": "1"},
     1),  # Cray PALS
    ({"MV2_COMM_WORLD_SIZE": "4", "MV2_COMM_WORLD_RANK": "3",
      "MV2_COMM_WORLD_LOCAL_RANK": "1"}, 1),  # MVAPICH's mpirun_rsh
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "2"},
     2),  # srun
    ({"PMI_SIZE": "2", "PMI_RANK": "1", "LOCAL_RANK": "1"}, 0),  # not this launcher's
    # srun --mpi=pmi2 sets PMI's rank and size but no local rank: Slurm's, numbering alike
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "1",
      "PMI_SIZE": "8", "PMI_RANK": "5"}, 1),
    # a wrapper exporting RANK and WORLD_SIZE (for env://) under mpirun, no LOCAL_RANK
    ({"WORLD_SIZE": "4", "RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3",
      "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, 1),
    # ... but not a launcher numbering the processes otherwise (srun started torchrun)
    ({"WORLD_SIZE": "2", "RANK": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
      "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0"}, 0),
    ({"WORLD_SIZE": "2", "RANK": "1", "PMI_SIZE": "x", "PMI_RANK": "0"},
     0),  # an outer launcher's bad value is not this process's error ...
    ({"WORLD_SIZE": "4", "RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3",
      "OMPI_COMM_WORLD_LOCAL_RANK": "1", "PMI_SIZE": "x", "PMI_RANK": "0"},
     1),  # ... nor does it lose the one found before it
])
def test_the_local_rank_is_the_launchers_that_gave_the_rank(env, local):
    assert launch_env.local_rank(env) == local


SRUN_STEP = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "7", "SLURM_PROCID": "2",
             "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"}


@pytest.mark.unit  # the launchers named are not launched
@pytest.mark.parametrize("env, size", [
    ({}, None),
    ({"LOCAL_WORLD_SIZE": "3"}, 3),  # no launcher known: the first count set
    # a LOCAL_WORLD_SIZE left in a batch script under mpirun is not the node's count
    ({"LOCAL_WORLD_SIZE": "8", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 2),
    ({"LOCAL_WORLD_SIZE": "8", "PMI_SIZE": "4", "PMI_RANK": "1", "MPI_LOCALNRANKS": "4"}, 4),
    ({"LOCAL_WORLD_SIZE": "8", "PMI_SIZE": "4", "PMI_RANK": "1"}, None),  # PMI says none
    # torchrun's own count (torchrun started by mpirun), and a wrapper's env:// variables
    # numbering the process as mpirun does: mpirun's count
    ({"WORLD_SIZE": "4", "RANK": "1", "LOCAL_WORLD_SIZE": "2", "OMPI_COMM_WORLD_SIZE": "8",
      "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, 2),
    ({"WORLD_SIZE": "2", "RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 2),
    # srun's: this node's entry of the step's tasks per node (none said it: 1 was taken)
    ({**SRUN_STEP, "SLURM_NODEID": "3"}, 1),
    ({**SRUN_STEP, "SLURM_NODEID": "1"}, 2),
    ({**SRUN_STEP, "SLURM_NODEID": "9"}, None),  # no such node
    ({**SRUN_STEP, "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "2(x"}, None),
])
def test_the_local_size_is_the_launchers_that_gave_the_rank(env, size):
    """A stale LOCAL_WORLD_SIZE=8 under mpirun -np 2 was read first: the run's memory note
    counted 8 copies of the snapshots on the node."""
    assert launch_env.local_size(env) == size


ENV_RENDEZVOUS = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "4",
                  "RANK": "3"}
TORCH_PLACED = {**ENV_RENDEZVOUS, "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


@pytest.mark.unit  # the launchers named are not launched
@pytest.mark.parametrize("env, kind, by", [
    ({}, "single", "none known"),
    ({**ENV_RENDEZVOUS, "TORCHELASTIC_RUN_ID": "7"}, "torchrun", "torchrun"),
    # DeepSpeed's launcher, a Kubeflow PyTorchJob: everything torchrun's path reads
    (TORCH_PLACED, "torchrun", "torch env:// (no torchrun)"),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}, "mpi", "Open MPI"),
    # a wrapper exporting env://'s variables as mpirun or srun numbers the processes
    ({**TORCH_PLACED, "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}, "mpi",
     "Open MPI"),
    ({**ENV_RENDEZVOUS, "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_STEP_ID": "0"}, "mpi",
     "Slurm"),
    ({**ENV_RENDEZVOUS, "WORLD_SIZE": "1", "RANK": "0"}, "single", "none known"),  # one process
])
def test_the_launch_is_read_once_for_every_reader(monkeypatch, env, kind, by):
    """comm.launcher() (training's), info's launcher and MPI's world check read one answer."""
    from hpctrain import comm

    launched = launch_env.launch(env)
    assert (launched.kind, launched.by) == (kind, by)
    if kind == "mpi":  # the seat check_world checks: MPI's launcher's, not env://'s
        assert launched.seat.launcher == by
    for name in [*ENV_RENDEZVOUS, *TORCH_PLACED, "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                 "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_STEPID",
                 "TORCHELASTIC_RUN_ID", "PMI_SIZE", "PMI_RANK"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert comm.launcher() == kind


@pytest.mark.unit  # the launchers named are not launched
@pytest.mark.parametrize("missing", ["MASTER_PORT", "LOCAL_WORLD_SIZE"])
def test_a_launch_by_envs_variables_that_torch_cannot_run_is_refused(missing):
    """Each process would train alone into the same outputs (both said they finished, the
    summary said 1 worker); the launcher numbering them another way (srun started it) too."""
    env = {k: v for k, v in TORCH_PLACED.items() if k != missing}
    for outer in ({}, {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0"}):
        with pytest.raises(UsageError) as refused:
            launch_env.launch({**env, **outer})
        assert str(refused.value) == (
            "WORLD_SIZE=4, RANK=3 without torchrun (no TORCHELASTIC_RUN_ID) and no MPI launcher "
            "numbering the processes the same way: a torch.distributed env:// launch also needs "
            f"{missing}; set them, or launch with torchrun, mpirun or srun")


TORCHRUNS = {**TORCH_PLACED, "TORCHELASTIC_RUN_ID": "7"}  # rank 3 of 4, local rank 1 of 2


@pytest.mark.unit  # the launchers named are not launched
@pytest.mark.parametrize("torchs, ompi, refused", [
    # mpirun -np 1 torchrun --nproc-per-node 4: MPI_Init died, OPAL ERROR: Unreachable
    (TORCHRUNS, {"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}, True),
    ({**TORCHRUNS, "WORLD_SIZE": "1", "RANK": "0"},  # one worker: died alike
     {"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}, True),
    # mpirun -np 4 starting a torchrun per node, --node-rank its rank: MPI's world is theirs
    (TORCHRUNS, {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}, False),
    (TORCHRUNS, {}, False),  # torchrun alone, or under srun or Hydra (their variables hidden)
    (TORCHRUNS, {"PMI_SIZE": "1", "PMI_RANK": "0"}, False),
    # mpirun's processes given env://'s variables by a wrapper: an MPI launch, not torch's
    ({**TORCH_PLACED, "WORLD_SIZE": "2", "RANK": "1"},
     {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, False),
])
def test_torchrun_started_by_open_mpis_mpirun_is_refused(torchs, ompi, refused):
    env = {**torchs, **ompi}
    if not refused:
        launch_env.refuse_mpirun_around_torchrun(env)
        return
    with pytest.raises(UsageError) as e:
        launch_env.refuse_mpirun_around_torchrun(env)
    assert str(e.value) == (
        f"torchrun's worker (WORLD_SIZE={torchs['WORLD_SIZE']}, RANK={torchs['RANK']}) under "
        "Open MPI's mpirun (Open MPI (OMPI_COMM_WORLD_SIZE=1, OMPI_COMM_WORLD_RANK=0) says "
        "rank 0 of 1): its workers cannot start MPI there (Open MPI's MPI_Init fails); start "
        "torchrun otherwise (srun, ssh), or launch hpctrain with mpirun alone")


def test_train_refuses_torchrun_under_mpirun_before_mpi_starts(monkeypatch):
    from conftest import refusal

    for name, value in {**TORCHRUNS, "OMPI_COMM_WORLD_SIZE": "1",
                        "OMPI_COMM_WORLD_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    assert refusal(["--algo", "ssgd", *SYNTHETIC], 4).startswith(
        "torchrun's worker (WORLD_SIZE=4, RANK=3) under Open MPI's mpirun")


PLACED = "RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK, LOCAL_WORLD_SIZE"


@pytest.mark.unit  # the launchers named are not launched
@pytest.mark.parametrize("torchs, mpis, unset", [
    # left in a shell under mpirun -np 2 (exported with -x, or by hpctrain horovodrun): rank 1
    ({**TORCH_PLACED, "WORLD_SIZE": "2", "RANK": "0"},
     {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, PLACED),
    ({**TORCH_PLACED, "WORLD_SIZE": "1", "RANK": "0"},  # a world of one, every variable set
     {"PMI_SIZE": "2", "PMI_RANK": "1"}, PLACED),
    (ENV_RENDEZVOUS, {"MV2_COMM_WORLD_SIZE": "4", "MV2_COMM_WORLD_RANK": "2"},  # some missing
     "RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"),
    # a bare WORLD_SIZE=1 RANK=0 left in the shell under mpirun -np 2: each rank took itself
    # for a single run, rank 0 of 1, and both claimed the same --out
    ({"WORLD_SIZE": "1", "RANK": "0"}, {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"},
     "RANK, WORLD_SIZE"),
    # every env:// variable of a one-process debug set-up left under srun -n 4: each task
    # was a torch launch of one (srun is no MPI launcher to the rule before)
    ({**TORCH_PLACED, "WORLD_SIZE": "1", "RANK": "0"},
     {"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, PLACED),
], ids=["open-mpi", "pmi-world-of-1", "mvapich-some-missing", "open-mpi-bare-world-of-1",
        "srun-world-of-1"])
def test_envs_variables_an_mpi_launcher_contradicts_are_refused(torchs, mpis, unset):
    """The rank whose numbers differed took them for a torch launch, hid PMIx's variables,
    and Open MPI's MPI_Init failed (OPAL ERROR: Unreachable) naming no variable."""
    mpis = {**mpis, **({"SLURM_STEP_ID": "0"} if "SLURM_NTASKS" in mpis else {})}  # a step
    with pytest.raises(UsageError) as refused:
        launch_env.launch({**torchs, **mpis})
    (size_var, size), (rank_var, rank) = list(mpis.items())[:2]
    name = launch_env.from_launcher(mpis).launcher
    assert str(refused.value) == (
        f"WORLD_SIZE={torchs['WORLD_SIZE']}, RANK={torchs['RANK']} without torchrun (no "
        f"TORCHELASTIC_RUN_ID), but {name} ({size_var}={size}, {rank_var}={rank}) says rank "
        f"{rank} of {size}: torch.distributed's env:// variables left from another launch? "
        f"Unset {unset}, or start the processes with torchrun")


@pytest.mark.unit  # the launcher named is not launched
def test_a_bare_world_of_one_under_srun_of_several_is_refused():
    """srun -n 2 with WORLD_SIZE=1 RANK=0 left in the shell: each task trained alone."""
    slurm = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0"}
    with pytest.raises(UsageError) as refused:
        launch_env.launch({"WORLD_SIZE": "1", "RANK": "0", **slurm})
    assert str(refused.value).startswith(
        "WORLD_SIZE=1, RANK=0 without torchrun (no TORCHELASTIC_RUN_ID), but Slurm "
        "(SLURM_NTASKS=2, SLURM_PROCID=1) says rank 1 of 2: ")
    # no refusal for a task of one (srun -n 1), nor without a step (a batch script's shell)
    kinds = []
    for outer in ({**slurm, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"},
                  {k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}):
        kinds.append(launch_env.launch({"WORLD_SIZE": "1", "RANK": "0", **outer}).kind)
    assert kinds == ["mpi", "single"]


HOROVOD_GLOO = {"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "1",
                "HOROVOD_LOCAL_SIZE": "2", "HOROVOD_CROSS_RANK": "0", "HOROVOD_CROSS_SIZE": "1",
                "HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1", "HOROVOD_GLOO_RENDEZVOUS_PORT": "1",
                "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo"}
HOROVODS_REFUSAL = (
    "HOROVOD_SIZE=2, HOROVOD_RANK=1: Horovod's own launcher (horovodrun --gloo, Ray, Spark) "
    "started this process{but}; hpctrain runs under horovodrun's MPI mode, not Gloo's, so each "
    "process would train alone: launch with hpctrain horovodrun (or horovodrun without "
    "--gloo), mpirun, srun or torchrun, or unset HOROVOD_SIZE and HOROVOD_RANK if another "
    "launch left them")


@pytest.mark.unit  # the launchers named are not launched
def test_horovods_own_launch_is_refused():
    """horovodrun --gloo sets only Horovod's variables: each process was a world of 1 and
    trained alone (exit 0, 1 worker in the summary, no warning)."""
    with pytest.raises(UsageError) as refused:
        launch_env.launch(HOROVOD_GLOO)
    assert str(refused.value) == HOROVODS_REFUSAL.format(but="")
    stale = {**HOROVOD_GLOO, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}
    with pytest.raises(UsageError) as refused:
        launch_env.launch(stale)
    assert str(refused.value) == HOROVODS_REFUSAL.format(
        but=", but Open MPI (OMPI_COMM_WORLD_SIZE=2, OMPI_COMM_WORLD_RANK=0) says rank 0 of 2")
    # numbered so by mpirun (a job whose launch exported them), or a world of one: no matter
    alike = {**stale, "OMPI_COMM_WORLD_RANK": "1"}
    assert launch_env.launch(alike) == launch_env.launch({"OMPI_COMM_WORLD_SIZE": "2",
                                                          "OMPI_COMM_WORLD_RANK": "1"})
    assert launch_env.launch({"HOROVOD_SIZE": "1", "HOROVOD_RANK": "0"}).kind == "single"
    with pytest.raises(UsageError, match=r"^HOROVOD_SIZE=2, HOROVOD_RANK=2: the rank is not"):
        launch_env.launch({"HOROVOD_SIZE": "2", "HOROVOD_RANK": "2"})


@pytest.mark.timeout(120)
def test_a_training_horovods_gloo_launcher_started_is_refused(tmp_path):
    """horovodrun --gloo (not built here: its variables stand in) gave each process a world
    of 1, which trained alone: finished with 1 worker, exit 0, into the one --out."""
    out = tmp_path / "run"
    refused = run_job(["train", "--algo", "ssgd", *SYNTHETIC, "--out", str(out)], np=0,
                      env=HOROVOD_GLOO)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr == f"hpctrain: error: {HOROVODS_REFUSAL.format(but='')}\n"
    assert not out.exists()


@pytest.mark.unit
def test_mvapichs_launcher_gives_the_rank():
    seat = launch_env.from_launcher({"MV2_COMM_WORLD_SIZE": "4", "MV2_COMM_WORLD_RANK": "3"})
    assert (seat.size, seat.rank, seat.source.split()[0]) == (4, 3, "MVAPICH")


def test_bad_launcher_values_and_ranks_are_one_line():
    with pytest.raises(UsageError, match=r"^WORLD_SIZE='two', RANK='0': not whole numbers$"):
        launch_env.from_launcher({"WORLD_SIZE": "two", "RANK": "0"})
    for size, rank in (("1", "3"), ("1", "-1"), ("0", "0")):  # a seat outside the job
        with pytest.raises(UsageError, match=rf"^OMPI_COMM_WORLD_SIZE={size}, "
                           rf"OMPI_COMM_WORLD_RANK={rank}: the rank is not in \[0, {size}\)$"):
            launch_env.from_launcher({"OMPI_COMM_WORLD_SIZE": size,
                                      "OMPI_COMM_WORLD_RANK": rank})
    env = {"WORLD_SIZE": "2", "RANK": "1"}
    assert launch_env.replicas(4, None, env) == (4, 1)  # explicit values are taken as given
    assert launch_env.replicas(None, 0, env) == (2, 0)
    with pytest.raises(UsageError, match=r"^rank 1 outside \[0, 1\)$"):
        launch_env.replicas(1, None, env)
    with pytest.raises(UsageError, match="num_replicas 0 must be"):
        launch_env.replicas(0, 0)
    with pytest.raises(UsageError, match=r"rank 1.5 outside \[0, 2\)"):
        launch_env.replicas(2, 1.5)
    assert launch_env.replicas(np.int64(2), np.int32(1)) == (2, 1)


@pytest.fixture
def torch_world(tmp_path, monkeypatch):
    """A real one-process torch.distributed (gloo) world, destroyed afterwards; no launcher
    variables in the environment."""
    for _, size_var, rank_var in launch_env.LAUNCHERS:
        monkeypatch.delenv(size_var, raising=False)
        monkeypatch.delenv(rank_var, raising=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", world_size=1,
                            rank=0)
    yield
    dist.destroy_process_group()


def test_torch_distributed_and_launcher_must_agree(torch_world, monkeypatch):
    assert launch_env.detect().source.startswith("torch.distributed")
    assert len(shuffle.GlobalShuffleSampler(10)) == 10
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(UsageError) as e:
        shuffle.GlobalShuffleSampler(10)
    assert str(e.value) == (
        "the job's size and rank disagree: torch.distributed (world size 1, rank 0) says rank "
        "0 of 1, torchrun (WORLD_SIZE=2, RANK=1) says rank 1 of 2; pass num_replicas and rank "
        "explicitly or fix the launch")
    assert len(shuffle.GlobalShuffleSampler(10, num_replicas=2, rank=1)) == 5


def test_rank_and_world_size_left_in_a_shell_under_mpirun_are_refused():
    """Without torchrun's run id they were the seat, and every rank under mpirun took the same
    (RANK=0 WORLD_SIZE=3 on 2 ranks: both rank 0 of 3, one third of the data each)."""
    env = {"RANK": "0", "WORLD_SIZE": "3", "OMPI_COMM_WORLD_SIZE": "2",
           "OMPI_COMM_WORLD_RANK": "1"}
    with pytest.raises(UsageError, match=r"disagree: torchrun \(WORLD_SIZE=3, RANK=0\) says "
                                         r"rank 0 of 3, Open MPI .* says rank 1 of 2"):
        launch_env.detect(env)


@pytest.mark.timeout(120)
def test_samplers_under_torchrun_give_each_rank_its_half(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--log-dir",
           str(tmp_path / "torch-logs"), str(ROOT / "tests" / "scripts" / "torchrun_sampler.py"),
           str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    try:
        _, stderr = proc.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun's agent ends its workers (each in a session of its own)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        pytest.fail("torchrun hung past 100 s")
    assert proc.returncode == 0, stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["mpi_world"] for r in ranks] == [1, 1]  # MPI alone would say one replica
    assert [r["seat"] for r in ranks] == [[2, 0], [2, 1]]
    for epoch, key in ((0, "env_only"), (1, "loader")):
        halves = [r[key] for r in ranks]
        assert [len(h) for h in halves] == [501, 501]  # 1001 samples, one padded
        assert sorted(set(halves[0]) | set(halves[1])) == list(range(1001))
        for rank, half in enumerate(halves):
            theirs = torch.utils.data.DistributedSampler(range(1001), 2, rank, seed=3)
            theirs.set_epoch(epoch)
            assert half == list(theirs)
    local = [r["local"] for r in ranks]
    assert local[0] != local[1] and sorted(local[0] + local[1]) == list(range(1000))
