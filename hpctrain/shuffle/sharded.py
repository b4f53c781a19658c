"""Sharded placement: each rank reads and stores only its part, reshuffling moves the samples.

A rank reads its block of the initial partition (iid: file order; label-skew: sorted by
label). Global shuffling also stores the tail of ``N % K`` samples, one on each of the first
ranks, so every epoch can draw from the whole set; its order is the replicated one exactly.
Partial(q) sends ``round(q * n)`` samples per rank along random derangements of the ranks,
so every rank receives as many as it sends. Local shuffling moves nothing.
"""

from __future__ import annotations

import argparse
import time

import torch

from hpctrain import data
from hpctrain.shuffle import order
from hpctrain.shuffle.exchange import exchange
from hpctrain.shuffle.options import DEFAULT_CHUNK_MB, parse_strategy
from hpctrain.shuffle.train_data import TrainData


def _cat(a: data.Dataset, b: data.Dataset) -> data.Dataset:
    return data.Dataset(a.name, torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]),
                        torch.cat([a.ids, b.ids]), a.num_classes)


def _head(d: data.Dataset, n: int) -> data.Dataset:
    return data.Dataset(d.name, d.images[:n], d.labels[:n], d.ids[:n], d.num_classes)


class ShardedTrainData(TrainData):
    """This rank's shard, exchanged with the other ranks' as the strategy requires."""

    def __init__(self, args: argparse.Namespace, comm) -> None:
        super().__init__()
        self.comm = comm
        self.ranks, self.rank = (1, 0) if comm is None else (comm.Get_size(), comm.Get_rank())
        self.strategy, self.q = parse_strategy(args.shuffle)
        self.seed = args.seed
        self.dataset, self.data_dir = args.dataset, getattr(args, "data_dir", None)
        chunk_mb = getattr(args, "shuffle_chunk_mb", DEFAULT_CHUNK_MB)
        self.chunk_bytes = int(chunk_mb * 2**20)
        self.num_samples = data.size(self.dataset, "train", self.data_dir)
        self.samples_per_rank = self.num_samples // self.ranks
        labels = None
        if getattr(args, "partition", "iid") == "label-skew":
            labels = data.load_labels(self.dataset, "train", self.data_dir)
        self.partition = order.partition(self.num_samples, self.ranks, labels)
        self.held = self._initial_shard()
        self.input_shape, self.num_classes = self.held.shape, self.held.num_classes
        self._done = -1  # last epoch whose exchange this holding reflects (partial)

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
        return self.held.subset(perm)

    def _timed(self, step, epoch: int) -> None:
        start = time.perf_counter()
        self._bytes_moved += step(epoch)
        self._exchange_s += time.perf_counter() - start

    def _exchange(self, rows: torch.Tensor, dest: torch.Tensor) -> tuple[data.Dataset, int]:
        if self.comm is None:
            return self.held.subset(rows), 0
        return exchange(self.comm, self.held, rows, dest, self.chunk_bytes)

    def _global(self, epoch: int) -> int:
        """Deal this epoch's permutation out: position p goes to rank p % K (the tail beyond
        ``n * K`` to rank ``p - n * K``), and each rank sorts what it gets by position."""
        n, ranks = self.samples_per_rank, self.ranks
        perm = order.global_permutation(self.seed, epoch, self.num_samples)
        where = torch.empty_like(perm)
        where[perm] = torch.arange(len(perm))
        pos = where[self.held.ids]
        dest = torch.where(pos < n * ranks, pos % ranks, pos - n * ranks)
        got, sent = self._exchange(torch.arange(len(self.held)), dest)
        self.held = got.subset(torch.argsort(where[got.ids]))
        return sent

    def _partial(self, epoch: int) -> int:
        """Send ``round(q n)`` random samples along the epoch's routes; append what arrives."""
        n = len(self.held)
        m = order.moved_count(self.q, n, self.ranks)
        if m == 0:
            return 0
        routes = order.partial_routes(self.seed, epoch, self.ranks, m)
        sel = order.partial_selection(self.seed, epoch, self.rank, n, m)
        got, sent = self._exchange(sel, routes[:, self.rank])
        keep = torch.ones(n, dtype=torch.bool)
        keep[sel] = False
        self.held = _cat(self.held.subset(keep.nonzero().flatten()), got)
        return sent
