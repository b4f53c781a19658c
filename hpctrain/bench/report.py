"""``hpctrain report DIR``: ``report.md`` and plots from saved run outputs, rerunning nothing.

DIR is a comparison's folder (``compare.json`` and one ``DIR/<algo>/`` per run, written by
``hpctrain bench compare``; with ``--seeds``, ``DIR/<algo>/seed-<S>/``) or any folder whose
subfolders (``<algo>/seed-<S>/`` too: one algorithm's seeds), or itself, hold finished runs
(``summary.json`` and ``metrics.jsonl``). The plots
follow the DC-ASGD paper's figures: test error (%) against wall time and against epochs, one
line per algorithm (with seeds: their mean at the same epoch, shaded from the lowest to the
highest, dashed where a run ended early; against wall time a bar at its end from the
fastest to the slowest seed's end time). Under the table, the machine's load as the runs'
summaries recorded it. With seeds
the table gives each algorithm's mean and sample standard deviation over the seeds whose run
finished, then every run. A run with no end recorded (the comparison stopped) is *unfinished*
if its folder holds files, else *not run*; without ``compare.json``, so is a subfolder with a
run's ``config.json`` and no summary, and a seed an algorithm lacks that others have; the
failed attempts ``bench compare --resume`` set aside (``<run>.failed-N``) are no runs. The
output depends only on the saved files, so rendering twice gives the same bytes.

A value of the wrong type in a run's files (edited by hand, another tool's) does not end the
report: the table shows ``n/a`` there, or the plots leave out that curve point, and one line on
stderr names the file and key. ``report.md`` and the plots are written together or not at all.
The lines hpctrain printed on a run's stderr (``stderr.log`` in its folder, kept by ``bench
compare``) are listed under the tables, since a warning there can explain a figure.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import decimal
import errno
import fcntl
import io
import json
import math
import os
import re
import shlex
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpctrain import plugins, registry
from hpctrain.errors import UsageError
from hpctrain.metrics import POINT_KEYS, read_json, read_points, write_atomic
from hpctrain.metrics import seconds as _seconds
from hpctrain.summary import byte_fields
from hpctrain.summary import read as read_summary

RECORD = "compare.json"
REPORT = "report.md"
# x key of the curve points -> (file name, axis label)
PLOTS = {"t": ("error_vs_time.png", "wall time (s)"),
         "epoch": ("error_vs_epochs.png", "epochs (all workers)")}
DEFAULT_TARGETS = (0.8, 0.85)
NO_PLOTS = ("matplotlib is not installed (pip install \"hpctrain[plot]\", then "
            "hpctrain report DIR draws them)")
# Fixed colours, so an algorithm looks the same in every report.
_ORDER = registry.names()
NA = "n/a"  # a cell whose value in summary.json is of the wrong type (the report warns)
STALENESS_KEYS = ("mean", "p50", "p90", "p99", "max")


_SEED_FOLDER = re.compile(r"^seed--?[0-9]+$")  # run_name's seed-<S>
_SET_ASIDE = re.compile(r"\.failed-[0-9]+$")  # set_aside_name's
# A run a comparison records no end of (Row.status): started (its folder holds files), or not
UNFINISHED, NOT_RUN = "unfinished", "not run"


def run_name(algo: str, seed: int | None) -> str:
    """A run's folder in a comparison: ``<algo>``, or ``<algo>/seed-<S>`` with ``--seeds``."""
    return algo if seed is None else f"{algo}/seed-{seed}"


def set_aside_name(folder: str, n: int) -> str:
    """The name ``bench compare --resume`` gives the ``n``-th failed attempt of the run in
    ``folder`` before running it again: not a run of the comparison, so no report's row."""
    return f"{folder}.failed-{n}"


@dataclass
class Row:
    """One run of a report: how it ended and, if it finished, what it wrote."""

    name: str  # the algorithm (or the run's folder, for runs found in a folder)
    status: str  # "ok", "failed", UNFINISHED or NOT_RUN
    error: str | None = None
    summary: dict | None = None
    points: list[dict] = field(default_factory=list)
    command: str | None = None
    ignored: list[str] = field(default_factory=list)
    unusable: list[str] = field(default_factory=list)  # summary keys shown as n/a
    seed: int | None = None  # a comparison with --seeds: this run's
    run_info: dict = field(default_factory=dict)  # config.json's: what the run ran with
    config: dict = field(default_factory=dict)  # its config.json: what it trained with
    byte_fields: tuple[str, ...] = ()  # a user's algorithm's, as compare.json records them
    algo: str | None = None  # a folder's run: the algorithm its summary (or config) names
    notes: list[str] = field(default_factory=list)  # hpctrain's lines in its stderr.log

    @property
    def algorithm(self) -> str:
        """The run's name in the table's algorithm column and the legend: its algorithm, and
        the folder it was found in where that is another name (``dcasgd-a (da)``)."""
        return self.name if self.algo in (None, self.name) else f"{self.algo} ({self.name})"

    @property
    def title(self) -> str:
        """The run's name in sentences: its folder's (or algorithm's) and seed."""
        return self.name if self.seed is None else f"{self.name} seed {self.seed}"

    @property
    def heading(self) -> str:
        """The run's first cell in the table: :attr:`algorithm` and seed."""
        return self.algorithm if self.seed is None else f"{self.algorithm} seed {self.seed}"

    @property
    def finished(self) -> dict:
        """The summary of a run that finished, where the caller kept only those (``if
        r.summary``): typed without the None of a run that did not."""
        if self.summary is None:
            raise ValueError(f"{self.title} has no summary")
        return self.summary

    @property
    def label(self) -> str:
        workers = (self.summary or {}).get("workers")
        return f"{self.algorithm}, M={'?' if workers is None else workers}"


def _warn(message: str) -> None:
    print(f"hpctrain report: warning: {message}", file=sys.stderr, flush=True)


def _json(value) -> str:
    """``value`` as its file spells it (``null``, ``"x"``), cut short: for a warning."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_distribution(value) -> bool:
    return value is None or (isinstance(value, dict) and (
        not value or all(_is_number(value.get(k)) for k in STALENESS_KEYS)))


def _is_peaks(value) -> bool:
    return value is None or (isinstance(value, list) and all(
        p is None or _is_number(p) for p in value))


# The summary fields the table formats: what each must be, and the test for it. The first
# five are always there (summary.READ_KEYS); the others only in some runs (None: not).
_FIELDS = {"workers": ("a positive whole number", _is_count),
           **dict.fromkeys(("final_test_acc", "best_test_acc", "wall_s", "samples_per_s",
                            "final_mean_member_acc", "final_ensemble_acc"),
                           ("a number", _is_number)),
           "staleness": (f"an object with numbers {', '.join(STALENESS_KEYS)}", _is_distribution),
           "peak_memory_per_worker": ("a list of byte counts", _is_peaks)}


def _usable(summary: dict, path: Path) -> tuple[dict, list[str]]:
    """``summary`` with None for each field the table formats that is of the wrong type, and
    those fields' keys; one warning naming ``path`` and the key for each."""
    unusable = [k for k, (_, ok) in _FIELDS.items() if k in summary and not ok(summary[k])]
    for key in unusable:
        _warn(f"{path}: {key} is {_json(summary[key])}, not {_FIELDS[key][0]}; "
              f"shown as {NA}")
    return {**summary, **dict.fromkeys(unusable)}, unusable


def _usable_points(points: list[dict], path: Path) -> list[dict]:
    """The curve points whose t, epoch and test_acc are numbers; one warning naming ``path``,
    the first other point's line and its key when some are left out."""
    good, bad = [], []  # bad: (index, key) of each point left out
    for i, point in enumerate(points):
        key = next((k for k in POINT_KEYS if not _is_number(point[k])), None)
        if key is None:
            good.append(point)
        else:
            bad.append((i, key))
    if bad:
        i, key = bad[0]  # read_points skips blank lines: count them back for the line number
        line = [n for n, text in enumerate(path.read_text().splitlines(), 1) if text.strip()][i]
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        _warn(f"{path} line {line}: {key} is {_json(points[i][key])}, not a number; "
              f"that curve point{more} left out")
    return good


