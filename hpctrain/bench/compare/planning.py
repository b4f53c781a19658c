"""The comparison planned from its options: one :class:`Run` per algorithm (and seed).

:func:`plan` checks compare's own options, builds each run's command (``hpctrain train``
under the launcher, or ``hpctrain simulate``) and checks each run as that command would
check itself, so that a bad option is refused before anything runs. It reads the folder
only to word a refusal (a ``--resume`` without ``--algos``); what is there is
:mod:`.record`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from hpctrain import arguments, data, launch_checks, live, paths, plugins, registry
from hpctrain.bench.compare.arguments import (
    WORKERS,
    TrainOption,
    _sim_parser,
    _train_parser,
    given_options,
    simulator_words,
)
from hpctrain.bench.compare.launcher import launcher_command, launches_here
from hpctrain.bench.report import reading, remarks, rendering
from hpctrain.config import RunConfig
from hpctrain.errors import UsageError
from hpctrain.options import HUGE, command_line, shown
from hpctrain.sim import arguments as sim_arguments
from hpctrain.sim.simulate import check_options as check_simulation

SEQUENTIAL = ("sgd",)  # algorithms that train on one process whatever --workers says
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")  # algorithm names become folder names


@dataclass
class Run:
    """One algorithm's job (with ``--seeds``, one seed's): its processes and command."""

    algo: str
    np: int
    command: list[str]
    ignored: list[str]  # flags given that this algorithm does not take
    trainers: int | None = None  # of the np, the ranks that train (summary's "workers"); None: np
    seed: int | None = None  # --seeds: this run's
    words: tuple[str, ...] = ()  # the hpctrain command it runs, after the program: train ...
    config: RunConfig | None = field(default=None, repr=False, compare=False)  # as planned

    @property
    def label(self) -> str:
        """The algorithm's name in compare.json and the report (a user's: its class's)."""
        return registry.display_name(self.algo)

    @property
    def name(self) -> str:
        """Its folder in the comparison and its key in compare.json."""
        return reading.run_name(self.label, self.seed)


def check_run(config: RunConfig, np: int, here: bool = False) -> int:
    """Check one planned run as ``hpctrain train`` checks itself before MPI starts
    (:func:`hpctrain.launch_checks.check_launch`) on ``np`` processes; return how many of them train
    (``--eval-rank``'s rank and ``--servers`` do not). Its folders are compare's to check.
    What depends on the machine (``--device``, ``--mixed-precision``, ``--compile``) is
    refused here when the run starts on this machine (``here``, :func:`launches_here`), and
    otherwise only checked where this machine can run it: a login node launching ``srun``
    steps onto GPU nodes leaves that to the runs."""
    config = replace(config, out=None)  # --out, its checkpoints and --resume: compare's
    try:
        launch_checks.check_compute(config)
    except UsageError:
        if here:  # every run would start, then fail the same way
            raise
        config = replace(config, device="cpu", mixed_precision="no", compile=False)
    # A user's data set, a fault that will not fire, ...: said by the run itself, not twice.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        config = launch_checks.check_launch(config, np)
    return config.algorithm_class.workers(config, live.check(config, np))


def _evaluator_for_one(words: list[str]) -> list[str]:
    """sgd's words with ``--eval-rank`` moved into its two processes (one trains, one
    evaluates, as one rank of every other run does): rank R > 1 becomes rank 1."""
    i = words.index("--eval-rank") + 1
    if words[i].strip().isdigit() and int(words[i]) > 1:  # else as given: 1, or refused
        words = [*words[:i], "1", *words[i + 1:]]
    return words


def parse_algos(text: str) -> list[str]:
    """``--algos "sgd,ssgd"`` -> ["sgd", "ssgd"]: algorithms this hpctrain has, or a user's
    own by reference (``./mine.py:Mine``), each once. An empty entry (``sgd,,ssgd``, a
    trailing comma) or a repeat is refused, as ``--seeds`` refuses them: a list cut short or
    mistyped would compare fewer algorithms than meant."""
    words = [w.strip() for w in str(text).split(",")]
    if not any(words) or not all(_NAME.match(w) or plugins.is_reference(w) for w in words if w):
        raise UsageError(f"--algos {text!r}: want names like sgd,ssgd,dcasgd-a")
    if not all(words):
        raise UsageError(f"--algos {text!r}: an empty entry")
    unknown = [w for w in words if w not in registry.names() and not plugins.is_reference(w)]
    if unknown:
        raise UsageError(f"--algos {text!r}: unknown algorithm {unknown[0]!r}; this "
                         f"hpctrain has: {registry.choices()}")
    names = [registry.display_name(w) for w in words]  # a reference: its class's name
    twice = [n for i, n in enumerate(names) if n in names[:i]]
    if twice:
        raise UsageError(f"--algos {text!r}: algorithm {twice[0]!r} given twice")
    return words


