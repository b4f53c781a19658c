"""The warning where a run's snapshots will not fit: each is kept until the end of the run (to
score it then), in every worker's memory and, with checkpoints, as a file; 360 of a 100 MB
model on four ranks of a node ended a run hours in, for want of memory."""

from pathlib import Path

import pytest
import torch

from hpctrain import checkpoint, launch_env, run
from hpctrain.evaluate import Snapshots, footprint_warning, state_bytes
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
    assert "3 of 1.0 GB, kept" in one and "in runs/x/checkpoints" in one


def test_a_footprint_below_a_gigabyte_is_said_in_megabytes():
    """A small checkpoint disk (a 3.5 MB tmpfs) was said as "about 0.0 GB ... of its 0.0 GB
    available"."""
    said = footprint_warning(400_000, 14, 1, 3_500_000, "in run/checkpoints")
    assert "about 5.6 MB in run/checkpoints (14 of 400.0 kB, kept" in said
    assert "more than half of its 3.5 MB available" in said
    # a small model's snapshot read "of 0.0 MB"
    said = footprint_warning(40_000, 500, 1, 30_000_000, "in run/checkpoints")
    assert "about 20.0 MB in run/checkpoints (500 of 40.0 kB, kept" in said


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


def lock_step_curve(total: int, every: int, per_epoch: int, resumed_at: int = 0,
                    restored: Snapshots | None = None) -> list[int]:
    """The updates of a lock-step run's curve points, as the loop takes its snapshots: the
    first, one at each mark it passes, the final one; from ``resumed_at`` with the
    checkpoint's ``restored`` snapshots where resumed."""
    snapshots = Snapshots() if restored is None else restored
    if restored is None:
        snapshots.take(MODEL, epoch=0.0, updates=0)
    marks = run._Marks.of_run(total, every, snapshots, resumed_at, per_epoch)
    for position in range(resumed_at + 1, total + 1):
        if marks.passed(position, total):
            snapshots.take(MODEL, epoch=position / per_epoch, updates=position)
            marks.taken_at, marks.taken = position, marks.taken + 1
    assert marks.missed(total) == 0  # lock-step: a snapshot at every mark it takes
    return [s.info["updates"] for s in snapshots] + [total]


MODEL = torch.nn.Linear(1, 1)


@pytest.mark.parametrize("epochs, eval_every, per_epoch, points", [
    # Fashion-MNIST, batch 128 on one rank: 117 updates a mark; the one at 468 came one
    # update before the final snapshot at 469 (two markers at the curve's end, one more
    # pass over the test set).
    (1, 0.25, 469, [0, 117, 234, 351, 469]),
    # Two epochs: the mark at 468, by the end of epoch 1, stays; the one at 936 goes.
    (2, 0.25, 469, [0, 117, 234, 351, 468, 585, 702, 819, 938]),
    (0.3, 0.25, 469, [0, 141]),  # --epochs 0.3: the mark at 117 is 24 updates from the end
    (3, 0.5, 32, [0, 16, 32, 48, 64, 80, 96]),  # a mark at the end: the final snapshot, once
    (1, 0.4, 10, [0, 4, 8, 10]),  # half an interval from the end: taken
    (1, 0.4, 9, [0, 4, 9]),
    (1, 2, 32, [0, 32]),  # --eval-every past the run: its ends only
    (1, 1, 1, [0, 1]),
])
def test_a_mark_within_half_an_interval_of_the_end_is_left_to_the_final_snapshot(
        epochs, eval_every, per_epoch, points):
    total = round(epochs * per_epoch)
    every = run.snapshot_interval(eval_every, per_epoch)
    assert lock_step_curve(total, every, per_epoch) == points
    assert run.marks_taken(total, every) + 2 == len(points)  # the footprint's count


@pytest.mark.parametrize("total, every", [(469, 117), (938, 117), (96, 16), (96, 19), (10, 4)])
def test_a_run_resumed_anywhere_has_the_uninterrupted_runs_curve(total, every):
    """Resumed from a checkpoint at any update (its snapshots restored): the same points as
    the run that went straight through, past the mark the final snapshot stands for too."""
    per_epoch = 469 if total in (469, 938) else total
    straight = lock_step_curve(total, every, per_epoch)
    for at in range(1, total + 1):
        restored = Snapshots()
        restored.take(MODEL, epoch=0.0, updates=0)
        for updates in straight[1:-1]:
            if updates <= at:  # a mark's snapshot is taken before the checkpoint there
                restored.take(MODEL, epoch=updates / per_epoch, updates=updates)
        assert lock_step_curve(total, every, per_epoch, at, restored) == straight, at


def test_an_async_rank_0_passing_marks_within_a_step_counts_only_those_the_run_takes():
    """Rank 0 of an async run checks the marks between its own steps, the global count
    jumping by the others' pushes: the mark at 468 of 469 is the final snapshot's, not a
    missed one, and a step from within half an interval of the end to past it takes none."""
    marks = run._Marks.of_run(469, 117, Snapshots(), 0, 469)
    taken = [p for p in (100, 240, 300, 470) if marks.passed(p, 469)]
    assert taken == [240]  # 117 and 234 passed within one step: one snapshot for both
    marks.taken = len(taken)
    assert marks.missed(470) == 2  # 117 (or 234) and 351; not 468
    marks = run._Marks.of_run(469, 117, Snapshots(), 0, 469)
    assert [p for p in (351, 420, 468, 469) if marks.passed(p, 469)] == [351]
    marks.taken = 1
    assert marks.missed(469) == 2 and marks.widest == 351
