"""Whole jobs interrupted and resumed: the same final model, curve and counts as one that ran
straight through (same seed), for sgd, ssgd (2 and 3 ranks), ma and ec; async runs (not
reproducible by nature) resume where their checkpoint left off and finish."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import (
    SYNTHETIC,
    refusal,
    run_commands,
    run_job,
    run_program,
    start_job,
    warn_after_checkpoint,
)

from hpctrain import checkpoint

SMALL = ["--dataset", "synthetic", "--model", "mlp", "--epochs", "3", "--no-progress",
         "--seed", "7", "--momentum", "0.9", "--eval-every", "0.5"]
LOCAL_NAN = "nan@0:3,nan@1:100"  # the ma/ec drills' NaN gradients, one on each rank


def options(out, algo: str, *extra: str) -> list[str]:
    """``hpctrain train``'s options for ``algo`` on the small set, writing to ``out``."""
    own = {"sgd": [], "ssgd": ["--batch-size", "16"],
           "ma": ["--batch-size", "16", "--tau", "7"],
           "ec": ["--batch-size", "16", "--tau", "7", "--ec-distill-size", "64"]}[algo]
    return ["train", "--algo", algo, *SMALL, *own, "--out", str(out), *extra]


def train(out, algo: str, np: int, *extra: str, env: dict | None = None, timeout: float = 180):
    return run_job(options(out, algo, *extra), np=np, env=env, timeout=timeout)


def resume(out, algo: str, np: int, *extra: str):
    proc = train(out, algo, np, "--resume", str(out), *extra)
    assert proc.returncode == 0, proc.stderr
    return proc


def final_model(out) -> dict:
    return torch.load(out / "model.pt", weights_only=True)


def curve(out) -> list[dict]:
    """metrics.jsonl without the wall times."""
    points = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in p.items() if k != "t"} for p in points]


def assert_same_run(a, b):
    ma, mb = final_model(a), final_model(b)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k  # bit for bit
    assert curve(a) == curve(b)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("updates", "final_test_acc", "final_test_loss", "skipped_steps",
                "bad_gradients_per_worker"):
        assert sa[key] == sb[key], key


