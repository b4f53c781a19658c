"""Ending the job on an error: an uncaught exception on one rank ends every rank.

:func:`install_abort_on_error` replaces ``sys.excepthook``: the error said in one line
(:func:`describe_error`, :func:`user_frame` naming the user's code) with the rank, or for a
user's own script (:func:`install_for_script`, which :func:`hpctrain.comm.init` calls) with
Python's traceback, then ``MPI_Abort``. Around it: work that must finish before the process
ends (:func:`before_abort`), the launcher's SIGTERM while a rank waits to be ended, and
torchrun's error file, which names the rank that failed first.

Apart from :mod:`hpctrain.comm` (the MPI world, whose launcher and rank helpers it reads
when an error comes, through the module)
since it is a concept of its own: what a failing job says, and how it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import sysconfig
import time
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import Any

from hpctrain import comm  # by reference: a patched comm.launcher reaches the hook too
from hpctrain.errors import UsageError, raised_on_every_rank
from hpctrain.switches import switch


def describe_error(exc: BaseException) -> str:
    """One line for ``exc``: the message alone for a UsageError, else type and message, and
    where in the user's own code it arose (a model's forward, a loader, a script's line)."""
    if isinstance(exc, UsageError):
        return str(exc)
    where = user_frame(exc.__traceback__)
    return f"{type(exc).__name__}: {exc}" + (f" (at {where})" if where else "")


def user_frame(tb) -> str:
    """The innermost frame of ``tb`` outside hpctrain, the standard library and installed
    packages, as ``file:line, in function``; "" if there is none. The one line replaces
    the traceback, so without it an error in a user's model said nothing of where."""
    # "scripts": the installed command's wrapper (bin/hpctrain, bin/torchrun) is no user code.
    library = {sysconfig.get_paths()[k]
               for k in ("stdlib", "platstdlib", "purelib", "platlib", "scripts")}
    library.add(os.path.dirname(os.path.abspath(__file__)))
    where = ""
    for frame, line in traceback.walk_tb(tb):
        name = frame.f_code.co_filename
        if name.startswith("<"):  # <frozen runpy> (python -m), <string>: no file of the user's
            continue
        path = os.path.abspath(name)
        if not any(path.startswith(d + os.sep) for d in library):
            shown = os.path.relpath(path) if path.startswith(os.getcwd() + os.sep) else path
            where = f"{shown}:{line}, in {frame.f_code.co_name}"
    return where


_before_abort: list[Callable[[], None]] = []


def before_abort(callback: Callable[[], None]) -> None:
    """Have the abort hook call ``callback`` before it ends the process: work an error must
    not cut off (rank 0's write of an elastic commit). Registered rather than imported, so
    that this module does not depend on what uses it."""
    if callback not in _before_abort:
        _before_abort.append(callback)


def finish_before_abort() -> None:
    """The work :func:`before_abort` registered, done before this process ends."""
    for callback in _before_abort:
        with contextlib.suppress(Exception):  # the hook must end the process regardless
            callback()


def _exit_on_sigterm(status: int) -> None:
    """While this rank waits to be ended: the launcher's SIGTERM exits with ``status`` (not
    143), once the work registered with :func:`before_abort` is done. A handler that exited
    at once cut off rank 0's write of an elastic commit and the restart lost it."""
    def _exit(*_: Any) -> None:
        finish_before_abort()
        os._exit(status)

    with contextlib.suppress(ValueError):  # not the main thread: no handler
        signal.signal(signal.SIGTERM, _exit)


def hpctrains_own(exc: BaseException) -> bool:
    """Whether hpctrain raised ``exc`` for the user to read, its message the whole story: a
    UsageError, an error every rank raised alike, or one of hpctrain's own classes
    (CollectiveMismatchError, TooManyBadSteps, ...). Another is a bug in the user's code or
    a library's, whose traceback says where."""
    return isinstance(exc, UsageError) or raised_on_every_rank(exc) \
        or type(exc).__module__.partition(".")[0] == "hpctrain"


