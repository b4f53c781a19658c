"""``hpctrain bench compare``: the same training under several algorithms, one job each.

Each algorithm runs as its own job through a launcher (``mpirun``, or ``srun`` inside a Slurm
allocation) with the same training options and seed, hence the same initial model and data
order where the algorithm allows; ``sgd`` runs on one process. Options that only some
algorithms take (``--tau``, ``--lam``, ...) go only to those, and the report says which
ignored them (one that no algorithm of ``--algos`` takes is refused); the others
(``--slowdown`` too) go to every run. Bad options, an algorithm this hpctrain does not have
included, are refused before anything runs (one line, exit status 2), and so are a run's
folder that is a file or holds another algorithm's run (or, without ``--resume``, an
unfinished run's checkpoints), and what one run would refuse on its
processes (``hpctrain train``'s own checks, on each planned run: ``--slowdown`` of a rank it
lacks, ``--reduce-op adasum`` on 3 workers, ``--device cuda`` without a GPU where the runs
start on this machine; the line names the run). With ``--eval-rank``,
sgd's run gets a second process, its evaluating rank. A run that fails becomes a row saying why; the
others still run, and the command then exits with status 1 after a line naming the failed
algorithms. With ``--simulate K`` every run is ``hpctrain simulate --workers K`` instead (one
process each, no launcher, virtual times; the simulator's options pass on to every run).
``DIR/<algo>/`` gets each run's outputs plus its
``stdout.log`` and ``stderr.log``; ``DIR/compare.json`` records what ran and how it ended, and
:mod:`hpctrain.bench.report` renders ``report.md`` and the plots from those files as each
run ends (the runs to come: *not run*). SIGUSR1 (a
time limit's warning) goes on to the run going on, no run starts after it, and the command
exits with status 5: ``--resume`` continues (``slurm/compare.sbatch`` requeues itself).
Ctrl-C and SIGTERM end the run going on with the comparison. Either way the report then shows
the run it stopped *unfinished*, and a line names the runs left.
With ``--seeds 1,2,3`` every algorithm runs once per seed (``DIR/<algo>/seed-<S>/``, one run
after the other) and the report gives the mean and spread over the seeds; seeds closer than
the epochs share data orders (global shuffling), which a line at the start and the report say.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TextIO

from hpctrain import (
    arguments,
    checkpoint,
    data,
    launch_checks,
    launch_env,
    live,
    mpirun,
    plugins,
    provenance,
    registry,
    run_folders,
    steptimes,
)
from hpctrain.bench import at_most
from hpctrain.bench.report import plotting, reading, remarks, rendering, tables
from hpctrain.config import RunConfig
from hpctrain.errors import Parser, UsageError
from hpctrain.metrics import read_json, read_points, redraws, write_json_atomic
from hpctrain.options import HUGE, at_least, command_line, shown, whole
from hpctrain.sim import arguments as sim_arguments
from hpctrain.sim.simulate import check_options as check_simulation
from hpctrain.summary import own_byte_fields
from hpctrain.summary import read as read_summary

DESCRIPTION = (
    "Time to accuracy of whole training runs, each algorithm against the others (list sgd "
    "in --algos for the sequential baseline on one process). Runs every --algos algorithm "
    "as its own MPI job on --workers processes with the same data, model, seed and options, "
    "then writes report.md "
    "(final and best test accuracy, wall time, time to each --targets accuracy, samples/s, "
    "staleness, bytes communicated) and PNG plots of test error against wall time and epochs; "
    "exits 1 if any run failed.")
WORKERS = 4  # processes per run unless --workers says
THREAD_LEVEL = None  # a launcher of MPI jobs: it never initialises MPI itself

SEQUENTIAL = ("sgd",)  # algorithms that train on one process whatever --workers says
# Training options that name one run (compare sets them per run), and never pass on as given.
_PER_RUN = ("--algo", "--out", "--resume", "--checkpoint-dir")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")  # algorithm names become folder names
_PROGRESS_EVERY_S = 30.0  # progress lines when stderr is not a terminal
LOGS = ("stdout.log", reading.LOG)  # a run's output, appended in its folder (open_log)
_MPI_LAUNCHERS = frozenset({"mpirun", "mpiexec", "mpiexec.hydra", "orterun", "prterun"})
# Their options that place ranks on other machines (Open MPI's, then Hydra's: MPICH, Intel).
_HOST_OPTIONS = frozenset({"-H", "--host", "-host", "--hostfile", "-hostfile", "--machinefile",
                           "-machinefile", "--default-hostfile", "-hosts", "-f", "-machine"})


@dataclass(frozen=True)
class TrainOption:
    """A training option compare passes on: its flag, and which algorithms take it."""

    flag: str
    dest: str
    takes_value: bool
    owners: tuple[str, ...] | None  # None: every algorithm
    on_off: tuple[str, str] | None = None  # an on/off option's flags for True and for False

    def given_to(self, algo: str) -> bool:
        """Whether ``algo`` takes it: by class, as ``./mine.py:Mine``, its absolute path and
        ``mine:Mine`` are one algorithm (owners are named by the reference each class was
        first loaded by)."""
        if self.owners is None or algo in self.owners:
            return True
        known, cls = registry.known(), registry.get(algo)
        return any(known.get(owner) is cls for owner in self.owners)


def _train_parser() -> argparse.ArgumentParser:
    """``hpctrain train``'s options alone: compare checks each run's words with it."""
    parser = Parser(prog="hpctrain train", add_help=False)
    arguments.add_arguments(parser)
    return parser


def _sim_parser() -> argparse.ArgumentParser:
    """``hpctrain simulate``'s own options alone: compare checks them up front."""
    parser = Parser(prog="hpctrain simulate", add_help=False)
    sim_arguments.add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mine = [
        # Not required=True: a --resume without it says which command to repeat (plan).
        parser.add_argument("--algos", default=argparse.SUPPRESS,
                            help="comma-separated algorithms, e.g. sgd,ssgd,asgd,dcasgd-c,"
                                 "dcasgd-a,ma,ec (this hpctrain has: "
                                 f"{registry.choices()}); required, with --resume too "
                                 "(which repeats the comparison's command: given none, it "
                                 "prints that command)"),
        parser.add_argument("--workers", type=at_least(1), default=None,
                            help=f"processes per run (default {WORKERS}; sgd trains on one); "
                                 "with --eval-rank one of them only evaluates (sgd's run: "
                                 "two, one training, one evaluating)"),
        parser.add_argument("--targets", default="0.8,0.85",
                            help="test accuracies whose time to reach the report gives"),
        parser.add_argument("--launcher", default=argparse.SUPPRESS,
                            help="command starting the processes of a run, with {np} for their "
                                 "number, e.g. 'mpirun -np {np}' or 'srun --mpi=pmix -n {np}'; "
                                 "default: $HPCTRAIN_LAUNCHER, else srun inside a Slurm "
                                 "allocation, else $HPCTRAIN_MPIRUN -np {np}, else mpirun (Open "
                                 "MPI's: with --bind-to none, and --allow-run-as-root and "
                                 "--oversubscribe only where needed)"),
        parser.add_argument("--timeout", type=at_most(at_least(0, float), HUGE), default=0.0,
                            help="seconds after which a run is stopped and reported failed, "
                                 "counted from its launch: the launcher's and Python's "
                                 "start-up, loading the data, training, scoring the snapshots "
                                 "and writing the outputs all count; a run stopped once it had "
                                 "written its summary.json (its last output) is kept as "
                                 "finished (0: none)"),
        parser.add_argument("--resume", action="store_true",
                            help="finish a comparison already in --out: keep its finished runs, "
                                 "continue those that left checkpoints, run the others"),
        parser.add_argument("--out", required=True, default=argparse.SUPPRESS,
                            help="output folder (DIR)"),
        parser.add_argument("--seeds", type=parse_seeds, default=None, metavar="LIST",
                            help="comma-separated seeds, e.g. 1,2,3: every algorithm runs once "
                                 "per seed (DIR/<algo>/seed-<S>/) and the report gives the mean "
                                 "and spread over them (with --shuffle global, seeds closer "
                                 "than --epochs share data orders, which it says); instead "
                                 "of --seed"),
        parser.add_argument("--simulate", type=at_least(1), default=None, metavar="K",
                            help="simulate every run with K virtual workers in one process "
                                 "(hpctrain simulate; sgd: one) instead of launching jobs; "
                                 "--workers and --launcher are then refused"),
    ]
    skip = {*_PER_RUN, *(flag for action in mine for flag in action.option_strings)}
    options: list[TrainOption] = []
    shared = parser.add_argument_group("training options, given to every run")
    groups: dict[tuple[str, ...], argparse._ArgumentGroup] = {}
    for d in arguments.shared_options() + arguments.algorithm_options():
        if d.flag in skip:
            continue
        if d.owners is None:
            group = shared
        else:
            who = "it" if len(d.owners) == 1 else "them"
            group = groups.setdefault(d.owners, parser.add_argument_group(
                f"options of {', '.join(map(registry.display_name, d.owners))} (given only "
                f"to {who})"))
        # Values stay the words the user typed: each run's own parser checks them.
        action = arguments.add_option(group, d, dest="train_" + d.dest, typed=False)
        options.append(TrainOption(d.flag, action.dest, d.takes_value, d.owners,
                                   None if d.takes_value else arguments.on_off_flags(d)))
    sim = [TrainOption(a.option_strings[0], a.dest, True, None)
           for a in sim_arguments.add_arguments(parser, dest_prefix="simopt_", typed=False,
                                                exclude=("--workers",))]
    parser.set_defaults(train_options=options, sim_options=sim)


