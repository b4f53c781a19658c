"""Horovod-compatible API: ``import hpctrain.sync as hvd`` replaces ``import horovod.torch as hvd``.

``init()`` starts the mpi backend (mpi4py non-blocking collectives; DistributedOptimizer with
gradients fused into buckets and allreduced while backward runs); ``init(backend="torch")``
runs the same code on ``torch.distributed`` (NCCL for CUDA tensors, gloo for CPU ones) and is
what ``init()`` starts under torchrun; ``init(backend="horovod")`` hands every call to
``horovod.torch``. Every public name of horovod.torch 0.28.1 is here, with its arguments and
semantics, on every backend; README.md has the table of what differs on hpctrain's own
backends (mpi, torch): they take CPU and CUDA tensors (staged through host memory where the
transport cannot move them), reduce ``op=Adasum`` when the call is made rather than in the
background, match collectives by call order, raising one error when ranks disagree, and keep
``hvd.elastic``'s state by restarting the job rather than in-process. Their
``DistributedOptimizer`` also takes ``bucket_bytes`` (fusion bucket size, 25 MiB), and
``init`` takes the stall check's times.
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys
from types import ModuleType
from typing import Any

import torch

from hpctrain import comm as mpicomm
from hpctrain import job_end
from hpctrain.errors import UsageError
from hpctrain.sync import (
    collective_check,
    collectives,
    horovod_backend,
    mpi_backend,
    sparse,
    stall,
    timeline,
)
from hpctrain.sync import process_sets as _psets
from hpctrain.sync.buckets import default_bucket_bytes
from hpctrain.sync.collectives import Adasum, Average, Max, Min, Product, ReduceOp, Sum
from hpctrain.sync.compression import Compression
from hpctrain.sync.errors import CollectiveMismatchError, UsageTypeError, not_initialized
from hpctrain.sync.optimizer import HorovodOptimizer as HorovodOptimizer  # DistributedOptimizer's
from hpctrain.sync.optimizer import parameter_names
from hpctrain.sync.process_sets import ProcessSet, global_process_set
from hpctrain.sync.sync_batch_norm import SyncBatchNorm

__all__ = [
    "BACKENDS", "Adasum", "Average", "Compression", "DistributedOptimizer", "Max", "Min",
    "Product", "ReduceOp", "Sum", "allgather", "allgather_async", "allgather_object",
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "backend", "barrier",
    "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "broadcast_object",
    "broadcast_optimizer_state", "broadcast_parameters", "gloo_built", "init", "is_initialized",
    "local_rank", "local_size", "mpi_built", "mpi_enabled", "mpi_threads_supported",
    "nccl_built", "poll", "rank", "shutdown", "size", "synchronize",
    # the rest of horovod.torch 0.28.1
    "CollectiveMismatchError", "HorovodInternalError", "ProcessSet", "SyncBatchNorm",
    "add_process_set", "alltoall", "alltoall_async", "ccl_built", "check_extension",
    "cross_rank", "cross_size", "cuda_built", "ddl_built", "elastic", "global_process_set",
    "gloo_enabled", "grouped_allgather", "grouped_allgather_async", "grouped_allreduce",
    "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_",
    "grouped_reducescatter", "grouped_reducescatter_async", "join", "mpi_lib_v2", "mpi_ops",
    "reducescatter", "reducescatter_async", "remove_process_set", "rocm_built",
    "sparse_allreduce_async", "start_timeline", "stop_timeline", "sync_batch_norm",
    # horovod.torch.mpi_ops's, and its other module of functions
    "functions", "gpu_available", "is_homogeneous",
]
_LAZY = ("HorovodInternalError", "elastic", "functions", "mpi_ops", "mpi_lib_v2")
# hpctrain's modules of horovod.torch's modules' names, on every backend (they import this one)
_SUBMODULES = ("functions", "mpi_ops")

BACKENDS = ("mpi", "torch", "horovod")
_active: ModuleType | None = None
_active_name: str | None = None


def _impl(caller: str, tensor: torch.Tensor | None = None) -> ModuleType:
    if _active is None:
        raise not_initialized(caller)
    if _active is not mpi_backend and isinstance(tensor, torch.Tensor) and tensor.is_cuda \
            and not _active.cuda_built():
        raise UsageError(f"hpctrain.sync.{caller}(): Horovod here was built without GPU "
                         "support and cannot take CUDA tensors; use init(backend='torch') "
                         "or 'mpi'")
    return _active


def init(comm: Any = None, process_sets: list[ProcessSet] | str | None = None, *,
         backend: str | None = None, stall_check_s: float | None = None,
         stall_timeout: float | None = None) -> None:
    """Start ``backend`` ("mpi", "torch" or "horovod") on ``comm`` (default COMM_WORLD); idempotent.

    Without ``backend``: "torch" under torchrun (whose workers are not one MPI world), else
    "mpi". An MPI backend asked for under a torchrun of several workers is refused: each
    worker would be an MPI world of its own and train alone.

    ``process_sets`` are registered as in Horovod (``"dynamic"``: sets added later, which
    every backend here allows anyway). A collective that some ranks have not
    reached after ``stall_check_s`` seconds (default HOROVOD_STALL_CHECK_TIME_SECONDS, 60)
    is reported on stderr; after ``stall_timeout`` seconds (default
    HOROVOD_STALL_SHUTDOWN_TIME_SECONDS, 0: never) the job is ended, as the CLI's
    ``--stall-timeout`` does. ``HOROVOD_TIMELINE=FILE`` starts the timeline, as Horovod does
    (so ``hpctrain train --algo ssgd`` writes one too).
    """
    global _active, _active_name
    if backend is None and comm is None and _active is not None:
        return  # as Horovod's: a second init() (a library's, say) keeps what runs
    # Before the checks below: one rank's refusal (a timeline folder missing on its node)
    # must end the job, not leave that rank in MPI_Finalize and the others in a collective.
    # A script's own errors show their traceback; inside hpctrain's run (ssgd) its hook stays.
    job_end.install_for_script()
    under_torchrun = comm is None and mpicomm.launcher() == "torchrun"
    if backend is None:
        backend = "torch" if under_torchrun else "mpi"
    if backend not in BACKENDS:
        raise UsageError(f"unknown sync backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if _active is not None:
        if backend != _active_name:
            raise UsageError(f"hpctrain.sync runs the {_active_name!r} backend already; call "
                             f"shutdown() before init(backend={backend!r})")
        return
    if backend != "torch" and under_torchrun and mpicomm.env_size() > 1:
        raise UsageError(f"init(backend={backend!r}) under torchrun: its {mpicomm.env_size()} "
                         "workers are not an MPI job, so each would train alone; use "
                         "backend='torch' (the default there) or launch with mpirun or srun")
    for value, what in ((stall_check_s, "stall_check_s"), (stall_timeout, "stall_timeout")):
        if value is not None and (not isinstance(value, int | float) or value < 0):
            raise UsageError(f"{what} must be a number of seconds >= 0, got {value!r}")
    if process_sets == "dynamic":  # Horovod's word for sets added after init: always possible
        process_sets = None  # here (the horovod backend sets HOROVOD_DYNAMIC_PROCESS_SETS)
    elif process_sets is not None and (
            isinstance(process_sets, str)
            or not all(isinstance(p, ProcessSet) for p in process_sets)):
        raise UsageError(f"process_sets must be a list of hpctrain.sync.ProcessSet or "
                         f"'dynamic', got {process_sets!r}")
    if backend != "horovod" and isinstance(comm, list | tuple):  # Horovod's ranks of the world
        raise UsageError(f"comm={comm!r}: a list of ranks is taken by the horovod backend "
                         f"only; give {backend!r} a communicator "
                         "(COMM_WORLD.Create_group(COMM_WORLD.Get_group().Incl(ranks)))")
    if backend == "horovod" and os.environ.get("HPCTRAIN_ELASTIC_DIR"):
        # Horovod's hvd.elastic keeps commits in memory: the folder would stay empty, and a
        # job believed protected would restart from scratch.
        raise UsageError("HPCTRAIN_ELASTIC_DIR is set, but init(backend='horovod') runs "
                         "Horovod's own hvd.elastic, which writes no commits there: unset it, "
                         "or use the mpi or torch backend")
    check_environment()
    if backend in collectives.TRANSPORTS:
        collectives.init(comm, backend, process_sets, stall_check_s=stall_check_s,
                         stall_timeout_s=stall_timeout)
        _active = mpi_backend
        path = os.environ.get("HOROVOD_TIMELINE")  # Horovod's variable (Horovod reads its own)
        if path and path != "DYNAMIC":  # DYNAMIC: start_timeline() later, always possible here
            timeline.start(path, os.environ.get("HOROVOD_TIMELINE_MARK_CYCLES") == "1", rank())
    else:
        _active = horovod_backend.init(comm, process_sets, stall_check_s, stall_timeout)
    _active_name = backend


def check_environment() -> None:
    """Check the environment variables a backend reads (Horovod's fusion threshold, stall
    check and timeline; ``HPCTRAIN_CHECK_COLLECTIVES``): a bad value is one UsageError naming
    it, before any collective, not a failure mid-job (``hpctrain train``: before MPI starts)."""
    default_bucket_bytes()
    stall.settings(None, None)
    collective_check.enabled()
    path = os.environ.get("HOROVOD_TIMELINE")
    if path and path != "DYNAMIC":
        timeline.check_path(path)


def shutdown() -> None:
    """Stop the running backend (MPI itself stays up); init() may be called again."""
    global _active, _active_name
    if _active is not None:
        sparse.finish_unfinished()  # allgathers whose function was dropped uncalled
        _active.shutdown()
        if _horovod():
            horovod_backend.forget_process_sets()
    _active = _active_name = None


@atexit.register
def _shutdown_at_exit() -> None:
    """As Horovod, a backend the script left running stops at exit, so its timeline is
    closed and its communicators freed; not while an operation is still pending (waiting for
    it could hang the exit) or once MPI is finalized. Horovod's own shuts itself down."""
    mpi = sys.modules.get("mpi4py.MPI")
    if _active is mpi_backend and not collectives.pending() \
            and not (mpi is not None and mpi.Is_finalized()):
        shutdown()


