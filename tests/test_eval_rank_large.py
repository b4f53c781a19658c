"""A snapshot past 2 GiB sent to ``--eval-rank``: rank 0's pickled send of it failed at the
run's first snapshot under an MPI-3 library such as Open MPI 4 (``MPI_ERR_ARG``), a model of
about 537M fp32 values and buffers.

The snapshot moves at shared-memory speed (tens of seconds here): on two ranks only, and not
under MPI-4 libraries (MPICH), which take such a message whole. Its big part is a buffer the
forward pass does not read, so scoring it is cheap; left unwritten on rank 0 (``torch.empty``)
its pages cost no memory until the evaluating rank loads it."""

import pytest
import torch
from test_collapse import watch_of

from hpctrain import comm, data, live, models
from hpctrain.evaluate import Snapshot, curve_point

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(300)]

FLOATS = 2**29 + 2**20  # 2.004 GiB of float32


def big_model() -> torch.nn.Module:
    """The synthetic set's MLP with a 2 GiB buffer, not written (see the module docstring)."""
    model = models.build("mlp", data.SYNTHETIC_SHAPE, 10)
    model.register_buffer("table", torch.empty(FLOATS))
    return model


def test_a_snapshot_past_2_gib_is_scored_on_the_evaluating_rank(tmp_path):
    MPI = comm.mpi()
    world = MPI.COMM_WORLD
    if world.size != 2 or MPI.Get_version() >= (4, 0):
        pytest.skip("gigabytes per rank: two ranks of an MPI-3 library only")
    torch.manual_seed(0)  # the same small layers on both ranks
    model, test_set = big_model(), data.load("synthetic", "test")
    if world.rank == 1:
        live.serve(world, model, test_set)  # until rank 0's last message
        assert (float(model.table[0]), float(model.table[-1])) == (3.0, 7.0)
        return
    model.table[0], model.table[-1] = 3.0, 7.0
    info = {"t": 0.5, "epoch": 1.0, "updates": 32}
    watch = watch_of(tmp_path, world=world, eval_mode="online", eval_rank=1)
    snapshots = [Snapshot(model.state_dict(), info)]  # the model's own tensors: no copy
    watch.snapshot(model, snapshots)
    while 0 not in watch.scores:  # rank 0 picks the score up between its steps
        watch.step(1, 1, torch.tensor(1.0), 0.05, 0.0)
    watch.curve(model, snapshots, None)  # the evaluating rank's last message
    assert watch.scores[0] == curve_point(model, test_set, info)
