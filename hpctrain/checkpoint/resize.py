"""Resuming a run on another number of workers: the rules that carry per-worker state over.

A checkpoint holds one state per worker. Resumed on ``K'`` workers instead of ``K`` (a node
lost, a requeued job given fewer nodes), :class:`Resizer` turns the ``K`` states into ``K'``
on rank 0, before they are scattered. The model and whatever else is shared (rank 0's) carry
over unchanged; the rules for per-worker state are:

- **Progress** is kept as a fraction of the run: update ``u`` of an epoch of ``E`` updates
  becomes ``round(u * E' / E)`` in the resumed run's epochs of ``E'`` (lock-step: the steps of
  one rank's data; async: those of all workers), so the learning-rate schedule, the
  snapshots, the checkpoints and the budget go on at the same epoch. Every worker takes up
  its data at that place: epoch ``e``, batch ``i`` of its new share of the data (async: as if
  the workers had kept pace). With global shuffling and the same epoch that continues the
  epoch's permutation where the old workers had left it, to within a batch; local and partial
  shuffling deal the blocks anew, so part of an interrupted epoch is seen twice or not at
  all. Resume at an epoch boundary (``--checkpoint-every Ne``) to avoid both.
- **Batch size and learning rate** stay as given: each worker keeps ``--batch-size``, so a
  synchronous run's global batch becomes ``K' / K`` times as large, as with Horovod Elastic.
- **Counts** that the summary adds up over workers (samples, NaN gradients seen, straggler
  sleep, fp16 overflows) are folded: old worker ``r``'s go to new worker ``r mod K'``, so
  totals are kept. The NaN guard's skip counts, random-number states, the straggler's jitter
  generator and fp16's loss scale of new worker ``j`` are old worker ``j mod K``'s; elapsed
  time is rank 0's.
- **The algorithm's own state** (:meth:`hpctrain.algorithm.Algorithm.resize_state`): by
  default new worker ``j`` takes old worker ``j mod K``'s; MA averages the members' models
  and momentum; EC keeps members ``0..K'-1`` (a grown run copies members); the async
  algorithms average DC-ASGD-a's mean squares, keep each remaining worker's velocity (new
  workers start at rest) and level ssp's clocks. A user's algorithm that keeps the default
  while its per-worker states differ gets one warning line on rank 0
  (:func:`default_rule_warning`): growing copies such state, shrinking drops some.

The resumed run's summary lists each resize (``resized``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from hpctrain.shuffle import steps_per_epoch

# Per-worker entries the training loop itself registers (the rest are the algorithm's).
# (train_losses, TensorBoard's partial entry, is not carried across a resize: the resized
# run's updates are rescaled, and its entries fall elsewhere.)
LOOP_ENTRIES = ("guard", "straggler", "rng", "counters", "collapse", "scaler", "train_losses")


@dataclass(frozen=True)
class Resize:
    """One resumption onto another number of workers, as the summary reports it."""

    from_workers: int
    to_workers: int
    updates: int
    """The checkpoint's update count, in the old run's updates."""
    resumed_at: int
    """The same progress in the resumed run's updates."""

    def record(self) -> dict:
        return asdict(self)


def fold(values: list, workers: int) -> list[list]:
    """``values`` of the old workers, grouped by the new worker they go to (old worker ``r`` to
    ``r mod workers``); a new worker beyond the old count gets an empty list."""
    out: list[list] = [[] for _ in range(workers)]
    for r, value in enumerate(values):
        out[r % workers].append(value)
    return out


def source(parts: list, workers: int) -> list:
    """New worker ``j``'s inherited part: old worker ``j mod K``'s."""
    return [parts[j % len(parts)] for j in range(workers)]


def _workers(first: int, last: int) -> str:
    return f"worker {first}" if first == last else f"workers {first}..{last}"


def _empty(state: Any) -> bool:
    """Whether ``state`` holds nothing (dicts, lists and tuples of nothing or None)."""
    if isinstance(state, dict):
        return all(_empty(v) for v in state.values())
    if isinstance(state, list | tuple):
        return all(_empty(v) for v in state)
    return state is None


def _alike(parts: list[dict]) -> bool:
    """Whether the old workers' states are all empty or all equal, so that the default rule
    copies or drops nothing that differs; False where that cannot be told (sparse or meta
    tensors, an ``==`` that raises, a state holding itself): the warning it decides must
    never stop a resume."""
    try:
        return all(_empty(p) for p in parts) or \
            (len(parts) > 1 and all(_equal(p, parts[0]) for p in parts[1:]))
    except Exception:  # noqa: BLE001 - any error of a user's state: taken as differing
        return False