def parse_targets(text: str) -> list[float]:
    """``"0.8,0.85"`` -> [0.8, 0.85]; each a test accuracy in (0, 1], each once (a column
    each); an empty entry (``"0.8,,0.9"``) is refused."""
    words = str(text).split(",")
    if len(words) > 1 and not all(w.strip() for w in words):
        raise UsageError(f"--targets {text!r}: an empty entry")
    try:
        values = [float(v) for v in words if v.strip()]
    except ValueError:
        raise UsageError(f"--targets {text!r}: not a comma-separated list of numbers") from None
    bad = [v for v in values if not 0 < v <= 1]
    if not values or bad:
        raise UsageError(f"--targets {text!r}: want accuracies in (0, 1], e.g. 0.8,0.85")
    return list(dict.fromkeys(values))


def read_record(folder: str | Path) -> dict:
    """A comparison's ``compare.json``; UsageError naming it when it is not one."""
    path = Path(folder) / RECORD
    record = read_json(path, "a comparison's record", ("algos", "runs", "workers",
                                                        "train_args"))
    runs = record["runs"]
    if not isinstance(record["algos"], list) or not isinstance(runs, dict) or any(
            not isinstance(a, str) for a in record["algos"]) or any(
            not isinstance(r, dict) or "status" not in r for r in runs.values()):
        raise UsageError(f"{path} is not a comparison's record: want a list of algos and a "
                         "status for every run")
    targets, words = record.get("targets"), record["train_args"]
    if targets is not None and not (isinstance(targets, list) and targets and all(
            _is_number(t) and 0 < t <= 1 for t in targets)):
        raise UsageError(f"{path}: targets is {_json(targets)}, not a list of "
                         "accuracies in (0, 1]")
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise UsageError(f"{path}: train_args is {_json(words)}, not a list of words")
    references, own = record.get("references", {}), record.get("byte_fields", {})
    if not isinstance(references, dict) or not all(
            isinstance(v, str) for v in references.values()):
        raise UsageError(f"{path}: references is {_json(references)}, not names of "
                         "algorithm references")
    if not isinstance(own, dict) or not all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in own.values()):
        raise UsageError(f"{path}: byte_fields is {_json(own)}, not lists of field names")
    seeds = record.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and seeds and all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise UsageError(f"{path}: seeds is {_json(seeds)}, not a list of whole numbers")
    for name, run in runs.items():  # the fields a row shows
        ignored = run.get("ignored", [])
        checks = (("status", isinstance(run["status"], str), "a string"),
                  ("error", isinstance(run.get("error"), str | None), "a string or null"),
                  ("command", isinstance(run.get("command"), str | None), "a string or null"),
                  ("ignored", isinstance(ignored, list)
                   and all(isinstance(w, str) for w in ignored), "a list of words"))
        for key, ok, want in checks:
            if not ok:
                raise UsageError(f"{path}: runs.{name}.{key} is {_json(run.get(key))}, not "
                                 f"{want}")
    return record


def _finished(run_dir: Path, name: str, **record) -> Row:
    """The row of a run that should have finished: failed, saying why, when its files are
    missing or unreadable (the other rows are still reported); a value of the wrong type in
    them is left out, with a warning."""
    for file in ("summary.json", "metrics.jsonl"):  # a finished run has both (run.py)
        if not (run_dir / file).is_file():
            return Row(name, "failed", error=f"no {file}", **record)
    try:
        summary = read_summary(run_dir)
        points = read_points(run_dir)
    except UsageError as e:
        return Row(name, "failed", error=str(e), **record)
    summary, unusable = _usable(summary, run_dir / "summary.json")
    points = _usable_points(points, run_dir / "metrics.jsonl")
    config = _run_config(run_dir / "config.json")
    run_info = config.get("run_info", {})
    run_info = run_info if isinstance(run_info, dict) else {}
    if "byte_fields" not in record:  # a folder's run: a user's algorithm records its own
        own = run_info.get("byte_fields", [])
        record["byte_fields"] = tuple(k for k in own if isinstance(k, str)) \
            if isinstance(own, list) else ()
    return Row(name, "ok", summary=summary, points=points, unusable=unusable,
               run_info=run_info, config=config, **record)


def _unfinished(run_dir: Path, name: str, **record) -> Row:
    """The row of a run with no recorded end and no summary: UNFINISHED if it started (its
    folder holds files: its logs, config.json, checkpoints), else NOT_RUN."""
    started = run_dir.is_dir() and any(run_dir.iterdir())
    return Row(name, UNFINISHED if started else NOT_RUN, **record)


def _run_config(path: Path) -> dict:
    """A run's ``config.json`` (what it trained with; its ``run_info``, what it ran on);
    empty, with a warning if the file is there but unreadable, since the table does not
    need it."""
    if not path.is_file():
        return {}
    try:
        return read_json(path, "a run's configuration")
    except UsageError as e:
        _warn(str(e))
        return {}


# run_info keys the report names, with their labels, in the order it names them
ENVIRONMENT = (("device", "device"), ("gpu", "GPU"), ("library", "MPI"), ("torch", "torch"),
               ("cuda", "CUDA"), ("cudnn", "cuDNN"), ("nccl", "NCCL"), ("python", "Python"),
               ("hpctrain", "hpctrain"), ("hpctrain_commit", "commit"), ("cpu", "CPU"),
               ("cpu_capability", "CPU kernels"))
GPU_ONLY = frozenset({"gpu", "cuda", "cudnn", "nccl"})  # compared among GPU runs only


def _environment_value(key: str, value) -> str | None:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        return None
    text = str(value)
    if key == "library":
        return text.split(",")[0]  # "Open MPI v4.1.4, package: ..."
    if key == "device":
        return text.split(":")[0]  # rank 0's: cuda:0 and cuda:1 are one kind
    if key == "hpctrain_commit":
        return text[:12] + ("+dirty" if text.endswith("+dirty") else "")
    return text


def environment(rows: list[Row]) -> str | None:
    """One line on what the finished runs ran with (their ``config.json``'s ``run_info``);
    where they differ, which ran with what, since the comparison then compares that too.
    None when no run recorded it (runs written before hpctrain recorded it)."""
    finished = [r for r in rows if r.summary is not None]
    on_gpu = [r for r in finished
              if _environment_value("device", r.run_info.get("device")) == "cuda"]
    same, differ = [], []
    for key, label in ENVIRONMENT:
        values: dict[str, list[str]] = {}
        for r in on_gpu if key in GPU_ONLY else finished:
            value = _environment_value(key, r.run_info.get(key))
            values.setdefault("not recorded" if value is None else value, []).append(r.title)
        known = [v for v in values if v != "not recorded"]
        if not known:
            continue
        if len(values) == 1:
            some = " (the GPU runs)" if key in GPU_ONLY and len(on_gpu) < len(finished) else ""
            same.append(f"{label} {known[0]}{some}")
        else:
            differ.append(f"{label} " + "; ".join(f"{v} ({', '.join(names)})"
                                                   for v, names in values.items()))
    if not same and not differ:
        return None
    line = "Ran with " + ", ".join(same) + "." if same else ""
    if differ:
        line += (" " if line else "") + "**The runs differ in** " + "; and ".join(differ) + "."
    return line


def machine_load(rows: list[Row]) -> str | None:
    """One line on the load of the machine the finished runs ran on: the largest 1-minute
    load average their summaries recorded (rank 0's node, at each run's start and end), on
    how many CPUs, and a warning naming the runs whose load exceeded their node's CPUs (load
    5.7 on 2 cores gave 40% between seeds' wall times). None when no run recorded it (runs
    before hpctrain did, simulated runs: their times are virtual)."""
    seen: list[tuple[float, int | None, str, str]] = []  # load, CPUs, run, when
    unrecorded = 0
    for r in rows:
        s = r.summary
        if s is None or _simulated(r):
            continue
        cpus = s.get("machine_cpus") if _is_count(s.get("machine_cpus")) else None
        loads = [(float(s[key]), cpus, r.title, when)
                 for key, when in (("load_average_start", "start"), ("load_average_end", "end"))
                 if _is_number(s.get(key))]
        seen += loads
        unrecorded += not loads
    if not seen:
        return None
    top, _, title, when = max(seen, key=lambda s: s[0])
    counts = sorted({c for _, c, _, _ in seen if c is not None})
    on = "" if not counts else f" on {counts[0]}" if len(counts) == 1 else \
        f" on {counts[0]}-{counts[-1]}"
    line = (f"Machine load (1-minute load average of rank 0's node at each run's start and "
            f"end): at most {top:g} ({_plain(title)}, at its {when}){on}"
            f"{' CPUs' if on else ''}.")
    over: dict[str, tuple[float, int]] = {}
    for load_, c, name, _ in seen:
        if c is not None and load_ > c and load_ > over.get(name, (0.0, c))[0]:
            over[name] = (load_, c)
    if over:
        line += (" **The load exceeded the CPUs in** " + ", ".join(
            f"{_plain(name)} ({load_:g} on {c})" for name, (load_, c) in over.items())
            + ": those runs shared cores with other work, which slows and spreads their "
              "wall times.")
    if unrecorded:
        line += f" ({unrecorded} run{'s' if unrecorded > 1 else ''} recorded no load.)"
    return line


