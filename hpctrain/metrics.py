"""Run outputs (``config.json``, ``metrics.jsonl``, ``summary.json``), progress bar, summaries.

Every file is written whole to a temporary name, flushed, and renamed into place, so a killed
job never leaves a half-written output behind. Only rank 0 writes. A float that is not
finite (NaN, Infinity) is written as ``null``: JSON has no token for it, and strict parsers
(``JSON.parse``, ``jq``, most languages') refused the file that Python's ``NaN`` made.
"""

from __future__ import annotations

import bisect
import errno
import io
import itertools
import json
import math
import operator
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeGuard

import numpy as np
import torch
from tqdm import tqdm

from hpctrain.errors import UsageError


def write_atomic(path: str | Path, content: str | bytes | Sequence[bytes | memoryview],
                 durable: bool = False, midway: Callable[[], None] | None = None) -> None:
    """Write ``content`` to ``path`` through a flushed and fsynced temporary file and a rename.

    ``content``: text, bytes, or byte chunks written one after another (a checkpoint's header
    line and a view of its payload: joining them would copy the payload).
    ``durable``: also fsync the folder, so that the rename itself survives a crash (checkpoints).
    ``midway`` runs when half of the bytes are written (fault injection). A failed write (a full
    disk, a quota) leaves ``path`` as it was and raises the OSError with ``path`` in its
    message: the write itself only knows a file descriptor.
    """
    path = Path(path)
    try:
        _write_atomic(path, content, durable, midway)
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


# The temporary files _write_atomic makes (a prefix, 8 random characters, a suffix: as
# mkstemp's were).
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files of :func:`write_atomic` that a writer killed mid-write left
    in ``folder`` (a kill skips the clean-up): a large model's half is gigabytes, and nothing
    else would ever remove them. Only for a folder no other writer uses (a run's ``--out``,
    which its lock makes its own)."""
    for name in os.listdir(folder):
        if _TEMPORARY.match(name) and (folder / name).is_file():
            (folder / name).unlink(missing_ok=True)


def _write_atomic(path: Path, content: str | bytes | Sequence[bytes | memoryview],
                  durable: bool, midway: Callable[[], None] | None) -> None:
    first, second = _halves(content)
    fd, tmp = _new_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in first:
                f.write(chunk)
            if midway is not None:
                midway()
            for chunk in second:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _new_temporary(path: Path) -> tuple[int, Path]:
    """A new file beside ``path`` (a random name :data:`_TEMPORARY` matches), open for
    writing, its mode as open() would give it: 0666 less the umask of now, which the kernel
    applies. mkstemp's 0600 was widened from a umask read once at import, and a process that
    set a stricter one later (os.umask(0o077)) got files others could read."""
    for _ in range(100):  # as mkstemp tries
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def _halves(content: str | bytes | Sequence[bytes | memoryview]
            ) -> tuple[list[memoryview], list[memoryview]]:
    """``content``'s bytes cut at half their total, as views of its chunks (nothing copied)."""
    if isinstance(content, str):
        content = content.encode()
    chunks = [memoryview(c).cast("B") for c in
              ([content] if isinstance(content, (bytes, bytearray, memoryview)) else content)]
    left = sum(c.nbytes for c in chunks) // 2
    first, second = [], []
    for chunk in chunks:
        take = min(left, chunk.nbytes)
        first.append(chunk[:take])
        second.append(chunk[take:])
        left -= take
    return first, second


def write_json_atomic(path: str | Path, obj, durable: bool = False) -> None:
    """Write ``obj`` as indented JSON, atomically (``durable`` as for :func:`write_atomic`).

    A symbolic link is followed, as ``open`` would: the JSON replaces its target (made if
    missing) and the link stays, where a rename onto the link would replace the link."""
    if Path(path).is_symlink():
        path = os.path.realpath(path)
    write_atomic(path, json.dumps(_finite(obj), indent=2, sort_keys=True, default=_jsonable,
                                  allow_nan=False) + "\n", durable)


