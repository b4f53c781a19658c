"""The plots: test error (%) against wall time and against epochs, following the DC-ASGD
paper's figures. :func:`curves` turns the rows into one :class:`Curve` per algorithm (with
seeds: their mean at the same epoch, the band from the lowest to the highest run, dashed
past a run that ended early), :func:`figure` draws them with matplotlib (imported there, as
the ``plot`` extra is optional) and :func:`plot` gives the PNG's bytes.

An algorithm keeps its colour and marker in every report (:func:`_style`); the legend and
the notes' words on the band and the time bars are here, beside what they describe.
"""

from __future__ import annotations

import bisect
import io
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpctrain import registry
from hpctrain.bench.report.formatting import mean_of
from hpctrain.bench.report.reading import (
    FINAL_MODELS,
    Row,
    _all_simulated,
    by_algorithm,
    final_model,
    group_name,
)

# x key of the curve points -> (file name, axis label)
PLOTS = {"t": ("error_vs_time.png", "wall time (s)"),
         "epoch": ("error_vs_epochs.png", "epochs (all workers)")}
NO_PLOTS = ("matplotlib is not installed (pip install \"hpctrain[plot]\", then "
            "hpctrain report DIR draws them)")
# Fixed colours, so an algorithm looks the same in every report.
_ORDER = registry.names()


# Marker of each curve (hollow, so that one under another of the same values still shows)
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")


def _style(algo: str | None, index: int) -> tuple[str, str]:
    """A curve's colour and marker: fixed for an algorithm, so that it looks the same in every
    report, else by its place (``algo`` None: another curve ran the same algorithm)."""
    i = _ORDER.index(algo) if algo in _ORDER else len(_ORDER) + index
    return f"C{i % 10}", MARKERS[i % len(MARKERS)]


# Percentage points of test error the plots show at least above the median final error: with
# runs near 0% error, 2.5 times the median left a run at a few percent off the plot.
ERROR_ROOM = 5.0


