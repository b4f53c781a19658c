"""Checkpoint files and folders: checksums, fallback, rotation, safe loading, killed writers;
the Loaded record, the checkpoint schedule and the resume checks."""

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import random
import resource
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, refusal, run_job

from hpctrain import arguments, checkpoint, cli, comm, launch_checks, options, run, watchdog
from hpctrain import config as configs
from hpctrain.checkpoint import CorruptCheckpoint, Resize, policy
from hpctrain.checkpoint import checkpointer as checkpointer_module
from hpctrain.errors import UsageError
from hpctrain.evaluate import Snapshots


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


def test_a_file_is_its_json_header_line_then_torch_saves_bytes(tmp_path):
    """Written from a view of torch.save's buffer (no copy of the payload) and read back with
    one read of the body, a file keeps the bytes it had when they were joined: the JSON header,
    a newline, torch.save's bytes. A header longer than a read buffer (8 KiB) included."""
    state, header = payload(3, numel=5000), {"algo": "sgd", "workers": 1,
                                            "args": {"note": "x" * 20000}}
    path = checkpoint.save(tmp_path, 3, state, header)
    buf = io.BytesIO()
    torch.save(state, buf)
    body = buf.getvalue()
    head = {**header, "updates": 3, "format": "hpctrain-checkpoint/2",
            "sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}
    head["header_sha256"] = hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()
    line = json.dumps(head, sort_keys=True).encode() + b"\n"
    assert len(line) > 20000 and path.read_bytes() == line + body
    assert checkpoint.format.encode(state, {**header, "updates": 3}) == line + body
    assert checkpoint.load(path)[0] == head and checkpoint.read_header(path) == head
    assert torch.equal(checkpoint.load(path)[1]["w"], state["w"])


def test_write_atomic_writes_chunks_in_order_with_midway_at_half_their_bytes(tmp_path):
    from hpctrain.metrics import _halves, write_atomic
    chunks = [b"ab", memoryview(b"cdef"), bytearray(b"ghij"), torch.arange(3).numpy()]
    write_atomic(tmp_path / "f", chunks)
    joined = b"abcdefghij" + torch.arange(3).numpy().tobytes()
    assert (tmp_path / "f").read_bytes() == joined
    first, second = _halves(chunks)
    assert b"".join(first) == joined[:17] and b"".join(second) == joined[17:]
    assert [b"".join(half) for half in _halves("abc")] == [b"a", b"bc"]  # as before: text


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
    said = "header checksum mismatch" if where == "header" else "checksum mismatch"  # sha256's
    with pytest.raises(CorruptCheckpoint, match=f"^{path.name}: {said}$"):
        checkpoint.load(path)


def test_a_flipped_digit_in_the_headers_position_is_detected(tmp_path):
    """The checksum covered the payload only: "updates": 32 flipped to 22 (one bit) resumed
    the run at update 22, on samples it had trained on."""
    path = write(tmp_path, 32)
    blob = path.read_bytes()
    flip(path, blob.index(b'"updates": 32') + len(b'"updates": '))
    assert b'"updates": 22' in path.read_bytes()
    for read in (checkpoint.read_header, checkpoint.load):
        with pytest.raises(CorruptCheckpoint, match=r"^ckpt-000000032\.pt: header checksum "
                                                    "mismatch$"):
            read(path)


def test_a_legacy_checkpoint_without_a_header_checksum_is_read(tmp_path):
    """hpctrain-checkpoint/1 files (written before the header had a checksum of its own)."""
    path = write(tmp_path, 7)
    legacy(path)
    assert checkpoint.load(path)[0]["updates"] == 7


def legacy(path, **fields) -> None:
    """``path`` rewritten as an hpctrain-checkpoint/1 file, ``fields`` changed in its header."""
    line, _, body = path.read_bytes().partition(b"\n")
    header = {k: v for k, v in json.loads(line).items() if k != "header_sha256"}
    header.update(format="hpctrain-checkpoint/1", **fields)
    path.write_bytes(json.dumps(header).encode() + b"\n" + body)


def reformatted(path, tag: str) -> None:
    """``path``'s header with format ``tag``, its own checksum recomputed (a valid file of a
    format this hpctrain does not write)."""
    line, _, body = path.read_bytes().partition(b"\n")
    header = {**json.loads(line), "format": tag}
    header["header_sha256"] = checkpoint.format._header_digest(header)
    path.write_bytes(json.dumps(header).encode() + b"\n" + body)


def test_a_checkpoint_a_newer_hpctrain_wrote_is_refused_and_left_alone(tmp_path):
    """hpctrain-checkpoint/3 was "not an hpctrain-checkpoint/2 file": renamed *.corrupt, and
    the run went back to the checkpoint before it without a word; with all of them /3, "none
    can be read ... put back a good copy" (they were newer, not bad). Now one line, before MPI,
    the folder as it was; a tag that is not hpctrain's at all is still a corrupt file's."""
    write(tmp_path, 10)
    newest = write(tmp_path, 20)
    reformatted(newest, "hpctrain-checkpoint/3")
    said = (f"checkpoint {newest} is hpctrain-checkpoint/3, written by a newer hpctrain: this "
            "one reads hpctrain-checkpoint/1 and /2 only; go on with the hpctrain that wrote it")
    before = sorted(os.listdir(tmp_path))
    for read in (checkpoint.read_header, checkpoint.load, checkpoint.load_newest):
        with pytest.raises(checkpoint.NewerCheckpoint) as e:
            read(newest if read is not checkpoint.load_newest else tmp_path)
        assert str(e.value) == said and isinstance(e.value, UsageError)  # exit 2
    with pytest.raises(UsageError) as e:
        check(resume=str(tmp_path))
    assert str(e.value) == said
    assert sorted(os.listdir(tmp_path)) == before  # nothing renamed
    for tag in ("hpctrain-checkpoint/x", "hpctrain-checkpoint/0", "other-format/3"):
        reformatted(newest, tag)
        with pytest.raises(CorruptCheckpoint, match="not an hpctrain-checkpoint/2 file"):
            checkpoint.read_header(newest)
    reformatted(newest, "hpctrain-checkpoint/2")  # /2 flipped to /3 by one bit: corrupt
    flip(newest, newest.read_bytes().index(b"checkpoint/2") + len(b"checkpoint/"))
    with pytest.raises(CorruptCheckpoint, match="not an hpctrain-checkpoint/2 file"):
        checkpoint.read_header(newest)


def test_a_snapshot_a_newer_hpctrain_wrote_is_refused_before_mpi(tmp_path):
    """The launch checks read the checkpoint's header only: a snapshot in a newer format
    was found by rank 0 once MPI ran, the job ended there, and called the file a
    checkpoint. Now one line naming it, before MPI, the folder as it was; whether the
    checkpoint lists it or not (written after it: the resume would write over it)."""
    ckpt, snapshots = sgd_checkpointer(tmp_path), Snapshots()
    for updates in range(3):
        snapshots.take(ckpt.shared["model"], updates=updates)
    ckpt.save(10, {}, snapshots)
    resume = {"resume": str(tmp_path), "ranks": 1, "run_config": {}}
    assert check(**resume).resume == str(tmp_path)  # as written: goes on
    listed = tmp_path / "snapshots" / "000001.pt"
    reformatted(listed, "hpctrain-checkpoint/3")
    said = (f"snapshot {listed} is hpctrain-checkpoint/3, written by a newer hpctrain: this "
            "one reads hpctrain-checkpoint/1 and /2 only; go on with the hpctrain that wrote it")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    with pytest.raises(checkpoint.NewerCheckpoint) as e:
        check(**resume)
    assert str(e.value) == said and isinstance(e.value, UsageError)  # exit 2
    with pytest.raises(checkpoint.NewerCheckpoint) as e:  # rank 0's read, as MPI runs
        checkpoint.load_newest(tmp_path)
    assert str(e.value) == said
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before
    reformatted(listed, "hpctrain-checkpoint/2")
    unlisted = tmp_path / "snapshots" / "000003.pt"
    shutil.copy(listed, unlisted)
    reformatted(unlisted, "hpctrain-checkpoint/4")
    with pytest.raises(checkpoint.NewerCheckpoint, match=f"^snapshot {unlisted} is "):
        check(**resume)
    unlisted.unlink()
    flip(listed, listed.read_bytes().index(b"checkpoint/2") + len(b"checkpoint/"))  # /3
    assert check(**resume).resume == str(tmp_path)  # corrupt: load_newest leaves it out


def test_truncated_file_is_detected(tmp_path):
    path = write(tmp_path, 1)
    size, body = path.stat().st_size, path.stat().st_size - path.read_bytes().index(b"\n") - 1
    for keep in (0, 10, size - 1):
        blob = path.read_bytes()
        path.write_bytes(blob[:keep])
        said = ("truncated header" if keep < size - 1 else  # the payload's length, then:
                rf"{body - 1} payload bytes, header says {body} \(truncated\?\)")
        with pytest.raises(CorruptCheckpoint, match=f"^{path.name}: {said}$"):
            checkpoint.load(path)
        path.write_bytes(blob)


def test_corrupt_newest_falls_back_to_previous(tmp_path):
    write(tmp_path, 10)
    newest = write(tmp_path, 20)
    flip(newest, newest.stat().st_size // 2)
    lines = []
    found = checkpoint.load_newest(tmp_path, lines.append)
    assert found.header["updates"] == 10 and found.payload["i"] == 10 and found.snapshots == []
    assert len(lines) == 1 and "ckpt-000000020.pt" in lines[0] and "checksum" in lines[0]
    assert (tmp_path / "ckpt-000000020.pt.corrupt").exists()  # kept aside, out of rotation
    assert checkpoint.listing(tmp_path) == [found.path]


def test_a_corrupt_checkpoint_that_cannot_be_set_aside_is_left_and_passed(tmp_path):
    """A read-only copy resumed with --out elsewhere: renaming the corrupt newest one raised,
    and the run ended though the previous one was good. (Here the name it would take is a
    folder already; a read-only mount refuses the rename the same way.)"""
    write(tmp_path, 10)
    newest = write(tmp_path, 20)
    flip(newest, newest.stat().st_size // 2)
    (tmp_path / "ckpt-000000020.pt.corrupt" / "x").mkdir(parents=True)
    lines = []
    found = checkpoint.load_newest(tmp_path, lines.append)
    assert found is not None and found.header["updates"] == 10
    assert len(lines) == 2 and "falling back to the previous one" in lines[0]
    assert "ckpt-000000020.pt is left in place" in lines[1]
    assert newest.exists()


def test_nothing_usable(tmp_path):
    flip(write(tmp_path, 1), 100)
    lines = []
    assert checkpoint.load_newest(tmp_path, lines.append) is None
    assert lines[0].endswith("checksum mismatch); no older one is left")  # not "falling back"


def test_a_checkpoint_that_cannot_be_read_is_refused_not_set_aside(tmp_path):
    """An I/O error (here a symlink loop; permissions as another user) may pass: the file
    stays in the rotation, where renaming it *.corrupt took it out for good."""
    write(tmp_path, 1)
    loop = tmp_path / "ckpt-000000002.pt"
    loop.symlink_to(loop)
    with pytest.raises(UsageError, match=r"^cannot read checkpoint file .*ckpt-000000002\.pt: "
                                         "Too many levels of symbolic links$"):
        checkpoint.load_newest(tmp_path)
    assert checkpoint.listing(tmp_path)[0] == loop and not list(tmp_path.glob("*.corrupt"))


def test_a_payload_that_does_not_load_is_named_in_one_line(tmp_path):
    path = write(tmp_path, 1)
    header, _ = checkpoint.load(path)
    body = pickle.dumps(Evil(), protocol=2)  # hashes right; weights_only refuses it at length
    header.update(bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
    header["header_sha256"] = checkpoint.format._header_digest(header)
    path.write_bytes(json.dumps(header).encode() + b"\n" + body)
    with pytest.raises(CorruptCheckpoint, match="payload does not load") as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)


def test_keeps_the_last_two_and_removes_stale_temporaries(tmp_path):
    stale = tmp_path / ".ckpt-000000001.pt.abc.tmp"
    stale.write_bytes(b"half a checkpoint")
    for i in (1, 2, 3, 4):
        write(tmp_path, i)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-000000003.pt", "ckpt-000000004.pt"]


def test_checkpoints_are_ordered_by_their_number_not_their_name(tmp_path):
    """Past 999,999,999 updates the name has ten digits: "ckpt-1000000000.pt" sorts before
    "ckpt-999999999.pt" as text, and the pruning would delete the newest."""
    write(tmp_path, 999_999_999)
    newest = write(tmp_path, 1_000_000_000)
    assert checkpoint.listing(tmp_path)[0] == newest
    write(tmp_path, 1_000_000_001)
    assert [checkpoint.folder.number(p) for p in checkpoint.listing(tmp_path)] == [
        1_000_000_001, 1_000_000_000]


def test_a_save_retires_every_file_it_is_given_but_the_one_it_wrote(tmp_path):
    """A resized run's first checkpoint retires the old run's (whose numbers would outrank
    it): all of them, and not the file just written when it has the same name."""
    old = [write(tmp_path, 7), write(tmp_path, 9), tmp_path / "ckpt-000000005.pt"]
    kept = checkpoint.save(tmp_path, 5, payload(5), {"algo": "sgd"}, retire=old)
    assert checkpoint.listing(tmp_path) == [kept] and kept.name == "ckpt-000000005.pt"


def test_a_refused_write_names_the_file_and_keeps_the_one_before(tmp_path):
    """The kernel refuses the write (a file-size limit here, as a full disk or a quota would):
    the error names the checkpoint, the one before is untouched, no temporary file is left,
    not even a killed writer's, which is removed before the write, not after."""
    first = write(tmp_path, 1)
    kept = first.read_bytes()
    (tmp_path / ".ckpt-000000002.pt.x1y2z3.tmp").write_bytes(b"left by a killed writer")
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN  # Python's own: EFBIG, no signal
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(kept) + 4096, hard))
    try:
        with pytest.raises(OSError) as refused:
            write(tmp_path, 2, numel=10 * len(kept))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert refused.value.errno == errno.EFBIG
    assert str(refused.value).endswith(f"File too large: '{tmp_path / 'ckpt-000000002.pt'}'")
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
    assert first.read_bytes() == kept


def test_a_runs_final_files_are_fsynced_into_their_folder(tmp_path, monkeypatch):
    """model.pt and summary.json say a run finished: their renames are made durable too, as a
    checkpoint's are (the folder fsynced), so a power cut cannot undo them."""
    from hpctrain.metrics import RunLog
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    log = RunLog(tmp_path / "run")
    folder = (tmp_path / "run").stat().st_ino
    log.write_points([{"t": 0.0, "epoch": 1, "test_acc": 0.5}])
    assert folder not in synced  # rewritten every epoch: the file only
    log.save_model(torch.nn.Linear(2, 2))
    assert synced.count(folder) == 1
    log.write_summary({"ok": True})
    assert synced.count(folder) == 2


def test_a_run_removes_the_half_written_outputs_an_earlier_attempt_left(tmp_path):
    """A run killed while writing model.pt (or ec's ensemble.pt) left its temporary file in
    --out for good, the checkpoints' clean-up seeing only checkpoints/: half a model, GBs for
    a large one. The next run's rank 0 removes them; no other file goes."""
    import subprocess
    import sys

    from hpctrain.metrics import RunLog, write_atomic
    run = tmp_path / "run"
    run.mkdir()
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\nfrom hpctrain.metrics import write_atomic\n"
        "kill = lambda: os.kill(os.getpid(), signal.SIGKILL)\n"
        "for name in ('model.pt', 'ensemble.pt'):\n"
        "    if os.fork() == 0:\n"
        "        write_atomic(sys.argv[1] + '/' + name, bytes(4096), midway=kill)\n"
        "    os.wait()\n"), str(run)], timeout=60)
    assert killed.returncode == 0
    left = sorted(p.name for p in run.iterdir())
    assert len(left) == 2 and all(p.endswith(".tmp") for p in left), left
    kept = [".hpctrain.lock", "notes.tmp", ".model.pt.tmp", "summary.json"]
    for name in kept:
        (run / name).write_text("mine")
    (run / "checkpoints").mkdir()  # another folder's: its writer's clean-up
    write_atomic(run / "checkpoints" / "ckpt.pt", b"x")
    RunLog(run, rank=1)  # only rank 0 writes the outputs
    assert len(list(run.glob(".*.*.tmp"))) == 3
    RunLog(run)
    assert sorted(p.name for p in run.iterdir()) == sorted([*kept, "checkpoints"])


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
    header["header_sha256"] = checkpoint.format._header_digest(header)
    path = tmp_path / "ckpt-000000001.pt"
    path.write_bytes(json.dumps(header).encode() + b"\n" + body)
    with pytest.raises(CorruptCheckpoint, match="does not load"):
        checkpoint.load(path)
    assert not (tmp_path / "pwned").exists()
    path.write_bytes(pickle.dumps(Evil()))  # a bare pickle is not even read: no header line
    with pytest.raises(CorruptCheckpoint, match=f"^{path.name}: truncated header$"):
        checkpoint.load(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("text, ok", [("600", "600"), ("2e", "2e"), ("0.5e", "0.5e"),
                                      ("off", "off"),
                                      ("0", None), ("-1e", None), ("e", None), ("10s", None),
                                      ("infe", None), ("1e400e", None), ("nan", None),
                                      ("2ee", None)])  # one "e" is taken off, not all
def test_parse_every(text, ok):
    import argparse

    if ok is None:
        with pytest.raises(argparse.ArgumentTypeError):
            checkpoint.parse_every(text)
    else:
        assert checkpoint.parse_every(text) == ok


def test_rng_state_round_trip(tmp_path):
    """Python's random too: a user's model or data code drawing from it went on from another
    state after a resume."""
    random.gauss(0, 1)  # a cached second normal in the state
    state = checkpoint.rng_state()
    path = checkpoint.save(tmp_path, 1, {"rng": state}, {})
    a = (torch.rand(3), np.random.rand(3), [random.random(), random.gauss(0, 1)])
    checkpoint.set_rng_state(checkpoint.load(path)[1]["rng"])  # through the file, weights-only
    b = (torch.rand(3), np.random.rand(3), [random.random(), random.gauss(0, 1)])
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    older = {k: v for k, v in state.items() if k != "python"}  # a checkpoint from before
    checkpoint.set_rng_state(older)
    assert torch.equal(torch.rand(3), a[0])


def test_every_parses_the_normalised_text():
    assert checkpoint.Every.parse(" 2e ") == checkpoint.Every(by_progress=True, amount=2.0)
    assert checkpoint.Every.parse("600") == checkpoint.Every(by_progress=False, amount=600.0)
    assert checkpoint.Every.parse("0.3e").interval_updates(100) == 30
    assert checkpoint.Every.parse("0.001e").interval_updates(100) == 1  # at least one update
    assert checkpoint.Every.parse("0.29e").interval_updates(10) == 3  # rounded, not cut to 2
    with pytest.raises(ValueError, match="^--checkpoint-every off is no interval$"):
        checkpoint.Every.parse("off")
    with pytest.raises(ValueError, match="^every 600 seconds is no number of updates$"):
        checkpoint.Every.parse("600").interval_updates(100)  # seconds are no update count


def test_loaded_fields(tmp_path):
    """A Checkpointer's checkpoint (with snapshot files) reads back as a Loaded, and restores."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    snapshots = Snapshots()
    snapshots.take(model, updates=0)
    config = {"lr": 0.1, "out": str(tmp_path)}
    ckpt = checkpoint.Checkpointer(None, 10, 40, shared={"model": model}, every="1e",
                                   folder=tmp_path / "ckpts", resume=None,
                                   header={"algo": "sgd", "ranks": 1, "args": config})
    assert [ckpt.due(u) for u in (9, 10)] == [False, True]
    ckpt.save(10, {"elapsed": 1.5}, snapshots)
    assert not ckpt.due(11)

    found = checkpoint.load_newest(tmp_path / "ckpts")
    assert isinstance(found, checkpoint.Loaded)
    assert found.path == tmp_path / "ckpts" / "ckpt-000000010.pt"
    assert found.header == {**checkpoint.read_header(found.path), "algo": "sgd", "ranks": 1,
                            "workers": 1, "args": config, "updates": 10, "epoch": 1.0}
    assert sorted(found.payload) == ["book", "ranks", "shared", "snapshots"]
    assert torch.equal(found.payload["shared"]["model"]["weight"], model.weight)
    assert found.payload["ranks"][0]["counters"] == {"elapsed": 1.5, "updates": 10}
    assert [[s.info for s in rank] for rank in found.snapshots] == [[{"updates": 0}]]
    assert torch.equal(found.snapshots[0][0].state["bias"], model.bias)
    again = checkpoint.newest(tmp_path / "ckpts")
    assert (again.path, again.header) == (found.path, found.header)
    with pytest.raises(dataclasses.FrozenInstanceError):
        found.path = tmp_path

    fresh = torch.nn.Linear(3, 2)
    back = Snapshots()
    resumed = checkpoint.Checkpointer(None, 10, 40, shared={"model": fresh}, every="1e",
                                      folder=tmp_path / "ckpts", resume=str(tmp_path / "ckpts"),
                                      header={"algo": "sgd", "ranks": 1, "args": config})
    assert resumed.restore(back, found) == {"elapsed": 1.5, "updates": 10}
    # The wall clock goes on: the first attempt's start kept, this one's from 1.5 s trained
    assert resumed.clock.attempts[0] == ckpt.clock.attempts[0]
    assert resumed.clock.attempts[1][0] == 1.5 and len(resumed.clock.attempts) == 2
    assert torch.equal(fresh.weight, model.weight) and [s.info for s in back] == [{"updates": 0}]
    assert resumed.next_due == 20 and resumed.summary()["resumed_from_updates"] == [10]
    quiet = checkpoint.Checkpointer(None, 10, 40, shared={"model": torch.nn.Linear(3, 2)},
                                    every="off", folder=tmp_path / "ckpts",
                                    resume=str(tmp_path / "ckpts"), header={"algo": "sgd"})
    assert quiet.restore(Snapshots(), found) == {"elapsed": 1.5, "updates": 10}
    assert not quiet.enabled and not any(quiet.due(u) for u in range(10, 41))


def test_a_run_resumed_into_another_checkpoint_dir_carries_its_snapshots(tmp_path):
    """--resume A --checkpoint-dir B: B's checkpoints listed A's snapshot files, which B did
    not have; every checkpoint the resumed run wrote was unusable."""
    model, snapshots = torch.nn.Linear(3, 2), Snapshots()
    snapshots.take(model, updates=0)
    header = {"algo": "sgd", "ranks": 1, "args": {}}
    first = checkpoint.Checkpointer(None, 10, 40, shared={"model": model}, every="1e",
                                    folder=tmp_path / "a", resume=None, header=header)
    first.save(10, {}, snapshots)
    back = Snapshots()
    resumed = checkpoint.Checkpointer(None, 10, 40, shared={"model": model}, every="1e",
                                      folder=tmp_path / "b", resume=str(tmp_path / "a"),
                                      header=header)
    resumed.restore(back)
    back.take(model, updates=20)
    resumed.save(20, {}, back)
    found = checkpoint.newest(tmp_path / "b")
    assert found.header["updates"] == 20
    assert [s.info["updates"] for s in found.snapshots[0]] == [0, 20]


def test_a_checkpoint_without_its_snapshots_says_so_in_one_line(tmp_path):
    """Copied without snapshots/: one line per snapshot (97 of them), at every resume."""
    ckpt, snapshots = sgd_checkpointer(tmp_path), Snapshots()
    for updates in range(3):
        snapshots.take(ckpt.shared["model"], updates=updates)
    ckpt.save(10, {}, snapshots)
    shutil.rmtree(tmp_path / "snapshots")
    lines = []
    found = checkpoint.load_newest(tmp_path, lines.append)
    assert found.header["updates"] == 10 and found.snapshots == [[]]
    assert lines == [f"hpctrain: 3 snapshots in {tmp_path / 'snapshots'} are unusable "
                     "(000000.pt: No such file or directory (update 0); 000001.pt: No such file "
                     "or directory (update 1); 000002.pt: No such file or directory (update 2)); "
                     "the run's curve leaves out their points"]


@pytest.mark.parametrize("every", ["1e", "600"])
def test_sigusr1_makes_a_checkpoint_due_at_the_next_update_and_stops(tmp_path, every):
    """Only where the loop asked for it; its handler is put back after the loop."""
    def checkpointer(stop_on_signal: bool) -> checkpoint.Checkpointer:
        return checkpoint.Checkpointer(None, 10, 40, shared={}, every=every,
                                       folder=tmp_path, resume=None, stop_on_signal=stop_on_signal,
                                       header={"algo": "sgd", "ranks": 1, "args": {}})

    before = signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # as in a fresh process
    try:
        checkpointer(stop_on_signal=False)  # asynchronous loops: no handler
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
        ckpt = checkpointer(stop_on_signal=True)
        assert not ckpt.due(3) and not ckpt.stopping
        os.kill(os.getpid(), signal.SIGUSR1)
        assert ckpt.due(4) and ckpt.stopping
        stopped = ckpt.stopped(4)
        assert (stopped.updates, stopped.total) == (4, 40)
        assert str(stopped) == (f"stopped by SIGUSR1 after the checkpoint of update 4 of 40 "
                                f"in {tmp_path}; continue with --resume")
        ckpt.close()
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, before)


def a_run(folder, algo="sgd", ranks=2, **config) -> None:
    """A run's checkpoint in ``folder``, as a Checkpointer writes its header."""
    args = {"lr": 0.1, "batch_size": 64, "optimizer": "sgd", **config}
    checkpoint.save(folder, 5, {"x": 1}, {"algo": algo, "ranks": ranks, "workers": ranks,
                                          "args": args})


def check(**given) -> checkpoint.Resolved:
    values = {"algo": "sgd", "ranks": 2, "every": None, "checkpoint_dir": None, "resume": None,
              "out": None, "run_config": {"lr": 0.1, "batch_size": 64},
              "may_change": checkpoint.MAY_CHANGE, **given}
    return checkpoint.check(**values)


def test_check_resume_of_a_missing_or_empty_folder(tmp_path):
    with pytest.raises(UsageError, match=r"^--resume .*/gone: no such folder$"):
        check(resume=str(tmp_path / "gone"))
    with pytest.raises(UsageError, match=r"^--resume .*: no checkpoint found there$"):
        check(resume=str(tmp_path))
    # A checkpoint file itself was "no such folder", as if it were not there.
    a_run(tmp_path / "run")
    file = checkpoint.listing(tmp_path / "run")[0]
    with pytest.raises(UsageError) as e:
        check(resume=str(file))
    assert str(e.value) == (f"--resume {file}: is a file; give the folder that holds it "
                            f"({tmp_path / 'run'}): --resume takes its newest valid checkpoint")


@pytest.mark.parametrize("algo, ranks, resize, said", [
    ("ssgd", 2, False, "--algo sgd, not --algo ssgd"),
    ("ssgd", 1, True, "--algo sgd, not --algo ssgd"),  # the ranks are no problem: resizable
    ("sgd", 4, False, "2 ranks, not 4, and this run cannot be resized"),
    ("ssgd", 1, False, "--algo sgd on 2 ranks, not --algo ssgd on 1, and this run cannot be "
                       "resized")])
def test_check_resume_of_another_algorithm_or_ranks(tmp_path, algo, ranks, resize, said):
    a_run(tmp_path / "run" / "checkpoints")
    with pytest.raises(UsageError) as e:
        check(resume=str(tmp_path / "run"), algo=algo, ranks=ranks, resize=resize)
    assert str(e.value) == f"--resume {tmp_path / 'run'}: its checkpoint is of {said}"


def test_a_resume_with_another_algorithm_names_only_the_algorithm(tmp_path):
    """A user trial: --algo dcasgd-a resuming a 2-rank ma run on one process said "of --algo
    ma on 2 ranks, not --algo dcasgd-a on 1", as if the ranks were refused too; train
    resizes, so only the algorithm is."""
    a_run(tmp_path, algo="ma", ranks=2, dataset="synthetic")
    assert refusal(["--algo", "dcasgd-a", "--dataset", "synthetic", "--resume",
                    str(tmp_path)]) == (
        f"--resume {tmp_path}: its checkpoint is of --algo ma, not --algo dcasgd-a")


def test_a_resized_resume_may_name_other_stragglers(tmp_path):
    """--slowdown names workers: a 3-rank run's 2:1.5 was refused on 2 ranks ("not a
    worker"), and so was 1:1.5 or none ("started with --slowdown 2:1.5"): no resume at all."""
    a_run(tmp_path, ranks=3, slowdown="2:1.5")
    config = {"lr": 0.1, "batch_size": 64}
    for slowdown in ("1:1.5", None):
        check(resume=str(tmp_path), ranks=2, resize=True,
              run_config={**config, "slowdown": slowdown})
    with pytest.raises(UsageError, match=r"started with --slowdown 2:1.5, not 1:1.5$"):
        check(resume=str(tmp_path), ranks=3, run_config={**config, "slowdown": "1:1.5"})


@pytest.mark.timeout(120)
def test_a_finished_run_requeued_on_other_ranks_may_name_other_stragglers(tmp_path,
                                                                         monkeypatch):
    """--resume auto on a finished run compares its options as a resume does: on another
    number of ranks --slowdown may differ (it was refused there only)."""
    out = tmp_path / "run"
    train = ["train", "--algo", "sgd", "--dataset", "synthetic", "--model", "mlp", "--epochs",
             "1", "--no-progress", "--out", str(out), "--resume", "auto"]
    assert run_job([*train, "--slowdown", "0:1.5"], np=0).returncode == 0
    config = arguments.build(cli.build_parser().parse_args(train))
    monkeypatch.setattr(comm, "launch_size", lambda: 2)  # two workers now, one then
    assert launch_checks.finished_run(config)["workers"] == 1  # finished: nothing to train
    monkeypatch.setattr(comm, "launch_size", lambda: 1)
    with pytest.raises(UsageError, match="started with --slowdown 0:1.5, not without it"), \
            options.command_line():  # as `hpctrain train` checks it
        launch_checks.finished_run(config)


def test_check_resume_with_a_changed_option(tmp_path):
    a_run(tmp_path, threads=4)
    config = {"lr": 0.1, "batch_size": 128, "threads": 8, "new_option": 1}
    with pytest.raises(UsageError) as e:
        check(resume=str(tmp_path), run_config=config)
    assert str(e.value) == (f"--resume {tmp_path}: the run was started with --batch-size 64, "
                            "not 128")
    # A longer run is no resumption: say so, as users ask for it
    a_run(tmp_path / "e", epochs=2)
    with pytest.raises(UsageError, match=r"with --epochs 2, not 4: --epochs shapes the "
                                         r"learning-rate schedule, so a run keeps its length: "
                                         r"to train longer, start a new run, with --init-from "
                                         r"a finished run's model$"):
        check(resume=str(tmp_path / "e"), run_config={**config, "batch_size": 64, "epochs": 4})
    # Every change is named: --optimizer adam alone named the --lr its default changed.
    with pytest.raises(UsageError, match="with --batch-size 64, not 128; with --lr 0.1, not "
                                         "0.001; with --optimizer sgd, not adam$"):
        check(resume=str(tmp_path), run_config={**config, "lr": 0.001, "optimizer": "adam"})
    # The options that may change (threads), or that the old run did not record, may differ.
    check(resume=str(tmp_path), run_config={**config, "batch_size": 64})
    with pytest.raises(UsageError, match="--threads 4, not 8"):
        check(resume=str(tmp_path), run_config={**config, "batch_size": 64},
              may_change=frozenset())
    # An option left at a default that the run resolves later (None), or not given.
    with pytest.raises(UsageError, match="with --batch-size 64, not without it$"):
        check(resume=str(tmp_path), run_config={**config, "batch_size": None})
    a_run(tmp_path / "b", tau=None)
    with pytest.raises(UsageError, match=r"started without --tau \(its default; leave it "
                                         r"out\), not with --tau 2$"):
        check(resume=str(tmp_path / "b"), run_config={"tau": 2})


def test_a_checkpoint_from_before_an_option_is_compared_as_it_trained(tmp_path, monkeypatch):
    """A header without --nesterov, --betas or --eps (written before they existed) resumes;
    one resumed with them set otherwise than the run trained is refused, not taken silently
    (keys a header lacks were not compared). A finished run's config.json likewise."""
    from hpctrain import config as configs
    from hpctrain.config import OptimConfig, RunConfig

    sgd, adam = RunConfig(algo="sgd"), RunConfig(algo="sgd", optim=OptimConfig(optimizer="adam"))
    newer = ("nesterov", "betas", "eps")
    assert {k: configs.before_newer_options(sgd)[k] for k in newer} == \
        {"nesterov": False, "betas": None, "eps": None}
    assert {k: configs.before_newer_options(adam)[k] for k in newer} == \
        {"nesterov": False, "betas": [0.9, 0.999], "eps": 1e-8}
    a_run(tmp_path / "sgd")
    given = {"lr": 0.1, "batch_size": 64, "optimizer": "sgd", "nesterov": False,
             "betas": None, "eps": None}
    check(resume=str(tmp_path / "sgd"), run_config=given,
          absent=configs.before_newer_options(sgd))
    with pytest.raises(UsageError) as e:
        check(resume=str(tmp_path / "sgd"), run_config={**given, "nesterov": True},
              absent=configs.before_newer_options(sgd))
    assert str(e.value) == (f"--resume {tmp_path / 'sgd'}: the run was started without "
                            "--nesterov, not with it")
    a_run(tmp_path / "adam", optimizer="adam")
    given = {**given, "optimizer": "adam", "betas": [0.9, 0.999], "eps": 1e-8}
    check(resume=str(tmp_path / "adam"), run_config=given,
          absent=configs.before_newer_options(adam))
    with pytest.raises(UsageError, match=r"started with --betas 0.9,0.999, not 0.8,0.99$"):
        check(resume=str(tmp_path / "adam"), run_config={**given, "betas": [0.8, 0.99]},
              absent=configs.before_newer_options(adam))
    # --resume auto on a finished adam run whose config.json has no betas: finished, as it ran.
    out = tmp_path / "finished"
    out.mkdir()
    config = RunConfig(algo="sgd", out=str(out), data=configs.DataConfig(dataset="synthetic"),
                       optim=OptimConfig(optimizer="adam"),
                       checkpoint=configs.CheckpointConfig(resume="auto"))
    recorded = configs.repeatable(launch_checks._as_launched(config))
    recorded["optim"] = {k: v for k, v in recorded["optim"].items()
                         if k not in newer}
    (out / "config.json").write_text(json.dumps({**recorded, "run_info": {"workers": 1}}))
    (out / "summary.json").write_text("{}")
    monkeypatch.setattr(comm, "launch_size", lambda: 1)
    monkeypatch.setattr(launch_checks, "read_summary", lambda folder: {"finished": str(folder)})
    assert launch_checks.finished_run(config) == {"finished": str(out)}
    with pytest.raises(UsageError, match=r"started with OptimConfig.betas=\[0.9, 0.999\], "
                                         r"not \[0.8, 0.99\]; "):  # from Python: the fields
        launch_checks.finished_run(dataclasses.replace(config, optim=OptimConfig(optimizer="adam",
                                                                                betas=(0.8, 0.99))))


def test_every_option_newer_than_a_checkpoint_counts_as_its_default(tmp_path):
    """A header without --clip-grad-norm, --warmup-epochs, --scale-lr and --reduce-op (as one
    from before they existed looks) resumed with them set without a word: only --nesterov,
    --betas and --eps were filled in. Every option a header lacks is now the default the run
    trained with, refused when set otherwise (one that may change stays free), and an option
    this hpctrain does not know (a newer one's) is refused, naming it and its value."""
    typed = ["--algo", "ssgd", "--dataset", "synthetic", "--model", "mlp"]
    first = launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(
        ["train", *typed, "--out", str(tmp_path / "run"), "--checkpoint-every", "1e"])), 2)
    recorded = checkpoint.recorded_args(configs.flat(first))  # as run.py records them
    assert {"clip_grad_norm", "warmup_epochs", "scale_lr", "reduce_op"} <= recorded.keys()

    def resumed(args: dict, *flags: str) -> str | None:
        folder = tmp_path / "run" / "checkpoints"
        shutil.rmtree(folder, ignore_errors=True)
        checkpoint.save(folder, 5, {"x": 1}, {"algo": "ssgd", "ranks": 2, "workers": 2,
                                              "args": args})
        given = [*typed, "--resume", str(tmp_path / "run"), *flags]
        try:
            launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(
                ["train", *given])), 2)
        except UsageError:
            return refusal(given, ranks=2)
        return None

    changed = ("--clip-grad-norm", "1.0", "--warmup-epochs", "2", "--reduce-op", "adasum")
    said = resumed(recorded, *changed)
    assert said == (f"--resume {tmp_path / 'run'}: the run was started without "
                    "--clip-grad-norm (its default; leave it out), not with --clip-grad-norm "
                    "1.0; with --reduce-op average, not adasum; with --warmup-epochs 0.0, not "
                    "2.0")
    older = {k: v for k, v in recorded.items()
             if k not in ("clip_grad_norm", "warmup_epochs", "scale_lr", "reduce_op",
                          "stall_timeout")}
    assert resumed(older, *changed) == said
    assert resumed(older, "--scale-lr").endswith("started without --scale-lr, not with it")
    assert resumed(older, "--stall-timeout", "300") is None  # may change: as before
    assert resumed({**recorded, "label_smoothing": 0.1}) == (
        f"--resume {tmp_path / 'run'}: its checkpoint records --label-smoothing 0.1, an option "
        "this hpctrain does not know (a newer hpctrain wrote it); whether the run can go on "
        "without it cannot be told: go on with the hpctrain that wrote the checkpoint")


