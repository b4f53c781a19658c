"""Which process of how many this one is: from the caller, torch.distributed, the launcher or MPI.

A library object that splits work over processes (a sampler) must know the job's size and its
rank, and must not guess 1 when it was started by a launcher it did not look at: under
``torchrun`` (``WORLD_SIZE``, ``RANK``, no MPI) an MPI-only lookup sees a singleton world and
every process would take all the data. :func:`replicas` asks every source there is:

1. the caller's explicit values (``num_replicas``, ``rank``), taken as given, as
   ``DistributedSampler`` takes them (that is how one process plays another's part);
2. an initialised default ``torch.distributed`` process group;
3. the launcher's environment: the innermost launcher's variables, in this order because an
   inner launcher sets its own beside those of the one that started it (``torchrun`` under
   ``srun``, ``mpirun`` inside a Slurm allocation): torchrun's ``WORLD_SIZE``/``RANK``, Open
   MPI's ``OMPI_COMM_WORLD_SIZE``/``OMPI_COMM_WORLD_RANK``, PMI's ``PMI_SIZE``/``PMI_RANK``
   (Hydra's for MPICH and Intel MPI, Cray PALS's, Flux's, Slurm's pmi2), MVAPICH's
   ``MV2_COMM_WORLD_SIZE``/``MV2_COMM_WORLD_RANK``, and Slurm's
   ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``)/``SLURM_PROCID`` inside a job step
   (``SLURM_STEP_ID`` set: a batch script's own environment describes the allocation, not
   the process);
4. the MPI world, if MPI is running with more than one process (a singleton world, what every
   process under torchrun gets when it starts MPI, says nothing about the job); when no other
   source answers, MPI is started and asked, as before this module existed.

Sources 2 to 4 describe the same job, so they must agree: when two of them give different
sizes or ranks, :class:`~hpctrain.errors.UsageError` names both, rather than one silently
winning. Nothing here starts MPI or torch.distributed unless every other source is silent.

:func:`launch` is the one reading of how the job was launched (torch's launch, MPI's or none),
for :func:`hpctrain.comm.launcher`, ``hpctrain info`` and the abort hook.
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, overload

from hpctrain.errors import UsageError

# (name, size variable, rank variable), innermost launcher first.
LAUNCHERS = (
    ("torchrun", "WORLD_SIZE", "RANK"),
    ("Open MPI", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    ("PMI", "PMI_SIZE", "PMI_RANK"),
    ("MVAPICH", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"),  # its mpirun_rsh
    ("Slurm", "SLURM_NTASKS", "SLURM_PROCID"),
)
# Each launcher's rank-on-the-node variables: PMI's are Hydra's (MPICH, Intel MPI), Cray
# PALS's and Flux's.
LOCAL_RANKS = {
    "torchrun": ("LOCAL_RANK",),
    "Open MPI": ("OMPI_COMM_WORLD_LOCAL_RANK",),
    "PMI": ("MPI_LOCALRANKID", "PMI_LOCAL_RANK", "PALS_LOCAL_RANKID", "FLUX_TASK_LOCAL_ID"),
    "MVAPICH": ("MV2_COMM_WORLD_LOCAL_RANK",),
    "Slurm": ("SLURM_LOCALID",),
}
# A Slurm job step (srun): without one, a batch script's SLURM_NTASKS is the allocation's.
SLURM_STEP = ("SLURM_STEP_ID", "SLURM_STEPID")
# The step's own task count, which srun sets for every step: its SLURM_NTASKS is the step's
# too, but the allocation's where inherited (srun --preserve-env, salloc's interactive step).
SLURM_STEP_SIZE = "SLURM_STEP_NUM_TASKS"
MPI_LAUNCHERS = ("Open MPI", "PMI", "MVAPICH")  # LAUNCHERS' names of MPI's own launchers
# torch.distributed's env:// rendezvous, which torchrun gives every worker.
TORCH_RENDEZVOUS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# What a torch launch's path reads besides: the worker's GPU (devices.local_rank) and its
# node's worker count (whether the job is on one node: the rendezvous store's per-attempt
# prefix, torch_group._torchrun_store). torchrun's restart count and agent store are
# optional: without them the run is its launch's first attempt.
TORCH_PLACEMENT = ("LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class Seat:
    """This process's place in the job: ``rank`` of ``size``, and where that was read."""

    size: int
    rank: int
    source: str
    local_rank: int | None = None  # the launcher's rank of this process on its node, if given
    launcher: str | None = None  # its name in LAUNCHERS, for a launcher's seat

    def __str__(self) -> str:
        return f"{self.source} says rank {self.rank} of {self.size}"


