"""Samplers for data replicated on every rank: drop-ins for torch's ``DistributedSampler``.

Each is a ``torch.utils.data.Sampler`` with ``DistributedSampler``'s signature (``dataset`` or
its length, ``num_replicas``, ``rank``, ``shuffle``, ``seed``, ``drop_last``) and methods
(``set_epoch``, ``len``, iteration), and yields indices into the whole training set. The order
depends only on the seed, the epoch, the number of ranks and the rank.

- ``drop_last=True``: every rank gets ``N // K`` indices per epoch and the tail is dropped
  (what hpctrain's training loop uses).
- ``drop_last=False`` (torch's default): every rank gets ``ceil(N / K)`` and every sample is
  used; the global sampler pads the epoch's permutation from its start before dealing it out,
  as ``DistributedSampler`` does (so a rank may get a sample dealt to another), the local and
  partial ones pad a rank's list with its own first index (below).

:class:`GlobalShuffleSampler` is ``DistributedSampler`` index for index in all four
combinations of ``shuffle`` and ``drop_last``. The local and partial strategies keep a fixed
block per rank; ``drop_last=False`` gives the ``N % K`` tail samples one each to the first
ranks (they never move) and pads the others with their own first index.

World size and rank not given come from :func:`hpctrain.launch_env.replicas`: an initialised
torch.distributed, the launcher's environment (torchrun, Open MPI, PMI, a Slurm step) or MPI,
and an error if those disagree, never a silent single replica.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sized

import torch

from hpctrain import launch_env
from hpctrain.errors import UsageError, plural
from hpctrain.shuffle import order


class _Sampler(torch.utils.data.Sampler[int]):
    """``dataset`` is anything with a length, or the number of samples; ``num_replicas`` and
    ``rank`` default to the job's (:func:`hpctrain.launch_env.replicas`)."""

    def __init__(self, dataset: int | Sized, num_replicas: int | None = None,
                 rank: int | None = None, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__()
        if not isinstance(shuffle, bool):
            # Before DistributedSampler's signature the fourth argument was the seed.
            raise TypeError(f"shuffle must be True or False, not {shuffle!r} (the seed is "
                            "the fifth argument, or seed=, as in DistributedSampler)")
        # Any whole number counts samples (numpy's: np.count_nonzero(mask) had no len()).
        num_samples = int(dataset) if isinstance(dataset, (int, numbers.Integral)) \
            else len(dataset)
        self.num_replicas, self.rank = launch_env.replicas(num_replicas, rank)
        if num_samples < self.num_replicas:
            raise UsageError(f"{plural(num_samples, 'sample')} cannot feed "
                             f"{plural(self.num_replicas, 'rank')}")
        self.dataset, self.dataset_size = dataset, num_samples
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.num_samples = (num_samples // self.num_replicas if drop_last
                            else math.ceil(num_samples / self.num_replicas))
        self.total_size = self.num_samples * self.num_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def indices(self) -> torch.Tensor:
        """This rank's indices for the current epoch, in consumption order."""
        raise NotImplementedError


class GlobalShuffleSampler(_Sampler):
    """A fresh permutation of the whole data set each epoch (file order without ``shuffle``);
    rank r takes ``perm[r::K]``, padded as DistributedSampler pads: exactly its indices."""

    def indices(self) -> torch.Tensor:
        n, k = self.dataset_size, self.num_replicas
        if self.shuffle and self.drop_last:
            return order.global_indices(self.seed, self.epoch, n, k, self.rank)
        perm = order.global_permutation(self.seed, self.epoch, n) if self.shuffle \
            else torch.arange(n)
        return order.pad(perm, self.total_size)[self.rank:self.total_size:k]


class LocalShuffleSampler(_Sampler):
    """A fixed block per rank (file order, or sorted by ``labels`` for label-skew), reshuffled
    within the rank each epoch (kept in order without ``shuffle``)."""

    def __init__(self, dataset: int | Sized, num_replicas: int | None = None,
                 rank: int | None = None, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, *, labels: torch.Tensor | None = None) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle, seed, drop_last)
        if labels is not None and len(labels) != self.dataset_size:
            raise UsageError(f"{len(labels)} labels for {self.dataset_size} samples")
        self.partition = order.partition(self.dataset_size, labels)

    def block(self) -> torch.Tensor:
        """This rank's fixed block of ``N // K`` samples this epoch."""
        return order.block(self.partition, self.num_replicas, self.rank)

    def holding(self) -> torch.Tensor:
        """The samples this rank holds this epoch, before its local reshuffle: its block, and
        without ``drop_last`` its tail sample (ranks below ``N % K``)."""
        held = self.block()
        if self.drop_last:
            return held
        return torch.cat([held, order.spare(self.partition, self.num_replicas, self.rank)])

    def indices(self) -> torch.Tensor:
        held = self.holding()
        if self.shuffle:
            held = held[order.local_permutation(self.seed, self.epoch, self.rank, len(held))]
        return order.pad(held, self.num_samples)


class PartialShuffleSampler(LocalShuffleSampler):
    """Local shuffling plus, each epoch, every rank sending a fraction ``q`` of its block to
    random other ranks (receiving as many); partial(0) is local, partial(1) moves them all.
    ``shuffle=False`` keeps each holding in its order (the exchanges still happen).

    The fraction comes first; ``functools.partial(PartialShuffleSampler, q)`` takes
    DistributedSampler's arguments. Holdings carry over from epoch to epoch, so a later epoch
    replays the earlier exchanges (cached: moving forward one epoch at a time costs one
    exchange).
    """

    def __init__(self, q: float, dataset: int | Sized, num_replicas: int | None = None,
                 rank: int | None = None, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, *, labels: torch.Tensor | None = None) -> None:
        if not 0.0 <= q <= 1.0:
            raise UsageError(f"partial shuffle fraction {q} outside [0, 1]")
        super().__init__(dataset, num_replicas, rank, shuffle, seed, drop_last, labels=labels)
        self.q = q
        self._cached: tuple[int, list[torch.Tensor]] | None = None

    def holdings(self) -> list[torch.Tensor]:
        """Every rank's block this epoch, after the epoch's exchange."""
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

    def block(self) -> torch.Tensor:
        return self.holdings()[self.rank]
