"""Ensemble-Compression and model averaging without an MPI world: the loss, the options, and
whole ``--algo ma|ec`` jobs started through mpirun (their outputs and one-line errors)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import refusal, run_commands, run_job
from torch.nn import functional as F

from hpctrain import data, models
from hpctrain.config import CheckpointConfig, DataConfig, ModelConfig, OptimConfig, RunConfig
from hpctrain.ec import distillation_loss, plot
from hpctrain.ec.algorithm import AveragingOptions
from hpctrain.ec.compression import check_options
from hpctrain.ec.ensemble import allgather_rows, allreduce_rows, reduce_scatter_rows
from hpctrain.errors import UsageError
from hpctrain.evaluate import evaluate
from hpctrain.sim import SimConfig, simulate
from hpctrain.sim.comm import LocalGroup
from hpctrain.sim.network import Network
from hpctrain.sim.scheduler import Scheduler

SMALL = ["--dataset", "synthetic", "--model", "mlp", "--epochs", "1", "--batch-size", "32",
         "--no-progress"]


def logits_labels_teacher(n=12, classes=10, temperature=3.0):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, classes, generator=g) * 2
    labels = torch.randint(0, classes, (n,), generator=g)
    teacher = F.softmax(torch.randn(n, classes, generator=g) / temperature, dim=1)
    return logits, labels, teacher


@pytest.mark.parametrize("limit", [2**31 - 1, 30], ids=["one-call", "in-parts"])
def test_row_collectives_on_the_simulators_communicator(limit):
    """The simulator's communicator takes the row collectives' flat arrays: 3 virtual
    workers, rows of 7 floats, uneven counts (worker 0 none), whole numbers (exact sums)."""
    counts, width = [0, 5, 2], 7
    group = LocalGroup(Scheduler(3), Network(0.0, 1e30, 0.0, 1e30))

    def rows(k: int, n: int) -> np.ndarray:
        return np.random.default_rng(k).integers(-50, 50, (n, width)).astype(np.float32)

    def body(k: int) -> tuple:
        comm = group.comms[k]
        return (allgather_rows(comm, rows(k, counts[k]), counts),
                reduce_scatter_rows(comm, rows(10 + k, 7), counts, limit),
                allreduce_rows(comm, rows(10 + k, 7), limit))

    total = sum(rows(10 + k, 7) for k in range(3))
    for k, (gathered, mine, summed) in enumerate(group.scheduler.run(body)):
        assert np.array_equal(gathered, np.concatenate([rows(j, c) for j, c in enumerate(counts)]))
        assert np.array_equal(mine, total[sum(counts[:k]):sum(counts[:k + 1])])
        assert np.array_equal(summed, total)


def test_loss_at_alpha_0_is_cross_entropy():
    logits, labels, teacher = logits_labels_teacher()
    loss = distillation_loss(logits, labels, teacher, alpha=0.0, temperature=3.0)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_loss_at_alpha_1_is_the_distillation_term(temperature):
    logits, labels, teacher = logits_labels_teacher(temperature=temperature)
    student = torch.exp(logits / temperature)
    student = student / student.sum(1, keepdim=True)
    direct = temperature ** 2 * (teacher * torch.log(teacher / student)).sum(1).mean()
    loss = distillation_loss(logits, labels, teacher, alpha=1.0, temperature=temperature)
    torch.testing.assert_close(loss, direct)
    assert loss > 0.1  # a term that really depends on the teacher


def test_the_distillation_term_of_bf16_logits_is_computed_in_float32():
    """Under CPU autocast (--mixed-precision bf16) log_softmax ran in bfloat16: the term of
    bfloat16 logits was some 1e-3 off (relative) the float32 one of the same logits."""
    logits, labels, teacher = logits_labels_teacher(temperature=2.0)
    low = logits.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = distillation_loss(low, labels, teacher, alpha=1.0, temperature=2.0)
    wide = distillation_loss(low.float(), labels, teacher, alpha=1.0, temperature=2.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, wide, rtol=1e-6, atol=1e-6)


def test_loss_mixes_linearly_and_vanishes_when_student_is_teacher():
    logits, labels, teacher = logits_labels_teacher()
    parts = [distillation_loss(logits, labels, teacher, a, 3.0, reduction="none")
             for a in (0.0, 1.0, 0.3)]
    torch.testing.assert_close(parts[2], 0.7 * parts[0] + 0.3 * parts[1])
    own = F.softmax(logits / 3.0, dim=1)
    assert distillation_loss(logits, labels, own, 1.0, 3.0).abs() < 1e-6


def small_ec():
    """A small model, an ordinary batch of 8, 7 relabelled samples with their teacher's
    probabilities, and an aggregator (alpha 0.7, T 2) that has no teacher yet."""
    from hpctrain.ec.compression import EnsembleCompression

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    relabelled = (torch.randn(7, 6), torch.randint(0, 3, (7,)),
                  torch.softmax(torch.randn(7, 3), dim=1))
    agg = EnsembleCompression(model, comm=None, tau=1, alpha=0.7, temperature=2.0,
                              distill_size=7)
    return model, x, y, relabelled, agg


def test_a_step_loss_is_the_ordinary_and_the_distilled_samples_mean():
    """The step's loss as the shared DESIGN writes it, in plain torch: cross-entropy on the
    ordinary samples, (1 - alpha) CE + alpha T^2 KL(teacher || student_T) on the relabelled
    ones, averaged over both. Swapping alpha and 1 - alpha in the aggregator passed every
    test before this one."""
    model, x, y, (xd, yd, teacher), agg = small_ec()
    agg.relabelled = (xd, yd, teacher)
    zd = model(xd)
    student = torch.softmax(zd / 2.0, dim=1)
    kl = (teacher * torch.log(teacher / student)).sum(1)
    distilled = 0.3 * F.cross_entropy(zd, yd, reduction="none") + 0.7 * 4.0 * kl
    expected = (F.cross_entropy(model(x), y, reduction="sum") + distilled.sum()) / 15
    torch.testing.assert_close(agg.loss(x, y), expected)


@pytest.mark.parametrize("size", [None, 5])
def test_the_loss_parts_are_the_ordinary_and_the_relabelled_samples_means(size):
    """ec's loss mixes the ordinary samples' cross-entropy with the relabelled ones'
    distillation term, and its train/loss looked better than another algorithm's by that
    alone: TensorBoard's train/ce_loss and train/distill_loss are the parts (with micro-batches
    of ``size`` too)."""
    model, x, y, (xd, yd, teacher), agg = small_ec()
    plain = sum(agg.losses(x, y, size)).item()  # no teacher yet: cross-entropy alone
    assert agg.take_loss_parts() == pytest.approx({"ce_loss": plain})
    agg.relabelled = (xd, yd, teacher)
    mixed = sum(agg.losses(x, y, size)).item()
    ce = F.cross_entropy(model(x), y).item()
    distilled = distillation_loss(model(xd), yd, teacher, 0.7, 2.0).item()
    assert agg.take_loss_parts() == pytest.approx({"ce_loss": ce, "distill_loss": distilled})
    assert mixed == pytest.approx((8 * ce + 7 * distilled) / 15)
    assert ce == pytest.approx(plain) and agg.take_loss_parts() == {}  # taken: counted anew


def test_own_loops_local_data_is_a_dataset():
    """An (x, y) pair was taken: its length, 2, was "the local samples", and a TensorDataset
    failed at the first aggregation (no attribute 'subset')."""
    from hpctrain.data import Dataset
    from hpctrain.ec.compression import EnsembleCompression

    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    with pytest.raises(TypeError, match="local must be an hpctrain.data.Dataset .*not tuple"):
        EnsembleCompression(model, comm=None, tau=2, alpha=0.5, temperature=2.0,
                            distill_size=4, local=(x, y))
    local = Dataset("mine", x, y, torch.arange(12), num_classes=3)
    agg = EnsembleCompression(model, comm=None, tau=2, alpha=0.5, temperature=2.0,
                              distill_size=4, local=local)
    assert agg.local is local


def test_aggregation_summary_keeps_its_json_types_with_no_round():
    """A run stopped before its first round (--stop-on-collapse) wrote total_s as the
    integer 0 and left out EC's documented inferred_samples; bytes_per_round, a byte count,
    was a float (399912.0) in every run."""
    from hpctrain.ec.stats import AggregationStats

    for counts_inference in (False, True):  # ma, ec
        none = AggregationStats(counts_inference).summary()
        assert none["rounds"] == none["bytes_per_rank"] == none["bytes_per_round"] == 0
        assert type(none["bytes_per_round"]) is int and type(none["total_s"]) is float
        assert ("inferred_samples" in none) is counts_inference
    stats = AggregationStats(counts_inference=True)
    stats.record(399912, 0.5, inferred=64, exchange=0.25, inference=0.25)
    stats.record(399912, 0.25, inferred=64, exchange=0.125, inference=0.125)
    summary = stats.summary()
    assert summary["bytes_per_round"] == 399912 and type(summary["bytes_per_round"]) is int
    assert summary["total_s"] == summary["exchange_s"] + summary["inference_s"] == 0.75
    assert summary["inferred_samples"] == 128 and none["inferred_samples"] == 0
    stats.record(399913, 0.5, inferred=64)  # rounds that differ: the mean, to the byte
    assert stats.summary()["bytes_per_round"] == 399912
    assert AggregationStats().summary().keys() == none.keys() - {"inferred_samples"}
    from hpctrain.ec.compression import EnsembleCompression
    ec = EnsembleCompression(torch.nn.Linear(2, 2), None, tau=4, alpha=0.5, temperature=2.0,
                             distill_size=8)
    assert ec.stats.summary()["inferred_samples"] == 0  # ec's, before any round


def test_an_inferred_count_a_checkpoint_lacked_is_not_said():
    """Resumed from a checkpoint written before the samples were counted, the rounds after it
    alone were said as inferred_samples, a part count against inference_s's whole time."""
    from hpctrain.ec.stats import AggregationStats

    stats = AggregationStats(counts_inference=True)
    stats.load_state_dict({"bytes": [8], "seconds": [0.5], "parts": {"inference": 0.25}})
    stats.record(8, 0.5, inferred=16, inference=0.25)
    assert "inferred_samples" not in stats.summary()
    again = AggregationStats(counts_inference=True)
    again.load_state_dict(stats.state_dict())  # its checkpoint: still unknown
    assert "inferred_samples" not in again.summary() and again.summary()["rounds"] == 2


