"""Saying when training has collapsed, cheaply, and stopping there when asked.

A run has collapsed when one of these holds (rank 0's view; no extra communication):

- its training loss is not finite for :data:`NOT_FINITE_STEPS` steps in a row, or its moving
  average exceeds :data:`EXPLODING` times the larger of ln(classes) and its first value;
- the moving average sits at chance, ln(classes) (within :data:`FLAT_BAND`), for ``window``
  steps after having been clearly below it (by twice the band: a slow run's noise crosses
  the band's edge); or, if it never was, for four windows at the full learning rate (after
  ``--warmup-epochs``: a run warming up sits at chance too) in which the loss did not fall
  (by :data:`FALLING`, a least-squares line's fall), unless the newest snapshot scored
  online is clearly above chance: a run learning slowly is not a collapse;
- a snapshot scores at chance (at most 1/classes + :data:`CHANCE_MARGIN`) after an earlier
  one scored clearly above it (at least :data:`LEARNED` of the way from chance to 1).

The first that holds gives ``collapsed_at`` (global updates) and a reason; rank 0 warns once.
With ``--stop-on-collapse`` a :class:`StopSignal` ends every worker's loop: lock-step
workers get rank 0's word in a 1-byte non-blocking broadcast per update, overlapped with the
next (all stop at the same update, one after rank 0's); asynchronous workers poll a
non-blocking broadcast from rank 0 every step, on a communicator of its own, and go on to
the usual end (barrier, outputs, summary). A collapse found where no loop is left to end (at
the last update, or in the scores after training) ends the run all the same: its summary's
``stopped_on_collapse`` (:meth:`hpctrain.live.Watch.fields`) gives exit status 4.
"""

from __future__ import annotations

import math

import numpy as np

from hpctrain.metrics import say
from hpctrain.rank0_flag import Rank0Flag

EXPLODING = 10.0
NOT_FINITE_STEPS = 3
FLAT_BAND = 0.02  # relative to ln(classes)
# Relative to ln(classes): a loss at chance falling this much over four windows is learning
# (a least-squares line's fall; a batch's noise, ~0.04 near chance, moves it ~0.01).
FALLING = FLAT_BAND / 8
CHANCE_MARGIN = 0.02
LEARNED = 0.2
_EMA = 0.9


class CollapseDetector:
    """Watches rank 0's training losses and the snapshots' test accuracies (``warmup``: the
    update at which the learning rate reaches --lr)."""

    def __init__(self, num_classes: int, window: int, warmup: int = 0) -> None:
        self.classes = num_classes
        self.chance_loss = math.log(num_classes)
        self.window = max(1, window)
        self.warmup = warmup
        self.ema: float | None = None
        self.reference: float | None = None
        self.not_finite = 0
        self.flat: list[float] = []  # the losses of the steps at chance, in a row
        self.was_below = False
        self.above_chance = False  # the newest snapshot scored online clearly above chance
        self.best_acc = 0.0
        self.scored_to: int | None = None  # the update of the newest snapshot it saw
        self.scored_to_known = True  # False: restored from a checkpoint that did not say
        self.collapsed_at: int | None = None
        self.reason: str | None = None

    def loss(self, update: int, value: float) -> str | None:
        """Rank 0's training loss at global progress ``update``; the reason if the run has
        collapsed now (once)."""
        if self.collapsed_at is not None:
            return None
        if not math.isfinite(value):
            self.not_finite += 1
            if self.not_finite >= NOT_FINITE_STEPS:
                return self._collapse(update, f"training loss {value} for {self.not_finite} "
                                              "steps in a row")
            return None
        self.not_finite = 0
        self.ema = value if self.ema is None else _EMA * self.ema + (1 - _EMA) * value
        if self.reference is None:
            self.reference = max(self.chance_loss, value)
        if self.ema > EXPLODING * self.reference:
            return self._collapse(update, f"training loss exploding: {self.ema:.3g}, above "
                                          f"{EXPLODING:g} x {self.reference:.3f}")
        band = FLAT_BAND * self.chance_loss
        if self.ema < self.chance_loss - 2 * band:
            self.was_below = True
        warming = update < self.warmup and not self.was_below
        if abs(self.ema - self.chance_loss) > band or warming:
            self.flat.clear()
            return None
        self.flat.append(value)
        needed = self.window if self.was_below else 4 * self.window
        if len(self.flat) < needed:
            return None
        if not self.was_below and (self.above_chance or self._falling()):
            self.flat.clear()  # learning slowly: the next stretch is judged afresh
            return None
        return self._collapse(update, f"training loss flat at chance, ln({self.classes}) = "
                                      f"{self.chance_loss:.3f}, for {len(self.flat)} steps")

    def _falling(self) -> bool:
        """Whether the loss still falls over the stretch at chance (a least-squares line's
        fall): a model that never learned stays where it is, a slow one creeps down."""
        slope = np.polyfit(np.arange(len(self.flat)), self.flat, 1)[0]
        return -slope * (len(self.flat) - 1) >= FALLING * self.chance_loss

    def accuracy(self, update: int, acc: float) -> str | None:
        """A snapshot's test accuracy at global progress ``update``; the reason if it shows
        a collapse now (once)."""
        self.scored_to = update if self.scored_to is None else max(self.scored_to, update)
        if self.collapsed_at is not None:
            return None
        chance = 1.0 / self.classes
        if self.best_acc >= chance + LEARNED * (1 - chance) and acc <= chance + CHANCE_MARGIN:
            return self._collapse(update, f"test accuracy {acc:.4f} back at chance "
                                          f"(1/{self.classes}) after {self.best_acc:.4f}")
        self.best_acc = max(self.best_acc, acc)
        self.above_chance = acc > chance + CHANCE_MARGIN
        return None

    def _collapse(self, update: int, reason: str) -> str:
        self.collapsed_at, self.reason = update, reason
        return reason

    # In a checkpoint (rank 0's is the one that counts): a resumed run goes on with what the
    # losses so far showed, its non-finite streak and a collapse found before it included.
    _STATE = ("ema", "reference", "not_finite", "flat", "was_below", "above_chance",
              "best_acc", "collapsed_at", "reason", "scored_to")

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self._STATE}

    def load_state_dict(self, state: dict) -> None:
        for name in self._STATE:
            if name in state:  # scored_to: absent from older checkpoints
                setattr(self, name, state[name])
        self.scored_to_known = "scored_to" in state
        self.flat = list(self.flat)


