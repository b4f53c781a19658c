"""The MPI world: initialisation at a chosen thread level, rank/size helpers, abort on error.

It also holds how many bytes a rank sends in an allreduce (:func:`allreduce_bytes`), the
one count of traffic that every algorithm's byte fields use.

mpi4py initialises MPI when ``mpi4py.MPI`` is first imported, at the thread level in
``mpi4py.rc.thread_level``. Async runs need ``serialized`` (Open MPI 4's osc/pt2pt refuses
MULTIPLE) while Horovod needs ``multiple``, so nothing in hpctrain imports ``mpi4py.MPI`` at
module level: entry points call :func:`init` first, everything else calls :func:`mpi`.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import pickle
import signal
import socket
import sys
import sysconfig
import time
import traceback
from collections.abc import Callable
from functools import lru_cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

import mpi4py

from hpctrain import launch_env, nbc_tuning
from hpctrain.errors import UsageError, on_every_rank, raised_on_every_rank
from hpctrain.switches import switch

if TYPE_CHECKING:  # not at run time: importing it starts MPI (see above)
    import torch
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


def large_messages(comm_):
    """``comm_`` for pickled messages past 2 GiB (a run's snapshots together, a checkpoint's
    gathering): MPI-3 libraries such as Open MPI 4 refuse one (``MPI_ERR_ARG``), and
    mpi4py's ``pkl5`` sends it in parts. Its ``bcast``, ``gather`` and ``scatter`` are
    collectives every rank makes through it. What it sends travels as :class:`OutOfBand`:
    tensors' memory as it is, not through torch's pickling. Another communicator
    (torchrun's, the simulator's) is returned as it is."""
    if not is_mpi4py(comm_):
        return comm_
    return _large_messages_class()(comm_)


@lru_cache(maxsize=1)
def _large_messages_class() -> type:
    from mpi4py.util import pkl5  # imports mpi4py.MPI: made at first use, after init()

    class LargeMessages(pkl5.Intracomm):
        """pkl5's communicator, whose sends wrap what they send in :class:`OutOfBand`."""

        def send(self, obj, dest, tag=0):
            return super().send(OutOfBand(obj), dest, tag)

        def isend(self, obj, dest, tag=0):
            return super().isend(OutOfBand(obj), dest, tag)

        def bcast(self, obj, root=0):
            return super().bcast(OutOfBand(obj), root)

        def gather(self, sendobj, root=0):
            return super().gather(OutOfBand(sendobj), root)

        def scatter(self, sendobj, root=0):
            parts = None if sendobj is None else [OutOfBand(part) for part in sendobj]
            return super().scatter(parts, root)

        def allgather(self, sendobj):
            return super().allgather(OutOfBand(sendobj))

    return LargeMessages


class OutOfBand:
    """``obj`` to be pickled with its CPU tensors' memory as out-of-band buffers (pickle
    protocol 5), which ``pkl5`` sends as they are and the receiver's tensors then use. Torch
    pickles a tensor's memory in band, through ``torch.save``'s format: a 2 GB broadcast of
    snapshots spent 18 of its 20 s there (unpickling). Unpickled, it is ``obj`` again."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __reduce_ex__(self, protocol):
        if protocol < 5:
            return _same, (self.obj,)
        buffers: list[pickle.PickleBuffer] = []
        data = io.BytesIO()
        _TensorPickler(data, protocol=5, buffer_callback=buffers.append).dump(self.obj)
        return _unpickled, (data.getvalue(), *buffers)


class _TensorPickler(pickle.Pickler):
    """A plain CPU tensor's memory pickled as one buffer (:func:`tensor_reduction`); any
    other object as it pickles itself."""

    def reducer_override(self, obj):
        return tensor_reduction(obj)


def tensor_reduction(obj: Any) -> Any:
    """A pickler's ``reducer_override`` for tensors: a plain CPU tensor's memory as one
    ``PickleBuffer`` (out of band under protocol 5 with a ``buffer_callback``), shape and
    dtype beside it, its elements contiguous and apart from any other tensor's; NotImplemented
    for anything else (a parameter, a sparse tensor, one that needs its gradient: torch's
    pickling keeps what they are). Shared with hpctrain.sync's object collectives."""
    # torch as imported already: launchers (horovodrun) import this module without it,
    # and where it is not imported there is no tensor to pickle
    torch = sys.modules.get("torch")
    if (torch is None or type(obj) is not torch.Tensor or obj.device.type != "cpu"
            or obj.requires_grad or obj.layout != torch.strided or obj.is_quantized
            or obj.is_nested):
        return NotImplemented
    flat = obj.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    memory = pickle.PickleBuffer(flat.view(torch.uint8).numpy())
    return _tensor, (memory, obj.dtype, tuple(obj.shape))


def _tensor(buffer: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor of :class:`_TensorPickler`'s buffer. A received buffer (MPI's, or pickle's
    for one pickled in band) is the tensor's memory; the sender's own (``pickle.loads`` on a
    broadcast's root) is copied, so that what comes back never shares memory with what was
    sent."""
    import torch

    if isinstance(buffer, pickle.PickleBuffer):
        buffer = bytearray(buffer)
    if not memoryview(buffer).nbytes:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)


def _unpickled(data: bytes, *buffers: Any) -> Any:
    return pickle.loads(data, buffers=buffers)


def _same(obj: Any) -> Any:
    return obj


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


def _finish_before_abort() -> None:
    """The work :func:`before_abort` registered, done before this process ends."""
    for callback in _before_abort:
        with contextlib.suppress(Exception):  # the hook must end the process regardless
            callback()


def _exit_on_sigterm(status: int) -> None:
    """While this rank waits to be ended: the launcher's SIGTERM exits with ``status`` (not
    143), once the work registered with :func:`before_abort` is done. A handler that exited
    at once cut off rank 0's write of an elastic commit and the restart lost it."""
    def _exit(*_: Any) -> None:
        _finish_before_abort()
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
    _finish_before_abort()
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
        return launcher() == "torchrun"
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
        if MPI is not None and launcher() != "torchrun":
            return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    with contextlib.suppress(UsageError):
        return env_rank(), env_size()
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
    """:func:`install_abort_on_error` for a user's script (``hvd.init()``, this module's
    :func:`init`), unless the process has an abort hook already: hpctrain's command or run
    that started MPI keeps its one line (under torchrun, wrapped by torch.distributed)."""
    if not (_one_line or aborts_on_error()):
        install_abort_on_error(script=True)


def aborts_on_error() -> bool:
    """Whether one of :func:`install_abort_on_error`'s hooks is the process's."""
    return sys.excepthook in (_abort_hook, _script_abort_hook)