def parse_seeds(text: str) -> list[int]:
    """``--seeds "1,2,3"`` -> [1, 2, 3]: whole numbers, each once (each run's ``--seed``
    checks its range); an empty entry (``1,,2``, ``1,``) is refused."""
    words = str(text).split(",")
    if any(w.strip() for w in words) and not all(w.strip() for w in words):
        raise argparse.ArgumentTypeError(f"{text!r}: an empty entry; want comma-separated "
                                         "whole numbers, e.g. 1,2,3")
    try:
        seeds = [whole(w) for w in words]  # 1e3 as --seed reads it
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: want comma-separated whole numbers, "
                                         "e.g. 1,2,3") from None
    if len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: a seed given twice")
    bounds = next(f for f in fields(RunConfig) if f.name == "seed").metadata["range"]
    for seed in seeds:  # as each run's --seed would refuse it, but naming --seeds' entry
        if problem := bounds.problem(seed):
            raise argparse.ArgumentTypeError(f"{text!r}: seed {seed} {problem}")
    return seeds


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


def given_options(args: argparse.Namespace) -> list[tuple[TrainOption, list[str]]]:
    """The training options the user gave, each with the words that pass it on."""
    given = []
    for opt in args.train_options:
        if not hasattr(args, opt.dest):
            continue
        value = getattr(args, opt.dest)
        if opt.on_off:
            words = [opt.on_off[0] if value else opt.on_off[1]]
        elif isinstance(value, list):
            words = [opt.flag, *value]
        else:
            words = [opt.flag, value]
        given.append((opt, words))
    return given


