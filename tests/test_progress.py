"""Rank 0's progress bar (hpctrain.metrics.progress)."""

import contextlib
import fcntl
import io
import os
import re
import struct
import sys
import termios
from collections.abc import Iterator

from hpctrain.metrics import progress, say, summary_table, watching_terminal


def test_a_resumed_runs_rate_counts_only_its_own_steps(monkeypatch):
    """The steps done before the resume were counted as made in the first interval: 905 of
    1000 at 1807 step/s after five steps."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    bar = progress(1000, 0, "sgd", initial=900)
    bar.fp = out
    clock = iter(range(100, 10**6))
    bar._time = lambda: next(clock)  # noqa: SLF001 - one step a second, as tqdm reads time
    bar.start_t = bar.last_print_t = bar._time()
    for _ in range(5):
        bar.update(1)
    assert bar.n == 905
    shown = bar.format_meter(**bar.format_dict)  # "sgd:  90%|...| 905/1000 [..., 2.00s/step]"
    assert re.search(r"[0-9.]+s/step\]$", shown), shown  # below 1 step/s: not 90.5 step/s


def test_into_a_file_it_redraws_once_a_minute(monkeypatch):
    """Redrawn twice a second into a Slurm output file, a day's run was ~12 MB on one line."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert progress(10, 0, "sgd").mininterval == 60
    assert progress(10, 1, "sgd").disable  # rank 0 only


def test_into_a_file_a_warning_during_the_bar_has_a_line_of_its_own(monkeypatch, tmp_path):
    """tqdm redraws one line with carriage returns; the collapse warning (or the watchdog's
    line) printed during a run landed after the bar's text on that line of the log."""
    with (tmp_path / "log").open("w", encoding="utf-8") as log:
        monkeypatch.setattr(sys, "stderr", log)
        bar = progress(10, 0, "sgd")
        bar.update(3)
        say("hpctrain: warning: training collapsed at update 3")
        bar.update(3)
        bar.refresh()
        bar.close()
    text = (tmp_path / "log").read_text(encoding="utf-8")
    assert "\r" not in text
    lines = text.splitlines()
    assert "hpctrain: warning: training collapsed at update 3" in lines
    assert lines[0].startswith("sgd:   0%|") and lines[-1].startswith("sgd:  60%|\u2588"), lines


class _Writes(io.StringIO):
    """A stderr that keeps each write apart."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def test_into_a_file_the_bar_ends_with_its_last_state(monkeypatch, tmp_path):
    """A run shorter than the minute between lines left only its "sgd:   0%" in the log: the
    work it did was never shown done."""
    with (tmp_path / "log").open("w", encoding="utf-8") as log:
        monkeypatch.setattr(sys, "stderr", log)
        bar = progress(10, 0, "sgd")
        bar.update(10)
        bar.close()
    lines = (tmp_path / "log").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and lines[0].startswith("sgd:   0%|"), lines
    assert lines[1].startswith("sgd: 100%|") and " 10/10 " in lines[1], lines


def test_on_a_terminal_the_bar_is_cleared_at_the_end(monkeypatch):
    with _pty(80) as err:
        monkeypatch.setattr(sys, "stderr", err)
        assert not progress(10, 0, "sgd").leave


def test_a_dumb_terminal_gets_lines_not_redraws(monkeypatch):
    """TERM=dumb cannot redraw a line: its bar is a line now and then, as into a file."""
    monkeypatch.setenv("TERM", "dumb")
    with _pty(80) as err, _pty(80) as out:
        assert watching_terminal(err, out) is None
        monkeypatch.setattr(sys, "stderr", err)
        assert progress(10, 0, "sgd").mininterval == 60


def test_a_warning_is_one_write_with_its_newline(monkeypatch):
    """tqdm.write's two writes (the text, then its newline) let mpirun put another rank's
    line between them: two ranks' warnings on one line."""
    monkeypatch.setattr(sys, "stderr", _Writes())
    say("hpctrain: rank 1: --compile: ...")
    assert [c for c in sys.stderr.calls if c] == ["hpctrain: rank 1: --compile: ...\n"]


