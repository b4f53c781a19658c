"""Fault injection for tests and reliability drills, driven by ``$HPCTRAIN_INJECT``.

``HPCTRAIN_INJECT="KIND@RANK:STEP[,KIND@RANK:STEP...]"``: at training step STEP (counted from
0) on rank RANK, ``raise`` raises an exception, ``kill`` sends the process SIGKILL, ``hang``
sleeps forever (alive, silent), ``nan`` and ``inf`` make the gradients NaN or Inf, and
``killckpt`` sends SIGKILL halfway through writing the checkpoint of update STEP. Training
loops call :func:`inject` between backward and step (or, with the loss, before backward);
without the variable it costs one dictionary look-up.
"""

from __future__ import annotations

import os
import signal
import time
from functools import lru_cache

import torch

from hpctrain.errors import UsageError

KINDS = ("raise", "kill", "hang", "nan", "inf", "killckpt")


@lru_cache(maxsize=1)
def _plan(spec: str) -> dict[tuple[int, int], str]:
    plan = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            kind, where = item.split("@")
            rank, step = (int(v) for v in where.split(":"))
        except ValueError:
            raise UsageError(
                f"HPCTRAIN_INJECT: cannot parse {item!r}; want KIND@RANK:STEP") from None
        if kind not in KINDS:
            raise UsageError(f"HPCTRAIN_INJECT: unknown fault {kind!r}; choose from {KINDS}")
        plan[(rank, step)] = kind
    return plan


def check() -> None:
    """Before MPI starts: a plan that does not parse is one line there, not after MPI."""
    _planned(0, 0)


def _planned(rank: int, step: int) -> str | None:
    spec = os.environ.get("HPCTRAIN_INJECT")
    return _plan(spec).get((rank, step)) if spec else None


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
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
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
    """Called halfway through writing the checkpoint of update ``step``: ``killckpt``."""
    if _planned(rank, step) == "killckpt":
        os.kill(os.getpid(), signal.SIGKILL)
