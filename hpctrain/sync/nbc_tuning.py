"""Open MPI's non-blocking allreduce algorithm, chosen at run time through the MPI tool interface.

Open MPI 4's libnbc runs every in-place ``MPI_Iallreduce``, and every one on fewer than 4
ranks, as a binomial reduce to rank 0 followed by a broadcast: on 40 MB and 2 ranks that
measured 3x slower than ``MPI_Allreduce`` here, while its Rabenseifner algorithm
(reduce-scatter, then allgather) matched it. The choice is the MCA variable
``coll_libnbc_iallreduce_algorithm``, writable after ``MPI_Init`` through MPI_T, which mpi4py
does not wrap, hence ctypes. A value given by the user in the environment is left alone.
"""

from __future__ import annotations

import ctypes
import os

from hpctrain import comm

CVAR = "coll_libnbc_iallreduce_algorithm"
ENV = "OMPI_MCA_" + CVAR
ALGORITHMS = {"ignore": 0, "ring": 1, "binomial": 2, "rabenseifner": 3, "recursive_doubling": 4}
PREFERRED = "rabenseifner"


def prefer_fast_iallreduce() -> str:
    """Select :data:`PREFERRED` unless the user chose; return what is in effect, in words."""
    if ENV in os.environ:
        return f"{os.environ[ENV]} (from ${ENV})"
    if set_iallreduce_algorithm(PREFERRED):
        return PREFERRED
    return "MPI library default"


_written: str | None = None  # the algorithm this process last set


def set_iallreduce_algorithm(name: str) -> bool:
    """Set libnbc's iallreduce algorithm (``ignore``: its own choice); False if not Open MPI.

    Only this function changes the variable after start-up, so setting what it set last is
    skipped: each write costs an ``MPI_T_init_thread`` (about 0.25 s in Open MPI 4.1), and
    ``hvd.init`` asks again every time a process starts the API.
    """
    global _written
    MPI = comm.mpi()
    if not MPI.Get_library_version().startswith("Open MPI"):
        return False
    if name == _written:
        return True
    try:
        lib = ctypes.CDLL(None)  # libmpi's symbols, loaded by mpi4py
        t_init, t_finalize = lib.MPI_T_init_thread, lib.MPI_T_finalize
    except (OSError, AttributeError):
        return False
    provided = ctypes.c_int()
    if t_init(ctypes.c_int(MPI.Query_thread()), ctypes.byref(provided)) != 0:
        return False
    try:
        if not _write_int_cvar(lib, CVAR, ALGORITHMS[name]):
            return False
        _written = name
        return True
    finally:
        t_finalize()


def _write_int_cvar(lib: ctypes.CDLL, name: str, value: int) -> bool:
    index, count, handle = ctypes.c_int(), ctypes.c_int(), ctypes.c_void_p()
    if lib.MPI_T_cvar_get_index(name.encode(), ctypes.byref(index)) != 0:
        return False
    if lib.MPI_T_cvar_handle_alloc(index, None, ctypes.byref(handle), ctypes.byref(count)) != 0:
        return False
    try:
        return lib.MPI_T_cvar_write(handle, ctypes.byref(ctypes.c_int(value))) == 0
    finally:
        lib.MPI_T_cvar_handle_free(ctypes.byref(handle))