def _cores() -> int:
    """Physical cores this process may use (Open MPI's default number of slots)."""
    cpus = os.sched_getaffinity(0)
    topo = Path("/sys/devices/system/cpu")
    try:
        return len({((topo / f"cpu{c}/topology/physical_package_id").read_text(),
                     (topo / f"cpu{c}/topology/core_id").read_text()) for c in cpus})
    except OSError:
        return len(cpus)


def default_launcher(np: int) -> str:
    """The launcher template used when ``--launcher`` is not given."""
    if os.environ.get("HPCTRAIN_LAUNCHER"):
        return os.environ["HPCTRAIN_LAUNCHER"]
    if os.environ.get("SLURM_JOB_ID"):
        # srun no longer takes the job's --cpus-per-task by itself (Slurm >= 22.05)
        cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
        return ("srun --mpi=pmix --kill-on-bad-exit=1 --ntasks={np}"
                + (f" --cpus-per-task={cpus}" if cpus.isdigit() else ""))
    if os.environ.get("HPCTRAIN_MPIRUN"):
        return os.environ["HPCTRAIN_MPIRUN"] + " -np {np}"
    return " ".join(["mpirun", *mpirun.local_flags(mpirun.flavour_of(), np, _cores()),
                     "-np", "{np}"])


def launcher_command(template: str | None, np: int) -> list[str]:
    """The words that start ``np`` processes, from ``template`` (or the default). An mpirun
    that is a script (Intel MPI's) gives way to the Hydra binary it runs
    (:func:`hpctrain.mpirun.passing_signals`): SIGUSR1 and SIGTERM sent to the run reach its
    ranks, where the script died of them and left the ranks running."""
    if template is not None and not template.strip():  # not the default in disguise
        raise UsageError(f"--launcher {template!r} is empty: give a command with {{np}}, or "
                         "leave --launcher out for the default")
    template = template or default_launcher(np)
    if "{np}" not in template:
        raise UsageError(f"--launcher {template!r}: no {{np}} where the process count goes")
    try:
        words = shlex.split(template.replace("{np}", str(np)))
    except ValueError as e:  # an unclosed quote
        raise UsageError(f"--launcher {template!r}: {e}") from None
    return [mpirun.passing_signals(words[0]), *words[1:]]  # {np} makes one word at least


def launches_here(launcher: list[str]) -> bool:
    """Whether ``launcher`` (its words) starts a run's processes on this machine, so that
    this machine's devices are the runs': ``mpirun`` or ``mpiexec`` naming no hosts, outside
    a Slurm allocation (whose nodes Open MPI's mpirun uses). ``srun``, a hostfile or a command
    of the user's own may start them on nodes with devices this one (a login node) lacks."""
    if os.environ.get("SLURM_JOB_ID"):
        return False
    if Path(launcher[0]).name not in _MPI_LAUNCHERS:
        return False
    return not any(w.split("=", 1)[0] in _HOST_OPTIONS for w in launcher[1:])


def simulator_words(args: argparse.Namespace) -> list[str]:
    """The simulator's options the user gave, as the words that pass them on."""
    return [w for opt in args.sim_options if hasattr(args, opt.dest)
            for w in (opt.flag, getattr(args, opt.dest))]


def replayed_sha256(sim_words: list[str]) -> str | None:
    """The sha256 of the step_times.json a simulated comparison replays (``--step-time
    replay:RUN``), so that a resume replays the same times; None without a replay."""
    given = dict(zip(sim_words[::2], sim_words[1::2], strict=True))
    kind, _, run = str(given.get("--step-time", "")).partition(":")
    if kind != "replay":
        return None
    return provenance.sha256_of(steptimes.file_of(run))


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
    args.out = plugins.home_expanded(args.out, "--out")
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


