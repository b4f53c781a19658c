"""Gradient allreduce per step: the mpi backend and Horovod against a raw mpi4py Allreduce.

Each phase interleaves, iteration by iteration and after a barrier each, the model's backward
alone and backward plus a gradient exchange; a variant's time is its backward+exchange minus
the same iteration's backward alone: everything distribution adds to a step (hooks, packing,
communication, averaging, waiting for the slowest rank), with any overlap with backward
credited to it. Every rank's time of an iteration is gathered and the slowest rank's kept (a
step, like a collective, ends when its last rank is done); the table shows the median over the
iterations, the JSON also their min and max (``spread_ms``), and the raw Allreduce's algorithm
and bus bandwidth as nccl-tests define them (:func:`bandwidth`). Variants: the mpi backend's
DistributedOptimizer (Iallreduce algorithm as hpctrain selects it; in a phase of its own,
Open MPI's default); Horovod's (in a phase of its own: its background thread polls MPI and
would slow the others); and the baselines, one
in-place ``Allreduce`` of a flat float32 buffer of the same bytes, alone after a barrier, and
after the backward (so that it waits for the slowest rank like a step does). ``--torch`` adds
the torch backend (torch.distributed: gloo on CPU, NCCL for CUDA tensors where each rank has
a GPU of its own). ``--adasum`` adds ``DistributedOptimizer(op=Adasum)``, the mpi backend's and
Horovod's, whose exchange is ``step()``: the local step and the Adasum of the parameters'
changes. ``--device cuda`` puts the models and batches on the GPU, the baselines' buffer too:
with an MPI that cannot read device memory, their Allreduce goes through pinned host memory
as the backends' does (copy out, Allreduce, copy back), so a ratio to them is what the
backend adds to the least a step must do; run it with ``--device cpu`` in the same
allocation for the GPU-against-CPU comparison.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
from torch import nn

import hpctrain.sync as sync
from hpctrain import bench, comm, devices, launch_env, nbc_tuning, options
from hpctrain.errors import UsageError
from hpctrain.metrics import write_json_atomic
from hpctrain.sync import collectives, horovod_backend
from hpctrain.sync.buckets import DEFAULT_BUCKET_BYTES

DESCRIPTION = ("Gradient allreduce per training step, hpctrain's mpi backend and Horovod against "
               "a raw mpi4py Allreduce of the same bytes. 1M- and 10M-parameter MLPs; the mpi "
               "backend allreduces fused buckets during backward, the raw Allreduce one flat "
               "float32 buffer; all measured in the same run (each iteration's slowest rank, "
               "median over repeats); the goal is the mpi backend at most 10% slower than the "
               "raw Allreduce.")
THREAD_LEVEL = "multiple"
GOAL = 1.1
RAW, RAW_AFTER = "raw Allreduce", "raw Allreduce after backward"
NOISE = 0.1  # RAW_AFTER below this fraction of a backward pass: no ratio to it
MPI_BACKEND, MPI_DEFAULT = "mpi backend", "mpi backend, Open MPI default Iallreduce"
HOROVOD = "horovod"
TORCH_BACKEND = "torch backend"
MPI_ADASUM, HOROVOD_ADASUM = "mpi backend, Adasum", "horovod, Adasum"
_LAYERS = 4


def add_arguments(parser) -> None:
    parser.add_argument("--params", type=options.number_list(_LAYERS), default="1e6,1e7",
                        help="comma-separated model sizes (parameters, approximately)")
    parser.add_argument("--batch-size", type=options.at_least(1), default=16,
                        help="rows per backward")
    parser.add_argument("--warmup", type=bench.at_most(options.at_least(0), options.HUGE),
                        default=5, help="untimed iterations")
    parser.add_argument("--repeats", type=bench.at_most(options.at_least(1), options.HUGE),
                        default=30, help="timed iterations, median kept")
    parser.add_argument("--bucket-mb", type=bench.at_most(options.positive(float), options.HUGE),
                        default=DEFAULT_BUCKET_BYTES / 2**20,
                        help="mpi backend fusion bucket size (MiB)")
    parser.add_argument("--keep-grads", action="store_true",
                        help="zero gradients in place (zero_grad(set_to_none=False)) instead of "
                        "freeing them: after the first step backward accumulates into the kept "
                        "gradients, which for the mpi backend are views of its buckets (packing "
                        "copies nothing); the baselines keep theirs too")
    parser.add_argument("--no-horovod", action="store_true", help="leave Horovod out")
    parser.add_argument("--torch", action="store_true",
                        help="also measure the torch backend (torch.distributed)")
    parser.add_argument("--adasum", action="store_true",
                        help="also measure DistributedOptimizer(op=Adasum), the mpi backend's "
                        "and Horovod's (its step() is the exchange)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where models and gradients live (cuda: GPU local rank mod GPUs)")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the figures to this JSON file (rank 0)")
    parser.add_argument("--out", dest="json", default=None, help=argparse.SUPPRESS)  # old name


def validate(args: argparse.Namespace) -> None:
    """Before MPI starts: a GPU must be there for --device cuda; a bucket holds a byte at
    least; the models and batches fit in memory; 2 ranks at least, 2^m for Adasum."""
    bench.check_mpi_launch("allreduce")
    if args.device == "cuda":
        try:
            devices.check("cuda")
        except UsageError as e:  # train's hint names its --device auto, which this one lacks
            raise UsageError(str(e).removesuffix(" or auto")) from None
    if int(args.bucket_mb * 2**20) < 1:
        raise UsageError(f"--bucket-mb {args.bucket_mb:g}: less than one byte (MiB are "
                         f"2**20 bytes)")
    # At least: the baseline's model and a variant's, each with its gradients, the flat
    # buffer of the raw Allreduce, and each layer's activations of the batch.
    need = {p: 4 * (5 * _LAYERS * (_width(p) ** 2 + _width(p))
                    + _LAYERS * args.batch_size * _width(p)) for p in args.params}
    largest = max(need, key=lambda p: need[p])
    have, where, sharing = None, "this machine has", None  # shared by the ranks on it
    if args.device == "cuda":  # ranks beyond the GPUs share them (rank k on GPU k % GPUs)
        gpus = torch.cuda.device_count()
        here = bench.ranks_here()
        mine = devices.gpu_index(devices.local_rank(), gpus)
        have = torch.cuda.get_device_properties(mine).total_memory
        where, sharing = "the GPU has", -(-here // gpus)
    bench.check_memory(f"--params {options.shown(largest)} with --batch-size "
                       f"{options.shown(args.batch_size)}", need[largest], have, where,
                       sharing=sharing)
    seat = launch_env.from_launcher()
    if seat is None or seat.size < 2:  # one rank: no exchange, a table of zeros and "met"
        raise UsageError(f"the allreduce benchmark needs >= 2 ranks (mpirun -np 2), not "
                         f"{seat.size if seat else 1}")
    if args.adasum and seat.size & (seat.size - 1):
        raise UsageError(f"--adasum needs a power-of-2 number of ranks, got {seat.size}")


def _width(params: int) -> int:
    try:
        return max(1, round(math.sqrt(params / _LAYERS)))
    except OverflowError:  # --params past float's range (1e400): validate's memory check
        return math.isqrt(params // _LAYERS)  # refuses it, where the division was exit 1


def mlp(params: int) -> nn.Sequential:
    """``_LAYERS`` square ReLU layers with about ``params`` parameters (deterministic)."""
    width = _width(params)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(_LAYERS):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class _Variant:
    """Backward, then ``exchange()`` (if any), timed from the barrier before backward."""

    def __init__(self, name: str, params: int, wrap=None, exchange=None,
                 device: str = "cpu", adasum: bool = False):
        self.name = name
        self.model = mlp(params).to(device)
        self._cuda = device != "cpu"
        self.optimizer = None
        if wrap is not None:
            self.optimizer = wrap(torch.optim.SGD(self.model.parameters(), lr=0.0),
                                  self.model.named_parameters())
            # Adasum reduces the update inside step() (lr 0: the changes are zeros, which
            # cost what any values do); the others' synchronize() waits for the gradients.
            exchange = self.optimizer.step if adasum else self.optimizer.synchronize
        self.exchange = exchange
        self.seconds: list[float] = []  # backward + exchange
        self.waits: list[float] = []  # exchange alone

    def step(self, world, x: torch.Tensor, timed: bool, set_to_none: bool) -> None:
        self.model.zero_grad(set_to_none=set_to_none)
        loss = self.model(x).square().mean()
        if self._cuda:  # the forward's kernels done, else the clock below counts them
            torch.cuda.synchronize()
        world.Barrier()
        start = time.perf_counter()
        loss.backward()
        if self._cuda:
            torch.cuda.synchronize()
        backward_done = time.perf_counter()
        if self.exchange:
            self.exchange()
            if self._cuda:
                torch.cuda.synchronize()
        end = time.perf_counter()
        if timed:
            self.seconds.append(end - start)
            self.waits.append(end - backward_done)


def raw_buffer(numel: int, device: str) -> devices.HostStage:
    """The raw baselines' flat buffer: zeros, which an in-place sum over any number of ranks
    leaves as they are. It was ones: every Allreduce multiplied them by the ranks (two per
    iteration), so that on 4 ranks the default 35 iterations overflowed float32 to inf after
    32, each iteration summing other values."""
    return devices.HostStage(torch.zeros(numel, device=device))


def _raw_exchange(world, stage: devices.HostStage) -> None:
    """One Allreduce of the gradients' bytes as the backends must move them from the device:
    through pinned host memory when MPI cannot read a GPU's, so the baseline pays the copies
    the backends pay (on the CPU, or with a CUDA-aware MPI, the tensor itself)."""
    world.Allreduce(comm.mpi().IN_PLACE, devices.mpi_buffer(stage.to_host()))
    stage.to_device()
    devices.synchronize(stage.tensor.device)


def _raw_allreduce(world, stage: devices.HostStage) -> float:
    world.Barrier()
    start = time.perf_counter()
    _raw_exchange(world, stage)
    return time.perf_counter() - start


def _phase(world, params: int, args: argparse.Namespace, phase: str,
           variants: list[_Variant], with_raw: bool = False) -> dict[str, list[float]]:
    """Interleave backward alone, ``variants`` (and the raw Allreduce); each figure's seconds
    per timed iteration as the slowest rank took them (:func:`hpctrain.bench.slowest`), a
    variant's the difference of the iteration's slowest backward+exchange and slowest
    backward alone. Collective: every rank runs every phase."""
    base = _Variant("backward alone", params, device=args.device)
    width = _width(params)  # the model's: see mlp
    x = torch.randn(args.batch_size, width,
                    generator=torch.Generator().manual_seed(world.rank)).to(args.device)
    flat = raw_buffer(sum(p.numel() for p in base.model.parameters()), args.device)
    if with_raw:
        variants = [_Variant(RAW_AFTER, params, device=args.device,
                             exchange=lambda: _raw_exchange(world, flat)), *variants]
    raw: list[float] = []
    for i in range(args.warmup + args.repeats):
        timed = i >= args.warmup
        for v in [base, *variants]:
            v.step(world, x, timed, set_to_none=not args.keep_grads)
        if with_raw:
            seconds = _raw_allreduce(world, flat)
            if timed:
                raw.append(seconds)
    alone = f"backward alone, {phase} phase"
    mine = {alone: base.seconds, **({RAW: raw} if with_raw else {})}
    calls = {}
    for v in variants:
        mine[v.name] = v.seconds
        if v.optimizer is not None:
            call = "step()" if v.exchange == v.optimizer.step else "synchronize()"
            calls[v.name] = f"{v.name}: {call} alone"
            mine[calls[v.name]] = v.waits
    slow = bench.slowest_over_ranks(world, mine)
    for v in variants:
        slow[v.name] = [t - b for t, b in zip(slow[v.name], slow[alone], strict=True)]
    return {k: slow[k] for k in (alone, *([RAW] if with_raw else []),
                                 *(k for v in variants for k in (v.name, calls.get(v.name)) if k))}


def _measure_mpi(world, params: int, args: argparse.Namespace, tuned: str | None
                 ) -> tuple[dict, int]:
    """The mpi backend's phases for one size; also its bucket count."""
    def wrap(opt, named):
        return sync.DistributedOptimizer(opt, named, bucket_bytes=int(args.bucket_mb * 2**20))

    mpi = _Variant(MPI_BACKEND, params, wrap, device=args.device)
    seconds = _phase(world, params, args, "mpi", [mpi], with_raw=True)
    if tuned in nbc_tuning.ALGORITHMS:  # hpctrain chose the algorithm: show Open MPI's own
        nbc_tuning.set_iallreduce_algorithm("ignore")
        try:
            seconds.update(_phase(world, params, args, "Open MPI default",
                                  [_Variant(MPI_DEFAULT, params, wrap, device=args.device)]))
        finally:
            nbc_tuning.set_iallreduce_algorithm(tuned)
    if args.adasum:
        seconds.update(_phase(world, params, args, "Adasum", [_Variant(
            MPI_ADASUM, params, lambda opt, named: sync.DistributedOptimizer(
                opt, named, op=sync.Adasum), device=args.device, adasum=True)]))
    assert mpi.optimizer is not None  # wrap made it
    return seconds, len(mpi.optimizer.bucket_sizes)


