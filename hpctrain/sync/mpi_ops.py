"""``horovod.torch.mpi_ops``'s names, for scripts that import them from there:
``from horovod.torch.mpi_ops import Sum, allreduce_async_`` becomes
``from hpctrain.sync.mpi_ops import Sum, allreduce_async_``. They are ``hpctrain.sync``'s
own, which run on whichever backend ``init()`` started. Left out: Horovod's internals (its
autograd Functions ``HorovodAllreduce`` and the like, ``check_installed_version``, the
``average`` helpers of its frameworks)."""

from typing import Any

from hpctrain.sync import (
    Adasum,
    Average,
    Compression,
    Max,
    Min,
    ProcessSet,
    Product,
    Sum,
    add_process_set,
    allgather,
    allgather_async,
    allreduce,
    allreduce_,
    allreduce_async,
    allreduce_async_,
    alltoall,
    alltoall_async,
    barrier,
    broadcast,
    broadcast_,
    broadcast_async,
    broadcast_async_,
    ccl_built,
    cross_rank,
    cross_size,
    cuda_built,
    ddl_built,
    global_process_set,
    gloo_built,
    gloo_enabled,
    gpu_available,
    grouped_allgather,
    grouped_allgather_async,
    grouped_allreduce,
    grouped_allreduce_,
    grouped_allreduce_async,
    grouped_allreduce_async_,
    grouped_reducescatter,
    grouped_reducescatter_async,
    init,
    is_homogeneous,
    is_initialized,
    join,
    local_rank,
    local_size,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    nccl_built,
    poll,
    rank,
    reducescatter,
    reducescatter_async,
    remove_process_set,
    rocm_built,
    shutdown,
    size,
    sparse_allreduce_async,
    start_timeline,
    stop_timeline,
    synchronize,
)

__all__ = [
    "Adasum", "Average", "Compression", "Max", "Min", "ProcessSet", "Product", "Sum",
    "add_process_set", "allgather", "allgather_async", "allreduce", "allreduce_",
    "allreduce_async", "allreduce_async_", "alltoall", "alltoall_async", "barrier", "broadcast",
    "broadcast_", "broadcast_async", "broadcast_async_", "ccl_built", "cross_rank", "cross_size",
    "cuda_built", "ddl_built", "global_process_set", "gloo_built", "gloo_enabled", "gpu_available",
    "grouped_allgather", "grouped_allgather_async", "grouped_allreduce", "grouped_allreduce_",
    "grouped_allreduce_async", "grouped_allreduce_async_", "grouped_reducescatter",
    "grouped_reducescatter_async", "init", "is_homogeneous", "is_initialized", "join",
    "local_rank", "local_size", "mpi_built", "mpi_enabled", "mpi_threads_supported", "nccl_built",
    "num_rank_is_power_2", "poll", "rank", "reducescatter", "reducescatter_async",
    "remove_process_set", "rocm_built", "shutdown", "size", "sparse_allreduce_async",
    "start_timeline", "stop_timeline", "synchronize",
    "HorovodInternalError", "mpi_lib",  # noqa: F822 (__getattr__: the running backend's)
]


def num_rank_is_power_2(num_rank: int) -> bool:
    """Whether ``num_rank`` is a power of 2, as Adasum needs."""
    return num_rank != 0 and num_rank & (num_rank - 1) == 0


def __getattr__(name: str) -> Any:
    """Horovod's exception class and compiled extension, as ``hpctrain.sync`` gives them for
    the running backend (Horovod's own under the horovod backend)."""
    import hpctrain.sync as sync

    if name == "HorovodInternalError":
        return sync.HorovodInternalError
    if name == "mpi_lib":
        return sync.mpi_lib_v2
    raise AttributeError(f"module 'hpctrain.sync.mpi_ops' has no attribute {name!r}")
