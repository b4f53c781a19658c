"""``hpctrain bench compare --seeds``: every algorithm once per seed, the report's mean and
spread over the seeds, and its curves with their band."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import SYNTHETIC, run_job
from matplotlib.image import imread

from hpctrain import cli
from hpctrain.bench.compare import arguments, planning
from hpctrain.bench.compare import record as compare_record
from hpctrain.bench.report import (
    document,
    formatting,
    plotting,
    reading,
    remarks,
    rendering,
    tables,
)
from hpctrain.errors import UsageError
from hpctrain.metrics import seconds, write_json_atomic


def parse(*argv: str):
    return cli.build_parser().parse_args(["bench", "compare", *argv])


def test_seeds_are_whole_numbers_each_once():
    assert arguments.parse_seeds("3,1, 2") == [3, 1, 2]
    for bad in ("1,x", "1,,2", "1.5", "1,1", ""):
        with pytest.raises(Exception, match="whole numbers|twice"):
            arguments.parse_seeds(bad)
    with pytest.raises(Exception, match=f"seed {10**99} must be in"):  # --seed's range, named
        arguments.parse_seeds(f"1,{10**99}")  # as given (was: "--seed 1e+99", never given)


def test_plan_runs_every_algorithm_once_per_seed(tmp_path):
    runs = planning.plan(parse("--algos", "sgd,ssgd", "--workers", "2", "--seeds", "7,5",
                              *SYNTHETIC, "--out", str(tmp_path)))
    assert [(r.algo, r.seed, r.np) for r in runs] == [("sgd", 7, 1), ("sgd", 5, 1),
                                                      ("ssgd", 7, 2), ("ssgd", 5, 2)]
    for r in runs:
        assert r.command[r.command.index("--seed") + 1] == str(r.seed)
        assert r.command[-2:] == ["--out", str(tmp_path / r.algo / f"seed-{r.seed}")]
        assert r.name == f"{r.algo}/seed-{r.seed}"
    assert runs[2].trainers == runs[3].trainers == 2
    with pytest.raises(UsageError, match="--seeds and --seed: give one"):
        planning.plan(parse("--algos", "sgd", "--seeds", "1,2", "--seed", "3", "--out",
                           str(tmp_path)))


def test_resume_refuses_other_seeds(tmp_path):
    out = tmp_path / "cmp"
    first = parse("--algos", "sgd", "--simulate", "2", "--seeds", "1,2", "--out", str(out))
    out.mkdir()
    write_json_atomic(out / reading.RECORD,
                              compare_record.start_record(first, planning.plan(first)))
    for argv, was in ((["--seeds", "1,3"], "--seeds 1,2"), ([], "--seeds 1,2")):
        args = parse("--algos", "sgd", "--simulate", "2", *argv, "--resume", "--out", str(out))
        with pytest.raises(UsageError, match=f"was run with {was}; give the same"):
            compare_record.start_record(args, planning.plan(args))


# Hand-written runs (the report reads only files): three seeds of ssgd, one of them failed.
POINTS = {1: [(0.0, 0.0, 0.1), (2.0, 0.5, 0.82), (4.0, 1.0, 0.88)],
          2: [(0.0, 0.0, 0.1), (3.0, 0.5, 0.80), (6.0, 1.0, 0.84)],
          3: [(0.0, 0.0, 0.1)]}
SUMMARY = {"algo": "ssgd", "workers": 2, "model": "mlp", "dataset": "synthetic", "epochs": 1,
           "peak_memory_per_worker": [2**20, 3 * 2**20], "allreduce_bytes_per_rank": 2**20}


def seeded_comparison(folder) -> dict[int, dict]:
    """``folder`` as a comparison of ssgd over seeds 1-3, seed 3 failed; the summaries."""
    summaries = {}
    for seed, points in POINTS.items():
        run = folder / "ssgd" / f"seed-{seed}"
        run.mkdir(parents=True)
        run.joinpath("metrics.jsonl").write_text("".join(
            json.dumps({"t": t, "epoch": e, "test_acc": a}) + "\n" for t, e, a in points))
        if seed == 3:
            continue
        summaries[seed] = {**SUMMARY, "final_test_acc": points[-1][2],
                           "best_test_acc": points[-1][2], "wall_s": points[-1][0],
                           "samples_per_s": 100.0 * seed,
                           "staleness": {"mean": 0.25 * seed, "p50": seed - 1.0, "p90": 2.0,
                                         "p99": 14.14, "max": 15.0, "count": 9}}
        run.joinpath("summary.json").write_text(json.dumps(summaries[seed]))
    runs = {f"ssgd/seed-{s}": {"status": "ok", "command": f"train --seed {s}"} for s in (1, 2)}
    runs["ssgd/seed-3"] = {"status": "failed", "error": "boom"}
    folder.joinpath(reading.RECORD).write_text(json.dumps(
        {"algos": ["ssgd"], "seeds": [1, 2, 3], "workers": 2, "train_args": [],
         "targets": [0.8, 0.85], "runs": runs}))
    return summaries


def cells(text: str, first: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {first} |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_the_table_gives_mean_and_sample_sd_over_the_seeds_that_finished(tmp_path):
    summaries = seeded_comparison(tmp_path)
    rendering.render(tmp_path)
    text = (tmp_path / "report.md").read_text()
    # final acc 0.88 and 0.84: 0.86 ± 0.02828; wall 4 and 6 s: 5 ± 1.414
    assert [(s["final_test_acc"], s["wall_s"]) for s in summaries.values()] == [(0.88, 4.0),
                                                                                 (0.84, 6.0)]

    row = cells(text, "ssgd")  # the sd to 2 significant figures, the mean to its decimal place
    assert row[:6] == ["ssgd", "2 of 3", "2", "0.860 ± 0.028", "0.860 ± 0.028", "5.0 ± 1.4"]
    assert row[6] == "2.50 ± 0.71 s (0.50 ep)"  # 0.8: both finished runs reach it (2 and 3 s)
    assert row[7] == "4 s (1.00 ep) in 1 of 2"  # 0.85: seed 1 only
    assert row[8] == "150 ± 71"
    assert row[9] == "3.0 MiB" and row[11] == "allreduce_bytes_per_rank 1.0 MiB"
    assert row[10] == "0.38 / 0.5 / 2 / 14.14 / 15"  # percentiles were rounded: 0.5 showed 0
    assert row[-1] == "seed 3 failed"
    # Every run is listed after, and the failed one says why.
    assert cells(text, "ssgd seed 1")[2] == "0.8800"
    assert "0.25 / 0 / 2 / 14.14 / 15" in cells(text, "ssgd seed 1")
    assert cells(text, "ssgd seed 3")[-1] == "failed: boom"
    assert "Each algorithm ran once per seed (1, 2, 3)" in text
    assert "- ssgd seed 2: `train --seed 2`" in text
    assert tables.main_table(reading.load(tmp_path)[1], [0.8]).startswith(
        "| algorithm | seeds |")


def test_a_spread_gives_the_sd_two_significant_figures_and_the_mean_its_decimal_place():
    """The mean and sd were written with the column's one format: "2.5 ± 0.707 s" gave the
    sd more digits than the mean. Now the sd has two significant figures and the mean as
    many decimals, but the digits the column's format shows are kept where the sd is small,
    a large sd leaves the mean its leading digit, and equal values read as before. A tiny
    sd showed digits no value carries (0.89300050 ± 0.00000071): now neither is written
    finer than the column's format writes a value, the sd below that place ``<`` a unit."""
    acc, count = "{:.4f}".format, "{:.0f}".format
    cases = [
        ([2.0, 3.0], seconds, "2.50 ± 0.71"),  # a time below 10 s (fmt .3g: 2.5 ± 0.707)
        ([18.0, 33.2], seconds, "26 ± 11"),  # 25.6 ± 10.7 s: the tenths are noise
        ([120.3, 125.1], seconds, "122.7 ± 3.4"),  # a small sd keeps fmt's tenths
        ([0.8918, 0.8942], acc, "0.8930 ± 0.0017"),  # a small sd: fmt's 4 decimals kept
        # a tiny sd: no finer than a value is written (was 0.89300050 ± 0.00000071), and
        # not ± 0.0000, which equal values read
        ([0.8930, 0.8930 + 1e-6], acc, "0.8930 ± <0.0001"),
        ([0.8930, 0.8932], acc, "0.8931 ± 0.0001"),  # an sd of 0.00014: fmt's 4 decimals
        ([100.0, 100.0001], seconds, "100.0 ± <0.1"),  # seconds' tenths from 10 s up
        ([2.5, 2.5000001], seconds, "2.50 ± <0.01"),  # .3g below 10 s: 2.50, not 2.5000000
        ([0.03, 0.0300002], seconds, "0.0300 ± <0.0001"),
        ([150.0, 150.001], count, "150 ± <1"),
        ([1e-9, -1e-9], acc, "0.0000 ± <0.0001"),  # a mean of 0: fmt's decimals of it
        ([0.881, 0.905], acc, "0.893 ± 0.017"),  # an sd of 10 units of fmt's last digit
        ([0.1, 0.7, 0.9], acc, "0.57 ± 0.42"),  # a large sd
        ([0.0996, 0.2404], acc, "0.17 ± 0.10"),  # an sd of 0.09956 is 0.10: 2 decimals, not 3
        ([100.0, 200.0], count, "150 ± 71"),  # counts (samples/s)
        ([3.0, 1500.0], count, "752 ± 1059"),  # an sd of 100 or more is whole, not 1100
        ([-0.3, 0.308], acc, "0.004 ± 0.430"),  # not 0.00 ± 0.43: the mean's leading digit
        ([-3.0, -1.5], count, "-2 ± 1"),  # negative values (no column has them yet)
        ([3.4, 3.6], count, "4 ± <1"),  # not 3.50 ± 0.14: the values read 3 and 4
        ([0.0, 1e-9], acc, "0.0000 ± <0.0001"),  # not 0.00000000050 ± 0.00000000071
        ([0.3, -0.1, -0.2], acc, "0.00 ± 0.26"),  # a mean of -9e-18: zero, unsigned
        ([0.6, 0.6], acc, "0.6000 ± 0.0000"),  # a zero sd: fmt's, as before
        ([150.0, 150.0, 150.0], count, "150 ± 0"),
        ([2.5, 2.5], seconds, "2.5 ± 0"),
        ([0.5, math.nan], acc, "nan ± nan"),  # a NaN's sd was 0: nan ± 0.0000
        ([1e308, -1e308], acc, "0.0000 ± inf"),  # (1e308 - 0) ** 2 raised OverflowError
        ([0.8930], acc, "0.8930"),  # one value: fmt's alone
        ([], acc, reading.NA),
    ]
    for values, fmt, want in cases:
        assert formatting.mean_sd(values, fmt) == want, values


