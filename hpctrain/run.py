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

Snapshots are evaluated after training, so the time axis excludes evaluation, unless
``--eval online`` (:mod:`hpctrain.live`, which also writes TensorBoard and watches for a
collapse).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from hpctrain import (
    checkpoint,
    comm,
    compiled,
    data,
    devices,
    faults,
    launch_env,
    live,
    microbatch,
    models,
    optimizers,
    plugins,
    precision,
    profiling,
    provenance,
    steptimes,
    sync,
    tensorboard,
    userdata,
    watchdog,
    weights,
)
from hpctrain import config as configs
from hpctrain.algorithm import Algorithm, Setup
from hpctrain.config import RunConfig
from hpctrain.errors import UsageError, on_every_rank, raised_on_every_rank
from hpctrain.evaluate import Snapshots
from hpctrain.metrics import RunLog, new_run_folder
from hpctrain.metrics import progress as progress_bar
from hpctrain.runtime import REAL, Runtime
from hpctrain.schedule import set_lr
from hpctrain.steptimes import StepTimes
from hpctrain.stragglers import parse_slowdown
from hpctrain.summary import RunSummary, own_byte_fields
from hpctrain.summary import read as read_summary
from hpctrain.torch_comm import TorchComm


def check_launch(config: RunConfig, ranks: int,
                 given: frozenset[str] | None = None) -> RunConfig:
    """Check ``config`` against the world it starts in (``ranks`` processes, data files,
    checkpoint folders) before MPI starts; return it with every default resolved.

    ``given``: the options the user set (:func:`hpctrain.arguments.build_given`), so that a
    resume refusal calls a value the default only where its option was left out; None (a
    script's RunConfig): any value equal to its default counts as left out."""
    _say_user_data(config)
    config = _as_launched(config)
    algo = config.algorithm_class
    launcher = comm.launcher()
    what = _needs_mpi(config) if launcher == "torchrun" else None
    if what:
        raise UsageError(f"{what} moves data through MPI, and torchrun starts no MPI world: "
                         "launch with mpirun, or srun with PMI/PMIx")
    check_compute(config)
    launch_env.say_threads_beyond_cpus(config.threads)
    sync.check_environment()  # Horovod's variables, read once collectives start
    ranks_all, ranks = ranks, live.check(config, ranks)  # --eval-rank: one rank does not train
    n, sample = check_workers(config, algo.workers(config, ranks))
    if ranks > n:
        raise UsageError(f"{ranks} ranks but only {n} training samples in {config.data.dataset}")
    ck = config.checkpoint
    if not algo.lock_step and ck.interval is not None and not ck.interval.endswith("e"):
        raise UsageError(f"--checkpoint-every {ck.interval}: asynchronous runs checkpoint by "
                         "global progress; give epochs, e.g. 1e")
    algo.check(config, ranks, n)
    for flag, folder in (("--out", config.out), ("--checkpoint-dir", ck.dir)):
        check_folder(flag, folder)
    refuse_finished(config.out, ck.resume)  # before its checkpoints would call it unfinished
    resolved = checkpoint.check(algo=config.algo, ranks=ranks_all, every=ck.every,
                                checkpoint_dir=ck.dir, resume=ck.resume, out=config.out,
                                run_config=configs.flat(config),
                                may_change=checkpoint.MAY_CHANGE, resize=True,
                                defaults={key: value for key, value in
                                          configs.left_out(config).items()
                                          if given is None or key not in given},
                                absent=configs.before_newer_options(config))
    check_resumed_folders(ck.resume, config.out, ck.dir, resolved)
    config = replace(config, out=resolved.out,
                     checkpoint=replace(ck, dir=resolved.checkpoint_dir, resume=resolved.resume,
                                        every=resolved.every))
    refuse_finished(config.out)
    refuse_taken_names(config)
    if config.model.init_from:  # its file fits the model (else no second build here)
        initial_model(config, sample.shape, sample.num_classes)
    return config


def check_workers(config: RunConfig, workers: int,
                  subset: int | None = None) -> tuple[int, data.Dataset]:
    """What ``train`` and ``simulate`` check alike before ``workers`` training workers start
    (one list, so that neither lacks a check the other has): the optimizer the algorithm
    takes, the fault plan, the stragglers, the data set's files and the model on one of its
    samples (and on a lone one, when a batch or micro-batch holds one: every worker gets
    ``n // workers`` samples per epoch, TrainData.samples_per_rank; ``subset``: the
    simulator's ``--train-subset``, the samples it trains on). Returns the number of training
    samples (all of them) and that test sample."""
    optimizers.check(config.algorithm_class, config.optim)
    faults.check(config, workers)  # $HPCTRAIN_INJECT, read at the first step
    parse_slowdown(config.stragglers.slowdown, workers)
    data.check(config.data.dataset, config.data.data_dir)
    sample = data.load(config.data.dataset, "test", config.data.data_dir, 0, 1)
    n = data.size(config.data.dataset, "train", config.data.data_dir)
    o = config.optim
    per_worker = min(subset or n, n) // max(workers, 1)
    _say_what_the_sizes_cut(config, per_worker)
    _say_channels_last(config.data.dataset, sample.shape)
    plugins.check_model(config.model.name, sample.shape, sample.num_classes, config.model.args,
                        one_sample=microbatch.one_sample(per_worker, o.batch_size,
                                                         o.micro_batch_size),
                        no_sparse=optimizers.sparse_refusal(config.algorithm_class, o))
    return n, sample


