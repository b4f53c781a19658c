"""The MPI world: initialisation at a chosen thread level, rank/size and launcher helpers,
the MPI library's description.

It also holds how many bytes a rank sends in an allreduce (:func:`allreduce_bytes`), the
one count of traffic that every algorithm's byte fields use.

mpi4py initialises MPI when ``mpi4py.MPI`` is first imported, at the thread level in
``mpi4py.rc.thread_level``. Async runs need ``serialized`` (Open MPI 4's osc/pt2pt refuses
MULTIPLE) while Horovod needs ``multiple``, so nothing in hpctrain imports ``mpi4py.MPI`` at
module level: entry points call :func:`init` first, everything else calls :func:`mpi`.

Its neighbours: :mod:`hpctrain.pickled` sends pickled messages past 2 GiB over a
communicator of this world, and :mod:`hpctrain.job_end` ends the job on an error (the
hook that :func:`init` installs for a script).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from functools import lru_cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

import mpi4py

from hpctrain import launch_env, nbc_tuning
from hpctrain.errors import UsageError, on_every_rank

if TYPE_CHECKING:  # not at run time: importing it starts MPI (see above)
    from mpi4py import MPI


THREAD_LEVELS = ("single", "funneled", "serialized", "multiple")


def init(thread_level: str = "multiple", every_rank: bool = True) -> ModuleType:
    """Initialise MPI at ``thread_level`` (once), install abort-on-error; return ``mpi4py.MPI``.
    ``every_rank``: every rank of the job calls this now (else libnbc's algorithm is left to
    a later call that they all make: see :func:`_first_use`).

    Raises RuntimeError when MPI was already initialised below the requested level, and a
    UsageError, before MPI starts, for torchrun's worker under Open MPI's mpirun
    (:func:`hpctrain.launch_env.refuse_mpirun_around_torchrun`).
    """
    from hpctrain.job_end import install_for_script  # here: job_end imports this module

    if thread_level not in THREAD_LEVELS:
        raise UsageError(f"unknown MPI thread level {thread_level!r}; choose from {THREAD_LEVELS}")
    started_here = "mpi4py.MPI" not in sys.modules
    if started_here:
        install_for_script()  # the refusal below: one line, a script's too
        launch_env.refuse_mpirun_around_torchrun()  # before its MPI_Init dies naming nothing
        mpi4py.rc.thread_level = thread_level
        with _outer_launch_hidden(), nbc_tuning.preferred_at_start():
            from mpi4py import MPI
    from mpi4py import MPI

    wanted = THREAD_LEVELS.index(thread_level)
    provided = _thread_level_index(MPI, MPI.Query_thread())
    if provided < wanted and thread_level != "multiple":
        raise RuntimeError(
            f"MPI runs at thread level {THREAD_LEVELS[provided]!r}, {thread_level!r} is needed; "
            "call hpctrain.comm.init() before anything imports mpi4py.MPI"
        )
    install_for_script()
    if every_rank or started_here:  # started here: the environment chose at MPI_Init
        _first_use(MPI, started_here)
    else:
        _check_world_once(MPI)
    return MPI


# What tells an MPI library that srun (launch_env.SLURM_STEP) or a PMI server (Hydra's
# mpiexec) started it: a torchrun worker inherits these from the srun task or mpiexec process
# that ran torchrun.
_PMI_PREFIXES = ("PMI_", "PMIX_")


@contextlib.contextmanager
def _outer_launch_hidden():
    """Under torchrun, the launch variables of srun or a PMI server that started torchrun are
    hidden while MPI starts, so that each worker is an MPI singleton. Otherwise Open MPI,
    seeing srun's step, takes each worker for an srun task and fails in MPI_Init (with
    ``--mpi=pmix`` too), and an MPICH would claim the PMI server's rank. Slurm's step comes
    back once MPI runs (launch_env reads it); PMI's and PMIx's stay hidden, since the
    singleton MPI set its own in the process's environment, which children inherit. Not when
    an MPI launcher numbers the processes as torchrun's variables do (a script under mpirun
    given them by hand): MPI's world is then theirs. mpirun starting torchrun is not helped
    (its variables name its daemon)."""
    if launcher() != "torchrun":
        yield
        return
    found = launch_env.seats()
    ours = next(found)  # torchrun's
    if ours.size > 1 and any(s.launcher in launch_env.MPI_LAUNCHERS
                             for s in launch_env.alike(ours, found)):
        yield
        return
    hidden = {k: v for k, v in os.environ.items()
              if k in launch_env.SLURM_STEP or k.startswith(_PMI_PREFIXES)}
    for k in hidden:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update({k: v for k, v in hidden.items() if k in launch_env.SLURM_STEP})


def mpi() -> ModuleType:
    """``mpi4py.MPI``, initialising at the default level if no entry point did."""
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        _check_world_once(MPI)  # libnbc's algorithm only in init(), which every rank calls
        return MPI
    return init()


def check_world(seat: launch_env.Seat | None, world_size: int, library: str) -> None:
    """UsageError when the launcher started several processes but MPI gives each a world of
    one: each would train alone and write the same outputs. Either the MPI library mpi4py
    loaded is not the launcher's (MPICH's mpirun, Open MPI's library), or srun started the
    tasks without the PMI plugin the library needs. ``seat`` is an MPI launcher's or srun's
    (``launch_env.launch().seat`` under "mpi"): torch's launch has MPI singletons by design."""
    if seat is None or seat.size == 1 or world_size != 1:
        return
    if seat.source.startswith("Slurm"):
        fix = ("srun started the tasks without the PMI plugin this MPI needs: pass "
               "srun --mpi=pmix (or the plugin your MPI was built with; srun --mpi=list)")
    else:
        fix = ("the MPI library mpi4py loaded is not the launcher's: launch with that MPI's "
               "mpirun, or put the launcher's libmpi first on LD_LIBRARY_PATH")
    raise UsageError(f"{seat}, but MPI ({library}) gives this process a world of 1, so each "
                     f"process would train alone; {fix}")


