"""Stall check: say which ranks have not reached a collective, and optionally end the job.

Horovod's coordinator warns when some ranks have submitted a tensor and others have not for
``HOROVOD_STALL_CHECK_TIME_SECONDS`` (60), and shuts down after
``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`` (0: never). Here the wait is the agreement round
(collective_check) that starts every collective: a daemon thread per rank watches it. After
the check time it asks every other rank of the process set what it is doing, and the lowest
waiting rank prints a report, again every check time while the wait lasts (as Horovod's):
the call it waits in, and for each rank that has not arrived its last collective and how
long ago, or the collective it waits in instead.

The other ranks are asked over a private MPI communicator where MPI runs the job (whichever
transport moves the data): the thread answers questions while the main thread computes, so
it needs MPI at thread level ``multiple`` (hpctrain.sync's default); below it there is no
check (rank 0 says so when the script asked for one), nor without the rounds
(``HPCTRAIN_CHECK_COLLECTIVES=0``). Under torchrun, where no MPI runs the
job, each thread posts its rank's status on torch.distributed's store every poll instead, and
a report reads the others' posts.
With a stall timeout the waiting ranks print the report and end the process with the status
of ``hpctrain.watchdog``, and the launcher ends the others; rank 0 first finishes writing an
elastic commit under way (``watchdog.end_job``).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import math
import os
import pickle
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hpctrain import comm as mpicomm
from hpctrain.errors import UsageError
from hpctrain.metrics import say
from hpctrain.watchdog import end_job

CHECK_ENV, SHUTDOWN_ENV, DISABLE_ENV = ("HOROVOD_STALL_CHECK_TIME_SECONDS",
                                        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS",
                                        "HOROVOD_STALL_CHECK_DISABLE")
DEFAULT_CHECK_S = 60.0
_QUERY, _REPLY = 77, 78
_ANSWER_S = 5.0  # how long a report waits, at most, for the other ranks' answers


def settings(check_s: float | None, timeout_s: float | None) -> tuple[float, float]:
    """(check, shutdown) seconds from the arguments, else Horovod's environment variables."""
    if check_s is None and _disabled():
        check_s = 0.0
    if check_s is None:
        check_s = _seconds(CHECK_ENV, DEFAULT_CHECK_S)
    if timeout_s is None:
        timeout_s = _seconds(SHUTDOWN_ENV, 0.0)
    return check_s, timeout_s


def asked(check_s: float | None, timeout_s: float | None) -> bool:
    """Whether the script asked for a stall check (``init``'s arguments, or Horovod's
    variables for its times) rather than left it to the default."""
    return check_s is not None or timeout_s is not None or \
        any(os.environ.get(v, "").strip() for v in (CHECK_ENV, SHUTDOWN_ENV))


def _disabled() -> bool:
    """``HOROVOD_STALL_CHECK_DISABLE`` as Horovod reads it (C's ``strtol``: a leading whole
    number, above 0 disables; ``1.0`` is 1), so that it means the same on every backend. A
    value with no number (``true``, ``false``) Horovod reads as 0; it is refused here instead,
    since "false" disabled the check here and "true" does not in Horovod."""
    raw = os.environ.get(DISABLE_ENV, "")
    number = re.match(r"\s*[+-]?\d+", raw)
    if number:
        return int(number.group()) > 0
    if raw.strip():
        raise UsageError(f"{DISABLE_ENV}={raw!r}: want a number, as Horovod reads it (1: no "
                         "stall check, 0: the check)")
    return False


def _seconds(variable: str, default: float) -> float:
    """A number of seconds >= 0 from ``variable`` (``default`` when unset or empty); not
    ``inf``, which a wait cannot take (OverflowError in the stall check's thread)."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise UsageError(f"{variable} must be a number of seconds >= 0, got {raw!r}")
    return value


@dataclass
class _Waiting:
    channel: Any
    call: Any
    seq: int
    since: float
    report_after: float = 0.0  # waited seconds; the next report once past them (as Horovod's)
    heard: dict = field(default_factory=dict)  # rank -> (its answer, when): the check's
    # A lower rank waits in this call too and prints its reports: this one asks no more until
    # the ending one (every waiting rank asking every other at each check: N^2 messages).
    quiet: bool = False


class _MpiPeers:
    """The other ranks' statuses by question and answer over a private MPI communicator."""

    def __init__(self, comm: Any):
        self.comm = comm
        self._ids = itertools.count()
        self._sends: list[Any] = []

    def serve(self, status: Callable[[], tuple]) -> None:
        """Answer the questions that have arrived with this rank's ``status()``."""
        MPI = mpicomm.mpi()
        probe = MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_QUERY, status=probe):
            source = probe.Get_source()
            query = self.comm.recv(source=source, tag=_QUERY)
            self._sends.append(self.comm.isend((query, status()), dest=source, tag=_REPLY))
        self._sends = [r for r in self._sends if not r.Test()]

    def ask(self, others: list[int], status: Callable[[], tuple],
            wait_s: float = _ANSWER_S) -> dict[int, tuple]:
        """The statuses of ``others`` that answer within ``wait_s`` (answering theirs)."""
        MPI = mpicomm.mpi()
        query = (self.comm.Get_rank(), next(self._ids))
        for r in others:
            self._sends.append(self.comm.isend(query, dest=r, tag=_QUERY))
        answers: dict[int, tuple] = {}
        deadline = time.monotonic() + wait_s
        probe = MPI.Status()
        while len(answers) < len(others) and time.monotonic() < deadline:
            self.serve(status)
            if self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_REPLY, status=probe):
                source = probe.Get_source()
                got, answer = self.comm.recv(source=source, tag=_REPLY)
                if got == query:
                    answers[source] = answer
            else:
                time.sleep(0.01)
        return answers

    def close(self) -> None:
        self.comm.Free()