def test_predict_logits_runs_a_model_in_its_own_dtype():
    """The ensemble's inputs are exchanged as float32: a float64 model refused them ("mat1
    and mat2 must have the same dtype") at EC's first aggregation."""
    from hpctrain.ec import predict_logits

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x = torch.randn(7, 6)
    logits = predict_logits(model.double(), x, batch_size=4)
    assert logits.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x.double()))
    embed = torch.nn.Embedding(9, 3).double()  # integer inputs stay integers
    assert predict_logits(embed, torch.arange(9)).dtype == torch.float64


@pytest.mark.parametrize("values, message", [
    ((0, 0.5, 2.0, 10), "EnsembleCompression(tau=0) must be >= 1"),
    ((5, 1.5, 2.0, 10), "EnsembleCompression(alpha=1.5) must be in [0, 1]"),
    ((5, -0.1, 2.0, 10), "EnsembleCompression(alpha=-0.1) must be in [0, 1]"),
    ((5, 0.5, 0.0, 10), "EnsembleCompression(temperature=0.0) must be in (0, 1000]"),
    ((5, 0.5, float("nan"), 10), "EnsembleCompression(temperature=nan) must be in (0, 1000]"),
    ((5, 0.5, 5000.0, 10),  # was taken
     "EnsembleCompression(temperature=5000.0) must be in (0, 1000]"),
    ((5, 0.5, 2.0, 0), "EnsembleCompression(distill_size=0) must be >= 1"),
    ((5, 0.5, 2.0, 10, "mine"),
     "EnsembleCompression(distill_from='mine') is unknown; choose from own, all"),
])
def test_check_options(values, message):
    """The own-loop API's checks are the command line's (5000 was taken by one, not the
    other), naming the argument the caller gave (alpha=, not CompressionOptions.ec_alpha)."""
    with pytest.raises(UsageError) as err:
        check_options(*values)
    assert str(err.value) == message


