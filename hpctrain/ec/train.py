"""``--algo ma`` (model averaging) and ``--algo ec`` (Ensemble-Compression).

Every rank starts from rank 0's model and trains on its own samples (the shuffle package's
order); every ``tau`` local steps MA averages the parameters, EC relabels samples with the
ensemble and distils it during the next round. Snapshots of every rank's model are scored
after training: rank 0's member, the mean member, the ensemble and, for MA, the average.
``test_acc`` is the run's final model: rank 0's member, or the ensemble with
``--ec-final ensemble``. MA also averages after the last step, so its final model is the average;
EC skips a round that would fall on the last step, as nothing would distil it, and so
refuses a ``tau`` of at least the run's updates per rank (no round at all: that would be
independent training reported as EC).
"""

from __future__ import annotations

import argparse
import io
import math
import time

import torch
from torch.nn import functional as F

from hpctrain import checkpoint, comm, data, faults, models, shuffle
from hpctrain.ec.averaging import ModelAveraging, broadcast_model
from hpctrain.ec.compression import EnsembleCompression, check_options
from hpctrain.ec.evaluation import evaluate_members
from hpctrain.errors import UsageError
from hpctrain.guard import GradientGuard
from hpctrain.loop import Bookkeeping, batch, set_step_lr
from hpctrain.metrics import RunLog, run_summary, write_atomic
from hpctrain.stragglers import Straggler, parse_slowdown

THREAD_LEVEL = "serialized"  # collectives from the main thread only
CHECKPOINTS = True  # every rank's model, momentum, round state and snapshots
DEFAULT_TAU = 20


def add_arguments(group: argparse._ArgumentGroup) -> None:
    when = group.add_mutually_exclusive_group()
    when.add_argument("--tau", type=int, default=None,
                      help=f"ma/ec: local steps between aggregations (default {DEFAULT_TAU})")
    when.add_argument("--tau-epochs", type=float, default=None,
                      help="ma/ec: local epochs between aggregations, instead of --tau")
    group.add_argument("--ec-alpha", type=float, default=0.5,
                       help="ec: weight of the distillation term in [0, 1]")
    group.add_argument("--ec-temperature", type=float, default=2.0,
                       help="ec: softmax temperature of the ensemble and the student")
    group.add_argument("--ec-distill-size", type=int, default=512,
                       help="ec: samples per worker relabelled by the ensemble each round")
    group.add_argument("--ec-final", choices=("member", "ensemble"), default="member",
                       help="ec: the reported final model, rank 0's member or the ensemble")


def validate(args: argparse.Namespace) -> None:
    if args.tau is not None and args.tau < 1:
        raise UsageError(f"--tau {args.tau} must be >= 1")
    if args.tau_epochs is not None and not args.tau_epochs > 0:
        raise UsageError(f"--tau-epochs {args.tau_epochs} must be > 0")
    if args.algo == "ec":
        check_options(args.tau or 1, args.ec_alpha, args.ec_temperature, args.ec_distill_size)
        ranks = comm.env_size()
        local = data.size(args.dataset, "train", args.data_dir) // ranks
        if args.ec_distill_size > local:
            raise UsageError(f"--ec-distill-size {args.ec_distill_size} exceeds the {local} "
                             f"training samples each of the {ranks} ranks holds")
        _check_rounds(args, local, ranks)


def _check_rounds(args: argparse.Namespace, local: int, ranks: int) -> None:
    """EC with no round before the last step is independent training: refuse it.

    Rounds fall after every ``tau`` local steps except the last (no round follows to distil
    it), so EC needs ``tau`` below the run's updates per rank. ``local`` is the samples per
    rank, as every placement gives them (``TrainData.samples_per_rank``).
    """
    steps = math.ceil(local / args.batch_size)  # one epoch, as run() counts it
    total = args.epochs * steps
    tau = local_steps(args, steps)
    if tau < total:
        return
    if args.tau_epochs is not None:
        given, fix = (f"--tau-epochs {args.tau_epochs} ({tau} local steps)",
                      f"--tau-epochs of at most {(total - 1) / steps:.4g}")
    else:
        given = f"--tau {tau}" + (" (the default)" if args.tau is None else "")
        fix = f"--tau below {total}"
    raise UsageError(
        f"{given} never aggregates in {total} updates per rank (--epochs {args.epochs} x "
        f"{steps} batches of {args.batch_size} from {local} samples per rank on {ranks} ranks; "
        f"ec's rounds come after every tau updates but the last): give {fix} or more --epochs")


def local_steps(args: argparse.Namespace, steps_per_epoch: int) -> int:
    """``--tau``, or ``--tau-epochs`` converted to local steps (at least one)."""
    if args.tau_epochs is not None:
        return max(1, round(args.tau_epochs * steps_per_epoch))
    return args.tau if args.tau is not None else DEFAULT_TAU


