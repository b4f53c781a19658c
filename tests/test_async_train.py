"""``hpctrain train --algo asgd|dcasgd-c|dcasgd-a`` as whole jobs: outputs, servers, stragglers,
bad input and failing workers."""

import json

import pytest
from conftest import run_job

SMALL = ["--dataset", "synthetic", "--model", "mlp", "--no-progress"]
TCP_ONLY = ["-x", "OMPI_MCA_btl=self,tcp", "-x", "OMPI_MCA_osc=pt2pt",
            "--mca", "btl", "self,tcp", "--mca", "osc", "pt2pt"]


def outputs(out):
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    points = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, config, points


@pytest.mark.timeout(240)
@pytest.mark.parametrize("algo, np, consistency", [("dcasgd-a", 4, "locked"),
                                                   ("asgd", 2, "atomic")])
def test_workers_write_the_contracted_outputs(tmp_path, algo, np, consistency):
    out = tmp_path / algo
    proc = run_job(["train", "--algo", algo, *SMALL, "--epochs", "2", "--consistency",
                    consistency, "--out", str(out)], np=np, timeout=200)
    assert proc.returncode == 0, proc.stderr
    summary, config, points = outputs(out)
    assert summary["algo"] == algo and summary["workers"] == np
    assert summary["consistency"] == consistency
    assert set(summary["staleness"]) >= {"mean", "p50", "p90", "p99", "max"}
    assert summary["staleness"]["count"] == sum(summary["pushes_per_worker"])
    assert len(summary["pushes_per_worker"]) == np and min(summary["pushes_per_worker"]) > 0
    # The run stops once 2 epochs of samples are consumed (at most one push per worker more).
    budget = 2 * np * -(-(2048 // np) // 64)
    assert budget <= summary["updates"] == sum(summary["pushes_per_worker"]) < budget + np
    assert summary["lam"] == {"asgd": 0.0, "dcasgd-a": 2.0}[algo]
    assert summary["final_test_acc"] > 0.8  # synthetic data is easy
    assert config["thread_level"] == "serialized"
    assert all({"t", "epoch", "updates", "test_acc", "test_loss"} <= set(p) for p in points)
    assert points[0]["updates"] == 0 and points[-1]["updates"] == summary["updates"]
    assert [p["t"] for p in points] == sorted(p["t"] for p in points)
    assert (out / "model.pt").is_file()


@pytest.mark.timeout(240)
def test_dedicated_server_over_tcp_with_a_straggler(tmp_path):
    out = tmp_path / "run"
    proc = run_job(["train", "--algo", "dcasgd-c", *SMALL, "--epochs", "1", "--servers", "1",
                    "--consistency", "atomic", "--shards", "3", "--slowdown", "0:3",
                    "--jitter", "0.2", "--out", str(out)],
                   np=3, timeout=200, mpi_args=TCP_ONLY)
    assert proc.returncode == 0, proc.stderr
    summary, _, _ = outputs(out)
    assert summary["workers"] == 2 and summary["servers"] == 1 and summary["shards"] == 3
    assert summary["consistency"] == "atomic" and summary["lam"] == 0.04
    slept = summary["straggler_sleep_s_per_worker"]
    assert slept[0] > 0 and slept[1] > 0  # the slowdown, and jitter on every worker
    assert summary["final_test_acc"] > 0.5


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra, np, pattern", [
    (["--servers", "1"], 0, "--servers 1 with 1 ranks"),
    (["--shards", "0"], 0, "--shards 0"),
    (["--slowdown", "3:2"], 0, "rank 3 is not a worker"),
    (["--slowdown", "0:0.5"], 0, "factor 0.5 must be >= 1"),
    (["--slowdown", "0-2"], 0, "cannot parse '0-2'"),
    (["--jitter", "-1"], 0, "--jitter -1.0"),
    (["--ms-decay", "1"], 0, "--ms-decay 1.0"),
    (["--consistency", "eventual"], 0, "invalid choice: 'eventual'"),
    (["--data-placement", "sharded"], 0, "needs --data-placement replicated"),
    (["--servers", "2"], 2, "--servers 2 with 2 ranks"),
])
def test_bad_options_are_one_line_errors(tmp_path, extra, np, pattern):
    proc = run_job(["train", "--algo", "dcasgd-a", *SMALL, "--out", str(tmp_path / "x"), *extra],
                   np=np, timeout=100)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hpctrain")]
    assert lines and all(pattern in line for line in lines), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(180)
def test_a_failing_worker_ends_the_job_with_its_message(tmp_path):
    proc = run_job(["train", "--algo", "dcasgd-a", *SMALL, "--epochs", "50", "--servers", "1",
                    "--out", str(tmp_path / "x")], np=3, timeout=150,
                   env={"HPCTRAIN_INJECT": "raise@1:5"})
    assert proc.returncode != 0
    assert "rank 1 of 3" in proc.stderr and "injected fault at step 5" in proc.stderr
    assert not (tmp_path / "x" / "summary.json").exists()
