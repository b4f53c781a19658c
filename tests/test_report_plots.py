"""What ``hpctrain report`` and the plot scripts say and draw: report.md's sentences on how the
runs were scored and what they trained, the error plot's range, and the plot scripts' errors
and writes. Hand-written run folders: no job is launched."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from matplotlib.image import imread

from hpctrain import plots
from hpctrain.bench.report import document, plotting, reading, remarks, rendering, tables
from hpctrain.ec import plot as ec_plot
from hpctrain.shuffle import plot as shuffle_plot

SUMMARY = {"algo": "sgd", "workers": 1, "final_test_acc": 0.9, "best_test_acc": 0.9,
           "wall_s": 12.0, "samples_per_s": 100.0, "model": "mlp", "dataset": "synthetic",
           "epochs": 1, "eval_mode": "after", "simulated": False}
POINTS = [{"t": 0.0, "epoch": 0.0, "test_acc": 0.1}, {"t": 6.0, "epoch": 0.5, "test_acc": 0.85},
          {"t": 12.0, "epoch": 1.0, "test_acc": 0.9}]
SCORED_AFTER = ("snapshots are taken every `--eval-every` epochs and scored after training, so "
                "evaluation is not in the clock.")


def runs(folder, **updates: dict) -> None:
    """``folder`` with one finished run per keyword: its name (also the algorithm it ran,
    unless the update names another), and what its summary changes."""
    for name, update in updates.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "summary.json").write_text(json.dumps({**SUMMARY, "algo": name,
                                                                **update}))
        (folder / name / "metrics.jsonl").write_text(
            "".join(json.dumps(p) + "\n" for p in POINTS))


def report_md(folder) -> str:
    rendering.render(folder)
    return (folder / "report.md").read_text()


def test_a_report_of_runs_that_agree_keeps_its_sentences(tmp_path):
    """Nothing differs: the sentences are those reports always had (no new marks)."""
    runs(tmp_path, a={}, b={"eval_mode": "after"})
    text = report_md(tmp_path)
    assert "\nModel mlp on synthetic; epochs: 1.\n" in text
    assert SCORED_AFTER in text.replace("\n", " ")
    assert "imulated" not in text and "differ" not in text
    assert [line for line in text.splitlines() if line.startswith("| a ")] == [
        "| a | 1 | 0.9000 | 0.9000 | 12.0 | 6 s (0.50 ep) | 6 s (0.50 ep) | 100 | — | — | — | ok |"]


def test_the_report_says_how_each_run_was_scored(tmp_path):
    """It said "scored after training, so evaluation is not in the clock" of every run, also
    of one scored online on rank 0, whose wall time holds its evaluation."""
    runs(tmp_path / "one", a={"eval_mode": "online"})
    assert ("snapshots are taken every `--eval-every` epochs and scored while training, on rank "
            "0 between steps, so evaluation is in the clock.") in report_md(
        tmp_path / "one").replace("\n", " ")
    runs(tmp_path / "mixed", a={}, b={"eval_mode": "online"}, c={"eval_mode": "online (rank 2)"},
         d={"eval_mode": "after"})
    text = report_md(tmp_path / "mixed").replace("\n", " ")
    assert ("snapshots are taken every `--eval-every` epochs and scored after training, so "
            "evaluation is not in the clock (a, d); scored while training, on rank 0 between "
            "steps, so evaluation is in the clock (b); scored while training, on a rank that "
            "does not train (`--eval-rank`), so evaluation is not in the clock (c).") in text
    rows = [reading.Row("x", "ok", summary={"eval_mode": mode}) for mode in ("after", 3)]
    assert remarks.scoring(rows).endswith("; scored in a way the summary's `eval_mode` does not "
                                         "name (x)")


def test_the_report_says_whether_evaluation_is_in_each_runs_clock(tmp_path):
    """ma and ec with --eval online score their curve after training but rank 0's member
    between steps: the report said their evaluation was not in the clock, beside ssgd's that
    was. Summaries from before eval_in_clock read as before."""
    runs(tmp_path, ssgd={"eval_mode": "online", "eval_in_clock": True},
         ma={"eval_mode": "after", "eval_in_clock": True}, old={"eval_mode": "online"},
         sgd={"eval_mode": "online", "eval_in_clock": False})
    text = report_md(tmp_path).replace("\n", " ")
    assert ("snapshots are taken every `--eval-every` epochs and scored after training, but "
            "rank 0's own model was scored between steps too (`--eval online`), so evaluation "
            "is in the clock (ma); scored while training, on rank 0 between steps, so "
            "evaluation is in the clock (old, ssgd); scored on rank 0 before and after "
            "training, none between steps, so evaluation is not in the clock (sgd).") in text
    rows = [reading.Row("x", "ok", summary={"eval_mode": "after", "eval_in_clock": False})]
    assert remarks.scoring(rows) == remarks.SCORING["after"]


def test_the_report_names_the_model_data_and_epochs_of_each_run_where_they_differ(tmp_path):
    """A folder of runs of 2, 60 and 1 epochs said "epochs: 2": the first run's."""
    runs(tmp_path / "epochs", a={"epochs": 2}, b={"epochs": 60}, c={"epochs": 1})
    assert ("\nModel mlp on synthetic. **The runs differ in** epochs 2 (a); 60 (b); 1 (c).\n"
            in report_md(tmp_path / "epochs"))
    runs(tmp_path / "models", a={}, b={"model": "lenet", "dataset": "mnist"}, c={})
    assert ("\nEpochs: 1. **The runs differ in** model mlp (a, c); lenet (b); and data set "
            "synthetic (a, c); mnist (b).\n") in report_md(tmp_path / "models")