def backend() -> str | None:
    """The running backend's name, or None before init()."""
    return _active_name


def is_initialized() -> bool:
    return _active is not None and bool(_active.is_initialized())


def size() -> int:
    """Number of processes."""
    return _impl("size").size()


def rank() -> int:
    """This process's rank."""
    return _impl("rank").rank()


def local_size() -> int:
    """Number of processes on this node."""
    return _impl("local_size").local_size()


def local_rank() -> int:
    """This process's rank among those on its node."""
    return _impl("local_rank").local_rank()


def mpi_threads_supported() -> bool:
    """Whether MPI runs at MPI_THREAD_MULTIPLE."""
    return bool(_impl("mpi_threads_supported").mpi_threads_supported())


def cross_size() -> int:
    """Number of nodes (processes with this process's local rank)."""
    return _impl("cross_size").cross_size()


def cross_rank() -> int:
    """This node's index among those."""
    return _impl("cross_rank").cross_rank()


def is_homogeneous() -> bool:
    """Whether every node runs the same number of processes (in horovod.torch.mpi_ops)."""
    impl = _impl("is_homogeneous")
    return bool(impl.mpi_ops.is_homogeneous()) if _horovod() else impl.is_homogeneous()


def gpu_available(ext_base_name: str = "torch", verbose: bool = False) -> bool:
    """Whether Horovod's extension ``ext_base_name`` would run with a GPU: for ``torch``,
    whether torch sees one (in horovod.torch.mpi_ops, from horovod.common.util)."""
    return ext_base_name == "torch" and torch.cuda.is_available()