def test_a_resume_refusal_says_the_flags_as_typed_and_which_value_is_a_default(tmp_path):
    """"started with --fp16-allreduce False, not True" named no flag a user types; --epochs
    left out (5, the default) against a 4-epoch run got "a run cannot be made longer"."""
    a_run(tmp_path, epochs=4, fp16_allreduce=True, lr_milestones=[1, 2], model_args={"w": 2})
    defaults = {"epochs": 5, "lr": 0.05, "fp16_allreduce": False}
    run = {"lr": 0.1, "batch_size": 64, "optimizer": "sgd", "epochs": 4,
           "fp16_allreduce": True, "lr_milestones": [1, 2], "model_args": {"w": 2}}
    cases = [({"epochs": 5}, "with --epochs 4, not 5 (the default): to go on, give --epochs 4"),
             ({"fp16_allreduce": False}, "with --fp16-allreduce, not without it: to go on, "
                                         "give --fp16-allreduce"),
             ({"lr_milestones": [1, 3]}, "with --lr-milestones 1,2, not 1,3"),
             ({"model_args": {"w": 3}}, """with --model-args '{"w": 2}', not '{"w": 3}'""")]
    for changed, said in cases:
        with pytest.raises(UsageError) as e:
            check(resume=str(tmp_path), run_config={**run, **changed}, defaults=defaults)
        assert str(e.value) == f"--resume {tmp_path}: the run was started {said}"