def test_a_byte_count_just_below_a_unit_is_written_in_the_next_unit():
    """bytes_text chose the unit before rounding: 1048575 B read 1024.0 KiB, a peak just
    under 1 GiB 1024.0 MiB, 1023.5 B (a mean over seeds) 1024 B."""
    assert formatting.bytes_text(1048575) == "1.0 MiB"
    assert formatting.bytes_text(2**30 - 1) == "1.0 GiB"
    assert formatting.bytes_text(1023.5) == "1.0 KiB"
    assert formatting.bytes_text(1023) == "1023 B"
    assert formatting.bytes_text(1048524) == "1023.9 KiB"
    assert formatting.bytes_text(2**40) == "1024.0 GiB"  # GiB the largest unit


def test_without_its_record_a_comparison_over_seeds_is_still_reported(tmp_path):
    """A damaged compare.json is refused, saying that moved aside the folders are reported;
    they are then. Seed 3, which left no summary, was left out, the row reading 2 seeds, all
    ok, and the text that every seed ran: it is an unfinished run of the row's 3."""
    summaries = seeded_comparison(tmp_path)
    (tmp_path / reading.RECORD).write_text('{"algos": ["ssgd"]')
    with pytest.raises(UsageError, match=r"; no report written: move it aside, and the report "
                       r"shows the runs found in "):
        reading.load(tmp_path)
    (tmp_path / reading.RECORD).unlink()
    record, rows = reading.load(tmp_path)
    assert record == {} and [(r.name, r.seed, r.status) for r in rows] == [
        ("ssgd", 1, "ok"), ("ssgd", 2, "ok"), ("ssgd", 3, "unfinished")]
    rendering.render(tmp_path)
    text = (tmp_path / "report.md").read_text()
    accs = [s["final_test_acc"] for s in summaries.values()]
    row = cells(text, "ssgd")
    assert row[1:3] == ["2 of 3", "2"] and row[-1] == "seed 3 unfinished"
    assert row[3] == formatting.mean_sd(accs, "{:.4f}".format) == "0.860 ± 0.028"
    assert cells(text, "ssgd seed 3")[-1] == "unfinished"
    assert "Each algorithm ran once per seed (1, 2, 3)" in text
    assert "*unfinished*: a run that started and has no summary" in text


