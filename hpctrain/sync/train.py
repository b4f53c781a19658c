"""``--algo sgd`` (one process) and ``--algo ssgd`` (synchronous SGD, Horovod or mpi4py).

A plain PyTorch loop: the only distributed parts are ``DistributedOptimizer`` and the initial
broadcast, exactly as a Horovod user writes it. The data order is the shuffle package's, so
``ssgd`` on K ranks with batch b sees, step by step, the same samples as ``sgd`` with batch K*b.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from contextlib import nullcontext

import torch
from torch.nn import functional as F

import hpctrain.sync as hvd
from hpctrain import checkpoint, comm, data, faults, models, shuffle
from hpctrain.errors import UsageError
from hpctrain.evaluate import evaluate_snapshots
from hpctrain.guard import GradientGuard
from hpctrain.loop import Bookkeeping, batch, set_step_lr
from hpctrain.metrics import RunLog, run_summary
from hpctrain.stragglers import Straggler, parse_slowdown

THREAD_LEVEL = "multiple"  # Horovod's MPI controller needs MPI_THREAD_MULTIPLE.
CHECKPOINTS = True  # --checkpoint-every / --resume: the same final model as an uninterrupted run


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--sync-backend", choices=("mpi", "horovod"), default="mpi",
                       help="ssgd: allreduce through hpctrain's mpi4py backend or Horovod")
    group.add_argument("--fp16-allreduce", action="store_true",
                       help="ssgd: compress gradients to float16 on the wire")


def validate(args: argparse.Namespace) -> None:
    workers = comm.env_size()
    if args.algo == "sgd" and workers > 1:
        raise UsageError(f"--algo sgd runs on one process, not {workers}; use --algo ssgd")
    if args.algo == "ssgd" and args.sync_backend == "horovod" \
            and importlib.util.find_spec("horovod") is None:
        raise UsageError("--sync-backend horovod: horovod is not installed (run make setup)")


def run(args: argparse.Namespace) -> dict:
    """Train as ``args`` say; write the run's outputs; return its summary (on every rank)."""
    distributed = args.algo == "ssgd"
    world = comm.world() if distributed else None
    if distributed:
        hvd.init(backend=args.sync_backend)
    rank, size = (world.Get_rank(), world.Get_size()) if distributed else (0, 1)

    torch.manual_seed(args.seed)
    train_data = shuffle.make_train_data(args, world)
    test_set = data.load(args.dataset, "test", args.data_dir)
    model = models.build(args.model, train_data.input_shape, train_data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    if distributed:
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                             compression=compression)

    log = RunLog(args.out, rank)
    log.write_config({**vars(args), "workers": size, **comm.library_info()})
    steps = math.ceil(train_data.samples_per_rank / args.batch_size)
    total_steps = args.epochs * steps
    guard = GradientGuard(model.parameters(), args.max_bad_steps, world, reduced=True)
    straggler = Straggler(parse_slowdown(args.slowdown, size).get(rank, 1.0), args.jitter,
                          args.seed, rank)
    ckpt = checkpoint.Checkpointer(args, world, steps, total_steps,
                                   shared={"model": model, "optimizer": optimizer},
                                   per_rank={"guard": guard, "straggler": straggler})
    book = Bookkeeping(args, rank, steps, ckpt)

    updates, samples = book.restore(model)
    if distributed:
        world.Barrier()
    book.start_clock()
    for epoch in range(updates // steps, args.epochs):
        local = train_data.epoch(epoch)
        for i in range(updates - epoch * steps, steps):
            set_step_lr(optimizer, args, epoch + i / steps)
            x, y = batch(local, i, args.batch_size)
            optimizer.zero_grad()
            computing = time.perf_counter()
            loss = faults.inject(rank, updates, model, F.cross_entropy(model(x), y))
            loss.backward()
            straggler.pad(time.perf_counter() - computing)  # the others wait in the allreduce
            if distributed:
                optimizer.synchronize()
            if guard.check(updates):  # NaN/Inf gradients are skipped on every rank
                with optimizer.skip_synchronize() if distributed else nullcontext():
                    optimizer.step()
            updates += 1
            samples += len(y)
            book.after_update(model, loss, updates, samples)
    wall = book.stop()

    points = evaluate_snapshots(model, book.snapshots, test_set, world)
    log.write_points(points)
    log.save_model(model)
    rate = samples / wall
    total_rate = world.allreduce(rate) if distributed else rate
    grad_bytes = sum(p.numel() for p in model.parameters()) * (2 if args.fp16_allreduce else 4)
    summary = run_summary(
        args, points,
        algo_label=(f"ssgd ({args.sync_backend} backend"
                    f"{', fp16 allreduce' if args.fp16_allreduce else ''})"
                    if distributed else "sgd"),
        workers=size,
        updates=updates,
        wall_s=wall,
        samples_per_s=total_rate,
        allreduce_bytes_per_rank=updates * grad_bytes if distributed else 0,
        straggler_sleep_s=straggler.slept,
        params=models.num_parameters(model),
        **train_data.stats(),
        **guard.summary(),
        **ckpt.summary(),
    )
    log.write_summary(summary)
    return summary
