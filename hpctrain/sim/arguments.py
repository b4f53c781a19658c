"""``hpctrain simulate``'s own options (:class:`~hpctrain.sim.config.SimConfig`), declared and
parsed as ``train``'s are (:mod:`hpctrain.arguments`)."""

from __future__ import annotations

import argparse

from hpctrain.arguments import Declared, add_option
from hpctrain.errors import UsageError
from hpctrain.options import declared, flag_of
from hpctrain.sim.config import SimConfig


def options() -> list[Declared]:
    return [Declared(flag_of(f), ("sim", f.name), f) for f in declared(SimConfig)]


def add_arguments(parser: argparse.ArgumentParser, *, dest_prefix: str = "",
                  typed: bool = True, exclude: tuple[str, ...] = ()) -> list[argparse.Action]:
    """The simulator's options (but those flags in ``exclude``), in a group of their own."""
    group = parser.add_argument_group("the simulator (virtual workers, step times, network)")
    return [add_option(group, d, dest=dest_prefix + d.dest, typed=typed) for d in options()
            if d.flag not in exclude]


def build(args: argparse.Namespace) -> SimConfig:
    """The simulator's configuration from the options given (the rest default)."""
    values = {d.path[-1]: getattr(args, d.dest) for d in options() if hasattr(args, d.dest)}
    try:
        return SimConfig(**values)
    except TypeError as e:
        raise UsageError(str(e)) from None