def test_a_folder_of_seeds_gives_each_algorithm_every_seed_and_no_set_aside_attempt(tmp_path):
    """Without a record: an algorithm lacking a seed the others ran is a row short of it
    (not run), not one whose every seed ran; a failed attempt that --resume set aside
    (seed-1.failed-1) is not a run of it."""
    seeded_comparison(tmp_path)
    (tmp_path / reading.RECORD).unlink()
    shutil.rmtree(tmp_path / "ssgd" / "seed-3")
    shutil.copytree(tmp_path / "ssgd" / "seed-1", tmp_path / "ma" / "seed-1")
    shutil.copytree(tmp_path / "ssgd" / "seed-2", tmp_path / "ma" / "seed-1.failed-1")
    _, rows = reading.load(tmp_path)
    assert [(r.name, r.seed, r.status) for r in rows] == [
        ("ma", 1, "ok"), ("ma", 2, "not run"), ("ssgd", 1, "ok"), ("ssgd", 2, "ok")]
    text = document.markdown({}, rows, [0.8])  # ma/ holds a copy of an ssgd run: it says so
    assert cells(text, "ssgd (ma)")[1] == "1 of 2"
    assert cells(text, "ssgd (ma)")[-1] == "seed 2 not run"
    assert cells(text, "ssgd")[1] == "2" and cells(text, "ssgd")[-1] == "ok"


