"""The one training loop, for every algorithm, and ``hpctrain.train(config)``.

This module owns what every run does alike: set-up (seed, data, model, and the one place
where a device is chosen: :func:`device_for`), the step sequence, snapshots, checkpoints,
evaluation, the outputs and the summary. An algorithm (:class:`hpctrain.algorithm.Algorithm`)
plugs in at fixed points. One step, on every worker::

    index = algo.claim(position)          # the update this worker makes (async: a ticket)
    checkpoint if one is due at index     # algo.before_checkpoint / after_checkpoint
    stop at the budget
    learning rate at the global progress; this worker's next batch
    for part in algo.losses(x, y, micro): # the batch, or its --micro-batch-size parts,
        faults.inject(part)               # each forward under autocast with
        scaler.scale(part).backward()     # --mixed-precision (fp16: the loss scaled)
    straggler pad                         # an injected straggler's sleep
    algo.synchronize()                    # ssgd: the allreduce completes
    scaler.unscale(); guard.check -> algo.apply(); scaler.update(skipped)   # NaN/Inf
    position = algo.progress(...); algo.after_update(final)   # MA/EC aggregate here
    bar, watchdog beat, snapshot every --eval-every epochs of global progress

The update (synchronize to scaler.update), after_update, before_checkpoint and the
algorithm's finish, where the ranks wait for each other, run inside
``watchdog.waiting_for_others``: a rank stalled elsewhere speaks first.

Snapshots are evaluated after training, so the time axis excludes evaluation, unless
``--eval online`` (:mod:`hpctrain.live`, which also writes TensorBoard and watches for a
collapse).

:func:`_train` runs one worker's loop, a :class:`_Training`, in three parts: set up (its
constructor), the steps above (:meth:`_Training.loop`), the end (:meth:`_Training.finish`:
the final snapshot, the curve, the outputs, the summary). The simulator calls it with a
virtual ``runtime``.

:func:`train` runs the checks before MPI starts (:mod:`hpctrain.launch_checks`), has rank 0
claim and lock the run's folders (:mod:`hpctrain.run_folders`), then, with MPI started,
makes the ranks agree on what they checked (:func:`_agree`) and runs the loop.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
from dataclasses import dataclass, replace
from typing import TypedDict, TypeVar, cast, overload

import torch

from hpctrain import (
    checkpoint,
    comm,
    compiled,
    data,
    devices,
    faults,
    job_end,
    live,
    microbatch,
    model_checks,
    models,
    optimizers,
    options,
    pickled,
    plugins,
    precision,
    profiling,
    provenance,
    userdata,
    watchdog,
)
from hpctrain import config as configs
from hpctrain.algorithm import Algorithm, Setup
from hpctrain.config import RunConfig
from hpctrain.errors import UsageError, on_every_rank, raised_on_every_rank
from hpctrain.evaluate import Snapshots, footprint_warning, state_bytes
from hpctrain.launch_checks import check_launch, finished_run, initial_model
from hpctrain.metrics import RunLog
from hpctrain.metrics import progress as progress_bar
from hpctrain.result import Summary
from hpctrain.run_folders import claimed
from hpctrain.runtime import REAL, Runtime
from hpctrain.schedule import set_lr
from hpctrain.steptimes import StepTimes
from hpctrain.summary import RunSummary, own_byte_fields
from hpctrain.torch_comm import TorchComm


@contextlib.contextmanager
def _torch_kept():
    """torch's thread count and CPU random state as the script had them: a run sets both
    (``--threads``, ``--seed``), as cudnn_mode keeps cuDNN's settings."""
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)


def train(config: RunConfig) -> Summary:
    """Train as ``config`` says, on every rank of the MPI world; write the run's outputs;
    return its summary (the same on every rank): a dict, typed as
    :class:`hpctrain.result.Summary`.

    For a user's own script under ``mpirun``: ``hpctrain.train(RunConfig(algo="ssgd"))``.
    Checks come first (ValueError/UsageError before any training communication). Launched on
    several ranks by mpirun or srun, MPI starts before them, at the thread level the
    algorithm needs unless the script started it already, so that a refusal one rank finds
    (its node lacks a folder) is raised on every rank: a sweep that catches it stays in step.

    Raises ``ValueError`` (:class:`hpctrain.errors.UsageError`) for a refused setting and
    :class:`hpctrain.checkpoint.Stopped` after SIGUSR1's checkpoint, on every rank alike;
    :class:`hpctrain.guard.TooManyBadSteps` when ``max_bad_steps`` steps in a row had
    NaN/Inf gradients (with ssgd on every rank; another algorithm's worker raises it
    alone, which ends a job of several ranks).
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"hpctrain.train takes a RunConfig (hpctrain.load_config reads a "
                        f"file), not {type(config).__name__}")
    several = comm.launcher() == "mpi" and comm.env_size() > 1
    return _train_on_world(config, mpi_first=several and comm.mpi_running() is None)


def checked_first(config: RunConfig, given: frozenset[str] | None = None) -> Summary:
    """:func:`train` with its checks before MPI starts: the command line's, a process of its
    own, which one rank's refusal ends (exit status 2) as its launcher ends the others
    (``given``: the options set, as :func:`check_launch` takes them)."""
    return _train_on_world(config, mpi_first=False, given=given)


_script_hook = None  # the script's own excepthook, where a failed run left the abort hook


def _train_on_world(config: RunConfig, mpi_first: bool,
                    given: frozenset[str] | None = None) -> Summary:
    """:func:`train`, MPI started first or after the checks."""
    global _script_hook
    # One rank's error ends the job, not leaves the others waiting. Once the run returned
    # (or failed in a process of its own), the script's errors are its own again: the hook
    # ends the process at once, its files unflushed and its atexit functions not run. A
    # run that failed on several ranks leaves it: the next run that returns gives it back.
    hook = _script_hook if _script_hook and job_end.aborts_on_error() else job_end.hook_state()
    _script_hook = None
    job_end.install_abort_on_error()
    try:
        if mpi_first:
            if comm.env_rank() == 0:
                provenance.commit()  # git's fork, which some networks' drivers dislike in MPI
            comm.init(config.algorithm_class.thread_level)
        summary = _checked_run(config, given)
    except BaseException:
        if comm.launch_size() == 1:
            job_end.restore_hook(hook)
        else:
            _script_hook = hook
        raise
    job_end.restore_hook(hook)
    return cast(Summary, summary)  # RunSummary.to_dict()'s, or a finished run's summary.json


def _checked_run(config: RunConfig, given: frozenset[str] | None = None) -> dict:
    """:func:`train`'s checks and run, with the abort hook installed."""
    auto = config.checkpoint.resume == checkpoint.AUTO
    named = config.out is not None
    with _torch_kept():  # the checks build models too
        done, config, refusal = _checked(config, given)
        # where MPI runs already, every rank raises it; a rank that never calls train()
        # would hold the others there for ever, so the watchdog's start-up bound holds
        with watchdog.watching(config.stall_timeout, comm.env_rank(), comm.launch_size(),
                               "waiting in hpctrain.train() for every rank to call it"):
            comm.shared_refusal(refusal)
        if (done := _agreed_finished(done)) is not None:
            return done
        with claimed(config) as config:
            if auto and comm.env_rank() == 0:  # said once the folder is this run's
                resume = config.checkpoint.resume
                found = f"resuming from the checkpoints in {resume}" if resume else \
                    "no checkpoint yet, starting the run"
                print(f"hpctrain: --resume auto: {found}", flush=True)
            if comm.env_rank() == 0:  # the one rank that writes config.json
                provenance.before_mpi(config.model.init_from, config.checkpoint.resume is not None)
            return _launched(config, named)


