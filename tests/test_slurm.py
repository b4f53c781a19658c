"""``slurm/*.sbatch`` on a real single-node Slurm (Debian's slurm-wlm and munge).

The fixture starts munged, slurmctld and slurmd as root in a fresh folder under /tmp with their
own configuration, key, state, spool and free ports, so nothing clashes with a site's Slurm or
with another run of this test. Daemons are stopped by their process ids; a folder left by a
crashed run (its owner process gone) is cleaned up, daemons included, by the next run. The test
is skipped, with the reason, only where Slurm cannot start here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    ON_OTHER_MPIS,
    ROOT,
    SIGNALLED_RANK,
    SYNTHETIC,
    alive,
    mpi_env,
    ranks_ready,
)

PREFIX = "hpctrain-slurm-"
NODE = "hpctrain-node"
DAEMONS = ("munged", "slurmctld", "slurmd")
SMALL = [*SYNTHETIC, "--epochs", "1"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pids_of(folder: Path) -> list[int]:
    """Processes of ``folder``'s Slurm: daemons (their command line names the folder), job
    steps and their processes (their environment does, through SLURM_CONF)."""
    key = str(folder).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if key in (entry / "cmdline").read_bytes() or key in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return pids


def _stop(folder: Path, grace: float = 10.0) -> None:
    """SIGTERM, then after ``grace`` seconds SIGKILL, every process of ``folder``'s Slurm."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in _pids_of(folder):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _pids_of(folder) and time.monotonic() < deadline:
            time.sleep(0.2)


def _clean_leftovers() -> None:
    """Stop the Slurm of earlier runs whose owner process died, and remove their folders."""
    for folder in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            owner = int((folder / "owner").read_text())
        except (OSError, ValueError):
            owner = None
        if owner is not None and _alive(owner):
            continue  # another run of this test, still going
        LocalSlurm(folder).stop()
        shutil.rmtree(folder, ignore_errors=True)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalSlurm:
    """A one-node Slurm in ``folder``; commands run with its configuration."""

    def __init__(self, folder: Path):
        self.dir = folder
        self.daemons: list[subprocess.Popen] = []  # those started here, to reap them
        self.env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}

    def write_config(self) -> None:
        d = self.dir
        for sub in ("munge", "state", "spool", "log"):
            (d / sub).mkdir(mode=0o700)
        (d / "munge.key").write_bytes(os.urandom(1024))
        (d / "munge.key").chmod(0o600)
        ctld_port, slurmd_port = _free_ports(2)
        host = socket.gethostname()
        cpus = max(4, os.cpu_count() or 1)  # config_overrides lets the node claim more
        (d / "slurm.conf").write_text(f"""\
ClusterName=hpctrain-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
KillWait=3
NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")

    def _start(self, name: str, *args: str) -> None:
        with open(self.dir / "log" / f"{name}.out", "wb") as log:
            proc = subprocess.Popen([name, *args], stdout=log, stderr=subprocess.STDOUT,
                                    env=self.env, start_new_session=True)
        self.daemons.append(proc)
        time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at once: {self.log_tail(name)}")

    def start(self, timeout: float = 60.0) -> None:
        d = self.dir
        self._start("munged", "--foreground", "--force", f"--socket={d}/munge/munge.socket",
                    f"--key-file={d}/munge.key", f"--pid-file={d}/munge/munged.pid",
                    f"--log-file={d}/log/munged.log", f"--seed-file={d}/munge/seed")
        self._start("slurmctld", "-D", "-c", "-f", str(d / "slurm.conf"))
        self._start("slurmd", "-D", "-N", NODE, "-f", str(d / "slurm.conf"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-n", NODE, "-o", "%T", check=False).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            if state.startswith(("down", "drain")):
                self.run("scontrol", "update", f"nodename={NODE}", "state=resume", check=False)
            time.sleep(1)
        raise RuntimeError(f"node not ready after {timeout:.0f}s (state {state!r}): "
                           f"{self.log_tail('slurmctld')} {self.log_tail('slurmd')}")

    def run(self, *cmd: str, check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env,
                                  timeout=timeout, **kw)
        except subprocess.TimeoutExpired:  # the daemons' last words say why
            raise RuntimeError(f"{' '.join(cmd)}: no answer in {timeout:.0f}s: "
                               f"{self.log_tail('slurmctld', 15)}") from None
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return proc

    def log_tail(self, name: str, lines: int = 5) -> str:
        texts = [p.read_text(errors="replace") for p in (self.dir / "log").glob(f"{name}*")]
        return " | ".join(" / ".join(t.strip().splitlines()[-lines:]) for t in texts if t)

    def diagnosis(self, work: Path, job: str) -> str:
        """What a failed wait reports: the node's state, the queue, this Slurm's processes
        (a step process left behind holds the node) and the job's and daemons' logs."""
        node = self.run("sinfo", "-h", "-n", NODE, "-o", "%T %E", check=False).stdout.strip()
        queue = self.run("squeue", "-h", "-o", "%i %T %r", check=False).stdout.strip()
        procs = []
        for pid in _pids_of(self.dir):
            try:
                procs.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                             .decode(errors="replace")[:120])
            except OSError:
                pass
        return (f"node: {node!r}; queue: {queue!r}; processes: {procs}\n"
                f"job log:\n{job_log(work, job)}\nslurmctld: {self.log_tail('slurmctld', 15)}"
                f"\nslurmd: {self.log_tail('slurmd', 15)}")

    def stop(self, timeout: float = 20.0) -> None:
        """Cancel the jobs, wait for them to end, then stop every process of this Slurm."""
        try:
            self.run("scancel", "--full", "--partition=test", check=False, timeout=10)
            deadline = time.monotonic() + timeout
            while self.run("squeue", "-h", check=False, timeout=10).stdout.strip() \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
        except (OSError, RuntimeError):
            pass  # daemons gone or not answering: their processes are stopped below
        _stop(self.dir)
        for proc in self.daemons:
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def slurm():
    missing = [d for d in (*DAEMONS, "sbatch", "sinfo") if shutil.which(d) is None]
    if missing:
        pytest.skip(f"Slurm cannot start: {', '.join(missing)} not installed "
                    "(Debian: apt-get install slurm-wlm munge; make test's set-up does)")
    if os.geteuid() != 0:
        pytest.skip("Slurm cannot start: slurmd and slurmctld run as root in this test")
    _clean_leftovers()
    folder = Path(tempfile.mkdtemp(prefix=PREFIX))
    (folder / "owner").write_text(str(os.getpid()))
    cluster = LocalSlurm(folder)
    try:
        cluster.write_config()
        try:
            cluster.start()
        except (RuntimeError, OSError) as e:  # installed and root: a failure, not a skip
            logs = "\n".join(f"{name}: {cluster.log_tail(name, 8) or '(no log)'}"
                             for name in DAEMONS)
            pytest.fail(f"Slurm is installed but did not start: {type(e).__name__}: {e}\n"
                        f"the daemons' logs (last lines):\n{logs}", pytrace=False)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def submit(cluster: LocalSlurm, script: str, options: list[str], args: list[str],
           env: dict) -> tuple[str, Path]:
    """Submit ``slurm/<script>`` (or the script at an absolute path) from a fresh folder;
    return the job id and the folder."""
    work = Path(tempfile.mkdtemp(dir=cluster.dir, prefix="job-"))
    exports = "".join(f",{k}={v}" for k, v in env.items())
    job = cluster.run("sbatch", "--parsable", f"--chdir={work}", f"--output={work}/slurm-%j.out",
                      f"--export=ALL{exports}", *options, str(ROOT / "slurm" / script),
                      *args).stdout.strip().split(";")[0]
    return job, work


RUNNING_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED")
POLL_S = 0.2  # between looks at a job's state: each change is seen that much later


def job_fields(cluster: LocalSlurm, job: str) -> dict:
    """``scontrol show job``'s fields for ``job``."""
    return dict(f.split("=", 1) for f in cluster.run(
        "scontrol", "-o", "show", "job", job).stdout.split() if "=" in f)


def wait(cluster: LocalSlurm, job: str, timeout: float = 240) -> dict:
    """Wait for ``job`` to end; return its ``scontrol show job`` fields."""
    deadline = time.monotonic() + timeout
    while True:
        fields = job_fields(cluster, job)
        if fields["JobState"] not in RUNNING_STATES:
            return fields
        if time.monotonic() > deadline:
            cluster.run("scancel", job, check=False)
            pytest.fail(f"job {job} not done in {timeout}s: {fields['JobState']}")
        time.sleep(POLL_S)


def sbatch(cluster: LocalSlurm, script: str, options: list[str], args: list[str],
           env: dict) -> tuple[str, Path]:
    """Submit ``slurm/<script>``, wait for it, check it completed; return its id and folder."""
    job, work = submit(cluster, script, options, args, env)
    fields = wait(cluster, job)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), \
        f"{script}: job {job} {fields['JobState']} {fields['ExitCode']}:\n{job_log(work, job)}"
    return job, work