def test_a_resume_refusal_names_a_python_callers_fields_not_flags(tmp_path):
    """hpctrain.train(config) was told "started with --lr 0.05, not 0.3" and "its checkpoint
    is of --algo ssgd", flags a script never typed; it is told the fields it gave, and the
    command line the flags, as before."""
    a_run(tmp_path / "run", ranks=1, lr=0.05, epochs=4, dataset="synthetic", model="mlp")
    def given(algo: str) -> configs.RunConfig:
        return configs.RunConfig(
            algo=algo, data=configs.DataConfig(dataset="synthetic"),
            model=configs.ModelConfig(name="mlp"), optim=configs.OptimConfig(lr=0.3),
            checkpoint=configs.CheckpointConfig(resume=str(tmp_path / "run")))

    config = given("sgd")
    with pytest.raises(UsageError) as e:
        launch_checks.check_launch(config, 1)
    assert str(e.value) == (
        f"CheckpointConfig.resume={str(tmp_path / 'run')!r}: the run was started with "
        "OptimConfig.epochs=4, not 5 (the default); with OptimConfig.lr=0.05, not 0.3: to go "
        "on, give OptimConfig.epochs=4")
    with pytest.raises(UsageError) as e:
        launch_checks.check_launch(given("ssgd"), 1)
    assert str(e.value) == (f"CheckpointConfig.resume={str(tmp_path / 'run')!r}: its "
                            "checkpoint is of RunConfig.algo='sgd', not RunConfig.algo='ssgd'")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError) as e:
        launch_checks.check_launch(dataclasses.replace(config, checkpoint=configs.CheckpointConfig(
            resume=str(tmp_path / "empty"))), 1)
    assert str(e.value) == (f"CheckpointConfig.resume={str(tmp_path / 'empty')!r}: no "
                            "checkpoint found there")
    with pytest.raises(UsageError) as e:  # the checks of the folders too
        launch_checks.check_launch(dataclasses.replace(config, out=str(tmp_path / "run"),
                                                       checkpoint=configs.CheckpointConfig()), 1)
    assert str(e.value) == (f"RunConfig.out={str(tmp_path / 'run')!r} is a folder of "
                            "checkpoints (a run's CheckpointConfig.dir); continue that run with "
                            f"CheckpointConfig.resume={str(tmp_path / 'run')!r} or choose "
                            "another folder")
    # the command line's words, unchanged: flags
    assert refusal(["--algo", "sgd", "--dataset", "synthetic", "--model", "mlp", "--lr", "0.3",
                    "--resume", str(tmp_path / "run")]) == (
        f"--resume {tmp_path / 'run'}: the run was started with --epochs 4, not 5 (the "
        "default); with --lr 0.05, not 0.3: to go on, give --epochs 4")
    # a key that is its field negated (--no-progress): the field's own values
    names = configs.flat_fields(config)
    assert policy.changed_option({"no_progress": True}, {"no_progress": False}, frozenset(),
                                 names=names) == "with RunConfig.progress=False, not True"
    assert policy.changed_option({"no_progress": True}, {"no_progress": False},
                                 frozenset()) == "with --no-progress, not without it"