def test_the_own_loop_class_names_the_arguments_given():
    """EnsembleCompression(alpha=1.5) said "CompressionOptions.ec_alpha=1.5 must be in
    [0, 1]", a field its caller never wrote; and a draw larger than the local data named
    the flag --ec-distill-size. The options class itself names its own fields still."""
    from hpctrain import options
    from hpctrain.ec import EnsembleCompression
    from hpctrain.ec.algorithm import CompressionOptions

    model = torch.nn.Linear(4, 2)
    with pytest.raises(UsageError) as err:
        EnsembleCompression(model, None, tau=5, alpha=1.5, temperature=2.0, distill_size=10)
    assert str(err.value) == "EnsembleCompression(alpha=1.5) must be in [0, 1]"
    with pytest.raises(UsageError) as err:
        CompressionOptions(ec_alpha=1.5)
    assert str(err.value) == "CompressionOptions.ec_alpha=1.5 must be in [0, 1]"
    ec = EnsembleCompression(model, None, tau=5, alpha=0.5, temperature=2.0, distill_size=10)
    few = data.Dataset("few", torch.zeros(3, 4), torch.zeros(3, dtype=torch.long),
                       torch.arange(3), 2)
    with pytest.raises(UsageError) as err:
        ec.set_local_data(few)
    assert str(err.value) == "EnsembleCompression(distill_size=10) exceeds the 3 local samples"
    with pytest.raises(UsageError) as err, options.command_line():
        ec.set_local_data(few)
    assert str(err.value) == "--ec-distill-size 10 exceeds the 3 local samples"


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("hpctrain")]


