"""Gradient allreduce per step: the mpi backend and Horovod against a raw mpi4py Allreduce.

For each model size, one iteration times, in turn and after a barrier each: the model's
backward alone (no distributed optimizer); backward plus ``synchronize()`` with the mpi
backend's DistributedOptimizer (with the Iallreduce algorithm hpctrain selects, and with
Open MPI's default); the same with Horovod's; and one in-place ``Allreduce`` of a flat float32
buffer of the same bytes. A backend's allreduce time is its backward+synchronize minus the
backward alone of the same iteration: everything distribution adds to a step (hooks, packing,
communication, averaging, waiting), with the overlap with backward credited to it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

import hpctrain.sync as sync
from hpctrain import comm
from hpctrain.errors import UsageError
from hpctrain.metrics import write_json_atomic
from hpctrain.sync import collectives, horovod_backend, nbc_tuning
from hpctrain.sync.buckets import DEFAULT_BUCKET_BYTES

DESCRIPTION = ("Gradient allreduce time per training step for 1M- and 10M-parameter MLPs: "
               "hpctrain's mpi backend (fused buckets allreduced during backward) and Horovod "
               "against a raw mpi4py Allreduce of the same bytes in one flat float32 buffer, "
               "measured in the same run (median over repeats); goal mpi/raw <= 1.1.")
THREAD_LEVEL = "multiple"
GOAL = 1.1
_LAYERS = 4


def add_arguments(parser) -> None:
    parser.add_argument("--params", default="1e6,1e7",
                        help="comma-separated model sizes (parameters, approximately)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per backward")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations")
    parser.add_argument("--repeats", type=int, default=30, help="timed iterations, median kept")
    parser.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_BYTES / 2**20,
                        help="mpi backend fusion bucket size (MiB)")
    parser.add_argument("--no-horovod", action="store_true", help="leave Horovod out")
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")


def _width(params: int) -> int:
    return max(1, round(math.sqrt(params / _LAYERS)))


def mlp(params: int) -> nn.Module:
    """``_LAYERS`` square ReLU layers with about ``params`` parameters (deterministic)."""
    width = _width(params)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(_LAYERS):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in text.split(",")]
    except ValueError:
        raise UsageError(f"--params {text!r}: expected comma-separated numbers") from None
    if not sizes or min(sizes) < _LAYERS:
        raise UsageError(f"--params {text!r}: each size must be at least {_LAYERS}")
    return sizes


def _validate(args: argparse.Namespace) -> list[int]:
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0 or args.bucket_mb <= 0:
        raise UsageError("--batch-size and --repeats must be >= 1, --warmup >= 0, "
                         "--bucket-mb > 0")
    return _sizes(args.params)


class _Variant:
    """One way of doing a step's gradient exchange, timed as backward (+ synchronize)."""

    def __init__(self, name: str, params: int, wrap=None, algorithm: str | None = None):
        self.name, self.algorithm = name, algorithm
        self.model = mlp(params)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.0)
        if wrap is not None:
            self.optimizer = wrap(self.optimizer, self.model.named_parameters())
        self.seconds: list[float] = []

    def step(self, world, x: torch.Tensor, timed: bool) -> None:
        if self.algorithm:
            nbc_tuning.set_iallreduce_algorithm(self.algorithm)
        self.optimizer.zero_grad()
        loss = self.model(x).square().mean()
        world.Barrier()
        start = time.perf_counter()
        loss.backward()
        if hasattr(self.optimizer, "synchronize"):
            self.optimizer.synchronize()
        elapsed = time.perf_counter() - start
        if timed:
            self.seconds.append(elapsed)


def _raw_allreduce(world, buffer: np.ndarray) -> float:
    MPI = comm.mpi()
    world.Barrier()
    start = time.perf_counter()
    world.Allreduce(MPI.IN_PLACE, buffer)
    return time.perf_counter() - start


def _mpi_variants(params: int, bucket_bytes: int, tuned: str) -> list[_Variant]:
    def wrap(opt, named):
        return sync.DistributedOptimizer(opt, named, bucket_bytes=bucket_bytes)

    if tuned not in nbc_tuning.ALGORITHMS:
        return [_Variant("mpi backend", params, wrap)]
    # hpctrain chose the Iallreduce algorithm: show Open MPI's own choice too.
    return [_Variant("mpi backend", params, wrap, tuned),
            _Variant("mpi backend, Open MPI default Iallreduce", params, wrap, "ignore")]


def _horovod_variants(params: int, hvd) -> list[_Variant]:
    return [_Variant("horovod", params,
                     lambda opt, named: hvd.DistributedOptimizer(opt, named_parameters=named))]


