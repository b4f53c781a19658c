"""TensorBoard event files of a run (``--tensorboard``): ``<out>/tensorboard/events.*``.

Rank 0 writes, through torch's ``SummaryWriter`` (which needs the ``tensorboard`` package):

- ``train/loss`` (rank 0's mean over its steps since the last entry: lock-step runs write one
  at every multiple of ``--log-every`` updates, so a resumed run's fall where an
  uninterrupted run's do, the first after the resume then over fewer steps; asynchronous
  ones every ``--log-every`` of rank 0's steps; at the end over the run's last few),
  ``train/lr``, ``train/epoch`` (the update count in epochs, fractional),
  ``train/samples_per_s`` (all workers, from global progress since the last entry) and, for
  asynchronous runs, ``train/staleness`` (mean over rank 0's pushes since the last entry);
  ``train/loss_scale`` (fp16's loss scale); ec's ``train/ce_loss`` and
  ``train/distill_loss`` (its ``train/loss`` mixes them from the first aggregation on);
- ``test/accuracy`` and ``test/loss`` per snapshot (a test loss that is not finite, a diverged
  model's, ``null`` in ``metrics.jsonl``, is left out: the curve has a gap there);
- at the start, ``config`` (the run's ``config.json``, as text) and its settings as HParams
  session info (:meth:`Board.describe`); at the end, ``summary/final_test_acc``,
  ``summary/best_test_acc`` and ``summary/final_test_loss``, the HParams dashboard's metrics
  with the other tags' last values, and the session's end.

Every entry's step is the global update count (each algorithm's: one worker's step, an
average of K workers' gradients, a push), its wall time when that update was made or that
snapshot taken (:class:`WallClock`, from the loop's start), so after-training scores line
up with the training curves. Steps do not line up across algorithms: ``train/epoch`` says
which epoch each step is, to compare them by.

A resumed run writes a new event file in the same folder; before that, rank 0 removes from
the earlier files the entries of the checkpoint's update on (:func:`trim`: they were trained
again), but the training entries of that update itself (made by the steps the checkpoint
holds: the resumed run's first is at a later update; a run checkpointed at its end has none
to make), also when resumed without ``--tensorboard``, and the earlier description (the
resumed run writes its own). Its online scores before the checkpoint are kept, not logged
twice; a curve scored after training (``--eval after``, ma's and ec's) is logged whole again,
so an earlier attempt's ``test/accuracy`` and ``test/loss`` go (an attempt killed while
writing its outputs had logged them); the scores of snapshots an earlier attempt took keep
the wall time they were taken at.

A run resumed on another number of workers counts its updates in epochs of another length
(:mod:`hpctrain.checkpoint.resize`), so the step axis changes units at the checkpoint: the
earlier entries are in the earlier run's updates, removed from the checkpoint's own count,
the resumed run's in its own (grown, it goes on below that count, its first entries beside
the earlier run's last; ``train/epoch`` goes on).

``tensorboard --logdir runs/`` shows every run of a folder side by side, and its HParams
dashboard tells them apart by their settings.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from hpctrain import options
from hpctrain.errors import UsageError
from hpctrain.metrics import write_atomic
from hpctrain.switches import switch

if TYPE_CHECKING:
    from torch.utils.tensorboard.writer import FileWriter, SummaryWriter

SUBDIR = "tensorboard"


def check_installed() -> None:
    """UsageError (before MPI starts) when ``--tensorboard`` cannot write."""
    if importlib.util.find_spec("tensorboard") is None:
        given = options.named("--tensorboard", "RunConfig", "tensorboard", True)
        raise UsageError(f"{given} needs the tensorboard package: pip install tensorboard "
                         "(or pip install \"hpctrain[tensorboard]\"; in a checkout, make setup "
                         "installs it)")


class WallClock:
    """The wall time of the moment ``t`` seconds into training, over a resumed run's attempts.

    Each attempt counts its seconds on from those trained before it, from its own start
    (:meth:`start`, when the loop's clock starts): a snapshot an earlier attempt took is
    stamped when it was taken, not moved by the time the job was down, nor by what an attempt
    did before training (scoring restored snapshots, waiting for the workers). Checkpoints keep
    the attempts (:meth:`state_dict`).
    """

    def __init__(self) -> None:
        self.attempts: list[tuple[float, float]] = [(0.0, time.time())]
        """Per attempt: the seconds trained before it, and the wall time of second 0 for it."""
        self.running = False
        """Whether this attempt's training started (:meth:`start`): until then its second 0
        is only a guess."""

    def resume(self, earlier: list, elapsed: float) -> None:
        """Go on from ``elapsed`` seconds of training; ``earlier``: the attempts before, as
        :meth:`state_dict` gave them (none from a checkpoint older than this clock)."""
        self.attempts = [*((float(a), float(b)) for a, b in earlier),
                         (elapsed, time.time() - elapsed)]

    def start(self, elapsed: float = 0.0) -> None:
        """This attempt's training starts now, ``elapsed`` seconds in (a resumed run's)."""
        self.attempts[-1] = (elapsed, time.time() - elapsed)
        self.running = True

    def _attempt_of(self, t: float) -> int:
        """The attempt that second ``t`` is of: the last to start before it (an attempt's
        last second, its checkpoint's, is its own: the next goes on after it); the first
        for second 0."""
        return max((i for i, (before, _) in enumerate(self.attempts) if before < t), default=0)

    def this_attempt(self, t: float) -> bool:
        """Whether second ``t`` is this attempt's (not an earlier one's)."""
        return self._attempt_of(t) == len(self.attempts) - 1

    def __call__(self, t: float) -> float:
        return self.attempts[self._attempt_of(t)][1] + t

    def state_dict(self) -> list[list[float]]:
        return [list(a) for a in self.attempts]


DESCRIPTION = ("config/", "_hparams_/")  # the tags of a run's description (Board.describe)
TRAINING = "train/"  # the training entries' tags (live.Watch)
CURVE = ("test/accuracy", "test/loss")  # the curve's tags, logged whole after training
SESSION_END = "_hparams_/session_end_info"  # a failed attempt's end: the run goes on
STAGING = ".trimmed"  # no "tfevents" in it: TensorBoard never reads a half-written copy


def trim(folder: Path, before: int, described: bool = False,
         rescored: tuple[str, ...] = ()) -> None:
    """Rank 0, before a run writes entries: the event files in ``folder`` (earlier attempts')
    keep only their entries of updates before ``before``, and the training entries of update
    ``before`` (> 0) itself, which a run resumed there does not make again; ``described``:
    the run writes its own description (:meth:`Board.describe`), which replaces theirs;
    ``rescored``: tags the run logs at every update (a curve scored after training), whose
    earlier entries all go. An earlier attempt's HParams session end (failed: it raised)
    goes too, the run going on (also resumed without TensorBoard, which ends none).

    TensorBoard's own viewer hid the rest already (``purge_step``), but readers of one file at a
    time (tbparse, EventAccumulator on a file) showed them as the run's. Each file is replaced
    whole (written aside, then renamed over it) or, left without entries, removed: a run
    killed meanwhile leaves every file either as it was or trimmed, and the next resume trims
    what is left."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    def entry(event: Event) -> bool:
        return not event.HasField("file_version")  # else the file's header, always kept

    def kept(event: Event) -> bool:
        if not entry(event):
            return True
        tags = [v.tag for v in event.summary.value]
        if described and any(tag.startswith(DESCRIPTION) for tag in tags) \
                or any(tag in rescored or tag == SESSION_END for tag in tags):
            return False
        return event.step < before or 0 < before == event.step and bool(tags) \
            and all(tag.startswith(TRAINING) for tag in tags)

    for path in sorted(folder.glob("events.*")):
        records = [(r, Event.FromString(r)) for r in RawEventFileLoader(str(path)).Load()]
        keep = [(r, event) for r, event in records if kept(event)]
        if len(keep) == len(records):
            continue
        if not any(entry(event) for _, event in keep):
            path.unlink()
            continue
        trimmed = io.BytesIO()
        writer = RecordWriter(trimmed)
        for record, _ in keep:
            writer.write(record)
        write_atomic(folder / STAGING, trimmed.getvalue())
        os.replace(folder / STAGING, path)


def hparams(settings: dict, config: dict | None = None) -> dict:
    """``settings`` as HParams values: numbers and strings as they are, booleans and lists as
    ``config.json`` writes them (torch's hparams would take booleans for numbers); an option
    left None takes what the run resolved it to (``config``'s ``run_info`` ``resolved``: ma's
    ``tau`` 20, a store's ``lam`` and ``shards``), else is left out (the dashboard shows no
    value)."""
    resolved = ((config or {}).get("run_info") or {}).get("resolved") or {}
    took = {name: value for part in resolved.values() if isinstance(part, dict)
            for name, value in part.items()}
    settings = {name: took.get(name) if value is None else value
                for name, value in settings.items()}
    return {name: json.dumps(value) if isinstance(value, bool | list | dict) else value
            for name, value in settings.items() if value is not None}


def _session_failed():
    """The HParams session's end as failed (torch's ``hparams`` writes success only)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData(
        session_end_info=plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_FAILURE),
        version=metadata.PLUGIN_DATA_VERSION)
    return Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG,
                                        metadata=metadata.create_summary_metadata(data))])


_hook: list = []  # the threading.excepthook _quiet replaced, while a Board writes


def _quiet(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook while a Board writes: the OSError of TensorBoard's writer thread (a
    full disk) is not printed as its traceback, since the writer raises it again at its next
    call, where the run says it in one line (``HPCTRAIN_DEBUG``: printed too); else as before."""
    if not issubclass(args.exc_type, OSError) \
            or not type(args.thread).__module__.startswith("tensorboard.") \
            or switch("HPCTRAIN_DEBUG", default=False):
        _hook[0](args)


def _hush(on: bool) -> None:
    """Install :func:`_quiet` (``on``), or give back the hook it replaced."""
    if on and not _hook:
        _hook.append(threading.excepthook)
        threading.excepthook = _quiet
    elif not on and _hook:
        if threading.excepthook is _quiet:  # else another replaced it since: theirs stays
            threading.excepthook = _hook[0]
        _hook.clear()


def _file_writer(writer: SummaryWriter) -> FileWriter:
    """``writer``'s event file writer."""
    # torch's SummaryWriter.__init__ sets file_writer to None before _get_file_writer makes
    # it, so its declared type is None: a gap in torch's annotations, not a None here.
    return writer.file_writer  # type: ignore[return-value]


class Board:
    """The run's event file; every method is a no-op unless ``enabled`` (rank 0 asked).

    A run resumed from the checkpoint of update ``resumed`` (the earlier run's count, also
    after a resize) removes the earlier run's entries from that update on from their files
    (:func:`trim`; they were trained again), also when not ``enabled`` but ``rank0`` (the
    entries stay the run's), and stamps its own by ``clock`` (seconds into training to wall
    time); the entries of this attempt's times given before :meth:`start` wait for it. A fresh
    run (``resumed`` 0) removes every earlier entry: a failed attempt's, in a folder it left
    without a summary. ``rescored``: tags this run logs whole (:func:`trim`), when enabled.
    """

    def __init__(self, out: str | Path, enabled: bool, resumed: int = 0,
                 clock: WallClock | None = None, rank0: bool = False,
                 rescored: tuple[str, ...] = ()) -> None:
        self.writer: SummaryWriter | None = None
        self.clock = clock or WallClock()
        self._waiting: list[tuple[str, float, int, float]] = []  # until the clock starts
        # The HParams session: started (describe) at step 0; the last step logged since.
        self._session: int | None = None
        folder = Path(out) / SUBDIR
        self._file = folder  # the event file, once the writer made it (errors name it)
        if (enabled or rank0 and resumed) and folder.is_dir() \
                and importlib.util.find_spec("tensorboard") is not None:
            trim(folder, resumed, described=enabled, rescored=rescored if enabled else ())
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            _hush(True)
            # The purge too: a TensorBoard already showing the earlier entries drops them,
            # those trim keeps excepted (a viewer reading the folder afresh purges too).
            try:
                with self._writing():
                    self.writer = SummaryWriter(str(folder),
                                                purge_step=resumed + 1 if resumed else 0)
            except BaseException:
                _hush(False)
                raise
            self._file = getattr(_file_writer(self.writer).event_writer, "_file_name", folder)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """The writer's OSError (a full disk, a quota: met by its thread, raised at the next
        call) with the event file's name, which its own message lacks."""
        try:
            yield
        except OSError as e:
            if e.filename is not None:
                raise
            raise OSError(e.errno, e.strerror, str(self._file)) from e

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def scalar(self, tag: str, value: float | None, step: int, t: float | None = None) -> None:
        """``value`` of ``tag`` at global update ``step`` (``t``: seconds into training)."""
        if self.writer is None or value is None:
            return
        if self._session is not None:
            self._session = max(self._session, step)
        if t is not None and not self.clock.running and self.clock.this_attempt(t):
            self._waiting.append((tag, value, step, t))
            return
        with self._writing():
            self.writer.add_scalar(tag, value, step,
                                   walltime=None if t is None else self.clock(t))

    def start(self, elapsed: float = 0.0) -> None:
        """Training starts now, ``elapsed`` seconds in: its second ``elapsed`` is now, and the
        entries that waited for it (the first snapshot's score) are written."""
        self.clock.start(elapsed)
        self._write_waiting()

    def _write_waiting(self) -> None:
        writer = self.writer
        with self._writing():
            for tag, value, step, t in self._waiting:
                assert writer is not None  # entries wait only where there is a writer
                writer.add_scalar(tag, value, step, walltime=self.clock(t))
        self._waiting = []

    def describe(self, config: dict, settings: dict) -> None:
        """The run's ``config`` (``config.json``'s content) as text, and its ``settings``
        (flat: name to value; those left None as ``config`` resolved them) as HParams
        session info: each run its own, in its own file, so
        that the HParams dashboard of a folder of runs lists them all, with every scalar tag's
        last value as a metric (the experiment is made from the runs: none is written, or
        TensorBoard would take one run's for all)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        text = "\n".join("    " + line for line in json.dumps(config, indent=2).splitlines())
        _, session_start, _ = hparams_summaries(hparams(settings, config), {})
        with self._writing():
            self.writer.add_text("config", text, 0)  # indented: markdown shows it as code
            _file_writer(self.writer).add_summary(session_start, 0)
        self._session = 0

    def finish(self, step: int, metrics: dict[str, float]) -> None:
        """The run's end at update ``step``: its ``metrics`` (summary fields) as
        ``summary/<name>``, and the HParams session ended (successfully)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        for name, value in metrics.items():
            self.scalar(f"summary/{name}", value, step)
        _, _, session_end = hparams_summaries({}, {})
        with self._writing():
            _file_writer(self.writer).add_summary(session_end, step)
        self._session = None

    def close(self, raising: bool = True) -> None:
        """What waits written, and the file closed. Flushed first: the writer's close drops
        the error its thread met (the last entries lost without a word). ``raising`` False:
        on the way out of another error, which this one (the same full disk's) would hide:
        the run raised (Ctrl-C in one process, an error on rank 0), so a session described
        and not finished ends as failed at the last step logged, which the HParams dashboard
        shows (without, it was a run going on, its last training entries its metrics)."""
        if self.writer is None:
            return
        try:
            self._write_waiting()  # as the clock guesses: the run ends before training
            if not raising and self._session is not None:
                with self._writing():
                    _file_writer(self.writer).add_summary(_session_failed(), self._session)
            with self._writing():
                self.writer.flush()
        except OSError:
            if raising:
                raise
        finally:  # closed: what still waits (its write failed) goes with the writer
            writer, self.writer, self._waiting = self.writer, None, []
            with contextlib.suppress(OSError):  # flushed, or its thread ended with the error
                writer.close()
            _hush(False)