def configured(folder, optim: dict | None = None, algorithm: dict | None = None,
               argv: tuple[str, ...] = (), **run_info) -> None:
    """A config.json in run ``folder``: defaults but ``optim``'s and ``algorithm``'s, and
    ``run_info`` with ``argv``, the command line after the program."""
    (folder / "config.json").write_text(json.dumps({
        "algo": folder.name, "out": str(folder), "progress": True, "seed": 0,
        "model": {"name": "mlp", "args": None}, "algorithm": algorithm or {},
        "optim": {"batch_size": 64, "epochs": 1, "lr": 0.05, "momentum": 0.9, **(optim or {})},
        "run_info": {"argv": ["/x/hpctrain/__main__.py", *argv], **run_info}}))


def test_the_report_names_every_training_setting_that_differs_between_runs(tmp_path):
    """With the defaults, sgd and ssgd ran at lr 0.05 and momentum 0.9 and asgd at lr 0.1 and
    momentum 0, but the report gave only the options typed; a folder's runs of other batch
    sizes and lr said nothing of them, and had no commands."""
    runs(tmp_path, sgd={}, ssgd={}, asgd={}, ma={}, ma2={"algo": "ma"})
    for name in ("sgd", "ssgd"):
        configured(tmp_path / name, argv=("train", "--algo", name, "--out", f"o/{name}"))
    configured(tmp_path / "asgd", {"lr": 0.1, "momentum": 0.0}, {"shards": None},
               resolved={"algorithm": {"shards": 2}})
    configured(tmp_path / "ma", algorithm={"tau": None}, resolved={"algorithm": {"tau": 20}})
    configured(tmp_path / "ma2", {"batch_size": 16}, {"tau": 5})
    text = report_md(tmp_path)
    assert ("\n**The runs' training settings differ** (their config.json, where a setting left "
            "to a default is the algorithm's; —: the run has no such setting (another "
            "algorithm's option, or a config.json from an older hpctrain)):\n\n"
            "| runs | `--batch-size` | `--lr` | `--momentum` | `--tau` |\n|---|---|---|---|---|\n"
            "| asgd | 64 | 0.1 | 0 | — |\n"
            "| ma | 64 | 0.05 | 0.9 | 20 |\n"
            "| ma2 | 16 | 0.05 | 0.9 | 5 |\n"
            "| sgd, ssgd | 64 | 0.05 | 0.9 | — |\n") in text  # shards: asgd's alone
    assert ("\n## Commands\n\nEach run's command line, as its config.json records it "
            "(without the launcher that started its processes: mpirun, srun, torchrun; a "
            "script's with `python` before it).\n\n"
            "- sgd: `hpctrain train --algo sgd --out o/sgd`\n") in text
    # What differs only in where a run wrote and what it showed, or in its seed where that is
    # in its name, is no setting: nothing is added.
    rows = [reading.Row("sgd", "ok", seed=seed, summary=SUMMARY, config={
        "out": f"o/{seed}", "seed": seed, "progress": seed == 1, "optim": {"lr": 0.05}})
        for seed in (1, 2)]
    assert remarks.differing_settings(rows) is None
    for row in rows:  # runs of a folder: their seed is a setting
        row.seed = None
    assert "| runs | `--seed` |" in remarks.differing_settings(rows)


