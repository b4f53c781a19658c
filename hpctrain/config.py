"""The run configuration: frozen dataclasses, built once and checked once.

A run is described by one :class:`RunConfig`: the run itself (algorithm, seed, outputs), its
data, model, optimisation, checkpoint policy, injected stragglers, and the algorithm's own
options (a dataclass the algorithm declares, see :mod:`hpctrain.algorithm`). It is built from
Python (``RunConfig(algo="ssgd", optim=OptimConfig(lr=0.1))``), from a TOML or JSON file
(:func:`load`), or from the command line (:mod:`hpctrain.arguments`), and each field is also a
command-line option (:func:`hpctrain.options.option`). Bad values raise ``ValueError`` (or
:class:`hpctrain.errors.UsageError`, a ValueError) naming the value, as torch does for bad
arguments, and the option as its user gave it (:func:`hpctrain.options.named`): the field
from Python (``OptimConfig.lr=-1``), the flag on the command line (``--lr``), which prints
that as one line with exit status 2.

Two kinds of checks: the values alone (ranges, names; at construction) and against the world
a run starts in (ranks, data files, checkpoint folders;
:func:`hpctrain.launch_checks.check_launch`, before MPI starts). ``config.json`` in every run
folder holds :func:`to_dict` of the effective configuration, which :func:`load` reads back to
repeat the run.

Typed twice: a field is annotated with what it holds once built (``out: str | None``), so
that readers need no narrowing; a section whose constructor takes more (a ``pathlib.Path``,
the Python API's model function or algorithm class, ``every=600``) declares that
``__init__`` for type checkers only (``if TYPE_CHECKING``), and ``__post_init__`` makes
each such value the string its field holds. A unit test keeps the two in step.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import numbers
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (install_requires)
    import tomli as tomllib

from hpctrain import (
    data,
    devices,
    model_checks,
    models,
    options,
    paths,
    plugins,
    precision,
    profiling,
    registry,
    user_json,
    userdata,
)
from hpctrain.algorithm import Algorithm, Options  # at run time: get_type_hints(RunConfig)
from hpctrain.checkpoint import parse_every
from hpctrain.checkpoint.policy import OFF
from hpctrain.errors import UsageError
from hpctrain.optimizers import OPTIMIZERS
from hpctrain.options import Range, check_fields, option
from hpctrain.schedule import SCHEDULES
from hpctrain.shuffle import TrainDataSpec
from hpctrain.shuffle.options import DEFAULT_CHUNK_MB, canonical_strategy, parse_strategy
from hpctrain.stragglers import MAX_SIGMA, Slowdown, parse_slowdown

EVAL_MODES = ("after", "online")
# The shortest --stall-timeout but 0 (never): the watchdog looks every tenth of it, and a rank
# makes progress once a step or a snapshot; shorter ended healthy jobs, or spun the watchdog.
MIN_STALL_TIMEOUT = 1.0


def _milestones(text: str) -> tuple[float, ...]:
    """``"3,4"`` -> (3.0, 4.0); OptimConfig checks that they increase. An empty entry
    (``"3,"``, a list cut short) is refused, as ``bench compare --targets`` refuses it."""
    words = text.split(",")
    if not any(w.strip() for w in words):
        raise argparse.ArgumentTypeError(f"{text!r}: want comma-separated epochs, e.g. 3,4")
    if not all(w.strip() for w in words):
        raise argparse.ArgumentTypeError(f"{text!r}: an empty entry")
    try:
        return tuple(float(v) for v in words)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None


def unmoved_chunk(mb: float) -> UsageError:
    """The refusal of a chunk size for data that are not moved (replicated): from a value
    here, from a typed flag in :func:`hpctrain.arguments.build`, where the default counts."""
    if options.on_command_line():
        return UsageError(f"--shuffle-chunk-mb {mb:g} sizes the rounds of the sharded "
                          "exchange, and replicated data are not moved")
    return UsageError(f"DataConfig.shuffle_chunk_mb={options.shown(mb)} sizes the rounds of "
                      "the sharded exchange, and replicated data (DataConfig.data_placement="
                      "'replicated') are not moved")


ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch's Adam and AdamW defaults
# Half float32's smallest positive number (2**-149): an eps at or below it rounds to 0 in the
# optimizer's float32 arithmetic, where Adam's first step divides 0 by 0.
FLOAT32_ZERO_AT = 2.0 ** -150
# The least number that rounds to infinity in float32 (its largest, 3.4e38, and half a step
# more): an eps there made every Adam step 0/inf, and the run trained nothing, without a word.
FLOAT32_INF_AT = 2.0 ** 128 - 2.0 ** 103


def _betas(text: str) -> tuple[float, float]:
    """``"0.9,0.999"`` -> (0.9, 0.999); OptimConfig checks that each is in [0, 1)."""
    words = text.split(",")
    if len(words) != 2 or not all(w.strip() for w in words):
        raise argparse.ArgumentTypeError(f"{text!r}: want two comma-separated numbers, "
                                         "e.g. 0.9,0.999")
    try:
        return options.number(words[0]), options.number(words[1])
    except argparse.ArgumentTypeError as e:  # which word, and why: "'nan' is not finite"
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def _shown_betas(betas) -> str:
    """Betas as ``--betas`` takes them: ``0.9,0.999``."""
    return options.shown_list(betas) if isinstance(betas, (list, tuple)) else repr(betas)


@dataclass(frozen=True)
class DataConfig:
    """Which data, and how it is placed and reshuffled over the ranks."""

    dataset: str = option(
        "fashion-mnist", "one of: " + ", ".join(data.DATASETS) + "; or your own: npz:FILE, "
        "imagefolder:DIR, MODULE:CALLABLE, ./FILE.py:CALLABLE", parse=userdata.dataset_name)
    data_dir: str | None = option(None, "folder with the data set's files")
    shuffle: str = option("global", "global (fresh permutation of all data each epoch), local "
                          "(each rank reshuffles its fixed part) or partial:Q (each rank also "
                          "sends a fraction Q in [0, 1] of its samples to other ranks)")
    data_placement: str = option("replicated", "replicated (every rank reads all data) or "
                                 "sharded (each rank reads its part; reshuffling moves samples "
                                 "with MPI)")
    partition: str = option("iid", "initial split: iid (the samples' order: a built-in set's "
                            "file order; an npz file's, a loader's or an image folder's "
                            "training samples in a fixed pseudo-random order, seed 0) or "
                            "label-skew (sorted by label)")
    shuffle_chunk_mb: float = option(DEFAULT_CHUNK_MB, "sharded exchange: at most this many "
                                     "MiB (2^20 bytes) sent per rank per round, but one sample "
                                     "to each rank at least", parse=options.positive(float))

    if TYPE_CHECKING:  # what a caller may give: see "Typed twice" above
        def __init__(self, dataset: str | os.PathLike[str] | Callable[..., Any] = ...,
                     data_dir: str | os.PathLike[str] | None = ..., shuffle: str = ...,
                     data_placement: str = ..., partition: str = ...,
                     shuffle_chunk_mb: float = ...) -> None: ...

    def __post_init__(self) -> None:
        # The Python API may give the loading function itself: kept as its reference.
        object.__setattr__(self, "dataset", plugins.reference_to("--dataset", self.dataset))
        check_fields(self)
        if self.data_dir is not None and not self.data_dir.strip():  # "": the search path
            what = options.named(f'--data-dir {self.data_dir!r}', "DataConfig", "data_dir",
                                 self.data_dir)
            raise UsageError(f"{what} is empty: give a folder")
        userdata.dataset_name(self.dataset, UsageError)
        object.__setattr__(self, "shuffle", canonical_strategy(self.shuffle))
        data.check_data_dir(self.dataset, self.data_dir, loaders=False)  # a loader's: at launch
        self.spec(0)  # the shuffle package's own checks
        if self.partition == "label-skew" and self.data_placement == "replicated" and \
                parse_strategy(self.shuffle)[0] == "global":  # every epoch: all data, permuted
            d = functools.partial(options.setting, DataConfig)
            use = "--shuffle local|partial:Q" if options.on_command_line() else \
                "DataConfig.shuffle='local' or 'partial:Q'"
            raise UsageError(f"{d('partition', 'label-skew')} with {d('shuffle', 'global')} "
                             "trains on iid data (each epoch deals a fresh permutation of all "
                             f"of it): use {use}")
        if self.data_placement == "replicated" and \
                self.shuffle_chunk_mb != DEFAULT_CHUNK_MB:
            raise unmoved_chunk(self.shuffle_chunk_mb)

    def spec(self, seed: int) -> TrainDataSpec:
        """The shuffle package's description of this data with ``seed``."""
        return TrainDataSpec(seed=seed, **asdict(self))