def test_an_algorithm_whose_every_seed_failed_is_a_row_of_the_table(tmp_path):
    rows = [reading.Row("asgd", "failed", error="boom", seed=s) for s in (1, 2)]
    head, _, row = tables.seed_table(rows, [0.8, 0.9]).splitlines()
    assert row.count(" | ") == head.count(" | ")
    assert row.startswith("| asgd | 0 of 2 | — |") and row.endswith(
        "| seed 1 failed; seed 2 failed |")


def test_the_staleness_max_over_seeds_is_the_largest_and_the_rest_say_they_are_means():
    """dcasgd-a's seeds had staleness max 15 and 57: the row showed 36, a mean no run had,
    under a header that did not say which figures were averaged."""
    rows = [reading.Row("dcasgd-a", "ok", seed=seed, summary={"workers": 2, "staleness": {
        "mean": mean, "p50": 1.0, "p90": p90, "p99": p99, "max": top, "count": 9}})
        for seed, mean, p90, p99, top in ((1, 1.0, 3.0, 10.0, 15.0), (2, 2.0, 4.0, 13.0, 57.0))]
    head, _, row = tables.seed_table(rows, [0.8]).splitlines()
    column = [c.strip() for c in head.strip("|").split(" | ")].index(tables.SEED_STALENESS)
    assert [c.strip() for c in row.strip("|").split(" | ")][column] == "1.50 / 1 / 3.5 / 11.5 / 57"
    assert tables.SEED_STALENESS.endswith("p99 (each averaged over seeds) / max (largest)")
    text = document.markdown({"algos": ["dcasgd-a"], "workers": 2, "seeds": [1, 2]}, rows, [0.8])
    assert "the largest peak memory and staleness max of any seed's run, and the other " \
        "staleness figures (each run's mean, p50, p90 and p99: a mean of" in text
    assert "| 1.00 / 1 / 3 / 10 / 15 |" in text  # each run's own row: its own figures


