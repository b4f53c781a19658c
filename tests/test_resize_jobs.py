"""Whole jobs resumed on another number of ranks: a 2-rank ssgd run shrinks to 1 rank (two
workers' counts folded into one) and a 1-rank dcasgd-a run grows to 2 (each new worker its
share of the rest of the epoch); killed while writing their last checkpoint, they finish from
the one before, with every sample and update accounted for and the resize in their summary.
(Accuracy against an uninterrupted run, on Fashion-MNIST, is in docs/RESULTS.md; the rules
themselves are unit-tested in test_resize.py.)"""

import json
import math

import pytest
import torch
from conftest import SYNTHETIC, run_job

from hpctrain import checkpoint

EPOCHS, SAMPLES, BATCH = 1, 2048, 16  # synthetic: 2048 training samples; full batches


def train(out, algo: str, np: int, *extra: str, env: dict | None = None):
    return run_job(["train", "--algo", algo, *SYNTHETIC, "--epochs", str(EPOCHS), "--seed", "7",
                    "--batch-size", str(BATCH), "--eval-every", "0.25", "--checkpoint-every",
                    "0.5e", "--out", str(out), *extra], np=np, env=env, timeout=150)


def resized_run(out, algo: str, ranks: int, then: int, per_epoch: int) -> tuple[dict, str]:
    """``algo`` on ``ranks`` ranks, killed while writing the checkpoint at the end of its epoch
    (``per_epoch`` updates), resumed on ``then`` ranks from the one at half the epoch: the
    summary and the resume's stderr."""
    proc = train(out, algo, ranks, env={"HPCTRAIN_INJECT": f"killckpt@0:{EPOCHS * per_epoch}"})
    assert proc.returncode != 0 and not (out / "summary.json").exists()
    newest = checkpoint.read_header(checkpoint.listing(out / "checkpoints")[0])
    assert (newest["workers"], newest["updates"]) == (ranks, per_epoch // 2)
    proc = train(out, algo, then, "--resume", str(out))
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "summary.json").read_text()), proc.stderr


def check_common(out, summary: dict, record: dict) -> None:
    assert summary["workers"] == record["to_workers"] and summary["resized"] == [record]
    # In the checkpoint's count, as config.json's resumes (the rescaled one is resumed_at)
    assert summary["resumed_from_updates"] == [record["updates"]] == [
        r["update"] for r in json.loads((out / "config.json").read_text())["run_info"]["resumes"]]
    assert sum(summary["samples_per_worker"]) == EPOCHS * SAMPLES  # every sample, once an epoch
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Every 0.25 epoch, async ones on the first push past the mark (the one at the checkpoint
    # only if rank 0 pushed past it before the mark's barrier), then the final model. Rank 0
    # sees the mark at its own next push: with ranks on busy cores, the other's pushes in
    # between can put it late, by most of the way to the next mark (CI runs: 0.289 for 0.25
    # with 4 ranks on 2 cores; 0.984 for 0.75 with 2 ranks beside two other tests' jobs).
    epochs = [p["epoch"] for p in curve]
    assert epochs[0] == 0.0 and epochs[-1] == 1.0 and epochs == sorted(epochs)
    # One point a mark, at or after it: the marks a resumed run's snapshots cover are counted
    # in its own updates (the old run's put a second point at 0.5 after 2 -> 1 ranks).
    marks = [math.floor(e * 4) for e in epochs[:-1]]
    assert len(epochs) >= 4 and len(set(marks)) == len(marks) and marks[-1] < 4, epochs
    assert summary["final_test_acc"] >= 0.95  # the synthetic set is learnt within an epoch
    assert torch.load(out / "model.pt", weights_only=True).keys()


@pytest.mark.timeout(300)
def test_ssgd_on_2_ranks_goes_on_on_1(tmp_path):
    # 1024 samples a rank: 64 steps an epoch on 2 ranks, 128 on 1 (each keeps its batch of 16)
    out = tmp_path / "run"
    summary, stderr = resized_run(out, "ssgd", 2, 1, 64)
    assert "resized from 2 to 1 workers, going on at update 64" in stderr
    assert "warning" not in stderr  # ssgd keeps the default rule, rightly: no user's warning
    assert summary["updates"] == 128 and summary["checkpoints"] == 2
    check_common(out, summary, {"from_workers": 2, "to_workers": 1, "updates": 32,
                                "resumed_at": 64})


@pytest.mark.timeout(300)
def test_dcasgd_a_on_1_rank_goes_on_on_2(tmp_path):
    # async: an epoch is 128 pushes of all workers on 1 rank as on 2
    out = tmp_path / "run"
    summary, stderr = resized_run(out, "dcasgd-a", 1, 2, 128)
    assert "resized from 1 to 2 workers, going on at update 64" in stderr
    assert "warning" not in stderr  # a rule of its own
    assert summary["updates"] == 128
    assert len(summary["pushes_per_worker"]) == 2
    assert sum(summary["pushes_per_worker"]) == summary["staleness"]["count"] == 128
    check_common(out, summary, {"from_workers": 1, "to_workers": 2, "updates": 64,
                                "resumed_at": 64})

