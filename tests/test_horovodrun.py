"""``hpctrain horovodrun``: horovodrun's flags become the mpirun command its MPI mode runs, and
a real job started with it runs a Horovod script on hpctrain's backend."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import run_job

from hpctrain import horovodrun
from hpctrain.cli import build_parser
from hpctrain.errors import UsageError

# Open MPI's settings the other job tests pass, here through --mpi-args.
MPI_ARGS = "-x OMPI_MCA_osc=^ucx -x OMPI_MCA_pml=ob1 -x OMPI_MCA_btl=self,vader,tcp"


def parse(*words: str):
    return build_parser().parse_args(["horovodrun", *words])


def test_the_flags_become_horovodruns_mpirun_command():
    args = parse("-np", "4", "-H", "a:2,b:2", "-p", "2222", "--network-interface", "eth0",
                 "--timeline-filename", "/tmp/t.json", "--fusion-threshold-mb", "32",
                 "--mpi-args=--report-bindings", "python", "train.py", "--lr", "0.1")
    environ = {"PATH": "/bin", "HOROVOD_FUSION_THRESHOLD": "5", "OMPI_MCA_pml": "ob1",
               "BASH_FUNC_f%%": "() { :; }", "not-a-name": "x"}
    assert horovodrun.mpirun_command(args, environ, root=True) == [
        "mpirun", "--allow-run-as-root", "--tag-output", "-np", "4", "-H", "a:2,b:2",
        "-bind-to", "none", "-map-by", "slot", "-mca", "plm_rsh_args", "-p 2222",
        "-mca", "btl_tcp_if_include", "eth0",
        "-x", "GLOO_SOCKET_IFNAME=eth0",
        "-x", "HOROVOD_FUSION_THRESHOLD=33554432", "-x", "HOROVOD_TIMELINE=/tmp/t.json",
        "-x", "NCCL_SOCKET_IFNAME=eth0", "-x", "PATH",
        "--report-bindings", "python", "train.py", "--lr", "0.1"]


def test_output_and_binding_flags_replace_or_add_mpiruns_own():
    args = parse("-np", "2", "--binding-args", "-bind-to core -map-by socket",
                 "--output-filename", "/tmp/logs", "--prefix-output-with-timestamp",
                 "python", "train.py")
    assert horovodrun.mpirun_command(args, {}) == [
        "mpirun", "--tag-output", "-np", "2", "-H", "localhost:2",
        "-bind-to", "core", "-map-by", "socket", "--timestamp-output",
        "--output-filename", "/tmp/logs", "python", "train.py"]


def test_interfaces_given_once_each_or_comma_separated_are_one_list():
    args = parse("-np", "1", "--network-interface", "eth0", "--network-interfaces", "ib0,eth0",
                 "--start-timeout", "30", "--disable-cache", "python", "x.py")
    cmd = horovodrun.mpirun_command(args, {})
    assert cmd[cmd.index("btl_tcp_if_include") + 1] == "eth0,ib0"  # in order, once each
    assert "NCCL_SOCKET_IFNAME=eth0,ib0" in cmd and "GLOO_SOCKET_IFNAME=eth0,ib0" in cmd


def test_check_build_reports_what_torch_and_mpi4py_offer_here():
    from hpctrain import devices

    facts = devices.describe()  # what hpctrain info reports
    lines = horovodrun.build_report().splitlines()
    assert "    [X] PyTorch" in lines and "    [ ] TensorFlow" in lines
    operations = lines[lines.index("Available Tensor Operations:") + 1:]
    assert operations[0] == f"    [{'X' if facts['nccl'] else ' '}] NCCL"
    assert operations[-1] == f"    [{'X' if facts['gloo'] else ' '}] Gloo"
    assert "    [X] MPI" in operations  # mpi4py and mpirun are here


def test_hosts_default_to_np_slots_here_and_a_bare_host_has_one():
    assert horovodrun.check(parse("-np", "3", "python", "x.py")) == [("localhost", 3)]
    assert horovodrun.slots("a,b:3") == [("a", 1), ("b", 3)]


def test_a_hostfile_is_read_as_open_mpi_reads_it(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# the nodes\nnode1 slots=4\n\nnode2   # one slot\n")
    assert horovodrun.check(parse("-np", "5", "--hostfile", str(path), "python", "x.py")) == [
        ("node1", 4), ("node2", 1)]
    path.write_text("node1 slots=four\n")
    with pytest.raises(UsageError, match="'node1 slots=four' is not 'host slots=N'"):
        horovodrun.hostfile_slots(str(path))


@pytest.mark.parametrize("words, message", [
    (["-np", "0", "python", "x.py"], "-np 0: want at least 1"),
    (["python", "x.py"], "-np: the number of processes is needed"),
    (["-np", "5", "-H", "a:2,b:2", "python", "x.py"], "-np 5: more processes than the 4 slots"),
    (["-np", "2", "-H", "a:two", "python", "x.py"], "'a:two' is not host or host:slots"),
    (["-np", "2"], "no command to run"),
    (["-np", "2", "--gloo", "python", "x.py"], "--gloo: hpctrain horovodrun starts MPI jobs"),
    (["-np", "2", "--min-np", "1", "python", "x.py"], "--min-np: horovodrun's elastic mode"),
    (["-np", "2", "--fusion-threshold-mb", "-1", "python", "x.py"],
     "--fusion-threshold-mb -1: want >= 0"),
])
def test_what_horovodrun_mpi_mode_cannot_start_is_refused_naming_the_value(words, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        horovodrun.check(parse(*words))


SCRIPT = """
import os, torch
import hpctrain.sync as hvd
from hpctrain.sync.buckets import default_bucket_bytes
hvd.init()
total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum).item()
print(f"rank {hvd.rank()} of {hvd.size()}: sum {total:g}, fusion {default_bucket_bytes()}",
      flush=True)
