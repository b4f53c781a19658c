"""``join()``: a rank that has run out of data keeps serving the others' collectives.

With a different number of batches per rank, the ranks with more would wait forever in
collectives the others never call. A rank in ``join()`` instead takes part in every
agreement round (collective_check) of the global process set as "joined": when the active
ranks run an allreduce (plain, grouped, or a ``DistributedOptimizer`` step) it contributes
zeros to the same operations of the transport (on the device type the active ranks' buffers
are moved from), and no entries to a step's sparse gradients (which Horovod cannot reduce
while a rank has joined), so the sum is the active ranks' and Average still divides by
the full size, as Horovod 0.28.1 does (Adasum combines a zero vector with its tree
neighbour into that neighbour unchanged); other collectives (allgather, broadcast, alltoall,
reducescatter) raise ``HorovodInternalError`` on the active ranks while a rank has joined,
as in Horovod. When every rank has joined, all return the rank that joined last. Its
rounds are watched by the stall check as any: a rank that never joins is reported, and the
stall timeout ends the job instead of a joined rank hanging for ever.
"""

from __future__ import annotations

from typing import Any

import torch

from hpctrain.errors import UsageError
from hpctrain.sync import adasum, buckets
from hpctrain.sync import collectives as C
from hpctrain.sync import process_sets as psets
from hpctrain.sync.collective_check import enabled
from hpctrain.sync.transport import Request, Transport, test_all, wait_all


def join(device: int = -1) -> int:
    """Serve the other ranks' allreduces with zeros until every rank has joined; return the
    (global) rank that joined last. ``device`` is accepted for Horovod's signature."""
    C.world("join")
    m = psets.member(None, "join")
    if m.transport.size() == 1:
        return 0
    if not enabled():
        raise UsageError("join() needs the collective check: unset HPCTRAIN_CHECK_COLLECTIVES=0")
    posted: list[tuple[torch.Tensor, Request]] = []  # zero contributions still in flight
    first = True
    while True:
        round_ = m.channel.joined_round(first)
        first = False
        if round_.everyone_joined:
            break
        posted.extend(_take_part(round_.join_plan, m.transport))
        test_all([r for _, r in posted])  # progress
    wait_all([r for _, r in posted])
    return m.channel.global_rank(m.channel.last_joined)


def _take_part(plan: Any, transport: Transport) -> list[tuple[torch.Tensor, Request]]:
    """Post this joined rank's share of the active ranks' operation described by ``plan``."""
    if plan is None:  # the active ranks raise: the call cannot run with a joined rank
        return []
    kind = plan[0]
    if kind == "barrier":
        transport.barrier()
        return []
    if kind == "allreduce":
        _, op, parts = plan
        posted = []
        for dtype_name, numel, device in parts:
            zeros = torch.zeros(numel, dtype=_dtype(dtype_name), device=device)
            posted.append((zeros, transport.iallreduce(None, zeros, op)))
        return posted
    if kind == "adasum":  # blocking, as on the active ranks; zeros leave their sum as it is
        for dtype_name, numel, device, counts in plan[1]:
            adasum.adasum_(torch.zeros(numel, dtype=_dtype(dtype_name), device=device), counts,
                           transport)
        return []
    if kind == "step":
        return buckets.take_part_with_zeros(plan[1], plan[2])
    raise AssertionError(f"unknown join plan {plan!r}")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))