def test_a_run_started_from_a_script_is_given_the_scripts_command(tmp_path):
    """A run of hpctrain.train in ``train_py.py runs/py1`` (under mpirun or torchrun) was
    listed as ``hpctrain runs/py1``: the script's arguments after ``hpctrain``, which fail
    when pasted; one of ``python my_script.py`` alone had no command."""
    runs(tmp_path, py1={"algo": "ssgd"}, mine={"algo": "ssgd"}, cli={"algo": "ssgd"},
         shell={"algo": "ssgd"})
    for name, argv in (("py1", ["train_py.py", "runs/py1", "a b"]), ("mine", ["my_script.py"]),
                       ("cli", ["/venv/bin/hpctrain", "train", "--out", "o"]),
                       ("shell", ["-c"])):
        configured(tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        config["run_info"] = {"argv": argv, "launcher": "torchrun"}
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    text = report_md(tmp_path)
    assert "- py1: `python train_py.py runs/py1 'a b'`\n" in text
    assert "- mine: `python my_script.py`\n" in text
    assert "- cli: `hpctrain train --out o`\n" in text
    assert f"- shell: {reading.FROM_PYTHON}\n" in text
    assert reading.recorded_command(["/x/hpctrain/__main__.py", "train"]) == "hpctrain train"
    assert reading.recorded_command(["/k/ipykernel_launcher.py", "-f", "k.json"]) == \
        reading.FROM_PYTHON
    assert reading.recorded_command(["/venv/bin/hpctrain"]) is None  # no command of its own
    assert reading.recorded_command([]) is None and reading.recorded_command("x") is None


def test_a_model_args_difference_is_a_setting_that_differs():
    """Runs with ``--model-args '{"width": 4}'`` and with the builder's default said only that
    their seeds differed: the object was split by key, each key in one run only, and a key some
    runs lack did not count. --model-args is compared whole; a setting (not an algorithm's
    option) some runs' config.json lacks differs too."""
    def row(name: str, args: dict | None, seed: int = 0, **more) -> reading.Row:
        return reading.Row(name, "ok", summary=SUMMARY, config={
            "seed": seed, "model": {"name": "nets.py:build", "args": args},
            "optim": {"lr": 0.05}, **more})

    rows = [row("w4", {"width": 4}), row("w4seed2", {"width": 4}, 2), row("w8", None)]
    assert remarks.differing_settings(rows).endswith(
        "| runs | `--model-args` | `--seed` |\n|---|---|---|\n"
        '| w4 | {"width": 4} | 0 |\n| w4seed2 | {"width": 4} | 2 |\n| w8 | none | 0 |')
    rows = [row("a", {"width": 4, "depth": 2}), row("b", {"width": 8, "depth": 2})]
    assert '| a | {"depth": 2, "width": 4} |\n| b | {"depth": 2, "width": 8} |' in \
        remarks.differing_settings(rows)
    # The same object in another key order is the same setting (json.dumps keeps the order)
    rows = [row("ab", {"a": 1, "b": 2}), row("ba", {"b": 2, "a": 1})]
    assert remarks.differing_settings(rows) is None
    rows = [row("old", None), row("new", None, threads=1)]
    assert remarks.differing_settings(rows).endswith(
        "| runs | `--threads` |\n|---|---|\n| old | — |\n| new | 1 |")


def test_the_training_options_line_can_be_pasted_into_a_shell():
    """It wrote ``--model-args {"width": 4}`` unquoted, as the Commands section does not."""
    record = {"algos": ["ssgd"], "workers": 2, "runs": {},
              "train_args": ["--model-args", '{"width": 4}', "--epochs", "1"]}
    assert "Training options: `--model-args '{\"width\": 4}' --epochs 1` (each run" in \
        document.markdown(record, [], [])


def test_a_simulated_comparisons_time_axis_says_it_is_virtual():
    simulated = reading.Row("asgd", "ok", summary={"simulated": True})
    real = reading.Row("sgd", "ok", summary={})
    assert plotting.x_label([simulated], "t") == "virtual time (s, simulated)"
    assert plotting.x_label([simulated, real], "t") == "wall time (s)"  # marked in the report
    assert plotting.x_label([simulated], "epoch") == plotting.PLOTS["epoch"][1]


def test_simulated_runs_among_real_ones_are_marked(tmp_path):
    """Their virtual seconds stood in the wall time column beside real seconds, unmarked."""
    runs(tmp_path / "mixed", real={}, sim={"simulated": True})
    text = report_md(tmp_path / "mixed")
    assert ("\nSimulated by `hpctrain simulate` (virtual workers in one process), marked "
            "(simulated) in the table: sim. Their wall times and times to a target are virtual "
            "seconds, not comparable with the other runs'.\n") in text
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["| real", "| sim (simulated)"]
    seeds = [reading.Row(name, "ok", seed=seed, summary={**SUMMARY, "simulated": simulated})
             for name, simulated in (("asgd", True), ("ssgd", False)) for seed in (1, 2)]
    assert [line.split(" | ")[0] for line in tables.seed_table(seeds, [0.8]).splitlines()[2:]] \
        == ["| asgd (simulated)", "| ssgd"]
    runs(tmp_path / "all", sim={"simulated": True})
    text = report_md(tmp_path / "all")
    assert ("\nSimulated (`hpctrain simulate`): virtual workers in one process; wall times are "
            "virtual seconds.\n") in text and "| sim |" in text


def test_a_simulated_comparison_says_what_set_its_times(tmp_path):
    """The header named only --workers: the step-time model, stragglers and training subset,
    which set every time and staleness figure, were left to each run's command."""
    simulation = {"step_time": "lognormal:0.01:0.5", "comm_time": "model", "latency": 5e-05,
                  "bandwidth": 4e9, "store_latency": 5e-05, "store_bandwidth": 4e9,
                  "train_subset": 6000, "inference_s_per_sample": 2e-05,
                  "inference_from": "step time"}
    rows = [reading.Row(algo, "ok", seed=seed, summary={
        **SUMMARY, "algo": algo, "simulated": True, "slowdown": "0:4", "jitter": 0.0,
        "simulation": {**simulation, "timing_seed": seed}})
        for algo in ("asgd", "ec") for seed in (1, 2)]
    assert remarks.simulator_settings(rows) == (
        "Simulator settings, which set every time and staleness figure: "
        "`--step-time lognormal:0.01:0.5`, `--timing-seed` each run's `--seed`, "
        "`--comm-time model`, `--latency 5e-05`, `--bandwidth 4e+09`, `--store-latency 5e-05`, "
        "`--store-bandwidth 4e+09`, `--train-subset 6000`, `--slowdown 0:4`, `--jitter 0`, "
        "ec's inference per sample 2e-05 s (step time).")
    rows[0].summary["simulation"]["timing_seed"] = 7  # held fixed, but on one run
    assert "`--timing-seed` 7 (asgd seed 1); 2 (asgd seed 2, ec seed 2); 1 (ec seed 1)" in \
        remarks.simulator_settings(rows)
    runs(tmp_path / "sim", asgd={"simulated": True, "simulation": simulation, "jitter": 0.3})
    assert "\nSimulator settings, which set every time and staleness figure: `--step-time " \
        "lognormal:0.01:0.5`, `--comm-time model`," in report_md(tmp_path / "sim")
    assert remarks.simulator_settings([reading.Row("ssgd", "ok", summary=SUMMARY)]) is None


def test_the_error_range_leaves_room_above_runs_near_zero_error():
    """Median final error 0: the range was [0, 0.5]%, a run at 4% error off the plot."""
    low, high = plotting._error_range([[90.0, 0.0, 0.0], [90.0, 0.1, 0.0], [90.0, 6.0, 4.0]])
    assert low == 0.0 and 4.0 < high <= 10.0
    # 2.5 times the median still rules where it is the larger (the plots do not change).
    assert plotting._error_range([[90.0, 30.0, 12.0], [90.0, 40.0, 20.0], [90.0, 25.0, 10.0]]) \
        == (9.0, 31.0)


def test_the_error_range_holds_the_seeds_bands():
    """Sized by the mean curves alone, the axis showed 60.5-68% while one seed ended at 47.7%
    and the other stayed at 74%: the band covered the plot. The untrained start still stays
    out, and a diverged seed above the cap still does not stretch the axis."""
    mean = [[80.1, 67.6, 64.1, 60.9], [80.1, 67.2, 65.9, 60.9]]
    bands = [[74.2, 60.9, 53.9, 47.7], [85.9, 74.2, 74.2, 74.2],
             [74.2, 60.2, 57.7, 47.7], [85.9, 74.2, 74.2, 74.2]]
    assert plotting._error_range(mean) == pytest.approx((60.4, 68.1))  # as it was
    low, high = plotting._error_range(mean, bands)
    assert 45.0 < low < 47.7 and 74.2 < high < 80.0
    converging = [[90.0, 30.0, 12.0], [90.0, 40.0, 20.0], [90.0, 25.0, 10.0]]
    assert plotting._error_range(converging, [[90.0, 5.0, 4.0], [90.0, 95.0, 90.0]]) == \
        pytest.approx((2.7, 31.3))  # to 2.5 times the median, 12
    rows = [reading.Row("ssgd", "ok", summary=SUMMARY, seed=seed, points=[
        {"t": 0.0, "epoch": 0.0, "test_acc": 0.1}, {"t": 1.0, "epoch": 1.0, "test_acc": acc}])
        for seed, acc in ((1, 0.55), (2, 0.25))]  # the band 45-75%, its mean 60%
    low, high = plotting.figure(rows, "epoch").axes[0].get_ylim()
    assert low < 45.0 and high > 75.0


def test_a_curve_above_the_range_says_its_limit_in_three_digits():
    """It said "(above 0%)" of a limit of 0.5%."""
    curve = plotting.Curve("asgd", "asgd, M=4", [0.0, 1.0], [90.0, 80.0])
    assert plotting.legend_label(curve, (0.0, 0.5)) == "asgd, M=4 (above 0.5%)"
    assert plotting.legend_label(curve, (0.0, 85.0)) == "asgd, M=4"


def test_a_folders_runs_are_named_by_their_algorithm_and_folder(tmp_path):
    """A folder's runs were named by their folders alone: the algorithm column and the
    legend said "da, M=2" of a dcasgd-a run, drawn in another colour than dcasgd-a's. Now
    they say the algorithm its summary (or, unfinished, its config.json) names, and the
    folder where that is another name."""
    runs(tmp_path, da={"algo": "dcasgd-a", "workers": 2}, sgd={}, cut={"algo": "asgd"},
         own={"algo": "/x/vote.py:Vote", "algo_label": "vote"})  # a user's: its name
    (tmp_path / "cut" / "metrics.jsonl").unlink()  # a failed row
    for late, algo in (("late", "ssgd"), ("later", "/x/vote.py:Vote")):
        (tmp_path / late).mkdir()
        (tmp_path / late / "config.json").write_text(json.dumps({"algo": algo}))
    text = report_md(tmp_path)
    assert [line.split(" | ")[:2] for line in text.splitlines() if line.startswith("| ")][1:] \
        == [["| asgd (cut)", "—"], ["| dcasgd-a (da)", "2"], ["| ssgd (late)", "—"],
            ["| Vote (later)", "—"], ["| vote (own)", "1"], ["| sgd", "1"]]
    _, rows = reading.load(tmp_path)
    (ax,) = plotting.figure(rows, "epoch").axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "dcasgd-a (da), M=2", "vote (own), M=1", "sgd, M=1",
        "not drawn: asgd (cut) failed; ssgd (late) unfinished; Vote (later) unfinished"]
    # dcasgd-a's colour, as in every report
    assert ax.get_lines()[0].get_color() == plotting._style("dcasgd-a", 0)[0]


