"""Checkpoints: a run's whole state, written so that a killed job never loses a good one.

A checkpoint file is one line of JSON (the header: format, SHA-256 and length of the payload,
the algorithm, the numbers of ranks and workers, the update count, the run's arguments), then the
payload, a ``torch.save`` of plain tensors, dicts, lists and numbers that is loaded with
``weights_only=True`` after its checksum matched, so loading never executes code from the file.

Rank 0 writes ``ckpt-<updates>.pt`` to a temporary file, fsyncs it, renames it into place and
fsyncs the folder; only then does it delete checkpoints older than the last :data:`KEEP`. A
writer killed at any moment therefore leaves the previous good checkpoint (and at worst a
temporary file, removed by the next writer). Resuming takes the newest checkpoint that passes
its checksum; a corrupt or truncated one is reported in one line, renamed ``*.corrupt`` and
skipped. Snapshots of the model (the curve points, evaluated after training) are written once
each to ``snapshots/`` and listed with their checksums in every later checkpoint, so
checkpoints stay small however long the run.

The position in the data is the update count: epoch ``updates // steps`` at step
``updates % steps``, whose order the shuffle package derives from (seed, epoch) alone (an
asynchronous worker keeps its own position among its per-rank counters).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from hpctrain import comm as hcomm
from hpctrain import faults
from hpctrain.errors import UsageError
from hpctrain.evaluate import Snapshot
from hpctrain.metrics import write_atomic

FORMAT = "hpctrain-checkpoint/1"
KEEP = 2
SUBDIR = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
_MAX_HEADER = 1 << 20
# Options that may differ between a run and its resumption: they do not change the trajectory.
_MAY_CHANGE = {"out", "resume", "checkpoint_every", "checkpoint_dir", "max_bad_steps",
               "no_progress", "threads", "data_dir"}


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be used (truncated, checksum mismatch, bad format)."""


# ----------------------------------------------------------------------------------------------
# Files


