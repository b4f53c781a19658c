"""``hpctrain train --algo asgd|dcasgd-c|dcasgd-a|ssp`` as whole jobs: outputs, servers,
stragglers, bad input and failing workers."""

import json

import pytest
from conftest import SYNTHETIC, refusal, run_commands, run_job

from hpctrain import checkpoint

SMALL = SYNTHETIC
TCP_ONLY = ["-x", "OMPI_MCA_btl=self,tcp", "-x", "OMPI_MCA_osc=pt2pt",
            "--mca", "btl", "self,tcp", "--mca", "osc", "pt2pt"]
RANKS = 3  # every run of `three_rank_runs`: more than 2 workers where there are no servers
CONTRACTED = {"dcasgd-a": "locked", "asgd": "atomic"}  # algo -> consistency
SSP_BOUNDS = (0, 1)


def outputs(out):
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    points = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, config, points


@pytest.fixture(scope="module")
def three_rank_runs(tmp_path_factory):
    """The 3-rank trainings below in one launch: each algo of CONTRACTED for 2 epochs, and ssp
    with worker 0 six times slower once per bound of SSP_BOUNDS. Returns their folders."""
    folder = tmp_path_factory.mktemp("three")
    runs = {algo: ["--algo", algo, "--epochs", "2", "--consistency", consistency]
            for algo, consistency in CONTRACTED.items()}
    # Six, not three, times slower: on a loaded machine the sleeping rank gets the CPU first,
    # and three times its own step time was not always slower than the others' steps.
    runs |= {f"ssp{bound}": ["--algo", "ssp", "--epochs", "1", "--max-staleness", str(bound),
                             "--slowdown", "0:6"] for bound in SSP_BOUNDS}
    argv = [["train", *args, *SMALL, "--out", str(folder / name)] for name, args in runs.items()]
    proc = run_commands(argv, np=RANKS, timeout=220)
    assert proc.returncode == 0, proc.stderr
    return {name: folder / name for name in runs}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("algo", CONTRACTED)
