"""Benchmarks (``hpctrain bench ...``) and the comparison report (``hpctrain report``).

The helpers here check the benchmarks' options as :mod:`hpctrain.options` checks the run's:
while parsing where the value alone decides, else in a benchmark's ``validate(args)``, before
MPI starts (one line naming the value, exit status 2).
"""

from __future__ import annotations

import argparse
import os
from decimal import Decimal

from hpctrain.errors import UsageError


def at_most(parse, high: float):
    """``parse`` (an :mod:`hpctrain.options` parser), and the value at most ``high``: what is
    computed from a larger one overflows (``--bucket-mb 1e308`` x 2**20 is inf)."""
    def check(text: str):
        value = parse(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return value
    return check


def memory() -> int:
    """Bytes of physical memory on this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gb(nbytes: int | float) -> str:
    try:
        return f"{nbytes / 1e9:.3g} GB"
    except OverflowError:  # past a float's range
        return format(Decimal(nbytes) / 10**9, ".3g") + " GB"


def check_memory(what: str, nbytes: int | float, have: int | None = None,
                 where: str = "this machine has") -> None:
    """UsageError unless ``nbytes`` (what one rank allocates at least) fit in ``have`` bytes
    (default: this machine's memory): found after MPI started, the allocation fails with a
    torch error on every rank, or the kernel kills the job."""
    have = memory() if have is None else have
    if nbytes > have:
        raise UsageError(f"{what} needs at least {_gb(nbytes)} of memory per rank; {where} "
                         f"{_gb(have)}")