def read_json(path: str | Path, what: str, keys: Iterable[str] = ()) -> dict:
    """The JSON object in ``path``, read back: UsageError naming the file when it cannot be
    read, is no JSON object or lacks one of ``keys`` (cut short, edited, or another tool's).
    ``what`` says what it should be ("a run's summary")."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise UsageError(f"cannot read {what} from {path}: {e}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} is not {what}: it holds a JSON {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise UsageError(f"{path} is not {what}: it has no {missing[0]!r}")
    return value


def _finite(x):
    """``x`` with every float that is not finite (at any depth of its dicts, lists and
    tuples) replaced by None, which JSON writes as ``null``."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _jsonable(x):
    if isinstance(x, (np.integer, np.floating)):
        return _finite(x.item())
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


def new_run_folder(name: str) -> Path:
    """Make ``runs/<name>-<date>-<time>``, the folder of a run given no ``--out``.

    Made exclusively, with ``-2``, ``-3``, ... when another run took the name in the same
    second: two runs started together (a Slurm array) never share one. UsageError, naming
    the folder, when it cannot be made.
    """
    stem = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while True:
        path = Path("runs") / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1
        except OSError as e:
            raise UsageError(f"cannot make the run's folder {path} ({e.strerror}); choose one "
                             "with --out") from None


class RunLog:
    """The output directory of one run. Methods are no-ops except on rank 0, which removes
    the temporary files an earlier attempt killed mid-write left there."""

    def __init__(self, out_dir: str | Path, rank: int = 0):
        self.dir = Path(out_dir)
        self.rank = rank
        self.points: list[dict] = []
        self.config: dict | None = None  # what write_config wrote (rank 0)
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.dir)  # an earlier attempt killed writing its outputs

    def write_config(self, config: dict) -> None:
        if self.rank == 0:
            write_json_atomic(self.dir / "config.json", config)
            self.config = config

    def write_points(self, points: Iterable[dict]) -> None:
        """Record curve points (each with ``t``, ``epoch``, ``updates``, ``test_acc``, ...)."""
        self.points.extend(points)
        if self.rank == 0:
            lines = "".join(json.dumps(_finite(p), sort_keys=True, default=_jsonable,
                                       allow_nan=False) + "\n" for p in self.points)
            write_atomic(self.dir / "metrics.jsonl", lines)

    def save_model(self, model: torch.nn.Module) -> None:
        """Write the final model's state dict to ``model.pt`` (load with weights_only=True)."""
        if self.rank == 0:
            buf = io.BytesIO()
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
            write_atomic(self.dir / "model.pt", buf.getvalue(), durable=True)

    def write_summary(self, summary: dict) -> None:
        """The run's last file: durable, so a finished run stays finished after a power cut."""
        if self.rank == 0:
            write_json_atomic(self.dir / "summary.json", summary, durable=True)


POINT_KEYS = ("t", "epoch", "test_acc")  # what readers of a curve point rely on


def read_points(out_dir: str | Path) -> list[dict]:
    """The curve points of a finished run; UsageError naming the file and line of one that is
    not a point, or the file when it holds none (a finished run scored its last model)."""
    path = Path(out_dir) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the curve from {path}: {e}") from None
    points = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            point = json.loads(line)
        except ValueError as e:
            raise UsageError(f"{path} line {number} is not JSON: {e}") from None
        if not isinstance(point, dict) or any(k not in point for k in POINT_KEYS):
            raise UsageError(f"{path} line {number} is not a curve point (want an object "
                             f"with {', '.join(POINT_KEYS)})")
        points.append(point)
    if not points:
        raise UsageError(f"{path} holds no curve point")
    return points


def distribution(values: Sequence[float]) -> dict:
    """Mean, p50, p90, p99 and max of ``values`` (zeros when empty)."""
    if len(values) == 0:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "count": 0}
    v = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"mean": float(v.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "max": float(v.max()), "count": int(v.size)}


# The percentiles of a distribution, as fractions (numpy's ``percentile`` divides by 100 too).
_QUANTILES = (50 / 100, 90 / 100, 99 / 100)


