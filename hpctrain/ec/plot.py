"""Plot test accuracy against wall time for finished ``ma``/``ec`` runs.

``python -m hpctrain.ec.plot --out docs/ec-vs-ma.png RUN_DIR...``: MA runs show the averaged
model, EC runs rank 0's member (solid) and the ensemble (dashed).
"""

from __future__ import annotations

from pathlib import Path

from hpctrain.errors import UsageError
from hpctrain.metrics import read_json, read_points
from hpctrain.plots import accuracy_figure, arguments, distinct, run_command


def curves(run_dir: str | Path) -> list[tuple[str, list[float], list[float], str]]:
    """(label, wall seconds, accuracies, line style) for each model of one run."""
    summary = read_json(Path(run_dir) / "summary.json", "a finished run's summary", ("algo",))
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
    name = f"{summary['algo'].upper()} tau={summary['tau']}"
    if options.get("ec_distill_from", "own") != "own":
        name += f" from {options['ec_distill_from']}"
    if summary["algo"] == "ma":
        return [(f"{name} (averaged)", t, [p["averaged_acc"] for p in points], "-")]
    return [(f"{name} (member)", t, [p["member_acc"] for p in points], "-"),
            (f"{name} (ensemble)", t, [p["ensemble_acc"] for p in points], "--")]


def plot(run_dirs: list[str], out: str, title: str, ymin: float) -> None:
    """Write the figure for ``run_dirs`` to ``out`` (PNG)."""
    with accuracy_figure(out, "wall time (s, training only)", title, ymin) as ax:
        for i, run in enumerate(distinct(run_dirs)):
            for label, t, acc, style in curves(run):
                ax.plot(t, acc, style, color=f"C{i}", label=label, marker=".", markersize=4)


def main(argv: list[str] | None = None) -> None:
    args = arguments("hpctrain.ec.plot", __doc__.splitlines()[0], "output folders of ma/ec runs",
                     "EC vs MA: test accuracy against wall time").parse_args(argv)
    run_command("hpctrain.ec.plot", lambda: plot(args.runs, args.out, args.title, args.ymin))


if __name__ == "__main__":
    main()
