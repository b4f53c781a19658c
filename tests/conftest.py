"""Shared test helpers: launching whole jobs under mpirun with a timeout."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HPCTRAIN = [sys.executable, "-m", "hpctrain.cli"]


def mpirun(np: int) -> list[str]:
    """The mpirun command line for ``np`` ranks on this machine (root, oversubscribed)."""
    cmd = os.environ.get("HPCTRAIN_MPIRUN")
    if cmd:
        base = shlex.split(cmd)
    else:
        base = ["mpirun", "--oversubscribe", "-x", "OMPI_MCA_osc=^ucx"]
        if os.geteuid() == 0:
            base.append("--allow-run-as-root")
    return [*base, "-np", str(np)]


def run_job(args: list[str], np: int = 1, timeout: float = 120, env: dict | None = None,
            mpi_args: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``hpctrain <args>`` on ``np`` ranks (plain process if np == 0); fail on timeout."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = HPCTRAIN + args if np == 0 else mpirun(np) + (mpi_args or []) + HPCTRAIN + args
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=full_env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"job hung past {timeout}s: {' '.join(cmd)}\n{e.stdout}\n{e.stderr}")
