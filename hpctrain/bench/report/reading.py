"""Reading a report's folder into rows: ``compare.json`` (:func:`read_record`) and each run's
folder (``summary.json``, ``metrics.jsonl``, ``config.json``, ``stderr.log``) into one
:class:`Row` per run (:func:`load`), with what every other part of the report asks of a run.

A value of the wrong type in those files is checked here, once: the row carries
:data:`NA` or leaves the point out, and one line on stderr names the file and key, so the
tables, the notes and the plots only ever see usable values. Here too are the names
``bench compare`` gives runs' folders (:func:`run_name`, :func:`set_aside_name`), the
settings a run was trained with (:func:`_trained_with`), a run's time to a target
(:func:`time_to`) and byte counts, and the runs grouped by algorithm over their seeds
(:func:`by_algorithm`): facts of the runs, not of how report.md words them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpctrain import plugins, registry
from hpctrain.errors import UsageError
from hpctrain.metrics import POINT_KEYS, read_json, read_points
from hpctrain.summary import byte_fields
from hpctrain.summary import read as read_summary

RECORD = "compare.json"
REPORT = "report.md"
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


def time_to(points: list[dict], target: float) -> dict | None:
    """The first curve point whose test accuracy reaches ``target`` (None if none does)."""
    return next((p for p in sorted(points, key=lambda p: p["t"]) if p["test_acc"] >= target),
                None)


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
