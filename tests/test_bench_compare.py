"""``hpctrain bench compare`` and ``hpctrain report``: real jobs on synthetic data.

The comparisons start real ``mpirun`` jobs (sgd on one process, ssgd on two) through the
command line, as a user does; the pure parts (planning, error lines, targets) are checked
directly.
"""

import contextlib
import errno
import gc
import importlib
import io
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    ON_OTHER_MPIS,
    OTHER_MPIS,
    SIGNALLED_RANK,
    SYNTHETIC,
    alive,
    end_job,
    fill,
    full_disk,
    mpi_env,
    mpirun,
    ranks_ready,
    refusal,
    run_job,
    start_job,
    warn_after_checkpoint,
)
from matplotlib.image import imread

from hpctrain import arguments, cli, metrics, provenance, registry, run_folders, steptimes
from hpctrain.bench.compare import command as compare_command
from hpctrain.bench.compare import execution, planning
from hpctrain.bench.compare import launcher as compare_launcher
from hpctrain.bench.compare import record as compare_record
from hpctrain.bench.report import document, plotting, reading, remarks, rendering
from hpctrain.checkpoint import listing
from hpctrain.errors import UsageError

SMALL = [*SYNTHETIC, "--epochs", "1"]
OUTPUTS = ("report.md", "error_vs_time.png", "error_vs_epochs.png")


def parse(*argv: str):
    return cli.build_parser().parse_args(["bench", "compare", *argv])


def table_rows(report_md: str) -> dict[str, list[str]]:
    rows = {}
    for line in report_md.splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if line.startswith("| ") and cells[0] not in ("algorithm",):
            rows[cells[0]] = cells
    return rows


def test_plan_passes_each_algorithm_only_the_options_it_takes(tmp_path):
    runs = planning.plan(parse("--algos", "sgd,ma,ssgd,ec", "--workers", "3", "--tau", "5",
                              "--ec-alpha", "0.3", "--sync-backend", "mpi", "--lr", "0.1",
                              "--out", str(tmp_path)))
    sgd, ma, ssgd, ec = runs
    assert (sgd.np, ma.np, ssgd.np) == (1, 3, 3)
    # --sync-backend belongs to sgd's module but only ssgd uses it ("ssgd: ..." in its help).
    assert sorted(sgd.ignored) == ["--ec-alpha", "--sync-backend", "--tau"]
    assert "--tau" not in sgd.command and "--sync-backend" not in sgd.command
    assert ssgd.command[ssgd.command.index("--sync-backend") + 1] == "mpi"
    assert ma.command[ma.command.index("--tau") + 1] == "5"
    assert sorted(ma.ignored) == ["--ec-alpha", "--sync-backend"]
    assert "--ec-alpha" not in ma.command
    assert ec.command[ec.command.index("--ec-alpha") + 1] == "0.3"
    for run in runs:  # shared options reach everyone, and --out is per algorithm
        assert run.command[run.command.index("--lr") + 1] == "0.1"
        assert run.command[-2:] == ["--out", str(tmp_path / run.algo)]
    assert not tmp_path.joinpath("sgd").exists()  # planning starts nothing