class _StorePeers:
    """The other ranks' statuses as each rank's thread last posted them on a key-value store
    (torch.distributed's, under torchrun): at most one poll old.

    A rank that has not posted yet is skipped rather than waited for: its counter
    ``R.posted``, read with ``add(0)``, is 0 (``get`` would block, and ``check`` is missing
    from torch before 2.3).
    """

    def __init__(self, store: Any, rank: int):
        self.store, self.rank = store, rank
        self._posted = False

    def serve(self, status: Callable[[], tuple]) -> None:
        try:
            self.store.set(str(self.rank), pickle.dumps(status()))
            if not self._posted:
                self.store.add(f"{self.rank}.posted", 1)
                self._posted = True
        except RuntimeError:  # the store's host has gone: the job is ending
            pass

    def ask(self, others: list[int], status: Callable[[], tuple],
            wait_s: float = _ANSWER_S) -> dict[int, tuple]:
        try:
            return {r: pickle.loads(self.store.get(str(r))) for r in others
                    if self.store.add(f"{r}.posted", 0)}
        except RuntimeError:
            return {}

    def close(self) -> None:
        pass


def _with_earlier(answers: dict[int, tuple], heard: dict[int, tuple],
                  others: list[int]) -> dict[int, tuple]:
    """``answers``, and for a rank that gave none now (the ending report waits two polls
    only: a loaded node's thread missed them) what it said at the check's report of the same
    wait, its "ago" counted on to now. ``heard`` keeps this report's answers for the next."""
    now = time.monotonic()
    for r in others:
        if r in answers:
            heard[r] = (answers[r], now)
        elif r in heard:
            (waiting, last, ago), then = heard[r]
            answers = {**answers, r: (waiting, last, ago + now - then)}
    return answers


def answer_wait(waited: float, ending: bool, timeout_s: float, poll_s: float) -> float:
    """How long a report waits for the other ranks' answers: at most ``_ANSWER_S``, and not
    past the shutdown time ``timeout_s`` (a rank that could not answer held a 5 s shutdown
    to 13 s: the check's report waited, then the ending one); the ending report two of their
    polls (each rank's thread answers between polls of ``poll_s``)."""
    if ending:
        return min(_ANSWER_S, 2 * poll_s)
    if timeout_s > 0:
        return max(0.0, min(_ANSWER_S, timeout_s - waited))
    return _ANSWER_S


class _Monitor:
    def __init__(self, peers: _MpiPeers | _StorePeers, rank: int, check_s: float,
                 timeout_s: float):
        self.peers, self.rank, self.check_s, self.timeout_s = peers, rank, check_s, timeout_s
        self.waiting: _Waiting | None = None
        self.last, self.last_at = "nothing yet", time.monotonic()
        self._stop = threading.Event()
        limits = [s for s in (check_s, timeout_s) if s > 0]
        self._poll = min(1.0, min(limits) / 4)
        self._thread = threading.Thread(target=self._watch, name="hpctrain-stall", daemon=True)
        self._thread.start()

    def status(self) -> tuple:
        w = self.waiting
        now = time.monotonic()
        waiting = None if w is None else (w.channel.label, w.seq, w.call.describe(),
                                          now - w.since)
        return waiting, self.last, now - self.last_at

    def _watch(self) -> None:
        self.peers.serve(self.status)
        while not self._stop.wait(self._poll):
            self.peers.serve(self.status)
            w = self.waiting
            if w is None:
                continue
            found = time.monotonic()
            waited = found - w.since
            if self.timeout_s > 0 and waited > self.timeout_s:
                self._report(w, ending=True, found=found)
                end_job()
            if self.check_s > 0 and waited > max(w.report_after, self.check_s):
                self._report(w, ending=False, found=found)
                w.report_after = time.monotonic() - w.since + self.check_s

    def _report(self, w: _Waiting, ending: bool, found: float) -> None:
        """Print the wait as the check ``found`` it (``time.monotonic()``), the others' last
        calls counted back to then: asking them takes up to two polls, which the line counted
        in ("waited 2 s" for a 1 s check, "4 s" ending at a 3 s timeout)."""
        if w.quiet and not ending:
            return
        members = [w.channel.global_rank(r) for r in range(w.channel.transport.size())]
        others = [r for r in members if r != self.rank]
        answers = self.peers.ask(others, self.status, answer_wait(
            found - w.since, ending, self.timeout_s, self._poll))
        answers = _with_earlier(answers, w.heard, others)
        asking = time.monotonic() - found  # the answers' "ago" are counted to now
        here = (w.channel.label, w.seq)
        waiting_here = [self.rank] + [r for r, a in answers.items()
                                      if a[0] is not None and a[0][:2] == here]
        if min(waiting_here) != self.rank and not ending:
            w.quiet = True
            return  # a lower rank waiting in the same call prints the report
        absent = []
        for r in others:
            if r in waiting_here:
                continue
            if r not in answers:
                absent.append(f"rank {r} (no answer)")
                continue
            waiting, last, ago = answers[r]
            text = f"rank {r} (last called {last}, {max(0.0, ago - asking):.0f} s ago"
            if waiting is not None:
                text += f"; now waits in {waiting[2]} (call #{waiting[1] + 1} on {waiting[0]})"
            absent.append(text + ")")
        waited = found - w.since
        ranks = ", ".join(str(r) for r in sorted(waiting_here))
        tail = (f"; ending the job (stall timeout {self.timeout_s:g} s)" if ending else
                f"; still waiting (stall check every {self.check_s:g} s)")
        say(f"hpctrain.sync: stall: rank {ranks} waited {waited:.0f} s in "
            f"{w.call.describe()} (call #{w.seq + 1} on {w.channel.label}); not arrived: "
            f"{'; '.join(absent) or 'none'}{tail}")

    def stop(self, wait_s: float | None = None) -> None:
        self._stop.set()
        self._thread.join(wait_s)


