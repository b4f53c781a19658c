"""Folders other users can write in (a group's project folder): what another user planted
there (a symbolic link, a FIFO, a lock file of theirs) must not send hpctrain's writes to a
file of their choosing, hang it, or drop its lock; and its files get the umask of now."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import sys

import pytest
from conftest import SYNTHETIC, run_program

from hpctrain import metrics, options, run_folders
from hpctrain.bench.compare import execution, planning, record
from hpctrain.bench.report import rendering
from hpctrain.cli import build_parser
from hpctrain.errors import UsageError

LINK = ("is a symbolic link, which hpctrain never makes nor follows there (another user's?); "
        "remove it, or choose another folder")


def planted_link(tmp_path, at):
    """A link at ``at`` to a file in a private folder (missing, to see it is not made)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700, exist_ok=True)
    os.symlink(private / "target", at)
    return private / "target"


def refused(call) -> str:
    """The one line ``call`` refuses with, as the command line words it (``--out DIR``; from
    Python a run's folder is named by its field: test_run_folders)."""
    with pytest.raises(UsageError) as e, options.command_line():
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_symlinked_lock_file_is_refused_never_followed(tmp_path):
    """The lock's open followed a link another user planted: the run made (or locked) a file
    where the link pointed, in a folder of the run's user that was private."""
    out = tmp_path / "out"
    out.mkdir()
    target = planted_link(tmp_path, out / run_folders.LOCK)
    with contextlib.ExitStack() as held:
        assert refused(lambda: run_folders.lock_folder(held, "--out", out)) == (
            f"--out {out}: its lock file {out / run_folders.LOCK} {LINK}")
    assert refused(lambda: run_folders.refuse_held("--out", out)) == (
        f"--out {out}: its lock file {out / run_folders.LOCK} {LINK}")
    assert not target.exists()
    target.write_text("theirs")  # there now: neither written nor locked through the link
    with contextlib.ExitStack() as held:
        refused(lambda: run_folders.lock_folder(held, "--out", out))
    assert target.read_text() == "theirs"


def test_a_fifo_as_lock_file_is_refused_without_waiting(tmp_path):
    """A FIFO named .hpctrain.lock: its open waited for a writer, and the run hung silently
    (the probe before MPI, then the lock; the report's probe alike)."""
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / run_folders.LOCK)
    why = (f"its lock file {out / run_folders.LOCK} is a FIFO, not a regular file; remove it, "
           "or choose another folder")
    assert refused(lambda: run_folders.refuse_held("--out", out)) == f"--out {out}: {why}"
    with contextlib.ExitStack() as held:
        assert refused(lambda: run_folders.lock_folder(held, "--out", out)) == (
            f"--out {out}: {why}")
        assert refused(lambda: rendering._hold_unless_in_use(held, out)) == f"report {out}: {why}"
    (out / run_folders.LOCK).unlink()
    (out / run_folders.LOCK).mkdir()
    assert refused(lambda: run_folders.refuse_held("--out", out)).endswith(
        "is a folder, not a regular file; remove it, or choose another folder")


def test_the_locks_still_exclude_each_other(tmp_path):
    """flock's locks conflict between two opens of the file, in one process as in two."""
    out = tmp_path / "out"
    with contextlib.ExitStack() as first:
        run_folders.lock_folder(first, "--out", out)
        assert stat.S_ISREG(os.lstat(out / run_folders.LOCK).st_mode)
        with contextlib.ExitStack() as second:
            assert "is in use by another run going on now" in refused(
                lambda: run_folders.lock_folder(second, "--out", out))
        assert "in use" in refused(lambda: run_folders.refuse_held("--out", out))
        with contextlib.ExitStack() as third:
            assert "in use" in refused(lambda: rendering._hold_unless_in_use(third, out))
    run_folders.refuse_held("--out", out)  # let go