@dataclass(frozen=True)
class ModelConfig:
    """The network trained."""

    name: str = option(
        "lenet", "one of: " + ", ".join(models.MODELS) + "; or your own: MODULE:CALLABLE or "
        "./FILE.py:CALLABLE, called as CALLABLE(input_shape, num_classes, **model_args)",
        flag="--model", parse=model_checks.model_name)
    args: dict | None = option(None, "keyword arguments for a model of your own, as a JSON "
                               "object", flag="--model-args", parse=user_json.json_object,
                               metavar="JSON")
    init_from: str | None = option(
        None, "start from these weights: an earlier run's folder (its model.pt) or a file of "
        "torch.save(model.state_dict()); a new run, with its own schedule and optimizer state",
        flag="--init-from", metavar="PATH")

    if TYPE_CHECKING:  # what a caller may give: see "Typed twice" above
        def __init__(self, name: str | os.PathLike[str] | Callable[..., Any] = ...,
                     args: dict | None = ...,
                     init_from: str | os.PathLike[str] | None = ...) -> None: ...

    def __post_init__(self) -> None:
        # The Python API may give the function or class itself: kept as its reference.
        object.__setattr__(self, "name", plugins.reference_to("--model", self.name))
        check_fields(self)
        if self.init_from is not None and not self.init_from.strip():
            what = options.named(f'--init-from {self.init_from!r}', "ModelConfig", "init_from",
                                 self.init_from)
            raise UsageError(f"{what} is empty: give a run's folder or "
                             "a weights file")
        model_checks.model_name(self.name, UsageError)
        if self.args is not None and not isinstance(self.args, dict):
            what = options.named(f'--model-args {self.args!r}', "ModelConfig", "args", self.args)
            raise UsageError(f"{what}: want a JSON object")
        if self.args and not plugins.is_reference(self.name):
            m = functools.partial(options.setting, ModelConfig)
            raise UsageError(f"{m('args')} are for a model of your own, not "
                             f"{m('name', self.name)}")
        if self.args is not None:
            object.__setattr__(self, "args", options.plain_numbers(self.args))
            # config.json records them (after MPI started): keyword names, JSON values.
            bad = [k for k in self.args if not isinstance(k, str)]
            if bad:
                raise UsageError(f"--model-args: key {bad[0]!r} is not a string (keyword "
                                 "arguments are named)")
            try:
                json.dumps(self.args)
            except (TypeError, ValueError) as e:
                raise UsageError(f"--model-args: not JSON-able ({e}); config.json records "
                                 "them") from None


