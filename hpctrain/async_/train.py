"""``--algo asgd | dcasgd-c | dcasgd-a``: asynchronous training on the RMA parameter store.

Every worker runs a plain PyTorch loop over its own part of the data (replicated placement,
the shuffle package's order, local epochs at its own pace) and pushes after every batch. The
run makes exactly ``--epochs`` worth of updates (all workers together; a partial last batch
counts as one): before each step a worker claims a ticket from a global counter
(``ParameterStore.claim``) and stops once the tickets reach the budget, so fast workers do more
of the work and none pushes past the budget. A checkpoint mark works the same way: a worker
whose ticket is at or past it waits at a barrier until the others are there too, by which
time exactly the updates before the mark are in. The learning-rate schedule follows the
same global count. Rank 0 snapshots its model (the newest global values it read) at every
``--eval-every`` epochs of global progress; snapshots are scored after training.

``--momentum`` gives each worker a velocity of its own (compensated) steps, which it pushes,
as each process's torch SGD does in a Hogwild run and as the DC-ASGD authors' MXNet optimizer
does; ``--momentum 0`` is the paper's algorithm exactly.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch.nn import functional as F

from hpctrain import checkpoint, comm, data, faults, models, shuffle, watchdog
from hpctrain.async_.optim import ASGD, DCASGD, DEFAULT_LAM
from hpctrain.async_.store import CONSISTENCIES, ParameterStore
from hpctrain.errors import UsageError
from hpctrain.evaluate import Snapshots, evaluate_snapshots
from hpctrain.guard import GradientGuard
from hpctrain.metrics import RunLog, distribution, progress
from hpctrain.schedule import learning_rate, set_lr
from hpctrain.stragglers import Straggler, parse_slowdown

THREAD_LEVEL = "serialized"  # Open MPI 4's inter-node osc/pt2pt refuses MULTIPLE
# Momentum hurts here (each worker's velocity keeps acting on the shared model, and
# asynchrony adds momentum of its own); the DC-ASGD paper's algorithm has none.
DEFAULTS = {"lr": 0.1, "momentum": 0.0}
CHECKPOINTS = True  # by global progress (Ne): the workers stop together, the store is quiescent
ALGOS = ("asgd", "dcasgd-c", "dcasgd-a")
MS_DECAY = 0.95  # DC-ASGD-a's default decay of the mean square


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--lam", type=float, default=None,
                       help="dcasgd-c/dcasgd-a: DC-ASGD's lambda0 (default 0.04 for dcasgd-c, "
                            "2.0 for dcasgd-a)")
    group.add_argument("--ms-decay", type=float, default=MS_DECAY,
                       help="dcasgd-a: decay of the mean square of the gradient")
    group.add_argument("--servers", type=int, default=0,
                       help="async: ranks that only host the model (the last N); 0: all ranks "
                            "host shards and train (one node)")
    group.add_argument("--consistency", default="locked", choices=CONSISTENCIES,
                       help="async: locked (exclusive lock per shard, serialisable) or atomic "
                            "(Accumulate of the delta, element-wise atomic)")
    group.add_argument("--shards", type=int, default=None,
                       help="async: number of model shards (default: one per worker at least)")


def validate(args: argparse.Namespace) -> None:
    if args.algo not in ALGOS:
        raise UsageError(f"{__name__} runs {', '.join(ALGOS)}, not {args.algo!r}")
    ranks = comm.env_size()
    if not 0 <= args.servers < ranks:
        raise UsageError(f"--servers {args.servers} with {ranks} ranks: need 0 <= servers < "
                         "ranks (at least one worker)")
    if args.shards is not None:
        numel = _model_size(args)
        if not 1 <= args.shards <= numel:
            raise UsageError(f"--shards {args.shards} is outside [1, {numel}]: at most one "
                             f"shard per parameter of {args.model} ({numel} parameters)")
    if args.lam is not None and not (math.isfinite(args.lam) and args.lam >= 0):
        raise UsageError(f"--lam {args.lam} must be >= 0")
    if args.momentum >= 1.0:
        raise UsageError(f"--momentum {args.momentum} must be < 1")
    if not 0.0 <= args.ms_decay < 1.0:
        raise UsageError(f"--ms-decay {args.ms_decay} is outside [0, 1)")
    parse_slowdown(args.slowdown, ranks - args.servers)
    if args.checkpoint_every is not None and not args.checkpoint_every.endswith("e"):
        raise UsageError(f"--checkpoint-every {args.checkpoint_every}: asynchronous runs "
                         "checkpoint by global progress; give epochs, e.g. 1e")
    if getattr(args, "data_placement", "replicated") != "replicated":
        raise UsageError(f"--algo {args.algo} needs --data-placement replicated: sharded "
                         "placement exchanges data collectively each epoch, which would make "
                         "the asynchronous workers wait for each other")


def _model_size(args: argparse.Namespace) -> int:
    """The number of parameters of ``--model`` for ``--dataset`` (one test sample read)."""
    sample = data.load(args.dataset, "test", args.data_dir, 0, 1)
    return models.num_parameters(models.build(args.model, sample.shape, sample.num_classes))


def lam_of(args: argparse.Namespace) -> float:
    """The lambda0 this run uses (0 for ASGD)."""
    if args.algo == "asgd":
        return 0.0
    if args.lam is not None:
        return args.lam
    return DEFAULT_LAM["adaptive" if args.algo == "dcasgd-a" else "constant"]


def run(args: argparse.Namespace) -> dict:
    """Train as ``args`` say; write the run's outputs; return its summary (on every rank)."""
    world = comm.world()
    torch.manual_seed(args.seed)
    test_set = data.load(args.dataset, "test", args.data_dir)
    model = models.build(args.model, test_set.shape, test_set.num_classes)
    found = checkpoint.newest(args.resume) if args.resume and world.Get_rank() == 0 else None
    if found is not None:  # the store starts from rank 0's values: the checkpoint's
        model.load_state_dict(found[2]["shared"]["model"])
    values = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    store = ParameterStore(values, world, servers=args.servers, shards=args.shards,
                           consistency=args.consistency)
    summary = _work(args, store, model, test_set, found) if store.is_worker else None
    store.finish()
    store.close()
    return world.bcast(summary, root=0)


