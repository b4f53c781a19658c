"""The ensemble's outputs on every rank's samples, computed with MPI collectives.

No model moves: each rank contributes its distillation samples (their ids when every rank
holds the whole data set, the inputs themselves when the data are sharded), every rank
evaluates its own model on all of them, and a reduce-scatter returns to each rank the sum of
all models' probabilities on its own samples, which it divides by the number of ranks.
Shared (``--ec-distill-from all``), an allreduce gives every rank the probabilities of all
ranks' samples instead, and the samples come back with them, labels included.

An MPI-3 library (Open MPI 4) takes a count or displacement up to 2**31 - 1 only: images go
out in rows of a sample's floats, and the sums, which a predefined op refuses to take in rows,
go in calls of at most that many elements.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hpctrain.comm import allreduce_bytes, is_mpi4py
from hpctrain.data import Dataset

MAX_COUNT = 2**31 - 1  # an MPI-3 count or displacement is a C int


def allgather_rows(comm, send: np.ndarray, counts: list[int]) -> np.ndarray:
    """Every rank's rows of the 2-D float32 ``send`` (``counts[r]`` from rank r), stacked in
    rank order (collective).

    Counted in rows of a contiguous datatype, not in floats: Open MPI 4 refuses a
    displacement past 2**31 - 1 (``MPI_ERR_ARG``), which sharded ImageNet's images reach
    (56 ranks' 256 samples of 3x224x224 before the last rank's); in rows, 2**31 samples.
    The simulator's communicator takes the flat arrays.
    """
    width = send.shape[1]
    out = np.empty((sum(counts), width), np.float32)
    if not is_mpi4py(comm):
        comm.Allgatherv(send.reshape(-1), [out.reshape(-1), [c * width for c in counts]])
        return out
    from mpi4py import MPI

    row = MPI.FLOAT.Create_contiguous(width).Commit()
    try:
        comm.Allgatherv([send, len(send), row], [out, counts, row])
    finally:
        row.Free()
    return out


def allreduce_rows(comm, send: np.ndarray, limit: int = MAX_COUNT) -> np.ndarray:
    """The sum over ranks of the 2-D float32 ``send``, the same shape on every rank
    (collective).

    In slices of whole rows of at most ``limit`` floats: a count is a C int, and MPI_SUM
    refuses a row datatype (``MPI_ERR_OP``). A sum that fits is one call, as it was, so
    its rounding is unchanged.
    """
    out = np.empty_like(send)
    per = max(1, limit // max(1, send.shape[1]))  # rows per call
    for lo in range(0, max(len(send), 1), per):
        comm.Allreduce(send[lo:lo + per].reshape(-1), out[lo:lo + per].reshape(-1))
    return out


def reduce_scatter_rows(comm, send: np.ndarray, counts: list[int],
                        limit: int = MAX_COUNT) -> np.ndarray:
    """This rank's block of the sum over ranks of the 2-D float32 ``send``, whose rows are
    the ranks' blocks of ``counts[r]`` rows in rank order (collective).

    Open MPI adds the counts in a C int, and MPI_SUM refuses a row datatype: a message of
    more than ``limit`` floats goes in rounds, each a copy of up to ``limit // (width *
    ranks)`` rows of every block. A message that fits is one call, as it was, so its
    rounding is unchanged.
    """
    width, me = send.shape[1], comm.Get_rank()
    out = np.empty((counts[me], width), np.float32)
    if sum(counts) * width <= limit:
        comm.Reduce_scatter(send.reshape(-1), out.reshape(-1), [c * width for c in counts])
        return out
    per = max(1, limit // (width * len(counts)))  # rows of each block per round
    starts = np.cumsum([0, *counts[:-1]]).tolist()
    for lo in range(0, max(counts), per):
        taken = [min(max(c - lo, 0), per) for c in counts]
        part = np.concatenate([send[s + lo:s + lo + n] for s, n in zip(starts, taken, strict=True)])
        comm.Reduce_scatter(part.reshape(-1), out[lo:lo + taken[me]].reshape(-1),
                            [n * width for n in taken])
    return out


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
    given = ids if ids is not None else images
    assert given is not None  # the checks above: exactly one is given
    counts = comm.allgather(len(given))
    total = sum(counts)
    mine = counts[comm.Get_rank()]
    if ids is not None:
        assert lookup is not None  # the checks above: ids come with their lookup
        send = ids.detach().to("cpu", torch.int64).contiguous().numpy()
        everyone = np.empty(total, np.int64)
        comm.Allgatherv(send, [everyone, counts])
        rows = torch.from_numpy(everyone)
        inputs = lookup.images[rows]
        if shared:
            labels = lookup.labels[rows]
    else:
        assert images is not None  # the checks above: exactly one is given
        shape = tuple(images.shape[1:])  # by its size, not -1: a rank may send 0 rows
        send = images.detach().to("cpu", torch.float32).contiguous().numpy().reshape(
            len(images), int(np.prod(shape)))
        inputs = torch.from_numpy(allgather_rows(comm, send, counts)).view(total, *shape)
    gathered_bytes = send.nbytes * (ranks - 1)
    if shared and images is not None:
        assert labels is not None  # the checks above: shared images come with labels
        mine_labels = labels.detach().to("cpu", torch.int64).contiguous().numpy()
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
        summed = allreduce_rows(comm, probs.contiguous().numpy())
        returned_bytes = allreduce_bytes(summed.nbytes, ranks)
    else:
        summed = reduce_scatter_rows(comm, probs.contiguous().numpy(), counts)
        returned_bytes = (total - mine) * num_classes * 4
    t3 = time.perf_counter()
    samples = None
    if shared:
        assert labels is not None  # the lookup's, or the shared images' gathered above
        samples = (inputs, labels)
    return EnsembleOutput(torch.from_numpy(summed) / ranks,
                          gathered_bytes + returned_bytes, (t1 - t0) + (t3 - t2), t2 - t1,
                          samples=samples, inferred=total)
