"""``hpctrain train | bench | report | info``: the command line.

Arguments are parsed and validated before MPI starts, so bad input is one line and a non-zero
exit on every rank, never a hang. MPI is then initialised at the thread level the algorithm
needs (see :mod:`hpctrain.comm`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType

from hpctrain import checkpoint, comm, data, models, options, shuffle, watchdog
from hpctrain.bench import report as bench_report
from hpctrain.errors import UsageError
from hpctrain.metrics import summary_table
from hpctrain.schedule import SCHEDULES
from hpctrain.stragglers import parse_slowdown

# Algorithm name -> module with THREAD_LEVEL, add_arguments, validate, run.
ALGORITHMS = {
    "sgd": "hpctrain.sync.train",
    "ssgd": "hpctrain.sync.train",
    "ma": "hpctrain.ec.train",
    "ec": "hpctrain.ec.train",
    "asgd": "hpctrain.async_.train",
    "dcasgd-c": "hpctrain.async_.train",
    "dcasgd-a": "hpctrain.async_.train",
}
# Shared option values an algorithm module may override with its own DEFAULTS dict.
TRAINING_DEFAULTS = {"lr": 0.05, "momentum": 0.9}
# Benchmark name -> module with DESCRIPTION, THREAD_LEVEL, add_arguments, run (and optionally
# validate(args), called before MPI starts).
BENCHMARKS: dict[str, str] = {
    "compare": "hpctrain.bench.compare",
    "allreduce": "hpctrain.bench.allreduce",
    "kernel": "hpctrain.bench.kernel",
    "store": "hpctrain.bench.store",
    "shuffle": "hpctrain.bench.shuffle",
}


class _HelpFormatter(argparse.HelpFormatter):
    """Adds an option's default to its help, unless empty or already said."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None
                or default is False or default == [] or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)  # printed as "hpctrain: error: <message>"


def _milestones(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None
    if any(v <= 0 for v in values) or values != sorted(values):
        raise argparse.ArgumentTypeError(f"{text!r}: milestones must be increasing epochs > 0")
    return values


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """The options every training algorithm shares (DESIGN.md's command-line contract)."""
    p.add_argument("--algo", required=True, help=f"one of: {', '.join(ALGORITHMS)}")
    p.add_argument("--dataset", default="fashion-mnist", help=f"one of: {', '.join(data.DATASETS)}")
    p.add_argument("--data-dir", default=None, help="folder with the data set's files")
    p.add_argument("--model", default="lenet", help=f"one of: {', '.join(models.MODELS)}")
    p.add_argument("--epochs", type=options.positive(int), default=5, help="passes over the data")
    p.add_argument("--batch-size", type=options.positive(int), default=64, help="per worker")
    p.add_argument("--lr", type=options.positive(float), default=None,
                   help="base learning rate (default 0.05; asgd, dcasgd-*: 0.1)")
    p.add_argument("--momentum", type=float, default=None,
                   help="SGD momentum (default 0.9; asgd, dcasgd-*: 0, the paper's algorithm)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 penalty")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default=None,
                   help="cosine decay to 0 over the run (default), step decay at "
                   "--lr-milestones (default when they are given), or constant")
    p.add_argument("--lr-milestones", type=_milestones, default=[],
                   help="epochs at which the learning rate is multiplied by --lr-gamma, e.g. 3,4")
    p.add_argument("--lr-gamma", type=options.positive(float), default=0.1,
                   help="step decay factor")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the model, the data order and injected stragglers")
    p.add_argument("--eval-every", type=options.positive(float), default=0.25,
                   help="epochs between snapshots of the model (evaluated after training)")
    p.add_argument("--out", default=None, help="output directory (default runs/<algo>-<time>)")
    p.add_argument("--threads", type=options.positive(int), default=1,
                   help="torch threads per rank")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--slowdown", default=None, metavar="RANK:FACTOR[,...]",
                   help="injected straggler: worker RANK's steps take FACTOR times as long")
    p.add_argument("--jitter", type=float, default=0.0, metavar="SIGMA",
                   help="injected noise: every step takes exp(SIGMA*z) times as long, seeded")
    checkpoint.add_arguments(p)
    p.add_argument("--max-bad-steps", type=options.positive(int), default=10,
                   help="stop after this many consecutive steps with NaN/Inf gradients")
    p.add_argument("--stall-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="end the job when a rank makes no progress for this long (0: never; "
                        "start-up gets at least 600 s)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hpctrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train a model with one algorithm",
                           formatter_class=_HelpFormatter)
    add_training_arguments(train)
    checkpoint.add_run_arguments(train)
    shuffle.add_arguments(train.add_argument_group("data shuffling"))
    for module_name in dict.fromkeys(ALGORITHMS.values()):
        package = module_name.split(".")[1].rstrip("_")
        importlib.import_module(module_name).add_arguments(
            train.add_argument_group(f"{package} options"))
    benchmarks = {name: importlib.import_module(m) for name, m in BENCHMARKS.items()}
    bench = sub.add_parser(
        "bench", help="benchmarks, each against a baseline measured in the same run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="\n\n".join([
            textwrap.fill("Each benchmark measures one thing against a baseline measured in the "
                          "same run, prints a table and writes JSON.", 79),
            *(textwrap.fill(f"{name}: {m.DESCRIPTION}", 79, subsequent_indent="  ")
              for name, m in benchmarks.items())]))
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, parser_class=_Parser)
    for name, module in benchmarks.items():
        b = bench_sub.add_parser(name, help=module.DESCRIPTION.split(". ")[0].split(": ")[0],
                                 description=module.DESCRIPTION,
                                 formatter_class=_HelpFormatter)
        module.add_arguments(b)
    report = sub.add_parser("report", help="re-render a comparison's report.md and plots from "
                            "its saved outputs, rerunning nothing")
    bench_report.add_arguments(report)
    sub.add_parser("info", help="MPI library, torch, Horovod and kernel availability")
    return parser


