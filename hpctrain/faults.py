"""Fault injection for tests and reliability drills, driven by ``$HPCTRAIN_INJECT``.

``HPCTRAIN_INJECT="KIND@RANK:STEP[,KIND@RANK:STEP...]"``: at training step STEP (counted from
0) on rank RANK, ``raise`` raises an exception, ``kill`` sends the process SIGKILL, ``hang``
sleeps forever (alive, silent), ``stop`` sends it SIGSTOP (frozen whole, its watchdog thread
too, as a node that stops scheduling it), ``nan`` and ``inf`` make the gradients NaN or Inf,
and ``killckpt`` (``stopckpt``) sends SIGKILL (SIGSTOP) halfway through writing the
checkpoint of update STEP (rank 0 writes them). RANK is a worker's index among the ranks that
train (with ``--eval-rank R``, world rank r > R is worker r - 1; ``--servers`` are the last
ranks and train not). Training loops call :func:`inject` between backward and step (or, with
the loss, before backward); without the variable it costs one dictionary look-up.

:func:`check`, before MPI starts, refuses a plan that does not parse, names one place twice or
asks for a ``killckpt`` that cannot happen, and warns of a fault beyond the run's workers or
steps: a drill whose fault never fires would pass. (A warning, not a refusal: ``bench
compare`` gives one plan to runs of different sizes, a fault meant for one of them.)
"""

from __future__ import annotations

import os
import signal
import sys
import time
from functools import lru_cache
from typing import overload

import torch

from hpctrain import comm, data
from hpctrain.checkpoint.policy import Every
from hpctrain.errors import UsageError
from hpctrain.shuffle import steps_per_epoch

KINDS = ("raise", "kill", "hang", "stop", "nan", "inf", "killckpt", "stopckpt")
AT_CHECKPOINT = ("killckpt", "stopckpt")  # their STEP is the update of a checkpoint


@lru_cache(maxsize=1)
def _plan(spec: str) -> dict[tuple[int, int, bool], str]:
    """``{(rank, step, at a checkpoint): kind}``: killckpt's (stopckpt's) STEP is an update,
    the others' a worker's step, so ``nan@0:5,killckpt@0:5`` are two places."""
    plan: dict[tuple[int, int, bool], str] = {}
    items = [s.strip() for s in spec.split(",")]
    if not all(items):  # a drill whose fault went missing would pass
        raise UsageError(f"HPCTRAIN_INJECT {spec!r}: an empty entry; want KIND@RANK:STEP[,...]")
    for item in items:
        try:
            kind, where = item.split("@")
            rank, step = (int(v) for v in where.split(":"))
        except ValueError:
            raise UsageError(
                f"HPCTRAIN_INJECT: cannot parse {item!r}; want KIND@RANK:STEP") from None
        if rank < 0 or step < 0:  # would never fire
            raise UsageError(f"HPCTRAIN_INJECT: {item!r}: RANK and STEP count from 0")
        if kind not in KINDS:
            raise UsageError(f"HPCTRAIN_INJECT: unknown fault {kind!r}; choose from {KINDS}")
        place = (rank, step, kind in AT_CHECKPOINT)
        if place in plan:  # one would never fire
            raise UsageError(f"HPCTRAIN_INJECT: {item!r} where {plan[place]}@{rank}:{step} "
                             "is already planned; one fault a place")
        plan[place] = kind
    return plan


def check(config, workers: int) -> None:
    """Before MPI starts, for ``config``'s run on ``workers`` training workers: refuse a plan
    that does not parse or a ``killckpt`` that cannot happen (one line, not after MPI); warn
    of faults beyond the run's workers or steps (rank 0 of the launch)."""
    spec = os.environ.get("HPCTRAIN_INJECT")
    plan = _plan(spec) if spec else {}
    if not plan:
        return
    for (rank, step, _), kind in plan.items():
        if kind in AT_CHECKPOINT and config.checkpoint.interval is None:
            raise UsageError(f"HPCTRAIN_INJECT {kind}@{rank}:{step}: the run writes no "
                             "checkpoint (no --checkpoint-every)")
        if kind in AT_CHECKPOINT and rank != 0:
            does = "kills" if kind == "killckpt" else "stops"
            raise UsageError(f"HPCTRAIN_INJECT {kind}@{rank}:{step}: only rank 0 writes "
                             f"checkpoints ({kind}@0:{step} {does} it halfway through one)")
    updates = _updates(config, workers)
    every = _checkpoint_every(config, updates)
    for (rank, step, at_checkpoint), kind in plan.items():
        why = _beyond(rank, step, at_checkpoint, workers, updates, config.eval_rank)
        if not why and at_checkpoint and every and (step == 0 or step % every):
            why = f"checkpoints are written every {every} updates (and where SIGUSR1 asks)"
        if why and comm.env_rank() == 0:
            print(f"hpctrain: warning: HPCTRAIN_INJECT {kind}@{rank}:{step} will not fire: "
                  f"{why}", file=sys.stderr, flush=True)


