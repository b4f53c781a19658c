"""Whole async MPI jobs: dedicated servers over TCP without shared memory, and failing workers.

The tests launch this file as ``mpirun`` jobs (the scenarios are below, under ``__main__``),
so each gets the MPI configuration it needs: ``--mca btl self,tcp --mca osc pt2pt`` at thread
level ``serialized`` is Open MPI 4's inter-node one-sided path, where a window's host must call
into MPI for operations on it to progress.
"""

import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, SYNTHETIC, needs_mpi, run_job, run_program

TCP_ONLY = ["-x", "OMPI_MCA_btl=self,tcp", "-x", "OMPI_MCA_osc=pt2pt",
            "--mca", "btl", "self,tcp", "--mca", "osc", "pt2pt"]
# How long worker 1 computes, at most, waiting for worker 0's pushes: a hang guard (they take
# well under a second when the servers progress them), not a bound the test measures.
BUSY_CAP_S = 60.0
CONSISTENCIES = ["locked", "atomic"]


def run_scenario(name: str, np: int, *args: str, mpi_args=(), timeout: float = 120):
    return run_program([sys.executable, __file__, name, *args], np, timeout,
                       mpi_args=list(mpi_args))


def results_of(proc) -> dict[str, dict]:
    """Each ``RESULT name {...}`` line the job printed, by name."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line.split(" ", 2) for line in proc.stdout.splitlines()
             if line.startswith("RESULT ")]
    results = {name: json.loads(text) for _, name, text in lines}
    assert len(results) == len(lines), proc.stdout
    return results


@pytest.fixture(scope="module")
def tcp_servers() -> dict[str, dict]:
    """The ``busy`` then the ``budget`` scenario for each consistency, one store after another
    in one 4-rank job over TCP (2 servers): ``{"busy-locked": {...}, ...}``."""
    return results_of(run_scenario("tcp", 4, ",".join(CONSISTENCIES), mpi_args=TCP_ONLY,
                                   timeout=240))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("consistency", CONSISTENCIES)
def test_dedicated_servers_over_tcp_serve_while_a_worker_computes(tcp_servers, consistency):
    res = tcp_servers[f"busy-{consistency}"]
    assert res["mca"] == {"btl": "self,tcp", "osc": "pt2pt"}
    assert res["thread_level"] == "serialized"
    assert res["shared_windows"] is False  # windows made with Win.Allocate, used by Get/Put
    # Worker 0 finished all its pushes while worker 1 computed without calling MPI: the
    # servers, not the busy worker, progressed its operations.
    assert res["computed_through_pushes"], res
    assert res["exact"], res


@pytest.mark.timeout(120)
@pytest.mark.parametrize("servers, np", [("0", 2), ("1", 3)])
def test_a_worker_that_raises_ends_the_whole_job(servers, np):
    """Worker 1 raises while worker 0 pushes (and, with a server, the server serves). The
    script's own error (it started MPI with comm.init) is said by its traceback, labelled
    with the rank."""
    proc = run_scenario("raise", np, servers, timeout=90)
    assert proc.returncode != 0
    assert (f"hpctrain: error (rank 1 of {np}):\nTraceback (most recent call last):\n"
            in proc.stderr), proc.stderr
    assert "\nRuntimeError: injected failure in worker 1\n" in proc.stderr


def readme_example(heading: str) -> str:
    """The first Python block of README.md's section ``heading``."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"\n{heading}\n"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


# What README's own-loop example leaves to the reader: the model, and this rank's batches.
OWN_LOOP_DATA = """
import os
import torch
import torch.nn.functional as F
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
g = torch.Generator().manual_seed(int(os.environ["OMPI_COMM_WORLD_RANK"]))
batches = [(torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g))
           for _ in range(20)]
"""


