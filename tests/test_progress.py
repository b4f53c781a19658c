"""Rank 0's progress bar (hpctrain.metrics.progress)."""

import io
import re
import sys

from hpctrain.metrics import progress


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