def load(folder: str | Path) -> tuple[dict, list[Row]]:
    """The comparison's record (empty without ``compare.json``) and one row per run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"report: {folder} is not a folder")
    if (folder / RECORD).is_file():
        try:
            record = read_record(folder)
        except UsageError as damaged:  # the runs' own files may all be there
            # Refused, not moved: a record edited by hand may be meant; once the user has
            # moved it aside, the report is the runs found in the folder (below).
            raise UsageError(f"{damaged}; no report written: move it aside, and the report "
                             f"shows the runs found in {folder}") from None
        rows = []
        for name in record["algos"]:
            for seed in record.get("seeds") or [None]:
                key = run_name(name, seed)
                run = record["runs"].get(key)
                extra = {"command": None if run is None else run.get("command"),
                         "ignored": [] if run is None else run.get("ignored", []),
                         "seed": seed,
                         "byte_fields": tuple(record.get("byte_fields", {}).get(name, ()))}
                if run is None:  # the comparison stopped before it ended, or before it ran
                    rows.append(_unfinished(folder / key, name, **extra))
                elif run["status"] == "ok":
                    rows.append(_finished(folder / key, name, **extra))
                else:
                    rows.append(Row(name, run["status"], error=run.get("error"), **extra))
                rows[-1].notes = run_notes(folder / key, rows[-1])
        return record, rows
    rows = _found(folder)
    if all(r.status in (UNFINISHED, NOT_RUN) for r in rows):  # none with a summary.json
        # A folder of comparisons (two --out folders side by side) was refused as holding
        # no run, saying nothing of how to report two comparisons' runs together.
        held = [d.name for d in _subfolders(folder) if os.path.isfile(d / RECORD)]
        if held:
            raise UsageError(
                f"report: {folder} holds comparisons ({', '.join(held)}), not runs: report "
                f"each, or to see their runs in one report gather the runs' folders "
                f"(<comparison>/<algo>, with --seeds holding seed-<S>/) under one folder, "
                f"each with a name of its own, and report that folder")
        raise UsageError(f"report: {folder} holds no {RECORD} and no finished run "
                         "(a folder with summary.json)")
    return {}, rows


def _found(folder: Path) -> list[Row]:
    """The runs in a folder without a record: itself, if it holds a finished run (its
    ``summary.json``), else its subfolders that hold one, or a run's ``config.json`` (one
    that started: UNFINISHED), then a ``--seeds`` comparison's ``<algo>/seed-<S>/`` runs,
    each algorithm over the seeds any of them has (one that left none: NOT_RUN), if one of
    those finished. Failed attempts ``bench compare --resume`` set aside (``*.failed-N``)
    are not runs of it, as in a comparison's report."""
    # os.path.isfile: False where it cannot look (Path.is_file raised PermissionError)
    if os.path.isfile(folder / "summary.json"):
        return [_folder_run(folder, folder.name)]
    try:
        subfolders = [d for d in _subfolders(folder, strict=True)
                      if not _SET_ASIDE.search(d.name)]
    except OSError as e:
        raise UsageError(f"report: cannot read {folder} ({e.strerror})") from None
    rows = [_folder_run(d, d.name) for d in subfolders
            if os.path.isfile(d / "summary.json") or os.path.isfile(d / "config.json")]
    seeds = {d.name: {int(s.name.removeprefix("seed-")): s for s in _subfolders(d)
                      if _SEED_FOLDER.match(s.name)}
             for d in subfolders if not os.path.isfile(d / "summary.json")}
    seeds = {algo: found for algo, found in seeds.items() if found}
    if not any(os.path.isfile(s / "summary.json") for found in seeds.values()
               for s in found.values()):
        return rows
    every = sorted({seed for found in seeds.values() for seed in found})
    for algo, found in seeds.items():
        for seed in every:
            rows.append(_folder_run(found.get(seed, folder / run_name(algo, seed)), algo,
                                    seed=seed))
    return rows