def test_report_md_says_the_shade_is_the_seeds_range_not_a_standard_deviation(tmp_path):
    """The table gives mean ± sample sd; the plots' shade (lowest to highest run) was said
    nowhere, and read as ± sd."""
    seeded_comparison(tmp_path)
    rendering.render(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert plotting.BAND_NOTE in text
    assert text.index(plotting.BAND_NOTE) < text.index("![test error against wall time]")
    _, rows = reading.load(tmp_path)
    assert legend(rows, "t") == ["ssgd, M=2, mean of 2 of 3 seeds", plotting.BAND,
                                 plotting.TIME_BAR]
    rows = [reading.Row("sgd", "ok", summary={"workers": 1})]  # no seeds: no shade to explain
    assert plotting.BAND_NOTE not in document.markdown({}, rows, [0.8])


MISSED = ("hpctrain: rank 0 took the snapshots between its steps, and 2 --eval-every marks "
          "passed within one of them: up to 9 updates (all workers' pushes) came within one "
          "step of rank 0, more than the 4 between two marks; the curve has no point there")


def test_report_md_lists_what_each_run_printed_once_and_not_a_failure_s_error(tmp_path,
                                                                              capsys):
    """A run's warnings (a curve with fewer points than --eval-every asked for) stayed in its
    stderr.log: report.md now lists hpctrain's own lines of each run, once each, a few a run,
    without progress bars, other libraries' warnings, a failed run's error lines or an
    earlier attempt's."""
    seeded_comparison(tmp_path)
    # Seed 1 was continued by --resume: its first attempt's lines (why it stopped) are not
    # the finished run's; only the last attempt's are listed.
    logs = {1: ["hpctrain: error: RuntimeError: injected fault at step 40",
                "--- continued (2026-01-01 00:00:00) ---",
                "ssgd:   0%|          | 0/32 [00:00<?, ?step/s]", MISSED,
                "/x/torch/nn.py:12: UserWarning: something is deprecated", MISSED,
                f"  {MISSED}"],
            2: [f"hpctrain: warning: note {i}" for i in range(5)],
            3: ["hpctrain: warning: --batch-size 64: each worker has 50 training samples",
                "hpctrain: error: boom", "hpctrain: error: rank 1: boom too", "boom"]}
    for seed, lines in logs.items():
        (tmp_path / "ssgd" / f"seed-{seed}" / "stderr.log").write_text("\n".join(lines) + "\n")
    rendering.run(cli.build_parser().parse_args(["report", str(tmp_path)]))
    text = (tmp_path / "report.md").read_text()
    listed = [line for line in text.splitlines() if line.startswith("- ssgd seed")]
    assert listed[:-2] == [
        f"- ssgd seed 1: `{MISSED}`",
        "- ssgd seed 2: `hpctrain: warning: note 0`", "- ssgd seed 2: `hpctrain: warning: note 1`",
        "- ssgd seed 2: `hpctrain: warning: note 2`", "- ssgd seed 2: 2 more in its stderr.log",
        "- ssgd seed 3: `hpctrain: warning: --batch-size 64: each worker has 50 training "
        "samples`"]
    assert text.index("**The runs printed**") < text.index("![test error against wall time]")
    assert "ssgd seed 1, ssgd seed 2, ssgd seed 3 printed warnings or notes on their stderr " \
        "(stderr.log); report.md lists them" in capsys.readouterr().err
    for seed in logs:
        (tmp_path / "ssgd" / f"seed-{seed}" / "stderr.log").unlink()
    rendering.render(tmp_path)
    assert "**The runs printed**" not in (tmp_path / "report.md").read_text()


def test_a_note_with_backticks_stays_one_code_span():
    assert formatting.as_code("hpctrain: use `--eval online`") == \
        "`` hpctrain: use `--eval online` ``"
    assert formatting.as_code("plain") == "`plain`"


@pytest.mark.parametrize("seeds, epochs", [([1, 2], 3), ([1, 3], 3), ([1, 4], 3), ([5, 2], 2),
                                           ([100, 200, 300], 5), ([1, 2], 1), ([7, 1, 3], 4)])
def test_the_seeds_said_to_share_data_orders_are_those_whose_orders_coincide(seeds, epochs):
    """Global shuffling seeds epoch e with seed + e: the pairs said to share orders are those
    whose epochs' permutations are the same, found by drawing them."""
    from hpctrain.shuffle.order import global_permutation

    def orders(seed: int) -> list[list[int]]:
        return [global_permutation(seed, e, 50).tolist() for e in range(epochs)]

    drawn = [(s, t) for s in sorted(seeds) for t in sorted(seeds)
             if s < t and any(o in orders(t) for o in orders(s))]
    assert remarks.shared_orders(seeds, epochs, "global") == drawn
    assert remarks.shared_orders(seeds, epochs, "local") == []
    note = remarks.shared_orders_note(seeds, epochs, "global")
    assert (note is None) == (not drawn)
    if drawn:
        apart = [int(s) for s in note.split("`--seeds ")[1].split("`")[0].split(",")]
        assert len(apart) == len(seeds) and remarks.shared_orders(apart, epochs, "global") == []


def test_report_and_compare_say_when_the_seeds_share_data_orders(tmp_path):
    """README said that seed 2's orders are seed 1's one epoch later, so the ± understates
    the spread; neither report.md nor compare did."""
    seeded_comparison(tmp_path)
    for shuffle, epochs, said in (("global", 3, True), ("global", 1, False),
                                  ("local", 3, False)):
        for seed in (1, 2):
            (tmp_path / "ssgd" / f"seed-{seed}" / "config.json").write_text(json.dumps(
                {"seed": seed, "data": {"shuffle": shuffle}, "optim": {"epochs": epochs}}))
        rendering.render(tmp_path)
        text = (tmp_path / "report.md").read_text()
        assert ("**Seeds that share data orders:** `--shuffle global` seeds each epoch's data "
                "order with seed + epoch: over 3 epochs seed 2's orders are seed 1's, 1 epoch "
                "later, so the ± over the seeds understates the spread; for orders of their "
                "own take seeds at least 3 apart (`--seeds 1,4,7`)." in text) == said
    for seeds, argv, said in (("1,2", ["--epochs", "3"], True), ("1,2", ["--epochs", "1"], False),
                              ("1,2", ["--epochs", "3", "--shuffle", "local"], False),
                              ("10,20", ["--epochs", "3"], False)):
        note = planning.orders_note(planning.plan(parse(
            "--algos", "sgd,ssgd", "--simulate", "2", "--seeds", seeds, *SYNTHETIC, *argv,
            "--out", str(tmp_path / "cmp"))))
        assert (note is not None) == said
        if said:
            assert note == remarks.shared_orders_note([1, 2], 3, "global")


def test_a_row_whose_seeds_trained_with_other_settings_says_so(tmp_path):
    """A seed's run with another --lr was flagged in the settings table, yet averaged into its
    algorithm's mean ± sd with an "ok" status."""
    seeded_comparison(tmp_path)
    for lr2, marked in ((0.05, False), (0.1, True)):
        for seed, lr in ((1, 0.05), (2, lr2)):
            (tmp_path / "ssgd" / f"seed-{seed}" / "config.json").write_text(json.dumps(
                {"seed": seed, "optim": {"lr": lr}, "out": f"o/{seed}"}))
        rendering.render(tmp_path)
        text = (tmp_path / "report.md").read_text()
        status = cells(text, "ssgd")[-1]
        assert status == "seed 3 failed" + (f"; {tables.DIFFERING_SEEDS}" if marked else "")
        assert ("| ssgd seed 2 | 0.1 |" in text) == marked  # the table it points to
        if marked:
            assert text.index("| ssgd seed 2 | 0.1 |") < text.index("| ssgd | 2 of 3 |")


def test_the_curve_is_the_mean_of_the_seeds_with_their_band(tmp_path):
    seeded_comparison(tmp_path)
    _, rows = reading.load(tmp_path)
    (curve,) = plotting.curves(rows, "t")
    assert curve.xs == [0.0, 2.5, 5.0]
    assert curve.err == pytest.approx([90.0, 19.0, 14.0])
    assert curve.band == (pytest.approx([90.0, 18.0, 12.0]), pytest.approx([90.0, 20.0, 16.0]))
    assert curve.label == "ssgd, M=2, mean of 2 of 3 seeds"  # seed 3 failed


def test_a_comparison_over_seeds_end_to_end(tmp_path):
    """Simulated runs (one process each): the seeds reach the runs, the report's row is the
    mean of theirs, and ``hpctrain report`` renders the same bytes again."""
    out = tmp_path / "cmp"
    done = run_job(["bench", "compare", "--algos", "sgd,ssgd", "--simulate", "2", "--seeds",
                    "1,2", *SYNTHETIC, "--epochs", "1", "--out", str(out)], np=0, timeout=240)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "compare.json").read_text())
    assert record["seeds"] == [1, 2] and sorted(record["runs"]) == [
        "sgd/seed-1", "sgd/seed-2", "ssgd/seed-1", "ssgd/seed-2"]
    summaries = {s: json.loads((out / "ssgd" / f"seed-{s}" / "summary.json").read_text())
                 for s in (1, 2)}
    assert [json.loads((out / "ssgd" / f"seed-{s}" / "config.json").read_text())["seed"]
            for s in (1, 2)] == [1, 2]
    models = [torch.load(out / "ssgd" / f"seed-{s}" / "model.pt", weights_only=True)
              for s in (1, 2)]
    assert any(not torch.equal(models[0][k], models[1][k]) for k in models[0])
    samples = [s["samples_per_s"] for s in summaries.values()]
    text = (out / "report.md").read_text()
    assert cells(text, "ssgd")[8] == formatting.mean_sd(samples, "{:.0f}".format)
    assert "| ssgd | 2 | 2 |" in done.stdout  # the printed table is the per-algorithm one
    for png in ("error_vs_time.png", "error_vs_epochs.png"):
        assert imread(out / png).shape[2] in (3, 4)
    before = {p: (out / p).read_bytes() for p in ("report.md", "error_vs_time.png")}
    # hpctrain report, in this process (no start-up): what its main() runs
    rendering.run(cli.build_parser().parse_args(["report", str(out)]))
    assert {p: (out / p).read_bytes() for p in before} == before