@dataclass(frozen=True)
class OptimConfig:
    """What every algorithm's SGD shares: budget, batch, learning rate and its schedule.

    ``lr`` and ``momentum`` left None take the algorithm's defaults (:func:`resolve`).
    """

    epochs: int = option(5, "passes over the data, all workers together",
                         parse=options.positive(int),
                         range=Range(0, options.HUGE, low_open=True))
    batch_size: int = option(64, "per worker (ssgd's update: the workers' batches "
                             "averaged)", parse=options.positive(int),
                             range=Range(0, low_open=True))
    micro_batch_size: int | None = option(None, "forward and backward a batch in near-equal "
                                          "parts of at most N samples, their gradients "
                                          "accumulated: less memory, the same update (to "
                                          "float rounding; batch norm excepted: it sees each "
                                          "part)",
                                          parse=options.positive(int), metavar="N",
                                          range=Range(0, low_open=True), clearable=True)
    lr: float | None = option(None, "each update's learning rate, not scaled by the "
                              "number of workers (DDP's convention; --scale-lr: Horovod's "
                              "examples') (default: the algorithm's; 0.05, asgd, dcasgd-*, "
                              "ssp: 0.1)", parse=options.positive(float),
                              range=Range(0, options.HUGE, low_open=True))
    momentum: float | None = option(None, "SGD momentum (default: the algorithm's; 0.9, asgd, "
                                    "dcasgd-*, ssp: 0, the paper's algorithm)", parse=float,
                                    range=Range(0, 1, high_open=True))
    nesterov: bool = option(False, "Nesterov momentum, as torch.optim.SGD(nesterov=True): "
                            "--optimizer sgd with --momentum > 0, for sgd, ssgd, ma and ec")
    weight_decay: float = option(0.0, "sgd, adam: an L2 penalty added to the gradient "
                                 "(ssgd's averaged one); adamw: decoupled weight decay (so "
                                 "adamw without it is adam); asgd, dcasgd-*, ssp: an L2 "
                                 "penalty added in the push",
                                 parse=float, range=Range(0, options.HUGE))
    lr_schedule: str | None = option(None, "cosine decay to 0 over the run (default), step "
                                     "decay at --lr-milestones (default when they are given), "
                                     "or constant", choices=SCHEDULES)
    lr_milestones: tuple[float, ...] = option((), "epochs at which the learning rate is "
                                              "multiplied by --lr-gamma, e.g. 3,4",
                                              parse=_milestones, clearable=True)
    lr_gamma: float = option(0.1, "step decay factor", parse=options.positive(float),
                             range=Range(0, options.HUGE, low_open=True))
    optimizer: str = option("sgd", "the update rule of sgd, ssgd, ma and ec (adam, adamw: "
                            "default --lr 0.001, --betas and --eps, no --momentum); "
                            "asynchronous algorithms keep their own", choices=OPTIMIZERS)
    betas: tuple[float, float] | None = option(None, "adam, adamw: the decay rates of the "
                                               "gradient's running mean and mean square, each "
                                               "in [0, 1) (default: torch's, 0.9,0.999)",
                                               parse=_betas, metavar="B1,B2")
    eps: float | None = option(None, "adam, adamw: added to the square root of the mean square "
                               "(default: torch's, 1e-08)", parse=options.positive(float),
                               range=Range(0, low_open=True))
    warmup_epochs: float = option(0.0, "multiply the scheduled learning rate by a factor "
                                  "rising linearly from 0 to 1 over this many epochs of "
                                  "global progress (not Horovod's examples' warm-up, which "
                                  "rises from the 1-worker --lr)", parse=float, range=Range(0))
    scale_lr: bool = option(False, "linear scaling rule: multiply --lr by the number of "
                            "workers")
    clip_grad_norm: float | None = option(None, "scale each step's gradient down to this L2 "
                                          "norm when above it (ssgd: the reduced gradient; with "
                                          "adasum, each rank's own)",
                                          parse=float, metavar="NORM",
                                          range=Range(0, low_open=True), clearable=True)

    def __post_init__(self) -> None:
        m = self.lr_milestones
        if hasattr(m, "tolist") and not isinstance(m, (list, tuple)):  # a numpy array
            m = m.tolist()
        if not isinstance(m, (list, tuple)):
            what = options.named(f'--lr-milestones {m!r}', "OptimConfig", "lr_milestones", m)
            raise UsageError(f"{what} must be a list of epochs, e.g. [3, 4]")
        bad = [v for v in m if isinstance(v, bool) or not isinstance(v, numbers.Real)]
        if bad:
            what = options.named(f'--lr-milestones {list(m)!r}', "OptimConfig", "lr_milestones", m)
            raise UsageError(f"{what}: {bad[0]!r} is not a number of "
                             "epochs")
        # numpy's numbers as Python's (np.arange gives them): JSON and TOML write those only.
        object.__setattr__(self, "lr_milestones",
                           tuple(v.item() if hasattr(v, "item") else v for v in m))
        check_fields(self)
        o = functools.partial(options.setting, OptimConfig)  # a flag, or a field from Python
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise UsageError(f"{o('micro_batch_size', self.micro_batch_size)} "
                             f"exceeds {o('batch_size', self.batch_size)}")
        m = self.lr_milestones
        if any(not 0 < v < math.inf for v in m) or list(m) != sorted(set(m)):
            raise UsageError(f"{o('lr_milestones', m)}: milestones "
                             "must be increasing finite epochs > 0")
        if m and m[-1] >= self.epochs:  # training ends before the epoch of that milestone
            raise UsageError(f"{o('lr_milestones', m)}: "
                             f"{options.shown(m[-1])} is not before {o('epochs', self.epochs)}, "
                             "so the rate never changes there")
        if self.lr_milestones and self.lr_schedule not in (None, "step"):
            need, other = ("--lr-schedule step", self.lr_schedule) if options.on_command_line() \
                else ("OptimConfig.lr_schedule='step'", repr(self.lr_schedule))
            raise UsageError(f"{o('lr_milestones')} need {need}, not {other}")
        if self.lr_schedule == "step" and not self.lr_milestones:  # else a constant rate
            raise UsageError(f"{o('lr_schedule', 'step')} needs {o('lr_milestones')}, the "
                             f"epochs at which the learning rate is multiplied by "
                             f"{o('lr_gamma')} (e.g. {options.example((3, 4))})")
        if self.lr_gamma != OptimConfig.lr_gamma and not self.lr_milestones:  # its default
            raise UsageError(f"{o('lr_gamma', self.lr_gamma)} is the step decay at "
                             f"{o('lr_milestones')}, and none are given: it would change "
                             f"nothing; give {o('lr_milestones')} (e.g. "
                             f"{options.example((3, 4))}) or leave "
                             f"{o('lr_gamma')} out")
        if self.warmup_epochs >= self.epochs:
            raise UsageError(f"{o('warmup_epochs', self.warmup_epochs)} is not "
                             f"below {o('epochs', self.epochs)}: the run would end "
                             "before its warm-up does")
        if self.optimizer != "sgd" and self.momentum is not None:
            raise UsageError(f"{o('momentum', self.momentum)} is SGD's; "
                             f"{o('optimizer', self.optimizer)} has {o('betas')} "
                             f"(default {options.example(ADAM_BETAS)})")
        if self.nesterov and self.optimizer != "sgd":
            raise UsageError(f"{o('nesterov')} is SGD's Nesterov momentum; "
                             f"{o('optimizer', self.optimizer)} has none (torch's NAdam is "
                             "another optimizer)")
        self._check_adam_options()

    def _check_adam_options(self) -> None:
        """``betas`` as a tuple of two rates in [0, 1) and ``eps`` one float32 holds (not 0)
        (a Python caller's and a file's values as the flag's). Under SGD, which has neither,
        :func:`hpctrain.optimizers.check` refuses them: what to give instead depends on the
        algorithm."""
        b = self.betas
        if b is not None:
            if hasattr(b, "tolist") and not isinstance(b, (list, tuple)):  # a numpy array
                b = b.tolist()
            if not isinstance(b, (list, tuple)) or len(b) != 2 or any(
                    isinstance(v, bool) or not isinstance(v, numbers.Real) for v in b):
                what = options.named(f'--betas {b!r}', "OptimConfig", "betas", b)
                raise UsageError(f"{what}: want two numbers, e.g. [0.9, 0.999]")
            b = float(b[0]), float(b[1])
            object.__setattr__(self, "betas", b)
            if not all(0 <= v < 1 for v in b):  # NaN too
                what = options.named(f'--betas {_shown_betas(b)}', "OptimConfig", "betas", b)
                raise UsageError(f"{what}: each must be in [0, 1)")
        if self.eps is not None and self.eps <= FLOAT32_ZERO_AT:
            what = options.named(f'--eps {options.shown(self.eps)}', "OptimConfig", "eps", self.eps)
            raise UsageError(f"{what} is 0 in float32, the optimizer "
                             "state's type (its smallest positive number is 1.4e-45), and "
                             "Adam's 0/0 then makes NaN; give at least 1.4e-45")
        if self.eps is not None and self.eps >= FLOAT32_INF_AT:
            what = options.named(f'--eps {options.shown(self.eps)}', "OptimConfig", "eps", self.eps)
            raise UsageError(f"{what} is infinite in float32, the "
                             "optimizer state's type (its largest number is 3.4e+38), and "
                             "every Adam step is then 0: nothing trains; give at most 3.4e+38")


@dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written, where, and which run to continue."""

    every: str | None = option(
        None, "write a checkpoint every N seconds, or every N epochs with Ne (e.g. 1e); then "
        "SIGUSR1 makes the run write one within 32 updates and exit with status 5. Not set "
        "(the default): none, but --resume keeps the resumed run's interval; off: none, not "
        "even on --resume, also over --config's value", flag="--checkpoint-every",
        parse=parse_every)
    dir: str | None = option(
        None, "folder for checkpoints (default <out>/checkpoints, or with --resume the folder "
        "resumed from)", flag="--checkpoint-dir")
    resume: str | None = option(
        None, "continue the run whose checkpoints are in DIR (a run's --out or its checkpoint "
        "folder) from its newest valid checkpoint, with its --checkpoint-every unless given; "
        "auto: this run's own (--out or --checkpoint-dir) if it has any, else start it (for "
        "restarted and requeued jobs)", metavar="DIR|auto")

    if TYPE_CHECKING:  # what a caller may give (every=600: seconds): see "Typed twice"
        def __init__(self, every: str | float | None = ...,
                     dir: str | os.PathLike[str] | None = ...,
                     resume: str | os.PathLike[str] | None = ...) -> None: ...

    @property
    def interval(self) -> str | None:
        """The interval checkpoints are written at (``every``), None for none (also ``off``)."""
        return None if self.every in (None, OFF) else self.every

    def __post_init__(self) -> None:
        if self.every is not None:
            if isinstance(self.every, bool) or not isinstance(self.every, (str, numbers.Real)):
                what = options.named(f"--checkpoint-every {self.every!r}", "CheckpointConfig",
                                     "every", self.every)
                raise UsageError(f"{what} must be seconds (600) or "
                                 "epochs (\"2e\")")
            try:
                object.__setattr__(self, "every", parse_every(str(self.every)))
            except argparse.ArgumentTypeError as e:
                what = options.named(f"--checkpoint-every {self.every}", "CheckpointConfig",
                                     "every", self.every)
                raise UsageError(f"{what}: {e}") from None
        check_fields(self)
        for flag, key, folder in (("--checkpoint-dir", "dir", self.dir),
                                  ("--resume", "resume", self.resume)):
            if folder is not None and not folder.strip():  # "" would be the working folder
                what = options.named(f'{flag} {folder!r}', "CheckpointConfig", key, folder)
                raise UsageError(f"{what} is empty: give a folder")
        object.__setattr__(self, "dir", _expanded(self.dir, "--checkpoint-dir", "dir"))
        object.__setattr__(self, "resume", _expanded(self.resume, "--resume", "resume"))


@dataclass(frozen=True)
class StragglerConfig:
    """Injected stragglers: fixed slowdowns of some workers, and seeded per-step jitter."""

    slowdown: str | None = option(None, "injected straggler: worker RANK's steps take FACTOR "
                                  "times as long (0:3), or a fixed DELAY longer (0:+20ms, "
                                  "1:+0.5s; ms or s, at most 1 hour), or both (0:2+10ms); RANK "
                                  "counts the ranks that train: with --eval-rank R, rank r > R "
                                  "is worker r - 1",
                                  metavar="RANK:FACTOR|RANK:+DELAY[,...]")
    jitter: float = option(0.0, "injected noise: a step of t takes exp(SIGMA*z) times "
                           "(FACTOR*t + DELAY) of its --slowdown (FACTOR 1, DELAY 0 without), "
                           "but no less than t; z ~ N(0,1) drawn per step, seeded", parse=float,
                           metavar="SIGMA", range=Range(0, MAX_SIGMA))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.slowdown is not None and not self.slowdown.replace(",", "").strip():
            raise UsageError(f"{self._named()} is empty: give RANK:FACTOR or RANK:+DELAY"
                             "[,...], or leave it out for none")
        self.slowdowns(1 << 30)  # its form; the ranks are checked at launch

    def _named(self) -> str:
        """``--slowdown`` as a refusal names it: the flag typed, or the field from Python."""
        text = self.slowdown
        blank = text is not None and not text.replace(",", "").strip()  # shown quoted
        return options.named(f"--slowdown {text!r}" if blank else f"--slowdown {text}",
                             "StragglerConfig", "slowdown", text)

    def slowdowns(self, workers: int) -> dict[int, Slowdown]:
        """Each slowed worker's factor and delay, for a run of ``workers`` training workers
        (refused, naming ``--slowdown`` or ``StragglerConfig.slowdown``, where bad)."""
        return parse_slowdown(self.slowdown, workers, self._named())

    def factor(self, rank: int, workers: int) -> float:
        """Worker ``rank``'s fixed slowdown factor (1: none)."""
        return self.slowdown_of(rank, workers).factor

    def slowdown_of(self, rank: int, workers: int) -> Slowdown:
        """Worker ``rank``'s factor and fixed delay (1 and 0: none)."""
        return self.slowdowns(workers).get(rank, Slowdown())


