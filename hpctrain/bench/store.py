"""The RMA parameter store: pushes per second against a two-sided parameter server.

Run under ``mpirun -np W+1``: W workers push DC-ASGD-c updates of a model of ``--params``
float32 parameters as fast as they can for ``--seconds`` (no gradient computation: the
figure is the store's own cost). Configurations, measured in the same run with the same
processes:

- ``rma-<consistency>-spread``: the store with every worker hosting shards (the extra rank
  idles);
- ``rma-<consistency>-server``: the last rank is a dedicated server hosting all shards;
- ``two-sided``: the baseline, a server rank that receives each gradient (``Recv``), applies
  the same fused update with the worker's ``w_bak`` that it keeps (the DC-ASGD paper's
  server), and sends the new model back (``Send``); one request at a time.

Each worker starts with a different shard; shards = W. On one node the store's windows are
shared memory, so a ``locked`` push is one kernel pass over the shard in place; an ``atomic``
push's kernel reads the shard in place too, then adds the delta with hpctrain's own atomic
accumulate in the shared memory (``shm.accumulate``; MPI's ``Accumulate`` across nodes): a
second pass over the shard; every push of the
two-sided server is one kernel pass too (the new model written into the model and the
worker's ``w_bak`` at once), and moves the model through MPI twice (the gradient in, the
model back).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import TypedDict

import torch

from hpctrain import bench, comm, kernels, options
from hpctrain.async_ import CONSISTENCIES, ParameterStore
from hpctrain.errors import UsageError
from hpctrain.metrics import write_json_atomic

DESCRIPTION = ("RMA parameter store pushes per second against a two-sided Send/Recv parameter "
               "server. W workers push DC-ASGD-c updates into MPI one-sided windows "
               "(--consistency locked and atomic; shards spread over the workers or on a "
               "dedicated server rank); the Send/Recv server applies the same update; all "
               "measured in the same run; run with mpirun -np W+1 (W >= 1).")
THREAD_LEVEL = "serialized"


class _Hyper(TypedDict):
    """The update's keywords: typed, as a dict of floats would hide which they are."""

    lr: float
    lam: float


HYPER: _Hyper = {"lr": 1e-3, "lam": 0.04}
_GRAD, _STOP = 1, 2


def add_arguments(parser) -> None:
    parser.add_argument("--params", type=options.number_list(1), default="1000000,10000000",
                        help="comma-separated model sizes (float32 parameters)")
    parser.add_argument("--seconds", type=bench.at_most(options.positive(float), options.HUGE),
                        default=3.0, help="timed pushing per case")
    parser.add_argument("--consistency", type=options.name_list(CONSISTENCIES),
                        default=",".join(CONSISTENCIES),
                        help="comma-separated store consistencies to measure: locked "
                             "(exclusive lock per shard) and/or atomic (Accumulate of the "
                             "delta)")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the figures to this JSON file (rank 0)")


WARMUP_PUSHES = 1  # per worker and case, untimed


def _push_loop(push, seconds: float, world) -> tuple[int, float]:
    """:data:`WARMUP_PUSHES` untimed pushes (the first maps the windows' pages, makes the
    connections, starts the kernel's threads), a barrier so that the workers start together,
    then push until ``seconds`` have passed; (timed pushes, elapsed). A push returns when its
    epochs are closed (each shard's ``Unlock``), so the pushes counted are complete."""
    for _ in range(WARMUP_PUSHES):
        push()
    world.Barrier()
    start = time.perf_counter()
    n = 0
    while n == 0 or time.perf_counter() - start < seconds:  # at least one push
        push()
        n += 1
    return n, time.perf_counter() - start


def _rma(world, numel: int, consistency: str, servers: int, seconds: float) -> list | None:
    """One RMA case on ``world``; per-rank (pushes, seconds, shared) gathered on rank 0
    (None on the others)."""
    workers = world.Get_size() - servers
    store = ParameterStore(torch.zeros(numel), world, servers=servers, shards=workers,
                           consistency=consistency)
    result = (0, 0.0)
    if store.is_worker:
        w, g = torch.zeros(numel), torch.full((numel,), 1e-3)
        store.pull(w)
        result = _push_loop(lambda: store.push(w, g, **HYPER), seconds, store.worker_comm)
    store.finish()
    store.close()
    return world.gather((*result, store.shared), root=0)


