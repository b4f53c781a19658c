"""Sharded placement: each rank reads and stores only its part, reshuffling moves the samples.

A rank reads its block of the initial partition (iid: the samples' order; label-skew: sorted by
label). Global shuffling also stores the tail of ``N % K`` samples, one on each of the first
ranks, so every epoch can draw from the whole set; its order is the replicated one exactly.
Partial(q) sends ``floor(q * n + 1/2)`` samples per rank (q n rounded half up, not Python's
``round``: :func:`order.moved_count`) along random derangements of the ranks,
so every rank receives as many as it sends. Local shuffling moves nothing.
"""

from __future__ import annotations

import time

import torch

from hpctrain import data
from hpctrain.shuffle import order
from hpctrain.shuffle.exchange import Exchanger, empty_like
from hpctrain.shuffle.options import TrainDataSpec, parse_strategy
from hpctrain.shuffle.train_data import TrainData


def _head(d: data.Dataset, n: int) -> data.Dataset:
    return data.Dataset(d.name, d.images[:n], d.labels[:n], d.ids[:n], d.num_classes)


class ShardedTrainData(TrainData):
    """This rank's shard, exchanged with the other ranks' as the strategy requires."""

    def __init__(self, spec: TrainDataSpec, comm) -> None:
        super().__init__()
        self.comm = comm
        self.ranks: int
        self.rank: int
        self.ranks, self.rank = (1, 0) if comm is None else (comm.Get_size(), comm.Get_rank())
        self.strategy, self.q = parse_strategy(spec.shuffle)
        self.seed = spec.seed
        self.dataset, self.data_dir = spec.dataset, spec.data_dir
        self.chunk_bytes = int(spec.shuffle_chunk_mb * 2**20)
        self.num_samples = data.size(self.dataset, "train", self.data_dir)
        self.samples_per_rank = self.num_samples // self.ranks
        labels = None
        if spec.partition == "label-skew":
            labels = data.load_labels(self.dataset, "train", self.data_dir)
        self.partition = order.partition(self.num_samples, labels)
        self.held = self._initial_shard()
        self.input_shape, self.num_classes = self.held.shape, self.held.num_classes
        self._done = -1  # last epoch whose exchange this holding reflects (partial)
        # Exchanges write into a second holding, then the two swap: no fresh pages each epoch.
        self._back: data.Dataset | None = None
        self.exchanger = None if comm is None else Exchanger(comm, self.chunk_bytes)

    def _initial_shard(self) -> data.Dataset:
        mine = order.block(self.partition, self.ranks, self.rank)
        if self.strategy == "global":
            mine = torch.cat([mine, order.spare(self.partition, self.ranks, self.rank)])
        return data.load_indices(self.dataset, "train", mine, self.data_dir)

    def epoch(self, epoch: int) -> data.Dataset:
        if self.strategy == "global":
            self._timed(self._global, epoch)
            return _head(self.held, self.samples_per_rank)
        if self.strategy == "partial":
            if epoch < self._done:
                self.held, self._done = self._initial_shard(), -1
            for e in range(self._done + 1, epoch + 1):
                self._timed(self._partial, e)
            self._done = epoch
        perm = order.local_permutation(self.seed, epoch, self.rank, len(self.held))
        return self._gather(self.held, perm)

    def _timed(self, step, epoch: int) -> None:
        start = time.perf_counter()
        sent = step(epoch)
        self._exchanges.append({"epoch": epoch, "bytes_moved": sent,
                                "exchange_s": time.perf_counter() - start})

    def _back_holding(self) -> data.Dataset:
        if self._back is None:
            self._back = empty_like(self.held)
        return self._back

    def _exchange(self, rows: torch.Tensor, dest: torch.Tensor, place) -> int:
        """Move ``held[rows]`` to ranks ``dest`` into the back holding, then swap holdings."""
        if self.exchanger is None:
            got = self.held.subset(rows)
            where = place(got.ids)
            for field in ("images", "labels", "ids"):
                getattr(self._back_holding(), field)[where] = getattr(got, field)
            sent = 0
        else:
            sent = self.exchanger.move(self.held, rows, dest, self._back_holding(), place)
        self.held, self._back = self._back_holding(), self.held  # made above
        return sent

    def _global(self, epoch: int) -> int:
        """Deal this epoch's permutation out: the sample at position p goes to rank
        ``p % K``, row ``p // K`` (the tail beyond ``n * K`` to the extra row ``n``)."""
        n, ranks = self.samples_per_rank, self.ranks
        every = torch.arange(self.num_samples)
        dest, pos = order.global_destinations(self.seed, epoch, self.num_samples, ranks, every)
        row = torch.where(pos < n * ranks, pos // ranks, n)  # by id: its row on its rank
        return self._exchange(torch.arange(len(self.held)), dest[self.held.ids],
                              lambda ids: row[ids])

    def _partial(self, epoch: int) -> int:
        """Send ``floor(q n + 1/2)`` random samples along the epoch's routes; the kept ones stay in
        order at the front, the arrivals follow."""
        n = len(self.held)
        m = order.moved_count(self.q, n, self.ranks)
        if m == 0:
            return 0
        routes = order.partial_routes(self.seed, epoch, self.ranks, m)
        sel = order.partial_selection(self.seed, epoch, self.rank, n, m)
        keep = torch.ones(n, dtype=torch.bool)
        keep[sel] = False
        kept = keep.nonzero().flatten()
        for field in ("images", "labels", "ids"):
            torch.index_select(getattr(self.held, field), 0, kept,
                               out=getattr(self._back_holding(), field)[:n - m])
        return self._exchange(sel, routes[:, self.rank], lambda ids: torch.arange(n - m, n))