# Three seeds of a simulated async run with a slow rank 0 (as `hpctrain report` read them from
# a reviewer's comparison): its snapshots fall at other epochs in each run. (epoch, t, acc)
UNEVEN = {1: [(0.0, 0.0, 0.1), (0.28125, 0.031, 0.98), (0.75, 0.093, 1.0), (1.375, 0.184, 1.0),
              (2.0, 0.444, 1.0)],
          2: [(0.0, 0.0, 0.08), (0.28125, 0.035, 0.99), (0.625, 0.094, 1.0), (1.0, 0.155, 1.0),
              (1.5, 0.220, 1.0), (2.0, 0.269, 1.0)],
          3: [(0.0, 0.0, 0.12), (0.75, 0.113, 0.9), (1.21875, 0.159, 0.95), (2.0, 0.361, 1.0)]}


def seeded_rows(points: dict[int, list[tuple]]) -> list[reading.Row]:
    return [reading.Row("asgd", "ok", seed=seed, summary={"workers": 4},
                       points=[{"epoch": e, "t": t, "test_acc": a} for e, t, a in run])
            for seed, run in points.items()]


def assert_mean_and_band(curve: plotting.Curve, runs: np.ma.MaskedArray) -> None:
    """``curve`` is the mean of ``runs`` (interpolated), its band their lowest and highest,
    each point over the runs there."""
    assert curve.err == pytest.approx(runs.mean(axis=0).tolist())
    assert curve.band == (pytest.approx(runs.min(axis=0).tolist()),
                          pytest.approx(runs.max(axis=0).tolist()))
    assert curve.runs == runs.count(axis=0).tolist() and curve.of == len(runs)