class Tally:
    """How many times each integer value came, with their count and sum: the
    :func:`distribution` of a long stream of small integers (an async run's staleness, one per
    push) in memory, checkpoints and gathers the size of its distinct values, not of the stream.

    :meth:`distribution` is exactly ``distribution`` of the values, expanded: numpy's mean
    (exact while the sum is below 2**53) and its default, linearly interpolated percentiles.
    """

    __slots__ = ("counts", "count", "total")

    def __init__(self, counts: dict[int, int] | None = None):
        self.counts: dict[int, int] = {}
        self.count = 0  # values added
        self.total = 0  # their sum
        for value, n in (counts or {}).items():
            self.add(value, n)

    def add(self, value: int, times: int = 1) -> None:
        """Count ``value`` (an integer) ``times`` more times."""
        try:
            if isinstance(value, bool) or isinstance(times, bool):
                raise TypeError
            value, times = operator.index(value), operator.index(times)  # no float
        except TypeError:
            raise TypeError(f"Tally.add({value!r}, {times!r}): need integers") from None
        if times < 0:
            raise ValueError(f"Tally.add({value!r}, {times!r}): a negative count")
        if times:
            self.counts[value] = self.counts.get(value, 0) + times
            self.count += times
            self.total += value * times

    def __len__(self) -> int:
        return self.count

    # Unhashable (it is mutable): a class that defines __eq__ and no __hash__ gets
    # __hash__ = None from Python.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tally) and self.counts == other.counts

    def __repr__(self) -> str:
        return f"Tally({dict(sorted(self.counts.items()))})"

    def merge(self, other: Tally) -> None:
        """Add ``other``'s values to these."""
        for value, n in other.counts.items():
            self.add(value, n)

    @classmethod
    def merged(cls, tallies: Iterable[Tally]) -> Tally:
        """One tally of the values of all ``tallies``."""
        out = cls()
        for t in tallies:
            out.merge(t)
        return out

    def state(self) -> dict[int, int]:
        """The checkpoint form: value -> count, plain ints (``torch.load(weights_only=True)``
        reads it), one entry per distinct value however many were added."""
        return dict(sorted(self.counts.items()))

    @classmethod
    def of(cls, state: dict[int, int] | Sequence[int]) -> Tally:
        """A tally from :meth:`state`'s form, or from the list of every value that
        checkpoints written before tallies held (a resumed old run counts its old pushes)."""
        if isinstance(state, dict):
            return cls(state)
        out = cls()
        for value in state:
            out.add(value)
        return out

    def distribution(self) -> dict:
        """:func:`distribution` of the values, computed from the counts."""
        if not self.count:
            return distribution(())
        values = sorted(self.counts)
        ends = list(itertools.accumulate(self.counts[v] for v in values))  # past each value

        def nth(i: int) -> float:  # the i-th smallest value (from 0)
            return float(values[bisect.bisect_right(ends, i)])

        last = self.count - 1
        percentiles = []
        for q in _QUANTILES:
            # numpy's 'linear' method: virtual index (n-1)q between its neighbours, and
            # _lerp's two formulas (the second from the upper neighbour, when t >= 0.5).
            at = last * q
            if at >= last:
                percentiles.append(nth(last))
                continue
            below = math.floor(at)
            t = at - below
            a, b = nth(below), nth(below + 1)
            percentiles.append(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)
        p50, p90, p99 = percentiles
        return {"mean": float(self.total) / self.count, "p50": p50, "p90": p90, "p99": p99,
                "max": float(values[-1]), "count": self.count}


def watching_terminal(err: TextIO | None, out: TextIO | None) -> TextIO | None:
    """The terminal the bar is watched on: ``err`` (where it draws) when that is one, else
    ``out`` when that is a terminal with a width; None for a file or a pipe to a log.

    Open MPI's ``mpirun`` gives each rank's stdout a pty and its stderr a pipe, and sizes the
    pty like ``mpirun``'s own terminal: 0 columns when ``mpirun`` writes to a file (a batch
    job's output), so the width tells a watched run from a logged one."""
    if redraws(err):
        return err
    if redraws(out) and os.get_terminal_size(out.fileno()).columns > 0:
        return out
    return None


def redraws(stream: TextIO | None) -> TypeGuard[TextIO]:
    """Whether a line may be redrawn on ``stream`` (carriage returns, erasing codes): a
    terminal, but not one that says it cannot (``TERM=dumb``: an editor's shell buffer,
    which showed each redraw's ``^M^[[K``)."""
    return _isatty(stream) and os.environ.get("TERM") != "dumb"


def _isatty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (ValueError, OSError):  # closed, or detached (a daemon's streams)
        return False