def test_a_lock_refused_for_how_its_file_is_open_is_no_lock_skipped(tmp_path, monkeypatch):
    """On NFS flock is an fcntl lock, which an exclusive lock takes only on a file open for
    writing: another user's lock file, open read-only, failed with EBADF, taken as a file
    system without locks, and two runs wrote in one --out at once. Refused now, naming the
    file. An O_PATH descriptor, which flock refuses with EBADF here too, stands in for the
    read-only one on NFS (no NFS mount here)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / run_folders.LOCK).touch()
    fd = os.open(out / run_folders.LOCK, os.O_PATH)
    try:
        assert run_folders._locked(fd, fcntl.LOCK_EX) is None  # cannot tell: not True
        assert run_folders._locked(fd, fcntl.LOCK_SH) is None
    finally:
        os.close(fd)
    opened = []

    def as_on_nfs(flag, folder, create, what="run"):
        opened.append(os.open(folder / run_folders.LOCK, os.O_PATH))
        return opened[-1]

    monkeypatch.setattr(run_folders, "open_lock", as_on_nfs)
    said = (f"its lock file {out / run_folders.LOCK} cannot be locked open read-only, as this "
            "user may open it, on this file system (NFS locks a file only as it is open: an "
            "exclusive lock needs writing, a shared one reading), so whether another {} "
            "writes there cannot be told; make it readable and writable for this user, "
            "remove it while no run uses the folder, or choose another folder")
    with contextlib.ExitStack() as held:
        assert refused(lambda: run_folders.lock_folder(held, "--out", out)) == (
            f"--out {out}: " + said.format("run"))
    assert refused(lambda: run_folders.refuse_held("--out", out, "comparison")) == (
        f"--out {out}: " + said.format("comparison"))
    assert len(opened) == 2 and os.listdir(out) == [run_folders.LOCK]


# Run without the powers that let root open any file: as the reviewer's victim was.
_AS_ANOTHER_USER = """
import contextlib, sys
from pathlib import Path
from hpctrain import options, run_folders
from hpctrain.bench.report import rendering
from hpctrain.errors import UsageError

def refusal(call):
    try:
        with options.command_line():  # as `hpctrain train` locks: the refusals name --out
            call()
    except UsageError as e:
        return str(e)
    return "went on"

root = Path(sys.argv[1])
with contextlib.ExitStack() as first:  # the lock file is read-only to this process
    print(refusal(lambda: run_folders.lock_folder(first, "--out", root / "shared")))
    with contextlib.ExitStack() as second:
        print(refusal(lambda: run_folders.lock_folder(second, "--out", root / "shared")))
print(refusal(lambda: run_folders.refuse_held("--out", root / "closed")))
with contextlib.ExitStack() as held:
    print(refusal(lambda: run_folders.lock_folder(held, "--out", root / "closed")))
    print(refusal(lambda: rendering._hold_unless_in_use(held, root / "closed")))