def _checked(config: RunConfig, given: frozenset[str] | None = None
             ) -> tuple[dict | None, RunConfig, UsageError | None]:
    """:func:`train`'s checks on this rank: a finished run's summary (``--resume auto``), or
    the checked configuration, or the refusal (shared with the other ranks by the caller)."""
    try:
        done = finished_run(config)
        if done is not None:
            return done, config, None
        userdata.forget()  # a script's earlier run read them: they may have changed since
        return None, check_launch(config, comm.launch_size(), given), None
    except UsageError as refused:
        return None, config, refused


def _agreed_finished(done: dict | None) -> dict | None:
    """``done``, a finished run's summary (None: the run has not finished), once every rank
    agrees whether the run has finished where MPI already runs (their files may differ:
    ``--out`` on node-local storage); a UsageError if they disagree."""
    finished = done is not None
    MPI = comm.mpi_running()
    seen = MPI.COMM_WORLD.allgather(finished) if MPI is not None else [finished]
    if len(set(seen)) > 1:
        raise on_every_rank(UsageError(
            f"--resume auto: rank(s) {_ranks(seen, True)} find a finished run and rank(s) "
            f"{_ranks(seen, False)} do not; do the ranks share the run's folder?"))
    return done


def _ranks(seen: list, value) -> str:
    return ", ".join(str(r) for r, v in enumerate(seen) if v == value)


def _launched(config: RunConfig, named: bool) -> dict:
    """:func:`train` once the configuration is checked and its folders are this run's
    (``named``: the user gave ``out``; else rank 0 made one, which the others learn here)."""
    MPI = comm.init(config.algorithm_class.thread_level)
    world = TorchComm() if comm.launcher() == "torchrun" else MPI.COMM_WORLD
    if not named:
        config = replace(config, out=world.bcast(config.out, root=0))
    _agree(world, config)
    watchdog.start(config.stall_timeout, world.Get_rank(), world.Get_size())
    try:
        try:
            with devices.cudnn_mode(config.device, config.cudnn_benchmark):
                torch.set_num_threads(config.threads)
                result = _run(config, world)
        except checkpoint.Stopped as stopped:  # the evaluating rank (--eval-rank) is told
            result = stopped
        except SystemExit as exited:  # sys.exit in the user's code: a forward, a Dataset item
            # Python exits without the abort hook: this rank alone, with the code's status
            # (3 read as a stall) and no line, and the others waited for it in a collective
            # forever. An error instead, said by the hook, which ends the whole job.
            raise RuntimeError(f"the code called sys.exit({exited.code!r}) during the run (one "
                               "rank cannot leave a running job alone)") \
                .with_traceback(exited.__traceback__) from None
        result = live.from_rank0(world, result)  # a store's server learns of a stop here
    finally:
        watchdog.stop()
    if isinstance(result, checkpoint.Stopped):
        raise result
    return result


def _agree(world, config: RunConfig) -> None:
    """Every rank checked the run against its own node's files before MPI started (the data,
    a model of the user's own, ``--resume auto``'s checkpoints) and resolved ``--device
    auto`` with its own GPUs: refuse, on every rank, a run they resolved differently, which
    would hang in its first collective, fail in it with a message that explains nothing,
    train on mismatched data (of the same sizes: other labels or pixels), or meet NCCL on one
    rank with gloo on another. One allgather."""
    d = config.data
    mine = {**configs.flat(config), "training samples": data.size(d.dataset, "train", d.data_dir),
            "test samples": data.size(d.dataset, "test", d.data_dir),
            _DATA: data.fingerprint(d.dataset, d.data_dir),
            _DEVICE: devices.resolve(config.device)}
    if plugins.is_reference(config.model.name):  # a built-in one is the same everywhere
        sample = data.load(d.dataset, "test", d.data_dir, 0, 1)
        mine["the model"] = model_checks.checked_layout(config.model.name, sample.shape,
                                                   sample.num_classes, config.model.args)
    _refuse_different(world.allgather(mine))


