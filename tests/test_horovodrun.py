"""``hpctrain horovodrun``: horovodrun's flags become the mpirun command its MPI mode runs, and
a real job started with it runs a Horovod script on hpctrain's backend."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ON_OTHER_MPIS, OTHER_MPIS, mpi_env, run_job

from hpctrain import horovod_settings, horovodrun, mpirun
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


def test_the_variables_horovodrun_keeps_on_the_launchers_host_are_not_exported():
    """horovodrun exports every variable but the GPU list (each host's ranks keep their own: a
    launcher without GPUs, CUDA_VISIBLE_DEVICES='', would hide every other host's), OLDPWD
    and its job key; the same names stay out here (compared with Horovod's list where built)."""
    kept = ["CUDA_VISIBLE_DEVICES", "SLURM_STEP_CUDA_VISIBLE_DEVICES", "OLDPWD",
            "_HOROVOD_SECRET_KEY", "BASH_FUNC_f%%"]
    passed = ["CUDA_HOME", "HOROVOD_FUSION_THRESHOLD", "NCCL_DEBUG"]
    cmd = horovodrun.mpirun_command(parse("-np", "2", "-H", "a:1,b:1", "python", "x.py"),
                                    dict.fromkeys(kept + passed, "0"))
    exported = {cmd[i + 1] for i, word in enumerate(cmd) if word == "-x"}
    assert exported == set(passed)
    try:
        from horovod.runner.common.util.env import is_exportable
    except ImportError:
        return
    assert [n for n in kept + passed if is_exportable(n)] == passed


def test_output_and_binding_flags_replace_or_add_mpiruns_own():
    args = parse("-np", "2", "--binding-args", "-bind-to core -map-by socket",
                 "--output-filename", "/tmp/logs", "--prefix-output-with-timestamp",
                 "python", "train.py")
    assert horovodrun.mpirun_command(args, {}) == [
        "mpirun", "--tag-output", "-np", "2", "-H", "localhost:2",
        "-bind-to", "core", "-map-by", "socket", "--timestamp-output",
        "--output-filename", "/tmp/logs", "python", "train.py"]


def test_on_64_hosts_open_mpi_starts_each_from_the_launcher_as_horovodrun_has_it():
    hosts = ",".join(f"n{i}:1" for i in range(64))
    cmd = horovodrun.mpirun_command(parse("-np", "64", "-H", hosts, "python", "x.py"), {})
    assert cmd[cmd.index("plm_rsh_no_tree_spawn") + 1] == "true"
    assert cmd[cmd.index("plm_rsh_num_concurrent") + 1] == "64"
    fewer = horovodrun.mpirun_command(parse("-np", "63", "-H", hosts.rsplit(",", 1)[0],
                                            "python", "x.py"), {})
    assert "plm_rsh_no_tree_spawn" not in fewer


def test_interfaces_given_once_each_or_comma_separated_are_one_list():
    args = parse("-np", "1", "--network-interface", "eth0", "--network-interfaces", "ib0,eth0",
                 "--start-timeout", "30", "--disable-cache", "python", "x.py")
    cmd = horovodrun.mpirun_command(args, {})
    assert cmd[cmd.index("btl_tcp_if_include") + 1] == "eth0,ib0"  # in order, once each
    assert "NCCL_SOCKET_IFNAME=eth0,ib0" in cmd and "GLOO_SOCKET_IFNAME=eth0,ib0" in cmd


def test_help_names_the_elastic_flags_it_takes_without_listing(capsys):
    """--max-np and --elastic-timeout were accepted (ignored, as horovodrun ignores them
    without --min-np) but --help never said so."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["horovodrun", "--help"])
    text = "".join(capsys.readouterr().out.split())  # wrapped, also at hyphens
    assert all(f"[{flag}" not in text and flag in text for flag in horovodrun.ELASTIC_FLAGS)
    assert "areignoredwithoutthem" in text


def test_check_build_reports_what_torch_and_mpi4py_offer_here():
    from hpctrain import devices

    facts = devices.describe()  # what hpctrain info reports
    lines = horovodrun.build_report().splitlines()
    assert "    [X] PyTorch" in lines and "    [ ] TensorFlow" in lines
    operations = lines[lines.index("Available Tensor Operations:") + 1:]
    assert operations[0] == f"    [{'X' if facts['nccl'] else ' '}] NCCL"
    assert operations[-1] == f"    [{'X' if facts['gloo'] else ' '}] Gloo"
    assert "    [X] MPI" in operations  # mpi4py and mpirun are here


# Every setting in a config file, as Horovod's documentation lays one out.
CONFIG = """
params:
  fusion_threshold_mb: 32
  cycle_time_ms: 5
  cache_capacity: 2048
  hierarchical_allreduce: true
  hierarchical_allgather: false
  torus_allreduce: false
autotune:
  enabled: true
  log_file: /tmp/autotune.csv
  warmup_samples: 2
  steps_per_sample: 5
  bayes_opt_max_samples: 10
  gaussian_process_noise: 0.5
timeline:
  filename: /tmp/timeline.json
  mark_cycles: true
stall_check:
  enabled: false
  warning_time_seconds: 30
  shutdown_time_seconds: 90
library_options:
  mpi_threads_disable: true
  num_nccl_streams: 2
  thread_affinity: 1
  gloo_timeout_seconds: 60
logging:
  level: DEBUG
  with_timestamp: false
"""


def horovods_variables(words: list[str], monkeypatch) -> dict[str, str]:
    """The variables Horovod's own horovodrun sets for ``words`` (its parser, its config file
    reader and its table), for comparison."""
    launch = pytest.importorskip("horovod.runner.launch", reason="Horovod is not built here")
    from horovod.runner.common.util import config_parser

    monkeypatch.setattr(sys, "argv", ["horovodrun", *words])
    return config_parser.set_env_from_args({}, launch.parse_args())


@pytest.mark.parametrize("flags", [
    [],
    ["--fusion-threshold-mb", "8", "--cycle-time-ms", "2.5", "--cache-capacity", "0",
     "--hierarchical-allreduce", "--no-hierarchical-allgather", "--torus-allreduce"],
    ["--autotune", "--autotune-log-file", "a.csv", "--autotune-warmup-samples", "1",
     "--autotune-steps-per-sample", "4", "--autotune-bayes-opt-max-samples", "7",
     "--autotune-gaussian-process-noise", "0.25"],
    ["--autotune-warmup-samples", "1", "--timeline-mark-cycles"],  # need --autotune, a timeline
    ["--timeline-filename", "t.json", "--timeline-mark-cycles", "--no-stall-check",
     "--stall-check-warning-time-seconds", "5", "--stall-check-shutdown-time-seconds", "9"],
    ["--mpi-threads-disable", "--tcp", "--num-nccl-streams", "3", "--thread-affinity", "2",
     "--gloo-timeout-seconds", "10", "--log-level", "INFO", "--log-without-timestamp"],
    ["--log-hide-timestamp", "--stall-check", "--no-autotune"],
    ["CONFIG"],
    ["CONFIG", "--fusion-threshold-mb", "4", "--no-autotune", "--stall-check",
     "--timeline-filename", "mine.json", "--log-level", "ERROR", "--log-with-timestamp"],
])
@pytest.mark.filterwarnings("ignore:Argument --log-hide-timestamp:DeprecationWarning")
def test_the_ranks_get_the_variables_horovods_own_horovodrun_sets(flags, tmp_path, monkeypatch):
    """Flags, a config file, and flags over a config file: the same ``HOROVOD_*`` variables
    as Horovod's own parser, config reader and table give (where Horovod is built)."""
    config = tmp_path / "horovod.yaml"
    config.write_text(CONFIG)
    words = ["-np", "2", *(w if w != "CONFIG" else f"--config-file={config}" for w in flags),
             "python", "train.py"]
    ours = horovodrun.variables(parse(*words))
    assert ours == horovods_variables(words, monkeypatch)
    if flags == ["CONFIG"]:  # the file was read: every setting reached its variable
        assert len(ours) == len(horovod_settings.SETTINGS)
    elif flags[:1] == ["CONFIG"]:  # the command line wins
        assert ours["HOROVOD_FUSION_THRESHOLD"] == str(4 * 2**20)
        assert "HOROVOD_AUTOTUNE" not in ours and ours["HOROVOD_LOG_LEVEL"] == "ERROR"


@pytest.mark.parametrize("text, disable", [
    ("params:\n  # fusion_threshold_mb: 64\nlogging:\n", None),  # every key commented out
    ("stall_check:\n  warning_time_seconds: 5\n", "0"),  # a section turns the check on
    ("stall_check:\n  shutdown_time_seconds: 9\n  enabled: false\n", "1"),
])
def test_a_config_file_horovod_reads_gives_its_variables(text, disable, tmp_path, monkeypatch):
    config = tmp_path / "horovod.yaml"
    config.write_text(text)
    words = ["-np", "2", "--config-file", str(config), "python", "x.py"]
    ours = horovodrun.variables(parse(*words))
    assert ours.get("HOROVOD_STALL_CHECK_DISABLE") == disable
    assert ours == horovods_variables(words, monkeypatch)


def test_a_config_file_horovod_reads_is_read_the_same(tmp_path):
    """Horovod's core takes a log level in any case, and an empty controller line is mpi."""
    config = tmp_path / "horovod.yaml"
    config.write_text("controller:\nlogging:\n  level: debug\n")
    args = parse("-np", "2", "--config-file", str(config), "python", "x.py")
    assert horovodrun.variables(args) == {"HOROVOD_LOG_LEVEL": "DEBUG"}


def test_mpi_on_the_command_line_wins_over_the_config_files_controller(tmp_path):
    """horovodrun reads the file's controller only when neither --mpi nor --gloo is given."""
    config = tmp_path / "horovod.yaml"
    config.write_text("controller: gloo\nparams:\n  fusion_threshold_mb: 2\n")
    args = parse("-np", "2", "--mpi", "--config-file", str(config), "python", "x.py")
    assert horovodrun.variables(args) == {"HOROVOD_FUSION_THRESHOLD": str(2 * 2**20)}


@pytest.mark.parametrize("text, message", [
    ("params: [1, 2]\n", "section 'params' wants key: value lines"),
    ("parms:\n  fusion_threshold_mb: 1\n", "unknown section 'parms'"),
    ("params:\n  fusion_treshold_mb: 1\n", "unknown key params.fusion_treshold_mb; params has"),
    ("params:\n  fusion_threshold_mb: big\n",
     "params.fusion_threshold_mb: want a whole number, got 'big'"),
    ("params:\n  fusion_threshold_mb: -2\n",
     "horovod.yaml': params.fusion_threshold_mb -2: want a finite number >= 0"),
    ("params:\n  cycle_time_ms: .nan\n", "horovod.yaml': params.cycle_time_ms nan: want a finite"),
    ("autotune:\n  enabled: 1\n", "autotune.enabled: want true or false, got 1"),
    ("logging:\n  level: LOUD\n", "logging.level: 'LOUD' is not one of TRACE"),
    ("controller: gloo\n", "controller 'gloo': hpctrain horovodrun starts MPI jobs only"),
    ("params:\n  cycle_time_ms: 1\n   cache_capacity: 2\n",
     "not YAML at line 3: mapping values are not allowed here"),
    ("- 1\n", "want a mapping of sections, got list"),
])
def test_a_config_file_horovod_would_misread_is_refused_naming_the_line(text, message, tmp_path):
    config = tmp_path / "horovod.yaml"
    config.write_text(text)
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(")):
        horovodrun.variables(parse("-np", "2", "--config-file", str(config), "python", "x.py"))
    with pytest.raises(UsageError, match="'/nonexistent.yaml': No such file"):
        horovodrun.variables(parse("-np", "2", "--config-file", "/nonexistent.yaml", "x.py"))
    config.write_bytes(b"params:\n  cycle_time_ms: \xff\n")  # Latin-1, say
    with pytest.raises(UsageError, match="horovod.yaml': not UTF-8 text"):
        horovodrun.variables(parse("-np", "2", "--config-file", str(config), "python", "x.py"))


def test_on_mpich_the_flags_become_hydras_mpirun_command(tmp_path):
    args = parse("-np", "3", "-H", "a:2,b:1", "--network-interface", "eth0", "--tcp",
                 "--fusion-threshold-mb", "1", "--output-filename", "/tmp/logs",
                 "--mpi-args=-verbose", "python", "train.py")
    environ = {"PATH": "/bin"}  # Hydra passes its own environment: nothing of it is named
    assert horovodrun.mpirun_command(args, environ, root=True, flavour="mpich") == [
        "mpirun", "-np", "3", "-hosts", "a:2,b:1", "-bind-to", "none", "-map-by", "slot",
        "-outfile-pattern", "/tmp/logs/rank.%r.stdout",
        "-errfile-pattern", "/tmp/logs/rank.%r.stderr",
        "-genv", "GLOO_SOCKET_IFNAME", "eth0", "-genv", "HOROVOD_FUSION_THRESHOLD", "1048576",
        "-genv", "NCCL_IB_DISABLE", "1", "-genv", "NCCL_SOCKET_IFNAME", "eth0",
        "-verbose", "python", "train.py"]
    intel = parse("-np", "4", "-H", "a:2,b:2", "-p", "2222", "python", "train.py")
    assert horovodrun.mpirun_command(intel, environ, flavour="intel") == [
        "mpirun", "-l", "-np", "4", "-hosts", "a,b", "-ppn", "2",
        "-bootstrap", "ssh", "-bootstrap-exec-args", "-p 2222", "python", "train.py"]


@pytest.mark.parametrize("flavour, words, message", [
    ("mpich", ["--prefix-output-with-timestamp"], "MPICH's mpirun cannot timestamp"),
    ("mpich", ["-i", "/k"], "-i: MPICH's mpirun takes no ssh arguments"),
    ("intel", ["-H", "a:2,b:1"], "hosts a:2,b:1: Intel MPI's mpirun wants the same slots"),
])
def test_what_a_hydra_mpirun_cannot_do_is_refused_in_one_line(flavour, words, message):
    with pytest.raises(UsageError, match=message):
        horovodrun.mpirun_command(parse("-np", "2", *words, "python", "x.py"), {},
                                  flavour=flavour)


def test_hosts_default_to_np_slots_here_and_a_bare_host_has_one():
    assert horovodrun.check(parse("-np", "3", "python", "x.py")) == [("localhost", 3)]
    assert horovodrun.slots("a,b:3") == [("a", 1), ("b", 3)]


def test_more_processes_than_slots_start_where_mpirun_would_start_them():
    """horovodrun leaves the slot count to mpirun: Open MPI's starts -np 3 on localhost:2 when
    told to oversubscribe, Hydra's places the third rank round the hosts again."""
    for told in (["--mpi-args=--oversubscribe"], ["--binding-args=--map-by slot:OVERSUBSCRIBE"]):
        cmd = horovodrun.mpirun_command(parse("-np", "3", "-H", "localhost:2", *told, "x.py"), {})
        assert cmd[cmd.index("-np") + 1] == "3"
    assert horovodrun.mpirun_command(parse("-np", "3", "-H", "localhost:2", "x.py"),
                                     {"OMPI_MCA_rmaps_base_oversubscribe": "1"})
    for flavour in ("mpich", "intel"):
        assert horovodrun.mpirun_command(parse("-np", "5", "-H", "a:2,b:2", "x.py"), {},
                                         flavour=flavour)


def test_a_hostfile_is_read_as_open_mpi_reads_it(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# the nodes\nnode1 slots=4\n\nnode2   # one slot\n")
    assert horovodrun.check(parse("-np", "5", "--hostfile", str(path), "python", "x.py")) == [
        ("node1", 4), ("node2", 1)]
    path.write_text("node1 slots = 4 max_slots=8\nnode2 slots=2\n")  # Open MPI takes both
    assert horovodrun.hostfile_slots(str(path)) == [("node1", 4), ("node2", 2)]
    for bad in ("node1 slots=four", "node1 slots=2 max_slots=x", "node1 cores=2", "node1 2"):
        path.write_text(bad + "\n")
        with pytest.raises(UsageError, match=f"'{bad}' is not 'host slots=N'"):
            horovodrun.hostfile_slots(str(path))
    path.write_text("node1 slots=four\n")
    with pytest.raises(UsageError, match="'node1 slots=four' is not 'host slots=N'"):
        horovodrun.hostfile_slots(str(path))
    path.write_bytes(b"n\xf6de1 slots=2\n")
    with pytest.raises(UsageError, match="hosts': not UTF-8 text"):
        horovodrun.hostfile_slots(str(path))


@pytest.mark.parametrize("words, message", [
    (["-np", "0", "python", "x.py"], "-np 0: want at least 1"),
    (["-np", str(10**20), "python", "x.py"], "-np 100000000000000000000: want at least 1 process "
     "and fewer than 2\\*\\*31"),  # mpirun read -1
    (["-np", "2", "-p", "0", "python", "x.py"], "0 is not a port"),  # was dropped
    (["-np", "2", "-p", "-5", "python", "x.py"], "-5 is not a port"),  # went on to ssh
    (["python", "x.py"], "-np: the number of processes is needed"),
    (["-np", "5", "-H", "a:2,b:2", "python", "x.py"], "-np 5: more processes than the 4 slots"),
    (["-np", "2", "-H", "a:two", "python", "x.py"], "'a:two' is not host or host:slots"),
    (["-np", "2"], "no command to run"),
    (["-np", "2", "--gloo", "python", "x.py"], "--gloo: hpctrain horovodrun starts MPI jobs"),
    (["-np", "2", "--min-np", "1", "python", "x.py"], "--min-np: horovodrun's elastic mode"),
    (["-np", "2", "--fusion-threshold-mb", "-1", "python", "x.py"],
     "--fusion-threshold-mb -1: want a finite number >= 0"),
    (["-np", "2", "--cycle-time-ms", "inf", "python", "x.py"],
     "--cycle-time-ms inf: want a finite number >= 0"),
    (["-np", "2", "--autotune-gaussian-process-noise", "1.5", "python", "x.py"],
     "--autotune-gaussian-process-noise 1.5: want <= 1"),
    (["-np", "2", "--jsrun", "python", "x.py"], "--jsrun: hpctrain horovodrun starts MPI jobs"),
    (["-np", "2", "--max-np", "4", "--host-discovery-script", "./hosts.sh", "python", "x.py"],
     "--host-discovery-script: horovodrun's elastic mode"),
    (["-np", "2", "-H", "", "python", "x.py"], "-H '': '' is not host or host:slots"),
    (["-np", "2", "--mpi-args", "-x 'A", "python", "x.py"],
     "--mpi-args \"-x 'A\": No closing quotation"),
    (["-np", "2", "--binding-args", "-bind-to 'core", "python", "x.py"],
     "--binding-args \"-bind-to 'core\": No closing quotation"),
])
def test_what_horovodrun_mpi_mode_cannot_start_is_refused_naming_the_value(words, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        horovodrun.mpirun_command(parse(*words), {})


def test_an_output_folder_that_cannot_be_made_is_refused(tmp_path):
    """Open MPI's mpirun printed its mkdir error for a file's path and never exited."""
    a_file = tmp_path / "afile.txt"
    a_file.write_text("")
    for folder in (a_file, a_file / "sub"):
        with pytest.raises(UsageError, match=f"--output-filename {folder}: cannot make that "
                                             "folder"):
            horovodrun.run(parse("-np", "2", "--output-filename", str(folder), "true"))


def test_a_program_that_cannot_start_on_this_host_is_refused_in_one_line(tmp_path, monkeypatch):
    """Open MPI's mpirun said a misspelt program in 13 lines and exit 134; where every rank
    runs here it is refused first. On other hosts it is not checked: it may be only there."""
    def exec_mpirun(*_):
        raise AssertionError("mpirun was started")  # a missed refusal must not replace pytest
    monkeypatch.setattr(horovodrun.os, "execv", exec_mpirun)
    not_executable = tmp_path / "train.sh"
    not_executable.write_text("#!/bin/sh\n")
    here = socket.gethostname()
    for words, message in [
        (["pyhton", "train.py"], "'pyhton': no such program on PATH"),
        (["-H", f"localhost:1,{here}:1", "--", "pyhton"], "'pyhton': no such program on PATH"),
        ([str(tmp_path / "nothere.sh")], f"{tmp_path / 'nothere.sh'}: no such file"),
        ([str(not_executable)], f"{not_executable}: not an executable file"),
        ([str(tmp_path)], f"{tmp_path}: not an executable file"),
    ]:
        with pytest.raises(UsageError, match=f"^{re.escape(message)} "):
            horovodrun.run(parse("-np", "2", *words))
    for words in (["-H", "a:1,localhost:1", "pyhton"], ["--mpi-args=-wdir /x", "./train.sh"],
                  [sys.executable, "train.py"]):
        horovodrun.check_program(parse("-np", "2", *words))


def test_elastic_flags_without_min_np_or_discovery_change_nothing_as_in_horovodrun():
    """horovodrun goes elastic on --min-np or --host-discovery-script only; with neither it
    starts the static job and ignores the rest, which job scripts keep from elastic runs."""
    rest = ["--max-np", "8", "--slots-per-host", "2", "--elastic-timeout", "600",
            "--reset-limit", "3", "--blacklist-cooldown-range", "60", "300"]
    plain = horovodrun.mpirun_command(parse("-np", "2", "python", "x.py"), {})
    assert horovodrun.mpirun_command(parse("-np", "2", *rest, "python", "x.py"), {}) == plain
    with pytest.raises(UsageError, match="--max-np/--max-num-proc: invalid int value: 'many'"):
        parse("-np", "2", "--max-np", "many", "python", "x.py")


SCRIPT = """
import torch
from mpi4py import MPI
import hpctrain.sync as hvd
from hpctrain.sync import stall
from hpctrain.sync.buckets import default_bucket_bytes
hvd.init()
total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum).item()
library = MPI.Get_library_version().split()[0]
print(f"rank {hvd.rank()} of {hvd.size()}: sum {total:g}, fusion {default_bucket_bytes()}, "
      f"stall check {stall.settings(None, None)[0]:g} s, {library}", flush=True)
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
        line = f"[1,{rank}]<stdout>:rank {rank} of 2: sum 3, fusion 1048576, stall check 60 s, Open"
        assert line in done.stdout
        assert line in (logs / "1" / f"rank.{rank}" / "stdout").read_text()
    phases = {e.get("name") for e in json.loads(timeline.read_text()) if e.get("ph") == "B"}
    assert {"ALLREDUCE", "MPI_ALLREDUCE"} <= phases  # HOROVOD_TIMELINE reached the ranks


def test_open_mpi_mpich_and_intel_mpi_are_told_apart_by_their_mpirun():
    assert mpirun.flavour_of(shutil.which("mpirun")) == "openmpi"
    assert mpirun.flavour_of("/nonexistent/mpirun") is None
    for mpi, prefix in OTHER_MPIS.items():
        if (prefix / "bin" / "mpirun").exists():  # Intel's is a script that finds the rest
            with pytest.MonkeyPatch.context() as patch:  # on PATH
                patch.setenv("PATH", mpi_env(mpi)["PATH"])
                assert mpirun.flavour_of(str(prefix / "bin" / "mpirun")) == mpi


# Intel MPI's mpirun as it is made: a /bin/sh script that runs mpiexec.hydra as its child.
INTEL_MPIRUN = """#!/bin/sh
if [ "$1" = --version ]; then echo "Intel(R) MPI Library for Linux* OS, Version 2021.18"; exit; fi
mpiexec.hydra "$@" <&0
rc=$?
exit $rc
"""


def test_an_mpirun_script_gives_way_to_the_hydra_binary_beside_it(tmp_path, monkeypatch):
    """A signal sent to Intel MPI's mpirun (the time limit's SIGUSR1, SIGTERM) ended the
    script, while the mpiexec.hydra it runs and the ranks went on: what starts, and is
    signalled, is that binary (here a stand-in: any ELF file), in horovodrun's exec too. A
    binary mpirun, a script without Hydra beside it and other launchers stay as given."""
    folder = Path(os.path.realpath(tmp_path)) / "bin"
    folder.mkdir()
    (folder / "mpirun").write_text(INTEL_MPIRUN)
    (folder / "mpirun").chmod(0o755)
    (folder / "mpiexec.hydra").symlink_to(os.path.realpath(sys.executable))
    hydra = str(folder / "mpiexec.hydra")
    binary_mpirun = shutil.which("mpirun")  # Open MPI's
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    assert mpirun.passing_signals("mpirun") == hydra
    assert mpirun.passing_signals(str(folder / "mpirun")) == hydra
    assert mpirun.passing_signals("mpiexec") == "mpiexec"
    started = []
    monkeypatch.setattr(horovodrun.os, "execv", lambda *how: started.append(how))
    horovodrun.run(parse("-np", "2", sys.executable, "train.py"))
    [(program, argv)] = started
    assert (program, argv[0], argv[-2:]) == (hydra, "mpirun", [sys.executable, "train.py"])
    (folder / "mpiexec.hydra").rename(folder / "mpiexec")  # its other name (Intel ships both)
    assert mpirun.passing_signals("mpirun") == str(folder / "mpiexec")
    (folder / "mpiexec").unlink()
    assert mpirun.passing_signals("mpirun") == "mpirun"
    assert mpirun.passing_signals(binary_mpirun) == binary_mpirun


# What each Hydra puts in front of the program for -np 2 on this host, and its library's name.
HYDRA_STARTS = {"mpich": ("mpirun -np 2 -hosts localhost:2 -bind-to none -map-by slot", "MPICH"),
                "intel": ("mpirun -np 2 -hosts localhost -ppn 2", "Intel(R)")}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mpi", ON_OTHER_MPIS)
def test_on_hydra_a_horovod_script_runs_with_settings_from_a_config_file(mpi, tmp_path):
    """The same script on MPICH's or Intel MPI's mpirun and library: Hydra's per-rank files,
    and the config file's settings in every rank's environment."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    config = tmp_path / "horovod.yaml"
    config.write_text("params:\n  fusion_threshold_mb: 2\nstall_check:\n"
                      "  warning_time_seconds: 7\n")
    logs = tmp_path / "logs"
    done = run_job(["horovodrun", "-np", "2", "--config-file", str(config), "--verbose",
                    "--output-filename", str(logs), sys.executable, str(script)], np=0,
                   env=mpi_env(mpi))
    assert done.returncode == 0, done.stderr
    start, library = HYDRA_STARTS[mpi]
    assert done.stderr.startswith(start + " -outfile-pattern ")  # --verbose
    for rank in (0, 1):  # Hydra writes the files only, one a rank
        assert (logs / f"rank.{rank}.stdout").read_text() == (
            f"rank {rank} of 2: sum 3, fusion 2097152, stall check 7 s, {library}\n")


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
                                      "slots of the hosts (--mpi-args=--oversubscribe starts "
                                      "them anyway)")


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
    assert lines[-1].startswith("hpctrain: error: -np 3: more processes than the 2 slots of ")


def test_check_build_needs_no_np_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "hpctrain", "horovodrun", "--check-build"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("hpctrain ") and "Available Controllers:" in proc.stdout


def test_a_stall_report_waits_for_answers_no_longer_than_the_shutdown_allows():
    """A rank that could not answer (it died) held HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=5 to
    13 s: the check's report waited 5 s for its answer, then the ending report 5 s more."""
    from hpctrain.sync.stall import _ANSWER_S, answer_wait

    assert answer_wait(1.0, ending=False, timeout_s=0.0, poll_s=0.25) == _ANSWER_S
    assert answer_wait(1.5, ending=False, timeout_s=5.0, poll_s=0.25) == 3.5  # to shutdown
    assert answer_wait(6.0, ending=False, timeout_s=5.0, poll_s=0.25) == 0.0
    assert answer_wait(5.2, ending=True, timeout_s=5.0, poll_s=0.25) == 0.5  # two polls
    assert answer_wait(700, ending=True, timeout_s=600, poll_s=1.0) == 2.0


def test_a_stall_report_says_the_wait_the_check_found(capfd, monkeypatch):
    """A 1 s check and a 3 s timeout said "waited 2 s" and "waited 4 s" (the example's
    docstring: 1 s and 3 s): the line counted in the time spent asking the other ranks.
    Rank 1 here is a thread's post on a store, as under torchrun. The module's clock stands
    still at ``now``: on the real one, a loaded machine's pause before the report made it."""
    import time
    from types import SimpleNamespace

    from torch.distributed import HashStore

    from hpctrain.sync import stall

    now = 1000.0
    monkeypatch.setattr(stall, "time", SimpleNamespace(monotonic=lambda: now, sleep=time.sleep))
    store = HashStore()
    found, since = now - 0.6, now - 1.8  # the check found 1.2 s; asking took 0.6 s
    stall._StorePeers(store, 1).serve(lambda: (None, "allreduce(name='warmup')", 2.0))
    monitor = stall._Monitor(stall._StorePeers(store, 0), 0, check_s=1.0, timeout_s=3.0)
    try:
        channel = SimpleNamespace(label="process set 0", global_rank=lambda r: r,
                                  transport=SimpleNamespace(size=lambda: 2))
        call = SimpleNamespace(describe=lambda: "allreduce(name='step')")
        monitor._report(stall._Waiting(channel, call, 1, since), ending=False, found=found)
    finally:
        monitor.stop()
    assert ("hpctrain.sync: stall: rank 0 waited 1 s in allreduce(name='step') (call #2 on "
            "process set 0); not arrived: rank 1 (last called allreduce(name='warmup'), 1 s "
            "ago); still waiting (stall check every 1 s)") in capfd.readouterr().err


def test_the_ending_report_names_what_a_silent_rank_said_at_the_check():
    """The ending report waits two polls for answers; on a loaded node a stuck rank's thread
    missed them and the report said "rank 1 (no answer)" where the check's report of the
    same wait had heard its last call (CI, examples/horovod_stall_timeout.py)."""
    from hpctrain.sync.stall import _with_earlier

    heard: dict = {}
    at_check = _with_earlier({1: (None, "allreduce(name='warmup')", 1.0),
                              2: (None, "allreduce(name='a')", 0.5)}, heard, [1, 2])
    assert at_check[1][1] == "allreduce(name='warmup')"
    ending = _with_earlier({2: (None, "allreduce(name='b')", 0.1)}, heard, [1, 2, 3])
    assert ending[2] == (None, "allreduce(name='b')", 0.1)  # its own answer now
    assert ending[1][:2] == (None, "allreduce(name='warmup')") and ending[1][2] >= 1.0
    assert 3 not in ending  # never heard: "no answer"