def encode(payload, header: dict) -> bytes:
    """The bytes of a checkpoint file: ``header`` (plus checksum and length) and ``payload``."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    head = {**header, "format": FORMAT, "sha256": hashlib.sha256(body).hexdigest(),
            "bytes": len(body)}
    return json.dumps(head, sort_keys=True).encode() + b"\n" + body


def _parse_header(line: bytes, path: Path) -> dict:
    try:
        header = json.loads(line)
    except ValueError:
        raise CorruptCheckpoint(f"{path.name}: unreadable header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CorruptCheckpoint(f"{path.name}: not an {FORMAT} file")
    return header


def read_header(path: str | Path) -> dict:
    """The header of a checkpoint file, without reading or checking the payload."""
    path = Path(path)
    with open(path, "rb") as f:
        return _parse_header(f.readline(_MAX_HEADER), path)


def load(path: str | Path) -> tuple[dict, object]:
    """``(header, payload)`` of a checkpoint file; CorruptCheckpoint unless its checksum holds."""
    path = Path(path)
    blob = path.read_bytes()
    line, sep, body = blob.partition(b"\n")
    if not sep:
        raise CorruptCheckpoint(f"{path.name}: truncated header")
    header = _parse_header(line, path)
    if len(body) != header.get("bytes"):
        raise CorruptCheckpoint(f"{path.name}: {len(body)} payload bytes, header says "
                                f"{header.get('bytes')} (truncated?)")
    if hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise CorruptCheckpoint(f"{path.name}: checksum mismatch")
    try:
        payload = torch.load(io.BytesIO(body), weights_only=True)
    except Exception as e:  # a payload that hashes right but does not load: wrong writer
        raise CorruptCheckpoint(f"{path.name}: payload does not load ({e})") from None
    return header, payload


# ----------------------------------------------------------------------------------------------
# A folder of checkpoints


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
                ) -> tuple[Path, dict, dict, list[list[Snapshot]]] | None:
    """The newest usable checkpoint in ``folder``: ``(path, header, payload, snapshots)``,
    ``snapshots`` holding one list per rank that saved them (just rank 0 when they are shared).

    Each unusable one on the way is reported in one line, renamed ``*.corrupt`` (so that it
    leaves the rotation) and skipped. None if no checkpoint is usable.
    """
    folder = Path(folder)
    report = report or (lambda line: print(line, file=sys.stderr, flush=True))
    for path in listing(folder):
        try:
            header, payload = load(path)
            snapshots = [_load_snapshots(folder, refs) for refs in payload.get("snapshots", [])]
        except CorruptCheckpoint as e:
            report(f"hpctrain: checkpoint {folder / path.name} is unusable ({e}); "
                   "falling back to the previous one")
            path.rename(path.with_name(path.name + ".corrupt"))
            continue
        return path, header, payload, snapshots
    return None


# ----------------------------------------------------------------------------------------------
# Command line


def parse_every(text: str) -> str:
    """``--checkpoint-every``: ``N`` seconds or ``Ne`` epochs, N > 0 (returned normalised)."""
    value = str(text).strip()
    number = value[:-1] if value.endswith("e") else value
    try:
        amount = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither seconds (600) nor epochs (2e)") from None
    if not amount > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_arguments(p) -> None:
    """``--checkpoint-every`` (an option every run of a comparison may share)."""
    p.add_argument("--checkpoint-every", type=parse_every, default=None,
                   help="write a checkpoint every N seconds, or every N epochs with Ne (e.g. "
                   "1e); default: no checkpoints")


def add_run_arguments(p) -> None:
    """``--checkpoint-dir`` and ``--resume``: folders of one run."""
    p.add_argument("--checkpoint-dir", default=None,
                   help=f"folder for checkpoints (default <out>/{SUBDIR}, or with --resume the "
                   "folder resumed from)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run whose checkpoints are in DIR (a run's --out or its "
                   "checkpoint folder) from its newest valid checkpoint")


def resolve(folder: str | Path) -> Path:
    """The checkpoint folder meant by ``--resume DIR``: DIR itself or ``DIR/checkpoints``."""
    folder = Path(folder)
    return folder if listing(folder) or not listing(folder / SUBDIR) else folder / SUBDIR


def _jsonable(args: argparse.Namespace) -> dict:
    return json.loads(json.dumps(vars(args), default=str))


def validate(args: argparse.Namespace, supported: bool, ranks: int) -> None:
    """Check the checkpoint options before MPI starts; for ``--resume``, check that the newest
    checkpoint's run is this one (same algorithm, workers, options) and default ``--out`` to it.
    """
    wanted = args.checkpoint_every is not None or args.resume is not None
    if wanted and not supported:
        raise UsageError(f"--algo {args.algo} cannot checkpoint or resume yet")
    if args.resume is not None:
        if not Path(args.resume).is_dir():
            raise UsageError(f"--resume {args.resume}: no such folder")
        folder = resolve(args.resume)
        header = _newest_header(folder, args.resume)
        if header.get("algo") != args.algo or header.get("ranks") != ranks:
            raise UsageError(f"--resume {args.resume}: its checkpoint is of --algo "
                             f"{header.get('algo')} on {header.get('ranks')} ranks, not "
                             f"--algo {args.algo} on {ranks}")
        old, new = header.get("args", {}), _jsonable(args)
        for key in sorted(old.keys() & new.keys() - _MAY_CHANGE):
            if old[key] != new[key]:
                flag = "--" + key.replace("_", "-")
                raise UsageError(f"--resume {args.resume}: the run was started with {flag} "
                                 f"{old[key]}, not {new[key]}")
        if args.out is None:
            args.out = old.get("out")
        if args.checkpoint_dir is None:
            args.checkpoint_dir = str(folder)
        args.resume = str(folder)
    if args.resume is None and args.out is not None and listing(Path(args.out) / SUBDIR):
        raise UsageError(f"--out {args.out} holds the checkpoints of an unfinished run; "
                         f"continue it with --resume {args.out} or choose another folder")
    if args.checkpoint_every is not None and args.out is not None:
        folder = Path(args.checkpoint_dir or Path(args.out) / SUBDIR)
        if listing(folder) and (args.resume is None or
                                folder.resolve() != Path(args.resume).resolve()):
            raise UsageError(f"--checkpoint-dir {folder} holds another run's checkpoints; "
                             "resume it with --resume or choose another folder")


def _newest_header(folder: Path, given: str) -> dict:
    for path in listing(folder):
        try:
            return read_header(path)
        except (CorruptCheckpoint, OSError):
            continue
    raise UsageError(f"--resume {given}: no checkpoint found there")


# ----------------------------------------------------------------------------------------------
# Random-number state of one rank


def rng_state() -> dict:
    """This process's torch and numpy random-number states, as plain tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# In a training loop


