"""Snapshots past 2 GiB in all between the ranks: a checkpoint's gathering and restoring, and
the end of a run that gives every rank rank 0's snapshots or buffers. Under an MPI-3 library
such as Open MPI 4 a pickled message past 2 GiB fails (``MPI_ERR_ARG``): a long run of a
100 MB model crashed at its resume, or after training.

Each rank holds a few GiB and moves them at shared-memory speed (tens of seconds here): on
two ranks only (not the four-rank phase), and not under MPI-4 libraries (MPICH), which take
such messages whole."""

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from hpctrain import checkpoint, comm, run
from hpctrain.evaluate import Snapshots

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(300)]

PIECES, FLOATS = 8, 260 * 2**20 // 4  # 8 snapshots of 260 MiB: 2.03 GiB


def big_model() -> torch.nn.Module:
    """A model whose state is one 260 MiB buffer (and a small layer)."""
    model = torch.nn.Linear(3, 2)
    model.register_buffer("table", torch.zeros(FLOATS))
    return model


def mpi3_pair():
    MPI = comm.mpi()
    world = MPI.COMM_WORLD
    if world.size != 2 or MPI.Get_version() >= (4, 0):
        pytest.skip("gigabytes per rank: two ranks of an MPI-3 library only")
    return world


@pytest.fixture
def memory_folder(tmp_path):
    """A folder in memory where there is one (/dev/shm): 2 GiB written durably to this disk
    took half a minute more."""
    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_snapshots_past_2_gib_are_checkpointed_and_restored(memory_folder):
    """Rank 0's snapshots go to the gather in one part; the restore sends them to every rank."""
    world = mpi3_pair()
    folder = Path(world.bcast(str(memory_folder))) / "ck"
    model, snapshots = big_model(), Snapshots()
    header = {"algo": "sgd", "ranks": 2, "args": {}}
    for i in range(PIECES if world.rank == 0 else 0):  # replicated: rank 0 saves them
        model.table.fill_(i)
        snapshots.take(model, updates=i)
    ckpt = checkpoint.Checkpointer(world, 10, 40, shared={"model": model}, every="1e",
                                   folder=folder, resume=None, header=header)
    ckpt.save(10, {}, snapshots)
    del snapshots
    world.Barrier()
    back = Snapshots()
    resumed = checkpoint.Checkpointer(world, 10, 40, shared={"model": big_model()},
                                      every="1e", folder=folder, resume=str(folder),
                                      header=header)
    assert resumed.restore(back) == {"updates": 10}
    assert [s.info["updates"] for s in back] == list(range(PIECES))
    assert [float(s.state["table"][-1]) for s in back] == [float(i) for i in range(PIECES)]


def test_rank_0s_snapshots_past_2_gib_reach_every_rank():
    """The asynchronous algorithms' snapshots (rank 0 takes them), shared for the scoring
    after training; lock-step ranks take rank 0's buffers the same way (run._from_rank0)."""
    world = mpi3_pair()
    model, snapshots = big_model(), Snapshots()
    for i in range(PIECES if world.rank == 0 else 0):
        model.table.fill_(i)
        snapshots.take(model, updates=i)
    shared = run._rank0s(snapshots if world.rank == 0 else None, world)
    assert [float(s.state["table"][0]) for s in shared] == [float(i) for i in range(PIECES)]