def gloo_enabled() -> bool:
    """Whether collectives go through gloo (Horovod's, or the torch backend's)."""
    hvd = _horovod_module()
    return bool(hvd.gloo_enabled()) if hvd is not None else collectives.gloo_built()


def cuda_built() -> bool:
    """Whether CUDA tensors can be given (hpctrain's backends: with a CUDA build of torch)."""
    hvd = _horovod_module()
    return bool(hvd.cuda_built()) if hvd is not None else torch.version.cuda is not None


def rocm_built() -> bool:
    hvd = _horovod_module()
    return bool(hvd.rocm_built()) if hvd is not None else False


def ccl_built() -> bool:
    hvd = _horovod_module()
    return bool(hvd.ccl_built()) if hvd is not None else False


def ddl_built() -> bool:
    hvd = _horovod_module()
    return bool(hvd.ddl_built()) if hvd is not None else False


def check_extension(ext_name: str, ext_env_var: str, pkg_path: str, *args: Any) -> None:
    """Horovod checks its compiled extension here; hpctrain's backends have none to check."""
    if _horovod():
        from horovod.common.util import check_extension as horovod_check

        horovod_check(ext_name, ext_env_var, pkg_path, *args)


def _horovod() -> bool:
    return _horovod_module() is not None


def _horovod_module() -> ModuleType | None:
    """The running backend where it is Horovod's, else None."""
    return _active if _active is not None and _active is not mpi_backend else None


