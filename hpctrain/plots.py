"""What the ``ec`` and ``shuffle`` plot commands share: their arguments and the test-accuracy figure
they draw their curves on."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager


def _fraction(text: str) -> float:
    """An accuracy in [0, 1) for ``--ymin`` (nan reached matplotlib)."""
    value = float(text)
    if not 0 <= value < 1:  # False for nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def arguments(description: str, runs: str, title: str) -> argparse.ArgumentParser:
    """The arguments of a plot command: run folders, ``--out``, ``--title`` and ``--ymin``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("runs", nargs="+", help=runs)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--title", default=title)
    p.add_argument("--ymin", type=_fraction, default=0.6, help="the y axis' lowest accuracy")
    return p


@contextmanager
def accuracy_figure(out: str, xlabel: str, title: str, ymin: float) -> Iterator:
    """Axes to draw test-accuracy curves on; on leaving, labelled and written to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(bottom=ymin)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