@pytest.mark.parametrize("argv, pattern", [
    (["--algos", "sgd", "--lr", "-1"], "--lr: must be > 0, got -1"),
    (["--algos", "sgd,../etc"], "--algos 'sgd,../etc'"),
    (["--algos", "sgd,foo"], "--algos 'sgd,foo': unknown algorithm 'foo'; this hpctrain has: sgd,"),
    (["--algos", "sgd", "--timeout", "nan"], "--timeout: 'nan' is not a finite number"),
    # The timer's thread failed (OverflowError) and no run was ever stopped.
    (["--algos", "sgd", "--timeout", "1e308"], "--timeout: must be <= 1e+06, got 1e308"),
    (["--algos", "sgd", "--launcher", "no-such-launcher -n {np}"],
     "launcher 'no-such-launcher' not found"),
    (["--algos", "sgd", "--workers", "0"], "--workers: must be >= 1, got 0"),
    # mpirun -np 99999999999999999999 before: a failed row, at best.
    (["--algos", "ssgd", "--workers", "99999999999999999999", *SMALL],
     "--workers 1e+20 but only 2048 training samples in synthetic"),
    (["--algos", "sgd", "--simulate", "1e308"],
     "--simulate 1e+308: must be in [1, 1e+06] virtual workers"),
    # Each ran with 4 virtual workers, saying nothing of the 8 processes or the launcher.
    (["--algos", "ssgd", "--simulate", "4", "--workers", "8"],
     "--workers 8 with --simulate 4: each simulated run has --simulate's virtual workers, in "
     "one process without a launcher; drop --workers"),
    (["--algos", "ssgd", "--simulate", "4", "--launcher", "srun -n {np}"],
     "--launcher 'srun -n {np}' with --simulate 4: "),
    # A ValueError (exit 1) before; and '' was the default launcher.
    (["--algos", "sgd", "--launcher", "mpirun -np {np} '"],
     "--launcher \"mpirun -np {np} '\": No closing quotation"),
    (["--algos", "sgd", "--launcher", ""], "--launcher '' is empty"),
    (["--algos", "sgd", "--targets", "0.8,,0.9"], "--targets '0.8,,0.9': an empty entry"),
    # Ran sgd once, or skipped the empty entry, saying nothing; --seeds refused both.
    (["--algos", "sgd,ssgd,sgd"], "--algos 'sgd,ssgd,sgd': algorithm 'sgd' given twice"),
    (["--algos", "sgd,,ssgd"], "--algos 'sgd,,ssgd': an empty entry"),
    (["--algos", "sgd,"], "--algos 'sgd,': an empty entry"),
    (["--algos", "sgd", "--seeds", "1,,2"], "--seeds: '1,,2': an empty entry"),
    (["--algos", "ssgd", "--workers", "2", "--slowdown", "0:2,", *SMALL],
     "--slowdown 0:2,: an empty entry"),
    (["--algos", "ssgd", "--workers", "2", "--slowdown", "0:+20", *SMALL],
     "--slowdown 0:+20: delay '20' of '0:+20' has no unit"),
    (["--algos", "sgd", "--targets", "0.8,85"], "--targets '0.8,85'"),
    (["--algos", "sgd", "--launcher", "mpirun -n 4"], "no {np}"),
    # An option none of the algorithms takes: exit 0, and the report only said it was not
    # given to them (train --algo ssgd --tau 0 refused it).
    (["--algos", "ssgd", "--workers", "2", "--tau", "0", "--ec-alpha", "5", "--lam", "-1",
      *SMALL], "--lam is an option of dcasgd-c, dcasgd-a, not of --algos ssgd"),
    (["--algos", "sgd,ssgd", "--workers", "2", "--tau", "5", *SMALL],
     "--tau is an option of ma, ec, not of any of --algos sgd,ssgd"),
    (["--algos", "sgd,ssgd", "--simulate", "2", "--ec-alpha", "0.5", *SMALL],
     "--ec-alpha is an option of ec, not of any of --algos sgd,ssgd"),
    # What `hpctrain train` refuses on a run's processes: each such run failed only once
    # launched, after the runs before it had run.
    (["--algos", "ssgd", "--workers", "2", "--slowdown", "3:2", *SMALL],
     "ssgd's run on 2 processes: --slowdown 3:2: rank 3 is not a worker (0..1)"),
    (["--algos", "sgd,ssgd", "--workers", "3", "--reduce-op", "adasum", *SMALL],
     "ssgd's run on 3 processes: --reduce-op adasum needs a power-of-2 number of workers, "
     "got 3"),
    # rank 2 of 3 evaluates: ssgd's workers are ranks 0 and 1
    (["--algos", "ssgd", "--workers", "3", "--eval", "online", "--eval-rank", "2",
      "--slowdown", "2:3", *SMALL],
     "ssgd's run on 3 processes: --slowdown 2:3: rank 2 is not a worker (0..1)"),
    (["--algos", "asgd", "--workers", "2", "--checkpoint-every", "10", *SMALL],
     "asgd's run on 2 processes: --checkpoint-every 10: asynchronous runs checkpoint by "
     "global progress"),
    # Simulated, the same refusals named no run ("--slowdown 1:3: rank 1 is not a worker").
    (["--algos", "sgd,ssgd", "--simulate", "4", "--slowdown", "1:3", *SMALL],
     "sgd's run on 1 virtual worker: --slowdown 1:3: rank 1 is not a worker (0..0)"),
    (["--algos", "ssgd,ec", "--simulate", "4", "--tau", "1000000", *SMALL],
     "ec's run on 4 virtual workers: --tau 1000000 never aggregates"),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path, argv, pattern):
    with pytest.raises(UsageError, match=re.escape(pattern)):
        planning.plan(parse(*argv, "--out", str(tmp_path / "cmp")))
    assert not (tmp_path / "cmp").exists()


def test_a_user_algorithm_among_algos_that_cannot_be_had_names_algos():
    """The reference's own refusal said `--algo: no module named ...`, a flag compare lacks."""
    with pytest.raises(UsageError) as refused:
        arguments.load_named_algorithms(["bench", "compare", "--algos", "sgd,no_such_mod_q:B"])
    assert str(refused.value) == (
        "--algos 'sgd,no_such_mod_q:B': no_such_mod_q:B: no module named 'no_such_mod_q' "
        "(importing no_such_mod_q from the working directory or PYTHONPATH)")


def test_a_run_that_would_refuse_its_options_stops_the_comparison_before_any_runs(
        tmp_path, monkeypatch):
    """sgd ran (minutes, on real data) before ssgd refused adasum on 3 workers; now nothing
    starts, and the line (exit status 2, as every UsageError) names the run."""
    started = []
    monkeypatch.setattr(compare_command, "execute", lambda run, *a, **k: started.append(run.algo))
    args = parse("--algos", "sgd,ssgd", "--workers", "3", "--reduce-op", "adasum", *SMALL,
                 "--out", str(tmp_path / "cmp"))
    with pytest.raises(UsageError, match="^ssgd's run on 3 processes: --reduce-op adasum"):
        compare_command.run(args)
    assert started == [] and not (tmp_path / "cmp").exists()


def test_a_comparison_started_as_several_processes_is_refused(tmp_path, monkeypatch):
    """Under mpirun -np 2 both copies ran the comparison into one --out, one's record
    over the other's."""
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    with pytest.raises(UsageError, match=r"^hpctrain bench compare starts each run's processes "
                       r"itself: run it as one process, not 2 \(Open MPI"):
        compare_command.run(parse("--algos", "sgd", *SMALL, "--out", str(tmp_path / "cmp")))
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("launcher, job", [
    ("srun --mpi=pmix -n {np}", None),  # srun steps onto the allocation's nodes
    ("mpirun -np {np}", "1234"),  # inside an allocation: Open MPI's uses its nodes
    ("mpirun --hostfile=gpu-nodes -np {np}", None),
], ids=["srun", "mpirun-in-allocation", "hostfile"])
def test_what_this_machine_cannot_run_is_left_to_runs_started_elsewhere(tmp_path, monkeypatch,
                                                                        launcher, job):
    """compare on a login node without a GPU, launching onto GPU nodes: --device cuda is the
    runs' to check, and the other checks still refuse before anything runs."""
    if shutil.which(launcher.split()[0]) is None:
        pytest.skip(f"no {launcher.split()[0]} here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if job is None:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    else:
        monkeypatch.setenv("SLURM_JOB_ID", job)
    argv = ["--algos", "ssgd", "--workers", "2", "--device", "cuda", *SMALL,
            "--launcher", launcher, "--out", str(tmp_path / "cmp")]
    (run,) = planning.plan(parse(*argv, "--slowdown", "1:+20ms"))
    assert run.command[run.command.index("--device") + 1] == "cuda"
    assert run.command[run.command.index("--slowdown") + 1] == "1:+20ms"  # passed through
    with pytest.raises(UsageError, match=re.escape("--slowdown 2:3: rank 2 is not a worker")):
        planning.plan(parse(*argv, "--slowdown", "2:3"))


@pytest.mark.parametrize("launcher", [None, "mpirun -np {np}"], ids=["default", "mpirun"])
def test_a_device_this_machine_lacks_is_refused_when_the_runs_start_here(tmp_path, monkeypatch,
                                                                         launcher):
    """Every run started on this machine and failed (a row each, exit 1); now one line before
    anything runs, in train's words."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("SLURM_JOB_ID", "HPCTRAIN_LAUNCHER", "HPCTRAIN_MPIRUN"):
        monkeypatch.delenv(name, raising=False)
    chosen = [] if launcher is None else ["--launcher", launcher]
    args = parse("--algos", "sgd,ssgd", "--workers", "2", "--device", "cuda", *SMALL, *chosen,
                 "--out", str(tmp_path / "cmp"))
    with pytest.raises(UsageError) as refused:
        planning.plan(args)
    assert str(refused.value) == ("sgd's run on 1 process: "
                                  + refusal(["--algo", "sgd", "--device", "cuda", *SMALL], 1))
    assert str(refused.value).endswith("; use --device cpu or auto")
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("words, here", [
    (["mpirun", "-np", "2"], True),
    (["/usr/bin/mpiexec", "--oversubscribe", "-x", "OMP_NUM_THREADS=1", "-n", "2"], True),
    (["srun", "--mpi=pmix", "-n", "2"], False),
    (["mpirun", "-H", "node1,node2", "-np", "2"], False),
    (["mpiexec", "-f", "hosts", "-n", "2"], False),  # Hydra's hostfile
    (["mpirun", "--hostfile=hosts", "-np", "2"], False),
    (["./my-launcher.sh", "2"], False),  # the user's own: may start them anywhere
])
def test_launches_here(monkeypatch, words, here):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert compare_launcher.launches_here(words) is here
    monkeypatch.setenv("SLURM_JOB_ID", "1")  # mpirun inside an allocation uses its nodes
    assert compare_launcher.launches_here(words) is False


# What a real run wrote (bench compare --algos ssgd --workers 2 --eval online --eval-rank 1,
# synthetic data): rank 1 only scored snapshots, so one rank trained.
EVAL_RANK_SUMMARY = {"algo": "ssgd", "workers": 1, "eval_mode": "online (rank 1)",
                     "samples_per_worker": [2048], "final_test_acc": 1.0, "best_test_acc": 1.0,
                     "wall_s": 0.0782, "samples_per_s": 26191.9}


def test_an_eval_rank_run_is_ok_with_one_rank_fewer_training(tmp_path):
    """It was a failed row: "ran as 1 process(es), not 2: the launcher started separate
    jobs"."""
    (run,) = planning.plan(parse("--algos", "ssgd", "--workers", "2", "--eval", "online",
                                "--eval-rank", "1", *SMALL, "--out", str(tmp_path)))
    assert (run.np, run.trainers) == (2, 1)
    assert compare_record.launch_problem(run, EVAL_RANK_SUMMARY) is None


@pytest.mark.parametrize("argv, np, trainers", [
    (["--algos", "ssgd", "--workers", "2"], 2, 2),
    (["--algos", "sgd", "--workers", "2"], 1, 1),
    # sgd trains on one process; with --eval-rank it gets a second, which evaluates
    (["--algos", "sgd", "--workers", "4", "--eval", "online", "--eval-rank", "1"], 2, 1),
    (["--algos", "sgd", "--workers", "4", "--eval", "online", "--eval-rank", "3"], 2, 1),
    (["--algos", "ma", "--workers", "4", "--eval", "online", "--eval-rank", "3"], 4, 3),
    (["--algos", "asgd", "--workers", "3", "--servers", "1"], 3, 2),
    (["--algos", "ssp", "--workers", "4", "--servers", "1", "--eval", "online",
      "--eval-rank", "1"], 4, 2),
])
def test_a_run_is_checked_against_the_ranks_that_train(tmp_path, argv, np, trainers):
    """A summary's workers are the ranks that trained: not --eval-rank's, not the servers.
    Fewer than that is still a launcher that started separate jobs."""
    (run,) = planning.plan(parse(*argv, *SMALL, "--out", str(tmp_path)))
    assert (run.np, run.trainers) == (np, trainers)
    if "--eval-rank" in argv:  # rank 3 of sgd's two processes is its rank 1
        given = int(argv[argv.index("--eval-rank") + 1])
        assert run.command[run.command.index("--eval-rank") + 1] == str(min(given, np - 1))
    summary = {**EVAL_RANK_SUMMARY, "algo": run.algo, "workers": trainers}
    assert compare_record.launch_problem(run, summary) is None
    if trainers > 1:  # one trainer: separate jobs would each refuse the --eval-rank
        of = f" of {np} processes" if trainers != np else ""
        assert compare_record.launch_problem(run, {**summary, "workers": 1}) == (
            f"1 rank(s) trained, not {trainers}{of}: the launcher started separate jobs "
            "(inside Slurm try --launcher 'srun --mpi=pmix -n {np}' or 'mpirun -np {np}')")


def test_an_out_folder_that_cannot_be_made_is_refused_before_anything_runs(tmp_path):
    """"" wrote the comparison into the working folder; under a file, or where no folder can
    be made, was a NotADirectoryError or FileNotFoundError (exit 1)."""
    (tmp_path / "file").write_text("")
    for out, message in (("", "--out '' is empty: give a folder"),
                         (str(tmp_path / "file" / "cmp"),
                          f"--out {tmp_path}/file/cmp: {tmp_path}/file is a file, not a folder"),
                         ("/proc/cmp", "--out /proc/cmp: cannot create a folder in /proc (No "
                                       "such file or directory)")):
        with pytest.raises(UsageError) as e:
            planning.plan(parse("--algos", "sgd", "--out", out))
        assert str(e.value) == message


def test_a_tilde_in_out_is_the_home_folder_as_in_train(tmp_path, monkeypatch):
    """--out=~/cmp (no shell expands a ~ after "="): bench compare and report made a folder
    named ~ in the working folder, while each run's --out, expanded by train, went home."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    args = parse("--algos", "sgd", *SYNTHETIC, "--out=~/cmp")
    (run,) = planning.plan(args)
    assert args.out == str(home / "cmp")
    assert run.command[run.command.index("--out") + 1] == str(home / "cmp" / "sgd")
    saved_runs(home / "runs")
    rendering.run(cli.build_parser().parse_args(["report", "~/runs", "--out=~/r"]))
    assert (home / "r" / "report.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_a_training_runs_folder_and_a_comparisons_are_not_each_others(tmp_path):
    """bench compare wrote its files into a finished train run's folder, and train wrote a
    run's beside a comparison's compare.json (both exit 0)."""
    from conftest import refusal

    for name in ("summary.json", "config.json"):
        (tmp_path / name).write_text("{}")
        with pytest.raises(UsageError, match=f"--out {tmp_path} holds a training run \\({name}"):
            planning.plan(parse("--algos", "sgd", "--out", str(tmp_path)))
        (tmp_path / name).unlink()
    (tmp_path / "compare.json").write_text("{}")
    assert refusal(["--algo", "sgd", "--dataset", "synthetic", "--model", "mlp", "--out",
                    str(tmp_path)]) == (f"--out {tmp_path} holds a bench compare; choose "
                                        "another folder")


def test_an_option_some_algorithms_take_is_judged_as_train_judges_it(tmp_path):
    """Given to the algorithms that take it (their runs' values checked before any starts,
    in train's words) and noted for the others; refused when none of them takes it."""
    assert refusal(["--algo", "ssgd", "--tau", "0", *SMALL]) == \
        "--tau is an option of ma, ec, not of --algo ssgd"
    for algos, flag, value in (("ssgd,ma", "--tau", "0"), ("sgd,ec", "--ec-alpha", "5")):
        with pytest.raises(UsageError) as e:
            planning.plan(parse("--algos", algos, "--workers", "2", flag, value, *SMALL, "--out",
                               str(tmp_path / "cmp")))
        owner = algos.split(",")[1]
        assert str(e.value) == refusal(["--algo", owner, flag, value, *SMALL], 2)
    sgd, ec = planning.plan(parse("--algos", "sgd,ec", "--workers", "2", "--ec-alpha", "0.5",
                                 "--tau", "4", *SMALL, "--out", str(tmp_path / "cmp")))
    assert sgd.ignored == ["--tau", "--ec-alpha"] and "--ec-alpha" not in sgd.command
    assert ec.command[ec.command.index("--ec-alpha") + 1] == "0.5"
    assert not (tmp_path / "cmp").exists()


def test_a_runs_folder_that_is_no_folder_for_it_is_refused_before_any_runs(tmp_path,
                                                                          monkeypatch):
    """<out>/ssgd a file: sgd ran, then ssgd's run failed on a FileExistsError (exit 1). A
    folder holding another algorithm's run, or a comparison, was written into."""
    started = []
    monkeypatch.setattr(compare_command, "execute", lambda run, *a, **k: started.append(run.algo))
    out = tmp_path / "cmp"
    out.mkdir()

    def refused(*argv: str) -> str:
        with pytest.raises(UsageError) as e:
            compare_command.run(parse("--algos", "sgd,ssgd", *argv, *SMALL, "--out", str(out)))
        assert "\n" not in str(e.value)
        return str(e.value)

    (out / "ssgd").write_text("x\n")
    for argv in (["--workers", "2"], ["--simulate", "2"]):
        assert refused(*argv) == (f"ssgd's run: --out {out}/ssgd: {out}/ssgd is a file, not a "
                                  "folder; choose another --out")
    assert refused("--simulate", "2", "--seeds", "1,2") == (
        f"ssgd's run of seed 1: --out {out}/ssgd/seed-1: {out}/ssgd is a file, not a folder; "
        "choose another --out")
    (out / "ssgd").unlink()
    (out / "ssgd").mkdir()
    (out / "ssgd" / "config.json").write_text(json.dumps({"algo": "ma"}))
    assert refused("--simulate", "2") == (f"ssgd's run: --out {out}/ssgd holds a run of --algo "
                                          "ma (its config.json), not ssgd; choose another --out")
    (out / "ssgd" / "config.json").unlink()
    (out / "ssgd" / reading.RECORD).write_text("{}")
    assert refused("--simulate", "2") == (f"ssgd's run: --out {out}/ssgd holds a bench "
                                          "compare; choose another --out")
    assert started == [] and sorted(p.name for p in out.rglob("*")) == ["compare.json", "ssgd"]
    (out / "ssgd" / reading.RECORD).unlink()
    (out / "ssgd" / "config.json").write_text(json.dumps({"algo": "ssgd"}))  # its own: goes on
    args = parse("--algos", "sgd,ssgd", "--simulate", "2", *SMALL, "--out", str(out))
    assert compare_record.start_record(args, planning.plan(args))["algos"] == ["sgd", "ssgd"]


def test_an_unfinished_runs_folder_is_refused_before_any_runs(tmp_path, monkeypatch):
    """A comparison's record moved aside, its ssgd folder holding checkpoints: sgd ran, then
    ssgd's run refused its folder with train's advice ("continue it with --resume DIR").
    Now refused up front with compare's; with --resume the run continues from them."""
    started = []
    monkeypatch.setattr(compare_command, "execute", lambda run, *a, **k: started.append(run.algo))
    out = tmp_path / "cmp"
    saved = out / "ssgd" / "seed-2" / "checkpoints"
    saved.mkdir(parents=True)
    (saved / "ckpt-8.pt").write_bytes(b"x")
    words = ["--algos", "sgd,ssgd", "--simulate", "2", "--seeds", "1,2", *SMALL, "--out",
             str(out)]
    with pytest.raises(UsageError) as e:
        compare_command.run(parse(*words))
    assert str(e.value) == (
        f"ssgd's run of seed 2: --out {out}/ssgd/seed-2 holds the checkpoints of an unfinished "
        f"run; continue the comparison with bench compare --resume (--out {out}), or choose "
        "another --out")
    assert started == [] and not (out / reading.RECORD).exists()
    args = parse(*words, "--resume")
    assert compare_record.start_record(args, planning.plan(args))["runs"] == {}
    (saved / "ckpt-8.pt").rename(saved / "ckpt-8.pt.corrupt")  # which the run would refuse
    for argv in ([], ["--resume"]):
        with pytest.raises(UsageError, match=r"^ssgd's run of seed 2: --out \S+ holds an "
                           r"unfinished run's checkpoints, only unusable ones \(ckpt-8.pt."
                           r"corrupt\): remove them \(or \S+\) to run it again, or "
                           r"choose another --out$"):
            compare_command.run(parse(*words, *argv))
    assert started == []


def test_resume_refuses_other_algorithms(tmp_path, monkeypatch):
    """--resume with --algos sgd,ssgd on a comparison of sgd,ma ran ssgd and rewrote
    compare.json and report.md without ma's row (exit 0)."""
    started = []
    monkeypatch.setattr(compare_command, "execute", lambda run, *a, **k: started.append(run.algo))
    out = tmp_path / "cmp"
    first = parse("--algos", "sgd,ma", "--simulate", "2", *SMALL, "--out", str(out))
    out.mkdir()
    metrics.write_json_atomic(out / reading.RECORD, compare_record.start_record(
        first, planning.plan(first)))
    before = (out / reading.RECORD).read_bytes()
    for algos in ("sgd,ssgd", "sgd", "sgd,ma,ssgd"):
        args = parse("--algos", algos, "--simulate", "2", *SMALL, "--resume", "--out", str(out))
        with pytest.raises(UsageError) as e:
            compare_command.run(args)
        assert str(e.value) == (f"--resume: {out} was run with --algos sgd,ma, not {algos}; "
                                "give the same")
    assert started == [] and (out / reading.RECORD).read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [reading.RECORD]
    again = parse("--algos", "sgd,ma", "--simulate", "2", *SMALL, "--resume", "--out", str(out))
    assert compare_record.start_record(again, planning.plan(again))["algos"] == ["sgd", "ma"]
    turned = parse("--algos", "ma,sgd", "--simulate", "2", *SMALL, "--resume", "--out", str(out))
    assert compare_record.start_record(turned, planning.plan(turned))["algos"] == ["ma", "sgd"]


def test_resume_refusals_quote_the_options_to_give_again(tmp_path):
    """The options a --resume refusal says to give again were joined with spaces:
    ``--model-args {"width": 4}`` and a replayed file's path with a space were not pasteable."""
    out = tmp_path / "cmp"
    out.mkdir()
    args = parse("--algos", "sgd", "--simulate", "2", *SMALL, "--resume", "--out", str(out))
    record = compare_record.start_record(args, planning.plan(args))
    given = record["train_args"]
    metrics.write_json_atomic(out / reading.RECORD, {
        **record, "train_args": [*given, "--model-args", '{"width": 4}']})
    with pytest.raises(UsageError) as e:
        compare_record.start_record(args, planning.plan(args))
    assert str(e.value).endswith(f"options {shlex.join(given)} --model-args '{{\"width\": 4}}'; "
                                 "give the same")
    metrics.write_json_atomic(out / reading.RECORD, {
        **record, "sim_args": ["--step-time", "replay:/x/my run"]})
    with pytest.raises(UsageError) as e:
        compare_record.start_record(args, planning.plan(args))
    assert str(e.value) == (f"--resume: {out} was run with --simulate 2 --step-time "
                            "'replay:/x/my run'; give the same")


def test_a_comparison_started_with_an_option_no_run_takes_can_still_be_resumed(tmp_path):
    """Started before such options were refused (--tau with sgd,ssgd), a comparison must be
    resumed with the same options, which the refusal then forbade: one refusal or the other."""
    out = tmp_path / "cmp"
    out.mkdir()
    (out / reading.RECORD).write_text(json.dumps({
        "algos": ["sgd", "ssgd"], "workers": 2, "train_args": [*SMALL, "--tau", "3"],
        "simulated": True, "sim_args": [], "runs": {}}))
    words = ["--algos", "sgd,ssgd", "--simulate", "2", *SMALL, "--tau", "3", "--out", str(out)]
    with pytest.raises(UsageError, match="--tau is an option of ma, ec, not of any of"):
        planning.plan(parse(*words))  # a new comparison: refused
    args = parse(*words, "--resume")
    assert [r.algo for r in planning.plan(args)] == ["sgd", "ssgd"]


def test_a_damaged_record_is_refused_as_it_is_and_moved_aside_the_runs_are_reported(tmp_path):
    """The line said the record was "moved aside" and the runs reported; the file was left
    as it was and nothing written. It now says so; moved aside by hand, the runs are shown."""
    saved_runs(tmp_path)
    (tmp_path / reading.RECORD).write_text('{"algos": [')
    with pytest.raises(UsageError) as e:
        rendering.run(cli.build_parser().parse_args(["report", str(tmp_path)]))
    assert str(e.value).startswith(f"cannot read a comparison's record from "
                                   f"{tmp_path / reading.RECORD}: ")
    assert str(e.value).endswith(f"; no report written: move it aside, and the report shows "
                                 f"the runs found in {tmp_path}")
    assert (tmp_path / reading.RECORD).read_text() == '{"algos": ['
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "compare.json", "good"]
    (tmp_path / reading.RECORD).rename(tmp_path / "compare.json.damaged")
    rendering.render(tmp_path)
    assert set(report_cells(tmp_path)) == {"bad", "good"}


def test_a_folder_without_its_record_reports_its_runs_not_set_aside_attempts(tmp_path):
    """compare.json moved aside: each failed attempt --resume had set aside (good.failed-1)
    was an algorithm of its own, "ok", and a run that started and did not end (config.json,
    no summary) was left out."""
    saved_runs(tmp_path)
    shutil.copytree(tmp_path / "good", tmp_path / "good.failed-1")
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "config.json").write_text("{}")
    (tmp_path / "notes").mkdir()  # no run's
    rendering.render(tmp_path)
    assert {name: cells["status"] for name, cells in report_cells(tmp_path).items()} == {
        "bad": "ok", "good": "ok", "late": "unfinished"}
    for run in ("bad", "good"):
        shutil.rmtree(tmp_path / run)
    with pytest.raises(UsageError, match=f"^report: {tmp_path} holds no compare.json and no "
                                         r"finished run \(a folder with summary.json\)$"):
        reading.load(tmp_path)


def test_a_run_the_comparison_stopped_in_is_unfinished_one_not_started_not_run(tmp_path):
    """bench compare killed while ec ran (its folder held its logs and config.json), before
    ma: both rows read "failed: did not run"."""
    saved_runs(tmp_path)
    shutil.rmtree(tmp_path / "bad")
    (tmp_path / "ec").mkdir()
    for name in ("stderr.log", "config.json"):
        (tmp_path / "ec" / name).write_text("{}")
    (tmp_path / reading.RECORD).write_text(json.dumps(
        {"algos": ["good", "ec", "ma"], "workers": 2, "train_args": [],
         "runs": {"good": {"status": "ok"}}}))
    rendering.render(tmp_path)
    assert {name: cells["status"] for name, cells in report_cells(tmp_path).items()} == {
        "good": "ok", "ec": "unfinished", "ma": "not run"}
    assert ("*unfinished*: a run that started and has no summary (stopped, or still going on); "
            "*not run*: one that has not started; `bench compare --resume` runs them.") in \
        (tmp_path / "report.md").read_text()


def test_targets_are_each_once():
    assert rendering.parse_targets("0.8,0.9,0.8") == [0.8, 0.9]


def test_resume_refuses_other_simulator_options(tmp_path):
    """A simulated comparison resumed with another network, or as real jobs, mixed rows of
    both in one report (exit 0)."""
    out = tmp_path / "cmp"
    simulated = parse("--algos", "sgd", "--simulate", "2", "--latency", "1e-5", "--out", str(out))
    out.mkdir()
    metrics.write_json_atomic(out / reading.RECORD, compare_record.start_record(
        simulated, planning.plan(simulated)))
    for argv, given in ((["--simulate", "2", "--latency", "1"], "simulate"),
                        (["--workers", "2"], "real")):
        args = parse("--algos", "sgd", *argv, "--resume", "--out", str(out))
        with pytest.raises(UsageError) as e:
            compare_record.start_record(args, planning.plan(args))
        assert str(e.value) == f"--resume: {out} was run with --simulate 2 --latency 1e-5; " \
            "give the same", given
    again = parse("--algos", "sgd", "--simulate", "2", "--latency", "1e-5", "--resume", "--out",
                  str(out))
    assert compare_record.start_record(again, planning.plan(again))["sim_args"] == [
        "--latency", "1e-5"]


def test_resume_refuses_replayed_step_times_that_changed(tmp_path):
    """A simulated comparison's resume replayed the file as it had become: rows of two
    different replays in one report (exit 0)."""
    run, out = tmp_path / "run", tmp_path / "cmp"
    run.mkdir()
    times = run / "step_times.json"
    times.write_text(json.dumps({"format": steptimes.FORMAT, "workers": [[0.1, 0.2]]}))
    words = ("--algos", "sgd", "--simulate", "1", "--step-time", f"replay:{run}", "--out",
             str(out))
    first = parse(*words)
    out.mkdir()
    metrics.write_json_atomic(out / reading.RECORD, compare_record.start_record(
        first, planning.plan(first)))
    before = provenance.sha256_of(times)
    times.write_text(json.dumps({"format": steptimes.FORMAT, "workers": [[0.3, 0.4]]}))
    again = parse(*words, "--resume")
    with pytest.raises(UsageError) as e:
        compare_record.start_record(again, planning.plan(again))
    assert str(e.value) == (f"--resume: the step times {out}'s runs replayed have changed since "
                            f"(now sha256 {provenance.sha256_of(times)}, recorded {before}); "
                            "its runs would replay other times")


def test_help_groups_options_by_the_algorithms_that_use_them(capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    text = capsys.readouterr().out
    assert "options of ssgd (given only to it):\n  --sync-backend" in text
    assert "options of sgd" not in text


@pytest.mark.timeout(120)
def test_unknown_algorithm_is_one_line_exit_2_and_nothing_written(tmp_path):
    proc = run_job(["bench", "compare", "--algos", "sgd,foo", "--workers", "2", *SMALL,
                    "--out", str(tmp_path / "cmp")], np=0, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "hpctrain: error: --algos 'sgd,foo': unknown algorithm 'foo'; this hpctrain has: "
        + registry.choices()]
    assert not (tmp_path / "cmp").exists()


@pytest.mark.timeout(120)
def test_a_timed_out_run_is_a_row_and_a_failed_exit(tmp_path):
    """Also when the report cannot be written (a folder in a plot's place): the failed runs
    are still named, before the report's own error (they were not, before)."""
    out = tmp_path / "cmp"
    (out / "error_vs_time.png").mkdir(parents=True)
    # 1000 epochs: no machine finishes them within the timeout (one epoch did under torch 2.1,
    # whose import is quick, and the run that wrote its outputs is no failed row).
    proc = run_job(["bench", "compare", "--algos", "ssgd", "--workers", "2", "--timeout", "1",
                    *SYNTHETIC, "--epochs", "1000", "--out", str(out)], np=0, timeout=90)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-2:] == [
        f"hpctrain bench compare: 1 of 1 runs failed: ssgd (their records in "
        f"{out / 'compare.json'} say why)",
        f"hpctrain: error: report: cannot write {out / 'error_vs_time.png'}: it is a folder"]
    (out / "error_vs_time.png").rmdir()
    rendering.run(cli.build_parser().parse_args(["report", str(out)]))
    rows = table_rows((out / "report.md").read_text())
    assert rows["ssgd"][-1] == "failed: stopped after the 1 s timeout"
    assert json.loads((out / "compare.json").read_text())["runs"]["ssgd"]["status"] == "failed"


@pytest.mark.timeout(240)
def test_the_report_is_written_as_each_run_ends(tmp_path):
    """report.md came only after the last run, though `hpctrain report` of a comparison going
    on says bench compare writes it as each run ends: each run's launcher now finds the report
    of the runs before it (the first, none), the runs to come in it as not run."""
    out, seen = tmp_path / "cmp", tmp_path / "seen.txt"
    launcher = tmp_path / "launch.sh"
    launcher.write_text(f'#!/bin/sh\nnp=$1; shift\n'
                        f'grep "^| sgd |" {out}/report.md 2>/dev/null >> {seen} '
                        f'|| echo none >> {seen}\n'
                        f'exec {shlex.join(mpirun(1)[:-1])} "$np" "$@"\n')
    launcher.chmod(0o755)
    done = run_job(["bench", "compare", "--algos", "sgd", "--seeds", "1,2,3", *SMALL,
                    "--launcher", f"{launcher} {{np}}", "--out", str(out)], np=0, timeout=200)
    assert done.returncode == 0, done.stderr
    first, second, third = seen.read_text().splitlines()
    assert first == "none"
    assert second.startswith("| sgd | 1 of 3 | 1 |") and second.endswith(
        "| seed 2 not run; seed 3 not run |")
    assert third.startswith("| sgd | 2 of 3 | 1 |") and third.endswith("| seed 3 not run |")
    assert table_rows((out / "report.md").read_text())["sgd"][1] == "3"


def test_default_launcher(monkeypatch):
    for var in ("HPCTRAIN_LAUNCHER", "SLURM_JOB_ID", "SLURM_CPUS_PER_TASK", "HPCTRAIN_MPIRUN"):
        monkeypatch.delenv(var, raising=False)
    plain = compare_launcher.launcher_command(None, 1)
    assert plain[0] == "mpirun" and plain[-2:] == ["-np", "1"]
    assert plain[-4:-2] == ["--bind-to", "none"]  # Open MPI's binding put every job on core 0
    assert ("--allow-run-as-root" in plain) == (os.geteuid() == 0)
    assert "--oversubscribe" not in plain
    assert "--oversubscribe" in compare_launcher.launcher_command(None, 4 * os.cpu_count())
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    assert compare_launcher.launcher_command(None, 4) == [
        "srun", "--mpi=pmix", "--kill-on-bad-exit=1", "--ntasks=4"]
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")  # srun takes it only when told (>= 22.05)
    assert compare_launcher.launcher_command(None, 4)[-1] == "--cpus-per-task=8"
    monkeypatch.setenv("HPCTRAIN_LAUNCHER", "mpiexec -n {np} --bind-to core")
    assert compare_launcher.launcher_command(None, 2) == ["mpiexec", "-n", "2", "--bind-to", "core"]
    assert compare_launcher.launcher_command("srun -n {np}", 8) == ["srun", "-n", "8"]


@pytest.mark.parametrize("mpi", ON_OTHER_MPIS)
def test_default_launcher_on_hydra_has_no_open_mpi_flags(mpi, monkeypatch):
    """Hydra's mpirun (MPICH's, Intel MPI's) knows neither --allow-run-as-root nor
    --oversubscribe (and needs neither): with its mpirun first on PATH the default is plain."""
    for var in ("HPCTRAIN_LAUNCHER", "SLURM_JOB_ID", "SLURM_CPUS_PER_TASK", "HPCTRAIN_MPIRUN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", mpi_env(mpi)["PATH"])
    many = 4 * os.cpu_count()
    # Intel MPI's mpirun, a script, gives way to the Hydra it runs (the test below says why)
    hydra = (OTHER_MPIS[mpi] / "bin" / "mpiexec.hydra").resolve()  # beside the script itself
    launcher = str(hydra) if mpi == "intel" else "mpirun"
    assert compare_launcher.launcher_command(None, many) == [launcher, "-np", str(many)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop", ["warning", "stop"])
@pytest.mark.parametrize("mpi", ["openmpi", *ON_OTHER_MPIS])
def test_the_warning_and_the_stop_reach_a_runs_ranks_under_each_mpirun(tmp_path, monkeypatch,
                                                                        mpi, stop):
    """SIGUSR1 passed on to the run going on (the time limit's warning) and SIGTERM (_stop:
    --timeout, and compare's own SIGTERM or death) reach the run's ranks through its launcher
    ``mpirun -np {np}``. Intel MPI's mpirun, a /bin/sh script that runs mpiexec.hydra as its
    child, died of either: the warned run failed with status 138 once its ranks had run to
    their end, and a stopped run's ranks went on, orphaned."""
    if mpi == "openmpi":
        # conftest's flags (root, cores) and a 3 s grace: Open MPI's mpirun passes SIGTERM on
        # as SIGCONT, a grace, SIGTERM, the grace, SIGKILL; its default 1 s grace was too short
        # on a loaded machine, where a rank was killed before its handler ran (CI, 1 in 10)
        template = shlex.join(mpirun(2)[:-2]) + " --mca odls_base_sigkill_timeout 3 -np {np}"
    else:
        template = "mpirun -np {np}"
        for name, value in mpi_env(mpi).items():
            monkeypatch.setenv(name, value)
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    monkeypatch.setenv("RANKS", str(ranks))
    (tmp_path / "rank.sh").write_text(SIGNALLED_RANK)
    run = planning.Run("ssgd", 2, [*compare_launcher.launcher_command(template, 2), "bash",
                                  str(tmp_path / "rank.sh")], [])
    if stop == "warning":  # as compare.sbatch's SIGUSR1 comes to bench compare
        warning = execution.TimeLimitWarning()
        warner = threading.Thread(target=lambda: (ranks_ready(ranks, 2),
                                                  os.kill(os.getpid(), signal.SIGUSR1)))
        warner.start()
        try:
            result = execution.execute(run, tmp_path / "ssgd", "[1/1 ssgd]", 0, warning)
        finally:
            warning.close()
            warner.join()
        returncode, said = result["returncode"], (tmp_path / "ssgd" / "stderr.log").read_text()
    else:
        # stdout too: a launcher that ended before its ranks started said nothing on stderr
        proc = subprocess.Popen(execution.tied(run.command), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            ranks_ready(ranks, 2, launcher=proc)
            execution._stop(proc)
            said = proc.communicate(timeout=120)[0]
        finally:
            proc.kill()
        returncode = proc.returncode
    why = "SIGUSR1" if stop == "warning" else "SIGTERM"
    for rank in (0, 1):
        assert f"rank {rank} stopped by {why}" in said, said
    assert returncode == 5 if stop == "warning" else returncode != 0, said
    assert not any(alive(pid) for pid in ranks_ready(ranks, 2)), said


def test_a_runs_stderr_keeps_crlf_lines_and_its_last_line(tmp_path):
    """Lines ending in "\\r\\n" were taken for progress bars (neither logged nor read for the
    error), and a last line without a newline was dropped."""
    text = "first\r\n12%|#  \r50%|##### \rValueError: bad shape\r\nhpctrain: error: the end"
    run = planning.Run("sgd", 1, [sys.executable, "-c",
                                 f"import sys; sys.stderr.write({text!r}); sys.exit(3)"], [])
    result = execution.execute(run, tmp_path / "sgd", "[1/1 sgd]", timeout=0)
    assert (result["status"], result["error"]) == ("failed", "hpctrain: error: the end")
    assert (tmp_path / "sgd" / "stderr.log").read_text().splitlines() == [
        "first", "ValueError: bad shape", "hpctrain: error: the end"]


def test_a_log_the_disk_has_no_room_for_is_named(tmp_path):
    """A run's stderr copied to its stderr.log on a full disk: the comparison ended with an
    OSError naming no file (two, the log's close failing again), exit 1."""
    lines = "import sys\nfor _ in range(400): sys.stderr.write('x' * 99 + '\\n')"  # 40 kB
    run = planning.Run("sgd", 1, [sys.executable, "-c", lines], [])
    with full_disk(tmp_path / "disk") as disk:
        fill(disk)
        with pytest.raises(OSError) as e:
            execution.execute(run, disk / "sgd", "[1/1 sgd]", timeout=0)
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(disk / "sgd" / "stderr.log"))


# A job that puts a finished run's files in place at once, then hangs (as in MPI's teardown)
_WRITES_THEN_HANGS = """\
import shutil, sys, time
shutil.copytree(sys.argv[1], sys.argv[2], dirs_exist_ok=True)
time.sleep(600)
"""


@pytest.mark.timeout(300)
def test_a_run_the_timeout_stops_after_its_summary_is_kept_as_finished(tmp_path):
    """--timeout counts from the launch: a run with ~3 s of start-up and a 1-2 s wall_s was
    "failed: stopped after the 3.5 s timeout", though it may have written its outputs, the
    summary last. A run stopped after writing them is kept, saying so; one stopped before
    is failed."""
    out = tmp_path / "cmp"
    (run,) = planning.plan(cli.build_parser().parse_args([
        "bench", "compare", "--algos", "sgd", "--simulate", "1", *SYNTHETIC, "--epochs", "1",
        "--out", str(out)]))
    done = subprocess.run(run.command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    shutil.move(out / "sgd", tmp_path / "finished")  # its config.json names out/sgd
    hangs = planning.Run("sgd", 1, [sys.executable, "-c", _WRITES_THEN_HANGS,
                                   str(tmp_path / "finished"), str(out / "sgd")], [],
                        words=run.words)
    # 8 s: ample for the child's start (no torch) and copy on a loaded machine (the test
    # waits it out).
    result = execution.execute(hangs, out / "sgd", "[1/1 sgd]", timeout=8)
    assert (result["status"], result["error"]) == ("ok", None)
    assert result["note"] == "the 8 s timeout stopped it after it wrote its outputs"
    shutil.rmtree(out / "sgd")  # stopped before it wrote its summary: failed
    hangs.command = [sys.executable, "-c", "import time; time.sleep(600)"]
    result = execution.execute(hangs, out / "sgd", "[1/1 sgd]", timeout=1)
    assert (result["status"], result["error"]) == ("failed", "stopped after the 1 s timeout")


def test_last_error_prefers_hpctrain_line_over_mpirun_banner():
    lines = ["hpctrain: error (rank 1 of 2): RuntimeError: injected fault at step 2",
             "-" * 70, "MPI_ABORT was invoked on rank 1 in communicator MPI_COMM_WORLD",
             "with errorcode 1.", "-" * 70]
    assert execution.last_error(lines, 1) == lines[0]
    glued = [lines[0] + "-" * 74, "MPI_ABORT was invoked on rank 1"]  # as mpirun may write it
    assert execution.last_error(glued, 1) == lines[0]
    assert execution.last_error(["Traceback (most recent call last):", '  File "x.py"',
                               "ValueError: bad shape"], 1) == "ValueError: bad shape"
    signal = ["mpirun noticed that process rank 0 with PID 12 on node vm exited on signal 9",
              "-" * 70]
    assert execution.last_error(signal, 137) == signal[0]
    assert execution.last_error([], 3) == "exit status 3"


def test_time_to_target_and_targets():
    points = [{"t": 0.0, "epoch": 0, "test_acc": 0.1}, {"t": 2.0, "epoch": 1, "test_acc": 0.84},
              {"t": 1.0, "epoch": 0.5, "test_acc": 0.81}]
    assert reading.time_to(points, 0.8)["t"] == 1.0
    assert reading.time_to(points, 0.84)["epoch"] == 1
    assert reading.time_to(points, 0.9) is None
    assert rendering.parse_targets("0.8, 0.85") == [0.8, 0.85]
    for bad, why in (("", "want accuracies in (0, 1]"), ("0.8,,0.9", "an empty entry"),
                     ("x", "not a comma-separated list of numbers"),
                     ("0", "want accuracies in (0, 1]"), ("0.8,1.5", "want accuracies in (0, 1]")):
        with pytest.raises(UsageError, match=re.escape(f"--targets {bad!r}: {why}")):
            rendering.parse_targets(bad)


# sgd on one process and ssgd on two (16 steps an epoch, a checkpoint every 4: sgd stops
# well before its 96th step when warned after its first); --sync-backend (ssgd's, its
# default) is not given to sgd, and the second target takes a perfect score.
COMPARE = ["bench", "compare", "--algos", "sgd,ssgd", "--workers", "2", "--targets",
           "0.5,0.999999", "--sync-backend", "mpi", *SYNTHETIC, "--epochs", "6",
           "--checkpoint-every", "0.25e"]
FAULT = {"HPCTRAIN_INJECT": "raise@1:10"}  # rank 1 is only in the 2-process ssgd run


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A comparison warned of its time limit (SIGUSR1, as compare.sbatch passes it on) once
    sgd has a checkpoint: its exit status and stderr, and what its folder held then."""
    out = tmp_path_factory.mktemp("stopped") / "cmp"
    job = start_job([*COMPARE, "--out", str(out)], np=0, env=FAULT)
    stderr = warn_after_checkpoint(job, out / "sgd" / "checkpoints")
    return SimpleNamespace(out=out, status=job.returncode, stderr=stderr,
                           ssgd_started=(out / "ssgd").exists(),
                           sgd_finished=(out / "sgd" / "summary.json").exists(),
                           report=(out / "report.md").read_text())


@pytest.mark.timeout(300)
def test_sigusr1_stops_the_comparison_after_a_checkpoint(stopped):
    """The run going on (sgd) stops after a checkpoint, ssgd does not start, exit status 5
    (the resume that finishes it is the next fixture's). Its report says so."""
    assert stopped.status == 5, stopped.stderr
    assert "[1/2 sgd] stopped by SIGUSR1 (--resume continues it)" in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"hpctrain bench compare: stopped by SIGUSR1 with sgd, ssgd left to run; continue "
        f"with --resume (--out {stopped.out})")
    assert not stopped.ssgd_started and not stopped.sgd_finished
    rows = table_rows(stopped.report)
    assert (rows["sgd"][-1], rows["ssgd"][-1]) == ("unfinished", "not run")


def running(folder: Path) -> list[str]:
    """Command lines of the processes now running whose command names ``folder``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        if any(str(folder).encode() in w for w in words):
            found.append(b" ".join(words).decode(errors="replace"))
    return found


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_ends_the_run_going_on_and_a_second_compare_is_refused(tmp_path, stop):
    """kill (SIGTERM) ended bench compare and left its run training on its own, which then
    finished into a folder the comparison said had not run; a second compare on the folder
    meanwhile (--resume) took the run going on for failed and wrote its report. Then its
    report (its run *not run*) was not written again, and no line said it had stopped; nor
    after Ctrl-C (SIGINT)."""
    out = tmp_path / "cmp"
    words = ["bench", "compare", "--algos", "sgd", *SYNTHETIC, "--epochs", "200",
             "--checkpoint-every", "0.25e", "--out", str(out)]
    job = start_job(words, np=0)
    try:
        deadline = time.monotonic() + 120
        while not listing(out / "sgd" / "checkpoints"):
            if (ended := job.poll()) is not None or time.monotonic() > deadline:
                pytest.fail(f"no checkpoint yet (exit {ended}): {end_job(job)}")  # bounded
            time.sleep(0.05)
        second = run_job([*words, "--resume"], np=0)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines()[-1] == (
            f"hpctrain: error: --out {out} is in use by another comparison going on now (it "
            f"holds {out / '.hpctrain.lock'}); wait for it to end or choose another folder")
    finally:
        job.send_signal(stop)  # also on a failure above: no run left behind
        try:
            stderr = job.communicate(timeout=60)[1]
        finally:
            job.kill()
    assert job.returncode == 128 + stop
    assert running(out / "sgd") == []  # the run went with it
    assert not (out / "sgd" / "summary.json").exists()
    assert json.loads((out / reading.RECORD).read_text())["runs"] == {}  # --resume reruns it
    how = "SIGTERM" if stop == signal.SIGTERM else "Ctrl-C"
    assert (f"\nhpctrain bench compare: stopped by {how} with sgd left to run; continue with "
            f"--resume (--out {out})\n" + ("hpctrain: interrupted\n" if how == "Ctrl-C" else "")
            ) in stderr
    assert table_rows((out / "report.md").read_text())["sgd"][-1] == "unfinished"


@pytest.mark.timeout(300)
def test_a_compare_killed_outright_takes_its_run_with_it(tmp_path):
    """SIGKILL (the OOM killer, a scheduler's kill -9) of bench compare left its mpirun and
    ranks training; a --resume meanwhile started that run again and, when the orphan had
    finished it, took it for failed."""
    out = tmp_path / "cmp"
    job = start_job(["bench", "compare", "--algos", "ssgd", "--workers", "2", *SYNTHETIC,
                     "--epochs", "200", "--checkpoint-every", "0.25e", "--out", str(out)],
                    np=0)
    try:
        deadline = time.monotonic() + 120
        while not listing(out / "ssgd" / "checkpoints"):
            if (ended := job.poll()) is not None or time.monotonic() > deadline:
                pytest.fail(f"no checkpoint yet (exit {ended}): {end_job(job)}")
            time.sleep(0.05)
        assert len(running(out / "ssgd")) >= 3  # mpirun and its two ranks
    finally:
        job.kill()
        job.communicate(timeout=60)  # bounded: its runs write to files, not to these pipes
    deadline = time.monotonic() + 60  # each rank ends within its step and writes nothing
    while running(out / "ssgd") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running(out / "ssgd") == []
    assert not (out / "ssgd" / "summary.json").exists()


@pytest.fixture(scope="module")
def failed(stopped, tmp_path_factory):
    """The stopped comparison resumed, in a copy: sgd goes on from its checkpoint and
    finishes, ssgd fails at step 10 (FAULT); with what its ssgd wrote before a resume
    overwrites it."""
    out = tmp_path_factory.mktemp("failed") / "cmp"
    shutil.copytree(stopped.out, out)
    proc = run_job([*COMPARE, "--out", str(out), "--resume"], np=0, timeout=240, env=FAULT)
    return SimpleNamespace(out=out, proc=proc, report=(out / "report.md").read_text(),
                           ssgd_log=(out / "ssgd" / "stderr.log").read_text())


@pytest.fixture(scope="module")
def resumed(failed, tmp_path_factory):
    """A copy of the failed comparison finished with --resume: both rows ok."""
    out = tmp_path_factory.mktemp("resumed") / "cmp"
    shutil.copytree(failed.out, out)
    proc = run_job([*COMPARE, "--out", str(out), "--resume"], np=0, timeout=240)
    return SimpleNamespace(out=out, proc=proc)


@pytest.mark.timeout(300)
def test_a_failing_algorithm_is_a_row_and_a_failed_exit(failed):
    proc = failed.proc
    assert proc.returncode == 1, proc.stderr  # the report is written, and the exit says failed
    assert "[1/2 sgd] 1 process: " in proc.stderr
    assert "[2/2 ssgd] 2 processes: " in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "hpctrain bench compare: 1 of 2 runs failed: ssgd (")
    rows = table_rows(failed.report)
    assert rows["sgd"][-1] == "ok"
    assert rows["ssgd"][-1] == ("failed: hpctrain: error (rank 1 of 2): "
                                "RuntimeError: injected fault at step 10")
    assert "injected fault" in failed.ssgd_log
    # sgd went on from the checkpoint the signal made
    log = (failed.out / "sgd" / "stderr.log").read_text()
    assert "resuming from" in log
    # the stopped attempt's lines kept before it (the continued run wrote over them)
    first, marker, then = log.partition("--- continued (")
    assert marker and first.strip() and "resuming from" in then
    assert json.loads((failed.out / "sgd" / "summary.json").read_text())["resumed_from_updates"]


@pytest.mark.timeout(300)
def test_a_comparison_is_not_run_again_into_its_folder_without_resume(failed):
    """Refused before anything runs (the exit status of such a refusal: the unknown-algorithm
    job above)."""
    record = (failed.out / "compare.json").read_bytes()
    with pytest.raises(UsageError, match="pass --resume"):
        compare_command.run(cli.build_parser().parse_args([*COMPARE, "--out", str(failed.out)]))
    assert (failed.out / "compare.json").read_bytes() == record


@pytest.mark.timeout(300)
def test_resume_continues_only_the_failed_run(failed, resumed):
    out, proc = resumed.out, resumed.proc
    assert proc.returncode == 0, proc.stderr
    assert "[1/2 sgd] finished earlier; kept" in proc.stderr
    assert "[2/2 ssgd] 2 processes: " in proc.stderr
    assert (out / "sgd" / "summary.json").read_bytes() == \
        (failed.out / "sgd" / "summary.json").read_bytes()
    record = json.loads((out / "compare.json").read_text())
    assert {a: r["status"] for a, r in record["runs"].items()} == {"sgd": "ok", "ssgd": "ok"}
    assert record["runs"]["ssgd"]["command"].endswith(f"--resume {out / 'ssgd'}")
    assert json.loads((out / "ssgd" / "summary.json").read_text())["updates"] == 96


@pytest.mark.timeout(300)
def test_compare_writes_rows_and_plots(resumed):
    out = resumed.out
    for algo, workers in (("sgd", 1), ("ssgd", 2)):
        summary = json.loads((out / algo / "summary.json").read_text())
        assert (summary["algo"], summary["workers"]) == (algo, workers)

    text = (out / "report.md").read_text()
    rows = table_rows(text)
    assert set(rows) == {"sgd", "ssgd"}
    for algo, workers in (("sgd", "1"), ("ssgd", "2")):
        cells = rows[algo]
        summary = json.loads((out / algo / "summary.json").read_text())
        assert cells[1] == workers and cells[-1] == "ok"
        assert cells[2] == f"{summary['final_test_acc']:.4f}"
        # A target is "not reached" exactly when no curve point reached it (best_test_acc is
        # the best point's); "or" let a report that always wrote "not reached" pass.
        for cell, target in ((cells[5], 0.5), (cells[6], 0.999999)):
            assert (cell == "not reached") == (summary["best_test_acc"] < target), (cell, target)
            assert cell == "not reached" or cell.endswith(" ep)"), cell
    assert rows["ssgd"][8].endswith("MiB")  # the larger rank's peak memory
    assert "allreduce_bytes_per_rank" in rows["ssgd"][10]
    assert "`--sync-backend` was not given to sgd" in text
    device = "cuda" if torch.cuda.is_available() else "cpu"  # --device auto
    assert f"Ran with device {device}, " in text and f"torch {torch.__version__}" in text
    for png in OUTPUTS[1:]:
        assert imread(out / png).shape[2] in (3, 4)


@pytest.mark.timeout(300)
def test_report_rerenders_a_comparison(resumed, tmp_path):
    out = tmp_path / "cmp"
    shutil.copytree(resumed.out, out)
    saved = {name: (out / name).read_bytes() for name in OUTPUTS}
    for name in OUTPUTS:
        (out / name).unlink()
    again = run_job(["report", str(out)], np=0, timeout=120)
    assert again.returncode == 0, again.stderr
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == saved

    rendering.run(cli.build_parser().parse_args(["report", str(out), "--targets", "0.3"]))
    assert "time to 0.3 |" in (out / "report.md").read_text()


@pytest.mark.timeout(300)
def test_resume_takes_new_targets_and_reruns_a_failed_run_that_wrote_its_summary(resumed,
                                                                                  tmp_path):
    """With nothing left to run, --resume's --targets were ignored (the old record was
    rendered). A run recorded as failed after it wrote its summary (a launch problem, a
    timeout as it ended) failed again on every resume: train refused its --out."""
    out = tmp_path / "cmp"
    shutil.copytree(resumed.out, out)
    args = [*COMPARE, "--out", str(out), "--resume"]
    args[args.index("0.5,0.999999")] = "0.3"
    compare_command.run(cli.build_parser().parse_args(args))
    assert json.loads((out / "compare.json").read_text())["targets"] == [0.3]
    assert "time to 0.3 |" in (out / "report.md").read_text()
    record = json.loads((out / "compare.json").read_text())
    record["runs"]["sgd"].update(status="failed", error="ran on 2 ranks, not 1")
    (out / "compare.json").write_text(json.dumps(record))
    compare_command.run(cli.build_parser().parse_args(args))
    assert json.loads((out / "compare.json").read_text())["runs"]["sgd"]["status"] == "ok"
    assert (out / "sgd.failed-1" / "summary.json").is_file()  # the failed attempt, kept
    assert (out / "sgd" / "summary.json").is_file()


@pytest.mark.timeout(300)
def test_resume_keeps_a_run_that_finished_as_the_comparison_stopped(resumed, tmp_path, capsys):
    """SIGTERM as ssgd ended: its summary.json was written, its record in compare.json not
    yet. --resume took it for a failed attempt, set it aside as ssgd.failed-1 and trained it
    again. A folder whose run is not the one planned (other options) is still set aside."""
    out = tmp_path / "cmp"
    shutil.copytree(resumed.out, out)
    for run in ("sgd", "ssgd"):  # the copy's runs, as if they had run there
        config = out / run / "config.json"
        config.write_text(config.read_text().replace(str(resumed.out), str(out)))
    record = json.loads((out / reading.RECORD).read_text())
    kept = record["runs"].pop("ssgd")
    (out / reading.RECORD).write_text(json.dumps(record))
    summary = (out / "ssgd" / "summary.json").read_bytes()
    args = cli.build_parser().parse_args([*COMPARE, "--out", str(out), "--resume"])
    compare_command.run(args)
    assert "[2/2 ssgd] finished earlier; kept" in capsys.readouterr().err
    assert not (out / "ssgd.failed-1").exists()
    assert (out / "ssgd" / "summary.json").read_bytes() == summary
    ssgd = json.loads((out / reading.RECORD).read_text())["runs"]["ssgd"]
    assert (ssgd["status"], ssgd["command"]) == (
        "ok", kept["command"].replace(str(resumed.out), str(out)))  # its --resume too
    assert table_rows((out / "report.md").read_text())["ssgd"][-1] == "ok"

    config = json.loads((out / "sgd" / "config.json").read_text())
    config["run_info"]["argv"][config["run_info"]["argv"].index("6")] = "5"  # --epochs
    (out / "sgd" / "config.json").write_text(json.dumps(config))
    record["runs"].pop("sgd")
    (out / reading.RECORD).write_text(json.dumps(record))
    assert compare_record.finished_unrecorded(planning.plan(args)[0], out / "sgd") is None


@pytest.mark.timeout(300)
def test_report_without_matplotlib_keeps_the_table(resumed, tmp_path, monkeypatch, capsys):
    """A pip install without the plot extra: the report's table is still written, and says
    how to get the plots, instead of a comparison ending in ImportError after its runs."""
    out = tmp_path / "cmp"
    shutil.copytree(resumed.out, out)
    for name in OUTPUTS:
        (out / name).unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: ImportError
    rendering.run(cli.build_parser().parse_args(["report", str(out)]))
    text = (out / "report.md").read_text()
    assert set(table_rows(text)) == {"sgd", "ssgd"} and ".png" not in text
    assert 'matplotlib is not installed (pip install "hpctrain[plot]"' in text
    assert not any((out / name).exists() for name in OUTPUTS[1:])
    assert "hpctrain report: no plots: matplotlib is not installed" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_files_that_are_not_a_runs_are_named_not_a_traceback(resumed, tmp_path):
    """Cut short or edited by hand: a run's unreadable files make its row failed, naming the
    file (the other rows stand); a comparison record that is not one is refused in one line,
    by report and by compare --resume alike, before anything runs."""
    out = tmp_path / "cmp"
    shutil.copytree(resumed.out, out)
    (out / "ssgd" / "summary.json").write_text('{"algo": "ssgd"')
    with open(out / "sgd" / "metrics.jsonl", "a") as f:
        f.write('{"t": 1.0}\n')
    rendering.run(cli.build_parser().parse_args(["report", str(out)]))
    rows = table_rows((out / "report.md").read_text())
    assert rows["ssgd"][-1].startswith(f"failed: cannot read a run's summary from "
                                       f"{out / 'ssgd' / 'summary.json'}: ")
    assert rows["sgd"][-1] == (f"failed: {out / 'sgd' / 'metrics.jsonl'} line "
                               f"{len((out / 'sgd' / 'metrics.jsonl').read_text().splitlines())} "
                               "is not a curve point (want an object with t, epoch, test_acc)")
    (out / "compare.json").write_text('{"algos": ["sgd"], "workers": 2}')
    for argv in (["report", str(out)], [*COMPARE, "--out", str(out), "--resume"]):
        with pytest.raises(UsageError, match=f"{out / 'compare.json'} is not a comparison's "
                                             "record: it has no 'runs'"):
            args = cli.build_parser().parse_args(argv)
            (rendering if argv[0] == "report" else compare_command).run(args)
    assert (out / "compare.json").read_text() == '{"algos": ["sgd"], "workers": 2}'


@pytest.mark.parametrize("field, value, message", [
    ("ignored", None, "runs.sgd.ignored is null, not a list of words"),
    ("status", ["ok"], 'runs.sgd.status is ["ok"], not a string'),
    ("error", 3, "runs.sgd.error is 3, not a string or null"),
])
def test_a_run_record_edited_by_hand_is_named_not_a_traceback(tmp_path, field, value, message):
    """Each gave TypeError or AttributeError (exit 1) from the table's cells."""
    run = {"status": "failed", "error": "x", "command": "hpctrain train", "ignored": [],
           field: value}
    (tmp_path / "compare.json").write_text(json.dumps(
        {"algos": ["sgd"], "workers": 1, "train_args": [], "runs": {"sgd": run}}))
    with pytest.raises(UsageError, match=re.escape(f"{tmp_path / 'compare.json'}: {message}")):
        reading.read_record(tmp_path)


def test_bench_help_gives_every_benchmark_description(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, module_name in cli.BENCHMARKS.items():
        description = " ".join(importlib.import_module(module_name).DESCRIPTION.split())
        assert f"{name}: {description}" in text


def test_seconds_keep_three_digits_for_a_short_simulation():
    """A simulated run's virtual wall time of 0.03 s read 0.0."""
    assert [metrics.seconds(t) for t in (0.0312, 0.0, 9.876, 123.46)] == \
        ["0.0312", "0", "9.88", "123.5"]


def test_plot_range_leaves_out_the_start_and_diverged_runs():
    converging = [[90.0, 30.0, 15.0, 11.0], [90.0, 40.0, 20.0, 13.0], [90.0, 25.0, 12.0, 10.0]]
    low, high = plotting._error_range([*converging, [90.0, 90.0, 90.0, 90.0]])
    assert 8.0 <= low < 10.0 and 2.5 * 11.0 <= high < 40.0
    assert plotting._error_range([[90.0]]) is None


def test_bytes_communicated_come_from_totals_at_two_levels():
    summary = {"allreduce_bytes_per_rank": 4096, "bytes_moved": 0, "workers": 4,
               "aggregation": {"bytes_per_rank": 2048, "bytes_per_round": 512.0, "rounds": 4}}
    assert reading._byte_counts(summary) == [("aggregation.bytes_per_rank", 2048),
                                            ("allreduce_bytes_per_rank", 4096)]


def test_report_of_an_empty_name_or_no_folder_is_refused_naming_it(tmp_path, monkeypatch):
    """``report ''`` read the working folder and said "." holds nothing."""
    monkeypatch.chdir(tmp_path)
    for folder, says in (("", "report '': give a comparison's or a run's folder"),
                         (" ", "report ' ': give a comparison's or a run's folder"),
                         (str(tmp_path / "no"), f"report: {tmp_path / 'no'} is not a folder")):
        with pytest.raises(UsageError, match=f"^{re.escape(says)}$"):
            rendering.run(cli.build_parser().parse_args(["report", folder]))


def test_report_of_one_runs_folder_goes_to_out_not_into_the_run(tmp_path):
    """``report runs/sgd`` (for ``report runs``) wrote report.md and the plots into that
    training run's folder, one bench compare refuses as its --out: now refused unless --out
    names where the report goes, which must not be a run's folder either."""
    run_dir = tmp_path / "sgd"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps(GOOD_SUMMARY))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(p) + "\n" for p in GOOD_POINTS))
    files = sorted(run_dir.iterdir())

    def report_of(*argv: str) -> list:
        return rendering.run(cli.build_parser().parse_args(["report", str(run_dir), *argv]))

    for argv, says in (
            ([], f"report {run_dir}: is one training run's folder, whose files are the run's: "
                 f"give --out FOLDER for the report, or the folder that holds the run "
                 f"({tmp_path})"),
            (["--out", str(run_dir)], f"--out {run_dir} holds a training run (summary.json); "
                                      "choose another folder")):
        with pytest.raises(UsageError, match=f"^{re.escape(says)}$"):
            report_of(*argv)
    assert sorted(run_dir.iterdir()) == files  # nothing written in the run
    assert [r.name for r in report_of("--out", str(tmp_path / "rep" / "sgd"))] == ["sgd"]
    assert (tmp_path / "rep" / "sgd" / reading.REPORT).is_file()
    assert [r.name for r in rendering.run(cli.build_parser().parse_args(
        ["report", str(tmp_path)]))] == ["sgd"]  # the folder that holds it, as before
    assert sorted(run_dir.iterdir()) == files


def test_report_says_what_the_bytes_column_counts():
    text = document.markdown({}, [reading.Row("asgd", "failed", error="boom")], [0.8])
    assert "| bytes communicated per rank |" in text
    assert "`store_mpi_bytes_per_worker` is the part of it MPI calls moved" in text


def test_the_report_names_what_the_runs_ran_with_and_where_they_differ(tmp_path):
    """Runs from two machines in one folder: the report says which ran on what."""
    for name, device in (("cpu-run", "cpu"), ("gpu-run", "cuda:0"), ("gpu-run-2", "cuda:1")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(GOOD_SUMMARY))
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps(p) + "\n" for p in GOOD_POINTS))
        gpu = {} if device == "cpu" else {"gpu": "NVIDIA H200"}  # a CPU run records none
        (tmp_path / name / "config.json").write_text(json.dumps({"run_info": {
            "device": device, "torch": "2.11.0", "library": "Open MPI v5.0.8, package: x",
            **gpu}}))
    _, rows = reading.load(tmp_path)
    assert remarks.environment(rows) == (
        "Ran with GPU NVIDIA H200 (the GPU runs), MPI Open MPI v5.0.8, torch 2.11.0. **The "
        "runs differ in** device cpu (cpu-run); cuda (gpu-run, gpu-run-2).")
    (tmp_path / "cpu-run" / "config.json").unlink()  # a run from before run_info said more
    _, rows = reading.load(tmp_path)
    assert remarks.environment(rows) == (
        "Ran with GPU NVIDIA H200 (the GPU runs). "
        "**The runs differ in** device not recorded (cpu-run); cuda (gpu-run, gpu-run-2); "
        "and MPI not recorded (cpu-run); Open MPI v5.0.8 (gpu-run, gpu-run-2); and torch not "
        "recorded (cpu-run); 2.11.0 (gpu-run, gpu-run-2).")
    for name in ("gpu-run", "gpu-run-2"):
        (tmp_path / name / "config.json").unlink()
    assert remarks.environment(reading.load(tmp_path)[1]) is None