def _say_channels_last(dataset: str, shape: tuple) -> None:
    """Warn (rank 0 of the launch) of samples that look channels-last: taken as C x H x W,
    they trained as so many channels of thin images without a word (or lenet refused them
    as too small, which hid the cause)."""
    if userdata.channels_last(shape) and comm.env_rank() == 0:
        c, h, w = shape
        print(f"hpctrain: warning: --dataset {dataset}: samples of shape {c} x {h} x {w} look "
              f"channels-last (H x W x C); they are taken as C x H x W ({c} channels of "
              f"{h} x {w}): give them as N x C x H x W (x.transpose(0, 3, 1, 2))",
              file=sys.stderr, flush=True)


def _say_what_the_sizes_cut(config: RunConfig, per_worker: int) -> None:
    """Warn (rank 0 of the launch) of a batch larger than a worker's share of an epoch, and
    of a ``--profile`` window past the run's steps: both ran, and said so only after.
    Nothing when a worker has no samples at all: the caller refuses that run."""
    if per_worker == 0:
        return
    o = config.optim
    notes = []
    if o.batch_size > per_worker:
        notes.append(f"--batch-size {o.batch_size}: each worker has {per_worker} training "
                     f"sample{'s' if per_worker != 1 else ''} an epoch, so its batches hold "
                     "that many")
    why = profiling.beyond(config.profile, o.epochs * math.ceil(per_worker / o.batch_size))
    if why:
        notes.append(f"--profile {config.profile}: {why}")
    for note in notes if comm.env_rank() == 0 else ():
        print(f"hpctrain: warning: {note}", file=sys.stderr, flush=True)


# What a run writes in --out, files all: a folder of one's name is found only when it is
# written, after training (the model then lost).
OUTPUT_FILES = ("config.json", "metrics.jsonl", "model.pt", "summary.json", steptimes.FILE,
                "ensemble.pt")


def refuse_taken_names(config: RunConfig) -> None:
    """``--out``'s files must be free for files, its TensorBoard folder free for a folder."""
    if config.out is None:
        return
    out = Path(config.out)
    for name in OUTPUT_FILES:
        if (out / name).is_dir():
            raise UsageError(f"--out {config.out}: {out / name} is a folder; the run writes "
                             f"its {name} there")
    board = out / tensorboard.SUBDIR
    if config.tensorboard and board.exists() and not board.is_dir():
        raise UsageError(f"--tensorboard: {board} is a file; the run writes its event files "
                         "in a folder of that name")


def refuse_finished(out: str | None, resume: str | None = None,
                    config_file: str | None = None) -> None:
    """A finished run's folder, or a ``bench compare``'s, is not a new run's; nor is a
    finished run resumed. ``resume``: the folder ``--resume`` names (``auto`` returns a
    finished run's summary instead, :func:`_finished`); ``config_file``: the ``--config``
    file whose ``out`` named ``out``, where ``--out`` did not. The line names what the user
    typed: "--out X" sent one who typed none to change it and train the run again."""
    ran = _run_folder_of(resume)
    if ran is not None and (ran / "summary.json").exists() and (
            out is None or Path(out).resolve() == ran.resolve()):  # another --out: a copy
        raise UsageError(f"--resume {resume}: the run has finished ({ran / 'summary.json'}); "
                         f"there is nothing to resume: to train on from its model, start a "
                         f"new run with --init-from {ran} and another --out")
    if not out:
        return
    named = f"--out {out}" if config_file is None else f"--config {config_file}: its out {out}"
    choose = "choose another folder" if config_file is None else \
        "give --out another folder for a new run"
    if (Path(out) / "summary.json").exists():
        raise UsageError(f"{named} already holds a finished run; {choose}")
    if (Path(out) / "compare.json").exists():
        raise UsageError(f"{named} holds a bench compare; {choose}")


def _run_folder_of(resume: str | None) -> Path | None:
    """The outputs' folder of the run ``--resume`` names (as :func:`checkpoint.check` takes
    it), or None: no folder named, ``auto``, or nothing there that says."""
    if resume is None or resume == checkpoint.AUTO or not Path(resume).is_dir():
        return None
    if (Path(resume) / "summary.json").exists():  # the run's folder, checkpoints or none
        return Path(resume)
    out = checkpoint.policy.recorded_out(checkpoint.folder.resolve(resume))
    return None if out is None else Path(out)