def script_job(cluster: LocalSlurm, path: Path, lines: str, options: list[str]):
    """A batch script of ``lines`` written to ``path``, submitted and waited for as
    :func:`sbatch` does; its id and folder."""
    path.write_text(f"#!/bin/bash\n{lines}\n")
    return sbatch(cluster, str(path), options, [], {})


def job_log(work: Path, job: str) -> str:
    path = work / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else "(no log)"


JOB_ENV = {"HPCTRAIN_PYTHON": sys.executable, "HPCTRAIN_MPIRUN_ARGS": "-x OMPI_MCA_osc=^ucx"}


@pytest.mark.timeout(400)
def test_train_sbatch_runs_a_two_task_job_with_srun(slurm):
    """srun as the launcher (the requeue test below runs the script under both)."""
    job, work = sbatch(slurm, "train.sbatch",
                       ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"],
                       ["--algo", "ssgd", *SMALL], {**JOB_ENV, "HPCTRAIN_LAUNCH": "srun"})
    out = work / "runs" / f"train-{job}"  # outputs are named by the job id
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["algo"], summary["workers"]) == ("ssgd", 2)
    assert 0.0 <= summary["final_test_acc"] <= 1.0 and summary["updates"] > 0
    log = job_log(work, job)
    assert "OMP_NUM_THREADS=1" in log and "launcher srun" in log


@pytest.mark.timeout(300)
def test_train_sbatch_gives_a_tasks_threads_its_cpus_under_mpirun(slurm):
    """--cpus-per-task=2 with Open MPI's mpirun: the one rank was bound to one core and its
    two torch threads shared it (hpctrain now says so: the warning must not appear)."""
    job, work = sbatch(slurm, "train.sbatch",
                       ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--time=10"],
                       ["--algo", "sgd", *SMALL], JOB_ENV)
    log = job_log(work, job)
    assert "OMP_NUM_THREADS=2" in log and "launcher mpirun" in log, log
    assert "warning: --threads" not in log, log
    summary = json.loads((work / "runs" / f"train-{job}" / "summary.json").read_text())
    assert summary["workers"] == 1


@pytest.mark.timeout(300)
def test_torchrun_started_by_srun_gives_each_worker_its_own_local_rank(slurm, tmp_path):
    """One torchrun per node, started by srun (multi-node torchrun on Slurm): its workers all
    inherit srun's SLURM_LOCALID=0, and the GPU each takes comes from torchrun's LOCAL_RANK."""
    worker = tmp_path / "worker.py"
    # One write per line (print's pieces interleaved between the two workers: "seenseen 0 0 0")
    worker.write_text("import os\nfrom hpctrain import devices\n"
                      "os.write(1, f\"seen {os.environ['SLURM_LOCALID']} "
                      "{os.environ['LOCAL_RANK']} {devices.local_rank()}\\n\".encode())\n")
    job, work = script_job(slurm, tmp_path / "torchrun.sbatch",
                           f"srun --ntasks=1 {sys.executable} -m torch.distributed.run "
                           f"--standalone --nproc-per-node 2 --log-dir {tmp_path / 'torch-logs'} "
                           f"{worker}", ["--nodes=1", "--ntasks=1", "--cpus-per-task=2",
                                         "--time=5"])
    seen = sorted(tuple(line.split()[1:]) for line in job_log(work, job).splitlines()
                  if line.startswith("seen "))
    assert seen == [("0", "0", "0"), ("0", "1", "1")], job_log(work, job)


