"""Open MPI's non-blocking allreduce algorithm, chosen once a process as MPI starts.

Open MPI 4's libnbc runs every in-place ``MPI_Iallreduce``, and every one on fewer than 4
ranks, as a binomial reduce to rank 0 followed by a broadcast: on 40 MB and 2 ranks that
measured 3x slower than ``MPI_Allreduce`` here, while its Rabenseifner algorithm
(reduce-scatter, then allgather) matched it. The choice is the MCA variable
``coll_libnbc_iallreduce_algorithm``; a value given by the user in the environment is left
alone.

Every rank must choose alike: Open MPI agrees on a new communicator's id (``Comm.Dup``,
``Split``) with a non-blocking allreduce, and ranks on different algorithms deadlock in it.
So the choice is made where every process of a launch passes, hpctrain's first
:func:`hpctrain.comm.init` that every rank makes, never where a subset starts something (the
training ranks of a run with ``--eval-rank``, a script's ``hpctrain.sync.init(comm=sub)`` on
some ranks: ``init(every_rank=False)``). MPI started by hpctrain reads it from the
environment at ``MPI_Init`` (free); MPI started before (pytest-mpi, a user's script) gets it
through the MPI tool interface, MPI_T, which mpi4py does not wrap, hence ctypes (about 0.25 s
in Open MPI 4.1 for ``MPI_T_init_thread``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from types import ModuleType

CVAR = "coll_libnbc_iallreduce_algorithm"
ENV = "OMPI_MCA_" + CVAR
ALGORITHMS = {"ignore": 0, "ring": 1, "binomial": 2, "rabenseifner": 3, "recursive_doubling": 4}
PREFERRED = "rabenseifner"
DEFAULT = "MPI library default"

_in_effect: str | None = None  # what this process runs with, in words, once chosen
_written: str | None = None  # the algorithm this process last set


@contextlib.contextmanager
def preferred_at_start() -> Iterator[None]:
    """Around ``MPI_Init``: ask for :data:`PREFERRED` through the environment (MPICH ignores
    the variable), taken out again afterwards so that the process's children do not read it
    as the user's."""
    ours = ENV not in os.environ
    if ours:
        os.environ[ENV] = str(ALGORITHMS[PREFERRED])
    try:
        yield
    finally:
        if ours:
            os.environ.pop(ENV, None)


def choose(MPI: ModuleType, started_here: bool) -> None:
    """Settle this process's algorithm, once, at hpctrain's first use of MPI;
    ``started_here``: MPI started inside :func:`preferred_at_start`."""
    global _in_effect, _written
    if _in_effect is not None:
        return
    if not MPI.Get_library_version().startswith("Open MPI"):
        _in_effect = DEFAULT
    elif ENV in os.environ:
        _in_effect = given(os.environ[ENV])
    elif started_here:
        _in_effect = _written = PREFERRED
    else:
        _in_effect = PREFERRED if set_iallreduce_algorithm(PREFERRED) else DEFAULT


def given(value: str) -> str:
    """The algorithm a user's ``$OMPI_MCA_...`` asks for, in words: a name or number Open MPI
    takes, or, for another (which Open MPI warns of and ignores), its own default."""
    numbers = {str(v): k for k, v in ALGORITHMS.items()}
    name = value.strip() if value.strip() in ALGORITHMS else numbers.get(value.strip())
    if name is None:
        return f"{DEFAULT} (${ENV}={value!r} is none of {', '.join(ALGORITHMS)})"
    return f"{name} (from ${ENV})"


def in_effect() -> str | None:
    """The algorithm :func:`choose` settled, in words (None before hpctrain used MPI)."""
    return _in_effect


def set_iallreduce_algorithm(name: str) -> bool:
    """Set libnbc's iallreduce algorithm (``ignore``: its own choice); False if not Open MPI.
    Call it on every rank alike (see the module's docstring); setting what it set last is
    skipped, since each write costs an ``MPI_T_init_thread``."""
    global _written
    if name == _written:
        return True
    with _tool_interface() as lib:
        if lib is None or not _cvar_io(lib, CVAR, lib.MPI_T_cvar_write,
                                           ctypes.c_int(ALGORITHMS[name])):
            return False
    _written = name
    return True


def current_iallreduce_algorithm() -> str | None:
    """What libnbc runs with now, read back through MPI_T (None if it cannot be read)."""
    value = ctypes.c_int(-1)
    with _tool_interface() as lib:
        if lib is None or not _cvar_io(lib, CVAR, lib.MPI_T_cvar_read, value):
            return None
    return {v: k for k, v in ALGORITHMS.items()}.get(value.value, str(value.value))


@contextlib.contextmanager
def _tool_interface() -> Iterator[ctypes.CDLL | None]:
    """An MPI_T session on Open MPI's libmpi (loaded by mpi4py); None where there is none."""
    from mpi4py import MPI

    if not MPI.Get_library_version().startswith("Open MPI"):
        yield None
        return
    try:
        lib = ctypes.CDLL(None)
        t_init, t_finalize = lib.MPI_T_init_thread, lib.MPI_T_finalize
    except (OSError, AttributeError):
        yield None
        return
    provided = ctypes.c_int()
    if t_init(ctypes.c_int(MPI.Query_thread()), ctypes.byref(provided)) != 0:
        yield None
        return
    try:
        yield lib
    finally:
        t_finalize()


def _cvar_io(lib: ctypes.CDLL, name: str, io, value: ctypes.c_int) -> bool:
    """``io`` (``lib.MPI_T_cvar_read`` or ``_write``) on the integer control variable ``name``."""
    index, count, handle = ctypes.c_int(), ctypes.c_int(), ctypes.c_void_p()
    if lib.MPI_T_cvar_get_index(name.encode(), ctypes.byref(index)) != 0:
        return False
    if lib.MPI_T_cvar_handle_alloc(index, None, ctypes.byref(handle), ctypes.byref(count)) != 0:
        return False
    try:
        return io(handle, ctypes.byref(value)) == 0
    finally:
        lib.MPI_T_cvar_handle_free(ctypes.byref(handle))
