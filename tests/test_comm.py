"""The MPI world helpers, under mpirun."""

import contextlib
import fcntl
import json
import os
import re
import socket
import sys

import pytest
from conftest import run_program

from hpctrain import comm, job_end, launch_env, nbc_tuning
from hpctrain.errors import UsageError


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_world_matches_launcher():
    MPI = comm.init("multiple")
    assert comm.size() == MPI.COMM_WORLD.Get_size() == comm.env_size()
    assert comm.rank() == MPI.COMM_WORLD.Get_rank() == comm.env_rank()
    # One node here: local rank and size equal the world's.
    assert (comm.local_rank(), comm.local_size()) == (comm.rank(), comm.size())
    # The node's communicator is made once: a collective Split_type per call leaked one, and
    # a call on some ranks only would hang.
    if comm.rank() == 0:
        assert comm.local_rank() == 0 and comm._node_comm() is comm._node_comm()
    ranks = MPI.COMM_WORLD.allgather(comm.rank())
    assert ranks == list(range(comm.size()))


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("lock_step", [False, True], ids=["async", "lock-step"])
def test_a_collapse_found_after_the_loop_is_only_recorded(lock_step):
    """The final scores come after the stop signal's close: an async run's rank 0 then posted
    its broadcast on the freed communicator (MPI_ERR_COMM), losing every output."""
    from hpctrain.collapse import StopSignal

    MPI = comm.init("multiple")
    signal = StopSignal(MPI.COMM_WORLD, True, lock_step)
    assert not signal.stop()
    signal.close()
    if comm.rank() == 0:
        signal.request()
        assert signal.wanted
    MPI.COMM_WORLD.Barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_library_info():
    info = comm.init("multiple") and comm.library_info()
    assert any(name in info["library"] for name in ("Open MPI", "MPICH", "Intel(R) MPI"))
    assert info["standard"].startswith(("3.", "4.", "5."))  # MPICH 5 implements MPI 5.0
    assert info["thread_level"] in comm.THREAD_LEVELS
    if not info["library"].startswith("Open MPI"):
        assert info["iallreduce_algorithm"] == nbc_tuning.DEFAULT
    elif nbc_tuning.ENV not in os.environ:  # pytest-mpi started MPI: chosen through MPI_T
        assert info["iallreduce_algorithm"] == nbc_tuning.PREFERRED
        assert nbc_tuning.current_iallreduce_algorithm() == nbc_tuning.PREFERRED


def test_a_users_algorithm_is_said_as_open_mpi_takes_it():
    """A value Open MPI refuses (and ignores) was reported as the one in effect."""
    assert nbc_tuning.given("3") == f"rabenseifner (from ${nbc_tuning.ENV})"
    assert nbc_tuning.given("ring") == f"ring (from ${nbc_tuning.ENV})"
    assert nbc_tuning.given("bogus").startswith(f"{nbc_tuning.DEFAULT} (${nbc_tuning.ENV}="
                                                "'bogus' is none of ignore, ring,")


