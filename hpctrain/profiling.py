"""``--profile START:COUNT``: torch.profiler over a window of training steps, on every worker.

Each worker profiles its local steps ``START`` to ``START + COUNT - 1`` (counted from 0, as
``HPCTRAIN_INJECT`` counts them) and writes ``<out>/profile/rank-<r>.json``, a Chrome trace
(chrome://tracing, Perfetto or TensorBoard's trace viewer; one ``ProfilerStep#`` span per
step), and ``rank-<r>.txt``, torch's table of the operators that took the most time. On a GPU
the CUDA kernels are recorded too. The loop labels the algorithm's hooks
(``hpctrain.synchronize``: ssgd's allreduce completing; ``hpctrain.apply``: the step, an async
push; ``hpctrain.after_update``: MA's and EC's rounds), so their communication shows as time
under the label. The profiler runs only inside the window, so the other
steps cost nothing; start it past the first steps, whose one-off costs (a compile,
allocations, the first collective) would otherwise dominate it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

import torch

from hpctrain.errors import UsageError
from hpctrain.metrics import write_atomic

SUBDIR = "profile"


def parse(spec: str) -> tuple[int, int]:
    """``START:COUNT`` -> (start, count); UsageError naming the bad value."""
    try:
        start, count = (int(part) for part in str(spec).split(":"))
    except ValueError:
        raise UsageError(f"--profile {spec!r}: want START:COUNT, the first local step to "
                         "profile and how many (e.g. 20:5)") from None
    if start < 0 or count < 1:
        raise UsageError(f"--profile {spec}: START must be >= 0 and COUNT >= 1")
    return start, count


class StepProfiler:
    """Profiles one worker's steps in the ``--profile`` window; a no-op without it.

    The loop calls :meth:`step` before the first step and after each step with the number
    of local steps done, and :meth:`close` after the last (a window the run did not reach the
    end of is written as far as it got)."""

    def __init__(self, spec: str | None, device: torch.device, out: str | Path, rank: int):
        self.start, self.count = parse(spec) if spec else (None, 0)
        self.device, self.rank = device, rank
        self.folder = Path(out) / SUBDIR
        self._profile: torch.profiler.profile | None = None
        self.began, self.done = False, 0
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
            self._profile.step()  # the last step of the window writes the files
            if done == self.start + self.count:
                self.close()

    def region(self, name: str) -> contextlib.AbstractContextManager:
        """A labelled span in the trace (an algorithm's hook: its communication shows up as
        time under the label); nothing outside the window."""
        return torch.profiler.record_function(name) if self._profile else contextlib.nullcontext()

    def close(self) -> None:
        """Stop profiling (writing what a window cut short recorded); after the loop, rank 0
        says so when the run ended before the window."""
        profile, self._profile = self._profile, None
        if profile is not None:
            profile.stop()
        elif self.start is not None and not self.began and self.rank == 0:
            why = (f"resumed at local step {self.first}, past step {self.start}"
                   if self.first is not None and self.first > self.start else
                   f"ended at local step {self.done}, before step {self.start}")
            print(f"hpctrain: --profile {self.start}:{self.count}: this run {why}; nothing "
                  "profiled", file=sys.stderr, flush=True)

    def _begin(self) -> None:
        self.began = True
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with warnings.catch_warnings():  # no warm-up: the window is where the user put it
            warnings.simplefilter("ignore", UserWarning)
            steps = torch.profiler.schedule(wait=0, warmup=0, active=self.count, repeat=1)
        self._profile = torch.profiler.profile(activities=activities, schedule=steps,
                                               on_trace_ready=self._write, record_shapes=True)
        self._profile.start()

    def _write(self, profile: torch.profiler.profile) -> None:
        """The trace and the table, each written whole (a job killed meanwhile leaves the
        earlier file or none, not half of one)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"rank-{self.rank}.json"
        partial = trace.with_name(f".{trace.name}.partial")
        profile.export_chrome_trace(str(partial))
        os.replace(partial, trace)
        by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = profile.key_averages().table(sort_by=by, row_limit=25)
        # torch numbers the window's steps from 0: say which local steps they are
        steps = f"local steps {self.start} to {self.start + self.count - 1} (ProfilerStep#0 " \
                f"is local step {self.start})"
        write_atomic(self.folder / f"rank-{self.rank}.txt", f"{steps}\n{table}\n")