def _check_run_folders(out: Path, runs: list[Run], resume: bool) -> None:
    """Each run's folder (``<out>/<algo>``, with ``--seeds`` ``<out>/<algo>/seed-<S>``) must
    be one that run can make or write in, and not another algorithm's run or a comparison,
    nor, without ``--resume``, an unfinished run's: found when the run started, after the
    runs before it had run, a file there was a FileExistsError (exit 1), another run's files
    were written over, and checkpoints got ``train``'s advice, not compare's. Checked after
    :func:`_start_record`'s own checks (finished runs; a resume's other algorithm of one
    name); a failed run's folder that holds a summary is set aside on ``--resume``."""
    for r in runs:
        folder, whose = out / r.name, f"{r.label}'s run" + (
            f" of seed {r.seed}" if r.seed is not None else "")
        try:
            run_folders.check_folder("--out", str(folder))
        except UsageError as e:
            raise UsageError(f"{whose}: {e}; choose another --out") from None
        for log in LOGS:  # as open_log refuses them, before any run starts
            with contextlib.suppress(OSError):  # none yet
                run_folders.refuse_unlike_file(f"{whose}: its log", folder / log,
                                               os.lstat(folder / log).st_mode)
        if (folder / reading.RECORD).exists():
            raise UsageError(f"{whose}: --out {folder} holds a bench compare; choose another "
                             "--out")
        recorded = steptimes.recorded_algo(folder / "config.json")  # None: the run says
        if recorded is not None and plugins.absolute(recorded) != plugins.absolute(r.algo):
            raise UsageError(f"{whose}: --out {folder} holds a run of --algo {recorded} "
                             f"(its config.json), not {r.algo}; choose another --out")
        if (folder / "summary.json").exists():  # finished, or set aside on --resume
            continue
        saved = folder / checkpoint.SUBDIR
        usable = checkpoint.listing(saved)
        if usable and not resume:
            raise UsageError(f"{whose}: --out {folder} holds the checkpoints of an unfinished "
                             f"run; continue the comparison with bench compare --resume (--out "
                             f"{out}), or choose another --out")
        if not usable and (aside := checkpoint.corrupt(saved)):  # the run would refuse them,
            # --resume or not
            raise UsageError(f"{whose}: --out {folder} holds an unfinished run's checkpoints, "
                             f"only unusable ones ({aside[0].name}, ...): remove them (or "
                             f"{folder}) to run it again, or choose another --out")


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


def continued(run: Run, run_dir: Path) -> Run:
    """``run`` resuming from the checkpoints an earlier attempt left in ``run_dir``, if any."""
    if not checkpoint.listing(run_dir / checkpoint.SUBDIR):
        return run
    return replace(run, command=[*run.command, "--resume", str(run_dir)])


def last_error(lines: list[str], returncode: int) -> str:
    """The line of a failed run's stderr that best says why it failed."""
    for pattern in (r"hpctrain: error.*", r"\b[\w.]*(?:Error|Exception|Interrupt)\b:?.*"):
        for line in reversed(lines):
            m = re.search(pattern, line)
            if m:
                # mpirun may glue its abort banner's rule (dashes) onto the rank's last line.
                return re.sub(r"-{10,}.*", "", m.group(0)).strip()
    words = [line.strip() for line in lines if re.search(r"[A-Za-z]{2}", line)]
    return words[-1] if words else f"exit status {returncode}"


class _Display:
    """Shows a run's progress bar updates on one line under a label, and its other lines."""

    def __init__(self, label: str, stream=None):
        self.label, self.stream = label, stream or sys.stderr
        self.tty = redraws(self.stream)  # else a line each _PROGRESS_EVERY_S
        self.shown = 0.0

    def progress(self, text: str) -> None:
        if self.tty:
            self.stream.write(f"\r\x1b[K{self.label} {text}")
        elif time.monotonic() - self.shown >= _PROGRESS_EVERY_S:
            self.stream.write(f"{self.label} {text}\n")
        else:
            return
        self.shown = time.monotonic()
        self.stream.flush()

    def line(self, text: str) -> None:
        self.stream.write(("\r\x1b[K" if self.tty else "") + f"{self.label} {text}\n")
        self.stream.flush()