def _ps(process_set: Any) -> dict:
    """``process_set=`` for the running backend (ours, or Horovod's counterpart)."""
    if _horovod():
        return {"process_set": horovod_backend.native(process_set)}
    return {"process_set": global_process_set if process_set is None else process_set}


def _ps_extension(process_set: Any, caller: str) -> dict:
    """``process_set=`` for a function whose Horovod version has no such argument."""
    if not _horovod():
        return _ps(process_set)
    if process_set is not None and process_set is not global_process_set:
        raise UsageError(f"{caller}: Horovod 0.28.1's {caller} has no process_set argument; "
                         "only hpctrain's backends (mpi, torch) take one")
    return {}


def mpi_enabled() -> bool:
    return (_active or mpi_backend).mpi_enabled()


def mpi_built() -> bool:
    return (_active or mpi_backend).mpi_built()


def nccl_built() -> int:
    return (_active or mpi_backend).nccl_built()


def gloo_built() -> bool:
    return (_active or mpi_backend).gloo_built()


PS = ProcessSet  # for annotations below


def allreduce(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
              compression: Any = Compression.none, op: Any = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, process_set: PS = global_process_set
              ) -> torch.Tensor:
    """Reduced copy of ``tensor`` over all processes (Average by default; differentiable)."""
    return _impl("allreduce", tensor).allreduce(
        tensor, average=average, name=name, compression=compression, op=op,
        prescale_factor=prescale_factor, postscale_factor=postscale_factor, **_ps(process_set))


def allreduce_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
               op: Any = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
               process_set: PS = global_process_set) -> torch.Tensor:
    """Reduce ``tensor`` in place and return it."""
    return _impl("allreduce_", tensor).allreduce_(
        tensor, average=average, name=name, op=op, prescale_factor=prescale_factor,
        postscale_factor=postscale_factor, **_ps(process_set))


def allreduce_async(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                    op: Any = None, prescale_factor: float = 1.0,
                    postscale_factor: float = 1.0, process_set: PS = global_process_set) -> int:
    """Start a reduction into a new tensor; ``synchronize(handle)`` returns it."""
    return _impl("allreduce_async", tensor).allreduce_async(
        tensor, average=average, name=name, op=op, prescale_factor=prescale_factor,
        postscale_factor=postscale_factor, **_ps(process_set))


def allreduce_async_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                     op: Any = None, prescale_factor: float = 1.0,
                     postscale_factor: float = 1.0, process_set: PS = global_process_set) -> int:
    """Start an in-place reduction of ``tensor``; return a handle."""
    return _impl("allreduce_async_", tensor).allreduce_async_(
        tensor, average=average, name=name, op=op, prescale_factor=prescale_factor,
        postscale_factor=postscale_factor, **_ps(process_set))


def grouped_allreduce(tensors: list[torch.Tensor], average: bool | None = None,
                      name: str | None = None, compression: Any = Compression.none,
                      op: Any = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0, process_set: PS = global_process_set
                      ) -> list[torch.Tensor]:
    """Reduced copies of the tensors, as one fused operation (differentiable)."""
    return _impl("grouped_allreduce").grouped_allreduce(
        tensors, average=average, name=name, compression=compression, op=op,
        prescale_factor=prescale_factor, postscale_factor=postscale_factor, **_ps(process_set))


def grouped_allreduce_(tensors: list[torch.Tensor], average: bool | None = None,
                       name: str | None = None, op: Any = None, prescale_factor: float = 1.0,
                       postscale_factor: float = 1.0, process_set: PS = global_process_set
                       ) -> tuple:
    """Reduce the tensors in place, as one fused operation; return them."""
    return _impl("grouped_allreduce_").grouped_allreduce_(
        tensors, average=average, name=name, op=op, prescale_factor=prescale_factor,
        postscale_factor=postscale_factor, **_ps(process_set))


