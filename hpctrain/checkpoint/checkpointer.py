"""Resuming and writing checkpoints from inside a training loop, collectively over the ranks.

The loops register the objects that make up their state (anything with ``state_dict`` and
``load_state_dict``) and call :meth:`Checkpointer.restore` once, then :meth:`~Checkpointer.due`
before each update and :meth:`~Checkpointer.save` when it says so; this class owns
the gathering to rank 0, the snapshot files, the schedule and the bookkeeping, so that no loop
repeats them. It takes plain values, not the command line's options.

The position in the data is the update count: epoch ``updates // steps`` at step
``updates % steps``, whose order the shuffle package derives from (seed, epoch) alone (an
asynchronous worker keeps its own position among its per-rank counters).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hpctrain import faults, options, watchdog, weights
from hpctrain.checkpoint import stop
from hpctrain.checkpoint.folder import (
    Loaded,
    layout_gap,
    listing,
    make_folder,
    newest,
    number,
    other_layout,
    remove_stale,
    resumed,
    save,
)
from hpctrain.checkpoint.format import encode_parts
from hpctrain.checkpoint.policy import OFF, Every
from hpctrain.checkpoint.resize import Resize
from hpctrain.checkpoint.rng import rng_state, set_rng_state
from hpctrain.errors import UsageError, plural
from hpctrain.evaluate import Snapshot
from hpctrain.metrics import write_atomic
from hpctrain.pickled import large_messages
from hpctrain.rank0_flag import Rank0Flag
from hpctrain.tensorboard import WallClock

_LATE, _STOP = 1, 2  # the bits of rank 0's verdict (Checkpointer._verdict)
# Updates between SIGUSR1 verdicts in epochs mode: a worker waits for rank 0's verdict of
# that many updates before, so ma's and ec's workers, which meet only every --tau steps, are
# not held to rank 0's pace step by step (5% slower with --jitter 0.5 at one; BENCHMARKS.md).
SIGNAL_EVERY = 16



def _check_models_fit(path: Path, objects: dict, states: dict) -> None:
    """UsageError on every rank (each restores the same file) naming what of a checkpoint's
    model does not fit this run's, whose code changed since: load_state_dict's lines of
    RuntimeError, exit 1, where --init-from's mismatch is one line, exit 2."""
    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module) and name in states:
            problem = weights.mismatch(obj, states[name])
            if problem:
                raise UsageError(f"{resumed()}: the model in {path} does not fit this run's "
                                 f"model (was its code changed?): {problem}")

