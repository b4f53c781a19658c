"""The run's TensorBoard file (hpctrain.tensorboard.Board), read back by TensorBoard itself."""

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

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
