"""Seeing a run as it happens: online evaluation, TensorBoard, collapse warnings.

The loop (:mod:`hpctrain.run`) calls one :class:`Watch` at three points: after every step
(:meth:`Watch.step`), after every snapshot (:meth:`Watch.snapshot`) and after training
(:meth:`Watch.finish`, :meth:`Watch.curve`, :meth:`Watch.after`). Only rank 0 of the workers
does anything at a step, and only cheap things (its loss as a float, a TensorBoard entry every
few steps); no step communicates, except the stop broadcast of ``--stop-on-collapse``
(:class:`hpctrain.collapse.StopSignal`).

``--eval after`` (the default) scores snapshots after training, so the curve's time axis
holds no evaluation. ``--eval online`` scores each snapshot when it is taken: on rank 0
between two steps (its time is then in the clock), or with ``--eval-rank R`` on rank R, which
does not train: rank 0 sends it each snapshot (a non-blocking send) and picks the scores up
between steps. Every message between the two goes through
:func:`hpctrain.pickled.large_messages`, so that a snapshot past 2 GiB (half a billion fp32
values) reaches the evaluating rank under an MPI-3 library too. Either way a snapshot's
score is the same as after training (the same state, the same test set and batches), so a
deterministic run's curve and final accuracy do not change. Online scores make the curve of
sgd, ssgd and the asynchronous algorithms; ma and ec score rank 0's member online for the
progress bar, collapse detection and TensorBoard (as ``test/member_*``), while their curve
(members, ensemble, average: all ranks' models) is still scored after training, and reaches
TensorBoard's ``test/*`` then.
The summary's ``eval_mode`` says which produced the curve, its ``eval_in_clock`` whether rank 0
scored anything between its steps (ma and ec online too: their wall time holds it).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any, TypedDict

from hpctrain import collapse, compiled, options, tensorboard, watchdog
from hpctrain import config as configs
from hpctrain.algorithm import Algorithm
from hpctrain.errors import UsageError
from hpctrain.evaluate import curve_point
from hpctrain.metrics import Tally
from hpctrain.pickled import large_messages

_SNAPSHOT, _SCORE = 7301, 7302  # tags of the messages to and from the evaluating rank
BAR_EVERY = 50  # rank 0's steps between progress-bar loss updates


def check(config, ranks: int) -> int:
    """Check the live options against the launch (before MPI starts); return the number of
    ranks that train."""
    if config.tensorboard:
        tensorboard.check_installed()
    if config.eval_rank is None:
        return ranks
    if config.eval_rank >= ranks:
        given = options.setting(type(config), "eval_rank", config.eval_rank)
        raise UsageError(f"{given}: the job has ranks 0..{ranks - 1}")
    return ranks - 1


def split_world(world, config):
    """``(training communicator, evaluating?)``: the world without ``--eval-rank``, or the
    world itself; rank 0 is rank 0 of both."""
    if config.eval_rank is None:
        return world, False
    evaluating = world.Get_rank() == config.eval_rank
    trainers = world.Split(1 if evaluating else 0, world.Get_rank())
    if evaluating:
        trainers.Free()
        return None, True
    return trainers, False


def serve(world, model, test_set) -> None:
    """The evaluating rank: score each snapshot rank 0 sends, send the score back, until
    rank 0 says it is done, or sends the exception that stopped the run to raise here too."""
    channel, scored = large_messages(world), 0
    while True:
        incoming = channel.improbe(source=0, tag=_SNAPSHOT)
        if incoming is None:
            watchdog.beat("waiting for snapshots", scored)
            time.sleep(0.005)
            continue
        message = incoming.recv()
        if message is None:
            return
        if isinstance(message, Exception):  # the run stopped before its end, as here
            raise message
        index, state, info = message
        watchdog.beat("evaluating snapshot", index)
        model.load_state_dict(state)
        channel.send((index, curve_point(model, test_set, info)), dest=0, tag=_SCORE)
        scored += 1


def from_rank0(world, result):
    """Rank 0's ``result``, on every rank of the job once rank 0 has written the outputs. The
    ranks done before it (the evaluating rank, store servers, the other workers) wait
    beating: ma and ec score their curve after training, for longer than --stall-timeout."""
    watchdog.wait_beating(world, "waiting for rank 0's outputs")
    return world.bcast(result, root=0)


def summary_written(comm) -> None:
    """Every worker, once rank 0 has written the summary (collective over the workers): the
    others wait for it bounded (:func:`hpctrain.watchdog.wait_beating`), so that a rank 0
    frozen in its last write ends the job. The evaluating rank and store servers, which wait
    in :func:`from_rank0` through ma's and ec's scoring too, are ended with them."""
    if comm is not None and comm.Get_size() > 1:
        watchdog.wait_beating(comm, "waiting for rank 0's summary", bounded=True)


def eval_mode(config, algo: Algorithm) -> str:
    """What scored the curve: ``after``, ``online`` or ``online (rank R)``."""
    if config.eval_mode != "online" or not _curve_online(algo):
        return "after"
    return "online" if config.eval_rank is None else f"online (rank {config.eval_rank})"


def scores_test_set(config, algo: Algorithm, rank: int) -> bool:
    """Whether worker ``rank`` (of the workers' communicator) may score the test set: every
    worker when the curve is scored after training (the snapshots spread over the workers;
    ma's and ec's every member, also with ``--eval online``), else rank 0 alone, between its
    steps, and none with ``--eval-rank``, whose rank scores it."""
    if config.eval_mode != "online" or not _curve_online(algo):
        return True
    return rank == 0 and config.eval_rank is None


def _curve_online(algo: Algorithm) -> bool:
    return type(algo).evaluate is Algorithm.evaluate


def _staleness(algo: Algorithm) -> Tally | None:
    """The tally of this worker's pushes' staleness (async optimizers keep one), or None."""
    stale = getattr(getattr(algo, "optimizer", None), "staleness", None)
    return stale if isinstance(stale, Tally) else None


def _stale_mark(algo: Algorithm) -> tuple[int, int]:
    """How many pushes this worker's tally holds and their staleness sum: the cursor from
    which the next TensorBoard entry's mean is taken (the difference of two marks)."""
    stale = _staleness(algo)
    return (0, 0) if stale is None else (stale.count, stale.total)


def _loss_parts(algo: Algorithm) -> dict[str, float]:
    """The parts of the training loss an algorithm reports since its last report (ec's
    ``loss_parts``: cross-entropy and distillation), by name."""
    parts = getattr(algo, "loss_parts", None)
    return parts() if callable(parts) else {}


def collapse_detector(config, num_classes: int, per_epoch: int,
                      steps: int) -> collapse.CollapseDetector:
    """The run's collapse detector (the loop makes it before its checkpointer, which keeps
    its state)."""
    # The learning rate reaches --lr at this update: a model at chance before it is warming
    # up, not collapsed.
    warmup = math.ceil(config.optim.warmup_epochs * per_epoch)
    return collapse.CollapseDetector(num_classes, max(20, steps // 4), warmup=warmup)


class LossSinceEntry:
    """Rank 0's training losses since its last TensorBoard entry: how many, and their sum.
    A per-rank state of the checkpoint (the loop makes it before its checkpointer), so that
    a resumed run's first entry averages the steps the uninterrupted run's does, not only
    those since the resume."""

    def __init__(self) -> None:
        self.steps, self.loss = 0, 0.0

    def state_dict(self) -> dict:
        return {"steps": self.steps, "loss": self.loss}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.loss = int(state["steps"]), float(state["loss"])


class _Logged(TypedDict):
    """What TensorBoard's next training entry adds up (:meth:`Watch._log`), besides the
    losses (:class:`LossSinceEntry`)."""

    position: int | None  # the last entry's (None: no step of this process yet)
    t: float
    stale: tuple[int, int]  # the staleness cursor (_stale_mark)
    last: tuple[int, float, float] | None  # the last step's (position, lr, t)


class Watch:
    """One worker's view of the run as it happens (see the module docstring)."""

    def __init__(self, config, algo: Algorithm, comm, *, test_set, per_epoch: int, steps: int,
                 samples_per_epoch: int, bar, world=None,
                 loss_scale: Callable[[], float | None] = lambda: None,
                 resumed: int = 0, elapsed: float = 0.0,
                 clock: tensorboard.WallClock | None = None,
                 detector: collapse.CollapseDetector | None = None,
                 losses: LossSinceEntry | None = None,
                 recorded: dict | None = None) -> None:
        self.rank = comm.Get_rank() if comm is not None else 0
        self.test_set, self.bar = test_set, bar
        # To and from the evaluating rank: a message in parts past 2 GiB (pkl5), each probed
        # and received whole through it too (a raw probe or receive may match one part).
        self.channel = large_messages(world) if world is not None else None
        self.per_epoch, self.samples_per_epoch = per_epoch, samples_per_epoch
        self.online = config.eval_mode == "online"
        self.eval_rank = config.eval_rank
        self.curve_online = self.online and _curve_online(algo)
        self.mode = eval_mode(config, algo)
        self.in_clock = False  # rank 0 scored a snapshot between its steps (eval_in_clock)
        self._training = False  # between rank 0's first step and finish()
        self.algo, self.loss_scale = algo, loss_scale  # fp16's scale, read when logged
        # Resumed from the checkpoint of update ``resumed`` (the earlier run's count, which a
        # resize rescales to another position) after ``elapsed`` s of training: the earlier
        # run's entries from there on are removed; of the snapshots restored with it (the
        # first ``restored``), those scored before there are kept, not logged again. ``clock``
        # stamps entries (the checkpoint's, with its earlier attempts), from started() on.
        self.resumed, self.restored, self.elapsed = resumed, 0, elapsed
        self._seen_to = -1  # begin() sets it
        self.log_every = config.log_every
        self.board = tensorboard.Board(config.out, config.tensorboard and self.rank == 0,
                                       resumed=resumed, clock=clock, rank0=self.rank == 0,
                                       rescored=() if self.curve_online else tensorboard.CURVE)
        try:  # the board's writer thread runs from here: an error below closes it
            if self.board.enabled:
                self._describe(recorded or configs.repeatable(config),
                               comm.Get_size() if comm is not None else 1)
            self.detector = detector or collapse_detector(config, test_set.num_classes,
                                                          per_epoch, steps)
            self.signal = collapse.StopSignal(comm, config.stop_on_collapse, algo.lock_step)
        except BaseException:
            self.board.close(raising=False)  # the error raised says it (a full disk's)
            raise
        self.stopped = False  # every worker left the loop at the stop signal
        self.scores: dict[int, dict] = {}  # snapshot index -> curve point (rank 0, online)
        # Snapshots sent to the evaluating rank and not scored yet: index -> the send's request,
        # which holds the snapshot's memory (sent out of band, not copied) until waited for.
        self._unscored: dict[int, Any] = {}  # an mpi4py request's
        # TensorBoard's training entries: the losses since the last entry (restored with a
        # checkpoint), and the last step's (position, lr, t).
        # The staleness cursor starts past the pushes a checkpoint restored (logged before).
        self.losses = losses or LossSinceEntry()
        self._logged: _Logged = {"position": None, "t": elapsed,
                                 "stale": _stale_mark(algo), "last": None}
        self._postfix: dict[str, str] = {}

    def _describe(self, recorded: dict, workers: int) -> None:
        """Rank 0: the run's ``config.json`` (``recorded``) to TensorBoard, and its settings
        as HParams: the options by their flags' names, ``workers``, ``simulated`` (and the
        simulation's options, ``sim_*``), which tell the runs of a folder apart."""
        sim = recorded.get("sim")  # the simulator's table (Runtime.config_tables)
        self.board.describe(recorded, {
            **configs.flat(configs.from_dict(recorded)), "workers": workers,
            "simulated": sim is not None, **{f"sim_{k}": v for k, v in (sim or {}).items()}})

    # ---- during training --------------------------------------------------------------------

    def started(self) -> None:
        """The loop's clock starts now: TensorBoard's wall times are counted from here."""
        self.board.start(self.elapsed)

    def step(self, position: int, local_steps: int, loss, lr: float, t: float) -> None:
        """After a step: rank 0 watches its loss, logs, and picks up scores."""
        if self.rank != 0:
            return
        self._training = True
        value = float(loss.item())
        self._collapse(position, self.detector.loss(position, value))
        if local_steps % BAR_EVERY == 0:
            self._postfix["loss"] = f"{value:.3f}"
            self.bar.set_postfix(self._postfix, refresh=False)
        if self.board.enabled:
            self._log(position, value, lr, t)
        if self.eval_rank is not None:
            self._receive(block=False)

    def _log(self, position: int, value: float, lr: float, t: float) -> None:
        log = self._logged
        if log["position"] is None:  # the first step of this process: t from its start
            log["position"] = position - 1
        losses = self.losses
        losses.steps += 1
        losses.loss += value
        log["last"] = position, lr, t
        every = self.log_every
        # Lock-step: at each multiple of --log-every updates, so that a resumed run's entries
        # fall where the uninterrupted run's do (counted from the resume, they were 4 off).
        # Asynchronous: every --log-every of rank 0's own steps, its positions being sparse.
        if (position // every > log["position"] // every if self.algo.lock_step
                else losses.steps >= every):
            self._write_log()

    def _write_log(self) -> None:
        """Rank 0: one training entry for the steps logged since the last (--log-every of
        them, or the last few of the run)."""
        log, board = self._logged, self.board
        assert log["last"] is not None and log["position"] is not None  # a step was logged
        position, lr, t = log["last"]
        board.scalar("train/loss", self.losses.loss / self.losses.steps, position, t)
        board.scalar("train/lr", lr, position, t)
        board.scalar("train/epoch", position / self.per_epoch, position, t)
        for part, value in _loss_parts(self.algo).items():
            board.scalar(f"train/{part}", value, position, t)
        scale = self.loss_scale()
        if scale is not None:
            board.scalar("train/loss_scale", scale, position, t)
        if t > log["t"]:
            rate = (position - log["position"]) / self.per_epoch * self.samples_per_epoch
            board.scalar("train/samples_per_s", rate / (t - log["t"]), position, t)
        (count, total), (count0, total0) = _stale_mark(self.algo), log["stale"]
        if count > count0:
            board.scalar("train/staleness", float(total - total0) / (count - count0),
                         position, t)
            log["stale"] = (count, total)
        self.losses.steps, self.losses.loss = 0, 0.0
        log.update({"position": position, "t": t})

    def begin(self, model, snapshots) -> None:
        """Before the first step: score the snapshots there are already (the first, and those
        restored from a checkpoint) on a scratch copy of ``model``. Each is progress of the
        start-up: hundreds restored take longer than the watchdog's start-up allowance."""
        self.restored = len(snapshots)
        # The restored snapshots the restored detector saw: to its newest (an older
        # checkpoint's does not say: taken as those before the checkpoint's update).
        seen = self.detector.scored_to if self.detector.scored_to_known else self.resumed - 1
        self._seen_to = -1 if seen is None else seen
        if not self.online or self.rank != 0 or not snapshots:
            return
        scratch = copy.deepcopy(model)
        for i in range(len(snapshots)):
            watchdog.beat("scoring restored snapshot", i, starting=True)
            scratch.load_state_dict(snapshots[i].state)
            self.snapshot(scratch, snapshots[:i + 1])

    def snapshot(self, model, snapshots) -> None:
        """After a snapshot is taken (on the ranks that take them): score it online."""
        if not self.online:
            return
        index = len(snapshots) - 1
        if self.eval_rank is None and compiled.first_call(model, "eval"):
            # --compile: rank 0's first evaluation compiles; lock-step ranks wait for it in
            # their next collective (every one that snapshots has this allowance too)
            watchdog.beat("evaluating snapshot", index, compiling=True)
        if self.rank != 0:
            return
        if self.eval_rank is None:
            self.in_clock = self.in_clock or self._training  # else before or after the clock
            self._scored(index, curve_point(model, self.test_set, snapshots[index].info))
            return
        assert self.channel is not None  # made whenever there is an evaluating rank
        self._unscored[index] = self.channel.isend(
            (index, snapshots[index].state, snapshots[index].info), dest=self.eval_rank,
            tag=_SNAPSHOT)
        self._receive(block=False)

    def _receive(self, block: bool) -> None:
        """Rank 0: the scores the evaluating rank has sent (``block``: all still due). A scored
        snapshot's send is complete: its request, and its hold on the snapshot, go."""
        assert self.channel is not None  # made whenever there is an evaluating rank
        probe = self.channel.mprobe if block else self.channel.improbe
        while self._unscored:
            incoming = probe(source=self.eval_rank, tag=_SCORE)
            if incoming is None:
                return
            index, point = incoming.recv()
            self._unscored.pop(index).wait()
            watchdog.beat("waiting for scores", len(self.scores))
            self._scored(index, point)

    def _scored(self, index: int, point: dict) -> None:
        self.scores[index] = point
        self._postfix["acc"] = f"{point['test_acc']:.4f}"
        self.bar.set_postfix(self._postfix, refresh=False)
        restored = index < self.restored
        # A restored snapshot before the checkpoint's update: the earlier run logged it online.
        if not restored or point["updates"] >= self.resumed:
            # test/accuracy is the curve's model; ma and ec score rank 0's member online.
            self._test_scalars(point, member=not self.curve_online)
        # One the restored detector saw is not seen again (the first snapshot's chance
        # accuracy after the best read as a collapse at update 0); one whose score was still
        # on its way from --eval-rank at the checkpoint is.
        if not restored or point["updates"] > self._seen_to:
            self._collapse(point["updates"], self.detector.accuracy(point["updates"],
                                                                    point["test_acc"]))

    def _test_scalars(self, point: dict, member: bool = False) -> None:
        """A curve point's ``test/accuracy`` and ``test/loss`` (``member``: rank 0's member's,
        ``test/member_*``), stamped when its snapshot was taken."""
        for name, key in (("accuracy", "test_acc"), ("loss", "test_loss")):
            tag = f"test/member_{name}" if member else f"test/{name}"
            self.board.scalar(tag, point[key], point["updates"], point.get("t"))

    def _collapse(self, update: int, reason: str | None) -> None:
        if reason is None:
            return
        collapse.warn(update, reason, asked=self.signal.asked)
        self.signal.request()

    def stop(self, position: int) -> bool:
        """Whether every worker ends its loop here (``--stop-on-collapse``)."""
        if self.signal.stop():
            self.stopped = True
        return self.stopped

    # ---- after training ---------------------------------------------------------------------

    def finish(self) -> None:
        """After the loop, on every worker: the stop signal completes; rank 0's training
        entries since the last --log-every steps reach TensorBoard."""
        self._training = False
        self.signal.close()
        if self.rank == 0 and self.board.enabled and self._logged["last"] is not None \
                and self.losses.steps:
            self._write_log()

    def abandon(self, stopped: Exception) -> None:
        """The run stops before its end with ``stopped`` on every worker (SIGUSR1,
        :mod:`hpctrain.checkpoint.stop`; ssgd's too many bad steps): the stop signal
        completes, the evaluating rank raises ``stopped`` too, TensorBoard's file is closed.
        The curve is made by the run that resumes, if any."""
        self.finish()
        self._release(stopped)
        if self.rank == 0:
            self.board.close()

    def _release(self, stopped: Exception | None = None) -> None:
        """Rank 0: the evaluating rank's scores still on their way, then its last message."""
        if self.rank == 0 and self.eval_rank is not None:
            self._receive(block=True)
            assert self.channel is not None  # made whenever there is an evaluating rank
            self.channel.send(stopped, dest=self.eval_rank, tag=_SNAPSHOT)

    def curve(self, model, snapshots, comm) -> list[dict] | None:
        """The curve scored online (every worker gets it), or None: score after training.
        Snapshots not scored online (restored from a checkpoint) are scored now. Releases
        the evaluating rank."""
        self._release()
        if self.eval_rank is not None and comm is not None:
            watchdog.wait_beating(comm, "waiting for the evaluating rank's scores")
        if not self.curve_online:
            return None
        points = None
        if self.rank == 0:
            for i, snapshot in enumerate(snapshots):
                if i not in self.scores:  # not reached: a safety net
                    model.load_state_dict(snapshot.state)
                    self._scored(i, curve_point(model, self.test_set, snapshot.info))
            points = [self.scores[i] for i in range(len(snapshots))]
        return comm.bcast(points, root=0) if comm is not None else points

    def after(self, points: list[dict]) -> None:
        """Rank 0, with the curve: its scores to TensorBoard and the collapse check, unless
        they were seen online already (ma and ec online: rank 0's member was, as
        ``test/member_*``)."""
        if self.rank != 0:
            return
        for p in points if not self.curve_online else []:
            self._test_scalars(p)
            if not self.online:  # else the check saw rank 0's member online
                self._collapse(p["updates"], self.detector.accuracy(p["updates"],
                                                                    p["test_acc"]))
        if points:
            self.board.finish(points[-1]["updates"], {
                "final_test_acc": points[-1]["test_acc"],
                "best_test_acc": max(p["test_acc"] for p in points),
                "final_test_loss": points[-1]["test_loss"]})
        self.board.close()

    def fields(self) -> dict:
        """The summary's fields from watching: eval_mode, eval_in_clock, collapsed_at,
        collapse_reason, stopped_on_collapse (the run ends for its collapse, exit status 4:
        also where no loop was left early, the collapse found at the last update, whose stop
        word reaches lock-step workers past the end, or in the scores after training)."""
        collapsed = self.detector.collapsed_at is not None
        return {"eval_mode": self.mode, "eval_in_clock": self.in_clock,
                "collapsed_at": self.detector.collapsed_at,
                "collapse_reason": self.detector.reason,
                "stopped_on_collapse": self.signal.asked and collapsed}
