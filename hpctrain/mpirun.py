"""The ``mpirun`` on PATH: which MPI's it is, and the flags it needs to start ranks here.

Open MPI's mpirun and Hydra's (MPICH's, Intel MPI's) take different flags: Open MPI refuses
to run as root without ``--allow-run-as-root`` and more ranks than cores without
``--oversubscribe``; Hydra knows neither flag and needs neither. Launchers that build an
mpirun command (``hpctrain horovodrun``, ``bench compare``'s default) ask
:func:`flavour_of`. Those that signal it (a time limit's SIGUSR1, SIGTERM) start the program
:func:`passing_signals` names: Intel MPI's mpirun is a script that loses them.
Light: no torch, no MPI started.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

# Open MPI's, MPICH's and Intel MPI's, told apart by ``mpirun --version``.
FLAVOURS = ("openmpi", "mpich", "intel")
# The launchers an mpirun script may run as its child, as they are named beside it.
_HYDRA = ("mpiexec.hydra", "mpiexec")


def flavour_of(mpirun: str | None = None) -> str | None:
    """Which of :data:`FLAVOURS` ``mpirun`` (default: the one on PATH) is, from its
    ``--version``; None if none of them, or none is there. MPICH 5's says only "HYDRA"."""
    mpirun = mpirun or shutil.which("mpirun")
    return None if mpirun is None else _flavour(mpirun)


@functools.cache  # bench compare asks once per run; the answer is the binary's
def _flavour(mpirun: str) -> str | None:
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = out.stdout + out.stderr
    if "Open MPI" in text or "OpenRTE" in text:
        return "openmpi"
    if "Intel(R) MPI" in text:
        return "intel"
    if "MPICH" in text or "HYDRA" in text:
        return "mpich"
    return None


def local_flags(kind: str | None, ranks: int, cores: int) -> list[str]:
    """What ``kind``'s mpirun needs to start ``ranks`` ranks on this machine of ``cores``
    cores: Open MPI's root and oversubscription flags where they apply (also when the kind
    is unknown: Open MPI is the common case), and ``--bind-to none``: Open MPI binds each
    of one or two ranks to a core, the same first cores for every job, so two jobs at once
    shared one core while the others idled (horovodrun passes ``-bind-to none`` too).
    Hydra needs none (MPICH binds nothing unless asked)."""
    if kind in ("mpich", "intel"):
        return []
    flags = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return flags + (["--oversubscribe"] if ranks > cores else []) + ["--bind-to", "none"]


def passing_signals(program: str) -> str:
    """What to start for ``program`` (a launcher's name on PATH, or its path) so that a signal
    sent to it reaches the ranks: ``program`` itself, unless it is an ``mpirun`` that is a
    script with an ``mpiexec.hydra`` (else ``mpiexec``) binary beside it: that binary's path.

    Intel MPI's mpirun is such a script (/bin/sh): it runs ``mpiexec.hydra`` as its child
    without exec, so SIGUSR1 or SIGTERM sent to it ended the script while Hydra and the ranks
    went on (a warned job failed with status 138 instead of checkpointing, a stopped run's
    ranks were orphaned). Hydra itself passes both on to every rank, and reads the batch
    system's allocation (Slurm, PBS, LSF, ...) as the script would. Open MPI's and MPICH's
    mpirun are the launcher itself."""
    if Path(program).name != "mpirun":
        return program
    path = shutil.which(program)
    if path is None or not _starts_with(path, b"#!"):
        return program
    folder = Path(os.path.realpath(path)).parent
    for name in _HYDRA:
        if _starts_with(folder / name, b"\x7fELF") and os.access(folder / name, os.X_OK):
            return str(folder / name)
    return program


def _starts_with(path: str | Path, magic: bytes) -> bool:
    """Whether the file at ``path`` starts with ``magic`` (False if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False
