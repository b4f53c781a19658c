"""Shared test helpers and constants: launching whole jobs under mpirun with a timeout, and the
test kinds.

Every test is one of three kinds, by marker: ``mpi`` (runs inside ``mpirun``, declared by the
test), ``job`` (starts whole jobs from plain pytest: any test whose code calls a launcher
helper or ``subprocess``) and ``unit`` (everything else: one process). The last two are set
here at collection, so a new test cannot be left unmarked. ``make test-fast`` runs ``unit``.
"""

from __future__ import annotations

import inspect
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HPCTRAIN = [sys.executable, "-m", "hpctrain"]
# Fast training jobs: synthetic data, the MLP, no progress bar (each file adds its epochs).
SYNTHETIC = ["--dataset", "synthetic", "--model", "mlp", "--no-progress"]
_LAUNCHES = ("run_job(", "start_job(", "run_commands(", "run_program(", "subprocess.",
             "mpirun(", "torchrun(", "sbatch", "srun")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def _launchers(module) -> set[str]:
    """Names of ``module``'s functions and fixtures that launch jobs, directly or through each
    other."""
    sources = {}
    for name, obj in vars(module).items():
        if not inspect.isfunction(obj):  # a fixture (pytest >= 8.4 wraps its function)
            obj = getattr(obj, "__wrapped__", obj)
        if inspect.isfunction(obj) and obj.__module__ == module.__name__:
            sources[name] = inspect.getsource(obj)
    found = {n for n, src in sources.items() if any(w in src for w in _LAUNCHES)}
    while True:
        more = {n for n, src in sources.items() if n not in found
                and any(f"{f}(" in src for f in found)}
        if not more:
            return found
        found |= more


# The files whose tests take longest (make test's --durations), longest first: under
# --dist loadfile a long file handed out last leaves one pytest worker running it alone at
# the end, minutes in which the other core idles.
_LONGEST_FIRST = ("test_checkpoint_jobs.py", "test_slurm.py", "test_launchers.py",
                  "test_cli.py", "test_api.py", "test_bench_compare.py", "test_sync_elastic.py",
                  "test_faults.py", "test_async_train.py", "test_sim.py",
                  "test_own_code_jobs.py", "test_compile.py", "test_other_mpis.py",
                  "test_resize_jobs.py", "test_async_jobs.py")


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
    cache: dict[str, set[str]] = {}
    for item in items:
        if any(item.get_closest_marker(m) for m in ("mpi", "job", "unit")):
            continue
        module = item.module
        if module.__name__ not in cache:
            cache[module.__name__] = _launchers(module)
        launchers = cache[module.__name__]
        launches = item.function.__name__ in launchers or launchers & set(item.fixturenames)
        item.add_marker(pytest.mark.job if launches else pytest.mark.unit)


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


# Hydra's MPIs beside Debian's Open MPI: MPICH's and Intel MPI's mpirun and library from their
# PyPI wheels, which setup.sh --tests (make test) puts under .venv, off PATH. A job on one puts
# them first on PATH and the loader's path (mpi4py's wheel loads the libmpi the loader finds).
OTHER_MPIS = {"mpich": ROOT / ".venv" / "mpich", "intel": ROOT / ".venv" / "impi"}


def mpi_env(mpi: str) -> dict[str, str]:
    """The variables that make ``mpi`` (a key of :data:`OTHER_MPIS`) this job's MPI."""
    prefix = OTHER_MPIS[mpi]
    return {"PATH": f"{prefix / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "LD_LIBRARY_PATH": str(prefix / "lib")}


def needs_mpi(mpi: str) -> pytest.MarkDecorator:
    """Skip where ``mpi``'s wheel is not installed (set-up's pip failed or was offline, or
    only ``make setup`` ran)."""
    prefix = OTHER_MPIS[mpi]
    return pytest.mark.skipif(not (prefix / "bin" / "mpirun").exists(),
                              reason=f"no {mpi} MPI in {prefix} (make test's set-up installs "
                              "its wheel)")


# Parametrize a test over Hydra's MPIs: @pytest.mark.parametrize("mpi", ON_OTHER_MPIS).
ON_OTHER_MPIS = [pytest.param(mpi, marks=needs_mpi(mpi)) for mpi in OTHER_MPIS]


def _launch(program: list[str], np: int, timeout: float, env: dict | None,
            mpi_args: list[str] | None, mpi: str = "openmpi") -> subprocess.CompletedProcess:
    """``program`` on ``np`` ranks under ``mpi``'s mpirun (Debian's Open MPI, or one of
    :data:`OTHER_MPIS`; a plain process if np == 0); fail on timeout."""
    other = mpi != "openmpi"
    launcher = [str(OTHER_MPIS[mpi] / "bin" / "mpirun"), "-n", str(np)] if other else mpirun(np)
    cmd = program if np == 0 else launcher + (mpi_args or []) + program
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1",
                                   **(mpi_env(mpi) if other else {}), **(env or {})},
                              cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"job hung past {timeout}s: {' '.join(cmd)}\n{e.stdout}\n{e.stderr}")