def _first_use(MPI: ModuleType, started_here: bool) -> None:
    """At :func:`init`, the entry point every rank of a launch calls together: libnbc's
    allreduce algorithm (nbc_tuning; once), which all ranks must choose alike, so never from
    :func:`mpi`, which a script may call on some ranks (``library_info`` on rank 0); and
    :func:`check_world`. ``started_here``: :func:`init` started MPI."""
    nbc_tuning.choose(MPI, started_here)
    _check_world_once(MPI)


_world_checked = False


def _check_world_once(MPI: ModuleType) -> None:
    """:func:`check_world`, once a process (torchrun's workers are MPI singletons by design:
    the torch backend is their world)."""
    global _world_checked
    if _world_checked:
        return
    _world_checked = True
    launched = launch_env.launch()
    if launched.kind == "mpi":
        library = library_name(MPI).split(",")[0]
        check_world(launched.seat, MPI.COMM_WORLD.Get_size(), library)


def thread_level() -> str:
    """The thread level MPI provides, one of :data:`THREAD_LEVELS` (initialising MPI)."""
    MPI = mpi()
    return THREAD_LEVELS[_thread_level_index(MPI, MPI.Query_thread())]


def _thread_level_index(MPI: ModuleType, level: int) -> int:
    order = [MPI.THREAD_SINGLE, MPI.THREAD_FUNNELED, MPI.THREAD_SERIALIZED, MPI.THREAD_MULTIPLE]
    return order.index(level)


def world() -> MPI.Intracomm:
    """``MPI.COMM_WORLD``."""
    return mpi().COMM_WORLD


def rank() -> int:
    return world().Get_rank()


def is_mpi4py(comm_) -> bool:
    """Whether ``comm_`` is mpi4py's (not torchrun's or the simulator's), asked without
    importing ``mpi4py.MPI``, which starts MPI."""
    return type(comm_).__module__.startswith("mpi4py")


COUNT_PIECE = 2**30  # elements (or bytes) one MPI call here counts at most: see count_pieces


def count_pieces(n: int, piece: int | None = None) -> list[slice]:
    """Slices of ``n`` elements, at most ``piece`` (:data:`COUNT_PIECE`) each, one MPI call
    each: an MPI-3 library such as Open MPI 4 takes no count past 2**31 - 1. One slice, maybe
    empty, below that, so that what fits is the one call it was."""
    piece = piece or COUNT_PIECE
    return [slice(i, i + piece) for i in range(0, max(n, 1), piece)]


def size() -> int:
    return world().Get_size()


def allreduce_bytes(nbytes: int, ranks: int) -> int:
    """Bytes one rank sends in an allreduce of ``nbytes`` among ``ranks``, counted as a ring's
    (2(K-1)/K of the payload): the scale of every byte field, so that ssgd's gradients,
    ma/ec's aggregations and a plug-in's messages compare whatever algorithm MPI picks."""
    return 2 * (ranks - 1) * nbytes // ranks


@lru_cache(maxsize=1)
def _node_comm():
    """This node's processes (one collective Split_type, made once: a later call that only
    some ranks reach must not be a collective)."""
    MPI = mpi()
    return world().Split_type(MPI.COMM_TYPE_SHARED, key=rank())


def local_rank() -> int:
    """Rank among the processes on this node."""
    return _node_comm().Get_rank()


def local_size() -> int:
    """Number of processes on this node."""
    return _node_comm().Get_size()


def env_rank() -> int:
    """This process's rank from the launcher's environment, without initialising MPI (0 if none)."""
    seat = launch_env.from_launcher()
    return seat.rank if seat else 0


