"""conftest's ending of a job that a test leaves running: nothing it started outlives the test.

Open MPI's mpirun starts each rank in a session of its own, outside the job's process group,
so that signalling the group alone does not reach them; a shell launcher stands in for it
here (no MPI, no torch: a fraction of a second)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import alive, end_job

# A launcher that ignores SIGTERM (as a hung mpirun does not end on it) with two children:
# one in its process group, one in a session of its own (as mpirun's ranks); each writes its
# pid to $PIDS/<name> and holds the launcher's stdout and stderr open.
LAUNCHER = """\
trap '' TERM
sleep 300 & echo $! > "$PIDS/grouped"
setsid bash -c 'echo $$ > "$PIDS/own.tmp" && mv "$PIDS/own.tmp" "$PIDS/own"; exec sleep 300' &
wait
"""


def pids_written(folder: Path, names: tuple[str, ...], timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while not all((folder / name).exists() for name in names):
        assert time.monotonic() < deadline, f"{sorted(os.listdir(folder))} in {timeout} s"
        time.sleep(0.02)
    return [int((folder / name).read_text()) for name in names]


@pytest.mark.timeout(60)
def test_end_job_ends_the_launcher_and_what_it_started_in_sessions_of_their_own(tmp_path):
    """A job that did not end on SIGTERM was killed alone (warn_after_checkpoint's job.kill())
    or with its process group (run_job's timeout): a rank in a session of its own went on,
    holding the test's pipes."""
    job = subprocess.Popen(["bash", "-c", LAUNCHER], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True,
                           env={**os.environ, "PIDS": str(tmp_path)})
    children = []
    try:
        children = pids_written(tmp_path, ("grouped", "own"))
        assert os.getpgid(children[1]) != job.pid  # outside the job's group, as a rank
        said = end_job(job, grace=0.5)
        assert [pid for pid in children if alive(pid)] == [], said
        assert job.returncode == -signal.SIGKILL  # it ignored SIGTERM, and was reaped
    finally:
        for pid in children:  # should the test fail: nothing of it left running
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate(timeout=10)


@pytest.mark.timeout(60)
def test_a_job_left_running_is_ended_and_what_it_wrote_shown(capsys):
    """What a job the test left running wrote went unread when the fixture ended it: the
    report of a test whose own ``finally`` killed the launcher alone said nothing of why."""
    from conftest import _end_left

    job = subprocess.Popen(["bash", "-c", "echo stuck at step 7 >&2; exec sleep 300"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 30  # until bash has written its line and exec'd sleep
        while not Path(f"/proc/{job.pid}/cmdline").read_bytes().startswith(b"sleep"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        _end_left(job)
        err = capsys.readouterr().err
        assert job.poll() is not None and "a job left running was ended: bash -c" in err \
            and "stuck at step 7" in err
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate(timeout=10)