# The 2-rank straight runs, (algo, $HPCTRAIN_INJECT) each, all in one launch.
TWO_RANK_STRAIGHT = [("ssgd", None), ("ma", LOCAL_NAN), ("ec", LOCAL_NAN)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """{algo: folder} of the uninterrupted 2-rank runs without checkpoints, one per entry of
    TWO_RANK_STRAIGHT (with its injection), all in one launch."""
    runs = {algo: tmp_path_factory.mktemp(f"{algo}2") / "run" for algo, _ in TWO_RANK_STRAIGHT}
    proc = run_commands([options(out, algo) for algo, out in runs.items()], np=2,
                        injects=[inject for _, inject in TWO_RANK_STRAIGHT])
    assert proc.returncode == 0, proc.stderr
    return runs


@pytest.fixture(scope="module")
def sgd_runs(tmp_path_factory) -> dict:
    """The sgd runs, one process, in one launch: "straight" (uninterrupted, no checkpoints)
    and "killed" (SIGKILLed at update 70, after its epoch-1 and -2 checkpoints; resumed in a
    copy by two tests, refused as it is by another)."""
    root = tmp_path_factory.mktemp("sgd")
    runs = {"straight": root / "straight", "killed": root / "killed"}
    proc = run_commands([options(runs["straight"], "sgd"),
                         options(runs["killed"], "sgd", "--checkpoint-every", "1e")],
                        np=0, injects=[None, "kill@0:70"])
    assert proc.returncode != 0 and (runs["straight"] / "summary.json").exists(), proc.stderr
    return runs


@pytest.mark.timeout(300)
def test_sgd_killed_then_resumed_equals_uninterrupted(tmp_path, sgd_runs):
    out = tmp_path / "run"
    shutil.copytree(sgd_runs["killed"], out)
    assert [p.name for p in checkpoint.listing(out / "checkpoints")] == \
        ["ckpt-000000064.pt", "ckpt-000000032.pt"]
    assert not (out / "summary.json").exists()
    proc = resume(out, "sgd", 0, "--checkpoint-every", "1e")
    assert "resuming from" in proc.stderr and "update 64" in proc.stderr
    assert_same_run(out, sgd_runs["straight"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_updates"] == [64] and summary["checkpoints"] == 3


@pytest.mark.timeout(300)
def test_a_copied_run_resumed_from_its_config_json_finishes_in_the_copy(tmp_path, sgd_runs):
    """``--config COPY/config.json --resume COPY`` took the file's out, the original folder,
    and wrote the copy's model.pt and summary.json there. Its config.json now records the
    resumption: at which update, and what changed (here the folder, and --max-bad-steps)."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    shutil.copytree(sgd_runs["killed"], original)
    shutil.copytree(original, copy)
    before = {p: p.read_bytes() for p in original.rglob("*") if p.is_file()}
    proc = run_job(["train", "--config", str(copy / "config.json"), "--resume", str(copy),
                    "--max-bad-steps", "20"], np=0, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert f"writing the outputs to {copy}, the resumed run's folder" in proc.stdout
    assert {p: p.read_bytes() for p in original.rglob("*") if p.is_file()} == before
    assert_same_run(copy, sgd_runs["straight"])
    info = json.loads((copy / "config.json").read_text())["run_info"]
    killed = str(sgd_runs["killed"])
    [resumed] = info["resumes"]
    assert (resumed["update"], resumed["changed"]) == (64, {
        "--checkpoint-dir": [f"{killed}/checkpoints", f"{copy}/checkpoints"],
        "--max-bad-steps": [10, 20], "--out": [killed, str(copy)]})


@pytest.mark.timeout(300)
def test_a_resumed_runs_tensorboard_has_each_entry_once(tmp_path):
    """The resumed run logged the restored snapshots' scores a second time, left the killed
    run's training entries past the checkpoint beside its own (purged for TensorBoard's
    viewer, still in the killed run's file for readers of one file at a time), stamped its
    entries with wall times in the future (shifted by the seconds trained before) or before
    its start-up (counted from the checkpoint's restore: the first snapshot's score before
    its file existed), wrote its training entries 10 steps from the resume, not where
    the uninterrupted run writes them, and averaged in its first one only the steps since
    the resume (the losses since the last entry are now in the checkpoint). --eval-every 0.6
    (every 19 updates of 96): the mark at 95 is the final snapshot's, in both runs."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out, straight = tmp_path / "run", tmp_path / "straight"
    flags = ("--checkpoint-every", "1e", "--tensorboard", "--eval", "online", "--eval-every",
             "0.6")
    proc = run_commands([options(straight, "sgd", *flags), options(out, "sgd", *flags)], np=0,
                        injects=[None, "kill@0:45"])
    assert proc.returncode != 0 and not (out / "summary.json").exists(), proc.stderr
    resume(out, "sgd", 0, *flags)
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    for tag in ("test/accuracy", "train/loss", "train/samples_per_s"):
        steps = [e.step for e in board.Scalars(tag)]
        assert steps == sorted(set(steps)), (tag, steps)
    assert [e.step for e in board.Scalars("test/accuracy")] == [0, 19, 38, 57, 76, 96]
    assert curve(out) == curve(straight)
    assert max(e.wall_time for e in board.Scalars("train/loss")) <= time.time()
    # Where the uninterrupted run's entries are (counted from the resume at 32: 42, 52, ...)
    assert [e.step for e in board.Scalars("train/loss")] == [10, 20, 30, 40, 50, 60, 70, 80,
                                                             90, 96]
    uninterrupted = EventAccumulator(str(straight / "tensorboard"))
    uninterrupted.Reload()
    for tag in ("train/loss", "test/accuracy"):  # the entry at 40 too: steps 31 to 40
        assert [(e.step, e.value) for e in board.Scalars(tag)] == [
            (e.step, e.value) for e in uninterrupted.Scalars(tag)], tag
    earlier, resumed = sorted((out / "tensorboard").glob("events.*"))
    opened = {}  # each file's entries by tag (as tbparse reads them), and when it was made
    for path in (earlier, resumed):
        events = list(EventFileLoader(str(path)).Load())
        opened[path] = events[0].wall_time
        for tag in ("test/accuracy", "train/loss"):
            steps = [e.step for e in events for v in e.summary.value if v.tag == tag]
            assert steps == sorted(steps) and (path == resumed or max(steps) < 32), steps
        if path == earlier:  # the first snapshot's score, taken at the killed run's start
            assert min(e.wall_time for e in events if e.summary.value) >= opened[earlier]
    trained = [e for e in EventFileLoader(str(resumed)).Load() if e.step > 32 and any(
        v.tag == "train/loss" for v in e.summary.value)]
    assert min(e.wall_time for e in trained) >= opened[resumed]


@pytest.mark.timeout(300)
def test_sigusr1_checkpoints_and_stops_then_resumed_equals_uninterrupted(tmp_path, straight):
    """A time limit's warning (Slurm's --signal, passed on to mpirun) after the first
    checkpoint: every rank takes part in the next update's checkpoint and the job ends with
    status 5 and one line; --resume goes on from it to the uninterrupted run's model."""
    out = tmp_path / "run"
    job = start_job(options(out, "ssgd", "--checkpoint-every", "0.5e"), np=2)
    stderr = warn_after_checkpoint(job, out / "checkpoints")
    assert job.returncode == 5, stderr
    stops = [line for line in stderr.splitlines() if line.startswith("hpctrain: stopped")]
    assert len(stops) == 1, stderr
    updates = int(re.search(r"by SIGUSR1 after the checkpoint of update (\d+) of", stops[0])[1])
    assert stops[0].endswith(f"in {out / 'checkpoints'}; continue with --resume")
    assert checkpoint.listing(out / "checkpoints")[0].name == f"ckpt-{updates:09d}.pt"
    assert not (out / "summary.json").exists()
    proc = resume(out, "ssgd", 2, "--checkpoint-every", "0.5e")
    assert f"update {updates})" in proc.stderr
    assert_same_run(out, straight["ssgd"])


# (entry point, argv, exit status, last line of stderr): a train that cannot start (status 2
# is its refusal, not the signal's death), a comparison that then starts no run (status 5).
EARLY_SIGNAL = [
    ("hpctrain", ["train", "--epochs", "0"], 2,
     "hpctrain: error: argument --epochs: must be > 0, got 0"),
    ("hpctrain.cli", ["bench", "compare", "--algos", "sgd", *SYNTHETIC, "--out", "{out}"], 5,
     "hpctrain bench compare: stopped by SIGUSR1 with sgd left to run; continue with --resume "
     "(--out {out})"),
]


@pytest.mark.parametrize("entry, argv, status, last", EARLY_SIGNAL,
                         ids=["train-python-m-hpctrain", "bench-compare-python-m-hpctrain.cli"])
def test_sigusr1_before_torch_is_imported_is_recorded(tmp_path, entry, argv, status, last):
    """``python -m hpctrain`` (the Slurm scripts' command) and ``python -m hpctrain.cli`` record
    SIGUSR1 for ``train`` and ``bench compare`` before their slow imports, so a time limit's
    warning in a job's first seconds does not end the process (the signal's default action):
    here it comes as torch is first imported."""
    probe = textwrap.dedent("""
        import os, runpy, signal, sys
        class Probe:  # when torch is first imported: is SIGUSR1 recorded already? Send it.
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    print("at torch:", getattr(signal.getsignal(signal.SIGUSR1), "__name__", None))
                    sys.meta_path.remove(self)
                    os.kill(os.getpid(), signal.SIGUSR1)
        sys.meta_path.insert(0, Probe())
        sys.argv = [sys.argv[1], *sys.argv[2:]]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)  # python -m <entry>
    """)
    out = tmp_path / "cmp"
    proc = run_program([sys.executable, "-c", probe, entry,
                        *(a.format(out=out) for a in argv)])
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "at torch: _record\n", proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == last.format(out=out)
    assert not (out / "sgd").exists()


@pytest.mark.parametrize("entry", ["hpctrain", "hpctrain.cli"])
def test_sigusr1_is_ignored_once_the_command_ends(entry):
    """A second warning after a stop reached a rank in MPI_Finalize, after Python had put the
    signal's default action back: the rank died on signal 10 (status 138), which a requeue
    does not take for a stop. The entry points ignore it from the command's end on."""
    probe = textwrap.dedent(f"""
        import runpy, signal, sys
        sys.argv = ["{entry}", "train", "--epochs", "0"]
        try:
            runpy.run_module("{entry}", run_name="__main__", alter_sys=True)
        except BaseException as e:  # its refusal, as it leaves the entry point
            print(type(e).__name__, signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN)
    """)
    proc = run_program([sys.executable, "-c", probe])
    assert proc.stdout == "UsageError True\n", proc.stderr


@pytest.mark.timeout(300)
def test_async_sigusr1_checkpoints_the_claimed_updates_and_stops(tmp_path):
    """SIGUSR1 to an asynchronous run with a dedicated server: rank 0 closes the tickets, every
    worker checkpoints the updates claimed before (not at a mark), the server ends too, status
    5; --resume goes on from that checkpoint and pushes exactly the rest of the budget."""
    out = tmp_path / "run"
    args = ["train", "--algo", "ssp", *SYNTHETIC, "--epochs", "2", "--batch-size", "32",
            "--momentum", "0.5", "--servers", "1", "--max-staleness", "2",
            "--checkpoint-every", "0.5e", "--out", str(out)]
    job = start_job(args, np=3)
    stderr = warn_after_checkpoint(job, out / "checkpoints")
    assert job.returncode == 5, stderr
    stops = [line for line in stderr.splitlines() if line.startswith("hpctrain: stopped")]
    assert len(stops) == 1, stderr
    updates = int(re.search(r"after the checkpoint of update (\d+) of 128 in", stops[0])[1])
    header = checkpoint.read_header(checkpoint.listing(out / "checkpoints")[0])
    assert header["updates"] == updates and 32 <= updates < 128
    proc = run_job([*args, "--resume", str(out)], np=3, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_updates"] == [updates]
    assert summary["staleness"]["count"] == sum(summary["pushes_per_worker"]) \
        == summary["updates"] == 128  # every push of both parts, none past the budget
    assert summary["ssp_max_gap"] <= 2


@pytest.mark.timeout(300)
def test_ssgd_3_raise_after_checkpoint_then_resume(tmp_path):
    """More than 2 ranks, shards of uneven steps (682 samples a rank: 43 steps an epoch, the
    last of 10). An exception on one rank (abort path) after the epoch-1 checkpoint; NaN
    gradients on another rank before it: the skipped step and its count survive the resume."""
    out, uninterrupted = tmp_path / "run", tmp_path / "straight"
    nan = "nan@1:5"
    # One launch: the uninterrupted run, then the one that fails.
    proc = run_commands([options(uninterrupted, "ssgd"),
                         options(out, "ssgd", "--checkpoint-every", "1e")],
                        np=3, injects=[nan, f"{nan},raise@2:50"])
    assert proc.returncode != 0 and (uninterrupted / "summary.json").exists()
    assert "hpctrain: error (rank 2 of 3): RuntimeError: injected fault at step 50" in proc.stderr
    assert checkpoint.read_header(checkpoint.listing(out / "checkpoints")[0])["updates"] == 43
    resume(out, "ssgd", 3, "--checkpoint-every", "1e")
    assert_same_run(out, uninterrupted)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["bad_gradients_per_worker"] == [0, 1, 0]


@pytest.mark.timeout(300)
def test_ssgd_2_killed_writing_then_by_the_clock_then_corrupt_newest(tmp_path, straight):
    """Rank 0 SIGKILLed halfway through writing the epoch-2 checkpoint: the epoch-1 one is
    intact. Resumed with checkpoints every 0.1 s (rank 0's clock decides for all) and rank 1
    SIGKILLed. The newest checkpoint is then damaged on disk: the last resume reports it in
    one line, falls back to the one before, and ends at the uninterrupted run's model."""
    out = tmp_path / "run"
    folder = out / "checkpoints"
    proc = train(out, "ssgd", 2, "--checkpoint-every", "1e",
                 env={"HPCTRAIN_INJECT": "killckpt@0:128"})
    assert proc.returncode != 0
    assert [p.name for p in checkpoint.listing(folder)] == ["ckpt-000000064.pt"]
    assert list(folder.glob(".ckpt-000000128.pt.*.tmp"))  # the torn write, never renamed

    every = ["--checkpoint-every", "0.1"]
    proc = train(out, "ssgd", 2, "--resume", str(out), *every,
                 env={"HPCTRAIN_INJECT": "kill@1:185"})
    assert proc.returncode != 0
    assert "rank 1" in proc.stderr and "signal 9" in proc.stderr
    newest, before = checkpoint.listing(folder)  # the newest two are kept
    updates = [checkpoint.read_header(p)["updates"] for p in (newest, before)]
    # 121 steps since update 64 take longer than 0.1 s: one checkpoint by the clock at least.
    assert 64 <= updates[1] < updates[0] <= 185 and not list(folder.glob("*.tmp"))
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    newest.write_bytes(bytes(blob))

    proc = resume(out, "ssgd", 2, *every)
    reports = [line for line in proc.stderr.splitlines() if "unusable" in line]
    assert len(reports) == 1 and newest.name in reports[0] and "checksum" in reports[0]
    assert f"update {updates[1]})" in proc.stderr
    assert_same_run(out, straight["ssgd"])
    summary = json.loads((out / "summary.json").read_text())
    # The resumptions of the checkpoint it went on from: the second attempt's, unless that
    # attempt's one checkpoint by the clock was the damaged one and it fell back to the first's.
    assert summary["resumed_from_updates"] == [64] + ([updates[1]] if updates[1] > 64 else [])


@pytest.fixture(scope="module")
def local_sgd_resumed(tmp_path_factory) -> dict:
    """{algo: (folder, the killed launch)} for ma and ec: each SIGKILLed on rank 1 at update
    150 (after its checkpoint of update 128), then both resumed in one launch."""
    runs = {}
    for algo in ("ma", "ec"):
        out = tmp_path_factory.mktemp(f"{algo}-killed") / "run"
        runs[algo] = out, train(out, algo, 2, "--checkpoint-every", "1e",
                                env={"HPCTRAIN_INJECT": f"{LOCAL_NAN},kill@1:150"})
    proc = run_commands([options(out, algo, "--checkpoint-every", "1e", "--resume", str(out))
                         for algo, (out, _) in runs.items()], np=2)
    assert proc.returncode == 0, proc.stderr
    return runs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("algo", ["ma", "ec"])
def test_local_sgd_killed_then_resumed_equals_uninterrupted(local_sgd_resumed, straight, algo):
    """Every rank's own model, momentum, round state, NaN counts and snapshots come back."""
    out, killed = local_sgd_resumed[algo]
    assert killed.returncode != 0
    assert_same_run(out, straight[algo])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 2 and summary["bad_gradients_per_worker"] == [1, 1]
    assert summary["resumed_from_updates"] == [128]  # its newest checkpoint when killed


@pytest.mark.timeout(300)
def test_async_worker_killed_then_resumed(tmp_path):
    """dcasgd-a with a dedicated server: a worker SIGKILLed mid-run ends the job; resuming
    continues from the last progress checkpoint (global model, update count, each worker's
    mean squares, momentum, position and staleness record) and finishes the budget."""
    out = tmp_path / "run"
    args = ["train", "--algo", "dcasgd-a", "--dataset", "synthetic", "--model", "mlp",
            "--epochs", "3", "--no-progress", "--batch-size", "32", "--momentum", "0.5",
            "--servers", "1", "--checkpoint-every", "0.5e", "--out", str(out)]
    # Worker 1's 40th step comes after the mark at update 32 (it took part in that
    # checkpoint) and before the budget of 192 unless it made under a fifth of the pushes.
    proc = run_job(args, np=3, timeout=120, env={"HPCTRAIN_INJECT": "nan@0:3,kill@1:40"})
    assert proc.returncode != 0
    assert "process rank 1 with PID" in proc.stderr and "signal 9" in proc.stderr
    header = checkpoint.read_header(checkpoint.listing(out / "checkpoints")[0])
    assert 32 <= header["updates"] < 192 and header["ranks"] == 3 and header["workers"] == 2
    payload = checkpoint.load(checkpoint.listing(out / "checkpoints")[0])[1]
    assert [r["opt"]["worker"]["ms"].numel() > 0 for r in payload["ranks"]] == [True, True]
    # Worker 0's NaN at its step 3: in the checkpoint unless a loaded machine held worker 0
    # back past update 32 (asynchronous: worker 1 may make most of them; seen once in CI).
    kept = [r["guard"]["bad_here"] for r in payload["ranks"]]
    assert kept in ([1, 0], [0, 0])
    assert all(r["opt"]["worker"]["v"] is not None for r in payload["ranks"])
    proc = run_job([*args, "--resume", str(out)], np=3, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_updates"] == [header["updates"]]
    assert summary["updates"] >= 192 and summary["final_test_acc"] > 0.5
    assert summary["bad_gradients_per_worker"] == kept  # counted before the kill, kept
    # Every push of the whole run is in the staleness record, across the restart.
    assert summary["staleness"]["count"] == sum(summary["pushes_per_worker"]) \
        == summary["updates"] == 192  # the NaN step pushed nothing; no update past the budget
    points = curve(out)
    assert [p["updates"] for p in points] == sorted(p["updates"] for p in points)
    assert points[0]["updates"] == 0 and points[-1]["updates"] == summary["updates"]
    # The mark at the checkpoint (--eval-every 0.25: every 16 updates) has its point, taken
    # before the checkpoint or at rank 0's first step after the resume: where rank 0 had not
    # reached it when the others' pushes made the checkpoint, it was lost without a word.
    mark = header["updates"]
    assert any(mark <= p["updates"] < mark + 16 for p in points) or \
        "marks passed" in proc.stderr, ([p["updates"] for p in points], proc.stderr)
    assert all(torch.isfinite(v).all() for v in final_model(out).values())


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("hpctrain")]


def mount_tmpfs(folder, kib: int, remount: bool = False) -> bool:
    """A file system of ``kib`` KiB at ``folder`` (a tmpfs: root only), or a new size for it."""
    options = ("remount," if remount else "") + f"size={kib}k"
    return os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True).returncode == 0


@pytest.mark.timeout(300)
def test_disk_full_then_resumed_with_room_equals_uninterrupted(tmp_path, sgd_runs):
    """The killed run resumed on a disk with 64 KiB to spare: the first output it writes fills
    the disk, the job ends with one line naming that file, and nothing it had is lost; with
    room again it resumes from the same checkpoint and ends as if never interrupted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    killed = sgd_runs["killed"]
    files = [p for p in killed.rglob("*") if p.is_file()]
    pages = sum(-(-p.stat().st_size // 4096) for p in files)
    if not mount_tmpfs(disk, 4 * pages + 64):
        pytest.skip("cannot mount a small tmpfs (needs root) to fill up")
    try:
        out = disk / "run"
        shutil.copytree(killed, out)
        # All but config.json, which each attempt writes anew (with its own options)
        kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".json"}
        proc = train(out, "sgd", 0, "--checkpoint-every", "1e", "--resume", str(out))
        assert proc.returncode == 1, proc.stderr
        errors = [line for line in error_lines(proc) if line.startswith("hpctrain: error")]
        assert len(errors) == 1 and "No space left on device: '" + str(out) in errors[0], \
            proc.stderr
        assert [p.name for p, b in kept.items() if p.read_bytes() != b] == []
        assert not [p for p in out.rglob("*.tmp")]
        assert mount_tmpfs(disk, 64 * 1024, remount=True)
        resume(out, "sgd", 0, "--checkpoint-every", "1e")
        assert_same_run(out, sgd_runs["straight"])
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.timeout(180)
def test_a_resume_that_would_write_in_a_read_only_folder_is_refused_before_mpi(tmp_path,
                                                                              sgd_runs):
    """--resume of a run on a read-only file system (an archive, a snapshot): it started, then
    ended at its first write with exit 1 naming a temporary file; given another --out, it
    trained, then died writing a checkpoint in the folder resumed from. The folders a resume
    writes in without their flags are checked before MPI starts, as --out's is."""
    from hpctrain import arguments, cli, launch_checks

    disk = tmp_path / "disk"
    disk.mkdir()
    if not mount_tmpfs(disk, 16 * 1024):
        pytest.skip("cannot mount a tmpfs (needs root) to make read-only")
    try:
        old = disk / "run"
        shutil.copytree(sgd_runs["killed"], old)
        assert subprocess.run(["mount", "-o", "remount,ro", str(disk)]).returncode == 0
        flags = ["--algo", "sgd", *SMALL, "--resume", str(old)]
        ro = "(Read-only file system)"
        assert refusal(flags) == (
            f"--resume {old}: the run's folder {old}, written to without --out: cannot create "
            f"a folder in {old} {ro}; give --out a folder for this attempt's outputs")
        new = tmp_path / "new"
        assert refusal([*flags, "--out", str(new)]) == (
            f"--resume {old}: its checkpoint folder {old / 'checkpoints'}, written to without "
            f"--checkpoint-dir: cannot create a folder in {old / 'checkpoints'} {ro}; give "
            "--checkpoint-dir a folder for the new checkpoints, or --checkpoint-every off")
        for more in (["--checkpoint-dir", str(tmp_path / "ck")], ["--checkpoint-every", "off"]):
            config = launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(
                ["train", *flags, "--out", str(new), *more])), 1)
            assert config.checkpoint.resume == str(old / "checkpoints")
        proc = run_job(["train", *flags], np=0, timeout=120)  # a job: one line, exit 2
        assert proc.returncode == 2, proc.stderr
        assert [line.startswith(f"hpctrain: error: --resume {old}: the run's folder")
                for line in error_lines(proc)] == [True], proc.stderr
        assert not new.exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)