@pytest.mark.timeout(300)
def test_bad_input_under_srun_kill_on_bad_exit_exits_2(slurm, tmp_path):
    """Rank 1 waits for rank 0 to speak for all (the same refusal); srun -K then ended it
    with SIGTERM, and srun exited 143, as for a killed job."""
    job, work = script_job(slurm, tmp_path / "bad.sbatch",
                           f"srun --mpi=pmix --kill-on-bad-exit=1 -n 2 {sys.executable} -m "
                           f"hpctrain train --algo ssgd {' '.join(SMALL)} --lr -1 --out "
                           f"{tmp_path / 'run'}\necho \"srun status $?\"",
                           ["--nodes=1", "--ntasks=2", "--cpus-per-task=1", "--time=5"])
    log = job_log(work, job)
    assert "srun status 2" in log and log.count("--lr: must be > 0, got -1") == 1, log


@pytest.mark.timeout(300)
@pytest.mark.parametrize("plugin", ["none", "pmix"])
def test_ssgd_under_torchrun_started_by_srun_as_slurm_md_shows(slurm, tmp_path, plugin):
    """docs/SLURM.md's torchrun recipe (c10d rendezvous; here at 127.0.0.1, as the test node's
    name does not resolve): two workers train ssgd over torch.distributed. Each starts MPI as
    a singleton: inheriting srun's step (and PMIx's variables), Open MPI took each worker for
    an srun task and failed in MPI_Init, with either plugin (checked)."""
    out = tmp_path / "run"
    port = _free_ports(1)[0]
    job, work = script_job(
        slurm, tmp_path / "ddp.sbatch",
        f"srun --mpi={plugin} {sys.executable} -m torch.distributed.run "
        f"--nnodes \"$SLURM_NNODES\" --nproc-per-node 2 --rdzv-backend c10d "
        f"--rdzv-endpoint 127.0.0.1:{port} --rdzv-id \"$SLURM_JOB_ID\" "
        f"--log-dir {tmp_path / 'torch-logs'} "
        f"-m hpctrain train --algo ssgd {' '.join(SMALL)} --out {out}",
        ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--time=5"])
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["workers"], summary["algo_label"]) == (2, "ssgd (torch backend)"), \
        job_log(work, job)


def slurm_md_torchrun_script(python: str, port: int, train_args: list[str]) -> str:
    """docs/SLURM.md's torchrun batch script, as written but for what this one node lacks: a
    second node and GPUs (one node, two workers on its CPUs), a name that resolves (the
    rendezvous at 127.0.0.1, on a port free here), a Python named python; and the training's
    own options."""
    script = _slurm_md_script()
    for old, new in [("#SBATCH --nodes=2", "#SBATCH --nodes=1"),
                     ("#SBATCH --gpus-per-node=4\n", ""),
                     ("#SBATCH --cpus-per-task=32", "#SBATCH --cpus-per-task=2"),
                     ("srun python ", f"srun {python} "),
                     ("--nproc-per-node 4", "--nproc-per-node 2"),
                     ("port=$((20000 + SLURM_JOB_ID % 9500))", f"port={port}"),
                     ('"$head:$port"', '127.0.0.1:"$port"'),
                     ("--algo ssgd --threads 8 --checkpoint-every 1e",
                      f"--algo ssgd --threads 1 {' '.join(train_args)}")]:
        assert old in script, f"SLURM.md's torchrun script has no {old!r}"
        script = script.replace(old, new)
    return script


def _slurm_md_script() -> str:
    """docs/SLURM.md's torchrun batch script, as written."""
    doc = (ROOT / "docs" / "SLURM.md").read_text()
    return doc[doc.index("## torchrun under srun"):].split("```bash\n", 1)[1].split("```", 1)[0]


def test_slurm_mds_torchrun_script_takes_its_rendezvous_port_from_the_job_id():
    """The script's rendezvous was at a fixed port (29500): of two such jobs sharing a head
    node, the second's torchrun joined the first's c10d store as a client and died when the
    first ended, its --max-restarts no help. Each job's port now comes from its id (a
    requeued attempt, the same id, takes its own port again once the old store is gone),
    below torchrun's default port and Linux's ephemeral range (32768 up: 29500 + id % 10000
    was there for two ids in three), where another process's connection may hold it, which
    hung torchrun without a word."""
    script = _slurm_md_script()
    endpoint = re.search(r'--rdzv-endpoint "\$head:\$(\w+)"', script)
    assert endpoint, "SLURM.md's torchrun script has a fixed --rdzv-endpoint port"
    assigned = re.search(rf"^{endpoint[1]}=\$\(\((\d+) \+ SLURM_JOB_ID % (\d+)\)\)$", script,
                         re.MULTILINE)
    assert assigned, f"SLURM.md's torchrun script takes ${endpoint[1]} from no job id"
    base, spread = int(assigned[1]), int(assigned[2])
    assert 1024 <= base and base + spread <= 32768 and spread > 1  # ports, one per job
    assert not base <= 29500 < base + spread  # torchrun's default, other users' jobs


@pytest.mark.timeout(660)  # two attempts, the wait between them
@pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < "2.9",
                    reason="torchrun's --signals-to-handle, which SLURM.md's script passes, "
                    "came with torch 2.9 (SLURM.md: leave it out before)")
