"""The horovod backend: ``horovod.torch`` itself, started on the MPI world hpctrain initialised."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from hpctrain import comm as mpicomm
from hpctrain.errors import UsageError


def load() -> ModuleType:
    """``horovod.torch``; UsageError saying why when it cannot be imported."""
    try:
        hvd = importlib.import_module("horovod.torch")
    except Exception as e:  # ImportError, or OSError from a mismatched compiled extension
        reason = (str(e).strip().splitlines() or [""])[0]
        raise UsageError(f"backend 'horovod' needs Horovod, which is not importable here "
                         f"({type(e).__name__}: {reason}); run `make setup` to build it") from e
    if not hasattr(hvd, "init"):
        raise UsageError("backend 'horovod': Horovod was built without its MPI library; "
                         "run `make setup` to rebuild it")
    return hvd


def init(comm: Any = None) -> ModuleType:
    """Initialise MPI at thread level multiple, then Horovod on ``comm`` (default COMM_WORLD)."""
    hvd = load()
    MPI = mpicomm.init("multiple")
    if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
        raise UsageError("backend 'horovod' needs MPI at thread level 'multiple', but MPI was "
                         "started at a lower level; call hpctrain.comm.init('multiple') first")
    hvd.init(comm=MPI.COMM_WORLD if comm is None else comm)
    return hvd
