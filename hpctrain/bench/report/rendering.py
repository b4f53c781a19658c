"""``hpctrain report DIR``, the command: its arguments (:func:`add_arguments`), the checks
of DIR and ``--out`` before anything is read (:func:`report_folder`,
:func:`check_out_folder`, which ``bench compare`` also runs on its ``--out``), the
folder's lock held shared while the report is written, and :func:`render`, which writes
report.md and the plots together or not at all.

The only module of the report that writes files; ``bench compare`` calls :func:`render`
after each run.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import sys
import tempfile
from pathlib import Path

from hpctrain import paths
from hpctrain.bench.report.document import markdown
from hpctrain.bench.report.plotting import NO_PLOTS, PLOTS, figure_title, plot
from hpctrain.bench.report.reading import RECORD, REPORT, Row, load
from hpctrain.bench.report.remarks import notes_line
from hpctrain.bench.report.tables import main_table
from hpctrain.errors import UsageError
from hpctrain.metrics import write_atomic

DEFAULT_TARGETS = (0.8, 0.85)


def parse_targets(text: str) -> list[float]:
    """``"0.8,0.85"`` -> [0.8, 0.85]; each a test accuracy in (0, 1], each once (a column
    each); an empty entry (``"0.8,,0.9"``) is refused."""
    words = str(text).split(",")
    if len(words) > 1 and not all(w.strip() for w in words):
        raise UsageError(f"--targets {text!r}: an empty entry")
    try:
        values = [float(v) for v in words if v.strip()]
    except ValueError:
        raise UsageError(f"--targets {text!r}: not a comma-separated list of numbers") from None
    bad = [v for v in values if not 0 < v <= 1]
    if not values or bad:
        raise UsageError(f"--targets {text!r}: want accuracies in (0, 1], e.g. 0.8,0.85")
    return list(dict.fromkeys(values))


def _write_together(files: dict[Path, bytes | str]) -> None:
    """Write all of ``files`` or, on an error, none (UsageError naming the file): each to a
    temporary file beside it, and only when all are written does each replace the old one, so
    a report.md never shows another rendering's plots, nor is left cut short."""
    for path in files:
        if path.is_dir():
            raise UsageError(f"report: cannot write {path}: it is a folder")
    staged: dict[Path, Path] = {}
    try:
        for path, content in files.items():
            staged[path] = path.with_name(f".{path.name}.{os.getpid()}.new")
            write_atomic(staged[path], content)
        for path, tmp in staged.items():
            os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"report: cannot write {path}: {e.strerror or e}") from None
    finally:
        for tmp in staged.values():  # never in place of the error above: on a read-only
            with contextlib.suppress(OSError):  # mount unlink fails even for a missing file
                tmp.unlink(missing_ok=True)


def render(folder: str | Path, targets: list[float] | None = None,
           out: str | Path | None = None) -> tuple[list[Row], list, list[Path]]:
    """Write ``report.md`` and both plots into ``out`` (made if missing; default ``folder``)
    from ``folder``'s saved outputs; return the rows, the targets used (``targets``, else the
    comparison's, else the defaults) and the plots drawn: none without matplotlib (the
    ``plot`` extra), where the report says so rather than losing a comparison's table after
    its runs. Everything is read and drawn before anything is written."""
    if not str(folder).strip():  # Path("") is the working folder
        raise UsageError(f"report {str(folder)!r}: give a comparison's or a run's folder")
    folder = Path(folder)
    record, rows = load(folder)
    target = folder if out is None else Path(out)
    targets = targets or record.get("targets") or list(DEFAULT_TARGETS)
    files: dict[Path, bytes | str] = {}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        for x, (name, _) in PLOTS.items():
            files[target / name] = plot(rows, x, figure_title(record, rows))
    drawn = list(files)
    files[target / REPORT] = markdown(record, rows, targets, plots=bool(drawn))
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {target}: cannot make the folder ({e.strerror})") from None
    _write_together(files)
    return rows, targets, drawn


