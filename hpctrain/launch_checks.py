"""What a run checks before MPI starts, so that a refusal is one line and exit status 2.

:func:`check_launch` checks a configuration against the world it starts in (ranks, data
files, the machine's devices, checkpoint and output folders) and returns it as this launch
runs it (:func:`_as_launched`); ``simulate`` and ``bench`` run its parts that apply to them
(:func:`check_workers`, :func:`check_compute`). Also here: :func:`finished_run` (``--resume
auto`` finding the run finished: its summary, nothing trained) and :func:`initial_model`,
the model a run starts from, which the checks build once to see that ``--init-from`` fits
and the loop and the simulator build again. The folders' own checks and locks are
:mod:`hpctrain.run_folders`'.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import TypeGuard

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
    model_checks,
    optimizers,
    option_names,
    options,
    paths,
    plugins,
    precision,
    profiling,
    sync,
    userdata,
    weights,
)
from hpctrain import config as configs
from hpctrain.config import CheckpointConfig, DataConfig, OptimConfig, RunConfig
from hpctrain.errors import UsageError
from hpctrain.metrics import read_json
from hpctrain.run_folders import (
    check_folder,
    check_length,
    check_resumed_folders,
    refuse_finished,
    refuse_in_use,
    refuse_taken_names,
)
from hpctrain.summary import read as read_summary


def check_launch(config: RunConfig, ranks: int,
                 given: frozenset[str] | None = None) -> RunConfig:
    """Check ``config`` against the world it starts in (``ranks`` processes, data files,
    checkpoint folders) before MPI starts; return it with every default resolved.

    ``given``: the options the user set (:func:`hpctrain.arguments.build_given`), so that a
    resume refusal calls a value the default only where its option was left out; None (a
    script's RunConfig): any value equal to its default counts as left out."""
    launched = _as_launched(config)
    algo = launched.algorithm_class
    launcher = comm.launcher()
    launch_env.refuse_mpirun_around_torchrun()  # before its MPI_Init dies naming nothing
    what = _needs_mpi(launched) if launcher == "torchrun" else None
    if what:  # before a user's data set is read (its loader may take minutes)
        raise UsageError(f"{what} moves data through MPI, and torchrun starts no MPI world: "
                         "launch with mpirun, or srun with PMI/PMIx")
    _say_user_data(config)
    config = launched
    check_compute(config)
    launch_env.say_threads_beyond_cpus(config.threads)
    sync.check_environment()  # Horovod's variables, read once collectives start
    ranks_all, ranks = ranks, live.check(config, ranks)  # --eval-rank: one rank does not train
    n, sample = check_workers(config, algo.workers(config, ranks))
    if ranks > n:
        raise UsageError(f"{ranks} ranks but only {n} training samples in {config.data.dataset}")
    ck = config.checkpoint
    if not algo.lock_step and ck.interval is not None and not ck.interval.endswith("e"):
        every = functools.partial(options.setting, CheckpointConfig, "every")
        example = "1e" if options.on_command_line() else every("1e")
        raise UsageError(f"{every(ck.interval)}: asynchronous runs checkpoint by global "
                         f"progress; give epochs, e.g. {example}")
    algo.check(config, ranks, n)
    out, ck_dir, resume = (options.text_or_none(v) for v in (config.out, ck.dir, ck.resume))
    for flag, folder in (("--out", out), ("--checkpoint-dir", ck_dir)):
        check_folder(flag, folder, run_option=True)  # named as its field from Python
    if comm.env_rank() == 0:  # the rank that claims them: another may find its rank 0's lock
        refuse_in_use(out, ck_dir, resume)  # a live run's, before what it holds
    refuse_finished(out, resume)  # before its checkpoints would call it unfinished
    resolved = checkpoint.check(algo=config.algo, ranks=ranks_all, every=ck.every,
                                checkpoint_dir=ck.dir, resume=ck.resume, out=config.out,
                                run_config=configs.flat(config),
                                may_change=checkpoint.MAY_CHANGE, resize=True,
                                defaults={key: value for key, value in
                                          configs.left_out(config).items()
                                          if given is None or key not in given},
                                absent=configs.before_newer_options(config),
                                names=configs.flat_fields(config))
    check_resumed_folders(resume, out, ck_dir, resolved)
    config = replace(config, out=resolved.out,
                     checkpoint=replace(ck, dir=resolved.checkpoint_dir, resume=resolved.resume,
                                        every=resolved.every))
    refuse_finished(options.text_or_none(config.out))
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
    config.stragglers.slowdowns(workers)  # its ranks, named as typed or as the field
    dataset = options.text(config.data.dataset)
    data_dir = options.text_or_none(config.data.data_dir)
    data.check(dataset, data_dir)
    sample = data.load(dataset, "test", data_dir, 0, 1)
    n = data.size(dataset, "train", data_dir)
    o = config.optim
    per_worker = min(subset or n, n) // max(workers, 1)
    _say_what_the_sizes_cut(config, per_worker)
    _say_channels_last(dataset, sample.shape)
    model_checks.check_model(options.text(config.model.name), sample.shape, sample.num_classes,
                        config.model.args,
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
        given = option_names.said("--dataset", dataset, typed=f"--dataset {dataset}")
        print(f"hpctrain: warning: {given}: samples of shape {c} x {h} x {w} look "
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
        batch = options.setting(OptimConfig, "batch_size", o.batch_size)
        notes.append(f"{batch}: each worker has {per_worker} training "
                     f"sample{'s' if per_worker != 1 else ''} an epoch, so its batches hold "
                     "that many")
    why = profiling.beyond(config.profile, o.epochs * math.ceil(per_worker / o.batch_size))
    if why:
        notes.append(f"{options.setting(RunConfig, 'profile', config.profile)}: {why}")
    for note in notes if comm.env_rank() == 0 else ():
        print(f"hpctrain: warning: {note}", file=sys.stderr, flush=True)


def check_compute(config: RunConfig, in_threads: bool = False) -> None:
    """What this machine must have for ``--device``, ``--mixed-precision`` and ``--compile``
    (UsageError before MPI; the simulator, whose workers are threads, checks the same)."""
    devices.check(config.device)
    device_type = devices.resolve(config.device)
    precision.check(config.mixed_precision, device_type)
    compiled.check(config.compile, device_type, in_threads)


def _say_user_data(config: RunConfig) -> None:
    """A user's data set checked and its sizes said (rank 0) before MPI starts."""
    name = options.text(config.data.dataset)
    data_dir = options.text_or_none(config.data.data_dir)
    if userdata.is_user(name):
        data.check_data_dir(name, data_dir)  # before a loader reads for nothing
        # By the name the run uses after launch (userdata spells --data-dir as it does): its
        # loader is called (and cached) once.
        about = userdata.describe(userdata.absolute(name), data_dir)
        if comm.env_rank() == 0:
            print(f"hpctrain: data {name}: {about['train']} training and {about['test']} test "
                  f"samples of shape {' x '.join(map(str, about['shape']))}, "
                  f"{about['classes']} classes", flush=True)
            if about["untrained"]:
                given = option_names.said("--dataset", name, typed=f"--dataset {name}")
                print(f"hpctrain: warning: {given}: test class(es) "
                      f"{', '.join(map(str, about['untrained']))} have no training sample; "
                      "their test samples count as errors", file=sys.stderr, flush=True)


def _as_launched(config: RunConfig) -> RunConfig:
    """``config`` as this launch runs it: the algorithm's defaults filled in, file references
    of a user's algorithm, model and data and ``--data-dir`` made absolute, adapted to the
    launcher (ssgd under torchrun: ``--sync-backend torch``)."""
    config = configs.resolve(config)
    init_from = config.model.init_from
    dataset, data_dir = options.text(config.data.dataset), options.text_or_none(
        config.data.data_dir)
    data_config = replace(config.data, dataset=userdata.absolute(dataset),
                          data_dir=userdata.absolute_dir(data_dir))
    model_config = replace(config.model, name=plugins.absolute(options.text(config.model.name),
                                                               "--model"),
                           init_from=init_from and str(Path(paths.home_expanded(
                               init_from, "--init-from")).resolve()))
    config = replace(config, algo=plugins.absolute(options.text(config.algo), "--algo"),
                     data=data_config,
                     model=model_config)
    return config.algorithm_class.for_launch(config, comm.launcher())


def _needs_mpi(config: RunConfig) -> str | None:
    """The option that needs an MPI world (RMA windows, buffer collectives, Split), if any:
    as typed on the command line (``--algo ma``), from Python the field (``RunConfig.algo``)."""
    if config.algorithm_class.needs_mpi(config):
        backend = getattr(config.algorithm, "sync_backend", None)
        algo = options.setting(RunConfig, "algo", config.algo)
        return algo + (f" {options.setting(type(config.algorithm), 'sync_backend', backend)}"
                       if backend else "")
    if config.eval_rank is not None:
        return options.setting(RunConfig, "eval_rank")
    if config.data.data_placement == "sharded":
        return options.setting(DataConfig, "data_placement", "sharded")
    return None


def finished_run(config: RunConfig) -> dict | None:
    """With ``--resume auto``, a run whose ``--out`` holds its summary (a job restarted or
    requeued after it finished): that summary, and nothing is trained; a UsageError if the
    options differ from its ``config.json`` where resumption would refuse them. Given no
    ``--out`` but a ``--checkpoint-dir`` that holds checkpoints, the run's outputs are where
    its newest checkpoint says (as ``--resume`` without ``--out`` takes them)."""
    ck = config.checkpoint
    if ck.resume != checkpoint.AUTO:
        return None
    out, ck_dir = options.text_or_none(config.out), options.text_or_none(ck.dir)
    for flag, folder in (("--out", out), ("--checkpoint-dir", ck_dir)):
        check_length(flag, folder)  # before looking in them
    auto = options.setting(CheckpointConfig, "resume", checkpoint.AUTO)
    where = options.setting(RunConfig, "out", out)
    if out is None and ck_dir is not None:
        out = checkpoint.policy.recorded_out(ck_dir)
        where = f"{out} (the run of {options.setting(CheckpointConfig, 'dir', ck_dir)})"
    if out is None or not (Path(out) / "summary.json").exists():
        return None
    recorded = Path(out) / "config.json"
    if recorded.exists():  # its options, as it ran; those that change nothing may differ
        ran = read_json(recorded, "a run's config.json", ("algo",))
        may_change = checkpoint.MAY_CHANGE
        ranks = comm.launch_size() - (config.eval_rank is not None)
        info = ran.get("run_info")
        if (info if isinstance(info, dict) else {}).get("workers") != \
                config.algorithm_class.workers(config, ranks):
            may_change |= checkpoint.policy.RESIZE_MAY_CHANGE  # as a resized resume takes
        launched = _as_launched(config)
        change, ran = _other_code(ran, launched, may_change)  # before building it imports
        # resolved: a value it has no key for (an option newer than the file) is the one
        # it ran with, as a checkpoint header's (configs.before_newer_options)
        change = change or checkpoint.changed_option(
            configs.flat(configs.resolve(configs.from_dict(ran))), configs.flat(launched),
            may_change, names=configs.flat_fields(launched))
        if change:
            flag = options.setting(RunConfig, "out") if config.out is not None else \
                options.setting(CheckpointConfig, "dir")
            raise UsageError(f"{auto}: {where} holds a finished run, started {change}; "
                             f"choose another {flag} for a new run")
    done = read_summary(out)
    if comm.env_rank() == 0:
        print(f"hpctrain: {where} holds a finished run; nothing to train ({auto})",
              flush=True)
    return done


def _other_code(ran: dict, launched: RunConfig,
                may_change: frozenset[str]) -> tuple[str | None, dict]:
    """Where config.json ``ran`` names other code than ``launched`` does (an algorithm, model
    or data loader: ``FILE.py:NAME``, ``MODULE:NAME``), that change, said as
    :func:`checkpoint.changed_option` says one; and ``ran`` with the launched code named
    where an option naming it may change. Found by comparing the names: building ``ran``
    would import what it names, and a run's folder is data, which anyone who can write it
    (a group-writable project folder) may have edited: only code the command names runs."""
    new = configs.flat(launched)
    other, kept = {}, json.loads(json.dumps(ran))  # a copy, its tables too
    for key, path, value in _code_names(ran, launched):
        if value == new.get(key):
            continue
        if key not in may_change:
            other[key] = value
        else:  # may differ (none that names code does today): built as launched
            (kept if len(path) == 1 else kept[path[0]])[path[-1]] = new.get(key)
    return checkpoint.changed_option(other, new, may_change,
                                     names=configs.flat_fields(launched)), kept


def _code_names(ran: dict, launched: RunConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """The values of config.json ``ran`` that name code (:func:`plugins.check_form`'s
    form), each with its :func:`configs.flat` key and its place in ``ran``; an algorithm's
    own options read as ``launched``'s algorithm declares them."""
    tables = {**configs.SECTIONS, "algorithm": type(launched.algorithm)}
    found: list[tuple[str, tuple[str, ...], str]] = []
    for f in fields(RunConfig):
        table, value = tables.get(f.name), ran.get(f.name)
        places = [(g, (f.name, g.name), value.get(g.name)) for g in fields(table)] \
            if table is not None and isinstance(value, dict) else [(f, (f.name,), value)]
        found += [(options.flat_key(options.flag_of(g)), path, v) for g, path, v in places
                  if _names_code(v)]
    return found


def _names_code(value: object) -> TypeGuard[str]:
    """Whether ``value`` reads as a reference to code, which building a configuration of it
    may import (``npz:FILE``, ``partial:0.5`` do not)."""
    if not isinstance(value, str) or not plugins.is_reference(value):
        return False
    try:
        plugins.check_form("--algo", value)
    except UsageError:
        return False
    return True


def initial_model(config: RunConfig, input_shape: tuple, num_classes: int) -> torch.nn.Module:
    """The model a run starts from (the caller seeds torch first): built, and given the
    weights of ``--init-from`` unless the run resumes from its own checkpoint."""
    name = options.text(config.model.name)
    model = model_checks.build_model(name, input_shape, num_classes, config.model.args)
    if config.model.init_from and config.checkpoint.resume is None:
        weights.load_into(model, options.text(config.model.init_from), name)
    return model

