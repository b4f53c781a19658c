"""The parameter store and the SSP clocks for virtual workers: in-process stand-ins with the
real ones' interface and update code.

:class:`LocalStore` is a :class:`~hpctrain.async_.store.ParameterStore` whose "windows" are
slices of one shared tensor: reading a shard is a copy out, writing it a copy in, an
accumulate an add, a lock nothing at all (one virtual worker runs at a time). Everything
else is the real store's: :meth:`push` is ``ParameterStore.push``, which runs the staged path
(``_push_locked`` / ``_push_atomic``) and so the same fused kernel calls
(:mod:`hpctrain.kernels`) on each worker's own ``w_bak``, mean squares and velocity, with the
same shard order per worker, the same shard counts, the same staleness (``locked``: from the
shard counts; ``atomic``: ``index - seen``; equal here, as no push runs alongside another)
and the same traffic counters (as if across nodes: no shared memory). What the simulation
adds is time: a push or pull waits for its turn in the event queue (pushes are applied in
the order workers finish their steps, ties by worker id) and then costs virtual time from
the network model (:mod:`hpctrain.sim.network`). A push's values are applied whole at its
start; its time runs shard by shard in its rotated order, and (locked) each shard's request
is an event of its own, made when the push gets there, so requests reach each shard's lock
in virtual-time order and wait for the hold at that moment only, as real locks are granted.
So the order of updates on a shard is the push order, which differs from the order the
locks were held in by at most the pushes that overlap; staleness counts the push order.
With ``--comm-time replay`` a push instead takes the rest its replayed real step recorded
(:mod:`hpctrain.steptimes`), which holds that push's lock waits already, and every other
store operation takes no time.

:class:`LocalBound` is a :class:`~hpctrain.async_.ssp.StalenessBound` whose clock window is
an array: its ``wait`` is the real one, and where the real one would sleep and poll, the
worker blocks in virtual time until another worker publishes a clock.
"""

from __future__ import annotations

import numpy as np
import torch

from hpctrain import options
from hpctrain.async_.ssp import PARKED, StalenessBound
from hpctrain.async_.store import _COUNT, ParameterStore, default_shards, shard_bounds
from hpctrain.errors import UsageError
from hpctrain.sim.network import Network
from hpctrain.sim.scheduler import Scheduler
from hpctrain.sim.steptime import StepTimeModel


class SharedStore:
    """What the virtual workers' stores share: the model's values, per-shard update counts
    and lock release times, the update and ticket counters, scratch buffers."""

    def __init__(self, values: torch.Tensor, workers: int, *, shards: int | None = None,
                 servers: int = 0):
        numel = values.numel()
        hosts = servers or workers
        if shards is None and default_shards(workers, hosts) > numel:  # a shard per host
            flag = f"--servers {options.shown(servers)}" if servers else f"--workers {workers}"
            raise UsageError(f"{flag}: more hosts of the store than the model's {numel} "
                             "parameters to shard among them")
        shards = default_shards(workers, hosts) if shards is None else shards
        if not 1 <= shards <= numel:
            raise UsageError(f"shards={shards}: need 1 <= shards <= {numel} (the model's size)")
        self.values = values.detach().to("cpu", torch.float32).clone()
        self.bounds = shard_bounds(numel, shards)
        self.counts = [0] * shards
        self.free_at = [0.0] * shards  # when each shard's exclusive lock is next free
        self.counters = [0, 0]  # updates, tickets
        self.workers = workers
        # One worker runs at a time and a push never yields in the middle: shared scratch.
        self.cur = torch.empty(numel)
        self.delta = torch.zeros(numel)
        self.clocks = np.zeros(workers, np.int64)  # SSP's clock window
        self.clock_waiters: set[int] = set()


