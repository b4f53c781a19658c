"""The stall watchdog: a rank that stops making progress ends the job in bounded time."""

import subprocess
import sys

import pytest
from conftest import run_job, run_program

from hpctrain import watchdog

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
def test_beats_keep_it_quiet_and_stop_ends_watching():
    proc = run_python("import time\nfrom hpctrain import watchdog\n"
                      "watchdog.start(1.0, rank=0)\n"
                      "for i in range(15):\n    watchdog.beat('step', i); time.sleep(0.2)\n"
                      "watchdog.stop()\ntime.sleep(2)\nprint('done')")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "done\n", "")


@pytest.mark.timeout(60)
def test_start_up_is_not_held_to_a_short_timeout():
    proc = run_python("import time\nfrom hpctrain import watchdog\n"
                      "watchdog.start(0.5, rank=2)\ntime.sleep(2)\nprint('started')\n"
                      "watchdog.beat('update', 1)\ntime.sleep(30)")
    assert proc.stdout == "started\n" and proc.returncode == watchdog.EXIT_STATUS
    assert "rank 2 made no progress for 0.5 s (last: update 1)" in proc.stderr


def test_zero_timeout_watches_nothing():
    watchdog.start(0, rank=0)
    watchdog.beat("step", 1)  # a no-op when not watching
    assert watchdog._active is None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algo,last", [("ssgd", "update 6"), ("dcasgd-a", "update 6")])
def test_a_hung_rank_ends_the_job(tmp_path, algo, last):
    """Rank 1 hangs (alive, silent) after its 6th update: without the watchdog the other rank
    would wait in its next collective (ssgd) or the final barrier (async) forever."""
    proc = run_job(["train", "--algo", algo, *SMALL, "--stall-timeout", "8", "--out",
                    str(tmp_path)], np=2, timeout=100, env={"HPCTRAIN_INJECT": "hang@1:6"})
    assert proc.returncode != 0
    assert f"hpctrain: rank 1 made no progress for 8 s (last: {last}); ending the job" \
        in proc.stderr, proc.stderr
    assert not (tmp_path / "summary.json").exists()


SLOW_TO_SCORE = """
import time
import torch
from torch import nn

class SlowToScore(nn.Module):
    def __init__(self, input_shape, num_classes, pause):
        super().__init__()
        self.pause = pause
        n = 1
        for d in input_shape:
            n *= d
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(n, num_classes))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x):  # slow to score once trained: not in the checks before MPI
        if self.training:
            self.steps += 1
        elif self.steps > 0:
            time.sleep(self.pause)
        return self.net(x)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algo, np, flags", [
    ("ma", 2, ["--model-args", '{"pause": 0.15}']),  # 2-3 forwards a snapshot
    ("ssgd", 3, ["--model-args", '{"pause": 0.4}', "--eval", "online", "--eval-rank", "2"]),
], ids=["members", "eval-rank"])
def test_scoring_after_training_is_progress(tmp_path, algo, np, flags):
    """Scoring after the loop beat on no rank (ma/ec's members), or not on the ranks waiting
    for the evaluating rank's backlog: a healthy job was ended as stalled."""
    (tmp_path / "slow.py").write_text(SLOW_TO_SCORE)
    proc = run_job(["train", "--algo", algo, *SMALL, "--model",
                    f"{tmp_path / 'slow.py'}:SlowToScore", "--eval-every", "0.125", *flags,
                    "--stall-timeout", "2", "--out", str(tmp_path / "run")], np=np, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "summary.json").exists()
