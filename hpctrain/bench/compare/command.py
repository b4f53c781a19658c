"""The ``hpctrain bench compare`` command: :func:`run` plans, records and runs the comparison.

It refuses to run under a launcher, holds the ``--out`` folder's lock, runs the planned runs
one after the other (:mod:`.execution`), writing ``compare.json`` and the report after each,
stops on SIGUSR1, SIGTERM or Ctrl-C with a line naming the runs left, and at the end prints
the report's table and the lines around it; it exits 1 when a run failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import signal
import sys
from pathlib import Path

from hpctrain import checkpoint, launch_env, run_folders
from hpctrain.bench.compare.execution import TimeLimitWarning, continued, execute
from hpctrain.bench.compare.planning import Run, orders_note, plan
from hpctrain.bench.compare.record import set_aside, start_record
from hpctrain.bench.report import plotting, reading, remarks, rendering, tables
from hpctrain.errors import UsageError
from hpctrain.metrics import write_json_atomic

THREAD_LEVEL = None  # a launcher of MPI jobs: it never initialises MPI itself


def run(args: argparse.Namespace) -> dict:
    """Run the comparison ``args`` describe; write its record, report and plots; return the
    record, or exit with status 1 after a line naming the failed runs if any failed."""
    seat = launch_env.from_launcher()
    if seat is not None and seat.size > 1:  # copies racing for one --out
        raise UsageError(f"hpctrain bench compare starts each run's processes itself: run it "
                         f"as one process, not {seat.size} ({seat.source}), without mpirun, "
                         "srun or torchrun around it")
    runs = plan(args)
    out = Path(args.out)
    # A comparison going on there: "in use", before start_record called its record one to
    # finish with --resume (which was then refused as in use).
    run_folders.refuse_held("--out", out, "comparison")
    record = start_record(args, runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # nothing written yet
        raise UsageError(f"--out {out}: cannot make the folder ({e.strerror})") from None
    with contextlib.ExitStack() as held:
        # A second compare on the folder (--resume while this one runs) took the runs this
        # one was training for failed, and wrote its report over this one's record.
        run_folders.lock_folder(held, "--out", out, "comparison")
        return _compare(args, runs, out, record)


class _Terminated(SystemExit):
    """SIGTERM received: the compare ends with status 128 + 15, as the signal would end it."""


def _terminated(signum: int, frame) -> None:
    """SIGTERM (``kill``, a workflow manager) ends the compare as Ctrl-C does: the run going
    on is stopped with it (``execute``'s cleanup), not left training on its own."""
    raise _Terminated(128 + signum)


def _compare(args: argparse.Namespace, runs: list[Run], out: Path, record: dict) -> dict:
    """:func:`run`'s comparison, in the folder it holds."""
    write_json_atomic(out / reading.RECORD, record)  # --resume's new targets, though none runs
    if note := orders_note(runs):
        print(f"hpctrain bench compare: note: {note}", file=sys.stderr, flush=True)
    warning = TimeLimitWarning()
    terminate = signal.signal(signal.SIGTERM, _terminated)
    ran = False  # a run started: the report changes
    try:
        for i, r in enumerate(runs, 1):
            label = f"[{i}/{len(runs)} {r.name}]"
            if r.name in record["runs"]:
                print(f"{label} finished earlier; kept", file=sys.stderr, flush=True)
                continue
            if warning.received:
                break
            if args.resume:
                set_aside(out / r.name, label)
            ran = True
            result = execute(continued(r, out / r.name) if args.resume else r, out / r.name,
                             label, args.timeout, warning)
            if warning.received and result["status"] != "ok":  # stopped, or ended by it
                print(f"{label} stopped by SIGUSR1 (--resume continues it)", file=sys.stderr,
                      flush=True)
                break
            print(f"{label} {result['status']}" +
                  (f": {result['error']}" if result["error"] else "") +
                  (f" ({result['note']})" if result.get("note") else ""), file=sys.stderr,
                  flush=True)
            record["runs"][r.name] = result
            write_json_atomic(out / reading.RECORD, record)
            if any(later.name not in record["runs"] for later in runs):  # else: below
                _report_so_far(out)
    except (KeyboardInterrupt, _Terminated) as stop:
        # The report showed the run it stopped *not run*, as before it started, and nothing
        # said the comparison had stopped.
        _stopped("Ctrl-C" if isinstance(stop, KeyboardInterrupt) else "SIGTERM", ran, runs,
                 record, out)
        raise
    finally:
        warning.close()
        signal.signal(signal.SIGTERM, terminate)
    if any(r.name not in record["runs"] for r in runs):  # SIGUSR1 stopped the comparison
        _stopped("SIGUSR1", ran, runs, record, out)
        raise SystemExit(checkpoint.stop.EXIT_STATUS)
    failed = [r.name for r in runs if record["runs"][r.name]["status"] != "ok"]
    try:
        rows, targets, drawn = rendering.render(out)
    except BaseException:  # the report's own error follows; the failed runs are named first
        _say_failed(failed, len(runs), f"their records in {out / reading.RECORD}")
        raise
    print(tables.main_table(rows, targets))
    if line := remarks.notes_line(rows):
        print(f"hpctrain bench compare: {line}", file=sys.stderr, flush=True)
    print(f"hpctrain bench compare: {out / reading.REPORT}", flush=True)
    if not drawn:
        print(f"hpctrain bench compare: no plots: {plotting.NO_PLOTS}", file=sys.stderr,
              flush=True)
    if failed:
        _say_failed(failed, len(runs), f"their rows in {out / reading.REPORT}")
        raise SystemExit(1)
    return record


def _stopped(how: str, ran: bool, runs: list[Run], record: dict, out: Path) -> None:
    """The comparison stopped (``how``: SIGUSR1, SIGTERM, Ctrl-C) with runs left: its report
    (if a run started) shows the run it stopped *unfinished*, those after it *not run*, and
    one line says so."""
    if ran:
        _report_so_far(out)
    left = [r.name for r in runs if r.name not in record["runs"]]
    print(f"hpctrain bench compare: stopped by {how} " + (
        f"with {', '.join(left)} left to run; continue with --resume (--out {out})" if left
        else "after its last run"), file=sys.stderr, flush=True)


def _report_so_far(out: Path) -> None:
    """report.md and the plots of the runs that have ended, the others *not run*, for whoever
    watches a long comparison (``hpctrain report`` of it is refused while it holds the
    folder). A problem here is one line and the runs go on: the report after the last run
    says it in full, with the warnings this one keeps to itself (else once per run)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            rendering.render(out)
    except Exception as e:  # not the runs' problem: the report after the last run raises it
        print(f"hpctrain bench compare: report.md not updated: {e}", file=sys.stderr,
              flush=True)


def _say_failed(failed: list[str], total: int, where: str) -> None:
    if failed:
        print(f"hpctrain bench compare: {len(failed)} of {total} runs failed: "
              f"{', '.join(failed)} ({where} say why)", file=sys.stderr, flush=True)
