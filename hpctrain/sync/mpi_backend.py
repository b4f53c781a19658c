"""hpctrain's own backends (the mpi and torch transports) as one module with ``horovod.torch``'s
names: what the facade dispatches to."""

from hpctrain.sync.broadcast_state import broadcast_optimizer_state, broadcast_parameters
from hpctrain.sync.collectives import (
    allgather,
    allgather_async,
    allgather_object,
    allreduce,
    allreduce_,
    allreduce_async,
    allreduce_async_,
    barrier,
    broadcast,
    broadcast_,
    broadcast_async,
    broadcast_async_,
    broadcast_object,
    gloo_built,
    init,
    is_initialized,
    local_rank,
    local_size,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    nccl_built,
    poll,
    rank,
    shutdown,
    size,
    synchronize,
)
from hpctrain.sync.optimizer import DistributedOptimizer

__all__ = [
    "DistributedOptimizer", "allgather", "allgather_async", "allgather_object", "allreduce",
    "allreduce_", "allreduce_async", "allreduce_async_", "barrier", "broadcast", "broadcast_",
    "broadcast_async", "broadcast_async_", "broadcast_object", "broadcast_optimizer_state",
    "broadcast_parameters", "gloo_built", "init", "is_initialized", "local_rank", "local_size",
    "mpi_built", "mpi_enabled", "mpi_threads_supported", "nccl_built", "poll", "rank",
    "shutdown", "size", "synchronize",
]

# Issue 13: the rest of horovod.torch's names (kept apart from the list above for merging).
from hpctrain.sync.alltoall import alltoall, alltoall_async  # noqa: E402
from hpctrain.sync.collectives import cross_rank, cross_size, is_homogeneous  # noqa: E402
from hpctrain.sync.grouped import (  # noqa: E402
    grouped_allgather,
    grouped_allgather_async,
    grouped_allreduce,
    grouped_allreduce_,
    grouped_allreduce_async,
    grouped_allreduce_async_,
    grouped_reducescatter,
    grouped_reducescatter_async,
    reducescatter,
    reducescatter_async,
)
from hpctrain.sync.join import join  # noqa: E402
from hpctrain.sync.sparse import sparse_allreduce_async  # noqa: E402

__all__ += [
    "alltoall", "alltoall_async", "cross_rank", "cross_size", "grouped_allgather",
    "grouped_allgather_async", "grouped_allreduce", "grouped_allreduce_",
    "grouped_allreduce_async", "grouped_allreduce_async_", "grouped_reducescatter",
    "grouped_reducescatter_async", "is_homogeneous", "join", "reducescatter",
    "reducescatter_async", "sparse_allreduce_async",
]
