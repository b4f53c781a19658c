"""``hpctrain simulate``: K virtual workers in one process, with the real training loop.

:func:`simulate` checks the configuration (before anything runs), builds one initial model,
then runs :func:`hpctrain.run._train` -- the loop every real run uses -- once per virtual
worker, each in a thread of its own under the :class:`~hpctrain.sim.scheduler.Scheduler`,
with the algorithm connected to in-process stand-ins (:mod:`hpctrain.sim.algorithms`) and a
virtual runtime (:mod:`hpctrain.sim.runtime`). Outputs are a real run's: ``config.json``,
``metrics.jsonl``, ``model.pt``, ``step_times.json`` and ``summary.json`` (``simulated:
true``; every time in it is virtual). The same configuration and seed give the same summary,
bit for bit: the workers run one at a time in virtual-time order, and nothing measured in
real time enters the outputs.
"""

from __future__ import annotations

import copy
import functools
import sys
from dataclasses import replace
from typing import cast

import torch

from hpctrain import (
    checkpoint,
    data,
    devices,
    faults,
    launch_checks,
    launch_env,
    live,
    options,
    plugins,
    registry,
    run,
    run_folders,
    steptimes,
    userdata,
)
from hpctrain import config as configs
from hpctrain.async_.algorithm import ASGD, SSP, StoreOptions
from hpctrain.config import CheckpointConfig, DataConfig, RunConfig, StragglerConfig
from hpctrain.errors import UsageError
from hpctrain.sim.algorithms import simulated
from hpctrain.sim.comm import LocalGroup
from hpctrain.sim.config import REAL_RUN_ONLY, SimConfig, real_run_only
from hpctrain.sim.runtime import VirtualRuntime, load_train_set
from hpctrain.sim.scheduler import Scheduler, WorkerStreams
from hpctrain.sim.steptime import StepTimeModel
from hpctrain.sim.store import SharedStore
from hpctrain.sync.algorithm import Sequential, Synchronous, SynchronousOptions

DEFAULT_WORKERS = SimConfig.__dataclass_fields__["workers"].default
INFERENCE_SHARE = 1 / 3  # a forward pass is about a third of forward plus backward


def check(config: RunConfig, sim: SimConfig) -> RunConfig:
    """Refuse what the simulator cannot run (UsageError, one line); return ``config`` with
    every default resolved."""
    check_one_process()
    config = check_options(config, sim)
    run_folders.check_folder("--out", config.out, run_option=True)  # RunConfig.out, from Python
    run_folders.refuse_finished(config.out)  # a finished run's, or a bench compare's
    checkpoint.check(algo=config.algo, ranks=sim.workers, every=None, checkpoint_dir=None,
                     resume=None, out=config.out, run_config=configs.flat(config),
                     may_change=checkpoint.MAY_CHANGE,  # nor an unfinished run's
                     names=configs.flat_fields(config))  # its fields, from Python
    return config


def check_one_process() -> None:
    """A simulation is one process: launched as several, each would simulate the whole run
    into the same ``--out`` (rank 0 alone holding its lock)."""
    seat = launch_env.from_launcher()
    if seat is not None and seat.size > 1:
        raise UsageError(f"hpctrain simulate runs in one process, not {seat.size} "
                         f"({seat.source}): run it without mpirun, srun or torchrun "
                         "(--workers K gives it K virtual workers)")


