"""What an Algorithm subclass of one's own must provide, said where it is missing: the loop
needs ``self.optimizer`` after ``setup``, and ``close_tickets`` when it is not lock-step."""

import pytest
from test_sim import config, sim

from hpctrain import registry
from hpctrain.algorithm import Algorithm
from hpctrain.sim import simulate


class NoOptimizer(Algorithm):
    """setup() without the optimizer: found at the first step, naming torch's None."""

    name = "no-optimizer"

    def setup(self, s):
        self.model = s.model


def test_setup_must_leave_a_torch_optimizer(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.ALGORITHMS, NoOptimizer.name, NoOptimizer)
    with pytest.raises(TypeError, match="^NoOptimizer.setup\\(\\) must set self.optimizer to a "
                       "torch optimizer, not NoneType$"):
        simulate(config(NoOptimizer.name, tmp_path / "run"), sim(1))


def test_an_algorithm_not_in_lock_step_must_close_its_tickets():
    """lock_step = False alone failed on SIGUSR1 with an AttributeError."""
    class Loose(Algorithm):
        name = "loose"
        lock_step = False

    with pytest.raises(NotImplementedError, match="Loose is not lock-step .* must define "
                       "close_tickets"):
        Loose.close_tickets(object.__new__(Loose))
