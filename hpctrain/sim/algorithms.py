"""The registry's algorithms, connected to in-process stand-ins instead of MPI.

Each simulated algorithm is the real class with a small mixin in front that changes only how
it is connected (:func:`simulated`):

- asgd, dcasgd-c, dcasgd-a, ssp: :meth:`connect` builds a
  :class:`~hpctrain.sim.store.LocalStore` (and ssp's :class:`~hpctrain.sim.store.LocalBound`)
  on the simulation's shared store instead of the RMA one; every other hook, the optimizers
  (:mod:`hpctrain.async_.optim`) and the kernel are the real ones.
- ssgd: ``hpctrain.sync`` holds one backend per process (as Horovod does), so K virtual ranks
  cannot each start one. The mixin keeps the algorithm's guard, apply and summary and
  replaces ``DistributedOptimizer``'s bucketed allreduce with one allreduce of the flat
  gradient through the local communicator, scaled as the mpi backend scales it
  (:func:`hpctrain.sync.buckets.scale_factors`: 1/K before the sum, summed as
  :class:`hpctrain.sim.comm.LocalComm` sums). With ``--reduce-op adasum`` each virtual worker
  steps on its own gradient and the changes are combined by ``LocalComm.Adasum``
  (:func:`hpctrain.sync.adasum.tree`), as ``DistributedOptimizer(op=Adasum)`` does.
- ma, ec: the real aggregators on the local communicator, unchanged; only their statistics
  record virtual seconds (:class:`VirtualAggregationStats`).
- sgd: unchanged (one worker, no communicator).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, cast

import torch

from hpctrain.algorithm import Algorithm, Comm, Setup
from hpctrain.async_.algorithm import ASGD, SSP
from hpctrain.async_.optim import trainable
from hpctrain.ec.algorithm import ModelAveraging
from hpctrain.ec.stats import AggregationStats
from hpctrain.sim.comm import LocalComm
from hpctrain.sim.store import LocalBound, LocalStore
from hpctrain.sync.algorithm import Synchronous
from hpctrain.sync.buckets import scale_factors
from hpctrain.sync.collectives import Average

if TYPE_CHECKING:  # what each mixin goes in front of (simulated()), for the checker's sake
    _StoreBase = ASGD
    _SyncBase = Synchronous
    _AggregationBase = ModelAveraging
else:
    _StoreBase = _SyncBase = _AggregationBase = object


class _Store(_StoreBase):
    """asgd family: the shared in-process store instead of RMA windows."""

    def connect(self, world: Comm, model: torch.nn.Module) -> Comm | None:
        world = cast(LocalComm, world)  # simulate() connects every worker to its LocalComm
        values = torch.cat([p.detach().reshape(-1) for p in trainable(model)])
        sim = world.group.simulation
        self.store = LocalStore(sim.shared_store(values, self.options), world.Get_rank(),
                                consistency=self.options.consistency,
                                scheduler=sim.scheduler, network=sim.network,
                                rests=sim.step_times if sim.sim.comm_time == "replay" else None)
        if isinstance(self, SSP):
            self.bound = LocalBound(self.store, self.options.max_staleness)
        return world


class _Sync(_SyncBase):
    """ssgd: the gradient averaged through the local communicator (see the module docstring)."""

    comm: LocalComm  # set by setup(), as Algorithm.setup's torch optimizer is
    optimizer: torch.optim.Optimizer

    def connect(self, world, model):
        return world

    def label(self) -> str:
        return f"{self.name} (adasum)" if self.adasum else self.name  # no backend: the real's

    def setup(self, s: Setup) -> None:
        Algorithm.setup(self, s)  # torch's SGD; the virtual workers start from one model
        self.comm = cast(LocalComm, s.comm)  # the simulated worker's
        self.params = [p for p in s.model.parameters() if p.requires_grad]
        self.scale = scale_factors(Average, 1.0, s.workers, False)

    def synchronize(self) -> None:
        if self.adasum:  # the gradients stay local; apply() combines the updates
            return
        pre, post = self.scale
        # A missing gradient is zeros, as the mpi backend packs it; a sparse one (an
        # embedding's) is reduced dense here: the same sum, not the backend's allgather.
        grads = [torch.zeros_like(p) if p.grad is None else
                 p.grad.to_dense() if p.grad.is_sparse else p.grad for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to("cpu", torch.float32) * pre
        total = torch.empty_like(flat)
        self.comm.Allreduce(flat.numpy(), total.numpy())
        if post != 1.0:
            total *= post
        offset = 0
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
            g.copy_(total[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def apply(self) -> bool:
        if not self.adasum:
            self.optimizer.step()
            return True
        # As DistributedOptimizer(op=Adasum): step locally, combine the changes.
        start = torch.cat([p.detach().reshape(-1) for p in self.params])
        self.optimizer.step()
        change = torch.cat([p.detach().reshape(-1) for p in self.params]).sub_(start)
        change = change.to("cpu", torch.float32)
        total = torch.empty_like(change)
        self.comm.Adasum(change.numpy(), total.numpy(), [p.numel() for p in self.params])
        applied = bool(torch.isfinite(total).all())  # else the parameters keep their values
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                kept = start[offset:offset + n]
                p.copy_((kept + total[offset:offset + n].to(start) if applied else kept)
                        .view_as(p))
                offset += n
        return applied


class VirtualAggregationStats(AggregationStats):
    """MA's and EC's round statistics in virtual seconds: a round's time is what this worker
    spent in the round's collectives (EC: split into exchange and inference)."""

    def __init__(self, comm: LocalComm, counts_inference: bool = False):
        super().__init__(counts_inference)
        self.comm = comm
        self.mark()

    def mark(self) -> None:
        self._start = (self.comm.collective_s, self.comm.inference_s)

    def record(self, nbytes: int, seconds: float, inferred: int = 0, **parts: float) -> None:
        spent = self.comm.collective_s - self._start[0]
        inference = self.comm.inference_s - self._start[1]
        virtual = {"exchange": spent - inference, "inference": inference} if parts else {}
        super().record(nbytes, spent, inferred=inferred, **virtual)


class _Aggregation(_AggregationBase):
    """ma, ec: the real aggregator; its statistics in virtual seconds."""

    def setup(self, s: Setup) -> None:
        super().setup(s)
        stats = VirtualAggregationStats(cast(LocalComm, s.comm),  # the simulated worker's
                                        self.aggregator.stats.counts_inference)
        self.aggregator.stats = stats
        aggregate = self.aggregator.aggregate

        def timed() -> None:
            stats.mark()
            aggregate()

        self.aggregator.aggregate = timed


@cache
def simulated(cls: type[Algorithm]) -> type[Algorithm]:
    """``cls`` as the simulator runs it (the real class with its connection replaced)."""
    mixin: type
    if issubclass(cls, ASGD):
        mixin = _Store
    elif issubclass(cls, Synchronous):
        mixin = _Sync
    elif issubclass(cls, ModelAveraging):
        mixin = _Aggregation
    else:
        return cls
    return type(cls.__name__, (mixin, cls), {"__doc__": cls.__doc__})