def newest(folder: str | Path) -> tuple[Path, dict, dict, list[list[Snapshot]]]:
    """:func:`load_newest` for ``--resume``: UsageError when nothing in ``folder`` is usable."""
    found = load_newest(folder)
    if found is None:
        raise UsageError(f"--resume {folder}: no usable checkpoint (all failed their checksums)")
    return found


class Checkpointer:
    """Resuming and writing checkpoints from a training loop.

    ``shared`` objects (``state_dict``/``load_state_dict``) are the same on every rank and saved
    from rank 0; ``per_rank`` objects are gathered from every rank and each gets its own back,
    as do its counters and random-number state. Snapshots are rank 0's, given to every rank on
    resume, or with ``per_rank_snapshots`` each rank's own. With ``comm`` every rank calls
    :meth:`restore`, and :meth:`save` at the same update, collectively.

    ``--checkpoint-every Ne`` makes one due each time the update count passes a multiple of N
    epochs (``steps`` updates each); ``N`` seconds, when rank 0's clock says so (lock-step
    loops only: the verdict is a broadcast per step).
    """

    def __init__(self, args: argparse.Namespace, comm, steps: int, total_steps: int,
                 shared: dict, per_rank: dict | None = None, per_rank_snapshots: bool = False):
        self.comm, self.steps, self.total = comm, steps, total_steps
        self.snapshots_per_rank = per_rank_snapshots
        self.rank = comm.Get_rank() if comm is not None else 0
        self.workers = comm.Get_size() if comm is not None else 1
        self.shared, self.per_rank = shared, per_rank or {}
        self.resume_dir = args.resume
        self.header = {"algo": args.algo, "ranks": hcomm.env_size(), "workers": self.workers,
                       "args": _jsonable(args)}
        every = args.checkpoint_every
        self.enabled = every is not None
        self.folder = Path(args.checkpoint_dir or Path(args.out) / SUBDIR)
        self.by_progress = self.enabled and every.endswith("e")
        self.every = float(every[:-1] if self.by_progress else every) if self.enabled else 0.0
        self.interval = max(1, round(self.every * steps)) if self.by_progress else 0
        self.next_due = self.interval
        self.written = 0      # snapshots (of each rank) already in snapshots/
        self.refs: list[list[dict]] = []  # their files, per rank that saves them
        self.count, self.seconds = 0, 0.0
        self.resumed_from: list[int] = []
        self.last = time.perf_counter()
        self._request, self._flag = None, np.zeros(1, np.uint8)

    def restore(self, snapshots: list, found: tuple | None = None) -> dict:
        """With ``--resume``: load the newest valid checkpoint (``found``: what rank 0 already
        loaded with :func:`newest`) into the registered objects and ``snapshots``; return this
        rank's counters (``updates``, ``elapsed``, ...), else ``{}``."""
        if self.resume_dir is None:
            return {}
        common = parts = None
        if self.rank == 0:
            path, header, payload, restored = found or newest(self.resume_dir)
            common = (path, header, payload["shared"], payload["book"], payload["snapshots"],
                      None if self.snapshots_per_rank else restored[0])
            parts = [(payload["ranks"][r], restored[r] if self.snapshots_per_rank else None)
                     for r in range(self.workers)]
        if self.comm is not None:
            common = self.comm.bcast(common, root=0)
            mine, own = self.comm.scatter(parts, root=0)
        else:
            mine, own = parts[0]
        path, header, shared, book, self.refs, first = common
        for name, obj in self.shared.items():
            obj.load_state_dict(shared[name])
        for name, obj in self.per_rank.items():
            obj.load_state_dict(mine[name])
        set_rng_state(mine["rng"])
        snapshots[:] = own if self.snapshots_per_rank else first
        self.written = len(snapshots)
        self.count, self.seconds = book["checkpoints"], book["checkpoint_s"]
        self.resumed_from = [*book["resumed_from"], header["updates"]]
        self.next_due = (header["updates"] // self.interval + 1) * self.interval \
            if self.by_progress else 0
        if self.rank == 0:
            print(f"hpctrain: resuming from {path} (update {header['updates']})",
                  file=sys.stderr, flush=True)
        self.last = time.perf_counter()
        return mine["counters"]

    def step(self, updates: int, counters: dict, snapshots: list) -> bool:
        """After update ``updates`` of a lock-step loop: :meth:`save` if :meth:`due`."""
        if not self.due(updates):
            return False
        self.save(updates, counters, snapshots)
        return True

    def due(self, updates: int) -> bool:
        """Whether a checkpoint is due after update ``updates`` (collective in seconds mode)."""
        if not self.enabled:
            return False
        if self.by_progress:
            # Only marks within the run count: async workers stop at the total, so a mark past
            # it would keep some of them waiting at the checkpoint's barrier.
            return self.next_due <= self.total and updates >= self.next_due
        if self.comm is None or self.workers == 1:
            return time.perf_counter() - self.last >= self.every
        # Rank 0's clock decides; its verdict travels in a 1-byte Ibcast overlapped with the
        # next step, so all ranks checkpoint at the same update without a blocking message.
        due = False
        if self._request is not None:
            self._request.Wait()
            due = bool(self._flag[0])
            self._request = None
        if updates < self.total:  # the verdict for the next update (none after the last)
            late = time.perf_counter() - self.last >= self.every
            self._flag[0] = self.rank == 0 and late and not due
            self._request = self.comm.Ibcast(self._flag, root=0)
        return due

    def save(self, updates: int, counters: dict, snapshots: list) -> None:
        """Write the checkpoint of update ``updates`` (collective; rank 0 writes). ``counters``:
        this rank's plain numbers (``elapsed``, samples, ...), given back by restore."""
        start = time.perf_counter()
        mine = {name: obj.state_dict() for name, obj in self.per_rank.items()}
        mine["rng"] = rng_state()
        mine["counters"] = {**counters, "updates": updates}
        new = snapshots[self.written:] if self.snapshots_per_rank or self.rank == 0 else []
        self.written = len(snapshots)
        gathered = [(mine, new)]
        if self.comm is not None:
            gathered = self.comm.gather((mine, new), root=0)
        if self.rank == 0:
            self._write(updates, [m for m, _ in gathered],
                        [n for _, n in gathered] if self.snapshots_per_rank else [new])
        self.next_due = (updates // self.interval + 1) * self.interval if self.by_progress else 0
        self.count += 1
        self.seconds += time.perf_counter() - start
        self.last = time.perf_counter()

    def _write(self, updates: int, ranks: list[dict], fresh: list[list]) -> None:
        if not self.refs:
            self.refs = [[] for _ in fresh]
        (self.folder / "snapshots").mkdir(parents=True, exist_ok=True)
        for r, snaps in enumerate(fresh):
            for snap in snaps:
                rank = f"-r{r}" if self.snapshots_per_rank else ""
                name = f"snapshots/{len(self.refs[r]):06d}{rank}.pt"
                blob = encode(snap.state, {"info": snap.info})
                write_atomic(self.folder / name, blob, durable=True)
                self.refs[r].append({"file": name, "sha256": _header_of(blob)["sha256"],
                                     "info": snap.info})
        payload = {
            "shared": {name: obj.state_dict() for name, obj in self.shared.items()},
            "ranks": ranks,
            "snapshots": self.refs,
            "book": {"checkpoints": self.count + 1, "checkpoint_s": self.seconds,
                     "resumed_from": self.resumed_from},
        }
        header = {**self.header, "epoch": updates / self.steps}
        save(self.folder, updates, payload, header,
             midway=lambda: faults.during_checkpoint(self.rank, updates))

    def summary(self) -> dict:
        """Checkpoints written (over the whole run), seconds spent writing, resume points."""
        return {"checkpoints": self.count, "checkpoint_s": self.seconds,
                "resumed_from_updates": self.resumed_from}


def _header_of(blob: bytes) -> dict:
    return json.loads(blob.partition(b"\n")[0])