def _abort_hook(exc_type, exc, tb) -> None:
    """hpctrain's commands' and runs' hook: every error in one line."""
    _end_on_error(exc_type, exc, tb, script=False)


def _script_abort_hook(exc_type, exc, tb) -> None:
    """A script's hook (``hvd.init()``, ``hpctrain.comm.init()``): its own errors with
    Python's traceback, which a Horovod script's user expects; hpctrain's in one line."""
    _end_on_error(exc_type, exc, tb, script=True)


def _end_on_error(exc_type, exc, tb, script: bool) -> None:
    """Say ``exc`` and end the process, and with it the job. ``script``: an error not
    hpctrain's own (:func:`hpctrains_own`) is said by Python's traceback, and in a process
    that is the whole job the interpreter then exits as Python does (atexit, flushed files)."""
    # The process's own stderr: torch.distributed's init_process_group wraps this hook with
    # one that points sys.stderr at a buffer and prints it after the hook returns, which
    # this one does not do unless it leaves the exit to Python.
    err = sys.__stderr__ or sys.stderr
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is not None and (not MPI.Is_initialized() or MPI.Is_finalized()):
        MPI = None  # imported, but not running
    initialised = MPI is not None
    r, n = _seat_for_error(MPI)
    interrupted = isinstance(exc, KeyboardInterrupt)
    full = script and not interrupted and not hpctrains_own(exc)
    if _debugging() and not full:
        traceback.print_exception(exc_type, exc, tb, file=err)
    status = 2 if isinstance(exc, UsageError) else 1
    if r != 0 and (not initialised or raised_on_every_rank(exc)):
        # Before MPI starts every rank validates the same arguments, and an error raised on
        # every rank alike is the same, so rank 0 speaks for all: its abort, or the launcher,
        # ends this rank while it waits, unless rank 0 did not fail (a file missing on this
        # node only), and then this rank must say it. Ended by the launcher's SIGTERM (srun
        # --kill-on-bad-exit once rank 0 exited), it exits with rank 0's status, not 143.
        _exit_on_sigterm(status)
        time.sleep(10)  # generous: a loaded node may take seconds to end this rank
    elif n > 1 and _under_torchrun() and peer_left(exc):
        # torchrun names the first process to end as the root cause: this one failed because
        # another did, so that one goes first, and torchrun ends this one meanwhile.
        _exit_on_sigterm(status)
        time.sleep(10)
    elif _under_torchrun():
        _record_for_torchrun(exc_type, exc, tb)
    where = _where(r, n, initialised)
    # Each in one write, its newline included: print's two (the text, then "\n") let
    # mpirun put another rank's line between them, two errors on one line.
    if interrupted:  # Ctrl-C: no error; the shell's status, 128 + 2
        status = 130
        said = f"hpctrain: interrupted{where}\n"
    elif full:  # the ranks' tracebacks do not interleave line by line
        label = f"hpctrain: error{where}:\n" if where else ""
        said = label + "".join(traceback.format_exception(exc_type, exc, tb))
    else:
        said = f"hpctrain: error{where}: {describe_error(exc)}\n"
    err.write(said)
    err.flush()
    if full and n == 1:
        return  # nothing else to end: Python exits with status 1, as without the hook
    finish_before_abort()
    if MPI is not None and MPI.COMM_WORLD.Get_size() > 1:
        # Ends every rank, including those waiting in a collective for this one.
        MPI.COMM_WORLD.Abort(status)
    if r == 0 and n > 1 and not initialised and "SLURM_STEP_ID" in os.environ:
        # srun --kill-on-bad-exit ends the others as this rank exits: a moment for them to
        # reach their wait above, which exits with this status (else srun says 143).
        time.sleep(1)
    os._exit(status)


# What a process-group transport says when a peer's process is gone (gloo's TCP pair, a
# socket's errno text): this rank failed because another did.
_PEER_LEFT = ("closed by peer", "reset by peer", "Broken pipe", "remote worker crashing")


