"""Test-set evaluation (:func:`hpctrain.evaluate.evaluate`): every sample once, in eval mode,
the loss per sample, and one wait for the device per evaluation, not two per batch."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hpctrain.data import Dataset
from hpctrain.evaluate import evaluate


def dataset(n: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 4, 4, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return Dataset("test", images, labels, torch.arange(n))


def model(seed: int = 1) -> nn.Module:
    """Dropout and batch norm: both change their output in training mode."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(),
                      nn.Dropout(0.5), nn.Linear(32, 10))
    with torch.no_grad():  # running statistics that are not batch statistics
        m[2].running_mean.uniform_(-1, 1)
        m[2].running_var.uniform_(0.5, 2)
    return m.train()


def reference(m: nn.Module, test: Dataset, batch_size: int) -> tuple[float, float]:
    """The sums as evaluate made them before: a Python int and float, batch by batch."""
    m.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(test), batch_size):
            out = m(test.images[i:i + batch_size])
            y = test.labels[i:i + batch_size]
            loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
    return correct / len(test), loss / len(test)


@pytest.mark.parametrize("n, batch_size", [(1000, 1000), (1037, 100), (5, 1000), (301, 7)])
def test_evaluate_counts_every_sample_once_in_eval_mode(n, batch_size):
    """A partial last batch counted, per-sample mean, dropout and batch norm in eval mode,
    training mode back after; the same numbers, bit for bit, as the sums on the host."""
    test, m = dataset(n), model()
    acc, loss = evaluate(m, test, batch_size)
    assert m.training and all(c.training for c in m.modules())
    assert (acc, loss) == reference(m, test, batch_size)
    m.eval()
    with torch.no_grad():  # the whole set in one batch: the per-sample mean
        out = m(test.images)
    assert acc == (out.argmax(1) == test.labels).sum().item() / n
    assert loss == pytest.approx(F.cross_entropy(out, test.labels).item(), rel=1e-5)


def test_evaluate_waits_for_the_device_once_not_per_batch(monkeypatch):
    """Two .item() per batch were two waits for a GPU each batch: the sums stay on the
    device, and are read once at the end."""
    reads = []
    item = torch.Tensor.item

    def counted(self):
        reads.append(self.dtype)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counted)
    evaluate(model(), dataset(100), batch_size=10)
    assert sorted(map(str, reads)) == ["torch.float64", "torch.int64"]


def test_evaluate_restores_training_mode_on_error():
    """A model that raises mid-evaluation (an out-of-memory, a user's bug) was left in eval
    mode: a caller that catches the error trained on without dropout."""
    m = model()

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = m

        def forward(self, x):
            raise RuntimeError("out of memory")

    broken = Broken().train()
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate(broken, dataset(10))
    assert broken.training and m.training