class _Lines:
    """The bar's stream into a file: each redraw a line of its own. tqdm redraws one line
    with carriage returns, which a log keeps as one line, and a warning printed during the
    run landed on the bar's line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None)  # tqdm draws unicode blocks by it

    def write(self, text: str) -> None:
        text = text.strip("\r").rstrip()  # "\r<bar><padding>"; a clearing is blank
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def say(line: str) -> None:
    """Write ``line`` to stderr on a line of its own, around a progress bar being drawn
    (from any thread: it takes no lock, so a watchdog thread cannot wait on a stuck one).
    One write, its newline included: two (tqdm's default) let mpirun put another rank's
    line between them."""
    tqdm.write(line + "\n", file=sys.stderr, end="", nolock=True)
    sys.stderr.flush()


def progress(total: int, rank: int, desc: str, enabled: bool = True, initial: int = 0) -> tqdm:
    """A progress bar shown on rank 0 only (disabled elsewhere, and when not wanted), from
    ``initial`` steps done (a resumed run: its rate counts only the steps it makes).

    Watched on a terminal (:func:`watching_terminal`: ``mpirun``'s too) it redraws twice a
    second and is cleared at the end; into a file (a Slurm job's output, a CI log), where
    every redraw stays, once a minute, a line each time: a day's run adds kilobytes, not
    megabytes; there its last state is a last line (a run shorter than a minute showed only
    its 0%). Print beside it with :func:`say`.
    """
    screen = watching_terminal(sys.stderr, sys.stdout)
    on_stderr = screen is not None and screen is sys.stderr  # tqdm follows its width
    width = None if screen is None or on_stderr else os.get_terminal_size(screen.fileno())[0]
    return tqdm(total=total, initial=initial, desc=desc, unit="step",
                file=sys.stderr if screen is not None else _Lines(sys.stderr),
                disable=(rank != 0 or not enabled), dynamic_ncols=on_stderr, ncols=width,
                leave=screen is None, mininterval=0.5 if screen is not None else 60)


def seconds(t: float) -> str:
    """Tenths of a second, or three digits below 10 s: a short simulation's virtual run of
    0.03 s is not 0.0."""
    return f"{t:.1f}" if t >= 10 else f"{t:.3g}"


def summary_table(summary: Mapping[str, Any]) -> str:
    """A short human-readable table of a run's summary."""
    rows = [
        ("algorithm", summary.get("algo_label", summary["algo"])),
        ("workers", summary["workers"]),
        *([("device", summary["device"] + (f" ({summary['gpu']})" if summary.get("gpu")
                                           else ""))] if summary.get("device") else []),
        ("model / data", f"{summary.get('model', '?')} on {summary.get('dataset', '?')}"),
        ("epochs / updates", f"{summary.get('epochs', '?')} / {summary.get('updates', '?')}"
                             + (" (stopped on collapse)" if summary.get("stopped_on_collapse")
                                else "")),
        ("final test accuracy", f"{summary['final_test_acc']:.4f}"),
        ("best test accuracy", f"{summary['best_test_acc']:.4f}"),
        ("wall time", f"{seconds(summary['wall_s'])} s" + (
            f" (then {seconds(summary['scoring_s'])} s scoring the curve)"
            if summary.get("scoring_s", 0) >= 0.05 else "")),
        ("samples/s (all workers)", f"{summary['samples_per_s']:.0f}"),
    ]
    peaks = [p for p in summary.get("peak_memory_per_worker", []) if p is not None]
    if peaks:
        rows.append(("peak memory (largest worker)", f"{max(peaks) / 2**20:.0f} MiB"))
    if "staleness" in summary:
        s = summary["staleness"]
        stale = f"{s['mean']:.2f} / {s['p99']:.2f} / {s['max']:.0f}"  # p99 interpolates
        rows.append(("staleness mean/p99/max", stale))
    if skipped := summary.get("skipped_steps"):  # a log read alone shows the steps lost
        rows.append(("skipped steps (NaN/Inf)", skipped))  # fp16's overflows among them
    if clipped := sum(summary.get("clipped_steps_per_worker", [])):
        rows.append(("clipped steps (all workers)", clipped))
    if summary.get("collapsed_at") is not None:
        rows.append(("COLLAPSED at update", f"{summary['collapsed_at']}: "
                                            f"{summary.get('collapse_reason')}"))
    if summary.get("out"):  # absolute, as config.json's out and the run's messages say it
        rows.append(("outputs", os.path.abspath(summary["out"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
