"""``horovod.torch.functions``'s names, for scripts that import them from there:
``from horovod.torch.functions import broadcast_object`` becomes
``from hpctrain.sync.functions import broadcast_object``. They are ``hpctrain.sync``'s own,
which run on whichever backend ``init()`` started (hpctrain's backends implement the
broadcasts of parameters and optimizer state in broadcast_state.py)."""

from hpctrain.sync import (
    ProcessSet,
    allgather,
    allgather_object,
    broadcast_,
    broadcast_async_,
    broadcast_object,
    broadcast_optimizer_state,
    broadcast_parameters,
    global_process_set,
    rank,
    size,
    synchronize,
)

__all__ = [
    "ProcessSet", "allgather", "allgather_object", "broadcast_", "broadcast_async_",
    "broadcast_object", "broadcast_optimizer_state", "broadcast_parameters",
    "global_process_set", "rank", "size", "synchronize",
]
