"""The fused compensation kernel: bytes touched per second against a copy and unfused torch.

One DC-ASGD-c update reads g, w, w_bak and writes w: 16 bytes per element; DC-ASGD-a also reads
and writes ms: 24 bytes. The baselines, measured in the same run and alternating with the
kernel: a plain memory copy touching the same number of bytes (torch ``copy_`` of 8 or 12
bytes per element: read plus write), and the same formula as unfused torch expressions. GB/s
counts bytes touched (GB = 10^9 bytes); for unfused torch it counts the kernel's bytes, so the
ratio of the two is the speed-up. The table shows the median over ``--repeats`` samples; the
JSON also their min and max (``spread_gb_s``).

On a GPU each sample times :data:`CUDA_CALLS` calls between two synchronisations, so that a
call's Python and launch cost (some 30 us) overlaps the kernels queued before it, as in
training, instead of counting against a kernel of a quarter of a millisecond.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TypedDict

import torch

from hpctrain import bench, comm, kernels, launch_env, options
from hpctrain.errors import UsageError
from hpctrain.metrics import write_json_atomic

DESCRIPTION = ("Fused DC-ASGD update kernel against a memory copy of the same bytes and against "
               "unfused torch (GB/s, one process). DC-ASGD-c and DC-ASGD-a updates, GB/s of "
               "bytes touched, per thread count; the copy is the bandwidth ceiling, the unfused "
               "torch expressions the same update as a user writes it; all measured in the "
               "same run.")
THREAD_LEVEL = "single"  # no MPI


class _Hyper(TypedDict):
    """The update's keywords: typed, as a dict of floats would hide which they are."""

    lr: float
    lam: float
    ms_decay: float
    weight_decay: float


HYPER: _Hyper = {"lr": 0.1, "lam": 0.04, "ms_decay": 0.95, "weight_decay": 1e-4}
BYTES_PER_ELEMENT = {"dcasgd-c": 16, "dcasgd-a": 24}
# Bytes per element allocated at once at the peak: w, g, w_bak and ms (16), dcasgd-a's copy
# pair (24; each variant's pair is freed before the next is allocated) and the unfused torch
# expressions' temporaries alive at once (5 in dcasgd-a's last line: 20). Measured with
# /usr/bin/time -v at 8M and 16M elements: 60 B per element above the interpreter's own.
UNFUSED_TEMPORARIES = 5
ALLOCATED_PER_ELEMENT = 16 + 2 * BYTES_PER_ELEMENT["dcasgd-a"] // 8 * 4 + 4 * UNFUSED_TEMPORARIES
MAX_THREADS = 4096  # as train's --threads; 100000 crashes OpenMP (segmentation fault)


def add_arguments(parser) -> None:
    parser.add_argument("--elements", type=options.at_least(1), default=16 * 2**20,
                        help="vector length (float32 elements)")
    parser.add_argument("--threads", type=options.number_list(1, MAX_THREADS), default="1,2",
                        help="comma-separated thread counts, each measured in turn")
    parser.add_argument("--repeats", type=bench.at_most(options.at_least(1), options.HUGE),
                        default=10, help="timed runs of each, median kept")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the vectors live: cpu, or cuda (the kernel's GPU version; "
                             "needs a CUDA device)")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the figures to this JSON file")


def validate(args: argparse.Namespace) -> None:
    """Before measuring: one process (N ranks would be N copies competing for the same memory
    bandwidth, and only rank 0's figures reported); a CUDA device for --device cuda; the
    vectors fit in its memory."""
    if comm.env_size() > 1:
        raise UsageError(f"bench kernel measures one process's kernel: run it on one rank "
                         f"(mpirun -np 1, or srun/sbatch --ntasks-per-node=1 on one node), not "
                         f"{comm.env_size()}")
    if args.device == "cpu":  # N threads bound to fewer cores measure those cores
        launch_env.say_threads_beyond_cpus(max(args.threads))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA device")
        have, where = torch.cuda.get_device_properties(0).total_memory, "the GPU has"
    else:
        have, where = bench.memory(), "this machine has"
    bench.check_memory(f"--elements {options.shown(args.elements)}",
                       ALLOCATED_PER_ELEMENT * args.elements, have, where)


