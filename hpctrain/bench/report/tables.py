"""report.md's tables: one row per run (:func:`table`), or with seeds one row per algorithm
over its seeds' runs (:func:`seed_table`) above it; :func:`main_table` is the one a report
leads with, which ``bench compare`` also prints.

Each cell is a run's (or its seeds') value as :mod:`.reading` checked it and
:mod:`.formatting` writes it; what the columns mean is said under the tables
(:mod:`.document`).
"""

from __future__ import annotations

from hpctrain.bench.report.formatting import bytes_text, mean_of, mean_sd, plain_text, updates_text
from hpctrain.bench.report.reading import (
    FINAL_MODELS,
    NA,
    OTHER_FINALS,
    STALENESS_KEYS,
    Row,
    _all_simulated,
    _byte_counts,
    _mixed,
    _simulated,
    _trained_with,
    by_algorithm,
    final_model,
    group_name,
    time_to,
)
from hpctrain.metrics import seconds as _seconds


def _final_cells(summaries: list[dict], acc: str, best: str, over) -> tuple[str, str]:
    """The final and best acc cells of runs (one run's, or an algorithm's seeds') whose
    summaries are ``summaries``, given as text ``acc`` and ``best``: for ec's (one final
    model in all) saying what they score, and beside the final one the other scores its
    runs recorded, each as ``over(key)`` gives it. Rank 0's member is one of M models
    trained alike: its luck alone moved the figure as much as the algorithms differ."""
    models = {final_model(s) for s in summaries}
    model = models.pop() if len(models) == 1 else None
    if model is None:
        return acc, best
    others = [f"{label} {over(key)}" for key, label in OTHER_FINALS
              if key != f"final_{model}_acc" and any(key in s for s in summaries)]
    said = FINAL_MODELS[model]
    return (f"{acc} ({said}" + (f"; {', '.join(others)})" if others else ")"),
            f"{best} ({said})")


def _cells(row: Row, targets: list[float], mark: bool = False) -> list[str]:
    """One run's row; ``mark``: say in its first cell whether it was simulated (the table
    mixes simulated runs with real ones)."""
    dash = "—"
    if row.summary is None:
        reason = row.status if not row.error else f"{row.status}: {row.error}"
        return [plain_text(row.heading), dash, dash, dash, dash, *(dash for _ in targets), dash,
                dash, dash, dash, reason.replace("|", "\\|")]
    s = row.summary

    def shown(key: str, text) -> str:  # n/a for a value _usable left out
        return NA if s.get(key) is None else text(s[key])

    reach = []
    for target in targets:
        p = time_to(row.points, target)
        reach.append("not reached" if p is None else f"{_seconds(p['t'])} s ({p['epoch']:.2f} ep)")
    stale = s.get("staleness")
    stale = NA if "staleness" in row.unusable else dash if not stale else (
        f"{stale['mean']:.2f} / " + " / ".join(updates_text(stale[k]) for k in STALENESS_KEYS[1:]))
    moved = [f"{k} {bytes_text(v)}" for k, v in _byte_counts(s, row.byte_fields)]
    peaks = [p for p in s.get("peak_memory_per_worker") or () if p is not None]
    peak = NA if "peak_memory_per_worker" in row.unusable else bytes_text(max(peaks)) if peaks \
        else dash
    title = plain_text(row.heading) + (f" {SIMULATED_MARK}" if mark and _simulated(row) else "")
    accuracy = "{:.4f}".format
    final, best = _final_cells([s], shown("final_test_acc", accuracy),
                               shown("best_test_acc", accuracy),
                               lambda key: shown(key, accuracy))
    return [title, shown("workers", str), final, best, shown("wall_s", _seconds), *reach,
            shown("samples_per_s", "{:.0f}".format), peak, stale, "; ".join(moved) or dash,
            _status(s)]


def _status(summary: dict) -> str:
    """``ok``, or the collapse that marks the row (and whether it ended the run)."""
    if summary.get("collapsed_at") is None:
        return "ok"
    stopped = "; stopped there" if summary.get("stopped_on_collapse") else ""
    reason = str(summary.get("collapse_reason") or "").replace("|", "\\|")
    return f"**collapsed** at update {summary['collapsed_at']} ({reason}){stopped}"


