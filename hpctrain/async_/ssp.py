"""Bounded staleness (Stale Synchronous Parallel) for the asynchronous store: worker clocks in
an MPI window.

SSP (Ho et al., "More Effective Distributed ML via a Stale Synchronous Parallel Parameter
Server", NIPS 2013) sits between synchronous and asynchronous SGD. Each worker has a *clock*,
here the number of pushes it has made. Workers push without waiting for each other, as in
ASGD, except that a worker more than ``S`` (``max_staleness``) clocks ahead of the slowest
running worker waits before computing its next gradient. A straggler then only holds the
others back once they are ``S`` clocks ahead of it, and the staleness of every update is
bounded, where plain ASGD lets a fast worker's pushes pile up on a slow worker's gradient.

The loop (:class:`StalenessBound` is collective over the store's comm, servers included)::

    bound = StalenessBound(store, S)
    if store.is_worker:
        for x, y in batches:
            bound.wait()                 # block while clock - min(running clocks) > S
            opt.pull()                   # SSP's read (below); hpctrain's ssp skips it when
                                         # the model already holds what it must
            opt.zero_grad(); loss(model(x), y).backward(); opt.step()   # push
            bound.tick()                 # clock = pushes made
        bound.park()                     # stopped: hold nobody back
    store.finish(); bound.close(); store.close()

``tick`` comes after the push, so the clock a worker publishes is exactly the number of its
pushes whose counter increment (:meth:`ParameterStore.push`'s ``Fetch_and_op``) is done.

Guarantee in clocks: when a running worker with clock ``c`` leaves :meth:`wait` to compute
its ``(c+1)``-th gradient, every running worker's clock is at least ``c - S``.

SSP's read guarantee (Ho et al.): that gradient is computed at a model holding every running
worker's first ``c - S`` pushes. Counted is not read: the model a worker's ``c``-th push left
it holds only the pushes counted when it left its previous wait, so it reads the store after
the wait (:meth:`ASGDOptimizer.pull <hpctrain.async_.optim.ASGD.pull>`: the model, ``w_bak``
and the staleness baseline). hpctrain's ``ssp`` (``SSP._wait``) reads only when that model
falls short: when the previous wait read a slowest clock below ``c - S`` (a wait that slept,
or one left at the full lead S; with ``S = 0`` every step, with S large never). Without the
read, 4 workers at ``S = 0`` measured a staleness of 6 = 2(M - 1); with it, at most M - 1.

Bound in updates (the ``tau`` of :class:`~hpctrain.async_.store.Push`, M workers), with the
read: the model holds every other worker q's first ``c - S`` pushes, and q's pushes numbered
``c + S + 2`` on wait for this worker's ``(c+1)``-th (see (2) below), so at most ``2S + 1`` of
q's pushes fall between the read and the push::

    tau <= (2 S + 1) (M - 1)        (the first push: (S + 1) (M - 1))

tight with M = 2 when q is exactly S behind at the read and makes 2S + 1 pushes while this
worker computes. ``S = 0``: M - 1, one push per other worker.

Without the read (the bare loop above minus ``pull``), a push's
tau counts the other workers' pushes between this worker's previous push and this one
(``locked``: on the shard that took the most of them; the argument holds shard by shard). Take
worker p's ``(c+1)``-th push and another worker q. (1) Before its ``c``-th push p waited, with
clock ``c-1``, until q's clock was ``>= c-1-S``; q ticks after its push is counted, so q's
first ``c-1-S`` pushes come before p's ``c``-th and only q's pushes number ``c-S`` on can fall
in between. (2) q's ``(k+1)``-th push waited, with clock ``k``, until ``k - clock(p) <= S``,
and p's clock stays ``<= c`` until after its ``(c+1)``-th push, so q's pushes in between are
numbered at most ``c+S+1``. That is at most ``2S+2`` pushes per other worker::

    tau <= 2 (S + 1) (M - 1)        (the first push: (S + 1) (M - 1))

It is tight: with M = 2, q has made ``c-1-S`` pushes when p makes its ``c``-th; p waits for
q's ``(c-S)``-th, and q makes ``2S+1`` more while p computes. Both steps assume the workers
are running (not parked) in between; a worker that parks for good pushes no more, so it does
not break the bound, but a push whose interval spans a park and unpark (a checkpoint) is not
bounded by it.

``S = 0``: workers take turns in rounds. Leaving :meth:`wait` with clock ``c`` needs every
running worker's clock ``>= c``, i.e. its ``c``-th push counted, so in update order every
worker's ``c``-th push comes before any ``(c+1)``-th (one push per worker per round; the order
inside a round is free, hence tau <= 2(M-1) without the read, M-1 with it or when the
order repeats). In general every ``(c+1)``-th push comes after every running worker's
``(c-S)``-th. ``S`` large (at least the
run's pushes) never waits and behaves like ASGD, at one small read per step.

Parking: a worker that waits at a checkpoint barrier, or has stopped (its budget reached), must
not hold the others back, or a worker ``S`` ahead of it would wait for it forever while it
waits for that worker at the barrier. :meth:`park` adds ``PARKED`` (2**62) to its slot, which
takes it out of the minimum; :meth:`unpark` writes its real clock back. A worker whose every
peer is parked never waits.

Windows: one window of one int64 per worker, hosted on ``store.hosts[0]`` (where the store's
update counter lives), so a dedicated server rank serves it in :meth:`ParameterStore.finish`'s
progress loop. Only a worker writes its own slot, with ``Accumulate(REPLACE)`` under a shared
lock; readers take all slots with one ``Get_accumulate(NO_OP)``: atomic per slot against the
writes (one op and NO_OP, as MPI's default ``accumulate_ops`` asks), so a read never sees a
torn clock. Where the store's windows are shared memory this one is too, and the slots are
written and read with CPU atomics (:mod:`hpctrain.async_.shm`): no MPI call, so no wait for
the host's progress on MPICH or Intel MPI.
"""