def test_the_plots_name_the_runs_they_have_no_line_of():
    """ma and dcasgd-a failed on both seeds: the plots showed sgd's line alone, and nothing
    said the other two had failed. A mean over fewer seeds than ran says of how many."""
    def row(name: str, seed: int | None, ok: bool = True) -> reading.Row:
        points = [{**p, "test_acc": p["test_acc"] - 0.01 * (seed or 0)} for p in POINTS]
        return reading.Row(name, "ok", summary=SUMMARY, points=points, seed=seed) if ok else \
            reading.Row(name, "failed", error="exited on signal 9", seed=seed)

    rows = [row("sgd", 1), row("sgd", 2, ok=False), *(row(name, seed, ok=False)
            for name in ("ma", "dcasgd-a") for seed in (1, 2))]
    for x in plotting.PLOTS:
        (ax,) = plotting.figure(rows, x).axes
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            "sgd, M=1, mean of 1 of 2 seeds", "not drawn: ma failed; dcasgd-a failed"]
    rows = [row("sgd", None, ok=False), reading.Row("ssgd", "not run"),
            reading.Row("asgd", "ok", summary=SUMMARY)]  # its curve points all unusable
    (ax,) = plotting.figure(rows, "t").axes  # no line at all: the legend still says why
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "not drawn: sgd failed; ssgd not run; asgd without curve points"]