@pytest.mark.parametrize("args, np, message", [
    (["--algo", "ma", "--tau", "0"], 2, "--tau 0 must be >= 1"),
    (["--algo", "ec", "--tau", "-3"], 0, "--tau -3 must be >= 1"),
    (["--algo", "ec", "--tau-epochs", "0"], 0, "--tau-epochs 0.0 must be in (0, 1e+06]"),
    (["--algo", "ec", "--ec-alpha", "1.2"], 0, "--ec-alpha 1.2 must be in [0, 1]"),
    (["--algo", "ec", "--ec-alpha", "-0.5"], 0, "--ec-alpha -0.5 must be in [0, 1]"),
    (["--algo", "ec", "--ec-temperature", "0"], 0, "--ec-temperature 0.0 must be in (0, 1000]"),
    (["--algo", "ec", "--ec-temperature", "-2"], 0, "--ec-temperature -2.0 must be in (0, 1000]"),
    (["--algo", "ec", "--ec-distill-size", "1025"], 2,
     "--ec-distill-size 1025 exceeds the 1024 training samples each of the 2 ranks holds"),
    (["--algo", "ec", "--ec-final", "best"], 0, "argument --ec-final: invalid choice: 'best'"),
    (["--algo", "ec", "--ec-distill-from", "peers"], 0,
     "argument --ec-distill-from: invalid choice: 'peers'"),
    (["--algo", "ma", "--ec-distill-from", "all"], 0,
     "--ec-distill-from is an option of ec, not of --algo ma"),
    # No round before the last update: no distillation at all (independent training).
    # 2 ranks, 1024 samples each, batch 32: 32 updates per rank.
    (["--algo", "ec", "--tau", "32"], 2,
     "--tau 32 never aggregates in 32 updates per rank (--epochs 1 x 32 batches of 32 from "
     "1024 samples per rank on 2 ranks; ec's rounds come after every tau updates but the "
     "last): give --tau below 32 or more --epochs"),
    (["--algo", "ec", "--tau-epochs", "2"], 2,
     "--tau-epochs 2.0 (64 local steps) never aggregates in 32 updates per rank"),
    (["--algo", "ec", "--tau-epochs", "3", "--epochs", "3"], 2,
     "give --tau-epochs of at most 2.9687 or more --epochs"),
    # Rounded up (.4g), the bound was 100, itself refused: 100 x 1024 is every update.
    (["--algo", "ec", "--tau-epochs", "101", "--epochs", "100", "--batch-size", "1"], 2,
     "give --tau-epochs of at most 99.999 or more --epochs"),
    # The default tau (20) against batch 64: 16 updates per rank.
    (["--algo", "ec", "--batch-size", "64"], 2,
     "--tau 20 (the default) never aggregates in 16 updates per rank"),
    (["--algo", "ec", "--ec-final", "ensemble", "--tau", "64"], 0,
     "--tau 64 never aggregates in 64 updates per rank"),
    # One rank: "on 1 rank", not "on 1 ranks" (a user trial's --tau 100000).
    (["--algo", "ec", "--tau", "100000"], 1,
     "2048 samples per rank on 1 rank; ec's rounds"),
    (["--algo", "ec", "--ec-distill-size", "2049"], 1,
     "--ec-distill-size 2049 exceeds the 2048 training samples the one rank holds"),
    # One update per rank: no tau can help (it said "give --tau below 1")
    (["--algo", "ec", "--batch-size", "1024"], 2,
     "last): give more --epochs or a smaller --batch-size"),
])
def test_bad_values_are_refused_naming_the_value(args, np, message, tmp_path):
    """Refused before MPI starts, on as many ranks as the job would have (0: one process)."""
    assert message in refusal([*SMALL, *args, "--out", str(tmp_path / "run")], max(np, 1))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("ranks, said", [
    (4, "resume it on at most 3 ranks"),  # 3: 4 x 11 = 44 updates per rank, 4: 32
    (64, "resume it on at most 3 ranks")])
