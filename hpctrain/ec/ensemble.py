"""The ensemble's outputs on every rank's samples, computed with MPI collectives.

No model moves: each rank contributes its distillation samples (their ids when every rank
holds the whole data set, the inputs themselves when the data are sharded), every rank
evaluates its own model on all of them, and a reduce-scatter returns to each rank the sum of
all models' probabilities on its own samples, which it divides by the number of ranks.
Shared (``--ec-distill-from all``), an allreduce gives every rank the probabilities of all
ranks' samples instead, and the samples come back with them, labels included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hpctrain.comm import allreduce_bytes
from hpctrain.data import Dataset


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``model``'s logits on (non-empty) ``images`` in eval mode, in batches, computed where
    the model is and returned in host memory; training mode is restored. Floating inputs
    take the model's dtype: exchanged images are float32, and a float64 model refused them."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    dtype = param.dtype if images.is_floating_point() and param.is_floating_point() else None
    try:
        parts = [model(images[i:i + batch_size].to(param.device, dtype)).to("cpu")
                 for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts)


@dataclass
class EnsembleOutput:
    """The ensemble probabilities of this rank's samples (shared: of every rank's, in rank
    order, with those samples' inputs and labels), and what computing them cost."""

    probs: torch.Tensor
    bytes_sent: int
    exchange_s: float
    inference_s: float
    samples: tuple[torch.Tensor, torch.Tensor] | None = None  # shared: (inputs, labels)
    inferred: int = 0  # samples this rank ran its model on (every rank's: inference_s's)


def ensemble_probabilities(model: nn.Module, comm, temperature: float, num_classes: int, *,
                           images: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                           lookup: Dataset | None = None, labels: torch.Tensor | None = None,
                           shared: bool = False) -> EnsembleOutput:
    """The mean over ``comm``'s ranks of ``softmax(model_k(x) / T)`` for this rank's samples,
    or with ``shared`` for every rank's samples (then give ``images``' ``labels``).

    Collective. Give either ``ids`` (rows of ``lookup``, a data set every rank holds) or
    ``images``; ranks may contribute different numbers of samples (zero included).
    """
    if (ids is None) == (images is None):
        raise ValueError("give exactly one of ids and images")
    if ids is not None and lookup is None:
        raise ValueError("ids need the lookup data set they index")
    if shared and images is not None and labels is None:
        raise ValueError("shared images need their labels")
    ranks = comm.Get_size()
    t0 = time.perf_counter()
    counts = comm.allgather(len(ids) if ids is not None else len(images))
    total = sum(counts)
    mine = counts[comm.Get_rank()]
    if ids is not None:
        send = ids.to(torch.int64).contiguous().numpy()
        everyone = np.empty(total, np.int64)
        comm.Allgatherv(send, [everyone, counts])
        rows = torch.from_numpy(everyone)
        inputs = lookup.images[rows]
        if shared:
            labels = lookup.labels[rows]
    else:
        shape = tuple(images.shape[1:])
        item = int(np.prod(shape))
        send = images.to(torch.float32).contiguous().numpy().reshape(-1)
        everyone = np.empty(total * item, np.float32)
        comm.Allgatherv(send, [everyone, [c * item for c in counts]])
        inputs = torch.from_numpy(everyone).view(total, *shape)
    gathered_bytes = send.nbytes * (ranks - 1)
    if shared and images is not None:
        mine_labels = labels.to(torch.int64).contiguous().numpy()
        every_label = np.empty(total, np.int64)
        comm.Allgatherv(mine_labels, [every_label, counts])
        labels = torch.from_numpy(every_label)
        gathered_bytes += mine_labels.nbytes * (ranks - 1)
    t1 = time.perf_counter()
    probs = torch.zeros(total, num_classes)
    if total:
        probs = F.softmax(predict_logits(model, inputs) / temperature, dim=1).to(torch.float32)
    t2 = time.perf_counter()
    if shared:
        summed = np.empty(total * num_classes, np.float32)
        comm.Allreduce(probs.contiguous().numpy().reshape(-1), summed)
        returned_bytes = allreduce_bytes(summed.nbytes, ranks)
    else:
        summed = np.empty(mine * num_classes, np.float32)
        comm.Reduce_scatter(probs.contiguous().numpy().reshape(-1), summed,
                            [c * num_classes for c in counts])
        returned_bytes = (total - mine) * num_classes * 4
    t3 = time.perf_counter()
    return EnsembleOutput(torch.from_numpy(summed).view(-1, num_classes) / ranks,
                          gathered_bytes + returned_bytes, (t1 - t0) + (t3 - t2), t2 - t1,
                          samples=(inputs, labels) if shared else None, inferred=total)
