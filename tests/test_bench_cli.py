"""The micro-benchmarks' command lines: bad values refused, ``--json`` written.

Bad values are checked while parsing (one line naming the value, exit status 2, before MPI
starts); the jobs run the real benchmarks with tiny settings, as a user does.
"""

import datetime
import importlib
import importlib.util
import json
import os
import shlex
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch
from conftest import run_job

from hpctrain import bench, cli, comm, kernels, launch_env, metrics, options
from hpctrain.bench import allreduce, kernel, shuffle, store
from hpctrain.errors import UsageError


def parse(*argv: str):
    return cli.build_parser().parse_args(["bench", *argv])


@pytest.mark.parametrize("argv, named", [
    (["kernel", "--elements", "0"], "--elements: must be >= 1, got 0"),
    (["kernel", "--elements", "1.5"], "'1.5' is not a whole number"),
    (["kernel", "--threads", "1,x"], "--threads: '1,x': 'x' is not a number"),
    (["kernel", "--threads", "0"], "--threads: '0': 0 is below 1"),
    (["kernel", "--repeats", "-2"], "--repeats: must be >= 1, got -2"),
    (["kernel", "--device", "tpu"], "--device: invalid choice: 'tpu'"),
    (["store", "--seconds", "-1"], "--seconds: must be > 0, got -1"),
    (["store", "--seconds", "inf"], "--seconds: 'inf' is not a finite number"),
    (["store", "--params", "10,,abc"], "--params: '10,,abc': 'abc' is not a number"),
    (["store", "--params", "0"], "--params: '0': 0 is below 1"),
    (["store", "--consistency", "locked,eventual"], "'eventual'; choose from locked, atomic"),
    (["store", "--consistency", "locked,"], "--consistency: 'locked,': an empty entry"),
    (["allreduce", "--params", "1e6,2"], "--params: '1e6,2': 2 is below 4"),
    (["allreduce", "--bucket-mb", "0"], "--bucket-mb: must be > 0, got 0"),
    (["allreduce", "--warmup", "-1"], "--warmup: must be >= 0, got -1"),
    (["shuffle", "--dataset", "imagenet"], "unknown --dataset 'imagenet'; choose from"),
    (["shuffle", "--data-dir", "/no/such/folder"], "/no/such/folder is not a folder"),
    (["shuffle", "--epochs", "0"], "--epochs: must be >= 1, got 0"),
    (["shuffle", "--shuffle-chunk-mb", "nan"], "'nan' is not a finite number"),
    (["shuffle", "--seed", "x"], "--seed: 'x' is not a number"),
    # Each below was accepted, then failed after MPI started (exit 1, or a crash).
    (["kernel", "--threads", "100000"], "--threads: '100000': 100000 is above 4096"),  # SIGSEGV
    (["kernel", "--threads", "1e308"], "--threads: '1e308': 1e+308 is above 4096"),
    (["kernel", "--threads", "1,,2"], "--threads: '1,,2': an empty entry"),  # was [1, 2]
    (["store", "--params", "1000,"], "--params: '1000,': an empty entry"),
    (["allreduce", "--bucket-mb", "1e308"], "--bucket-mb: must be <= 1e+06, got 1e308"),
    (["shuffle", "--shuffle-chunk-mb", "1e308"], "--shuffle-chunk-mb: must be <= 1e+06, got 1e308"),
    (["shuffle", "--seed", "99999999999999999999"],
     "--seed: must be in [-2**63, 2**63 - 1], got 99999999999999999999"),
    (["shuffle", "--data-dir", ""], "--data-dir: '' is empty: give a folder"),  # was the cwd
    # Each below ran until killed (a typo of a count or a time).
    (["kernel", "--repeats", "1e20"], "--repeats: must be <= 1e+06, got 1e20"),
    (["store", "--seconds", "1e30"], "--seconds: must be <= 1e+06, got 1e30"),
    (["shuffle", "--epochs", "1e20"], "--epochs: must be <= 1e+06, got 1e20"),
    (["allreduce", "--warmup", "1e7"], "--warmup: must be <= 1e+06, got 1e7"),
    (["allreduce", "--repeats", "1e7"], "--repeats: must be <= 1e+06, got 1e7"),
])
def test_bad_values_are_refused_while_parsing(argv, named):
    with pytest.raises(UsageError) as e:
        parse(*argv)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_good_values_are_parsed():
    args = parse("store", "--params", "1e3, 20,1000", "--consistency", "atomic,locked,atomic")
    assert (args.params, args.consistency, args.seconds) == ([1000, 20], ["atomic", "locked"],
                                                             3.0)  # each measured once
    assert parse("kernel", "--threads", "4096,1,4096").threads == [4096, 1]
    assert parse("shuffle", "--seed", "-1").seed == -1
    args = parse("kernel")
    assert (args.threads, args.elements) == ([1, 2], 16 * 2**20)
    assert parse("allreduce", "--out", "x.json").json == "x.json"  # --out: the old name