class LocalStore(ParameterStore):
    """Virtual worker ``rank``'s view of the shared store (see the module docstring)."""

    def __init__(self, shared: SharedStore, rank: int, *, consistency: str,
                 scheduler: Scheduler, network: Network, rests: StepTimeModel | None = None):
        numel = shared.values.numel()
        workers = shared.workers
        self.state, self.scheduler, self.network = shared, scheduler, network
        self.rests = rests  # --comm-time replay: the recorded rests, in place of the network
        self.comm, self.rank, self.numel = None, rank, numel
        self.consistency, self.poll_interval = consistency, 0.0
        self.num_workers, self.is_worker, self.is_host = workers, True, False
        self.hosts = [0]
        self.bounds = shared.bounds
        self.owners = [0] * len(self.bounds)
        self.windows = [None] * self.shards  # no MPI windows (close() empties the list)
        self.worker_comm = None
        self.shared = False  # no shared-memory windows: ParameterStore.push stages
        self.in_place = False  # the staged path: read, kernel, write back
        first = (rank * self.shards) // workers
        self.order = tuple((first + i) % self.shards for i in range(self.shards))
        self._cur, self._delta = shared.cur, shared.delta
        self._device = None
        self._mapped = []
        self._seen = 0
        self._model_counts = [0] * self.shards
        self.bytes_read = self.bytes_written = self.mpi_bytes = 0
        k, h = numel, _COUNT * self.shards
        if consistency == "locked":  # as ParameterStore counts it without shared memory
            self._push_traffic = (4 * k + h, 4 * k + h, 8 * k + 2 * h)
        else:
            self._push_traffic = (4 * k, 4 * k + h, 8 * k + h)
        self._fetches = 0

    # ---- time ----------------------------------------------------------------------------------

    def _turn(self) -> float:
        """Wait for this worker's turn at its current virtual time; return that time."""
        k = self.rank
        self.scheduler.at(k, self.scheduler.now[k])
        return self.scheduler.now[k]

    def _counter_time(self) -> None:
        if self.rests is None:
            self.scheduler.now[self.rank] += self.network.store_latency

    def _shard_time(self, t: float, s: int, accesses: int, exclusive: bool) -> float:
        """When ``accesses`` to shard ``s``, requested at ``t``, end: after the exclusive lock
        that holds the shard at ``t``, if any; an exclusive access then holds it itself.

        Locked, each request is an event of its own: a push or pull asks for a shard when it
        gets there in virtual time, not when it was applied, so requests reach each lock in
        time order and ``free_at`` (the end of the latest hold) is that of the hold at ``t``.
        (Booked all at the push's start, a push's later shards held off pushes that came for
        them while they were free.) Atomic, nothing is exclusive and nothing waits."""
        if self.consistency == "locked":
            self.scheduler.at(self.rank, t)
        lo, hi = self.bounds[s]
        t = max(t, self.state.free_at[s]) + accesses * self.network.shard(4 * (hi - lo))
        if exclusive:
            self.state.free_at[s] = t
        return t

    # ---- ParameterStore's interface --------------------------------------------------------------

    def push(self, w_bak, g, ms=None, v=None, **hyper):
        t = self._turn()
        self._fetches = 0
        result = super().push(w_bak, g, ms, v, **hyper)
        if self.rests is not None:
            self.scheduler.now[self.rank] = t + self.rests.rest(self.rank)
            return result
        locked = self.consistency == "locked"
        for s in self.order:  # read and write (or accumulate) each shard
            t = self._shard_time(t, s, 2, exclusive=locked)
        self.scheduler.now[self.rank] = t + self._fetches * self.network.store_latency
        return result

    def pull(self, out: torch.Tensor) -> int:
        self._check_buffer("out", out)
        t = self._turn()
        seen = self.state.counters[0]
        out.copy_(self.state.values.to(out.device))
        if self.rests is None:
            for s in self.order:
                t = self._shard_time(t, s, 1, exclusive=False)
            self.scheduler.now[self.rank] = t + self.network.store_latency
        # The model and the update counter, and locked the shard counts, as a real pull reads.
        read = 4 * self.numel + 8
        if self.consistency == "locked":
            self._model_counts = list(self.state.counts)
            read += _COUNT * self.shards
        self.bytes_read += read
        self.mpi_bytes += read
        self._seen = seen
        return seen

    def updates(self) -> int:
        self._turn()
        value = self._fetch_add(0)
        self._counter_time()
        return value

    def claim(self) -> int:
        self._turn()
        value = self._fetch_add(1, slot=1)
        self._counter_time()
        return value

    def shard_updates(self) -> list[int]:
        return list(self.state.counts)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.windows = []

    # ---- the "windows": copies of the shared tensor ----------------------------------------------

    def _lock(self, s: int, exclusive: bool) -> None:
        pass

    def _unlock(self, s: int, exclusive: bool) -> None:
        pass

    def _read_shard(self, s: int, host: torch.Tensor, count: bool = False) -> int:
        lo, hi = self.bounds[s]
        host.copy_(self.state.values[lo:hi])
        return self.state.counts[s] if count else 0

    def _write(self, s: int, count: int, values: torch.Tensor) -> None:
        lo, hi = self.bounds[s]
        self.state.values[lo:hi].copy_(values)
        self.state.counts[s] = count

    def _accumulate(self, s: int, delta: torch.Tensor) -> None:
        lo, hi = self.bounds[s]
        self.state.values[lo:hi].add_(delta)
        self.state.counts[s] += 1

    def _fetch_add(self, value: int, slot: int = 0) -> int:
        before = self.state.counters[slot]
        self.state.counters[slot] = before + value
        self._fetches += 1
        self.bytes_read += 8
        self.bytes_written += 8 if value else 0
        self.mpi_bytes += 16 if value else 8
        return before


class LocalBound(StalenessBound):
    """SSP's bound for virtual worker ``store.rank`` (see the module docstring)."""

    store: LocalStore

    def __init__(self, store: LocalStore, max_staleness: int):
        if isinstance(max_staleness, bool) or not isinstance(max_staleness, int) \
                or max_staleness < 0:
            raise UsageError(f"max_staleness={max_staleness!r}: need an integer >= 0")
        self.store, self.max_staleness, self.poll_interval = store, max_staleness, 0.0
        self.num_workers, self.is_worker = store.num_workers, True
        self.host, self._slot = 0, store.rank
        self._win = store.state  # "open" (the base class checks it is not None)
        self._start(patient=False)  # no watchdog runs in the simulator

    def wait(self) -> float:
        """The real wait; the seconds it reports (and adds up) are virtual ones."""
        sched, k = self.store.scheduler, self.store.rank
        start, before = sched.now[k], self.wait_s
        super().wait()
        waited = sched.now[k] - start
        self.wait_s = before + waited
        return waited

    def _read(self) -> None:
        self.store._turn()
        self._clocks[:] = self.store.state.clocks

    def _slowest(self) -> int:
        slowest = super()._slowest()
        if self._clock - slowest > self.max_staleness:
            # Where the real bound sleeps and polls: wait for the next published clock.
            self.store.state.clock_waiters.add(self.store.rank)  # its slot
            self.store.scheduler.block(self.store.rank)
        return slowest

    def _publish(self) -> None:
        state, sched, k = self.store.state, self.store.scheduler, self.store.rank
        self.store._turn()
        state.clocks[self._slot] = self._clock + (PARKED if self._parked else 0)
        for j in sorted(state.clock_waiters):
            sched.wake(j, sched.now[k])
        state.clock_waiters.clear()

    def close(self) -> None:
        self._win = None