def legend(rows: list[reading.Row], x: str) -> list[str]:
    """The texts of the legend in the plot of ``rows`` against ``x``."""
    return [t.get_text() for t in plotting.figure(rows, x).axes[0].get_legend().get_texts()]


def at_epochs(points: dict[int, list[tuple]], at: list[float]) -> tuple[np.ma.MaskedArray, ...]:
    """Each run's time and error (%) at the epochs ``at`` (a row each), interpolated in its
    epochs by numpy, masked where ``at`` lies outside the run's snapshots."""
    outside = np.array([[not run[0][0] <= e <= run[-1][0] for e in at]
                        for run in points.values()])
    return tuple(np.ma.masked_array(np.array(
        [np.interp(at, [p[0] for p in run], [value(p) for p in run]) for run in
         points.values()]), outside) for value in (lambda p: p[1], lambda p: 100 * (1 - p[2])))


@pytest.mark.parametrize("x", ["epoch", "t"])
def test_seeds_whose_snapshots_do_not_line_up_are_averaged_at_the_same_epoch(x):
    """The k-th snapshots were averaged: the epochs curve ended at 1.7 of 2 epochs, and its
    second point averaged errors at epochs 0.28, 0.28 and 0.75. Each run's error (and time)
    is now interpolated onto every snapshot's epoch, each point the mean of the runs there."""
    (curve,) = plotting.curves(seeded_rows(UNEVEN), x)
    epochs = sorted({p[0] for run in UNEVEN.values() for p in run})
    times, errors = at_epochs(UNEVEN, epochs)
    assert curve.xs == (epochs if x == "epoch" else pytest.approx(times.mean(axis=0).tolist()))
    assert_mean_and_band(curve, errors)
    # at 0.28125 seed 3 is between its snapshots at 0 and 0.75
    assert curve.err[1] == pytest.approx((2.0 + 1.0 + (88 - 78 * 0.28125 / 0.75)) / 3)
    assert not curve.partial and curve.label == "asgd, M=4, mean of 3 seeds"