hvd.shutdown()
"""


@pytest.mark.timeout(120)
def test_a_horovod_script_runs_through_it_with_the_tuning_flags(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    timeline = tmp_path / "timeline.json"
    logs = tmp_path / "logs"
    done = run_job(["horovodrun", "-np", "2", "--mpi-args", MPI_ARGS, "--fusion-threshold-mb",
                    "1", "--timeline-filename", str(timeline), "--output-filename", str(logs),
                    sys.executable, str(script)], np=0)
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):  # horovodrun's --tag-output prefixes, on the terminal and in the files
        line = f"[1,{rank}]<stdout>:rank {rank} of 2: sum 3, fusion 1048576"
        assert line in done.stdout
        assert line in (logs / "1" / f"rank.{rank}" / "stdout").read_text()
    phases = {e.get("name") for e in json.loads(timeline.read_text()) if e.get("ph") == "B"}
    assert {"ALLREDUCE", "MPI_ALLREDUCE"} <= phases  # HOROVOD_TIMELINE reached the ranks


@pytest.mark.timeout(120)
def test_the_jobs_exit_status_comes_back_and_bad_flags_exit_2(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys; sys.exit(3)\n")
    failed = run_job(["horovodrun", "-np", "2", "--mpi-args", MPI_ARGS, sys.executable,
                      str(script)], np=0)
    assert failed.returncode == 3, failed.stderr
    refused = run_job(["horovodrun", "-np", "3", "-H", "localhost:2", "python", "x.py"], np=0)
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("hpctrain: error: -np 3: more processes than the 2 "
                                      "slots of the hosts")


def test_the_launcher_starts_without_importing_torch():
    """``python -m hpctrain horovodrun`` is a launcher: torch (seconds to import) is for the
    ranks it starts. A refusal shows the path ran to the check, on the same one-line terms."""
    words = ["horovodrun", "-np", "3", "-H", "localhost:2", "python", "x.py"]
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "hpctrain", *words],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    imported = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
    assert "hpctrain.horovodrun" in imported and "torch" not in imported
    assert lines[-1] == "hpctrain: error: -np 3: more processes than the 2 slots of the hosts"


def test_check_build_needs_no_np_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "hpctrain", "horovodrun", "--check-build"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("hpctrain ") and "Available Controllers:" in proc.stdout
