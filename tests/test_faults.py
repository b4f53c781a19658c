"""Faults: NaN/Inf gradients are never applied; a dead rank ends the job in bounded time."""

import json
import sys

import pytest
import torch
from conftest import LOUD_MODEL, SYNTHETIC, refusal, run_commands, run_job, run_program

from hpctrain import faults
from hpctrain.errors import UsageError
from hpctrain.guard import GradientGuard, TooManyBadSteps, all_finite

SMALL = ["--dataset", "synthetic", "--model", "mlp", "--epochs", "1", "--no-progress",
         "--seed", "3", "--lr", "0.1"]


def make_grads(model, value: float | None = None):
    x = torch.randn(4, 3)
    loss = model(x).sum()
    if value is not None:
        loss = loss * value
    model.zero_grad()
    loss.backward()


def test_all_finite():
    """As isfinite(t).all() over every tensor, which it replaces by their sums, and where a
    sum is not finite by their smallest and largest elements: of every dtype without
    converting one (float64's 1e300 is finite), finite values whose sum overflows finite
    (float16's 6e4 + 6e4), complex by both parts, empty tensors skipped, a NaN anywhere
    among finite values."""
    assert all_finite([torch.tensor([6e4, 6e4], dtype=torch.float16)])
    assert all_finite([torch.tensor([3e38, 3e38]), torch.tensor([-3e38, -3e38])])
    assert all_finite([torch.ones(3), torch.zeros(2, 2)]) and all_finite([])
    assert all_finite([torch.empty(0), torch.tensor([1e300], dtype=torch.float64),
                       torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float16)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not all_finite([torch.ones(3), torch.tensor([1.0, bad])])
        for dtype in (torch.float64, torch.float16, torch.bfloat16):
            middle = torch.arange(9.0, dtype=dtype).reshape(3, 3)
            middle[1, 1] = bad
            assert not all_finite([torch.ones(2), middle.t()])  # not contiguous either
        assert not all_finite([torch.ones(2), torch.tensor([1 + 1j, complex(1.0, bad)])])
        assert not all_finite([torch.tensor([complex(bad, 0.0)])])
    assert all_finite([torch.tensor([1 + 1j, -3j])])
    assert all_finite([torch.tensor([1 + 1j, -3j]).conj()])  # a model using w.conj(): its grad
    assert not all_finite([torch.tensor([1 + 1j, complex(1.0, float("nan"))]).conj()])


def test_sparse_gradients_are_checked_and_clipped_as_their_dense_sums():
    """An embedding's (uncoalesced, with a repeated row) gradient: NaN seen in its values,
    clipped to the same gradient as the dense one."""
    def grads(sparse: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(6, 3, sparse=sparse),
                                    torch.nn.Linear(3, 1))
        model(torch.tensor([1, 4, 1])).pow(2).sum().mul(50).backward()
        return model
    sparse, dense = grads(True), grads(False)
    assert sparse[0].weight.grad.is_sparse
    for model in (sparse, dense):
        guard = GradientGuard(model.parameters(), max_bad_steps=5, clip_norm=0.5)
        assert guard.check(0) and guard.clipped == 1
    for p, q in zip(sparse.parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p.grad.to_dense(), q.grad)
    sparse[0].weight.grad._values()[0, 0] = float("nan")
    assert not all_finite([sparse[0].weight.grad])


def test_guard_skips_counts_and_stops():
    model = torch.nn.Linear(3, 2)
    guard = GradientGuard(model.parameters(), max_bad_steps=3)
    make_grads(model)
    assert guard.check(0)
    for update in (1, 2):
        make_grads(model, float("nan"))
        assert not guard.check(update)
    make_grads(model)
    assert guard.check(3) and guard.consecutive == 0
    assert guard.summary() == {"skipped_steps": 2, "bad_gradients_per_worker": [2],
                               "max_bad_steps": 3, "clip_grad_norm": None,
                               "clipped_steps_per_worker": [0]}
    for update in (4, 5):
        make_grads(model, float("inf"))
        assert not guard.check(update)
    make_grads(model, float("nan"))
    with pytest.raises(TooManyBadSteps, match=r"3 consecutive steps \(local steps 4-6\)"):
        guard.check(6)


def test_a_step_let_through_then_not_applied_counts_as_a_bad_one():
    """Adasum's combined update that is not finite: reject() after a check() that passed
    continues the run of bad steps check() had broken, and stops it at max_bad_steps."""
    model = torch.nn.Linear(3, 2)
    guard = GradientGuard(model.parameters(), max_bad_steps=3)
    make_grads(model, float("nan"))
    assert not guard.check(0)
    make_grads(model)
    assert guard.check(1) and guard.consecutive == 0
    guard.reject(1)
    assert guard.consecutive == 2 and guard.skipped == 2 and guard.bad_here == 1
    assert guard.check(2)
    with pytest.raises(TooManyBadSteps, match=r"3 consecutive steps \(local steps 0-2\)"):
        guard.reject(2)


def test_guard_state_round_trip():
    model = torch.nn.Linear(3, 2)
    a = GradientGuard(model.parameters(), 5)
    make_grads(model, float("nan"))
    a.check(0)
    b = GradientGuard(model.parameters(), 5)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() == {"skipped": 1, "consecutive": 1, "bad_here": 1,
                                                "clipped": 0}
    old = {"skipped": 1, "consecutive": 0, "bad_here": 1}  # a checkpoint from before clipping
    b.load_state_dict(old)
    assert b.state_dict() == {**old, "clipped": 0}


def grad_norm(model) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))


