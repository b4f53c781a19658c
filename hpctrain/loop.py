"""What the lock-step training loops (``sync/train.py``: sgd/ssgd, ``ec/train.py``: ma/ec) do
alike around their updates: each step's learning rate and batch, and after each update the
progress bar, the snapshots of the model that become the curve, checkpoints, the clock and
the stall watchdog's beat."""

from __future__ import annotations

import argparse
import time

import torch

from hpctrain import watchdog
from hpctrain.evaluate import Snapshots
from hpctrain.metrics import progress
from hpctrain.schedule import learning_rate, set_lr


def set_step_lr(optimizer: torch.optim.Optimizer, args: argparse.Namespace, epoch: float) -> None:
    """Set the learning rate that ``--lr-schedule`` gives at (fractional) ``epoch``."""
    set_lr(optimizer, learning_rate(args.lr, epoch, args.epochs, args.lr_schedule,
                                    args.lr_milestones, args.lr_gamma))


def batch(local, i: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``i``'s images and labels of one epoch's local data."""
    return (local.images[i * batch_size:(i + 1) * batch_size],
            local.labels[i * batch_size:(i + 1) * batch_size])


class Bookkeeping:
    """The progress bar, the curve's snapshots (after update 0, every ``--eval-every`` epochs and
    after the last update), checkpoints, and the training clock, which a resumed run continues.
    """

    def __init__(self, args: argparse.Namespace, rank: int, steps: int, ckpt) -> None:
        self.steps, self.total_steps = steps, args.epochs * steps
        self.snapshot_every = max(1, round(args.eval_every * steps))
        self.ckpt = ckpt
        self.snapshots = Snapshots()
        self.bar = progress(self.total_steps, rank, args.algo, enabled=not args.no_progress)
        self.resumed_s = 0.0
        self.start = time.perf_counter()

    def restore(self, model: torch.nn.Module) -> tuple[int, int]:
        """Snapshot the initial model and resume from a checkpoint if asked to:
        ``(updates, samples)`` already done (zeros for a fresh run)."""
        self.snapshots.take(model, t=0.0, epoch=0.0, updates=0)
        done = self.ckpt.restore(self.snapshots)
        self.resumed_s = done.get("elapsed", 0.0)
        self.bar.update(done.get("updates", 0))
        return done.get("updates", 0), done.get("samples", 0)

    def start_clock(self) -> None:
        """Training time starts now (plus the time of the run resumed)."""
        self.start = time.perf_counter() - self.resumed_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def after_update(self, model: torch.nn.Module, loss: torch.Tensor, updates: int,
                     samples: int) -> None:
        """Update ``updates`` is done (``samples`` trained on so far, on this rank)."""
        watchdog.beat("update", updates)
        self.bar.update()
        if updates % 50 == 0:
            self.bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if updates % self.snapshot_every == 0 or updates == self.total_steps:
            self.snapshots.take(model, t=self.elapsed(), epoch=updates / self.steps,
                                updates=updates)
        self.ckpt.step(updates, {"samples": samples, "elapsed": self.elapsed()}, self.snapshots)

    def stop(self) -> float:
        """Close the progress bar; the seconds of training."""
        wall = self.elapsed()
        self.bar.close()
        return wall
