"""Horovod-compatible API: ``import hpctrain.sync as hvd`` replaces ``import horovod.torch as hvd``.

``init()`` starts the mpi backend (mpi4py non-blocking collectives; DistributedOptimizer with
gradients fused into buckets and allreduced while backward runs); ``init(backend="torch")``
runs the same code on ``torch.distributed`` (NCCL for CUDA tensors, gloo for CPU ones);
``init(backend="horovod")`` hands every call to ``horovod.torch``. Names, arguments and
semantics are Horovod 0.28.1's. hpctrain's own backends take CPU and CUDA tensors (the mpi
backend stages CUDA tensors through pinned host memory unless MPI is CUDA-aware) and have no
process sets, grouped operations or Adasum; their ``DistributedOptimizer`` also takes
``bucket_bytes`` (fusion bucket size, 25 MiB).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from hpctrain.errors import UsageError
from hpctrain.sync import collectives, horovod_backend, mpi_backend
from hpctrain.sync.buckets import DEFAULT_BUCKET_BYTES
from hpctrain.sync.collectives import Adasum, Average, Max, Min, Product, ReduceOp, Sum
from hpctrain.sync.compression import Compression
from hpctrain.sync.optimizer import parameter_names

__all__ = [
    "BACKENDS", "Adasum", "Average", "Compression", "DistributedOptimizer", "Max", "Min",
    "Product", "ReduceOp", "Sum", "allgather", "allgather_async", "allgather_object",
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "backend", "barrier",
    "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "broadcast_object",
    "broadcast_optimizer_state", "broadcast_parameters", "gloo_built", "init", "is_initialized",
    "local_rank", "local_size", "mpi_built", "mpi_enabled", "mpi_threads_supported",
    "nccl_built", "poll", "rank", "shutdown", "size", "synchronize",
]

BACKENDS = ("mpi", "torch", "horovod")
_active: ModuleType | None = None
_active_name: str | None = None


def _impl(caller: str, tensor: torch.Tensor | None = None) -> ModuleType:
    if _active is None:
        raise UsageError(f"hpctrain.sync.{caller}() called before hpctrain.sync.init()")
    if _active is not mpi_backend and isinstance(tensor, torch.Tensor) and tensor.is_cuda \
            and not _active.cuda_built():
        raise UsageError(f"hpctrain.sync.{caller}(): Horovod here was built without GPU "
                         "support and cannot take CUDA tensors; use init(backend='torch') "
                         "or 'mpi'")
    return _active


def init(comm: Any = None, *, backend: str = "mpi") -> None:
    """Start ``backend`` ("mpi", "torch" or "horovod") on ``comm`` (default COMM_WORLD);
    idempotent."""
    global _active, _active_name
    if backend not in BACKENDS:
        raise UsageError(f"unknown sync backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if _active is not None:
        if backend != _active_name:
            raise UsageError(f"hpctrain.sync runs the {_active_name!r} backend already; call "
                             f"shutdown() before init(backend={backend!r})")
        return
    if backend in collectives.TRANSPORTS:
        collectives.init(comm, transport=backend)
        _active = mpi_backend
    else:
        _active = horovod_backend.init(comm)
    _active_name = backend


def shutdown() -> None:
    """Stop the running backend (MPI itself stays up); init() may be called again."""
    global _active, _active_name
    if _active is not None:
        _active.shutdown()
    _active = _active_name = None


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


def mpi_enabled() -> bool:
    return (_active or mpi_backend).mpi_enabled()


def mpi_built() -> bool:
    return (_active or mpi_backend).mpi_built()


def nccl_built() -> bool:
    return (_active or mpi_backend).nccl_built()


def gloo_built() -> bool:
    return (_active or mpi_backend).gloo_built()


def allreduce(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
              compression: Any = Compression.none, op: Any = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0) -> torch.Tensor:
    """Reduced copy of ``tensor`` over all processes (Average by default; differentiable)."""
    return _impl("allreduce", tensor).allreduce(
        tensor, average=average, name=name, compression=compression, op=op,
        prescale_factor=prescale_factor, postscale_factor=postscale_factor)


def allreduce_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
               op: Any = None, prescale_factor: float = 1.0,
               postscale_factor: float = 1.0) -> torch.Tensor:
    """Reduce ``tensor`` in place and return it."""
    return _impl("allreduce_", tensor).allreduce_(
        tensor, average=average, name=name, op=op, prescale_factor=prescale_factor,
        postscale_factor=postscale_factor)


def allreduce_async(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                    op: Any = None, prescale_factor: float = 1.0,
                    postscale_factor: float = 1.0) -> int:
    """Start a reduction into a new tensor; ``synchronize(handle)`` returns it."""
    return _impl("allreduce_async", tensor).allreduce_async(
        tensor, average=average, name=name, op=op, prescale_factor=prescale_factor,
        postscale_factor=postscale_factor)


def allreduce_async_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                     op: Any = None, prescale_factor: float = 1.0,
                     postscale_factor: float = 1.0) -> int:
    """Start an in-place reduction of ``tensor``; return a handle."""
    return _impl("allreduce_async_", tensor).allreduce_async_(
        tensor, average=average, name=name, op=op, prescale_factor=prescale_factor,
        postscale_factor=postscale_factor)


def allgather(tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Every process's ``tensor`` concatenated along dimension 0 (differentiable)."""
    return _impl("allgather", tensor).allgather(tensor, name=name)