def label(args: argparse.Namespace, tau: int) -> str:
    if args.algo == "ma":
        return f"ma (tau={tau})"
    return (f"ec (tau={tau}, alpha={args.ec_alpha}, T={args.ec_temperature}, "
            f"distill={args.ec_distill_size}, final={args.ec_final})")


def _save_ensemble(log: RunLog, state: dict, world) -> None:
    members = world.gather(state, root=0)
    if log.rank == 0:
        buf = io.BytesIO()
        torch.save({"members": members}, buf)
        write_atomic(log.dir / "ensemble.pt", buf.getvalue())


def run(args: argparse.Namespace) -> dict:
    """Train as ``args`` say; write the run's outputs; return its summary (on every rank)."""
    world = comm.world()
    rank, size = world.Get_rank(), world.Get_size()
    ec = args.algo == "ec"

    torch.manual_seed(args.seed)
    train_data = shuffle.make_train_data(args, world)
    test_set = data.load(args.dataset, "test", args.data_dir)
    model = models.build(args.model, train_data.input_shape, train_data.num_classes)
    broadcast_model(model, world)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    steps = math.ceil(train_data.samples_per_rank / args.batch_size)
    tau = local_steps(args, steps)
    if ec:
        lookup = train_data.full if isinstance(train_data, shuffle.ReplicatedTrainData) else None
        agg = EnsembleCompression(model, world, tau, args.ec_alpha, args.ec_temperature,
                                  args.ec_distill_size, lookup=lookup, seed=args.seed)
    else:
        agg = ModelAveraging(model, world, tau)

    log = RunLog(args.out, rank)
    log.write_config({**vars(args), "workers": size, "tau_steps": tau, **comm.library_info()})
    total_steps = args.epochs * steps
    guard = GradientGuard(model.parameters(), args.max_bad_steps, world)
    straggler = Straggler(parse_slowdown(args.slowdown, size).get(rank, 1.0), args.jitter,
                          args.seed, rank)
    ckpt = checkpoint.Checkpointer(
        args, world, steps, total_steps, shared={}, per_rank_snapshots=True,
        per_rank={"model": model, "optimizer": optimizer, "guard": guard,
                  "straggler": straggler, "agg": agg})
    book = Bookkeeping(args, rank, steps, ckpt)

    updates, samples = book.restore(model)
    world.Barrier()
    book.start_clock()
    for epoch in range(updates // steps, args.epochs):
        local = train_data.epoch(epoch)
        if ec:
            agg.set_local_data(local)
        for i in range(updates - epoch * steps, steps):
            set_step_lr(optimizer, args, epoch + i / steps)
            x, y = batch(local, i, args.batch_size)
            optimizer.zero_grad()
            computing = time.perf_counter()
            loss = agg.loss(x, y) if ec else F.cross_entropy(model(x), y)
            loss.backward()
            straggler.pad(time.perf_counter() - computing)  # the others wait at aggregation
            faults.inject(rank, updates, model)
            if guard.check(updates):  # a NaN/Inf gradient is skipped on its own worker
                optimizer.step()
            updates += 1
            samples += len(y)
            agg.after_step(final=updates == total_steps)
            book.after_update(model, loss, updates, samples)
    wall = book.stop()

    snapshots = book.snapshots
    points = evaluate_members(model, snapshots, test_set, world, averaged=not ec)
    final = "ensemble" if ec and args.ec_final == "ensemble" else "member"
    for p in points:
        p.update(test_acc=p[f"{final}_acc"], test_loss=p[f"{final}_loss"])
    log.write_points(points)
    model.load_state_dict(snapshots[-1].state)
    log.save_model(model)
    if final == "ensemble":
        _save_ensemble(log, snapshots[-1].state, world)
    last = points[-1]
    summary = run_summary(
        args, points,
        algo_label=label(args, tau),
        workers=size,
        updates=updates,
        tau=tau,
        final_model=final,
        final_member_acc=last["member_acc"],
        final_mean_member_acc=last["mean_member_acc"],
        final_ensemble_acc=last["ensemble_acc"],
        wall_s=wall,
        samples_per_s=world.allreduce(samples / wall),
        aggregation=agg.stats.summary(),
        straggler_sleep_s=straggler.slept,
        params=models.num_parameters(model),
        **train_data.stats(),
        **guard.summary(),
        **ckpt.summary(),
    )
    if ec:
        summary["distilled_samples_per_rank"] = agg.distilled
    else:
        summary["final_averaged_acc"] = last["averaged_acc"]
    log.write_summary(summary)
    return summary
