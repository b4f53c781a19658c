"""Samplers with torch's DistributedSampler interface, for data replicated on every rank.

Each yields indices into the whole training set; every rank gets ``N // K`` of them per epoch
(the tail is dropped, never padded), and the order depends only on the seed, the epoch, the
number of ranks and the rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch

from hpctrain import comm
from hpctrain.errors import UsageError
from hpctrain.shuffle import order


class _Sampler:
    """``data`` is the number of samples or anything with a length (a dataset), as for
    DistributedSampler; ``num_replicas`` and ``rank`` default to the MPI world's."""

    def __init__(self, data: int | Sized, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0):
        num_samples = data if isinstance(data, int) else len(data)
        self.num_replicas = comm.size() if num_replicas is None else num_replicas
        self.rank = comm.rank() if rank is None else rank
        if not 0 <= self.rank < self.num_replicas:
            raise UsageError(f"rank {self.rank} outside [0, {self.num_replicas})")
        if num_samples < self.num_replicas:
            raise UsageError(f"{num_samples} samples cannot feed {self.num_replicas} ranks")
        self.dataset_size = num_samples
        self.num_samples = num_samples // self.num_replicas
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def indices(self) -> torch.Tensor:
        raise NotImplementedError


class GlobalShuffleSampler(_Sampler):
    """A fresh permutation of the whole data set each epoch; rank r takes ``perm[r::K]``."""

    def indices(self) -> torch.Tensor:
        return order.global_indices(self.seed, self.epoch, self.dataset_size,
                                    self.num_replicas, self.rank)


class LocalShuffleSampler(_Sampler):
    """A fixed block per rank (file order, or sorted by ``labels`` for label-skew), reshuffled
    within the rank each epoch."""

    def __init__(self, data: int | Sized, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0, labels: torch.Tensor | None = None):
        super().__init__(data, num_replicas, rank, seed)
        if labels is not None and len(labels) != self.dataset_size:
            raise UsageError(f"{len(labels)} labels for {self.dataset_size} samples")
        self.partition = order.partition(self.dataset_size, self.num_replicas, labels)

    def holding(self) -> torch.Tensor:
        """The samples this rank holds this epoch, before its local reshuffle."""
        return order.block(self.partition, self.num_replicas, self.rank)

    def indices(self) -> torch.Tensor:
        held = self.holding()
        return held[order.local_permutation(self.seed, self.epoch, self.rank, len(held))]


class PartialShuffleSampler(LocalShuffleSampler):
    """Local shuffling plus, each epoch, every rank sending a fraction ``q`` of its samples to
    random other ranks (receiving as many); partial(0) is local, partial(1) moves them all.

    Holdings carry over from epoch to epoch, so a later epoch replays the earlier exchanges
    (cached: moving forward one epoch at a time costs one exchange).
    """

    def __init__(self, q: float, data: int | Sized, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0, labels: torch.Tensor | None = None):
        if not 0.0 <= q <= 1.0:
            raise UsageError(f"partial shuffle fraction {q} outside [0, 1]")
        super().__init__(data, num_replicas, rank, seed, labels)
        self.q = q
        self._cached: tuple[int, list[torch.Tensor]] | None = None

    def holdings(self) -> list[torch.Tensor]:
        """Every rank's holding this epoch, after the epoch's exchange."""
        if self._cached is not None and self._cached[0] <= self.epoch:
            done, held = self._cached
        else:
            done = -1
            held = [order.block(self.partition, self.num_replicas, r)
                    for r in range(self.num_replicas)]
        for e in range(done + 1, self.epoch + 1):
            held = order.partial_step(held, self.seed, e, self.q)
        self._cached = (self.epoch, held)
        return held

    def holding(self) -> torch.Tensor:
        return self.holdings()[self.rank]
