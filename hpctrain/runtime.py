"""What the training loop takes from the machine it runs on: the clock, straggler emulation,
the training data, and how the run describes itself.

A run of real processes uses :class:`Runtime`: ``time.perf_counter``, stragglers that sleep
(:mod:`hpctrain.stragglers`), each rank's own training data (:func:`make_train_data`) and
the MPI library's description. The simulator (:mod:`hpctrain.sim`) runs the same loop for
each of its virtual workers with a virtual runtime instead: a virtual clock that step-time
and network models advance, one shared copy of the data set, and ``simulated: true`` in the
summary. Keeping these few things behind one object keeps the loop itself unchanged.
"""

from __future__ import annotations

import time

import torch

from hpctrain import comm, devices, launch_env
from hpctrain.shuffle import TrainData, TrainDataSpec, make_train_data
from hpctrain.stragglers import Straggler


class Runtime:
    """Real time, real sleeps, this rank's own data (a run of real processes)."""

    def now(self) -> float:
        """Seconds on the run's clock (only differences matter)."""
        return time.perf_counter()

    def straggler(self, config, rank: int, workers: int) -> Straggler:
        """This worker's injected straggler (``--slowdown``, ``--jitter``)."""
        s = config.stragglers
        factor, delay = s.slowdown_of(rank, workers)
        return Straggler(factor, s.jitter, config.seed, rank, delay=delay)

    def train_data(self, spec: TrainDataSpec, comm_) -> TrainData:
        """This worker's training data (collective when data move)."""
        return make_train_data(spec, comm_)

    def peak_memory(self, device: torch.device) -> int | None:
        """The most memory this worker has held, in bytes (:func:`hpctrain.devices.peak_memory`)."""
        return devices.peak_memory(device)

    def snapshot_copies(self, workers: int, root_only: bool) -> int:
        """The copies of the run's snapshots this node's memory holds: one per worker on it
        (1 where the launcher does not say), also where rank 0 alone takes them
        (``root_only``: they reach every worker to be scored)."""
        return launch_env.local_size() or 1

    def run_info(self) -> dict:
        """What ran the job, for ``config.json``'s ``run_info``."""
        return comm.library_info()

    def config_tables(self) -> dict:
        """Tables ``config.json`` keeps beside the run's configuration (the simulator's
        ``sim``), so that ``--config`` repeats the run."""
        return {}

    def summary_fields(self) -> dict:
        """Common summary fields the runtime sets (the simulator: ``simulated``)."""
        return {}


REAL = Runtime()
