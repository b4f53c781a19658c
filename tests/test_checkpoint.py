"""Checkpoint files and folders: checksums, fallback, rotation, safe loading, killed writers."""

import hashlib
import io
import json
import multiprocessing
import os
import pickle
import random
import signal
import time

import numpy as np
import pytest
import torch

from hpctrain import checkpoint
from hpctrain.checkpoint import CorruptCheckpoint


def payload(i: int, numel: int = 1000) -> dict:
    return {"i": i, "w": torch.full((numel,), float(i)), "nested": [{"lr": 0.1}, (1, 2)]}


def write(folder, i: int, numel: int = 1000):
    return checkpoint.save(folder, i, payload(i, numel), {"algo": "sgd", "workers": 1})


def test_round_trip(tmp_path):
    path = write(tmp_path, 7)
    header, body = checkpoint.load(path)
    assert header["updates"] == 7 and header["algo"] == "sgd"
    assert body["i"] == 7 and torch.equal(body["w"], torch.full((1000,), 7.0))
    assert body["nested"] == [{"lr": 0.1}, (1, 2)]
    assert checkpoint.read_header(path) == header


def flip(path, offset: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x01
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("where", ["header", "payload start", "middle", "last byte"])
def test_flipped_byte_is_detected(tmp_path, where):
    path = write(tmp_path, 1)
    size, head = path.stat().st_size, path.read_bytes().index(b"\n")
    offset = {"header": head // 2, "payload start": head + 1, "middle": size // 2,
              "last byte": size - 1}[where]
    flip(path, offset)
    with pytest.raises(CorruptCheckpoint):
        checkpoint.load(path)


def test_truncated_file_is_detected(tmp_path):
    path = write(tmp_path, 1)
    for keep in (0, 10, path.stat().st_size - 1):
        blob = path.read_bytes()
        path.write_bytes(blob[:keep])
        with pytest.raises(CorruptCheckpoint):
            checkpoint.load(path)
        path.write_bytes(blob)


def test_corrupt_newest_falls_back_to_previous(tmp_path):
    write(tmp_path, 10)
    newest = write(tmp_path, 20)
    flip(newest, newest.stat().st_size // 2)
    lines = []
    path, header, body, snapshots = checkpoint.load_newest(tmp_path, lines.append)
    assert header["updates"] == 10 and body["i"] == 10 and snapshots == []
    assert len(lines) == 1 and "ckpt-000000020.pt" in lines[0] and "checksum" in lines[0]
    assert (tmp_path / "ckpt-000000020.pt.corrupt").exists()  # kept aside, out of rotation
    assert checkpoint.listing(tmp_path) == [path]


def test_nothing_usable(tmp_path):
    flip(write(tmp_path, 1), 100)
    assert checkpoint.load_newest(tmp_path, lambda line: None) is None


def test_keeps_the_last_two_and_removes_stale_temporaries(tmp_path):
    stale = tmp_path / ".ckpt-000000001.pt.abc.tmp"
    stale.write_bytes(b"half a checkpoint")
    for i in (1, 2, 3, 4):
        write(tmp_path, i)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-000000003.pt", "ckpt-000000004.pt"]


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_never_executes_code(tmp_path, monkeypatch):
    """A file whose checksum is right but whose payload would run code is refused."""
    monkeypatch.chdir(tmp_path)
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2), "x": Evil()}, buf)
    body = buf.getvalue()
    header = {"format": checkpoint.FORMAT, "sha256": hashlib.sha256(body).hexdigest(),
              "bytes": len(body), "updates": 1}
    path = tmp_path / "ckpt-000000001.pt"
    path.write_bytes(json.dumps(header).encode() + b"\n" + body)
    with pytest.raises(CorruptCheckpoint, match="does not load"):
        checkpoint.load(path)
    assert not (tmp_path / "pwned").exists()
    path.write_bytes(pickle.dumps(Evil()))  # a bare pickle is not even read
    with pytest.raises(CorruptCheckpoint):
        checkpoint.load(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("text, ok", [("600", "600"), ("2e", "2e"), ("0.5e", "0.5e"),
                                      ("0", None), ("-1e", None), ("e", None), ("10s", None)])
def test_parse_every(text, ok):
    import argparse

    if ok is None:
        with pytest.raises(argparse.ArgumentTypeError):
            checkpoint.parse_every(text)
    else:
        assert checkpoint.parse_every(text) == ok


def test_rng_state_round_trip(tmp_path):
    state = checkpoint.rng_state()
    path = checkpoint.save(tmp_path, 1, {"rng": state}, {})
    a = (torch.rand(3), np.random.rand(3))
    checkpoint.set_rng_state(checkpoint.load(path)[1]["rng"])  # through the file, weights-only
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def _writer(folder, first: int) -> None:
    # A forked child must not enter the OpenMP pool it inherited from a parent whose earlier
    # tests used several threads: it would hang there (libgomp is not fork-safe).
    torch.set_num_threads(1)
    i = first
    while True:  # as fast as it can: nearly every moment is inside a write
        write(folder, i, numel=1 << 20)
        i += 1


@pytest.mark.timeout(180)
def test_writer_killed_at_random_moments_never_loses_the_last_checkpoint(tmp_path):
    """SIGKILL a process writing 4 MB checkpoints in a loop, 40 times at random moments: the
    folder always holds a loadable checkpoint, never a corrupt one, and progress is kept."""
    rng = random.Random(1234)
    write(tmp_path, 0, numel=1 << 20)
    ctx = multiprocessing.get_context("fork")
    mid_write = 0
    newest = 0
    for _ in range(40):
        proc = ctx.Process(target=_writer, args=(tmp_path, newest + 1))
        proc.start()
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        mid_write += any(tmp_path.glob(".ckpt-*.tmp"))
        problems = []
        found = checkpoint.load_newest(tmp_path, problems.append)
        assert found is not None and not problems, problems
        _, header, body, _ = found
        assert body["i"] == header["updates"] >= newest
        assert torch.equal(body["w"], torch.full((1 << 20,), float(body["i"])))
        newest = header["updates"]
    assert mid_write >= 1  # the kills did land inside writes
    assert newest > 5  # and the writers made progress between them
    # Kills between a rename and the pruning leave extra old files; the next whole save prunes.
    write(tmp_path, newest + 1, numel=1 << 20)
    assert len(checkpoint.listing(tmp_path)) == checkpoint.KEEP