_DEVICE = "the device (--device auto)"
_DATA = "the data (its labels and a few samples)"


def _refuse_different(every: list[dict]) -> None:
    """:func:`_agree`'s verdict on every rank's values (each rank sees them all)."""
    found = comm.first_difference(every)
    if found is None:
        return
    key, other = found
    hint = "do the ranks see the same files?"
    if key == _DEVICE:
        hint = "does every node see a GPU (CUDA_VISIBLE_DEVICES)? --device cpu or cuda says " \
            "which"
    elif key in ("training samples", "test samples", _DATA) \
            and userdata.is_loader(str(every[0].get("dataset", ""))):
        # A loader's own generator without a seed gives each rank other data, files alike.
        hint = "do the ranks see the same files, and does the loader draw random numbers " \
            "without a fixed seed (np.random.default_rng() with no seed: give it one)?"
    raise on_every_rank(UsageError(
        f"the ranks resolved different runs: {key} is {every[0][key]!r} on rank 0 but "
        f"{every[other][key]!r} on rank {other}; {hint}"))


def device_for(config: RunConfig) -> torch.device:
    """The one place a device is chosen (``--device``; see :mod:`hpctrain.devices`)."""
    return devices.choose(config.device)


def _run(config: RunConfig, world) -> dict | None:
    algo: Algorithm = config.algorithm_class(config)
    torch.manual_seed(config.seed)
    d = config.data
    # Its shape and classes now; its samples (float32) on the ranks that may score them.
    test_set = data.DeferredDataset(d.dataset, "test", d.data_dir)
    model = initial_model(config, test_set.shape, test_set.num_classes)
    model.to(device_for(config))
    everyone, (world, evaluating) = world, live.split_world(world, config)
    if evaluating:  # --eval-rank: this rank scores snapshots and does not train
        _held_data(config, test_set, scores=True, trains=False)
        live.serve(everyone, model, test_set)
        return None
    resume = config.checkpoint.resume
    loaded = checkpoint.newest(resume) if resume and world.Get_rank() == 0 else None
    algo.restore_model(loaded)
    workers = algo.connect(world, model)
    rank = workers.Get_rank() if workers is not None else 0
    _held_data(config, test_set, scores=algo.is_worker() and live.scores_test_set(config, algo,
                                                                                  rank),
               trains=algo.is_worker())
    try:
        summary = _train(config, algo, workers, model, test_set, loaded, everyone) \
            if algo.is_worker() else None
    except checkpoint.Stopped as stopped:  # SIGUSR1, after the checkpoint, on every worker
        summary = stopped
    except BaseException as error:  # Ctrl-C's KeyboardInterrupt too, in a notebook
        if raised_on_every_rank(error) or everyone.Get_size() == 1:  # a script may go on
            with contextlib.suppress(Exception):  # the run's error is the one to see
                _release(algo, world, everyone)
        raise
    _release(algo, world, everyone)
    return summary


def _held_data(config: RunConfig, test_set: data.DeferredDataset, scores: bool,
               trains: bool) -> None:
    """What this rank holds of the data: the test set read now if it ``scores`` (before
    training, as every rank read it: a sample it cannot read ends the run before it starts),
    else only if ever used; the data set's whole arrays let go (the training split's by
    ``make_train_data`` if it ``trains``)."""
    if scores:
        test_set.read()
    d = config.data
    data.release(d.dataset, "test", d.data_dir)
    if not trains:
        data.release(d.dataset, "train", d.data_dir)


def _release(algo: Algorithm, world, everyone) -> None:
    """What the run holds, on every rank (collective): the algorithm's resources (a store
    host that does not train serves the workers here until they finish), and the training
    ranks' communicator of a run with ``--eval-rank``."""
    algo.close()
    if world is not everyone:
        world.Free()