def test_the_plots_say_which_line_trained_which_model_and_data(tmp_path):
    """Runs of mlp and lenet, on synthetic and fashion-mnist: the title said "mlp, lenet on
    synthetic, fashion-mnist" and no line said which it was."""
    runs(tmp_path, a={"algo": "sgd"}, c={"algo": "sgd", "model": "lenet"},
         d={"algo": "sgd", "model": "lenet", "dataset": "fashion-mnist"})
    _, rows = reading.load(tmp_path)
    (ax,) = plotting.figure(rows, "t", plotting.figure_title({}, rows)).axes
    assert ax.get_title() == "each line's model and data set"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "sgd (a), M=1, mlp on synthetic", "sgd (c), M=1, lenet on synthetic",
        "sgd (d), M=1, lenet on fashion-mnist"]
    rows.pop()  # one data set: the title names it, each line its model
    assert plotting.figure_title({}, rows) == "each line's model on synthetic"
    assert [c.label for c in plotting.curves(rows, "t")] == ["sgd (a), M=1, mlp",
                                                           "sgd (c), M=1, lenet"]
    assert plotting.figure_title({"train_args": ["--jitter", "0.2"]}, rows[:1]) == \
        "mlp on synthetic, --jitter 0.2"


def test_an_ec_line_says_which_of_its_models_it_scores():
    """A comparison of ma and ec: ec's line read "ec, M=4" alone, though its points are rank
    0's member (the default) or the ensemble; only report.md's text said which."""
    def row(algo: str, final: str | None, seed: int | None = None) -> reading.Row:
        summary = {**SUMMARY, "algo": algo, "workers": 4}
        if final is not None:
            summary["final_model"] = final
        return reading.Row(algo, "ok", seed=seed, summary=summary, points=POINTS)

    rows = [row("ma", "averaged"), row("ec", "member")]
    assert [c.label for c in plotting.curves(rows, "t")] == [
        "ma, M=4", "ec, M=4, rank 0's member"]
    (ax,) = plotting.figure(rows, "epoch", "t").axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "ma, M=4", "ec, M=4, rank 0's member"]
    seeds = [row("ec", "ensemble", 1), row("ec", "ensemble", 2)]
    assert [c.label for c in plotting.curves(seeds, "epoch")] == [
        "ec, M=4, mean of 2 seeds, ensemble"]
    assert plotting.curves([row("ec", None)], "t")[0].label == "ec, M=4, rank 0's member"


def test_a_title_of_a_users_paths_names_their_files_and_fits_the_figure():
    """A run of ``/tmp/trial-researcher/mynet.py:build`` on ``imagefolder:/tmp/...``: the
    title held both absolute paths on one line and ran past the figure's edges."""
    long = "/tmp/trial-researcher/" + "a-long-folder-name/" * 3
    summary = {**SUMMARY, "model": f"{long}mynet.py:build", "dataset": f"imagefolder:{long}imgs/"}
    rows = [reading.Row("ssgd", "ok", summary=summary, points=POINTS)]
    title = plotting.figure_title(
        {"train_args": ["--jitter", "0.2", "--slowdown", "0:2,1:3,2:4"]}, rows)
    assert title == "mynet.py:build on imagefolder:imgs, --slowdown 0:2,1:3,2:4, --jitter 0.2"
    fig = plotting.figure(rows, "t", title + ", and a few more words to take it past one line")
    (ax,) = fig.axes
    assert ax.get_title() == ("mynet.py:build on imagefolder:imgs, --slowdown\n0:2,1:3,2:4, "
                              "--jitter 0.2, and a few more words to\ntake it past one line")
    fig.canvas.draw()
    drawn = ax.title.get_window_extent()
    assert 0 <= drawn.x0 and drawn.x1 <= fig.bbox.width
    other = reading.Row("sgd", "ok", summary={**summary, "model": "lenet"}, points=POINTS)
    assert [c.label for c in plotting.curves([*rows, other], "t")] == [
        "ssgd, M=1, mynet.py:build", "sgd, M=1, lenet"]  # each line's model, by its file
    # Two data sets of one folder name stay two (they were one once shortened), and a name
    # with a hyphen is not broken there.
    elsewhere = reading.Row("sgd", "ok", points=POINTS,
                           summary={**summary, "dataset": "imagefolder:/data/imgs"})
    assert plotting._trained_on([*rows, elsewhere], ("dataset",)) == \
        ", imagefolder:imgs / imagefolder:imgs"
    (ax,) = plotting.figure(rows, "t", "x" * 45 + " fashion-mnist").axes
    assert ax.get_title() == "x" * 45 + "\nfashion-mnist"


def test_curves_that_lie_on_each_other_both_show(tmp_path):
    """ssgd's mean curve lay under ma's, drawn after it with the same marker and width: only
    the legend showed it. Each curve now has its own hollow marker, and each drawn later is
    narrower, so that the one under it shows at its edges."""
    runs(tmp_path, ssgd={}, ma={}, asgd={"algo": "sgd"}, sgd={})  # the same points each
    _, rows = reading.load(tmp_path)
    lines = plotting.figure(rows, "t").axes[0].get_lines()
    assert len({line.get_marker() for line in lines}) == len(lines) == 4
    assert all(line.get_markerfacecolor() == "none" for line in lines)
    widths = [line.get_linewidth() for line in lines]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 4
    # two runs of one algorithm (sgd): each its own colour, not sgd's for both
    assert len({line.get_color() for line in lines}) == 4


def shuffle_run(folder, epochs=(0.0, 0.5, 1.0), acc=(0.1, 0.5, 0.7), strategy="global",
                partition="iid", workers=2):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"data": {"shuffle": strategy, "partition": partition}, "seed": 0}))
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"t": e, "epoch": e, "test_acc": a}) + "\n" for e, a in zip(
            epochs, acc, strict=True)))
    (folder / "summary.json").write_text(json.dumps(
        {"workers": workers, "final_test_acc": acc[-1], "best_test_acc": max(acc),
         "bytes_moved": 0, "exchange_s": 0.0, "epochs": 1}))
    return str(folder)