@dataclass(frozen=True)
class RunConfig:
    """One training run. ``algorithm`` holds the algorithm's own options (its ``Options``
    dataclass; None: its defaults)."""

    algo: str = option("", "one of: " + registry.choices())
    seed: int = option(0, "seeds the model, the data order and injected stragglers", parse=int,
                       range=Range(-2 ** 63, 2 ** 63 - 1))  # torch's generators take 64 bits
    out: str | None = option(None, "output directory (default runs/<algo>-<time>)")
    eval_every: float = option(0.25, "epochs between snapshots of the model (scored after "
                               "training, or with --eval online while it runs)",
                               parse=options.positive(float),
                               range=Range(0, options.HUGE, low_open=True))
    eval_mode: str = option("after", "score snapshots after training (the curve's time axis "
                            "excludes scoring), or online: as training runs, on rank 0 between "
                            "steps or on --eval-rank", flag="--eval", choices=EVAL_MODES)
    eval_rank: int | None = option(None, "with --eval online: this rank (not 0) only scores "
                                   "snapshots and does not train", parse=int, range=Range(1))
    tensorboard: bool = option(False, "write TensorBoard event files to <out>/tensorboard")
    log_every: int = option(10, "with --tensorboard, updates between training entries (an "
                            "asynchronous run: rank 0's own steps)",
                            parse=options.positive(int), range=Range(1))
    stop_on_collapse: bool = option(False, "end the run (exit status 4, outputs kept) when "
                                    "training has collapsed")
    device: str = option("auto", "where each rank computes: cuda takes GPU (local rank mod GPUs) "
                         "(auto: cuda when torch sees a GPU)", choices=devices.DEVICES)
    mixed_precision: str = option("no", "the forward pass under torch.autocast in bfloat16, "
                                  "or float16 with loss scaling; gradients, parameters and "
                                  "communication stay float32", choices=precision.CHOICES)
    cudnn_benchmark: bool = option(False, "on a GPU, let cuDNN time its algorithms for each "
                                   "new shape and take the fastest (cudnn.benchmark): a convnet "
                                   "may train faster, but a run no longer repeats bit for bit "
                                   "(default: cuDNN's deterministic algorithms)")
    compile: bool = option(False, "compile the model with torch.compile (TorchInductor); the "
                           "first steps and the first evaluation take longer")
    profile: str | None = option(None, "torch.profiler over local steps START to START+COUNT-1 "
                                 "on every worker: Chrome traces and operator tables in "
                                 "<out>/profile", metavar="START:COUNT", clearable=True)
    threads: int = option(1, "torch threads per rank", parse=options.positive(int),
                          range=Range(1, 4096))
    progress: bool = option(True, "no progress bar", flag="--no-progress", store_false=True)
    max_bad_steps: int = option(10, "stop after this many consecutive steps with NaN/Inf "
                                "gradients", parse=options.positive(int), range=Range(1))
    stall_timeout: float = option(600.0, "end the job when a rank makes no progress for this "
                                  "long (0: never, else at least 1; start-up, to the end "
                                  "of the first step, gets at least 600 s)", parse=float,
                                  metavar="SECONDS",
                                  range=Range(0, note="(0: never)"))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    stragglers: StragglerConfig = field(default_factory=StragglerConfig)
    algorithm: Options | None = None

    if TYPE_CHECKING:  # what a caller may give: see "Typed twice" above
        def __init__(
                self, algo: str | type[Algorithm] = ..., seed: int = ...,
                out: str | os.PathLike[str] | None = ..., eval_every: float = ...,
                eval_mode: str = ..., eval_rank: int | None = ..., tensorboard: bool = ...,
                log_every: int = ..., stop_on_collapse: bool = ..., device: str = ...,
                mixed_precision: str = ..., cudnn_benchmark: bool = ..., compile: bool = ...,
                profile: str | None = ..., threads: int = ..., progress: bool = ...,
                max_bad_steps: int = ..., stall_timeout: float = ...,
                data: DataConfig = ..., model: ModelConfig = ..., optim: OptimConfig = ...,
                checkpoint: CheckpointConfig = ..., stragglers: StragglerConfig = ...,
                algorithm: Options | None = ...) -> None: ...

    def __post_init__(self) -> None:
        if isinstance(self.algo, type):  # the Python API's RunConfig(algo=Mine)
            builtin = next((n for n, a in registry.ALGORITHMS.items() if a is self.algo), None)
            object.__setattr__(self, "algo", builtin or plugins.reference_to("--algo", self.algo))
        if not isinstance(self.algo, str):
            what = options.named(f'--algo {self.algo!r}', "RunConfig", "algo", self.algo)
            raise UsageError(f"{what} must be a string; choose from "
                             f"{registry.choices()}")
        if not self.algo.strip():  # RunConfig(): "unknown algorithm ''" named no field
            raise UsageError(f"RunConfig needs algo=..., the algorithm: one of "
                             f"{', '.join(registry.names())}, or your own as MODULE:CLASS, "
                             "./FILE.py:CLASS or the class itself")
        options_cls = registry.get(self.algo).Options  # UsageError for an unknown name
        check_fields(self)
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if type(value) is not cls:  # a dict would fail later, after MPI started
                hint = f" ({cls.__name__}(**...) builds one from a dict)" \
                    if isinstance(value, dict) else ""
                raise UsageError(f"RunConfig({name}=...) takes {cls.__name__}, not "
                                 f"{type(value).__name__}{hint}")
        if self.algorithm is None:
            object.__setattr__(self, "algorithm", options_cls())
        elif type(self.algorithm) is not options_cls:
            hint = f" (hpctrain.algorithm_options({self.algo!r})(**...) builds one from a " \
                "dict)" if isinstance(self.algorithm, dict) else ""
            takes = f"--algo {self.algo}" if options.on_command_line() else \
                f"RunConfig(algo={self.algo!r}, algorithm=...)"
            raise UsageError(f"{takes} takes {options_cls.__name__}, not "
                             f"{type(self.algorithm).__name__}{hint}")
        if self.out is not None and not str(self.out).strip():  # "" would be the working folder
            what = options.named(f'--out {self.out!r}', "RunConfig", "out", self.out)
            raise UsageError(f"{what} is empty: give a folder (default "
                             "runs/<algo>-<time>)")
        object.__setattr__(self, "out", _expanded(self.out, "--out", "out"))
        if 0 < self.stall_timeout < MIN_STALL_TIMEOUT:  # see MIN_STALL_TIMEOUT
            what = options.named(f"--stall-timeout {options.shown(self.stall_timeout)}",
                                 "RunConfig", "stall_timeout", self.stall_timeout)
            raise UsageError(f"{what} must be 0 "
                             f"(never) or >= {MIN_STALL_TIMEOUT:g} (seconds)")
        if self.eval_rank is not None and self.eval_mode != "online":
            r = functools.partial(options.setting, RunConfig)
            raise UsageError(f"{r('eval_rank', self.eval_rank)} needs "
                             f"{r('eval_mode', 'online')}")
        if self.profile is not None:
            profiling.parse(self.profile)

    @property
    def algorithm_class(self) -> type[Algorithm]:
        """The class that trains this run (``algo``'s, a built-in's or one's own)."""
        return registry.get(self.algo)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
            "checkpoint": CheckpointConfig, "stragglers": StragglerConfig}