def from_launcher(environ: Mapping[str, str] | None = None) -> Seat | None:
    """The innermost launcher's size and rank from ``environ`` (default ``os.environ``), or
    None when no known launcher set them. UsageError for a value that is not a count."""
    return next(seats(environ), None)


def seats(environ: Mapping[str, str] | None = None) -> Iterator[Seat]:
    """Every known launcher's seat in ``environ`` (default ``os.environ``), innermost first,
    read as they are asked for: a bad value is an error only where it is read."""
    env = os.environ if environ is None else environ
    for name, size_var, rank_var in LAUNCHERS:
        if name == "Slurm":
            if not any(v in env for v in SLURM_STEP):
                continue  # a batch script: SLURM_NTASKS is the allocation's, not this process's
            size_var = SLURM_STEP_SIZE if SLURM_STEP_SIZE in env else size_var
        if size_var not in env or rank_var not in env:
            continue
        yield _seat(env, name, size_var, rank_var, LOCAL_RANKS[name])


def _seat(env: Mapping[str, str], name: str, size_var: str, rank_var: str,
          local_vars: tuple[str, ...]) -> Seat:
    """The seat ``size_var`` and ``rank_var`` (both set) give; UsageError for values that are
    not counts or a rank outside the job."""
    try:
        size, rank = int(env[size_var]), int(env[rank_var])
    except ValueError:
        raise UsageError(f"{size_var}={env[size_var]!r}, {rank_var}={env[rank_var]!r}: "
                         "not whole numbers") from None
    if not 0 <= rank < size:  # else a process takes another's seat, or rank 0's none
        raise UsageError(f"{size_var}={size}, {rank_var}={rank}: the rank is not in "
                         f"[0, {size})")
    return Seat(size, rank, f"{name} ({size_var}={size}, {rank_var}={rank})",
                _first_count(env, local_vars), name)


@dataclass(frozen=True)
class Launch:
    """How this process was started (:func:`launch`)."""

    kind: str  # "torchrun" (torch's launch), "mpi" (MPI's world is the job) or "single"
    by: str  # what numbered the processes, as ``hpctrain info`` says it
    seat: Seat | None  # its seat: under "mpi" the MPI launcher's (or srun's), for check_world


def _named(seat: Seat) -> str:
    """The launcher's name of a seat that :func:`seats` read."""
    assert seat.launcher is not None  # seats() names every seat's launcher
    return seat.launcher