def peer_left(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective's failure because another rank's process ended."""
    return isinstance(exc, RuntimeError | ConnectionError) and any(
        text in str(exc) for text in _PEER_LEFT)


def _under_torchrun() -> bool:
    try:
        return comm.launcher() == "torchrun"
    except UsageError:  # a launch refused: not a torchrun worker's error to record
        return False


def _record_for_torchrun(exc_type, exc, tb) -> None:
    """The error in torchrun's error file (``$TORCHELASTIC_ERROR_FILE``, torch.distributed
    elastic's ``record`` format), so that its report names this rank as the root cause and
    shows the error, not the exit order's guess. Nothing where torchrun asks for none.
    Its report shows ``py_callstack`` as the traceback: for bad input and hpctrain's other
    own errors (:func:`hpctrains_own`) the one line, as the rank said it (Python's traceback
    under ``HPCTRAIN_DEBUG``); for any other, Python's."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    line = describe_error(exc)
    shown = line if hpctrains_own(exc) and not _debugging() else \
        "".join(traceback.format_exception(exc_type, exc, tb))
    with contextlib.suppress(OSError):
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {
                "py_callstack": shown, "timestamp": str(int(time.time()))}}}, f)


def _debugging() -> bool:
    """``HPCTRAIN_DEBUG`` on: the hook prints the traceback too (any word but an off one, as
    the hook that reports errors must not raise one of its own)."""
    try:
        return bool(switch("HPCTRAIN_DEBUG", default=False))
    except UsageError:
        return True


def _where(rank: int, size: int, mpi_running: bool) -> str:
    """Whose error it is, for its line: nothing for one process, nor for rank 0 before MPI
    starts (it speaks for all, every rank checking the same input); the rank, and before MPI
    the host too (a file missing on that node), for the others."""
    if size == 1 or (rank == 0 and not mpi_running):
        return ""
    host = "" if mpi_running else f", host {socket.gethostname()}"
    return f" (rank {rank} of {size}{host})"


def _seat_for_error(MPI: ModuleType | None) -> tuple[int, int]:
    """This process's rank and the job's size for an error line: MPI's world's where it is
    the job (``MPI`` given: MPI runs), else the launcher's (torchrun's workers are MPI
    singletons; before MPI starts it is all there is); (0, 1) where even those are not
    numbers."""
    with contextlib.suppress(UsageError):  # a launch refused: its variables are read below
        if MPI is not None and comm.launcher() != "torchrun":
            return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    with contextlib.suppress(UsageError):
        return comm.env_rank(), comm.env_size()
    return 0, 1


# Whether hpctrain's command or run installed the one-line hook: torch.distributed's
# init_process_group wraps whatever hook it finds, so sys.excepthook no longer says so.
_one_line = False


def install_abort_on_error(script: bool = False) -> None:
    """Make an uncaught exception on one rank abort the whole MPI job, said in one line with
    the rank (hpctrain's commands and runs: ``(at file:line)`` names the user's code). For a
    user's own ``script``, an error that is not hpctrain's own shows Python's traceback."""
    global _one_line
    sys.excepthook = _script_abort_hook if script else _abort_hook
    _one_line = not script


def hook_state() -> tuple:
    """The process's hook and whether it is a command's or run's, for :func:`restore_hook`."""
    return sys.excepthook, _one_line


def restore_hook(state: tuple) -> None:
    """Put back what :func:`hook_state` returned (a run that ended gives the script its own)."""
    global _one_line
    sys.excepthook, _one_line = state


def install_for_script() -> None:
    """:func:`install_abort_on_error` for a user's script (``hvd.init()``,
    :func:`hpctrain.comm.init`), unless the process has an abort hook already: hpctrain's
    command or run that started MPI keeps its one line (under torchrun, wrapped by
    torch.distributed)."""
    if not (_one_line or aborts_on_error()):
        install_abort_on_error(script=True)


def aborts_on_error() -> bool:
    """Whether one of :func:`install_abort_on_error`'s hooks is the process's."""
    return sys.excepthook in (_abort_hook, _script_abort_hook)