# ``hpctrain report`` on files edited by hand or written by another tool: no MPI, no runs.
GOOD_SUMMARY = {"algo": "sgd", "workers": 1, "final_test_acc": 0.9, "best_test_acc": 0.95,
                "wall_s": 12.0, "samples_per_s": 100.0, "peak_memory_per_worker": [2**20],
                "model": "mlp", "dataset": "synthetic", "epochs": 1}
GOOD_POINTS = [{"t": 0.0, "epoch": 0.0, "test_acc": 0.1},
               {"t": 6.0, "epoch": 0.5, "test_acc": 0.85},
               {"t": 12.0, "epoch": 1.0, "test_acc": 0.9}]


def saved_runs(folder, **bad_summary) -> dict:
    """``folder`` with two finished runs, ``good`` and ``bad`` (its summary updated with
    ``bad_summary``), each of the algorithm its folder names; the paths of their files."""
    for name, update in (("good", {}), ("bad", bad_summary)):
        (folder / name).mkdir(parents=True)
        (folder / name / "summary.json").write_text(json.dumps({**GOOD_SUMMARY, "algo": name,
                                                                **update}))
        (folder / name / "metrics.jsonl").write_text(
            "".join(json.dumps(p) + "\n" for p in GOOD_POINTS))
    return {"summary": folder / "bad" / "summary.json", "metrics": folder / "bad" / "metrics.jsonl"}