def unfused(w, g, w_bak, ms, *, lr, lam, ms_decay, weight_decay):
    """The formula as a user writes it in torch (one temporary per operation)."""
    gd = g + weight_decay * w_bak
    if ms is not None:
        ms.mul_(ms_decay).add_((1 - ms_decay) * gd * gd)
        lam = lam / torch.sqrt(ms + 1e-7)
    w.sub_(lr * (gd + lam * gd * gd * (w - w_bak)))


CUDA_CALLS = 10  # calls per sample on a GPU (module docstring)


def _timer(device: str):
    if device == "cuda":
        def timed(fn) -> float:
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(CUDA_CALLS):
                fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - start) / CUDA_CALLS
    else:
        def timed(fn) -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
    return timed


def measure(n: int, threads: int, repeats: int, device: str) -> list[dict]:
    """Median GB/s of the kernel, the copy and unfused torch for both variants."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    w, g, w_bak, ms = (torch.rand(n, generator=gen).to(device) for _ in range(4))
    # One variant at a time: its copy buffers are freed (with the function's frame) before the
    # next variant's are allocated.
    return [_measure_variant(variant, w, g, w_bak, ms if variant == "dcasgd-a" else None,
                             threads, repeats, device, gen)
            for variant in BYTES_PER_ELEMENT]


def _measure_variant(variant: str, w, g, w_bak, m, threads: int, repeats: int, device: str,
                     gen: torch.Generator) -> dict:
    per_elem, n = BYTES_PER_ELEMENT[variant], w.numel()
    src = torch.rand(n * per_elem // 8, generator=gen).to(device)
    dst = torch.empty_like(src)
    runs = {
        "fused": lambda: kernels.dc_update(w, g, w_bak, m, **HYPER, threads=threads),
        "copy": lambda: dst.copy_(src),
        "torch": lambda: unfused(w, g, w_bak, m, **HYPER),
    }
    timed = _timer(device)
    for fn in runs.values():  # warm-up: page faults, thread pools, a GPU's clocks
        timed(fn)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    touched = per_elem * n
    spread = {k: bench.spread([touched / t / 1e9 for t in v]) for k, v in times.items()}
    gbs = {k: s["median"] for k, s in spread.items()}
    return {"variant": variant, "threads": threads, "bytes_per_element": per_elem,
            "fused_gb_s": gbs["fused"], "copy_gb_s": gbs["copy"], "torch_gb_s": gbs["torch"],
            "spread_gb_s": spread,
            "vs_copy": gbs["fused"] / gbs["copy"], "vs_torch": gbs["fused"] / gbs["torch"]}


def run(args: argparse.Namespace) -> dict:
    """Measure every thread count; print a table; return the figures."""
    threads = args.threads  # checked while parsing, the device in validate()
    start = bench.started()
    rows = [r for t in threads for r in measure(args.elements, t, args.repeats, args.device)]
    openmp = bool(kernels.cpu_library().hpctrain_dc_openmp())
    built = "" if args.device != "cpu" else ", kernel built with OpenMP" if openmp else \
        ", kernel built without OpenMP (one thread, whatever thr)"
    result = {"benchmark": "kernel", "elements": args.elements, "device": args.device,
              "repeats": args.repeats, "openmp": openmp, "rows": rows,
              "machine": bench.machine(start)}
    print(bench.header(result["machine"]))
    print(f"fused DC-ASGD kernel, {args.elements} float32 elements, {args.device}, "
          f"median of {args.repeats} (GB/s of bytes touched){built}")
    print(f"{'variant':9} {'thr':>3} {'fused':>8} {'copy':>8} {'torch':>8} "
          f"{'vs copy':>8} {'vs torch':>9}")
    for r in rows:
        print(f"{r['variant']:9} {r['threads']:>3} {r['fused_gb_s']:8.2f} {r['copy_gb_s']:8.2f} "
              f"{r['torch_gb_s']:8.2f} {r['vs_copy']:8.2f} {r['vs_torch']:8.1f}x", flush=True)
    if getattr(args, "json", None):
        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":  # the same as ``hpctrain bench kernel``
    from hpctrain.cli import main

    main(["bench", "kernel", *sys.argv[1:]])