@pytest.mark.parametrize("uneven", [False, True])
def test_the_time_plot_averages_lock_step_and_async_seeds_alike(uneven):
    """Lock-step curves put point k at the mean time of the k-th snapshots and ended at the
    runs' mean wall time, while async ones (snapshots at other epochs) were averaged at the
    same time and ran on to the slowest seed, dashed past the fastest's end and labelled so,
    though every seed ran all its epochs. Both now end at the runs' mean time, undashed,
    with the epoch plot's errors, and no legend says "dashed"."""
    lined = {1: [(0.0, 0.0, 0.1), (1.0, 0.2, 0.8), (2.0, 0.4, 0.9)],
             2: [(0.0, 0.0, 0.1), (1.0, 0.3, 0.7), (2.0, 0.6, 0.8)]}
    if uneven:  # an async run whose rank 0 took its marks late
        lined[2] = [(0.0, 0.0, 0.1), (1.25, 0.375, 0.7), (2.0, 0.6, 0.8)]
    rows = seeded_rows(lined)
    (by_time,), (by_epoch,) = plotting.curves(rows, "t"), plotting.curves(rows, "epoch")
    assert by_time.xs[-1] == pytest.approx(0.5) and by_time.err == by_epoch.err
    assert by_time.runs == [2] * len(by_time.xs) and not by_time.partial
    for x in ("t", "epoch"):
        bar = [plotting.TIME_BAR] if x == "t" else []  # the seeds' end times: a time plot's
        assert legend(rows, x) == ["asgd, M=4, mean of 2 seeds", plotting.BAND, *bar]


def test_a_run_stopped_early_leaves_the_others_their_whole_curve():
    """--stop-on-collapse: seed 3 stops after epoch 1.21875. The mean curve and its band
    ended there for every seed, though the others ran to epoch 2; now they go on, of the
    two runs there, drawn dashed, which the legend says once, in both plots."""
    short = {**UNEVEN, 3: UNEVEN[3][:3]}
    rows = seeded_rows(short)
    epochs = sorted({p[0] for run in short.values() for p in run})
    times, errors = at_epochs(short, epochs)
    for x in ("epoch", "t"):
        (curve,) = plotting.curves(rows, x)
        assert curve.xs[-1] == (2.0 if x == "epoch" else pytest.approx((0.444 + 0.269) / 2))
        assert curve.runs[-4:] == [3, 2, 2, 2] and curve.partial
        assert_mean_and_band(curve, errors)
        bar = [plotting.TIME_BAR] if x == "t" else []
        assert legend(rows, x) == ["asgd, M=4, mean of 3 seeds", plotting.BAND, *bar,
                                   plotting.DASHED]
    assert plotting.plot(rows, "epoch").startswith(b"\x89PNG")


def test_seeds_whose_snapshots_line_up_keep_the_mean_of_the_kth(tmp_path):
    """Snapshots at the same epochs: point k is the mean of the k-th snapshots' time and
    error, so reports do not change. One run shorter (stopped early, or cut short as a
    reviewer did): the curve ended at its end, now it goes on, of the run there."""
    lined = {1: [(0.0, 0.0, 0.1), (0.5, 2.0, 0.82), (1.0, 4.0, 0.88)],
             2: [(0.0, 0.0, 0.1), (0.5, 3.0, 0.80), (1.0, 5.0, 0.86)]}
    for x, key in (("t", 1), ("epoch", 0)):
        (curve,) = plotting.curves(seeded_rows(lined), x)
        assert curve.xs == [(lined[1][k][key] + lined[2][k][key]) / 2 for k in range(3)]
        assert curve.err == [(100 * (1 - lined[1][k][2]) + 100 * (1 - lined[2][k][2])) / 2
                             for k in range(3)]
        assert curve.runs == [2, 2, 2] and not curve.partial
    lined[2] = lined[2][:2]
    for x, key in (("t", 1), ("epoch", 0)):
        (curve,) = plotting.curves(seeded_rows(lined), x)
        assert curve.xs == [0.0, (lined[1][1][key] + lined[2][1][key]) / 2, lined[1][2][key]]
        assert curve.runs == [2, 2, 1]
        assert_mean_and_band(curve, at_epochs(lined, [0.0, 0.5, 1.0])[1])
