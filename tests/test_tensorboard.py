"""The run's TensorBoard file (hpctrain.tensorboard.Board, written by rank 0's live.Watch), read
back by TensorBoard itself."""

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from test_collapse import feed, watch_of  # noqa: E402

from hpctrain.tensorboard import Board  # noqa: E402


def logged(out, tag: str) -> dict:
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    return {e.step: e.value for e in board.Scalars(tag)}


def attempt(out, value: float, steps, resumed: int = 0) -> None:
    board = Board(out, True, resumed=resumed)
    for step in steps:
        board.scalar("test/accuracy", value, step)
    board.close()


def test_a_fresh_run_hides_a_failed_attempts_entries(tmp_path):
    """A run into a folder an attempt left without a summary kept that attempt's entries: two
    series on one plot."""
    attempt(tmp_path, 0.25, range(0, 80, 16))
    attempt(tmp_path, 0.5, range(0, 48, 16))
    assert logged(tmp_path, "test/accuracy") == {0: 0.5, 16: 0.5, 32: 0.5}


def test_a_resumed_run_replaces_the_entries_from_its_update_on(tmp_path):
    attempt(tmp_path, 0.25, range(0, 80, 16))
    attempt(tmp_path, 0.5, range(32, 96, 16), resumed=32)
    assert logged(tmp_path, "test/accuracy") == {0: 0.25, 16: 0.25, 32: 0.5, 48: 0.5,
                                                 64: 0.5, 80: 0.5}


def test_a_runs_last_steps_reach_the_board(tmp_path):
    """Training entries came every LOG_EVERY (10) steps only: never the last few steps of a
    run, and none at all of a run that collapsed within ten."""
    for steps, entries in ((25, {10: 0.95, 20: 1.95, 25: 2.7}), (4, {4: 0.65})):
        out = tmp_path / str(steps)
        watch = watch_of(out, tensorboard=True)
        feed(watch, [0.5 + 0.1 * i for i in range(steps)])
        watch.finish()
        watch.after([])
        assert logged(out, "train/loss") == pytest.approx(entries)
        assert logged(out, "train/lr").keys() == entries.keys()
