"""The MPI world helpers, under mpirun."""

import re

import pytest

from hpctrain import comm, launch_env
from hpctrain.errors import UsageError


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_world_matches_launcher():
    MPI = comm.init("multiple")
    assert comm.size() == MPI.COMM_WORLD.Get_size() == comm.env_size()
    assert comm.rank() == MPI.COMM_WORLD.Get_rank() == comm.env_rank()
    # One node here: local rank and size equal the world's.
    assert (comm.local_rank(), comm.local_size()) == (comm.rank(), comm.size())
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
    assert not signal.stop(0)
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
    comm.check_world(launch_env.Seat(4, 0, "torchrun (WORLD_SIZE=4, RANK=0)"), 1, "Lib 1")