def report_cells(folder) -> dict[str, dict[str, str]]:
    """report.md's table: run -> column -> cell."""
    lines = [line for line in (folder / "report.md").read_text().splitlines()
             if line.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split(" | ")]
    return {cells[0]: dict(zip(head, cells, strict=True))
            for cells in ([c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:])}


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("hpctrain report: warning:")]


@pytest.mark.parametrize("key, value, column, said", [
    ("final_test_acc", "high", "final acc", 'final_test_acc is "high", not a number'),
    ("best_test_acc", [0.9], "best acc", "best_test_acc is [0.9], not a number"),
    ("wall_s", None, "wall s", "wall_s is null, not a number"),
    ("samples_per_s", "fast", "samples/s", 'samples_per_s is "fast", not a number'),
    ("workers", "two", "workers", 'workers is "two", not a positive whole number'),
    ("peak_memory_per_worker", "x", "peak memory",
     'peak_memory_per_worker is "x", not a list of byte counts'),
    ("staleness", "x", "staleness mean / p50 / p90 / p99 / max",
     'staleness is "x", not an object with numbers mean, p50, p90, p99, max'),
    ("staleness", {"mean": "1"}, "staleness mean / p50 / p90 / p99 / max",
     'staleness is {"mean": "1"}, not an object with numbers'),
])
def test_a_wrong_typed_summary_value_is_n_a_with_a_warning(tmp_path, capsys, key, value,
                                                           column, said):
    """One hand-edited field of one run ended the whole report (exit 1, a TypeError or
    ValueError) after the plots were redrawn: now that cell is n/a, one warning names the file
    and key, and every other cell and run is reported."""
    bad = saved_runs(tmp_path, **{key: value})
    rendering.run(cli.build_parser().parse_args(["report", str(tmp_path)]))
    cells = report_cells(tmp_path)
    assert cells["bad"][column] == "n/a"
    assert {k: v for k, v in cells["bad"].items() if k not in ("algorithm", column)} == \
        {k: v for k, v in cells["good"].items() if k not in ("algorithm", column)}
    assert cells["good"][column] != "n/a" and cells["bad"]["status"] == "ok"
    (warning,) = warnings_in(capsys.readouterr().err)  # once, though the table is shown twice
    assert warning.startswith(f"hpctrain report: warning: {bad['summary']}: {said}")
    assert warning.endswith("; shown as n/a")
    assert all((tmp_path / name).is_file() for name in OUTPUTS)