def test_guard_clips_a_finite_gradient_above_the_bound_only():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    guard = GradientGuard(model.parameters(), max_bad_steps=5, clip_norm=1.0)
    make_grads(model, 100.0)
    before = [p.grad.clone() for p in model.parameters()]
    assert grad_norm(model) > 1 and guard.check(0)
    assert grad_norm(model).item() == pytest.approx(1.0, rel=1e-5)
    scale = model.weight.grad.norm() / before[0].norm()  # one factor for every parameter
    for p, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.grad, b * scale)
    make_grads(model, 1e-3)
    small = [p.grad.clone() for p in model.parameters()]
    assert guard.check(1)  # under the bound: left as it is, bit for bit
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), small, strict=True))
    make_grads(model, float("nan"))
    assert not guard.check(2)  # skipped, not clipped
    summary = guard.summary()
    assert summary["clipped_steps_per_worker"] == [1] and summary["clip_grad_norm"] == 1.0
    assert guard.state_dict()["clipped"] == 1


def test_inject_poisons_the_loss_or_the_gradients(monkeypatch):
    model = torch.nn.Linear(3, 2)
    monkeypatch.setenv("HPCTRAIN_INJECT", "nan@0:1,inf@1:2")
    loss = torch.tensor(2.0)
    assert faults.inject(0, 0, model, loss) is loss
    assert faults.inject(0, 1, model, loss).isnan()
    assert faults.inject(1, 2, model, loss).isinf()
    make_grads(model)
    faults.inject(0, 1, model)
    assert all(p.grad.isnan().all() for p in model.parameters())


def test_inject_refuses_bad_plans(monkeypatch):
    model = torch.nn.Linear(3, 2)
    for spec, msg in (("melt@0:1", "unknown fault 'melt'"), ("nan@0", "cannot parse"),
                      ("nan@0:1,,raise@1:2", "an empty entry"),  # were skipped, or never
                      ("raise@0:-3", "'raise@0:-3': RANK and STEP count from 0")):  # fired
        monkeypatch.setenv("HPCTRAIN_INJECT", spec)
        with pytest.raises(UsageError, match=msg):
            faults.inject(0, 0, model)
        # Before MPI starts (it was found at the first step, config.json written).
        assert msg in refusal(["--algo", "sgd", *SYNTHETIC])