def test_workers_write_the_contracted_outputs(three_rank_runs, algo):
    np, consistency, out = RANKS, CONTRACTED[algo], three_rank_runs[algo]
    summary, config, points = outputs(out)
    assert summary["algo"] == algo and summary["workers"] == np
    assert summary["consistency"] == consistency
    assert set(summary["staleness"]) >= {"mean", "p50", "p90", "p99", "max"}
    assert summary["staleness"]["count"] == sum(summary["pushes_per_worker"])
    assert len(summary["pushes_per_worker"]) == np and min(summary["pushes_per_worker"]) > 0
    # Exactly 2 epochs of updates: workers claim a ticket before each step, none past it.
    budget = 2 * np * -(-(2048 // np) // 64)
    assert summary["updates"] == sum(summary["pushes_per_worker"]) == budget
    # Each push reads and writes the whole model (4 bytes a parameter) in the store.
    traffic = summary["store_traffic_per_worker"]
    model = 4 * summary["params"]
    assert [t["read"] >= (n + 1) * model and t["written"] >= n * model
            for t, n in zip(traffic, summary["pushes_per_worker"], strict=True)] == [True] * np
    assert summary["store_bytes_per_worker"] == round(
        sum(t["read"] + t["written"] for t in traffic) / np)
    # One node: shared-memory windows, every read and write by the CPU, none through MPI.
    assert summary["shared_windows"] is True
    assert summary["store_mpi_bytes_per_worker"] == 0
    assert summary["lam"] == {"asgd": 0.0, "dcasgd-a": 2.0}[algo]
    assert summary["final_test_acc"] > 0.8  # synthetic data is easy
    assert config["run_info"]["thread_level"] == "serialized"
    assert all({"t", "epoch", "updates", "test_acc", "test_loss"} <= set(p) for p in points)
    assert points[0]["updates"] == 0 and points[-1]["updates"] == summary["updates"]
    assert [p["t"] for p in points] == sorted(p["t"] for p in points)
    assert (out / "model.pt").is_file()


@pytest.fixture(scope="module")
def server_run(tmp_path_factory):
    """dcasgd-c, 1 epoch of 2 workers (batch 64: 32 updates) and a dedicated server over TCP,
    worker 0 three times slower, jitter on both, a checkpoint every half epoch."""
    out = tmp_path_factory.mktemp("server") / "run"
    proc = run_job(["train", "--algo", "dcasgd-c", *SMALL, "--epochs", "1", "--servers", "1",
                    "--consistency", "atomic", "--shards", "3", "--slowdown", "0:3",
                    "--jitter", "0.2", "--batch-size", "64", "--checkpoint-every", "0.5e",
                    "--out", str(out)], np=3, timeout=200, mpi_args=TCP_ONLY)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.timeout(240)
def test_dedicated_server_over_tcp_with_a_straggler(server_run):
    out = server_run
    summary, _, _ = outputs(out)
    assert summary["workers"] == 2 and summary["servers"] == 1 and summary["shards"] == 3
    assert summary["consistency"] == "atomic" and summary["lam"] == 0.04
    assert summary["updates"] == 2 * -(-(2048 // 2) // 64) == sum(summary["pushes_per_worker"])
    # No shared memory: Get_accumulate reads and Accumulate writes every push through MPI.
    model = 4 * summary["params"]
    assert [t["mpi"] >= 2 * n * model for t, n in zip(summary["store_traffic_per_worker"],
                                                       summary["pushes_per_worker"],
                                                       strict=True)] == [True, True]
    slept = summary["straggler_sleep_s_per_worker"]
    assert slept[0] > 0 and slept[1] > 0  # the slowdown, and jitter on every worker
    assert summary["final_test_acc"] > 0.5


@pytest.mark.parametrize("extra, np, pattern", [
    (["--servers", "1"], 0, "--servers 1 with 1 rank:"),
    (["--shards", "0"], 0, "--shards 0"),
    (["--slowdown", "3:2"], 0, "rank 3 is not a worker"),
    (["--slowdown=-1:2"], 0, "rank -1 is not a worker (ranks count from 0)"),
    (["--slowdown", "0:0.5"], 0, "factor 0.5 must be in [1, 1e+06]"),
    (["--slowdown", "0-2"], 0, "cannot parse '0-2'"),
    (["--jitter", "-1"], 0, "--jitter -1.0"),
    (["--ms-decay", "1"], 0, "--ms-decay 1.0"),
    (["--consistency", "eventual"], 0, "invalid choice: 'eventual'"),
    (["--data-placement", "sharded"], 0, "needs --data-placement replicated"),
    (["--servers", "2"], 2, "--servers 2 with 2 ranks"),
    (["--servers", "-1"], 2, "--servers -1 must be >= 0"),
    (["--shards", "100000000"], 2,
     "--shards 100000000 is outside [1, 4096]: at most one shard per parameter of mlp "
     "(99978 parameters), and 4096 in all"),
    (["--shards", "-4"], 2, "--shards -4 is outside [1, 4096]"),
    (["--algo", "asgd", "--lam", "0.1"], 2, "--lam is an option of dcasgd-c, dcasgd-a"),
    (["--lam", "nan"], 2, "--lam nan must be a finite number >= 0"),
    (["--lam", "-1"], 0, "--lam -1.0 must be >= 0"),
    (["--ms-decay", "nan"], 2, "--ms-decay nan must be in [0, 1)"),
    (["--algo", "dcasgd-c", "--ms-decay", "0.9"], 2,
     "--ms-decay is an option of dcasgd-a, not of --algo dcasgd-c"),
    (["--momentum", "1"], 2, "--momentum 1.0 must be"),
])
def test_bad_options_are_refused_naming_the_value(tmp_path, extra, np, pattern):
    """Refused before MPI starts, on as many ranks as the job would have (0: one process)."""
    args = ["--algo", "dcasgd-a", *SMALL, "--out", str(tmp_path / "x"), *extra]
    assert pattern in refusal(args, max(np, 1))
    assert not (tmp_path / "x").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra, np, pattern", [
    (["--slowdown", "0-2"], 0, "cannot parse '0-2'"),
    (["--servers", "2"], 2, "--servers 2 with 2 ranks"),
])
def test_bad_options_are_one_line_errors(tmp_path, extra, np, pattern):
    """A real job: rank 0 alone says it, in one line, exit status 2, before MPI starts."""
    proc = run_job(["train", "--algo", "dcasgd-a", *SMALL, "--out", str(tmp_path / "x"), *extra],
                   np=np, timeout=100)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hpctrain")]
    assert len(lines) == 1 and pattern in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "MPI_ABORT" not in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.timeout(180)
def test_checkpoints_land_on_the_marks_and_the_budget_holds(server_run):
    """1 epoch of 2 workers, batch 64: 32 updates, checkpoints at 16 and 32, none past (with a
    straggler, jitter and a server)."""
    out = server_run
    summary, _, points = outputs(out)
    assert summary["updates"] == sum(summary["pushes_per_worker"]) == 32
    assert summary["checkpoints"] == 2 and points[-1]["updates"] == 32
    assert [p.name for p in checkpoint.listing(out / "checkpoints")] == \
        ["ckpt-000000032.pt", "ckpt-000000016.pt"]
    for path in checkpoint.listing(out / "checkpoints"):
        header, payload = checkpoint.load(path)
        counters = [r["counters"] for r in payload["ranks"]]
        # The workers' own counts add up to the mark: no push in flight past it.
        assert sum(c["local_steps"] for c in counters) == header["updates"]


@pytest.mark.timeout(180)
def test_a_failing_worker_ends_the_job_with_its_message(tmp_path):
    proc = run_job(["train", "--algo", "dcasgd-a", *SMALL, "--epochs", "50", "--servers", "1",
                    "--out", str(tmp_path / "x")], np=3, timeout=150,
                   env={"HPCTRAIN_INJECT": "raise@1:5"})
    assert proc.returncode != 0
    assert "rank 1 of 3" in proc.stderr and "injected fault at step 5" in proc.stderr
    assert not (tmp_path / "x" / "summary.json").exists()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("bound", SSP_BOUNDS)
def test_ssp_keeps_workers_within_the_bound_of_a_straggler(three_rank_runs, bound):
    """ssp from the command line: with worker 0 six times slower, the fast workers wait for
    it (they would run far ahead under asgd), no worker is ever more than S clocks ahead of
    the slowest when it goes on, and the staleness of a push stays within what the bound
    allows: (2S + 1)(M - 1) updates by others between a worker's read and its push, the
    worker reading the store after a wait as SSP promises (the argument is in
    hpctrain/async_/ssp.py; 2(S + 1)(M - 1) without the read)."""
    out, workers = three_rank_runs[f"ssp{bound}"], RANKS
    summary, config, points = outputs(out)
    assert summary["algo"] == "ssp" and summary["max_staleness"] == bound
    assert config["algorithm"]["max_staleness"] == bound
    assert summary["ssp_max_gap"] <= bound
    assert summary["staleness"]["max"] <= (2 * bound + 1) * (workers - 1)
    assert sum(summary["ssp_waits_per_worker"][1:]) > 0  # the fast ones were held back
    pushes = summary["pushes_per_worker"]
    assert summary["updates"] == sum(pushes)
    # Clocks are pushes: the fast workers end at most S + 1 pushes ahead of the slow one.
    assert max(pushes) - pushes[0] <= bound + 1