def launch(environ: Mapping[str, str] | None = None) -> Launch:
    """How this process was started, from ``environ`` (default ``os.environ``):

    - ``torchrun``: torch.distributed's env:// launch, each process an MPI singleton and the
      torch group the job: torchrun's (``TORCHELASTIC_RUN_ID``), or another launcher's that
      sets everything torchrun's path reads (:data:`TORCH_RENDEZVOUS`,
      :data:`TORCH_PLACEMENT`), DeepSpeed's or a Kubeflow PyTorchJob's;
    - ``mpi``: an MPI launcher's or srun's, whose MPI world is the job, also where a wrapper
      exported ``RANK``/``WORLD_SIZE`` (for env://) numbering the processes as it does;
    - ``single``: no launcher of several processes.

    UsageError for ``RANK``/``WORLD_SIZE`` of several processes that are neither: each would
    train alone, all into the same outputs; for them without torchrun where an MPI launcher
    numbers the process otherwise (left in a shell under mpirun, they made the rank whose
    numbers differed a torch launch, which hid MPI's own variables, and MPI_Init failed with
    no word of why), ``WORLD_SIZE=1`` too where mpirun or srun started several (each took
    itself for a single run: rank 0 of 1, all into the same outputs); and for Horovod's own
    launcher (:func:`refuse_horovods_own_launch`)."""
    env = os.environ if environ is None else environ
    refuse_horovods_own_launch(env)
    found = seats(env)
    first = next(found, None)
    if first is None:
        return Launch("single", "none known", None)
    if first.launcher != "torchrun":
        return Launch("mpi", _named(first), first)
    if "TORCHELASTIC_RUN_ID" in env and all(v in env for v in TORCH_RENDEZVOUS):
        return Launch("torchrun", "torchrun", first)
    outer = readable(found)
    numbered = alike(first, outer)
    if numbered:  # mpirun's or srun's processes, given env://'s variables by a wrapper
        return Launch("mpi", _named(numbered[0]), numbered[0])
    torchs = (*TORCH_RENDEZVOUS, *TORCH_PLACEMENT)
    missing = [v for v in torchs if v not in env]
    mpis = next((s for s in outer if s.launcher in MPI_LAUNCHERS), None)
    if first.size == 1:  # a world of one, unless a launcher started several (srun's too:
        mpis = next((s for s in outer if s.size > 1), None)  # each alone), all variables
        if mpis is None and missing:                          # given or not
            return Launch("single", "none known", None)
    if mpis is not None:  # as detect() has it: sources that disagree are an error
        raise UsageError(f"WORLD_SIZE={first.size}, RANK={first.rank} without torchrun (no "
                         f"TORCHELASTIC_RUN_ID), but {mpis}: torch.distributed's env:// "
                         "variables left from another launch? Unset "
                         f"{', '.join(v for v in torchs if v in env)}, or start the "
                         "processes with torchrun")
    if not missing:
        return Launch("torchrun", "torch env:// (no torchrun)", first)
    raise UsageError(f"WORLD_SIZE={first.size}, RANK={first.rank} without torchrun (no "
                     "TORCHELASTIC_RUN_ID) and no MPI launcher numbering the processes the "
                     "same way: a torch.distributed env:// launch also needs "
                     f"{', '.join(missing)}; set them, or launch with torchrun, mpirun or srun")


# Horovod's own launcher's numbering of the processes: horovodrun --gloo's (its elastic mode's
# too), Ray's and Spark's runners'. horovodrun's MPI mode sets neither.
HOROVOD_SEAT = ("HOROVOD_SIZE", "HOROVOD_RANK")


def refuse_horovods_own_launch(environ: Mapping[str, str] | None = None) -> None:
    """UsageError when Horovod's own launcher made this process one of several and no
    launcher hpctrain reads numbers it so: hpctrain joins no Gloo rendezvous, so each process
    was a world of 1 and trained alone, all into the same outputs, without a word."""
    env = os.environ if environ is None else environ
    size_var, rank_var = HOROVOD_SEAT
    if size_var not in env or rank_var not in env:
        return
    horovods = _seat(env, "Horovod", size_var, rank_var, ())
    launched = readable(seats(env))
    if horovods.size == 1 or alike(horovods, launched):
        return
    but = f", but {launched[0]}" if launched else ""
    raise UsageError(f"{size_var}={horovods.size}, {rank_var}={horovods.rank}: Horovod's own "
                     f"launcher (horovodrun --gloo, Ray, Spark) started this process{but}; "
                     "hpctrain runs under horovodrun's MPI mode, not Gloo's, so each process "
                     "would train alone: launch with hpctrain horovodrun (or horovodrun "
                     f"without --gloo), mpirun, srun or torchrun, or unset {size_var} and "
                     f"{rank_var} if another launch left them")


def refuse_mpirun_around_torchrun(environ: Mapping[str, str] | None = None) -> None:
    """UsageError, before MPI starts, for a torch launch whose workers Open MPI's mpirun
    started (``mpirun -np 1 torchrun --nproc-per-node 2``): each worker must start MPI as a
    world of its own, and under mpirun's variables Open MPI's MPI_Init died (``OPAL ERROR:
    Unreachable``), naming no cause. Not where mpirun numbers the workers as torchrun does,
    several of them (one torchrun per node, ``--node-rank`` mpirun's rank): MPI's world is
    then theirs, and it starts (:func:`hpctrain.comm.init`)."""
    env = os.environ if environ is None else environ
    if launch(env).kind != "torchrun":
        return
    found = seats(env)
    first = next(found)  # torchrun's, as launch() found it
    outer = readable(found)
    ompi = next((s for s in outer if s.launcher == "Open MPI"), None)
    if ompi is None or first.size > 1 and any(s.launcher in MPI_LAUNCHERS
                                              for s in alike(first, outer)):
        return
    raise UsageError(f"torchrun's worker (WORLD_SIZE={first.size}, RANK={first.rank}) under "
                     f"Open MPI's mpirun ({ompi}): its workers cannot start MPI there (Open "
                     "MPI's MPI_Init fails); start torchrun otherwise (srun, ssh), or launch "
                     "hpctrain with mpirun alone")