def _state(model) -> dict:
    """A copy of ``model``'s state in host memory, as a snapshot holds it."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _from_rank0(model, snapshots: Snapshots, comm_) -> None:
    """Lock-step workers hold the same parameters, but each its own buffers (BatchNorm's
    running statistics, from its own batches) and its own clock (started at one barrier,
    milliseconds apart). Every snapshot takes rank 0's buffers and info (t, epoch, ...), so
    that the curve and the summary score the model ``model.pt`` holds, on rank 0's time axis
    (``wall_s``'s), whichever rank scores a snapshot: a curve scored by two ranks went back
    in time between neighbours (collective; the buffers and a few numbers per snapshot)."""
    names = [name for name, _ in model.named_buffers()]
    ours = _rank0s([({k: s.state[k] for k in names if k in s.state}, s.info)
                    for s in snapshots], comm_)
    for snapshot, (buffers, info) in zip(snapshots, ours, strict=True):
        snapshot.state.update(buffers)
        snapshot.info = info


_Items = TypeVar("_Items", bound=list)


@overload
def _rank0s(items: _Items, comm_) -> _Items: ...
@overload
def _rank0s(items: None, comm_) -> list: ...
def _rank0s(items: list | None, comm_) -> list:
    """Rank 0's ``items`` (its snapshots, or their buffers) on every rank (collective; the
    others' are not used): together they may pass 2 GiB."""
    return pickled.large_messages(comm_).bcast(items, root=0)


def _epoch_data(train_data, epoch: int):
    """This worker's samples of ``epoch``, under the watchdog's allowance for work that does
    not beat: sharded placement's exchange moves a shard (minutes for tens of GB), which a
    healthy job's --stall-timeout took for a hang."""
    with watchdog.busy("exchanging the epoch's data", epoch):
        return train_data.epoch(epoch)


def _one_minute_load() -> float | None:
    """The node's 1-minute load average (None where the system has none): a loaded machine
    explains a spread in wall times (load 5.7 on 2 cores gave 40% between seeds)."""
    loads = provenance.load_average()
    return None if loads is None else loads[0]


def _write_config(log: RunLog, config: RunConfig, algo: Algorithm, device: torch.device,
                  size: int, runtime: Runtime, started_from: dict, resumes: list) -> None:
    """Rank 0: ``config.json``, the run's settings as ``--config`` repeats them, with
    ``run_info``: where, what and from which weights it ran, and its earlier attempts."""
    info = {"workers": size, "device": str(device), **runtime.run_info(),
            **provenance.invocation(),
            **provenance.software(device), **provenance.process_group(), **started_from,
            **provenance.code_files(config), **provenance.classes(config),
            **provenance.resolved(config, algo),
            **({"byte_fields": own_byte_fields(type(algo))}
               if plugins.is_reference(config.algo) else {})}
    log.write_config({**configs.repeatable(config), **runtime.config_tables(), "run_info": {
        **info, **provenance.resumes(resumes, log.dir / "config.json", info)}})


@dataclass
class _Counters:
    """Where this worker's loop is: what a checkpoint saves and a resumed run restores."""

    position: int  # the global updates
    local_steps: int  # this worker's steps
    epoch: int  # its local epoch
    i: int  # its batch within the epoch
    samples: int  # the samples it trained on


def _resumed_at(done: dict, steps: int) -> _Counters:
    """Where a restored checkpoint's counters (``{}``: a fresh start) put the loop."""
    position = done.get("updates", 0)
    # A lock-step checkpoint from before the one loop has no position of its own: derive it.
    local_steps = done.get("local_steps", done.get("pushes", position))
    epoch, i = done.get("local_epoch", position // steps), done.get("i", position % steps)
    if i == steps:  # saved at the end of an epoch
        epoch, i = epoch + 1, 0
    return _Counters(position, local_steps, epoch, i, samples=done.get("samples", 0))


def _marks_covered(snapshots: Snapshots, position: int, per_epoch: int, every: int) -> int:
    """The --eval-every marks a resumed run's snapshots cover: to its last one. Lock-step
    loops take a mark's before the checkpoint there; an async rank 0 may not have reached
    it (the others' pushes did), and the point was lost when the count at the checkpoint
    said it passed. By its epoch: a run resumed on other workers counts other updates
    (resize.py)."""
    last = snapshots[-1].info.get("epoch") if snapshots else None
    covered = position if last is None else min(position, round(last * per_epoch))
    return covered // every


@dataclass
class _Marks:
    """The --eval-every marks the loop snapshots at, and what it saw of them: the final
    note on the marks an async rank 0 passed within one step needs it."""

    every: int  # the updates between two marks (snapshot_interval)
    count: int  # the marks the run snapshots at (marks_taken): the last at count * every
    first: int  # the marks a resumed run's snapshots cover already
    next: int  # the update of the next mark
    taken_at: int | None = None  # the update of the last snapshot the loop took
    taken: int = 0  # how many it took
    checked_at: int = 0  # the updates at this rank's last check
    widest: int = 0  # the most updates between two of this rank's checks

    @classmethod
    def of_run(cls, total: int, every: int, snapshots: Snapshots, position: int,
               per_epoch: int) -> _Marks:
        """A run's marks, from ``position`` on (0, or where a resumed run is, its restored
        ``snapshots`` covering the marks before)."""
        first = _marks_covered(snapshots, position, per_epoch, every)
        return cls(every, marks_taken(total, every), first, next=(first + 1) * every,
                   checked_at=position)

    def passed(self, position: int, total: int) -> bool:
        """Whether a snapshot is due at ``position``, the updates after this rank's step:
        it passed the next mark, one the run snapshots at (below ``total``, and not one the
        final snapshot stands for); the next mark is then the first past ``position``."""
        self.widest, self.checked_at = max(self.widest, position - self.checked_at), position
        if position < self.next:
            return False
        due = self.next <= self.count * self.every and position < total
        self.next = (position // self.every + 1) * self.every
        return due

    def missed(self, position: int) -> int:
        """The marks up to ``position`` (of those the run snapshots at) that got no
        snapshot of their own."""
        return min(position // self.every, self.count) - self.first - self.taken


def snapshot_interval(eval_every: float, per_epoch: int) -> int:
    """The updates between two snapshots: ``--eval-every`` rounded to whole updates, at
    least one (a snapshot is taken between steps)."""
    return max(1, round(eval_every * per_epoch))


def marks_taken(total: int, every: int) -> int:
    """The --eval-every marks a run of ``total`` updates snapshots at: one every ``every``
    updates, but for one closer to the end than half an interval, for which the final
    snapshot stands (with 469 updates an epoch, 0.25 snapshots every 117: a mark at 468
    gave two points one update apart, and one more pass over the test set)."""
    return max(0, (2 * total - every) // (2 * every))


def rounding_note(eval_every: float, per_epoch: int) -> str | None:
    """A line for rank 0 where rounding to whole updates moves ``--eval-every`` by more than
    a quarter (few updates an epoch), so that a curve's spacing is no surprise; else None."""
    every = snapshot_interval(eval_every, per_epoch)
    if abs(every / per_epoch - eval_every) <= eval_every / 4:
        return None
    return (f"hpctrain: --eval-every {options.shown(eval_every)} snapshots every {every} "
            f"update{'s' if every > 1 else ''} here, {every / per_epoch:.3g} "
            f"epochs: {per_epoch} update{'s' if per_epoch > 1 else ''} an epoch, and "
            f"snapshots fall between updates")


def _say_footprint(model, count: int, copies: int, size: int,
                   ckpt: checkpoint.Checkpointer) -> None:
    """Rank 0: warn where the run's ``count`` snapshots will not fit in half of this node's
    available memory (``copies`` of them there), or of the checkpoint folder's disk (their
    files: one set, or each of the ``size`` workers')."""
    each = state_bytes(model)
    said = [footprint_warning(each, count, copies, _available_memory(), "of this node's memory")]
    if ckpt.enabled:
        folder = next(p for p in (ckpt.folder, *ckpt.folder.parents) if p.exists())
        said.append(footprint_warning(each, count, size if ckpt.snapshots_per_rank else 1,
                                      shutil.disk_usage(folder).free, f"in {ckpt.folder}"))
    for line in filter(None, said):
        print(line, file=sys.stderr, flush=True)


def _available_memory() -> int | None:
    """This node's available memory in bytes (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as lines:
            kib = next(line.split()[1] for line in lines if line.startswith("MemAvailable:"))
        return int(kib) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return None


class _WorkerCounts(TypedDict):
    """One worker's counts that rank 0 gathers for the summary (:func:`_per_worker`)."""

    samples: int
    busy_s: float
    slept_s: float
    peak: int | None
    scale: float | None
    overflows: int | None
    profiled: tuple[int, int | None, int]  # Profiler.outcome()


def _per_worker(every: list[_WorkerCounts], wall: float) -> dict:
    """The summary's fields gathered from every worker: its samples, busy time, straggler
    sleep, peak memory, fp16 loss scale and overflows; the samples per second of them all."""
    return {"samples_per_s": sum(w["samples"] for w in every) / wall,
            "samples_per_worker": [w["samples"] for w in every],
            "busy_s_per_worker": [w["busy_s"] for w in every],
            "straggler_sleep_s_per_worker": [w["slept_s"] for w in every],
            "peak_memory_per_worker": [w["peak"] for w in every],
            "loss_scale_per_worker": [w["scale"] for w in every],
            "overflow_steps_per_worker": [w["overflows"] for w in every]}


def _train(config: RunConfig, algo: Algorithm, comm_, model, test_set, loaded,
           world=None, runtime: Runtime = REAL) -> dict | None:
    """One worker's training, evaluation and (rank 0) outputs; collective over the workers.

    ``runtime``: the clock, stragglers and data (the simulator passes a virtual one)."""
    training = _Training(config, algo, comm_, model, test_set, loaded, world, runtime)
    try:
        training.loop()
        return training.finish()
    except BaseException:
        training.let_go()  # what is still open (an error every worker raised closed the loop)
        raise


class _Training:
    """One worker's run of :func:`_train`: set up (``__init__``), the steps (:meth:`loop`),
    the end (:meth:`finish`). It holds what set-up made, which the steps and the end share,
    and the counters the steps move; every worker makes its collective calls in one order."""

    def __init__(self, config: RunConfig, algo: Algorithm, comm_, model, test_set, loaded,
                 world, runtime: Runtime) -> None:
        """Set-up: the data and its sizes, the algorithm, the step's helpers, the checkpointer
        and config.json; then :meth:`_start` (``loaded``: the checkpoint rank 0 resumes)."""
        rank, size = (comm_.Get_rank(), comm_.Get_size()) if comm_ is not None else (0, 1)
        o = config.optim
        train_data = runtime.train_data(config.data.spec(config.seed), comm_)
        steps = math.ceil(train_data.samples_per_rank / o.batch_size)  # one epoch of local data
        per_epoch = algo.per_epoch(steps, size)
        total = o.epochs * per_epoch
        s = Setup(model, train_data, comm_, size, steps)
        self.config, self.algo, self.comm_, self.model, self.setup = config, algo, comm_, model, s
        self.test_set, self.runtime, self.rank, self.size = test_set, runtime, rank, size
        self.train_data, self.steps = train_data, steps
        self.per_epoch, self.total = per_epoch, total
        model.train()  # a build may hand it out in eval mode (after loading pretrained weights)
        algo.setup(s)
        if not isinstance(algo.optimizer, torch.optim.Optimizer):  # else found at the first step
            raise TypeError(f"{type(algo).__name__}.setup() must set self.optimizer to a torch "
                            f"optimizer, not {type(algo.optimizer).__name__}")
        # Where the model is, and where batches go (Setup's), read once: the model stays
        # there, and each read walks its modules (4 reads a step: 2% of a small model's step).
        self.device = s.device
        self.guard = guard = algo.guard(s)
        self.straggler = straggler = runtime.straggler(config, rank, size)
        self.scaler = scaler = precision.LossScaler(config.mixed_precision)  # fp16's; else a no-op
        self.step_times = StepTimes()
        started_from = provenance.starting_weights(  # rank 0 writes config.json and checkpoints
            config.model.init_from, loaded and loaded.header) if rank == 0 else {}
        args = checkpoint.recorded_args(configs.flat(config))
        resumes = checkpoint.resumptions(loaded and loaded.header, args, comm.launch_size())
        shared, per_rank = algo.checkpoint_state()
        self.detector = live.collapse_detector(config, test_set.num_classes, per_epoch, steps)
        self.losses = live.LossSinceEntry()  # TensorBoard's next training entry's
        self.ckpt = checkpoint.Checkpointer(
            comm_, per_epoch, total, shared=shared,
            per_rank={**per_rank, "guard": guard, "straggler": straggler,
                      "collapse": self.detector, "train_losses": self.losses,
                      **({"scaler": scaler} if scaler.on else {})},
            per_rank_snapshots=algo.snapshots == "per_rank", every=config.checkpoint.interval,
            folder=checkpoint.run_folder(config.checkpoint.dir, config.out),
            resume=config.checkpoint.resume,
            header={"algo": config.algo, "ranks": comm.launch_size(), "args": args,
                    **started_from, **({"resumes": resumes} if resumes else {})},
            resize=checkpoint.Resizer(num_samples=train_data.num_samples,
                                      batch_size=o.batch_size, workers=size, steps=steps,
                                      per_epoch=algo.per_epoch, resize_state=algo.resize_state),
            stop_on_signal=True, close_tickets=None if algo.lock_step else algo.close_tickets)
        try:  # the checkpointer holds SIGUSR1 from here: an error below lets go of it
            # claimed() gave the run its folder, which _launched told every rank
            assert config.out is not None
            self.log = RunLog(config.out, rank)
            if rank == 0:
                _write_config(self.log, config, algo, self.device, size, runtime, started_from,
                              resumes)
            self.snapshots = Snapshots()
            self.snapshotting = algo.snapshots != "root" or rank == 0
            self.base_lr = optimizers.base_lr(o, size)
            self._start(loaded, world)
        except BaseException:
            self.let_go()
            raise

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The algorithm's optimizer, which __init__ checked its setup() made."""
        assert self.algo.optimizer is not None
        return self.algo.optimizer

    def _start(self, loaded, world) -> None:
        """Set-up's second half: snapshot 0, the counters a checkpoint restores, the watch,
        the --eval-every marks and the profiler; then the workers' barrier and the clock."""
        config, algo, model, rank, size = self.config, self.algo, self.model, self.rank, self.size
        if self.snapshotting:
            self.snapshots.take(model, t=0.0, epoch=0.0, updates=0, lr=self._lr_before(0))
        done = self.ckpt.restore(self.snapshots, loaded)
        self.at = _resumed_at(done, self.steps)
        position = self.at.position
        algo.start(position)
        if config.compile and rank == 0:
            compiled.announce()
        self.bar = progress_bar(self.total, rank, algo.name, enabled=config.progress,
                                initial=position)
        self.watch = live.Watch(
            config, algo, self.comm_, test_set=self.test_set, per_epoch=self.per_epoch,
            steps=self.steps, samples_per_epoch=self.train_data.samples_per_rank * size,
            bar=self.bar, world=world, loss_scale=self.scaler.get_scale,
            resumed=loaded.header["updates"] if loaded else position,
            elapsed=done.get("elapsed", 0.0), clock=self.ckpt.clock,
            detector=self.detector, losses=self.losses, recorded=self.log.config)
        self.watch.begin(model, self.snapshots)
        every = snapshot_interval(config.eval_every, self.per_epoch)
        if rank == 0 and self.snapshotting:
            if (note := rounding_note(config.eval_every, self.per_epoch)) is not None:
                print(note, file=sys.stderr, flush=True)
            copies = self.runtime.snapshot_copies(size, root_only=algo.snapshots == "root")
            # the first snapshot, one at each mark, the final one
            _say_footprint(model, marks_taken(self.total, every) + 2, copies, size, self.ckpt)
        self.marks = _Marks.of_run(self.total, every, self.snapshots, position, self.per_epoch)
        compiled.apply(config.compile, model)  # lazily: the first step compiles
        self.profiler = profiling.StepProfiler(config.profile, self.device, self.log.dir, rank,
                                               size)
        self.profiler.step(self.at.local_steps)  # --profile from step 0 (or where a resumed run is)
        if self.comm_ is not None:
            watchdog.wait_beating(self.comm_, "waiting for the workers to start", starting=True)
        self.start = self.runtime.now() - done.get("elapsed", 0.0)
        self.loads = [_one_minute_load()]  # the summary's: at the start, then at the end
        self.watch.started()  # TensorBoard's wall times: training's, not the start-up's
        # a replay's lead-in to the first step (steptimes)
        self.step_times.start(self.runtime.now())

    def _lr_before(self, updates: int) -> float:
        """A curve point's ``lr`` at ``updates``: the scheduled rate of the last update
        before it (at update 0, of the first), whichever worker's step made it: one value
        for every point, which an async rank 0's own last rate is not."""
        return optimizers.scheduled_lr(self.config.optim, self.base_lr, self.per_epoch,
                                       max(updates - 1, 0))

    def loop(self) -> None:
        """The steps, as the module docstring lists them: to the budget, a worker that is
        finishing (async), or --stop-on-collapse's stop."""
        at, algo = self.at, self.algo
        local = _epoch_data(self.train_data, at.epoch)
        algo.epoch_started(local)
        while True:
            index = algo.claim(at.position)
            if self.ckpt.due(index):
                if not self._checkpoint():  # another worker is finishing: this one ends too
                    break
                continue  # an async worker's ticket may be past the next mark too
            if index >= self.total:
                break
            if at.i == self.steps:
                at.epoch, at.i = at.epoch + 1, 0
                local = _epoch_data(self.train_data, at.epoch)
                algo.epoch_started(local)
            # At the update this step makes: lock-step, the updates done; async, its ticket (the
            # worker's last push lags the global count by the pushes since, a straggler's most).
            lr = optimizers.scheduled_lr(self.config.optim, self.base_lr, self.per_epoch, index)
            set_lr(self.optimizer, lr)
            x, y = self._batch(local)
            loss = self._backward(x, y)
            # Where the ranks wait for each other: a rank stalled elsewhere speaks first.
            with watchdog.waiting_for_others("the step's update"):
                applied = self._update(loss)
            at.position = algo.progress(at.position, applied)
            at.local_steps, at.samples, at.i = at.local_steps + 1, at.samples + len(y), at.i + 1
            with self.profiler.region("hpctrain.after_update"), \
                    watchdog.waiting_for_others("the round after the update"):
                algo.after_update(final=at.position >= self.total)
            self._report_update(loss, lr)
            self._snapshot_at_mark()
            if self.watch.stop(at.position):
                break

    def _checkpoint(self) -> bool:
        """The checkpoint due at this step (after SIGUSR1's, stop); False, and none, where
        another worker is finishing."""
        at = self.at
        with watchdog.waiting_for_others("the checkpoint's agreement"):
            seen = self.algo.before_checkpoint(at.position)
        if seen is None:
            return False
        at.position = seen
        self.ckpt.save(at.position, {"samples": at.samples, "local_steps": at.local_steps,
                                     "local_epoch": at.epoch, "i": at.i,
                                     "elapsed": self.runtime.now() - self.start}, self.snapshots)
        if self.ckpt.stopping:  # SIGUSR1: a requeued job goes on from this checkpoint
            raise self._ended_early(self.ckpt.stopped(at.position))
        self.algo.after_checkpoint()
        return True

    def _ended_early(self, stopped: Exception) -> Exception:
        """``stopped``, raised on every worker, once what the loop opened is closed."""
        self.profiler.write()
        self.watch.abandon(stopped)
        self.bar.close()
        self.ckpt.close()
        return stopped

    def let_go(self) -> None:
        """The run raised (this rank alone: a bug in the model, Ctrl-C, sgd's too many bad
        steps; or anything in set-up or at the end): what it still holds of this process let
        go, of what set-up got to make, so that a script that goes on trains afresh (SIGUSR1's
        handler, TensorBoard's writer thread, the profiler). No collective: the others may be
        mid-step (under MPI the abort hook ends the job). Raises nothing: the run's error is
        the one to see (a profiler interrupted mid-step may fail to stop)."""
        self.ckpt.release_signal()
        for name in ("profiler", "bar"):
            with contextlib.suppress(Exception):  # AttributeError: set-up did not make it
                getattr(self, name).close()
        if self.rank == 0 and hasattr(self, "watch"):
            self.watch.board.close(raising=False)  # the error the run raises says it

    def _batch(self, local) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``i`` of this worker's epoch (the last may be partial), on the device: with
        --compile a new input size (the batch's, or its micro-batches') compiles, and is
        checked against the plain forward."""
        o, i = self.config.optim, self.at.i
        x = local.images[i * o.batch_size:(i + 1) * o.batch_size].to(self.device)
        y = local.labels[i * o.batch_size:(i + 1) * o.batch_size].to(self.device)
        for size in microbatch.part_sizes(len(y), o.micro_batch_size):  # what the model runs
            if compiled.first_call(self.model, "train", size):  # --compile: it compiles
                watchdog.beat("compiling for a batch of", size, compiling=True)
                if self.config.mixed_precision == "no":  # autocast's rounding: no compiler's
                    compiled.verify(self.model, x[:size], self.rank)
        return x, y

    def _backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | float:
        """The batch's gradient, and its loss: its parts' forward and backward, timed as the
        step's compute, which an injected straggler pads."""
        self.optimizer.zero_grad()
        computing = self.runtime.now()
        self.step_times.begin(computing)
        loss: torch.Tensor | float = 0.0
        micro = self.config.optim.micro_batch_size
        parts = self.algo.losses(x, y, micro)  # one, or each micro-batch's
        for part in precision.each_under(self.config.mixed_precision, self.device, parts):
            part = faults.inject(self.rank, self.at.local_steps, self.model, part)
            self.scaler.scale(part).backward()
            loss += part.detach()
        devices.synchronize(self.device)  # a GPU's backward is done, not only queued
        self.straggler.pad(self.runtime.now() - computing)  # the others wait for it, or run on
        self.step_times.end(self.runtime.now())
        return loss

    def _update(self, loss) -> bool:
        """Whether the step's update was applied: its gradient synchronized and unscaled, and
        applied unless NaN/Inf (the guard; too many bad steps end the run)."""
        guard, scaler, steps = self.guard, self.scaler, self.at.local_steps
        with self.profiler.region("hpctrain.synchronize"):  # --profile's labels for the hooks
            self.algo.synchronize()
        scaler.unscale(self.optimizer)
        try:
            applied = guard.check(steps, amplified=scaler.amplifies, loss=loss)
            if applied:
                with self.profiler.region("hpctrain.apply"):
                    applied = self.algo.apply()
                if not applied:  # Adasum's combined update was not finite
                    guard.reject(steps)
        except Exception as error:  # too many bad steps, on every worker alike or on this one
            if raised_on_every_rank(error):
                self._ended_early(error)
            raise
        scaler.update(not applied, guard.overflowed)  # fp16: an overflow is counted apart
        return applied

    def _report_update(self, loss, lr: float) -> None:
        """An update told to the bar, the watch (TensorBoard, the collapse detector), the
        watchdog and the profiler."""
        at = self.at
        self._bar_to_position()
        self.watch.step(at.position, at.local_steps, loss, lr, self.runtime.now() - self.start)
        watchdog.beat("update", at.local_steps)
        self.profiler.step(at.local_steps)

    def _bar_to_position(self) -> None:
        """The bar at the run's global progress (updates, at most the budget)."""
        self.bar.update(min(self.at.position, self.total) - self.bar.n)

    def _snapshot_at_mark(self) -> None:
        """A snapshot where the updates passed the next --eval-every mark (below the budget,
        and not within half an interval of it: the final one, taken after the loop, stands
        for that mark), scored online by the watch."""
        marks, position = self.marks, self.at.position
        if marks.passed(position, self.total) and self.snapshotting:
            self.snapshots.take(self.model, t=self.runtime.now() - self.start,
                                epoch=position / self.per_epoch, updates=position,
                                lr=self._lr_before(position))
            self.watch.snapshot(self.model, self.snapshots)
            marks.taken_at, marks.taken = position, marks.taken + 1

    def finish(self) -> dict | None:
        """The end: the clocks stopped, the final snapshot, the curve scored (outside
        ``wall_s``), the outputs written; rank 0's summary, None on the others."""
        busy, peak, wall = self._stopped()
        snapshots, final_state = self._final_snapshot(wall)
        scoring = self.runtime.now()
        points = self.watch.curve(self.model, snapshots, self.comm_) or \
            self.algo.evaluate(self.model, snapshots, self.test_set, self.comm_)
        scoring = self.runtime.now() - scoring
        self.watch.after(points)
        self.model.load_state_dict(final_state)
        return self._written(points, snapshots, busy=busy, peak=peak, wall=wall, scoring=scoring)

    def _stopped(self) -> tuple[float, int | None, float]:
        """The loop's tools closed and its clocks read: ``busy_s`` (training's), the peak
        memory (before evaluation) and ``wall_s`` (with the algorithm's finish)."""
        self.profiler.close()
        self.ckpt.close()
        # An async rank 0 whose step spans more updates than a mark's (many workers, or a rank
        # 0 slower than the others) passes several marks within one step: one snapshot for them
        # all, none for the rest (lock-step loops take one at every mark).
        missed = self.marks.missed(self.at.position)
        self.step_times.finish(self.runtime.now())
        busy = self.runtime.now() - self.start
        peak = self.runtime.peak_memory(self.device)  # training's, before evaluation
        self.watch.finish()
        with watchdog.waiting_for_others("the end of training"):  # async: the others' pushes
            self.at.position = self.algo.finish(self.at.position)
        wall = self.runtime.now() - self.start
        self.loads.append(_one_minute_load())
        # An async rank 0's last step saw the count before the others' last pushes, which
        # finish() collected: the bar ends at the run's count, not 937 of 938.
        self._bar_to_position()
        self.bar.close()
        if missed > 0 and self.algo.snapshots == "root" and self.rank == 0:
            print(f"hpctrain: rank 0 took the snapshots between its steps, and {missed} "
                  f"--eval-every marks passed within one of them: up to {self.marks.widest} "
                  f"updates (all workers' pushes) came within one step of rank 0, more than "
                  f"the {self.marks.every} between two marks; the curve has no point there",
                  file=sys.stderr, flush=True)
        return busy, peak, wall

    def _final_snapshot(self, wall: float) -> tuple[Snapshots, dict]:
        """The snapshots to score, the final one taken, as every worker scores them; and the
        final model's state, which ``model.pt`` holds."""
        model, position, comm_ = self.model, self.at.position, self.comm_
        # --stop-on-collapse may end the loop right after a snapshot: that one is the final
        # model already, unless the algorithm's finish changes it (async: the store's model).
        # ma's finish averages a round cut short: the snapshot's point scores that average
        # already (from its members), and model.pt takes it from the model.
        final_taken = self.watch.stopped and self.marks.taken_at == position \
            and self.algo.lock_step
        snapshots = self.snapshots
        if self.snapshotting and not final_taken:
            snapshots.take(model, t=wall, epoch=position / self.per_epoch, updates=position,
                           lr=self._lr_before(position))
            self.watch.snapshot(model, snapshots)
        finished = _state(model) if final_taken else None
        if self.algo.snapshots == "root" and comm_ is not None:
            snapshots = _rank0s(snapshots, comm_)  # spread their scoring over the workers
        elif self.algo.snapshots == "replicated" and comm_ is not None:
            _from_rank0(model, snapshots, comm_)
        return snapshots, snapshots[-1].state if finished is None else finished

    def _written(self, points: list[dict], snapshots: Snapshots, *, busy: float,
                 peak: int | None, wall: float, scoring: float) -> dict | None:
        """The run's files (rank 0 writes them) and summary, from every worker's counts:
        rank 0's summary, None on the others."""
        config, algo, comm_, rank, model = self.config, self.algo, self.comm_, self.rank, self.model
        self.profiler.write()  # every worker's --profile files, outside the clocks
        with watchdog.busy("writing outputs"):  # rank 0 writes, the others wait in collectives
            self.log.write_points(points)
            self.log.save_model(model)
            algo.write_outputs(self.log, snapshots, comm_)
            self.step_times.write(self.log.dir, comm_, rank)
        own = algo.summary(points, comm_)
        mine: _WorkerCounts = {
            "samples": self.at.samples, "busy_s": busy, "slept_s": self.straggler.slept,
            "peak": peak, "scale": self.scaler.get_scale(),
            "overflows": self.scaler.overflow_steps(), "profiled": self.profiler.outcome()}
        every: list[_WorkerCounts] = comm_.gather(mine, root=0) if comm_ is not None \
            else [mine]
        self.profiler.report([w["profiled"] for w in every] if rank == 0 else None)
        guarded = self.guard.summary()
        checkpoints = self.ckpt.summary()
        exchange = self.train_data.stats()
        if rank != 0:
            live.summary_written(comm_)
            return None
        device = self.device
        summary = RunSummary(
            algo=config.algo, algo_label=algo.label(), workers=self.size, model=config.model.name,
            dataset=config.data.dataset, epochs=config.optim.epochs,
            updates=points[-1]["updates"], final_test_acc=points[-1]["test_acc"],
            final_test_loss=points[-1]["test_loss"],
            best_test_acc=max(p["test_acc"] for p in points), wall_s=wall, scoring_s=scoring,
            params=models.num_parameters(model), **_per_worker(every, wall),
            device=device.type,
            gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            machine_cpus=provenance.host()["machine_cpus"],
            slowdown=config.stragglers.slowdown, jitter=config.stragglers.jitter,
            **guarded, **checkpoints, **exchange, out=config.out, algorithm_fields=own,
            **{"load_average_start": self.loads[0], "load_average_end": self.loads[-1],
               **self.watch.fields(), **self.runtime.summary_fields()},  # the runtime's word wins
        ).to_dict()
        self.log.write_summary(summary)
        live.summary_written(comm_)
        return summary
