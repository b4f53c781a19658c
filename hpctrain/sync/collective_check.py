"""Agreement before every collective: ranks that disagree get one error instead of a hang.

MPI matches collectives by call order, so two ranks that call different collectives, or one
that calls one more, wait for each other forever. Here every collective of hpctrain's own
backends (and each ``DistributedOptimizer`` step) first runs one small blocking allreduce
(MAX) of int64 host words through its process set's transport (MPI, or gloo under the torch
backend), a *round*: a hash of what must agree (kind,
name, op, dtype, shape, root), the same hash negated (so MAX also yields the minimum), and
the join state. When the hashes differ, every rank takes part in one ``allgather`` of the
calls' descriptions and raises :class:`CollectiveMismatchError` naming the two calls (and
the first tensor that differs, by name, where a call covers several: a model's). A rank
in ``join()`` takes part in the rounds as "joined", and when any rank has joined, the lowest
active rank broadcasts what the joined ranks must do (e.g. an allreduce of so many float32
zeros). The cost is one latency-bound 48-byte allreduce per collective call and per optimizer
step. ``HPCTRAIN_CHECK_COLLECTIVES=0`` turns the rounds off (mismatches then hang as in MPI,
``join`` is unavailable, and the stall check, which watches the rounds, does not run); the
tests run with it on, the default.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from hpctrain.switches import switch
from hpctrain.sync import stall, timeline
from hpctrain.sync.errors import CollectiveMismatchError, HorovodInternalError
from hpctrain.sync.transport import MAX

CHECK_ENV = "HPCTRAIN_CHECK_COLLECTIVES"
_ABSENT = -(2**62)
ACTIVE, JOINED, KEY, NEG_KEY, NEW_JOIN, NEG_ROOT = range(6)


def enabled() -> bool:
    """Whether rounds run: unless ``HPCTRAIN_CHECK_COLLECTIVES=0`` (or false, no, off)."""
    return switch(CHECK_ENV, default=True)


@dataclass(frozen=True)
class Call:
    """One collective call as this rank sees it.

    ``agree`` is what every rank must have in common; ``join_plan`` is what a joined rank
    must do to take part (None: the call cannot run while a rank has joined, as in Horovod).
    ``row`` is the timeline row of a round hpctrain runs itself, made once and run again
    (None: ``kind.name``, or for an unnamed call a row of its own, as Horovod gives it).
    ``entries``: the tensors ``agree`` covers, as (what the user calls it, its dtype and
    shape) pairs, for an error that names the first that differs (a model's ``3.bias``, not
    ``(16,)``); no part of the hash.
    """

    kind: str
    name: str | None = None
    op: str | None = None
    dtype: Any = None
    shape: tuple | None = None
    agree: tuple = ()
    join_plan: Any = None
    extra: str = ""
    row: str | None = None
    entries: tuple = ()

    def describe(self) -> str:
        parts = [] if self.name is None else [f"name={self.name!r}"]
        if self.op is not None:
            parts.append(f"op={self.op}")
        if self.dtype is not None:
            dtype = str(self.dtype).replace("torch.", "")
            parts.append(dtype + ("" if self.shape is None else str(list(self.shape))))
        if self.extra:
            parts.append(self.extra)
        return f"{self.kind}({', '.join(parts)})"

    def key(self) -> int:
        return self._key

    @cached_property
    def _key(self) -> int:
        """Hashed once per Call: a Call made once and agreed again (an optimizer's step,
        whose ``agree`` is its bucket plan: 120 us a step for 400 tensors) hashes once."""
        text = repr((self.kind, self.name, self.op, str(self.dtype), self.agree))
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 2


JOINED_CALL = Call("join")  # what a rank in join() waits in, as the stall report names it


@dataclass
class Round:
    """What a round told every rank."""

    everyone_joined: bool
    join_plan: Any = None  # set when some rank has joined


@dataclass
class Channel:
    """The rounds of one transport (a process set's)."""

    transport: Any
    label: str
    ranks: list[int] | None = None  # global rank of each transport rank (None: the same)
    seq: int = 0  # completed rounds
    last: str = "nothing yet"  # the last agreed call
    last_joined: int = -1  # (transport) rank that joined last, as join() returns
    _vec: np.ndarray = field(default_factory=lambda: np.zeros(6, dtype=np.int64))

    def agree(self, call: Call) -> None:
        """Run a round for ``call`` on an active rank; raise if the ranks disagree."""
        if self.transport.size() == 1 or not enabled():
            return
        key = call.key()
        v = self._vec
        v[:] = (1, 0, key, -key, -1, -self.transport.rank())
        t0 = time.perf_counter()
        self._exchange(call)
        if v[KEY] != -v[NEG_KEY]:
            self._raise_mismatch(call)
        if v[JOINED]:
            plan = self._broadcast_plan(call)
            if plan is None:
                raise HorovodInternalError(f"{call.kind} is not supported while a rank has "
                                           "joined (hvd.join()), as in Horovod")
        timeline.negotiated(call, t0)
        self.last = call.describe()

    def joined_round(self, first: bool) -> Round:
        """Run a round on a rank inside ``join()``."""
        v = self._vec
        v[:] = (0, 1, _ABSENT, _ABSENT, self.transport.rank() if first else -1, _ABSENT)
        self._exchange(None)
        if not v[ACTIVE]:
            return Round(everyone_joined=True)
        if v[KEY] != -v[NEG_KEY]:
            self._raise_mismatch(None)
        return Round(everyone_joined=False, join_plan=self._broadcast_plan(None))

    def _exchange(self, call: Call | None) -> None:
        request = self.transport.iallreduce(None, torch.from_numpy(self._vec), MAX)
        if call is None:
            # A joined rank polls gently so as not to take a core from a rank that still
            # computes, watched as any round: a rank that never joins (it returned, or hangs)
            # is reported, and the stall timeout ends the job as Horovod's does.
            with stall.watching(self, JOINED_CALL):
                while not request.test():
                    time.sleep(0.0005)
        else:
            stall.wait(request, self, call)
        self.seq += 1
        if self._vec[NEW_JOIN] >= 0:
            self.last_joined = int(self._vec[NEW_JOIN])

    def global_rank(self, r: int) -> int:
        return r if self.ranks is None else self.ranks[r]

    def _broadcast_plan(self, call: Call | None) -> Any:
        root = int(-self._vec[NEG_ROOT])
        mine = call.join_plan if call is not None else None
        return self.transport.bcast_object(mine if self.transport.rank() == root else None, root)

    def _raise_mismatch(self, call: Call | None) -> None:
        mine = None if call is None else (call.key(), call.describe(), call.agree,
                                          call.entries, (call.kind, call.name))
        calls = self.transport.allgather_object(mine)
        active = [(r, c) for r, c in enumerate(calls) if c is not None]
        (r0, (k0, d0, a0, e0, id0)) = active[0]
        r1, (_, d1, a1, e1, id1) = next((r, c) for r, c in active if c[0] != k0)
        r0, r1 = self.global_rank(r0), self.global_rank(r1)
        named = entry_difference(e0, e1, r0, r1)
        differ = f"; they differ in {named}" if named else \
            "" if d0 != d1 else f"; they differ in {difference(a0, a1, r0, r1)}"
        # The same call with other arguments (shapes, a model built otherwise) is no
        # matter of order: the hint only where the kinds or names differ.
        if id0 != id1:
            lead, order = "different collectives", (" (collectives must be called in the "
                                                   "same order on every rank)")
        else:
            lead, order = f"{id0[0]} differently", ""
        raise CollectiveMismatchError(
            f"ranks called {lead} at call #{self.seq} on {self.label}: rank {r0} called "
            f"{d0}, rank {r1} called {d1}{differ}{order}")


def entry_difference(a: tuple, b: tuple, rank_a: int, rank_b: int) -> str | None:
    """The first of two calls' ``entries`` that differs, by name (``'3.bias': float32[16]
    on rank 0, float32[32] on rank 1``); None where they are alike (or not given)."""
    if not a or not b:
        return None
    for i, ((name_a, value_a), (name_b, value_b)) in enumerate(zip(a, b, strict=False)):
        if name_a != name_b:
            return f"tensor #{i + 1}: {name_a} on rank {rank_a}, {name_b} on rank {rank_b}"
        if value_a != value_b:
            return f"{name_a}: {value_a} on rank {rank_a}, {value_b} on rank {rank_b}"
    if len(a) != len(b):
        return f"their number of tensors: {len(a)} on rank {rank_a}, {len(b)} on rank {rank_b}"
    return None


def tensor_entry(label: str, tensor: Any) -> tuple[str, str]:
    """An entry of :attr:`Call.entries`: ``label`` and ``tensor``'s ``float32[16, 8]``."""
    return label, str(tensor.dtype).replace("torch.", "") + str(list(tensor.shape))


def difference(a: Any, b: Any, rank_a: int, rank_b: int) -> str:
    """The first part of two calls' ``agree`` that differs, for a message whose calls read
    alike (two optimizers' bucket plans, two lists of parameter shapes): entered down to a
    short value, ``(2, 'torch.float32') on rank 0, (3, 'torch.float32') on rank 1``."""
    while isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) \
            and max(len(repr(a)), len(repr(b))) > 30:
        if len(a) != len(b):
            return f"{len(a)} entries on rank {rank_a}, {len(b)} on rank {rank_b}"
        pair = next(((x, y) for x, y in zip(a, b, strict=True) if x != y), None)
        if pair is None:  # equal items in another container (a list, a tuple)
            break
        a, b = pair
    return f"{a!r} on rank {rank_a}, {b!r} on rank {rank_b}"
