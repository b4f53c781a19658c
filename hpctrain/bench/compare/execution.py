"""One run launched and watched: its process, its logs, its progress, and how it ended.

:func:`execute` starts a planned run (:func:`continued` from its checkpoints on ``--resume``)
tied to this process (:func:`tied`: it ends with the comparison, even a killed one), relays
its stderr to the run's ``stderr.log`` and the terminal (:class:`_Display`), passes SIGUSR1 on
(:class:`TimeLimitWarning`), stops it at ``--timeout``, and returns its entry of ``compare.json``
(:func:`_verdict`: ok or failed, and why).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from hpctrain import checkpoint, run_folders
from hpctrain.bench.compare.planning import Run
from hpctrain.bench.compare.record import LOGS, finished_unrecorded, launch_problem
from hpctrain.bench.report import reading
from hpctrain.errors import UsageError
from hpctrain.metrics import redraws
from hpctrain.summary import read as read_summary

_PROGRESS_EVERY_S = 30.0  # progress lines when stderr is not a terminal


def continued(run: Run, run_dir: Path) -> Run:
    """``run`` resuming from the checkpoints an earlier attempt left in ``run_dir``, if any."""
    if not checkpoint.listing(run_dir / checkpoint.SUBDIR):
        return run
    return replace(run, command=[*run.command, "--resume", str(run_dir)])


def last_error(lines: list[str], returncode: int) -> str:
    """The line of a failed run's stderr that best says why it failed."""
    for pattern in (r"hpctrain: error.*", r"\b[\w.]*(?:Error|Exception|Interrupt)\b:?.*"):
        for line in reversed(lines):
            m = re.search(pattern, line)
            if m:
                # mpirun may glue its abort banner's rule (dashes) onto the rank's last line.
                return re.sub(r"-{10,}.*", "", m.group(0)).strip()
    words = [line.strip() for line in lines if re.search(r"[A-Za-z]{2}", line)]
    return words[-1] if words else f"exit status {returncode}"


class _Display:
    """Shows a run's progress bar updates on one line under a label, and its other lines."""

    def __init__(self, label: str, stream=None):
        self.label, self.stream = label, stream or sys.stderr
        self.tty = redraws(self.stream)  # else a line each _PROGRESS_EVERY_S
        self.shown = 0.0

    def progress(self, text: str) -> None:
        if self.tty:
            self.stream.write(f"\r\x1b[K{self.label} {text}")
        elif time.monotonic() - self.shown >= _PROGRESS_EVERY_S:
            self.stream.write(f"{self.label} {text}\n")
        else:
            return
        self.shown = time.monotonic()
        self.stream.flush()

    def line(self, text: str) -> None:
        self.stream.write(("\r\x1b[K" if self.tty else "") + f"{self.label} {text}\n")
        self.stream.flush()


class TimeLimitWarning:
    """SIGUSR1 while comparing (a time limit's warning, :mod:`hpctrain.checkpoint.stop`):
    passed on to the run going on, which stops after a checkpoint if it has
    --checkpoint-every (else it runs on to its end); no run starts after it."""

    def __init__(self) -> None:
        self.child, self.passed = None, False  # passed: the signal reached self.child
        early = checkpoint.stop.installed()  # the entry point has recorded it since start-up
        self._previous = signal.signal(checkpoint.stop.SIGNAL, self._on)
        self.received = early and checkpoint.stop.received()

    def _on(self, signum, frame) -> None:
        self.received = True
        self._pass_on()

    def started(self, child) -> None:
        """``child`` runs now: the signal reaches it, also one that came while it started."""
        self.child, self.passed = child, False
        if self.received:
            self._pass_on()

    def _pass_on(self) -> None:
        if self.child is not None and not self.passed and self.child.poll() is None:
            self.passed = True
            self.child.send_signal(checkpoint.stop.SIGNAL)  # mpirun, srun forward it

    def close(self) -> None:
        signal.signal(checkpoint.stop.SIGNAL, self._previous)


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    proc.terminate()  # mpirun and srun pass it on to the ranks
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()


# A job ends with its compare even when the compare is killed outright (SIGKILL, the OOM
# killer), not only on SIGTERM or Ctrl-C (execute's cleanup): left running, a resumed compare
# started that run again beside it. On Linux the child asks for SIGTERM at its parent's death
# (prctl PR_SET_PDEATHSIG, kept across exec) and then becomes the launcher, which passes it on.
_WITH_PARENT = """\
import ctypes, os, signal, sys
if ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0) == 0 and os.getppid() != int(sys.argv[1]):
    sys.exit(143)  # the compare died before the signal was asked for
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as e:
    sys.exit(f"hpctrain bench compare: cannot run {sys.argv[2]}: {e.strerror}")
"""


