"""A run's folders: checked before MPI starts, then claimed and locked while the run writes.

Before MPI starts (:func:`hpctrain.launch_checks.check_launch`, ``simulate``, ``bench``), the
folders a run will write must be ones it can create or write in, not a finished run's or a
bench compare's, and free for the files it writes there: found later, each was an error
after MPI started, or after training. Once checked, rank 0 claims them (:func:`claimed`): it
makes ``runs/<stem>-<time>`` when no ``--out`` is given and holds a lock file
(:data:`LOCK`) in each folder, so that two jobs started with the same ``--out`` at once do
not write over each other.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
from dataclasses import replace
from pathlib import Path

from hpctrain import checkpoint, comm, options, steptimes, tensorboard
from hpctrain.config import CheckpointConfig, RunConfig
from hpctrain.errors import UsageError
from hpctrain.metrics import new_run_folder

# What a run writes in --out, files all: a folder of one's name is found only when it is
# written, after training (the model then lost).
OUTPUT_FILES = ("config.json", "metrics.jsonl", "model.pt", "summary.json", steptimes.FILE,
                "ensemble.pt")


def refuse_taken_names(config: RunConfig) -> None:
    """``--out``'s files must be free for files, its TensorBoard folder free for a folder."""
    if config.out is None:
        return
    out = Path(config.out)
    for name in OUTPUT_FILES:
        if (out / name).is_dir():
            raise UsageError(f"{_named('--out', config.out)}: {out / name} is a folder; the "
                             f"run writes its {name} there")
    board = out / tensorboard.SUBDIR
    if config.tensorboard and board.exists() and not board.is_dir():
        said = options.named("--tensorboard", "RunConfig", "tensorboard", True)
        raise UsageError(f"{said}: {board} is a file; the run writes its event files in a "
                         "folder of that name")


# The run's folder options -> the Python fields that give them, for :func:`_named`.
_FIELDS = {"--out": "RunConfig.out", "--checkpoint-dir": "CheckpointConfig.dir",
           "--resume": "CheckpointConfig.resume"}


def _named(flag: str, folder: object) -> str:
    """A run's folder option in a refusal as its user gave it: ``--out runs/a`` on the
    command line, ``RunConfig.out='runs/a'`` from Python (:func:`hpctrain.options.named`).
    For the run's options only: ``bench compare --out`` is no RunConfig's."""
    owner, name = _FIELDS[flag].split(".")
    return options.named(f"{flag} {folder}", owner, name, str(folder))


def _option(flag: str) -> str:
    """A run's folder option named alone, as :func:`_named` names it with its value:
    ``--out`` on the command line, ``RunConfig.out`` from Python."""
    owner, name = _FIELDS[flag].split(".")
    return options.named(flag, owner, name)


# The checkpoint folder in a lock's refusal (:func:`_where`): one given
# (``--checkpoint-dir``), or one derived (``<out>/checkpoints``, or the folder resumed from).
_CHECKPOINTS, _GIVEN_CHECKPOINTS = "the checkpoint folder", "--checkpoint-dir"


def _where(flag: str, folder: object, what: str = "run") -> str:
    """A folder in a lock's refusal: a run's folder option as its user gave it
    (:func:`_named`), anything else (a derived checkpoint folder, a comparison's ``--out``)
    as ``flag folder``. A checkpoint folder given (:data:`_GIVEN_CHECKPOINTS`) is ``the
    checkpoint folder DIR`` on the command line, as a derived one, and from Python the field
    that gave it, ``CheckpointConfig.dir='DIR'`` (``the checkpoint folder DIR`` named none)."""
    if what != "run":
        return f"{flag} {folder}"
    if flag == _GIVEN_CHECKPOINTS and options.on_command_line():
        return f"{_CHECKPOINTS} {folder}"
    return _named(flag, folder) if flag in _FIELDS else f"{flag} {folder}"


