"""The ``mpirun`` on PATH: which MPI's it is, and the flags it needs to start ranks here.

Open MPI's mpirun and Hydra's (MPICH's, Intel MPI's) take different flags: Open MPI refuses
to run as root without ``--allow-run-as-root`` and more ranks than cores without
``--oversubscribe``; Hydra knows neither flag and needs neither. Launchers that build an
mpirun command (``hpctrain horovodrun``, ``bench compare``'s default) ask
:func:`flavour_of`.
Light: no torch, no MPI started.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

# Open MPI's, MPICH's and Intel MPI's, told apart by ``mpirun --version``.
FLAVOURS = ("openmpi", "mpich", "intel")


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
    is unknown: Open MPI is the common case); Hydra needs none."""
    if kind in ("mpich", "intel"):
        return []
    flags = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return flags + (["--oversubscribe"] if ranks > cores else [])