def _hold_unless_in_use(held: contextlib.ExitStack, folder: Path) -> None:
    """Hold ``folder``'s lock, shared, while the report is written; UsageError if a
    comparison (or a run) going on holds it: its report called the runs going on and to come
    failed. Shared, as a reader's: it conflicts with a comparison's exclusive lock (one that
    starts meanwhile is refused), and NFS, which takes flock as an fcntl lock, grants it on
    the lock file open read-only, as the report opens it; the exclusive lock it took there
    failed (EBADF), taken as a file system without locks, so it never locked on NFS. Two
    reports at once share it, each writing its files together (with other --targets, their
    files may mix: the last written wins), and a comparison refused meanwhile is told that
    a comparison or run holds the folder. A folder without the lock file is left without
    one. A lock file this user cannot open (another user's comparison, its lock mode 600),
    or cannot lock as it may open it (write-only, on NFS), was called in use though nothing
    ran: the report, which only reads the runs, goes on unlocked, and says so."""
    from hpctrain.run_folders import LOCK, open_lock

    unlocked = "going on without it, so a comparison going on there now is not seen"
    try:
        fd = open_lock("report", folder, create=False)
    except OSError as e:
        print(f"hpctrain report: note: cannot open {folder / LOCK} ({e.strerror}): {unlocked}",
              file=sys.stderr)
        return
    if fd is None:
        return
    held.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UsageError(f"{folder} is in use by a comparison or run going on now (it "
                             f"holds {folder / LOCK}); bench compare rewrites its "
                             "report.md as each run ends") from None
        if e.errno == errno.EBADF:  # NFS: a shared lock needs the file open for reading
            print(f"hpctrain report: note: cannot lock {folder / LOCK} as this user may open "
                  f"it (not for reading) on this file system: {unlocked}", file=sys.stderr)
        # else a file system without locks: nothing to wait for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a comparison's --out folder, a folder of finished runs, "
                                    "or one run's folder (with --out)")
    parser.add_argument("--targets", default=None,
                        help="test accuracies to time, e.g. 0.8,0.85 (default: the comparison's, "
                             f"else {','.join(map(str, DEFAULT_TARGETS))})")
    parser.add_argument("--out", default=None, metavar="FOLDER",
                        help="write report.md and the plots there (made if missing; default: "
                             "DIR itself, but for one training run's folder, whose files are "
                             "the run's, which needs --out)")


def check_out_folder(out: str) -> None:
    """An ``--out`` that report.md (of ``report`` or ``bench compare``) may go in: not ""
    (the working folder), one that can be made or written in, and not a training run's
    folder, whose files would get the report's beside them."""
    if not out.strip():
        raise UsageError(f"--out {out!r} is empty: give a folder")
    from hpctrain.run_folders import check_folder

    check_folder("--out", out)
    held = [name for name in ("summary.json", "config.json") if (Path(out) / name).exists()]
    if held:
        raise UsageError(f"--out {out} holds a training run ({held[0]}); choose another folder")


def report_folder(folder: str, out: str | None) -> Path:
    """Where the report of ``folder`` goes (``--out``, else ``folder``), checked before
    anything is read: never into a training run's folder, whose files are the run's (bench
    compare refuses one as its --out too; ``report runs/sgd`` for ``report runs`` left
    report.md and the plots in the run), nor over another comparison's report."""
    if out is None:
        if (Path(folder) / "summary.json").is_file() and not (Path(folder) / RECORD).is_file():
            raise UsageError(f"report {folder}: is one training run's folder, whose files are "
                             f"the run's: give --out FOLDER for the report, or the folder that "
                             f"holds the run ({Path(folder).resolve().parent})")
        _check_writable(folder)
        return Path(folder)
    check_out_folder(out)
    if (Path(out) / RECORD).exists() and Path(out).resolve() != Path(folder).resolve():
        raise UsageError(f"--out {out} holds another comparison (its {RECORD}), whose report "
                         "this would replace; choose another folder")
    return Path(out)


def _check_writable(folder: str) -> None:
    """A report going into ``folder`` itself must be one it can write in: on a read-only one
    (an archive, a snapshot) the refusal named a plot it could not write, not ``--out``, the
    way to a report of it. Tested by making a file there, as the report does; a folder that
    is not there is left to :func:`load` to say."""
    if not Path(folder).is_dir():
        return
    try:
        handle, name = tempfile.mkstemp(prefix=".hpctrain-check-", dir=folder)
        os.close(handle)
        os.unlink(name)
    except OSError as e:
        raise UsageError(f"report {folder}: cannot write in {folder} ({e.strerror}); give "
                         "--out FOLDER to write report.md and the plots there") from None


def run(args: argparse.Namespace) -> list[Row]:
    """Re-render the report of ``args.dir`` (into ``args.out``, else there); print its table
    and where the files are. A ``~`` in DIR or ``--out`` (``--out=~/r``, which the shell
    leaves) is expanded, as in every path option (:func:`paths.home_expanded`)."""
    folder = paths.home_expanded(args.dir, "report")
    out = report_folder(folder, None if args.out is None
                        else paths.home_expanded(args.out, "--out"))
    with contextlib.ExitStack() as held:
        _hold_unless_in_use(held, Path(folder))
        rows, targets, drawn = render(folder, None if args.targets is None
                                      else parse_targets(args.targets), out)
    print(main_table(rows, targets))
    if line := notes_line(rows):
        print(f"hpctrain report: {line}", file=sys.stderr)
    print(f"hpctrain report: {', '.join(map(str, [out / REPORT, *drawn]))}")
    if not drawn:
        print(f"hpctrain report: no plots: {NO_PLOTS}", file=sys.stderr)
    return rows