class _Warning:
    """SIGUSR1 while comparing (a time limit's warning, :mod:`hpctrain.checkpoint.stop`):
    passed on to the run going on, which stops after a checkpoint if it has
    --checkpoint-every (else it runs on to its end); no run starts after it."""

    def __init__(self) -> None:
        self.child, self.passed = None, False  # passed: the signal reached self.child
        early = checkpoint.stop.installed()  # the entry point has recorded it since start-up
        self._previous = signal.signal(checkpoint.stop.SIGNAL, self._on)
        self.received = early and checkpoint.stop.received()

    def _on(self, signum, frame) -> None:
        self.received = True
        self._pass_on()

    def started(self, child) -> None:
        """``child`` runs now: the signal reaches it, also one that came while it started."""
        self.child, self.passed = child, False
        if self.received:
            self._pass_on()

    def _pass_on(self) -> None:
        if self.child is not None and not self.passed and self.child.poll() is None:
            self.passed = True
            self.child.send_signal(checkpoint.stop.SIGNAL)  # mpirun, srun forward it

    def close(self) -> None:
        signal.signal(checkpoint.stop.SIGNAL, self._previous)


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    proc.terminate()  # mpirun and srun pass it on to the ranks
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()


# A job ends with its compare even when the compare is killed outright (SIGKILL, the OOM
# killer), not only on SIGTERM or Ctrl-C (execute's cleanup): left running, a resumed compare
# started that run again beside it. On Linux the child asks for SIGTERM at its parent's death
# (prctl PR_SET_PDEATHSIG, kept across exec) and then becomes the launcher, which passes it on.
_WITH_PARENT = """\
import ctypes, os, signal, sys
if ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0) == 0 and os.getppid() != int(sys.argv[1]):
    sys.exit(143)  # the compare died before the signal was asked for
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as e:
    sys.exit(f"hpctrain bench compare: cannot run {sys.argv[2]}: {e.strerror}")
"""