@command_line()  # a comparison's runs are command lines: their refusals name the flags
def plan(args: argparse.Namespace) -> list[Run]:
    """Check compare's options and build every run's command; raise UsageError if bad."""
    if not hasattr(args, "algos"):
        raise UsageError(_algos_missing(args))
    algos = parse_algos(args.algos)
    if args.workers is not None and args.workers < 1:  # checked while parsing too; a
        raise UsageError(f"--workers {args.workers}: must be >= 1")  # Python caller's here
    simulate = args.simulate is not None
    if simulate and not 1 <= args.simulate <= HUGE:  # SimConfig's range, named as given here
        raise UsageError(f"--simulate {shown(args.simulate)}: must be in [1, {HUGE:g}] virtual "
                         "workers")
    sim_words = simulator_words(args)
    if simulate:
        launcher = getattr(args, "launcher", None)
        unused = ("--workers", shown(args.workers)) if args.workers not in (None, args.simulate) \
            else ("--launcher", repr(launcher)) if launcher is not None else None
        if unused:  # else it went unused, unsaid
            raise UsageError(f"{' '.join(unused)} with --simulate {args.simulate}: each "
                             f"simulated run has --simulate's virtual workers, in one process "
                             f"without a launcher; drop {unused[0]}")
        args.workers = args.simulate
    elif sim_words:
        raise UsageError(f"{sim_words[0]} is an option of the simulator: give --simulate K")
    elif args.workers is None:
        args.workers = WORKERS
    # A timer of more than threading.TIMEOUT_MAX (9.2e9 s) fails in its thread: no timeout.
    if not (math.isfinite(args.timeout) and 0 <= args.timeout <= HUGE):
        raise UsageError(f"--timeout {args.timeout:g}: must be in [0, {HUGE:g}] "
                         "(0: none)")
    rendering.parse_targets(args.targets)
    # --out=~/x (the shell expands no ~ after "="): as every train path option takes it,
    # not a folder named ~ in the working folder beside runs that train's --out put in home.
    args.out = paths.home_expanded(args.out, "--out")
    rendering.check_out_folder(args.out)  # else found as the first run starts, all planned
    given = given_options(args)
    _check_owned(given, algos, args.algos, _recorded_words(args))
    seeds = getattr(args, "seeds", None)
    if seeds is not None and hasattr(args, "train_seed"):
        raise UsageError("--seeds and --seed: give one (--seeds runs each algorithm once per "
                         "seed)")
    shared = _Shared(args, given, _train_parser(), sim_words)
    runs: list[Run] = []
    for algo in algos:
        for seed in seeds or [None]:
            runs.append(_planned(shared, algo, seed,
                                 checked=runs[-1] if runs and runs[-1].algo == algo else None))
    return runs


def _check_owned(given: list[tuple[TrainOption, list[str]]], algos: list[str],
                 text: str, recorded: list[str]) -> None:
    """An algorithm option that no algorithm of ``--algos`` takes is refused, as ``train``
    refuses it given to another algorithm: it would change nothing the comparison runs. One
    that some take goes to those (whose runs check its value) and is noted for the others.
    ``recorded``: the options of the comparison ``--resume`` continues, which may have one
    (started before this check), and must be given the same."""
    for opt, words in given:
        if opt.owners is not None and not any(opt.given_to(a) for a in algos) \
                and words[0] not in recorded:
            flag = words[0] if opt.on_off else opt.flag
            which = "any of " if len(algos) > 1 else ""
            raise UsageError(f"{flag} is an option of "
                             f"{', '.join(map(registry.display_name, opt.owners))}, not of "
                             f"{which}--algos {text}")


def _algos_missing(args: argparse.Namespace) -> str:
    """The line refusing a compare without --algos: with --resume of a recorded comparison
    (whose stop said "continue with --resume"), the command that continues it, since a resume
    takes the same --algos and options and reads none of them from the record."""
    out = getattr(args, "out", None)
    if args.resume and out is not None and (Path(out) / reading.RECORD).is_file():
        try:
            old = reading.read_record(out)
        except UsageError:  # a damaged record: the plain refusal below
            old = None
        if old is not None:
            references = old.get("references") or {}
            algos = ",".join(references.get(a, a) for a in old["algos"])
            words = ["hpctrain", "bench", "compare", "--algos", algos]
            if old.get("simulated"):
                words += ["--simulate", str(old["workers"]), *(old.get("sim_args") or [])]
            elif old["workers"] is not None:
                words += ["--workers", str(old["workers"])]
            if old.get("seeds"):
                words += ["--seeds", ",".join(map(str, old["seeds"]))]
            if old.get("targets"):  # a record from before targets were kept lacks them
                words += ["--targets", ",".join(f"{t:g}" for t in old["targets"])]
            words += [*old["train_args"], "--resume", "--out", str(out)]
            return (f"--resume needs the comparison's --algos and options again (it checks "
                    f"them against {Path(out) / reading.RECORD}): {shlex.join(words)}")
    return f"--algos is required: the algorithms to compare ({registry.choices()})"