def test_a_report_of_a_comparison_going_on_is_refused(tmp_path):
    """hpctrain report during a compare wrote report.md with the run going on and those to
    come as "failed: did not run"."""
    import fcntl

    saved_runs(tmp_path)
    with open(tmp_path / ".hpctrain.lock", "a") as lock:  # as a comparison going on holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UsageError, match=f"^{tmp_path} is in use by a comparison or run "
                                             "going on now"):
            rendering.run(cli.build_parser().parse_args(["report", str(tmp_path)]))
        assert not (tmp_path / "report.md").exists()
    rendering.run(cli.build_parser().parse_args(["report", str(tmp_path)]))  # once it ended
    assert (tmp_path / "report.md").is_file()


def test_a_report_takes_a_readers_lock_nfs_grants_or_says_it_goes_on_without(
        tmp_path, monkeypatch, capsys):
    """The report took an exclusive lock on the lock file it opened read-only: on NFS (flock
    as an fcntl lock) that fails with EBADF, taken as no locks there, so it never locked. Now
    a shared lock, which NFS grants on a read-only file: it still keeps a comparison out, and
    two reports hold it at once. Where even that is refused for how the file is open, it
    goes on and says so: an O_PATH descriptor, which flock refuses with EBADF here too, stands
    in for such a file on NFS (no NFS mount here)."""
    saved_runs(tmp_path)
    lock = tmp_path / run_folders.LOCK
    lock.touch()
    with contextlib.ExitStack() as first, contextlib.ExitStack() as second:
        rendering._hold_unless_in_use(first, tmp_path)
        rendering._hold_unless_in_use(second, tmp_path)  # a reader's lock: both hold it
        with contextlib.ExitStack() as compare_lock, pytest.raises(UsageError, match="in use"):
            run_folders.lock_folder(compare_lock, "--out", tmp_path, "comparison")
    assert capsys.readouterr().err == ""

    opened = []

    def as_on_nfs(flag, folder, create):
        opened.append(os.open(folder / run_folders.LOCK, os.O_PATH))
        return opened[-1]

    monkeypatch.setattr(run_folders, "open_lock", as_on_nfs)
    rendering.run(cli.build_parser().parse_args(["report", str(tmp_path)]))
    assert (tmp_path / "report.md").is_file() and len(opened) == 1
    assert f"hpctrain report: note: cannot lock {lock} as this user may open it (not for " \
           "reading) on this file system: going on without it, so a comparison going on " \
           "there now is not seen\n" in capsys.readouterr().err