def check_in_threads() -> None:
    """UsageError for a planned fault that ends or stops a process: ``hpctrain simulate``'s
    workers share one (``kill`` ended the whole simulation, ``hang`` held it for ever)."""
    spec = os.environ.get("HPCTRAIN_INJECT")
    for (rank, step, _), kind in (_plan(spec) if spec else {}).items():
        if kind in ("kill", "hang", "stop", *AT_CHECKPOINT):
            raise UsageError(f"HPCTRAIN_INJECT {kind}@{rank}:{step}: hpctrain simulate runs "
                             "its workers in one process; it simulates raise, nan and inf")


def _updates(config, workers: int) -> int:
    """The run's global updates, as the loop counts them: each worker's epoch is its share of
    the samples in batches; lock-step workers update together, asynchronous ones each."""
    data.check(config.data.dataset, config.data.data_dir)  # its one line before a size's
    samples = data.size(config.data.dataset, "train", config.data.data_dir)
    steps = config.optim.epochs * steps_per_epoch(samples, workers, config.optim.batch_size)
    return steps if config.algorithm_class.lock_step else steps * workers


def _checkpoint_every(config, updates: int) -> int | None:
    """The updates between two checkpoints of an interval in epochs (None in seconds)."""
    interval = config.checkpoint.interval
    if interval is None or not interval.endswith("e"):
        return None
    return Every.parse(interval).interval_updates(updates // config.optim.epochs)


def _beyond(rank: int, step: int, at_checkpoint: bool, workers: int, updates: int,
            eval_rank: int | None) -> str | None:
    """Why a fault at (rank, step) cannot happen in the run, if it cannot."""
    if not 0 <= rank < workers:
        moved = f"; with --eval-rank {eval_rank}, world rank r > {eval_rank} is worker " \
            "r - 1" if eval_rank is not None else ""
        return f"the run's workers are 0..{workers - 1} (RANK is a worker's index{moved})"
    if at_checkpoint and step > updates:
        return f"the run ends at update {updates}"
    if not at_checkpoint and step >= updates:  # an asynchronous worker's steps: fewer
        return f"a worker's steps are 0..{updates - 1} at most"
    return None


def _planned(rank: int, step: int, at_checkpoint: bool = False) -> str | None:
    spec = os.environ.get("HPCTRAIN_INJECT")
    return _plan(spec).get((rank, step, at_checkpoint)) if spec else None


@overload
def inject(rank: int, step: int, model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor: ...
@overload
def inject(rank: int, step: int, model: torch.nn.Module, loss: None = None) -> None: ...
def inject(rank: int, step: int, model: torch.nn.Module,
           loss: torch.Tensor | None = None) -> torch.Tensor | None:
    """Apply the fault planned for (rank, step), if any; return ``loss``.

    ``nan``/``inf`` multiply ``loss`` by NaN/Inf when it is given (call before backward: backward
    then yields the bad gradient, also where backward starts the gradient's allreduce), and
    otherwise fill the gradients of ``model`` (call between backward and step).
    """
    kind = _planned(rank, step)
    if kind == "raise":
        raise RuntimeError(f"injected fault at step {step}")
    if kind in ("kill", "stop"):
        os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
    while kind == "hang":
        time.sleep(3600)
    if kind in ("nan", "inf"):
        if loss is not None:
            return loss * float(kind)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.fill_(float(kind))
    return loss


def during_checkpoint(rank: int, step: int) -> None:
    """Called halfway through writing the checkpoint of update ``step``: ``killckpt``,
    ``stopckpt``."""
    kind = _planned(rank, step, at_checkpoint=True)
    if kind in AT_CHECKPOINT:
        os.kill(os.getpid(), signal.SIGKILL if kind == "killckpt" else signal.SIGSTOP)