@pytest.mark.timeout(120)
@needs_mpi("mpich")
def test_more_shards_than_mpichs_context_ids_are_refused_before_mpi_starts(tmp_path):
    """MPICH gives every window one of about 2048 context ids: 2100 shards segfaulted (rc 11,
    no message) while the store was built. Now one line names the value, the limit and why;
    the library is read before MPI starts, so no window, folder or traceback comes first."""
    out = tmp_path / "run"
    done = run_job(["train", "--algo", "asgd", "--shards", "2100", *SYNTHETIC, "--epochs", "1",
                    "--out", str(out)], np=1, mpi="mpich")
    assert done.returncode == 2, done.stderr[-2000:]
    refusals = [line for line in done.stderr.splitlines() if line.startswith("hpctrain: error")]
    assert refusals and all("--shards 2100 is outside [1, 2000]" in line and "MPICH" in line
                            and "context ids" in line for line in refusals), done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


@pytest.mark.timeout(120)
def test_readmes_own_loop_example_ends_with_one_model_on_every_rank(tmp_path):
    """README's DC-ASGD loop ended with store.finish(); store.close(): each rank kept the
    values it last pulled, which the others' later pushes had moved on, so the ranks'
    models differed; opt.pull() after finish() gives every rank the final model."""
    script = tmp_path / "own_loop.py"
    script.write_text(OWN_LOOP_DATA
                      + readme_example("## DC-ASGD and Ensemble-Compression in your own loop")
                      + "import hashlib\nvalues = b''.join(p.detach().numpy().tobytes() "
                      "for p in model.parameters())\n"
                      "print(f'PARAMETERS {hashlib.sha256(values).hexdigest()}', flush=True)\n")
    proc = run_program([sys.executable, str(script)], np=2, timeout=100)
    assert proc.returncode == 0, proc.stderr
    models = re.findall(r"PARAMETERS ([0-9a-f]{64})", proc.stdout)  # lines may run together
    assert len(models) == 2 and models[0] == models[1], proc.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("consistency", CONSISTENCIES)
def test_tickets_hold_a_budget_of_pushes_exactly(tcp_servers, consistency):
    """Two workers (one slow) claim tickets before each push: exactly the budget is pushed,
    each ticket below it by one worker; the traffic counts are MPI's payload by hand."""
    res = tcp_servers[f"budget-{consistency}"]
    assert res["shared_windows"] is False
    assert res["updates"] == res["budget"] == sum(res["pushes"]) and min(res["pushes"]) > 0
    assert sorted(res["tickets"]) == list(range(res["budget"]))
    assert res["exact"]
    k, s = res["numel"], res["shards"]
    per_push = {"locked": 2 * (4 * k + 8 * s), "atomic": 4 * k + 4 * k + 8 * s}[consistency]
    pull = 4 * k + 8 + (8 * s if consistency == "locked" else 0)
    for n, traffic in zip(res["pushes"], res["traffic"], strict=True):
        # pushes; one pull (4k values, the counter read and, locked, the shard counts); claims
        # (n + 1) and pushes count the counter with Fetch_and_op (8 bytes out, 8 back)
        assert traffic["mpi"] == n * per_push + pull + 16 * (2 * n + 1), traffic


# --- scenarios, run under mpirun -------------------------------------------------------------