def test_a_run_without_its_curve_is_a_failed_row(tmp_path):
    """Every finished run writes metrics.jsonl before summary.json: a run without it counted
    as ok, with no time to any target, as if it had never reached one."""
    bad = saved_runs(tmp_path)
    bad["metrics"].unlink()
    rendering.run(cli.build_parser().parse_args(["report", str(tmp_path)]))
    cells = report_cells(tmp_path)
    assert cells["bad"]["status"] == "failed: no metrics.jsonl" and cells["good"]["status"] == "ok"
    bad["metrics"].write_text("")  # a finished run scored its last model: an "ok" row read
    rendering.run(cli.build_parser().parse_args(["report", str(tmp_path)]))  # acc 1.0, no target
    assert report_cells(tmp_path)["bad"]["status"] == \
        f"failed: {bad['metrics']} holds no curve point"


def test_the_report_says_sgd_ran_on_one_process_only_when_it_ran():
    record = {"algos": ["ssgd"], "workers": 4, "train_args": [], "runs": {}}
    assert "4 workers per run." in document.markdown(record, [], [])
    record["algos"].append("sgd")
    assert "4 workers per run, sgd on one process." in document.markdown(record, [], [])
    record["train_args"] = ["--eval", "online", "--eval-rank", "3"]  # sgd's: 1, on two
    assert "4 processes per run, one of them evaluating, sgd on one process and one " \
        "evaluating (its --eval-rank 1)." in document.markdown(record, [], [])


