"""``hpctrain simulate``'s own options (:class:`~hpctrain.sim.config.SimConfig`), declared and
parsed as ``train``'s are (:mod:`hpctrain.arguments`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hpctrain import config as configs
from hpctrain import steptimes
from hpctrain.arguments import Declared, add_option
from hpctrain.config import StragglerConfig
from hpctrain.errors import UsageError
from hpctrain.options import command_line, dash_values, declared, flag_of, shown
from hpctrain.sim.config import REAL_RUN_ONLY, STRAGGLER_OPTIONS, SimConfig, real_run_only

# train's options the simulator has no use for (their argparse dests), and why. Typed on the
# command line they are refused, whatever the value; from a file (a real run's config.json,
# simulated) they are ignored.
UNUSED = {
    "stall_timeout": ("--stall-timeout", "its virtual workers are threads of one process, "
                                         "with no watchdog"),
    "algorithm.sync_backend": ("--sync-backend", "ssgd's virtual workers average their "
                                                 "gradients in the one process, through no "
                                                 "backend"),
}


# train's flags that a simulation refuses (:data:`UNUSED`'s, and those sim.simulate checks:
# one process, rerun rather than resumed, data held once, gradients averaged in float32): off
# its --help. Typed, UNUSED's and --shuffle-chunk-mb are refused at any value, the others at
# any but the one that changes nothing (IDLE).
REFUSED = ("--stall-timeout", "--sync-backend", "--fp16-allreduce", "--checkpoint-every",
           "--checkpoint-dir", "--resume", "--eval-rank", "--profile", "--data-placement",
           "--shuffle-chunk-mb")
IDLE = ("--checkpoint-every off", "none for --checkpoint-every, --checkpoint-dir, --resume, "
        "--eval-rank and --profile", "--data-placement replicated", "--no-fp16-allreduce")
REFUSED_EPILOG = ("train's " + ", ".join(REFUSED) + " are not listed: a simulation runs in one "
                  "process, holds the data once, averages ssgd's gradients in float32 and is "
                  "rerun rather than resumed. Given, --stall-timeout, --sync-backend and "
                  "--shuffle-chunk-mb are refused at any value, the others at any but the one "
                  "that changes nothing (" + "; ".join(IDLE) + "). A real run's config.json "
                  "given to --config is simulated without its checkpoint settings, "
                  "--eval-rank, --profile, --data-placement sharded (the same samples) and a "
                  "--sync-backend other than mpi (said once), its --stall-timeout unused; its "
                  "--fp16-allreduce is refused (--no-fp16-allreduce undoes it)")
# The undoing flags of REFUSED on/off options, listed with the simulator's own help: shown as
# train's "undo --fp16-allreduce (a --config file's)" beside no --fp16-allreduce, they read as
# the flag of an option the simulator takes.
UNDOING = {"--no-fp16-allreduce": "undo a --config file's --fp16-allreduce, which hpctrain "
                                  "simulate refuses (it averages ssgd's gradients in float32)"}


def hide_refused(parser: argparse.ArgumentParser) -> None:
    """Keep :data:`REFUSED` off ``parser``'s --help; typed, they are still refused by name.
    Their undoing flags stay, to undo a ``--config`` file's value, with :data:`UNDOING`'s help."""
    for action in parser._actions:
        if set(action.option_strings) & set(REFUSED):
            action.help = argparse.SUPPRESS
        for flag in set(action.option_strings) & set(UNDOING):
            action.help = UNDOING[flag]
    parser.epilog = REFUSED_EPILOG


def refuse_real_run_only(args: argparse.Namespace) -> None:
    """A typed --eval-rank or --profile (but none) refused first, as the simulator refuses
    them: not after the checks of a value it never uses (``--eval-rank 0 must be >= 1``)."""
    for dest in REAL_RUN_ONLY:
        if getattr(args, dest, None) is not None:
            raise UsageError(real_run_only(dest, getattr(args, dest)))


def options() -> list[Declared]:
    return [Declared(flag_of(f), ("sim", f.name), f) for f in declared(SimConfig)]


def add_arguments(parser: argparse.ArgumentParser, *, dest_prefix: str = "",
                  typed: bool = True, exclude: tuple[str, ...] = ()) -> list[argparse.Action]:
    """The simulator's options (but those flags in ``exclude``), in a group of their own."""
    dash_values(parser)  # --latency -1e-3 is refused naming it, as train's options are
    group = parser.add_argument_group("the simulator (virtual workers, step times, network)")
    return [add_option(group, d, dest=dest_prefix + d.dest, typed=typed) for d in options()
            if d.flag not in exclude]


