"""The horovod backend: ``horovod.torch`` itself, started on the MPI world hpctrain initialised."""

from __future__ import annotations

import importlib
import math
import os
from types import ModuleType
from typing import Any

from hpctrain import comm as mpicomm
from hpctrain.errors import UsageError
from hpctrain.sync import stall
from hpctrain.sync.process_sets import ProcessSet, global_process_set

# setup.py's horovod extra alone does not build against torch >= 2.1: the sdist asks for C++14.
INSTALL = ("build Horovod 0.28.1 with PyTorch and MPI (HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1) "
           "into this environment, its sdist patched to C++17 for torch >= 2.1 as "
           "scripts/build_horovod.sh does (in a checkout, make setup runs that script)")


def load() -> ModuleType:
    """``horovod.torch``; UsageError saying why when it cannot be imported."""
    try:
        hvd = importlib.import_module("horovod.torch")
    except Exception as e:  # ImportError, or OSError from a mismatched compiled extension
        reason = (str(e).strip().splitlines() or [""])[0]
        raise UsageError(f"backend 'horovod' needs Horovod, which is not importable here "
                         f"({type(e).__name__}: {reason}); {INSTALL}") from e
    if not hasattr(hvd, "init"):
        raise UsageError(f"backend 'horovod': Horovod was built without its MPI library; "
                         f"{INSTALL}")
    return hvd


def init(comm: Any = None, process_sets: list[ProcessSet] | None = None,
         stall_check_s: float | None = None, stall_timeout_s: float | None = None) -> ModuleType:
    """Initialise MPI at thread level multiple, then Horovod on ``comm`` (default COMM_WORLD).

    Process sets may also be added after init and the timeline started at any time, as on
    the mpi backend (Horovod needs HOROVOD_DYNAMIC_PROCESS_SETS=1 and HOROVOD_TIMELINE=DYNAMIC
    for that; they are set here unless the user set them). The stall settings become
    Horovod's HOROVOD_STALL_* variables (:func:`stall_environment`).
    """
    hvd = load()
    MPI = mpicomm.init("multiple")
    if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
        raise UsageError("backend 'horovod' needs MPI at thread level 'multiple', but MPI was "
                         "started at a lower level; call hpctrain.comm.init('multiple') first")
    os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
    os.environ.setdefault("HOROVOD_TIMELINE", "DYNAMIC")
    os.environ.update(stall_environment(stall_check_s, stall_timeout_s))
    sets = list(process_sets or [])
    natives = [hvd.ProcessSet(ps.ranks if ps.ranks is not None else ps.mpi_comm) for ps in sets]
    hvd.init(comm=MPI.COMM_WORLD if comm is None else comm, process_sets=natives or None)
    global_process_set.ranks = list(range(hvd.size()))
    global_process_set._native = hvd.global_process_set  # its rank(): Horovod's
    for ps, native in zip(sets, natives, strict=True):
        _adopt(ps, native)
    return hvd


def stall_environment(check_s: float | None, timeout_s: float | None) -> dict[str, str]:
    """Horovod's variables for ``init``'s stall arguments, meaning what they mean on the mpi
    and torch backends. Horovod takes whole seconds (``int`` made 0.5 s "0", never, and 2.5
    s 2): a fraction rounds up. It reads a check time of 0 as a report every cycle (here:
    none), shuts down only from its check, and never when the timeout is below the check
    time (stall_inspector.cc: "will not shutdown"), where the other backends end the job at
    the timeout whatever the check time: with a timeout in effect the check time is at most
    the timeout (a check of 0, or HOROVOD_STALL_CHECK_DISABLE=1: the timeout, its one report
    coming then); without one a check of 0 is HOROVOD_STALL_CHECK_DISABLE=1."""
    if check_s is None and timeout_s is None:
        return {}  # Horovod's own variables, as the user set them
    check, timeout = stall.settings(check_s, timeout_s)  # the arguments', else the variables'
    env: dict[str, str] = {}
    if timeout_s is not None:
        env[stall.SHUTDOWN_ENV] = str(math.ceil(timeout_s))
    every = (min(check, timeout) if check > 0 else timeout) if timeout > 0 else check
    if every > 0:
        env[stall.CHECK_ENV], env[stall.DISABLE_ENV] = str(math.ceil(every)), "0"
    else:
        env[stall.DISABLE_ENV] = "1"
    return env


_adopted: list[ProcessSet] = []  # ours that stand for one of Horovod's, until shutdown


def _adopt(ps: ProcessSet, native: Any) -> ProcessSet:
    ps._native, ps.process_set_id, ps.ranks = native, native.process_set_id, list(native.ranks)
    _adopted.append(ps)
    return ps


def forget_process_sets() -> None:
    """After Horovod's shutdown its process sets are gone: unregister ours."""
    for ps in _adopted:
        ps._invalidate()
    _adopted.clear()
    global_process_set._native = None


def native(process_set: Any) -> Any:
    """Horovod's ProcessSet for one of ours (Horovod's own pass through)."""
    hvd = load()
    if process_set is None or process_set is global_process_set:
        return hvd.global_process_set
    if isinstance(process_set, ProcessSet):
        if process_set._native is None:
            raise UsageError(f"{process_set} is not registered; pass it to "
                             "init(process_sets=...) or add_process_set() first")
        return process_set._native
    return process_set


def add_process_set(process_set: Any) -> ProcessSet:
    hvd = load()
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    return _adopt(ps, hvd.add_process_set(ps.ranks))


def remove_process_set(process_set: ProcessSet) -> bool:
    if not isinstance(process_set, ProcessSet) or process_set._native is None:
        return False
    done = load().remove_process_set(process_set._native)
    if done:
        process_set._invalidate()
    return done
