"""What writing and reading a checkpoint file without whole-file copies saves.

    python scripts/bench_checkpoint_io.py [MIB] [FOLDER]

Rank 0 writes each checkpoint (and reads it on a resume) through ``checkpoint.format``.
Writing joined the JSON header line to ``torch.save``'s bytes (a copy of the payload; the
``BytesIO``'s ``getvalue()`` shares its buffer); reading read the whole file and split off
the payload (a copy). Now ``encode_parts`` hands ``write_atomic`` the header line and a view
of ``torch.save``'s buffer, and ``load`` reads the header line and then the payload once.
For a state dict of MIB MiB of float32 tensors (default 1024), in a fresh subprocess per
measurement, prints the seconds of writing one file (``torch.save``, checksum, write, fsync)
and of loading it (read, checksum, ``torch.load``), and the peak resident memory above the
payload's own (``VmHWM`` before and after): the code before (``encode_before`` and
``load_before``, the baseline, in the same run) and now, interleaved, best of 3. The files
go to FOLDER (default: a new folder in /dev/shm, so that the disk does not decide the
seconds); both ways' files must be the same bytes.
"""

import filecmp
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hpctrain.checkpoint import format as ckformat
from hpctrain.checkpoint.format import FORMAT, CorruptCheckpoint, encode_parts
from hpctrain.metrics import write_atomic

MIB = 2**20
WAYS = ("before", "now")
STEPS = ("write", "load")


def encode_before(payload: object, header: dict) -> bytes:
    """The baseline: ``format.encode`` before this change, verbatim."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    head = {**header, "format": FORMAT, "sha256": hashlib.sha256(body).hexdigest(),
            "bytes": len(body)}
    head["header_sha256"] = ckformat._header_digest(head)
    return json.dumps(head, sort_keys=True).encode() + b"\n" + body


def load_before(path: str | Path) -> tuple[dict, object]:
    """The baseline: ``format.load`` before this change, verbatim."""
    path = Path(path)
    blob = path.read_bytes()
    line, sep, body = blob.partition(b"\n")
    if not sep:
        raise CorruptCheckpoint(f"{path.name}: truncated header")
    header = ckformat._parse_header(line, path)
    if len(body) != header.get("bytes"):
        raise CorruptCheckpoint(f"{path.name}: {len(body)} payload bytes, header says "
                                f"{header.get('bytes')} (truncated?)")
    if hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise CorruptCheckpoint(f"{path.name}: checksum mismatch")
    try:
        payload = torch.load(io.BytesIO(body), weights_only=True, map_location="cpu")
    except Exception as e:  # a payload that hashes right but does not load: wrong writer
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().split("\n")[0]
        raise CorruptCheckpoint(f"{path.name}: payload does not load ({first})") from None
    return header, payload


def state_dict(mib: int) -> dict:
    """``mib`` MiB of float32 tensors, 64 MiB each (a large model's layers)."""
    sizes = [64] * (mib // 64) + ([mib % 64] if mib % 64 else [])
    return {f"layer{i}.weight": torch.full((size * MIB // 4,), float(i))
            for i, size in enumerate(sizes)}


def peak_mib() -> float:
    """This process's peak resident memory so far (``VmHWM``), in MiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def measure(step: str, way: str, mib: int, path: Path) -> dict:
    """In this (fresh) process: one ``step`` of ``way``'s code, its seconds and its peak
    memory above the payload's own."""
    header = {"algo": "sgd", "ranks": 1, "workers": 1, "updates": 1}
    if step == "write":
        payload = state_dict(mib)
        start_peak, start = peak_mib(), time.perf_counter()
        content = encode_before(payload, header) if way == "before" else \
            encode_parts(payload, header)[1]
        write_atomic(path, content, durable=True)
        seconds = time.perf_counter() - start
        del content
        extra = peak_mib() - start_peak  # the payload was resident before the start
    else:
        start_peak, start = peak_mib(), time.perf_counter()
        _, payload = (load_before if way == "before" else ckformat.load)(path)
        seconds = time.perf_counter() - start
        extra = peak_mib() - start_peak - mib  # the loaded payload is its own
        assert sum(t.numel() * 4 for t in payload.values()) == mib * MIB
    return {"seconds": seconds, "extra_mib": extra}


def run(step: str, way: str, mib: int, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", step, way, str(mib), str(path)],
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="bench-ckio-", dir=sys.argv[2] if len(sys.argv) > 2
                                   else shm if shm.is_dir() else None))
    best: dict = {}
    try:
        for _ in range(3):
            for step in STEPS:
                for way in WAYS:
                    got = run(step, way, mib, folder / f"{way}.pt")
                    for key, value in got.items():
                        best[step, way, key] = min(best.get((step, way, key), value), value)
        assert filecmp.cmp(folder / "before.pt", folder / "now.pt", shallow=False)
    finally:
        shutil.rmtree(folder)
    print(f"One checkpoint file of {mib} MiB of float32 tensors, a fresh process per "
          "measurement, best of 3; the files of both ways are the same bytes")
    print("| step | seconds before | seconds now | same-run ratio | MiB above the payload "
          "before | MiB above now | same-run ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for step in STEPS:
        (t0, m0), (t1, m1) = ((best[step, w, "seconds"], best[step, w, "extra_mib"])
                              for w in WAYS)
        print(f"| {step} | {t0:.2f} | {t1:.2f} | {t0 / t1:.1f} | {m0:.0f} | {m1:.0f} | "
              f"{m0 / max(m1, 1):.1f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        step, way, mib, path = sys.argv[2:6]
        print(json.dumps(measure(step, way, int(mib), Path(path))))
    else:
        main()
