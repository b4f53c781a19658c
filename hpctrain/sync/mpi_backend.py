"""hpctrain's own backends (the mpi and torch transports) as one module with ``horovod.torch``'s
names: what the facade dispatches to."""

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
from hpctrain.sync.functions import broadcast_optimizer_state, broadcast_parameters
from hpctrain.sync.optimizer import DistributedOptimizer

__all__ = [
    "DistributedOptimizer", "allgather", "allgather_async", "allgather_object", "allreduce",
    "allreduce_", "allreduce_async", "allreduce_async_", "barrier", "broadcast", "broadcast_",
    "broadcast_async", "broadcast_async_", "broadcast_object", "broadcast_optimizer_state",
    "broadcast_parameters", "gloo_built", "init", "is_initialized", "local_rank", "local_size",
    "mpi_built", "mpi_enabled", "mpi_threads_supported", "nccl_built", "poll", "rank",
    "shutdown", "size", "synchronize",
]