def test_a_curve_point_of_the_wrong_type_is_left_out_with_a_warning(tmp_path, capsys):
    """A string ``t`` ended the report in the plot's sort (a TypeError)."""
    bad = saved_runs(tmp_path)
    with open(bad["metrics"], "a") as f:
        f.write('\n{"t": "x", "epoch": 1.0, "test_acc": 0.99}\n{"t": 13, "epoch": NaN, '
                '"test_acc": 0.99}\n')
    rendering.run(cli.build_parser().parse_args(["report", str(tmp_path), "--targets",
                                                "0.85,0.95"]))
    cells = report_cells(tmp_path)
    assert cells["bad"]["time to 0.85"] == "6 s (0.50 ep)" == cells["good"]["time to 0.85"]
    assert cells["bad"]["time to 0.95"] == "not reached"  # the left-out points reached it
    (warning,) = warnings_in(capsys.readouterr().err)
    assert warning == (f"hpctrain report: warning: {bad['metrics']} line 5: t is \"x\", not a "
                       "number; that curve point and 1 more left out")
    assert all((tmp_path / name).is_file() for name in OUTPUTS)


def test_a_comparison_record_of_the_wrong_type_is_one_line(tmp_path):
    """compare.json's targets as a string was a ValueError from the table's heading."""
    saved_runs(tmp_path)
    record = {"algos": ["good"], "runs": {"good": {"status": "ok"}}, "workers": 1,
              "train_args": [], "targets": "0.8"}
    (tmp_path / reading.RECORD).write_text(json.dumps(record))
    with pytest.raises(UsageError, match=re.escape(
            f"{tmp_path / reading.RECORD}: targets is \"0.8\", not a list of accuracies")):
        rendering.render(tmp_path)
    (tmp_path / reading.RECORD).write_text(json.dumps({**record, "targets": [0.8],
                                                      "train_args": ["--epochs", 1]}))
    with pytest.raises(UsageError, match=re.escape(
            f"{tmp_path / reading.RECORD}: train_args is [\"--epochs\", 1], not a list of words")):
        rendering.render(tmp_path)
    assert not any((tmp_path / name).exists() for name in OUTPUTS)


