"""Gradient accumulation (``--micro-batch-size``): a batch's mean loss in parts.

A batch too large for memory is forwarded and backwarded in parts; each part's mean loss is
weighted by its share of the batch, so the gradients that backward accumulates in ``.grad``
add up to the whole batch's (to float rounding), as with Horovod's
``backward_passes_per_step`` or DDP's ``no_sync``. The parts are near-equal (their sizes
differ by at most one), ceil(batch / size) of them: a batch of 64 in parts of at most 7 is
10 parts of 7 or 6, not nine of 7 and one of 1, which batch norm cannot train on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


def parts(batch: int, size: int | None) -> int:
    """How many parts :func:`mean_in_parts` makes of a batch of ``batch`` samples."""
    return 1 if size is None or size >= batch else -(-batch // size)


def part_sizes(batch: int, size: int | None) -> list[int]:
    """The sizes of :func:`mean_in_parts`' parts of a batch of ``batch`` samples, each once,
    largest first (``tensor_split``'s: the first ``batch % k`` of the k parts have one more):
    the input sizes the model runs on, which ``--compile`` compiles and checks."""
    k = parts(batch, size)
    return [batch // k + 1, batch // k] if batch % k else [batch // k]


def mean_in_parts(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  x: torch.Tensor, y: torch.Tensor, size: int | None) -> Iterator[torch.Tensor]:
    """``loss(x, y)``, a mean over the samples, in near-equal parts of at most ``size``
    samples, each weighted by its share of the batch: their gradients add up to the whole
    batch's (gradient accumulation). One part, unweighted, when ``size`` is None or not
    smaller than the batch."""
    k = parts(len(y), size)
    if k == 1:
        yield loss(x, y)
        return
    for xs, ys in zip(x.tensor_split(k), y.tensor_split(k), strict=True):
        yield loss(xs, ys) * (len(ys) / len(y))


def one_sample(samples: int, batch_size: int, size: int | None) -> str | None:
    """Why a worker taking ``samples`` samples per epoch in batches of ``batch_size``, in
    parts of at most ``size``, forwards a single sample in training mode, naming the options
    to change; None when it never does (batch norm cannot train on one sample)."""
    if samples <= 0:
        return None
    if batch_size == 1:
        return "--batch-size 1 trains on one sample at a time"
    if samples == 1:
        return (f"each worker gets 1 sample per epoch, so its batch (--batch-size "
                f"{batch_size}) holds one")
    last = samples % batch_size if samples > batch_size else 0
    if last == 1:
        return (f"--batch-size {batch_size} leaves 1 sample in each epoch's last batch "
                f"({samples} samples per worker): choose another --batch-size")
    for which, n in (("a batch", min(batch_size, samples)), ("each epoch's last batch", last)):
        if n > 1 and n // parts(n, size) == 1:
            return (f"--micro-batch-size {size} splits {which} of {n} (--batch-size "
                    f"{batch_size}) into {parts(n, size)} parts, the smallest of 1 sample: give a "
                    "--micro-batch-size of at least 3, or none")
    return None
