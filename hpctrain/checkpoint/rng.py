"""The random-number state of one rank (torch, numpy, Python's ``random`` and, when it uses
one, its GPU).

A resumed run must draw the same random numbers as an uninterrupted one (dropout, augmentation,
straggler jitter, a user's model or data code drawing from ``random``), so each rank's
generators travel in the checkpoint. They are stored as plain tensors, lists and numbers, the
only things a ``weights_only`` load accepts. A checkpoint from before Python's state was kept
restores the others only.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """This process's torch, numpy and Python random-number states, as plain values."""
    legacy = np.random.get_state()
    assert isinstance(legacy, tuple)  # the global generator is MT19937: its legacy tuple
    kind, keys, pos, has_gauss, cached = legacy
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": _python_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This rank's GPU only: a resumed rank may see other GPUs, or fewer, and a run that
        # never touched CUDA has no state there worth keeping (nor a reason to start CUDA).
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # on this rank's device, chosen by then


def _python_state() -> list:
    """``random.getstate()`` as ``[version, [625 ints], gauss]``, as the straggler's own
    generator is stored (:mod:`hpctrain.stragglers`)."""
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