def _busy(consistency: str) -> None:
    """Ranks 2, 3 serve; worker 0 pushes while worker 1 computes without calling MPI."""
    import torch

    from hpctrain import comm
    from hpctrain.async_ import ParameterStore

    MPI = comm.init("serialized")
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    numel, pushes = 100_000, 30
    start = torch.arange(numel, dtype=torch.float32)
    store = ParameterStore(start, world, servers=2, consistency=consistency)
    result = {}
    if store.is_worker:
        w = torch.empty(numel)
        store.pull(w)
        folder = store.worker_comm.bcast(tempfile.mkdtemp() if rank == 0 else None, root=0)
        done = Path(folder) / "pushes-done"  # worker 0's word, outside MPI
        store.worker_comm.Barrier()
        g = torch.full((numel,), float(rank + 1))
        if rank == 0:
            for _ in range(pushes):
                store.push(w, g, lr=1.0)
            done.touch()
        else:  # computes, calling no MPI, until worker 0's pushes are done (or the cap)
            a = torch.randn(200, 200)
            until = time.monotonic() + BUSY_CAP_S
            while not done.exists() and time.monotonic() < until:
                a = torch.tanh(a @ a)
            result["computed_through_pushes"] = done.exists()
            store.push(w, g, lr=1.0)
        store.worker_comm.Barrier()
        if rank == 0:
            shutil.rmtree(folder)
        parts = store.worker_comm.gather(result, root=0)
        if rank == 0:
            final = torch.empty(numel)
            store.pull(final)
            expected = start - (pushes * 1 + 1 * 2)
            result = {k: v for p in parts for k, v in p.items()}
            result["exact"] = bool(torch.equal(final, expected))
            result["mca"] = {k: os.environ.get(f"OMPI_MCA_{k}") for k in ("btl", "osc")}
            result["thread_level"] = comm.library_info()["thread_level"]
            result["shared_windows"] = store.shared
            print(f"RESULT busy-{consistency} " + json.dumps(result), flush=True)
    store.finish()
    store.close()


def _budget(consistency: str) -> None:
    """Ranks 2, 3 serve; workers 0 and 1 (slower) push -1 with tickets below a budget of 40."""
    import torch

    from hpctrain import comm
    from hpctrain.async_ import ParameterStore

    MPI = comm.init("serialized")
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    numel, budget = 1000, 40
    store = ParameterStore(torch.zeros(numel), world, servers=2, consistency=consistency)
    if store.is_worker:
        w, g = torch.empty(numel), torch.ones(numel)
        store.pull(w)
        mine = []
        # Each worker holds its first ticket before either pushes: unordered, worker 0 could
        # claim all 40 before worker 1's first claim, and the test wants both to push.
        ticket = store.claim()
        store.worker_comm.Barrier()
        while ticket < budget:
            if rank == 1:
                time.sleep(0.005)
            store.push(w, g, lr=1.0)
            mine.append(ticket)
            ticket = store.claim()
        store.worker_comm.Barrier()
        traffic = {"read": store.bytes_read, "written": store.bytes_written,
                   "mpi": store.mpi_bytes}
        parts = store.worker_comm.gather((mine, traffic), root=0)
        if rank == 0:
            final = torch.empty(numel)
            store.pull(final)
            print(f"RESULT budget-{consistency} " + json.dumps({
                "budget": budget, "updates": store.updates(), "numel": numel,
                "shards": store.shards, "shared_windows": store.shared,
                "tickets": [t for m, _ in parts for t in m],
                "pushes": [len(m) for m, _ in parts], "traffic": [t for _, t in parts],
                "exact": bool(torch.equal(final, torch.full((numel,), -float(budget))))}),
                  flush=True)
    store.finish()
    store.close()


def _raise(servers: str) -> None:
    """Worker 1 raises at its 4th step while the others keep pushing or serving."""
    import torch

    from hpctrain import comm
    from hpctrain.async_ import ParameterStore

    MPI = comm.init("serialized")
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    store = ParameterStore(torch.zeros(1000), world, servers=int(servers))
    if store.is_worker:
        w, g = torch.zeros(1000), torch.ones(1000)
        store.pull(w)
        for step in range(100_000):
            if rank == 1 and step == 3:
                raise RuntimeError("injected failure in worker 1")
            store.push(w, g, lr=1e-3)
            time.sleep(0.01)
    store.finish()
    store.close()


def _tcp(consistencies: str) -> None:
    """Both scenarios for each of the comma-separated consistencies over the same 4 ranks, one
    store after another."""
    for consistency in consistencies.split(","):
        _busy(consistency)
        _budget(consistency)


if __name__ == "__main__":
    {"tcp": _tcp, "raise": _raise}[sys.argv[1]](*sys.argv[2:])
