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


def listing(folder: str | Path) -> list[Path]:
    """The checkpoint files in ``folder``, newest (most updates) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / p) for p in os.listdir(folder) if (m := _NAME.match(p))]
    return [p for _, p in sorted(found, reverse=True)]


def save(folder: str | Path, updates: int, payload: dict, header: dict,
         midway: Callable[[], None] | None = None) -> Path:
    """Write checkpoint ``ckpt-<updates>.pt`` in ``folder``, then keep only the newest KEEP."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{updates:09d}.pt"
    write_atomic(path, encode(payload, {**header, "updates": updates}), durable=True,
                 midway=midway)
    for old in listing(folder)[KEEP:]:
        old.unlink(missing_ok=True)
    for stale in [*folder.glob(".ckpt-*.tmp"), *folder.glob("snapshots/.*.tmp")]:
        stale.unlink(missing_ok=True)  # left by a writer that was killed
    return path


def _load_snapshots(folder: Path, refs: list[dict]) -> list[Snapshot]:
    out = []
    for ref in refs:
        path = folder / ref["file"]
        try:
            header, state = load(path)
        except OSError as e:
            raise CorruptCheckpoint(f"snapshot {ref['file']}: {e.strerror}") from None
        if header["sha256"] != ref["sha256"]:
            raise CorruptCheckpoint(f"snapshot {ref['file']} is not the one it lists")
        out.append(Snapshot(state, ref["info"]))
    return out


def load_newest(folder: str | Path, report: Callable[[str], None] | None = None
                ) -> Loaded | None:
    """The newest usable checkpoint in ``folder``, with its snapshots; None if none is usable.

    Each unusable one on the way is reported in one line (by default to stderr), renamed
    ``*.corrupt`` (so that it leaves the rotation) and skipped.
    """
    folder = Path(folder)
    report = report or (lambda line: print(line, file=sys.stderr, flush=True))
    for path in listing(folder):
        try:
            try:
                header, payload = load(path)
            except OSError as e:  # not a file (a folder of that name), or unreadable
                raise CorruptCheckpoint(f"{path.name}: {e.strerror}") from None
            snapshots = [_load_snapshots(folder, refs) for refs in payload.get("snapshots", [])]
        except CorruptCheckpoint as e:
            report(f"hpctrain: checkpoint {folder / path.name} is unusable ({e}); "
                   "falling back to the previous one")
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


def resolve(folder: str | Path) -> Path:
    """The checkpoint folder meant by ``--resume DIR``: DIR itself or ``DIR/checkpoints``."""
    folder = Path(folder)
    return folder if listing(folder) or not listing(folder / SUBDIR) else folder / SUBDIR


def run_folder(checkpoint_dir: str | Path | None, out: str | Path) -> Path:
    """Where a run writes its checkpoints: ``checkpoint_dir``, else ``<out>/checkpoints``."""
    return Path(checkpoint_dir or Path(out) / SUBDIR)