def check_folder(flag: str, folder: str | None) -> None:
    """A folder the run will write must be one it can create, or write in: otherwise that is
    found only at the first write, after MPI started (exit 1). Nothing is left behind."""
    if folder is None:
        return
    problem = _unwritable(Path(folder))  # "" is the working folder, as Path("") is
    if problem:
        raise UsageError(f"{flag} {folder}: {problem}")


def check_resumed_folders(resume: str | None, out: str | None, checkpoint_dir: str | None,
                          resolved: checkpoint.Resolved) -> None:
    """:func:`check_folder` for the folders a resume writes in without their flags: the
    resumed run's folder (no ``--out``) and, where it goes on checkpointing, the checkpoint
    folder resumed from (no ``--checkpoint-dir``). A read-only one was found at the first
    write, after MPI started (exit 1, naming a temporary file)."""
    if resolved.resume is None:
        return
    derived = []
    if out is None and resolved.out is not None:
        derived.append(("the run's folder", resolved.out, "--out",
                        "give --out a folder for this attempt's outputs"))
    if checkpoint_dir is None and resolved.every is not None:
        derived.append(("its checkpoint folder", resolved.checkpoint_dir, "--checkpoint-dir",
                        "give --checkpoint-dir a folder for the new checkpoints, or "
                        "--checkpoint-every off"))
    for what, folder, flag, remedy in derived:
        if problem := _unwritable(Path(folder)):
            raise UsageError(f"--resume {resume}: {what} {folder}, written to without "
                             f"{flag}: {problem}; {remedy}")


def _unwritable(folder: Path) -> str | None:
    """Why the run cannot create or write in ``folder``, or None."""
    missing = _missing(folder)
    for path in missing:
        if os.path.islink(path):
            return f"{path} is a link to {os.readlink(path)}, which does not exist"
    path = missing[-1].parent if missing else folder  # the nearest that exists
    if not path.is_dir():
        return f"{path} is a file, not a folder"
    limit = os.pathconf(path, "PC_NAME_MAX")
    if any(len(os.fsencode(p.name)) > limit for p in missing):
        return f"a folder name in it is longer than {limit} bytes"
    try:  # the one test that holds on every file system: create a folder there
        os.rmdir(tempfile.mkdtemp(prefix=".hpctrain-check-", dir=path))
    except OSError as error:
        return f"cannot create a folder in {path} ({error.strerror})"
    return None


def _missing(folder: Path) -> list[Path]:
    """The folders of ``folder``'s path that do not exist, innermost first: what making it
    (with its parents) creates. ``os.path.exists``: False too for a name too long."""
    missing = []
    while not os.path.exists(folder):
        missing.append(folder)
        folder = folder.parent
    return missing


def check_compute(config: RunConfig, in_threads: bool = False) -> None:
    """What this machine must have for ``--device``, ``--mixed-precision`` and ``--compile``
    (UsageError before MPI; the simulator, whose workers are threads, checks the same)."""
    devices.check(config.device)
    device_type = devices.resolve(config.device)
    precision.check(config.mixed_precision, device_type)
    compiled.check(config.compile, device_type, in_threads)


def _say_user_data(config: RunConfig) -> None:
    """A user's data set checked and its sizes said (rank 0) before MPI starts."""
    name = config.data.dataset
    if userdata.is_user(name):
        data.check_data_dir(name, config.data.data_dir)  # before a loader reads for nothing
        # By the name the run uses after launch (userdata spells --data-dir as it does): its
        # loader is called (and cached) once.
        about = userdata.describe(userdata.absolute(name), config.data.data_dir)
        if comm.env_rank() == 0:
            print(f"hpctrain: data {name}: {about['train']} training and {about['test']} test "
                  f"samples of shape {' x '.join(map(str, about['shape']))}, "
                  f"{about['classes']} classes", flush=True)
            if about["untrained"]:
                print(f"hpctrain: warning: --dataset {name}: test class(es) "
                      f"{', '.join(map(str, about['untrained']))} have no training sample; "
                      "their test samples count as errors", file=sys.stderr, flush=True)


def _as_launched(config: RunConfig) -> RunConfig:
    """``config`` as this launch runs it: the algorithm's defaults filled in, file references
    of a user's algorithm, model and data and ``--data-dir`` made absolute, adapted to the
    launcher (ssgd under torchrun: ``--sync-backend torch``)."""
    config = configs.resolve(config)
    init_from, data_dir = config.model.init_from, config.data.data_dir
    config = replace(config, algo=plugins.absolute(config.algo), data=replace(config.data,
                                          dataset=userdata.absolute(config.data.dataset),
                                          data_dir=userdata.absolute_dir(data_dir)),
                     model=replace(config.model, name=plugins.absolute(config.model.name),
                                   init_from=init_from and str(Path(init_from).expanduser()
                                                               .resolve())))
    return config.algorithm_class.for_launch(config, comm.launcher())


