"""``bench compare``'s options: its own, and the training and simulator options it passes on.

The training options are ``hpctrain train``'s, declared once (:mod:`hpctrain.arguments`), and
kept as the words the user typed (each run's own parser checks them); each is a
:class:`TrainOption` that knows which algorithms take it. The command's help (its
``DESCRIPTION``, and ``--seeds``' parsing) is here too: what a user types, before anything is
planned (:mod:`.planning`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from hpctrain import arguments, registry
from hpctrain.bench import at_most
from hpctrain.config import RunConfig
from hpctrain.errors import Parser
from hpctrain.options import HUGE, at_least, whole
from hpctrain.sim import arguments as sim_arguments

DESCRIPTION = (
    "Time to accuracy of whole training runs, each algorithm against the others (list sgd "
    "in --algos for the sequential baseline on one process). Runs every --algos algorithm "
    "as its own MPI job on --workers processes with the same data, model, seed and options, "
    "then writes report.md "
    "(final and best test accuracy, wall time, time to each --targets accuracy, samples/s, "
    "staleness, bytes communicated) and PNG plots of test error against wall time and epochs; "
    "exits 1 if any run failed.")
WORKERS = 4  # processes per run unless --workers says
# Training options that name one run (compare sets them per run), and never pass on as given.
_PER_RUN = ("--algo", "--out", "--resume", "--checkpoint-dir")


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


def simulator_words(args: argparse.Namespace) -> list[str]:
    """The simulator's options the user gave, as the words that pass them on."""
    return [w for opt in args.sim_options if hasattr(args, opt.dest)
            for w in (opt.flag, getattr(args, opt.dest))]
