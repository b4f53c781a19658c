"""The checkpoint file format: one line of JSON (the header), then a ``torch.save`` payload.

Kept apart from folders and training loops so that the bytes of a file, and the rules for
trusting them, are defined in one place: the header carries the payload's SHA-256 and length
and its own SHA-256, and the payload is only unpickled (``weights_only=True``, so no code
from the file runs) once all match. Everything else reads and writes checkpoints through
:func:`encode_parts` (or :func:`encode`, its bytes joined) and :func:`load`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from pathlib import Path
from typing import cast

import torch

from hpctrain.errors import UsageError

FORMAT = "hpctrain-checkpoint/2"  # /2: the header carries its own checksum too
_LEGACY = "hpctrain-checkpoint/1"  # read as before: the payload's checksum only
_TAG = re.compile(r"hpctrain-checkpoint/([0-9]+)")  # a format of hpctrain's, by its number
_MAX_HEADER = 1 << 20


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be used (truncated, checksum mismatch, bad format)."""


class NewerCheckpoint(UsageError):
    """A checkpoint file in a format a newer hpctrain writes: not corrupt, so never set aside
    as such (that sent a run back to an older checkpoint); this hpctrain cannot read it."""


def encode(payload: object, header: dict) -> bytes:
    """The bytes of a checkpoint file: ``header`` (plus checksum and length) and ``payload``."""
    return b"".join(encode_parts(payload, header)[1])


def encode_parts(payload: object, header: dict) -> tuple[dict, list[bytes | memoryview]]:
    """The header :func:`encode` writes, and the file's bytes as its two parts (the header
    line, then a view of ``torch.save``'s own buffer): :func:`~hpctrain.metrics.write_atomic`
    writes them one after another, without the copy of the whole payload that joining them
    into one ``bytes`` costs (rank 0's memory: twice a large model's size, not once)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getbuffer()
    head = {**header, "format": FORMAT, "sha256": hashlib.sha256(body).hexdigest(),
            "bytes": body.nbytes}
    head["header_sha256"] = _header_digest(head)
    return head, [json.dumps(head, sort_keys=True).encode() + b"\n", body]


def _header_digest(header: dict) -> str:
    """SHA-256 of ``header`` but its own checksum: one flipped digit in ``updates`` resumed
    a run at another position, training on samples it had seen (or skipping some)."""
    rest = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _parse_header(line: bytes, path: Path, kind: str = "checkpoint") -> dict:
    try:
        header = json.loads(line)
    except ValueError:
        raise CorruptCheckpoint(f"{path.name}: unreadable header") from None
    if isinstance(header, dict) and _newer(header):
        raise NewerCheckpoint(f"{kind} {path} is {header['format']}, written by a newer "
                              f"hpctrain: this one reads {_LEGACY} and /2 only; go on with "
                              "the hpctrain that wrote it")
    if not isinstance(header, dict) or header.get("format") not in (FORMAT, _LEGACY):
        raise CorruptCheckpoint(f"{path.name}: not an {FORMAT} file")
    if header["format"] == FORMAT and header.get("header_sha256") != _header_digest(header):
        raise CorruptCheckpoint(f"{path.name}: header checksum mismatch")
    # A legacy header has no checksum: a header edited by hand is checked here.
    for key, expected in _HEADER_TYPES.items():
        value = header.get(key)
        if key in header and (not isinstance(value, expected) or isinstance(value, bool)):
            raise CorruptCheckpoint(f"{path.name}: header field {key!r} is {value!r}, not "
                                    f"{_KIND_NAMES[expected]}")
    return header


def _newer(header: dict) -> bool:
    """Whether ``header`` is of a format of hpctrain's later than :data:`FORMAT`. Not so a
    tag that is not hpctrain's at all, nor a /2 header whose tag had a bit flipped (/2 to /3:
    its checksum is a /2 header's): both are corrupt files."""
    tag = header.get("format")
    found = _TAG.fullmatch(tag) if isinstance(tag, str) else None
    return (found is not None and int(found.group(1)) > int(FORMAT.rsplit("/", 1)[1])
            and header.get("header_sha256") != _header_digest({**header, "format": FORMAT}))


# What the header's fields must be where a file has them (a snapshot file has no "args").
_HEADER_TYPES = {"sha256": str, "bytes": int, "algo": str, "ranks": int, "workers": int,
                 "updates": int, "args": dict}
_KIND_NAMES = {str: "a string", int: "a whole number", dict: "a table"}


def read_header(path: str | Path, kind: str = "checkpoint") -> dict:
    """The header of a checkpoint file, without reading or checking the payload; ``kind``
    names the file in a NewerCheckpoint (``snapshot``: a snapshot file, of this format too)."""
    path = Path(path)
    line = _first_line(path)
    if not line.endswith(b"\n") and len(line) < _MAX_HEADER:  # as load() says it
        raise CorruptCheckpoint(f"{path.name}: truncated header")
    return _parse_header(line, path, kind)


def _first_line(path: Path) -> bytes:
    """``path``'s first line, up to ``_MAX_HEADER`` bytes, in reads of a page: a buffered
    open reads a block of the file system's size (megabytes on Lustre) for a header of a
    few hundred bytes, and a resume reads the header of every snapshot."""
    line = bytearray()
    with open(path, "rb", buffering=0) as f:
        while len(line) < _MAX_HEADER:
            chunk = f.read(min(4096, _MAX_HEADER - len(line)))
            end = chunk.find(b"\n") + 1
            line += chunk[:end] if end else chunk
            if end or not chunk:
                break
    return bytes(line)


def load(path: str | Path, kind: str = "checkpoint") -> tuple[dict, object]:
    """``(header, payload)`` of a checkpoint file; CorruptCheckpoint unless its checksum holds
    (``kind``: as :func:`read_header` takes it)."""
    path = Path(path)
    line, body = _read_parts(path)
    if not line.endswith(b"\n"):
        raise CorruptCheckpoint(f"{path.name}: truncated header")
    header = _parse_header(line, path, kind)
    if len(body) != header.get("bytes"):
        raise CorruptCheckpoint(f"{path.name}: {len(body)} payload bytes, header says "
                                f"{header.get('bytes')} (truncated?)")
    if hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise CorruptCheckpoint(f"{path.name}: checksum mismatch")
    try:  # BytesIO shares ``body`` (bytes): no copy
        payload = load_weights_only(io.BytesIO(body))
    except Exception as e:  # a payload that hashes right but does not load: wrong writer
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().split("\n")[0]  # torch's: lines
        raise CorruptCheckpoint(f"{path.name}: payload does not load ({first})") from None
    return header, payload


def load_weights_only(source) -> object:
    """``torch.load(source, weights_only=True)`` onto the CPU, no code from it run. torch
    2.1's weights-only loader warns "TypedStorage is deprecated" at every file, torch's own
    too (each resume and --init-from, once per rank): that warning alone is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated",
                                category=UserWarning)
        return torch.load(source, weights_only=True, map_location="cpu")


def _read_parts(path: Path) -> tuple[bytes, bytes]:
    """The first line of ``path`` (with its newline, if it has one) and the rest, each read
    once. The rest comes from the unbuffered file: a buffered ``read()`` after ``readline()``
    joins what it had buffered to it, a copy of the whole payload."""
    with open(path, "rb") as f:
        line = f.readline()
        raw = cast(io.FileIO, f.raw)  # open()'s binary file buffers a FileIO
        raw.seek(len(line))
        return line, raw.readall()
