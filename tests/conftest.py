"""Shared test helpers and constants: launching whole jobs under mpirun with a timeout, and the
test kinds.

Every test is one of three kinds, by marker: ``mpi`` (runs inside ``mpirun``, declared by the
test), ``job`` (starts whole jobs from plain pytest: any test whose code, as its syntax tree
shows, calls a launcher helper or ``subprocess``) and ``unit`` (everything else: one
process). The last two are set here at collection, so a new test cannot be left unmarked.
``make test-fast`` runs ``unit``.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import errno
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
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# A model (--model FILE.py:build) whose finite gradients of about 1e36 step float32
# parameters to Inf at --lr 1e6: Adasum's combined update is then NaN.
LOUD_MODEL = """
import math

from torch import nn


class Loud(nn.Module):
    def __init__(self, features, classes):
        super().__init__()
        self.linear = nn.Linear(features, classes)

    def forward(self, x):
        return self.linear(x.flatten(1)) * 1e36  # finite gradients of about 1e36


def build(input_shape, num_classes):
    return Loud(math.prod(input_shape), num_classes)
"""


# What starts a job or another program, read from the syntax tree (not the text, where a
# docstring or an expected message may name a launcher): a reference to one of conftest's
# launch helpers, a call of ``subprocess``, ``multiprocessing`` or ``concurrent.futures``
# (under any name they are imported as; or os.system, os.exec*, os.spawn*, os.fork*), or an
# argv list (not one an assert compares with) that starts with a launcher or sys.executable.
_LAUNCH_HELPERS = frozenset({"run_job", "start_job", "run_commands", "run_program", "mpirun",
                             "torchrun", "TORCHRUN"})
_LAUNCHER_WORDS = frozenset({"mpirun", "mpiexec", "srun", "sbatch", "salloc", "torchrun"})
_OS_SPAWNS = ("system", "popen", "exec", "spawn", "posix_spawn", "fork")
_SPAWNING_MODULES = frozenset({"subprocess", "multiprocessing", "concurrent.futures"})


def _starts_program(node: ast.AST, parents: dict[ast.AST, ast.AST],
                    spawning: set[str]) -> bool:
    """Whether ``node`` starts a program; ``spawning``: the names the spawning modules have
    in this file (``mp`` for ``import multiprocessing as mp``)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        module, name = ast.unparse(node.func.value), node.func.attr
        return module in spawning or (module == "os" and name.startswith(_OS_SPAWNS))
    if isinstance(node, (ast.List, ast.Tuple)) and node.elts \
            and not isinstance(parents.get(node), ast.Compare):
        first = node.elts[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return Path(first.value).name in _LAUNCHER_WORDS  # "mpirun", ".../bin/srun"
        return ast.unparse(first) == "sys.executable"  # another Python's command line
    return False


def _launchers(module) -> set[str]:
    """Names of ``module``'s functions, fixtures and classes (and of module-level names bound
    to what uses them) that launch jobs, directly or through each other, from its syntax
    tree: what their bodies (not their decorators, which run at import) call or refer to."""
    tree = ast.parse(Path(module.__file__).read_text(), module.__file__)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    bodies: dict[str, list[ast.AST]] = {}  # each top-level name: the nodes its use runs
    subprocess_names = set()  # from subprocess (or multiprocessing) import run (as ...)
    spawning = set(_SPAWNING_MODULES)  # the modules' own names and those they are imported as
    for node in ast.walk(tree):  # imports inside functions too
        if isinstance(node, ast.Import):
            spawning |= {alias.asname for alias in node.names
                         if alias.asname and alias.name in _SPAWNING_MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module in _SPAWNING_MODULES:
            subprocess_names |= {alias.asname or alias.name for alias in node.names}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bodies.setdefault(node.name, []).extend(node.body)
            for decorator in node.decorator_list:  # @pytest.fixture(name="x"): x is its name
                for keyword in getattr(decorator, "keywords", ()):
                    if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                        bodies.setdefault(keyword.value.value, []).extend(node.body)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            for target in getattr(node, "targets", [getattr(node, "target", None)]):
                if isinstance(target, ast.Name):
                    bodies.setdefault(target.id, []).append(node.value)
    refers: dict[str, set[str]] = {}
    direct = set()
    for name, nodes in bodies.items():
        inside = [n for top in nodes for n in ast.walk(top)]
        refers[name] = {n.id for n in inside if isinstance(n, ast.Name)}
        # run_job(...) or run_job passed on, not the attribute of a module of the same name
        # (hpctrain.mpirun's flavour_of is not conftest's mpirun)
        used = {n.id for n in inside if isinstance(n, ast.Name)
                and not isinstance(parents.get(n), ast.Attribute)}
        if _LAUNCH_HELPERS & used or subprocess_names & refers[name] \
                or any(_starts_program(n, parents, spawning) for n in inside):
            direct.add(name)
    found = direct
    while True:
        more = {n for n, names in refers.items() if n not in found and names & found}
        if not more:
            return found
        found |= more


# The files whose tests take longest in all (summed from make test-unit's pytest command with
# --durations=0), longest first: under --dist loadfile a long file handed out last leaves
# one pytest worker running it alone at the end, minutes in which the other core idles.
_LONGEST_FIRST = ("test_watchdog.py", "test_slurm.py", "test_checkpoint_jobs.py",
                  "test_bench_compare.py", "test_launchers.py", "test_own_algorithm.py",
                  "test_cli.py", "test_sync_elastic.py", "test_sim.py", "test_tensorboard.py",
                  "test_api.py", "test_faults.py", "test_own_code_jobs.py",
                  "test_async_train.py", "test_rank_agreement.py", "test_collapse.py",
                  "test_bench_cli.py", "test_compile.py", "test_sync_horovod_names.py",
                  "test_other_mpis.py", "test_resize_jobs.py", "test_compare_seeds.py")


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
        launches = (item.function.__name__ in launchers or launchers & set(item.fixturenames)
                    or (item.cls is not None and item.cls.__name__ in launchers))
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


# A rank standing in for hpctrain's where only signals matter: it says which one stopped it
# (SIGUSR1: exit 5, as after a checkpoint; SIGTERM: 143) or that none did, and writes its pid
# to $RANKS/<its rank> once it is ready for them.
SIGNALLED_RANK = """\
rank=${PMI_RANK:-$OMPI_COMM_WORLD_RANK}
trap 'echo "rank $rank stopped by SIGUSR1" >&2; exit 5' USR1
trap 'echo "rank $rank stopped by SIGTERM" >&2; exit 143' TERM
echo $$ > "$RANKS/$rank.tmp" && mv "$RANKS/$rank.tmp" "$RANKS/$rank"
for _ in $(seq 900); do sleep 0.1; done
echo "rank $rank ran to its end" >&2
"""


def ranks_ready(folder: Path, n: int, timeout: float = 60,
                launcher: subprocess.Popen | None = None) -> list[int]:
    """The pids of ``n`` :data:`SIGNALLED_RANK` ranks, once each has written it in
    ``folder``; a failure after ``timeout`` seconds, or as soon as their ``launcher`` ended
    (with what it said, when its stderr or stdout is a pipe)."""
    deadline = time.monotonic() + timeout
    while len(pids := [int(f.read_text()) for f in folder.iterdir() if f.name.isdigit()]) < n:
        if launcher is not None and launcher.poll() is not None:
            pipe = launcher.stderr or launcher.stdout
            said = pipe.read() if pipe else ""
            # Open MPI's mpirun ends with status 1 and says nothing when SIGTERM or SIGINT
            # ends it: the signal's sender is then the question
            raise AssertionError(f"the launcher ended with status {launcher.returncode} after "
                                 f"{len(pids)} of {n} ranks started: {said!r}")
        assert time.monotonic() < deadline, f"{len(pids)} of {n} ranks started in {timeout} s"
        time.sleep(0.05)
    return pids


def alive(pid: int) -> bool:
    """Whether process ``pid`` is running (not ended, nor a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _processes() -> dict[int, tuple[int, int]]:
    """Each process's (parent, process group), from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            found[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))
        except (OSError, IndexError, ValueError):  # ended meanwhile
            continue
    return found


def _group_of(proc: subprocess.Popen, table: dict[int, tuple[int, int]]) -> set[int]:
    """The processes of ``proc``'s process group (started in a session of its own)."""
    return {pid for pid, (_, group) in table.items() if group == proc.pid}


def _signal_job(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to the process group of ``proc`` (started in a session of its own), while its
    id is still the job's (``proc`` not reaped yet, or a process of the group running);
    SIGKILL also to every process the launcher started, outside its group too: Open MPI's
    mpirun starts each rank in a session of its own, and torchrun's agent each worker
    (SIGTERM reaches them through the launcher, which passes it on)."""
    table = _processes()
    unreaped = proc.returncode is None
    if unreaped or _group_of(proc, table):
        with contextlib.suppress(ProcessLookupError):  # the group has ended
            os.killpg(proc.pid, sig)
    if sig == signal.SIGKILL and unreaped:
        tree, parents = set(), [proc.pid]
        while parents:
            children = {pid for pid, (ppid, _) in table.items() if ppid == parents[-1]}
            parents.pop()
            parents.extend(children - tree)
            tree |= children
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _stop(proc: subprocess.Popen, send, grace: float) -> tuple[str, str]:
    """End ``proc`` with ``send(signal)``: SIGTERM first, which lets a launcher (mpirun,
    torchrun's agent, bench compare) end what it started, SIGKILL if it has not ended after
    ``grace`` seconds or the wait is interrupted; then what it wrote."""
    send(signal.SIGTERM)
    try:
        return proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
    except BaseException:  # interrupted while waiting: end it all the same
        send(signal.SIGKILL)
        raise
    try:
        return proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # something it left, outside its group, holds the pipes
        return "", "(not read: a process it left holds its output open)"


def _wait(proc: subprocess.Popen, cmd: list[str], timeout: float, send, what: str,
          grace: float) -> subprocess.CompletedProcess:
    """``proc``'s outcome, or a failure naming ``cmd`` and what it wrote if it runs past
    ``timeout`` seconds; past it, or when the test is interrupted (pytest-timeout, ^C), it
    is ended by :func:`_stop` (``grace`` seconds between SIGTERM and SIGKILL) so that
    nothing it started outlives the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _stop(proc, send, grace)
        pytest.fail(f"{what} hung past {timeout}s: {' '.join(cmd)}\n{out}\n{err}")
    except BaseException:  # what it wrote goes to the report's captured output
        out, err = _stop(proc, send, grace)
        print(f"{what} interrupted: {' '.join(cmd)}\n{out}\n{err}", file=sys.stderr)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _launch(program: list[str], np: int, timeout: float, env: dict | None,
            mpi_args: list[str] | None, mpi: str = "openmpi") -> subprocess.CompletedProcess:
    """``program`` on ``np`` ranks under ``mpi``'s mpirun (Debian's Open MPI, or one of
    :data:`OTHER_MPIS`; a plain process if np == 0); fail on timeout. It runs in a session
    of its own, whose whole process group is ended on a timeout: a plain process's own
    launches (bench compare's mpiruns) as well as mpirun and its ranks."""
    other = mpi != "openmpi"
    launcher = [str(OTHER_MPIS[mpi] / "bin" / "mpirun"), "-n", str(np)] if other else mpirun(np)
    cmd = program if np == 0 else launcher + (mpi_args or []) + program
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1",
                                 **(mpi_env(mpi) if other else {}), **(env or {})},
                            cwd=ROOT, start_new_session=True)

    def send(sig: int) -> None:
        _signal_job(proc, sig)

    return _wait(proc, cmd, timeout, send, "job", grace=5)  # mpirun ends its ranks in ~1 s


def run_job(args: list[str], np: int = 1, timeout: float = 120, env: dict | None = None,
            mpi_args: list[str] | None = None, mpi: str = "openmpi"
            ) -> subprocess.CompletedProcess:
    """Run ``hpctrain <args>`` on ``np`` ranks of ``mpi`` (plain process if np == 0); fail on
    timeout."""
    return _launch(HPCTRAIN + args, np, timeout, env, mpi_args, mpi)


# start_job's jobs, oldest first: :func:`_no_job_left` ends (:func:`end_job`) each that a test
# started once the test is over, and the session's end those that a fixture shared by several
# tests started.
_STARTED: list[subprocess.Popen] = []


def start_job(args: list[str], np: int, env: dict | None = None) -> subprocess.Popen:
    """``hpctrain <args>`` on ``np`` ranks of Open MPI (a plain process if np == 0) with
    ``env`` added to the environment, started and left running (to signal it); the caller
    waits for it with a timeout, and kills it in a ``finally``. It runs in a session of its
    own: a signal the test sends (``job.send_signal``, ``job.kill()``) reaches the launcher
    alone, as a scheduler's does, and whatever of the job is left when the test ends (the
    launcher, its group: bench compare's runs; mpirun's ranks) is ended then (:func:`end_job`)."""
    job = subprocess.Popen((mpirun(np) if np else []) + HPCTRAIN + args, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    _STARTED.append(job)
    return job


def end_job(job: subprocess.Popen, grace: float = 5) -> str:
    """End what is left of :func:`start_job` ``job`` as a timeout ends a ``run_job`` launch
    (:func:`_stop`: SIGTERM to its group, which mpirun passes on to its ranks; SIGKILL to the
    group and the launcher's tree if it has not ended after ``grace`` seconds), then SIGKILL
    to any of its group still running: nothing it started outlives a test. Its stderr, as
    far as it can be read."""
    def send(sig: int) -> None:
        _signal_job(job, sig)

    if job.returncode is None or _group_of(job, _processes()):
        said = _stop(job, send, grace)[1]
        send(signal.SIGKILL)  # what the launcher left in its group, if it ended on SIGTERM
        return said
    try:  # ended and reaped already: what it wrote that is still unread
        return job.communicate(timeout=grace)[1]
    except subprocess.TimeoutExpired:
        return "(not read: a process it left holds its output open)"


def _end_left(job: subprocess.Popen) -> None:
    """End ``job`` (:func:`end_job`) and, if it was still running, print what it wrote: the
    test's report shows it (captured at teardown), where the test's own ``finally`` may have
    killed the launcher alone and read nothing."""
    running = job.poll() is None
    said = end_job(job)
    if running:
        print(f"a job left running was ended: {shlex.join(map(str, job.args))}\n{said}",
              file=sys.stderr)


@pytest.fixture(autouse=True)
def _no_job_left():
    """Every :func:`start_job` job a test started ends with the test, passed or failed."""
    first = len(_STARTED)
    yield
    while len(_STARTED) > first:
        _end_left(_STARTED.pop())


def pytest_sessionfinish() -> None:
    """The jobs that fixtures shared by several tests started, and that still run, end with
    the session. One reaped long ago is left: its process group's id may have been reused by
    then (pid_max is 32768 here), and another job's group would be signalled."""
    while _STARTED:
        job = _STARTED.pop()
        if job.poll() is None:
            _end_left(job)


def warn_after_checkpoint(job: subprocess.Popen, folder: Path, timeout: float = 120) -> str:
    """SIGUSR1 (a time limit's warning; mpirun passes it on to every rank) to a ``start_job``
    job once ``folder`` holds a checkpoint; the job's stderr when it has ended. It fails if
    the job ends first, and the job is killed if it outlives ``timeout`` seconds."""
    from hpctrain.checkpoint import listing

    try:
        deadline = time.monotonic() + timeout
        while not listing(folder):
            if (ended := job.poll()) is not None or time.monotonic() > deadline:
                said = f"ended, exit {ended}" if ended is not None else f"after {timeout} s"
                pytest.fail(f"no checkpoint in {folder} ({said}): {end_job(job)}")
            time.sleep(0.01)
        job.send_signal(signal.SIGUSR1)
        try:
            return job.communicate(timeout=timeout)[1]
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout} s after SIGUSR1: {end_job(job)}")
    finally:
        end_job(job)  # the rest of its group, if it left any


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


def gpu_missing() -> str | None:
    """Why GPU tests skip here, or None. scripts/gpu-check.sh sets HPCTRAIN_REQUIRE_GPU=1 on
    a GPU machine: there a GPU torch cannot see fails them instead of skipping them all."""
    import torch

    if torch.cuda.is_available() or os.environ.get("HPCTRAIN_REQUIRE_GPU") == "1":
        return None
    return "torch sees no GPU"


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


@contextlib.contextmanager
def full_disk(folder: Path, kib: int = 64):
    """``folder`` (made) a tmpfs of ``kib`` KiB for the body, which :func:`fill` fills: then
    the next write that needs a new page fails with ENOSPC, as on a full disk or a spent
    quota. Skips unless root can mount (a container without CAP_SYS_ADMIN). Through
    mount(2), not mount(8): a test that starts no program stays a unit test."""
    libc = ctypes.CDLL(None, use_errno=True)
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or libc.mount(b"tmpfs", bytes(folder), b"tmpfs", 0,
                                       f"size={kib}k".encode()) != 0:
        pytest.skip("cannot mount a small tmpfs (needs root) to fill up")
    try:
        yield folder
    finally:
        libc.umount2(bytes(folder), 2)  # MNT_DETACH: also with a file still open


def fill(folder: Path) -> None:
    """Take what is left of ``folder``'s file system, in ``folder/filler``."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, bytes(65536))
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)


def refusal(args: list[str], ranks: int = 1) -> str:
    """What ``hpctrain train`` refuses before MPI starts on ``ranks`` ranks, checked in this
    process: the same parser, configuration and launch check a job runs, so one real job per
    kind of refusal shows the exit status and the one line; the rest need no launch."""
    from hpctrain import arguments, cli, launch_checks, options
    from hpctrain.errors import UsageError

    with pytest.raises(UsageError) as refused, options.command_line():  # as cli.main names
        config, given = arguments.build_given(cli.build_parser().parse_args(["train", *args]))
        launch_checks.check_launch(config, ranks, given)
    message = str(refused.value)
    assert "\n" not in message  # printed as one line
    return message


def torchrun(args: list[str], nproc: int, log_dir: Path, timeout: float = 180,
             script: str | None = None, options: tuple[str, ...] = (),
             env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc --log-dir log_dir [options] -m hpctrain <args>`` (or
    ``script <args>``), outside this process's MPI job; fail on timeout. ``log_dir`` (under
    the test's tmp_path) keeps torch's logs out of a /tmp/torchelastic_* folder of their own.
    On a timeout the agent is sent SIGTERM, which ends its workers (each in a session of its
    own), then SIGKILL, to the agent and every process it started."""
    cmd = [*TORCHRUN, "--nproc-per-node", str(nproc), "--log-dir", str(log_dir), *options,
           *([script] if script else ["-m", "hpctrain"]), *args]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI"))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**clean, "OMP_NUM_THREADS": "1", **(env or {})},
                            start_new_session=True)

    def send(sig: int) -> None:
        _signal_job(proc, sig)

    return _wait(proc, cmd, timeout, send, "torchrun", grace=20)


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