class Checkpointer:
    """Resuming and writing checkpoints from a training loop.

    ``shared`` objects (``state_dict``/``load_state_dict``) are the same on every rank and saved
    from rank 0; ``per_rank`` objects are gathered from every rank and each gets its own back,
    as do its counters and random-number state. Snapshots are rank 0's, given to every rank on
    resume, or with ``per_rank_snapshots`` each rank's own. With ``comm`` every rank calls
    :meth:`restore`, and :meth:`save` at the same update, collectively.

    ``every`` (``--checkpoint-every``; None: never) ``Ne`` makes one due each time the update
    count passes a multiple of N epochs (``steps`` updates each); ``N`` seconds, when rank 0's
    clock says so (lock-step loops only: the verdict is a broadcast per step). With
    ``stop_on_signal``, SIGUSR1 on rank 0 makes one due and sets :attr:`stopping`: the loop
    saves it and raises :meth:`stopped` (:mod:`~hpctrain.checkpoint.stop`). Lock-step loops
    checkpoint at the next update (in epochs mode within 2 x :data:`SIGNAL_EVERY`);
    asynchronous ones, whose indices are tickets, pass ``close_tickets`` (False: every ticket
    was out): rank 0 calls it, every worker's next claim is :data:`~stop.CLOSED`, which
    makes a checkpoint due. Call :meth:`close` after the loop. Checkpoints go to
    ``folder``; ``resume`` is the folder to resume from (None: a fresh run). ``header``: what
    each checkpoint's header records about the run (``algo``, ``ranks``, ``args``: the run's
    configuration that :func:`~hpctrain.checkpoint.policy.check` compares); ``workers`` (the
    size of ``comm``) is added here. ``resize`` (a :class:`~hpctrain.checkpoint.resize.Resizer`)
    turns a checkpoint of another number of workers into this run's per-worker states; without
    it such a checkpoint is refused. ``clock`` (a :class:`~hpctrain.tensorboard.WallClock`):
    its attempts go into the checkpoints, and a resume goes on with them.
    """

    def __init__(self, comm, steps: int, total_steps: int, *, shared: dict,
                 per_rank: dict | None = None, per_rank_snapshots: bool = False,
                 every: str | None, folder: Path, resume: str | None, header: dict,
                 resize: Callable[[dict, list[dict]], tuple[list[dict], Resize]] | None = None,
                 stop_on_signal: bool = False,
                 close_tickets: Callable[[], bool] | None = None,
                 clock: WallClock | None = None) -> None:
        self.comm, self.steps, self.total = comm, steps, total_steps
        self.snapshots_per_rank = per_rank_snapshots
        self.rank = comm.Get_rank() if comm is not None else 0
        self.workers = comm.Get_size() if comm is not None else 1
        self.shared, self.per_rank = shared, per_rank or {}
        self.resume_dir = resume
        self.header = {**header, "workers": self.workers}
        self.enabled = every is not None and every != OFF
        self.folder = Path(folder)
        schedule = Every.parse(every) if every is not None and self.enabled else None
        self.by_progress = schedule is not None and schedule.by_progress
        self.every = schedule.amount if schedule is not None else 0.0
        self.interval = schedule.interval_updates(steps) \
            if schedule is not None and schedule.by_progress else 0
        self.next_due = self.interval
        self.written = 0      # snapshots (of each rank) already in snapshots/
        self.refs: list[list[dict]] = []  # their files, per rank that saves them
        self.count, self.seconds = 0, 0.0
        self.resumed_from: list[int] = []
        self.resized: list[dict] = []
        self.resize = resize
        self.clock = clock or WallClock()
        self.last = time.perf_counter()
        self._flag = Rank0Flag(comm)
        self.on_signal = self.enabled and stop_on_signal
        self.stopping = False  # the last due(): checkpoint, then stop (SIGUSR1)
        self.close_tickets = close_tickets
        self._closing = False  # rank 0 called close_tickets (once)
        self._saved_at = -1  # the update of the last checkpoint this run wrote
        self._retire: list[Path] = []  # rank 0: files a resize left numbered beyond this run
        # Installed here unless hpctrain train has (from its start); put back by close().
        self._handler = stop.install() if self.on_signal and not stop.installed() else None

    def restore(self, snapshots: list, found: Loaded | None = None) -> dict:
        """With ``resume``: load the newest valid checkpoint (``found``: what rank 0 already
        loaded with :func:`~hpctrain.checkpoint.folder.newest`) into the registered objects and
        ``snapshots``; return this rank's counters (``updates``, ...), else ``{}``; ``elapsed``
        is rank 0's on every rank, so that the ranks' snapshots share one clock."""
        if self.resume_dir is None:
            return {}
        common: tuple | None = None  # rank 0's, then every rank's
        parts: list[tuple[dict, list[Snapshot] | None]] | None = None  # rank 0's, per rank
        if self.rank == 0:
            loaded = found or newest(self.resume_dir)
            payload, restored = loaded.payload, loaded.snapshots
            # Named here, on rank 0, in one line: a part the file lacks (another version's
            # or program's layout, a state this algorithm keeps) was a KeyError on some rank.
            gap = layout_gap({"header": loaded.header, "payload": payload}) or next(
                (f"no payload['shared'][{name!r}]" for name in self.shared
                 if name not in payload["shared"]), None)
            if gap:
                raise other_layout(loaded.path, gap)
            ranks, refs, position = payload["ranks"], payload["snapshots"], \
                loaded.header["updates"]
            resized = list(payload["book"].get("resized", []))
            if len(ranks) != self.workers:
                ranks, refs, restored, record = self._resize(loaded.header, ranks, refs,
                                                             restored)
                position = record.resumed_at
                resized.append(record.record())
                # More workers, shorter epochs: the old run's later checkpoints have higher
                # numbers than this run's next ones, and would be taken as newer.
                self._retire = [p for p in listing(self.folder) if number(p) > position]
            self._carry_snapshots(loaded.path.parent, refs)
            # One clock: every rank goes on from rank 0's elapsed time (each rank's own, a few
            # ms apart, made the curve's t go back where another rank scored the next point).
            elapsed = ranks[0]["counters"].get("elapsed", 0.0)
            common = (loaded.path, loaded.header, payload["shared"], payload["book"], refs,
                      None if self.snapshots_per_rank else restored[0], position, resized,
                      elapsed)
            parts = [(ranks[r], restored[r] if self.snapshots_per_rank else None)
                     for r in range(self.workers)]
        if self.comm is not None:  # the snapshots together may pass 2 GiB
            common = large_messages(self.comm).bcast(common, root=0)
            mine, own = large_messages(self.comm).scatter(parts, root=0)
        else:
            assert parts is not None  # one process: rank 0, which read them
            mine, own = parts[0]
        assert common is not None  # rank 0 read it, the others have its broadcast
        path, header, shared, book, self.refs, first, position, self.resized, elapsed = common
        counters = {**mine["counters"], **({"elapsed": elapsed} if "elapsed" in
                                           mine["counters"] else {})}
        _check_models_fit(path, {**self.shared, **self.per_rank}, {**shared, **mine})
        for name, obj in self.shared.items():
            obj.load_state_dict(shared[name])
        for name, obj in self.per_rank.items():
            if name in mine:  # a state the run did not keep before (fp16's scaler) starts anew
                obj.load_state_dict(mine[name])
        set_rng_state(mine["rng"])
        # own: this rank's, where each rank saved its own (then never None)
        snapshots[:] = first if own is None else own
        self.written = len(snapshots)
        self.count, self.seconds = book["checkpoints"], book["checkpoint_s"]
        # The checkpoint's own count, as config.json's resumes and resized[].updates say
        # (resized[].resumed_at is the same place in this run's updates).
        self.resumed_from = [*book["resumed_from"], header["updates"]]
        self.clock.resume(book.get("clock", []), counters.get("elapsed", 0.0))
        self.next_due = (position // self.interval + 1) * self.interval \
            if self.by_progress else 0
        if self.rank == 0:
            note = f"; resized from {header['workers']} to {self.workers} workers, going " \
                   f"on at update {position}" if header["workers"] != self.workers else ""
            print(f"hpctrain: resuming from {path} (update {header['updates']}{note})",
                  file=sys.stderr, flush=True)
        self.last = time.perf_counter()
        return counters

    def _carry_snapshots(self, source: Path, refs: list[list[dict]]) -> None:
        """Rank 0, resuming from another folder than it writes to (``--checkpoint-dir``):
        copy the snapshot files the checkpoint lists, which this run's checkpoints list too."""
        if source.resolve() == self.folder.resolve():
            return
        make_folder(self.folder / "snapshots")
        for ref in (ref for rank in refs for ref in rank):
            try:
                blob = (source / ref["file"]).read_bytes()
            except OSError:  # reported by load_newest, and left out of the curve
                continue
            write_atomic(self.folder / ref["file"], blob, durable=True)

    def _resize(self, header: dict, ranks: list[dict], refs: list, restored: list
                ) -> tuple[list[dict], list, list, Resize]:
        """The checkpoint's per-worker states, snapshot references and snapshots for this
        run's workers (per-rank snapshots: new worker ``j`` takes old worker ``j mod K``'s)."""
        if self.resize is None:
            given = options.named(f"--resume {self.resume_dir}", "CheckpointConfig", "resume",
                                  self.resume_dir)
            raise UsageError(f"{given}: the checkpoint is of "
                             f"{plural(len(ranks), 'worker')}, not {self.workers}, and this run "
                             "cannot be resized")
        ranks, record = self.resize(header, ranks)
        if self.snapshots_per_rank:
            refs = [list(refs[j % len(refs)]) for j in range(self.workers)]
            restored = [restored[j % len(restored)] for j in range(self.workers)]
        return ranks, refs, restored, record

    def due(self, updates: int) -> bool:
        """Whether a checkpoint is due after update ``updates`` (collective in seconds mode and
        with ``stop_on_signal``)."""
        if not self.enabled:
            return False
        # Only marks within the run count: async workers stop at the total, so a mark past
        # it would keep some of them waiting at the checkpoint's barrier.
        marked = self.by_progress and self.next_due <= self.total and updates >= self.next_due
        if self.close_tickets is not None:
            return self._ticket_due(updates, self.close_tickets) or marked
        if self.by_progress and not self.on_signal:
            return marked
        verdict = self._verdict(updates)
        self.stopping = bool(verdict & _STOP) and updates < self.total  # else: the run is done
        return marked or bool(verdict & _LATE) or self.stopping

    def _verdict(self, updates: int) -> int:
        """Rank 0's word on update ``updates``, the same on every rank: _LATE (seconds mode:
        the interval has passed) and _STOP (SIGUSR1 came) bits."""
        if self.comm is None or self.workers == 1:
            # The update just checkpointed, asked again (the loop's continue): nothing new,
            # as with several ranks. An interval shorter than a write made it due again at
            # once, and the run wrote the same checkpoint forever.
            return 0 if updates == self._saved_at else self._rank0_verdict()
        if self.by_progress and updates % SIGNAL_EVERY and updates < self.total:
            return 0  # epochs mode asks only for SIGUSR1: a word every SIGNAL_EVERY updates
        # Rank 0's verdict reaches every rank one step late (rank0_flag), so all ranks
        # checkpoint at the same update without a blocking message.
        verdict = self._flag.receive()
        # The verdict for the next update: none after the last, after a stop, or right after a
        # checkpoint (the clock restarts when it is written).
        if updates < self.total and not verdict & _STOP:
            self._flag.post(self._rank0_verdict() if self.rank == 0 and not verdict else 0)
        return verdict

    def _ticket_due(self, ticket: int, close_tickets: Callable[[], bool]) -> bool:
        """Asynchronous workers: whether ``ticket`` was claimed after rank 0 closed the
        tickets on SIGUSR1, which rank 0 does here. Whether to stop after the checkpoint is
        rank 0's word, given in :meth:`save` (a worker waiting at a mark claims nothing)."""
        if self.on_signal and self.rank == 0 and not self._closing and stop.received():
            self._closing = True
            self.stopping = close_tickets()
        return ticket >= stop.CLOSED

    def _rank0_verdict(self) -> int:
        late = not self.by_progress and time.perf_counter() - self.last >= self.every
        return (_LATE if late else 0) | (_STOP if self.on_signal and stop.received() else 0)

    def stopped(self, updates: int) -> stop.Stopped:
        """What ends the run after the checkpoint of ``updates`` when :attr:`stopping`."""
        return stop.Stopped(updates, self.total, str(self.folder))

    def close(self) -> None:
        """After the loop (or before raising :meth:`stopped`): the last verdict received and
        SIGUSR1's handler as it was."""
        self._flag.close()
        self.release_signal()

    def release_signal(self) -> None:
        """SIGUSR1's handler as it was (this rank only, no collective): also where this rank
        alone raised, so that a script's next run, or its own handler, gets the signal."""
        stop.restore(self._handler)
        self._handler = None

    def save(self, updates: int, counters: dict, snapshots: list) -> None:
        """Write the checkpoint of update ``updates`` (collective; rank 0 writes, the others
        wait for it beating the watchdog). ``counters``: this rank's plain numbers
        (``elapsed``, samples, ...), given back by restore. The update just saved, asked again
        (the loop's ``continue``, a SIGUSR1 verdict received after it), is not written twice;
        :attr:`stopping` stays as :meth:`due` set it."""
        if updates == self._saved_at:  # the same on every rank: all return
            return
        start = time.perf_counter()
        mine = to_host({name: obj.state_dict() for name, obj in self.per_rank.items()})
        mine["rng"] = rng_state()
        mine["counters"] = {**counters, "updates": updates}
        new = snapshots[self.written:] if self.snapshots_per_rank or self.rank == 0 else []
        self.written = len(snapshots)
        gathered = [(mine, new)]
        if self.comm is not None:
            gathered = large_messages(self.comm).gather((mine, new), root=0)
        if self.rank == 0:  # a long write is progress, not a stall
            with watchdog.busy("writing checkpoint", updates):
                self._write(updates, [m for m, _ in gathered],
                            [n for _, n in gathered] if self.snapshots_per_rank else [new])
        if self.comm is not None and self.workers > 1:
            watchdog.wait_beating(self.comm, "waiting for rank 0's checkpoint", updates,
                                  bounded=True)
        if self.close_tickets is not None and self.comm is not None:
            self.stopping = self.comm.bcast(self.stopping, root=0)  # rank 0 closed the tickets
        self.next_due = (updates // self.interval + 1) * self.interval if self.by_progress else 0
        self._saved_at = updates
        self.count += 1
        self.seconds += time.perf_counter() - start
        self.last = time.perf_counter()

    def _write(self, updates: int, ranks: list[dict], fresh: list[list]) -> None:
        """Rank 0: the new snapshot files, then the checkpoint."""
        if not self.refs:
            self.refs = [[] for _ in fresh]
        make_folder(self.folder / "snapshots")  # each new folder fsynced into its parent
        remove_stale(self.folder)
        for r, snaps in enumerate(fresh):
            for snap in snaps:
                rank = f"-r{r}" if self.snapshots_per_rank else ""
                name = f"snapshots/{len(self.refs[r]):06d}{rank}.pt"
                head, parts = encode_parts(snap.state, {"info": snap.info})
                write_atomic(self.folder / name, parts, durable=True)
                self.refs[r].append({"file": name, "sha256": head["sha256"],
                                     "info": snap.info})
        payload = {
            "shared": to_host({name: obj.state_dict() for name, obj in self.shared.items()}),
            "ranks": ranks,
            "snapshots": self.refs,
            "book": {"checkpoints": self.count + 1, "checkpoint_s": self.seconds,
                     "resumed_from": self.resumed_from, "resized": self.resized,
                     "clock": self.clock.state_dict()},
        }
        header = {**self.header, "epoch": updates / self.steps}
        save(self.folder, updates, payload, header,
             midway=lambda: faults.during_checkpoint(self.rank, updates), retire=self._retire)
        self._retire = []

    def summary(self) -> dict:
        """Checkpoints written (over the whole run), seconds spent writing, resume points and
        resizes."""
        return {"checkpoints": self.count, "checkpoint_s": self.seconds,
                "resumed_from_updates": self.resumed_from, "resized": self.resized}


def to_host(state):
    """``state`` (nested dicts, lists, tuples) with every device tensor copied to host memory:
    checkpoints of GPU runs travel and load anywhere."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: to_host(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_host(v) for v in state)
    return state