def test_slurm_mds_torchrun_script_warned_of_its_time_limit_requeues_itself(slurm, tmp_path):
    """The time limit's warning to SLURM.md's torchrun script (which said torchrun could not
    stop on it, and gave none of this): srun passes it to the workers, each stops after a
    checkpoint, torchrun (--signals-to-handle with SIGUSR1, torch >= 2.9) waits for them and
    exits 1, and the script requeues the job for that checkpoint; the second attempt
    finishes the run from it."""
    path = tmp_path / "ddp.sbatch"
    path.write_text(slurm_md_torchrun_script(
        sys.executable, _free_ports(1)[0],
        [*SYNTHETIC, "--epochs", "8", "--checkpoint-every", "0.25e"]))
    job, work = submit(slurm, str(path), ["--time=10"], [], {})
    out = work / "runs" / f"ddp-{job}"
    again = _warn_and_wait(slurm, job, work, out / "checkpoints")
    log = job_log(work, job)
    assert (again["JobState"], again["Restarts"]) == ("COMPLETED", "1"), log
    stopped = re.search(r"stopped by SIGUSR1 after the checkpoint of update (\d+) of (\d+)", log)
    assert stopped and f"requeueing job {job} to continue from its checkpoint" in log, log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_updates"] == [int(stopped[1])], log
    assert summary["updates"] == int(stopped[2]) > int(stopped[1])
    assert summary["algo_label"] == "ssgd (torch backend)"


@pytest.mark.timeout(660)  # two attempts, the wait between them
def test_compare_sbatch_warned_of_its_time_limit_requeues_and_finishes_every_algorithm(slurm):
    """compare.sbatch runs every algorithm inside the allocation. Warned as Slurm's --signal
    does while sgd runs (after its first checkpoint): compare passes SIGUSR1 on, sgd stops
    after a checkpoint, compare exits with status 5 and the script requeues the job; the
    second attempt (--resume) continues sgd from that checkpoint and then runs ssgd."""
    options = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"]
    # 30 epochs keep sgd running for seconds after its first checkpoint, for the signal. A
    # --out of one's own: the requeued attempt was refused ("already holds a comparison").
    job, work = submit(slurm, "compare.sbatch", options,
                       ["--algos", "sgd,ssgd", *SYNTHETIC, "--epochs", "30",
                        "--checkpoint-every", "1e", "--out", "mine"], JOB_ENV)
    out = work / "mine"
    again = _warn_and_wait(slurm, job, work, out / "sgd" / "checkpoints")
    log = job_log(work, job)
    assert (again["JobState"], again["Restarts"]) == ("COMPLETED", "1"), log
    assert "[1/2 sgd] stopped by SIGUSR1 (--resume continues it)" in log, log
    assert "stopped by SIGUSR1 with sgd, ssgd left to run" in log, log
    assert f"requeueing job {job} to continue the comparison" in log, log
    assert log.count(", outputs mine") == 2, log  # both attempts' (the script's --open-mode)
    record = json.loads((out / "compare.json").read_text())
    assert {a: r["status"] for a, r in record["runs"].items()} == {"sgd": "ok", "ssgd": "ok"}
    assert record["workers"] == 2 and (out / "report.md").is_file()
    sgd = json.loads((out / "sgd" / "summary.json").read_text())
    assert len(sgd["resumed_from_updates"]) == 1 and sgd["updates"] == 30 * 32
    assert 0 < sgd["resumed_from_updates"][0] < sgd["updates"]


@pytest.mark.timeout(660)  # two attempts, the wait between them
def test_a_requeued_train_job_continues_from_its_checkpoints(slurm):
    # The first attempt fails at step 10 (after checkpoints at 4 and 8); the requeued one
    # (SLURM_RESTART_COUNT=1) runs clean and must continue in the same folder.
    wrapper = slurm.dir / "python-failing-once"
    wrapper.write_text("#!/bin/bash\n"
                       'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then '
                       "export HPCTRAIN_INJECT=raise@1:10; fi\n"
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    options = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"]
    job, work = submit(slurm, "train.sbatch", options,
                       ["--algo", "ssgd", *SMALL, "--checkpoint-every", "0.25e"],
                       {**JOB_ENV, "HPCTRAIN_PYTHON": str(wrapper)})
    first = wait(slurm, job)
    assert first["JobState"] == "FAILED", job_log(work, job)
    out = work / "runs" / f"train-{job}"
    assert not (out / "summary.json").exists() and list((out / "checkpoints").glob("ckpt-*"))

    again = _requeue_and_wait(slurm, job, work, "(restart 1)")
    log = job_log(work, job)
    assert (again["JobState"], again["Restarts"]) == ("COMPLETED", "1"), log
    assert "resuming from the checkpoints" in log
    assert "OMP_NUM_THREADS=1" in log and "launcher mpirun" in log  # train.sbatch's default
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["algo"], summary["workers"], summary["updates"]) == ("ssgd", 2, 16)
    assert 0.0 <= summary["final_test_acc"] <= 1.0


@pytest.mark.timeout(660)  # two attempts, the wait between them
def test_a_train_job_warned_of_its_time_limit_checkpoints_and_requeues_itself(slurm):
    """What ``#SBATCH --signal=B:USR1@300`` does ahead of the time limit, sent at once
    (``scancel --batch --signal=USR1``): the script passes SIGUSR1 to the launcher, the run
    writes a checkpoint at the next update and exits with status 5, the script requeues the
    job, and the second attempt goes on from that checkpoint to the end. (Under srun the
    status may arrive as 128 + 9: --kill-on-bad-exit kills the ranks still exiting.) Under
    srun only: the script forwards the signal to its launcher the same way under mpirun, whose
    passing SIGUSR1 on to the ranks test_checkpoint_jobs tests; the requeue test above runs
    mpirun (CI's time: each drill is ~35 s)."""
    launch = "srun"
    options = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"]
    job, work = submit(slurm, "train.sbatch", options,
                       ["--algo", "ssgd", *SYNTHETIC, "--epochs", "8", "--checkpoint-every",
                        "0.25e"], {**JOB_ENV, "HPCTRAIN_LAUNCH": launch})
    out = work / "runs" / f"train-{job}"
    again = _warn_and_wait(slurm, job, work, out / "checkpoints")
    log = job_log(work, job)
    assert (again["JobState"], again["Restarts"]) == ("COMPLETED", "1"), log
    # The script's --open-mode=append keeps the first attempt's lines: Slurm's default emptied
    # the log when the requeued attempt started, and why it was requeued was lost.
    assert "(restart 0)" in log and "(restart 1)" in log, log
    stopped = re.search(r"stopped by SIGUSR1 after the checkpoint of update (\d+) of (\d+)", log)
    assert stopped and f"requeueing job {job}" in log, log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_updates"] == [int(stopped[1])]
    assert summary["updates"] == int(stopped[2]) > int(stopped[1])