def refuse_finished(out: str | None, resume: str | None = None,
                    config_file: str | None = None) -> None:
    """A finished run's folder, or a ``bench compare``'s, is not a new run's; nor is a
    finished run resumed. ``resume``: the folder ``--resume`` names (``auto`` returns a
    finished run's summary instead, :func:`hpctrain.launch_checks.finished_run`);
    ``config_file``: the ``--config`` file whose ``out`` named ``out``, where ``--out`` did
    not. The line names what the user
    typed: "--out X" sent one who typed none to change it and train the run again."""
    ran = _run_folder_of(resume)
    if ran is not None and (ran / "summary.json").exists() and (
            out is None or Path(out).resolve() == ran.resolve()):  # another --out: a copy
        init = options.named(f"--init-from {ran}", "ModelConfig", "init_from", str(ran))
        raise UsageError(f"{_named('--resume', resume)}: the run has finished "
                         f"({ran / 'summary.json'}); there is nothing to resume: to train on "
                         f"from its model, start a new run with {init} and another "
                         f"{_option('--out')}")
    if not out:
        return
    named = _named("--out", out) if config_file is None else \
        f"--config {config_file}: its out {out}"
    choose = "choose another folder" if config_file is None else \
        "give --out another folder for a new run"
    if (Path(out) / "summary.json").exists():
        raise UsageError(f"{named} already holds a finished run; {choose}")
    if (Path(out) / "compare.json").exists():
        raise UsageError(f"{named} holds a bench compare; {choose}")


def _run_folder_of(resume: str | None) -> Path | None:
    """The outputs' folder of the run ``--resume`` names (as :func:`checkpoint.check` takes
    it), or None: no folder named, ``auto``, or nothing there that says."""
    if resume is None or resume == checkpoint.AUTO or not Path(resume).is_dir():
        return None
    if (Path(resume) / "summary.json").exists():  # the run's folder, checkpoints or none
        return Path(resume)
    out = checkpoint.policy.recorded_out(checkpoint.folder.resolve(resume))
    return None if out is None else Path(out)


def check_folder(flag: str, folder: str | None, run_option: bool = False) -> None:
    """A folder the run will write must be one it can create, or write in: otherwise that is
    found only at the first write, after MPI started (exit 1). Nothing is left behind.
    ``run_option``: ``flag`` is a run's (``--out``), named as its Python field from Python
    (:func:`_named`)."""
    if folder is None:
        return
    problem = _unwritable(Path(folder))  # "" is the working folder, as Path("") is
    if problem:
        raise UsageError(f"{_named(flag, folder) if run_option else f'{flag} {folder}'}: "
                         f"{problem}")


def check_resumed_folders(resume: str | None, out: str | None, checkpoint_dir: str | None,
                          resolved: checkpoint.Resolved) -> None:
    """:func:`check_folder` for the folders a resume writes in without their flags: the
    resumed run's folder (no ``--out``) and, where it goes on checkpointing, the checkpoint
    folder resumed from (no ``--checkpoint-dir``). A read-only one was found at the first
    write, after MPI started (exit 1, naming a temporary file)."""
    if resolved.resume is None:
        return
    derived = []
    if out is None and resolved.out is not None:
        derived.append(("the run's folder", resolved.out, "--out",
                        f"give {_option('--out')} a folder for this attempt's outputs"))
    if checkpoint_dir is None and resolved.every is not None:
        off = options.setting(CheckpointConfig, "every", checkpoint.policy.OFF)
        derived.append(("its checkpoint folder", resolved.checkpoint_dir, "--checkpoint-dir",
                        f"give {_option('--checkpoint-dir')} a folder for the new checkpoints, "
                        f"or {off}"))
    for what, folder, flag, remedy in derived:  # named as typed, or from Python as fields
        if problem := _unwritable(Path(folder)):
            raise UsageError(f"{_named('--resume', resume)}: {what} {folder}, written to without "
                             f"{_option(flag)}: {problem}; {remedy}")


def _unwritable(folder: Path) -> str | None:
    """Why the run cannot create or write in ``folder``, or None."""
    missing = _missing(folder)
    for path in missing:
        if os.path.islink(path):
            return f"{path} is a link to {os.readlink(path)}, which does not exist"
    path = missing[-1].parent if missing else folder  # the nearest that exists
    if not path.is_dir():
        return f"{path} is a file, not a folder"
    limit = os.pathconf(path, "PC_NAME_MAX")
    if any(len(os.fsencode(p.name)) > limit for p in missing):
        return f"a folder name in it is longer than {limit} bytes"
    if problem := _too_long(folder, path):
        return problem
    try:  # the one test that holds on every file system: create a folder there
        os.rmdir(tempfile.mkdtemp(prefix=".hpctrain-check-", dir=path))
    except OSError as error:
        return f"cannot create a folder in {path} ({error.strerror})"
    return None


# The room the run's own paths take below a folder it writes in: the longest is TensorBoard's
# tensorboard/events.out.tfevents.<time>.<host>.<pid>.<n> (about 120 bytes with a 64-byte
# host name); checkpoints/snapshots/ and the temporary files' names are shorter.
ROOM = 160


