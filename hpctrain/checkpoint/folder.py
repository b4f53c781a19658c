"""A folder of checkpoints: naming, rotation, snapshot files, and finding the newest usable one.

Rank 0 writes ``ckpt-<updates>.pt`` through a temporary file, fsyncs it, renames it into place
and fsyncs the folder; only then does it delete checkpoints older than the last :data:`KEEP`.
A writer killed at any moment therefore leaves the previous good checkpoint (and at worst a
temporary file, removed by the next writer). Reading takes the newest checkpoint that passes its
checksum; a corrupt or truncated one is reported in one line, renamed ``*.corrupt`` and skipped.
Snapshots of the model are files of their own in ``snapshots/``, listed with their checksums in
each checkpoint, so that checkpoints stay small however long the run.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hpctrain.checkpoint.format import CorruptCheckpoint, encode, load
from hpctrain.errors import UsageError
from hpctrain.evaluate import Snapshot
from hpctrain.metrics import write_atomic

KEEP = 2
SUBDIR = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


@dataclass(frozen=True, eq=False)  # no ==: the payload's tensors have no truth value
class Loaded:
    """A checkpoint read back whole, its checksums and its snapshots' checksums verified."""

    path: Path
    """The checkpoint file (``<folder>/ckpt-<updates>.pt``)."""
    header: dict
    """Its header: format, checksum, algorithm, ranks, workers, updates, epoch, run's options."""
    payload: dict
    """Its payload: ``shared`` and per-rank (``ranks``) states, ``snapshots`` refs, ``book``."""
    snapshots: list[list[Snapshot]]
    """The snapshots it lists, one list per rank that saved them (just rank 0 when shared)."""


def number(path: Path) -> int:
    """The update count in a checkpoint's name (``ckpt-<updates>.pt``)."""
    return int(_NAME.match(path.name).group(1))


def listing(folder: str | Path) -> list[Path]:
    """The checkpoint files in ``folder``, newest (most updates) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / p) for p in os.listdir(folder) if (m := _NAME.match(p))]
    return [p for _, p in sorted(found, reverse=True)]


def save(folder: str | Path, updates: int, payload: dict, header: dict,
         midway: Callable[[], None] | None = None, retire: list[Path] = ()) -> Path:
    """Write checkpoint ``ckpt-<updates>.pt`` in ``folder``, then delete ``retire`` (files of
    the run before a resize, whose numbers would outrank this one's) and keep only the
    newest KEEP."""
    folder = Path(folder)
    make_folder(folder)
    path = folder / f"ckpt-{updates:09d}.pt"
    write_atomic(path, encode(payload, {**header, "updates": updates}), durable=True,
                 midway=midway)
    for old in retire:
        if old.name != path.name:  # the same name: just replaced by this checkpoint
            old.unlink(missing_ok=True)
    for old in listing(folder)[KEEP:]:
        old.unlink(missing_ok=True)
    for stale in [*folder.glob(".ckpt-*.tmp"), *folder.glob("snapshots/.*.tmp")]:
        stale.unlink(missing_ok=True)  # left by a writer that was killed
    return path


def make_folder(folder: Path) -> None:
    """``folder`` and its parents, each new one's entry fsynced into its parent: the first
    checkpoint of a run must not vanish with its folder in a power cut."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for new in reversed(missing):
        fd = os.open(new.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _load_snapshots(folder: Path, refs: list[dict]) -> list[Snapshot]:
    out = []
    for ref in refs:
        path = folder / ref["file"]
        try:
            header, state = _read(path)
        except CorruptCheckpoint as e:
            raise CorruptCheckpoint(f"snapshot {ref['file']}: "
                                    f"{str(e).removeprefix(path.name + ': ')}") from None
        if header["sha256"] != ref["sha256"]:
            raise CorruptCheckpoint(f"snapshot {ref['file']} is not the one it lists")
        out.append(Snapshot(state, ref["info"]))
    return out


def _read(path: Path) -> tuple[dict, object]:
    """:func:`load`, a missing file or a folder in its place taken as corrupt; any other
    OSError (permissions, an I/O error) a UsageError: the file may be fine, and is kept in
    the rotation."""
    try:
        return load(path)
    except (FileNotFoundError, IsADirectoryError) as e:
        raise CorruptCheckpoint(f"{path.name}: {e.strerror}") from None
    except OSError as e:
        raise UsageError(f"cannot read checkpoint file {path}: {e.strerror}") from None


def load_newest(folder: str | Path, report: Callable[[str], None] | None = None
                ) -> Loaded | None:
    """The newest usable checkpoint in ``folder``, with its snapshots; None if none is usable.

    Each unusable one on the way is reported in one line (by default to stderr), renamed
    ``*.corrupt`` (so that it leaves the rotation) and skipped.
    """
    folder = Path(folder)
    report = report or (lambda line: print(line, file=sys.stderr, flush=True))
    paths = listing(folder)
    for i, path in enumerate(paths):
        try:
            header, payload = _read(path)
            snapshots = [_load_snapshots(folder, refs) for refs in payload.get("snapshots", [])]
        except CorruptCheckpoint as e:
            then = "falling back to the previous one" if i + 1 < len(paths) else \
                "no older one is left"
            report(f"hpctrain: checkpoint {folder / path.name} is unusable ({e}); {then}")
            path.rename(path.with_name(path.name + ".corrupt"))
            continue
        return Loaded(path=path, header=header, payload=payload, snapshots=snapshots)
    return None


def newest(folder: str | Path) -> Loaded:
    """:func:`load_newest` for ``--resume``: UsageError when nothing in ``folder`` is usable."""
    found = load_newest(folder)
    if found is None:
        raise UsageError(f"--resume {folder}: no usable checkpoint (each one's problem is "
                         "said above; they are kept as *.corrupt)")
    return found


def corrupt(folder: str | Path) -> list[Path]:
    """The checkpoints :func:`load_newest` set aside in ``folder`` (``*.corrupt``)."""
    folder = Path(folder)
    return sorted(folder.glob("ckpt-*.pt.corrupt")) if folder.is_dir() else []


def resolve(folder: str | Path) -> Path:
    """The checkpoint folder meant by ``--resume DIR``: DIR itself or ``DIR/checkpoints``."""
    folder = Path(folder)
    return folder if listing(folder) or not listing(folder / SUBDIR) else folder / SUBDIR


def run_folder(checkpoint_dir: str | Path | None, out: str | Path) -> Path:
    """Where a run writes its checkpoints: ``checkpoint_dir``, else ``<out>/checkpoints``."""
    return Path(checkpoint_dir or Path(out) / SUBDIR)
