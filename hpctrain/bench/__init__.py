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
    (default: this machine's memory, which the ranks on it share): found after MPI started,
    the allocation fails with a torch error on every rank, or the kernel kills the job."""
    here = 1 if have is not None else ranks_here()  # a GPU's memory: per rank, given
    have = memory() if have is None else have
    if nbytes * here > have:
        each = f" ({_gb(nbytes * here)} for the {here} ranks on it)" if here > 1 else ""
        raise UsageError(f"{what} needs at least {_gb(nbytes)} of memory per rank{each}; "
                         f"{where} {_gb(have)}")


def ranks_here() -> int:
    """How many of the job's ranks share this node, as the launcher says (Open MPI, Hydra,
    srun); 1 where none does."""
    for name in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_STEP_TASKS_PER_NODE"):
        digits = os.environ.get(name, "").split("(")[0].split(",")[0]
        if digits.isdigit() and int(digits) > 0:
            return int(digits)
    return 1


def check_mpi_launch(name: str) -> None:
    """The MPI benchmarks need an MPI world: under torchrun each process ran as a world of
    one after counting torchrun's (shuffle divided by zero, store refused itself mid-run)."""
    from hpctrain import comm

    if comm.launcher() == "torchrun":
        raise UsageError(f"the {name} benchmark moves data through MPI, and torchrun starts "
                         "no MPI world: launch with mpirun, or srun with PMI/PMIx")