_SECTION_DOCS = {name: f"its {section.__name__} (see help(hpctrain.{section.__name__}))"
                 for name, section in SECTIONS.items()}
_SECTION_DOCS["algorithm"] = ("the algorithm's own options: hpctrain.algorithm_options(algo)"
                              "(...) (None: its defaults)")


for _section in (RunConfig, *SECTIONS.values()):
    options.document_fields(_section, _SECTION_DOCS)


def _expanded(folder: str | None, flag: str, name: str) -> str | None:
    """A folder option with ``~`` expanded where it is taken (:func:`paths.home_expanded`,
    as for every path option): the run's files, its summary and config.json then name the
    real folder, not a ``~`` made in the working folder. ``name``: its field (RunConfig's
    ``out``, else CheckpointConfig's), which a refusal names from Python."""
    owner = "RunConfig" if name == "out" else "CheckpointConfig"
    return None if folder is None else paths.home_expanded(folder, flag, (owner, name))


def defaults(algo: str, optimizer: str, lr_milestones: tuple = ()) -> dict:
    """The ``optim`` values a run of ``algo`` with ``optimizer`` takes when none is given:
    SGD's rate and momentum are the algorithm's (0.05 and 0.9 unless it says otherwise), Adam's
    rate 0.001 and torch's betas and eps (its betas stand for momentum; SGD has neither); the
    schedule steps where milestones are given, else follows a cosine."""
    sgd = registry.get(algo).defaults if optimizer == "sgd" else None
    return {"lr": sgd.get("lr", 0.05) if sgd is not None else 0.001,
            "momentum": sgd.get("momentum", 0.9) if sgd is not None else None,
            "betas": None if sgd is not None else ADAM_BETAS,
            "eps": None if sgd is not None else ADAM_EPS,
            "lr_schedule": "step" if lr_milestones else "cosine"}


