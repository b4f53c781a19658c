"""The simulator: K virtual workers in one process, no MPI, the real algorithm code.

``hpctrain simulate --workers K ...`` (or :func:`simulate` from Python) trains with any
algorithm of the registry as K workers would, deterministically, in virtual time:

- :mod:`~hpctrain.sim.scheduler`: per-worker virtual clocks and the event queue; every
  worker runs the one training loop (:func:`hpctrain.run._train`) in a thread of its own,
  one at a time, in (virtual time, worker id) order.
- :mod:`~hpctrain.sim.steptime` and :mod:`~hpctrain.sim.network`: how long a step takes
  (constant, log-normal, gamma, or replayed from a real run's ``step_times.json``, stretched
  by the real ``--slowdown``/``--jitter``: factor, fixed delay, draw) and how long
  communication takes (latency and bandwidth; ring collectives; per-shard store accesses with
  lock queueing).
- :mod:`~hpctrain.sim.comm` and :mod:`~hpctrain.sim.store`: in-process stand-ins with the
  interfaces of an mpi4py communicator, of :class:`~hpctrain.async_.store.ParameterStore`
  and of :class:`~hpctrain.async_.ssp.StalenessBound`, so the real aggregators, optimizers and
  fused kernel run unchanged.
- :mod:`~hpctrain.sim.algorithms`: the registry's classes connected to those stand-ins.
- :mod:`~hpctrain.sim.runtime`: the loop's virtual clock, straggler and shared data.
"""

from hpctrain.sim.config import SimConfig
from hpctrain.sim.simulate import simulate

__all__ = ["SimConfig", "simulate"]