def test_the_shuffle_plot_keeps_partitions_and_worker_counts_apart(tmp_path):
    """Runs were grouped by --shuffle alone: an iid and a label-skew run (or K = 2 and K = 8)
    were averaged into one line "local (mean of 2 seeds)", and one row of the spread table."""
    runs = [shuffle_run(tmp_path / "iid", strategy="local"),
            shuffle_run(tmp_path / "skew", strategy="local", partition="label-skew",
                        acc=(0.1, 0.2, 0.3))]
    assert list(shuffle_plot.lines(runs)) == ["local", "local, label-skew"]
    assert "| 2 | local, label-skew | 1 | 0.3000 |" in shuffle_plot.spread_table(runs)
    runs.append(shuffle_run(tmp_path / "k8", strategy="local", workers=8))
    assert list(shuffle_plot.lines(runs)) == ["K = 2, local", "K = 2, local, label-skew",
                                              "K = 8, local"]


def ec_run(folder, acc=(0.1, 0.3, 0.5), **summary):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"algo": "ma", "tau": 4, **summary}))
    (folder / "config.json").write_text(json.dumps({"algorithm": {}}))
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"t": t, "epoch": t, "test_acc": a, "averaged_acc": a}) + "\n"
        for t, a in enumerate(acc)))
    return str(folder)


def one_line(capsys, main, argv) -> str:
    """What ``main(argv)`` says on stderr: exactly one line, and exit status 2."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    return line


def test_the_shuffle_plot_names_what_it_cannot_draw_in_one_line(tmp_path, capsys):
    """Runs evaluated at other epochs were a UsageError traceback (exit 1), a missing run
    folder and --out in a missing folder FileNotFoundError tracebacks."""
    a = shuffle_run(tmp_path / "a")
    b = shuffle_run(tmp_path / "b", epochs=(0.0, 0.25, 1.0))
    png = tmp_path / "x.png"
    for argv, said in (
            ([a, b], "hpctrain.shuffle.plot: error: --shuffle global: runs were evaluated at "
                     "different epochs"),
            ([a, str(tmp_path / "none")], "hpctrain.shuffle.plot: error: cannot read a run's "
                                          f"config.json from {tmp_path / 'none' / 'config.json'}")):
        assert one_line(capsys, shuffle_plot.main, [*argv, "--out", str(png)]).startswith(said)
    assert not png.exists()
    out = tmp_path / "missing" / "x.png"
    for main, run in ((shuffle_plot.main, a), (ec_plot.main, ec_run(tmp_path / "ma"))):
        line = one_line(capsys, main, [run, "--out", str(out)])
        assert line.endswith(f": error: cannot write {out}: No such file or directory"), line
    assert not out.parent.exists()
    shuffle_plot.main([a, "--out", str(png), "--table"])
    assert imread(png).shape[2] in (3, 4)
    assert "| 2 | global | 0 | 0.7000 |" in capsys.readouterr().out


def test_what_the_plots_read_wrongly_is_one_line(tmp_path, capsys):
    """An edited or other tool's ma run ended ec.plot in a KeyError/AttributeError traceback;
    an empty curve drew an empty figure and a run given twice was "a mean of 2 runs", both
    with exit 0; argparse's errors said "plot.py"."""
    png = tmp_path / "x.png"
    ma = ec_run(tmp_path / "ma")
    said = {}
    for name, edit in (("no-tau", lambda f: (f / "summary.json").write_text('{"algo": "ma"}')),
                       ("no-avg", lambda f: (f / "metrics.jsonl").write_text(
                           '{"t": 0, "epoch": 0, "test_acc": 0.1}\n')),
                       ("null", lambda f: (f / "config.json").write_text('{"algorithm": null}')),
                       ("empty", lambda f: (f / "metrics.jsonl").write_text(""))):
        run = ec_run(tmp_path / name)
        edit(Path(run))
        said[name] = one_line(capsys, ec_plot.main, [run, "--out", str(png)])
    assert said["no-tau"].endswith("summary.json has no tau (not an ma run's summary)")
    assert said["no-avg"].endswith("point 1 has no averaged_acc (not an ma run's curve)")
    assert said["null"].endswith("algorithm is None, not the run's algorithm options")
    assert said["empty"].endswith(f"{tmp_path / 'empty' / 'metrics.jsonl'} holds no curve point")
    assert one_line(capsys, ec_plot.main, [ma, ma, "--out", str(png)]) == \
        f"hpctrain.ec.plot: error: {ma} is given twice"
    run = shuffle_run(tmp_path / "s")
    assert one_line(capsys, shuffle_plot.main, [run, f"{run}/", "--out", str(png)]) \
        == f"hpctrain.shuffle.plot: error: {run}/ is given twice (as {run})"
    assert not png.exists()
    with pytest.raises(SystemExit):  # argparse's usage line, then its error
        ec_plot.main(["--out", str(png)])
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "python -m hpctrain.ec.plot: error: the following arguments are required")


def test_the_ec_plot_tells_runs_apart_and_says_what_their_time_holds(tmp_path):
    """Two seeds' ma runs were both "MA tau=4 (averaged)", and the time axis said "training
    only" of runs whose time held their evaluation (--eval online: eval_in_clock)."""
    png = str(tmp_path / "x.png")

    def drawn(*runs) -> tuple[list[str], str]:
        ax = ec_plot.plot(list(runs), png, "t", 0.0)
        return [t.get_text() for t in ax.get_legend().get_texts()], ax.get_xlabel()

    seeds = [ec_run(tmp_path / "ma" / f"seed-{s}") for s in (1, 2)]
    assert drawn(*seeds) == (["seed-1: MA tau=4 (averaged)", "seed-2: MA tau=4 (averaged)"],
                             "wall time (s, training only)")
    online = ec_run(tmp_path / "online", eval_in_clock=True)
    assert drawn(online) == (["online: MA tau=4 (averaged)"], "wall time (s, with evaluation)")
    assert drawn(seeds[0], online) == (
        ["seed-1: MA tau=4 (averaged)", "online (with evaluation): MA tau=4 (averaged)"],
        "wall time (s, training only unless marked)")
    sim = ec_run(tmp_path / "sim", simulated=True)
    assert drawn(sim)[1] == "virtual time (s, simulated, training only)"
    assert drawn(seeds[0], sim)[0][1] == "sim (virtual s): MA tau=4 (averaged)"
    again = ec_run(tmp_path / "again" / "ma" / "seed-1")  # as far back as tells them apart
    assert drawn(seeds[0], again)[0] == [f"{tmp_path.name}/ma/seed-1: MA tau=4 (averaged)",
                                         "again/ma/seed-1: MA tau=4 (averaged)"]


