"""Whole jobs through the command line: results, reproducibility, and bad input.

Bad input must give one line naming the bad value, exit status 2, and no hang.
"""

import contextlib
import errno
import functools
import gzip
import json
import os
import re
import shutil
import struct
import sys

import numpy as np
import pytest
import torch
from conftest import (
    ROOT,
    SYNTHETIC,
    fill,
    full_disk,
    refusal,
    run_commands,
    run_job,
    run_program,
)

from hpctrain import checkpoint, cli, compiled, kernels, options, provenance, watchdog
from hpctrain.errors import UsageError

SMALL = [*SYNTHETIC, "--epochs", "1"]


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("hpctrain")]


def assert_one_line_error(proc, pattern: str):
    """Bad input's outcome: exit status 2 and one line naming it on every rank that spoke."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = error_lines(proc)
    assert lines, proc.stderr
    assert all(pattern in line for line in lines), proc.stderr
    assert "Traceback" not in proc.stderr


def write_tiny_idx(folder, n: int):
    for kind, shape in (("images-idx3", (n, 28, 28)), ("labels-idx1", (n,))):
        for split in ("train", "t10k"):
            arr = np.zeros(shape, np.uint8)
            head = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
            with gzip.open(folder / f"{split}-{kind}-ubyte.gz", "wb") as f:
                f.write(head + arr.tobytes())


@pytest.mark.parametrize("args, pattern", [
    (["--algo", "bogus"], "unknown algorithm 'bogus'"),
    (["--algo", "sgd", "--model", "vgg"], "unknown --model 'vgg'"),
    (["--algo", "sgd", *SYNTHETIC[:2], "--model", "hpctrain.models:nothing"],
     "hpctrain.models has no attribute 'nothing'"),
    (["--algo", "asgd", "--optimizer", "adam"], "--optimizer adam: --algo asgd keeps its own"),
    (["--algo", "sgd", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent/x"],
     "--data-dir /nonexistent/x does not exist"),
    (["--algo", "sgd", "--lr", "0"], "--lr: must be > 0, got 0"),
    (["--algo", "sgd", "--lr", "-1"], "--lr: must be > 0, got -1"),
    (["--algo", "sgd", "--batch-size", "0"], "--batch-size: must be > 0, got 0"),
    (["--algo", "sgd", "--lr-milestones", "3,1"], "milestones must be increasing"),
    (["--algo", "sgd", "--lr-milestones", "2,"], "--lr-milestones: '2,': an empty entry"),
    (["--algo", "sgd", "--lr-schedule", "step"], "--lr-schedule step needs --lr-milestones"),
    (["--algo", "sgd", "--slowdown", "1:3"], "rank 1 is not a worker"),
    (["--algo", "sgd", "--jitter", "-0.5"], "--jitter -0.5 must be in [0, 5]"),
    (["--algo", "sgd", "--jitter", "1e308"], "--jitter 1e+308 must be in [0, 5]"),
    (["--algo", "sgd", "--slowdown", "0:1e308"], "factor 1e308 must be in [1, 1e+06]"),
    (["--algo", "ma", "--tau-epochs", "1e308"], "--tau-epochs 1e+308 must be in (0, 1e+06]"),
    (["--algo", "sgd", "--shuffle-chunk-mb", "1e308"],
     "--shuffle-chunk-mb 1e+308 must be in (0, 1e+06]"),
    (["--algo", "sgd", "--stall-timeout", "-1"], "--stall-timeout -1.0 must be >= 0"),
    (["--algo", "sgd", "--momentum", "1.5"], "--momentum 1.5 must be in [0, 1)"),
    (["--algo", "sgd", "--weight-decay", "-1"], "--weight-decay -1.0 must be in [0, 1e+06]"),
    (["--algo", "sgd", "--clip-grad-norm", "-1"], "--clip-grad-norm -1.0 must be > 0"),
    (["--algo", "sgd", "--micro-batch-size", "65"], "--micro-batch-size 65 exceeds --batch-size"),
    (["--algo", "sgd", "--epochs", "0.05"], "--epochs: '0.05' is not a whole number"),
    (["--algo", "asgd", "--epochs", "1e300"], "--epochs 1e+300 must be in (0, 1e+06]"),
    (["--algo", "ssgd", "--lam", "0.5"],
     "--lam is an option of dcasgd-c, dcasgd-a, not of --algo ssgd"),
    (["--algo", "sgd", "--fp16-allreduce"], "--fp16-allreduce is an option of ssgd, not of"),
    (["--algo", "ma", "--ec-alpha", "0.3"], "--ec-alpha is an option of ec, not of --algo ma"),
    (["--algo", "sgd", "--resume", "/nonexistent/run"], "--resume /nonexistent/run: no such"),
    pytest.param(["--algo", "dcasgd-a", "--device", "cuda"], "--device cuda: torch",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
])
def test_bad_arguments_are_refused_naming_the_value(args, pattern, tmp_path):
    assert pattern in refusal([*args, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, meant", [
    (["--algo", "dcasgd-x"], "'dcasgd-c'"),
    (["--algo", "sgd", "--dataset", "fashion-mnst"], "'fashion-mnist'"),
    (["--algo", "sgd", "--model", "lenett"], "'lenet'"),
    (["--algo", "sgd", "--optimizer", "adm"], "'adam'"),  # argparse's own choices
    (["--algo", "sgd", "--lr-schedule", "cosin"], "'cosine'"),
    (["--algo", "sgd", "--batchsize", "64"], "--batch-size"),  # an unknown flag
    (["--algo", "sgd", "--seeed", "1", "--lrr", "0.1"], "--seed for --seeed, --lr for --lrr"),
    # nothing close: no guess (--lr is no typo of --learning-rate)
    (["--algo", "sgd", "--dataset", "imagenet"], None),
    (["--algo", "sgd", "--learning-rate", "0.1"], None),
])
def test_a_typo_is_answered_with_the_choice_or_flag_meant(args, meant, tmp_path):
    """A user trial: --dataset fashion-mnst and --algo dcasgd-x listed every choice, not
    the one meant (Python 3.14's argparse suggests; hpctrain supports 3.10+)."""
    said = refusal([*args, "--out", str(tmp_path / "run")])
    if meant is None:
        assert "did you mean" not in said
    else:
        assert said.endswith(f"; did you mean {meant}?"), said
    with pytest.raises(UsageError, match=r"invalid choice: 'trian'.*; did you mean 'train'\?$"):
        cli.build_parser().parse_args(["trian"])  # a command, through the same check


@pytest.mark.parametrize("args, pattern", [
    (["--algo", "bogus"], "unknown algorithm 'bogus'"),
    (["--algo", "sgd", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent/x"],
     "--data-dir /nonexistent/x does not exist"),
    (["--algo", "sgd", "--momentum", "1.5"], "--momentum 1.5 must be in [0, 1)"),
])
def test_bad_arguments(args, pattern, tmp_path):
    """A real process: one line, exit status 2, nothing written."""
    proc = run_job(["train", *args, "--out", str(tmp_path / "run")], np=0, timeout=60)
    assert_one_line_error(proc, pattern)
    assert not (tmp_path / "run").exists()  # nothing is written for a rejected run


def test_corrupt_idx_file(tmp_path):
    write_tiny_idx(tmp_path, 8)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01garbage"))
    proc = run_job(["train", "--algo", "sgd", "--data-dir", str(tmp_path), "--out",
                    str(tmp_path / "run")], np=0, timeout=60)
    assert_one_line_error(proc, "train-labels-idx1-ubyte.gz")


def test_sgd_on_several_ranks_refused(tmp_path):
    """Checked in process; a 2-rank refusal as a real job (rank 0 alone speaks, exit 2) is
    the fusion threshold's below, and test_ec's --ec-distill-size one."""
    assert "--algo sgd runs on one process, not 2" in refusal(
        ["--algo", "sgd", *SMALL, "--out", str(tmp_path / "run")], ranks=2)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("debug, traceback", [("0", False), ("off", False), ("1", True)])
def test_hpctrain_debug_prints_the_traceback_only_when_on(tmp_path, debug, traceback):
    """HPCTRAIN_DEBUG=0 printed the traceback too (any value did)."""
    proc = run_job(["train", "--algo", "sgd", *SMALL, "--lr", "-1", "--out",
                    str(tmp_path / "run")], np=0, timeout=60, env={"HPCTRAIN_DEBUG": debug})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("hpctrain: error: argument --lr")
    assert ("Traceback (most recent call last)" in proc.stderr) == traceback, proc.stderr


def test_a_bad_horovod_fusion_threshold_is_one_line_before_mpi(tmp_path):
    proc = run_job(["train", "--algo", "ssgd", *SMALL, "--out", str(tmp_path / "run")], np=2,
                   timeout=60, env={"HOROVOD_FUSION_THRESHOLD": "64MB"})
    assert_one_line_error(proc, "HOROVOD_FUSION_THRESHOLD must be a whole number of bytes")
    assert len(error_lines(proc)) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("variable, value, says", [
    ("HOROVOD_STALL_CHECK_TIME_SECONDS", "abc", "a number of seconds >= 0, got 'abc'"),
    ("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "-5", "a number of seconds >= 0, got '-5'"),
    ("HOROVOD_STALL_CHECK_TIME_SECONDS", "inf", "a number of seconds >= 0, got 'inf'"),
    ("HPCTRAIN_CHECK_COLLECTIVES", "maybe", "must be 1 or 0 (true/false, yes/no, on/off)"),
    ("HOROVOD_STALL_CHECK_DISABLE", "Abc", "want a number, as Horovod reads it"),  # disabled
    # not /nonexistent, which a program run with HOME=/nonexistent (Debian's) may create
    ("HOROVOD_TIMELINE", "/proc/nonexistent/t.json", "cannot write a file there"),
    ("HOROVOD_TIMELINE", "/sys/t.json", "cannot write a file there")])  # passed os.access
def test_a_bad_horovod_variable_is_refused_before_mpi(monkeypatch, variable, value, says):
    """Read once collectives start (the timeline by rank 0 alone), they ended the job with
    exit 1 and a traceback, or were taken as their default; the real job is the fusion
    threshold's above."""
    monkeypatch.setenv(variable, value)
    message = refusal(["--algo", "ssgd", *SMALL], ranks=2)
    assert message.startswith(variable) and value in message and says in message


@pytest.mark.parametrize("value, disabled", [("1", True), ("2", True), ("1.0", True),
                                             (" 1", True), ("0", False), ("", False)])
def test_the_stall_check_is_disabled_as_horovod_reads_the_variable(monkeypatch, value,
                                                                   disabled):
    """Horovod reads HOROVOD_STALL_CHECK_DISABLE with strtol (a leading number above 0
    disables); "false" disabled the check here, and words are refused (test above)."""
    from hpctrain.sync import stall

    monkeypatch.setenv("HOROVOD_STALL_CHECK_DISABLE", value)
    monkeypatch.delenv("HOROVOD_STALL_CHECK_TIME_SECONDS", raising=False)
    assert stall.settings(None, None)[0] == (0.0 if disabled else stall.DEFAULT_CHECK_S)


def test_the_timeline_check_leaves_the_file_as_it_found_it(tmp_path, monkeypatch):
    """Every rank checks at once while rank 0 may already write the file: a check that made
    and removed the file took rank 0's away (CI hung in test_horovodrun once)."""
    from hpctrain.sync import timeline

    path = tmp_path / "t.json"
    timeline.check_path(str(path))
    assert list(tmp_path.iterdir()) == []  # a probe of its own, gone
    path.write_text("[\n")  # rank 0 started between another rank's look and its check
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: p != str(path) and real_exists(p))
    timeline.check_path(str(path))
    assert path.read_text() == "[\n"


def test_more_ranks_than_samples(tmp_path, capsys):
    """Checked before MPI starts (in process here): the data files are read, not loaded. The
    refusal alone: a warning that each worker's batches hold its 0 samples came first."""
    write_tiny_idx(tmp_path, 3)
    assert "4 ranks but only 3 training samples" in refusal(
        ["--algo", "ssgd", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")], ranks=4)
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def crashed_ssgd(tmp_path_factory):
    """ssgd on 2 ranks whose rank 1 raises at step 12, after the checkpoint at half the epoch
    (step 8): run once per sync backend, read by two tests."""
    @functools.cache
    def get(backend: str):
        out = tmp_path_factory.mktemp(f"crashed-{backend}") / "run"
        proc = run_job(["train", "--algo", "ssgd", "--sync-backend", backend, *SMALL,
                        "--checkpoint-every", "0.5e", "--out", str(out)], np=2, timeout=90,
                       env={"HPCTRAIN_INJECT": "raise@1:12"})
        return proc, out
    return get


# ids not "mpi": pytest-mpi takes a test with the keyword "mpi" for one of its own.
@pytest.mark.parametrize("backend", ["mpi", "torch"], ids=["mpi-backend", "torch-backend"])
def test_exception_on_one_rank_ends_job(crashed_ssgd, backend):
    # torch: init_process_group wraps the abort hook with one that buffers sys.stderr.
    proc, _ = crashed_ssgd(backend)
    assert proc.returncode != 0
    assert "hpctrain: error (rank 1 of 2): RuntimeError: injected fault at step 12" in proc.stderr


def test_an_error_says_where_in_the_users_own_code_it_arose(tmp_path, monkeypatch):
    """The one line replaces the traceback: an error raised in a user's model said only its
    message. Frames of hpctrain, the standard library and installed packages are skipped."""
    from hpctrain import job_end

    (tmp_path / "own_model.py").write_text(
        "import torch\n\ndef forward(x):\n    return torch.ones(2) @ x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import own_model

    with pytest.raises(RuntimeError) as raised:  # raised inside torch, called from line 4
        own_model.forward(torch.ones(3))
    assert job_end.describe_error(raised.value).endswith(
        f" (at {tmp_path / 'own_model.py'}:4, in forward)")
    assert job_end.describe_error(RuntimeError("no traceback")) == "RuntimeError: no traceback"
    assert job_end.describe_error(UsageError("--lr x")) == "--lr x"


@pytest.mark.parametrize("launched_by", ["<frozen runpy>", "scripts"])
def test_an_error_of_hpctrain_alone_names_no_launching_frame(launched_by):
    """``python -m hpctrain`` runs under <frozen runpy>, the ``hpctrain`` command under its
    bin/ wrapper: an injected fault said "(at <frozen runpy>:88, in _run_code)" or "(at
    .venv/bin/hpctrain:6, in <module>)", as if the user's code had raised it."""
    import sysconfig

    from hpctrain import job_end

    name = launched_by if launched_by.startswith("<") else \
        os.path.join(sysconfig.get_paths()["scripts"], "hpctrain")
    launcher = compile("from hpctrain.checkpoint import policy\n"
                       "def main():\n"
                       "    try:\n"
                       "        policy.parse_every('x')\n"  # raises inside hpctrain
                       "    except Exception as e:\n"
                       "        return e\n", name, "exec")
    scope: dict = {}
    exec(launcher, scope)
    raised = scope["main"]()  # its traceback: the launching frame, then hpctrain's
    assert job_end.describe_error(raised) == \
        "ArgumentTypeError: 'x' is neither seconds (600) nor epochs (2e)"


def test_ctrl_c_is_an_interruption_not_an_error():
    """It said "hpctrain: error: KeyboardInterrupt: " (an empty message) and exit 1; a shell
    expects 130 (128 + SIGINT) of an interrupted command."""
    proc = run_program([sys.executable, "-c", "from hpctrain import job_end\n"
                        "job_end.install_abort_on_error()\nraise KeyboardInterrupt"], timeout=60)
    assert (proc.returncode, proc.stderr.strip()) == (130, "hpctrain: interrupted")


# Started first by Python (sitecustomize): SIGINT to the process as it begins to import torch.
CTRL_C_AT_TORCH = """
import os, signal, sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)


sys.meta_path.insert(0, CtrlC())
"""


def test_ctrl_c_while_torch_loads_is_an_interruption_not_a_traceback(tmp_path):
    """Ctrl-C in the command's first second (torch's import) printed Python's traceback of
    importlib's frames; it is the one line and 130 of an interruption later on."""
    (tmp_path / "sitecustomize.py").write_text(CTRL_C_AT_TORCH)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    proc = run_job(["train", "--algo", "sgd", *SMALL, "--out", str(tmp_path / "run")], np=0,
                   timeout=60, env={"PYTHONPATH": path})
    assert (proc.returncode, proc.stderr.strip()) == (130, "hpctrain: interrupted")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def finished_sgd(tmp_path_factory):
    """One finished sgd run (under umask 027, evaluated every half epoch), read by several
    tests; returns its command-line options and its job."""
    out = tmp_path_factory.mktemp("sgd") / "run"
    args = ["train", "--algo", "sgd", *SMALL, "--seed", "3", "--eval-every", "0.5"]
    old = os.umask(0o027)  # the job inherits it: its files must follow it, as open()'s do
    try:
        proc = run_job([*args, "--out", str(out)], np=0)
    finally:
        os.umask(old)
    return args, proc, out


@pytest.mark.parametrize("held", ["out", "checkpoint-dir"])
def test_a_folder_another_run_is_writing_is_refused(tmp_path, held, capsys):
    """Two jobs started with the same --out at once both passed the checks, then wrote over
    each other: one's config.json beside the other's model.pt, and one removed the other's
    temporary snapshot file and crashed it. Rank 0 now holds a lock on its folders while it
    runs; the second is refused before MPI starts. The lock goes with the run."""
    import fcntl

    from hpctrain import arguments, run, run_folders

    out, ckdir = tmp_path / "run", tmp_path / "ckpts"
    args = ["train", "--algo", "sgd", *SMALL, "--out", str(out), "--checkpoint-every", "1e",
            "--checkpoint-dir", str(ckdir), "--resume", "auto"]
    folder = out if held == "out" else ckdir
    folder.mkdir()
    with open(folder / run_folders.LOCK, "a") as other:  # another run's, going on
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UsageError) as refused, options.command_line():  # as cli.main
            run.train(arguments.build(cli.build_parser().parse_args(args)))
    flag = "--out" if held == "out" else "the checkpoint folder"
    assert str(refused.value) == (
        f"{flag} {folder} is in use by another run going on now (it holds "
        f"{folder / run_folders.LOCK}); wait for it to end or choose another folder")
    # The other run's folder stays; the --out this run made to lock is gone with it
    assert (folder / run_folders.LOCK).exists() and out.exists() == (held == "out")
    assert not (out / "config.json").exists()
    assert "--resume auto" not in capsys.readouterr().out  # the refusal is the one line


def test_a_live_runs_folders_are_refused_as_in_use_before_what_they_hold_is_judged(tmp_path):
    """Once a live run had written a checkpoint, a second run naming its folder was told to
    go on with --resume (--out X "holds the checkpoints of an unfinished run", --checkpoint-dir
    X/checkpoints "holds another run's checkpoints"), which was then refused as in use: the
    launch checks judged the folders before the run's lock was taken. The lock is probed
    first, through each flag that names one of the live run's folders."""
    from hpctrain import arguments, launch_checks, run_folders
    from hpctrain import config as configs

    x, ck = tmp_path / "x", tmp_path / "x" / "checkpoints"
    live = launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(
        ["train", "--algo", "sgd", *SMALL, "--out", str(x), "--checkpoint-every", "1e"])), 1)

    def in_use(flag, folder):
        return (f"{flag} {folder} is in use by another run going on now (it holds "
                f"{folder / run_folders.LOCK}); wait for it to end or choose another folder")

    other, every = str(tmp_path / "y"), ["--checkpoint-every", "1e"]
    with run_folders.claimed(live):  # the live run's locks, as it takes them
        checkpoint.save(ck, 5, {"x": 1}, {"algo": "sgd", "ranks": 1, "workers": 1,
                                          "args": checkpoint.recorded_args(configs.flat(live))})
        for flags, said in ((["--out", str(x)], in_use("--out", x)),
                            (["--out", other, "--checkpoint-dir", str(ck), *every],
                             in_use("the checkpoint folder", ck)),
                            (["--out", other, "--checkpoint-dir", str(x), *every],
                             in_use("the checkpoint folder", x)),
                            (["--resume", str(x)], in_use("the checkpoint folder", ck)),
                            (["--out", str(ck), *every], in_use("--out", ck))):
            assert refusal(["--algo", "sgd", *SMALL, *flags]) == said, flags
    assert not (tmp_path / "y").exists()
    # Ended (its lock files left behind): what the folder holds is judged, as before
    assert refusal(["--algo", "sgd", *SMALL, "--out", str(x)]) == (
        f"--out {x} holds the checkpoints of an unfinished run; continue it with --resume {x} "
        "or choose another folder")


def test_an_output_folder_that_is_a_file_is_refused_before_mpi(tmp_path):
    """Found only at the first write, after MPI started, it ended the job with exit 1."""
    (tmp_path / "f").write_text("not a folder")
    for flags in (["--out", str(tmp_path / "f")], ["--out", str(tmp_path / "f" / "run")],
                  ["--checkpoint-every", "1e", "--checkpoint-dir", str(tmp_path / "f" / "c"),
                   "--out", str(tmp_path / "run")]):
        assert f"{tmp_path / 'f'} is a file, not a folder" in refusal(
            ["--algo", "sgd", *SYNTHETIC, *flags]), flags
    assert not (tmp_path / "run").exists()


def test_an_output_file_name_taken_by_a_folder_is_refused_before_mpi(tmp_path):
    """A folder named model.pt (or metrics.jsonl, ...) in --out was found only when the file
    was written, after training, whose model was lost; a file named tensorboard failed in
    rank 0's first write, after MPI started (exit 1)."""
    for name in ("model.pt", "metrics.jsonl", "step_times.json"):
        out = tmp_path / name.replace(".", "-")
        (out / name).mkdir(parents=True)
        assert refusal(["--algo", "sgd", *SYNTHETIC, "--out", str(out)]) == \
            f"--out {out}: {out / name} is a folder; the run writes its {name} there"
    out = tmp_path / "board"
    out.mkdir()
    (out / "tensorboard").write_text("not a folder")
    assert refusal(["--algo", "sgd", *SYNTHETIC, "--tensorboard", "--out", str(out)]) == \
        f"--tensorboard: {out / 'tensorboard'} is a file; the run writes its event files in " \
        "a folder of that name"
    assert sorted(p.name for p in out.iterdir()) == ["tensorboard"]  # nothing written


def test_an_output_folder_that_cannot_be_created_is_refused_before_mpi(tmp_path):
    """A dangling link, a name too long, a folder where none can be made: found at the first
    write, after MPI started, each ended the job with exit 1; no check leaves a folder."""
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    cases = {str(tmp_path / "gone"): "is a link to",
             str(tmp_path / ("x" * 300) / "run"): "longer than 255 bytes",
             "/proc/hpctrain-run": "cannot create a folder in /proc"}
    for folder, says in cases.items():
        for flags in (["--out", folder],
                      ["--checkpoint-every", "1e", "--checkpoint-dir", folder]):
            assert says in refusal(["--algo", "sgd", *SYNTHETIC, *flags]), flags
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gone"]


def test_an_output_path_too_long_is_refused_before_mpi(tmp_path):
    """A folder path of 4090 bytes (each name short enough): the checkpoint checks'
    Path.exists() raised OSError (ENAMETOOLONG), exit 1; without checkpoints, the first
    write did, after MPI started. --resume auto looked in it first."""
    from hpctrain import arguments, launch_checks, run_folders

    long = str(tmp_path)
    while len(long) < 4090 - 201:
        long += "/" + "a" * 200
    long += "/" + "b" * (4090 - len(long) - 1)
    assert len(long) == 4090
    limit = os.pathconf(tmp_path, "PC_PATH_MAX")
    says = (f"the path is too long (4090 bytes from /; the files the run writes in it need "
            f"it at most {limit - run_folders.ROOM} bytes long, the system's limit being "
            f"{limit})")
    for flag, flags in (("--out", ["--out", long, "--checkpoint-every", "1e"]),
                        ("--out", ["--out", long]),
                        ("--checkpoint-dir", ["--out", str(tmp_path / "run"),
                                              "--checkpoint-dir", long, "--checkpoint-every",
                                              "1e"])):
        assert refusal(["--algo", "sgd", *SMALL, *flags]) == f"{flag} {long}: {says}", flags
        config = arguments.build(cli.build_parser().parse_args(
            ["train", "--algo", "sgd", *SMALL, *flags, "--resume", "auto"]))
        with pytest.raises(UsageError, match=f"^{flag} .*: the path is too long"), \
                options.command_line():  # as typed; from Python (it said the flag): the field
            launch_checks.finished_run(config)
        field = "RunConfig.out" if flag == "--out" else "CheckpointConfig.dir"
        with pytest.raises(UsageError, match=f"^{field}='.*': the path is too long"):
            launch_checks.finished_run(config)
    assert os.listdir(tmp_path) == []


def test_an_empty_output_folder_is_the_working_folder_and_checked(monkeypatch):
    """``--out ""`` writes in the working folder, which was not checked: "" passed as None."""
    from hpctrain import run_folders

    run_folders.check_folder("--out", None)  # no folder given: nothing to check
    monkeypatch.chdir("/proc")
    with pytest.raises(UsageError, match=r"^--out : cannot create a folder in \. \("):
        run_folders.check_folder("--out", "")


def test_runs_given_no_out_each_make_their_own_folder(tmp_path, monkeypatch):
    """Given no --out, two runs started in the same second shared runs/<algo>-<time>, one's
    outputs over the other's, and a file named runs ended the job after MPI started (exit 1).
    Rank 0 now makes the folder, exclusively, before MPI starts."""
    import time

    from hpctrain import arguments, metrics, run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda form: "20261203-171133")
    made = [metrics.new_run_folder("sgd") for _ in range(3)]
    assert [str(p) for p in made] == ["runs/sgd-20261203-171133", "runs/sgd-20261203-171133-2",
                                      "runs/sgd-20261203-171133-3"]
    assert all(p.is_dir() for p in made)
    shutil.rmtree("runs")
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(UsageError) as refused:
        run.train(arguments.build(cli.build_parser().parse_args(
            ["train", "--algo", "sgd", *SYNTHETIC])))
    assert str(refused.value) == ("cannot make the run's folder runs/sgd-20261203-171133 (Not a "
                                  "directory); choose one with --out")


def test_a_checkpoint_dir_that_is_the_out_folder_is_locked_once(tmp_path):
    """--out X --checkpoint-dir X: the run took X's lock twice and refused itself as "in use
    by another run going on now"."""
    from hpctrain import arguments, launch_checks, run_folders

    args = ["train", "--algo", "sgd", *SMALL, "--checkpoint-every", "1e", "--out",
            str(tmp_path / "x"), "--checkpoint-dir", str(tmp_path / "x")]
    config = launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(args)), 1)
    with run_folders.claimed(config) as claimed:
        assert claimed.out == str(tmp_path / "x")


