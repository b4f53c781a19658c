"""The EC training loss: cross-entropy on the true label plus distillation of the ensemble."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor,
                      alpha: float, temperature: float, reduction: str = "mean") -> torch.Tensor:
    """``(1-alpha) CE(y) + alpha T^2 KL(teacher || softmax(logits / T))`` per sample, reduced.

    ``teacher`` holds the ensemble's probabilities at temperature ``T`` (rows sum to 1). The
    ``T^2`` keeps the distillation gradient's scale independent of ``T`` (Hinton et al.).
    ``reduction`` is "mean", "sum" or "none". The distillation term is computed in float32
    at least, as the cross-entropy is: under CPU autocast (``--mixed-precision bf16``) a
    bfloat16 ``log_softmax`` ran in bfloat16, its 8-bit mantissa in the KL's difference.
    """
    ce = F.cross_entropy(logits, labels, reduction="none")
    wide = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    log_student = F.log_softmax(wide / temperature, dim=1)
    kl = (torch.special.xlogy(teacher, teacher) - teacher * log_student).sum(dim=1)
    per_sample = (1.0 - alpha) * ce + alpha * temperature ** 2 * kl
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"unknown reduction {reduction!r}")