@pytest.mark.timeout(120)
@pytest.mark.parametrize("np, argv, line", [
    # The QA case: a ZeroDivisionError, exit 1.
    (2, ["--seconds", "-1"], "hpctrain: error: argument --seconds: must be > 0, got -1"),
    # Measured the two-sided case, then every rank died after MPI started (exit 1).
    (3, ["--params", "1", "--seconds", "0.1"], "hpctrain: error: --params 1: fewer parameters "
     "than the store's 2 shards (one per worker, -np 3); give at least 2"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, np, argv, line):
    """One job per kind of refusal before MPI starts: a bad value while parsing, a value the
    benchmark's validate() refuses for the ranks it runs on (and the missing data files
    below); the rest are checked in process."""
    proc = run_job(["bench", "store", *argv, "--json", str(tmp_path / "x.json")], np=np,
                   timeout=90)
    assert proc.returncode == 2, proc.stderr
    assert [x for x in proc.stderr.splitlines() if x.startswith("hpctrain")] == [line]
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("argv, message", [
    # The QA case: a RuntimeError (exit 1) before.
    (["store", "--seconds", "0.1"],
     "the store benchmark needs mpirun -np W+1 (W >= 1 workers), not 1 rank(s)"),
    (["shuffle", "--dataset", "synthetic"],
     "the shuffle benchmark needs >= 2 ranks (mpirun -np 4), not 1"),
    # A table of zeros (no bucket, ratio 0.00) whose goal was met.
    (["allreduce", "--params", "100"], "the allreduce benchmark needs >= 2 ranks (mpirun -np 2), "
     "not 1"),
])
def test_a_benchmark_on_too_few_ranks_is_refused_before_mpi(monkeypatch, argv, message):
    """What ``validate`` refuses under ``mpirun -np 1``, before MPI starts."""
    launched_by_open_mpi(monkeypatch, ranks=1)
    args = parse(*argv)
    with pytest.raises(UsageError) as e:
        importlib.import_module(cli.BENCHMARKS[args.benchmark]).validate(args)
    assert str(e.value) == message


@pytest.mark.parametrize("ranks, argv, message", [
    # Measured the two-sided case, then every rank died after MPI started: "shards=2: need
    # 1 <= shards <= 1".
    (3, ["store", "--params", "1", "--seconds", "0.1"],
     "--params 1: fewer parameters than the store's 2 shards (one per worker, -np 3); give at "
     "least 2"),
    (5, ["store", "--params", "1e6,3"],
     "--params 3: fewer parameters than the store's 4 shards (one per worker, -np 5); give at "
     "least 4"),
    # N copies competing for the memory bandwidth, and only rank 0's figures printed.
    # The folder was ignored (train refuses it).
    (2, ["shuffle", "--dataset", "synthetic", "--data-dir", "/tmp"],
     "--data-dir /tmp is not used by --dataset synthetic"),
    # A user's data as train takes it (it was "invalid choice"), checked as train checks it.
    (2, ["shuffle", "--dataset", "npz:/no/such.npz"], "--dataset npz:/no/such.npz: no file "
     "/no/such.npz"),
    (2, ["kernel", "--elements", "1000"],
     "bench kernel measures one process's kernel: run it on one rank (mpirun -np 1, or "
     "srun/sbatch --ntasks-per-node=1 on one node), not 2"),
])
def test_what_the_ranks_cannot_run_is_refused_before_mpi(monkeypatch, ranks, argv, message):
    launched_by_open_mpi(monkeypatch, ranks=ranks)
    args = parse(*argv)
    with pytest.raises(UsageError) as e, options.command_line():  # as cli.main runs it
        importlib.import_module(cli.BENCHMARKS[args.benchmark]).validate(args)
    assert str(e.value) == message


def test_the_store_takes_one_parameter_per_shard(monkeypatch):
    launched_by_open_mpi(monkeypatch, ranks=3)
    store.validate(parse("store", "--params", "2,1e6"))  # 2 workers, 2 shards: accepted


def test_the_ranks_on_one_node_share_its_memory(monkeypatch):
    """The check was per rank: bench store --params 1.2e9 on 4 ranks of a 25 GB machine
    passed at 24 GB a rank, and the two-sided phase alone needed 53 GB."""
    launched_by_open_mpi(monkeypatch, ranks=4)
    params = bench.memory() // (4 * 5) // 2  # half the machine a rank: two ranks' worth fit
    store.validate(parse("store", "--params", str(params)))
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
    with pytest.raises(UsageError, match=r"of memory per rank \(.* GB for the 4 ranks on it\); "
                                         "this machine has "):
        store.validate(parse("store", "--params", str(params)))
    # The server's need is not every rank's: 8 ranks, each worker holding 2 copies, fit
    launched_by_open_mpi(monkeypatch, ranks=8)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "8")
    store.validate(parse("store", "--params", str(bench.memory() // 150)))


SRUN_TASK = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "7", "SLURM_PROCID": "2"}


@pytest.mark.parametrize("env, here", [
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, 3), ({"MPI_LOCALNRANKS": "5"}, 5),
    ({"MV2_COMM_WORLD_LOCAL_SIZE": "8"}, 8), ({"PALS_LOCAL_SIZE": "8"}, 8),
    ({**SRUN_TASK, "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "2"}, 2),
    ({**SRUN_TASK, "SLURM_STEP_TASKS_PER_NODE": "2,3(x2)", "SLURM_NODEID": "1"}, 3),
    ({**SRUN_TASK, "SLURM_STEP_TASKS_PER_NODE": "1,4(x2)", "SLURM_NODEID": "2"}, 4),
    # the launcher that gave the rank (Hydra's), not a count Open MPI left: it read that
    ({"PMI_SIZE": "2", "PMI_RANK": "1", "MPI_LOCALNRANKS": "2",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, 2),
    ({}, 1)])
def test_the_ranks_on_this_node_are_read_from_each_launcher(monkeypatch, env, here):
    """As :func:`hpctrain.launch_env.local_size` reads them (test_launch_env has the rest)."""
    for name in [*launch_env.LOCAL_SIZES, *launch_env.SLURM_STEP, launch_env.SLURM_STEP_SIZE,
                 "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID",
                 *(v for _, size, rank in launch_env.LAUNCHERS for v in (size, rank))]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert bench.ranks_here() == here


@pytest.mark.parametrize("name", ["shuffle", "store", "allreduce"])
def test_an_mpi_benchmark_under_torchrun_is_refused_before_mpi(monkeypatch, name):
    """Each process ran as an MPI world of one after counting torchrun's two: shuffle divided
    by zero, store refused itself after measuring, allreduce named an option it lacks."""
    env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost",
           "MASTER_PORT": "29500", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    args = parse(name, *(["--dataset", "synthetic"] if name == "shuffle" else []))
    with pytest.raises(UsageError) as e:
        importlib.import_module(cli.BENCHMARKS[name]).validate(args)
    assert str(e.value) == (f"the {name} benchmark moves data through MPI, and torchrun starts "
                            "no MPI world: launch with mpirun, or srun with PMI/PMIx")


def launched_by_open_mpi(monkeypatch, ranks: int) -> None:
    """This process as rank 0 of ``ranks`` started by Open MPI's mpirun (validate reads the
    launcher's variables; torchrun's are read first, so they go)."""
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", str(ranks))
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")


@pytest.mark.parametrize("argv, message", [
    # Each was a torch error on every rank after MPI started (exit 1), or the kernel's OOM kill.
    (["kernel", "--elements", "1e308"], "--elements 1e+308 needs at least 6.00e+300 GB of "
     "memory per rank; this machine has "),
    (["store", "--params", "1000,1e308"], "--params 1e+308 needs at least 1.20e+300 GB of "
     "memory per rank; this machine has "),
    (["allreduce", "--params", "1e308"], "--params 1e+308 with --batch-size 16 needs at least "
     "2.00e+300 GB of memory per rank; this machine has "),
    (["allreduce", "--params", str(10 ** 400)], "--params 1e+400 with --batch-size 16 needs "
     "at least 2.00e+392 GB of memory per rank; this machine has "),  # was an OverflowError
    (["allreduce", "--batch-size", "1e308"], "--params 10000000 with --batch-size 1e+308 needs "
     "at least 2.53e+303 GB of memory per rank; this machine has "),
    # Zero bytes per bucket: every rank's error after MPI started.
    (["allreduce", "--bucket-mb", "1e-308"],
     "--bucket-mb 1e-308: less than one byte (MiB are 2**20 bytes)"),
])
def test_what_cannot_fit_is_refused_before_mpi(monkeypatch, argv, message):
    """``validate``: the sizes' memory, before MPI starts (here: Open MPI's mpirun, one rank
    for the one-process kernel benchmark, else 2)."""
    launched_by_open_mpi(monkeypatch, ranks=1 if argv[0] == "kernel" else 2)
    args = parse(*argv)
    with pytest.raises(UsageError) as e:
        importlib.import_module(cli.BENCHMARKS[args.benchmark]).validate(args)
    assert str(e.value).startswith(message) and str(e.value).endswith(" GB") \
        or str(e.value) == message


@pytest.mark.parametrize("where, message", [("missing/x.json", "no folder"), ("", "is a folder")])
def test_a_json_file_that_cannot_be_written_is_refused_before_measuring(tmp_path, where,
                                                                       message):
    """Found at the end, a missing folder would lose the benchmark's figures."""
    path = tmp_path / where
    with pytest.raises(UsageError, match=f"^--json {path}: {message}"):
        cli.main(["bench", "kernel", "--elements", "1000", "--repeats", "1", "--json",
                  str(path)])


def test_a_json_file_name_too_long_is_refused_naming_it(tmp_path):
    """A name over NAME_MAX was the stat's OSError (ENAMETOOLONG): exit 1, no option named."""
    path = str(tmp_path / ("j" * 300))
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    with pytest.raises(UsageError) as e:
        cli.main(["bench", "kernel", "--elements", "1000", "--repeats", "1", "--json", path])
    assert str(e.value) == (f"--json {path[:100]}...{path[-50:]} ({len(path)} bytes): a name "
                            f"in it is longer than {limit} bytes (300 bytes)")


def test_a_shuffle_data_dir_name_too_long_is_refused_naming_it(tmp_path):
    """``bench shuffle --data-dir`` with a name over NAME_MAX was is_dir's OSError
    (ENAMETOOLONG) while parsing: exit 1, no option named."""
    path = str(tmp_path / ("d" * 300))
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    with pytest.raises(UsageError) as e:
        parse("shuffle", "--data-dir", path)
    assert str(e.value) == (f"argument --data-dir: {path[:100]}...{path[-50:]} ({len(path)} "
                            f"bytes): a name in it is longer than {limit} bytes (300 bytes)")


def test_allreduce_without_a_launcher_is_one_rank_and_refused(monkeypatch):
    for _, size_var, rank_var in launch_env.LAUNCHERS:
        monkeypatch.delenv(size_var, raising=False)
        monkeypatch.delenv(rank_var, raising=False)
    with pytest.raises(UsageError, match=r"needs >= 2 ranks \(mpirun -np 2\), not 1$"):
        importlib.import_module(cli.BENCHMARKS["allreduce"]).validate(parse("allreduce"))


@pytest.mark.timeout(120)
def test_allreduce_on_one_rank_is_one_line_and_exit_2(tmp_path):
    """It measured, printed a table of zeros and wrote its JSON (exit 0)."""
    proc = run_job(["bench", "allreduce", "--params", "100", "--warmup", "0", "--repeats", "1",
                    "--no-horovod", "--json", str(tmp_path / "x.json")], np=1, timeout=90)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert [x for x in proc.stderr.splitlines() if x.startswith("hpctrain")] == [
        "hpctrain: error: the allreduce benchmark needs >= 2 ranks (mpirun -np 2), not 1"]
    assert proc.stdout == "" and not (tmp_path / "x.json").exists()


def what_is_there(path) -> str:
    """``path``'s kind, without following a link."""
    return "link" if path.is_symlink() else "fifo" if path.is_fifo() else \
        "file" if path.is_file() else "missing"


@pytest.mark.timeout(120)
def test_a_json_link_is_followed_and_kept(tmp_path):
    """The rename replaced the link with a file and left its target as it was."""
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text('{"benchmark": "old"}\n')  # an earlier record: replaced
    link.symlink_to(target)
    proc = run_job(["bench", "kernel", "--elements", "1000", "--threads", "1", "--repeats", "1",
                    "--json", str(link)], np=0, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert what_is_there(link) == "link" and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["benchmark"] == "kernel"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "target.json"]
    # A link into another folder, to a file not made yet: made there, beside no temporary.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dangling = tmp_path / "new.json"
    dangling.symlink_to(elsewhere / "made.json")
    cli._check_json_path(str(dangling))
    metrics.write_json_atomic(dangling, {"a": 1})
    assert what_is_there(dangling) == "link" and [p.name for p in elsewhere.iterdir()] == [
        "made.json"] and json.loads(dangling.read_text()) == {"a": 1}


def _kernel_refuses_json(target: Path, through_a_link: bool, monkeypatch) -> tuple[Path, str]:
    """``bench kernel --json`` given ``target`` (or a link to it beside it): the path given
    and the refusal's line, said before MPI starts."""
    path = target
    if through_a_link:
        path = target.parent / "link.json"
        path.symlink_to(target)
    monkeypatch.setattr(cli.comm, "init", lambda *a: pytest.fail("MPI started"))
    with pytest.raises(UsageError) as e:
        cli.main(["bench", "kernel", "--elements", "1000", "--repeats", "1", "--json",
                  str(path)])
    return path, str(e.value)


@pytest.mark.parametrize("through_a_link", [False, True])
def test_a_json_path_that_is_no_regular_file_is_refused_before_measuring(
        tmp_path, monkeypatch, through_a_link):
    """A FIFO (as a device node, /dev/full as root) was replaced with a plain file."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    path, refusal = _kernel_refuses_json(fifo, through_a_link, monkeypatch)
    seen = f"its target {fifo} is" if through_a_link else "is"
    assert refusal == f"--json {path}: {seen} a FIFO, not a regular file"
    assert what_is_there(fifo) == "fifo" and what_is_there(path) == ("link" if through_a_link
                                                                     else "fifo")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"fifo", path.name})


@pytest.mark.parametrize("through_a_link", [False, True])
def test_a_json_path_holding_no_json_is_kept_and_refused_before_measuring(
        tmp_path, monkeypatch, through_a_link):
    """A file of the user's that is no JSON (a review's fuzzing gave --json /etc/passwd, and
    bench kernel replaced it) is refused and kept; an empty one or an earlier record is
    replaced."""
    kept = tmp_path / "passwd"
    kept.write_text("root:x:0:0:root:/root:/bin/bash\n")
    path, refusal = _kernel_refuses_json(kept, through_a_link, monkeypatch)
    seen = f"its target {kept}" if through_a_link else "it"
    assert refusal == (f"--json {path}: {seen} holds something other than JSON, and the "
                       "results would replace it: remove it, or name another file")
    assert kept.read_text() == "root:x:0:0:root:/root:/bin/bash\n"
    for replaceable in ("", "  \n", '[1, {"a": 2}]\n'):
        kept.write_text(replaceable)
        cli._check_json_path(str(path))


def test_a_json_link_loop_is_refused_before_measuring(tmp_path):
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    with pytest.raises(UsageError, match=f"^--json {loop}: Too many levels of symbolic links$"):
        cli._check_json_path(str(loop))
    assert what_is_there(loop) == "link"


@pytest.mark.timeout(120)
def test_missing_data_files_are_one_line_from_rank_0(tmp_path):
    proc = run_job(["bench", "shuffle", "--dataset", "mnist", "--data-dir", str(tmp_path)], np=2,
                   timeout=90)
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("hpctrain")]
    # Checked before MPI starts, like train's input: rank 0's line, without a rank prefix.
    assert len(lines) == 1 and lines[0].startswith(
        f"hpctrain: error: no mnist files found (tried {tmp_path}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_kernel_on_cuda_without_a_device_is_a_usage_error(tmp_path):
    proc = run_job(["bench", "kernel", "--device", "cuda", "--elements", "10"], np=0, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "hpctrain: error: --device cuda: torch sees no CUDA device"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("np, argv, key", [
    (0, ["kernel", "--elements", "1000", "--threads", "1", "--repeats", "1"], "rows"),
    (2, ["store", "--params", "1000", "--seconds", "0.1", "--consistency", "locked"], "rows"),
    (2, ["allreduce", "--params", "100", "--warmup", "0", "--repeats", "1", "--no-horovod",
         "--adasum"],
     "models"),
    (2, ["shuffle", "--dataset", "synthetic", "--epochs", "1"], "ratio"),
])
def test_json_is_written_by_every_micro_benchmark(tmp_path, np, argv, key):
    """With the machine it ran on: BENCHMARKS' figures came with a machine written by hand,
    and the load on a shared node (which decides the figures) was nowhere."""
    path = tmp_path / "figures.json"
    proc = run_job(["bench", *argv, "--json", str(path)], np=np, timeout=240)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(path.read_text())
    assert figures["benchmark"] == argv[0] and figures[key]
    assert [p.name for p in tmp_path.iterdir()] == ["figures.json"]  # no temporary left
    machine = figures["machine"]
    assert {"date", "host", "cpus", "cpu", "torch", "hpctrain", "python", "load_average_start",
            "load_average_end"} <= machine.keys()
    assert machine["cpus"] >= 1 and len(machine["load_average_end"]) == 3
    # The machine's CPUs, not rank 0's: under mpirun a rank bound to one core said "1 CPUs"
    # of this 2-CPU machine. cpus stays, rank 0's, for older readers.
    assert machine["machine_cpus"] == os.cpu_count()
    assert 1 <= machine["rank_cpus"] == machine["cpus"] <= machine["machine_cpus"]
    cpus = os.cpu_count()
    assert f"machine: {machine['host']}, {cpus} CPU{'s' if cpus != 1 else ''} (" in proc.stdout
    assert datetime.datetime.fromisoformat(machine["date"]).tzinfo is not None
    assert "hpctrain_commit" in machine  # the tests run from a checkout
    assert bench.header(machine) in proc.stdout.splitlines()
    # The goal's line says whether this run met it (the reader compared the figures by hand).
    verdict = {True: "met", False: "NOT met"}
    if argv[0] == "allreduce":
        met = all(m["ratio_to_raw"]["mpi backend"] <= 1.1 for m in figures["models"])
        assert f"goal: mpi backend / raw <= 1.1: {verdict[met]}" in proc.stdout.splitlines()
    if argv[0] == "shuffle":
        assert f"(goal >= 0.8: {verdict[figures['ratio'] >= 0.8]})" in proc.stdout
    # The command that measured it (a figure without it could not be measured again).
    assert f"bench {argv[0]} " in machine["command"] and str(path) in machine["command"]
    # Repeats' spread, not one figure: min <= median <= max, the median the one shown.
    if argv[0] == "allreduce":
        model = figures["models"][0]
        for name, ms in model["ms"].items():
            spread = model["spread_ms"][name]
            assert spread["min"] <= spread["median"] == ms <= spread["max"]
        assert model["raw_busbw_gb_s"] == pytest.approx(model["raw_algbw_gb_s"])  # 2 ranks
        assert model["raw_algbw_gb_s"] == pytest.approx(
            model["bytes"] / model["ms"]["raw Allreduce"] / 1e6)
        assert "each iteration's slowest rank" in proc.stdout
    if argv[0] == "kernel":
        row = figures["rows"][0]
        for name in ("fused", "copy", "torch"):
            spread = row["spread_gb_s"][name]
            assert spread["min"] <= spread["median"] == pytest.approx(row[f"{name}_gb_s"])
            assert spread["median"] <= spread["max"]
    if argv[0] == "shuffle":
        spread = figures["spread_mb_s_per_rank"]["reshuffle_mb_s"]
        assert spread["min"] <= spread["median"] == figures["reshuffle_mb_s_per_rank"]
        assert spread["median"] <= spread["max"]
        assert len(figures["per_rank"]) == 2


def test_a_collective_takes_its_slowest_ranks_time():
    """allreduce and shuffle reported the mean over the ranks of each rank's median: a rank
    that always waited (4 ms against 1) counted half, as if the step took 2.5 ms."""
    per_rank = [{"step": [1.0, 1.0, 9.0], "raw": [2.0, 0.5, 0.5]},
                {"step": [4.0, 4.0, 4.0], "raw": [1.0, 1.0, 1.0]}]
    assert bench.slowest(per_rank) == {"step": [4.0, 4.0, 9.0], "raw": [2.0, 1.0, 1.0]}
    assert bench.slowest_over_ranks(comm.mpi().COMM_SELF, per_rank[0]) == per_rank[0]


def test_the_spread_of_the_repeats():
    assert bench.spread([3.0, 1.0, 2.0, 10.0], 1e3) == {"min": 1e3, "median": 2.5e3,
                                                         "max": 1e4}


@pytest.mark.parametrize("ranks, busbw", [(2, 2.0), (4, 3.0), (8, 3.5)])
def test_allreduce_bandwidths_are_nccl_tests(ranks, busbw):
    """algbw = bytes / time, busbw = algbw * 2(n-1)/n (nccl-tests' PERFORMANCE.md): 4 GB of
    float32 gradients in 2 s."""
    assert allreduce.bandwidth(4 * 10**9, 2.0, ranks) == pytest.approx((2.0, busbw))


def test_the_shuffles_mb_per_rank_is_each_epochs_mean_over_the_ranks():
    """It was rank 0's alone."""
    assert shuffle.per_epoch_mean([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]) == [2.0, 3.0, 4.0]


def test_a_store_push_loop_warms_up_untimed():
    """The first push, timed, mapped the windows' pages and started the kernel's threads: with
    --seconds 0.1 one slow push in a few hundred."""
    calls = []
    pushes, seconds = store._push_loop(lambda: calls.append(1), 1e-9,
                                       comm.mpi().COMM_SELF)
    assert pushes == 1 and seconds > 0
    assert len(calls) == pushes + store.WARMUP_PUSHES


def test_the_machine_line_says_what_is_unknown():
    record = {"date": "2026-12-05T23:00:00+00:00", "host": "node7", "cpus": 16,
              "torch": "2.13.0", "hpctrain": "0.1.0", "load_average_start": [3.5, 2, 1],
              "load_average_end": None, "hpctrain_commit": "0123456789abcdef+dirty"}
    assert bench.header(record) == (
        "machine: node7, 16 CPUs (?), load 3.5 -> ? (1 min); torch 2.13.0, hpctrain 0.1.0 "
        "(0123456789+dirty); 2026-12-05T23:00:00+00:00")


def test_the_machine_line_names_the_machines_cpus_and_rank_0s_where_they_differ():
    record = {"date": "2026-12-05T23:00:00+00:00", "host": "vm", "machine_cpus": 2,
              "rank_cpus": 1, "cpus": 1, "cpu": "AMD EPYC", "torch": "2.13.0",
              "hpctrain": "0.1.0", "load_average_start": [1.34], "load_average_end": [1.34]}
    assert bench.header(record).startswith(
        "machine: vm, 2 CPUs (AMD EPYC), rank 0 may run on 1, load 1.34 -> 1.34 (1 min); ")
    assert bench.header({**record, "rank_cpus": 2, "cpus": 2}).startswith(
        "machine: vm, 2 CPUs (AMD EPYC), load")


def test_the_command_of_a_benchmark_started_with_python_m_can_be_typed_again(monkeypatch):
    """BENCHMARKS gives ``python -m hpctrain.bench.allreduce ...``: there ``sys.argv[0]`` is
    the module's file, and the JSON's ``command`` read ``.../hpctrain/bench/allreduce.py
    --repeats 20``, which names neither the interpreter nor ``-m``."""
    spec = importlib.util.find_spec("hpctrain.bench.allreduce")
    main = types.ModuleType("__main__")
    main.__spec__ = spec
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", [spec.origin, "--repeats", "20", "--json", "a b.json"])
    assert bench.started()["command"] == (
        f"{shlex.quote(sys.executable)} -m hpctrain.bench.allreduce --repeats 20 --json "
        "'a b.json'")
    # A console script (``hpctrain bench ...``) or a script run by path: argv as it is.
    main.__spec__ = None
    monkeypatch.setattr(sys, "argv", ["/venv/bin/hpctrain", "bench", "kernel"])
    assert bench.started()["command"] == "/venv/bin/hpctrain bench kernel"


def test_the_two_sided_server_updates_in_one_pass(monkeypatch):
    """The baseline's update is the kernel's one pass writing the new model into w and w_bak
    (as the store's locked push); it was the kernel, then a second pass copying w to w_bak."""
    gen = torch.Generator().manual_seed(0)
    w, g, w_bak = (torch.rand(1001, generator=gen) for _ in range(3))
    want = kernels.dc_update(w.clone(), g, w_bak.clone(), **store.HYPER)
    passes = []
    real = kernels.dc_update
    monkeypatch.setattr(kernels, "dc_update", lambda *a, **k: passes.append(k) or real(*a, **k))
    monkeypatch.setattr(torch.Tensor, "copy_", lambda *a, **k: passes.append("copy_"))
    store.serve(w, g, w_bak)
    assert len(passes) == 1 and passes[0]["out2"] is w_bak
    assert torch.equal(w, want) and torch.equal(w_bak, want)


def test_each_kernel_variant_frees_its_buffers_before_the_next_allocates(monkeypatch):
    """The copy baseline's buffers of dcasgd-c were alive (held by the timed calls) when
    dcasgd-a's were allocated; the peak (with unfused torch's temporaries) is what validate
    counts: 60 B per element, as /usr/bin/time -v measured at 8M and 16M elements."""
    made = []
    empty_like = torch.empty_like

    def tracked(t):
        assert all(ref() is None for ref in made), "the previous variant's buffer is alive"
        out = empty_like(t)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(torch, "empty_like", tracked)
    rows = kernel.measure(1000, threads=1, repeats=1, device="cpu")
    assert [r["variant"] for r in rows] == ["dcasgd-c", "dcasgd-a"] and len(made) == 2
    assert kernel.ALLOCATED_PER_ELEMENT == 60


def test_a_raw_allreduce_after_backward_within_noise_has_no_ratio():
    """It is the difference of two timed backward passes: -0.02 ms gave ratios of -10.33,
    0.008 ms (against a 0.17 ms backward) of 39 and 95."""
    from hpctrain.bench import allreduce

    def row(after_ms: float) -> dict:
        seconds = {"backward alone, mpi phase": [0.17e-3], allreduce.RAW: [0.02e-3],
                   allreduce.RAW_AFTER: [after_ms * 1e-3], allreduce.MPI_BACKEND: [0.3e-3]}
        return allreduce._row(2, 400, seconds, 1)

    for after in (-0.02, 0.008):
        assert row(after)["ratio_to_raw_after_backward"] == {allreduce.MPI_BACKEND: None}
    assert row(0.05)["ratio_to_raw_after_backward"][allreduce.MPI_BACKEND] == pytest.approx(6)
    table = allreduce._table({"models": [row(0.008)], "ranks": 2, "device": "cpu",
                              "batch_size": 16, "repeats": 3, "warmup": 0,
                              "zero_grad": "set_to_none", "iallreduce_algorithm": "default",
                              "horovod": "left out"})
    assert table.splitlines()[-3].split()[-1] == "n/a" and "within their noise" in table


def test_an_allreduce_step_on_a_gpu_waits_for_its_forward_before_the_clock(monkeypatch):
    """The forward's kernels were queued, not finished, when the barrier let the clock start:
    each rank's backward (and backward alone) counted what was left of its forward, and the
    ranks did not start together on the GPU. No GPU here: the model runs on the CPU, and what
    is checked is the order of the calls (scripts/gpu-check.sh runs the benchmark on one)."""
    events: list[str] = []

    class World:
        def Barrier(self):
            events.append("barrier")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: events.append("synchronize"))
    variant = allreduce._Variant("backward alone", 100)
    variant._cuda = True
    variant.step(World(), torch.ones(2, allreduce._width(100)), timed=True, set_to_none=True)
    assert events == ["synchronize", "barrier", "synchronize"]
    assert len(variant.seconds) == 1


def test_the_raw_allreduce_sums_the_same_values_every_iteration():
    """In place, its buffer of ones became ranks^k after k Allreduces: inf on 4 ranks after
    64 (the default 35 iterations make 70), on 2 after 128."""
    buffer = allreduce.raw_buffer(1000, "cpu").tensor
    for ranks in (2, 4, 1024):
        assert torch.equal(buffer * ranks, buffer)


def test_the_kernels_figure_is_the_median_its_spread_shows():
    """At an even --repeats (10, the default) the GB/s of the median time was not the median
    of the GB/s the JSON's spread_gb_s gives beside it."""
    for row in kernel.measure(1000, threads=1, repeats=2, device="cpu"):
        for name in ("fused", "copy", "torch"):
            assert row[f"{name}_gb_s"] == row["spread_gb_s"][name]["median"]