def test_resume_auto_returns_a_finished_run_only_for_its_own_options(finished_sgd):
    """A requeued job finds its run finished and returns its summary; started again with
    another --lr it returned the old summary too, as if it had trained with the new one."""
    from hpctrain import arguments, cli, run

    args, proc, out = finished_sgd
    assert proc.returncode == 0, proc.stderr

    def again(*extra: str) -> dict:
        parsed = cli.build_parser().parse_args([*args, "--out", str(out), "--resume", "auto",
                                                *extra])
        with options.command_line():  # as hpctrain train runs it
            return run.train(arguments.build(parsed))

    summary = json.loads((out / "summary.json").read_text())
    # the node's load as training started and ended, and its CPUs (the report's load line)
    assert isinstance(summary["load_average_start"], float) and \
        isinstance(summary["load_average_end"], float)
    assert summary["machine_cpus"] == os.cpu_count()
    assert again() == again("--threads", "2", "--eval", "online") == summary
    with pytest.raises(UsageError) as refused:
        again("--lr", "0.2")
    assert str(refused.value) == (f"--resume auto: --out {out} holds a finished run, started "
                                  "with --lr 0.05, not 0.2; choose another --out for a new run")
    assert json.loads((out / "summary.json").read_text()) == summary


def test_finished_run_is_never_overwritten(finished_sgd):
    """The check is the launch's, before MPI (in process here; test_bad_arguments shows
    what a refused job prints and exits with)."""
    args, proc, out = finished_sgd
    assert proc.returncode == 0, proc.stderr
    before = (out / "summary.json").read_bytes()
    assert "already holds a finished run" in refusal([*args[1:], "--out", str(out)])
    assert (out / "summary.json").read_bytes() == before