def allgather_async(tensor: torch.Tensor, name: str | None = None) -> int:
    """Start an allgather; ``synchronize(handle)`` returns the concatenation."""
    return _impl("allgather_async", tensor).allgather_async(tensor, name=name)


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> torch.Tensor:
    """root_rank's ``tensor`` as a new tensor on every process (differentiable)."""
    return _impl("broadcast", tensor).broadcast(tensor, root_rank, name=name)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> torch.Tensor:
    """Overwrite ``tensor`` with root_rank's, in place, and return it."""
    return _impl("broadcast_", tensor).broadcast_(tensor, root_rank, name=name)


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> int:
    """Start a broadcast into a new tensor; return a handle."""
    return _impl("broadcast_async", tensor).broadcast_async(tensor, root_rank, name=name)


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> int:
    """Start an in-place broadcast of ``tensor``; return a handle."""
    return _impl("broadcast_async_", tensor).broadcast_async_(tensor, root_rank, name=name)


def poll(handle: int) -> bool:
    """Whether the operation behind ``handle`` has finished."""
    return _impl("poll").poll(handle)


def synchronize(handle: int) -> torch.Tensor | None:
    """Wait for ``handle``; return the operation's output tensor."""
    return _impl("synchronize").synchronize(handle)


def barrier() -> None:
    """Wait until every process gets here."""
    _impl("barrier").barrier()


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None) -> Any:
    """root_rank's ``obj`` (pickled) on every process."""
    return _impl("broadcast_object").broadcast_object(obj, root_rank, name=name)


def allgather_object(obj: Any, name: str | None = None) -> list:
    """Every process's ``obj`` (pickled), in rank order."""
    return _impl("allgather_object").allgather_object(obj, name=name)


def broadcast_parameters(params: Any, root_rank: int) -> None:
    """Overwrite ``params`` (a state_dict, or a list of tensors or (name, tensor)) with root's."""
    _impl("broadcast_parameters").broadcast_parameters(params, root_rank)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int,
                              model: torch.nn.Module | None = None) -> None:
    """Make every process's optimizer state and hyper-parameters root_rank's."""
    _impl("broadcast_optimizer_state").broadcast_optimizer_state(optimizer, root_rank,
                                                                 model=model)


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters: Any = None,
                         compression: Any = Compression.none, backward_passes_per_step: int = 1,
                         op: Any = Average, gradient_predivide_factor: float = 1.0, *,
                         bucket_bytes: int | None = None) -> torch.optim.Optimizer:
    """``optimizer`` whose ``step()`` applies gradients allreduced over all processes.

    ``bucket_bytes`` (mpi backend only) is the fusion bucket size; Horovod's own is set with
    the environment variable HOROVOD_FUSION_THRESHOLD before init().
    """
    first = next((p for g in optimizer.param_groups for p in g["params"]), None)
    impl = _impl("DistributedOptimizer", first)
    named = None if named_parameters is None else list(named_parameters)
    parameter_names(optimizer, named)  # the same one-line errors on both backends
    if impl is mpi_backend:
        return impl.DistributedOptimizer(
            optimizer, named, compression, backward_passes_per_step, op,
            gradient_predivide_factor,
            bucket_bytes=DEFAULT_BUCKET_BYTES if bucket_bytes is None else bucket_bytes)
    if bucket_bytes is not None:
        raise UsageError("bucket_bytes applies to the mpi backend; Horovod's fusion buffer is "
                         "set with HOROVOD_FUSION_THRESHOLD before init()")
    return impl.DistributedOptimizer(
        optimizer, named_parameters=named, compression=compression,
        backward_passes_per_step=backward_passes_per_step, op=op,
        gradient_predivide_factor=gradient_predivide_factor)