def run_job(args: list[str], np: int = 1, timeout: float = 120, env: dict | None = None,
            mpi_args: list[str] | None = None, mpi: str = "openmpi"
            ) -> subprocess.CompletedProcess:
    """Run ``hpctrain <args>`` on ``np`` ranks of ``mpi`` (plain process if np == 0); fail on
    timeout."""
    return _launch(HPCTRAIN + args, np, timeout, env, mpi_args, mpi)


def start_job(args: list[str], np: int, env: dict | None = None) -> subprocess.Popen:
    """``hpctrain <args>`` on ``np`` ranks of Open MPI (a plain process if np == 0) with
    ``env`` added to the environment, started and left running (to signal it); the caller
    waits for it with a timeout, and kills it in a ``finally``."""
    return subprocess.Popen((mpirun(np) if np else []) + HPCTRAIN + args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def warn_after_checkpoint(job: subprocess.Popen, folder: Path, timeout: float = 120) -> str:
    """SIGUSR1 (a time limit's warning; mpirun passes it on to every rank) to a ``start_job``
    job once ``folder`` holds a checkpoint; the job's stderr when it has ended. It fails if
    the job ends first, and the job is killed if it outlives ``timeout`` seconds."""
    from hpctrain.checkpoint import listing

    try:
        deadline = time.monotonic() + timeout
        while not listing(folder):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.01)
        job.send_signal(signal.SIGUSR1)
        return job.communicate(timeout=timeout)[1]
    finally:
        job.kill()


def run_program(program: list[str], np: int = 0, timeout: float = 120, env: dict | None = None,
                mpi_args: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``program`` (a script, an example) as ``run_job`` runs hpctrain: on ``np`` ranks,
    a plain process if np == 0 (the default); fail on timeout."""
    return _launch(program, np, timeout, env, mpi_args)


# One launch, several ``hpctrain`` command lines in turn through the CLI's own main(), each with
# its own $HPCTRAIN_INJECT: the same parser and training as separate jobs, for one start-up
# (torch's and Dynamo's imports, most of a small job's time).
_COMMANDS = """
import json, os, sys
from hpctrain import cli
for argv, inject in json.loads(sys.argv[1]):
    os.environ.pop("HPCTRAIN_INJECT", None)
    if inject:
        os.environ["HPCTRAIN_INJECT"] = inject
    cli.main(argv)
"""


def run_commands(commands: list[list[str]], np: int = 1, timeout: float = 240,
                 injects: list[str | None] | None = None,
                 mpi_args: list[str] | None = None, mpi: str = "openmpi",
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """``hpctrain <argv>`` for each argv of ``commands`` in turn, in one launch of ``np`` ranks
    of ``mpi`` (plain process if np == 0) with ``env`` added to the environment, and
    ``injects[i]`` as command i's $HPCTRAIN_INJECT; fail on timeout. A command that fails
    ends the launch."""
    pairs = list(zip(commands, injects or [None] * len(commands), strict=True))
    return _launch([sys.executable, "-c", _COMMANDS, json.dumps(pairs)], np, timeout, env,
                   mpi_args, mpi)


def horovod_missing() -> str | None:
    """Why ``backend="horovod"`` cannot run in this process, or None. Horovod here is built
    against Debian's Open MPI (scripts/build_horovod.sh), so under another MPI (the MPICH
    and Intel MPI phases) its library would clash with the running one: skipped without
    importing it."""
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is not None and MPI.Is_initialized():
        from hpctrain import comm

        library = comm.library_name(MPI)
        if "Open MPI" not in library:
            return f"Horovod here is built with Open MPI; this job runs {library}"
    try:
        import horovod.torch  # noqa: F401
    except Exception as e:  # noqa: BLE001 (a failed build raises anything)
        return f"horovod.torch is not importable ({type(e).__name__}: {e}); run make setup"
    return None


def refusal(args: list[str], ranks: int = 1) -> str:
    """What ``hpctrain train`` refuses before MPI starts on ``ranks`` ranks, checked in this
    process: the same parser, configuration and launch check a job runs, so one real job per
    kind of refusal shows the exit status and the one line; the rest need no launch."""
    from hpctrain import arguments, cli, run
    from hpctrain.errors import UsageError

    with pytest.raises(UsageError) as refused:
        run.check_launch(arguments.build(cli.build_parser().parse_args(["train", *args])), ranks)
    message = str(refused.value)
    assert "\n" not in message  # printed as one line
    return message


def torchrun(args: list[str], nproc: int, timeout: float = 180, script: str | None = None,
             options: tuple[str, ...] = (), env: dict | None = None
             ) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc [options] -m hpctrain <args>`` (or ``script
    <args>``), outside this process's MPI job; fail on timeout."""
    cmd = [*TORCHRUN, "--nproc-per-node", str(nproc), *options,
           *([script] if script else ["-m", "hpctrain"]), *args]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI"))}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**clean, "OMP_NUM_THREADS": "1", **(env or {})})
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun hung past {timeout}s: {' '.join(cmd)}\n{e.stdout}\n{e.stderr}")


@pytest.fixture(params=["mpi", "torch"])
def own_backend(request):
    """``hpctrain.sync`` started on one of hpctrain's own backends (mpi, torch), shut down
    afterwards: for MPI tests of what both do alike (Horovod's backend is Horovod's)."""
    import torch

    import hpctrain.sync as sync

    torch.set_num_threads(1)
    sync.init(backend=request.param)
    yield sync
    sync.shutdown()