def test_a_finished_run_with_checkpoints_is_called_finished(tmp_path):
    """Its checkpoints made the check call it unfinished and advise --resume, which then
    said it was finished."""
    from hpctrain import arguments, launch_checks

    out = tmp_path / "run"
    args = ["--algo", "sgd", *SMALL, "--checkpoint-every", "0.5e", "--out", str(out)]
    assert run_job(["train", *args], np=0).returncode == 0
    assert refusal(args) == f"--out {out} already holds a finished run; choose another folder"
    # Resumed, with or without --out (which it named though none was typed), by its folder or
    # its checkpoints': finished, not a folder to change (a new run starts from its model).
    resumed = (f"the run has finished ({out / 'summary.json'}); there is nothing to resume: to "
               f"train on from its model, start a new run with --init-from {out} and another "
               "--out")
    for given in (out, out / "checkpoints"):
        for extra in (["--out", str(out)], []):
            assert refusal([*args[:-2], "--resume", str(given), *extra]) == \
                f"--resume {given}: {resumed}"
    copy = tmp_path / "copy"  # its checkpoint into another folder: a copy of its end
    assert launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(
        ["train", *args[:-2], "--resume", str(out), "--out", str(copy)])), 1).out == str(copy)


def test_a_config_json_whose_out_finished_says_so_not_out(finished_sgd, tmp_path):
    """--config of a finished run's config.json, no --out typed: "--out X already holds a
    finished run" named an option the user never typed; the line says the file named it."""
    from hpctrain import arguments, launch_checks

    args, proc, out = finished_sgd
    assert proc.returncode == 0, proc.stderr
    config = out / "config.json"
    assert refusal(["--config", str(config)]) == (
        f"--config {config}: its out {out} already holds a finished run; give --out another "
        "folder for a new run")
    again = str(tmp_path / "again")  # a repeat, as README says
    assert launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(
        ["train", "--config", str(config), "--out", again])), 1).out == again


