"""``hpctrain simulate``'s own options (:class:`~hpctrain.sim.config.SimConfig`), declared and
parsed as ``train``'s are (:mod:`hpctrain.arguments`)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from hpctrain import config as configs
from hpctrain.arguments import Declared, add_option
from hpctrain.errors import UsageError
from hpctrain.options import dash_values, declared, flag_of, shown
from hpctrain.sim.config import SimConfig

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


def options() -> list[Declared]:
    return [Declared(flag_of(f), ("sim", f.name), f) for f in declared(SimConfig)]


def add_arguments(parser: argparse.ArgumentParser, *, dest_prefix: str = "",
                  typed: bool = True, exclude: tuple[str, ...] = ()) -> list[argparse.Action]:
    """The simulator's options (but those flags in ``exclude``), in a group of their own."""
    dash_values(parser)  # --latency -1e-3 is refused naming it, as train's options are
    group = parser.add_argument_group("the simulator (virtual workers, step times, network)")
    return [add_option(group, d, dest=dest_prefix + d.dest, typed=typed) for d in options()
            if d.flag not in exclude]


def build(args: argparse.Namespace) -> SimConfig:
    """The simulator's configuration from ``--config``'s ``sim`` table (a simulated run's
    ``config.json`` has one) and the options given, which win; the rest default. A train
    option the simulator does not use (:data:`UNUSED`) given on the command line is refused,
    even at its default value."""
    for dest, (flag, why) in UNUSED.items():
        if hasattr(args, dest):  # typed (train's options default to absent)
            raise UsageError(f"hpctrain simulate does not use {flag} "
                             f"{shown(getattr(args, dest))} ({why}): drop it")
    recorded = configs.read_file(args.config) if getattr(args, "config", None) else {}
    base = recorded.get("sim", {})
    if not isinstance(base, dict):
        raise UsageError(f"--config {args.config}: sim must be a table of the simulator's "
                         f"options, not {type(base).__name__}")
    known = {f.name for f in fields(SimConfig)}
    if unknown := sorted(set(base) - known):
        raise UsageError(f"--config {args.config}: unknown configuration key sim.{unknown[0]}; "
                         f"sim has: {', '.join(sorted(known))}")
    info = recorded.get("run_info")
    if "sim" not in recorded and isinstance(info, dict) and type(info.get("workers")) is int \
            and info["workers"] > 0:
        base = {"workers": info["workers"]}  # a real run's config.json: the workers it had
    values = {**base, **{d.path[-1]: getattr(args, d.dest) for d in options()
                         if hasattr(args, d.dest)}}
    try:
        return SimConfig(**values)
    except TypeError as e:
        raise UsageError(f"--config {args.config}: {e}" if base else str(e)) from None