def resolve(config: RunConfig) -> RunConfig:
    """``config`` with the algorithm's defaults filled in (learning rate, momentum or Adam's
    betas and eps, schedule)."""
    o = config.optim
    d = defaults(config.algo, o.optimizer, o.lr_milestones)
    return replace(config, optim=replace(
        o, **{key: d[key] for key in d if getattr(o, key) is None}))


def left_out(config: RunConfig) -> dict:
    """The flat values (:func:`flat`) a run of ``config``'s algorithm and optimizer takes for
    every option left out: what a resume refusal names as the default (adam's --lr and
    --betas are not sgd's)."""
    return flat(resolve(RunConfig(algo=config.algo,
                                  optim=OptimConfig(optimizer=config.optim.optimizer))))


def before_newer_options(config: RunConfig) -> dict:
    """Every option's flat value that a run of ``config``'s algorithm and optimizer took
    before the option existed: its default (:func:`left_out`; torch's for ``betas`` and
    ``eps``), as the run trained without it. A resumption compares a checkpoint header that
    lacks an option so (``--clip-grad-norm``, ``--warmup-epochs``: any of them, not a list
    kept by hand, which missed those), and refuses a header option outside it."""
    return left_out(config)


def to_dict(config: RunConfig) -> dict:
    """The configuration as nested plain values (JSON and TOML); :func:`from_dict` inverts it."""
    out = asdict(config)
    out["optim"]["lr_milestones"] = list(config.optim.lr_milestones)
    if config.optim.betas is not None:
        out["optim"]["betas"] = list(config.optim.betas)
    return out


def repeatable(config: RunConfig) -> dict:
    """What ``config.json`` keeps: :func:`to_dict` of the effective configuration, as a fresh
    run repeats it (``--resume`` and the checkpoint folder left out, whether derived from
    ``--out`` or ``--resume`` or given: a repeat writes its own, in its ``--out``; the run's
    folder held the run's checkpoints and refused the repeat's); ``out`` absolute, as the
    other paths are (``launch_checks._as_launched``), whatever folder the file is read from."""
    values = to_dict(config)
    values["checkpoint"]["resume"] = None
    values["checkpoint"]["dir"] = None
    if isinstance(values["out"], str):
        values["out"] = os.path.abspath(values["out"])
    return values