def test_a_summary_resume_auto_cannot_read_is_named(finished_sgd, tmp_path):
    """--resume auto returns a finished run's summary instead of training: one it cannot read
    is one line naming the file (it was a JSONDecodeError), before MPI, the folder kept."""
    from hpctrain import arguments, cli, run

    args, _, finished = finished_sgd
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "summary.json").write_text("[]")
    config = arguments.build(cli.build_parser().parse_args(
        [*args, "--out", str(out), "--resume", "auto"]))
    with pytest.raises(UsageError, match=f"{out / 'summary.json'} is not a run's summary: it "
                                         "holds a JSON list"):
        run.train(config)
    assert (out / "summary.json").read_text() == "[]"


def test_a_folder_with_checkpoints_is_resumed_or_left_alone(crashed_ssgd):
    """The crashed run's folder is refused as --out of a new run (the launch's check, in
    process; test_checkpoint_jobs.test_resume_refusals runs it as a real job)."""
    proc, out = crashed_ssgd("mpi")
    assert proc.returncode != 0 and (out / "checkpoints").is_dir()
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept
    message = refusal(["--algo", "ssgd", *SMALL, "--out", str(out)], ranks=2)
    assert message.startswith(f"--out {out} holds the checkpoints of an unfinished run; "
                              f"continue it with --resume {out}")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == kept
    assert not (out / "summary.json").exists()