def check_length(flag: str, folder: str | None) -> None:
    """:func:`check_folder`'s test of the path's length alone, for what looks in a folder
    before it is checked (``--resume auto``'s finished run): the look raised OSError."""
    if folder is None:
        return
    missing = _missing(Path(folder))
    if problem := _too_long(Path(folder), missing[-1].parent if missing else Path(folder)):
        raise UsageError(f"{_named(flag, folder)}: {problem}")  # --out, --checkpoint-dir


def _too_long(folder: Path, existing: Path) -> str | None:
    """Why the paths the run writes in ``folder`` would pass the system's PATH_MAX (counted
    from ``/``; ``existing``: ``folder`` or the nearest folder above it that exists, which
    says it), or None: the file system's ENAMETOOLONG came as an OSError, before MPI from a
    check or after it from the first write (exit 1)."""
    limit = os.pathconf(existing, "PC_PATH_MAX")
    length = len(os.fsencode(os.path.abspath(folder)))
    if length + ROOM <= limit:
        return None
    return (f"the path is too long ({length} bytes from /; the files the run writes in it "
            f"need it at most {limit - ROOM} bytes long, the system's limit being {limit})")


def _missing(folder: Path) -> list[Path]:
    """The folders of ``folder``'s path that do not exist, innermost first: what making it
    (with its parents) creates. ``os.path.exists``: False too for a name too long."""
    missing = []
    while not os.path.exists(folder):
        missing.append(folder)
        folder = folder.parent
    return missing


LOCK = ".hpctrain.lock"  # in --out (and a --checkpoint-dir elsewhere): held while a run writes


@contextlib.contextmanager
def claimed(config: RunConfig, stem: str | None = None):
    """Rank 0 holds an exclusive lock on the run's folders (``--out``, and the checkpoint
    folder where it has one, inside ``--out`` or not) while it runs: two jobs started with
    the same ``--out`` at once both passed the checks, then wrote over each other (one's
    config.json beside the other's model.pt; one removed the other's temporary file and
    crashed it). The second is refused in one line, exit 2, before MPI starts. The kernel
    drops the lock when the process ends, killed or not, so a requeued or restarted job
    finds it free. Where the file system has no locks (Lustre mounted without ``flock``),
    runs go on unlocked, as before; where it refuses one for the way the lock file could be
    opened (NFS, another user's read-only lock file), the run is refused (``_locked``).
    Where MPI already runs the job (a script's later run), rank 0's refusal is raised on
    every rank.

    Yields ``config``; on rank 0 given no ``out``, with the new folder it made for the run
    (``runs/<stem>-<time>``, the stem the algorithm's name unless given).
    """
    if comm.env_rank() != 0:
        comm.shared_refusal(None)  # where MPI runs, rank 0's refusal is raised here too
        yield config
        return
    made: list[Path] = []
    try:
        with contextlib.ExitStack() as held:
            refusal = None
            try:
                config = _claim(held, config, stem, made)
            except UsageError as refused:
                refusal = refused
            comm.shared_refusal(refusal)  # raised here, and where MPI runs on every rank
            yield config
    except BaseException:
        for top in made:  # refused, or failed before writing anything: no folder left behind
            if all(name == LOCK for _, _, files in os.walk(top) for name in files):
                shutil.rmtree(top, ignore_errors=True)
        raise


def _claim(held: contextlib.ExitStack, config: RunConfig, stem: str | None,
           made: list[Path]) -> RunConfig:
    """Rank 0's part of :func:`claimed`: make a run folder if none is given, lock the run's
    folders in ``held`` and check them again; the folders it made go into ``made``."""
    if config.out is None:
        made.append(new_run_folder(stem or config.algorithm_class.name))
        config = replace(config, out=str(made[0]))
    out = options.text(config.out)
    folders = [("--out", Path(out))]
    ck = config.checkpoint
    if ck.dir is not None or ck.interval is not None or ck.resume is not None:
        # Its own lock, also inside --out: a run resuming another's checkpoints (--resume DIR
        # --out elsewhere, or --checkpoint-dir DIR/checkpoints) locked only its own folders,
        # and the two runs wrote, and rotated away, each other's checkpoints.
        folder = checkpoint.run_folder(ck.dir, out)
        if folder.resolve() != Path(out).resolve():  # (--checkpoint-dir = --out)
            folders.append((_GIVEN_CHECKPOINTS if ck.dir else _CHECKPOINTS, folder))
    made += [missing[-1] for _, folder in folders if (missing := _missing(folder))]
    for flag, folder in folders:
        lock_folder(held, flag, folder)
    _check_unchanged(config)
    return config


