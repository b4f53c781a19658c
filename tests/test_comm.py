"""The MPI world helpers, under mpirun."""

import pytest

from hpctrain import comm


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
def test_library_info():
    info = comm.init("multiple") and comm.library_info()
    assert "Open MPI" in info["library"] or "MPICH" in info["library"]
    assert info["standard"].startswith(("3.", "4."))
    assert info["thread_level"] in comm.THREAD_LEVELS


def test_unknown_thread_level():
    from hpctrain.errors import UsageError

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