def warn(update: int, reason: str, asked: bool = False) -> None:
    """Rank 0's one warning line, beside its progress bar; unless ``asked``
    (--stop-on-collapse given: the run's last line says it stopped), it names the flag."""
    hint = "" if asked else " (--stop-on-collapse ends a run there)"
    say(f"hpctrain: warning: training collapsed at update {update}: {reason}{hint}")


class StopSignal:
    """Rank 0's decision to stop, delivered to every worker of ``comm`` (see the module
    docstring); a no-op object without ``--stop-on-collapse``."""

    def __init__(self, comm, enabled: bool, lock_step: bool) -> None:
        self.asked = enabled  # --stop-on-collapse
        self.enabled = enabled and comm is not None and comm.Get_size() > 1
        self.single = enabled and not self.enabled  # one worker: no messages
        self.lock_step = lock_step
        self.wanted = False
        self.closed = False  # after the loop: a collapse found then is only recorded
        self.comm, self._request, self._flag = comm, None, np.zeros(1, np.uint8)
        self._word = Rank0Flag(comm) if self.enabled and lock_step else None
        if self.enabled and not lock_step:
            self.comm = comm.Dup()
            if self.comm.Get_rank() != 0:
                self._request = self.comm.Ibcast(self._flag, root=0)

    def request(self) -> None:
        """Rank 0: stop the run (delivered at the next :meth:`stop`, or the one after; after
        :meth:`close`, when the final scores find a collapse, only recorded)."""
        if not (self.enabled or self.single) or self.wanted:
            return
        self.wanted = True
        if self.enabled and not self.lock_step and not self.closed:
            self._flag[0] = 1
            self._request = self.comm.Ibcast(self._flag, root=0)

    def stop(self) -> bool:
        """Whether this worker ends its loop now (collective for lock-step algorithms)."""
        if self.single:
            return self.wanted
        if not self.enabled:
            return False
        if self.lock_step:
            # Rank 0's word from the step before (rank0_flag): every worker stops at the same
            # update, one after rank 0's, well before --max-bad-steps NaN steps end a
            # diverging run.
            assert self._word is not None  # made when enabled and lock-step
            stop = bool(self._word.receive())
            if not stop:
                self._word.post(self.wanted)
            return stop
        if self.comm.Get_rank() == 0:
            return self.wanted
        assert self._request is not None  # the other ranks' receive, posted at the start
        return bool(self._request.Test() and self._flag[0])

    def close(self) -> None:
        """After the loop, on every worker (collective): complete the broadcast."""
        if not self.enabled:
            return
        self.closed = True
        if self.lock_step:
            assert self._word is not None  # made when enabled and lock-step
            self._word.close()
            return
        if self.comm.Get_rank() == 0 and self._request is None:
            self._request = self.comm.Ibcast(self._flag, root=0)  # "go on": nobody stopped
        assert self._request is not None  # the broadcast, posted on every rank by now
        self._request.Wait()
        self.comm.Free()
