"""The command that starts a run's processes: ``--launcher``, else the default.

The default follows the environment (``$HPCTRAIN_LAUNCHER``, srun inside a Slurm allocation,
``$HPCTRAIN_MPIRUN``, else Open MPI's mpirun with the flags this machine needs), and
:func:`launches_here` says whether the processes start on this machine, whose devices are
then the runs'. It depends on no other module of the command.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from hpctrain import mpirun
from hpctrain.errors import UsageError

_MPI_LAUNCHERS = frozenset({"mpirun", "mpiexec", "mpiexec.hydra", "orterun", "prterun"})
# Their options that place ranks on other machines (Open MPI's, then Hydra's: MPICH, Intel).
_HOST_OPTIONS = frozenset({"-H", "--host", "-host", "--hostfile", "-hostfile", "--machinefile",
                           "-machinefile", "--default-hostfile", "-hosts", "-f", "-machine"})


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
