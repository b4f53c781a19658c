"""Benchmarks (``hpctrain bench ...``) and the comparison report (``hpctrain report``).

The helpers here check the benchmarks' options as :mod:`hpctrain.options` checks the run's:
while parsing where the value alone decides, else in a benchmark's ``validate(args)``, before
MPI starts (one line naming the value, exit status 2).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
from decimal import Decimal

from hpctrain import launch_env, provenance
from hpctrain.errors import UsageError


def started() -> dict:
    """Where, when and with what a benchmark starts, taken before it measures: the date
    (UTC), the host, its CPUs and those this rank may run on, the load average, and what a
    run's ``run_info`` records of the machine (hpctrain's version and commit, torch, Python,
    the CPU), and this process's command line (``command``: a figure without it could not be
    measured again). ``hpctrain bench`` asks git for the commit before MPI starts (as training
    does)."""
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"date": date, **provenance.host(), **provenance.machine(),
            "command": command_line(),
            "load_average_start": provenance.load_average()}


def command_line() -> str:
    """This process's command line as one could type it again. Started with ``python -m``
    (BENCHMARKS' ``python -m hpctrain.bench.allreduce ...``), ``sys.argv[0]`` is the module's
    file, which names neither the interpreter nor ``-m``: the command is written with both."""
    argv = list(sys.argv)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and argv and argv[0] == getattr(spec, "origin", None):
        argv = [sys.executable, "-m", spec.name.removesuffix(".__main__"), *argv[1:]]
    return shlex.join(argv)


def machine(start: dict) -> dict:
    """A benchmark's JSON ``machine``: :func:`started`'s record and the load average at the
    end. BENCHMARKS' figures come with the machine they ran on; on a shared node the load
    while measuring is what a reader needs most."""
    return {**start, "load_average_end": provenance.load_average()}


def header(record: dict) -> str:
    """The line a benchmark prints above its table: :func:`machine`'s record in brief."""
    def load(key: str) -> str:
        value = record.get(key)
        return "?" if value is None else f"{value[0]:g}"

    commit = record.get("hpctrain_commit", "")
    commit = f" ({commit[:10]}{'+dirty' if commit.endswith('+dirty') else ''})" if commit else ""
    # A record before machine_cpus has only cpus (what rank 0 might run on).
    cpus = record.get("machine_cpus", record["cpus"])
    rank = record.get("rank_cpus", cpus)
    bound = f", rank 0 may run on {rank}" if rank != cpus else ""
    return (f"machine: {record['host']}, {cpus} CPU{'s' if cpus != 1 else ''} "
            f"({record.get('cpu', '?')}){bound}, "
            f"load {load('load_average_start')} -> {load('load_average_end')} (1 min); "
            f"torch {record['torch']}, hpctrain {record['hpctrain']}{commit}; {record['date']}")


def goal(text: str, met: bool) -> str:
    """``text``, a benchmark's goal, and whether this run met it: printed alone ("goal >=
    0.8" beside "ratio 0.15"), it left the reader to compare them."""
    return f"{text}: {'met' if met else 'NOT met'}"


def mean_over_ranks(world, medians: dict[str, float]) -> tuple[dict[str, float],
                                                                  list[dict[str, float]]]:
    """The mean over the ranks of each of this rank's ``medians`` (its own median of each
    figure), and every rank's medians: a rank's median drops its outliers (a preempted
    iteration), the mean then weighs every rank alike. Collective: every rank calls it."""
    per_rank = world.allgather(medians)
    return {k: statistics.fmean(r[k] for r in per_rank) for k in medians}, per_rank


def slowest(per_rank: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Each iteration's time of each figure as the slowest rank took it: ``per_rank`` is every
    rank's seconds per iteration (the same keys and lengths on each). After a barrier a
    collective ends when its last rank is done, so its time is the maximum over the ranks (as
    nccl-tests and the OSU benchmarks report it); a mean over ranks hides the slowest."""
    return {k: [max(r[k][i] for r in per_rank) for i in range(len(per_rank[0][k]))]
            for k in per_rank[0]}


def slowest_over_ranks(world, seconds: dict[str, list[float]]) -> dict[str, list[float]]:
    """:func:`slowest` of every rank's ``seconds``. Collective: every rank calls it."""
    return slowest(world.allgather(seconds))


def spread(values: list[float], scale: float = 1.0) -> dict[str, float]:
    """The min, median and max of ``values`` (times ``scale``): one figure hides whether the
    repeats agreed."""
    return {"min": scale * min(values), "median": scale * statistics.median(values),
            "max": scale * max(values)}


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
    """Bytes of memory this process may use: the machine's, or its cgroup's limit where that
    is lower (a Slurm job's --mem, a container's)."""
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # cgroup v2: "0::/path"; v1 lines name their controllers
        own = [line.split(":", 2)[2].strip() for line in open("/proc/self/cgroup")
               if line.startswith("0::") or ":memory:" in line]
    except OSError:
        own = []
    for path in own[:1]:
        for limit in (f"/sys/fs/cgroup{path}/memory.max", "/sys/fs/cgroup/memory.max",
                      f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"):
            try:
                text = open(limit).read().strip()
            except OSError:
                continue
            if text.isdigit():
                have = min(have, int(text))
            break
    return have


def _gb(nbytes: int | float) -> str:
    try:
        return f"{nbytes / 1e9:.3g} GB"
    except OverflowError:  # past a float's range
        return format(Decimal(nbytes) / 10**9, ".3g") + " GB"


def check_memory(what: str, nbytes: int | float, have: int | None = None,
                 where: str = "this machine has", *, sharing: int | None = None,
                 total: int | float | None = None) -> None:
    """UsageError unless ``nbytes`` (what one rank allocates at least) fit in ``have`` bytes,
    and ``total`` (what the ``sharing`` ranks on it allocate together, default ``nbytes``
    each) too. Default: this machine's memory (:func:`memory`), shared by the ranks the
    launcher put on it (:func:`ranks_here`). Found after MPI started, the allocation fails
    with a torch error on every rank, or the kernel kills the job."""
    if sharing is None:
        sharing = ranks_here() if have is None else 1
    have = memory() if have is None else have
    total = nbytes * sharing if total is None else total
    if max(nbytes, total) > have:
        each = f" ({_gb(total)} for the {sharing} ranks on it)" if sharing > 1 else ""
        raise UsageError(f"{what} needs at least {_gb(nbytes)} of memory per rank{each}; "
                         f"{where} {_gb(have)}")


def ranks_here() -> int:
    """How many of the job's ranks share this node, as the launcher that gave the rank says
    (:func:`hpctrain.launch_env.local_size`: srun's from its tasks per node); 1 where none
    does."""
    return launch_env.local_size() or 1


def check_mpi_launch(name: str) -> None:
    """The MPI benchmarks need an MPI world: under torchrun each process ran as a world of
    one after counting torchrun's (shuffle divided by zero, store refused itself mid-run)."""
    from hpctrain import comm

    if comm.launcher() == "torchrun":
        raise UsageError(f"the {name} benchmark moves data through MPI, and torchrun starts "
                         "no MPI world: launch with mpirun, or srun with PMI/PMIx")