@contextlib.contextmanager
def _pty(columns: int) -> Iterator[io.TextIOWrapper]:
    """A real terminal (a pty's slave end) ``columns`` wide; 0: one that says no width, as
    mpirun's pty for a rank whose output goes to a file."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    with os.fdopen(master, "rb"), open(slave, "w", closefd=True) as term:
        yield term


@contextlib.contextmanager
def _pipe() -> Iterator[io.TextIOWrapper]:
    read, write = os.pipe()
    with os.fdopen(read, "rb"), open(write, "w", closefd=True) as pipe:
        yield pipe


def test_under_mpirun_on_a_terminal_it_redraws_often(monkeypatch, tmp_path):
    """Open MPI hands a rank's stdout a pty sized like mpirun's terminal and its stderr a
    pipe: the bar (on stderr) is watched there, at that width. Redirected to a file, mpirun
    sizes the pty 0 columns: a batch job's log, once a minute."""
    with _pipe() as err, _pty(120) as out:
        assert watching_terminal(err, out) is out
        monkeypatch.setattr(sys, "stderr", err)
        monkeypatch.setattr(sys, "stdout", out)
        bar = progress(10, 0, "sgd")
        assert (bar.mininterval, bar.ncols) == (0.5, 120)
        bar.close()
    with _pipe() as err, _pty(0) as out:
        assert watching_terminal(err, out) is None
    with _pty(0) as err, (tmp_path / "log").open("w") as out:
        assert watching_terminal(err, out) is err  # the bar's own terminal, sized or not
    with (tmp_path / "err").open("w") as err, (tmp_path / "out").open("w") as out:
        assert watching_terminal(err, out) is None  # sbatch: both files


def test_the_summary_table_says_a_stop_and_staleness_as_measured():
    """A run stopped on collapse showed the epochs asked for as if trained; the staleness p99
    (interpolated, 4.68) was rounded to the max's 5."""
    summary = {"algo": "ssp", "workers": 3, "epochs": 2, "updates": 3,
               "final_test_acc": 0.1, "best_test_acc": 0.1, "wall_s": 1.0,
               "samples_per_s": 10.0, "stopped_on_collapse": True,
               "staleness": {"mean": 1.85, "p99": 4.68, "max": 5}}
    rows = dict(line.strip().split("  ", 1) for line in summary_table(summary).splitlines())
    assert rows["epochs / updates"].strip() == "2 / 3 (stopped on collapse)"
    assert rows["staleness mean/p99/max"].strip() == "1.85 / 4.68 / 5"


def test_the_summary_table_counts_the_samples_of_the_workers():
    """A user trial: "samples/s (all ranks)" beside a dcasgd run's 2 workers on 3 ranks (one
    a --servers rank, which trains nothing); summary.json's samples_per_s is the workers'."""
    summary = {"algo": "dcasgd-a", "workers": 2, "final_test_acc": 0.1, "best_test_acc": 0.1,
               "wall_s": 2.0, "samples_per_s": 50.0, "samples_per_worker": [60, 40]}
    rows = dict(line.strip().split("  ", 1) for line in summary_table(summary).splitlines())
    assert rows["samples/s (all workers)"].strip() == "50"
    assert not any("ranks" in row for row in rows)


def test_the_summary_table_says_skipped_and_clipped_steps():
    """30 of 32 updates skipped for NaN gradients showed only as the collapse line: a log read
    alone did not say that the steps were lost."""
    summary = {"algo": "ssgd", "workers": 2, "final_test_acc": 0.1, "best_test_acc": 0.1,
               "wall_s": 1.0, "samples_per_s": 10.0, "skipped_steps": 30,
               "clipped_steps_per_worker": [3, 2]}
    rows = dict(line.strip().split("  ", 1) for line in summary_table(summary).splitlines())
    assert rows["skipped steps (NaN/Inf)"].strip() == "30"
    assert rows["clipped steps (all workers)"].strip() == "5"
    summary.update(skipped_steps=0, clipped_steps_per_worker=[0, 0])
    assert "steps" not in summary_table(summary)


def test_the_summary_table_names_the_output_folder_absolute(tmp_path, monkeypatch):
    """A user trial: ``--out ec1`` showed "outputs  ec1" while the run's other messages (and
    config.json's out) name the folder absolute."""
    monkeypatch.chdir(tmp_path)
    summary = {"algo": "ec", "workers": 1, "final_test_acc": 0.1, "best_test_acc": 0.1,
               "wall_s": 1.0, "samples_per_s": 10.0, "out": "ec1"}
    rows = dict(line.strip().split("  ", 1) for line in summary_table(summary).splitlines())
    assert rows["outputs"].strip() == str(tmp_path / "ec1")


def test_the_summary_table_keeps_three_digits_of_a_short_simulation():
    """A 64-worker simulation's virtual wall time of 0.026 s read "0.0 s" (the report's
    table said 0.0265)."""
    summary = {"algo": "ma", "workers": 64, "final_test_acc": 0.1, "best_test_acc": 0.1,
               "wall_s": 0.0265, "scoring_s": 0.0512, "samples_per_s": 10.0}
    rows = dict(line.strip().split("  ", 1) for line in summary_table(summary).splitlines())
    assert rows["wall time"].strip() == "0.0265 s (then 0.0512 s scoring the curve)"
    summary.update(wall_s=123.46, scoring_s=0.01)
    rows = dict(line.strip().split("  ", 1) for line in summary_table(summary).splitlines())
    assert rows["wall time"].strip() == "123.5 s"