def _equal(a: Any, b: Any) -> bool:
    """Whether two saved states are equal, tensors and arrays element by element."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) \
            and a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) \
            and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and bool(a == b)


def default_rule_warning(name: str, parts: list[dict], workers: int) -> str | None:
    """The warning for algorithm class ``name`` whose per-worker states ``parts`` (the
    algorithm's own entries, one per old worker) the default rule (new worker ``j`` takes old
    worker ``j mod K``'s) makes into ``workers`` states; None where nothing is copied or
    dropped that differs: the same worker count, per-worker state that is empty, or the same
    on every old worker (a copy of shared state; with one old worker that cannot be told, so
    only empty state is quiet there).

    Growing copies states (a residual of error feedback would be applied twice), shrinking
    drops old workers ``workers..K-1``'s (a residual's pending update, a count, lost)."""
    old = len(parts)
    if workers == old or _alike(parts):
        return None
    if workers > old:
        copies = "holds a copy" if workers - old == 1 else "hold copies"
        happened = (f"new worker j took old worker j mod {old}'s per-worker state, so "
                    f"{_workers(old, workers - 1)} {copies}; state that must not be "
                    "duplicated")
    else:
        happened = (f"new worker j took old worker j's per-worker state, and old "
                    f"{_workers(workers, old - 1)}'s was dropped; state that must not be lost")
    return (f"hpctrain: warning: resized from {old} to {workers} workers, and {name} has no "
            f"resize_state of its own: {happened} (an error-feedback residual, a count) "
            "needs one (README, \"An algorithm of your own\"; docs/DESIGN.md §7)")


def warn_default_rule(name: str, parts: list[dict], workers: int) -> None:
    """Print :func:`default_rule_warning`'s line, if any, on stderr (rank 0 resizes)."""
    line = default_rule_warning(name, parts, workers)
    if line:
        print(line, file=sys.stderr, flush=True)


def rescale(updates: int, old_per_epoch: int, new_per_epoch: int) -> int:
    """Update ``updates`` of epochs of ``old_per_epoch`` updates, in epochs of
    ``new_per_epoch`` (rounded to the nearest update, halves up)."""
    return (2 * updates * new_per_epoch + old_per_epoch) // (2 * old_per_epoch)


@torch.no_grad()
def mean_tensors(states: list[dict]) -> dict:
    """The element-wise mean of state dicts with the same keys, recursively: floating tensors
    averaged, everything else (integer buffers, hyper-parameters) the first one's."""
    first = states[0]
    if isinstance(first, dict):
        return {k: mean_tensors([s[k] for s in states]) for k in first}
    if isinstance(first, list | tuple) and first and isinstance(first[0], dict | torch.Tensor):
        return type(first)(mean_tensors([s[i] for s in states]) for i in range(len(first)))
    if isinstance(first, torch.Tensor) and first.is_floating_point():
        return torch.stack(list(states)).mean(dim=0)
    return first


class Resizer:
    """Rank 0's conversion of a checkpoint's per-worker states to this run's worker count.

    ``num_samples``, ``batch_size``: the training set and ``--batch-size`` (the old run's
    epoch length follows from them and its worker count, as the loop computes it); ``workers``,
    ``steps``: this run's workers and batches per epoch of one worker's data; ``per_epoch``:
    updates in an epoch for (steps, workers) (:meth:`~hpctrain.algorithm.Algorithm.per_epoch`);
    ``resize_state``: the algorithm's rule for its own entries (``(parts, workers, position)``
    to a list of ``workers`` dicts).
    """

    def __init__(self, *, num_samples: int, batch_size: int, workers: int, steps: int,
                 per_epoch: Callable[[int, int], int],
                 resize_state: Callable[[list[dict], int, int], list[dict]]) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.workers, self.steps, self.per_epoch = workers, steps, per_epoch
        self.resize_state = resize_state

    def __call__(self, header: dict, parts: list[dict]) -> tuple[list[dict], Resize]:
        """The ``workers`` per-worker states for the checkpoint with ``header`` and the old
        workers' ``parts`` (each: the algorithm's entries, ``guard``, ``straggler``, ``rng``,
        ``counters``, ``collapse``, with fp16 ``scaler``), and the record of the resize."""
        old = len(parts)
        old_steps = steps_per_epoch(self.num_samples, old, self.batch_size)
        old_per_epoch = self.per_epoch(old_steps, old)
        new_per_epoch = self.per_epoch(self.steps, self.workers)
        position = rescale(header["updates"], old_per_epoch, new_per_epoch)
        epoch = position // new_per_epoch
        i = position % new_per_epoch * self.steps // new_per_epoch
        elapsed = parts[0]["counters"].get("elapsed", 0.0)
        own = self.resize_state([{k: v for k, v in p.items() if k not in LOOP_ENTRIES}
                                 for p in parts], self.workers, position)
        folded = fold(parts, self.workers)
        inherited = source(parts, self.workers)
        out = []
        for j in range(self.workers):
            mine, src = folded[j], inherited[j]
            counters = {"samples": sum(p["counters"].get("samples", 0) for p in mine),
                        "local_steps": epoch * self.steps + i, "local_epoch": epoch, "i": i,
                        "elapsed": elapsed, "updates": position}
            guard = {**src["guard"], "bad_here": sum(p["guard"]["bad_here"] for p in mine)}
            straggler = {**src["straggler"],
                         "slept": sum(p["straggler"]["slept"] for p in mine)}
            kept = {"collapse": src["collapse"]} if "collapse" in src else {}  # rank 0's
            if "scaler" in src:  # fp16: the scale goes on, the overflow counts are folded
                kept["scaler"] = {**src["scaler"], "overflows": sum(
                    p.get("scaler", {}).get("overflows", 0) for p in mine)}
            out.append({**own[j], "guard": guard, "straggler": straggler, "rng": src["rng"],
                        "counters": counters, **kept})
        return out, Resize(old, self.workers, header["updates"], position)