def _subfolders(folder: Path, strict: bool = False) -> list[Path]:
    """``folder``'s subfolders by name; one that cannot be looked at (no permission, as
    ``/proc/1/cwd``) holds no run, nor does a folder that cannot be listed (``strict``: an
    OSError, for the folder the user named)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        if strict:
            raise
        return []
    return sorted(d for d in entries if os.path.isdir(d))  # False where it cannot look


def _folder_run(run_dir: Path, name: str, **record) -> Row:
    """The row of a run found in a folder: named ``name`` (its folder's), finished if it holds
    a ``summary.json``, with the algorithm it ran (:attr:`Row.algo`), since a folder's name
    need not say it, and, finished, its command (its config.json's ``argv``)."""
    row = _finished(run_dir, name, **record) if (run_dir / "summary.json").is_file() \
        else _unfinished(run_dir, name, **record)
    held = row.summary or {}
    for file in ("summary.json", "config.json"):  # a failed or unfinished run's, if it has them
        if isinstance(held.get("algo"), str):
            break
        try:
            held = read_json(run_dir / file, "a run's file")
        except UsageError:
            held = {}
    row.command = recorded_command(row.run_info.get("argv"))
    algo = held.get("algo")
    if isinstance(algo, str) and plugins.is_reference(algo):  # a user's, FILE:CLASS: its
        own = held.get("algo_label")  # name (its label), not imported here, else its class's
        algo = own if isinstance(own, str) else algo.rsplit(":", 1)[1]
    row.algo = algo if isinstance(algo, str) and algo else None
    row.notes = run_notes(run_dir, row)
    return row


FROM_PYTHON = "started from Python (hpctrain.train in `python -c` or an interactive session): " \
    "no command to repeat"
_INTERACTIVE = ("", "-c", "-")  # sys.argv[0] of python -c, of stdin and of the REPL


def recorded_command(argv: object) -> str | None:
    """The command that started a run, from its config.json's ``argv`` (rank 0's
    ``sys.argv``, :func:`hpctrain.provenance.invocation`), without the launcher: the
    ``hpctrain`` command's (``hpctrain`` or ``python -m hpctrain``'s ``.../hpctrain/__main__.py``
    first), a script's with ``python`` before it (``hpctrain.train`` in ``my_script.py``,
    also under torchrun), :data:`FROM_PYTHON` where no script was run (``python -c``, a
    notebook), and None where nothing usable was recorded. Every script's command was
    given as ``hpctrain`` and the script's arguments (``hpctrain runs/py1``)."""
    if not isinstance(argv, list) or not argv or not all(isinstance(w, str) for w in argv):
        return None
    program = argv[0].replace("\\", "/")
    if program.rsplit("/", 1)[-1] == "hpctrain" or program.endswith("hpctrain/__main__.py"):
        return "hpctrain " + shlex.join(argv[1:]) if len(argv) > 1 else None
    if program in _INTERACTIVE or program.rsplit("/", 1)[-1] == "ipykernel_launcher.py":
        return FROM_PYTHON
    return "python " + shlex.join(argv)


LOG = "stderr.log"  # bench compare's copy of a run's stderr, in the run's folder
CONTINUED = "--- continued ("  # how LOG marks where a --resume's attempt starts
NOTES_SHOWN = 3  # of a run's notes, report.md lists this many, then says how many more


def run_notes(run_dir: Path, row: Row) -> list[str]:
    """The distinct lines hpctrain itself printed on the run's stderr (``hpctrain: ...``, in
    its folder's stderr.log, which ``bench compare`` keeps), in order: a warning there (the
    snapshots ``--eval-every`` asked for that an async rank 0 missed) explains a figure of the
    run, and stayed in that file alone. Only the last attempt's (``--resume``: the lines
    after the last :data:`CONTINUED` mark); not progress bars nor other libraries' warnings,
    and of a failed run not its error lines, which its row gives as why it failed."""
    try:
        text = (run_dir / LOG).read_text(errors="replace")
    except OSError:  # none (a train run's folder), or unreadable: nothing to say
        return []
    failed = row.status == "failed"
    last = text.split(f"\n{CONTINUED}")[-1]  # a continued run: its last attempt's lines
    lines = (line.strip() for line in last.splitlines())
    return list(dict.fromkeys(
        line for line in lines if line.startswith("hpctrain: ") and not (failed and (
            line.startswith("hpctrain: error") or (row.error and row.error in line)))))


def notes(rows: list[Row]) -> str | None:
    """report.md's list of what the runs printed (:func:`run_notes`), at most NOTES_SHOWN
    lines a run; None when none printed any."""
    noted = [r for r in rows if r.notes]
    if not noted:
        return None
    out = ["**The runs printed** (hpctrain's own lines on their stderr, in each run's "
           f"{LOG}; they may explain a figure of that run):", ""]
    for r in noted:
        out += [f"- {_plain(r.title)}: {_code(line)}" for line in r.notes[:NOTES_SHOWN]]
        if len(r.notes) > NOTES_SHOWN:
            out.append(f"- {_plain(r.title)}: {len(r.notes) - NOTES_SHOWN} more in its {LOG}")
    return "\n".join(out)


def notes_line(rows: list[Row]) -> str | None:
    """One line for the console naming the runs that printed notes, which report.md lists."""
    noted = [r.title for r in rows if r.notes]
    return None if not noted else (f"{', '.join(noted)} printed warnings or notes on their "
                                   f"stderr ({LOG}); {REPORT} lists them")


def _plain(text: str) -> str:
    """``text`` (a run's name: its folder's, which may be any) shown as itself in a Markdown
    table cell or list item: ``|`` split a cell in two, and ``*``, ``_``, a backtick or a
    bracket turned into emphasis, code or a link; a line break ended the table row."""
    text = " ".join(str(text).splitlines())
    return re.sub(r"([\\`*_\[\]<>|])", r"\\\1", text)


def _code(text: str) -> str:
    """``text`` as a Markdown code span, which may hold backticks."""
    fence = "`" * (max((len(m) for m in re.findall("`+", text)), default=0) + 1)
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def time_to(points: list[dict], target: float) -> dict | None:
    """The first curve point whose test accuracy reaches ``target`` (None if none does)."""
    return next((p for p in sorted(points, key=lambda p: p["t"]) if p["test_acc"] >= target),
                None)


def _updates(n: float) -> str:
    """A staleness percentile (interpolated: 14.14, or a mean over seeds: 0.5) as 14.14 and
    0.5, a whole one as 14: rounding to whole updates showed 0.5 as 0."""
    return f"{n:.2f}".rstrip("0").rstrip(".")


def _bytes(n: float) -> str:
    """1023 B, 1.5 KiB, ..., GiB the largest unit."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def _byte_counts(summary: dict, own: tuple[str, ...] = ()) -> list[tuple[str, float]]:
    """The summary's non-zero byte counts, found by name: the fields whose unit the summary
    schema (common fields and every built-in algorithm's) gives as bytes, and ``own``, a
    user's algorithm's (:attr:`Row.byte_fields`), sorted by name."""
    found = []
    for name in sorted({*byte_fields(registry.ALGORITHMS.values()), *own}):
        value: Any = summary
        for key in name.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if _is_number(value) and value:
            found.append((name, value))
    return found


# An ec run's final model (its summary's final_model, which --ec-final sets): what its final
# and best accuracies score, as the table says it beside them
FINAL_MODELS = {"member": "rank 0's member", "ensemble": "ensemble"}
# The other final scores an ec run's summary holds, shown beside its final accuracy
OTHER_FINALS = (("final_mean_member_acc", "members' mean"), ("final_ensemble_acc", "ensemble"))


def final_model(summary: dict) -> str | None:
    """What an ec run's accuracies score, a key of FINAL_MODELS (a summary from before
    ``final_model`` was recorded: the default, rank 0's member); None for the other
    algorithms, whose accuracies score their one model (ma's: the members' average)."""
    model = summary.get("final_model", "member" if summary.get("algo") == "ec" else None)
    return model if isinstance(model, str) and model in FINAL_MODELS else None


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


def final_models_note(rows: list[Row]) -> str | None:
    """report.md's line under its first table on what ec's accuracies score (rank 0's
    member, by default) and what stands beside them; None without ec runs."""
    finished = [r for r in rows if r.summary is not None]
    member = [r for r in finished if final_model(r.finished) == "member"]
    ensemble = [r for r in finished if final_model(r.finished) == "ensemble"]
    if not member and not ensemble:
        return None
    out = []
    if member:
        out.append(f"**The final and best acc of {_plain(_who(member, finished))} are rank 0's "
                   "member's** (ec's `--ec-final member`, the default), one of the run's "
                   "models, trained alike but not the same: one member's luck can be as large "
                   "as the differences compared (ma's score the members' parameter average).")
    if ensemble:
        out.append(f"The final and best acc of {_plain(_who(ensemble, finished))} are the "
                   "ensemble's (`--ec-final ensemble`: the members' averaged softmax).")
    out.append("Beside ec's final acc, *members' mean* is the mean of every member's test "
               "accuracy at the end (summary.json's `final_mean_member_acc`) and *ensemble* "
               "that of their averaged softmax (`final_ensemble_acc`)" + (
                   ", each over seeds a mean ± sample standard deviation, as the others."
                   if any(r.seed is not None for r in finished) else "."))
    return " ".join(out)


def _cells(row: Row, targets: list[float], mark: bool = False) -> list[str]:
    """One run's row; ``mark``: say in its first cell whether it was simulated (the table
    mixes simulated runs with real ones)."""
    dash = "—"
    if row.summary is None:
        reason = row.status if not row.error else f"{row.status}: {row.error}"
        return [_plain(row.heading), dash, dash, dash, dash, *(dash for _ in targets), dash,
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
        f"{stale['mean']:.2f} / " + " / ".join(_updates(stale[k]) for k in STALENESS_KEYS[1:]))
    moved = [f"{k} {_bytes(v)}" for k, v in _byte_counts(s, row.byte_fields)]
    peaks = [p for p in s.get("peak_memory_per_worker") or () if p is not None]
    peak = NA if "peak_memory_per_worker" in row.unusable else _bytes(max(peaks)) if peaks \
        else dash
    title = _plain(row.heading) + (f" {SIMULATED_MARK}" if mark and _simulated(row) else "")
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


def _simulated(row: Row) -> bool:
    """Whether the run was ``hpctrain simulate``'s (its summary's ``simulated``)."""
    return row.summary is not None and row.summary.get("simulated") is True


def _all_simulated(rows: list[Row]) -> bool:
    """Whether some of ``rows`` finished, and every one that did was simulated."""
    done = [r for r in rows if r.summary is not None]
    return bool(done) and all(_simulated(r) for r in done)


def _mixed(rows: list[Row]) -> bool:
    """Whether some finished runs were simulated and some not: the table then marks them."""
    kinds = {_simulated(r) for r in rows if r.summary is not None}
    return len(kinds) == 2


def _spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = _mean(values)
    if len(values) < 2:
        return mean, 0.0
    # x * x, not x ** 2: a float's ** raises OverflowError where * gives inf
    sd = math.sqrt(sum((v - mean) * (v - mean) for v in values) / (len(values) - 1))
    # 0 for equal values summed in another order; a NaN stays NaN (nan ± nan, not nan ± 0)
    return mean, 0.0 if sd <= 1e-12 * abs(mean) else sd


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _mean_sd(values: list[float], fmt) -> str:
    """``values``' mean ± sample standard deviation as a scientist writes it: the sd to two
    significant figures and the mean to the same decimal place (2.50 ± 0.71, 0.8930 ±
    0.0012, 26 ± 11, 150 ± 71), never rounded past the units (an sd of 100 or more is whole:
    752 ± 1059) nor so far that the mean loses the leading digit that ``fmt``, the column's
    format of one value, shows (0.004 ± 0.430, not 0.00 ± 0.43). The mean so keeps every
    digit ``fmt`` shows unless the sd is 10 or more units of ``fmt``'s last one, a digit the
    spread makes noise (0.893 ± 0.017 for accuracies, ``fmt`` ``{:.4f}``). One value is
    ``fmt(mean)``, equal values (an sd of 0) ``fmt(mean) ± fmt(0)``. Both were ``fmt``'s:
    "2.5 ± 0.707 s" gave the sd more digits than the mean. Nor is either written finer than
    a value carries: the decimals ``fmt`` shows of the mean, or the mean's third significant
    figure where ``fmt`` drops zeros (2.50 s, :func:`hpctrain.metrics.seconds`'s ``.3g``);
    an sd that rounds to zero there reads ``<`` one unit of that place (0.8930 ± <0.0001,
    not 0.89300050 ± 0.00000071: digits no run's value shows; not ± 0.0000, which says the
    seeds' values are equal)."""
    if not values:
        return NA
    mean, sd = _spread(values)
    if len(values) == 1:
        return fmt(mean)
    if sd == 0 or not math.isfinite(sd + mean):  # an overflow of huge values too: as fmt has it
        return f"{fmt(mean)} ± {fmt(sd)}"
    rounded = float(f"{sd:.1e}")  # two significant figures: 0.0996 is 0.10, its place 2
    place = max(1 - math.floor(math.log10(rounded)), 0)
    finest = _decimals(fmt(mean))  # the finest place a value is written to
    if mean != 0:  # the place of the mean's leading digit, as far as fmt shows one
        lead = -math.floor(math.log10(abs(mean)))
        place = max(place, min(lead, _places(fmt(mean))))
        finest = max(finest, lead + 2)
    place = min(place, finest)
    shown = f"{mean:.{place}f}"
    if float(shown) == 0:  # -0.00: a mean rounded to zero has no sign
        shown = f"{0:.{place}f}"
    spread = f"{sd:.{place}f}"
    if float(spread) == 0:  # below the last place shown: less than one unit of it
        spread = f"<{10.0 ** -place:.{place}f}"
    return f"{shown} ± {spread}"


def _decimals(text: str) -> int:
    """The decimal places ``text`` is written to, a zero's too (4 for -0.0000, 0 for 150);
    0 for anything not a number."""
    try:
        exponent = decimal.Decimal(text).as_tuple().exponent
    except decimal.InvalidOperation:
        return 0
    return max(-exponent, 0) if isinstance(exponent, int) else 0


def _places(text: str) -> int:
    """The decimal places a formatted number shows: 4 for 0.8930, 0 for 150, 5 for 5e-05;
    0 for a zero (-0.0000: float noise of a mean of zero) and anything not a number."""
    try:
        number = decimal.Decimal(text)
    except decimal.InvalidOperation:
        return 0
    exponent = number.as_tuple().exponent
    return max(-exponent, 0) if number and isinstance(exponent, int) else 0


def by_algorithm(rows: list[Row]) -> dict[str, list[Row]]:
    """The rows of each algorithm (its seeds' runs), in the rows' order."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.name, []).append(row)
    return groups


def group_name(runs: list[Row]) -> str:
    """An algorithm's runs' (its seeds') name in the table and the legend: the
    :attr:`Row.algorithm` they share, else their name (a comparison's algorithm, or the
    folder they were found in)."""
    names = dict.fromkeys(r.algorithm for r in runs if r.algo is not None)
    return next(iter(names)) if len(names) == 1 else runs[0].name


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
        return _mean_sd(got, fmt) + (f" in {len(got)} of {len(done)}"
                                     if 0 < len(got) < len(done) else "")

    reach = []
    for target in targets:
        hit = [p for p in (time_to(r.points, target) for r in done) if p is not None]
        text = "not reached" if not hit else (
            f"{_mean_sd([p['t'] for p in hit], _seconds)} s "
            f"({_mean([p['epoch'] for p in hit]):.2f} ep)")
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
            _bytes(max(peaks)) if peaks else dash, _seed_staleness(stale) if stale else dash,
            "; ".join(f"{k} {_bytes(_mean(v))}" for k, v in sorted(moved.items())) or dash,
            status]


# The seed table's staleness column: which figures are means over the seeds, which the largest
SEED_STALENESS = "staleness mean / p50 / p90 / p99 (each averaged over seeds) / max (largest)"


def _seed_staleness(runs: list[dict]) -> str:
    """The seed table's staleness cell of the runs' distributions: the mean of each run's
    mean, p50, p90 and p99, and the largest max. The max was averaged too: seeds with max 15
    and 57 showed 36, which no run had."""
    means = [_mean([d[k] for d in runs]) for k in STALENESS_KEYS[:-1]]
    return " / ".join([f"{means[0]:.2f}", *map(_updates, means[1:]),
                       _updates(max(d["max"] for d in runs))])


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
        _plain(group_name(runs)) + (f" {SIMULATED_MARK}" if mark and _all_simulated(runs)
                                    else ""),
        runs, targets)) + " |" for runs in by_algorithm(rows).values()]
    return "\n".join(lines)


def shared_orders(seeds: list[int], epochs: int, shuffle: str) -> list[tuple[int, int]]:
    """The pairs of ``seeds`` (s < t) whose runs of ``epochs`` epochs train on some of the
    same data orders: ``--shuffle global`` seeds epoch e's order with seed + e
    (:func:`hpctrain.shuffle.order.global_permutation`), so seed t's epochs are seed s's
    t - s epochs later, shared where t - s < epochs. Local and partial shuffling draw from
    streams of their own (seed, epoch, rank)."""
    if shuffle != "global":
        return []
    ordered = sorted(set(seeds))
    return [(s, t) for i, s in enumerate(ordered) for t in ordered[i + 1:] if t - s < epochs]


def shared_orders_note(seeds: list[int], epochs: int, shuffle: str,
                       every: list[int] | None = None) -> str | None:
    """One line saying which seeds share data orders (:func:`shared_orders`), so that the ±
    over them understates the spread, and as many seeds (``every``: the comparison's, else
    ``seeds``) that do not; None where none do. README said it, the report and the console
    did not."""
    pairs = shared_orders(seeds, epochs, shuffle)
    if not pairs:
        return None
    s, t = pairs[0]
    more = f" (and {len(pairs) - 1} more pair{'s' if len(pairs) > 2 else ''})" \
        if len(pairs) > 1 else ""
    every = sorted(set(every or seeds))
    apart = ",".join(str(every[0] + i * epochs) for i in range(len(every)))
    return (f"`--shuffle global` seeds each epoch's data order with seed + epoch: over "
            f"{epochs} epochs seed {t}'s orders are seed {s}'s, {t - s} epoch"
            f"{'s' if t - s > 1 else ''} later{more}, so the ± over the seeds understates the "
            f"spread; for orders of their own take seeds at least {epochs} apart "
            f"(`--seeds {apart}`).")


def seed_orders(rows: list[Row]) -> str | None:
    """:func:`shared_orders_note` of the finished runs, for report.md: each algorithm's
    seeds, with the shuffle and epochs their config.json records (compared with those of
    its other seeds that ran alike)."""
    every = [r.seed for r in rows if r.seed is not None]
    for runs in by_algorithm(rows).values():
        alike: dict[tuple, list[int]] = {}
        for r in runs:
            flat = _flat(r.config)
            how = (flat.get("data.shuffle"), flat.get("optim.epochs"))
            if r.summary is not None and r.seed is not None and isinstance(how[0], str) and \
                    _is_count(how[1]):
                alike.setdefault(how, []).append(r.seed)
        for (shuffle, epochs), seeds in alike.items():
            if note := shared_orders_note(seeds, epochs, shuffle, every):
                return note
    return None


def main_table(rows: list[Row], targets: list[float]) -> str:
    """The table a report leads with: per algorithm over seeds if the runs have seeds, else
    one row per run."""
    seeded = any(r.seed is not None for r in rows)
    return seed_table(rows, targets) if seeded else table(rows, targets)


def _who(chosen: list[Row], rows: list[Row]) -> str:
    """The runs ``chosen`` among ``rows``, for a sentence: an algorithm's name where all of its
    finished runs are chosen (its seeds), else each run's title."""
    names = []
    for name, runs in by_algorithm([r for r in rows if r.summary is not None]).items():
        picked = [r for r in runs if any(r is c for c in chosen)]
        if picked and len(picked) == len(runs):
            names.append(name)
        else:
            names += [r.title for r in picked]
    return ", ".join(names)


def _grouped(rows: list[Row], value) -> dict[str, list[Row]]:
    """The finished ``rows`` by ``value(row)``, in the rows' order."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        if r.summary is not None:
            groups.setdefault(value(r), []).append(r)
    return groups


# Summary keys of what the runs trained, with their labels where they differ
SETTING = (("model", "model"), ("dataset", "data set"), ("epochs", "epochs"))


def setting(rows: list[Row]) -> str | None:
    """One line on the finished runs' model, data set and epochs (their summaries'); where the
    runs differ, which ran with what. None when no run finished."""
    finished = [r for r in rows if r.summary is not None]
    if not finished:
        return None
    groups = {key: _grouped(finished, lambda r, key=key: str(r.summary.get(key, "?")))
              for key, _ in SETTING}
    same = {key: next(iter(g)) for key, g in groups.items() if len(g) == 1}
    if len(same) == len(SETTING):
        return f"Model {same['model']} on {same['dataset']}; epochs: {same['epochs']}."
    what = " ".join(([f"Model {same['model']}"] if "model" in same else [])
                    + ([f"on {same['dataset']}" if "model" in same else
                        f"data set {same['dataset']}"] if "dataset" in same else []))
    first = "; ".join(([what] if what else [])
                      + ([f"epochs: {same['epochs']}"] if "epochs" in same else []))
    first = first[:1].upper() + first[1:]
    differ = [f"{label} " + "; ".join(f"{value} ({_who(runs, finished)})"
                                      for value, runs in groups[key].items())
              for key, label in SETTING if key not in same]
    return (f"{first}. " if first else "") + "**The runs differ in** " + "; and ".join(
        differ) + "."


# config.json keys that are no training setting to compare (where the run wrote, what it
# showed, the algorithm: the row's name), or that other lines of the report give: model, data
# set and epochs (setting), the scoring (scoring), the simulator's (simulator_settings)
NOT_COMPARED = frozenset({"algo", "out", "run_info", "progress", "tensorboard", "log_every",
                          "profile",
                          "stall_timeout", "checkpoint.dir", "checkpoint.resume",
                          "data.data_dir", "model.name", "data.dataset", "optim.epochs",
                          "eval_mode"})


# config.json settings whose value is a JSON object of the user's, one option compared whole:
# split by key, ``--model-args '{"width": 4}'`` and the builder's default (None) were keys of one
# run each, and the report said nothing of the difference
WHOLE = frozenset({"model.args"})


def _flat(table: dict, prefix: str = "") -> dict:
    """A nested configuration's values by dotted key (``optim.lr``), those of WHOLE whole."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in WHOLE:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _trained_with(row: Row) -> dict[str, str]:
    """The training settings of ``row``'s config.json, by dotted key, each as text: a value
    left None there is the one the run resolved (``run_info``'s ``resolved``: ma's ``tau``
    20, a store's ``shards``); its seed is in its name where it is a comparison's seed."""
    values = _flat({k: v for k, v in row.config.items() if k not in ("sim", "run_info")})
    resolved = row.run_info.get("resolved")
    for key, value in (_flat(resolved) if isinstance(resolved, dict) else {}).items():
        if values.get(key) is None:
            values[key] = value
    if row.seed is not None:
        values.pop("seed", None)
    return {k: _value_text(v) for k, v in values.items() if k not in NOT_COMPARED}


def _value_text(value) -> str:
    """A setting's value as the report writes it: ``none``, ``on``/``off``, 0.05; an object's
    keys sorted, so that ``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}`` are one setting."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _flags() -> dict[str, str]:
    """Each training option's flag by its dotted configuration key (``optim.lr``: --lr)."""
    from hpctrain import arguments

    return {d.dest: d.flag for d in arguments.shared_options() + arguments.algorithm_options()}


def differing_settings(rows: list[Row]) -> str | None:
    """A Markdown table of every training setting in the finished runs' config.json that
    differs between them (lr, momentum, batch size, an algorithm's tau...), one row per set
    of runs that share their values; None when none differs. Defaults differ by algorithm
    (asgd's lr 0.1, ssgd's 0.05): the training options a comparison gives do not say them.
    An algorithm's option only some runs have differs where two of those differ; any other
    setting some runs lack (a config.json of an older hpctrain) differs. Either is "—" for
    the runs without it."""
    finished = [r for r in rows if r.summary is not None and r.config]
    settings = [_trained_with(r) for r in finished]
    keys = sorted({k for s in settings for k in s},
                  key=lambda k: (k.startswith("algorithm."), k))
    differ = [k for k in keys if len({s.get(k) for s in settings
                                      if k in s or not k.startswith("algorithm.")}) > 1]
    if not differ:
        return None
    groups: dict[tuple[str, ...], list[Row]] = {}
    for row, s in zip(finished, settings, strict=True):
        groups.setdefault(tuple(s.get(k, "—") for k in differ), []).append(row)
    flags = _flags()
    head = ["runs", *(f"`{flags.get(k, k)}`" for k in differ)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([_plain(_who(runs, finished)), *(
                  c.replace("|", "\\|").replace("\n", " ") for c in values)]) + " |"
              for values, runs in groups.items()]
    return ("**The runs' training settings differ** (their config.json, where a setting left "
            "to a default is the algorithm's; —: the run has no such setting (another "
            "algorithm's option, or a config.json from an older hpctrain)):\n\n"
            + "\n".join(lines))


def simulated_runs(record: dict, rows: list[Row]) -> str | None:
    """The line saying which runs were simulated (virtual seconds), or None when none was."""
    if record.get("simulated"):
        return (f"Simulated (`hpctrain simulate --workers {record['workers']}`): virtual "
                "workers in one process; wall times are virtual seconds.")
    finished = [r for r in rows if r.summary is not None]
    simulated = [r for r in finished if _simulated(r)]
    if not simulated:
        return None
    if _all_simulated(finished):
        return ("Simulated (`hpctrain simulate`): virtual workers in one process; wall times "
                "are virtual seconds.")
    return (f"Simulated by `hpctrain simulate` (virtual workers in one process), marked "
            f"{SIMULATED_MARK} in the table: {_who(simulated, finished)}. Their wall times and "
            "times to a target are virtual seconds, not comparable with the other runs'.")


# What sets a simulated run's times and staleness, as its summary.json records it: keys of its
# `simulation`, then its straggler fields, with the flags that set them
SIMULATOR_SETTINGS = (("step_time", "--step-time"), ("timing_seed", "--timing-seed"),
                      ("comm_time", "--comm-time"), ("latency", "--latency"),
                      ("bandwidth", "--bandwidth"), ("store_latency", "--store-latency"),
                      ("store_bandwidth", "--store-bandwidth"),
                      ("train_subset", "--train-subset"))
STRAGGLER_SETTINGS = (("slowdown", "--slowdown"), ("jitter", "--jitter"))


def simulator_settings(rows: list[Row]) -> str | None:
    """One line on what set the simulated runs' times and staleness (their summaries': the
    step-time model and its seed, the network model, stragglers, the training subset, ec's
    inference rate), every setting's value or, where the runs differ, which ran with what;
    None when no run was simulated. The header named only ``--workers``, and the step-time
    model was left to each run's command."""
    simulated = [r for r in rows if _simulated(r)]
    if not simulated:
        return None
    missing = object()

    def value(r: Row, key: str):
        if key in dict(STRAGGLER_SETTINGS):
            return r.finished.get(key, missing)
        return (r.finished.get("simulation") or {}).get(key, missing)

    def text(v) -> str:
        return "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    parts = []
    for key, flag in SIMULATOR_SETTINGS + STRAGGLER_SETTINGS:
        if all(value(r, key) is missing for r in simulated):  # a summary from before it
            continue
        groups = _grouped(simulated, lambda r, key=key: text(value(r, key))
                          if value(r, key) is not missing else "?")
        if len(groups) == 1:
            parts.append(f"`{flag} {next(iter(groups))}`")
        elif key == "timing_seed" and all(value(r, key) == r.seed for r in simulated):
            parts.append(f"`{flag}` each run's `--seed`")
        else:
            parts.append(f"`{flag}` " + "; ".join(f"{v} ({_who(runs, simulated)})"
                                                  for v, runs in groups.items()))
    ec = [r for r in simulated if r.finished.get("algo") == "ec"]
    rates = _grouped(ec, lambda r: "{:g} s ({})".format(
        *(value(r, k) for k in ("inference_s_per_sample", "inference_from"))))
    if rates and all(value(r, "inference_s_per_sample") is not missing for r in ec):
        parts.append("ec's inference per sample " + "; ".join(
            f"{v}" + (f" ({_who(runs, simulated)})" if len(rates) > 1 else "")
            for v, runs in rates.items()))
    if not parts:
        return None
    return ("Simulator settings, which set every time and staleness figure: "
            + ", ".join(parts) + ".")


# How a run's snapshots were scored (its summary's eval_mode) and whether evaluation is in its
# wall time (eval_in_clock), for report.md
SCORING = {"after": "scored after training, so evaluation is not in the clock",
           "online": "scored while training, on rank 0 between steps, so evaluation is in the "
                     "clock",
           "member": "scored after training, but rank 0's own model was scored between steps "
                     "too (`--eval online`), so evaluation is in the clock",
           "outside": "scored on rank 0 before and after training, none between steps, so "
                      "evaluation is not in the clock",
           "rank": "scored while training, on a rank that does not train (`--eval-rank`), so "
                   "evaluation is not in the clock",
           "unknown": "scored in a way the summary's `eval_mode` does not name"}


def _scoring(summary: dict) -> str:
    """The key in SCORING of a run's ``eval_mode`` and ``eval_in_clock`` (runs from before
    either was recorded: scored after training; online, in the clock)."""
    mode = summary.get("eval_mode", "after")
    in_clock = summary.get("eval_in_clock")  # None: eval_mode alone says it
    if mode == "after":  # ma and ec online score rank 0's member between steps
        return "member" if in_clock else "after"
    if mode == "online":
        return "outside" if in_clock is False else "online"
    if isinstance(mode, str) and mode.startswith("online (rank "):
        return "rank"
    return "unknown"


def scoring(rows: list[Row]) -> str:
    """How the snapshots of the finished runs were scored (``eval_mode``), and whether
    evaluation is in their clock (``eval_in_clock``): one clause, or one per way with the runs
    scored so."""
    finished = [r for r in rows if r.summary is not None]
    groups = _grouped(finished, lambda r: _scoring(r.summary))
    if len(groups) <= 1:
        return SCORING[next(iter(groups), "after")]
    return "; ".join(f"{SCORING[way]} ({_who(runs, finished)})" for way, runs in groups.items())


# What report.md says under the seeds' table: how it summarises a run per seed
SEEDS_NOTE = ("Each algorithm ran once per seed ({seeds}): the table gives the mean ± sample "
              "standard deviation over the seeds whose run finished (the deviation to two "
              "significant figures, whole from 100 up, the mean to the same decimal place, neither "
              "finer than one run's value is written: *± <0.0001*, a deviation below that "
              "place; a time"
              " to a target: over those that reached it; *in 1 of 2*: the value is in that many "
              "of them), the largest peak memory and staleness max of any seed's run, and the "
              "other staleness figures (each run's mean, p50, p90 and p99: a mean of the runs' "
              "percentiles, not a percentile of all their pushes) and byte counts averaged. Every"
              " run:")
# What report.md says under the runs' table: what each of its columns measures, and how
TABLE_NOTE = ("Accuracies are fractions of the test set. *Time to* a target is the wall time (and"
              " the epochs of data consumed) at the first snapshot whose test accuracy reaches "
              "it; snapshots are taken every `--eval-every` epochs and {scoring}. Staleness "
              "(async runs) counts, per push, the other workers' updates the worker's model "
              "lacked (exact with `--consistency locked`; `atomic` counts the pushes finished "
              "since the worker's last one). Its mean is set by the push counts more than the "
              "timing (about M-1 for M workers; `locked`'s a little above on a loaded machine): "
              "p90, p99 and max tell runs apart. *Samples/s* counts training samples (ec's "
              "batches' own, not the relabelled samples distilled beside them). *Peak memory* is "
              "the largest worker's `peak_memory_per_worker` during training (the process's peak "
              "resident set on a CPU, memory torch allocated on a GPU; none in a simulation). "
              "*Bytes communicated per rank* are the byte counts a run's summary.json holds, each"
              " what a rank sent, an allreduce counted as a ring's 2(K-1)/K of its payload "
              "whatever algorithm MPI picked: gradient allreduce (`allreduce_bytes_per_rank`), "
              "model aggregation or exchange of ma/ec (`aggregation.*`), the sharded data "
              "exchange (`bytes_moved`) and, for async runs, the model payload a worker read from"
              " and wrote to the parameter store (`store_bytes_per_worker`, mean over workers, "
              "whether MPI or loads and stores on shared-memory windows moved it; "
              "`store_mpi_bytes_per_worker` is the part of it MPI calls moved, not more bytes).")


def _intro_lines(record: dict, rows: list[Row]) -> list[str]:
    """report.md's lines above the tables: the options the runs got (a comparison's record)
    or that they were found here, then what set them apart from a plain run of each, so
    that the figures below are read with how they were made."""
    if record:
        options = shlex.join(record.get("train_args", [])) or "(defaults)"  # pasteable
        evaluating = "--eval-rank" in record.get("train_args", [])
        per_run = "processes per run, one of them evaluating" if evaluating else \
            "workers per run"
        sgd = "" if "sgd" not in record["algos"] else \
            ", sgd on one process and one evaluating (its --eval-rank 1)" if evaluating else \
            ", sgd on one process"
        out = [f"Training options: {_code(options)} (each run gets those its algorithm takes); "
               f"{record['workers']} {per_run}{sgd}."]
    else:
        out = ["Runs found in this folder."]
    out += [line for line in (simulated_runs(record, rows), simulator_settings(rows),
                              setting(rows), environment(rows)) if line]
    if differing := differing_settings(rows):
        out += ["", differing]
    return out


def _seed_section(seeds: list, rows: list[Row], targets: list[float]) -> list[str]:
    """With ``seeds``, the table of each algorithm over its seeds and how it summarises
    them, above the table of every run; nothing without."""
    if not seeds:
        return []
    out = ["", seed_table(rows, targets), ""]
    if models := final_models_note(rows):
        out += [models, ""]
    if orders := seed_orders(rows):
        out += [f"**Seeds that share data orders:** {orders}", ""]
    return out + [SEEDS_NOTE.format(seeds=", ".join(map(str, seeds)))]


def _ignored_flags_lines(rows: list[Row]) -> list[str]:
    """One line per flag some algorithms were not given (they do not take it), naming each
    algorithm once, whatever its seeds."""
    ignored: dict[str, list[str]] = {}
    for r in rows:
        for flag in r.ignored:
            names = ignored.setdefault(flag, [])
            if r.name not in names:
                names.append(r.name)
    return [f"\n`{flag}` was not given to {', '.join(names)}: "
            f"{'it does' if len(names) == 1 else 'they do'} not take it."
            for flag, names in ignored.items()]


def _plots_section(plots: bool, seeds: list) -> list[str]:
    """The plots (with seeds, what their lines and shades are), or why there are none."""
    if not plots:
        return ["", f"*No plots: {NO_PLOTS}.*"]
    return (["", BAND_NOTE] if seeds else []) + [
        "", "![test error against wall time](error_vs_time.png)",
        "![test error against epochs](error_vs_epochs.png)"]


def _commands_section(rows: list[Row], record: dict) -> list[str]:
    """The command line of each run that has one; outside a comparison (no ``record``),
    said to be the one its config.json records."""
    commands = [(r.title, r.command) for r in rows if r.command]
    if not commands:
        return []
    out = ["", "## Commands", ""]
    if not record:
        out += ["Each run's command line, as its config.json records it (without the "
                "launcher that started its processes: mpirun, srun, torchrun; a script's "
                "with `python` before it).", ""]
    return out + [f"- {_plain(title)}: "
                  f"{command if command == FROM_PYTHON else _code(command)}"
                  for title, command in commands]


def markdown(record: dict, rows: list[Row], targets: list[float], plots: bool = True) -> str:
    """The whole ``report.md`` (``plots``: whether the PNGs it shows were drawn)."""
    seeds = record.get("seeds") or sorted({r.seed for r in rows if r.seed is not None})
    out = ["# Algorithm comparison", "", *_intro_lines(record, rows),
           *_seed_section(seeds, rows, targets),
           "", table(rows, targets), ""]
    if not seeds and (models := final_models_note(rows)):  # under the first table
        out += [models, ""]
    out.append(TABLE_NOTE.format(scoring=scoring(rows)))
    if loaded := machine_load(rows):
        out += ["", loaded]
    if any(r.status in (UNFINISHED, NOT_RUN) for r in rows):
        out.append(f"\n*{UNFINISHED}*: a run that started and has no summary (stopped, or "
                   f"still going on); *{NOT_RUN}*: one that has not started"
                   + ("; `bench compare --resume` runs them." if record else "."))
    out += _ignored_flags_lines(rows)
    if printed := notes(rows):
        out += ["", printed]
    out += _plots_section(plots, seeds) + _commands_section(rows, record)
    return "\n".join(out) + "\n"


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
        xs = [e if x == "epoch" else _mean([_interpolate(epochs, at, e)
                                            for epochs, at, _ in those])
              for e, those in zip(grid, there, strict=True)]
        column = [[_interpolate(epochs, err, e) for epochs, _, err in those]
                  for e, those in zip(grid, there, strict=True)]
        algos = {r.algo or name for r in drawn}
        ends = [at[-1] for _, at, _ in lines]  # each run's time at its last snapshot
        out.append(Curve(name, label, xs, [_mean(c) for c in column],
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


def _title(record: dict, rows: list[Row]) -> str:
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


def _write_together(files: dict[Path, bytes | str]) -> None:
    """Write all of ``files`` or, on an error, none (UsageError naming the file): each to a
    temporary file beside it, and only when all are written does each replace the old one, so
    a report.md never shows another rendering's plots, nor is left cut short."""
    for path in files:
        if path.is_dir():
            raise UsageError(f"report: cannot write {path}: it is a folder")
    staged: dict[Path, Path] = {}
    try:
        for path, content in files.items():
            staged[path] = path.with_name(f".{path.name}.{os.getpid()}.new")
            write_atomic(staged[path], content)
        for path, tmp in staged.items():
            os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"report: cannot write {path}: {e.strerror or e}") from None
    finally:
        for tmp in staged.values():  # never in place of the error above: on a read-only
            with contextlib.suppress(OSError):  # mount unlink fails even for a missing file
                tmp.unlink(missing_ok=True)


def render(folder: str | Path, targets: list[float] | None = None,
           out: str | Path | None = None) -> tuple[list[Row], list, list[Path]]:
    """Write ``report.md`` and both plots into ``out`` (made if missing; default ``folder``)
    from ``folder``'s saved outputs; return the rows, the targets used (``targets``, else the
    comparison's, else the defaults) and the plots drawn: none without matplotlib (the
    ``plot`` extra), where the report says so rather than losing a comparison's table after
    its runs. Everything is read and drawn before anything is written."""
    if not str(folder).strip():  # Path("") is the working folder
        raise UsageError(f"report {str(folder)!r}: give a comparison's or a run's folder")
    folder = Path(folder)
    record, rows = load(folder)
    target = folder if out is None else Path(out)
    targets = targets or record.get("targets") or list(DEFAULT_TARGETS)
    files: dict[Path, bytes | str] = {}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        for x, (name, _) in PLOTS.items():
            files[target / name] = plot(rows, x, _title(record, rows))
    drawn = list(files)
    files[target / REPORT] = markdown(record, rows, targets, plots=bool(drawn))
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {target}: cannot make the folder ({e.strerror})") from None
    _write_together(files)
    return rows, targets, drawn


def _hold_unless_in_use(held: contextlib.ExitStack, folder: Path) -> None:
    """Hold ``folder``'s lock, shared, while the report is written; UsageError if a
    comparison (or a run) going on holds it: its report called the runs going on and to come
    failed. Shared, as a reader's: it conflicts with a comparison's exclusive lock (one that
    starts meanwhile is refused), and NFS, which takes flock as an fcntl lock, grants it on
    the lock file open read-only, as the report opens it; the exclusive lock it took there
    failed (EBADF), taken as a file system without locks, so it never locked on NFS. Two
    reports at once share it, each writing its files together (with other --targets, their
    files may mix: the last written wins), and a comparison refused meanwhile is told that
    a comparison or run holds the folder. A folder without the lock file is left without
    one. A lock file this user cannot open (another user's comparison, its lock mode 600),
    or cannot lock as it may open it (write-only, on NFS), was called in use though nothing
    ran: the report, which only reads the runs, goes on unlocked, and says so."""
    from hpctrain.run_folders import LOCK, open_lock

    unlocked = "going on without it, so a comparison going on there now is not seen"
    try:
        fd = open_lock("report", folder, create=False)
    except OSError as e:
        print(f"hpctrain report: note: cannot open {folder / LOCK} ({e.strerror}): {unlocked}",
              file=sys.stderr)
        return
    if fd is None:
        return
    held.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UsageError(f"{folder} is in use by a comparison or run going on now (it "
                             f"holds {folder / LOCK}); bench compare rewrites its "
                             "report.md as each run ends") from None
        if e.errno == errno.EBADF:  # NFS: a shared lock needs the file open for reading
            print(f"hpctrain report: note: cannot lock {folder / LOCK} as this user may open "
                  f"it (not for reading) on this file system: {unlocked}", file=sys.stderr)
        # else a file system without locks: nothing to wait for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a comparison's --out folder, a folder of finished runs, "
                                    "or one run's folder (with --out)")
    parser.add_argument("--targets", default=None,
                        help="test accuracies to time, e.g. 0.8,0.85 (default: the comparison's, "
                             f"else {','.join(map(str, DEFAULT_TARGETS))})")
    parser.add_argument("--out", default=None, metavar="FOLDER",
                        help="write report.md and the plots there (made if missing; default: "
                             "DIR itself, but for one training run's folder, whose files are "
                             "the run's, which needs --out)")


def check_out_folder(out: str) -> None:
    """An ``--out`` that report.md (of ``report`` or ``bench compare``) may go in: not ""
    (the working folder), one that can be made or written in, and not a training run's
    folder, whose files would get the report's beside them."""
    if not out.strip():
        raise UsageError(f"--out {out!r} is empty: give a folder")
    from hpctrain.run_folders import check_folder

    check_folder("--out", out)
    held = [name for name in ("summary.json", "config.json") if (Path(out) / name).exists()]
    if held:
        raise UsageError(f"--out {out} holds a training run ({held[0]}); choose another folder")


def report_folder(folder: str, out: str | None) -> Path:
    """Where the report of ``folder`` goes (``--out``, else ``folder``), checked before
    anything is read: never into a training run's folder, whose files are the run's (bench
    compare refuses one as its --out too; ``report runs/sgd`` for ``report runs`` left
    report.md and the plots in the run), nor over another comparison's report."""
    if out is None:
        if (Path(folder) / "summary.json").is_file() and not (Path(folder) / RECORD).is_file():
            raise UsageError(f"report {folder}: is one training run's folder, whose files are "
                             f"the run's: give --out FOLDER for the report, or the folder that "
                             f"holds the run ({Path(folder).resolve().parent})")
        _check_writable(folder)
        return Path(folder)
    check_out_folder(out)
    if (Path(out) / RECORD).exists() and Path(out).resolve() != Path(folder).resolve():
        raise UsageError(f"--out {out} holds another comparison (its {RECORD}), whose report "
                         "this would replace; choose another folder")
    return Path(out)


def _check_writable(folder: str) -> None:
    """A report going into ``folder`` itself must be one it can write in: on a read-only one
    (an archive, a snapshot) the refusal named a plot it could not write, not ``--out``, the
    way to a report of it. Tested by making a file there, as the report does; a folder that
    is not there is left to :func:`load` to say."""
    if not Path(folder).is_dir():
        return
    try:
        handle, name = tempfile.mkstemp(prefix=".hpctrain-check-", dir=folder)
        os.close(handle)
        os.unlink(name)
    except OSError as e:
        raise UsageError(f"report {folder}: cannot write in {folder} ({e.strerror}); give "
                         "--out FOLDER to write report.md and the plots there") from None


def run(args: argparse.Namespace) -> list[Row]:
    """Re-render the report of ``args.dir`` (into ``args.out``, else there); print its table
    and where the files are. A ``~`` in DIR or ``--out`` (``--out=~/r``, which the shell
    leaves) is expanded, as in every path option (:func:`plugins.home_expanded`)."""
    folder = plugins.home_expanded(args.dir, "report")
    out = report_folder(folder, None if args.out is None
                        else plugins.home_expanded(args.out, "--out"))
    with contextlib.ExitStack() as held:
        _hold_unless_in_use(held, Path(folder))
        rows, targets, drawn = render(folder, None if args.targets is None
                                      else parse_targets(args.targets), out)
    print(main_table(rows, targets))
    if line := notes_line(rows):
        print(f"hpctrain report: {line}", file=sys.stderr)
    print(f"hpctrain report: {', '.join(map(str, [out / REPORT, *drawn]))}")
    if not drawn:
        print(f"hpctrain report: no plots: {NO_PLOTS}", file=sys.stderr)
    return rows