def bandwidth(nbytes: int, seconds: float, ranks: int) -> tuple[float, float]:
    """An Allreduce's algorithm and bus bandwidth (GB/s, 10^9 bytes) as nccl-tests define them:
    algbw = bytes / time, busbw = algbw * 2(n-1)/n, what each rank's link carries in a ring (or
    any bandwidth-optimal) allreduce: comparable with the link's peak whatever the ranks."""
    algbw = nbytes / seconds / 1e9
    return algbw, algbw * 2 * (ranks - 1) / ranks


def _row(ranks: int, params: int, seconds: dict[str, list[float]], buckets: int) -> dict:
    """One model's figures from its seconds per iteration (each the slowest rank's)."""
    ms = {k: 1e3 * statistics.median(v) for k, v in seconds.items()}
    width = _width(params)
    n_params = _LAYERS * (width * width + width)
    compared = [k for k in (MPI_BACKEND, MPI_DEFAULT, TORCH_BACKEND, HOROVOD, MPI_ADASUM,
                            HOROVOD_ADASUM) if k in ms]
    # A difference of two timed backward passes: below a tenth of one, within their noise
    # (-0.02 ms gave ratios of -10.3, 0.008 ms of 39 and 95)
    after = ms[RAW_AFTER] if ms[RAW_AFTER] > NOISE * ms["backward alone, mpi phase"] else None
    algbw, busbw = bandwidth(4 * n_params, ms[RAW] / 1e3, ranks)
    return {"params": n_params, "bytes": 4 * n_params, "width": width, "buckets": buckets,
            "ms": ms, "spread_ms": {k: bench.spread(v, 1e3) for k, v in seconds.items()},
            "raw_algbw_gb_s": algbw, "raw_busbw_gb_s": busbw,
            "ratio_to_raw": {k: ms[k] / ms[RAW] for k in compared},
            "ratio_to_raw_after_backward": {k: ms[k] / after if after else None
                                            for k in compared}}