@pytest.mark.parametrize("name", OUTPUTS)
def test_an_output_that_is_a_folder_is_one_line_and_nothing_is_written(tmp_path, name):
    """report.md a folder was an IsADirectoryError traceback (exit 1) after the plots were
    redrawn: now a UsageError (one line, exit 2) before any file changes."""
    saved_runs(tmp_path)
    for other in OUTPUTS:
        (tmp_path / other).write_bytes(b"old")
    (tmp_path / name).unlink()
    (tmp_path / name).mkdir()
    with pytest.raises(UsageError, match=re.escape(
            f"report: cannot write {tmp_path / name}: it is a folder")):
        rendering.run(cli.build_parser().parse_args(["report", str(tmp_path)]))
    assert all((tmp_path / other).read_bytes() == b"old" for other in OUTPUTS if other != name)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bad", "good", *OUTPUTS])


def test_a_report_into_a_folder_it_cannot_write_in_suggests_out():
    """A read-only DIR (an archive, a snapshot): the refusal named a plot it could not write,
    not --out, the way to a report of it. Refused before anything is read; /proc, where no
    file can be made by any user, stands for it."""
    with pytest.raises(UsageError) as e:
        rendering.run(cli.build_parser().parse_args(["report", "/proc"]))
    assert str(e.value).startswith("report /proc: cannot write in /proc (")
    assert str(e.value).endswith("); give --out FOLDER to write report.md and the plots there")


def test_a_report_of_a_folder_with_subfolders_it_cannot_look_at_says_it_holds_no_run(
        tmp_path):
    """``report /proc --out X``: looking for runs in /proc/1's subfolders (/proc/1/cwd: no
    permission even for root in a container) was a PermissionError traceback."""
    with pytest.raises(UsageError) as e:
        rendering.run(cli.build_parser().parse_args(["report", "/proc", "--out",
                                                  str(tmp_path / "r")]))
    assert str(e.value) == ("report: /proc holds no compare.json and no finished run (a "
                            "folder with summary.json)")


def test_the_report_and_its_plots_are_written_together_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails (a full disk, a read-only folder) left new plots beside the old
    report.md, and an OSError traceback: now every file is as it was, no temporary file is
    left, and the line names the file."""
    saved_runs(tmp_path)
    for name in OUTPUTS:
        (tmp_path / name).write_bytes(b"old")
    real, written = rendering.write_atomic, []

    def full_disk(path, content, **kwargs):
        if len(written) == len(OUTPUTS) - 1:  # the last of the three
            raise OSError(28, "No space left on device", str(path))
        real(path, content, **kwargs)
        written.append(path)

    monkeypatch.setattr(rendering, "write_atomic", full_disk)
    with pytest.raises(UsageError, match="^report: cannot write .*: No space left on device$"):
        rendering.render(tmp_path)
    assert all((tmp_path / name).read_bytes() == b"old" for name in OUTPUTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bad", "good", *OUTPUTS])
    monkeypatch.setattr(rendering, "write_atomic", real)
    rendering.render(tmp_path)
    assert all((tmp_path / name).read_bytes() != b"old" for name in OUTPUTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bad", "good", *OUTPUTS])


def test_a_staged_file_that_cannot_be_removed_does_not_hide_why_the_write_failed(tmp_path):
    """The clean-up's own OSError (on a read-only mount unlink fails even for a missing file)
    replaced the one-line refusal: exit 1 with an OSError naming a temporary file."""
    saved_runs(tmp_path)
    (tmp_path / f".report.md.{os.getpid()}.new").mkdir()  # neither replaced nor unlinked
    with pytest.raises(UsageError, match=re.escape(
            f"report: cannot write {tmp_path / 'report.md'}: Is a directory")):
        rendering.render(tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_the_console_takes_the_table_in_any_locale(tmp_path, monkeypatch):
    """Under a Latin-1 or C locale the table's dashes ended a report written in full with a
    UnicodeEncodeError (exit 1); report.md stays UTF-8."""
    saved_runs(tmp_path)
    for name in ("stdout", "stderr"):
        monkeypatch.setattr(sys, name, io.TextIOWrapper(io.BytesIO(), encoding="latin-1"))
    cli.main(["report", str(tmp_path)])
    sys.stdout.flush()
    shown = sys.stdout.buffer.getvalue().decode("latin-1")
    assert "| good | 1 | 0.9000 |" in shown and "\\u2014" in shown
    assert "| — |" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_run_names_are_shown_as_typed_in_the_reports_markdown(tmp_path):
    """A run's folder named lr=0.1|b*x_ gave its row a column too many, and one named with a
    backtick broke its command's code span."""
    saved_runs(tmp_path)
    for old, new in (("good", "lr=0.1|b*x_"), ("bad", "run`q")):
        (tmp_path / old).rename(tmp_path / new)
        argv = ["hpctrain", "train", "--out", f"runs/{new}"]
        (tmp_path / new / "config.json").write_text(json.dumps({"run_info": {"argv": argv}}))
    rendering.render(tmp_path)
    text = (tmp_path / "report.md").read_text()
    cells = report_cells(tmp_path)
    assert set(cells) == {r"good (lr=0.1\|b\*x\_)", r"bad (run\`q)"}  # and no column more
    assert r"- lr=0.1\|b\*x\_: `hpctrain train --out 'runs/lr=0.1|b*x_'`" in text
    assert "- run\\`q: `` hpctrain train --out 'runs/run`q' ``" in text


def test_a_comparison_going_on_is_said_first(tmp_path):
    """Started into a folder a comparison was running into, compare said "already holds a
    comparison; pass --resume to finish it", and --resume then said it was in use."""
    out = tmp_path / "cmp"
    out.mkdir()
    (out / reading.RECORD).write_text(json.dumps(
        {"algos": ["sgd"], "workers": 2, "train_args": [], "runs": {}}))
    with contextlib.ExitStack() as held:
        run_folders.lock_folder(held, "--out", out, "comparison")
        for resume in ([], ["--resume"]):
            with pytest.raises(UsageError, match=f"^--out {out} is in use by another "
                                                 "comparison going on now"):
                compare_command.run(parse("--algos", "sgd", *SMALL, "--out", str(out), *resume))
    assert (out / reading.RECORD).read_text().startswith('{"algos": ["sgd"]')


def _read_until(fd: int, end: bytes, timeout: float = 30.0) -> bytes:
    """What a pty shows until ``end``: one read may return the first write alone (CI did)."""
    shown = b""
    while end not in shown and select.select([fd], [], [], timeout)[0]:
        shown += os.read(fd, 4096)
    return shown


def test_progress_is_not_redrawn_on_a_dumb_terminal(monkeypatch):
    """TERM=dumb (an editor's shell) showed each redraw's ^M^[[K: there it is a line now
    and then, as into a file."""
    main, side = os.openpty()
    with os.fdopen(main, "rb") as screen, open(side, "w") as term:
        monkeypatch.setenv("TERM", "dumb")
        display = execution._Display("[1/1 sgd]", term)  # noqa: SLF001
        display.progress("sgd:  50%|#####     | 5/10")
        display.line("hpctrain: note")
        shown = _read_until(screen.fileno(), b"note")
        assert b"\x1b" not in shown and b"[1/1 sgd] hpctrain: note" in shown, shown
        monkeypatch.setenv("TERM", "xterm")
        assert execution._Display("[1/1 sgd]", term).tty  # noqa: SLF001


def test_a_runs_stderr_pipe_is_closed_when_it_ends(tmp_path):
    """Each run left its stderr pipe to the garbage collector: a ResourceWarning per run
    (an error line under PYTHONWARNINGS=error)."""
    run = planning.Run("sgd", 1, [sys.executable, "-c", "import sys; sys.stderr.write('x')"], [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        execution.execute(run, tmp_path / "sgd", "[1/1 sgd]", timeout=0)
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


def test_a_resume_without_algos_names_the_command_that_continues(tmp_path):
    """A stopped comparison said "continue with --resume (--out DIR)", but `bench compare
    --resume --out DIR` stopped at argparse's "the following arguments are required: --algos":
    a resume checks the same --algos and options, so the refusal now gives them, as a
    command that (pasted) continues the comparison."""
    out = tmp_path / "my cmp"
    first = parse("--algos", "sgd,ma", "--simulate", "2", "--seeds", "1,2", "--targets",
                  "0.5,0.7", *SMALL, "--tau", "4", "--out", str(out))
    out.mkdir()
    metrics.write_json_atomic(out / reading.RECORD, compare_record.start_record(
        first, planning.plan(first)))
    with pytest.raises(UsageError) as e:
        compare_command.run(parse("--resume", "--out", str(out)))
    message = str(e.value)
    assert message.startswith("--resume needs the comparison's --algos and options again")
    command = message.split(": ", 1)[1]
    assert command.startswith("hpctrain bench compare --algos sgd,ma --simulate 2 --seeds 1,2 "
                              "--targets 0.5,0.7 "), command
    assert command.endswith(f" --resume --out {shlex.quote(str(out))}"), command
    again = parse(*shlex.split(command)[3:])
    assert compare_record.start_record(again, planning.plan(again))["algos"] == ["sgd", "ma"]
    with pytest.raises(UsageError) as e:  # no comparison there: what --algos is
        compare_command.run(parse("--out", str(tmp_path / "new")))
    assert str(e.value).startswith("--algos is required: the algorithms to compare (sgd, ")


def test_a_report_of_a_folder_of_comparisons_says_how_to_report_them_together(tmp_path):
    """``report PARENT`` of two comparisons' --out folders side by side said PARENT "holds no
    compare.json and no finished run", not that it holds comparisons nor how to put their
    runs in one report."""
    for name in ("before", "after"):
        (tmp_path / name / "ssgd").mkdir(parents=True)
        (tmp_path / name / reading.RECORD).write_text(json.dumps(
            {"algos": ["ssgd"], "runs": {}, "workers": 2, "train_args": []}))
    with pytest.raises(UsageError) as e:
        reading.load(tmp_path)
    assert str(e.value).startswith(f"report: {tmp_path} holds comparisons (after, before), "
                                   "not runs: report each, or to see their runs in one report "
                                   "gather the runs' folders"), e.value