def algorithms_named(help_text: str | None) -> list[str]:
    """The algorithms an option's help names before ``": "`` (``"ma/ec: ..."``), else []."""
    head, colon, _ = (help_text or "").partition(": ")
    names = head.split("/")
    return names if colon and set(names) <= ALGORITHMS.keys() else []


def _refuse_foreign_options(args: argparse.Namespace) -> None:
    """An option given a value that ``--algo`` does not use: an error, not silently unused.

    An option belongs to the algorithms its help names (:func:`algorithms_named`), else to
    every algorithm of its package.
    """
    for module_name in dict.fromkeys(ALGORITHMS.values()):
        parser = argparse.ArgumentParser(add_help=False)
        importlib.import_module(module_name).add_arguments(parser)
        for action in parser._actions:
            owners = algorithms_named(action.help) or \
                [a for a, m in ALGORITHMS.items() if m == module_name]
            if args.algo not in owners and getattr(args, action.dest) != action.default:
                raise UsageError(f"{action.option_strings[0]} is an option of "
                                 f"{', '.join(owners)}, not of --algo {args.algo}")


def validate_training(args: argparse.Namespace) -> ModuleType:
    """Check the shared options and the algorithm's own; return the algorithm's module."""
    if args.algo not in ALGORITHMS:
        raise UsageError(f"unknown algorithm {args.algo!r}; choose from {', '.join(ALGORITHMS)}")
    if args.model not in models.MODELS:
        raise UsageError(f"unknown model {args.model!r}; choose from {', '.join(models.MODELS)}")
    module = importlib.import_module(ALGORITHMS[args.algo])
    for name, value in {**TRAINING_DEFAULTS, **getattr(module, "DEFAULTS", {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.lr_schedule is None:
        args.lr_schedule = "step" if args.lr_milestones else "cosine"
    if args.lr_milestones and args.lr_schedule != "step":
        raise UsageError(f"--lr-milestones need --lr-schedule step, not {args.lr_schedule}")
    if not 0 <= args.momentum < 1:
        raise UsageError(f"--momentum {args.momentum} must be in [0, 1)")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise UsageError(f"--weight-decay {args.weight_decay} must be >= 0")
    _refuse_foreign_options(args)
    if not (math.isfinite(args.jitter) and args.jitter >= 0):
        raise UsageError(f"--jitter {args.jitter} must be >= 0")
    if not (math.isfinite(args.stall_timeout) and args.stall_timeout >= 0):
        raise UsageError(f"--stall-timeout {args.stall_timeout} must be >= 0 (0: never)")
    parse_slowdown(args.slowdown, comm.env_size())
    workers = comm.env_size()
    n = data.size(args.dataset, "train", args.data_dir)
    if workers > n:
        raise UsageError(f"{workers} ranks but only {n} training samples in {args.dataset}")
    shuffle.validate(args)
    module.validate(args)
    checkpoint.validate(args, getattr(module, "CHECKPOINTS", False), workers)
    if args.out and (Path(args.out) / "summary.json").exists():
        raise UsageError(f"--out {args.out} already holds a finished run; choose another folder")
    return module


def train(args: argparse.Namespace) -> dict:
    module = validate_training(args)
    MPI = comm.init(module.THREAD_LEVEL)
    world = MPI.COMM_WORLD
    if args.out is None:
        stamp = world.bcast(time.strftime("%Y%m%d-%H%M%S"), root=0)
        args.out = str(Path("runs") / f"{args.algo}-{stamp}")
    watchdog.start(args.stall_timeout, world.Get_rank())
    try:
        summary = module.run(args)
    finally:
        watchdog.stop()
    if world.Get_rank() == 0:
        print(f"hpctrain train: finished\n{summary_table(summary)}", flush=True)
    return summary


def info() -> None:
    import torch

    MPI = comm.init("multiple")
    local_size = comm.local_size()  # collective: every rank takes part
    if MPI.COMM_WORLD.Get_rank() != 0:
        return
    facts = {"hpctrain": sys.modules["hpctrain"].__version__, "torch": torch.__version__,
             "cuda": torch.cuda.is_available(), **comm.library_info(),
             "ranks": comm.size(), "local_size": local_size}
    try:
        import horovod

        facts["horovod"] = horovod.__version__
    except ImportError as e:
        facts["horovod"] = f"not importable ({e})"
    print(json.dumps(facts, indent=2))


def main(argv: list[str] | None = None) -> None:
    comm.install_abort_on_error()
    args = build_parser().parse_args(argv)
    import torch

    # Benchmarks set their own thread counts (bench kernel's --threads is a list).
    torch.set_num_threads(args.threads if args.command == "train" else 1)
    if args.command == "train":
        train(args)
    elif args.command == "bench":
        module = importlib.import_module(BENCHMARKS[args.benchmark])
        if hasattr(module, "validate"):  # checks the options' own types cannot make
            module.validate(args)
        if module.THREAD_LEVEL is not None:  # None: a launcher of MPI jobs (compare)
            comm.init(module.THREAD_LEVEL)
        module.run(args)
    elif args.command == "report":
        bench_report.run(args)
    elif args.command == "info":
        info()


if __name__ == "__main__":
    main()
