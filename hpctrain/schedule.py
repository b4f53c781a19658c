"""Learning-rate schedules, as functions of the (fractional) epoch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SCHEDULES = ("cosine", "step", "constant")


def learning_rate(base_lr: float, epoch: float, total_epochs: float, schedule: str = "cosine",
                  milestones: Sequence[float] = (), gamma: float = 0.1) -> float:
    """The learning rate at ``epoch``.

    ``cosine`` decays from ``base_lr`` to 0 over ``total_epochs``; ``step`` multiplies by
    ``gamma`` at every milestone passed; ``constant`` keeps ``base_lr``.
    """
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(epoch / total_epochs, 1.0)))
    if schedule == "step":
        return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)
    return base_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