def grouped_allreduce_async(tensors: list[torch.Tensor], average: bool | None = None,
                            name: str | None = None, op: Any = None,
                            prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                            process_set: PS = global_process_set) -> int:
    """Start a fused reduction into new tensors; ``synchronize`` returns them (a tuple)."""
    return _impl("grouped_allreduce_async").grouped_allreduce_async(
        tensors, average=average, name=name, op=op, prescale_factor=prescale_factor,
        postscale_factor=postscale_factor, **_ps(process_set))


def grouped_allreduce_async_(tensors: list[torch.Tensor], average: bool | None = None,
                             name: str | None = None, op: Any = None,
                             prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                             process_set: PS = global_process_set) -> int:
    """Start a fused in-place reduction of the tensors; return a handle."""
    return _impl("grouped_allreduce_async_").grouped_allreduce_async_(
        tensors, average=average, name=name, op=op, prescale_factor=prescale_factor,
        postscale_factor=postscale_factor, **_ps(process_set))


def sparse_allreduce_async(tensor: torch.Tensor, name: str, op: Any,
                           process_set: PS = global_process_set) -> Any:
    """Horovod's reduction of a sparse tensor by allgathering indices and values; returns a
    function that waits and gives the (uncoalesced) sparse sum or average."""
    return _impl("sparse_allreduce_async", tensor).sparse_allreduce_async(
        tensor, name, op, **_ps(process_set))


def allgather(tensor: torch.Tensor, name: str | None = None,
              process_set: PS = global_process_set) -> torch.Tensor:
    """Every process's ``tensor`` concatenated along dimension 0 (differentiable)."""
    return _impl("allgather", tensor).allgather(tensor, name=name, **_ps(process_set))


def allgather_async(tensor: torch.Tensor, name: str | None = None,
                    process_set: PS = global_process_set) -> int:
    """Start an allgather; ``synchronize(handle)`` returns the concatenation."""
    return _impl("allgather_async", tensor).allgather_async(tensor, name=name, **_ps(process_set))


def grouped_allgather(tensors: list[torch.Tensor], name: str | None = None,
                      process_set: PS = global_process_set) -> tuple:
    """Each tensor concatenated over the processes, as one fused operation (differentiable)."""
    return _impl("grouped_allgather").grouped_allgather(tensors, name=name, **_ps(process_set))


def grouped_allgather_async(tensors: list[torch.Tensor], name: str | None = None,
                            process_set: PS = global_process_set) -> int:
    """Start a fused allgather of the tensors; ``synchronize`` returns a tuple."""
    return _impl("grouped_allgather_async").grouped_allgather_async(
        tensors, name=name, **_ps(process_set))


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None,
              process_set: PS = global_process_set) -> torch.Tensor:
    """root_rank's ``tensor`` as a new tensor on every process (differentiable)."""
    return _impl("broadcast", tensor).broadcast(tensor, root_rank, name=name, **_ps(process_set))


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
               process_set: PS = global_process_set) -> torch.Tensor:
    """Overwrite ``tensor`` with root_rank's, in place, and return it."""
    return _impl("broadcast_", tensor).broadcast_(tensor, root_rank, name=name, **_ps(process_set))


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                    process_set: PS = global_process_set) -> int:
    """Start a broadcast into a new tensor; return a handle."""
    return _impl("broadcast_async", tensor).broadcast_async(tensor, root_rank, name=name,
                                                    **_ps(process_set))


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                     process_set: PS = global_process_set) -> int:
    """Start an in-place broadcast of ``tensor``; return a handle."""
    return _impl("broadcast_async_", tensor).broadcast_async_(tensor, root_rank, name=name,
                                                      **_ps(process_set))


def alltoall(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
             process_set: PS = global_process_set) -> Any:
    """Rows ``splits[r]`` of ``tensor`` to rank r; the rows received in rank order (and, with
    ``splits``, the received splits). Differentiable."""
    return _impl("alltoall", tensor).alltoall(tensor, splits=splits, name=name, **_ps(process_set))


def alltoall_async(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
                   process_set: PS = global_process_set) -> int:
    """Start an alltoall; ``synchronize`` returns (rows received, received splits)."""
    return _impl("alltoall_async", tensor).alltoall_async(tensor, splits=splits, name=name,
                                                  **_ps(process_set))