def tied(command: list[str]) -> list[str]:
    """``command``, sent SIGTERM when this process dies (Linux; elsewhere as given)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _WITH_PARENT, str(os.getpid()), *command]


def execute(run: Run, run_dir: Path, label: str, timeout: float,
            warning: TimeLimitWarning | None = None) -> dict:
    """Run one job, showing its progress; return its record (status, error, returncode...).
    ``warning``: SIGUSR1 reaches the job while it runs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    display = _Display(label)
    what = "virtual worker" + ("s" if run.np > 1 else "") if "simulate" in run.command \
        else "process" + ("es" if run.np > 1 else "")
    display.line(f"{run.np} {what}: {shlex.join(run.command)}")
    lines: deque[str] = deque(maxlen=500)
    start = time.monotonic()
    # Appended: a run continued by --resume keeps the earlier attempt's logs (why it stopped).
    with _naming(run_dir / LOGS[1]), open(open_log(run_dir / LOGS[0]), "ab") as out, \
            open(open_log(run_dir / LOGS[1]), "a") as log:
        if log.tell():
            log.write(f"{reading.CONTINUED}{time.strftime('%Y-%m-%d %H:%M:%S')}) ---\n")
        proc = subprocess.Popen(tied(run.command), stdout=out, stderr=subprocess.PIPE, env=env)
        stderr = proc.stderr
        assert isinstance(stderr, io.BufferedReader)  # a pipe, binary and buffered (Popen's)
        if warning is not None:
            warning.started(proc)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _stop(proc)

        timer = threading.Timer(timeout, expire) if timeout else None
        if timer:
            timer.start()
        try:
            _relay_stderr(stderr, log, display, lines)
            returncode = proc.wait()
        finally:
            if warning is not None:
                warning.child = None
            if timer:
                timer.cancel()
            if proc.poll() is None:
                _stop(proc)
            stderr.close()  # else a ResourceWarning per run
    seconds = time.monotonic() - start
    record = {"np": run.np, "command": shlex.join(run.command), "ignored": run.ignored,
              "returncode": returncode, "seconds": round(seconds, 1)}
    return {**record, **_verdict(run, run_dir, returncode, list(lines),
                                 timeout if expired.is_set() else None)}


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError that names no file, raised inside, given ``path``'s name: the log's write and
    close (a full disk) say only "No space left on device"."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def open_log(path: Path) -> int:
    """``path`` opened to append a run's output to (made if missing), never through a symbolic
    link (:func:`run_folders.open_regular`): one another user planted in a shared ``--out``
    had the output appended to a file of their choosing. UsageError naming it if it is a
    link, not a regular file, or cannot be opened."""
    try:
        return run_folders.open_regular("bench compare: the log", path,
                                        os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except OSError as e:
        raise UsageError(f"bench compare: cannot open the log {path} ({e.strerror})") from None


def _relay_stderr(stderr: io.BufferedReader, log: TextIO, display: _Display,
                  lines: deque[str]) -> None:
    """Pass a run's ``stderr`` on as it comes until it ends: each line to the run's ``log``,
    the ``display`` and ``lines`` (the last ones name why a failed run failed), and each
    update of a progress bar (ended by a lone carriage return) to the display only."""
    def emit(text: str) -> None:
        lines.append(text)
        log.write(text + "\n")
        display.line(text)

    pending = b""
    while chunk := stderr.read1(65536):
        buf = pending + chunk
        held = buf.endswith(b"\r")  # a "\r\n" may be cut between two reads
        # Lines end with "\n" ("\r\n" too); a lone "\r" ends a progress bar's update.
        *pieces, pending = re.split(rb"(?<=\n)|(?<=\r)(?!\n)", buf[:-1] if held else buf)
        pending += b"\r" if held else b""
        for piece in pieces:
            text = piece.decode(errors="replace").rstrip()
            if piece.endswith(b"\n"):
                emit(text)
            elif text.strip():
                display.progress(text.strip())
    if last := pending.decode(errors="replace").strip():  # no newline at the end
        emit(last)


def _verdict(run: Run, run_dir: Path, returncode: int, lines: list[str],
             timed_out: float | None) -> dict:
    """How a run that ended with ``returncode`` went, from that and what it left in
    ``run_dir``: its ``status``, ``error`` and, where the timeout (``timed_out``, else None)
    stopped it after it wrote its outputs, a ``note``. Its row fails, not the comparison."""
    if timed_out is not None:
        # Rank 0 writes summary.json last: a run stopped after it (in MPI's teardown) has
        # all its outputs, and was a failed row (its start-up counts towards the timeout).
        if finished_unrecorded(run, run_dir) is not None:
            return {"status": "ok", "error": None,
                    "note": f"the {timed_out:g} s timeout stopped it after it wrote its outputs"}
        return {"status": "failed", "error": f"stopped after the {timed_out:g} s timeout"}
    try:
        summary = read_summary(run_dir) if (run_dir / "summary.json").is_file() else None
    except UsageError as e:  # this run's row fails, not the comparison
        return {"status": "failed", "error": str(e)}
    stopped = summary is not None and summary.get("stopped_on_collapse")
    if returncode != 0 and not stopped:  # a collapse-stopped run is a row (marked), not a failure
        return {"status": "failed", "error": last_error(lines, returncode)}
    if summary is None:
        return {"status": "failed", "error": "exited 0 without writing summary.json"}
    problem = launch_problem(run, summary)
    if problem:
        return {"status": "failed", "error": problem}
    return {"status": "ok", "error": None}
