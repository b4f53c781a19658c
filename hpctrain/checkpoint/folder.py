"""A folder of checkpoints: naming, rotation, snapshot files, and finding the newest usable one.

Rank 0 writes ``ckpt-<updates>.pt`` through a temporary file, fsyncs it, renames it into place
and fsyncs the folder; only then does it delete checkpoints older than the last :data:`KEEP`.
A writer killed at any moment therefore leaves the previous good checkpoint (and at worst a
temporary file, removed by the next writer). Reading takes the newest checkpoint that passes its
checksum; a corrupt or truncated one is reported in one line, renamed ``*.corrupt`` and skipped
(one in a newer hpctrain's format is refused: it is not corrupt). Snapshots of the model are
files of their own in ``snapshots/``, listed with their checksums in each checkpoint, so that
checkpoints stay small however long the run. A snapshot is only a
curve point: a bad or missing one is reported and left out, and its checkpoint stays usable
(every later checkpoint lists the same file, so one bad snapshot would otherwise make them all
unusable).
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from hpctrain import options
from hpctrain.checkpoint.format import CorruptCheckpoint, encode_parts, load, read_header
from hpctrain.errors import UsageError
from hpctrain.evaluate import Snapshot
from hpctrain.metrics import write_atomic

KEEP = 2
SUBDIR = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


@dataclass(frozen=True, eq=False)  # no ==: the payload's tensors have no truth value
class Loaded:
    """A checkpoint read back whole, its checksum verified, with the snapshots it lists that
    verified too."""

    path: Path
    """The checkpoint file (``<folder>/ckpt-<updates>.pt``)."""
    header: dict
    """Its header: format, checksum, algorithm, ranks, workers, updates, epoch, run's options."""
    payload: dict
    """Its payload: ``shared`` and per-rank (``ranks``) states, ``snapshots`` refs, ``book``."""
    snapshots: list[list[Snapshot]]
    """The usable snapshots it lists, one list per rank that saved them (just rank 0 when
    shared; a point with a bad file left out of every rank's); ``payload["snapshots"]``
    still lists every file."""


# What a resume reads of a checkpoint, by place: a table's keys ({...}), each item of a list
# ([shape]), a list of anything ([]), anything (None). A file of another layout (another
# version's or program's, its checksum right) is named in one line, where a KeyError on
# some rank ended the job.
_LAYOUT = {
    "header": {"updates": None, "workers": None},
    "payload": {"shared": {}, "ranks": [{"counters": {}, "rng": None}],
                "snapshots": [[{"file": None, "sha256": None, "info": {}}]],
                "book": {"checkpoints": None, "checkpoint_s": None, "resumed_from": []}},
}


def layout_gap(value, shape=_LAYOUT, where: str = "") -> str | None:
    """What of ``shape`` (by default a checkpoint's ``{"header": ..., "payload": ...}``)
    ``value``, found at ``where``, lacks, as its place: ``no payload['book']['resumed_from']``,
    ``no list at payload['ranks']``; None when it lacks nothing."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"no table at {where}"
        for key, inner in shape.items():
            place = f"{where}[{key!r}]" if where else key
            if key not in value:
                return f"no {place}"
            if gap := layout_gap(value[key], inner, place):
                return gap
    elif isinstance(shape, list):
        if not isinstance(value, list):
            return f"no list at {where}"
        if not shape:  # a list of anything (the updates resumed from)
            return None
        return next((gap for i, item in enumerate(value)
                     if (gap := layout_gap(item, shape[0], f"{where}[{i}]"))), None)
    return None


def resumed() -> str:
    """The option that resumes a run, in a refusal of what it resumed from: ``--resume`` on
    the command line, ``CheckpointConfig.resume`` from Python (:func:`options.named`)."""
    return options.named("--resume", "CheckpointConfig", "resume")


def other_layout(path: Path, gap: str) -> UsageError:
    """The refusal of checkpoint ``path``, which passed its checksum but has ``gap``."""
    return UsageError(f"{resumed()}: checkpoint {path} has {gap}: not the layout this hpctrain "
                      "reads (another version's or program's file); resume it with the "
                      "hpctrain that wrote it")


def number(path: Path) -> int:
    """The update count in a checkpoint's name (``ckpt-<updates>.pt``)."""
    m = _NAME.match(path.name)
    assert m is not None, f"{path.name}: not a checkpoint's name (listing() finds those)"
    return int(m.group(1))


