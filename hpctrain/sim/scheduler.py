"""Virtual time for K workers in one process: a clock per worker and an event queue.

Every virtual worker runs the real training loop in a thread of its own, but only one thread
runs at a time: the one whose next event is the earliest. A worker computes on its own state
(its model, its optimizer, its batch) freely; before it touches anything shared (the store,
a collective, the staleness clocks) it calls :meth:`Scheduler.at` with the virtual time of
that access, which queues it as an event and hands the thread over to the worker with the
earliest event, ties broken by worker id. So events are applied strictly in (time, worker)
order, never one before an earlier one, and the run is deterministic: which thread the
operating system would like to run never matters.

Each worker draws from a torch random stream of its own (:class:`WorkerStreams`), as each
real rank draws from its own process's: the process's one generator is swapped to the
worker's at each hand-over, so a worker's dropout masks never depend on when the others ran.

A worker waiting for others (a collective that not all have reached, an SSP bound) is
:meth:`block`-ed outside the queue until another worker :meth:`wake`-s it at a time. When no
event is left while some worker still waits, the simulation is stuck (a real run would hang):
it stops with an error instead. An exception in any worker stops every worker, and
:meth:`run` raises the first one.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable

import torch


class Aborted(Exception):
    """This worker stops because another worker failed."""


class SimulationStuck(RuntimeError):
    """Every remaining worker waits for something no worker will ever do."""


class WorkerStreams:
    """Every virtual worker's torch random state: the CPU generator's, and ``device``'s where
    it is a GPU (what a model's dropout draws from). Each starts from the process's state at
    construction, the state a real rank has there (after the same seeding and the same
    draws). Python's and numpy's generators, which no real rank seeds, stay shared."""

    def __init__(self, workers: int, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self._cuda = device if device.type == "cuda" else None
        self._states = [self._current()] * workers

    def _current(self) -> tuple:
        return (torch.get_rng_state(),
                torch.cuda.get_rng_state(self._cuda) if self._cuda is not None else None)

    def enter(self, k: int) -> None:
        """Worker ``k`` runs from here: the process draws from its stream."""
        cpu, cuda = self._states[k]
        torch.set_rng_state(cpu)
        if self._cuda is not None:  # then _current took its state
            torch.cuda.set_rng_state(cuda, self._cuda)

    def leave(self, k: int) -> None:
        """Worker ``k`` hands over: keep where its stream is."""
        self._states[k] = self._current()


class Scheduler:
    """Per-worker virtual clocks (``now``, seconds) and the queue of their next events."""

    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError(f"workers={workers}: need at least one")
        self.workers = workers
        self.now = [0.0] * workers
        self._queue: list[tuple[float, int]] = []
        self._go = [threading.Semaphore(0) for _ in range(workers)]
        self._lock = threading.Lock()  # guards the error and the exits only
        self._running = set(range(workers))
        self._error: BaseException | None = None
        self._streams: WorkerStreams | None = None

    def run(self, body: Callable[[int], object], streams: WorkerStreams | None = None) -> list:
        """Run ``body(k)`` for every worker k, each in its thread, in virtual-time order;
        return their results (raise the first worker's exception, if any). ``streams``: each
        worker's own random state, swapped in whenever it runs (None: one shared stream)."""
        results: list = [None] * self.workers
        self._streams = streams

        def main(k: int) -> None:
            try:
                self._wait_turn(k)
                results[k] = body(k)
            except Aborted:
                pass
            except BaseException as e:  # noqa: BLE001 (handed to the caller of run)
                with self._lock:
                    if self._error is None:
                        self._error = e
            finally:
                self._exit(k)

        threads = [threading.Thread(target=main, args=(k,), name=f"sim-worker-{k}",
                                    daemon=True) for k in range(self.workers)]
        for t in threads:
            t.start()
        self._queue = [(0.0, k) for k in range(self.workers)]
        heapq.heapify(self._queue)
        self._hand_over()
        for t in threads:
            t.join()
        if self._error is not None:
            raise self._error
        return results

    # ---- called by the running worker --------------------------------------------------------

    def at(self, k: int, t: float) -> None:
        """Worker ``k``'s next shared access happens at virtual time ``t`` (never earlier than
        its clock): return when it is the earliest event."""
        self.now[k] = max(self.now[k], t)
        heapq.heappush(self._queue, (self.now[k], k))
        self._switch(k)

    def block(self, k: int) -> None:
        """Worker ``k`` waits until another worker calls :meth:`wake` for it."""
        self._switch(k)

    def wake(self, k: int, t: float) -> None:
        """Let waiting worker ``k`` continue at virtual time ``t`` (or its clock if later).
        The running worker may wake itself: it then continues when its turn comes."""
        self.now[k] = max(self.now[k], t)
        heapq.heappush(self._queue, (self.now[k], k))

    # ---- internals ---------------------------------------------------------------------------

    def _switch(self, k: int) -> None:
        if self._error is not None:
            raise Aborted
        if self._queue and self._queue[0][1] == k:  # still the earliest: no hand-over
            heapq.heappop(self._queue)
            return
        if self._streams is not None:
            self._streams.leave(k)
        self._hand_over()
        self._wait_turn(k)

    def _wait_turn(self, k: int) -> None:
        self._go[k].acquire()
        if self._error is not None:
            raise Aborted
        if self._streams is not None:
            self._streams.enter(k)

    def _hand_over(self) -> None:
        """Start the worker with the earliest event (or stop everyone when none is left)."""
        if self._queue:
            _, nxt = heapq.heappop(self._queue)
            self._go[nxt].release()
            return
        with self._lock:
            if self._running and self._error is None:
                self._error = SimulationStuck(
                    f"simulation stuck: workers {sorted(self._running)} wait for each other "
                    "(a collective some worker never reaches, or a bound nobody can meet)")
            self._release_all()

    def _exit(self, k: int) -> None:
        with self._lock:
            self._running.discard(k)
            failed = self._error is not None
            if failed:
                self._release_all()
        if not failed and self._running:
            self._hand_over()

    def _release_all(self) -> None:
        for k in self._running:
            self._go[k].release()