def lock_folder(held: contextlib.ExitStack, flag: str, folder: Path, what: str = "run") -> None:
    """Hold ``folder``'s lock file until ``held`` closes; UsageError if another ``what`` (a
    run, a comparison) holds it, or if the lock file is unusable (:func:`open_lock`)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # not writable: the run's writes say so (not "in use by another run")
    try:
        fd = open_lock(flag, folder, create=True, what=what)
    except OSError as e:
        raise _unopened(flag, folder, e, what) from None
    assert fd is not None  # create: opened, or raised
    held.callback(os.close, fd)
    _open_as_folder(fd, folder)
    got = _locked(fd, fcntl.LOCK_EX)
    if got is None:
        raise _untold(flag, folder, fd, what)
    if not got:
        raise _in_use(flag, folder, what)


def _open_as_folder(fd: int, folder: Path) -> None:
    """Let whoever may write in ``folder`` write this user's lock file ``fd`` too (read and
    write for its group and others as the folder gives them write): a colleague's run in a
    shared, group-writable folder on NFS can lock it only open for writing, and was refused
    where the umask left it 0644. Nothing more to them than a file of their own there: it
    is empty, and no one reads it (and on a local file system any reader may flock it
    already). Where permissions cannot be changed, left as it is."""
    with contextlib.suppress(OSError):
        shared = folder.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        wanted = (shared << 1) | shared  # each write bit, and its read bit beside it
        held = os.fstat(fd)
        if held.st_uid == os.geteuid() and held.st_mode & wanted != wanted:
            os.fchmod(fd, stat.S_IMODE(held.st_mode) | wanted)


def refuse_in_use(out: str | None, checkpoint_dir: str | None, resume: str | None) -> None:
    """Refuse, before the launch checks judge them, the folders a run going on now holds
    (its lock, probed and not kept): ``--out``, the checkpoint folder (given, resumed from,
    or ``<out>/checkpoints``) and ``--resume``'s. Judged first by what they hold, a live
    run's folder was called an unfinished run's, to go on with ``--resume``, which was
    refused next as in use: this line is the one true of it. Rank 0's check, as the lock is
    its: another rank may check after its own rank 0 took it (rank 0's refusal ends the
    job, and speaks for every rank)."""
    resumed = resume is not None and resume != checkpoint.AUTO
    kept = checkpoint_dir or (checkpoint.folder.resolve(resume)
                              if resumed and resume is not None else
                              out and checkpoint.run_folder(None, out))
    seen = set()
    given = _GIVEN_CHECKPOINTS if checkpoint_dir else _CHECKPOINTS
    for flag, folder in (("--out", out), (given, kept),
                         ("--resume", resume if resumed else None)):
        if folder is None or os.path.abspath(folder) in seen:
            continue
        seen.add(os.path.abspath(folder))
        refuse_held(flag, Path(folder))


def refuse_held(flag: str, folder: Path, what: str = "run") -> None:
    """UsageError, as :func:`lock_folder` says it, if another ``what`` holds ``folder``'s
    lock now (probed, not kept, no lock file made), or if its lock file is unusable."""
    if _held(flag, folder, what):
        raise _in_use(flag, folder, what)


def _held(flag: str, folder: Path, what: str) -> bool:
    """Whether a process holds ``folder``'s lock now. A shared lock, taken and let go at
    once, tests it: it conflicts with a run's exclusive one, and a file opened for reading
    takes it (on NFS too), so that no lock file is made where there is none. UsageError, as
    :func:`lock_folder` would say it, where the lock file is unusable: before MPI starts."""
    try:
        fd = open_lock(flag, folder, create=False, what=what)
    except OSError as e:
        raise _unopened(flag, folder, e, what) from None
    if fd is None:  # no lock file: no run holds it
        return False
    try:
        got = _locked(fd, fcntl.LOCK_SH)
        if got is None:
            raise _untold(flag, folder, fd, what)
        return not got
    finally:
        os.close(fd)  # the lock goes with it


# Never through a symbolic link (in a folder other users can write in, one made a run create
# or append to a file of their choosing), nor waiting for a writer (a FIFO hung the run).
_SAFE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_lock(flag: str, folder: Path, create: bool, what: str = "run") -> int | None:
    """A file descriptor of ``folder``'s lock file, to flock; None where there is none and
    not ``create``. Opened for writing (made if missing, with ``create``: an exclusive flock
    on NFS needs it), else read-only: another user's lock file, read-only to this one, was
    skipped, and two runs wrote over each other (flock takes a lock on a file opened for
    reading). UsageError naming it if it is a symbolic link or not a regular file; the
    OSError of the first open if it cannot be opened at all. ``what``: whose lock (a
    run's folder option is named as its Python field from Python, :func:`_where`)."""
    lock, named = folder / LOCK, f"{_where(flag, folder, what)}: its lock file"
    writing = os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0)
    refused: OSError | None = None
    for how in (writing, os.O_RDONLY) if create else (os.O_RDONLY, writing):
        try:
            return open_regular(named, lock, how)
        except OSError as e:
            refused = refused or e
    assert refused is not None  # every open raised
    if refused.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG) and not create:
        return None  # (a path no folder can have: the folder's own checks name it)
    raise refused