def _two_sided(world, numel: int, seconds: float) -> list | None:
    """The baseline: the last rank serves gradients with Recv/update/Send; gathered as
    :func:`_rma`'s."""
    MPI = comm.mpi()
    size, rank = world.Get_size(), world.Get_rank()
    server = size - 1
    workers = world.Split(0 if rank != server else 1, rank)
    result = (0, 0.0)
    if rank == server:
        w = torch.zeros(numel)
        w_bak = [w.clone() for _ in range(size - 1)]
        g = torch.empty(numel)
        status = MPI.Status()
        stopped = 0
        while stopped < size - 1:
            world.Recv([g.numpy(), MPI.FLOAT], MPI.ANY_SOURCE, MPI.ANY_TAG, status=status)
            src = status.Get_source()
            if status.Get_tag() == _STOP:
                stopped += 1
                continue
            serve(w, g, w_bak[src])
            world.Send([w.numpy(), MPI.FLOAT], src, _GRAD)
    else:
        w, g = torch.zeros(numel), torch.full((numel,), 1e-3)

        def push():
            world.Send([g.numpy(), MPI.FLOAT], server, _GRAD)
            world.Recv([w.numpy(), MPI.FLOAT], server, _GRAD)

        result = _push_loop(push, seconds, workers)
        world.Send([g.numpy(), MPI.FLOAT], server, _STOP)
    workers.Free()
    return world.gather((*result, False), root=0)


def serve(w: torch.Tensor, g: torch.Tensor, w_bak: torch.Tensor) -> None:
    """The two-sided server's update: one kernel pass writes the new model into ``w`` and into
    the worker's ``w_bak`` (as the store's ``locked`` push does), no second pass to copy it."""
    kernels.dc_update(w, g, w_bak, out2=w_bak, **HYPER)


def _rate(parts: list) -> float:
    """Total pushes per second over the workers (each rate over its own elapsed time)."""
    return sum(n / s for n, s, _ in parts if n)


def validate(args: argparse.Namespace) -> None:
    """Before MPI starts: at least one worker besides the server rank; every model has at
    least one parameter per shard (shards = W workers); the largest model fits in memory (the
    two-sided server holds it, a copy per worker and a gradient)."""
    bench.check_mpi_launch("store")
    if comm.env_size() < 2:
        raise UsageError(f"the store benchmark needs mpirun -np W+1 (W >= 1 workers), not "
                         f"{comm.env_size()} rank(s)")
    shards = comm.env_size() - 1
    for numel in args.params:
        if numel < shards:
            raise UsageError(f"--params {options.shown(numel)}: fewer parameters than the "
                             f"store's {shards} shards (one per worker, -np "
                             f"{comm.env_size()}); give at least {shards}")
    largest = max(args.params)
    # The two-sided server holds the model, a copy per worker and a gradient; a worker its
    # model and gradient. On a node with the server, that and the others' share.
    server, worker, here = 4 * largest * (comm.env_size() + 1), 8 * largest, bench.ranks_here()
    bench.check_memory(f"--params {options.shown(largest)}", server, sharing=here,
                       total=server + worker * (here - 1))


def run(args: argparse.Namespace) -> dict:
    """Every size and configuration; print a table on rank 0; return the figures."""
    start = bench.started()
    world = comm.world()
    size, rank = world.Get_size(), world.Get_rank()
    spread = world.Split(0 if rank < size - 1 else 1, rank)
    rows = []
    for numel in args.params:
        cases: dict[str, list | None] = {"two-sided": _two_sided(world, numel, args.seconds)}
        for consistency in args.consistency:
            parts = _rma(spread, numel, consistency, 0, args.seconds) if rank < size - 1 else None
            cases[f"rma-{consistency}-spread"] = parts
            world.Barrier()
            cases[f"rma-{consistency}-server"] = _rma(world, numel, consistency, 1, args.seconds)
        if rank == 0:  # every case gathered here
            gathered = {name: parts for name, parts in cases.items() if parts is not None}
            base = _rate(gathered["two-sided"])
            for name, parts in gathered.items():
                rate = _rate(parts)
                rows.append({"params": numel, "workers": size - 1, "case": name,
                             "shared_windows": parts[0][2], "pushes_per_s": rate,
                             "vs_two_sided": rate / base,
                             "per_worker": [n / s for n, s, _ in parts if n],
                             "median_push_ms": 1e3 * statistics.median(
                                 s / n for n, s, _ in parts if n)})
    spread.Free()
    result = {"benchmark": "store", "ranks": size, "workers": size - 1,
              "seconds": args.seconds, "mpi": comm.library_info()["library"],
              "rows": rows if rank == 0 else None, "machine": bench.machine(start)}
    if rank == 0:
        print(bench.header(result["machine"]))
        print(f"parameter store, {size - 1} workers (+1 server rank), DC-ASGD-c pushes, "
              f"{args.seconds:g} s per case; pushes/s of all workers together, ms/push a "
              f"worker's mean time per push, the median over workers")
        print(f"{'params':>10} {'case':22} {'shared':>6} {'pushes/s':>9} {'ms/push':>8} "
              f"{'vs two-sided':>13}")
        for r in rows:
            print(f"{r['params']:>10} {r['case']:22} {str(r['shared_windows']):>6} "
                  f"{r['pushes_per_s']:9.1f} {r['median_push_ms']:8.2f} "
                  f"{r['vs_two_sided']:12.2f}x", flush=True)
    if rank == 0 and getattr(args, "json", None):
        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":  # the same as ``hpctrain bench store``
    from hpctrain.cli import main

    main(["bench", "store", *sys.argv[1:]])