def test_a_fault_that_cannot_fire_is_refused_or_said(monkeypatch, capsys):
    """raise@5:3 on 2 ranks, killckpt without checkpoints, raise@2:3 beside --eval-rank 1 (there
    world rank 2 is worker 1): accepted, never fired, and the drill passed."""
    from hpctrain import arguments, cli, launch_checks

    ssgd = ["--algo", "ssgd", *SYNTHETIC, "--epochs", "1", "--batch-size", "16"]  # 64 steps
    for plan, flags, refused in (
            ("killckpt@0:32", [], "killckpt@0:32: the run writes no checkpoint (no "
                                  "--checkpoint-every)"),
            ("killckpt@1:32", ["--checkpoint-every", "0.5e"], "killckpt@1:32: only rank 0 "
                                                               "writes checkpoints"),
            ("nan@1:3,raise@1:3", [], "'raise@1:3' where nan@1:3 is already planned")):
        monkeypatch.setenv("HPCTRAIN_INJECT", plan)
        assert refused in refusal([*ssgd, *flags], 2)
    # bench compare gives one plan to runs of 1, 2, ... processes: said, not refused
    monkeypatch.setenv("HPCTRAIN_INJECT", "raise@2:3,nan@0:63,inf@1:64,killckpt@0:64,"
                                          "killckpt@0:65,killckpt@0:40,killckpt@0:0")
    args = [*ssgd, "--eval", "online", "--eval-rank", "1", "--checkpoint-every", "0.5e"]
    launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(["train", *args])), 3)
    will_not = "hpctrain: warning: HPCTRAIN_INJECT {} will not fire: {}"
    assert capsys.readouterr().err.splitlines() == [
        will_not.format("raise@2:3", "the run's workers are 0..1 (RANK is a worker's index; "
                                     "with --eval-rank 1, world rank r > 1 is worker r - 1)"),
        will_not.format("inf@1:64", "a worker's steps are 0..63 at most"),
        will_not.format("killckpt@0:65", "the run ends at update 64"),
        # 0.5e: at 32 and 64 (killckpt@0:40 passed silently, a drill that tested nothing)
        will_not.format("killckpt@0:40", "checkpoints are written every 32 updates (and "
                                         "where SIGUSR1 asks)"),
        will_not.format("killckpt@0:0", "checkpoints are written every 32 updates (and "
                                        "where SIGUSR1 asks)")]


def finite_model(out) -> bool:
    state = torch.load(out / "model.pt", weights_only=True)
    return all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.timeout(120)
def test_sgd_drops_nan_and_inf_gradients(tmp_path):
    proc = run_job(["train", "--algo", "sgd", *SMALL, "--out", str(tmp_path)], np=0,
                   env={"HPCTRAIN_INJECT": "nan@0:3,inf@0:4,nan@0:20"})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped_steps"] == 3 and summary["bad_gradients_per_worker"] == [3]
    assert finite_model(tmp_path) and summary["final_test_acc"] > 0.5


def ssgd(out, *extra: str) -> list[str]:
    return ["train", "--algo", "ssgd", *SMALL, "--batch-size", "16", *extra, "--out", str(out)]


TOO_MANY = ",".join(f"nan@1:{s}" for s in range(4, 8))  # rank 1's NaN at 4 steps in a row


@pytest.fixture(scope="module")
def two_rank_nan_runs(tmp_path_factory) -> tuple[dict, object]:
    """The 2-rank drills in one launch: ssgd with Adasum and a few NaN/Inf steps, ssgd with
    Adasum whose combined updates are NaN, then ssgd with more NaN steps in a row than
    --max-bad-steps allows (which ends the launch). Returns ({"adasum": its folder,
    "adasum_nan": its folder, "too_many": its folder}, the launch's completed process)."""
    root = tmp_path_factory.mktemp("nan2")
    runs = {name: root / name for name in ("adasum", "adasum_nan", "too_many")}
    (root / "loud.py").write_text(LOUD_MODEL)
    loud = ["--reduce-op", "adasum", "--model", f"{root / 'loud.py'}:build", "--lr", "1e6",
            "--max-bad-steps", "1000"]
    proc = run_commands([ssgd(runs["adasum"], "--reduce-op", "adasum"),
                         ssgd(runs["adasum_nan"], *loud),
                         ssgd(runs["too_many"], "--max-bad-steps", "4")], np=2, timeout=170,
                        injects=["nan@1:2,inf@0:9,nan@1:9", None, TOO_MANY])
    return runs, proc