def check_options(config: RunConfig, sim: SimConfig) -> RunConfig:
    """:func:`check` but the output folder (``bench compare --simulate`` checks every run
    with it up front); return ``config`` with every default resolved (and without the
    straggler options a replay leaves out)."""
    config = configs.resolve(without_replayed_stragglers(config, sim))
    # References recorded absolute, as a real run's (launch_checks._as_launched): config.json
    # repeats the simulation from any folder.
    config = replace(config, algo=plugins.absolute(config.algo),
                     model=replace(config.model, name=plugins.absolute(config.model.name)),
                     data=replace(config.data, dataset=userdata.absolute(config.data.dataset)))
    algo = config.algorithm_class
    k = sim.workers
    ck = config.checkpoint
    if ck.interval is not None or ck.resume is not None or ck.dir is not None:
        given = "--checkpoint-every, --checkpoint-dir, --resume" if options.on_command_line() \
            else ", ".join(options.setting(CheckpointConfig, name, value) for name, value in
                           (("every", ck.interval), ("dir", ck.dir), ("resume", ck.resume))
                           if value is not None)  # from Python: the fields given
        raise UsageError(f"hpctrain simulate takes no checkpoints ({given}): a simulation is "
                         "rerun, not resumed")
    for name in REAL_RUN_ONLY:  # the extra rank; one profiler a process
        if (value := getattr(config, name)) is not None:
            raise UsageError(real_run_only(name, value))
    d = functools.partial(options.setting, DataConfig)  # flags typed, fields from Python
    if config.data.data_placement != "replicated":
        raise UsageError("hpctrain simulate holds one copy of the data for all virtual "
                         f"workers: use {d('data_placement', 'replicated')} (the samples each "
                         f"worker sees are those of the same {d('shuffle')} and "
                         f"{d('partition')})")
    if issubclass(algo, Synchronous) and cast(SynchronousOptions,
                                              config.algorithm).fp16_allreduce:
        drop = "--fp16-allreduce (--no-fp16-allreduce undoes a --config file's)" \
            if options.on_command_line() else \
            f"{type(config.algorithm).__name__}.fp16_allreduce=True"
        raise UsageError(f"hpctrain simulate averages ssgd's gradients in float32: drop {drop}")
    launch_checks.check_compute(config, in_threads=True)
    faults.check_in_threads()
    live.check(config, k)
    servers = cast(StoreOptions, config.algorithm).servers if issubclass(algo, ASGD) else 0
    ranks = k + servers
    n, sample = launch_checks.check_workers(config, k, sim.train_subset)
    s = functools.partial(options.setting, SimConfig)  # flags typed, fields from Python
    r = functools.partial(options.setting, RunConfig)
    if sim.train_subset is not None and sim.train_subset > n:  # else recorded, not trained
        raise UsageError(f"{s('train_subset', sim.train_subset)} is more than the "
                         f"{n} training samples in {config.data.dataset}")
    n = sim.train_subset or n
    if k > n:  # a subset's size named as such: the data set itself may have enough
        held = (f"({s('train_subset', n)})" if sim.train_subset is not None
                else f"in {config.data.dataset}")
        raise UsageError(f"{s('workers', k)} but only {n} training samples {held}")
    if sim.comm_time == "replay" and not _pushes(algo) and not issubclass(algo, Sequential):
        raise UsageError(f"{s('comm_time', 'replay')} replays the pushes of asgd, dcasgd-c and "
                         f"dcasgd-a, not {r('algo', config.algo)}: use "
                         f"{s('comm_time', 'model')}")
    if sim.comm_time == "replay" and _pushes(algo):
        run_dir = sim.step_time.partition(":")[2]
        source = steptimes.recorded_algo(run_dir)
        if source in registry.names() and not _pushes(registry.get(source)):
            raise UsageError(f"{s('comm_time', 'replay')}: {run_dir} is an --algo {source} "
                             f"run, whose rests are not pushes; replay an asgd, dcasgd-c or "
                             f"dcasgd-a run's, or use {s('comm_time', 'model')}")
    if issubclass(algo, Sequential) and k > 1:  # its own check names no --workers
        default = " (the default)" if k == DEFAULT_WORKERS else ""  # maybe not typed
        raise UsageError(f"{r('algo', 'sgd')} runs on one process, not {s('workers', k)}"
                         f"{default}: give {s('workers', 1)} (or {r('algo', 'ssgd')} for {k} "
                         "workers)")
    algo.check(config, ranks, n)
    if config.model.init_from:  # its file fits the model (compare --simulate: every run)
        launch_checks.initial_model(config, sample.shape, sample.num_classes)
    return config  # SimConfig checked --step-time (and read a replay's file)


def without_replayed_stragglers(config: RunConfig, sim: SimConfig) -> RunConfig:
    """``config`` with the straggler options ``sim.replayed_stragglers`` names back at their
    defaults: a real run's, whose delays the replayed step times already hold. The
    simulation's config.json then records what it applied, so repeating it changes nothing."""
    if not sim.replayed_stragglers:
        return config
    defaults = StragglerConfig()
    return replace(config, stragglers=replace(
        config.stragglers, **{name: getattr(defaults, name) for name in sim.replayed_stragglers}))


def _pushes(algo: type) -> bool:
    """Whether a step's rest is a push into the store: asgd, dcasgd-c, dcasgd-a."""
    return issubclass(algo, ASGD) and not issubclass(algo, SSP)


def inference_rate(step_times: StepTimeModel, batch_size: int) -> tuple[float, str]:
    """Virtual seconds an EC worker takes to run its model on one sample of the ensemble's
    exchange, and where it comes from. Replaying a real ec run that counted its inference:
    that run's rate (``"replayed"``: rank 0's time over its samples, in the real inference
    batches of 256, on the real machine). Else ``"step time"``: a third of a step's time (a
    forward's share) per sample of its batch, which takes a step's time as proportional to
    its batch: near for a compute-bound model (LeNet), too high where a step's fixed costs
    dominate (a small MLP at a small batch: 11x at batch 16), docs/DESIGN.md §10."""
    if step_times.kind == "replay":
        rate = steptimes.recorded_inference_rate(step_times.spec.partition(":")[2])
        if rate is not None:
            return rate, "replayed"
    return step_times.mean / batch_size * INFERENCE_SHARE, "step time"


