"""How long communication takes in a simulation: latency-bandwidth (alpha-beta) models.

A message of ``n`` bytes between two workers takes ``latency + n / bandwidth``. Collectives
use the bandwidth-optimal algorithms MPI libraries pick for large messages, on K workers:

- allreduce (ssgd's gradients, ma's parameters): ring, ``2 (K-1) (latency + n / K / bw)``;
- allgather and reduce-scatter (ec's ensemble exchange): ring, ``(K-1) (latency + n / K / bw)``
  with ``n`` the bytes of all K blocks together;
- broadcast: binomial tree, ``ceil(log2 K) (latency + n / bw)``;
- a barrier, and the small object collectives of set-up and statistics: ``ceil(log2 K)
  latency``.

The parameter store (asgd, dcasgd-c/-a, ssp) has its own pair, ``store_latency`` and
``store_bandwidth``: one shard access (a read, or a write) takes ``store_latency +
shard_bytes / store_bandwidth``. A locked push holds each shard's exclusive lock for a read
and a write, taking the shards one after another; a worker asking for a shard waits for
the push that holds it then, if any (:mod:`hpctrain.sim.store`). An atomic push reads and
accumulates each shard without an exclusive lock; a pull reads every shard, after the hold
on it at that moment; counters (tickets, the update count) cost one ``store_latency``.

The defaults are fitted to this project's development VM (docs/BENCHMARKS.md, "Simulator"):
``hpctrain bench allreduce`` on 2 ranks for latency and bandwidth, ``hpctrain bench store``
(locked, shards spread, shared memory) for the store's pair. Measure your own cluster with the
same two benchmarks and pass the four numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Fitted on the development VM (see docs/BENCHMARKS.md, "Simulator: network defaults").
LATENCY_S = 50e-6
BANDWIDTH = 4.0e9
STORE_LATENCY_S = 50e-6
STORE_BANDWIDTH = 4.0e9


@dataclass(frozen=True)
class Network:
    """Latency (seconds) and bandwidth (bytes/s) between workers, and to the store."""

    latency: float = LATENCY_S
    bandwidth: float = BANDWIDTH
    store_latency: float = STORE_LATENCY_S
    store_bandwidth: float = STORE_BANDWIDTH

    def message(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth

    def allreduce(self, nbytes: float, workers: int) -> float:
        """Ring allreduce of ``nbytes`` per worker."""
        if workers <= 1:
            return 0.0
        return 2 * (workers - 1) * self.message(nbytes / workers)

    def ring(self, total_bytes: float, workers: int) -> float:
        """Ring allgather or reduce-scatter of ``total_bytes`` (all blocks together)."""
        if workers <= 1:
            return 0.0
        return (workers - 1) * self.message(total_bytes / workers)

    def broadcast(self, nbytes: float, workers: int) -> float:
        return _log2(workers) * self.message(nbytes)

    def barrier(self, workers: int) -> float:
        return _log2(workers) * self.latency

    def shard(self, nbytes: float) -> float:
        """One read or write of ``nbytes`` of a shard in the store."""
        return self.store_latency + nbytes / self.store_bandwidth

    def describe(self) -> dict:
        return asdict(self)


def _log2(workers: int) -> int:
    return math.ceil(math.log2(workers)) if workers > 1 else 0