def _needs_mpi(config: RunConfig) -> str | None:
    """The option that needs an MPI world (RMA windows, buffer collectives, Split), if any."""
    if config.algorithm_class.needs_mpi(config):
        backend = getattr(config.algorithm, "sync_backend", None)
        return f"--algo {config.algo}" + (f" --sync-backend {backend}" if backend else "")
    if config.eval_rank is not None:
        return "--eval-rank"
    if config.data.data_placement == "sharded":
        return "--data-placement sharded"
    return None


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


def train(config: RunConfig) -> dict:
    """Train as ``config`` says, on every rank of the MPI world; write the run's outputs;
    return its summary (the same on every rank).

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


def checked_first(config: RunConfig, given: frozenset[str] | None = None) -> dict:
    """:func:`train` with its checks before MPI starts: the command line's, a process of its
    own, which one rank's refusal ends (exit status 2) as its launcher ends the others
    (``given``: the options set, as :func:`check_launch` takes them)."""
    return _train_on_world(config, mpi_first=False, given=given)


_script_hook = None  # the script's own excepthook, where a failed run left the abort hook


def _train_on_world(config: RunConfig, mpi_first: bool,
                    given: frozenset[str] | None = None) -> dict:
    """:func:`train`, MPI started first or after the checks."""
    global _script_hook
    # One rank's error ends the job, not leaves the others waiting. Once the run returned
    # (or failed in a process of its own), the script's errors are its own again: the hook
    # ends the process at once, its files unflushed and its atexit functions not run. A
    # run that failed on several ranks leaves it: the next run that returns gives it back.
    hook = _script_hook if _script_hook and comm.aborts_on_error() else comm.hook_state()
    _script_hook = None
    comm.install_abort_on_error()
    try:
        if mpi_first:
            if comm.env_rank() == 0:
                provenance.commit()  # git's fork, which some networks' drivers dislike in MPI
            comm.init(config.algorithm_class.thread_level)
        summary = _checked_run(config, given)
    except BaseException:
        if comm.launch_size() == 1:
            comm.restore_hook(hook)
        else:
            _script_hook = hook
        raise
    comm.restore_hook(hook)
    return summary


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
        if _agreed_finished(done is not None):
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
        done = _finished(config)
        if done is not None:
            return done, config, None
        userdata.forget()  # a script's earlier run read them: they may have changed since
        return None, check_launch(config, comm.launch_size(), given), None
    except UsageError as refused:
        return None, config, refused


def _agreed_finished(finished: bool) -> bool:
    """Whether the run has finished, as every rank sees it where MPI already runs (their
    files may differ: ``--out`` on node-local storage); a UsageError if they disagree."""
    MPI = comm.mpi_running()
    seen = MPI.COMM_WORLD.allgather(finished) if MPI is not None else [finished]
    if len(set(seen)) > 1:
        raise on_every_rank(UsageError(
            f"--resume auto: rank(s) {_ranks(seen, True)} find a finished run and rank(s) "
            f"{_ranks(seen, False)} do not; do the ranks share the run's folder?"))
    return finished


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
        mine["the model"] = plugins.checked_layout(config.model.name, sample.shape,
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


LOCK = ".hpctrain.lock"  # in --out (and a --checkpoint-dir elsewhere): held while a run writes


@contextlib.contextmanager
def claimed(config: RunConfig, stem: str | None = None):
    """Rank 0 holds an exclusive lock on the run's folders (``--out``, and the checkpoint
    folder where it has one, inside ``--out`` or not) while it runs: two jobs started with
    the same ``--out`` at once both passed the checks, then wrote over each other (one's
    config.json beside the other's model.pt; one removed the other's temporary file and
    crashed it). The second is refused in one line, exit 2, before MPI starts. The kernel
    drops the lock when the process ends, killed or not, so a requeued or restarted job
    finds it free. Where the file system has no locks (Lustre mounted without ``flock``),
    runs go on unlocked, as before. Where MPI already runs the job (a script's later run),
    rank 0's refusal is raised on every rank.

    Yields ``config``; on rank 0 given no ``out``, with the new folder it made for the run
    (``runs/<stem>-<time>``, the stem the algorithm's name unless given).
    """
    if comm.env_rank() != 0:
        comm.shared_refusal(None)  # where MPI runs, rank 0's refusal is raised here too
        yield config
        return
    made: list[Path] = []
    try:
        with contextlib.ExitStack() as held:
            refusal = None
            try:
                config = _claim(held, config, stem, made)
            except UsageError as refused:
                refusal = refused
            comm.shared_refusal(refusal)  # raised here, and where MPI runs on every rank
            yield config
    except BaseException:
        for top in made:  # refused, or failed before writing anything: no folder left behind
            if all(name == LOCK for _, _, files in os.walk(top) for name in files):
                shutil.rmtree(top, ignore_errors=True)
        raise


def _claim(held: contextlib.ExitStack, config: RunConfig, stem: str | None,
           made: list[Path]) -> RunConfig:
    """Rank 0's part of :func:`claimed`: make a run folder if none is given, lock the run's
    folders in ``held`` and check them again; the folders it made go into ``made``."""
    if config.out is None:
        made.append(new_run_folder(stem or config.algorithm_class.name))
        config = replace(config, out=str(made[0]))
    folders = [("--out", Path(config.out))]
    ck = config.checkpoint
    if ck.dir is not None or ck.interval is not None or ck.resume is not None:
        # Its own lock, also inside --out: a run resuming another's checkpoints (--resume DIR
        # --out elsewhere, or --checkpoint-dir DIR/checkpoints) locked only its own folders,
        # and the two runs wrote, and rotated away, each other's checkpoints.
        folder = checkpoint.run_folder(ck.dir, config.out)
        if folder.resolve() != Path(config.out).resolve():  # (--checkpoint-dir = --out)
            folders.append(("the checkpoint folder", folder))
    made += [missing[-1] for _, folder in folders if (missing := _missing(folder))]
    for flag, folder in folders:
        lock_folder(held, flag, folder)
    _check_unchanged(config)
    return config


def lock_folder(held: contextlib.ExitStack, flag: str, folder: Path, what: str = "run") -> None:
    """Hold ``folder``'s lock file until ``held`` closes; UsageError if another ``what`` (a
    run, a comparison) holds it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = held.enter_context(open(folder / LOCK, "a"))
    except OSError:
        return  # not writable: the run's writes say so (not "in use by another run")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return  # no locks on this file system: the writes say what is wrong
        raise UsageError(f"{flag} {folder} is in use by another {what} going on now (it holds "
                         f"{folder / LOCK}); wait for it to end or choose another folder") \
            from None


def _check_unchanged(config: RunConfig) -> None:
    """What the launch checks saw may have changed while another run held the folder."""
    if (Path(config.out) / "summary.json").exists():
        raise UsageError(f"--out {config.out} already holds a finished run (it ended while "
                         "this one started); choose another folder")
    if config.checkpoint.resume is None and checkpoint.listing(
            checkpoint.run_folder(config.checkpoint.dir, config.out)):
        raise UsageError(f"--out {config.out} holds the checkpoints of a run that wrote "
                         "them while this one started; choose another folder")


def _finished(config: RunConfig) -> dict | None:
    """With ``--resume auto``, a run whose ``--out`` holds its summary (a job restarted or
    requeued after it finished): that summary, and nothing is trained; a UsageError if the
    options differ from its ``config.json`` where resumption would refuse them. Given no
    ``--out`` but a ``--checkpoint-dir`` that holds checkpoints, the run's outputs are where
    its newest checkpoint says (as ``--resume`` without ``--out`` takes them)."""
    ck = config.checkpoint
    if ck.resume != checkpoint.AUTO:
        return None
    out, where = config.out, f"--out {config.out}"
    if out is None and ck.dir is not None:
        out = checkpoint.policy.recorded_out(ck.dir)
        where = f"{out} (the run of --checkpoint-dir {ck.dir})"
    if out is None or not (Path(out) / "summary.json").exists():
        return None
    recorded = Path(out) / "config.json"
    if recorded.exists():  # its options, as it ran; those that change nothing may differ
        ran = json.loads(recorded.read_text())
        may_change = checkpoint.MAY_CHANGE
        ranks = comm.launch_size() - (config.eval_rank is not None)
        if ran.get("run_info", {}).get("workers") != config.algorithm_class.workers(config,
                                                                                    ranks):
            may_change |= checkpoint.policy.RESIZE_MAY_CHANGE  # as a resized resume takes
        # resolved: a value it has no key for (an option newer than the file) is the one
        # it ran with, as a checkpoint header's (configs.before_newer_options)
        change = checkpoint.changed_option(configs.flat(configs.resolve(configs.from_dict(ran))),
                                           configs.flat(_as_launched(config)), may_change)
        if change:
            flag = "--out" if config.out is not None else "--checkpoint-dir"
            raise UsageError(f"--resume auto: {where} holds a finished run, started {change}; "
                             f"choose another {flag} for a new run")
    done = read_summary(out)
    if comm.env_rank() == 0:
        print(f"hpctrain: {where} holds a finished run; nothing to train (--resume auto)",
              flush=True)
    return done


def initial_model(config: RunConfig, input_shape: tuple, num_classes: int) -> torch.nn.Module:
    """The model a run starts from (the caller seeds torch first): built, and given the
    weights of ``--init-from`` unless the run resumes from its own checkpoint."""
    model = plugins.build_model(config.model.name, input_shape, num_classes, config.model.args)
    if config.model.init_from and config.checkpoint.resume is None:
        weights.load_into(model, config.model.init_from, config.model.name)
    return model


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
        return live.serve(everyone, model, test_set)
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
    except Exception as error:
        if raised_on_every_rank(error):  # a script that catches it may train again
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
    ours = comm_.bcast([({k: s.state[k] for k in names if k in s.state}, s.info)
                        for s in snapshots], root=0)
    for snapshot, (buffers, info) in zip(snapshots, ours, strict=True):
        snapshot.state.update(buffers)
        snapshot.info = info


def _epoch_data(train_data, epoch: int):
    """This worker's samples of ``epoch``, under the watchdog's allowance for work that does
    not beat: sharded placement's exchange moves a shard (minutes for tens of GB), which a
    healthy job's --stall-timeout took for a hang."""
    with watchdog.busy("exchanging the epoch's data", epoch):
        return train_data.epoch(epoch)


def _train(config: RunConfig, algo: Algorithm, comm_, model, test_set, loaded,
           world=None, runtime: Runtime = REAL) -> dict | None:
    """One worker's training, evaluation and (rank 0) outputs; collective over the workers.

    ``runtime``: the clock, stragglers and data (the simulator passes a virtual one)."""
    rank, size = (comm_.Get_rank(), comm_.Get_size()) if comm_ is not None else (0, 1)
    o = config.optim
    train_data = runtime.train_data(config.data.spec(config.seed), comm_)
    steps = math.ceil(train_data.samples_per_rank / o.batch_size)  # one epoch of local data
    per_epoch = algo.per_epoch(steps, size)
    total = o.epochs * per_epoch
    s = Setup(model, train_data, comm_, size, steps)
    model.train()  # a build may hand it out in eval mode (after loading pretrained weights)
    algo.setup(s)
    if not isinstance(algo.optimizer, torch.optim.Optimizer):  # else found at the first step
        raise TypeError(f"{type(algo).__name__}.setup() must set self.optimizer to a torch "
                        f"optimizer, not {type(algo.optimizer).__name__}")
    guard = algo.guard(s)
    straggler = runtime.straggler(config, rank, size)
    scaler = precision.LossScaler(config.mixed_precision)  # fp16's; else a no-op
    step_times = StepTimes()
    started_from = provenance.starting_weights(  # rank 0 writes config.json and checkpoints
        config.model.init_from, loaded and loaded.header) if rank == 0 else {}
    args = checkpoint.recorded_args(configs.flat(config))
    resumes = checkpoint.resumptions(loaded and loaded.header, args, comm.launch_size())
    shared, per_rank = algo.checkpoint_state()
    detector = live.collapse_detector(config, test_set.num_classes, per_epoch, steps)
    ckpt = checkpoint.Checkpointer(
        comm_, per_epoch, total, shared=shared,
        per_rank={**per_rank, "guard": guard, "straggler": straggler, "collapse": detector,
                  **({"scaler": scaler} if scaler.on else {})},
        per_rank_snapshots=algo.snapshots == "per_rank", every=config.checkpoint.interval,
        folder=checkpoint.run_folder(config.checkpoint.dir, config.out),
        resume=config.checkpoint.resume,
        header={"algo": config.algo, "ranks": comm.launch_size(), "args": args,
                **started_from, **({"resumes": resumes} if resumes else {})},
        resize=checkpoint.Resizer(num_samples=train_data.num_samples, batch_size=o.batch_size,
                                  workers=size, steps=steps, per_epoch=algo.per_epoch,
                                  resize_state=algo.resize_state),
        stop_on_signal=True, close_tickets=None if algo.lock_step else algo.close_tickets)
    log = RunLog(config.out, rank)
    if rank == 0:
        info = {"workers": size, "device": str(s.device), **runtime.run_info(),
                **provenance.invocation(),
                **provenance.software(s.device), **provenance.process_group(), **started_from,
                **provenance.code_files(config), **provenance.resolved(config, algo),
                **({"byte_fields": own_byte_fields(type(algo))}
                   if plugins.is_reference(config.algo) else {})}
        log.write_config({**configs.repeatable(config), **runtime.config_tables(), "run_info": {
            **info, **provenance.resumes(resumes, log.dir / "config.json", info)}})
    snapshots = Snapshots()
    snapshotting = algo.snapshots != "root" or rank == 0
    base_lr = optimizers.base_lr(o, size)

    def lr_before(updates: int) -> float:
        """A curve point's ``lr`` at ``updates``: the scheduled rate of the last update
        before it (at update 0, of the first), whichever worker's step made it: one value
        for every point, which an async rank 0's own last rate is not."""
        return optimizers.scheduled_lr(o, base_lr, per_epoch, max(updates - 1, 0))

    if snapshotting:
        snapshots.take(model, t=0.0, epoch=0.0, updates=0, lr=lr_before(0))

    done = ckpt.restore(snapshots, loaded)
    position = done.get("updates", 0)
    samples = done.get("samples", 0)
    # A lock-step checkpoint from before the one loop has no position of its own: derive it.
    local_steps = done.get("local_steps", done.get("pushes", position))
    epoch, i = done.get("local_epoch", position // steps), done.get("i", position % steps)
    if i == steps:  # saved at the end of an epoch
        epoch, i = epoch + 1, 0
    algo.start(position)
    if config.compile and rank == 0:
        compiled.announce()
    bar = progress_bar(total, rank, algo.name, enabled=config.progress, initial=position)
    watch = live.Watch(config, algo, comm_, test_set=test_set, per_epoch=per_epoch, steps=steps,
                       samples_per_epoch=train_data.samples_per_rank * size, bar=bar,
                       world=world, loss_scale=scaler.get_scale,
                       resumed=loaded.header["updates"] if loaded else position,
                       elapsed=done.get("elapsed", 0.0), clock=ckpt.clock,
                       detector=detector, recorded=log.config)
    watch.begin(model, snapshots)
    snapshot_every = max(1, round(config.eval_every * per_epoch))
    # Marks a resumed run's snapshots cover: to its last one. Lock-step loops take a mark's
    # before the checkpoint there; an async rank 0 may not have reached it (the others'
    # pushes did), and the point was lost when the count at the checkpoint said it passed.
    # By its epoch: a run resumed on other workers counts other updates (resize.py).
    last = snapshots[-1].info.get("epoch") if snapshots else None
    covered = position if last is None else min(position, round(last * per_epoch))
    next_snapshot = (covered // snapshot_every + 1) * snapshot_every
    taken_at = None  # the update of the last snapshot the loop took
    first_mark, taken = covered // snapshot_every, 0  # marks passed, snapshots taken
    checked_at, widest = position, 0  # the most updates between two of this rank's checks
    compiled.apply(config.compile, model)  # lazily: the first step compiles
    profiler = profiling.StepProfiler(config.profile, s.device, log.dir, rank, size)
    profiler.step(local_steps)  # --profile from step 0 (or where a resumed run is)
    if comm_ is not None:
        watchdog.wait_beating(comm_, "waiting for the workers to start", starting=True)
    start = runtime.now() - done.get("elapsed", 0.0)
    watch.started()  # TensorBoard's wall times: training's, not the start-up's
    step_times.start(runtime.now())  # a replay's lead-in to the first step (steptimes)

    def ended_early(stopped: Exception) -> Exception:
        """``stopped``, raised on every worker, once what the loop opened is closed."""
        profiler.write()
        watch.abandon(stopped)
        bar.close()
        ckpt.close()
        return stopped

    local = _epoch_data(train_data, epoch)
    algo.epoch_started(local)
    while True:
        index = algo.claim(position)
        if ckpt.due(index):
            seen = algo.before_checkpoint(position)
            if seen is None:  # another worker is finishing: this one ends too
                break
            position = seen
            ckpt.save(position, {"samples": samples, "local_steps": local_steps,
                                 "local_epoch": epoch, "i": i,
                                 "elapsed": runtime.now() - start}, snapshots)
            if ckpt.stopping:  # SIGUSR1: a requeued job goes on from this checkpoint
                raise ended_early(ckpt.stopped(position))
            algo.after_checkpoint()
            continue  # an async worker's ticket may be past the next mark too
        if index >= total:
            break
        if i == steps:
            epoch, i = epoch + 1, 0
            local = _epoch_data(train_data, epoch)
            algo.epoch_started(local)
        # At the update this step makes: lock-step, the updates done; async, its ticket (the
        # worker's last push lags the global count by the pushes since, a straggler's most).
        lr = optimizers.scheduled_lr(o, base_lr, per_epoch, index)
        set_lr(algo.optimizer, lr)
        x = local.images[i * o.batch_size:(i + 1) * o.batch_size].to(s.device)
        y = local.labels[i * o.batch_size:(i + 1) * o.batch_size].to(s.device)
        if compiled.first_call(model, "train", len(y)):  # --compile: a new size compiles
            watchdog.beat("compiling for a batch of", len(y), compiling=True)
            if config.mixed_precision == "no":  # autocast's rounding is no compiler's error
                compiled.verify(model, x[:o.micro_batch_size or len(x)], rank)
        algo.optimizer.zero_grad()
        computing = runtime.now()
        step_times.begin(computing)
        loss = 0.0
        parts = algo.losses(x, y, o.micro_batch_size)  # one, or each micro-batch's
        for part in precision.each_under(config.mixed_precision, s.device, parts):
            part = faults.inject(rank, local_steps, model, part)
            scaler.scale(part).backward()
            loss += part.detach()
        devices.synchronize(s.device)  # a GPU's backward is done, not only queued
        straggler.pad(runtime.now() - computing)  # the others wait for it, or run on
        step_times.end(runtime.now())
        with profiler.region("hpctrain.synchronize"):  # --profile's labels for the hooks
            algo.synchronize()
        scaler.unscale(algo.optimizer)
        try:
            applied = guard.check(local_steps, amplified=scaler.amplifies, loss=loss)
            if applied:
                with profiler.region("hpctrain.apply"):
                    applied = algo.apply()
                if not applied:  # Adasum's combined update was not finite
                    guard.reject(local_steps)
        except Exception as error:  # too many bad steps, on every worker alike or on this one
            if raised_on_every_rank(error):
                ended_early(error)
            raise
        scaler.update(not applied, guard.overflowed)  # fp16: an overflow is counted apart
        position = algo.progress(position, applied)
        local_steps, samples, i = local_steps + 1, samples + len(y), i + 1
        with profiler.region("hpctrain.after_update"):
            algo.after_update(final=position >= total)
        bar.update(min(position, total) - bar.n)
        watch.step(position, local_steps, loss, lr, runtime.now() - start)
        watchdog.beat("update", local_steps)
        profiler.step(local_steps)
        widest, checked_at = max(widest, position - checked_at), position
        if position >= next_snapshot:
            if snapshotting and position < total:
                snapshots.take(model, t=runtime.now() - start, epoch=position / per_epoch,
                               updates=position, lr=lr_before(position))
                watch.snapshot(model, snapshots)
                taken_at, taken = position, taken + 1
            next_snapshot = (position // snapshot_every + 1) * snapshot_every
        if watch.stop(position):
            break
    profiler.close()
    ckpt.close()
    # An async rank 0 whose step spans more updates than a mark's (many workers, or a rank
    # 0 slower than the others) passes several marks within one step: one snapshot for them
    # all, none for the rest (lock-step loops take one at every mark).
    missed = min(position, total - 1) // snapshot_every - first_mark - taken
    step_times.finish(runtime.now())
    busy = runtime.now() - start
    peak = runtime.peak_memory(s.device)  # training's, before evaluation
    watch.finish()
    position = algo.finish(position)
    wall = runtime.now() - start
    bar.close()
    if missed > 0 and algo.snapshots == "root" and rank == 0:
        print(f"hpctrain: rank 0 took the snapshots between its steps, and {missed} "
              f"--eval-every marks passed within one of them: up to {widest} updates (all "
              f"workers' pushes) came within one step of rank 0, more than the "
              f"{snapshot_every} between two marks; the curve has no point there",
              file=sys.stderr, flush=True)
    # --stop-on-collapse may end the loop right after a snapshot: that one is the final
    # model already, unless the algorithm's finish changes it (async: the store's model).
    # ma's finish averages a round cut short: the snapshot's point scores that average
    # already (from its members), and model.pt takes it from the model.
    final_taken = watch.stopped and taken_at == position and algo.lock_step
    if snapshotting and not final_taken:
        snapshots.take(model, t=wall, epoch=position / per_epoch, updates=position,
                       lr=lr_before(position))
        watch.snapshot(model, snapshots)
    finished = _state(model) if final_taken else None
    if algo.snapshots == "root" and comm_ is not None:
        snapshots = comm_.bcast(snapshots, root=0)
    elif algo.snapshots == "replicated" and comm_ is not None:
        _from_rank0(model, snapshots, comm_)
    final_state = snapshots[-1].state if finished is None else finished

    scoring = runtime.now()
    points = watch.curve(model, snapshots, comm_) or \
        algo.evaluate(model, snapshots, test_set, comm_)
    scoring = runtime.now() - scoring
    watch.after(points)
    model.load_state_dict(final_state)
    profiler.write()  # every worker's --profile files, outside the clocks
    with watchdog.busy("writing outputs"):  # rank 0 writes, the others wait in collectives
        log.write_points(points)
        log.save_model(model)
        algo.write_outputs(log, snapshots, comm_)
        step_times.write(log.dir, comm_, rank)
    own = algo.summary(points, comm_)
    mine = {"samples": samples, "busy_s": busy, "slept_s": straggler.slept, "peak": peak,
            "scale": scaler.get_scale(), "overflows": scaler.overflow_steps(),
            "profiled": profiler.outcome()}
    every = comm_.gather(mine, root=0) if comm_ is not None else [mine]
    profiler.report([w["profiled"] for w in every] if rank == 0 else None)
    guarded = guard.summary()
    checkpoints = ckpt.summary()
    exchange = train_data.stats()
    if rank != 0:
        live.summary_written(comm_)
        return None
    summary = RunSummary(
        algo=config.algo, algo_label=algo.label(), workers=size, model=config.model.name,
        dataset=config.data.dataset, epochs=o.epochs, updates=points[-1]["updates"],
        final_test_acc=points[-1]["test_acc"], final_test_loss=points[-1]["test_loss"],
        best_test_acc=max(p["test_acc"] for p in points), wall_s=wall, scoring_s=scoring,
        samples_per_s=sum(w["samples"] for w in every) / wall,
        params=models.num_parameters(model),
        samples_per_worker=[w["samples"] for w in every],
        busy_s_per_worker=[w["busy_s"] for w in every],
        straggler_sleep_s_per_worker=[w["slept_s"] for w in every],
        peak_memory_per_worker=[w["peak"] for w in every],
        loss_scale_per_worker=[w["scale"] for w in every], device=s.device.type,
        overflow_steps_per_worker=[w["overflows"] for w in every],
        gpu=torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else None,
        slowdown=config.stragglers.slowdown, jitter=config.stragglers.jitter,
        **guarded, **checkpoints, **exchange, out=config.out, algorithm_fields=own,
        **{**watch.fields(), **runtime.summary_fields()},  # the runtime's word wins
    ).to_dict()
    log.write_summary(summary)
    live.summary_written(comm_)
    return summary