def _work(args: argparse.Namespace, store: ParameterStore, model, test_set, found) -> dict:
    """One worker's training, evaluation and (rank 0) outputs; collective over the workers."""
    workers = store.worker_comm
    rank, size = workers.Get_rank(), workers.Get_size()
    train_data = shuffle.make_train_data(args, workers)
    lam = lam_of(args)
    if args.algo == "asgd":
        opt = ASGD(model, store, lr=args.lr, momentum=args.momentum,
                   weight_decay=args.weight_decay)
    else:
        opt = DCASGD(model, store, lr=args.lr, lam=lam, adaptive=args.algo == "dcasgd-a",
                     ms_decay=args.ms_decay, momentum=args.momentum,
                     weight_decay=args.weight_decay)
    straggler = Straggler(parse_slowdown(args.slowdown, size).get(rank, 1.0), args.jitter,
                          args.seed, rank)
    guard = GradientGuard(model.parameters(), args.max_bad_steps)
    log = RunLog(args.out, rank)
    log.write_config({**vars(args), "workers": size, "servers": args.servers, "lam": lam,
                      "shards": store.shards, **comm.library_info()})

    steps = math.ceil(train_data.samples_per_rank / args.batch_size)  # one local epoch
    per_epoch = steps * size  # global updates per epoch of data
    total = args.epochs * per_epoch
    snapshot_every = max(1, round(args.eval_every * per_epoch))
    snapshots = Snapshots()
    ckpt = checkpoint.Checkpointer(
        args, workers, per_epoch, total, shared={"model": model},
        per_rank={"opt": opt, "guard": guard,
                  "straggler": straggler})
    bar = progress(total, rank, args.algo, enabled=not args.no_progress)

    if rank == 0:
        snapshots.take(model, t=0.0, epoch=0.0, updates=0)
    done = ckpt.restore(snapshots, found)
    base = seen = done.get("updates", 0)  # the store counts the updates of this process only
    pushes, samples, local_epoch, i = (done.get(k, 0) for k in ("pushes", "samples",
                                                                 "local_epoch", "i"))
    bar.update(seen)
    workers.Barrier()
    start = time.perf_counter() - done.get("elapsed", 0.0)
    next_snapshot = (seen // snapshot_every + 1) * snapshot_every
    local = train_data.epoch(local_epoch)
    ticket = None  # this worker's claim on the next update of the budget
    while True:
        if ticket is None:
            ticket = base + store.claim()
        if ckpt.due(ticket):  # the mark is at or below this ticket
            # Every ticket below the mark is claimed, each by a worker that pushes it before
            # it claims again, and every worker stops here with its first ticket past the
            # mark: after the barrier exactly the mark's updates are in, none past it.
            workers.Barrier()
            # All continue from the global model, as a run resumed from this checkpoint does.
            seen = base + opt.pull()
            ckpt.save(seen, {"pushes": pushes, "samples": samples, "local_epoch": local_epoch,
                             "i": i, "elapsed": time.perf_counter() - start}, snapshots)
            continue  # the held ticket may be past the next mark too
        if ticket >= total:
            break
        if i == steps:
            local_epoch, i = local_epoch + 1, 0
            local = train_data.epoch(local_epoch)
        t0 = time.perf_counter()
        set_lr(opt, learning_rate(args.lr, seen / per_epoch, args.epochs, args.lr_schedule,
                                  args.lr_milestones, args.lr_gamma))
        x = local.images[i * args.batch_size:(i + 1) * args.batch_size]
        y = local.labels[i * args.batch_size:(i + 1) * args.batch_size]
        opt.zero_grad()
        loss = faults.inject(rank, pushes, model, F.cross_entropy(model(x), y))
        loss.backward()
        if guard.check(pushes):
            opt.step()
            seen = base + opt.last_push.index + 1
            ticket = None
        else:  # a skipped step pushes nothing: the ticket stays for the next batch
            seen = base + store.updates()
        pushes += 1
        samples += len(y)
        i += 1
        straggler.pad(time.perf_counter() - t0)
        bar.update(min(seen, total) - bar.n)
        watchdog.beat("push", pushes)
        if rank == 0 and seen >= next_snapshot:
            snapshots.take(model, t=time.perf_counter() - start, epoch=seen / per_epoch,
                           updates=seen)
            next_snapshot = (seen // snapshot_every + 1) * snapshot_every
    busy = time.perf_counter() - start
    workers.Barrier()  # every push is in
    wall = time.perf_counter() - start
    bar.close()
    if rank == 0:
        final_updates = base + opt.pull()
        snapshots.take(model, t=wall, epoch=final_updates / per_epoch, updates=final_updates)
        log.save_model(model)
    snapshots = workers.bcast(snapshots, root=0)
    points = evaluate_snapshots(model, snapshots, test_set, workers)
    log.write_points(points)

    mine = {"pushes": pushes, "samples": samples, "staleness": opt.staleness, "busy_s": busy,
            "slept_s": straggler.slept, "traffic": {"read": store.bytes_read,
                                                    "written": store.bytes_written,
                                                    "mpi": store.mpi_bytes},
            **guard.summary()}
    every = workers.gather(mine, root=0)
    if rank != 0:
        return None
    taus = [t for w in every for t in w["staleness"]]
    total_samples = sum(w["samples"] for w in every)
    summary = {
        "algo": args.algo,
        "algo_label": f"{args.algo} ({args.consistency}, {store.shards} shards, "
                      f"{args.servers} servers)",
        "workers": size,
        "servers": args.servers,
        "consistency": args.consistency,
        "shards": store.shards,
        "lam": lam,
        "ms_decay": args.ms_decay if args.algo == "dcasgd-a" else None,
        "model": args.model,
        "dataset": args.dataset,
        "epochs": args.epochs,
        "updates": points[-1]["updates"],
        "final_test_acc": points[-1]["test_acc"],
        "final_test_loss": points[-1]["test_loss"],
        "best_test_acc": max(p["test_acc"] for p in points),
        "wall_s": wall,
        "samples_per_s": total_samples / wall,
        "staleness": distribution(taus),
        "pushes_per_worker": [len(w["staleness"]) for w in every],  # skipped steps push nothing
        "samples_per_worker": [w["samples"] for w in every],
        "busy_s_per_worker": [w["busy_s"] for w in every],
        "straggler_sleep_s_per_worker": [w["slept_s"] for w in every],
        # Model traffic to and from the store (see ParameterStore.bytes_read): payload read and
        # written by each worker, whether MPI or loads/stores on shared-memory windows moved it,
        # and the part MPI calls moved (0 for locked pushes on shared memory, done in place).
        # Means over the workers; per worker in store_traffic_per_worker.
        "store_bytes_per_worker": round(sum(w["traffic"]["read"] + w["traffic"]["written"]
                                            for w in every) / size),
        "store_mpi_bytes_per_worker": round(sum(w["traffic"]["mpi"] for w in every) / size),
        "store_traffic_per_worker": [w["traffic"] for w in every],
        "slowdown": args.slowdown,
        "jitter": args.jitter,
        "skipped_steps": sum(w["skipped_steps"] for w in every),
        "bad_gradients_per_worker": [w["bad_gradients_per_worker"][0] for w in every],
        "max_bad_steps": args.max_bad_steps,
        **ckpt.summary(),
        "params": models.num_parameters(model),
        "out": args.out,
        **train_data.stats(),
    }
    log.write_summary(summary)
    return summary
