"""Fault injection for tests and reliability drills, driven by ``$HPCTRAIN_INJECT``.

``HPCTRAIN_INJECT="KIND@RANK:STEP[,KIND@RANK:STEP...]"``: at training step STEP (counted from
0) on rank RANK, ``raise`` raises an exception, ``kill`` sends the process SIGKILL, and ``nan``
fills the gradients with NaN. Training loops call :func:`inject` between backward and step;
without the variable it costs one dictionary look-up.
"""

from __future__ import annotations

import os
import signal
from functools import lru_cache

import torch

from hpctrain.errors import UsageError

KINDS = ("raise", "kill", "nan")


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


def inject(rank: int, step: int, model: torch.nn.Module) -> None:
    """Apply the fault planned for (rank, step), if any."""
    spec = os.environ.get("HPCTRAIN_INJECT")
    if not spec:
        return
    kind = _plan(spec).get((rank, step))
    if kind == "raise":
        raise RuntimeError(f"injected fault at step {step}")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "nan":
        for p in model.parameters():
            if p.grad is not None:
                p.grad.fill_(float("nan"))