def test_a_resume_on_ranks_where_tau_never_aggregates_names_what_helps(tmp_path, ranks, said):
    """A run resized onto more ranks has fewer updates per rank: the refusal said "give --tau
    below 32 or more --epochs", which --resume then refused (the run's own values)."""
    config = RunConfig(algo="ec", data=DataConfig(dataset="synthetic"),
                       optim=OptimConfig(epochs=4, batch_size=64),
                       checkpoint=CheckpointConfig(resume=str(tmp_path)))
    config = dataclasses.replace(config, algorithm=dataclasses.replace(config.algorithm, tau=40))
    config.algorithm_class.check(config, 2, 2048)  # the run as started
    with pytest.raises(UsageError) as refused:
        config.algorithm_class.check(config, ranks, 2048)
    assert str(refused.value).startswith(  # from Python: the fields given
        f"CheckpointConfig.resume on {ranks} ranks: the run's CompressionOptions.tau never "
        "aggregates in its ")
    assert str(refused.value).endswith(f"tau 40 updates): {said}")
    # --resume auto with nothing to resume is a first start: the first start's refusal
    fresh = dataclasses.replace(config, out=str(tmp_path / "new"), checkpoint=CheckpointConfig(
        resume="auto"))
    with pytest.raises(UsageError, match=r"^CompressionOptions.tau=40 never aggregates in \d+ "
                                         r"updates per rank \(OptimConfig.epochs=4 x"):
        config.algorithm_class.check(fresh, ranks, 2048)


def test_ec_on_one_worker_warns_that_it_distils_the_model_into_itself(capsys):
    """Its ensemble of one is its own model: self-distillation, which ran without a word."""
    config = RunConfig(algo="ec", data=DataConfig(dataset="synthetic"))
    config.algorithm_class.check(config, 2, 2048)
    assert capsys.readouterr().err == ""
    config.algorithm_class.check(config, 1, 2048)
    assert capsys.readouterr().err == (
        "hpctrain: warning: --algo ec on one worker: its ensemble is its own model, so each "
        "round distils the model into itself (self-distillation, not ensemble compression); "
        "give it 2 or more workers\n")


@pytest.mark.parametrize("args, np, message", [
    (["--algo", "ec", "--ec-final", "best"], 0, "argument --ec-final: invalid choice: 'best'"),
    (["--algo", "ec", "--ec-distill-size", "1025"], 2,
     "--ec-distill-size 1025 exceeds the 1024 training samples each of the 2 ranks holds"),
])
def test_bad_values_are_one_line_before_mpi(args, np, message, tmp_path):
    """A real job: rank 0 alone says it, in one line, exit status 2, before MPI starts."""
    proc = run_job(["train", *SMALL, *args, "--out", str(tmp_path / "run")], np=np, timeout=90)
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr  # rank 0 speaks for all, before MPI starts
    assert message in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