def _warn_and_wait(cluster: LocalSlurm, job: str, work: Path, checkpoints: Path) -> dict:
    """Once ``checkpoints`` holds one, warn ``job`` as Slurm's ``--signal`` does (SIGUSR1 to
    the batch script); its fields once the attempt it requeued itself for has ended."""
    deadline = time.monotonic() + 240
    looked = 0.0  # when the job's state was last asked for (an scontrol each time)
    while not list(checkpoints.glob("ckpt-*")):
        if time.monotonic() - looked >= POLL_S:
            assert job_fields(cluster, job)["JobState"] in RUNNING_STATES, job_log(work, job)
            looked = time.monotonic()
        assert time.monotonic() < deadline, cluster.diagnosis(work, job)
        time.sleep(0.02)
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    return _wait_for_attempt(cluster, job, work, "(restart 1)", "after SIGUSR1")


def _requeue_and_wait(cluster: LocalSlurm, job: str, work: Path, started: str) -> dict:
    """``scontrol requeue`` an ended ``job``; its fields once the second attempt (whose log
    has ``started``) has ended."""
    # Requeue only once the node has finished ending the first attempt: a second attempt
    # that starts while slurmd still cleans up the first can lose its first srun step ("aborted
    # before step completely launched", seen once under load).
    deadline = time.monotonic() + 120
    while (node := _node_state(cluster)) != "idle" and time.monotonic() < deadline:
        time.sleep(POLL_S)
    cluster.run("scontrol", "requeue", job)
    return _wait_for_attempt(cluster, job, work, started, f"node {node!r} at the requeue")


def _node_state(cluster: LocalSlurm) -> str:
    return cluster.run("sinfo", "-h", "-n", NODE, "-o", "%T", check=False).stdout.strip()


def _wait_for_attempt(cluster: LocalSlurm, job: str, work: Path, started: str,
                      note: str = "") -> dict:
    """The fields of requeued ``job`` once its attempt whose log has ``started`` has ended."""
    # Slurm holds a requeued job back for a while (BeginTime): let it start sooner, but only
    # once the node has finished ending the first attempt and a few seconds later. A job the
    # script requeued itself is requeued while that attempt runs, which revokes its
    # credential; slurmd takes a new one only if it is from a later second than the
    # revocation, else it kills the attempt ("Job credential revoked"). The state passes
    # through terminal-looking ones while the requeue settles, so the second attempt is over
    # only once its own first line is in the log and the job has ended.
    deadline = time.monotonic() + 240
    idle_since = None
    while True:
        again = job_fields(cluster, job)
        held = again["JobState"] == "PENDING" and again.get("Reason") == "BeginTime"
        if not held or _node_state(cluster) != "idle":
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= 3:
            cluster.run("scontrol", "update", f"jobid={job}", "starttime=now", check=False)
        if started in job_log(work, job) and again["JobState"] not in RUNNING_STATES:
            return again
        assert time.monotonic() < deadline, \
            f"requeued job not done in 240 s ({note}): {again}\n{cluster.diagnosis(work, job)}"
        time.sleep(POLL_S)


ELASTIC_JOB = """#!/bin/bash
#SBATCH --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --time=10 --requeue
export OMP_NUM_THREADS=1 ATTEMPT=${{SLURM_RESTART_COUNT:-0}} PYTHONPATH={root}
export HPCTRAIN_ELASTIC_DIR=$PWD/elastic-$SLURM_JOB_ID
echo "attempt $ATTEMPT"
srun --mpi=pmix --kill-on-bad-exit=1 {python} {script} . 1 10
"""


@pytest.mark.timeout(660)  # two attempts, the wait between them
def test_a_requeued_horovod_elastic_script_continues_from_its_commit(slurm):
    """The recipe of docs/SLURM.md: the first attempt loses rank 1 at step 10 (commits at
    4 and 8); the requeued one resumes from the last commit and finishes the epoch."""
    script = slurm.dir / "elastic.sbatch"
    script.write_text(ELASTIC_JOB.format(root=ROOT, python=sys.executable,
                                         script=ROOT / "tests" / "scripts" / "elastic_train.py"))
    job, work = submit(slurm, str(script), [], [], {})
    first = wait(slurm, job)
    assert first["JobState"] == "FAILED", job_log(work, job)
    again = _requeue_and_wait(slurm, job, work, "attempt 1")
    log = job_log(work, job)
    assert (again["JobState"], again["Restarts"]) == ("COMPLETED", "1"), log
    assert f"elastic-{job}/state-0.pt) on 2 ranks" in log
    starts = [json.loads(p.read_text().splitlines()[0])["start"]
              for p in sorted(work.glob("log-1-*.jsonl"))]
    assert starts in ([[0, 8, 80]] * 2, [[0, 4, 40]] * 2)  # commit 2, or 1 (see test_sync_elastic)
    assert (work / "model.pt").is_file()


@pytest.mark.timeout(400)
def test_bench_sbatch_keeps_the_table_and_json_by_job_id(slurm):
    """The script does the same for every benchmark (test_bench_cli runs each one)."""
    argv = ["store", "--params", "1000", "--seconds", "0.2", "--consistency", "locked"]
    job, work = sbatch(slurm, "bench.sbatch",
                       ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"],
                       argv, JOB_ENV)
    out = work / "runs" / f"bench-store-{job}"
    assert "pushes/s" in (out / "stdout.txt").read_text()
    assert json.loads((out / "store.json").read_text())["benchmark"] == "store"
    assert "launcher mpirun" in job_log(work, job)