def test_a_resume_refusal_names_the_defaults_of_the_runs_optimizer(tmp_path):
    """The defaults were sgd's: an adam run's left-out --betas and --lr were not called the
    default, and the refusal did not say what to give."""
    a_run(tmp_path, ranks=1, optimizer="adam", lr=0.01, betas=[0.8, 0.99], eps=1e-8,
          dataset="synthetic", model="mlp")  # a header lacking them: the defaults' run
    typed = ["train", "--algo", "sgd", "--dataset", "synthetic", "--model", "mlp",
             "--optimizer", "adam", "--resume", str(tmp_path)]
    config = arguments.build(cli.build_parser().parse_args(typed))
    with pytest.raises(UsageError) as e, options.command_line():  # the flags typed
        launch_checks.check_launch(config, 1)
    assert str(e.value) == (
        f"--resume {tmp_path}: the run was started with --betas 0.8,0.99, not 0.9,0.999 (the "
        "default); with --lr 0.01, not 0.001 (the default): to go on, give --betas 0.8,0.99 "
        "--lr 0.01")



def test_a_resume_refusal_calls_only_a_left_out_value_the_default(tmp_path):
    """--model lenet typed against an mlp run was "not lenet (the default)": any value equal
    to its default was called one. Now only an option left out is, typed or set in --config
    (a file's value is the user's too); the hint names those left out only."""
    a_run(tmp_path, ranks=1, optimizer="adam", lr=0.01, betas=[0.8, 0.99], eps=1e-8,
          model="mlp", dataset="synthetic")
    typed = ["--algo", "sgd", "--dataset", "synthetic", "--optimizer", "adam",
             "--resume", str(tmp_path), "--lr", "0.001"]
    said = (f"--resume {tmp_path}: the run was started with --betas 0.8,0.99, not 0.9,0.999 "
            "(the default); with --lr 0.01, not 0.001; with --model mlp, not lenet: to go on, "
            "give --betas 0.8,0.99")
    assert refusal([*typed, "--model", "lenet"]) == said
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\nname = "lenet"\n')
    assert refusal([*typed, "--config", str(toml)]) == said
    assert refusal(typed) == said.replace("not lenet", "not lenet (the default)") + \
        " --model mlp"
    # A script's RunConfig does not say what was given: a default's value is called one.
    with pytest.raises(UsageError) as e:
        launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(
            ["train", *typed, "--model", "lenet"])), 1)
    assert "ModelConfig.name='mlp', not 'lenet' (the default)" in str(e.value)

