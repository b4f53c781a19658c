"""SIGUSR1: write a checkpoint within a few updates and stop, so that a job can requeue itself
before its time limit instead of losing what it trained since its last checkpoint.

A batch system warns a job ahead of its limit with a signal (Slurm: ``#SBATCH
--signal=B:USR1@300`` sends SIGUSR1 to the batch script 300 s before; ``slurm/train.sbatch``
passes it on to the launcher, and mpirun, mpiexec and srun forward it to every rank). The
handler only records it. The lock-step loop acts on it at an update boundary, once rank 0's
verdict has reached every rank (:meth:`~hpctrain.checkpoint.Checkpointer.due`); in an
asynchronous run rank 0 closes the ticket counter, so that every worker's next claim is
:data:`CLOSED` and brings it to a checkpoint of exactly the updates claimed before. Every rank
takes part in the checkpoint and raises :class:`Stopped`, which ``hpctrain train`` turns into
exit status :data:`EXIT_STATUS`. The job then requeues itself and ``--resume auto`` goes on
from that checkpoint.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, TypeAlias

SIGNAL = signal.SIGUSR1
EXIT_STATUS = 5  # hpctrain train stopped on SIGNAL after a checkpoint: requeue to go on
CLOSED = 2 ** 62  # the index an asynchronous worker claims once rank 0 closed the tickets
COMMANDS = (("train",), ("bench", "compare"))  # the command lines that act on SIGNAL

_received = False


# A signal handler as signal.signal takes and returns it (typeshed's _HANDLER).
Handler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def install() -> Handler:
    """Record SIGNAL from now on (not the default: ending the process), forgetting one recorded
    before; return the handler it replaced, for :func:`restore`. Only the main thread may
    handle signals: elsewhere (``hpctrain.train`` called in a thread) nothing is installed and
    None is returned. ``hpctrain train`` installs it first thing, so that a run that cannot
    stop on SIGNAL (no checkpoints, an asynchronous algorithm) is not ended by it either."""
    if threading.current_thread() is not threading.main_thread():
        return None
    forget()
    return signal.signal(SIGNAL, _record)


def install_for(argv: Sequence[str]) -> None:
    """:func:`install` if ``argv`` (the words after the program's name) runs one of COMMANDS.
    The entry points (``python -m hpctrain``, ``python -m hpctrain.cli``) call it before
    anything imports torch, which takes seconds: a warning that comes in a job's first seconds
    is then recorded instead of ending the process."""
    if any(tuple(argv[:len(command)]) == command for command in COMMANDS):
        install()


def installed() -> bool:
    """Whether SIGNAL is being recorded."""
    return signal.getsignal(SIGNAL) is _record


def restore(previous: Handler) -> None:
    """Put back the handler :func:`install` replaced."""
    if previous is not None:
        signal.signal(SIGNAL, previous)


def ignore_from_now() -> None:
    """Ignore SIGNAL for the rest of the process, which is ending: a second warning after a
    stop, or one during the interpreter's shutdown (where Python puts the default action
    back and MPI finalises), would end a rank on signal 10, an exit status a requeue does
    not take for a stop. Only where SIGNAL is being recorded, from the main thread."""
    if threading.current_thread() is threading.main_thread() and installed():
        signal.signal(SIGNAL, signal.SIG_IGN)


def _record(signum, frame) -> None:
    global _received
    _received = True


def received() -> bool:
    """Whether SIGNAL came since :func:`install` or :func:`forget`."""
    return _received


def forget() -> None:
    """Forget a SIGNAL recorded so far. A run that stopped on it calls this: the handler stays
    installed across ``hpctrain.cli.main`` calls (a script's sweep), whose next run would
    otherwise stop at its first checkpoint. One that no run acted on yet (it came during the
    entry point's start-up, or a run without checkpoints ignored it) is kept."""
    global _received
    _received = False


class Stopped(Exception):
    """The run stopped on SIGNAL after the checkpoint of update ``updates`` of ``total``, in
    ``folder``; it goes on with ``--resume``."""

    def __init__(self, updates: int, total: int, folder: str) -> None:
        super().__init__(f"stopped by SIGUSR1 after the checkpoint of update {updates} of "
                         f"{total} in {folder}; continue with --resume")
        self.updates, self.total, self.folder = updates, total, folder

    def __reduce__(self):  # sent to an evaluating rank (--eval-rank), which raises it too
        return Stopped, (self.updates, self.total, self.folder)