from __future__ import annotations

import operator
import time

import numpy as np

from hpctrain import comm as hcomm
from hpctrain import watchdog
from hpctrain.async_ import shm
from hpctrain.async_.store import ParameterStore
from hpctrain.errors import UsageError

PARKED = 2 ** 62  # added to a parked worker's slot: no clock reaches it


class StalenessBound:
    """Every worker's clock in an RMA window; a worker ``max_staleness`` clocks ahead of the
    slowest running worker waits in :meth:`wait`. Collective over ``store.comm`` to create and
    to :meth:`close` (servers take part in those two only).

    ``poll_interval``: seconds slept between reads of the clocks while waiting.
    """

    def __init__(self, store: ParameterStore, max_staleness: int, poll_interval: float = 1e-4,
                 patient: bool = False):
        try:
            max_staleness = operator.index(max_staleness)
        except TypeError:
            raise UsageError(f"max_staleness must be an integer, got {max_staleness!r}") from None
        if max_staleness < 0:
            raise UsageError(f"max_staleness={max_staleness}: need max_staleness >= 0")
        if not poll_interval >= 0:
            raise UsageError(f"poll_interval={poll_interval}: need poll_interval >= 0")
        MPI = hcomm.mpi()
        self.store, self.max_staleness, self.poll_interval = store, max_staleness, poll_interval
        self.num_workers, self.is_worker = store.num_workers, store.is_worker
        self.host = store.hosts[0]
        # This worker's slot (workers are ranks 0..W-1); a server has none.
        self._slot: int | None = store.rank if store.is_worker else None
        size = 8 * self.num_workers if store.rank == self.host else 0
        self.shared = store.shared
        allocate = MPI.Win.Allocate_shared if self.shared else MPI.Win.Allocate
        self._win = allocate(size, 8, comm=store.comm)
        if store.rank == self.host:
            self._win.Lock(self.host, MPI.LOCK_EXCLUSIVE)
            np.frombuffer(self._win, dtype=np.int64)[:] = 0
            self._win.Unlock(self.host)
        # Shared memory: slot 0's address in this process.
        self._base = self._win.Shared_query(self.host)[0].address if self.shared else 0
        store.comm.Barrier()  # every clock is 0 before anyone reads one
        self._start(patient)

    def _start(self, patient: bool) -> None:
        """This worker's clock, statistics and buffers at the start (also the simulator's)."""
        self._clocks = np.zeros(self.num_workers, np.int64)  # the last read of all slots
        self._value = np.zeros(1, np.int64)  # what this worker publishes
        self._none = np.zeros(1, np.int64)  # NO_OP's ignored origin
        self._clock = 0
        self._parked = False
        self.waits = 0  # wait() calls that slept
        self.wait_s = 0.0  # seconds slept in wait()
        self.max_gap = 0  # largest clock - min(running clocks) when wait() returned
        self.last_gap = 0  # the same, at the latest wait()
        # The stall watchdog's allowance while waiting for the slowest worker: its first
        # step here (and with ``patient``, the workers compiling: --compile, any step) may
        # take minutes, so a wait then has watchdog.BUSY_S; else --stall-timeout, a frozen
        # worker. ``_floor``: the slowest clock this process first read.
        self.patient = patient
        self._floor: int | None = None

    @property
    def clock(self) -> int:
        """This worker's clock: its pushes so far (as ticked)."""
        return self._clock

    @property
    def parked(self) -> bool:
        return self._parked

    def clocks(self) -> list[int | None]:
        """Every worker's published clock (None: parked); one passive-target read."""
        self._read()
        return [None if c >= PARKED else int(c) for c in self._clocks]

    def wait(self) -> float:
        """Block until this worker's clock minus the slowest running worker's is ``<= S``;
        return the seconds waited (0.0 when the first read allowed it)."""
        self._check("wait")
        if self._parked:
            raise RuntimeError("StalenessBound.wait() on a parked worker: unpark() first")
        start = seen = None
        # A wait for the others: a frozen slowest worker's own watchdog speaks first.
        with watchdog.waiting_for_others("the staleness bound's wait for the slowest worker"):
            while True:
                slowest = self._slowest()
                floor = self._floor = slowest if self._floor is None else self._floor
                gap = self._clock - slowest
                if gap <= self.max_staleness:
                    break
                if start is None:
                    start = time.perf_counter()
                    self.waits += 1
                if slowest != seen:  # the job makes progress while the slowest worker steps;
                    seen = slowest   # a frozen one ends it after the allowance (beating
                    watchdog.beat("ssp wait", self._clock,  # every poll, nothing ever did)
                                  compiling=self.patient or slowest <= floor)
                time.sleep(self.poll_interval)
        waited = 0.0 if start is None else time.perf_counter() - start
        self.wait_s += waited
        self.last_gap = gap
        self.max_gap = max(self.max_gap, gap)
        return waited

    def tick(self) -> None:
        """Count one push: clock += 1, published. Call it after the push."""
        self._check("tick")
        self._clock += 1
        self._publish()

    def park(self) -> None:
        """Leave the minimum (waiting at a barrier, or stopped): nobody waits for this worker."""
        self._check("park")
        self._parked = True
        self._publish()

    def unpark(self) -> None:
        """Rejoin the minimum with the real clock.

        Unpark once every worker has parked at the barrier (after it, not before: a worker
        unparked while others still step towards the barrier holds them back, a deadlock with
        S small) and let nobody step before all have unparked (e.g. a second barrier), or a
        fast worker may pass a peer that is still parked.
        """
        self._check("unpark")
        self._parked = False
        self._publish()

    def summary(self) -> dict:
        """This worker's waiting, for run summaries."""
        return {"ssp_waits": self.waits, "ssp_wait_s": self.wait_s, "ssp_max_gap": self.max_gap}

    def state_dict(self) -> dict:
        return {"clock": self._clock, "waits": self.waits, "wait_s": self.wait_s,
                "max_gap": self.max_gap}

    def load_state_dict(self, state: dict) -> None:
        """Restore the clock and the statistics, and publish the clock (parked or not, as now).

        No collective, but every worker must load before any worker's next :meth:`wait`: one
        that waits earlier sees the others' clocks still at 0 and waits for their loads (a
        deadlock if they are in a collective with it first). Load, then a barrier, then step.
        """
        self._check("load_state_dict")
        self._clock = int(state["clock"])
        self.waits, self.wait_s = int(state["waits"]), float(state["wait_s"])
        self.max_gap = int(state["max_gap"])
        self._publish()

    def close(self) -> None:
        """Collective over ``store.comm``: free the window. After :meth:`ParameterStore.finish`
        (a dedicated server leaves that only when every worker is done)."""
        if self._win is not None:
            self._win.Free()
            self._win = None

    def _check(self, what: str) -> None:
        if not self.is_worker:
            raise RuntimeError(f"rank {self.store.rank} is a server of this store; only "
                               f"workers call StalenessBound.{what}()")
        if self._win is None:
            raise RuntimeError(f"StalenessBound.{what}() after close()")

    def _read(self) -> None:
        """All slots into ``_clocks``: shared lock, ``Get_accumulate(NO_OP)``, unlock."""
        if self.shared:
            shm.load(self._base, self._clocks)
            return
        MPI = hcomm.mpi()
        self._win.Lock(self.host, MPI.LOCK_SHARED)
        self._win.Get_accumulate([self._none, 0, MPI.INT64_T],
                                 [self._clocks, MPI.INT64_T], self.host,
                                 target=(0, self.num_workers, MPI.INT64_T), op=MPI.NO_OP)
        self._win.Unlock(self.host)

    def _slowest(self) -> int:
        """The smallest clock among running workers (this one, unparked, is among them)."""
        self._read()
        running = self._clocks[self._clocks < PARKED]
        return min(self._clock, int(running.min())) if running.size else self._clock

    def _publish(self) -> None:
        """Write this worker's clock (plus ``PARKED`` when parked) into its slot."""
        assert self._slot is not None, "only workers publish (_check)"
        self._value[0] = self._clock + (PARKED if self._parked else 0)
        if self.shared:
            shm.store(self._base + 8 * self._slot, int(self._value[0]))
            return
        MPI = hcomm.mpi()
        self._win.Lock(self.host, MPI.LOCK_SHARED)
        self._win.Accumulate([self._value, MPI.INT64_T], self.host,
                             target=(self._slot, 1, MPI.INT64_T), op=MPI.REPLACE)
        self._win.Unlock(self.host)