def test_a_resumed_runs_exchange_is_per_epoch_it_made(tmp_path, capsys):
    """A run resumed at epoch 3 of 4 counts the 0.53 MB it moved in the epoch it trained;
    the table divided them by all 4 epochs (0.13 MB an epoch)."""
    run = shuffle_run(tmp_path / "r")
    summary = json.loads((Path(run) / "summary.json").read_text())
    summary.update(bytes_moved=530_000, exchange_s=0.004, epochs=4,
                   exchange_per_epoch=[{"epoch": 3, "bytes_moved": 530_000, "exchange_s": 0.004}])
    (Path(run) / "summary.json").write_text(json.dumps(summary))
    assert shuffle_plot.table_row(run).endswith("| 0.53 | 0.004 |")


def test_a_plot_replaces_its_file_whole(tmp_path):
    """savefig wrote the PNG in place: a reader (here a second name of the old file) saw it
    change under it, or cut short if the write failed. It is now written beside it and renamed
    into place."""
    run = shuffle_run(tmp_path / "a")
    png, seen = tmp_path / "x.png", tmp_path / "seen.png"
    png.write_bytes(b"old")
    os.link(png, seen)
    shuffle_plot.main([run, "--out", str(png)])
    assert seen.read_bytes() == b"old" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "seen.png", "x.png"]


def test_curves_below_ymin_stay_on_the_plot(tmp_path):
    """Accuracies all below --ymin (0.6 by default): the axis ran from 0.6 down to the top of
    the curve, upside down, and hid it."""
    with plots.accuracy_figure(str(tmp_path / "low.png"), "epochs", "low", 0.6) as ax:
        ax.plot([0, 1, 2], [0.1, 0.3, 0.45], label="low")
    bottom, top = ax.get_ylim()
    assert bottom < 0.1 < 0.45 < top and bottom >= 0.0
    with plots.accuracy_figure(str(tmp_path / "high.png"), "epochs", "high", 0.6) as ax:
        ax.plot([0, 1, 2], [0.7, 0.8, 0.9], label="high")
    assert ax.get_ylim()[0] == 0.6  # --ymin as given when every point is above it
    assert imread(tmp_path / "low.png").shape[2] in (3, 4)


def test_a_mean_over_seeds_says_how_many_runs_had_the_value():
    """A seed's unreadable wall time (shown n/a in its own row) left the algorithm's row the
    other seed's value alone, with no ± and nothing said: a time to a target says "in 1 of 2"."""
    seeds = [reading.Row("ma", "ok", seed=seed, summary={**SUMMARY, **extra})
             for seed, extra in ((1, {"wall_s": 10.0, "final_test_acc": 0.5}),
                                 (2, {"wall_s": None, "final_test_acc": 0.7}))]
    head, _, row = tables.seed_table(seeds, []).splitlines()
    cells = dict(zip(head.strip("| ").split(" | "), row.strip("| ").split(" | "), strict=True))
    assert cells["wall s"] == "10.0 in 1 of 2" and cells["seeds"] == "2"
    assert cells["final acc"] == "0.60 ± 0.14"


EC = {"algo": "ec", "final_model": "member", "best_test_acc": 0.6}


