"""End a job whose rank stops making progress, instead of waiting for the time limit.

A rank that dies is noticed by the launcher. One that stays alive but stops (a deadlock, a
hung file system, a stuck device) leaves every other rank waiting in its next collective until
the scheduler's time limit. With ``--stall-timeout S`` each rank runs a daemon thread that
ends the job when the rank has not called :func:`beat` for S seconds: it prints one line with
the rank and what it last did, and exits the process, which makes ``mpirun`` (or ``srun
--kill-on-bad-exit=1``) end the others. It exits rather than calling ``MPI_Abort`` because the
main thread may be inside MPI, and the async algorithms run MPI at thread level
``serialized``.

Beats come from the training loops (each step), evaluation (each snapshot; rank 0 also for each
score the evaluating rank sends, the others while they wait for rank 0 then), a store host
serving its windows, and every rank waiting for rank 0: before the first step (while it scores
a resumed run's snapshots) and at the end (while it scores ma's and ec's curve and writes the
outputs). Where rank 0 writes (a checkpoint, the summary) the workers' wait has a bound, the
write's allowance plus the timeout: a rank 0 frozen whole (SIGSTOP, a node that stops
scheduling it) has no watchdog of its own left to end the job. Ranks that wait for a stalled
one stop beating too, so several ranks may report. Where a rank knows it waits for the others
(the step's gradient sync and update, ma's and ec's round, ssp's wait for the slowest worker,
the agreement at a checkpoint mark and at the end: :func:`waiting_for_others`), its watchdog
gives the stalled rank a grace (:func:`grace`) to speak first, and its own line says what it
was waiting in: the first line names the rank stuck outside such a wait (its compute, its
data). In asynchronous runs the others keep stepping and only the stalled rank's watchdog fires
(or theirs, a grace later, at the end of training), except ssp's, which wait for the slowest
worker (a grace later too): they beat while it steps, so one frozen whole (its watchdog thread
too) ends the job. A process stopped and continued (mpirun's SIGCONT before its SIGTERM, ``fg``
after Ctrl-Z) restarts its clock rather than blaming itself (:func:`stopped_after`): a frozen
rank stays the one without a line.
Horovod's stall check only warns by default; PyTorch's NCCL watchdog aborts after its
collective timeout, as this does.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import NoReturn

from hpctrain.metrics import say

EXIT_STATUS = 3  # distinct from an error (1), a usage error (2) and a kill (137)
# Until the first beat (imports, MPI and Horovod start-up, reading the data from a shared file
# system) at least this long: a short --stall-timeout is about training steps.
STARTUP_S = 600.0
# Work that makes progress but cannot beat (a checkpoint's or the outputs' write of a large
# model, the ranks waiting in a collective meanwhile) at least this long: a slow file system is
# not a stall, a hung one still is.
BUSY_S = 600.0
# The most a rank waiting for the others is given beyond the timeout (see grace()).
GRACE_MAX_S = 60.0
# The shortest wait between two looks (a tenth of the timeout, at most a second): a tiny timeout
# from Python (train's --stall-timeout is 0 or >= 1) must not spin the thread.
MIN_POLL_S = 0.01


def end_job() -> NoReturn:
    """End this process with :data:`EXIT_STATUS` (the launcher then ends the others), once
    the work registered with ``hpctrain.job_end.before_abort`` is done, as the abort hook does:
    rank 0's elastic commit still being written, each waited for at most its own bound
    (``elastic.FINISH_S``). The callbacks only join threads that need nothing from the one
    stalled, so a watch thread may run them. Without ``hpctrain.job_end`` imported none are
    registered."""
    job_end = sys.modules.get("hpctrain.job_end")
    if job_end is not None:
        job_end.finish_before_abort()
    os._exit(EXIT_STATUS)


def stopped_after(timeout: float) -> float:
    """How late a look (beyond its poll) shows that the process itself was stopped (SIGSTOP,
    Ctrl-Z, a node that stops scheduling it), not its rank stuck: half the timeout.

    The monotonic clock runs on while a process is stopped, and Open MPI's mpirun ends a
    job's ranks with SIGCONT before SIGTERM: a rank frozen whole woke with its time past the
    limit and blamed itself before the SIGTERM landed, so the frozen rank was not the one
    without a line. It was stopped at least about the timeout (the waiting ranks' watchdogs
    end the job that long after its last beat), well over half. A loaded machine's late
    look (a fraction of a second, a second) is not taken for a stop once the timeout is a
    few seconds; below that (train's least is 1 s) one is, which only restarts the clock:
    a stall's end comes that much later, a healthy run is not ended. A look the main thread
    kept waiting by holding the GIL counts as a stop too: the watchdog cannot see inside
    such a call either way."""
    return timeout / 2


def grace(timeout: float) -> float:
    """How much longer than its limit a rank inside :func:`waiting_for_others` waits before
    it ends the job: half the timeout, at most :data:`GRACE_MAX_S`.

    The stalled rank and those waiting for it beat last at about the same time (the end of
    the step before, the lock-step collectives' skew apart), so without a grace whichever
    watchdog looked first spoke, often a waiting one. The stalled rank's line comes within a
    poll (a tenth of the timeout, at most 1 s) of its limit, and mpirun ends the others about
    a second after it exits: half the timeout is five polls; a stall inside the wait itself
    (a hung network) still ends the job, that much later, and never more than a minute."""
    return min(timeout / 2, GRACE_MAX_S)


class _Watchdog:
    def __init__(self, timeout: float, rank: int, ranks: int = 1) -> None:
        self.timeout, self.rank, self.grace = timeout, rank, grace(timeout)
        # A rank cannot tell for which rank it waits (the main thread may be inside MPI, at
        # thread level serialized), nor always whether it waits (the final barrier,
        # rank 0's evaluation): the line says how to read it.
        self.hint = "; ranks waiting for a stalled one may say this too, and one frozen " \
            "whole (its watchdog with it) says nothing" if ranks > 1 else ""
        self.limit = max(timeout, STARTUP_S)  # the timeout once the first beat came
        self.count: int | None
        self.last, self.doing, self.count = time.monotonic(), "starting", None
        self.waiting: str | None = None  # set by waiting_for_others()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hpctrain-watchdog",
                                        daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        poll = min(1.0, max(self.timeout / 10, MIN_POLL_S))
        looked = time.monotonic()
        while not self._stop.wait(poll):
            now = time.monotonic()
            if now - looked - poll > stopped_after(self.timeout):
                self.last = now  # the process was stopped, not stuck: the clock restarts
            looked = now
            waiting = self.waiting  # read once: the main thread may clear it meanwhile
            limit = self.limit if waiting is None else self.limit + self.grace
            if now - self.last > limit:
                doing = self.doing if self.count is None else f"{self.doing} {self.count}"
                said = self.hint if waiting is None else (
                    f"; waiting for the other ranks in {waiting}: a rank stalled outside such "
                    f"a wait had {self.grace:g} s more to speak first; one frozen whole (its "
                    f"watchdog with it) says nothing")
                say(f"hpctrain: rank {self.rank} made no progress for {limit:g} s (last: "
                    f"{doing}); ending the job (--stall-timeout {self.timeout:g}){said}")
                end_job()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


_active: _Watchdog | None = None


def start(timeout: float, rank: int, ranks: int = 1) -> None:
    """Watch this rank of ``ranks``: end the process after ``timeout`` seconds without a beat
    (0: never; before the first beat at least ``STARTUP_S``)."""
    global _active
    stop()
    if timeout > 0:
        _active = _Watchdog(timeout, rank, ranks)


@contextlib.contextmanager
def watching(timeout: float, rank: int, ranks: int, doing: str) -> Iterator[None]:
    """:func:`start` for a wait before training (``doing``) that a rank which never comes
    would make endless: ``hpctrain.train`` called on some ranks only. Nothing for one rank."""
    if ranks > 1:
        start(timeout, rank, ranks)
        beat(doing, starting=True)
    try:
        yield
    finally:
        if ranks > 1:
            stop()


def beat(doing: str, count: int | None = None, *, starting: bool = False,
         compiling: bool = False) -> None:
    """Record progress: ``doing`` (and ``count``, e.g. "step", 12) name it in the message.

    ``starting``: progress made before the first step (a resumed run's restored snapshots
    scored, the ranks waiting for that): the clock restarts, but the start-up's allowance
    holds until the first step, whose compilation may take minutes. ``compiling``: what
    follows compiles, or waits for another rank's compile (``--compile`` meeting a new batch
    size, EC's first ensemble pass or the first evaluation; ma's and ec's round after a new
    size): held to at least ``BUSY_S`` until the next beat, as the first step is."""
    if _active is not None:
        _active.last, _active.doing, _active.count = time.monotonic(), doing, count
        if compiling:
            _active.limit = max(_active.limit, BUSY_S)
        elif not starting:
            _active.limit = _active.timeout


class waiting_for_others:  # noqa: N801 - used as a function, like contextlib's
    """Around the part of a step that waits for the other ranks (the lock-step update's
    collectives, ma's and ec's round, a push waiting for others' locks): the watchdog holds
    this rank to :func:`grace` beyond its limit there and its line says ``what`` it waited in,
    so that the rank that stalled elsewhere speaks first. It sets and clears one attribute, a
    class rather than a generator for the cost of a step's two calls; nothing when not
    watching."""

    __slots__ = ("what", "active", "before")
    active: _Watchdog | None
    before: str | None

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        self.active = active = _active  # the one to clear, should watching restart inside
        if active is not None:
            self.before, active.waiting = active.waiting, self.what

    def __exit__(self, *exc: object) -> None:
        if self.active is not None:
            self.active.waiting = self.before


@contextlib.contextmanager
def busy(doing: str, count: int | None = None) -> Iterator[None]:
    """Around work that cannot beat (see :data:`BUSY_S`): held to at least ``BUSY_S``
    instead of the timeout, and to what held before once it ends."""
    active = _active
    if active is None:
        yield
        return
    before = active.limit
    beat(doing, count, starting=True)
    active.limit = max(before, BUSY_S)
    try:
        yield
    finally:
        beat(doing, count, starting=True)
        active.limit = before


def wait_beating(comm, doing: str, count: int | None = None, *,
                 starting: bool = False, bounded: bool = False) -> None:
    """A barrier over ``comm`` that beats meanwhile: the ranks waiting for rank 0 (while it
    scores snapshots or writes a checkpoint or the outputs) make no progress of their own for
    longer than --stall-timeout, but have not stalled. Rank 0 beats for each piece of its
    work, so its own watchdog still catches a stall there. ``starting``: as :func:`beat`'s.
    ``bounded``: rank 0's work is a write held to :data:`BUSY_S` by its own watchdog; a rank 0
    frozen whole (its watchdog thread too) would hold the others here for ever, so they give
    up after :func:`wait_limit` s, ending the process as a stall does. It beats before its
    first look too: what the watchdog holds after the wait (what it says the rank last did,
    its clock, its limit) must not depend on whether rank 0 was done before this rank
    looked. A communicator without a non-blocking barrier (torchrun's, the simulator's) waits
    in a plain one."""
    if not hasattr(comm, "Ibarrier"):
        comm.Barrier()
        return
    request = comm.Ibarrier()
    active, since = _active, time.monotonic()
    while True:
        beat(doing, count, starting=starting)
        if request.Test():
            return
        if bounded and active is not None and time.monotonic() - since > wait_limit():
            what = doing if count is None else f"{doing} {count}"
            say(f"hpctrain: rank {active.rank} gave up {what} after {wait_limit():g} s: rank 0 "
                f"made no progress (frozen, or stuck where its watchdog cannot see); ending "
                f"the job (--stall-timeout {active.timeout:g})")
            end_job()
        time.sleep(0.005)


def wait_limit() -> float:
    """How long a rank waits for rank 0's write (``wait_beating(bounded=True)``): rank 0's
    own allowance for it, :data:`BUSY_S`, then the timeout; rank 0's watchdog, if it runs,
    ends a hung write first."""
    return BUSY_S + (_active.timeout if _active is not None else 0.0)


def stop() -> None:
    """Stop watching (training is over)."""
    global _active
    if _active is not None:
        _active.stop()
        _active = None