"""
_DROP = "--drop=cap_dac_override,cap_dac_read_search,cap_fowner"


def test_another_users_lock_file_still_locks_or_is_refused(tmp_path):
    """Another user's lock file, read-only to this one: the lock was skipped silently, and
    two runs on one --out both ran, writing over each other. One this user cannot open at
    all is refused naming it, except by ``report``, which reads and goes on saying so (it
    called the comparison in use though nothing ran)."""
    prefix = []
    if os.geteuid() == 0:  # root opens any file: run as root without those powers
        if shutil.which("capsh") is None:
            pytest.skip("running as root, and no capsh to drop CAP_DAC_OVERRIDE")
        prefix = ["capsh", _DROP, "--", "-c", 'exec "$0" "$@"']
    for name, mode in (("shared", 0o444), ("closed", 0o000)):
        (tmp_path / name).mkdir(mode=0o777)
        (tmp_path / name / run_folders.LOCK).touch(mode=mode)
    done = run_program([*prefix, sys.executable, "-c", _AS_ANOTHER_USER, str(tmp_path)])
    assert done.returncode == 0, done.stderr
    shared, closed = tmp_path / "shared", tmp_path / "closed"
    cannot = (f"--out {closed}: cannot open its lock file {closed / run_folders.LOCK} "
              "(Permission denied), which keeps two runs from writing there at once; fix its "
              "permissions, or choose another folder")
    assert done.stdout.splitlines() == [
        "went on",
        f"--out {shared} is in use by another run going on now (it holds "
        f"{shared / run_folders.LOCK}); wait for it to end or choose another folder",
        cannot, cannot, "went on"]
    assert done.stderr.splitlines()[-1] == (
        f"hpctrain report: note: cannot open {closed / run_folders.LOCK} (Permission denied): "
        "going on without it, so a comparison going on there now is not seen")


def test_bench_compare_never_appends_its_logs_through_a_link(tmp_path):
    """``<out>/sgd/stdout.log`` a link another user planted: the run's output was appended
    to the file it named (``stderr.log``'s made one in a private folder). Refused in the
    planning checks, before any run; and by the open itself, should one appear after."""
    out = tmp_path / "cmp"
    (out / "sgd").mkdir(parents=True)
    target = planted_link(tmp_path, out / "sgd" / "stderr.log")
    args = build_parser().parse_args(["bench", "compare", "--algos", "sgd", *SYNTHETIC,
                                      "--epochs", "1", "--out", str(out)])
    assert refused(lambda: record.start_record(args, planning.plan(args))) == (
        f"sgd's run: its log {out / 'sgd' / 'stderr.log'} {LINK}")
    assert refused(lambda: execution.open_log(out / "sgd" / "stderr.log")) == (
        f"bench compare: the log {out / 'sgd' / 'stderr.log'} {LINK}")
    assert not target.exists()
    target.write_text("theirs\n")
    refused(lambda: execution.open_log(out / "sgd" / "stderr.log"))
    assert target.read_text() == "theirs\n"
    os.mkfifo(out / "sgd" / "stdout.log")
    assert refused(lambda: execution.open_log(out / "sgd" / "stdout.log")).endswith(
        "is a FIFO, not a regular file; remove it, or choose another folder")
    fd = execution.open_log(out / "sgd" / "new.log")  # a file of its own: appended to
    os.write(fd, b"x")
    os.close(fd)
    assert (out / "sgd" / "new.log").read_bytes() == b"x"


@pytest.mark.parametrize("mask", [0o077, 0o002])
def test_write_atomic_uses_the_umask_of_the_write(tmp_path, mask):
    """The umask was read once, at import: a script that set 077 afterwards got checkpoints,
    model.pt and config.json others could read, where its own open() made them 0600."""
    old = os.umask(mask)
    try:
        metrics.write_atomic(tmp_path / "model.pt", b"weights")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "model.pt").st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "plain"]


@pytest.mark.parametrize("folder_mode, lock_bits", [
    (0o2775, 0o060), (0o777, 0o066), (0o755, 0o000), (0o1757, 0o006)])
def test_a_lock_file_is_writable_by_whoever_may_write_its_folder(tmp_path, folder_mode,
                                                                 lock_bits):
    """The lock file a run makes is read-write for the group and others the folder lets
    write (on NFS a colleague's run could not lock a 0644 one); no more: a folder only its
    owner writes keeps the umask's mode. Another user's lock file is left as it is."""
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(folder_mode)
    old = os.umask(0o022)
    try:
        with contextlib.ExitStack() as held:
            run_folders.lock_folder(held, "--out", out)
    finally:
        os.umask(old)
    lock = out / run_folders.LOCK
    assert stat.S_IMODE(lock.stat().st_mode) == 0o644 | lock_bits
    if os.geteuid() != 0:
        return  # only root can give the file to a colleague
    lock.chmod(0o644)
    os.chown(lock, 12345, -1)  # a colleague's
    with contextlib.ExitStack() as held:
        run_folders.lock_folder(held, "--out", out)
    assert stat.S_IMODE(lock.stat().st_mode) == 0o644