def reducescatter(tensor: torch.Tensor, name: str | None = None,
                  compression: Any = Compression.none, op: Any = Average,
                  process_set: PS = global_process_set, prescale_factor: float = 1.0,
                  postscale_factor: float = 1.0) -> torch.Tensor:
    """This rank's rows of ``tensor`` reduced over the processes (differentiable)."""
    return _impl("reducescatter", tensor).reducescatter(
        tensor, name=name, compression=compression, op=op, prescale_factor=prescale_factor,
        postscale_factor=postscale_factor, **_ps(process_set))


def reducescatter_async(tensor: torch.Tensor, name: str | None = None, op: Any = Average,
                        process_set: PS = global_process_set, prescale_factor: float = 1.0,
                        postscale_factor: float = 1.0) -> int:
    """Start a reducescatter; ``synchronize`` returns this rank's rows."""
    return _impl("reducescatter_async", tensor).reducescatter_async(
        tensor, name=name, op=op, prescale_factor=prescale_factor,
        postscale_factor=postscale_factor, **_ps(process_set))


def grouped_reducescatter(tensors: list[torch.Tensor], name: str | None = None,
                          compression: Any = Compression.none, op: Any = Average,
                          process_set: PS = global_process_set, prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list:
    """This rank's rows of each reduced tensor, as one fused operation (differentiable)."""
    return _impl("grouped_reducescatter").grouped_reducescatter(
        tensors, name=name, compression=compression, op=op, prescale_factor=prescale_factor,
        postscale_factor=postscale_factor, **_ps(process_set))


def grouped_reducescatter_async(tensors: list[torch.Tensor], name: str | None = None,
                                op: Any = Average, process_set: PS = global_process_set,
                                prescale_factor: float = 1.0,
                                postscale_factor: float = 1.0) -> int:
    """Start a fused reducescatter; ``synchronize`` returns a tuple of this rank's rows."""
    return _impl("grouped_reducescatter_async").grouped_reducescatter_async(
        tensors, name=name, op=op, prescale_factor=prescale_factor,
        postscale_factor=postscale_factor, **_ps(process_set))


def poll(handle: int) -> bool:
    """Whether the operation behind ``handle`` has finished."""
    return _impl("poll").poll(handle)


def synchronize(handle: int) -> Any:
    """Wait for ``handle``; return the operation's output tensor (or tensors)."""
    return _impl("synchronize").synchronize(handle)


def join(device: int = -1) -> int:
    """Say this rank has no more data: it serves the others' allreduces (with zeros) until
    every rank has joined; returns the rank that joined last."""
    if collectives.as_integer(device) is None:  # Horovod's takes an int device index
        raise UsageTypeError(f"join: device must be an integer (-1: CPU), got {device!r}")
    return _impl("join").join(device)


def barrier(process_set: PS = global_process_set) -> None:
    """Wait until every process (of ``process_set``) gets here."""
    _impl("barrier").barrier(**_ps(process_set))


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None,
                     process_set: PS = global_process_set) -> Any:
    """root_rank's ``obj`` (pickled; by cloudpickle where installed, as Horovod does) on every
    process."""
    return _impl("broadcast_object").broadcast_object(obj, root_rank, name=name,
                                                      **_ps(process_set))


def allgather_object(obj: Any, name: str | None = None,
                     process_set: PS = global_process_set) -> list:
    """Every process's ``obj`` (pickled, as by :func:`broadcast_object`), in rank order."""
    return _impl("allgather_object").allgather_object(
        obj, name=name, **_ps_extension(process_set, "allgather_object"))


def broadcast_parameters(params: Any, root_rank: int,
                         process_set: PS = global_process_set) -> None:
    """Overwrite ``params`` (a state_dict, or a list of tensors or (name, tensor)) with root's."""
    _impl("broadcast_parameters").broadcast_parameters(
        params, root_rank, **_ps_extension(process_set, "broadcast_parameters"))


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int,
                              model: torch.nn.Module | None = None,
                              process_set: PS = global_process_set) -> None:
    """Make every process's optimizer state and hyper-parameters root_rank's."""
    _impl("broadcast_optimizer_state").broadcast_optimizer_state(optimizer, root_rank,
        model=model, **_ps_extension(process_set, "broadcast_optimizer_state"))