@pytest.mark.timeout(120)
@pytest.mark.parametrize("resumed", [True, False])
def test_a_checkpoint_folder_another_run_writes_is_refused_through_any_flag(tmp_path, sgd_runs,
                                                                          resumed):
    """Run A locked only its --out. B, resuming A's checkpoints into another --out, or
    naming A's <out>/checkpoints as its --checkpoint-dir before A wrote one, locked that
    folder's own lock file, and both wrote there: B's rotation removed A's checkpoints, and
    A's --resume auto would have found B's. A's lock is taken here as its run takes it."""
    from hpctrain import arguments, cli, launch_checks, run_folders

    a, b = tmp_path / "a", tmp_path / "b"
    if resumed:
        shutil.copytree(sgd_runs["killed"], a)
    flags = ["--checkpoint-every", "1e"]
    config = launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(
        options(a, "sgd", *flags, "--resume", "auto"))), 1)
    with run_folders.claimed(config):  # A, going on
        proc = train(b, "sgd", 0, *flags, *(["--resume", str(a)] if resumed else
                                            ["--checkpoint-dir", str(a / "checkpoints")]))
    folder = a / "checkpoints"
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc) == [
        f"hpctrain: error: the checkpoint folder {folder} is in use by another run going on now "
        f"(it holds {folder / run_folders.LOCK}); wait for it to end or choose another folder"]
    assert not b.exists()