def test_a_resume_compares_what_options_mean_not_how_they_are_written(tmp_path):
    """--slowdown " 1:2.0" is 1:2; --eval-rank moves scoring to a rank that trains not, which
    changes no result (--eval may change); --init-from names the weights the run started from
    by their path, which need not exist any more (the file is not read again), or by a file
    with their sha256 (the file moved): the old path was the only way to go on."""
    weights = tmp_path / "w0.pt"
    torch.save({"w": torch.ones(2)}, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    args = {"lr": 0.1, "batch_size": 64, "optimizer": "sgd", "slowdown": "1:2",
            "eval_rank": None, "init_from": str(weights)}
    checkpoint.save(tmp_path / "run", 5, {"x": 1}, {"algo": "sgd", "ranks": 2, "workers": 2,
                                                    "args": args, "init_from_sha256": digest})
    moved = tmp_path / "moved.pt"
    weights.rename(moved)
    for changed in ({"slowdown": " 1:2.0"}, {"eval_rank": 1}, {"init_from": str(moved)},
                    {"init_from": str(weights)}):
        check(resume=str(tmp_path / "run"), run_config={**args, **changed})
    other = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(2)}, other)
    for given in (other, tmp_path / "gone.pt"):
        with pytest.raises(UsageError) as e:
            check(resume=str(tmp_path / "run"), run_config={**args, "init_from": str(given)})
        assert str(e.value) == (f"--resume {tmp_path / 'run'}: the run was started with "
                                f"--init-from {weights}, not {given}: --init-from takes the "
                                f"run's path, or a file of its weights (sha256 "
                                f"{digest[:12]}...)")
    with pytest.raises(UsageError, match="with --slowdown 1:2, not 1:3$"):
        check(resume=str(tmp_path / "run"), run_config={**args, "slowdown": "1:3"})


def test_each_resumption_is_recorded_with_what_it_changed(tmp_path):
    """A resume may change some settings (--mixed-precision, the number of ranks) and
    config.json, written anew, said only the last attempt's: the header carries each
    resumption, and config.json's run_info keeps what the attempt before recorded."""
    first = {"out": str(tmp_path / "a"), "checkpoint_dir": None, "resume": None,
             "mixed_precision": "no", "lr": 0.1}
    header = {"ranks": 2, "updates": 48, "args": first}
    second = {**first, "out": str(tmp_path / "b"), "resume": str(tmp_path / "a"),
              "checkpoint_dir": str(tmp_path / "a" / "checkpoints"), "mixed_precision": "bf16"}
    resumes = checkpoint.resumptions(header, second, 4)
    assert resumes == [{"update": 48, "changed": {
        "--mixed-precision": ["no", "bf16"], "--out": [first["out"], second["out"]],
        "ranks": [2, 4]}}]
    third = checkpoint.resumptions({"ranks": 4, "updates": 64, "args": second,
                                    "resumes": resumes}, second, 4)
    assert third == [*resumes, {"update": 64, "changed": {}}]
    assert checkpoint.resumptions(None, first, 2) == []
    # config.json: what the run_info of the file written over said otherwise is kept.
    from hpctrain import provenance

    written = tmp_path / "config.json"
    written.write_text(json.dumps({"run_info": {"workers": 2, "torch": "2.1", "resumes": [
        {**resumes[0], "run_info": {"workers": 1}}]}}))
    info = {"workers": 4, "torch": "2.1"}
    assert provenance.resumes(third, written, info) == {"resumes": [
        {**resumes[0], "run_info": {"workers": 1}},
        {"update": 64, "changed": {}, "run_info": {"workers": 2}}]}
    assert provenance.resumes([], written, info) == {}
    assert provenance.resumes(resumes, tmp_path / "none.json", info) == {"resumes": resumes}


def test_check_refuses_a_folder_of_checkpoints_without_resume(tmp_path):
    a_run(tmp_path / "old" / "checkpoints")
    with pytest.raises(UsageError) as e:
        check(out=str(tmp_path / "old"))
    assert str(e.value) == (f"--out {tmp_path / 'old'} holds the checkpoints of an unfinished "
                            f"run; continue it with --resume {tmp_path / 'old'} or choose "
                            "another folder")
    with pytest.raises(UsageError) as e:
        check(out=str(tmp_path / "new"), every="1e",
              checkpoint_dir=str(tmp_path / "old" / "checkpoints"))
    assert str(e.value) == (f"--checkpoint-dir {tmp_path / 'old' / 'checkpoints'} holds another "
                            "run's checkpoints; resume it with --resume or choose another folder")
    with pytest.raises(UsageError, match="holds another run's checkpoints"):  # no --out given
        check(every="1e", checkpoint_dir=str(tmp_path / "old" / "checkpoints"))
    # Without --checkpoint-every nothing would be written there: refused whatever it holds.
    with pytest.raises(UsageError, match="^--checkpoint-dir .* needs --checkpoint-every"):
        check(out=str(tmp_path / "new"), checkpoint_dir=str(tmp_path / "old" / "checkpoints"))


def test_check_resolves_the_folders_and_the_interval(tmp_path):
    """A resumed run keeps its checkpoint interval unless given another: resumed without
    --checkpoint-every it wrote none, and a SIGUSR1 to it was ignored."""
    out, folder = tmp_path / "run", tmp_path / "run" / "checkpoints"
    a_run(folder, out=str(out), checkpoint_every="0.5e")
    assert check(resume=str(out), every="1e") == checkpoint.Resolved(
        out=str(out), checkpoint_dir=str(folder), resume=str(folder), every="1e")
    assert check(resume=str(folder), out=str(tmp_path / "elsewhere"),
                 checkpoint_dir=str(tmp_path / "ck")) == checkpoint.Resolved(
        out=str(tmp_path / "elsewhere"), checkpoint_dir=str(tmp_path / "ck"), resume=str(folder),
        every="0.5e")
    assert check(resume=str(out), every="off") == checkpoint.Resolved(  # none, said so
        out=str(out), checkpoint_dir=str(folder), resume=str(folder), every=None)
    fresh = tmp_path / "fresh"
    assert check(out=str(fresh), every="600") == checkpoint.Resolved(str(fresh), None, None,
                                                                     "600")
    assert check() == checkpoint.Resolved(None, None, None, None)
    quiet = tmp_path / "quiet"  # a run given --checkpoint-every off goes on without
    a_run(quiet / "checkpoints", out=str(quiet), checkpoint_every="off")
    assert check(resume=str(quiet)).every is None


def _writer(folder, first: int, saved) -> None:
    # A forked child must not enter the OpenMP pool it inherited from a parent whose earlier
    # tests used several threads: it would hang there (libgomp is not fork-safe).
    torch.set_num_threads(1)
    write(folder, first, numel=1 << 20)
    saved.set()  # the parent kills only a writer that has made progress
    i = first + 1
    while True:  # as fast as it can: nearly every moment is inside a write
        write(folder, i, numel=1 << 20)
        i += 1


@pytest.mark.timeout(180)
def test_writer_killed_at_random_moments_never_loses_the_last_checkpoint(tmp_path):
    """SIGKILL a process writing 4 MB checkpoints in a loop, 40 times at random moments: the
    folder always holds a loadable checkpoint, never a corrupt one, and progress is kept.

    Each writer is killed only after its first whole save, at a random moment of the writes
    after it: on a loaded machine a write can outlast the whole random sleep."""
    rng = random.Random(1234)
    write(tmp_path, 0, numel=1 << 20)
    ctx = multiprocessing.get_context("fork")
    mid_write = 0
    newest = 0
    for _ in range(40):
        saved = ctx.Event()
        proc = ctx.Process(target=_writer, args=(tmp_path, newest + 1, saved))
        proc.start()
        if not saved.wait(60):  # a bound against a hang only
            died = proc.exitcode  # None: still running
            proc.kill()
            proc.join()
            pytest.fail(f"the writer saved no checkpoint in 60 s (exit code {died})")
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        mid_write += any(tmp_path.glob(".ckpt-*.tmp"))
        problems = []
        found = checkpoint.load_newest(tmp_path, problems.append)
        assert found is not None and not problems, problems
        body = found.payload
        assert body["i"] == found.header["updates"] > newest  # its first save was kept
        assert torch.equal(body["w"], torch.full((1 << 20,), float(body["i"])))
        newest = found.header["updates"]
    assert mid_write >= 1  # the kills did land inside writes (each save removes older .tmp)
    assert newest >= 40  # and each writer's progress was kept
    # Kills between a rename and the pruning leave extra old files; the next whole save prunes.
    write(tmp_path, newest + 1, numel=1 << 20)
    assert len(checkpoint.listing(tmp_path)) == checkpoint.KEEP