def tied(command: list[str]) -> list[str]:
    """``command``, sent SIGTERM when this process dies (Linux; elsewhere as given)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _WITH_PARENT, str(os.getpid()), *command]


def execute(run: Run, run_dir: Path, label: str, timeout: float,
            warning: _Warning | None = None) -> dict:
    """Run one job, showing its progress; return its record (status, error, returncode...).
    ``warning``: SIGUSR1 reaches the job while it runs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    display = _Display(label)
    what = "virtual worker" + ("s" if run.np > 1 else "") if "simulate" in run.command \
        else "process" + ("es" if run.np > 1 else "")
    display.line(f"{run.np} {what}: {shlex.join(run.command)}")
    lines: deque[str] = deque(maxlen=500)
    start = time.monotonic()
    # Appended: a run continued by --resume keeps the earlier attempt's logs (why it stopped).
    with _naming(run_dir / LOGS[1]), open(open_log(run_dir / LOGS[0]), "ab") as out, \
            open(open_log(run_dir / LOGS[1]), "a") as log:
        if log.tell():
            log.write(f"{reading.CONTINUED}{time.strftime('%Y-%m-%d %H:%M:%S')}) ---\n")
        proc = subprocess.Popen(tied(run.command), stdout=out, stderr=subprocess.PIPE, env=env)
        stderr = proc.stderr
        assert isinstance(stderr, io.BufferedReader)  # a pipe, binary and buffered (Popen's)
        if warning is not None:
            warning.started(proc)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _stop(proc)

        timer = threading.Timer(timeout, expire) if timeout else None
        if timer:
            timer.start()
        try:
            _relay_stderr(stderr, log, display, lines)
            returncode = proc.wait()
        finally:
            if warning is not None:
                warning.child = None
            if timer:
                timer.cancel()
            if proc.poll() is None:
                _stop(proc)
            stderr.close()  # else a ResourceWarning per run
    seconds = time.monotonic() - start
    record = {"np": run.np, "command": shlex.join(run.command), "ignored": run.ignored,
              "returncode": returncode, "seconds": round(seconds, 1)}
    return {**record, **_verdict(run, run_dir, returncode, list(lines),
                                 timeout if expired.is_set() else None)}


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError that names no file, raised inside, given ``path``'s name: the log's write and
    close (a full disk) say only "No space left on device"."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def open_log(path: Path) -> int:
    """``path`` opened to append a run's output to (made if missing), never through a symbolic
    link (:func:`run_folders.open_regular`): one another user planted in a shared ``--out``
    had the output appended to a file of their choosing. UsageError naming it if it is a
    link, not a regular file, or cannot be opened."""
    try:
        return run_folders.open_regular("bench compare: the log", path,
                                        os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except OSError as e:
        raise UsageError(f"bench compare: cannot open the log {path} ({e.strerror})") from None


def _relay_stderr(stderr: io.BufferedReader, log: TextIO, display: _Display,
                  lines: deque[str]) -> None:
    """Pass a run's ``stderr`` on as it comes until it ends: each line to the run's ``log``,
    the ``display`` and ``lines`` (the last ones name why a failed run failed), and each
    update of a progress bar (ended by a lone carriage return) to the display only."""
    def emit(text: str) -> None:
        lines.append(text)
        log.write(text + "\n")
        display.line(text)

    pending = b""
    while chunk := stderr.read1(65536):
        buf = pending + chunk
        held = buf.endswith(b"\r")  # a "\r\n" may be cut between two reads
        # Lines end with "\n" ("\r\n" too); a lone "\r" ends a progress bar's update.
        *pieces, pending = re.split(rb"(?<=\n)|(?<=\r)(?!\n)", buf[:-1] if held else buf)
        pending += b"\r" if held else b""
        for piece in pieces:
            text = piece.decode(errors="replace").rstrip()
            if piece.endswith(b"\n"):
                emit(text)
            elif text.strip():
                display.progress(text.strip())
    if last := pending.decode(errors="replace").strip():  # no newline at the end
        emit(last)


def _verdict(run: Run, run_dir: Path, returncode: int, lines: list[str],
             timed_out: float | None) -> dict:
    """How a run that ended with ``returncode`` went, from that and what it left in
    ``run_dir``: its ``status``, ``error`` and, where the timeout (``timed_out``, else None)
    stopped it after it wrote its outputs, a ``note``. Its row fails, not the comparison."""
    if timed_out is not None:
        # Rank 0 writes summary.json last: a run stopped after it (in MPI's teardown) has
        # all its outputs, and was a failed row (its start-up counts towards the timeout).
        if finished_unrecorded(run, run_dir) is not None:
            return {"status": "ok", "error": None,
                    "note": f"the {timed_out:g} s timeout stopped it after it wrote its outputs"}
        return {"status": "failed", "error": f"stopped after the {timed_out:g} s timeout"}
    try:
        summary = read_summary(run_dir) if (run_dir / "summary.json").is_file() else None
    except UsageError as e:  # this run's row fails, not the comparison
        return {"status": "failed", "error": str(e)}
    stopped = summary is not None and summary.get("stopped_on_collapse")
    if returncode != 0 and not stopped:  # a collapse-stopped run is a row (marked), not a failure
        return {"status": "failed", "error": last_error(lines, returncode)}
    if summary is None:
        return {"status": "failed", "error": "exited 0 without writing summary.json"}
    problem = launch_problem(run, summary)
    if problem:
        return {"status": "failed", "error": problem}
    return {"status": "ok", "error": None}


def launch_problem(run: Run, summary: dict) -> str | None:
    """Why a finished ``run`` did not train as one job of ``run.np`` processes (its
    ``summary.json``'s ``workers``: the ranks that trained, without ``--eval-rank``'s and
    the ``--servers``), or None."""
    workers = summary["workers"]
    trainers = run.np if run.trainers is None else run.trainers
    if workers == trainers:
        return None
    of = f" of {run.np} processes" if trainers != run.np else ""
    return (f"{workers} rank(s) trained, not {trainers}{of}: the launcher started separate "
            "jobs (inside Slurm try --launcher 'srun --mpi=pmix -n {np}' or 'mpirun -np {np}')")


def _start_record(args: argparse.Namespace, runs: list[Run]) -> dict:
    out = Path(args.out)
    train_args = [w for _, ws in given_options(args) for w in ws]
    path = out / reading.RECORD
    simulated = args.simulate is not None
    sim_args = simulator_words(args)
    seeds = getattr(args, "seeds", None)
    sha = replayed_sha256(sim_args) if simulated else None
    record = {"algos": list(dict.fromkeys(r.label for r in runs)), "workers": args.workers,
              "targets": rendering.parse_targets(args.targets), "train_args": train_args,
              "simulated": simulated, "sim_args": sim_args, "runs": {},
              **({"step_times_sha256": sha} if sha else {}),
              **({"seeds": seeds} if seeds else {}), **_own_algorithms(runs)}
    if path.exists():
        if not args.resume:
            raise UsageError(f"--out {out} already holds a comparison; pass --resume to finish "
                             "it, or choose another folder")
        old = reading.read_record(out)
        if sorted(old["algos"]) != sorted(record["algos"]):  # the report would lose rows
            raise UsageError(f"--resume: {out} was run with --algos {','.join(old['algos'])}, "
                             f"not {','.join(record['algos'])}; give the same")
        if (old["train_args"], old["workers"]) != (train_args, args.workers):
            flag = "--simulate" if old.get("simulated") else "--workers"
            raise UsageError(f"--resume: {out} was run with {flag} {old['workers']} and "
                             f"options {shlex.join(old['train_args']) or '(none)'}; give the same")
        # Simulated and real runs, or simulations of other networks, are not one comparison.
        # (A record from before "sim_args" was kept says nothing of them.)
        old_simulated = old.get("simulated", False)
        old_sim_args = old.get("sim_args", sim_args if old_simulated == simulated else None)
        if (old_simulated, old_sim_args) != (simulated, sim_args):
            was = (f"--simulate {old['workers']} " + shlex.join(old_sim_args or [])).strip() \
                if old_simulated else "real jobs (no --simulate)"
            raise UsageError(f"--resume: {out} was run with {was}; give the same")
        for label, reference in old.get("references", {}).items():
            if record["references"].get(label, reference) != reference:
                raise UsageError(f"--resume: {out}'s {label} runs are --algo {reference}, not "
                                 f"{record['references'][label]}; give the same")
        if old.get("step_times_sha256", sha) != sha:
            raise UsageError(f"--resume: the step times {out}'s runs replayed have changed "
                             f"since (now sha256 {sha}, recorded {old['step_times_sha256']}); "
                             "its runs would replay other times")
        if old.get("seeds") != seeds:
            was = "--seeds " + ",".join(map(str, old["seeds"])) if old.get("seeds") else \
                "no --seeds"
            raise UsageError(f"--resume: {out} was run with {was}; give the same")
        record["runs"] = {a: r for a, r in old["runs"].items()
                          if r["status"] == "ok" and (out / a / "summary.json").is_file()}
        for r in runs:  # stopped as it ended: finished, but not yet recorded
            if r.name not in old["runs"] and (found := finished_unrecorded(r, out / r.name)):
                record["runs"][r.name] = found
    else:
        done = [r.name for r in runs if (out / r.name / "summary.json").exists()]
        if done:
            raise UsageError(f"--out {out} already holds finished runs ({', '.join(done)}); "
                             "choose another folder")
    _check_run_folders(out, runs, args.resume)
    return record


def finished_unrecorded(run: Run, run_dir: Path) -> dict | None:
    """The record of ``run`` where its folder holds it finished (its summary.json and curve),
    though the comparison stopped (SIGTERM, Ctrl-C, SIGKILL) before recording it, or
    ``--timeout`` stopped the run after it wrote them (:func:`execute`), else None.
    It must be that run: its config.json's command line (``run_info``'s ``argv``) is the run's
    command, on its ``--out`` (a continued attempt's ``--resume`` allowed), and its summary
    has the ranks it planned. ``--resume`` took such a run for a failed attempt, set it aside
    and trained it again."""
    try:
        summary = read_summary(run_dir)
        read_points(run_dir)
        config = read_json(run_dir / "config.json", "a run's configuration")
        argv, out = config["run_info"]["argv"][1:], config["out"]
    except (UsageError, KeyError, TypeError):
        return None
    resumed = argv[-2:] if argv[-2:-1] == ["--resume"] else []

    def elsewhere(words: list[str]) -> list[str]:  # --out as spelt: the folder is compared
        i = words.index("--out") if "--out" in words[:-1] else len(words)
        return words[:i] + words[i + 2:]

    if elsewhere(argv[:len(argv) - len(resumed)]) != elsewhere(list(run.words)) \
            or not isinstance(out, str) or Path(out).resolve() != run_dir.resolve() \
            or launch_problem(run, summary):
        return None
    return {"np": run.np, "command": shlex.join([*run.command, *resumed]),
            "ignored": run.ignored, "returncode": None, "seconds": None, "status": "ok",
            "error": None}


def _own_algorithms(runs: list[Run]) -> dict:
    """compare.json's record of the users' algorithms among ``runs``: the class each name
    stands for (``references``: a resume must run the same) and its summary fields in bytes
    (``byte_fields``: the report counts them without importing the user's code)."""
    own = {r.label: r.algo for r in runs if plugins.is_reference(r.algo)}
    return {"references": {name: plugins.absolute(algo) for name, algo in own.items()},
            "byte_fields": {name: own_byte_fields(registry.get(algo))
                            for name, algo in own.items()}}


def _set_aside(run_dir: Path, label: str) -> None:
    """Before a failed run starts again (``--resume``): a folder of it that holds a summary
    (a launch problem, a run not the one planned:
    :func:`finished_unrecorded` keeps the others) is moved to ``<name>.failed-N``, its logs
    kept, since ``hpctrain train`` refuses an ``--out`` that holds a finished run."""
    if not (run_dir / "summary.json").exists():
        return
    n = 1
    while (aside := run_dir.with_name(reading.set_aside_name(run_dir.name, n))).exists():
        n += 1
    run_dir.rename(aside)
    print(f"{label} the failed attempt's folder is kept as {aside}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    """Run the comparison ``args`` describe; write its record, report and plots; return the
    record, or exit with status 1 after a line naming the failed runs if any failed."""
    seat = launch_env.from_launcher()
    if seat is not None and seat.size > 1:  # copies racing for one --out
        raise UsageError(f"hpctrain bench compare starts each run's processes itself: run it "
                         f"as one process, not {seat.size} ({seat.source}), without mpirun, "
                         "srun or torchrun around it")
    runs = plan(args)
    out = Path(args.out)
    # A comparison going on there: "in use", before _start_record called its record one to
    # finish with --resume (which was then refused as in use).
    run_folders.refuse_held("--out", out, "comparison")
    record = _start_record(args, runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # nothing written yet
        raise UsageError(f"--out {out}: cannot make the folder ({e.strerror})") from None
    with contextlib.ExitStack() as held:
        # A second compare on the folder (--resume while this one runs) took the runs this
        # one was training for failed, and wrote its report over this one's record.
        run_folders.lock_folder(held, "--out", out, "comparison")
        return _compare(args, runs, out, record)


class _Terminated(SystemExit):
    """SIGTERM received: the compare ends with status 128 + 15, as the signal would end it."""


def _terminated(signum: int, frame) -> None:
    """SIGTERM (``kill``, a workflow manager) ends the compare as Ctrl-C does: the run going
    on is stopped with it (``execute``'s cleanup), not left training on its own."""
    raise _Terminated(128 + signum)


def _compare(args: argparse.Namespace, runs: list[Run], out: Path, record: dict) -> dict:
    """:func:`run`'s comparison, in the folder it holds."""
    write_json_atomic(out / reading.RECORD, record)  # --resume's new targets, though none runs
    if note := orders_note(runs):
        print(f"hpctrain bench compare: note: {note}", file=sys.stderr, flush=True)
    warning = _Warning()
    terminate = signal.signal(signal.SIGTERM, _terminated)
    ran = False  # a run started: the report changes
    try:
        for i, r in enumerate(runs, 1):
            label = f"[{i}/{len(runs)} {r.name}]"
            if r.name in record["runs"]:
                print(f"{label} finished earlier; kept", file=sys.stderr, flush=True)
                continue
            if warning.received:
                break
            if args.resume:
                _set_aside(out / r.name, label)
            ran = True
            result = execute(continued(r, out / r.name) if args.resume else r, out / r.name,
                             label, args.timeout, warning)
            if warning.received and result["status"] != "ok":  # stopped, or ended by it
                print(f"{label} stopped by SIGUSR1 (--resume continues it)", file=sys.stderr,
                      flush=True)
                break
            print(f"{label} {result['status']}" +
                  (f": {result['error']}" if result["error"] else "") +
                  (f" ({result['note']})" if result.get("note") else ""), file=sys.stderr,
                  flush=True)
            record["runs"][r.name] = result
            write_json_atomic(out / reading.RECORD, record)
            if any(later.name not in record["runs"] for later in runs):  # else: below
                _report_so_far(out)
    except (KeyboardInterrupt, _Terminated) as stop:
        # The report showed the run it stopped *not run*, as before it started, and nothing
        # said the comparison had stopped.
        _stopped("Ctrl-C" if isinstance(stop, KeyboardInterrupt) else "SIGTERM", ran, runs,
                 record, out)
        raise
    finally:
        warning.close()
        signal.signal(signal.SIGTERM, terminate)
    if any(r.name not in record["runs"] for r in runs):  # SIGUSR1 stopped the comparison
        _stopped("SIGUSR1", ran, runs, record, out)
        raise SystemExit(checkpoint.stop.EXIT_STATUS)
    failed = [r.name for r in runs if record["runs"][r.name]["status"] != "ok"]
    try:
        rows, targets, drawn = rendering.render(out)
    except BaseException:  # the report's own error follows; the failed runs are named first
        _say_failed(failed, len(runs), f"their records in {out / reading.RECORD}")
        raise
    print(tables.main_table(rows, targets))
    if line := remarks.notes_line(rows):
        print(f"hpctrain bench compare: {line}", file=sys.stderr, flush=True)
    print(f"hpctrain bench compare: {out / reading.REPORT}", flush=True)
    if not drawn:
        print(f"hpctrain bench compare: no plots: {plotting.NO_PLOTS}", file=sys.stderr,
              flush=True)
    if failed:
        _say_failed(failed, len(runs), f"their rows in {out / reading.REPORT}")
        raise SystemExit(1)
    return record


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


def _stopped(how: str, ran: bool, runs: list[Run], record: dict, out: Path) -> None:
    """The comparison stopped (``how``: SIGUSR1, SIGTERM, Ctrl-C) with runs left: its report
    (if a run started) shows the run it stopped *unfinished*, those after it *not run*, and
    one line says so."""
    if ran:
        _report_so_far(out)
    left = [r.name for r in runs if r.name not in record["runs"]]
    print(f"hpctrain bench compare: stopped by {how} " + (
        f"with {', '.join(left)} left to run; continue with --resume (--out {out})" if left
        else "after its last run"), file=sys.stderr, flush=True)


def _report_so_far(out: Path) -> None:
    """report.md and the plots of the runs that have ended, the others *not run*, for whoever
    watches a long comparison (``hpctrain report`` of it is refused while it holds the
    folder). A problem here is one line and the runs go on: the report after the last run
    says it in full, with the warnings this one keeps to itself (else once per run)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            rendering.render(out)
    except Exception as e:  # not the runs' problem: the report after the last run raises it
        print(f"hpctrain bench compare: report.md not updated: {e}", file=sys.stderr,
              flush=True)


def _say_failed(failed: list[str], total: int, where: str) -> None:
    if failed:
        print(f"hpctrain bench compare: {len(failed)} of {total} runs failed: "
              f"{', '.join(failed)} ({where} say why)", file=sys.stderr, flush=True)