# 1024 samples per rank, batch 32: 32 steps per rank.
JOBS = {
    "ma": ["--algo", "ma", *SMALL, "--tau", "10", "--eval", "online", "--tensorboard"],
    "ma-tau-32": ["--algo", "ma", *SMALL, "--tau", "32"],
    **{f"ec-{placement}-{source}": [
        "--algo", "ec", *SMALL, "--tau-epochs", "0.25", "--ec-distill-size", "40",
        "--ec-final", "ensemble", "--data-placement", placement, "--ec-distill-from", source,
        "--tensorboard"]
       for placement, source in (("replicated", "own"), ("sharded", "own"), ("sharded", "all"))},
}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The jobs of the tests below, trained in one 2-rank launch: {name: (launch, out)}."""
    folder = tmp_path_factory.mktemp("jobs")
    proc = run_commands([["train", *args, "--out", str(folder / name)]
                         for name, args in JOBS.items()], np=2, timeout=280)
    return {name: (proc, folder / name) for name in JOBS}


def finished(proc, out) -> tuple[dict, list[dict]]:
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    points = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, points


def test_ma_job_ends_on_the_average(jobs, tmp_path):
    # 32 steps, tau 10 -> 3 rounds plus the final one.
    proc, out = jobs["ma"]
    summary, points = finished(proc, out)
    last = points[-1]
    for key in ("t", "epoch", "updates", "test_acc", "test_loss", "member_acc",
                "mean_member_acc", "ensemble_acc", "averaged_acc"):
        assert all(key in p for p in points), key
    # After the final average every rank holds the same model.
    assert last["member_acc"] == last["averaged_acc"] == last["mean_member_acc"] \
        == last["ensemble_acc"] == last["test_acc"] == summary["final_test_acc"]
    assert summary["final_test_acc"] > 0.5
    # The curve scores MA's model, the average, not rank 0's member between rounds.
    assert summary["final_model"] == "averaged"
    assert all(p["test_acc"] == p["averaged_acc"] for p in points)
    # TensorBoard: rank 0's member as scored online, the curve's model after training (both
    # were test/accuracy: the member's online, the average never).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    logged = {tag: {e.step: e.value for e in board.Scalars(tag)}
              for tag in ("test/accuracy", "test/member_accuracy")}
    assert logged["test/accuracy"] == pytest.approx({p["updates"]: p["test_acc"] for p in points})
    assert logged["test/member_accuracy"] == pytest.approx(
        {p["updates"]: p["member_acc"] for p in points})
    agg = summary["aggregation"]
    assert agg["rounds"] == 4 and summary["tau"] == 10 and summary["updates"] == 32
    assert agg["bytes_per_rank"] == 4 * (2 * (2 - 1) * summary["params"] * 4 // 2)
    assert agg["seconds_per_round"]["count"] == 4
    png = tmp_path / "curve.png"
    plot.main([str(out), "--out", str(png)])
    assert png.read_bytes().startswith(b"\x89PNG")


def test_ma_with_tau_past_the_run_still_averages_at_the_end(jobs):
    """Unlike ec (refused above), ma's final average after the last step is a real
    aggregation: a tau as long as the run is one-shot averaging."""
    summary, points = finished(*jobs["ma-tau-32"])
    assert summary["aggregation"]["rounds"] == 1 and summary["updates"] == 32
    assert points[-1]["member_acc"] == points[-1]["averaged_acc"]


# Replicated: sample ids (8 bytes) go out; sharded: the 16x16 float32 images themselves, and
# their labels too when every worker's draw is shared.
@pytest.mark.parametrize("placement, source, item_bytes", [
    ("replicated", "own", 8), ("sharded", "own", 16 * 16 * 4), ("sharded", "all", 16 * 16 * 4 + 8),
])
def test_ec_job_reports_members_and_ensemble(jobs, placement, source, item_bytes):
    proc, out = jobs[f"ec-{placement}-{source}"]
    summary, points = finished(proc, out)
    # 32 steps, tau 8: rounds after steps 8, 16 and 24; none on the last step.
    assert summary["tau"] == 8 and summary["aggregation"]["rounds"] == 3
    # 40 samples to the other rank; 40 rows of 10 probabilities back to it, or (all) a ring
    # allreduce of all 80 rows: each rank sends half of them twice.
    back = 40 * 10 * 4 if source == "own" else 80 * 10 * 4
    assert summary["aggregation"]["bytes_per_round"] == 40 * item_bytes + back
    assert summary["distilled_samples_per_rank"] == 3 * 40
    name = "EC tau=8" + (" from all" if source == "all" else "")
    assert [c[0] for c in plot.curves(out)] == [f"{name} (member)", f"{name} (ensemble)"]
    assert all(p["test_acc"] == p["ensemble_acc"] for p in points)  # --ec-final ensemble
    assert summary["final_member_acc"] == points[-1]["member_acc"]
    assert "averaged_acc" not in points[-1]
    members = torch.load(out / "ensemble.pt", weights_only=True)["members"]
    assert len(members) == 2
    assert any(not torch.equal(members[0][k], members[1][k]) for k in members[0])
    rank0 = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(rank0[k], members[0][k]) for k in rank0)
    # TensorBoard: train/loss's parts beside it, the distillation term's from the first
    # round's relabelled samples on (after step 8)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    for tag in ("train/loss", "train/ce_loss", "train/distill_loss"):
        assert [e.step for e in board.Scalars(tag)] == [10, 20, 30, 32], tag


def test_the_plot_script_names_a_run_it_cannot_draw(tmp_path, capsys):
    """A run of another algorithm was a KeyError traceback, a missing folder a
    FileNotFoundError, and --ymin nan reached matplotlib."""
    (tmp_path / "sgd").mkdir()
    (tmp_path / "sgd" / "summary.json").write_text(json.dumps({"algo": "sgd"}))
    png = tmp_path / "x.png"
    for run, said in ((tmp_path / "sgd", f"{tmp_path / 'sgd'} is a run of --algo sgd, not ma "
                                         "or ec"),
                      (tmp_path / "none", "cannot read a finished run's summary from ")):
        with pytest.raises(SystemExit) as e:
            plot.main([str(run), "--out", str(png)])
        assert e.value.code == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("hpctrain.ec.plot: error: ") and said in line
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "sgd"), "--out", str(png), "--ymin", "nan"])
    assert "--ymin: must be in [0, 1), got nan" in capsys.readouterr().err
    assert not png.exists()


@pytest.mark.parametrize("eval_every", [0.1, 0.001], ids=["after-a-step", "at-a-snapshot"])
def test_ma_stopped_within_a_round_saves_the_average_it_scores(tmp_path, eval_every):
    """--stop-on-collapse ends ma at update 5 of a round of 7 (simulated: the real loop, 2
    workers): the run averages once more, so model.pt is the average that test_acc scores, not
    rank 0's member. At eval 0.001 the stop falls on a snapshot (of the members, kept as the
    final point), and model.pt still takes the average."""
    config = RunConfig(algo="ma", seed=0, out=str(tmp_path), progress=False,
                       data=DataConfig(dataset="synthetic"), model=ModelConfig(name="mlp"),
                       optim=OptimConfig(epochs=2, batch_size=50, lr=3.0),
                       algorithm=AveragingOptions(tau=7), stop_on_collapse=True,
                       eval_every=eval_every)
    summary = simulate(config, SimConfig(workers=2, step_time="constant:0.01"))
    assert summary["stopped_on_collapse"] and summary["updates"] % summary["tau"] != 0
    assert summary["aggregation"]["rounds"] == 1  # none in the 5 updates, one at the stop
    test = data.load("synthetic", "test")
    saved = models.build("mlp", test.shape, test.num_classes)
    saved.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    acc, loss = evaluate(saved, test)
    assert acc == summary["final_test_acc"] == summary["final_averaged_acc"]
    assert loss == pytest.approx(summary["final_test_loss"], rel=1e-6)
    if eval_every == 0.001:  # the final point's members: rank 0's is another model
        assert summary["final_member_acc"] != acc
