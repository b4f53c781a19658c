"""``--profile START:COUNT``: torch.profiler over a window of training steps, on every worker.

Each worker profiles its local steps ``START`` to ``START + COUNT - 1`` (counted from 0, as
``HPCTRAIN_INJECT`` counts them) and writes ``<out>/profile/rank-<r>.json``, a Chrome trace
(Perfetto or chrome://tracing; one ``ProfilerStep#`` span per step; Holistic Trace Analysis
reads the folder, each file's rank from its ``distributedInfo``; TensorBoard's profiler plugin
does not, as it loads only ``*.pt.trace.json`` files), and ``rank-<r>.txt``, torch's table of
the operators that took the most time. ``r`` is the worker's index among the ranks that train,
as ``--slowdown`` counts them (with ``--eval-rank R``, MPI rank r > R is worker r - 1;
``--servers``' ranks train nothing). On a GPU the CUDA kernels are recorded too. The loop
labels the algorithm's hooks (``hpctrain.synchronize``: ssgd's allreduce completing;
``hpctrain.apply``: the step, an async push; ``hpctrain.after_update``: MA's and EC's
rounds), so their communication shows as time under the label; ssgd's gradient hooks label
each bucket's launch (``hpctrain.allreduce_bucket``) and their progress calls
(``hpctrain.allreduce_progress``) inside backward (:func:`span`). The profiler records only
inside the window; stopping it (torch collecting the window's events) falls in the last
profiled step, whose rest in ``step_times.json`` it lengthens, and the files are written
after training, outside ``wall_s`` and the step times. Start it past the first steps, whose
one-off costs (a compile, allocations, the first collective) would otherwise dominate it.
Memory profiling, Python stacks and FLOP counts are not recorded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch.autograd import profiler as autograd_profiler

from hpctrain import options, watchdog
from hpctrain.errors import UsageError
from hpctrain.metrics import write_atomic

SUBDIR = "profile"


def parse(spec: str) -> tuple[int, int]:
    """``START:COUNT`` -> (start, count); UsageError naming the bad value."""
    try:
        start, count = (int(part) for part in str(spec).split(":"))
    except ValueError:
        raise UsageError(f"{_named(f'--profile {spec!r}', spec)}: want START:COUNT, the first "
                         f"local step to profile and how many (e.g. {options.example('20:5')})"
                         ) from None
    if start < 0 or count < 1:
        raise UsageError(f"{_named(f'--profile {spec}', spec)}: START must be >= 0 and "
                         "COUNT >= 1")
    return start, count


def _named(typed: str, spec: str) -> str:
    """``--profile``'s value in a refusal: as typed on the command line, as the field given
    from Python (``RunConfig.profile='20'``, :func:`hpctrain.options.named`)."""
    return options.named(typed, "RunConfig", "profile", spec)


def beyond(spec: str | None, local_steps: int) -> str | None:
    """Before MPI starts: why ``--profile START:COUNT`` cannot profile all it asks for on a
    run whose workers make ``local_steps`` steps each (None if it can). Said, not refused:
    ``bench compare`` gives one window to runs of different sizes."""
    if not spec:
        return None
    start, count = parse(spec)
    if start >= local_steps:
        return f"a worker makes {local_steps} local steps (0..{local_steps - 1}); nothing " \
               "would be profiled"
    if start + count > local_steps:
        return f"a worker makes {local_steps} local steps, so the window ends at step " \
               f"{local_steps - 1}, after {local_steps - start} step(s)"
    return None


def span(name: str) -> contextlib.AbstractContextManager:
    """A ``record_function`` span named ``name`` while a torch profiler records (``--profile``'s
    or a user's own), else nothing: entering one costs tens of microseconds even with no
    profiler on, which a gradient hook (one call per parameter) would pay every step."""
    if getattr(autograd_profiler, "_is_profiler_enabled", True):  # torch's own fast check
        return torch.profiler.record_function(name)
    return _NOTHING


_NOTHING = contextlib.nullcontext()  # reusable: it holds no state


def _exported(profile: torch.profiler.profile, trace: Path, partial: Path) -> bool:
    """Export ``profile``'s trace to ``partial``; whether it is whole. A recent torch writes
    ``<partial>.tmp`` and renames it over ``partial`` once written; torch 2.1 writes
    ``partial`` in place and says nothing when the disk fills, which left a cut-off trace
    under the final name. A placeholder made first tells them apart: still the same file
    after the export, it was written in place, and whole only if it ends as a trace does
    (:func:`_ends_whole`; a recent torch's export is taken as it is)."""
    try:
        placeholder = open(partial, "wb")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(trace)) from None
    with placeholder:
        profile.export_chrome_trace(str(partial))
        try:
            in_place = os.path.samestat(os.fstat(placeholder.fileno()), os.stat(partial))
        except FileNotFoundError:
            return False
    return not in_place or _ends_whole(partial)


def _ends_whole(trace: Path) -> bool:
    """Whether a trace torch wrote in place reached its end: its last key, ``traceName``,
    then the closing brace. torch's stream stops at the first failed write, so what it left
    is a prefix, and its tail tells (``json.load`` of a trace of hundreds of megabytes took
    gigabytes, on every rank of a node at once). Empty: a recent torch that failed left the
    placeholder."""
    with open(trace, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
        tail = f.read()
    return b'"traceName"' in tail and tail.rstrip().endswith(b"}")


def _not_exported(trace: Path, partial: Path) -> OSError:
    """Why torch's exporter wrote no whole ``partial`` (of ``trace``), as an OSError naming
    ``trace``: it says only "Failed to write to log file!" (torch 2.1: nothing) and leaves its
    half-written ``<partial>.tmp``, removed here once a write to it has met the file system's
    own error (a full disk, a quota)."""
    leftover = partial.with_name(partial.name + ".tmp")
    try:
        with open(leftover, "ab") as f:  # a new page: room in the last one would not tell
            f.write(bytes(1 << 16))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return OSError(e.errno, e.strerror, str(trace))
    finally:
        with contextlib.suppress(OSError):  # a read-only mount refuses even a missing file's
            leftover.unlink(missing_ok=True)
    return OSError(errno.EIO, "torch's profiler could not write it", str(trace))


class StepProfiler:
    """Profiles one worker's steps in the ``--profile`` window; a no-op without it.

    The loop calls :meth:`step` before the first step and after each step with the number
    of local steps done, :meth:`close` after the last (stopping a window the run did not reach
    the end of), and :meth:`write` once its clocks have stopped: exporting a large window
    takes seconds, which inside the loop counted as training (and as a step's rest) and, with
    a short ``--stall-timeout``, made the watchdog end a healthy run. ``workers``: how many
    train, for the trace's ``distributedInfo``."""

    def __init__(self, spec: str | None, device: torch.device, out: str | Path, rank: int,
                 workers: int = 1):
        self.start: int | None
        self.start, self.count = parse(spec) if spec else (None, 0)
        self.device, self.rank, self.workers = device, rank, workers
        self.folder = Path(out) / SUBDIR
        self._profile: torch.profiler.profile | None = None  # recording
        self._finished: torch.profiler.profile | None = None  # stopped, not yet written
        self.recorded, self.done = 0, 0  # the window's steps recorded; local steps made
        self.first: int | None = None  # the local step this run started at (a resume: later)

    def step(self, done: int) -> None:
        """Before the first step and after each; ``done``: this worker's local steps so far."""
        if self.start is None:
            return
        self.done = done
        if self.first is None:
            self.first = done
        if done == self.start and self._profile is None:
            self._begin()
        elif self._profile is not None:
            self.recorded = done - self.start
            if self.recorded < self.count:
                self._profile.step()
            else:  # the window's last step: the schedule stops the profiler
                with watchdog.busy("stopping the profiler", done):
                    self._profile.step()
                self.close()

    def region(self, name: str) -> contextlib.AbstractContextManager:
        """A labelled span in the trace (an algorithm's hook: its communication shows up as
        time under the label); nothing while no profiler records (outside the window)."""
        return span(name)

    def close(self) -> None:
        """Stop profiling (a window cut short; after the window's last step, the schedule
        has); its files wait for :meth:`write`."""
        profile, self._profile = self._profile, None
        if profile is not None:
            with watchdog.busy("stopping the profiler", self.done):
                profile.stop()

    def write(self) -> None:
        """Stop profiling if still on, then write the window's files (none when no step was
        recorded), each whole (a job killed meanwhile leaves the earlier file or none, not half
        of one). After training: the export is no step's time."""
        self.close()
        profile, self._finished = self._finished, None
        if profile is None or self.recorded == 0:
            return
        with watchdog.busy("writing the profile"):
            self.folder.mkdir(parents=True, exist_ok=True)
            trace = self.folder / f"rank-{self.rank}.json"
            partial = trace.with_name(f".{trace.name}.partial")
            try:
                if not _exported(profile, trace, partial):
                    raise _not_exported(trace, partial)  # asked while the partial holds its room
            except BaseException:
                with contextlib.suppress(OSError):
                    partial.unlink(missing_ok=True)
                raise
            os.replace(partial, trace)
            by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            table = profile.key_averages().table(sort_by=by, row_limit=25)
            write_atomic(self.folder / f"rank-{self.rank}.txt", f"{self._steps()}\n{table}\n")

    def outcome(self) -> tuple[int, int | None, int]:
        """This worker's (steps recorded, local step it started at, local steps made), which
        rank 0's :meth:`report` reads from every worker (the loop gathers them with its
        summary's counts: async workers make different numbers of local steps)."""
        return self.recorded, self.first, self.done

    def report(self, every: list[tuple[int, int | None, int]] | None) -> None:
        """Rank 0, given every worker's :meth:`outcome`: say which profiled nothing, and why."""
        note = self._missed(every, self.start) if self.rank == 0 and every is not None \
            and self.start is not None else None
        if note:
            print(f"hpctrain: --profile {self.start}:{self.count}: {note}", file=sys.stderr,
                  flush=True)

    def _missed(self, every: list[tuple[int, int | None, int]], start: int) -> str | None:
        """Rank 0's note on the workers (``every``'s (recorded, first, done)) that profiled
        nothing in the window from local step ``start``; None when all profiled."""
        missed = [w for w, (recorded, _, _) in enumerate(every) if not recorded]
        if not missed:
            return None
        if len(missed) == len(every):
            first, done = every[0][1:]
            why = (f"resumed at local step {first}, past step {start}"
                   if first is not None and first > start else
                   f"ended at local step {done}, before step {start}")
            return f"this run {why}; nothing profiled"
        return (f"worker(s) {', '.join(map(str, missed))} (among those that train) ended "
                f"before the window; the others' files are in {self.folder}")

    def _begin(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with warnings.catch_warnings():  # no warm-up: the window is where the user put it
            warnings.simplefilter("ignore", UserWarning)
            steps = torch.profiler.schedule(wait=0, warmup=0, active=self.count, repeat=1)
        self._profile = torch.profiler.profile(activities=activities, schedule=steps,
                                               on_trace_ready=self._keep, record_shapes=True)
        self._profile.start()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            # torch adds its own for torch.distributed's group (--sync-backend torch)
            self._profile.add_metadata_json("distributedInfo", json.dumps(
                {"rank": self.rank, "world_size": self.workers}))

    def _keep(self, profile: torch.profiler.profile) -> None:
        """The profiler has stopped: its events wait for :meth:`write`."""
        self._finished = profile

    def _steps(self) -> str:
        """The table's first line: torch numbers the window's steps from 0; which local steps
        they are, and whether the run ended inside the window."""
        assert self.start is not None  # a window was asked for: there is a trace
        last = self.start + self.recorded - 1
        cut = (f"the window {self.start}:{self.count} was cut short: the run ended after local "
               f"step {last}, and the last ProfilerStep span is the loop's exit; "
               ) if self.recorded < self.count else ""
        steps = f"local step {last}" if last == self.start else \
            f"local steps {self.start} to {last}"
        return f"{steps} ({cut}ProfilerStep#0 is local step {self.start})"