def run(args: argparse.Namespace) -> dict:
    """Measure every model size; rank 0 prints the table (and writes ``args.json``)."""
    sizes = args.params  # checked while parsing (hpctrain.options)
    start = bench.started()
    world = comm.world()
    if args.device == "cuda":
        devices.choose("cuda")  # this rank's GPU
    sync.init(backend="mpi")
    tuned = collectives.world().iallreduce_algorithm
    try:
        measured = [_measure_mpi(world, p, args, tuned) for p in sizes]
    finally:
        sync.shutdown()
    group = "left out (no --torch)"
    if args.torch:
        sync.init(backend="torch")
        # gloo, or NCCL for CUDA tensors, or gloo for those too where ranks share a GPU
        group = torch.distributed.get_backend()
        try:
            for (seconds, _), p in zip(measured, sizes, strict=True):
                variant = _Variant(TORCH_BACKEND, p, lambda opt, named: sync.DistributedOptimizer(
                    opt, named, bucket_bytes=int(args.bucket_mb * 2**20)), device=args.device)
                seconds.update(_phase(world, p, args, "torch", [variant]))
        finally:
            sync.shutdown()
    horovod_note = "left out (--no-horovod)"
    if not args.no_horovod:
        try:
            hvd = horovod_backend.init()
            if args.device == "cuda" and not hvd.cuda_built():
                hvd.shutdown()
                raise UsageError("horovod left out: built without GPU support")
        except UsageError as e:
            horovod_note = str(e)
        else:
            horovod_note = "horovod " + sys.modules["horovod"].__version__
            try:
                for (seconds, _), p in zip(measured, sizes, strict=True):
                    variant = _Variant(HOROVOD, p, lambda opt, named:
                                       hvd.DistributedOptimizer(opt, named_parameters=named),
                                       device=args.device)
                    seconds.update(_phase(world, p, args, "horovod", [variant]))
                    if args.adasum:
                        seconds.update(_phase(world, p, args, "horovod Adasum", [_Variant(
                            HOROVOD_ADASUM, p, lambda opt, named: hvd.DistributedOptimizer(
                                opt, named_parameters=named, op=hvd.Adasum),
                            device=args.device, adasum=True)]))
            finally:
                hvd.shutdown()
    rows = [_row(world.Get_size(), p, m, b) for p, (m, b) in zip(sizes, measured, strict=True)]
    result = {"benchmark": "allreduce", "ranks": world.Get_size(), "device": args.device,
              "batch_size": args.batch_size,
              "warmup": args.warmup, "repeats": args.repeats, "bucket_mb": args.bucket_mb,
              "zero_grad": "in place" if args.keep_grads else "set_to_none",
              "iallreduce_algorithm": tuned, "horovod": horovod_note,
              "torch_process_group": group,
              "mpi_library": comm.library_info()["library"], "goal_mpi_over_raw": GOAL,
              "models": rows, "machine": bench.machine(start)}
    if world.Get_rank() == 0:
        print(bench.header(result["machine"]))
        print(_table(result), flush=True)
        if args.json:
            write_json_atomic(args.json, result)
    return result


