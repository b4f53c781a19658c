"""Test-set evaluation, and snapshots evaluated after training so curves exclude eval time.

During training a run only *takes* snapshots (a copy of the parameters and buffers, with the
wall time, epochs and updates at that moment); :func:`evaluate_snapshots` scores them once
training is over, spread over the ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from hpctrain import compiled, watchdog
from hpctrain.data import Dataset


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 1000) -> tuple[float, float]:
    """Accuracy (fraction) and mean cross-entropy of ``model`` on ``dataset``, every sample
    counted once (the last batch may be partial), in eval mode; training mode is restored.

    The sums stay where the model is until the end: one ``.item()`` per batch was two waits
    for a GPU each batch. The loss adds up in float64, as the Python float it was summed in
    (each batch's float32 sum widened exactly), so the result is the same bit for bit."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        correct = torch.zeros((), dtype=torch.int64, device=device)
        loss = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, len(dataset), batch_size):
            x = dataset.images[i:i + batch_size].to(device)
            y = dataset.labels[i:i + batch_size].to(device)
            out = model(x)
            loss += F.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
    finally:
        model.train(was_training)
    n = max(len(dataset), 1)
    return int(correct.item()) / n, float(loss.item()) / n


def loss_or_none(loss: float) -> float | None:
    """A loss as the curve records it: None when it is NaN or infinite (a diverged model),
    which JSON cannot hold."""
    return loss if math.isfinite(loss) else None


def curve_point(model: nn.Module, test_set: Dataset, info: dict) -> dict:
    """One curve point: ``info`` (t, epoch, updates) with ``model``'s test accuracy and loss."""
    acc, loss = evaluate(model, test_set)
    return {**info, "test_acc": acc, "test_loss": loss_or_none(loss)}


@dataclass
class Snapshot:
    """The model's state at one moment of training, and when that moment was."""

    state: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)


class Snapshots(list):
    """Snapshots taken during training, in order."""

    def take(self, model: nn.Module, **info) -> None:
        """Copy ``model``'s state now (into host memory), tagged with ``info`` (t, epoch,
        updates, ...)."""
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.append(Snapshot(state, info))


def state_bytes(model: nn.Module) -> int:
    """The bytes one snapshot of ``model`` holds: its state dict's tensors."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def footprint_warning(each: int, count: int, copies: int, available: int | None,
                      where: str) -> str | None:
    """A warning where ``copies`` of ``count`` snapshots of ``each`` bytes (one per worker) take
    more than half of the ``available`` bytes (None: not known) ``where`` (this node's
    memory, a checkpoint folder's disk), or None. They are kept to the run's end, so too
    many end a long run hours in."""
    need = each * count * copies
    if available is None or 2 * need <= available:
        return None
    workers = f" for each of {copies} workers" if copies > 1 else ""
    return (f"hpctrain: warning: the run's snapshots will take about {_amount(need)} "
            f"{where} ({count} of {_amount(each)}{workers}, kept to the end of the "
            f"run), more than half of its {_amount(available)} available: raise "
            f"--eval-every for fewer")


def _amount(size: int) -> str:
    """``size`` bytes in GB, MB below one GB, kB below one MB (a small disk's "0.0 GB", a
    small model's snapshot of "0.0 MB", said nothing)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1e3:.1f} kB"


def evaluate_snapshots(model: nn.Module, snapshots: list[Snapshot], test_set: Dataset,
                       comm=None) -> list[dict]:
    """Score every snapshot on ``test_set``: one curve point per snapshot, in order.

    With ``comm``, every rank must hold the same snapshots; rank r scores every size-th one and
    all ranks receive all points. ``model`` is used as scratch space and left changed.
    """
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    mine, ours = {}, range(rank, len(snapshots), size)
    # --compile: a model's first evaluation may compile on any rank (one scored online has
    # compiled before), and the others wait in the allgather meanwhile.
    compiling = compiled.is_compiled(model)
    if not ours:
        watchdog.beat("waiting for the scores", compiling=compiling)
    for i in ours:
        watchdog.beat("evaluating snapshot", i, compiling=compiling and i == ours[0])
        model.load_state_dict(snapshots[i].state)
        mine[i] = curve_point(model, test_set, snapshots[i].info)
    if comm is not None and size > 1:
        for part in comm.allgather(mine):
            mine.update(part)
    return [mine[i] for i in range(len(snapshots))]