def test_outputs_follow_the_contract(finished_sgd):
    _, proc, out = finished_sgd
    for name in ("config.json", "metrics.jsonl", "summary.json", "model.pt"):
        assert (out / name).stat().st_mode & 0o777 == 0o640, name
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    for key in ("algo", "workers", "final_test_acc", "best_test_acc", "wall_s", "samples_per_s"):
        assert key in summary
    assert summary["workers"] == 1 and 0.5 < summary["final_test_acc"] <= 1
    assert summary["scoring_s"] > 0  # three snapshots scored after training, not in wall_s
    points = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [p["epoch"] for p in points] == [0.0, 0.5, 1.0]
    assert points[0]["t"] == 0.0 and points[-1]["t"] > 0
    assert all({"t", "epoch", "updates", "test_acc", "test_loss"} <= p.keys() for p in points)
    assert json.loads((out / "config.json").read_text())["algo"] == "sgd"
    assert "final test accuracy" in proc.stdout


def final_model(out) -> dict:
    return torch.load(out / "model.pt", weights_only=True)


def test_same_seed_same_result(finished_sgd, tmp_path):
    args, first, out = finished_sgd
    assert first.returncode == 0, first.stderr
    assert run_job([*args, "--out", str(tmp_path / "again")], np=0).returncode == 0
    a, b = final_model(out), final_model(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)