def test_mpi_started_by_hpctrain_runs_libnbcs_fast_allreduce_on_every_rank(tmp_path):
    """MPI started by hpctrain reads the choice from the environment at MPI_Init, on every
    rank alike, and the variable is gone afterwards (a child would take it for the user's).
    Each rank writes a file of its own: mpirun merged two ranks' stdout lines once."""
    code = ("import os, sys; from hpctrain import comm, nbc_tuning; comm.init(); "
            "open(f'{sys.argv[1]}/{comm.rank()}', 'w').write("
            "f'{nbc_tuning.current_iallreduce_algorithm()} {os.environ.get(nbc_tuning.ENV)}')")
    proc = run_program([sys.executable, "-c", code, str(tmp_path)], np=2, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [(tmp_path / r).read_text() for r in "01"] == ["rabenseifner None"] * 2


def test_gpu_gradient_hooks_need_mpi_to_take_calls_from_another_thread():
    """A CUDA model's hooks run on autograd's GPU thread and start the mpi backend's
    Iallreduce there: 'single' and 'funneled' are refused in one line, naming the level."""
    from hpctrain.sync.optimizer import check_hook_thread

    for level in ("serialized", "multiple"):
        check_hook_thread(level)
    for level in ("single", "funneled"):
        with pytest.raises(UsageError, match=f"thread level '{level}'.* autograd's own thread"):
            check_hook_thread(level)
    assert comm.init("multiple") and comm.thread_level() in comm.THREAD_LEVELS


def test_unknown_thread_level():
    with pytest.raises(UsageError, match="unknown MPI thread level 'many'"):
        comm.init("many")


def test_env_rank_without_mpi(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")
    assert (comm.env_rank(), comm.env_size()) == (3, 8)


def test_a_batch_scripts_slurm_variables_are_not_a_launch(monkeypatch):
    """sbatch sets SLURM_NTASKS for the allocation; only a job step (srun) is a launch."""
    for var in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK",
                "WORLD_SIZE", "RANK", "SLURM_STEP_ID", "SLURM_STEPID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert (comm.launcher(), comm.env_size()) == ("single", 1)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert (comm.launcher(), comm.env_rank(), comm.env_size()) == ("mpi", 2, 4)


@pytest.mark.parametrize("seat, hint", [
    (launch_env.Seat(2, 1, "PMI (PMI_SIZE=2, PMI_RANK=1)"), "is not the launcher's"),
    (launch_env.Seat(4, 0, "Slurm (SLURM_NTASKS=4, SLURM_PROCID=0)"), "srun --mpi=pmix"),
])
def test_a_launch_of_several_whose_mpi_world_is_one_process_is_refused(seat, hint):
    """Each process would train alone and write the same outputs: one line, naming both."""
    with pytest.raises(UsageError, match=f"{re.escape(str(seat))}, but MPI \\(Lib 1\\) gives "
                                         "this process a world of 1") as refused:
        comm.check_world(seat, 1, "Lib 1")
    assert hint in str(refused.value) and "\n" not in str(refused.value)
    comm.check_world(seat, seat.size, "Lib 1")  # the launch and MPI agree
    comm.check_world(launch_env.Seat(1, 0, "PMI (PMI_SIZE=1, PMI_RANK=0)"), 1, "Lib 1")
    comm.check_world(None, 1, "Lib 1")  # no launcher: a singleton is what was asked for


# The abort hook in a process of its own (it ends the process), torch not imported.
FAILS = """
from hpctrain import comm, job_end
job_end.install_abort_on_error()
comm.init()
raise RuntimeError("boom")
"""
# torch.distributed's env:// variables without torchrun's (TORCHELASTIC_RUN_ID) or its
# LOCAL_RANK and LOCAL_WORLD_SIZE, rank 0 of 2; one that torch's launch names rank 1 of 2.
ENV_ONLY = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
TORCHRUNS = {**ENV_ONLY, "RANK": "1", "TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "1",
             "LOCAL_WORLD_SIZE": "2"}


@pytest.mark.timeout(60)
def test_an_error_line_under_torchrun_names_torchruns_rank():
    """Each worker is an MPI singleton, whose rank 0 of 1 the line did not show. A launch of
    several processes by env://'s variables alone is refused (each would train alone): before
    MPI starts, rank 0 speaking for all, without a rank."""
    failed = run_program([sys.executable, "-c", FAILS], env=TORCHRUNS)
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr == "hpctrain: error (rank 1 of 2): RuntimeError: boom\n"
    refused = run_program([sys.executable, "-c", FAILS], env=ENV_ONLY)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr == (
        "hpctrain: error: WORLD_SIZE=2, RANK=0 without torchrun (no TORCHELASTIC_RUN_ID) and no "
        "MPI launcher numbering the processes the same way: a torch.distributed env:// launch "
        "also needs LOCAL_RANK, LOCAL_WORLD_SIZE; set them, or launch with torchrun, mpirun or "
        "srun\n")


PEER_LEFT_THEN_SIGTERM = """
import os, signal, sys, threading, time
from hpctrain import comm, job_end
def finish():  # rank 0's elastic commit, still being written
    time.sleep(1)
    open(sys.argv[1], "w").write("written")
job_end.before_abort(finish)
job_end.install_abort_on_error()
comm.init()
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()  # torchrun's agent
raise RuntimeError("Connection closed by peer")
"""


@pytest.mark.timeout(60)
def test_the_launchers_sigterm_waits_for_work_registered_before_abort(tmp_path):
    """A torchrun worker whose peer died waits for the agent's SIGTERM; that SIGTERM exited
    at once, cutting off rank 0's write of the elastic commit just made, and the restart went
    back a commit (under load, where the agent's SIGTERM came before the write ended)."""
    done = tmp_path / "done"
    ended = run_program([sys.executable, "-c", PEER_LEFT_THEN_SIGTERM, str(done)],
                        env={**TORCHRUNS, "RANK": "0", "LOCAL_RANK": "0"})
    assert ended.returncode == 1, ended.stderr
    assert done.read_text() == "written"


@pytest.mark.timeout(120)
def test_envs_variables_left_under_mpirun_are_refused_before_mpi_starts():
    """All six of torch's launch variables left in a shell under mpirun (or exported by
    hpctrain horovodrun): rank 1, numbered rank 0 by them, took them for a torch launch, hid
    PMIx's variables and died in MPI_Init (OPAL ERROR: Unreachable), naming no variable."""
    refused = run_program([sys.executable, "-c", FAILS], np=2,
                          env={**ENV_ONLY, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"})
    assert refused.returncode == 2, refused.stderr
    assert "hpctrain: error: WORLD_SIZE=2, RANK=0 without torchrun (no TORCHELASTIC_RUN_ID), " \
        "but Open MPI (OMPI_COMM_WORLD_SIZE=2, OMPI_COMM_WORLD_RANK=1) says rank 1 of 2: " \
        "torch.distributed's env:// variables left from another launch? Unset RANK, " \
        "WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK, LOCAL_WORLD_SIZE, or start the " \
        "processes with torchrun\n" in refused.stderr, refused.stderr
    assert "MPI_Init" not in refused.stderr and "boom" not in refused.stderr, refused.stderr


# Records each write to the process's stderr, one JSON line a call, and raises argv[2].
_WRITES = """
import json, sys
from hpctrain import job_end
from hpctrain.errors import UsageError


class Writes:
    def __init__(self, path):
        self.file = open(path, "a", buffering=1)

    def write(self, text):
        self.file.write(json.dumps(text) + "\\n")
        return len(text)

    def flush(self):
        pass


sys.__stderr__ = Writes(sys.argv[1])
sys.excepthook = job_end._abort_hook
raise {"usage": UsageError("--lr 'x' is not a number"), "ctrl-c": KeyboardInterrupt()}[sys.argv[2]]
"""


@pytest.mark.parametrize("raised, said", [("usage", "hpctrain: error: --lr 'x' is not a number\n"),
                                          ("ctrl-c", "hpctrain: interrupted\n")])
def test_an_error_line_is_one_write_with_its_newline(tmp_path, raised, said):
    """print's two writes (the text, then its newline) let mpirun put another rank's error
    between them: two ranks' lines on one (3 runs of 6 of examples/horovod_mismatch.py)."""
    (tmp_path / "raise.py").write_text(_WRITES)
    done = run_program([sys.executable, str(tmp_path / "raise.py"), str(tmp_path / "w"), raised])
    assert done.returncode == (2 if raised == "usage" else 130), done.stderr
    writes = [json.loads(line) for line in (tmp_path / "w").read_text().splitlines()]
    assert writes == [said]


def test_an_error_before_mpi_on_a_rank_but_0_names_the_rank_and_host():
    """Rank 0 speaks for all before MPI starts; another rank fails alone (a file missing on
    its node: `mpirun -np 1 ... : -np 1 -x HPCTRAIN_INJECT=bogus ...` said neither)."""
    host = socket.gethostname()
    assert job_end._where(1, 2, mpi_running=False) == f" (rank 1 of 2, host {host})"
    assert job_end._where(0, 2, mpi_running=False) == ""
    assert job_end._where(0, 2, mpi_running=True) == " (rank 0 of 2)"
    assert job_end._where(0, 1, mpi_running=True) == ""


def test_the_abort_hook_reads_the_launcher_comm_says_now(monkeypatch):
    """job_end asks comm for the launcher when an error comes, not a copy taken at import
    (a patched comm.launcher, or one comm later reads otherwise, reached only comm)."""
    monkeypatch.setattr(comm, "launcher", lambda: "torchrun")
    monkeypatch.setattr(comm, "env_rank", lambda: 3)
    monkeypatch.setattr(comm, "env_size", lambda: 4)
    assert job_end._under_torchrun()
    assert job_end._seat_for_error(MPI=None) == (3, 4)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_rank_0s_refusal_of_a_scripts_later_run_is_every_ranks(tmp_path_factory):
    """MPI already runs (a script's earlier run): a folder another run holds, or one that
    has a finished run, is refused on every rank, so that a script catching ValueError and
    going on keeps its ranks in step (rank 1 trained while rank 0 skipped)."""
    from hpctrain import RunConfig, run_folders

    def ssgd(out: str) -> RunConfig:
        return RunConfig(algo="ssgd", out=out)

    MPI = comm.init("multiple")
    world = MPI.COMM_WORLD
    top = world.bcast(str(tmp_path_factory.mktemp("claimed")) if world.Get_rank() == 0
                      else None)
    held, done = os.path.join(top, "held"), os.path.join(top, "done")
    if world.Get_rank() == 0:
        os.makedirs(done)
        with open(os.path.join(done, "summary.json"), "w") as f:
            f.write("{}")
        os.makedirs(held)
    with contextlib.ExitStack() as other_run:
        if world.Get_rank() == 0:  # holds the lock, as a run going on does
            lock = other_run.enter_context(open(os.path.join(held, run_folders.LOCK), "a"))
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for out, said in ((held, "is in use by another run"),
                          (done, "already holds a finished run")):
            with pytest.raises(UsageError, match=said), run_folders.claimed(ssgd(out)):
                pass
    with run_folders.claimed(ssgd(os.path.join(top, "free"))) as config:
        assert config.out == os.path.join(top, "free")  # and no rank refused
    world.Barrier()
