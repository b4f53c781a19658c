"""The warning where a run's snapshots will not fit: each is kept until the end of the run (to
score it then), in every worker's memory and, with checkpoints, as a file; 360 of a 100 MB
model on four ranks of a node ended a run hours in, for want of memory."""

from pathlib import Path

import pytest
import torch

from hpctrain import checkpoint, launch_env, run
from hpctrain.evaluate import footprint_warning, state_bytes
from hpctrain.runtime import REAL

pytestmark = pytest.mark.unit

GB = 10**9


def test_a_footprint_within_half_of_what_is_available_is_not_warned_of():
    assert footprint_warning(GB, 10, 2, 40 * GB, "of this node's memory") is None
    assert footprint_warning(GB, 10, 2, None, "of this node's memory") is None  # not known


def test_a_footprint_past_half_names_its_parts_and_the_fix():
    said = footprint_warning(100 * 10**6, 361, 4, 100 * GB, "of this node's memory")
    assert said == ("hpctrain: warning: the run's snapshots will take about 144.4 GB of this "
                    "node's memory (361 of 100.0 MB for each of 4 workers, kept to the end of "
                    "the run), more than half of its 100.0 GB available: raise --eval-every "
                    "for fewer")
    one = footprint_warning(GB, 3, 1, 4 * GB, "in runs/x/checkpoints")
    assert "3 of 1000.0 MB, kept" in one and "in runs/x/checkpoints" in one


@pytest.mark.parametrize("env, size", [
    ({}, None),
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 4),
    ({"LOCAL_WORLD_SIZE": "8"}, 8),
    ({"MPI_LOCALNRANKS": "2"}, 2),
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "many"}, None),
])
def test_the_workers_on_a_node_are_the_launchers_count(env, size):
    assert launch_env.local_size(env) == size


def test_a_run_whose_snapshots_cannot_fit_is_warned_of_at_its_start(tmp_path, capsys):
    """Memory and the checkpoint folder's disk, measured on this machine: no machine holds
    ten million snapshots of a 4 MB model (40 TB)."""
    model = torch.nn.Linear(1000, 1000)
    assert state_bytes(model) == (1000 * 1000 + 1000) * 4
    ckpt = checkpoint.Checkpointer(None, 10, 40, shared={}, every="1e", resume=None,
                                   folder=tmp_path / "not" / "yet" / "made", header={})
    run._say_footprint(model, 10**7, REAL.snapshot_copies(1, root_only=False), 1, ckpt)
    memory, disk = capsys.readouterr().err.splitlines()
    assert memory.startswith("hpctrain: warning: the run's snapshots will take about "
                             "40040.0 GB of this node's memory (10000000 of 4.0 MB")
    assert f"in {tmp_path / 'not' / 'yet' / 'made'} (10000000 of 4.0 MB" in disk
    assert not Path(tmp_path / "not").exists()  # measured on the nearest folder there is
    off = checkpoint.Checkpointer(None, 10, 40, shared={}, every="off", resume=None,
                                  folder=tmp_path, header={})
    run._say_footprint(model, 2, 1, 1, off)  # 8 MB
    assert capsys.readouterr().err == ""


def test_eval_every_rounded_far_from_asked_says_so():
    """--eval-every is rounded to whole updates: with 2 updates an epoch 0.25 snapshots every
    update (0.5 epochs). The run said nothing, and the curve's spacing surprised."""
    assert run.snapshot_interval(0.25, 2) == 1 and run.snapshot_interval(0.3, 16) == 5
    note = run.rounding_note(0.25, 2)
    assert note == ("hpctrain: --eval-every 0.25 snapshots every 1 update here, 0.5 epochs: "
                    "2 updates an epoch, and snapshots fall between updates")
    assert run.rounding_note(0.3, 16) is None  # 5 updates are 0.3125 epochs: close enough
    assert run.rounding_note(0.25, 16) is None and run.rounding_note(4, 3) is None