def listing(folder: str | Path) -> list[Path]:
    """The checkpoint files in ``folder``, newest (most updates) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / p) for p in os.listdir(folder) if (m := _NAME.match(p))]
    return [p for _, p in sorted(found, reverse=True)]


def save(folder: str | Path, updates: int, payload: dict, header: dict,
         midway: Callable[[], None] | None = None, retire: Sequence[Path] = ()) -> Path:
    """Write checkpoint ``ckpt-<updates>.pt`` in ``folder``, then delete ``retire`` (files of
    the run before a resize, whose numbers would outrank this one's) and keep only the
    newest KEEP."""
    folder = Path(folder)
    make_folder(folder)
    remove_stale(folder)
    path = folder / f"ckpt-{updates:09d}.pt"
    write_atomic(path, encode_parts(payload, {**header, "updates": updates})[1], durable=True,
                 midway=midway)
    for old in retire:
        if old.name != path.name:  # the same name: just replaced by this checkpoint
            old.unlink(missing_ok=True)
    for old in listing(folder)[KEEP:]:
        old.unlink(missing_ok=True)
    return path


def remove_stale(folder: Path) -> None:
    """Delete the temporary files a killed writer left in ``folder`` (a kill or the watchdog
    skips write_atomic's clean-up), before writing: on a nearly full disk they could make the
    next write fail."""
    for stale in [*folder.glob(".ckpt-*.tmp"), *folder.glob("snapshots/.*.tmp")]:
        stale.unlink(missing_ok=True)


def make_folder(folder: Path) -> None:
    """``folder`` and its parents, each new one's entry fsynced into its parent: the first
    checkpoint of a run must not vanish with its folder in a power cut."""
    missing = list(itertools.takewhile(lambda p: not p.exists(), (folder, *folder.parents)))
    folder.mkdir(parents=True, exist_ok=True)
    for new in reversed(missing):
        fd = os.open(new.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _usable_snapshots(folder: Path, refs: list[list[dict]], report: Callable[[str], None]
                      ) -> list[list[Snapshot]]:
    """The snapshots ``refs`` lists (per rank that saved them) that load and match their
    checksums. The others, whatever their problem, are reported in one line and their points
    left out, on every rank: ma's and ec's members are scored together, point by point. The
    files stay listed, so a good copy put back in its place counts again at the next resume."""
    loaded = [[_snapshot(folder, ref) for ref in rank] for rank in refs]
    unusable = [snap for rank in loaded for snap in rank if isinstance(snap, tuple)]
    if len(unusable) == 1:
        (path, problem, at), = unusable
        report(f"hpctrain: snapshot {path} is unusable ({problem}); the run's curve leaves "
               f"out its point{at}")
    elif unusable:  # a folder copied without snapshots/: one line, not one per snapshot
        named = "; ".join(f"{path.name}: {problem}{at}" for path, problem, at in unusable[:3])
        more = f"; and {len(unusable) - 3} more" if len(unusable) > 3 else ""
        report(f"hpctrain: {len(unusable)} snapshots in {unusable[0][0].parent} are unusable "
               f"({named}{more}); the run's curve leaves out their points")
    bad = {i for rank in loaded for i, snap in enumerate(rank) if isinstance(snap, tuple)}
    return [[snap for i, snap in enumerate(rank) if i not in bad and isinstance(snap, Snapshot)]
            for rank in loaded]


def _snapshot(folder: Path, ref: dict) -> Snapshot | tuple[Path, str, str]:
    """The snapshot file ``ref`` lists, or why it cannot be used: its path, the problem and
    the update it was taken at (`` (update N)``, or empty)."""
    path = folder / ref["file"]
    try:
        header, state = load(path, kind="snapshot")
        if header["sha256"] != ref["sha256"]:
            raise CorruptCheckpoint("not the file the checkpoint lists")
    except (CorruptCheckpoint, OSError) as e:
        # an OSError raised with a message alone has no strerror
        problem = (e.strerror or str(e)) if isinstance(e, OSError) \
            else str(e).removeprefix(path.name + ": ")
        at = f" (update {ref['info']['updates']})" if "updates" in ref["info"] else ""
        return path, problem, at
    # the checksum the checkpoint lists holds: the state dict the run wrote
    return Snapshot(cast(dict, state), ref["info"])


def refuse_newer_snapshots(folder: Path) -> None:
    """NewerCheckpoint naming the first file in ``folder``'s ``snapshots/`` that a newer
    hpctrain wrote, if any: for :func:`~hpctrain.checkpoint.policy.check`, before MPI starts.
    Listed by the checkpoint resumed, it ended the run on rank 0 once MPI ran; not listed
    (written after that checkpoint), this run would write over it. Only headers are read,
    a line per file; a file that cannot be read is left for :func:`load_newest` to judge."""
    shots = folder / "snapshots"
    try:
        names = sorted(os.listdir(shots))
    except OSError:  # none, or not listable: the resume's own reads say what is wrong
        return
    for name in names:
        if name.startswith(".") or not name.endswith(".pt"):
            continue  # a killed writer's temporary file
        try:
            read_header(shots / name, kind="snapshot")
        except (CorruptCheckpoint, OSError):  # NewerCheckpoint goes on up
            continue


def _read(path: Path, reader: Callable[[Path], object] = load):
    """``reader`` (:func:`load`, or :func:`read_header`) of a checkpoint file, a missing file
    or a folder in its place taken as corrupt; any other OSError (permissions, an I/O error)
    a UsageError: the file may be fine, and is kept in the rotation."""
    try:
        return reader(path)
    except (FileNotFoundError, IsADirectoryError) as e:
        raise CorruptCheckpoint(f"{path.name}: {e.strerror}") from None
    except OSError as e:
        raise UsageError(f"cannot read checkpoint file {path}: {e.strerror}") from None


def checkpoint_header(path: Path) -> dict:
    """A checkpoint's header (:func:`read_header`), with :func:`load_newest`'s errors:
    CorruptCheckpoint for a missing file or a folder, UsageError for an unreadable file."""
    return _read(path, read_header)


def load_newest(folder: str | Path, report: Callable[[str], None] | None = None
                ) -> Loaded | None:
    """The newest usable checkpoint in ``folder``, with its snapshots; None if none is usable.

    Each unusable one on the way is reported in one line (by default to stderr), renamed
    ``*.corrupt`` (so that it leaves the rotation) and skipped; one in a newer hpctrain's
    format is no corrupt file: NewerCheckpoint (a UsageError), the folder left as it is
    (skipping it went back to an older checkpoint, silently undoing the newer run's). Its
    model and optimizer state decide: a bad snapshot it lists is reported and left out
    (:func:`_usable_snapshots`).
    """
    folder = Path(folder)
    report = report or (lambda line: print(line, file=sys.stderr, flush=True))
    paths = listing(folder)
    for i, path in enumerate(paths):
        try:
            head, payload = _read(path)
        except CorruptCheckpoint as e:
            then = "falling back to the previous one" if i + 1 < len(paths) else \
                "no older one is left"
            report(f"hpctrain: checkpoint {folder / path.name} is unusable ({e}); {then}")
            try:
                path.rename(path.with_name(path.name + ".corrupt"))
            except OSError as refused:  # a read-only copy (resumed with --out elsewhere)
                report(f"hpctrain: {folder / path.name} is left in place, not set aside as "
                       f"*.corrupt ({refused.strerror})")
            continue
        snapshots = _usable_snapshots(folder, payload.get("snapshots", []), report)
        return Loaded(path=path, header=head, payload=payload, snapshots=snapshots)
    return None


def newest(folder: str | Path) -> Loaded:
    """:func:`load_newest` for ``--resume``: UsageError when nothing in ``folder`` is usable."""
    found = load_newest(folder)
    if found is None:
        given = options.named(f"--resume {folder}", "CheckpointConfig", "resume", str(folder))
        raise UsageError(f"{given}: no usable checkpoint (each one's problem is "
                         "said above; they are kept as *.corrupt)")
    return found


def corrupt(folder: str | Path) -> list[Path]:
    """The checkpoints :func:`load_newest` set aside in ``folder`` (``*.corrupt``)."""
    folder = Path(folder)
    return sorted(folder.glob("ckpt-*.pt.corrupt")) if folder.is_dir() else []


def named_aside(aside: list[Path]) -> str:
    """Checkpoints set aside (:func:`corrupt`) as a refusal names them: the first, and how
    many more (``ckpt-000000007.pt.corrupt and 2 more``; a lone one wrote ``, ...`` too)."""
    more = f" and {len(aside) - 1} more" if len(aside) > 1 else ""
    return f"{aside[0].name}{more}"


def resolve(folder: str | Path) -> Path:
    """The checkpoint folder meant by ``--resume DIR``: DIR itself or ``DIR/checkpoints``.

    Checkpoints an earlier resume set aside (``*.corrupt``) count as the folder's too: once
    all of a run's were, ``--resume RUN`` must look in ``RUN/checkpoints`` to say so, as
    ``--resume RUN/checkpoints`` does (RUN itself only held "no checkpoint")."""
    folder = Path(folder)
    if listing(folder) or corrupt(folder):
        return folder
    inner = folder / SUBDIR
    return inner if listing(inner) or corrupt(inner) else folder


def run_folder(checkpoint_dir: str | Path | None, out: str | Path | None) -> Path:
    """Where a run writes its checkpoints: ``checkpoint_dir``, else ``<out>/checkpoints``
    (the callers give one of them)."""
    if checkpoint_dir:
        return Path(checkpoint_dir)
    assert out is not None, "run_folder: neither a checkpoint folder nor an --out"
    return Path(out) / SUBDIR


def writes_to(checkpoint_dir: str | None, resume: str | None, out: str) -> Path:
    """Where a run given these options (not yet resolved by ``policy.check``) writes its
    checkpoints: ``--checkpoint-dir``, else the folder ``--resume DIR`` continues, else
    ``<out>/checkpoints`` (where ``--resume auto`` looks). train.sbatch asks, to tell a run
    killed after its checkpoint from one that died without."""
    if checkpoint_dir is None and resume not in (None, "auto"):
        return resolve(resume)
    return run_folder(checkpoint_dir, out)