def equivalence_options(clip: str | None) -> list[str]:
    return [*SMALL, "--momentum", "0.9", "--weight-decay", "1e-4", "--seed", "5",
            *(["--clip-grad-norm", clip] if clip is not None else [])]


# (workers, backend, clip) of each equivalence run. The torch backend runs with clipping:
# clipping is the same code on every backend (after the allreduce), and unclipped steps remain
# to show the reduced gradient itself. The STRAGGLER run's worker 0 is also three times slower
# (it sleeps, which changes no step), for the straggler test.
EQUIVALENCES = [(2, "mpi", None), (4, "mpi", None), (2, "torch", "0.5")]
STRAGGLER = (2, "mpi", None)
STRAGGLER_SLOWDOWN = "0:2+5ms"  # twice as long and 5 ms more: a factor and a fixed delay
# Each of equivalence_runs' launches (sgd's, then one per number of workers) has
# EQUIVALENCE_LAUNCH_S; the module fixture runs inside the first test that asks for it, so its
# tests' own limit is above all of them together (with conftest's 10 s to end a hung one): a
# hung launch fails with its stderr, not with pytest-timeout's stack dump (the global 300 s).
EQUIVALENCE_LAUNCH_S = 200
EQUIVALENCE_TIMEOUT = pytest.mark.timeout(
    (1 + len({workers for workers, _, _ in EQUIVALENCES})) * (EQUIVALENCE_LAUNCH_S + 10) + 60)


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory):
    """{(workers, backend, clip): (sgd's folder, ssgd's folder)}: sgd on one process with batch
    ``16 * workers``, ssgd with batch 16 per worker. Three launches: every sgd run in one
    process, the 2-rank ssgd runs in one, the 4-rank one."""
    root = tmp_path_factory.mktemp("equivalence")
    runs = {key: (root / f"sgd-{i}", root / f"ssgd-{i}") for i, key in enumerate(EQUIVALENCES)}
    sgd = [["train", "--algo", "sgd", *equivalence_options(clip),
            "--batch-size", str(16 * workers), "--out", str(runs[workers, backend, clip][0])]
           for workers, backend, clip in EQUIVALENCES]
    ssgd = {workers: [] for workers, _, _ in EQUIVALENCES}
    for key in EQUIVALENCES:
        workers, backend, clip = key
        slow = ["--slowdown", STRAGGLER_SLOWDOWN] if key == STRAGGLER else []
        ssgd[workers].append(["train", "--algo", "ssgd", *equivalence_options(clip), *slow,
                              "--batch-size", "16", "--sync-backend", backend,
                              "--out", str(runs[key][1])])
    for ranks, commands in {0: sgd, **ssgd}.items():
        proc = run_commands(commands, np=ranks, timeout=EQUIVALENCE_LAUNCH_S)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return runs