def open_regular(what: str, path: Path, how: int) -> int:
    """``path`` opened with ``how`` (``os.open``'s flags; made 0666 less the umask where
    ``O_CREAT`` makes it), never through a symbolic link nor waiting on a FIFO's writer or
    reader: in a folder other users can write in, a planted link had hpctrain append to or
    create a file of their choosing. UsageError naming it (``what``) where it is no regular
    file; the open's OSError where it cannot be opened otherwise."""
    try:
        fd = os.open(path, how | _SAFE, 0o666)
    except OSError:
        with contextlib.suppress(OSError):  # a link (ELOOP), or a FIFO with no reader (ENXIO)
            refuse_unlike_file(what, path, os.lstat(path).st_mode)
        raise
    try:
        refuse_unlike_file(what, path, os.fstat(fd).st_mode)
    except UsageError:
        os.close(fd)
        raise
    return fd


def refuse_unlike_file(what: str, path: Path, mode: int) -> None:
    """UsageError unless ``mode`` (an lstat's, or an fstat's of a file opened without
    following links) is a regular file's: ``what`` (``path``) is a link hpctrain never made,
    or a FIFO, folder, socket or device, which it must not write to nor wait on."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISLNK(mode):
        raise UsageError(f"{what} {path} is a symbolic link, which hpctrain never makes nor "
                         "follows there (another user's?); remove it, or choose another folder")
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device")
    raise UsageError(f"{what} {path} is {kind}, not a regular file; remove it, or choose "
                     "another folder")


def _locked(fd: int, kind: int) -> bool | None:
    """Take lock ``kind`` on ``fd`` without waiting: False if another process holds one
    that conflicts; True too where the file system has no locks (the writes say what is
    wrong there); None where it refuses the lock for the way ``fd`` is open (EBADF: NFS
    takes flock as an fcntl lock, whose exclusive kind needs the file open for writing,
    its shared kind for reading). Whether another run holds it then cannot be told:
    taken as unlocked, two runs wrote in one folder at once."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno == errno.EBADF:
            return None
        return e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    return True


def _unopened(flag: str, folder: Path, e: OSError, what: str) -> UsageError:
    return UsageError(f"{_where(flag, folder, what)}: cannot open its lock file {folder / LOCK} "
                      f"({e.strerror}), which keeps two runs from writing there at once; fix "
                      "its permissions, or choose another folder")


def _untold(flag: str, folder: Path, fd: int, what: str) -> UsageError:
    """The refusal where ``_locked`` cannot tell (NFS, and a lock file this user may open
    only one way: another user's, read-only to this one)."""
    how = {os.O_RDONLY: "read-only", os.O_WRONLY: "write-only"}.get(
        fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE, "for reading and writing")
    return UsageError(f"{_where(flag, folder, what)}: its lock file {folder / LOCK} cannot be "
                      f"locked open {how}, as this user may open it, on this file system (NFS "
                      "locks a file only as it is open: an exclusive lock needs writing, a shared "
                      f"one reading), so whether another {what} writes there cannot be told; "
                      "make it readable and writable for this user, remove it while no run "
                      "uses the folder, or choose another folder")


def _in_use(flag: str, folder: Path, what: str) -> UsageError:
    return UsageError(f"{_where(flag, folder, what)} is in use by another {what} going on "
                      f"now (it holds {folder / LOCK}); wait for it to end or choose another "
                      "folder")


def _check_unchanged(config: RunConfig) -> None:
    """What the launch checks saw may have changed while another run held the folder."""
    if (Path(options.text(config.out)) / "summary.json").exists():
        raise UsageError(f"{_named('--out', config.out)} already holds a finished run (it "
                         "ended while this one started); choose another folder")
    if config.checkpoint.resume is None and checkpoint.listing(
            checkpoint.run_folder(config.checkpoint.dir, config.out)):
        raise UsageError(f"{_named('--out', config.out)} holds the checkpoints of a run that "
                         "wrote them while this one started; choose another folder")