def test_check_resume_auto_continues_only_a_run_with_checkpoints(tmp_path):
    """``--resume auto`` (restarted and requeued jobs): the run's own folder when it holds a
    checkpoint, else a first start; never a fresh start over unreadable checkpoints."""
    out, folder = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert check(resume="auto", out=str(out), every="1e") == \
        checkpoint.Resolved(str(out), None, None, "1e")
    a_run(folder, out=str(out))
    assert check(resume="auto", out=str(out), every="1e") == \
        checkpoint.Resolved(str(out), str(folder), str(folder), "1e")
    own = tmp_path / "ck"  # --checkpoint-dir is where a restarted job looks
    a_run(own, out=str(out))
    assert check(resume="auto", out=str(tmp_path / "x"), checkpoint_dir=str(own)).resume == \
        str(own)
    with pytest.raises(UsageError, match="^--resume auto needs --out or --checkpoint-dir"):
        check(resume="auto")
    for path in checkpoint.listing(folder):
        path.write_bytes(b"torn")  # a checkpoint that cannot be read: refused, not restarted
    # named as typed, with the folder it found (it named the folder as if typed)
    with pytest.raises(UsageError, match=r"^--resume auto \(.*/run/checkpoints\): none of "
                                         "the checkpoints there can be read"):
        check(resume="auto", out=str(out), every="1e")
    # The attempt that found them unusable set them aside: the next one found no checkpoint
    # and started the run afresh, over their snapshots, config.json and metrics.
    assert checkpoint.load_newest(folder, lambda line: None) is None
    with pytest.raises(UsageError, match=r"^--resume auto: .*/run/checkpoints holds only "
                                         r"unusable checkpoints \(ckpt-000000005\.pt\.corrupt"):
        check(resume="auto", out=str(out), every="1e")
    # Nor a new run in that folder, which wrote over their config.json and snapshots.
    for every in ("1e", None):
        with pytest.raises(UsageError, match=r"^--out .*/run holds an unfinished run's "
                                             r"checkpoints, only unusable ones \(ckpt-"):
            check(out=str(out), every=every)
    with pytest.raises(UsageError, match=r"^--checkpoint-dir .*/run/checkpoints holds another "
                                         r"run's checkpoints, only unusable ones"):
        check(out=str(tmp_path / "new"), every="1e", checkpoint_dir=str(folder))
    # And --resume DIR says what auto says (it said only "no checkpoint found there")
    with pytest.raises(UsageError) as refused:
        check(resume=str(folder))
    assert str(refused.value) == (f"--resume {folder}: {folder} holds only unusable "
                                  "checkpoints (ckpt-000000005.pt.corrupt): resume from a "
                                  "good copy")
    # ... and so does --resume RUN, the run's --out: resolve() took RUN itself, whose
    # checkpoints/ held only *.corrupt files, and the line was "no checkpoint found there".
    assert checkpoint.resolve(out) == folder
    with pytest.raises(UsageError) as refused:
        check(resume=str(out))
    assert str(refused.value) == (f"--resume {out}: {folder} holds only unusable "
                                  "checkpoints (ckpt-000000005.pt.corrupt): resume from a "
                                  "good copy")


def test_parse_every_bounds_epochs():
    import argparse

    assert checkpoint.parse_every("1e6e") == "1e6e" and checkpoint.parse_every("1e308") == "1e308"
    with pytest.raises(argparse.ArgumentTypeError, match="at most 1e\\+06 epochs, got 1e308e"):
        checkpoint.parse_every("1e308e")  # x steps per epoch: no whole number of updates


def test_a_header_edited_by_hand_is_unusable_and_named(tmp_path):
    """A legacy file's checksum covers the payload only: header fields of the wrong type are
    corrupt. (A current file's header checksum refuses any edit.)"""
    a_run(tmp_path)
    (path,) = checkpoint.listing(tmp_path)
    legacy(path, args="hand-edited")
    with pytest.raises(CorruptCheckpoint, match="header field 'args' is 'hand-edited', not a"):
        checkpoint.read_header(path)
    with pytest.raises(UsageError) as e:
        check(resume=str(tmp_path))
    assert str(e.value).startswith(f"--resume {tmp_path}: none of the checkpoints there can be "
                                   f"read ({path.name}: header field 'args' is 'hand-edited', "
                                   "not a table): ")
    legacy(path, args={}, updates="x")
    lines = []
    assert checkpoint.load_newest(tmp_path, lines.append) is None
    assert "header field 'updates' is 'x', not a whole number" in lines[0]



@pytest.mark.parametrize("count, more", [(3, ""), (4, "; and 1 more")])
def test_a_refusal_lists_three_unreadable_checkpoints_and_counts_the_rest(tmp_path, count,
                                                                           more):
    folder = tmp_path / "run"
    folder.mkdir()
    for i in range(count):  # empty files: a save would keep only the last two
        (folder / f"ckpt-{i + 1:09d}.pt").write_bytes(b"")
    problems = "; ".join(f"ckpt-{i:09d}.pt: truncated header" for i in (count, count - 1,
                                                                         count - 2))
    with pytest.raises(UsageError, match="^--resume .*: none of the checkpoints there can be "
                                         rf"read \({problems}{more}\): to go on"):
        check(resume=str(folder))


def test_a_run_whose_checkpoints_all_cut_short_is_told_what_to_do(tmp_path):
    """Every checkpoint unreadable: --resume named only the newest's problem, and a new run in
    the folder was told to resume it, which had just been refused. A zero-byte file was a
    "truncated header" to the run and an "unreadable header" to the check before it."""
    folder = tmp_path / "run" / "checkpoints"
    a_run(folder)
    (folder / "ckpt-000000005.pt").rename(folder / "ckpt-000000010.pt")
    a_run(folder)
    newest, older = checkpoint.listing(folder)
    newest.write_bytes(b"")
    older.write_bytes(older.read_bytes()[:100])  # cut inside the header
    problems = "ckpt-000000010.pt: truncated header; ckpt-000000005.pt: truncated header"
    todo = ("to go on, put back a good copy of one; to start anew, choose another {}, or "
            "first move them out of the folder")
    for given in (str(tmp_path / "run"), str(folder)):
        with pytest.raises(UsageError) as refused:
            check(resume=given)
        assert str(refused.value) == (f"--resume {given}: none of the checkpoints there can "
                                      f"be read ({problems}): {todo.format('--out')}")
    with pytest.raises(UsageError) as refused:
        check(out=str(tmp_path / "run"))
    assert str(refused.value) == (f"--out {tmp_path / 'run'} holds the checkpoints of an "
                                  f"unfinished run, none of which can be read ({problems}): "
                                  f"{todo.format('--out')}")
    with pytest.raises(UsageError) as refused:
        check(out=str(tmp_path / "new"), every="1e", checkpoint_dir=str(folder))
    assert str(refused.value) == (f"--checkpoint-dir {folder} holds another run's "
                                  f"checkpoints, none of which can be read ({problems}): "
                                  f"{todo.format('--checkpoint-dir')}")
    assert checkpoint.listing(folder) == [newest, older]  # nothing set aside before MPI
    lines = []
    assert checkpoint.load_newest(folder, lines.append) is None
    assert [line.split(" (")[1].split(")")[0] for line in lines] == problems.split("; ")

def test_a_folder_named_as_a_checkpoint_is_skipped(tmp_path):
    write(tmp_path, 1)
    (tmp_path / "ckpt-000000002.pt").mkdir()
    lines = []
    found = checkpoint.load_newest(tmp_path, lines.append)
    assert found.header["updates"] == 1 and "Is a directory" in lines[0]
    with pytest.raises(UsageError, match="no usable checkpoint .*kept as \\*.corrupt"):
        flip(write(tmp_path / "bad", 1), 100)
        checkpoint.newest(tmp_path / "bad")


def test_check_refuses_mixing_two_runs_in_one_folder(tmp_path):
    own = tmp_path / "ck"  # a run whose --checkpoint-dir was its own folder
    a_run(own)
    with pytest.raises(UsageError) as e:  # a fresh run's outputs in another's checkpoints
        check(out=str(own))
    assert str(e.value) == (f"--out {own} is a folder of checkpoints (a run's --checkpoint-dir); "
                            f"continue that run with --resume {own} or choose another folder")
    assert check(out=str(own), resume=str(own)).out == str(own)  # continuing it is fine
    other = tmp_path / "other"  # another run's --out, its checkpoints in other/checkpoints
    a_run(other / "checkpoints")
    (other / "config.json").write_text("{}")
    with pytest.raises(UsageError) as e:
        check(out=str(tmp_path / "new"), every="1e", checkpoint_dir=str(other))
    assert str(e.value) == (f"--checkpoint-dir {other} is another run's --out folder; choose "
                            "another folder")
    comparison = tmp_path / "cmp"  # a bench compare's folder (its --out is refused too)
    comparison.mkdir()
    (comparison / "compare.json").write_text("{}")
    with pytest.raises(UsageError) as e:
        check(out=str(tmp_path / "new"), every="1e", checkpoint_dir=str(comparison))
    assert str(e.value) == (f"--checkpoint-dir {comparison} holds a bench compare; choose "
                            "another folder")
    same = tmp_path / "same"  # --out and --checkpoint-dir one folder: one run's own
    (same).mkdir()
    (same / "config.json").write_text("{}")
    assert check(out=str(same), every="1e", checkpoint_dir=str(same)).resume is None


def test_a_moved_run_resumes_into_its_own_folder(tmp_path):
    """``--resume DIR`` without --out: the outputs go where DIR is now, not where the run
    recorded them (a copied or moved folder, or a relative --out from another folder)."""
    a_run(tmp_path / "copy" / "checkpoints", out="runs/original")
    assert check(resume=str(tmp_path / "copy")).out == str(tmp_path / "copy")
    # A --checkpoint-dir of its own: the recorded --out.
    a_run(tmp_path / "ck", out=str(tmp_path / "x"), checkpoint_dir=str(tmp_path / "ck"))
    assert check(resume=str(tmp_path / "ck")).out == str(tmp_path / "x")