def _table(result: dict) -> str:
    models = result["models"]
    rows = [("buckets (mpi backend)", [f"{m['buckets']:d}" for m in models])]
    rows += [(name, [f"{m['ms'][name]:.2f}" for m in models]) for name in models[0]["ms"]]
    rows += [(f"{RAW}: {label} (GB/s)", [f"{m[key]:.2f}" for m in models])
             for key, label in (("raw_algbw_gb_s", "algbw"), ("raw_busbw_gb_s", "busbw"))]
    for key, label in (("ratio_to_raw", "raw"), ("ratio_to_raw_after_backward",
                                                   "raw after backward")):
        rows += [(f"{name} / {label}", ["n/a" if m[key][name] is None else
                                         f"{m[key][name]:.2f}" for m in models])
                 for name in models[0][key]]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"gradient allreduce per step, {result['ranks']} ranks on {result['device']}, batch "
             f"{result['batch_size']}, ms: each iteration's slowest rank, median of "
             f"{result['repeats']} (after {result['warmup']} warm-up; min and max in the "
             f"JSON); zero_grad {result['zero_grad']}; mpi backend Iallreduce: "
             f"{result['iallreduce_algorithm']}; torch backend: "
             f"{result.get('torch_process_group', '?')}; {result['horovod']}",
             " " * width + "".join(f"{m['params'] / 1e6:>10.2f}M" for m in models)]
    lines += [f"  {name:{width - 2}}" + "".join(f"{v:>11}" for v in values)
              for name, values in rows]
    if any(None in m["ratio_to_raw_after_backward"].values() for m in models):
        lines.append(f"n/a: {RAW_AFTER} is the difference of two timed backward passes; below "
                     f"{NOISE:g} of one it is within their noise (a larger --params measures it)")
    lines.append(bench.goal(f"goal: {MPI_BACKEND} / raw <= {GOAL}",
                            all(m["ratio_to_raw"][MPI_BACKEND] <= GOAL for m in models)))
    return "\n".join(lines)


if __name__ == "__main__":  # the same as ``hpctrain bench allreduce``
    from hpctrain.cli import main

    main(["bench", "allreduce", *sys.argv[1:]])
