"""Sharded global reshuffle: exchange throughput per rank against a raw Alltoallv.

Each epoch the sharded global reshuffle moves every sample (image, label, id) to the rank that
consumes it and puts it in consumption order. The baseline is one ``Alltoallv`` of exactly
the same number of bytes between the same pairs of ranks, from and into contiguous
buffers, measured in the same run, alternating with the reshuffle. Throughput is bytes a
rank sends to other ranks per second (MB = 10^6 bytes).

A reshuffle cannot be a bare Alltoallv: a rank's samples for one destination are scattered
through its holding (gather) and arrive interleaved with other ranks' (scatter). So the run
also times that floor, the raw Alltoallv plus a gather and a scatter of the rank's whole
holding (same rows, reused buffers), and reports the reshuffle against it too, with the
reshuffle's time split into its phases (``Exchanger.PHASES``) next to the raw Alltoallv's.

Every epoch moves the same data: the samples' destinations are a pure function of ``--seed``
and the epoch, so a rerun with the same options sends the same bytes between the same ranks.
An epoch's MB/s per rank is the MB a rank sent (the mean over the ranks) over the time the
slowest rank took (each timed from a barrier: a collective ends when its last rank is done);
the figures are the median over the epochs, the JSON has their min and max too
(``spread_mb_s_per_rank``), each rank's own medians (``per_rank``), and the phases' ms (the
mean over the ranks of each rank's median).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

from hpctrain import bench, comm, data, options, paths, userdata
from hpctrain.errors import UsageError
from hpctrain.metrics import write_json_atomic
from hpctrain.shuffle import TrainDataSpec, make_train_data, order
from hpctrain.shuffle.exchange import PHASES
from hpctrain.shuffle.options import DEFAULT_CHUNK_MB, PARTITIONS
from hpctrain.shuffle.sharded import ShardedTrainData

DESCRIPTION = ("Sharded global reshuffle, MB/s per rank, against a raw Alltoallv of the same "
               "bytes. The reshuffle moves a data set's samples between the ranks (chunked "
               "Alltoallv, gather and reorder included); its baselines, measured in the same "
               "run: the raw Alltoallv between contiguous buffers, and that plus a local gather "
               "and scatter of the same rows; run with mpirun -np 2 or more.")
THREAD_LEVEL = "serialized"
GOAL = 0.8  # the reshuffle's MB/s at least this fraction of the raw Alltoallv's
_META_BYTES = 16  # int64 label and id travel with each image
_RATES = ("reshuffle_mb_s", "raw_mb_s", "raw_plus_copies_mb_s")  # a rank's per_rank entry


def add_arguments(parser) -> None:
    parser.add_argument("--dataset", default="fashion-mnist", type=userdata.dataset_name,
                        help="the data set whose training samples are reshuffled: one of "
                             f"{', '.join(data.DATASETS)} (synthetic needs no files), or your "
                             "own, as train takes it (npz:FILE, imagefolder:DIR, "
                             "MODULE:CALLABLE, ./FILE.py:CALLABLE)")
    parser.add_argument("--data-dir", type=_folder, default=None,
                        help="folder with the data set's files (default: $HPCTRAIN_DATA, then "
                             "the system folder)")
    parser.add_argument("--partition", default="iid", choices=PARTITIONS,
                        help="initial split over the ranks: iid (the samples' order: a "
                             "built-in set's file order; an npz file's, a loader's or an image "
                             "folder's training samples in a fixed pseudo-random order, seed 0) "
                             "or label-skew (sorted by label): only the first exchange, the "
                             "untimed warm-up, starts from it (its bytes reported apart; a "
                             "global shuffle moves about (K-1)/K of the data from any split)")
    parser.add_argument("--epochs", type=bench.at_most(options.at_least(1), options.HUGE),
                        default=10,
                        help="timed reshuffles (and as many raw runs), after one warm-up")
    parser.add_argument("--shuffle-chunk-mb",
                        type=bench.at_most(options.positive(float), options.HUGE),
                        default=DEFAULT_CHUNK_MB,
                        help="at most this many MiB (2^20 bytes) sent per rank per exchange "
                             "round")
    parser.add_argument("--seed", type=_seed, default=0,
                        help="seeds each epoch's permutation of the samples")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the figures to this JSON file (rank 0)")


def _folder(text: str) -> str:
    """A folder that exists; not "" (which would be the working folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty: give a folder")
    if problem := paths.too_long(text):  # was is_dir's OSError (ENAMETOOLONG), exit 1
        raise argparse.ArgumentTypeError(f"{paths.shortened(text)}: {problem}")
    return options.existing_dir(text)


def _seed(text: str) -> int:
    """A whole number torch's generators take (64 bits, as train's --seed)."""
    value = options.whole(text)  # 1e3 as train's --seed reads it
    if not -2**63 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [-2**63, 2**63 - 1], got {text}")
    return value


def _raw_alltoallv(world, counts: np.ndarray, row_bytes: int) -> float:
    """Seconds for one Alltoallv of ``counts[s, d]`` rows of ``row_bytes`` (contiguous)."""
    MPI = comm.mpi()
    me = world.Get_rank()
    send, recv = counts[me], np.ascontiguousarray(counts[:, me])
    # Both buffers touched before the clock starts, as the reshuffle's reused buffers are.
    sbuf = np.ones((max(1, int(send.sum())), row_bytes), np.uint8)
    rbuf = np.ones((max(1, int(recv.sum())), row_bytes), np.uint8)
    row = MPI.BYTE.Create_contiguous(row_bytes).Commit()
    displ = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in (send, recv)]
    try:
        world.Barrier()
        start = time.perf_counter()
        world.Alltoallv([sbuf, (send, displ[0]), row], [rbuf, (recv, displ[1]), row])
        return time.perf_counter() - start
    finally:
        row.Free()