def test_ecs_accuracy_says_it_is_rank_0s_member_beside_the_members_mean(tmp_path):
    """ec's final acc (``--ec-final member``, the default) is rank 0's member's, one of M
    models: over three seeds it was 0.484, 0.457 and 0.598 where the members' mean was 0.426,
    0.484 and 0.544, and the table showed it as ma's average is shown. Its cells now say whose
    it is, the members' mean and the ensemble beside it (over seeds: mean ± sample sd), and a
    line under the first table says why; ma's cells are as they were."""
    seeds = [reading.Row("ec", "ok", seed=seed, summary={
                 **SUMMARY, **EC, "final_test_acc": acc, "final_mean_member_acc": mean,
                 "final_ensemble_acc": ensemble})
             for seed, acc, mean, ensemble in ((0, 0.484, 0.426, 0.5), (1, 0.457, 0.484, 0.52),
                                               (2, 0.598, 0.544, 0.6))]
    seeds += [reading.Row("ma", "ok", seed=seed, summary={
                  **SUMMARY, "algo": "ma", "final_model": "averaged",
                  "final_mean_member_acc": 0.5}) for seed in (0, 1)]
    head, _, ec, ma = tables.seed_table(seeds, []).splitlines()
    ec_cells, ma_cells = (dict(zip(head.strip("| ").split(" | "), row.strip("| ").split(" | "),
                                   strict=True)) for row in (ec, ma))
    assert ec_cells["final acc"] == ("0.513 ± 0.075 (rank 0's member; members' mean "
                                     "0.485 ± 0.059, ensemble 0.540 ± 0.053)")
    assert ec_cells["best acc"] == "0.6000 ± 0.0000 (rank 0's member)"
    assert (ma_cells["final acc"], ma_cells["best acc"]) == ("0.9000 ± 0.0000", "0.9000 ± 0.0000")
    note = remarks.final_models_note(seeds)
    for odd in (["member"], {"a": 1}, 3, "averaged"):  # unhashable ones raised TypeError
        assert reading.final_model({"algo": "ec", "final_model": odd}) is None
    assert note.startswith("**The final and best acc of ec are rank 0's member's**")
    assert note.endswith("each over seeds a mean ± sample standard deviation, as the others.")

    runs(tmp_path, ec={**EC, "final_mean_member_acc": 0.426, "final_ensemble_acc": "x"},
         whole={**EC, "final_model": "ensemble", "final_test_acc": 0.5,
                "final_mean_member_acc": 0.426, "final_ensemble_acc": 0.5},
         old={"algo": "ec"}, ma={"final_model": "averaged", "final_mean_member_acc": 0.5})
    text = report_md(tmp_path)
    cells = {line.split(" | ")[0]: line.split(" | ")[2:4] for line in text.splitlines()
             if line.startswith("| ") and not line.startswith("| algorithm")}
    assert cells == {
        "| ec": ["0.9000 (rank 0's member; members' mean 0.4260, ensemble n/a)",
                 "0.6000 (rank 0's member)"],  # a wrong-typed one n/a, as in every cell
        "| ec (whole)": ["0.5000 (ensemble; members' mean 0.4260)", "0.6000 (ensemble)"],
        "| ec (old)": ["0.9000 (rank 0's member)", "0.9000 (rank 0's member)"],  # before both
        "| ma": ["0.9000", "0.9000"]}
    table_end = text.index("\n\n", text.index("| ma "))
    assert text[table_end:].startswith(
        "\n\n**The final and best acc of ec, old are rank 0's member's** (ec's "
        "`--ec-final member`, the default)")
    assert "The final and best acc of whole are the ensemble's" in text


def test_the_wall_time_plot_shows_the_seeds_spread_in_time():
    """ssgd's wall time was 25.6 ± 10.7 s over seeds, yet its shade (the error's spread only)
    looked tight. Each line of several seeds now ends in a bar from its fastest to its
    slowest run's end time, at its final mean error, which the legend names; against
    epochs, and for a line of one run, there is none."""
    def seeds(name: str, ends: tuple[float, ...], acc: float = 0.8) -> list[reading.Row]:
        return [reading.Row(name, "ok", summary={**SUMMARY, "algo": name}, seed=seed, points=[
            {"t": 0.0, "epoch": 0.0, "test_acc": 0.1},
            {"t": end / 2, "epoch": 0.5, "test_acc": 0.5},
            {"t": end, "epoch": 1.0, "test_acc": acc + 0.01 * seed}])
            for seed, end in enumerate(ends, 1)]
    rows = [*seeds("ssgd", (15.0, 36.3, 25.5)), *seeds("asgd", (10.0, 11.0), 0.7),
            *seeds("ma", (20.0,), 0.6)]  # ma: one seed, no spread to show
    ax = plotting.figure(rows, "t").axes[0]
    bars = {tuple(line.get_xdata()): (list(line.get_ydata()), line.get_color())
            for line in ax.get_lines() if line.get_gid() == plotting.TIME_SPREAD}
    means = {c.name: c for c in plotting.curves(rows, "t")}
    assert bars == {(15.0, 36.3): ([means["ssgd"].err[-1]] * 2, plotting._style("ssgd", 0)[0]),
                    (10.0, 11.0): ([means["asgd"].err[-1]] * 2, plotting._style("asgd", 0)[0])}
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert plotting.TIME_BAR in labels and plotting.BAND in labels
    epochs = plotting.figure(rows, "epoch").axes[0]
    assert not [line for line in epochs.get_lines() if line.get_gid() == plotting.TIME_SPREAD]
    assert plotting.TIME_BAR not in [t.get_text() for t in epochs.get_legend().get_texts()]


def test_the_report_says_the_machines_load_and_warns_above_its_cpus(tmp_path):
    """A loaded machine explains a wall-time spread (load 5.7 on 2 cores: 40% between seeds),
    yet the report did not say the load. Runs now record the 1-minute load average at start
    and end and their node's CPUs; the report says the largest, and names the runs whose load
    exceeded their CPUs. Runs from before recorded none: they still report, without a line."""
    runs(tmp_path / "old", ssgd={}, asgd={})
    old = report_md(tmp_path / "old")
    assert "Machine load" not in old and "| ssgd" in old
    loads = {"load_average_start": 1.5, "load_average_end": 5.7, "machine_cpus": 2}
    runs(tmp_path / "new", ssgd=loads, ma={**loads, "load_average_end": 1.0},
         big={**loads, "machine_cpus": 8, "algo": "asgd"}, old={}, sim={**loads,
                                                                      "simulated": True})
    line = next(t for t in report_md(tmp_path / "new").splitlines() if "Machine load" in t)
    assert "at most 5.7 (big, at its end) on 2-8 CPUs." in line
    assert "**The load exceeded the CPUs in** ssgd (5.7 on 2):" in line  # not big (8)
    assert "ma" not in line.split("exceeded")[1].split(":")[0]  # 1.5 on 2: not above
    assert line.endswith("(1 run recorded no load.)")  # old; sim's times are virtual
    _, rows = reading.load(tmp_path / "new")
    quiet = [r for r in rows if r.name == "ma"]
    assert remarks.machine_load(quiet) == (
        "Machine load (1-minute load average of rank 0's node at each run's start and end): "
        "at most 1.5 (ma, at its start) on 2 CPUs.")
