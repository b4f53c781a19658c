"""Plot test accuracy against wall time for finished ``ma``/``ec`` runs.

``python -m hpctrain.ec.plot --out docs/ec-vs-ma.png RUN_DIR...``: MA runs show the averaged
model, EC runs rank 0's member (solid) and the ensemble (dashed). The legend names each run
by the end of its path that tells it from the others (``seed-1``, ``ma/seed-1``), and the
time axis says what the runs' times hold: training only, or evaluation too where rank 0
scored its member between steps (``--eval online``: the summary's ``eval_in_clock``), and
virtual seconds for simulated runs; where the runs differ, the legend marks those it applies
to.
"""

from __future__ import annotations

from pathlib import Path

from hpctrain.errors import UsageError
from hpctrain.metrics import read_json, read_points
from hpctrain.plots import accuracy_figure, arguments, distinct, run_command


def _summary(run_dir: str | Path) -> dict:
    return read_json(Path(run_dir) / "summary.json", "a finished run's summary", ("algo",))


def curves(run_dir: str | Path, name: str = "") -> list[tuple[str, list[float], list[float],
                                                              str]]:
    """(label, seconds, accuracies, line style) for each model of one run; ``name``: the
    run's, said first in each label."""
    summary = _summary(run_dir)
    if summary["algo"] not in ("ma", "ec"):
        raise UsageError(f"{run_dir} is a run of --algo {summary['algo']}, not ma or ec")
    if "tau" not in summary:
        raise UsageError(f"{Path(run_dir) / 'summary.json'} has no tau (not an "
                         f"{summary['algo']} run's summary)")
    keys = ("averaged_acc",) if summary["algo"] == "ma" else ("member_acc", "ensemble_acc")
    points = read_points(run_dir)
    for number, point in enumerate(points, 1):
        if missing := [k for k in keys if k not in point]:
            raise UsageError(f"{Path(run_dir) / 'metrics.jsonl'}: point {number} has no "
                             f"{missing[0]} (not an {summary['algo']} run's curve)")
    t = [p["t"] for p in points]
    options = read_json(Path(run_dir) / "config.json", "a run's config.json",
                        ("algorithm",))["algorithm"]
    if not isinstance(options, dict):
        raise UsageError(f"{Path(run_dir) / 'config.json'}: algorithm is {options!r}, not the "
                         "run's algorithm options")
    label = (f"{name}: " if name else "") + f"{summary['algo'].upper()} tau={summary['tau']}"
    if options.get("ec_distill_from", "own") != "own":
        label += f" from {options['ec_distill_from']}"
    if summary["algo"] == "ma":
        return [(f"{label} (averaged)", t, [p["averaged_acc"] for p in points], "-")]
    return [(f"{label} (member)", t, [p["member_acc"] for p in points], "-"),
            (f"{label} (ensemble)", t, [p["ensemble_acc"] for p in points], "--")]


def run_names(run_dirs: list[str]) -> list[str]:
    """The shortest ends of the runs' paths that tell them apart (``seed-1``, ``econ``; else
    ``ma/seed-1``): their names in the legend, since two runs' settings may read the same."""
    parts = [Path(run).resolve().parts for run in run_dirs]
    for n in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            break
    return names


def time_axis(summaries: list[dict]) -> tuple[str, list[str]]:
    """The time axis' label, true of every run drawn, and what each run's name adds in the
    legend where the runs' times differ in kind: evaluation in the time of runs whose rank 0
    scored its member between steps (``eval_in_clock``), and virtual seconds (simulated)."""
    in_clock = [s.get("eval_in_clock") is True for s in summaries]
    simulated = [s.get("simulated") is True for s in summaries]
    axis = "virtual time (s, simulated" if all(simulated) else "wall time (s"
    axis += ", with evaluation)" if all(in_clock) else ", training only unless marked)" \
        if any(in_clock) else ", training only)"
    marks = [", ".join(([] if all(in_clock) or not clock else ["with evaluation"])
                       + ([] if all(simulated) or not sim else ["virtual s"]))
             for clock, sim in zip(in_clock, simulated, strict=True)]
    return axis, marks


def plot(run_dirs: list[str], out: str, title: str, ymin: float):
    """Write the figure for ``run_dirs`` to ``out`` (PNG); return its Axes."""
    runs = distinct(run_dirs)
    axis, marks = time_axis([_summary(run) for run in runs])
    names = [f"{name} ({mark})" if mark else name
             for name, mark in zip(run_names(runs), marks, strict=True)]
    drawn = [curves(run, name) for run, name in zip(runs, names, strict=True)]
    with accuracy_figure(out, axis, title, ymin) as ax:
        for i, lines in enumerate(drawn):
            for label, t, acc, style in lines:
                ax.plot(t, acc, style, color=f"C{i}", label=label, marker=".", markersize=4)
    return ax


def main(argv: list[str] | None = None) -> None:
    args = arguments("hpctrain.ec.plot", __doc__.splitlines()[0], "output folders of ma/ec runs",
                     "EC vs MA: test accuracy against wall time").parse_args(argv)
    run_command("hpctrain.ec.plot", lambda: plot(args.runs, args.out, args.title, args.ymin))


if __name__ == "__main__":
    main()
