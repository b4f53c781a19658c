"""The stall watchdog: a rank that stops making progress ends the job in bounded time."""

import json
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_commands, run_job, run_program
from test_collapse import watch_of

from hpctrain import compiled, data, live, models, watchdog
from hpctrain.evaluate import Snapshots

SMALL = ["--dataset", "synthetic", "--model", "mlp", "--epochs", "1", "--no-progress",
         "--seed", "3", "--batch-size", "16"]


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_program([sys.executable, "-c", code], timeout=timeout)


@pytest.mark.timeout(60)
def test_no_beat_ends_the_process_with_one_line():
    proc = run_python("import time\nfrom hpctrain import watchdog\n"
                      "watchdog.start(1.0, rank=5)\nwatchdog.beat('step', 7)\ntime.sleep(30)")
    assert proc.returncode == watchdog.EXIT_STATUS  # the sleep would have ended with 0
    assert proc.stderr.strip().startswith("hpctrain: rank 5 made no progress for 1 s (last: "
                                          "step 7); ending the job (--stall-timeout 1)"), \
        proc.stderr


@pytest.mark.timeout(60)
def test_a_ranks_line_says_that_a_frozen_rank_says_nothing():
    """A rank frozen whole (SIGSTOP) printed nothing, and the one line, a waiting rank's,
    read as if that rank had stalled: an engineer went to the wrong node."""
    proc = run_python("import time\nfrom hpctrain import watchdog\n"
                      "watchdog.start(1.0, rank=0, ranks=2)\nwatchdog.beat('update', 136)\n"
                      "time.sleep(30)")
    assert proc.returncode == watchdog.EXIT_STATUS
    assert proc.stderr.strip() == (
        "hpctrain: rank 0 made no progress for 1 s (last: update 136); ending the job "
        "(--stall-timeout 1); ranks waiting for a stalled one may say this too, and one "
        "frozen whole (its watchdog with it) says nothing"), proc.stderr