def assert_dropped_on_all(out, skipped: int, per_worker: list[int]) -> None:
    """``skipped`` steps skipped on every rank (counted ``per_worker`` where the NaN/Inf was);
    the model finite and trained."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == skipped
    assert summary["bad_gradients_per_worker"] == per_worker
    assert finite_model(out) and summary["final_test_acc"] > 0.5


@pytest.mark.timeout(180)
def test_ssgd_nan_on_one_worker_is_dropped_on_all(tmp_path):
    """A NaN or Inf gradient on some ranks at a few steps: those steps are skipped on every rank
    (the replicas stay identical and finite), counted per worker."""
    proc = run_job(ssgd(tmp_path), np=3,
                   env={"HPCTRAIN_INJECT": "nan@1:2,nan@1:9,inf@2:9,inf@2:17"})
    assert proc.returncode == 0, proc.stderr
    assert_dropped_on_all(tmp_path, 3, [0, 2, 2])


@pytest.mark.timeout(180)
def test_with_adasum_the_ranks_agree_on_the_steps_to_drop(two_rank_nan_runs):
    """With Adasum the gradients are never reduced: the ranks agree on the verdict."""
    runs, proc = two_rank_nan_runs
    assert (runs["adasum"] / "summary.json").exists(), proc.stderr
    assert_dropped_on_all(runs["adasum"], 2, [1, 2])


@pytest.mark.timeout(180)
def test_with_adasum_a_combined_update_that_is_not_finite_is_dropped(two_rank_nan_runs):
    """Finite gradients whose combined Adasum update is NaN: every step is skipped on both
    ranks, no gradient counted bad, and the model stays as it started, finite."""
    runs, proc = two_rank_nan_runs
    summary = json.loads((runs["adasum_nan"] / "summary.json").read_text())
    assert summary["skipped_steps"] == summary["updates"] > 0
    assert summary["bad_gradients_per_worker"] == [0, 0] and finite_model(runs["adasum_nan"])


@pytest.mark.timeout(180)
def test_too_many_bad_steps_stop_the_job_with_one_line(two_rank_nan_runs):
    runs, proc = two_rank_nan_runs
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hpctrain")]
    assert lines == ["hpctrain: error (rank 0 of 2): TooManyBadSteps: 4 consecutive steps "
                     "(local steps 4-7) had NaN/Inf gradients (per worker: [0, 4]); stopping "
                     "(--max-bad-steps 4). Lower --lr or check the data"], proc.stderr
    assert (runs["adasum"] / "summary.json").exists()  # the launch's first run had finished
    assert not (runs["too_many"] / "summary.json").exists()


SWEEP = """
import json, os, sys, threading
import torch
import hpctrain
from hpctrain import arguments, cli, comm
from hpctrain.guard import TooManyBadSteps
out, common = sys.argv[1], json.loads(sys.argv[2])
os.environ["HPCTRAIN_INJECT"] = sys.argv[3]
said = []
try:
    cli.main(common + ["--max-bad-steps", "4", "--out", out + "/diverged"])
except TooManyBadSteps:
    said.append("caught")
del os.environ["HPCTRAIN_INJECT"]
torch.set_num_threads(2)
torch.manual_seed(7)
expected = torch.rand(3)
torch.manual_seed(7)
args = cli.build_parser().parse_args(common + ["--sync-backend", "torch", "--out", out + "/next"])
hpctrain.train(arguments.build(args))
kept = torch.get_num_threads() == 2 and torch.equal(torch.rand(3), expected)
said += ["left", *sorted(t.name for t in threading.enumerate() if t.name.startswith("hpctrain")),
         "kept" if kept else "changed"]
with open(f"{out}/said-{comm.rank()}", "w") as f:  # mpirun may merge the ranks' stdout lines
    f.write(" ".join(said))
"""


@pytest.mark.timeout(200)
def test_a_sweep_that_catches_too_many_bad_steps_trains_again(tmp_path):
    """ssgd's workers share the reduced gradient, so they stop together: every rank raises
    TooManyBadSteps (the evaluating rank too), the run releases its backend, and a script's
    next run (here on another backend) trains. Before, rank 0 alone raised while the others
    waited in a barrier forever, and a failed run left its backend running. A run leaves the
    script torch's thread count and random state as it found them."""
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP)
    common = ssgd(tmp_path, "--eval-rank", "2", "--eval", "online")[:-2]
    proc = run_program([sys.executable, str(script), str(tmp_path), json.dumps(common),
                        TOO_MANY], np=3, timeout=180)
    assert proc.returncode == 0, proc.stderr
    said = [(tmp_path / f"said-{rank}").read_text() for rank in range(3)]
    assert said == ["caught left kept"] * 3  # no stall check or watchdog thread left
    assert not (tmp_path / "diverged" / "summary.json").exists()
    assert json.loads((tmp_path / "next" / "summary.json").read_text())["final_test_acc"] > 0.5


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", [0, 1])
def test_rank_killed_ends_the_job(tmp_path, victim):
    """SIGKILL on one rank mid-run, rank 0 or another: the job exits non-zero (the timeout
    bounds how soon) and mpirun names the rank that died."""
    proc = run_job(ssgd(tmp_path), np=2, timeout=90, env={"HPCTRAIN_INJECT": f"kill@{victim}:10"})
    assert proc.returncode != 0
    assert f"process rank {victim} with PID" in proc.stderr and "signal 9" in proc.stderr
