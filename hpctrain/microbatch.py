"""Gradient accumulation (``--micro-batch-size``): a batch's mean loss in parts.

A batch too large for memory is forwarded and backwarded in parts; each part's mean loss is
weighted by its share of the batch, so the gradients that backward accumulates in ``.grad``
add up to the whole batch's (to float rounding), as with Horovod's
``backward_passes_per_step`` or DDP's ``no_sync``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


def mean_in_parts(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  x: torch.Tensor, y: torch.Tensor, size: int | None) -> Iterator[torch.Tensor]:
    """``loss(x, y)``, a mean over the samples, in parts of at most ``size`` samples, each
    weighted by its share of the batch: their gradients add up to the whole batch's (gradient
    accumulation). One part, unweighted, when ``size`` is None or not smaller than the batch."""
    if size is None or size >= len(y):
        yield loss(x, y)
        return
    for xs, ys in zip(x.split(size), y.split(size), strict=True):
        yield loss(xs, ys) * (len(ys) / len(y))