@pytest.mark.parametrize("script", ["train", "compare", "bench"])
def test_a_batch_script_run_by_hand_says_to_submit_it(script):
    """Outside an allocation it ended with "SLURM_JOB_ID: unbound variable", exit 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / f"{script}.sbatch")], env=env,
                          capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stderr.strip()) == (
        2, f"hpctrain: error: {script}.sbatch is a Slurm batch script: submit it with sbatch")


SCRIPT_ARGS = {"train": ["--algo", "ssgd"], "bench": ["store"], "compare": ["--algos", "ssgd"]}


@pytest.fixture(scope="module")
def python_without_mpi4py(tmp_path_factory) -> str:
    """A real Python with nothing installed: hpctrain comes from PYTHONPATH, mpi4py from
    nowhere (the trial's HPCTRAIN_PYTHON=python3)."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return str(venv / "bin" / "python")


@pytest.mark.parametrize("script", ["train", "compare", "bench"])
@pytest.mark.parametrize("case", ["no mpi4py", "no python", "no mpirun", "no srun"])
def test_a_batch_script_checks_its_python_and_launcher_before_starting(
        tmp_path, python_without_mpi4py, script, case):
    """A Python lacking mpi4py had every rank print a traceback (two glued onto one line) and
    the job exit 1; a missing mpirun said only "line 108: mpirun: command not found" (127).
    Now one line names the Python or the launcher and the variable that sets it, exit 2."""
    empty = tmp_path / "empty-path"  # a PATH with no mpirun or srun on it
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NODELIST="node0",
               HPCTRAIN_RUNS="runs", HPCTRAIN_PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    if case == "no mpi4py":
        env["HPCTRAIN_PYTHON"] = python_without_mpi4py
        want = (f"HPCTRAIN_PYTHON={python_without_mpi4py} (the Python with hpctrain, mpi4py "
                "and torch): ModuleNotFoundError: No module named 'mpi4py'")
    elif case == "no python":
        env["HPCTRAIN_PYTHON"] = "python3-hpctrain-missing"
        want = ("HPCTRAIN_PYTHON=python3-hpctrain-missing (the Python with hpctrain, mpi4py "
                "and torch): not found")
    else:  # a Python that passes the check (the real one's pass is every Slurm job's above)
        launcher = case.split()[1]
        env.update(HPCTRAIN_LAUNCH=launcher, PATH=str(empty),
                   HPCTRAIN_PYTHON=_python_past_its_check(tmp_path / "python"))
        want = (f"HPCTRAIN_LAUNCH={launcher}: {launcher} is not on PATH (load the site's MPI, "
                "see 'module load' above, or set HPCTRAIN_LAUNCH)")
    proc = subprocess.run([shutil.which("bash") or "/bin/bash",
                           str(ROOT / "slurm" / f"{script}.sbatch"), *SCRIPT_ARGS[script]],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (2, f"hpctrain: error: {want}\n"), proc.stderr
    assert proc.stdout == "" and not (tmp_path / "runs").exists()


# The batch scripts' check of their Python (-c 'import hpctrain, mpi4py, torch').
PYTHON_CHECK = "import hpctrain, mpi4py, torch"


def _python_past_its_check(path: Path, then: str = f'exec {sys.executable} "$@"') -> str:
    """Write at ``path`` the Python of a batch script whose check (:data:`PYTHON_CHECK`,
    2 s of importing torch a start) is answered yes and which runs ``then`` otherwise (the
    real Python); its path. The check is
    test_a_batch_script_checks_its_python_and_launcher_before_starting's."""
    path.write_text(f'#!/bin/bash\n[ "$1 $2" = "-c {PYTHON_CHECK}" ] && exit 0\n{then}\n')
    path.chmod(0o755)
    return str(path)


def test_bench_sbatch_refuses_a_misspelt_benchmark_before_making_its_folder(tmp_path):
    """bench.sbatch kernal exited 2 but left runs/bench-kernal-<id>/stdout.txt behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="4242", SLURM_NTASKS="1", SLURM_JOB_NODELIST="node0",
               HPCTRAIN_PYTHON=_python_past_its_check(tmp_path.parent / f"{tmp_path.name}-python"),
               PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "bench.sbatch"), "kernal"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice: 'kernal'" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(200)
def test_a_failed_benchmark_leaves_its_output_in_its_folder_across_requeues(tmp_path):
    """bench.sbatch kernel on 2 tasks (refused by every rank) left an empty stdout.txt: the
    error went to stderr, the Slurm log only; and a requeued attempt's tee emptied the last
    attempt's file though the log was appended. Run by hand twice, as Slurm would requeue."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NODELIST="node0",
               HPCTRAIN_RUNS="runs", PYTHONPATH=str(ROOT),
               HPCTRAIN_PYTHON=_python_past_its_check(tmp_path.parent / f"{tmp_path.name}-python"),
               HPCTRAIN_MPIRUN_ARGS="--oversubscribe -x OMPI_MCA_osc=^ucx")
    refusal = "hpctrain: error: bench kernel measures one process's kernel"
    for restart in ("0", "1"):
        proc = subprocess.run(["bash", str(ROOT / "slurm" / "bench.sbatch"), "kernel"],
                              env={**env, "SLURM_RESTART_COUNT": restart}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and refusal in proc.stderr, proc.stdout + proc.stderr
    out = tmp_path / "runs" / "bench-kernel-4242"
    assert [line.split(" on ")[0] for line in (out / "stdout.txt").read_text().splitlines()] \
        == ["hpctrain: job 4242 (restart 0)", "hpctrain: job 4242 (restart 1)"]
    assert (out / "stderr.txt").read_text().count(refusal) == 2


# An Open MPI mpirun that only says what it was asked to start.
FAKE_MPIRUN = """#!/bin/bash
if [ "$1" = --version ]; then echo "mpirun (Open MPI) 4.1.4"; exit 0; fi
echo "$*" > "$FAKE_LOG"
"""


@pytest.mark.parametrize("script", ["train", "compare", "bench"])
@pytest.mark.parametrize("cpus, args, env, unbound", [
    ("2", "", {}, True),
    ("1", "", {}, False),  # one core a rank: Open MPI's binding is right
    ("2", "-x OMPI_MCA_osc=^ucx", {}, True),
    ("2", "--map-by node", {}, True),  # a mapping alone still binds each rank to a core
    ("2", "--bind-to core", {}, False),
    ("2", "-map-by ppr:1:numa:PE=2", {}, False),  # Horovod's single-dash spelling
    ("2", "-bind-to-core", {}, False),  # (with --bind-to none too, mpirun did not start)
    ("2", "--cpus-per-proc 2", {}, False),
    ("2", "--mca hwloc_base_binding_policy core", {}, False),
    ("2", "", {"OMPI_MCA_hwloc_base_binding_policy": "core"}, False),  # the site's policy
])
def test_open_mpi_ranks_of_several_cpus_are_unbound_unless_told(tmp_path, script, cpus, args,
                                                                 env, unbound):
    """--cpus-per-task 2 under mpirun: Open MPI bound each of one or two ranks to one core
    (the real Slurm test above shows it); the scripts unbind them, but a binding the user
    or the site chose ("-map-by ... PE=2", given the Horovod way) was overridden."""
    # The script's Python is a stand-in but for train's helper naming the launcher (hpctrain's
    # mpirun.passing_signals): its check (import torch) and bench's --help took 2 to 5 s a
    # case, and are test_a_batch_script_checks_its_python_and_launcher_before_starting's;
    # the fake mpirun starts no rank. bench compare starts mpirun itself: its template is said.
    python = tmp_path / "python"
    python.write_text(f'#!/bin/bash\ncase "$2" in *passing_signals*) exec {sys.executable} '
                      f'"$@" ;; esac\n')
    python.chmod(0o755)
    base = _under_fake_mpirun(tmp_path, SLURM_CPUS_PER_TASK=cpus, HPCTRAIN_MPIRUN_ARGS=args,
                              HPCTRAIN_PYTHON=str(python), PYTHONPATH=str(ROOT),
                              FAKE_LOG=str(tmp_path / "mpirun.log"), **env)
    argv = {"train": ["--algo", "ssgd"], "bench": ["store"], "compare": ["--algos", "ssgd"]}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / f"{script}.sbatch"), *argv[script]],
                          env=base, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    started = proc.stdout if script == "compare" else (tmp_path / "mpirun.log").read_text()
    assert ("--bind-to none" in started) == unbound, proc.stdout + proc.stderr


