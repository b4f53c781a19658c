"""What the ``ec`` and ``shuffle`` plot commands share: their arguments, the test-accuracy figure
they draw their curves on, and how they end on bad input."""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hpctrain.errors import UsageError
from hpctrain.metrics import write_atomic

# Accuracy left below the lowest point drawn when it lies under --ymin.
YMIN_MARGIN = 0.02


def _fraction(text: str) -> float:
    """An accuracy in [0, 1) for ``--ymin`` (nan reached matplotlib)."""
    value = float(text)
    if not 0 <= value < 1:  # False for nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def arguments(prog: str, description: str, runs: str, title: str) -> argparse.ArgumentParser:
    """The arguments of the plot command ``python -m PROG``: run folders, ``--out``,
    ``--title`` and ``--ymin``."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    p.add_argument("runs", nargs="+", help=runs)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--title", default=title)
    p.add_argument("--ymin", type=_fraction, default=0.6,
                   help="the y axis' lowest accuracy (lower when a curve goes below it)")
    return p


def distinct(run_dirs: list[str]) -> list[str]:
    """``run_dirs``, each once: a run given twice counted twice (a "mean of 2 runs")."""
    seen: dict[Path, str] = {}
    for run in run_dirs:
        if (key := Path(run).resolve()) in seen:
            raise UsageError(f"{run} is given twice (as {seen[key]})" if seen[key] != run
                             else f"{run} is given twice")
        seen[key] = run
    return run_dirs


def run_command(prog: str, action: Callable[[], None]) -> None:
    """Run a plot command's ``action``; bad input (a UsageError) is one line on stderr,
    ``PROG: error: ...``, and exit status 2, as hpctrain's commands say it."""
    try:
        action()
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _bottom(ax, ymin: float) -> float:
    """The y axis' lowest accuracy: ``ymin``, or lower when something drawn lies below it (the
    axis from ``ymin`` up would then hide it, or be upside down)."""
    lowest = float(ax.dataLim.ymin)
    if lowest != lowest or lowest == float("inf") or lowest >= ymin:  # nothing drawn, or above
        return ymin
    return max(0.0, lowest - YMIN_MARGIN)


def write_figure(fig, out: str | Path, **savefig) -> None:
    """Render ``fig`` to memory (in the format ``out``'s suffix names; PNG without one) and
    write it to ``out`` atomically: a failed render or write leaves no half-written file.
    UsageError naming ``out`` when it cannot be written."""
    out = Path(out)
    fmt = out.suffix[1:].lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise UsageError(f"--out {out}: matplotlib cannot write .{fmt} files")
    if out.is_dir():
        raise UsageError(f"--out {out}: it is a folder")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, **savefig)
    try:
        write_atomic(out, buf.getvalue())
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None


@contextmanager
def accuracy_figure(out: str, xlabel: str, title: str, ymin: float) -> Iterator:
    """Axes to draw test-accuracy curves on; on leaving, labelled and written to ``out`` (PNG),
    its y axis from ``ymin`` (or just below the lowest point drawn, if lower)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(bottom=_bottom(ax, ymin))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        write_figure(fig, out, dpi=120)
    finally:
        plt.close(fig)