def per_epoch_mean(per_rank: list[list[float]]) -> list[float]:
    """Each epoch's mean over the ranks of ``per_rank[rank][epoch]`` (the MB a rank sent)."""
    return [statistics.fmean(epoch) for epoch in zip(*per_rank, strict=True)]


def _copies(images: torch.Tensor, seed: int) -> float:
    """Seconds to gather all rows of ``images`` in a random order and scatter them back in
    another: the local data movement a reshuffle needs beyond the Alltoallv."""
    flat = images.reshape(len(images), -1)
    g = torch.Generator().manual_seed(seed)
    pick, put = torch.randperm(len(flat), generator=g), torch.randperm(len(flat), generator=g)
    buf, out = torch.ones_like(flat), torch.ones_like(flat)
    start = time.perf_counter()
    torch.index_select(flat, 0, pick, out=buf)
    out.numpy()[put.numpy()] = buf.numpy()
    return time.perf_counter() - start


def validate(args: argparse.Namespace) -> None:
    """Checks beyond the options' own, before MPI starts: the ranks and the data's files."""
    bench.check_mpi_launch("shuffle")
    ranks = comm.env_size()
    if ranks < 2:
        raise UsageError(f"the shuffle benchmark needs >= 2 ranks (mpirun -np 4), not {ranks}")
    data.check_data_dir(args.dataset, args.data_dir)  # synthetic reads no folder
    samples = data.size(args.dataset, "train", args.data_dir)  # its files are there
    if ranks > samples:
        raise UsageError(f"{ranks} ranks but only {samples} training samples in {args.dataset}")


