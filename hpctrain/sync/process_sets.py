"""Process sets: collectives over a subset of the ranks, as Horovod's ``ProcessSet``.

A set is made from a list of global ranks (or an mpi4py communicator) and becomes usable once
it is registered, by ``init(process_sets=[...])`` or ``add_process_set``. Registering is
collective over all ranks, as in Horovod (where it needs ``HOROVOD_DYNAMIC_PROCESS_SETS=1``
after init; here it does not). Each registered set gets its own transport, split from the
backend's world (``mpi``: a communicator; ``torch``: a ``torch.distributed.new_group``), with
its own agreement channel, so its collectives never match another set's. Ranks in
``broadcast``'s ``root_rank`` stay global ranks, as in Horovod. A set made from an mpi4py
communicator needs MPI to run the job (not so under torchrun).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hpctrain import comm as mpicomm
from hpctrain.errors import UsageError
from hpctrain.sync.collective_check import Channel
from hpctrain.sync.errors import UsageTypeError, not_initialized
from hpctrain.sync.transport import Transport


@dataclass
class Member:
    """This rank's view of a registered set it belongs to."""

    transport: Transport
    channel: Channel


class ProcessSet:
    """A set of global ranks that run collectives together (Horovod's class and methods)."""

    def __init__(self, ranks_or_comm: Sequence[int] | Any):
        self.process_set_id: int | None = None
        self.ranks: list[int] | None = None
        self.mpi_comm: Any = None
        self._member: Member | None = None
        self._native: Any = None  # Horovod's ProcessSet under the horovod backend
        if type(ranks_or_comm).__module__.startswith("mpi4py"):
            self.mpi_comm = ranks_or_comm
        elif hasattr(ranks_or_comm, "__iter__"):
            ranks = sorted(ranks_or_comm)
            if any(not isinstance(r, int) or isinstance(r, bool) for r in ranks):
                raise UsageError(f"ProcessSet takes a list of integer ranks or an mpi4py "
                                 f"communicator, got {ranks_or_comm!r}")
            if len(set(ranks)) != len(ranks):
                raise UsageError(f"ProcessSet ranks must be distinct, got {ranks}")
            self.ranks = ranks
        else:
            raise UsageError(f"ProcessSet takes a list of integer ranks or an mpi4py "
                             f"communicator, got {type(ranks_or_comm).__name__}")

    def size(self) -> int | None:
        """Number of ranks in the set, or None while it is not registered."""
        if self._native is not None:
            return self._native.size()
        return None if self.process_set_id is None else len(self.ranks or [])

    def rank(self) -> int | None:
        """This process's rank within the set (None while not registered; ValueError outside)."""
        if self._native is not None:
            return self._native.rank()
        if self.process_set_id is None:
            return None
        if self._member is None:
            raise ValueError("Process is not part of provided process set.")
        return self._member.transport.rank()

    def included(self) -> bool | None:
        """Whether this process belongs to the set (None before its ranks are known)."""
        if self.ranks is None:
            return None
        return mpicomm_rank() in self.ranks

    def _invalidate(self) -> None:
        self.process_set_id, self._member, self._native = None, None, None

    def __str__(self) -> str:
        return (f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks}, "
                f"mpi_comm={self.mpi_comm})")

    __repr__ = __str__


global_process_set = ProcessSet([])
global_process_set.process_set_id = 0

_world: Transport | None = None
_world_mpi: Any = None  # an MPI communicator with the world's ranks, where MPI runs the job
_registered: dict[int, ProcessSet] = {}
_next_id = 1
_freed: list[int] = []  # ids of sets this rank removed, first removed first (used again)


def mpicomm_rank() -> int:
    """This process's global rank: the backend's world if running, else MPI's."""
    return _world.rank() if _world is not None else mpicomm.world().Get_rank()


def setup(world: Transport, process_sets: Sequence[ProcessSet] | None = None,
          world_mpi: Any = None) -> None:
    """Make ``world`` the global set and register ``process_sets`` (init, collective)."""
    global _world, _world_mpi, _next_id
    _world, _world_mpi = world, world_mpi
    global_process_set.ranks = list(range(world.size()))
    global_process_set._member = Member(world, Channel(world, "process set 0"))
    _registered.clear()
    _registered[0] = global_process_set
    _next_id = 1
    _freed.clear()
    for ps in process_sets or []:
        add(ps)


def teardown() -> None:
    """Free every set's transport except the world's (which the backend frees)."""
    global _world, _world_mpi
    for ps in list(_registered.values()):
        if ps is not global_process_set and ps._member is not None:
            ps._member.transport.free()
        if ps is not global_process_set:
            ps._invalidate()
    _registered.clear()
    global_process_set._member = None
    _world = _world_mpi = None


def _ranks_of_comm(comm: Any) -> list[int]:
    """Global ranks of ``comm``'s members, gathered so that every rank knows every set."""
    if _world_mpi is None:
        raise UsageError("add_process_set: a ProcessSet made from an mpi4py communicator needs "
                         "a job that MPI runs (not torchrun); give the ranks instead")
    MPI = mpicomm.mpi()
    mine: list[int] = []
    if comm != MPI.COMM_NULL:
        mine = list(comm.Get_group().Translate_ranks(list(range(comm.Get_size())),
                                                     _world_mpi.Get_group()))
    return mine