def env_size() -> int:
    """The job's size from the launcher's environment, without initialising MPI (1 if none)."""
    seat = launch_env.from_launcher()
    return seat.size if seat else 1


def launcher() -> str:
    """How this process was started, from the environment: ``torchrun`` (torch.distributed's
    env:// launch, no MPI world), ``mpi`` (mpirun, or srun with PMI/PMIx: MPI's world is the
    job), or ``single`` (:func:`hpctrain.launch_env.launch`, which refuses a launch of
    several processes that is neither)."""
    return launch_env.launch().kind


def launch_size() -> int:
    """The job's size: the world's if MPI is already running (a user's script started it),
    else the launcher's environment's (:func:`env_size`), without starting MPI."""
    MPI = sys.modules.get("mpi4py.MPI")
    if launcher() != "torchrun" and MPI is not None and MPI.Is_initialized() \
            and not MPI.Is_finalized():
        return MPI.COMM_WORLD.Get_size()
    return env_size()


def mpi_running() -> ModuleType | None:
    """``mpi4py.MPI`` where MPI's world already runs the job (a user's script started it, or
    an earlier run in the process did; not under torchrun), else None."""
    MPI = sys.modules.get("mpi4py.MPI")
    running = MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized()
    return MPI if running and launcher() != "torchrun" else None


def shared_refusal(refusal: UsageError | None) -> None:
    """Raise a ``refusal`` any rank has (None: this rank has none) on every rank when MPI's
    world already runs the job (a script's ``hpctrain.train``), the first rank's, naming it
    unless it is rank 0's: a script that catches it then goes on in step, and no rank is
    left waiting in a collective for one that stopped. A collective there; before MPI
    starts (the command line) each rank raises its own, and the abort hook says it."""
    MPI = mpi_running()
    if MPI is not None and MPI.COMM_WORLD.Get_size() > 1:
        said = MPI.COMM_WORLD.allgather(None if refusal is None else str(refusal))
        first = next((r for r, text in enumerate(said) if text is not None), None)
        if first is not None:
            where = f" (found on rank {first})" if first else ""
            raise on_every_rank(UsageError(said[first] + where))
    if refusal is not None:
        raise refusal


def first_difference(seen: list[dict]) -> tuple[str, int] | None:
    """The first key of ``seen[0]`` (each rank's values, from an allgather) that some rank
    holds another value for, and the first such rank; None when every rank agrees."""
    for key, value in seen[0].items():
        other = next((r for r, theirs in enumerate(seen) if theirs[key] != value), None)
        if other is not None:
            return key, other
    return None


def library_name(MPI: ModuleType) -> str:
    """The first line of the MPI library's version string (``Open MPI v4.1.4, ...``)."""
    return MPI.Get_library_version().strip("\x00 \n").splitlines()[0]


@lru_cache(maxsize=1)
def library_version() -> str | None:
    """The MPI library's version string, before MPI starts too (checks that refuse a run
    then): ``MPI_Get_library_version`` may be called before ``MPI_Init``, here on the
    libmpi that mpi4py loads, found as mpi4py finds it. None where it cannot be read."""
    if "mpi4py.MPI" in sys.modules:
        return sys.modules["mpi4py.MPI"].Get_library_version()
    try:
        from mpi4py import _mpiabi

        # mpi4py's stubs leave out its private _mpiabi module's loader.
        lib = _mpiabi._dlopen_libmpi(  # type: ignore[attr-defined]
            _mpiabi.LIBMPI or os.environ.get("MPI4PY_LIBMPI"))
        text, length = ctypes.create_string_buffer(8192), ctypes.c_int(0)
        if lib.MPI_Get_library_version(text, ctypes.byref(length)) != 0:
            return None
    except (ImportError, AttributeError, OSError, RuntimeError):
        return None
    return text.value.decode(errors="replace")


def library_info() -> dict:
    """MPI library name and version, standard version, thread level provided, Open MPI's
    non-blocking allreduce algorithm (its sums' order: part of a run's provenance)."""
    MPI = mpi()
    major, minor = MPI.Get_version()
    return {
        "library": library_name(MPI),
        "standard": f"{major}.{minor}",
        "thread_level": thread_level(),
        "iallreduce_algorithm": nbc_tuning.in_effect(),
        "mpi4py": mpi4py.__version__,
    }


def _tensor(buffer: Any, dtype: Any, shape: tuple[int, ...]) -> Any:
    """:func:`hpctrain.pickled.unpickled_tensor` under the name pickles made before
    :mod:`hpctrain.pickled` split off from this module give it: an elastic commit on disk
    (``$HPCTRAIN_ELASTIC_DIR/state-*.pt``) that a restarted job of a newer hpctrain reads."""
    from hpctrain import pickled  # it imports this module

    return pickled.unpickled_tensor(buffer, dtype, shape)