def run(args: argparse.Namespace) -> dict:
    """Alternate raw and reshuffle ``args.epochs`` times; return medians and their ratio."""
    start = bench.started()
    world = comm.world()
    ranks, me = world.Get_size(), world.Get_rank()

    spec = TrainDataSpec(dataset=args.dataset, data_dir=args.data_dir, seed=args.seed,
                         shuffle="global", data_placement="sharded", partition=args.partition,
                         shuffle_chunk_mb=args.shuffle_chunk_mb)
    td = make_train_data(spec, world)
    assert isinstance(td, ShardedTrainData)  # data_placement sharded
    exchanger = td.exchanger
    assert exchanger is not None  # with a communicator
    row_bytes = 4 * int(np.prod(td.input_shape)) + _META_BYTES
    td.epoch(0)  # warm-up: allocates the exchange's buffers; deals the --partition split
    first = world.allgather(td.stats()["bytes_moved"])  # what dealing that split moved
    shuffle_mbs, raw_mbs, floor_mbs, sent_mb = [], [], [], []
    times: dict[str, list[float]] = {"reshuffle": [], "raw": [], "floor": []}  # s per epoch
    # planning: the rest (destinations)
    phase_s: dict[str, list[float]] = {p: [] for p in (*PHASES, "planning", "raw")}
    for epoch in range(1, args.epochs + 1):
        dest, _ = order.global_destinations(args.seed, epoch, td.num_samples, ranks, td.held.ids)
        mine = torch.bincount(dest, minlength=ranks).numpy().astype(np.int64)
        counts = np.empty((ranks, ranks), np.int64)
        world.Allgather(mine, counts)
        sent = int(mine.sum() - mine[me]) * row_bytes
        raw_s = _raw_alltoallv(world, counts, row_bytes)
        world.Barrier()
        copies_s = _copies(td.held.images, epoch)
        before, seconds = td.stats(), dict(exchanger.seconds)
        world.Barrier()
        td.epoch(epoch)
        after = td.stats()
        for p in PHASES:
            phase_s[p].append(exchanger.seconds[p] - seconds[p])
        total_s = after["exchange_s"] - before["exchange_s"]
        phase_s["planning"].append(total_s - sum(phase_s[p][-1] for p in PHASES))
        phase_s["raw"].append(raw_s)
        if after["bytes_moved"] - before["bytes_moved"] != sent:
            raise RuntimeError("the reshuffle moved other bytes than the raw baseline")
        raw_mbs.append(sent / raw_s / 1e6)
        floor_mbs.append(sent / (raw_s + copies_s) / 1e6)
        shuffle_mbs.append(sent / total_s / 1e6)
        sent_mb.append(sent / 1e6)
        for key, value in zip(times, (total_s, raw_s, raw_s + copies_s), strict=True):
            times[key].append(value)
    # Each rank's own medians, for the JSON's per_rank; the figures are each epoch's MB sent
    # per rank (the mean over the ranks) over the epoch's slowest rank's time.
    _, per_rank = bench.mean_over_ranks(world, dict(zip(
        _RATES, map(statistics.median, (shuffle_mbs, raw_mbs, floor_mbs)), strict=True)))
    slow = bench.slowest_over_ranks(world, times)
    sent_epoch = per_epoch_mean(world.allgather(sent_mb))
    spreads = {rate: bench.spread([mb / t for mb, t in zip(sent_epoch, slow[key], strict=True)])
               for rate, key in zip(_RATES, times, strict=True)}
    shuffle_rate, raw_rate, floor_rate = (spreads[k]["median"] for k in _RATES)
    phases_ms, _ = bench.mean_over_ranks(
        world, {p: statistics.median(v) * 1e3 for p, v in phase_s.items()})
    result = {"benchmark": "shuffle", "ranks": ranks, "dataset": args.dataset,
              "partition": args.partition, "samples": td.num_samples,
              "btl": os.environ.get("OMPI_MCA_btl", "default"),
              "sample_bytes": row_bytes, "chunk_mb": args.shuffle_chunk_mb,
              "epochs": args.epochs, "mb_sent_per_rank": statistics.fmean(sent_epoch),
              "first_mb_sent_per_rank": statistics.fmean(first) / 1e6,
              "reshuffle_mb_s_per_rank": shuffle_rate, "raw_alltoallv_mb_s_per_rank": raw_rate,
              "ratio": shuffle_rate / raw_rate,
              "raw_plus_copies_mb_s_per_rank": floor_rate,
              "ratio_to_floor": shuffle_rate / floor_rate, "spread_mb_s_per_rank": spreads,
              "phases_ms": phases_ms,
              "per_rank": per_rank,
              "machine": bench.machine(start)}
    if me == 0:
        print(bench.header(result["machine"]))
        print(f"sharded global reshuffle, {ranks} ranks, {args.dataset} ({td.num_samples} "
              f"samples, {row_bytes} B each), {result['mb_sent_per_rank']:.1f} MB sent per "
              f"rank per epoch (mean over ranks), median of {args.epochs} epochs, each timed "
              f"by its slowest rank:\n"
              f"  reshuffle {shuffle_rate:9.1f} MB/s per rank\n"
              f"  raw       {raw_rate:9.1f} MB/s per rank\n"
              f"  ratio     {result['ratio']:9.2f}  "
              f"({bench.goal(f'goal >= {GOAL}', result['ratio'] >= GOAL)})\n"
              f"  raw + gather + scatter {floor_rate:9.1f} MB/s per rank; reshuffle / that "
              f"{result['ratio_to_floor']:.2f}\n"
              f"  ms per epoch: " + ", ".join(f"{p} {phases_ms[p]:.1f}"
                                              for p in (*PHASES, "planning"))
              + f" (raw Alltoallv {phases_ms['raw']:.1f}; planning: the epoch's destinations "
              f"and the rest)\n"
              f"  the warm-up's exchange from the {args.partition} split (not timed): "
              f"{result['first_mb_sent_per_rank']:.1f} MB sent per rank", flush=True)
        if args.json:
            write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":  # the same as ``hpctrain bench shuffle``
    from hpctrain.cli import main

    main(["bench", "shuffle", *sys.argv[1:]])