def _under_fake_mpirun(tmp_path, **variables: str) -> dict[str, str]:
    """The environment of a script run by hand as a 2-task, one-node Slurm job whose mpirun
    is :data:`FAKE_MPIRUN` (first on PATH), the caller's Slurm and binding settings left
    out, with ``variables`` added."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mpirun").write_text(FAKE_MPIRUN)
    (fake / "mpirun").chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_MCA_hwloc", "OMPI_MCA_rmaps"))}
    env.update(SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NODELIST="node0",
               HPCTRAIN_RUNS="runs", PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    env.update(variables)
    return env


@pytest.mark.parametrize("args", ["", "  -x OMPI_MCA_osc=^ucx   --mca btl self,tcp "])
def test_compare_sbatch_names_its_launcher_template_cleanly(tmp_path, args):
    """With HPCTRAIN_MPIRUN_ARGS empty the line said "launcher mpirun -np {np}
    --allow-run-as-root , outputs ...": the template's trailing space before the comma."""
    env = _under_fake_mpirun(tmp_path, HPCTRAIN_MPIRUN_ARGS=args, HPCTRAIN_PYTHON="true")
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "compare.sbatch"), "--algos", "ssgd"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    template = " ".join(["mpirun -np {np}", *(["--allow-run-as-root"] if os.getuid() == 0
                                              else []), *args.split()])
    assert f', launcher "{template}", outputs runs/compare-4242' in proc.stdout, proc.stdout