def local_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank on its node, from the launcher that gave its rank
    (:func:`from_launcher`), so that a variable another launcher left (a ``LOCAL_RANK``
    exported in a batch script under mpirun) is not read. A launcher that gives none takes
    that of an outer one numbering the processes alike: ``srun --mpi=pmi2`` sets PMI's rank
    but only Slurm's ``SLURM_LOCALID``, and a wrapper exporting ``RANK``/``WORLD_SIZE`` for
    ``env://`` leaves mpirun's. With no known launcher, the first local-rank variable set,
    innermost launcher first; else 0."""
    env = os.environ if environ is None else environ
    found = seats(env)
    first = next(found, None)
    if first is None:
        return _first_count(env, [v for names in LOCAL_RANKS.values() for v in names]) or 0
    return next((s.local_rank for s in [first, *alike(first, found)]
                 if s.local_rank is not None), 0)


def alike(first: Seat, outer: Iterable[Seat]) -> list[Seat]:
    """The seats of ``outer`` (launchers outside ``first``'s) that number this process as
    ``first`` does, up to one whose values are not counts (:func:`readable`)."""
    return [seat for seat in readable(outer) if (seat.size, seat.rank) == (first.size, first.rank)]


def readable(outer: Iterable[Seat]) -> list[Seat]:
    """The seats of ``outer`` up to one whose values are not counts: an outer launcher's, not
    this process's error."""
    found = []
    with contextlib.suppress(UsageError):
        for seat in outer:
            found.append(seat)
    return found


def _first_count(env: Mapping[str, str], names) -> int | None:
    """The first of the variables ``names`` set to a whole number, as an int; else None."""
    return next((int(env[v]) for v in names if env.get(v, "").isdigit()), None)


def from_torch_distributed() -> Seat | None:
    """The default torch.distributed process group's size and rank, if one is initialised."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    size, rank = dist.get_world_size(), dist.get_rank()
    return Seat(size, rank, f"torch.distributed (world size {size}, rank {rank})")


@overload
def from_mpi(start: Literal[True]) -> Seat: ...


@overload
def from_mpi(start: bool = False) -> Seat | None: ...


def from_mpi(start: bool = False) -> Seat | None:
    """MPI's world, if MPI is running with more than one process; with ``start``, start MPI
    when it is not running and give its world whatever its size."""
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is None or not MPI.Is_initialized() or MPI.Is_finalized():
        if not start:
            return None
        from hpctrain import comm

        MPI = comm.mpi()
    world = MPI.COMM_WORLD
    size, rank = world.Get_size(), world.Get_rank()
    if size == 1 and not start:
        return None
    return Seat(size, rank, f"MPI (COMM_WORLD size {size}, rank {rank})")


def detect(environ: Mapping[str, str] | None = None) -> Seat:
    """This process's seat from torch.distributed, the launcher's environment and a running MPI
    world, which must agree (UsageError naming two that do not); MPI started and asked when
    none of them answers. ``RANK``/``WORLD_SIZE`` without torchrun's run id are checked
    against an MPI launcher's variables too: left in a shell under mpirun, they gave every
    rank the same seat."""
    env = os.environ if environ is None else environ
    launched = list(seats(env))
    if launched and launched[0].launcher == "torchrun" and "TORCHELASTIC_RUN_ID" not in env:
        launched = [s for s in launched if s.launcher in ("torchrun", *MPI_LAUNCHERS)]
    else:
        launched = launched[:1]
    found = [s for s in (from_torch_distributed(), *launched, from_mpi()) if s is not None]
    for other in found[1:]:
        if (other.size, other.rank) != (found[0].size, found[0].rank):
            raise UsageError(f"the job's size and rank disagree: {found[0]}, {other}; "
                             "pass num_replicas and rank explicitly or fix the launch")
    return found[0] if found else from_mpi(start=True)


def replicas(num_replicas: int | None = None, rank: int | None = None,
             environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(num_replicas, rank)``: the explicit values where given, the rest from :func:`detect`.
    UsageError for a rank outside ``[0, num_replicas)``."""
    if num_replicas is None or rank is None:
        seat = detect(environ)
        num_replicas = seat.size if num_replicas is None else num_replicas
        rank = seat.rank if rank is None else rank
    size, where = as_integer(num_replicas), as_integer(rank)
    if size is None or size < 1:
        raise UsageError(f"num_replicas {num_replicas!r} must be a whole number >= 1")
    if where is None or not 0 <= where < size:
        raise UsageError(f"rank {rank!r} outside [0, {size})")
    return size, where


def as_integer(value) -> int | None:
    """``value`` as an int if it is an integer (numpy's too), not a bool; else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


# Each launcher's count of its processes on this node (Slurm's per-node counts are a list:
# :func:`slurm_local_size`).
LOCAL_SIZES_OF = {
    "torchrun": ("LOCAL_WORLD_SIZE",),
    "Open MPI": ("OMPI_COMM_WORLD_LOCAL_SIZE",),
    "PMI": ("MPI_LOCALNRANKS", "PALS_LOCAL_SIZE"),
    "MVAPICH": ("MV2_COMM_WORLD_LOCAL_SIZE",),
    "Slurm": (),
}
LOCAL_SIZES = tuple(v for names in LOCAL_SIZES_OF.values() for v in names)


def slurm_local_size(env: Mapping[str, str]) -> int | None:
    """A Slurm step's tasks on this node: ``SLURM_NODEID``'s entry of the step's
    ``SLURM_STEP_TASKS_PER_NODE`` (``2(x3),1``: 2 tasks on each of 3 nodes, then 1); None
    where either is missing or unreadable."""
    spec, node = env.get("SLURM_STEP_TASKS_PER_NODE", ""), env.get("SLURM_NODEID", "")
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"([0-9]+)(?:\(x([0-9]+)\))?", part.strip())
        if m is None:
            return None
        counts += [int(m[1])] * int(m[2] or 1)
    here = int(node) if node.isdigit() and int(node) < len(counts) else None
    return counts[here] if here is not None and counts[here] > 0 else None


def local_size(environ: Mapping[str, str] | None = None) -> int | None:
    """The launch's processes on this node, where its launcher says (without MPI: the
    count is wanted before a collective can be made); None where none does. As
    :func:`local_rank`, the launcher's that gave the rank (or an outer one numbering the
    process alike): a ``LOCAL_WORLD_SIZE`` left in a batch script under mpirun is not read.
    With no known launcher, the first count set, innermost launcher first."""
    env = os.environ if environ is None else environ
    found = seats(env)
    first = next(found, None)
    if first is None:
        return _first_count(env, LOCAL_SIZES)
    return next((size for s in [first, *alike(first, found)]
                 if (size := slurm_local_size(env) if s.launcher == "Slurm"
                     else _first_count(env, LOCAL_SIZES_OF[_named(s)])) is not None), None)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (the launcher's binding, a Slurm
    step's cpus), else, where there is none (not Linux), the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def say_threads_beyond_cpus(threads: int) -> None:
    """Warn (rank 0 of the launch) of more torch threads than CPUs this process may use:
    Open MPI's mpirun binds each of one or two ranks to one core, so ``--threads 2`` ran
    two threads on one core, as fast as one, and said nothing."""
    cpus = usable_cpus()
    seat = from_launcher()
    if threads > cpus and (seat is None or seat.rank == 0):
        print(f"hpctrain: warning: --threads {threads}, but this process may run on only "
              f"{cpus} CPU{'s' if cpus > 1 else ''} (its affinity: the launcher's binding; "
              f"Open MPI's mpirun binds each of one or two ranks to one core: give it "
              f"--bind-to none or --map-by slot:PE={threads}; srun: --cpus-per-task="
              f"{threads})", file=sys.stderr, flush=True)