def add_process_set(process_set: ProcessSet | list[int]) -> ProcessSet:
    """Register a process set after init (every rank calls it) and return it."""
    impl = _impl("add_process_set")
    if impl is mpi_backend:
        return _psets.add(process_set)
    return horovod_backend.add_process_set(process_set)


def remove_process_set(process_set: ProcessSet) -> bool:
    """Unregister a process set (every rank calls it); whether it was registered."""
    impl = _impl("remove_process_set")
    if impl is mpi_backend:
        return _psets.remove(process_set)
    return horovod_backend.remove_process_set(process_set)


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Write a Chrome-trace timeline of every collective's phases to ``file_path`` (rank 0)."""
    impl = _impl("start_timeline")
    if impl is mpi_backend:
        if rank() == 0:  # the rank that writes it: one line, not an OSError mid-job
            timeline.check_path(file_path, "start_timeline")
        timeline.start(file_path, mark_cycles, rank())
    else:
        impl.start_timeline(file_path, mark_cycles)


def stop_timeline() -> None:
    """Finish the timeline file."""
    impl = _impl("stop_timeline")
    if impl is mpi_backend:
        timeline.stop()
    else:
        impl.stop_timeline()


def __getattr__(name: str) -> Any:
    """Horovod's exception class, extension and elastic module (Horovod's own under the
    horovod backend), and hpctrain's modules of Horovod's names."""
    if name not in _LAZY:
        raise AttributeError(f"module 'hpctrain.sync' has no attribute {name!r}")
    if name in _SUBMODULES:
        return importlib.import_module(f"hpctrain.sync.{name}")
    if _horovod():
        return getattr(_active, name)
    if name == "HorovodInternalError":
        from hpctrain.sync.errors import HorovodInternalError

        return HorovodInternalError
    if name == "elastic":  # import_module: ``from hpctrain.sync import`` would come back here
        return importlib.import_module("hpctrain.sync.elastic")
    return None  # mpi_lib_v2: Horovod's compiled extension; hpctrain's backends have none


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters: Any = None,
                         compression: Any = Compression.none, backward_passes_per_step: int = 1,
                         op: Any = Average, gradient_predivide_factor: float = 1.0,
                         num_groups: int = 0, groups: Any = None, sparse_as_dense: bool = False,
                         process_set: PS = global_process_set, *,
                         bucket_bytes: int | None = None) -> HorovodOptimizer:
    """``optimizer`` whose ``step()`` applies gradients allreduced over all processes.

    Typed as :class:`~hpctrain.sync.optimizer.HorovodOptimizer` (the user's optimizer with
    Horovod's ``synchronize``, ``skip_synchronize``, ``set_backward_passes_per_step``).

    ``bucket_bytes`` (hpctrain's backends: mpi, torch) is the fusion bucket size; without
    it, ``HOROVOD_FUSION_THRESHOLD`` where set (as Horovod's own fusion buffer is set, before
    init()), else 25 MiB.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageTypeError(f"DistributedOptimizer: expected a torch.optim.Optimizer, got "
                             f"{type(optimizer).__name__}")
    first = next((p for g in optimizer.param_groups for p in g["params"]), None)
    impl = _impl("DistributedOptimizer", first)
    named = None if named_parameters is None else list(named_parameters)
    if impl is mpi_backend:  # it checks the names itself, telling the other ranks
        return impl.DistributedOptimizer(
            optimizer, named, compression, backward_passes_per_step, op,
            gradient_predivide_factor, num_groups, groups, sparse_as_dense,
            global_process_set if process_set is None else process_set,
            bucket_bytes=default_bucket_bytes() if bucket_bytes is None else bucket_bytes)
    parameter_names(optimizer, named)  # the same one-line errors as hpctrain's backends
    if bucket_bytes is not None:
        raise UsageError("bucket_bytes applies to hpctrain's backends; Horovod's fusion buffer "
                         "is set with HOROVOD_FUSION_THRESHOLD before init()")
    return impl.DistributedOptimizer(
        optimizer, named_parameters=named, compression=compression,
        backward_passes_per_step=backward_passes_per_step, op=op,
        gradient_predivide_factor=gradient_predivide_factor, num_groups=num_groups,
        groups=groups, sparse_as_dense=sparse_as_dense, **_ps(process_set))
