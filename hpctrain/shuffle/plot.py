"""Plot test accuracy against epochs for finished runs, one line per shuffling setting.

``python -m hpctrain.shuffle.plot RUN_DIR... --out docs/shuffle-k8.png``: one line per
setting (``--shuffle`` and ``--partition`` in the run's ``config.json``, and the algorithm and
K where the runs have several): the mean over its runs, with their minimum-to-maximum range
shaded when they are of several seeds (runs repeated with one seed are not a spread over
seeds). ``--table`` also prints Markdown tables: one row per run (accuracies, data moved), and
the mean and spread of the final accuracy per setting.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from hpctrain.errors import UsageError
from hpctrain.metrics import read_json, read_points
from hpctrain.plots import accuracy_figure, arguments, distinct, run_command


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
    # A resumed run counts the exchanges it made itself: its epochs since the checkpoint.
    per_epoch = s.get("exchange_per_epoch")
    exchanged = len(per_epoch) if isinstance(per_epoch, list) and per_epoch else s["epochs"]
    return (f"| {s['workers']} | {_strategy(config, run_dir)} | {config.get('seed', '?')} "
            f"| {s['final_test_acc']:.4f} | {s['best_test_acc']:.4f} "
            f"| {s['bytes_moved'] / exchanged / 1e6:.2f} | {s['exchange_s'] / exchanged:.3f} |")


def table(run_dirs: list[str]) -> str:
    """A Markdown table of ``run_dirs``, one row each."""
    head = ("| K | shuffle | seed | final acc | best acc | MB moved / epoch / rank "
            "| exchange s / epoch |\n|---|---|---|---|---|---|---|")
    return "\n".join([head, *(table_row(run) for run in run_dirs)])


Setting = tuple[int, str, str]  # (K, algorithm, strategy): the runs a line averages


def _setting(run_dir: str | Path) -> Setting:
    """K, the algorithm (with its options, as the summary labels it) and the strategy."""
    config, s = _config(run_dir), _summary(run_dir)
    algo = s.get("algo_label") or config.get("algo") or s.get("algo") or "?"
    return s["workers"], str(algo), _strategy(config, run_dir)


def _groups(run_dirs: list[str]) -> dict[Setting, list[str]]:
    """The runs of each setting."""
    groups: dict[Setting, list[str]] = {}
    for run in run_dirs:
        groups.setdefault(_setting(run), []).append(run)
    return groups


def _label(setting: Setting, drawn: Iterable[Setting], with_k: bool = True) -> str:
    """The strategy, after the algorithm and K where the ``drawn`` settings have several."""
    k, algo, strategy = setting
    several = [len({s[i] for s in drawn}) > 1 for i in (0, 1)]
    return ", ".join([*([f"K = {k}"] if with_k and several[0] else []),
                      *([algo] if several[1] else []), strategy])


def _seed(run_dir: str | Path) -> object:
    return _config(run_dir).get("seed", "?")


def spread_table(run_dirs: list[str]) -> str:
    """A Markdown table of the final accuracy per setting (K, algorithm, strategy): runs,
    mean, sd, min, max, and how many seeds the runs are of."""
    rows = ["| K | shuffle | runs | mean final acc | sd | min | max | seeds |",
            "|---|---|---|---|---|---|---|---|"]
    groups = _groups(run_dirs)
    for setting, runs in groups.items():
        a = np.array([_summary(run)["final_test_acc"] for run in runs])
        sd = a.std(ddof=1) if len(a) > 1 else 0.0
        rows.append(f"| {setting[0]} | {_label(setting, groups, with_k=False)} | {len(a)} "
                    f"| {a.mean():.4f} | {sd:.4f} | {a.min():.4f} | {a.max():.4f} "
                    f"| {len({_seed(run) for run in runs})} |")
    return "\n".join(rows)


def lines(run_dirs: list[str]) -> dict[str, list[tuple[object, list[float], list[float]]]]:
    """The plot's lines: each setting's runs' (seed, epochs, accuracies), by the setting's
    label (the strategy, with the algorithm and K where the runs have several)."""
    groups = _groups(run_dirs)
    return {_label(setting, groups): [(_seed(run), *curve(run)[1:]) for run in runs]
            for setting, runs in groups.items()}


def _line_label(setting: str, seeds: list[object]) -> str:
    """``setting``, and what its line is the mean of (``seeds``: each run's)."""
    distinct = len(set(seeds))
    if len(seeds) == 1:
        return setting
    if distinct == 1:
        return f"{setting} (mean of {len(seeds)} runs of seed {seeds[0]})"
    runs = f"{len(seeds)} runs, " if distinct < len(seeds) else ""
    return f"{setting} (mean of {runs}{distinct} seeds)"


def draw(ax, run_dirs: list[str]) -> None:
    """Each setting's mean curve on ``ax``, its runs' range shaded when they are of several
    seeds (one seed's repeats are no spread over seeds)."""
    for i, (setting, runs) in enumerate(lines(run_dirs).items()):
        epochs = runs[0][1]
        if any(e != epochs for _, e, _ in runs):
            raise UsageError(f"--shuffle {setting}: runs were evaluated at different epochs")
        acc = np.array([a for _, _, a in runs])
        seeds = [seed for seed, _, _ in runs]
        ax.plot(epochs, acc.mean(axis=0), color=f"C{i}", label=_line_label(setting, seeds),
                marker=".", markersize=4)
        if len(set(seeds)) > 1:
            ax.fill_between(epochs, acc.min(axis=0), acc.max(axis=0), color=f"C{i}", alpha=0.15)


def plot(run_dirs: list[str], out: str, title: str, ymin: float) -> None:
    """Write the figure for ``run_dirs`` to ``out`` (PNG)."""
    with accuracy_figure(out, "epochs", title, ymin) as ax:
        draw(ax, distinct(run_dirs))


def main(argv: list[str] | None = None) -> None:
    p = arguments("hpctrain.shuffle.plot", __doc__.splitlines()[0],
                  "output folders of training runs",
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
