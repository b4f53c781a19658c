"""Plot test accuracy against epochs for finished runs, one line per shuffling strategy.

``python -m hpctrain.shuffle.plot RUN_DIR... --out docs/shuffle-k8.png``: one line per
strategy (``--shuffle`` and ``--partition`` in the run's ``config.json``, and K where the runs
have several): the mean over its runs (seeds), with
their minimum-to-maximum range shaded. ``--table`` also prints Markdown tables: one row per
run (accuracies, data moved), and the mean and spread of the final accuracy per strategy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpctrain.errors import UsageError
from hpctrain.metrics import read_json, read_points
from hpctrain.plots import accuracy_figure, arguments, run_command


def _config(run_dir: str | Path) -> dict:
    """A run's ``config.json``; UsageError naming it when it is missing or not one."""
    return read_json(Path(run_dir) / "config.json", "a run's config.json")


def _summary(run_dir: str | Path) -> dict:
    """A finished run's ``summary.json``; UsageError naming it when it is missing or lacks a
    field the table shows."""
    return read_json(Path(run_dir) / "summary.json", "a finished run's summary",
                     ("workers", "final_test_acc", "best_test_acc", "bytes_moved", "exchange_s",
                      "epochs"))


def _strategy(config: dict, run_dir: str | Path = "") -> str:
    """The run's ``--shuffle``, and its ``--partition`` unless iid (runs that differ in either
    are not one setting): nested under "data" in newer config.json files, flat before."""
    data = config.get("data")
    values = data if isinstance(data, dict) else config
    strategy, partition = values.get("shuffle"), values.get("partition", "iid")
    if not isinstance(strategy, str):
        raise UsageError(f"{Path(run_dir) / 'config.json'} names no --shuffle strategy")
    return strategy if partition == "iid" else f"{strategy}, {partition}"


def curve(run_dir: str | Path) -> tuple[str, list[float], list[float]]:
    """(strategy, epochs, test accuracies) of one run."""
    config = _config(run_dir)
    points = read_points(run_dir)
    return (_strategy(config, run_dir), [p["epoch"] for p in points],
            [p["test_acc"] for p in points])


def table_row(run_dir: str | Path) -> str:
    """One Markdown row: K, strategy, seed, final and best accuracy, and per epoch the MB rank 0
    sent to other ranks and its seconds spent exchanging."""
    config, s = _config(run_dir), _summary(run_dir)
    return (f"| {s['workers']} | {_strategy(config, run_dir)} | {config.get('seed', '?')} "
            f"| {s['final_test_acc']:.4f} | {s['best_test_acc']:.4f} "
            f"| {s['bytes_moved'] / s['epochs'] / 1e6:.2f} | {s['exchange_s'] / s['epochs']:.3f} |")


def table(run_dirs: list[str]) -> str:
    """A Markdown table of ``run_dirs``, one row each."""
    head = ("| K | shuffle | seed | final acc | best acc | MB moved / epoch / rank "
            "| exchange s / epoch |\n|---|---|---|---|---|---|---|")
    return "\n".join([head, *(table_row(run) for run in run_dirs)])


def spread_table(run_dirs: list[str]) -> str:
    """A Markdown table of the final accuracy per (K, strategy): runs, mean, sd, min, max."""
    finals: dict[tuple[int, str], list[float]] = {}
    for run in run_dirs:
        s = _summary(run)
        finals.setdefault((s["workers"], _strategy(_config(run), run)), []).append(
            s["final_test_acc"])
    rows = ["| K | shuffle | runs | mean final acc | sd | min | max |",
            "|---|---|---|---|---|---|---|"]
    for (k, strategy), acc in finals.items():
        a = np.array(acc)
        sd = a.std(ddof=1) if len(a) > 1 else 0.0
        rows.append(f"| {k} | {strategy} | {len(a)} | {a.mean():.4f} | {sd:.4f} "
                    f"| {a.min():.4f} | {a.max():.4f} |")
    return "\n".join(rows)


def lines(run_dirs: list[str]) -> dict[str, list[tuple[list[float], list[float]]]]:
    """The plot's lines: each setting's runs' (epochs, accuracies), by the setting's label
    (the strategy, with K where the runs have several)."""
    by_strategy: dict[str, list[tuple[list[float], list[float]]]] = {}
    curves = {run: curve(run) for run in run_dirs}
    workers = {run: _summary(run)["workers"] for run in run_dirs}
    for run in run_dirs:
        strategy, epochs, acc = curves[run]
        if len(set(workers.values())) > 1:
            strategy = f"K = {workers[run]}, {strategy}"
        by_strategy.setdefault(strategy, []).append((epochs, acc))
    return by_strategy


def plot(run_dirs: list[str], out: str, title: str, ymin: float) -> None:
    """Write the figure for ``run_dirs`` to ``out`` (PNG)."""
    by_strategy = lines(run_dirs)
    with accuracy_figure(out, "epochs", title, ymin) as ax:
        for i, (strategy, runs) in enumerate(by_strategy.items()):
            epochs = runs[0][0]
            if any(e != epochs for e, _ in runs):
                raise UsageError(f"--shuffle {strategy}: runs were evaluated at different epochs")
            acc = np.array([a for _, a in runs])
            label = strategy if len(runs) == 1 else f"{strategy} (mean of {len(runs)} seeds)"
            ax.plot(epochs, acc.mean(axis=0), color=f"C{i}", label=label, marker=".",
                    markersize=4)
            if len(runs) > 1:
                ax.fill_between(epochs, acc.min(axis=0), acc.max(axis=0), color=f"C{i}",
                                alpha=0.15)


def main(argv: list[str] | None = None) -> None:
    p = arguments(__doc__.splitlines()[0], "output folders of training runs",
                  "Shuffling strategies: test accuracy against epochs")
    p.add_argument("--table", action="store_true", help="also print a Markdown table")
    args = p.parse_args(argv)

    def draw() -> None:
        text = table(args.runs) + "\n\n" + spread_table(args.runs) if args.table else None
        plot(args.runs, args.out, args.title, args.ymin)
        if text is not None:
            print(text)

    run_command("hpctrain.shuffle.plot", draw)


if __name__ == "__main__":
    main()
