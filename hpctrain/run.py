"""The one training loop, for every algorithm, and ``hpctrain.train(config)``.

This module owns what every run does alike: set-up (seed, data, model, and the one place
where a device is chosen: :func:`device_for`), the step sequence, snapshots, checkpoints,
evaluation, the outputs and the summary. An algorithm (:class:`hpctrain.algorithm.Algorithm`)
plugs in at fixed points. One step, on every worker::

    index = algo.claim(position)          # the update this worker makes (async: a ticket)
    checkpoint if one is due at index     # algo.before_checkpoint / after_checkpoint
    stop at the budget
    learning rate at the global progress; this worker's next batch
    loss = faults.inject(algo.loss(x, y)) # the fault hook, the same point for all
    backward; straggler pad               # an injected straggler's sleep
    algo.synchronize()                    # ssgd: the allreduce completes
    guard.check -> algo.apply()           # NaN/Inf gradients are skipped
    position = algo.progress(...); algo.after_update(final)   # MA/EC aggregate here
    bar, watchdog beat, snapshot every --eval-every epochs of global progress

Snapshots are evaluated after training, so the time axis excludes evaluation.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from hpctrain import checkpoint, comm, data, devices, faults, models, watchdog
from hpctrain import config as configs
from hpctrain.algorithm import Algorithm, Setup
from hpctrain.config import RunConfig
from hpctrain.errors import UsageError
from hpctrain.evaluate import Snapshots
from hpctrain.metrics import RunLog
from hpctrain.metrics import progress as progress_bar
from hpctrain.runtime import REAL, Runtime
from hpctrain.schedule import learning_rate, set_lr
from hpctrain.steptimes import StepTimes
from hpctrain.stragglers import parse_slowdown
from hpctrain.summary import RunSummary
from hpctrain.torch_comm import TorchComm


def check_launch(config: RunConfig, ranks: int) -> RunConfig:
    """Check ``config`` against the world it starts in (``ranks`` processes, data files,
    checkpoint folders) before MPI starts; return it with every default resolved."""
    config = configs.resolve(config)
    algo = config.algorithm_class
    launcher = comm.launcher()
    config = algo.for_launch(config, launcher)
    if launcher == "torchrun" and (algo.needs_mpi(config) or
                                   config.data.data_placement == "sharded"):
        what = "--data-placement sharded" if not algo.needs_mpi(config) else \
            f"--algo {config.algo}" + (f" --sync-backend {config.algorithm.sync_backend}"
                                       if config.algo == "ssgd" else "")
        raise UsageError(f"{what} moves data through MPI, and torchrun starts no MPI world: "
                         "launch with mpirun, or srun with PMI/PMIx")
    devices.check(config.device)
    parse_slowdown(config.stragglers.slowdown, algo.workers(config, ranks))
    n = data.size(config.data.dataset, "train", config.data.data_dir)
    if ranks > n:
        raise UsageError(f"{ranks} ranks but only {n} training samples in {config.data.dataset}")
    algo.check(config, ranks)
    ck = config.checkpoint
    resolved = checkpoint.check(algo=config.algo, ranks=ranks, every=ck.every,
                                checkpoint_dir=ck.dir, resume=ck.resume, out=config.out,
                                run_config=configs.flat(config),
                                may_change=checkpoint.MAY_CHANGE)
    config = replace(config, out=resolved.out,
                     checkpoint=replace(ck, dir=resolved.checkpoint_dir, resume=resolved.resume))
    if config.out and (Path(config.out) / "summary.json").exists():
        raise UsageError(f"--out {config.out} already holds a finished run; choose another "
                         "folder")
    return config


def train(config: RunConfig) -> dict:
    """Train as ``config`` says, on every rank of the MPI world; write the run's outputs;
    return its summary (the same on every rank).

    For a user's own script under ``mpirun``: ``hpctrain.train(RunConfig(algo="ssgd"))``.
    Checks come first (ValueError/UsageError before any communication), then MPI starts at
    the thread level the algorithm needs, unless the script started it already.
    """
    config = check_launch(config, comm.launch_size())
    MPI = comm.init(config.algorithm_class.thread_level)
    world = TorchComm() if comm.launcher() == "torchrun" else MPI.COMM_WORLD
    if config.out is None:
        stamp = world.bcast(time.strftime("%Y%m%d-%H%M%S"), root=0)
        config = replace(config, out=str(Path("runs") / f"{config.algo}-{stamp}"))
    torch.set_num_threads(config.threads)
    watchdog.start(config.stall_timeout, world.Get_rank())
    try:
        return world.bcast(_run(config, world), root=0)
    finally:
        watchdog.stop()


def device_for(config: RunConfig) -> torch.device:
    """The one place a device is chosen (``--device``; see :mod:`hpctrain.devices`)."""
    return devices.choose(config.device)


def _run(config: RunConfig, world) -> dict | None:
    algo: Algorithm = config.algorithm_class(config)
    torch.manual_seed(config.seed)
    test_set = data.load(config.data.dataset, "test", config.data.data_dir)
    model = models.build(config.model.name, test_set.shape, test_set.num_classes)
    model.to(device_for(config))
    resume = config.checkpoint.resume
    loaded = checkpoint.newest(resume) if resume and world.Get_rank() == 0 else None
    algo.restore_model(loaded)
    workers = algo.connect(world, model)
    summary = _train(config, algo, workers, model, test_set, loaded) if algo.is_worker() \
        else None
    algo.close()  # a store host that does not train serves the workers here until they finish
    return summary


def _train(config: RunConfig, algo: Algorithm, comm_, model, test_set, loaded,
           runtime: Runtime = REAL) -> dict | None:
    """One worker's training, evaluation and (rank 0) outputs; collective over the workers.

    ``runtime``: the clock, stragglers and data (the simulator passes a virtual one)."""
    rank, size = (comm_.Get_rank(), comm_.Get_size()) if comm_ is not None else (0, 1)
    o = config.optim
    train_data = runtime.train_data(config.data.spec(config.seed), comm_)
    steps = math.ceil(train_data.samples_per_rank / o.batch_size)  # one epoch of local data
    per_epoch = algo.per_epoch(steps, size)
    total = o.epochs * per_epoch
    s = Setup(model, train_data, comm_, size, steps)
    algo.setup(s)
    guard = algo.guard(s)
    straggler = runtime.straggler(config, rank, size)
    step_times = StepTimes()
    shared, per_rank = algo.checkpoint_state()
    ckpt = checkpoint.Checkpointer(
        comm_, per_epoch, total, shared=shared,
        per_rank={**per_rank, "guard": guard, "straggler": straggler},
        per_rank_snapshots=algo.snapshots == "per_rank", every=config.checkpoint.every,
        folder=checkpoint.run_folder(config.checkpoint.dir, config.out),
        resume=config.checkpoint.resume,
        header={"algo": config.algo, "ranks": comm.launch_size(), "args": configs.flat(config)})
    log = RunLog(config.out, rank)
    log.write_config({**configs.repeatable(config),
                      "run_info": {"workers": size, **runtime.run_info()}})
    snapshots = Snapshots()
    snapshotting = algo.snapshots != "root" or rank == 0
    if snapshotting:
        snapshots.take(model, t=0.0, epoch=0.0, updates=0)

    done = ckpt.restore(snapshots, loaded)
    position = done.get("updates", 0)
    samples = done.get("samples", 0)
    # A lock-step checkpoint from before the one loop has no position of its own: derive it.
    local_steps = done.get("local_steps", done.get("pushes", position))
    epoch, i = done.get("local_epoch", position // steps), done.get("i", position % steps)
    if i == steps:  # saved at the end of an epoch
        epoch, i = epoch + 1, 0
    algo.start(position)
    bar = progress_bar(total, rank, config.algo, enabled=config.progress)
    bar.update(position)
    snapshot_every = max(1, round(config.eval_every * per_epoch))
    next_snapshot = (position // snapshot_every + 1) * snapshot_every
    if comm_ is not None:
        comm_.Barrier()
    start = runtime.now() - done.get("elapsed", 0.0)
    local = train_data.epoch(epoch)
    algo.epoch_started(local)
    loss = None
    while True:
        index = algo.claim(position)
        if ckpt.due(index):
            position = algo.before_checkpoint(position)
            ckpt.save(position, {"samples": samples, "local_steps": local_steps,
                                 "local_epoch": epoch, "i": i,
                                 "elapsed": runtime.now() - start}, snapshots)
            algo.after_checkpoint()
            continue  # an async worker's ticket may be past the next mark too
        if index >= total:
            break
        if i == steps:
            epoch, i = epoch + 1, 0
            local = train_data.epoch(epoch)
            algo.epoch_started(local)
        set_lr(algo.optimizer, learning_rate(o.lr, position // per_epoch +
                                             position % per_epoch / per_epoch, o.epochs,
                                             o.lr_schedule, o.lr_milestones, o.lr_gamma))
        x = local.images[i * o.batch_size:(i + 1) * o.batch_size].to(s.device)
        y = local.labels[i * o.batch_size:(i + 1) * o.batch_size].to(s.device)
        algo.optimizer.zero_grad()
        computing = runtime.now()
        loss = faults.inject(rank, local_steps, model, algo.loss(x, y))
        loss.backward()
        straggler.pad(runtime.now() - computing)  # the others wait for it, or run on
        step_times.record(runtime.now() - computing)
        algo.synchronize()
        applied = guard.check(local_steps)
        if applied:
            algo.apply()
        position = algo.progress(position, applied)
        local_steps, samples, i = local_steps + 1, samples + len(y), i + 1
        algo.after_update(final=position >= total)
        bar.update(min(position, total) - bar.n)
        if local_steps % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        watchdog.beat("update", local_steps)
        if position >= next_snapshot:
            if snapshotting and position < total:
                snapshots.take(model, t=runtime.now() - start,
                               epoch=position / per_epoch, updates=position)
            next_snapshot = (position // snapshot_every + 1) * snapshot_every
    busy = runtime.now() - start
    position = algo.finish(position)
    wall = runtime.now() - start
    bar.close()
    if snapshotting:
        snapshots.take(model, t=wall, epoch=position / per_epoch, updates=position)
    if algo.snapshots == "root" and comm_ is not None:
        snapshots = comm_.bcast(snapshots, root=0)
    final_state = snapshots[-1].state

    points = algo.evaluate(model, snapshots, test_set, comm_)
    log.write_points(points)
    model.load_state_dict(final_state)
    log.save_model(model)
    algo.write_outputs(log, snapshots, comm_)
    step_times.write(log.dir, comm_, rank)
    own = algo.summary(points, comm_)
    mine = {"samples": samples, "busy_s": busy, "slept_s": straggler.slept}
    every = comm_.gather(mine, root=0) if comm_ is not None else [mine]
    guarded = guard.summary()
    checkpoints = ckpt.summary()
    exchange = train_data.stats()
    if rank != 0:
        return None
    summary = RunSummary(
        algo=config.algo, algo_label=algo.label(), workers=size, model=config.model.name,
        dataset=config.data.dataset, epochs=o.epochs, updates=points[-1]["updates"],
        final_test_acc=points[-1]["test_acc"], final_test_loss=points[-1]["test_loss"],
        best_test_acc=max(p["test_acc"] for p in points), wall_s=wall,
        samples_per_s=sum(w["samples"] for w in every) / wall,
        params=models.num_parameters(model),
        samples_per_worker=[w["samples"] for w in every],
        busy_s_per_worker=[w["busy_s"] for w in every],
        straggler_sleep_s_per_worker=[w["slept_s"] for w in every],
        slowdown=config.stragglers.slowdown, jitter=config.stragglers.jitter,
        **guarded, **checkpoints, **exchange, out=config.out, algorithm_fields=own,
        **runtime.summary_fields(),
    ).to_dict()
    log.write_summary(summary)
    return summary
