"""The training loop's runtime for a virtual worker: its virtual clock, modelled step times,
and one shared copy of the data set (see :mod:`hpctrain.runtime` for the real one)."""

from __future__ import annotations

import functools

from hpctrain import data
from hpctrain.runtime import Runtime
from hpctrain.shuffle import PartialShuffleSampler, ReplicatedTrainData, TrainDataSpec
from hpctrain.shuffle.train_data import make_sampler
from hpctrain.sim.scheduler import Scheduler
from hpctrain.sim.steptime import StepTimeModel
from hpctrain.stragglers import Straggler

MIN_STEP_S = 1e-9  # the shortest virtual step: no real one takes less than a nanosecond


class VirtualStraggler(Straggler):
    """A step's time from the step-time model, stretched as the real :class:`Straggler`
    stretches a measured one (``--slowdown``'s factor and fixed delay, ``--jitter``'s draw:
    ``draw * (factor * t + delay)``), added to the worker's virtual clock instead of slept.
    ``slept`` counts the part the slowdown and jitter added."""

    def __init__(self, model: StepTimeModel, scheduler: Scheduler, worker: int, factor: float,
                 jitter: float, seed: int, delay: float = 0.0):
        super().__init__(factor, jitter, seed, worker, delay=delay)
        self.model, self.scheduler, self.worker = model, scheduler, worker

    def pad(self, step_seconds: float) -> float:
        # At least MIN_STEP_S: a step takes time (a zero draw made the run's time 0), and
        # never faster than drawn (a real straggler only pads, :meth:`Straggler.pad`).
        base = max(self.model.next(self.worker), MIN_STEP_S)
        step = self.stretched(base) if self.active else base
        self.scheduler.now[self.worker] += step
        extra = max(0.0, step - base)
        self.slept += extra
        return extra


class SharedPartialSampler(PartialShuffleSampler):
    """partial(q): every rank's holdings are the same on every rank (a function of seed and
    epoch), so the virtual workers compute each epoch's once, in ``shared`` (epoch ->
    holdings), instead of K times."""

    def __init__(self, shared: dict, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shared = shared

    def holdings(self) -> list:
        if self.epoch not in self._shared:
            done = [e for e in self._shared if e < self.epoch]
            if done:  # continue from the latest epoch computed
                self._cached = (max(done), self._shared[max(done)])
            self._shared[self.epoch] = super().holdings()
        return self._shared[self.epoch]


class LeadInTrainData(ReplicatedTrainData):
    """:class:`ReplicatedTrainData` whose first epoch takes ``lead_in`` virtual seconds on
    worker ``worker``'s clock: with ``--comm-time replay`` the real worker's recorded lead-in,
    from the training loop's start to its first step (mostly this first epoch's data and the
    first ticket), so that the virtual workers start as far apart as the real ones did."""

    def __init__(self, full: data.Dataset, sampler, scheduler: Scheduler, worker: int,
                 lead_in: float):
        super().__init__(full, sampler)
        self.scheduler, self.worker, self._lead_in = scheduler, worker, lead_in

    def epoch(self, epoch: int) -> data.Dataset:
        self.scheduler.now[self.worker] += self._lead_in
        self._lead_in = 0.0
        return super().epoch(epoch)


class VirtualRuntime(Runtime):
    """Virtual worker ``worker``'s clock, straggler and data, in ``simulation``."""

    def __init__(self, simulation, worker: int):
        self.simulation, self.worker = simulation, worker

    def now(self) -> float:
        return self.simulation.scheduler.now[self.worker]

    def straggler(self, config, rank: int, workers: int) -> Straggler:
        """--jitter draws seeded with the simulation's timing seed (``--timing-seed``, else
        ``--seed``, as a real straggler's)."""
        s, sim = config.stragglers, self.simulation
        factor, delay = s.slowdown_of(rank, workers)
        return VirtualStraggler(sim.step_times, sim.scheduler, self.worker, factor, s.jitter,
                                sim.timing_seed, delay=delay)

    def train_data(self, spec: TrainDataSpec, comm_) -> ReplicatedTrainData:
        """The real samplers over one copy of the training set that all workers share
        (``--comm-time replay``: the first epoch after the replayed lead-in)."""
        sim = self.simulation
        full = sim.train_set(spec)
        labels = full.labels if spec.partition == "label-skew" else None
        shared = functools.partial(SharedPartialSampler, sim.holdings)
        sampler = make_sampler(spec.shuffle, len(full), sim.workers, self.worker, spec.seed,
                               labels, partial_sampler=shared)
        if sim.sim.comm_time != "replay":
            return ReplicatedTrainData(full, sampler)
        return LeadInTrainData(full, sampler, sim.scheduler, self.worker,
                               sim.step_times.lead_in(self.worker))

    def peak_memory(self, device) -> None:
        return None  # the virtual workers share one process

    def snapshot_copies(self, workers: int, root_only: bool) -> int:
        return 1 if root_only else workers  # the virtual workers share rank 0's

    def run_info(self) -> dict:
        return {"simulator": "hpctrain simulate", "virtual_workers": self.simulation.workers}

    def config_tables(self) -> dict:
        return {"sim": self.simulation.sim.to_dict()}

    def summary_fields(self) -> dict:
        # Scoring online takes real time, never virtual: it is outside the clock. The node's
        # load bears on no virtual time, and recorded it made two runs' summaries differ.
        return {"simulated": True, "simulation": self.simulation.describe(),
                "eval_in_clock": False, "load_average_start": None, "load_average_end": None}


def load_train_set(spec: TrainDataSpec) -> data.Dataset:
    full = data.load(spec.dataset, "train", spec.data_dir)
    data.release(spec.dataset, "train", spec.data_dir)  # as make_train_data: held once
    return full