@command_line()  # its refusals name the flags typed, as hpctrain.arguments.build's
def build(args: argparse.Namespace) -> SimConfig:
    """The simulator's configuration from ``--config``'s ``sim`` table (a simulated run's
    ``config.json`` has one) and the options given, which win; the rest default. A train
    option the simulator does not use (:data:`UNUSED`) given on the command line is refused,
    even at its default value. A replay leaves out a real run's straggler options taken from
    its ``config.json`` (:func:`replayed_stragglers`), said once."""
    for dest, (flag, why) in UNUSED.items():
        if hasattr(args, dest):  # typed (train's options default to absent)
            raise UsageError(f"hpctrain simulate does not use {flag} "
                             f"{shown(getattr(args, dest))} ({why}): drop it")
    recorded = configs.read_file(args.config) if getattr(args, "config", None) else {}
    base = recorded.get("sim", {})
    if not isinstance(base, dict):
        raise UsageError(f"--config {args.config}: sim must be a table of the simulator's "
                         f"options, not {type(base).__name__}")
    known = {f.name for f in declared(SimConfig)} | {"step_times_sha256"}
    if unknown := sorted(set(base) - known):
        raise UsageError(f"--config {args.config}: unknown configuration key sim.{unknown[0]}; "
                         f"sim has: {', '.join(sorted(known))}")
    info = recorded.get("run_info") if _real_run(recorded) else None
    if info is not None and type(info.get("workers")) is int and info["workers"] > 0:
        base = {"workers": info["workers"]}  # a real run's config.json: the workers it had
    typed = {d.path[-1]: getattr(args, d.dest) for d in options() if hasattr(args, d.dest)}
    if "step_time" in typed:  # chosen anew: the file's hash is of the step times it had
        base = {k: v for k, v in base.items() if k != "step_times_sha256"}
    values = {**base, **typed}
    left = replayed_stragglers(args, recorded, values.get("step_time"))
    try:
        sim = SimConfig(**values, replayed_stragglers=tuple(left))
    except TypeError as e:
        raise UsageError(f"--config {args.config}: {e}" if base else str(e)) from None
    if left:
        print(f"hpctrain simulate: leaving out {args.config}'s "
              f"{' and '.join(f'--{k} {shown(v)}' for k, v in left.items())} (a real run's "
              f"stragglers, whose delays the replayed step times already hold; give them on "
              f"the command line to add them on top)", file=sys.stderr, flush=True)
    return sim


def _real_run(recorded: dict) -> bool:
    """Whether ``--config`` is a real run's ``config.json``: what it ran with, and no
    simulator's options."""
    return "sim" not in recorded and isinstance(recorded.get("run_info"), dict)


def replayed_stragglers(args: argparse.Namespace, recorded: dict, step_time) -> dict:
    """The straggler options (name: value) of a real run's ``config.json`` not to apply
    again: with ``--step-time replay:RUN`` the replayed step times are a real run's, and a
    real straggler's sleep is part of its recorded steps, so applying its ``--slowdown`` and
    ``--jitter`` again would count them twice: when the replayed run is the ``--config``
    file's own (another run's times hold none of its sleeps). Options given on the command
    line stay (a slowdown on top of the replay), as do a simulation's or a TOML file's.
    ``RUN`` is the run's folder or its ``step_times.json`` file, alike."""
    file_values = recorded.get("stragglers")
    kind, _, run = step_time.partition(":") if isinstance(step_time, str) else ("", "", "")
    if not (kind == "replay" and _real_run(recorded) and isinstance(file_values, dict)
            and steptimes.file_of(run).resolve()
            == (Path(args.config).resolve().parent / steptimes.FILE).resolve()):
        return {}
    defaults = StragglerConfig()
    return {name: file_values[name] for name in STRAGGLER_OPTIONS
            if name in file_values and file_values[name] != getattr(defaults, name)
            and not hasattr(args, f"stragglers.{name}")}