def test_an_interval_shorter_than_a_write_checkpoints_each_update_once(tmp_path):
    """On one rank the loop asks again at the update it just checkpointed: with seconds
    shorter than the write, that was due again at once, and the run wrote ckpt-0 forever."""
    ckpt = checkpoint.Checkpointer(None, 10, 40, shared={}, every="0.000001",
                                   folder=tmp_path, resume=None, stop_on_signal=True,
                                   header={"algo": "sgd", "ranks": 1, "args": {}})
    try:
        assert ckpt.due(0)
        ckpt.save(0, {}, [])
        time.sleep(0.001)  # the interval is over
        assert not ckpt.due(0) and ckpt.due(1)  # the same update once; the next one is due
    finally:
        ckpt.close()


def test_ssgd_resumes_under_another_launchers_backend(tmp_path):
    """torchrun has no MPI world, so ssgd there allreduces with --sync-backend torch: an
    mpirun run was refused there ("started with --sync-backend mpi, not torch", a value the
    user never gave) and had no way to go on. The backend changes only float rounding."""
    a_run(tmp_path, algo="ssgd", sync_backend="mpi")
    config = {"lr": 0.1, "batch_size": 64, "optimizer": "sgd", "sync_backend": "torch"}
    resolved = check(resume=str(tmp_path), algo="ssgd", run_config=config)
    assert resolved.resume == str(tmp_path)
    with pytest.raises(UsageError, match="without --fp16-allreduce, not with it$"):
        a_run(tmp_path / "b", algo="ssgd", fp16_allreduce=False)  # that one changes values
        check(resume=str(tmp_path / "b"), algo="ssgd", run_config={"fp16_allreduce": True})


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_a_run_resumed_on_more_workers_retires_the_old_runs_later_checkpoints(tmp_path):
    """More workers, shorter epochs: a 1-worker run's checkpoints at updates 64 and 96 of 128
    an epoch outranked the resumed run's at 64 of 64 (epoch 1), so --resume auto went back to
    epoch 0.75. The resumed run's first checkpoint retires them."""
    world = comm.mpi().COMM_WORLD
    folder = Path(world.bcast(str(tmp_path))) / "ck"
    model, header = torch.nn.Linear(3, 2), {"algo": "ssgd", "ranks": 1, "args": {}}
    if world.rank == 0:
        old = checkpoint.Checkpointer(None, 128, 128, shared={"model": model}, every="0.25e",
                                      folder=folder, resume=None, header=header)
        for updates in (32, 64, 96):
            old.save(updates, {}, Snapshots())
    world.Barrier()

    def resize(header: dict, ranks: list) -> tuple[list, Resize]:
        return [ranks[0]] * world.size, Resize(1, world.size, header["updates"], 48)

    new = checkpoint.Checkpointer(world, 64, 64, shared={"model": model}, every="0.25e",
                                  folder=folder, resume=str(folder), header=header,
                                  resize=resize)
    assert new.restore(Snapshots()) == {"updates": 96} and new.next_due == 64
    new.save(64, {}, Snapshots())
    world.Barrier()  # rank 0 has written it
    kept = [(h["workers"], h["updates"]) for h in map(checkpoint.read_header,
                                                      checkpoint.listing(folder))]
    assert kept == [(world.size, 64)]



@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_every_rank_resumes_on_rank_0s_clock(tmp_path):
    """Each rank went on from its own saved elapsed time, a few ms apart: rank r scores every
    size-th snapshot with its own t, and the resumed run's curve went back in time between
    neighbours. Every rank now restarts from rank 0's, as the snapshots it restores do."""
    world = comm.mpi().COMM_WORLD
    folder = Path(world.bcast(str(tmp_path))) / "ck"
    ckpt = sgd_checkpointer(folder, comm_=world)
    ckpt.save(10, {"elapsed": 2.5 + 0.001 * world.rank}, Snapshots())
    world.Barrier()
    resumed = sgd_checkpointer(folder, resume=str(folder), comm_=world)
    assert resumed.restore(Snapshots()) == {"elapsed": 2.5, "updates": 10}
    assert resumed.clock.attempts[-1][0] == 2.5


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_every_rank_scores_lock_step_snapshots_on_rank_0s_clock():
    """Each lock-step rank takes its snapshots on its own clock, and rank r scores every
    size-th: ssgd's curve went back in time between neighbours (4.5551 s, then 4.5543 s) and
    its last point came after wall_s. The snapshots take rank 0's info, as its buffers."""
    world = comm.mpi().COMM_WORLD
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    snapshots = Snapshots()
    for i in range(3):
        model[1].running_mean.fill_(world.rank + i)
        snapshots.take(model, t=1.0 + i + 0.001 * world.rank, updates=10 * i)
    run._from_rank0(model, snapshots, world)
    assert [s.info for s in snapshots] == [{"t": 1.0 + i, "updates": 10 * i} for i in range(3)]
    assert [float(s.state["1.running_mean"][0]) for s in snapshots] == [0.0, 1.0, 2.0]


def sgd_checkpointer(folder, resume=None, comm_=None) -> checkpoint.Checkpointer:
    """A Checkpointer of a tiny model, every epoch of 10 updates."""
    torch.manual_seed(0)
    return checkpoint.Checkpointer(comm_, 10, 40, shared={"model": torch.nn.Linear(3, 2)},
                                   every="1e", folder=folder, resume=resume,
                                   header={"algo": "sgd", "ranks": 1, "args": {}})


def test_a_model_whose_code_changed_since_its_checkpoint_is_named_in_one_line(tmp_path):
    """Resumed after a layer was widened: load_state_dict's RuntimeError, four lines, exit 1
    (--init-from says the same in one line, exit 2, before MPI starts)."""
    sgd_checkpointer(tmp_path / "a").save(10, {}, Snapshots())
    widened = checkpoint.Checkpointer(None, 10, 40, shared={"model": torch.nn.Linear(3, 4)},
                                      every="1e", folder=tmp_path / "b",
                                      resume=str(tmp_path / "a"),
                                      header={"algo": "sgd", "ranks": 1, "args": {}})
    with pytest.raises(UsageError) as refused, options.command_line():  # as cli.main runs it
        widened.restore(Snapshots())
    assert str(refused.value) == (
        f"--resume: the model in {tmp_path / 'a' / 'ckpt-000000010.pt'} does not fit this "
        "run's model (was its code changed?): weight is 2 x 3 in the file, 4 x 3 in the model "
        "(and 1 more of another shape)")


def test_a_payload_of_another_layout_is_named_in_one_line(tmp_path):
    """A checkpoint that passes its checksum but lacks what a resume reads (re-encoded
    without book["resumed_from"]) was "error (rank 1 of 2): KeyError: 'resumed_from'", no file
    named; a shared state this run keeps and the file lacks, a KeyError on every rank."""
    sgd_checkpointer(tmp_path).save(10, {}, Snapshots())
    path = tmp_path / "ckpt-000000010.pt"
    header, payload = checkpoint.load(path)
    del payload["book"]["resumed_from"]
    path.write_bytes(checkpoint.encode(payload, header))
    with pytest.raises(UsageError) as refused, options.command_line():  # as cli.main runs it
        sgd_checkpointer(tmp_path / "b", resume=str(tmp_path)).restore(Snapshots())
    assert str(refused.value) == (
        f"--resume: checkpoint {path} has no payload['book']['resumed_from']: not the layout "
        "this hpctrain reads (another version's or program's file); resume it with the "
        "hpctrain that wrote it")
    payload["book"]["resumed_from"] = []
    path.write_bytes(checkpoint.encode(payload, header))
    more = checkpoint.Checkpointer(None, 10, 40, shared={"model": torch.nn.Linear(3, 2),
                                                         "ema": torch.nn.Linear(3, 2)},
                                   every="1e", folder=tmp_path / "c", resume=str(tmp_path),
                                   header={"algo": "sgd", "ranks": 1, "args": {}})
    with pytest.raises(UsageError, match=r"has no payload\['shared'\]\['ema'\]: not the "):
        more.restore(Snapshots())
    assert checkpoint.folder.layout_gap({"header": {"updates": 1, "workers": 1},
                                         "payload": {**payload, "ranks": [{}]}}) == \
        "no payload['ranks'][0]['counters']"
    # A run resumed before lists where from: any list (it was an IndexError on rank 0).
    twice = {**payload, "book": {**payload["book"], "resumed_from": [10, 20]}}
    assert checkpoint.folder.layout_gap({"header": {"updates": 1, "workers": 1},
                                         "payload": twice}) is None


def test_a_checkpoint_that_does_not_fit_names_the_field_from_python(tmp_path):
    """hpctrain.train(RunConfig(checkpoint=CheckpointConfig(resume=...))) restores outside
    the command line: a model whose code changed, a payload of another layout and a
    checkpoint of more workers than a run that cannot resize were refused as "--resume ...",
    a flag the script never typed; CheckpointConfig.resume now."""
    sgd_checkpointer(tmp_path / "a").save(10, {}, Snapshots())
    file = tmp_path / "a" / "ckpt-000000010.pt"
    widened = checkpoint.Checkpointer(None, 10, 40, shared={"model": torch.nn.Linear(3, 4)},
                                      every="1e", folder=tmp_path / "b",
                                      resume=str(tmp_path / "a"),
                                      header={"algo": "sgd", "ranks": 1, "args": {}})
    with pytest.raises(UsageError) as refused:
        widened.restore(Snapshots())
    assert str(refused.value).startswith(
        f"CheckpointConfig.resume: the model in {file} does not fit this run's model")
    header, payload = checkpoint.load(file)
    del payload["book"]["resumed_from"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / file.name).write_bytes(checkpoint.encode(payload, header))
    with pytest.raises(UsageError) as refused:
        sgd_checkpointer(tmp_path / "d", resume=str(tmp_path / "c")).restore(Snapshots())
    assert str(refused.value).startswith(
        f"CheckpointConfig.resume: checkpoint {tmp_path / 'c' / file.name} has no ")
    wider = tmp_path / "e"
    checkpoint.save(wider, 10, {**payload, "book": {**payload["book"], "resumed_from": []},
                                "ranks": payload["ranks"] * 3},
                    {**header, "workers": 3})
    with pytest.raises(UsageError) as refused:
        sgd_checkpointer(tmp_path / "f", resume=str(wider)).restore(Snapshots())
    assert str(refused.value) == (
        f"CheckpointConfig.resume={str(wider)!r}: the checkpoint is of 3 workers, not 1, and "
        "this run cannot be resized")
    with pytest.raises(UsageError) as refused, options.command_line():
        sgd_checkpointer(tmp_path / "f", resume=str(wider)).restore(Snapshots())
    assert str(refused.value).startswith(f"--resume {wider}: the checkpoint is of 3 workers")


