"""Learning-rate schedule: step decay at epoch milestones."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def step_decay(base_lr: float, epoch: float, milestones: Sequence[float], gamma: float) -> float:
    """``base_lr`` times ``gamma`` for every milestone (in epochs, fractional) already passed."""
    return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