def _recorded_words(args: argparse.Namespace) -> list[str]:
    """The training options of the comparison ``--resume`` continues; none to read: []."""
    if not args.resume or not (Path(args.out) / reading.RECORD).exists():
        return []
    try:
        return list(reading.read_record(args.out)["train_args"])
    except UsageError:  # refused, naming the file, where the record is read for the resume
        return []


@dataclass(frozen=True)
class _Shared:
    """What every run :func:`plan` builds shares: compare's arguments, the training options
    given (:func:`given_options`), ``train``'s parser and the simulator's options."""

    args: argparse.Namespace
    given: list[tuple[TrainOption, list[str]]]
    train_parser: argparse.ArgumentParser
    sim_words: list[str]

    @property
    def simulate(self) -> bool:
        return self.args.simulate is not None


def _planned(shared: _Shared, algo: str, seed: int | None, checked: Run | None) -> Run:
    """One run of :func:`plan`, checked as it will run; ``checked``: the same algorithm's run
    of another seed, whose launch checks hold for this one (a seed changes none of them)."""
    args, given, simulate = shared.args, shared.given, shared.simulate
    np = 1 if algo in SEQUENTIAL else args.workers
    words = [w for opt, ws in given if opt.given_to(algo) for w in ws]
    if algo in SEQUENTIAL and "--eval-rank" in words and not simulate:
        np, words = 2, _evaluator_for_one(words)
    if seed is not None:
        words = [*words, "--seed", str(seed)]
    train_args = ["--algo", algo, *words, "--out",
                  str(Path(args.out) / reading.run_name(registry.display_name(algo), seed))]
    typed = shared.train_parser.parse_args(train_args)
    config = arguments.build(typed)  # bad values here
    ignored = [opt.flag for opt, _ in given if not opt.given_to(algo)]
    if checked is None and not simulate and np > 1:  # each run refuses it, once launched
        n = data.size(config.data.dataset, "train", config.data.data_dir)
        if np > n:
            raise UsageError(f"--workers {shown(np)} but only {n} training samples in "
                             f"{config.data.dataset}")
    if simulate:
        sim_args = ["--workers", str(np), *shared.sim_words]
        if checked is None:  # what the simulator refuses, up front too (with the train
            # options typed: those it does not use are refused when typed)
            both = argparse.Namespace(**{**vars(typed), **vars(_sim_parser().parse_args(sim_args))})
            sim = sim_arguments.build(both)  # --step-time and the like: every run's alike
            try:
                check_simulation(config, sim)
            except UsageError as e:
                raise UsageError(f"{algo}'s run on {np} virtual worker{'s' if np > 1 else ''}: "
                                 f"{e}") from None
        command_words = ("simulate", *train_args, *sim_args)
        return Run(algo, np, [sys.executable, "-m", "hpctrain.cli", *command_words], ignored,
                   seed=seed, words=command_words, config=config)
    launcher = launcher_command(getattr(args, "launcher", None), np)
    if shutil.which(launcher[0]) is None:
        raise UsageError(f"launcher {launcher[0]!r} not found (--launcher, "
                         "$HPCTRAIN_LAUNCHER or $HPCTRAIN_MPIRUN)")
    if checked is not None:
        trainers = checked.trainers
    else:
        try:  # what the run would refuse once launched, after the runs before it
            trainers = check_run(config, np, launches_here(launcher))
        except UsageError as e:
            raise UsageError(f"{algo}'s run on {np} process{'es' if np > 1 else ''}: {e}") \
                from None
    command_words = ("train", *train_args)
    return Run(algo, np, [*launcher, sys.executable, "-m", "hpctrain", *command_words], ignored,
               trainers, seed, command_words, config)


def orders_note(runs: list[Run]) -> str | None:
    """The line saying which of the planned runs' seeds share data orders
    (:func:`hpctrain.bench.report.remarks.shared_orders_note`), which report.md repeats; None where
    none do or the runs have no ``--seeds``."""
    seeds = [r.seed for r in runs if r.seed is not None]
    for config in dict.fromkeys((r.config.optim.epochs, r.config.data.shuffle) for r in runs
                                if r.config is not None):
        if seeds and (note := remarks.shared_orders_note(seeds, *config)):
            return note
    return None