def test_a_bad_snapshot_costs_its_curve_point_not_the_checkpoints(tmp_path, capsys):
    """Every checkpoint lists the snapshot files before it: one flipped byte in the first
    made both kept checkpoints unusable (renamed *.corrupt, --resume refused). Now the model
    and optimizer state decide; the snapshot is named in one line and its point left out."""
    ckpt, snapshots = sgd_checkpointer(tmp_path / "a"), Snapshots()
    model = ckpt.shared["model"]
    for updates in (10, 20):
        snapshots.take(model, updates=updates - 10)
        ckpt.save(updates, {}, snapshots)
    first = tmp_path / "a" / "snapshots" / "000000.pt"
    flip(first, first.read_bytes().index(b"\n") + 200)  # in the payload
    lines = []
    found = checkpoint.load_newest(tmp_path / "a", lines.append)
    assert found.header["updates"] == 20 and not checkpoint.corrupt(tmp_path / "a")
    assert [s.info["updates"] for s in found.snapshots[0]] == [10]
    assert lines == [f"hpctrain: snapshot {tmp_path / 'a' / 'snapshots' / '000000.pt'} is "
                     "unusable (checksum mismatch); the run's curve leaves out its point "
                     "(update 0)"]

    # Missing, and the run resumed into another folder: the rest is carried, the new
    # snapshot file takes a name of its own (the bad ones stay listed).
    (tmp_path / "a" / "snapshots" / "000001.pt").unlink()
    resumed, back = sgd_checkpointer(tmp_path / "b", resume=str(tmp_path / "a")), Snapshots()
    assert resumed.restore(back) == {"updates": 20} and back == []
    assert "are unusable (000000.pt: checksum mismatch (update 0); 000001.pt: No such file " \
        "or directory (update 10)); the run's curve leaves out their points" \
        in capsys.readouterr().err
    back.take(model, updates=20)
    resumed.save(30, {}, back)
    lines = []
    found = checkpoint.load_newest(tmp_path / "b", lines.append)
    assert found.header["updates"] == 30 and len(lines) == 1
    assert [s.info["updates"] for s in found.snapshots[0]] == [20]
    assert [r["file"] for r in found.payload["snapshots"][0]] == [
        "snapshots/000000.pt", "snapshots/000001.pt", "snapshots/000002.pt"]


def test_a_members_bad_snapshot_leaves_its_point_out_for_every_member(tmp_path):
    """ma's and ec's members (per-rank snapshots) are scored together, point by point: a
    point dropped on one rank only would misalign them, and hang the collective scoring."""
    (tmp_path / "snapshots").mkdir()
    refs = []
    for rank in (0, 1):
        refs.append([])
        for point, updates in enumerate((0, 10)):
            name = f"snapshots/{point:06d}-r{rank}.pt"
            blob = checkpoint.encode({"w": torch.full((4,), float(rank))}, {})
            (tmp_path / name).write_bytes(blob)
            refs[rank].append({"file": name, "sha256": checkpoint.read_header(
                tmp_path / name)["sha256"], "info": {"updates": updates}})
    checkpoint.save(tmp_path, 20, {"snapshots": refs}, {"algo": "ma", "workers": 2})
    (tmp_path / "snapshots" / "000000-r1.pt").unlink()
    lines = []
    found = checkpoint.load_newest(tmp_path, lines.append)
    assert [[s.info["updates"] for s in rank] for rank in found.snapshots] == [[10], [10]]
    assert [float(rank[0].state["w"][0]) for rank in found.snapshots] == [0.0, 1.0]
    assert len(lines) == 1 and "000000-r1.pt is unusable (No such file or directory)" in lines[0]


def test_a_snapshot_unreadable_without_an_errno_is_named_with_its_message(tmp_path,
                                                                         monkeypatch):
    """An OSError raised with a message alone has no strerror: the line said the snapshot
    was unusable "(None)"."""
    from hpctrain.checkpoint import folder

    def unreadable(path, kind):
        raise OSError("stale file handle on the shared file system")

    monkeypatch.setattr(folder, "load", unreadable)
    path, problem, at = folder._snapshot(tmp_path, {"file": "snapshots/000000.pt",
                                                    "sha256": "x", "info": {"updates": 10}})
    assert problem == "stale file handle on the shared file system" and at == " (update 10)"


def test_the_update_just_saved_is_not_written_again(tmp_path):
    """After a checkpoint the loop asks due() again at the same update; on several ranks
    SIGUSR1's verdict could arrive then, and the same checkpoint was written twice (counted
    twice, its time doubled). The stop request stays."""
    ckpt = sgd_checkpointer(tmp_path)
    ckpt.save(10, {}, [])
    written = (tmp_path / "ckpt-000000010.pt").stat().st_ino
    ckpt.stopping = True  # as due() sets it on SIGUSR1
    ckpt.save(10, {}, [])
    assert ckpt.count == 1 and ckpt.stopping
    assert (tmp_path / "ckpt-000000010.pt").stat().st_ino == written  # not rewritten
    ckpt.save(20, {}, [])
    assert ckpt.count == 2 and checkpoint.load_newest(tmp_path).payload["book"]["checkpoints"] == 2


def fsynced(monkeypatch) -> list[int]:
    """The inodes os.fsync is called on from now on (the real fsync still runs)."""
    synced, real = [], os.fsync

    def record(fd):
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return synced


def test_make_folder_fsyncs_each_new_folder_into_its_parent(tmp_path, monkeypatch):
    (tmp_path / "old").mkdir()
    synced = fsynced(monkeypatch)
    checkpoint.folder.make_folder(tmp_path / "old" / "new" / "newer")
    inode = {name: (tmp_path / name).stat().st_ino for name in ("old", "old/new")}
    assert sorted(synced) == sorted(inode.values())  # the parents of the two new ones
    synced.clear()
    checkpoint.folder.make_folder(tmp_path / "old" / "new")
    assert synced == []  # nothing new


def test_a_runs_first_checkpoint_makes_its_new_folders_durable(tmp_path, monkeypatch):
    """The writer made snapshots/ (and its parents) before make_folder looked, which then
    found nothing new: the entries of out/ and checkpoints/ were never fsynced."""
    synced = fsynced(monkeypatch)
    ckpt, snapshots = sgd_checkpointer(tmp_path / "out" / "checkpoints"), Snapshots()
    snapshots.take(ckpt.shared["model"], updates=0)
    ckpt.save(10, {}, snapshots)
    for folder in (tmp_path, tmp_path / "out", tmp_path / "out" / "checkpoints"):
        assert folder.stat().st_ino in synced, folder


def test_an_unreadable_newest_checkpoint_is_refused_before_mpi(tmp_path):
    """check() took the older checkpoint's header instead, so the run started and rank 0
    refused the file only after MPI had (the others waiting in their first collective)."""
    a_run(tmp_path)
    loop = tmp_path / "ckpt-000000006.pt"
    loop.symlink_to(loop)
    with pytest.raises(UsageError) as e:
        check(resume=str(tmp_path))
    assert str(e.value) == f"cannot read checkpoint file {loop}: Too many levels of symbolic links"


def test_a_checkpoint_is_written_inside_the_watchdogs_busy_allowance(tmp_path, monkeypatch):
    """Writing is progress: a checkpoint whose files took longer than --stall-timeout ended a
    healthy job (and left a temporary file, os._exit skipping its clean-up). Every file of it
    is written inside watchdog.busy (tests/test_watchdog.py: what busy allows)."""
    ckpt, snapshots = sgd_checkpointer(tmp_path), Snapshots()
    for updates in (0, 5):
        snapshots.take(ckpt.shared["model"], updates=updates)
    spans = []

    @contextlib.contextmanager
    def record(doing, count=None):
        spans.append((doing, count, sorted(p.name for p in tmp_path.rglob("*.pt"))))
        yield
        spans.append((doing, count, sorted(p.name for p in tmp_path.rglob("*.pt"))))

    monkeypatch.setattr(watchdog, "busy", record)
    ckpt.save(10, {}, snapshots)
    assert spans == [("writing checkpoint", 10, []),
                     ("writing checkpoint", 10, ["000000.pt", "000001.pt", "ckpt-000000010.pt"])]


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_ranks_waiting_for_rank_0s_checkpoint_beat_the_watchdog(tmp_path, monkeypatch):
    """The other ranks waited for rank 0's write in their next collective, without a beat:
    their watchdogs ended a healthy job. Rank 0's snapshot write takes 0.3 s here."""
    world = comm.mpi().COMM_WORLD
    folder = Path(world.bcast(str(tmp_path))) / "ck"
    ckpt, snapshots = sgd_checkpointer(folder, comm_=world), Snapshots()
    if world.rank == 0:
        snapshots.take(ckpt.shared["model"], updates=0)
        real_write = checkpointer_module.write_atomic

        def slow_disk(*args, **kwargs):
            time.sleep(0.3)
            real_write(*args, **kwargs)

        monkeypatch.setattr(checkpointer_module, "write_atomic", slow_disk)
    beats = []
    monkeypatch.setattr(watchdog, "beat", lambda doing, count=None, **_: beats.append(doing))
    ckpt.save(10, {}, snapshots)
    if world.rank > 0:
        assert "waiting for rank 0's checkpoint" in beats
    assert checkpoint.listing(folder)  # every rank returns after the write


def test_readme_names_every_option_a_resume_may_change():
    # README's --resume row named 3 of the 22 (its own example changed a fourth)
    row = next(line for line in (ROOT / "README.md").read_text().splitlines()
               if line.startswith("| `--resume DIR`"))
    names = (checkpoint.MAY_CHANGE | policy.RESIZE_MAY_CHANGE) - {"resume"}
    missing = [flag for flag in ("--" + n.replace("_", "-") for n in sorted(names))
               if f"`{flag}`" not in row]
    assert not missing, missing


def test_the_docs_say_the_elastic_folder_must_be_trusted():
    """Elastic commits are unpickled when read back (a __reduce__ payload with valid
    checksums ran its code), unlike checkpoints: the docs said nothing of it."""
    import inspect

    from hpctrain.sync import elastic

    assert "pickle.loads" in inspect.getsource(elastic.ObjectState._load_snapshot)
    for doc in ("README.md", "docs/DESIGN.md"):
        text = " ".join((ROOT / doc).read_text().split())
        assert "the folder must be as trusted as the script" in text, doc


@pytest.mark.parametrize("content", [b"", b"{}\n", b"{}\nrest", b"x" * 5000 + b"\nrest",
                                     b"no end", b"y" * (checkpoint.format._MAX_HEADER + 10)])
def test_a_header_is_read_as_readline_reads_it(tmp_path, content):
    """The header's first line, read a page at a time, is what readline gave: up to its
    newline, or to the end, or _MAX_HEADER bytes."""
    path = tmp_path / "c.pt"
    path.write_bytes(content)
    with open(path, "rb") as f:
        assert checkpoint.format._first_line(path) == f.readline(checkpoint.format._MAX_HEADER)