# Rank 2 of a job: its last beat, then a wait on the test (stdin) for its next step.
WAITS_FOR_A_STEP = """
import sys
from hpctrain import watchdog
watchdog.start(3.0, rank=2, ranks=3)
watchdog.beat("update", 30)
print("ready", flush=True)
sys.stdin.readline()
watchdog.beat("update", 31)
watchdog.stop()
print("done")
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("then", ["step", "sigterm", "nothing"])
def test_a_stopped_rank_does_not_blame_itself(then):
    """A rank stopped (SIGSTOP) for longer than the timeout woke with its time past the limit
    and said it made no progress: under mpirun, whose SIGCONT comes before its SIGTERM, the
    frozen rank printed the line the docs say it lacks, and a run stopped by Ctrl-Z was ended
    at fg. Now the stop restarts the clock: continued, the run goes on ("step"); ended, it
    says nothing ("sigterm"); a rank still stuck after it is ended a timeout later."""
    child = subprocess.Popen([sys.executable, "-c", WAITS_FOR_A_STEP], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT)
    try:
        assert child.stdout.readline() == "ready\n", child.stderr.read()
        child.send_signal(signal.SIGSTOP)
        time.sleep(5)  # past the timeout (3 s): awake, its watchdog looks at once
        child.send_signal(signal.SIGCONT)
        time.sleep(0.5)  # as mpirun's SIGTERM can come: a look (0.3 s) sooner
        if then == "step":
            child.stdin.write("go\n")
            child.stdin.flush()
        elif then == "sigterm":
            child.send_signal(signal.SIGTERM)
        status = child.wait(timeout=30)
        said = child.stderr.read()
    finally:
        child.kill()
    if then == "step":
        assert (status, child.stdout.read(), said) == (0, "done\n", "")
    elif then == "sigterm":
        assert (status, said) == (-signal.SIGTERM, "")
    else:
        assert status == watchdog.EXIT_STATUS
        assert said.startswith("hpctrain: rank 2 made no progress for 3 s (last: update 30)"), \
            said


@pytest.mark.timeout(60)
def test_an_epochs_data_exchange_has_the_busy_allowance():
    """Sharded placement moves a shard between epochs (3.8 s a reshuffle of 200 MB on 4
    ranks here, minutes for tens of GB): --stall-timeout 2 ended a healthy job there."""
    proc = run_python("import time\nfrom hpctrain import run, watchdog\n"
                      "class SlowExchange:\n    def epoch(self, e):\n"
                      "        time.sleep(3)\n        return e\n"
                      "watchdog.start(1.0, rank=0)\nwatchdog.beat('step', 7)\n"
                      "print(run._epoch_data(SlowExchange(), 1))\n"
                      "time.sleep(0.5)\nwatchdog.stop()")  # the timeout held again after it
    assert (proc.returncode, proc.stdout) == (0, "1\n"), proc.stderr


@pytest.mark.timeout(60)
def test_beats_keep_it_quiet_and_stop_ends_watching():
    proc = run_python("import time\nfrom hpctrain import watchdog\n"
                      "watchdog.start(1.0, rank=0)\n"
                      "for i in range(15):\n    watchdog.beat('step', i); time.sleep(0.2)\n"
                      "watchdog.stop()\ntime.sleep(2)\nprint('done')")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "done\n", "")


@pytest.mark.timeout(60)
def test_start_up_is_not_held_to_a_short_timeout():
    """Nor is what happens before the first step (a resumed run's snapshots scored): the clock
    restarts at each, the start-up's allowance holds."""
    proc = run_python("import time\nfrom hpctrain import watchdog\n"
                      "watchdog.start(0.5, rank=2)\n"
                      "watchdog.beat('scoring restored snapshot', 3, starting=True)\n"
                      "time.sleep(2)\nprint('started')\n"
                      "watchdog.beat('update', 1)\ntime.sleep(30)")
    assert proc.stdout == "started\n" and proc.returncode == watchdog.EXIT_STATUS
    assert "rank 2 made no progress for 0.5 s (last: update 1)" in proc.stderr


@pytest.mark.timeout(60)
def test_work_that_cannot_beat_is_held_to_the_busy_allowance():
    """A checkpoint's or the outputs' write of a large model takes longer than a short
    timeout: inside busy() the rank has BUSY_S; after it, the timeout again."""
    proc = run_python("import time\nfrom hpctrain import watchdog\n"
                      "watchdog.start(0.5, rank=1)\nwatchdog.beat('update', 9)\n"
                      "with watchdog.busy('writing checkpoint', 10):\n    time.sleep(2)\n"
                      "print('written')\ntime.sleep(30)")
    assert proc.stdout == "written\n" and proc.returncode == watchdog.EXIT_STATUS
    assert "rank 1 made no progress for 0.5 s (last: writing checkpoint 10)" in proc.stderr


@pytest.mark.timeout(60)
def test_a_hung_write_still_ends_the_job():
    proc = run_python("import time\nfrom hpctrain import watchdog\nwatchdog.BUSY_S = 1.0\n"
                      "watchdog.start(0.2, rank=0)\nwatchdog.beat('update', 9)\n"
                      "with watchdog.busy('writing outputs'):\n    time.sleep(30)")
    assert proc.returncode == watchdog.EXIT_STATUS
    assert "made no progress for 1 s (last: writing outputs)" in proc.stderr


def test_zero_timeout_watches_nothing():
    watchdog.start(0, rank=0)
    watchdog.beat("step", 1)  # a no-op when not watching
    assert watchdog._active is None


@pytest.mark.timeout(60)
def test_a_rank_waiting_for_the_others_lets_the_stalled_one_speak_first(monkeypatch):
    """Ranks 0 and 1 beat last at once; rank 1 stalls in its compute, rank 0 waits for it in
    the step's update. Both watchdogs fired within a poll, and rank 0's line (the one mpirun
    let through, on 3 and 4 ranks mostly) sent the engineer to an innocent node. Now rank 0
    fires only after a grace, saying what it waited in."""
    said: list[str] = []
    monkeypatch.setattr(watchdog, "say", said.append)
    released = threading.Event()
    monkeypatch.setattr(watchdog, "end_job", released.wait)  # holds the thread, as exit would

    watchdog.start(1.0, rank=0, ranks=2)
    waiting, stalled = watchdog._active, watchdog._Watchdog(1.0, rank=1, ranks=2)
    try:
        with watchdog.waiting_for_others("the step's update"):
            watchdog.beat("update", 6)
            stalled.last, stalled.doing, stalled.count = waiting.last, "update", 6
            stalled.limit = stalled.timeout
            while len(said) < 2:
                time.sleep(0.01)
        assert waiting.waiting is None  # the wait's end clears the mark
    finally:
        waiting._stop.set()
        stalled._stop.set()
        released.set()
        watchdog.stop()
        stalled.stop()
    assert said[0] == ("hpctrain: rank 1 made no progress for 1 s (last: update 6); ending the "
                       "job (--stall-timeout 1); ranks waiting for a stalled one may say this "
                       "too, and one frozen whole (its watchdog with it) says nothing")
    assert said[1] == ("hpctrain: rank 0 made no progress for 1.5 s (last: update 6); ending "
                       "the job (--stall-timeout 1); waiting for the other ranks in the step's "
                       "update: a rank stalled outside such a wait had 0.5 s more to speak "
                       "first; one frozen whole (its watchdog with it) says nothing")


def test_the_grace_is_half_the_timeout_at_most_a_minute():
    assert (watchdog.grace(1), watchdog.grace(8), watchdog.grace(600)) == (0.5, 4, 60)


class _BarrierDoneAtOnce:
    """A communicator whose non-blocking barrier is complete at the first look, as a rank's
    is when rank 0 was done (and the others there) before it came."""

    class Done:
        def Test(self) -> bool:
            return True

    def Ibarrier(self):
        return self.Done()


def test_a_wait_over_at_its_first_look_still_beats():
    """wait_beating beat only while its barrier was incomplete: a rank that came after rank
    0's write recorded no wait, and held what the step before it left (MPI phase:
    tests/test_checkpoint.py, ranks waiting for rank 0's checkpoint beat)."""
    watchdog.start(60, rank=1, ranks=2)
    try:
        watchdog.beat("compiling for a batch of", 8, compiling=True)
        watchdog.wait_beating(_BarrierDoneAtOnce(), "waiting for rank 0's checkpoint", 10,
                              bounded=True)
        active = watchdog._active
        assert (active.doing, active.count, active.limit) == (
            "waiting for rank 0's checkpoint", 10, 60)
    finally:
        watchdog.stop()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algo", ["ssgd", "dcasgd-a", "ssp"])
def test_a_hung_rank_ends_the_job(tmp_path, algo):
    """Rank 1 hangs (alive, silent) after its 6th update: without the watchdog the other rank
    would wait in its next collective (ssgd) or the final barrier (async) forever.

    ssgd's rank 0 stops beating at the same update, waiting for rank 1 in the step's
    allreduce: its watchdog fired within a poll of rank 1's, and the first line (or the
    only one) often named rank 0, an innocent node. Now the wait gives rank 1 a grace to
    speak first. dcasgd-a's rank 0 keeps stepping, to the budget's end, then waits for rank
    1's push in the end's agreement, which has the grace too (1 in 3 first lines were its).
    ssp's rank 0 runs S clocks ahead, then waits for rank 1 in the staleness bound, its
    last beat a few ms after rank 1's: that wait has the grace too."""
    proc = run_job(["train", "--algo", algo, *SMALL, "--stall-timeout", "8", "--out",
                    str(tmp_path)], np=2, timeout=100, env={"HPCTRAIN_INJECT": "hang@1:6"})
    assert proc.returncode != 0
    # (ssp's rank 1 may have waited for rank 0 in the staleness bound after its 6th update)
    assert re.search(r"hpctrain: rank 1 made no progress for 8 s \(last: (update|ssp wait) 6\); "
                     r"ending the job", proc.stderr), proc.stderr
    assert re.findall(r"hpctrain: rank (\d+) made no progress", proc.stderr)[0] == "1", \
        proc.stderr
    assert not (tmp_path / "summary.json").exists()


SLOW_TO_SCORE = """
import os
import time
import torch
from torch import nn

class SlowToScore(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        n = 1
        for d in input_shape:
            n *= d
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(n, num_classes))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x):  # slow to score once trained: not in the checks before MPI
        if self.training:
            self.steps += 1
        elif self.steps > 0:
            time.sleep(float(os.environ["SCORE_PAUSE"]))
        return self.net(x)
"""

# conftest.run_commands' way (hpctrain commands in turn, one launch), with each command's
# pause to score a snapshot and the watchdog's start-up allowance.
COMMANDS = """
import json, os, sys
from hpctrain import cli, watchdog
for argv, pause, start_up in json.loads(sys.argv[1]):
    os.environ["SCORE_PAUSE"] = str(pause)
    watchdog.STARTUP_S = start_up
    cli.main(argv)
"""


@pytest.fixture(scope="module")
def slow_to_score(tmp_path_factory) -> tuple[dict, subprocess.CompletedProcess]:
    """Runs on 3 ranks, --stall-timeout 2, whose snapshots take 0.25-0.5 s a forward to score,
    in one launch: ({name: folder}, the launch's process). "ma-eval-rank": ma, rank 0's member
    scored online by rank 2 (a backlog of seconds at the end), the members' curve scored
    after training; "resumed": ssgd resumed at update 32 of 43 (from "checkpointed"), its 6
    trained snapshots scored online before the first step, with 2 s for the start-up."""
    root = tmp_path_factory.mktemp("slow")
    (root / "slow.py").write_text(SLOW_TO_SCORE)
    folders = {name: root / name for name in ("ma-eval-rank", "checkpointed", "resumed")}

    def train(name: str, algo: str, *flags: str) -> list[str]:
        return ["train", "--algo", algo, *SMALL, "--model", f"{root / 'slow.py'}:SlowToScore",
                "--eval-every", "0.125", "--stall-timeout", "2", *flags,
                "--out", str(folders[name])]

    runs = [(train("ma-eval-rank", "ma", "--eval", "online", "--eval-rank", "2"), 0.25,
             watchdog.STARTUP_S),
            (train("checkpointed", "ssgd", "--checkpoint-every", "0.75e"), 0,
             watchdog.STARTUP_S),
            (train("resumed", "ssgd", "--eval", "online", "--resume",
                   str(folders["checkpointed"] / "checkpoints")), 0.5, 2.0)]
    proc = run_program([sys.executable, "-c", COMMANDS, json.dumps(runs)], np=3, timeout=200)
    return folders, proc


@pytest.mark.timeout(240)
@pytest.mark.parametrize("run", ["ma-eval-rank", "resumed"])
def test_waiting_for_rank_0_is_progress(slow_to_score, run):
    """A healthy job was ended as stalled where a rank waited without beating: while ma's
    (and ec's) curve was scored after training, the trainers (they did not beat) and the
    evaluating rank (released before it, it waited for rank 0's result); the trainers while
    rank 0 took the evaluating rank's backlog; every rank while a resumed run's snapshots
    were scored before its first step (in a long run, longer than the start-up's 600 s)."""
    folders, proc = slow_to_score
    assert (folders[run] / "summary.json").exists(), proc.stderr[-3000:]
    assert "made no progress" not in proc.stderr


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_rank_0_keeps_no_copy_of_a_snapshot_once_it_is_scored(tmp_path):
    """With --eval-rank, rank 0 held each snapshot's pickled copy (its send's buffer) until
    the run ended: the model's size for every snapshot, gigabytes in a long run."""
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    world = MPI.COMM_WORLD.Split(0 if rank < 2 else MPI.UNDEFINED, rank)
    if world == MPI.COMM_NULL:
        return
    model = models.build("mlp", data.SYNTHETIC_SHAPE, 10)
    if rank == 1:
        live.serve(world, model, data.load("synthetic", "test"))
        world.Free()
        return
    watch = watch_of(tmp_path, world=world, eval_mode="online", eval_rank=1)
    snapshots = Snapshots()
    size = len(pickle.dumps(model.state_dict()))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(8):
            snapshots.take(model, t=0.0, epoch=0.0, updates=i)
            watch.snapshot(model, snapshots)
            while i not in watch.scores:  # rank 0 picks the score up between its steps
                watch.step(i, i, torch.tensor(1.0), 0.05, 0.0)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        watch.curve(model, snapshots, None)  # the evaluating rank's last message
        world.Free()
    assert held < size / 2, (held, size)


@pytest.mark.timeout(60)
def test_a_compile_is_held_to_the_busy_allowance():
    proc = run_python("import time\nfrom hpctrain import watchdog\n"
                      "watchdog.start(0.5, rank=0)\nwatchdog.beat('update', 3)\n"
                      "watchdog.beat('compiling for a batch of', 8, compiling=True)\n"
                      "time.sleep(2)\nprint('compiled')\n"
                      "watchdog.beat('update', 4)\ntime.sleep(30)")
    assert proc.stdout == "compiled\n" and proc.returncode == watchdog.EXIT_STATUS
    assert "rank 0 made no progress for 0.5 s (last: update 4)" in proc.stderr


@pytest.mark.timeout(60)
def test_a_round_after_a_compile_has_the_busy_allowance():
    """ma's and ec's rounds wait for every rank: with --compile, a rank still compiling a
    size met since the last round (the first step's, the first with relabelled samples) had
    the others ended in the round's collectives. A round after no new size has the timeout."""
    proc = run_python(
        "import time\nfrom mpi4py import MPI\nfrom torch import nn\n"
        "from hpctrain import compiled, watchdog\n"
        "from hpctrain.ec.averaging import ModelAveraging\n"
        "model = nn.Linear(4, 2)\ncompiled.apply(True, model)\n"
        "rounds = ModelAveraging(model, MPI.COMM_SELF, tau=1)\n"
        "watchdog.start(0.5, rank=0)\ncompiled.first_call(model, 'train', 8)\n"
        "watchdog.beat('update', 1)\nrounds.after_step()\n"
        "time.sleep(2)\nprint('averaged')\n"  # as if another rank's compile held the round
        "watchdog.beat('update', 2)\nrounds.after_step()\ntime.sleep(30)")
    assert proc.stdout == "averaged\n" and proc.returncode == watchdog.EXIT_STATUS, proc.stderr
    assert "rank 0 made no progress for 0.5 s (last: update 2)" in proc.stderr


# A model whose forward takes 2 s the first time it meets each batch size but 24 and the
# first time each copy is evaluated (ec: also its ensemble pass), as --compile's compiles do
# (outside the compiled graph, so the time is the same whatever Dynamo caches); 4 s on one
# rank, so that the others wait for it: rank 1 for a short last batch (a rank's share of
# 2048 samples in batches of 24), rank 0 for ec's larger ones with relabelled samples (rank
# 1 waits for its last in the evaluation's bcast, which rank 0, the root, leaves at once).
# The others' short batch takes no extra time (a process alone: 2 s), so that asgd's and
# ssp's rank 0 waits seconds for rank 1's last step in the agreement to finish: with 2 s of
# its own, the ranks' unequal compile times left that wait about the timeout (1.2 s), and the
# cases could pass without the agreement's compile allowance.
SLOW_FIRST_TIMES = """
import os
import time
import torch
from torch import nn

_seen = set()
_RANK = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))
_ALONE = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "1"))) == 1


@torch.compiler.disable
def _first_time_slow(key, slow_rank=None, others=2):
    if key not in _seen:
        _seen.add(key)
        time.sleep(4 if _RANK == slow_rank else others)


class SlowFirstTimes(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, num_classes))

    def forward(self, x):
        if x.shape[0] != 24 and self.training:
            short = x.shape[0] < 24
            _first_time_slow((id(self), x.shape[0]), slow_rank=1 if short else 0,
                             others=0 if short and not _ALONE else 2)
        if not self.training:  # each model object: Dynamo compiles each one
            _first_time_slow((id(self), "evaluation"))
        return self.net(x)
"""


# The cases: (algo, ranks (0: a plain process), --eval, --eval-every).
COMPILE_CASES = [
    ("sgd", 0, "online", "0.25"), ("sgd", 0, "after", "0.25"),
    ("ssgd", 2, "online", "0.25"),  # rank 1 waits in an allreduce while rank 0 evaluates
    ("ssgd", 3, "after", "1"),  # two snapshots: rank 2 waits for the others' scores
    ("ssp", 2, "online", "0.25"),  # rank 1 waits for rank 0's clock; rank 0 at the end for
    ("asgd", 2, "after", "1"),  # rank 1's last step (the wait to finish)
    ("ec", 2, "after", "1")]  # the first round's ensemble pass (eval mode); rank 0's first
# batches with relabelled samples (new sizes), which rank 1 waits for in the next round, and
# its last (16 and 25 relabelled), which rank 1 waits for to evaluate


@pytest.fixture(scope="module")
def compiled_runs(tmp_path_factory):
    """The cases of one size (ranks) in one launch, as conftest.run_commands runs commands
    (each with its own copy of SLOW_FIRST_TIMES, a module of its own: its own first times,
    its own forward for Dynamo to compile): a cold start of torch.compile a size, not a case.
    Called with a case, it gives (its run's folder, the launch's process)."""
    root = tmp_path_factory.mktemp("compiling")
    launches: dict[int, subprocess.CompletedProcess] = {}

    def folder(case: tuple) -> Path:
        return root / "-".join(map(str, case))

    def run(case: tuple) -> tuple[Path, subprocess.CompletedProcess]:
        np = case[1]
        if np not in launches:
            commands = []
            for algo, _, evaluation, eval_every in (c for c in COMPILE_CASES if c[1] == np):
                here = folder((algo, np, evaluation, eval_every))
                here.mkdir()
                (here / "slow.py").write_text(SLOW_FIRST_TIMES)
                commands.append(["train", "--algo", algo, "--dataset", "synthetic", "--model",
                                 f"{here / 'slow.py'}:SlowFirstTimes", "--epochs", "1",
                                 "--batch-size", "24", "--compile", "--stall-timeout", "1",
                                 "--eval", evaluation, "--eval-every", eval_every,
                                 "--no-progress", "--out", str(here / "run")])
            launches[np] = run_commands(commands, np=np, timeout=300)
        return folder(case), launches[np]

    return run


@pytest.mark.timeout(360)
@pytest.mark.skipif(compiled.problem("cpu") is not None, reason="--compile cannot run here")
@pytest.mark.parametrize("algo, np, evaluation, eval_every", COMPILE_CASES)
def test_compiling_a_new_batch_size_is_not_a_stall(compiled_runs, algo, np, evaluation,
                                                   eval_every):
    """--compile recompiles for the short last batch and for the first evaluation: with
    --stall-timeout 1 those ended healthy runs (exit 3, the training lost), the compiling
    rank's or one waiting for it."""
    folder, proc = compiled_runs((algo, np, evaluation, eval_every))
    assert proc.returncode == 0, proc.stderr
    assert (folder / "run" / "summary.json").exists(), proc.stderr[-3000:]


# Rank 1 stops itself (SIGSTOP) at its 6th training forward: its own watchdog thread stops
# with it, so only the ranks waiting for it can end the job.
FREEZES = """
import os
import signal
from torch import nn


class Freezes(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, num_classes))
        self.calls = 0

    def forward(self, x):
        if self.training and os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
            self.calls += 1
            if self.calls == 6:
                os.kill(os.getpid(), signal.SIGSTOP)
        return self.net(x)
"""


@pytest.mark.timeout(200)
def test_a_frozen_worker_ends_an_ssp_job(tmp_path):
    """ssp's waiting worker beat at every poll while it waited for a frozen one: nothing
    ended the job. Now it beats only when the slowest worker steps, and ends the job after
    the timeout and its grace (its wait is one for the others)."""
    (tmp_path / "freezes.py").write_text(FREEZES)
    proc = run_job(["train", "--algo", "ssp", "--max-staleness", "1", *SMALL, "--model",
                    f"{tmp_path / 'freezes.py'}:Freezes", "--stall-timeout", "5", "--out",
                    str(tmp_path / "run")], np=2, timeout=120)
    assert "hpctrain: rank 0 made no progress for 7.5 s (last: ssp wait" in proc.stderr, \
        proc.stderr
    # rank 0 speaks, rank 1 (frozen) cannot: the line says how to read that
    assert "(--stall-timeout 5); waiting for the other ranks in the staleness bound's wait " \
        "for the slowest worker: a rank stalled outside such a wait had 2.5 s more to speak " \
        "first; one frozen whole (its watchdog with it) says nothing" in proc.stderr, proc.stderr
    assert proc.returncode != 0 and not (tmp_path / "run" / "summary.json").exists()


# Rank 1's first training step takes 8 s (a slow start, a compile).
SLOW_START = """
import os
import time
from torch import nn


class SlowStart(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, num_classes))
        self.started = False

    def forward(self, x):
        if self.training and not self.started:
            self.started = True
            if os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
                time.sleep(8)
        return self.net(x)
"""


@pytest.mark.timeout(200)
def test_an_ssp_worker_waiting_for_anothers_first_step_is_not_stalled(tmp_path):
    """The first step has the start-up allowance; a worker waiting for another's first step
    has it too (beating only when the slowest stepped, it was ended after 3 s)."""
    (tmp_path / "slow.py").write_text(SLOW_START)
    proc = run_job(["train", "--algo", "ssp", "--max-staleness", "1", *SMALL, "--model",
                    f"{tmp_path / 'slow.py'}:SlowStart", "--stall-timeout", "3", "--out",
                    str(tmp_path / "run")], np=2, timeout=120)
    assert proc.returncode == 0, proc.stderr


# Each hpctrain command in its own launch, with the watchdog's write allowance (BUSY_S) short.
SHORT_BUSY = """
import sys
from hpctrain import cli, watchdog
watchdog.BUSY_S = float(sys.argv[1])
cli.main(sys.argv[2:])
"""


@pytest.mark.timeout(200)
def test_a_rank_0_frozen_in_a_checkpoint_write_ends_the_job(tmp_path):
    """Rank 0 stopped (SIGSTOP, its watchdog thread too) halfway through a checkpoint: rank 1
    waited for it beating, without limit, and the job hung until the time limit whatever
    --stall-timeout was. Now the waiting rank gives up after the write's allowance (BUSY_S,
    3 s here) plus the timeout."""
    proc = run_program([sys.executable, "-c", SHORT_BUSY, "3", "train", "--algo", "ssgd",
                        *SMALL, "--epochs", "2", "--checkpoint-every", "1e",
                        "--stall-timeout", "2", "--out", str(tmp_path / "run")],
                       np=2, timeout=150, env={"HPCTRAIN_INJECT": "stopckpt@0:128"})
    assert proc.returncode == watchdog.EXIT_STATUS, proc.stderr
    assert ("hpctrain: rank 1 gave up waiting for rank 0's checkpoint 128 after 5 s: rank 0 "
            "made no progress") in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


# Rank 0 stops itself (SIGSTOP) where it would write the summary; rank 1 waits for it there.
FROZEN_SUMMARY = """
import os, signal
from mpi4py import MPI
from hpctrain import live, watchdog
watchdog.BUSY_S = 1.0
watchdog.start(1.0, rank=MPI.COMM_WORLD.Get_rank())
watchdog.beat("update", 7)
if MPI.COMM_WORLD.Get_rank() == 0:
    os.kill(os.getpid(), signal.SIGSTOP)
live.summary_written(MPI.COMM_WORLD)
"""


@pytest.mark.timeout(120)
def test_a_rank_0_frozen_writing_the_summary_ends_the_job():
    proc = run_program([sys.executable, "-c", FROZEN_SUMMARY], np=2, timeout=100)
    assert proc.returncode == watchdog.EXIT_STATUS, proc.stderr
    assert "hpctrain: rank 1 gave up waiting for rank 0's summary after 2 s" in proc.stderr, \
        proc.stderr


# A stall's exit, after the work registered with the abort hook's module.
END_JOB = """
import sys
from hpctrain import job_end, watchdog
job_end.before_abort(lambda: open(sys.argv[1], "w").write("written"))
watchdog.end_job()
"""


@pytest.mark.timeout(60)
def test_a_stall_exit_does_the_work_registered_before_abort(tmp_path):
    """end_job finds that work through the module that holds it, by name, without importing
    it: named after the module it left (comm), it would find none and cut off rank 0's write
    of an elastic commit."""
    done = tmp_path / "done"
    ended = run_program([sys.executable, "-c", END_JOB, str(done)], timeout=50)
    assert ended.returncode == watchdog.EXIT_STATUS, ended.stderr
    assert done.read_text() == "written"


# hpctrain.train() on rank 0 only, MPI started by the script; rank 1 goes on to its end.
RANK_0_ONLY = """
import sys
import hpctrain.comm
from hpctrain import DataConfig, ModelConfig, OptimConfig, RunConfig, train, watchdog
watchdog.STARTUP_S = 3.0
rank = hpctrain.comm.init("serialized").COMM_WORLD.Get_rank()
if rank == 0:
    train(RunConfig(algo="sgd", out=sys.argv[1], model=ModelConfig(name="mlp"),
                    data=DataConfig(dataset="synthetic"), optim=OptimConfig(epochs=1),
                    progress=False, stall_timeout=1))
print("END", rank, flush=True)
"""


@pytest.mark.timeout(120)
def test_train_called_on_some_ranks_only_ends_the_job(tmp_path):
    """Rank 0 waited for ever in train()'s first collective (before the watchdog started)
    for a rank that never called it. Now the watchdog's start-up allowance (STARTUP_S, 3 s
    here) ends the job, saying what rank 0 waits for."""
    proc = run_program([sys.executable, "-c", RANK_0_ONLY, str(tmp_path / "run")], np=2,
                       timeout=100)
    assert proc.returncode == watchdog.EXIT_STATUS, proc.stderr
    assert ("hpctrain: rank 0 made no progress for 3 s (last: waiting in hpctrain.train() for "
            "every rank to call it); ending the job (--stall-timeout 1)") in proc.stderr, \
        proc.stderr
    assert "END 0" not in proc.stdout and not (tmp_path / "run").exists()