def add(process_set: ProcessSet | Sequence[int]) -> ProcessSet:
    """Register a set on every rank (collective over all ranks); return it."""
    global _next_id
    if _world is None:
        raise not_initialized("add_process_set")
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    if ps.ranks is None:  # from a communicator: this rank's set may differ from another's
        ps.ranks = _ranks_of_comm(ps.mpi_comm)
    n = _world.size()
    # With each rank's registered sets: a rank holds only the sets from communicators that
    # it is in, so a duplicate is found on all ranks or on none.
    gathered = _world.allgather_object((ps.ranks, [o.ranks for o in _registered.values()],
                                        list(_registered), _freed))
    everyone = [ranks for ranks, *_ in gathered]
    registered = {tuple(r) for _, sets, *_ in gathered for r in sets}
    # Every verdict below is taken from everyone's lists, so every rank raises alike.
    if any(r != ps.ranks for r in everyone) and ps.mpi_comm is None:
        raise UsageError(f"add_process_set: ranks disagree between processes: {everyone}")
    sets = sorted({tuple(r) for r in everyone if r})
    if ps.mpi_comm is not None and not all(everyone):  # MPI.COMM_NULL: not a member
        if len(sets) != 1:
            raise UsageError("add_process_set: ranks outside every set (MPI.COMM_NULL) among "
                             f"communicators of several sets {[list(s) for s in sets]}; give "
                             "each set's ranks instead")
        everyone = [list(sets[0])] * n  # the set of the ranks that hold the communicator
        ps.ranks = everyone[0]
    bad = next((r for r in everyone if not r or any(not 0 <= x < n for x in r)), None)
    if bad is not None:
        raise UsageError(f"add_process_set: ranks must be a non-empty subset of 0..{n - 1}, "
                         f"got {bad}")
    if any(ranks in registered for ranks in sets):
        raise ValueError(f"Attempted to add a duplicate process set: {ps}")
    # One split per distinct set, in a deterministic order, so the ids agree everywhere.
    ids = iter(_free_ids(gathered))
    for ranks in sets:
        sub = _world.split(list(ranks))
        pid = next(ids, None)
        if pid is None:
            pid, _next_id = _next_id, _next_id + 1
        elif pid in _freed:
            _freed.remove(pid)
        if tuple(ps.ranks) == ranks:
            ps.process_set_id = pid
            _registered[pid] = ps
            label = f"process set {pid}"
            ps._member = None if sub is None else Member(sub, Channel(sub, label, list(ranks)))
        elif sub is not None:
            sub.free()
    return ps


def _free_ids(gathered: list[tuple]) -> list[int]:
    """The ids of removed sets that no rank still holds, first removed first (as Horovod
    uses them again), from every rank's registered and removed ids: alike on every rank,
    though a rank holds only the sets from communicators that it is in."""
    in_use = {pid for *_, registered, _ in gathered for pid in registered}
    return list(dict.fromkeys(pid for *_, freed in gathered for pid in freed
                              if pid not in in_use))


def remove(process_set: ProcessSet) -> bool:
    """Unregister a set (every rank calls it); False for the global set or an unknown one."""
    if not isinstance(process_set, ProcessSet):
        raise UsageTypeError(f"remove_process_set: expected an hpctrain.sync.ProcessSet, got "
                             f"{type(process_set).__name__}")
    pid = process_set.process_set_id
    if pid is None or pid == 0 or _registered.get(pid) is not process_set:
        return False
    del _registered[pid]
    _freed.append(pid)
    if process_set._member is not None:
        process_set._member.transport.free()
    process_set._invalidate()
    return True


def member(process_set: ProcessSet | None, caller: str) -> Member:
    """This rank's transport and channel for ``process_set`` (None: the global set)."""
    ps = _registered_set(process_set, caller)
    if ps._member is None:
        raise UsageError(f"{caller}: rank {mpicomm_rank()} is not in process set "
                         f"{ps.process_set_id} (ranks {ps.ranks})")
    return ps._member


def included_member(process_set: ProcessSet | None, caller: str) -> Member | None:
    """:func:`member`, or None on a rank outside the set. An unregistered set is refused on
    every rank alike, whether it was made from ranks or from a communicator (whose ranks,
    and so ``included()``, are unknown until it is registered)."""
    ps = _registered_set(process_set, caller)
    return ps._member


def _registered_set(process_set: ProcessSet | None, caller: str) -> ProcessSet:
    """``process_set`` (None: the global set); UsageError unless it is registered."""
    ps = global_process_set if process_set is None else process_set
    if not isinstance(ps, ProcessSet):
        raise UsageError(f"{caller}: process_set must be an hpctrain.sync.ProcessSet, got "
                         f"{type(ps).__name__}")
    if ps.process_set_id is None or _registered.get(ps.process_set_id) is not ps:
        if _world is None:
            raise not_initialized(caller)
        raise UsageError(f"{caller}: {ps} is not registered; pass it to init(process_sets=...) "
                         "or add_process_set() first")
    return ps


def set_rank(process_set: ProcessSet | None, global_rank: int, caller: str) -> int:
    """``global_rank``'s rank within the set; UsageError when it is not a member."""
    ps = global_process_set if process_set is None else process_set
    ranks = ps.ranks or []
    if not isinstance(global_rank, int) or global_rank not in ranks:
        raise UsageError(f"{caller}: root_rank {global_rank!r} is not a rank of process set "
                         f"{ps.process_set_id} (ranks {ranks})")
    return ranks.index(global_rank)
