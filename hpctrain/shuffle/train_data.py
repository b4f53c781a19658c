"""The training set as each rank sees it, epoch by epoch, for every strategy and placement."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypedDict

import torch

from hpctrain import data
from hpctrain.shuffle import options
from hpctrain.shuffle.options import TrainDataSpec
from hpctrain.shuffle.samplers import (
    GlobalShuffleSampler,
    LocalShuffleSampler,
    PartialShuffleSampler,
)


def steps_per_epoch(num_samples: int, ranks: int, batch_size: int) -> int:
    """A rank's batches in one epoch of ``num_samples`` over ``ranks``: its ``samples_per_rank``
    (``num_samples // ranks``, the tail dropped) in batches of ``batch_size``, the last one
    short. The one count that checks before MPI, fault plans and resizes share with the loop."""
    return math.ceil(num_samples // ranks / batch_size)


class TrainData:
    """One rank's view of the training set: ``epoch(e)`` gives its samples in consumption order.

    Every rank gets ``samples_per_rank = num_samples // ranks`` samples per epoch (the tail is
    dropped). ``epoch`` is collective when data move: all ranks call it with the same epoch.
    Its result shares memory that the next call reuses (its samples are gathered into the
    same buffers each epoch; sharded placement also swaps two holdings instead of
    allocating), so use it, or copy it, before asking for the next epoch.
    """

    num_samples: int
    samples_per_rank: int
    input_shape: tuple
    num_classes: int

    def __init__(self) -> None:
        self._exchanges: list[dict] = []
        self._gathered: tuple[torch.Tensor, ...] = ()  # _gather's images, labels, ids

    def epoch(self, epoch: int) -> data.Dataset:
        raise NotImplementedError

    def _gather(self, source: data.Dataset, rows) -> data.Dataset:
        """``source.subset(rows)``, written into the buffers the previous epoch's result used.

        A fresh copy per epoch kept the old epoch's copy alive (the loop's ``local``, its
        last batch's views) while the next was made: one share more per rank at each epoch
        switch, the run's peak once loading no longer set it. Same values as ``subset``.
        """
        rows = torch.as_tensor(rows, dtype=torch.long)
        fields = (source.images, source.labels, source.ids)
        wanted = [((len(rows), *t.shape[1:]), t.dtype) for t in fields]
        if [(t.shape, t.dtype) for t in self._gathered] != wanted:
            self._gathered = ()  # one set of buffers at a time, not two
            self._gathered = tuple(torch.empty(shape, dtype=dtype) for shape, dtype in wanted)
        for out, src in zip(self._gathered, fields, strict=True):
            torch.index_select(src, 0, rows, out=out)
        images, labels, ids = self._gathered
        return data.Dataset(source.name, images, labels, ids, source.num_classes)

    def stats(self) -> dict:
        """This rank's bytes sent to other ranks and seconds spent exchanging: in total, and
        per exchange (``exchange_per_epoch``: epoch, bytes_moved, exchange_s). The seconds
        are a float also where nothing was exchanged (replicated data): summary.json's type."""
        return {"bytes_moved": sum(x["bytes_moved"] for x in self._exchanges),
                "exchange_s": sum((x["exchange_s"] for x in self._exchanges), 0.0),
                "exchange_per_epoch": list(self._exchanges)}


class ReplicatedTrainData(TrainData):
    """Every rank holds the whole set; a sampler picks this rank's samples. Nothing moves."""

    def __init__(self, full: data.Dataset, sampler) -> None:
        super().__init__()
        self.full, self.sampler = full, sampler
        self.num_samples = len(full)
        self.samples_per_rank = len(sampler)
        self.input_shape, self.num_classes = full.shape, full.num_classes

    def epoch(self, epoch: int) -> data.Dataset:
        self.sampler.set_epoch(epoch)
        return self._gather(self.full, self.sampler.indices())


class _SamplerArgs(TypedDict):
    """The keywords every sampler of :func:`make_sampler` is given."""

    num_replicas: int
    rank: int
    seed: int
    drop_last: bool


def make_sampler(strategy: str, num_samples: int, ranks: int, rank: int, seed: int,
                 labels=None, partial_sampler: Callable = PartialShuffleSampler):
    """The sampler for ``--shuffle strategy`` (labels given: label-skew partition).
    ``partial_sampler``: partial:Q's class (the simulator's shares holdings between workers)."""
    name, q = options.parse_strategy(strategy)
    common = _SamplerArgs(num_replicas=ranks, rank=rank, seed=seed, drop_last=True)
    if name == "global":
        return GlobalShuffleSampler(num_samples, **common)
    if name == "local":
        return LocalShuffleSampler(num_samples, **common, labels=labels)
    return partial_sampler(q, num_samples, **common, labels=labels)


def make_train_data(spec: TrainDataSpec, comm=None) -> TrainData:
    """This rank's training data for ``spec`` (already checked when it was built); the data
    set's source keeps no more of the training split than its labels (:func:`data.release`).

    ``comm`` is an mpi4py communicator, or None for a single process.
    """
    if not isinstance(spec, TrainDataSpec):  # e.g. a whole argparse.Namespace: not checked
        raise TypeError(f"make_train_data needs a TrainDataSpec, not {type(spec).__name__}")
    ranks, rank = (1, 0) if comm is None else (comm.Get_size(), comm.Get_rank())
    if spec.data_placement == "sharded":
        from hpctrain.shuffle.sharded import ShardedTrainData

        train: TrainData = ShardedTrainData(spec, comm)
    else:
        full = data.load(spec.dataset, "train", spec.data_dir)
        labels = full.labels if spec.partition == "label-skew" else None
        sampler = make_sampler(spec.shuffle, len(full), ranks, rank, spec.seed, labels)
        train = ReplicatedTrainData(full, sampler)
    # Taken: a compressed .npz's or a loader's whole arrays go (else held all run, the
    # shard notwithstanding).
    data.release(spec.dataset, "train", spec.data_dir)
    return train
