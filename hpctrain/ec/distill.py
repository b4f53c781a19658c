"""The EC training loss: cross-entropy on the true label plus distillation of the ensemble."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor,
                      alpha: float, temperature: float, reduction: str = "mean") -> torch.Tensor:
    """``(1-alpha) CE(y) + alpha T^2 KL(teacher || softmax(logits / T))`` per sample, reduced.

    ``teacher`` holds the ensemble's probabilities at temperature ``T`` (rows sum to 1). The
    ``T^2`` keeps the distillation gradient's scale independent of ``T`` (Hinton et al.).
    ``reduction`` is "mean", "sum" or "none".
    """
    ce = F.cross_entropy(logits, labels, reduction="none")
    log_student = F.log_softmax(logits / temperature, dim=1)
    kl = (torch.special.xlogy(teacher, teacher) - teacher * log_student).sum(dim=1)
    per_sample = (1.0 - alpha) * ce + alpha * temperature ** 2 * kl
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"unknown reduction {reduction!r}")