def _phase(world, params: int, args: argparse.Namespace, variants: list[_Variant],
           phase: str, with_raw: bool) -> dict[str, float]:
    """Interleave backward alone, ``variants`` (and the raw Allreduce); this rank's medians."""
    base = _Variant("backward alone", params)
    width = base.model[0].in_features
    x = torch.randn(args.batch_size, width, generator=torch.Generator().manual_seed(world.rank))
    flat = np.ones(sum(p.numel() for p in base.model.parameters()), np.float32)
    raw: list[float] = []
    for i in range(args.warmup + args.repeats):
        timed = i >= args.warmup
        for v in [base, *variants]:
            v.step(world, x, timed)
        if with_raw:
            seconds = _raw_allreduce(world, flat)
            if timed:
                raw.append(seconds)
    medians = {f"backward alone, {phase} phase": statistics.median(base.seconds)}
    if with_raw:
        medians["raw Allreduce"] = statistics.median(raw)
    for v in variants:
        medians[v.name] = statistics.median(t - b for t, b in
                                            zip(v.seconds, base.seconds, strict=True))
    return medians


def _row(world, params: int, medians: dict[str, float], buckets: int) -> dict:
    per_rank = world.allgather(medians)  # per-rank medians, averaged over the ranks
    ms = {k: 1e3 * statistics.fmean(r[k] for r in per_rank) for k in medians}
    width = _width(params)
    n_params = _LAYERS * (width * width + width)
    return {"params": n_params, "bytes": 4 * n_params, "width": width, "buckets": buckets,
            "ms": ms, "ratio_to_raw": {k: ms[k] / ms["raw Allreduce"] for k in ms
                                       if k != "raw Allreduce" and not k.startswith("backward")}}


def run(args: argparse.Namespace) -> dict:
    """Measure every model size; rank 0 prints the table (and writes ``args.out``).

    Horovod runs in a second phase: its background thread polls MPI and would slow the others.
    """
    sizes = _validate(args)
    world = comm.world()
    bucket_bytes = int(args.bucket_mb * 2**20)
    sync.init(backend="mpi")
    tuned = collectives.world().iallreduce_algorithm
    medians, buckets = [], []
    try:
        for p in sizes:
            variants = _mpi_variants(p, bucket_bytes, tuned)
            medians.append(_phase(world, p, args, variants, "mpi", with_raw=True))
            buckets.append(len(variants[0].optimizer.bucket_sizes))
        if tuned in nbc_tuning.ALGORITHMS:
            nbc_tuning.set_iallreduce_algorithm(tuned)
    finally:
        sync.shutdown()
    horovod_note = "left out (--no-horovod)"
    if not args.no_horovod:
        try:
            hvd = horovod_backend.init()
        except UsageError as e:
            horovod_note = str(e)
        else:
            horovod_note = "horovod " + sys.modules["horovod"].__version__
            try:
                for m, p in zip(medians, sizes, strict=True):
                    m.update(_phase(world, p, args, _horovod_variants(p, hvd), "horovod",
                                    with_raw=False))
            finally:
                hvd.shutdown()
    rows = [_row(world, p, m, b) for p, m, b in zip(sizes, medians, buckets, strict=True)]
    result = {"benchmark": "allreduce", "ranks": world.Get_size(), "batch_size": args.batch_size,
              "warmup": args.warmup, "repeats": args.repeats, "bucket_mb": args.bucket_mb,
              "iallreduce_algorithm": tuned, "horovod": horovod_note,
              "mpi_library": comm.library_info()["library"], "goal_mpi_over_raw": GOAL,
              "models": rows}
    if world.Get_rank() == 0:
        print(_table(result), flush=True)
        if args.out:
            write_json_atomic(args.out, result)
    return result


def _table(result: dict) -> str:
    names = list(result["models"][0]["ms"])
    lines = [f"gradient allreduce per step, {result['ranks']} ranks, batch "
             f"{result['batch_size']}, median of {result['repeats']} (after {result['warmup']} "
             f"warm-up), ms; mpi backend Iallreduce: {result['iallreduce_algorithm']}; "
             f"{result['horovod']}"]
    header = f"{'':44}" + "".join(f"{m['params'] / 1e6:>10.2f}M" for m in result["models"])
    lines.append(header)
    lines.append(f"{'  buckets (mpi backend)':44}" +
                 "".join(f"{m['buckets']:>11d}" for m in result["models"]))
    for name in names:
        lines.append(f"  {name:42}" + "".join(f"{m['ms'][name]:>11.2f}"
                                              for m in result["models"]))
    for name in result["models"][0]["ratio_to_raw"]:
        lines.append(f"  {name + ' / raw':42}" +
                     "".join(f"{m['ratio_to_raw'][name]:>11.2f}" for m in result["models"]))
    lines.append(f"goal: mpi backend / raw <= {GOAL}")
    return "\n".join(lines)


if __name__ == "__main__":
    comm.install_abort_on_error()
    _parser = argparse.ArgumentParser(prog="python -m hpctrain.bench.allreduce",
                                      description=DESCRIPTION)
    add_arguments(_parser)
    _args = _parser.parse_args()
    comm.init(THREAD_LEVEL)
    torch.set_num_threads(1)
    run(_args)