TRAIN_SBATCH = ROOT / "slurm" / "train.sbatch"
# srun as the time limit's warning may leave it (--kill-on-bad-exit): once the batch script (its
# parent) catches SIGUSR1 (SigCgt's bit 10 - 1), warn it as Slurm's --signal does, and exit
# with $FAKE_STATUS when it passes the signal on.
FAKE_SRUN = """#!/bin/bash
sleep 30 > /dev/null 2>&1 & nap=$!
trap 'kill "$nap"; exit "$FAKE_STATUS"' USR1
for _ in $(seq 400); do
  caught=$(sed -n 's/^SigCgt:[[:space:]]*//p' "/proc/$PPID/status")
  (( 0x$caught & 0x200 )) && break
  sleep 0.025
done
kill -USR1 "$PPID"
wait "$nap"
exit 99
"""
DEFAULT_CHECKPOINTS = "runs/train-4242/checkpoints"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, checkpoint_in, status, requeued", [
    ([], DEFAULT_CHECKPOINTS, 137, True),
    ([], None, 137, False),  # died without a checkpoint: a failure
    ([], DEFAULT_CHECKPOINTS, 134, False),  # 128 + 6 (SIGABRT): a failure, checkpoint or not
    (["--checkpoint-dir", "ck"], "ck", 137, True),
    (["--checkpoint-dir=ck"], "ck", 137, True),
    (["--checkpoint-dir", "ck"], DEFAULT_CHECKPOINTS, 137, False),  # not this run's
    (["--out", "elsewhere"], "elsewhere/checkpoints", 137, True),
    (["--out=a", "--out=elsewhere"], "elsewhere/checkpoints", 137, True),
    (["--checkpoint-dir", "a", "--out", "o", "--checkpoint-dir=ck"], "ck", 137, True),
    (["--out", "o", "--checkpoint-dir", "ck"], "o/checkpoints", 137, False),
    (["--checkpoint-dir", "ck"], None, 5, True),  # the run's own stop after its checkpoint
    (["--config", "ck.toml"], "ck", 137, True),  # was looked for in the default folder only
    (["--config", "ck.toml", "--checkpoint-dir", "o"], "ck", 137, False),
    (["--resume", "old"], "old/checkpoints", 137, True),  # the folder it resumes writes on
    # a note hpctrain prints on the options (on stdout) was read as part of the folder
    (["--config", "step.toml", "--lr-schedule", "cosine"], "ck", 137, True),
    # the run's own arguments: the script's --resume auto wins over --config's resume
    (["--config", "resume.toml"], DEFAULT_CHECKPOINTS, 137, True),
    (["--config", "resume.toml"], "old/checkpoints", 137, False),
])
def test_a_warned_train_sbatch_requeues_on_128_plus_9_only_with_the_runs_checkpoint(
        tmp_path, args, checkpoint_in, status, requeued):
    """After the warning, srun may say 128 + 9 instead of 5: the script requeues then only if
    the run's checkpoint folder (the last --checkpoint-dir, else --config's, else the one
    --resume DIR continues, else <last --out>/checkpoints) holds a checkpoint. It looked in
    its own <out>/checkpoints, whatever the arguments said, and took any status above 128;
    then missed --config's folder and --resume's.
    srun's status is this test's input: a real srun says 128 + 9 only when a rank is killed
    in a race a cluster does not give on demand, so a stand-in srun exits with it (and
    scontrol logs); the real requeues run against the local Slurm above."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(FAKE_SRUN)
    (fake / "scontrol").write_text('#!/bin/bash\necho "$*" >> "$FAKE_LOG"\n')
    # The checkpoint folder the script looks in is still the real Python's answer.
    _python_past_its_check(fake / "python")
    for tool in fake.iterdir():
        tool.chmod(0o755)
    if checkpoint_in is not None:
        (tmp_path / checkpoint_in).mkdir(parents=True)
        (tmp_path / checkpoint_in / "ckpt-000000004.pt").write_bytes(b"")
    (tmp_path / "ck.toml").write_text('[checkpoint]\ndir = "ck"\n')
    (tmp_path / "resume.toml").write_text('[checkpoint]\nresume = "old"\n')
    (tmp_path / "step.toml").write_text('[optim]\nlr_schedule = "step"\nlr_milestones = [1]\n'
                                        '[checkpoint]\ndir = "ck"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NODELIST="node0",
               HPCTRAIN_LAUNCH="srun", HPCTRAIN_RUNS="runs", HPCTRAIN_PYTHON=str(fake / "python"),
               PYTHONPATH=str(ROOT),
               PATH=f"{fake}{os.pathsep}{env['PATH']}", FAKE_STATUS=str(status),
               FAKE_LOG=str(tmp_path / "scontrol.log"))
    proc = subprocess.run(["bash", str(TRAIN_SBATCH), "--algo", "ssgd", *args], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == status, proc.stdout + proc.stderr
    log = tmp_path / "scontrol.log"
    assert (log.read_text() if log.exists() else "") == ("requeue 4242\n" if requeued else ""), \
        proc.stdout + proc.stderr
    assert ("requeueing job 4242" in proc.stdout) == requeued, proc.stdout


# Each MPI's mpirun in a batch script's environment, starting its ranks on this node alone:
# Hydra's would start them through srun (Slurm's bootstrap, taken from SLURM_JOB_ID).
LOCAL_HYDRA = {"openmpi": {}, "mpich": {"HYDRA_LAUNCHER": "fork"},
               "intel": {"I_MPI_HYDRA_BOOTSTRAP": "fork"}}


@pytest.mark.timeout(200)
@pytest.mark.parametrize("mpi", ["openmpi", *ON_OTHER_MPIS])
def test_a_warned_train_sbatch_reaches_the_ranks_under_each_mpirun(tmp_path, mpi):
    """The time limit's warning (SIGUSR1 to the batch script) passed on to the launcher of
    HPCTRAIN_LAUNCH=mpirun reaches every rank, which stops (status 5), and the job requeues
    itself. Intel MPI's mpirun is a /bin/sh script that runs mpiexec.hydra as its child: the
    signal ended the script (status 138, no requeue) while Hydra and the ranks ran on."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/bash\necho "$*" >> "$FAKE_LOG"\n')
    (tmp_path / "rank.sh").write_text(SIGNALLED_RANK)
    # The script's Python: its check answered yes, its own helpers (-c) hpctrain's, its
    # ranks stand-ins.
    _python_past_its_check(fake / "python", f'if [ "$1" = -c ]; then exec {sys.executable} '
                           f'"$@"; fi\nexec bash {tmp_path / "rank.sh"}')
    for tool in fake.iterdir():
        tool.chmod(0o755)
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(mpi_env(mpi) if mpi != "openmpi" else {})
    env.update(SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NODELIST=socket.gethostname(),
               SLURM_TASKS_PER_NODE="2", SLURM_NNODES="1", HPCTRAIN_RUNS="runs",
               HPCTRAIN_PYTHON=str(fake / "python"), PYTHONPATH=str(ROOT), RANKS=str(ranks),
               PATH=f"{fake}{os.pathsep}{env['PATH']}", FAKE_LOG=str(tmp_path / "scontrol.log"),
               **LOCAL_HYDRA[mpi])
    job = subprocess.Popen(["bash", str(TRAIN_SBATCH), "--algo", "ssgd"], env=env,
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        pids = ranks_ready(ranks, 2, launcher=job)
        _catching_usr1(job.pid)
        job.send_signal(signal.SIGUSR1)  # as #SBATCH --signal=B:USR1@300 does
        out, err = job.communicate(timeout=120)
    finally:
        job.kill()
    for rank in (0, 1):
        assert f"rank {rank} stopped by SIGUSR1" in err, out + err
    assert job.returncode == 5 and "requeueing job 4242" in out, out + err
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert not any(alive(pid) for pid in pids), out + err


def _catching_usr1(pid: int, timeout: float = 30) -> None:
    """Wait until process ``pid`` catches SIGUSR1 (bit 10 - 1 of its SigCgt)."""
    deadline = time.monotonic() + timeout
    while True:
        caught = next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text()
                      .splitlines() if line.startswith("SigCgt:"))
        if int(caught, 16) & 1 << (signal.SIGUSR1 - 1):
            return
        assert time.monotonic() < deadline, f"process {pid} did not trap SIGUSR1"
        time.sleep(0.025)
