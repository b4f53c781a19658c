"""The timeline: a Chrome-trace JSON of every collective's phases, as Horovod's.

``start_timeline(path)`` starts writing, on rank 0, the file Horovod writes with
``HOROVOD_TIMELINE``: a JSON array, one row (``pid``) per tensor name with a ``process_name``
record, and for each call the phases ``NEGOTIATE_<OP>`` (here: the agreement round of
collective_check), then ``<OP>`` enclosing ``MPI_<OP>`` (``TORCH_<OP>`` on the torch backend:
from posting the transport's operation until ``synchronize`` saw it finish), the last one
with the dtype and shape. ``DistributedOptimizer``'s fused gradients get a row per bucket
(``allreduce.DistributedOptimizer.bucket<k>``: from the launch, during backward, until the
step saw it done), with no negotiation of their own: the step's one agreement round for all
of them is on the row ``DistributedOptimizer.step``, and the two rounds of its construction
on ``DistributedOptimizer``, however many steps and optimizers (Horovod: a row per
gradient). ``init`` starts it when ``HOROVOD_TIMELINE`` names a file. Open it in
chrome://tracing or Perfetto.
``mark_cycles`` is accepted; there are no cycles to mark.
A write that fails (a full disk, a spent quota) stops the timeline as Horovod's writer does:
one line on stderr naming the file, and training goes on (only rank 0 writes, and an error
there would end it alone while the other ranks wait in a collective). The file keeps every
whole event: a complete JSON array where room is left for its closing ``]``, else cut after
its last whole event, which chrome://tracing and Perfetto read as they are.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

from hpctrain.errors import UsageError

_lock = threading.Lock()
_file: IO[str] | None = None
_path = ""  # the file _file writes
_t0 = 0.0
_rows: dict[str, int] = {}
_noname = itertools.count(1)


@dataclass
class Token:
    row: str
    kind: str
    wire: str
    start: float
    dtype: str
    shape: str


def active() -> bool:
    return _file is not None


def check_path(path: str, what: str = "HOROVOD_TIMELINE") -> None:
    """UsageError unless ``path`` can be written, checked on every rank before any
    collective (only rank 0 writes it, and would fail alone, mid-job). Tried, not asked
    (``os.access`` is wrong for root and with ACLs), and never by making and removing
    ``path`` itself: every rank checks at once, and one rank's removal took away the file
    rank 0 had just started."""
    try:
        if os.path.isdir(path):
            raise IsADirectoryError
        if os.path.exists(path):
            open(path, "a").close()  # changes nothing in it
        else:  # an unnamed probe file in its folder
            tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(path))).close()
    except OSError:
        raise UsageError(f"{what} {path}: cannot write a file there (a folder, or "
                         "in a folder that does not exist or is not writable)") from None


def start(path: str, mark_cycles: bool = False, rank: int = 0) -> None:
    """Start writing ``path`` (on rank 0; other ranks record nothing)."""
    global _file, _path, _t0
    stop()
    if rank != 0:
        return
    with _lock, _guarded():
        _path = path
        _file = open(path, "w")  # noqa: SIM115 (closed by stop())
        _file.write("[\n")
        _t0 = time.perf_counter()
        _rows.clear()
        _by_call.clear()
        _emit({"name": "process_name", "ph": "M", "pid": 0,
               "args": {"start_time_since_epoch_in_micros": int(time.time() * 1e6)}})


def stop() -> None:
    """Finish the file (a complete JSON array)."""
    global _file
    with _lock, _guarded():
        if _file is None:
            return
        _file.write("{}]\n")
        _file.close()  # a failure keeps _file, closed, for _give_up
        _file = None


@contextlib.contextmanager
def _guarded():
    """Under ``_lock``: a failed write or open (OSError) stops the timeline (:func:`_give_up`)
    instead of raising into the collective that recorded it."""
    try:
        yield
    except OSError as e:
        _give_up(e)


def _give_up(error: OSError) -> None:
    """Close the file, keep its whole events (:func:`_end_whole`) and say so in one line."""
    global _file
    f, _file = _file, None
    if f is None:  # it could not be opened
        kept = "no timeline is written"
    else:
        with contextlib.suppress(OSError):  # its flush fails again; the descriptor is closed
            f.close()
        try:
            kept = _end_whole(_path)
        except OSError as e:  # gone, or unreadable: nothing more to keep
            kept = f"nothing more could be kept ({e.strerror})"
    print(f"hpctrain: timeline {_path}: {error.strerror or error}; the timeline stops here, "
          f"{kept}", file=sys.stderr, flush=True)


def _end_whole(path: str) -> str:
    """Cut ``path`` after its last whole event (each is one line: JSON has no raw newline)
    and close the array where room is left (a truncate needs none); what it holds now."""
    fd = os.open(path, os.O_RDWR)
    try:
        end = os.fstat(fd).st_size
        while end > 0:
            chunk = os.pread(fd, min(end, 1 << 16), end - min(end, 1 << 16))
            if b"\n" in chunk:
                end = end - len(chunk) + chunk.rindex(b"\n") + 1
                break
            end -= len(chunk)
        os.ftruncate(fd, end)
        if end >= 4 and os.pread(fd, 4, end - 4) == b"{}]\n":  # its close alone failed
            return "the file keeps its events up to now, a complete JSON array"
        closing = b"{}]\n" if end else b"[]\n"
        try:
            if os.pwrite(fd, closing, end) == len(closing):
                os.fsync(fd)  # NFS may say a write failed only here (or at close)
                return "the file keeps its events up to now, a complete JSON array"
        except OSError:
            pass
        os.ftruncate(fd, end)  # not half a closing
        return ("the file is cut off after its last whole event, without the JSON array's "
                "closing ']' (chrome://tracing and Perfetto read it so)")
    finally:
        os.close(fd)


def _emit(event: dict) -> None:
    assert _file is not None
    _file.write(json.dumps(event) + ",\n")


def _us(t: float) -> int:
    return int((t - _t0) * 1e6)


# The row a call's negotiation went to, for its MPI phase: keyed by id, holding the call
# itself so that its id cannot be reused by another call while the entry is here.
_by_call: dict[int, tuple[Any, str]] = {}


def _row(call: Any) -> str:
    negotiated_call, row = _by_call.pop(id(call), (None, None))
    if negotiated_call is call and row in _rows:
        return row
    if call.row is not None:
        row = call.row
    else:
        name = call.name if call.name is not None else f"noname.{next(_noname)}"
        row = f"{call.kind}.{name}"
    if row not in _rows:
        _rows[row] = len(_rows) + 1
        _emit({"name": "process_name", "ph": "M", "pid": _rows[row], "args": {"name": row}})
        _emit({"name": "process_sort_index", "ph": "M", "pid": _rows[row],
               "args": {"sort_index": _rows[row]}})
    return row


def negotiated(call: Any, t0: float) -> None:
    """Record ``call``'s agreement round, from ``t0`` until now."""
    if _file is None:
        return
    with _lock, _guarded():
        if _file is None:
            return
        row = _row(call)
        if len(_by_call) > 1000:
            _by_call.clear()
        _by_call[id(call)] = (call, row)
        pid = _rows[row]
        phase = f"NEGOTIATE_{call.kind.upper()}"
        _emit({"ph": "B", "name": phase, "ts": _us(t0), "pid": pid})
        _emit({"ph": "E", "ts": _us(time.perf_counter()), "pid": pid})


def started(call: Any, wire: str = "MPI") -> Token | None:
    """Note that ``call``'s operation was posted on the ``wire`` transport; pass the token to
    :func:`finished`."""
    if _file is None:
        return None
    dtype = str(call.dtype).replace("torch.", "")
    shape = str(list(call.shape or ()))
    with _lock, _guarded():
        if _file is not None:
            return Token(_row(call), call.kind.upper(), wire, time.perf_counter(), dtype,
                         shape)
    return None


def finished(token: Token | None) -> None:
    if token is None or _file is None:
        return
    with _lock, _guarded():
        if _file is None or token.row not in _rows:
            return
        pid, end = _rows[token.row], _us(time.perf_counter())
        _emit({"ph": "B", "name": token.kind, "ts": _us(token.start), "pid": pid})
        _emit({"ph": "B", "name": f"{token.wire}_{token.kind}", "ts": _us(token.start),
               "pid": pid})
        _emit({"ph": "E", "ts": end, "pid": pid})
        _emit({"ph": "E", "ts": end, "pid": pid,
               "args": {"dtype": token.dtype, "shape": token.shape}})