def _workers(n: int, kind: str = "virtual") -> str:
    return f"{n} {kind} worker{'s' if n != 1 else ''}"


class Simulation:
    """What the virtual workers of one simulation share."""

    def __init__(self, config: RunConfig, sim: SimConfig):
        self.config, self.sim = config, sim
        self.workers = sim.workers
        self.scheduler = Scheduler(self.workers)
        self.network = sim.network()
        # What seeds the step-time and jitter draws: --timing-seed, else --seed.
        self.timing_seed = config.seed if sim.timing_seed is None else sim.timing_seed
        self.step_times = StepTimeModel(sim.step_time, self.workers, self.timing_seed)
        # A replay's rests, recorded (SimConfig checks); other models have none.
        rests = self.step_times.rests if sim.comm_time == "replay" else None
        if rests is not None and len(rests) != self.workers:
            recorded = len(rests)
            print(f"hpctrain simulate: --comm-time replay on {_workers(self.workers)} "
                  f"replays the rests (communication and waiting) and lead-ins "
                  f"{_workers(recorded, 'real')} had (worker k: worker k mod {recorded}'s), "
                  f"measured at {recorded}, not {self.workers}: use --comm-time model to "
                  f"model them at {self.workers}", file=sys.stderr, flush=True)
        per_sample, self.inference_from = inference_rate(self.step_times,
                                                         config.optim.batch_size)
        self.group = LocalGroup(self.scheduler, self.network, infer_s_per_sample=per_sample)
        self.group.simulation = self
        self._train_set: data.Dataset | None = None
        self._store: SharedStore | None = None
        self.holdings: dict = {}  # partial(q)'s holdings per epoch, shared by the workers

    def train_set(self, spec) -> data.Dataset:
        """The training set (``--train-subset``: a fixed random part, ids renumbered)."""
        if self._train_set is None:
            full = load_train_set(spec)
            n = self.sim.train_subset
            if n is not None and n < len(full):
                pick = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))
                full = full.subset(pick[:n].sort().values)
                full.ids = torch.arange(n)
            self._train_set = full
        return self._train_set

    def shared_store(self, values: torch.Tensor, options) -> SharedStore:
        """The store every virtual worker pushes to (made by the first to connect)."""
        if self._store is None:
            self._store = SharedStore(values, self.workers, shards=options.shards,
                                      servers=options.servers)
        return self._store

    def describe(self) -> dict:
        return {**self.sim.to_dict(), "timing_seed": self.timing_seed,
                "step_time_mean_s": self.step_times.mean,
                "inference_s_per_sample": self.group.infer_s_per_sample,
                "inference_from": self.inference_from}


def simulate(config: RunConfig, sim: SimConfig) -> dict:
    """Run ``config`` on ``sim.workers`` virtual workers; write the outputs; return the
    summary (``simulated: true``)."""
    userdata.forget()  # as train: a script's earlier run read them
    config = check(config, sim)
    # Locked as train's --out, or made for the run: a second run into it is refused.
    with run_folders.claimed(config, f"{config.algorithm_class.name}-sim{sim.workers}") as config:
        return _simulate(config, sim)


def _simulate(config: RunConfig, sim: SimConfig) -> dict:
    torch.set_num_threads(config.threads)
    simulation = Simulation(config, sim)
    # mypy takes type[Algorithm] for a non-Hashable instance at functools.cache's call
    # (its __hash__ looked up as an instance's): a class is hashable.
    algo_class = simulated(config.algorithm_class)  # type: ignore[arg-type]
    torch.manual_seed(config.seed)
    test_set = data.load(config.data.dataset, "test", config.data.data_dir)
    data.release(config.data.dataset, "test", config.data.data_dir)
    initial = launch_checks.initial_model(config, test_set.shape, test_set.num_classes)
    initial.to(run.device_for(config))
    # Where a real rank's own stream is as its training starts: seeded, the model drawn.
    streams = WorkerStreams(sim.workers, run.device_for(config))

    def worker(k: int) -> dict | None:
        algo = algo_class(config)
        model = copy.deepcopy(initial)
        algo.restore_model(None)
        comm = algo.connect(simulation.group.comms[k], model)
        summary = run._train(config, algo, comm, model, test_set, None,
                             runtime=VirtualRuntime(simulation, k))
        algo.close()
        return summary

    with devices.cudnn_mode(config.device, config.cudnn_benchmark):
        summaries = simulation.scheduler.run(worker, streams)
    return summaries[0]