@EQUIVALENCE_TIMEOUT
@pytest.mark.parametrize("workers,backend,clip", EQUIVALENCES)
def test_ssgd_matches_sgd_with_k_times_the_batch(equivalence_runs, workers, backend, clip):
    """K workers with batch b take the same steps as one process with batch K*b, with the
    allreduce through MPI or through torch.distributed (gloo); with --clip-grad-norm too, as
    ssgd clips the reduced gradient (clipping each rank's own would change the steps)."""
    sgd, ssgd = equivalence_runs[workers, backend, clip]
    a, b = final_model(sgd), final_model(ssgd)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    curve = [json.loads(x)["test_loss"] for x in (sgd / "metrics.jsonl").open()]
    curve_k = [json.loads(x)["test_loss"] for x in (ssgd / "metrics.jsonl").open()]
    assert curve == pytest.approx(curve_k, rel=1e-4)  # step by step, at every snapshot
    sums = {n: json.loads((d / "summary.json").read_text()) for n, d in (("sgd", sgd),
                                                                         ("ssgd", ssgd))}
    clipped = sums["sgd"]["clipped_steps_per_worker"]
    assert sums["ssgd"]["clipped_steps_per_worker"] == clipped * workers  # the same steps
    if clip is not None:  # clipped some steps, not all
        assert 0 < clipped[0] < sums["sgd"]["updates"]
    # What a rank sent, on ma/ec's scale: a ring's 2(K-1)/K of the float32 gradients (the
    # payload itself, a 4-rank run's 2/3 of this, was counted before).
    params = sum(t.numel() for t in a.values())
    sent = 2 * (workers - 1) * sums["ssgd"]["updates"] * params * 4 // workers
    assert sums["ssgd"]["allreduce_bytes_per_rank"] == sent


@EQUIVALENCE_TIMEOUT
def test_straggler_slows_every_synchronous_worker(equivalence_runs):
    """Worker 0 twice as slow and 5 ms more per step: it sleeps, and the others wait for it
    in the allreduce. The sleeps it asked for (summed in the summary) hold the fixed delay of
    each of its steps, and more (the factor's pad)."""
    out = equivalence_runs[STRAGGLER][1]
    summary = json.loads((out / "summary.json").read_text())
    slept = summary["straggler_sleep_s_per_worker"]
    assert slept[0] > summary["updates"] * 0.005 * (1 - 1e-9) and slept[1] == 0  # worker 0's
    assert json.loads((out / "config.json").read_text())["stragglers"]["slowdown"] == \
        STRAGGLER_SLOWDOWN


# info as `hpctrain info` runs it, then, on rank 0, what hpctrain.devices says of the MPI library
# once MPI runs in the same ranks (before, it says False): what info must have printed.
INFO_THEN_DEVICES = """
import json
from hpctrain import cli, devices
cli.main(["info"])
from mpi4py import MPI
if MPI.COMM_WORLD.Get_rank() == 0:
    print("DEVICES", json.dumps(devices.cuda_aware_mpi()), flush=True)
"""


def test_info_under_mpirun_prints_once(tmp_path):
    proc = run_program([sys.executable, "-c", INFO_THEN_DEVICES], np=2, timeout=60)
    assert proc.returncode == 0, proc.stderr
    info, _, aware = proc.stdout.rpartition("DEVICES ")
    facts = json.loads(info)
    assert facts["ranks"] == 2 and facts["local_size"] == 2
    # What a run's run_info says of its machine, to compare them.
    assert facts.items() >= provenance.machine().items()
    # Where each rank runs, from the launcher that gave its rank: what a wrong binding shows.
    assert facts["launcher"] == "Open MPI"
    assert [(p["rank"], p["local_rank"], p["device"]) for p in facts["placement"]] == \
        [(0, 0, "cpu"), (1, 1, "cpu")]
    assert len({p["host"] for p in facts["placement"]}) == 1
    assert all(1 <= p["cpus"] <= os.cpu_count() for p in facts["placement"])  # its binding
    assert facts["ranks_share_a_gpu"] is False
    assert facts["library"].isprintable()
    # Devices and transports: no GPU here, so neither CUDA-aware MPI nor NCCL is usable.
    assert facts["cuda"] is False and facts["gpus"] == [] and facts["nccl"] is False
    assert facts["gloo"] is True
    # The library's answer (or what HPCTRAIN_CUDA_AWARE_MPI forces, and then that it does).
    assert facts["cuda_aware_mpi"] is json.loads(aware), proc.stdout
    assert facts["cuda_aware_mpi_forced_by"] == cli._cuda_aware_forced_by()
    assert facts["compile"] == (compiled.problem("cpu") or "yes")  # torch 2.1: a reason
    # The help promised kernel availability, and nothing said it.
    assert facts["kernel_cpu"] == "yes"  # built by make setup
    assert facts["kernel_cuda"] == cli._loads(kernels.cuda_library)  # "yes" or why not
    assert facts["kernel_cuda_usable"] is False  # built or not, no GPU here


def test_info_says_whether_the_cuda_kernel_is_usable_apart_from_built():
    """A user trial: info's ``kernel_cuda: "yes"`` beside ``cuda: false`` read as usable; it
    says built (README: "yes", or why not). ``kernel_cuda_usable`` says whether it can run."""
    built = cli._loads(kernels.cuda_library)
    assert cli.kernel_facts(False) == {"kernel_cpu": "yes", "kernel_cuda": built,
                                       "kernel_cuda_usable": False}
    assert cli.kernel_facts(True)["kernel_cuda_usable"] is (built == "yes")