def _error_range(curves: list[list[float]], bands: Sequence[list[float]] = ()
                 ) -> tuple[float, float] | None:
    """Test error range (%) that shows how the runs converge: from just below the lowest error
    to 2.5 times the median final error, or that median plus ERROR_ROOM points if higher (the
    untrained start and diverged runs lie above). ``bands``: the edges of the seeds' min-max
    bands, in range as the curves are but not in the median (sized by the mean curves alone,
    the axis showed none of a band around them: its best seed fell below)."""
    later = [e for c in [*curves, *bands] for e in c[1:]]
    if not later:
        return None
    finals = sorted(c[-1] for c in curves)
    median = finals[len(finals) // 2]
    lo, hi = min(later), min(max(later), max(2.5 * median, median + ERROR_ROOM))
    pad = max(0.5, 0.05 * (hi - lo))
    return max(0.0, lo - pad), min(100.0, hi + pad)


@dataclass
class Curve:
    """One line of a plot: test error (%) at ``xs``; with seeds, the mean over the runs and
    the band from their lowest to their highest error, and how many runs each point is of
    (``runs``), out of ``of``. ``algo``: the algorithm its runs ran (its colour and marker)."""

    name: str
    label: str
    xs: list[float]
    err: list[float]
    band: tuple[list[float], list[float]] | None = None
    runs: list[int] | None = None
    of: int = 1
    algo: str | None = None
    ends: tuple[float, float] | None = None  # against time, seeds: the fastest, slowest end

    @property
    def partial(self) -> bool:
        """Whether some points are of fewer runs than the curve's (drawn dashed)."""
        return self.runs is not None and min(self.runs) < self.of


# The legend's entry for the dashed part of mean curves, there when some curve has one
DASHED = "dashed: past a run that ended early, the mean and band of the others"
# The legend's entry for the seeds' shade, there when some curve is of several runs, and
# report.md's words on it: the table gives ± a standard deviation, the shade is not one
BAND = "shaded: the seeds' range, lowest to highest run"
BAND_NOTE = ("In the plots each algorithm's line is the mean of its seeds' runs at the same "
             "epoch, and its shade the range over them, from the lowest to the highest run's "
             "test error there (not ± a standard deviation, as in the table). Against wall "
             "time the shade is of the error only: the bar at a line's end spans its seeds' "
             "end times, from the fastest to the slowest run.")
# The legend's entry for the wall-time bar at the end of a line of several seeds
TIME_BAR = "bar at a line's end: its seeds' end times, fastest to slowest"
TIME_SPREAD = "time-spread"  # the gid of those bars (Line2D), which tests find them by
NO_CURVE = "not drawn:"  # the legend's entry naming the runs not drawn (no_curve), and why


def curves(rows: list[Row], x: str) -> list[Curve]:
    """One curve per run, or with seeds one per algorithm: the mean test error of its runs,
    with the band from the lowest to the highest, against ``x`` (``t`` or ``epoch``).

    One rule for every algorithm, in both plots: the runs are averaged at the same epoch.
    Each run's error and time are linearly interpolated in epochs between its snapshots onto
    one grid, every run's snapshot epoch (where the runs' snapshots fall at the same epochs,
    as lock-step runs' do, those); point k is the mean of the runs' ``x`` and error at the
    k-th epoch and its band their lowest and highest error, over the runs whose snapshots
    span it. So a curve against time ends at its runs' mean wall time and mean final error,
    as the table's means, and goes as far as its longest run in epochs; past the end of one
    stopped early (``--stop-on-collapse``) it is the mean and band of the runs left, which
    the plot draws dashed. Averaging the errors at the same time instead left past the
    fastest seed's end the slower seeds alone: every curve's tail jumped to their error."""
    out = []
    differ = _differing_trained(rows)
    for name, runs in by_algorithm(rows).items():
        drawn = [r for r in runs if r.points]
        if runs[0].seed is None:
            for r in drawn:
                pts = sorted(r.points, key=lambda p: p[x])
                out.append(Curve(name, r.label + _trained_on([r], differ) + _scores([r]),
                                 [p[x] for p in pts],
                                 _errors(pts), algo=r.algo or name))
            continue
        if not drawn:
            continue
        workers = (drawn[0].summary or {}).get("workers")
        of = f" of {len(runs)}" if len(drawn) < len(runs) else ""  # the others: no_curve's
        label = (f"{group_name(runs)}, M={'?' if workers is None else workers}, mean of "
                 f"{len(drawn)}{of} seed{'s' if len(drawn) > 1 or of else ''}"
                 + _trained_on(drawn, differ) + _scores(drawn))
        lines = [_by_epoch(r.points, x) for r in drawn]
        grid = sorted({e for epochs, _, _ in lines for e in epochs})
        there = [[line for line in lines if line[0][0] <= e <= line[0][-1]] for e in grid]
        xs = [e if x == "epoch" else mean_of([_interpolate(epochs, at, e)
                                            for epochs, at, _ in those])
              for e, those in zip(grid, there, strict=True)]
        column = [[_interpolate(epochs, err, e) for epochs, _, err in those]
                  for e, those in zip(grid, there, strict=True)]
        algos = {r.algo or name for r in drawn}
        ends = [at[-1] for _, at, _ in lines]  # each run's time at its last snapshot
        out.append(Curve(name, label, xs, [mean_of(c) for c in column],
                         ([min(c) for c in column], [max(c) for c in column]),
                         [len(c) for c in column], len(drawn),
                         algo=algos.pop() if len(algos) == 1 else None,
                         ends=(min(ends), max(ends)) if x == "t" and len(drawn) > 1 else None))
    return out


def _scores(runs: list[Row]) -> str:
    """Which of its models an ec line scores, for its legend label (``, rank 0's member``,
    as :func:`final_model`); "" for the other algorithms, whose one model it is. The line
    said "ec, M=4" alone, though its points are rank 0's member (or, with ``--ec-final
    ensemble``, the ensemble), which only report.md's text said."""
    models = dict.fromkeys(m for r in runs if (m := final_model(r.summary or {})) is not None)
    return ", " + " / ".join(FINAL_MODELS[m] for m in models) if models else ""


# Summary keys of what a run trained that the plots name (title, or each line where they differ)
TRAINED = ("model", "dataset")


def _differing_trained(rows: list[Row]) -> tuple[str, ...]:
    """The keys of TRAINED whose values differ between the finished runs."""
    finished = [r.summary for r in rows if r.summary is not None]
    return tuple(k for k in TRAINED if len({str(s.get(k, "?")) for s in finished}) > 1)


def _trained_on(runs: list[Row], keys: tuple[str, ...]) -> str:
    """What ``runs`` trained, of ``keys`` (:func:`_differing_trained`), for a line's legend
    label (``, lenet on fashion-mnist``); "" for none. The title named every model and data
    set ("mlp, lenet on synthetic, fashion-mnist"), not which line was which."""
    if not keys:
        return ""
    values = [" / ".join(short_name(name) for name in dict.fromkeys(  # distinct in full:
        str((r.summary or {}).get(k, "?")) for r in runs)) for k in keys]  # /a/x, /b/x twice
    return ", " + " on ".join(values)


def short_name(name: str) -> str:
    """A model's or data set's name as the plots show it: each path in it by its last part
    (``/home/me/mynet.py:build``: ``mynet.py:build``; ``imagefolder:/data/imgs/``:
    ``imagefolder:imgs``), as the absolute paths a summary records ran past the figure's
    edge."""
    return ":".join(Path(part).name or part if "/" in part else part
                    for part in name.split(":"))


def no_curve(rows: list[Row]) -> list[str]:
    """Each run (with seeds, algorithm) the plots have no line of, with why (its status, or
    no curve point): the plots dropped failed runs without a word, so a PNG taken on its own
    showed one algorithm of three, none said failed."""
    missing = []
    for runs in by_algorithm(rows).values():
        if not any(r.points for r in runs):
            why = dict.fromkeys(r.status if r.status != "ok" else "without curve points"
                                for r in runs)
            name = group_name(runs) if runs[0].seed is not None else runs[0].heading
            missing.append(f"{name} {', '.join(why)}")
    return missing


def _errors(points: list[dict]) -> list[float]:
    """The test error (%) of each curve point."""
    return [100.0 * (1.0 - p["test_acc"]) for p in points]


def _by_epoch(points: list[dict], x: str) -> tuple[list[float], list[float], list[float]]:
    """A run's snapshot epochs, increasing and each once (the last point at an epoch wins),
    with its ``x`` and test error (%) there."""
    last = {p["epoch"]: p for p in sorted(points, key=lambda p: p["epoch"])}
    kept = list(last.values())
    return list(last), [p[x] for p in kept], _errors(kept)


def _interpolate(xs: list[float], ys: list[float], at: float) -> float:
    """``ys`` linearly interpolated at ``at``, with ``xs`` increasing and holding ``at``'s
    range (``xs[0] <= at <= xs[-1]``)."""
    i = bisect.bisect_left(xs, at)
    if xs[i] == at:
        return ys[i]
    x0, x1 = xs[i - 1], xs[i]
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (at - x0) / (x1 - x0)


def legend_label(curve: Curve, shown: tuple[float, float] | None) -> str:
    """The curve's label in the legend, saying so when the whole curve lies above the error
    range ``shown`` (three digits: an upper limit of 0.5% is not "0%")."""
    if shown is None or min(curve.err) <= shown[1]:
        return curve.label
    return f"{curve.label} (above {shown[1]:.3g}%)"


def x_label(rows: list[Row], x: str) -> str:
    """The plot's x axis: simulated runs' times are virtual, said on the PNG too."""
    return "virtual time (s, simulated)" if x == "t" and _all_simulated(rows) else PLOTS[x][1]


def figure(rows: list[Row], x: str, title: str = ""):
    """The matplotlib Figure of test error (%) against curve key ``x`` (``t`` or ``epoch``),
    one line per run (with seeds: per algorithm, shaded from its lowest to its highest run,
    against time a bar at its end from its fastest to its slowest run's end time (a wall
    time of 25.6 ± 10.7 s looked tight under an error shade), dashed past a run that ended
    early, which the legend then says, as it says what the
    shade is: unsaid, it read as the table's ± a standard deviation); the legend names the
    runs with no line, and why (:func:`no_curve`). Each curve has its own marker, and each
    drawn later is narrower, so that one lying on another still shows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lines = curves(rows, x)
    shown = _error_range([c.err for c in lines], [b for c in lines for b in c.band or ()])
    algos = [c.algo for c in lines]
    for i, c in enumerate(lines):
        colour, marker = _style(c.algo if algos.count(c.algo) == 1 else None, i)
        width = 1.0 + 1.5 * (len(lines) - 1 - i) / max(len(lines) - 1, 1)
        drawn: dict[str, Any] = {"color": colour, "marker": marker, "markerfacecolor": "none",
                                 "linewidth": width, "markersize": 2.0 + 2.0 * width}
        # partial: dashed throughout, solid over it between points of every run
        if c.partial and c.runs is not None:
            ax.plot(c.xs, c.err, "--", **drawn)
            ax.plot(c.xs, [e if k == c.of else math.nan for e, k in zip(c.err, c.runs,
                                                                        strict=True)],
                    label=legend_label(c, shown), **drawn)
        else:
            ax.plot(c.xs, c.err, label=legend_label(c, shown), **drawn)
        if c.band is not None:
            ax.fill_between(c.xs, *c.band, color=colour, alpha=0.2, linewidth=0)
        if c.ends is not None:  # the seeds' spread in time, which the shade does not show
            ax.plot(c.ends, [c.err[-1]] * 2, "|-", color=colour, linewidth=1.2, markersize=9,
                    gid=TIME_SPREAD)
    if any(c.band is not None and c.of > 1 for c in lines):
        ax.fill_between([], [], color="0.4", alpha=0.2, linewidth=0, label=BAND)
    if any(c.ends is not None for c in lines):
        ax.plot([], [], "|-", color="0.4", markersize=9, label=TIME_BAR)
    if any(c.partial for c in lines):
        ax.plot([], [], "--", color="0.4", label=DASHED)
    missing = no_curve(rows)
    if missing:
        ax.plot([], [], " ", label=f"{NO_CURVE} " + "; ".join(missing))
    if shown:
        ax.set_ylim(*shown)
    if shown or missing:
        ax.legend(loc="upper right", fontsize="small")
    ax.set_title("\n".join(textwrap.wrap(title, TITLE_WIDTH, break_on_hyphens=False)))
    ax.set_xlabel(x_label(rows, x))
    ax.set_ylabel("test error (%)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


TITLE_WIDTH = 50  # characters a line of a plot's title holds within the figure's width


def plot(rows: list[Row], x: str, title: str = "") -> bytes:
    """:func:`figure` as a PNG."""
    buf = io.BytesIO()
    figure(rows, x, title).savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def figure_title(record: dict, rows: list[Row]) -> str:
    """Model and data set, where the runs share them (else the legend names each line's:
    :func:`_trained_on`), and the stragglers when the comparison had some."""
    finished = [r.summary for r in rows if r.summary] or [{}]
    differ = _differing_trained(rows)
    model, dataset = (f"each line's {what}" if key in differ
                      else short_name(str(finished[0].get(key, "?")))
                      for key, what in zip(TRAINED, ("model", "data set"), strict=True))
    title = "each line's model and data set" if len(differ) == 2 else f"{model} on {dataset}"
    words = record.get("train_args", [])
    for flag in ("--slowdown", "--jitter"):
        if flag in words[:-1]:
            title += f", {flag} {words[words.index(flag) + 1]}"
    return title
