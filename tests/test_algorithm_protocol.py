"""What an Algorithm subclass of one's own must provide, said where it is missing: the loop
needs ``self.optimizer`` after ``setup``, ``close_tickets`` when it is not lock-step, and a
scalar loss from ``loss()``."""

import pytest
import torch
from test_sim import config, sim
from torch.nn import functional as F

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


class OwnLoss(Algorithm):
    """loss() as a user may get it wrong: ``how`` it spoils the mean loss."""

    name = "own-loss"

    def __init__(self, how: str):  # no run: only loss() and losses() are called
        torch.manual_seed(0)
        self.how, self.model = how, torch.nn.Linear(4, 3)

    def loss(self, x, y):
        logits = self.model(x)
        return {"mean": lambda: F.cross_entropy(logits, y),
                "per-sample": lambda: F.cross_entropy(logits, y, reduction="none"),
                "count": lambda: (logits.argmax(1) == y).sum(),
                "detached": lambda: F.cross_entropy(logits, y).detach(),
                "float": lambda: F.cross_entropy(logits, y).item()}[self.how]()


@pytest.mark.parametrize("how, got", [
    ("per-sample", r"a tensor of shape \(6,\) \(per-sample losses\? take their mean\)"),
    ("count", "a torch.int64 tensor"),
    ("detached", r"a tensor with no gradient path to self.model \(detached\?\)"),
    ("float", "a float"),
])
def test_a_loss_that_is_no_scalar_is_named_as_the_algorithms(how, got):
    """A per-sample or integer loss stopped the first step with torch's "grad can be
    implicitly created only for scalar outputs" or "element 0 of tensors does not require
    grad", naming no loss()."""
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2] * 2)
    whole, = OwnLoss("mean").losses(x, y, None)
    assert whole.dim() == 0 and whole.requires_grad
    assert len(list(OwnLoss("mean").losses(x, y, 4))) == 2  # micro-batches: each part
    with pytest.raises(TypeError, match="^OwnLoss.loss\\(\\) must return the batch's mean loss, "
                       f"a scalar floating-point tensor computed from self.model, not {got}$"):
        list(OwnLoss(how).losses(x, y, None))