@pytest.mark.timeout(120)
def test_info_keeps_cuda_aware_mpi_a_bool_when_forced():
    """Under HPCTRAIN_CUDA_AWARE_MPI=1 info's ``cuda_aware_mpi`` was the string "yes (forced
    by HPCTRAIN_CUDA_AWARE_MPI=1)": a script testing it ``is True`` broke. It stays the
    bool training acts on; ``cuda_aware_mpi_forced_by`` names the variable."""
    proc = run_job(["info"], np=0, timeout=60, env={"HPCTRAIN_CUDA_AWARE_MPI": "1"})
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["cuda_aware_mpi"] is True
    assert facts["cuda_aware_mpi_forced_by"] == "HPCTRAIN_CUDA_AWARE_MPI=1"


def test_info_refuses_a_misspelt_cuda_aware_override_before_mpi():
    """Read once MPI ran, it was every rank's error (interleaved) and MPI_ABORT's banner;
    train refuses it before MPI starts: rank 0's one line, exit 2."""
    proc = run_job(["info"], np=2, timeout=90, env={"HPCTRAIN_CUDA_AWARE_MPI": "maybe"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert error_lines(proc) == ["hpctrain: error: HPCTRAIN_CUDA_AWARE_MPI must be 1 or 0 "
                                 "(true/false, yes/no, on/off), got 'maybe'"], proc.stderr
    assert "MPI_ABORT" not in proc.stderr and proc.stdout == ""


SIGNALLED_SWEEP = """
import os, sys
from hpctrain.checkpoint import stop
stop.install_for(["train"])  # as python -m hpctrain does, before torch is imported
os.kill(os.getpid(), stop.SIGNAL)  # a time limit's warning during the start-up
from hpctrain import cli
for name in ("first", "second"):
    try:
        cli.main([*sys.argv[2:], "--out", f"{sys.argv[1]}/{name}"])
        print(name, "finished", flush=True)
    except SystemExit as stopped:
        print(name, "exit", stopped.code, flush=True)
"""


@pytest.mark.timeout(120)
def test_a_sigusr1_stops_the_first_run_of_a_script_and_not_the_next(tmp_path):
    """The handler stays installed across cli.main calls: the signal that came during the
    start-up stops the first run at its first checkpoint, and is then forgotten (the next
    run, in another folder, stopped at its first checkpoint too)."""
    script = tmp_path / "sweep.py"
    script.write_text(SIGNALLED_SWEEP)
    proc = run_program([sys.executable, str(script), str(tmp_path), "train", "--algo", "sgd",
                        *SYNTHETIC, "--epochs", "1", "--checkpoint-every", "1e"], timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith(("first", "second"))] \
        == ["first exit 5", "second finished"], proc.stdout


def test_more_threads_than_the_processs_cpus_are_said_before_the_run(tmp_path, capsys):
    """Open MPI binds each of one or two ranks to one core: --threads 2 ran two threads on
    it, no faster than one, and nothing said so (a Slurm job's --cpus-per-task 2 too)."""
    from hpctrain import arguments, launch_checks, launch_env

    def warned(threads: int) -> str:
        args = ["train", "--algo", "sgd", *SYNTHETIC, "--threads", str(threads),
                "--out", str(tmp_path / "run")]
        launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(args)), 1)
        return capsys.readouterr().err

    cpus = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cpus)})
        # bench kernel's --threads 1,2 measured one core twice
        cli.main(["bench", "kernel", "--elements", "1e4", "--repeats", "1", "--threads", "1,2",
                  "--json", str(tmp_path / "k.json")])
        assert "warning: --threads 2, but this process may run on only 1 CPU" in \
            capsys.readouterr().err
        assert warned(2) == ("hpctrain: warning: --threads 2, but this process may run on only "
                             "1 CPU (its affinity: the launcher's binding; Open MPI's mpirun "
                             "binds each of one or two ranks to one core: give it --bind-to "
                             "none or --map-by slot:PE=2; srun: --cpus-per-task=2)\n")
        assert warned(1) == ""
        # said once for the launch, by its rank 0: not by each of an Open MPI job's ranks
        for rank, said in (("1", False), ("0", True)):
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("OMPI_COMM_WORLD_SIZE", "2")
                patch.setenv("OMPI_COMM_WORLD_RANK", rank)
                launch_env.say_threads_beyond_cpus(2)
            assert ("--threads 2, but" in capsys.readouterr().err) == said, rank
    finally:
        os.sched_setaffinity(0, cpus)


def test_readme_lists_every_exit_status_as_the_code_gives_it():
    """README had no table of exit statuses, and a stall's, 3, was given neither at
    --stall-timeout nor with the command line's errors: a job script's author, keying on the
    status, had to find it in the Python API's section. One table lists them all."""
    table = dict(re.findall(r"^\| (\d+) \| (.+) \|$", (ROOT / "README.md").read_text(), re.M))
    assert sorted(map(int, table)) == [0, 1, 2, 3, 4, 5, 130, 137, 143]
    assert "--stall-timeout" in table[str(watchdog.EXIT_STATUS)]
    assert "--stop-on-collapse" in table[str(cli.STOPPED_ON_COLLAPSE)]
    assert "SIGUSR1" in table[str(checkpoint.stop.EXIT_STATUS)]
    assert "bad input" in table["2"] and "interrupted" in table["130"]
    assert "SIGTERM" in table["143"]  # a single process's, which no handler turns into a line
    # A rank killed (the OOM killer): only docs/RELIABILITY.md named mpirun's 137.
    assert "SIGKILL" in table["137"] and "no hpctrain line" in table["137"]


def test_a_summary_the_disk_has_no_room_for_names_stdout(tmp_path, monkeypatch):
    """`hpctrain train > log` with the log's disk full: the run's outputs were written, and
    its last line said "No space left on device" naming nothing."""
    with full_disk(tmp_path / "disk") as disk:
        log = open(disk / "log", "w")  # closed below: its close fails as the print did
        fill(disk)
        monkeypatch.setattr(sys, "stdout", log)
        with pytest.raises(OSError) as e:
            cli.say_out("hpctrain train: finished\n" + "x" * 10_000)
        monkeypatch.setattr(sys, "stdout", sys.__stdout__)
        with contextlib.suppress(OSError):
            log.close()
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, "<stdout>")