def from_dict(values: dict) -> RunConfig:
    """A configuration from nested plain values (``to_dict``'s form); unknown keys are errors.

    ``run_info`` (what a run records beside its configuration in config.json) and ``sim`` (a
    simulation's own options, which ``hpctrain simulate --config`` reads) are ignored.
    """
    values = {k: v for k, v in values.items() if k not in ("run_info", "sim")}
    algo = values.get("algo")
    if algo is None:
        raise UsageError("the configuration names no algorithm (algo = \"...\")")
    if not isinstance(algo, str):
        raise UsageError(f"algo {algo!r} must be a string; choose from "
                         f"{registry.choices()}")
    kwargs = {}
    for key, value in values.items():
        if key in SECTIONS:
            kwargs[key] = _build(SECTIONS[key], value, key)
        elif key == "algorithm":
            options = registry.get(algo).Options
            for name in value if isinstance(value, dict) else ():  # another's: say whose
                if name not in {f.name for f in fields(options)} and registry.owners(name):
                    raise UsageError(f"algorithm.{name} is an option of "
                                     f"{', '.join(registry.owners(name))}, not of algo {algo}")
            kwargs[key] = _build(options, {} if value is None else value, "algorithm")
        elif key in {f.name for f in fields(RunConfig)}:
            kwargs[key] = value
        else:
            raise UsageError(f"unknown configuration key {key!r}{_close_to(key)}; the top "
                             f"level has the keys {', '.join(_TOP_KEYS)} and the tables "
                             f"{', '.join([*SECTIONS, 'algorithm'])}")
    return RunConfig(**kwargs)


_TOP_KEYS = sorted(f.name for f in fields(RunConfig) if f.name not in {*SECTIONS, "algorithm"})


def _close_to(key) -> str:
    """Where an unknown top-level ``key`` may have been meant: the key of the flag it names
    (``eval``: eval_mode), a table's key (``lr``: [optim] lr), an algorithm's option, or a
    key spelt alike; else nothing."""
    import difflib

    if not isinstance(key, str):
        return ""
    for f in fields(RunConfig):
        if key == options.flag_of(f).lstrip("-").replace("-", "_") and f.name in _TOP_KEYS:
            return f" (the key of --{key.replace('_', '-')} is {f.name})"
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            if key in (f.name, options.flag_of(f).lstrip("-").replace("-", "_")):
                return f" (its place is [{section}] {f.name})"
    if owners := registry.owners(key):
        return f" (an option of {', '.join(owners)}: its place is [algorithm] {key})"
    close = difflib.get_close_matches(key, [*_TOP_KEYS, *SECTIONS, "algorithm"], n=1)
    return f" ({close[0]}?)" if close else ""


def _build(cls, values, where: str):
    if not isinstance(values, dict):
        raise UsageError(f"configuration [{where}] must be a table, not {values!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(values.keys() - known)
    if unknown:
        raise UsageError(f"unknown configuration key {where}.{unknown[0]}; {where} has "
                         + (f"the keys {', '.join(sorted(known))}" if known else "no keys"))
    return cls(**values)


def read_file(path: str | os.PathLike[str]) -> dict:
    """The nested values of a TOML file, or of a run's ``config.json``."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise TypeError(f"hpctrain.load_config takes a file's path, not "
                        f"{type(path).__name__}" + (" (RunConfig builds one from values; "
                                                    "--config FILE reads one)"
                                                    if isinstance(path, dict) else ""))
    if not str(path).strip():  # "" would read the working folder, or nothing
        raise UsageError(f"--config {str(path)!r} is empty: give a TOML file or a run's "
                         "config.json")
    path = Path(paths.home_expanded(path, "--config"))
    if path.suffix in (".yaml", ".yml"):
        raise UsageError(f"--config {path}: YAML is not read; give a TOML file or a run's "
                         "config.json")
    try:
        text = path.read_bytes()
    except OSError as e:
        raise UsageError(f"--config {path}: {e.strerror}") from None
    try:
        if path.suffix == ".json":
            values = json.loads(text, object_pairs_hook=user_json.unique_keys)
        else:  # a byte-order mark, as some Windows editors write, is no setting
            values = tomllib.loads(text.decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as e:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise UsageError(f"--config {path}: not valid {kind} ({e})") from None
    except RecursionError:
        raise UsageError(f"--config {path}: nested too deeply to be settings") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: not a table of settings")
    return values


def load(path: str | os.PathLike[str]) -> RunConfig:
    """The configuration in a TOML file or a run's ``config.json``."""
    return from_dict(read_file(path))


def merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``, table by table; a value inside a table is replaced
    whole, a JSON object too (``--model-args '{"depth": 2}'`` is the model's arguments, not
    one more of the file's)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and out.get(key) is not None \
                and not isinstance(out[key], dict):  # else a bad table went unseen
            raise UsageError(f"configuration [{key}] must be a table, not {out[key]!r}")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def flat(config: RunConfig) -> dict:
    """Every option's value by its flag's name (``lr``, ``checkpoint_every``, ``tau``): how a
    checkpoint compares the run resumed with the run that wrote it."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        for g, v in ([(g, getattr(value, g.name)) for g in fields(value)]
                     if is_dataclass(value) else [(f, value)]):
            # a flag that sets its field False (--no-progress) records what the flag says
            v = not v if g.metadata.get("store_false") else v
            out[options.flag_of(g).lstrip("-").replace("-", "_")] = v
    return json.loads(json.dumps(out, default=str))


def flat_fields(config: RunConfig) -> dict[str, tuple[str, str, bool]]:
    """Each :func:`flat` key's field, as a refusal names it to a Python caller
    (:func:`hpctrain.options.named`): ``lr`` -> ``("OptimConfig", "lr", False)``, ``tau`` ->
    its algorithm's options class's; True where the key is the field negated, as its flag
    (``no_progress``: ``RunConfig.progress``)."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        for owner, g in ([(type(value).__name__, g) for g in fields(value)]
                         if is_dataclass(value) else [(type(config).__name__, f)]):
            key = options.flag_of(g).lstrip("-").replace("-", "_")
            out[key] = (owner, g.name, bool(g.metadata.get("store_false")))
    return out