_monitor: _Monitor | None = None


def start(world_comm: Any, check_s: float, timeout_s: float, *, store: Any = None,
          rank: int = 0, asked_for: bool = False, rounds: bool = True) -> None:
    """Watch this rank's rounds, asking the other ranks over MPI communicator ``world_comm``
    (the backend's world's ranks; collective: Dup; needs MPI thread level multiple), or
    where that is None through key-value ``store`` (a torch.distributed Store that the
    world's ranks share; this is world rank ``rank``). Neither: no check. Below thread
    level multiple, or without ``rounds`` to watch (``HPCTRAIN_CHECK_COLLECTIVES=0``), there
    is none either: said once (rank 0) if the check was ``asked_for`` (:func:`asked`), as a
    script relying on its timeout would otherwise hang unawares."""
    global _monitor
    stop()
    if check_s <= 0 and timeout_s <= 0:
        return
    if not rounds:
        if asked_for and rank == 0:
            _say_no_check(check_s, timeout_s, "it watches the collective check's rounds, "
                          "which HPCTRAIN_CHECK_COLLECTIVES=0 turns off; unset it")
        return
    if world_comm is not None:
        MPI = mpicomm.mpi()
        if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
            if asked_for and world_comm.Get_rank() == 0:
                _say_no_check(check_s, timeout_s, (
                    "it needs MPI thread level 'multiple', and MPI runs at "
                    f"{mpicomm.thread_level()!r}; call hpctrain.comm.init('multiple') before "
                    "anything starts MPI"))
            return
        _monitor = _Monitor(_MpiPeers(world_comm.Dup()), world_comm.Get_rank(), check_s,
                            timeout_s)
    elif store is not None:
        _monitor = _Monitor(_StorePeers(store, rank), rank, check_s, timeout_s)


def _say_no_check(check_s: float, timeout_s: float, why: str) -> None:
    times = [f"{what} after {s:g} s" for what, s in (("a report", check_s),
                                                     ("the job ended", timeout_s)) if s > 0]
    say(f"hpctrain.sync: warning: the stall check asked for ({', '.join(times)}) does not "
        f"run: {why}")


@atexit.register  # atexit handlers run before mpi4py's Py_AtExit finalizes MPI
def _stop_thread_at_exit() -> None:
    """Stop the thread of a check nobody stopped (a script without shutdown()) before the
    interpreter ends: a daemon thread ended inside the store's C++ call aborts the process
    ("terminate called without an active exception"), and one inside MPI outlives it."""
    if _monitor is not None:
        _monitor.stop(wait_s=_ANSWER_S)


def stop() -> None:
    global _monitor
    if _monitor is not None:
        _monitor.stop()
        _monitor.peers.close()
        _monitor = None


def wait(request: Any, channel: Any, call: Any) -> None:
    """``request.wait()`` for ``call``'s round on ``channel``, watched by the monitor."""
    with watching(channel, call):
        request.wait()


@contextlib.contextmanager
def watching(channel: Any, call: Any) -> Iterator[None]:
    """A wait for ``call``'s round on ``channel`` however the caller waits (a joined rank
    polls): reported after the check time, ended after the stall timeout."""
    m = _monitor
    if m is None:
        yield
        return
    m.waiting = _Waiting(channel, call, channel.seq, time.monotonic())
    try:
        yield
    finally:
        m.waiting = None
        m.last = f"{call.describe()} (call #{channel.seq + 1} on {channel.label})"
        m.last_at = time.monotonic()