@pytest.mark.timeout(120)
def test_resume_refusals(tmp_path, sgd_runs):
    """Against the killed sgd run's folder (3 epochs, --checkpoint-every 1e), left as it is."""
    out = sgd_runs["killed"]
    assert checkpoint.listing(out / "checkpoints")
    unfinished = "holds the checkpoints of an unfinished run; continue it with --resume"
    cases = [
        (["--resume", str(tmp_path / "nothing")], "no such folder"),
        (["--resume", str(tmp_path)], "no checkpoint found there"),
        (["--resume", str(out), "--lr", "0.1"], "the run was started with --lr 0.05, not 0.1"),
        ([], unfinished),
        (["--checkpoint-dir", str(out / "checkpoints"), "--out", str(tmp_path / "b")],
         "holds another run's checkpoints"),
        (["--checkpoint-every", "0"], "--checkpoint-every: must be a finite number > 0, got 0"),
        (["--checkpoint-every", "ten"], "neither seconds (600) nor epochs (2e)"),
        (["--max-bad-steps", "0"], "--max-bad-steps: must be > 0, got 0"),
        (["--algo", "asgd", "--checkpoint-every", "60", "--out", str(tmp_path / "a")],
         "asynchronous runs checkpoint by global progress"),
    ]
    for extra, pattern in cases:  # the checks a job runs before MPI starts, in process
        assert pattern in refusal(["--algo", "sgd", *SMALL, "--out", str(out),
                                   "--checkpoint-every", "1e", *extra]), extra
    # One as a real job: one line, exit status 2, the unfinished run's folder untouched.
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    proc = train(out, "sgd", 0, "--checkpoint-every", "1e")
    assert proc.returncode == 2, proc.stderr
    assert [unfinished in line for line in error_lines(proc)] == [True], proc.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    assert not (out / "summary.json").exists()


@pytest.mark.timeout(300)
def test_a_run_resumes_with_its_data_placed_otherwise(tmp_path, straight):
    """Placement changes no result (sharded trains the model replicated does, bit for bit),
    so a requeued job may switch it (its data no longer fits on every rank, or now does);
    --resume refused the change."""
    out = tmp_path / "run"
    proc = run_commands([options(out, "ssgd", "--data-placement", "sharded",
                                 "--checkpoint-every", "0.5e")], np=2, injects=["raise@0:100"])
    assert proc.returncode != 0 and not (out / "summary.json").exists(), proc.stderr
    resume(out, "ssgd", 2)  # replicated: the default
    assert json.loads((out / "config.json").read_text())["data"]["data_placement"] == \
        "replicated"
    assert_same_run(out, straight["ssgd"])