def table(rows: list[Row], targets: list[float]) -> str:
    """The report's table, one row per run, in Markdown."""
    head = ["algorithm", "workers", "final acc", "best acc", "wall s",
            *(f"time to {t:g}" for t in targets), "samples/s", "peak memory",
            "staleness mean / p50 / p90 / p99 / max", "bytes communicated per rank", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mark = _mixed(rows)
    lines += ["| " + " | ".join(_cells(r, targets, mark)) + " |" for r in rows]
    return "\n".join(lines)


SIMULATED_MARK = "(simulated)"  # after a run's name in the table, among real runs


# The seed table's status of an algorithm whose seeds' runs trained with other settings
# (differing_settings' table says which): its means were of other trainings, unsaid
DIFFERING_SEEDS = ("**its seeds' training settings differ** (the table above says how); "
                   "averaged all the same")


def _seed_cells(name: str, runs: list[Row], targets: list[float]) -> list[str]:
    """One algorithm's row over its seeds' runs (see :func:`seed_table`)."""
    dash = "—"
    done = [r for r in runs if r.summary]
    problems = [f"seed {r.seed} {r.status}" for r in runs if not r.summary]
    problems += [f"seed {r.seed} **collapsed**" for r in done
                 if r.finished.get("collapsed_at") is not None]
    if len({tuple(sorted(_trained_with(r).items())) for r in done if r.config}) > 1:
        problems.append(DIFFERING_SEEDS)
    status = "; ".join(problems) or "ok"
    count = str(len(runs)) if len(done) == len(runs) else f"{len(done)} of {len(runs)}"
    if not done:
        return [name, count, *(dash for _ in range(8 + len(targets))), status]

    def values(key: str) -> list[float]:
        return [r.finished[key] for r in done if r.finished.get(key) is not None]

    def over_seeds(key: str, fmt) -> str:  # and over how many, when some runs lack the value
        got = values(key)
        return mean_sd(got, fmt) + (f" in {len(got)} of {len(done)}"
                                     if 0 < len(got) < len(done) else "")

    reach = []
    for target in targets:
        hit = [p for p in (time_to(r.points, target) for r in done) if p is not None]
        text = "not reached" if not hit else (
            f"{mean_sd([p['t'] for p in hit], _seconds)} s "
            f"({mean_of([p['epoch'] for p in hit]):.2f} ep)")
        reach.append(text + (f" in {len(hit)} of {len(done)}" if 0 < len(hit) < len(done)
                             else ""))
    stale = [r.finished["staleness"] for r in done if r.finished.get("staleness")]
    moved: dict[str, list[float]] = {}
    for r in done:
        for key, value in _byte_counts(r.finished, r.byte_fields):
            moved.setdefault(key, []).append(value)
    peaks = [p for r in done for p in r.finished.get("peak_memory_per_worker") or ()
             if p is not None]
    workers = sorted(set(values("workers")))
    accuracy = "{:.4f}".format
    final, best = _final_cells([r.finished for r in done],
                               over_seeds("final_test_acc", accuracy),
                               over_seeds("best_test_acc", accuracy),
                               lambda key: over_seeds(key, accuracy))
    return [name, count, "/".join(map(str, workers)) or NA, final, best,
            over_seeds("wall_s", _seconds), *reach,
            over_seeds("samples_per_s", "{:.0f}".format),
            bytes_text(max(peaks)) if peaks else dash, _seed_staleness(stale) if stale else dash,
            "; ".join(f"{k} {bytes_text(mean_of(v))}" for k, v in sorted(moved.items())) or dash,
            status]


# The seed table's staleness column: which figures are means over the seeds, which the largest
SEED_STALENESS = "staleness mean / p50 / p90 / p99 (each averaged over seeds) / max (largest)"


def _seed_staleness(runs: list[dict]) -> str:
    """The seed table's staleness cell of the runs' distributions: the mean of each run's
    mean, p50, p90 and p99, and the largest max. The max was averaged too: seeds with max 15
    and 57 showed 36, which no run had."""
    means = [mean_of([d[k] for d in runs]) for k in STALENESS_KEYS[:-1]]
    return " / ".join([f"{means[0]:.2f}", *map(updates_text, means[1:]),
                       updates_text(max(d["max"] for d in runs))])


def seed_table(rows: list[Row], targets: list[float]) -> str:
    """A comparison with ``--seeds``: one row per algorithm, in Markdown. Accuracies, wall
    time, samples/s and each time to a target are the mean ± sample standard deviation over
    the seeds whose run finished (a time to a target: over those that reached it, and how
    many did; a value some runs' summaries lack, over the others, and how many); peak
    memory and staleness max are the largest; the other staleness figures and bytes are
    means (:data:`SEED_STALENESS` says which)."""
    head = ["algorithm", "seeds", "workers", "final acc", "best acc", "wall s",
            *(f"time to {t:g}" for t in targets), "samples/s", "peak memory",
            SEED_STALENESS, "bytes communicated per rank", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mark = _mixed(rows)  # an algorithm whose finished runs were all simulated, among real ones
    lines += ["| " + " | ".join(_seed_cells(
        plain_text(group_name(runs)) + (f" {SIMULATED_MARK}" if mark and _all_simulated(runs)
                                    else ""),
        runs, targets)) + " |" for runs in by_algorithm(rows).values()]
    return "\n".join(lines)


def main_table(rows: list[Row], targets: list[float]) -> str:
    """The table a report leads with: per algorithm over seeds if the runs have seeds, else
    one row per run."""
    seeded = any(r.seed is not None for r in rows)
    return seed_table(rows, targets) if seeded else table(rows, targets)
