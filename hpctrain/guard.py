"""Never apply a gradient holding NaN or Inf: skip the step, count it, stop after too many;
with ``--clip-grad-norm``, never one whose norm is above it either.

One process, or local steps of independent workers (model averaging, EC: ``comm`` only gathers
the counts): a step is skipped when any element of its own gradient is not finite.

Synchronous SGD (``comm`` given, ``reduced``): every rank skips the step when any rank's
gradient was bad, and that verdict costs no message. A NaN or Inf in one rank's contribution
makes the same elements of the allreduced gradient non-finite on every rank (NaN absorbs any
sum, Inf plus a finite number is Inf, Inf minus Inf is NaN), and every rank receives the same
reduced gradient (the replicas would drift apart otherwise), so checking the reduced gradient
before the step gives the same answer everywhere. The alternative, zeroing the bad contribution
and dividing by the number of good ones, needs that number before the step: one more allreduce
on every step to save one batch on the rare bad one, and a step whose effective batch size
silently changes. Which worker was bad is recorded by a hook on each parameter that sees this
rank's own gradient during backward, before it is handed to the allreduce; it is read only when
a step is skipped. Counts per worker are gathered once, for the summary (or for the stop
message).

Synchronous SGD with Adasum (``agree``): the gradients stay local (each rank steps, and the
changes are combined in the step), so the verdict is agreed in one small allgather per step:
every rank skips when any rank's gradient was bad, as above. Finite changes can still combine
into a NaN or Inf (a diverging learning rate overflows Adasum's dot products): the step then
leaves the parameters as they were, the same on every rank (each holds the same combined
bits), and :meth:`GradientGuard.reject` counts it as a bad step.

fp16's loss scaling (``amplified``, :mod:`hpctrain.precision`): a non-finite gradient computed
at a scale above 1 is the scale's overflow when the step's loss is finite. It is skipped, but
it is not a bad step: it breaks a run of them and does not count toward ``max_bad_steps``
(``overflowed`` tells the scaler, which counts it and halves the scale). Synchronous SGD
judges by the scale alone, at no cost: every rank's scaler saw the same reduced gradients, so
the scales agree, while each rank's loss is its own. With Adasum the ranks agree on it in the
verdict's allgather: an overflow when every bad rank's is one.

A step skipped for its gradient leaves the parameters and the optimizer's state (momentum,
Adam's moments and its step count) as they were: the loop calls no ``optimizer.step()``, as
``GradScaler`` skips it (an Adasum update that :meth:`GradientGuard.reject` counts comes after
each rank's local step, which has moved its optimizer's state). Under the lock-step
algorithms it still counts as an update (``Algorithm.progress``), so the learning-rate
schedule and the run's length move on, as a script's ``scheduler.step()`` after a skipped
``optimizer.step()``; an asynchronous worker keeps its ticket instead.

Clipping (``clip_norm``) scales a finite gradient whose L2 norm over all parameters exceeds
the bound down to it, as ``torch.nn.utils.clip_grad_norm_`` does, just before the step: for
synchronous SGD the reduced gradient, as a Horovod or DDP user clips after ``synchronize()``
(every rank scales the same gradient alike; clipping each contribution before the allreduce
would change the average's direction); for every other algorithm the worker's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from hpctrain.errors import on_every_rank


class TooManyBadSteps(RuntimeError):
    """Training stopped: too many consecutive steps had non-finite gradients."""


def _values(tensor: torch.Tensor) -> torch.Tensor:
    """The real values a verdict on ``tensor`` judges: a sparse one's stored values (an
    embedding's gradient), a complex one's real and imaginary parts."""
    values = tensor._values() if tensor.is_sparse else tensor
    if values.is_complex():  # conj() leaves a bit to resolve (a copy) before the real view
        values = torch.view_as_real(values.resolve_conj())
    return values


def extremes(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The smallest and largest element of ``tensor`` (dense, or sparse; complex: of its
    real and imaginary parts), which are both finite exactly when every element is: a NaN
    propagates to both, an Inf is one of them. One pass with no temporary of the tensor's
    size, where ``isfinite(t).all()`` writes one. Nothing for an empty tensor."""
    values = _values(tensor)
    if not values.numel():
        return []
    try:
        return list(torch.aminmax(values))
    except RuntimeError:  # torch 2.1's CPU aminmax takes no float16: min and max do
        return [values.min(), values.max()]


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite. Their sums first: a NaN or Inf
    element makes a sum NaN or Inf, so finite sums are the verdict, and a CPU sums 4x
    faster than ``aminmax`` finds extremes (the mlp's: 20 us a step against 34); a non-finite
    sum (a bad element, or finite ones that overflowed) is judged by :func:`extremes`."""
    values = [v for v in map(_values, tensors) if v.numel()]
    return _finite([v.sum() for v in values]) or _finite([e for v in values for e in extremes(v)])


def _finite(ends: list[torch.Tensor]) -> bool:
    """Whether every one of ``ends`` is finite; a stack per dtype: none is converted, which
    could overflow (a float64 1e300 is Inf in float32). One device sync."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for end in ends:
        by_dtype.setdefault(end.dtype, []).append(end)
    flags = [torch.isfinite(torch.stack(same)).all() for same in by_dtype.values()]
    if len(flags) == 1:  # the usual one dtype: no second stack
        return bool(flags[0])
    return bool(torch.stack(flags).all()) if flags else True


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``, which takes no sparse gradients, for them too:
    a sparse one is coalesced first (its duplicate entries summed) and its values count."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.coalesce()
    grads = [p.grad for p in params if p.grad is not None]
    if not any(g.is_sparse for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    values = [g._values() if g.is_sparse else g for g in grads]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in values]))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # as torch's
    for v in values:
        v.mul_(coef)
    return norm


class GradientGuard:
    """Decides, after the gradient is complete (reduced, for ssgd), whether a step may be taken.

    ``check(update)`` returns False for a step to skip and raises TooManyBadSteps after
    ``max_bad_steps`` skipped in a row (with ``reduced`` or ``agree`` on every rank alike,
    :func:`~hpctrain.errors.on_every_rank`: the job ends with rank 0's line). A step it lets through
    has its gradient clipped to ``clip_norm`` first, when given.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], max_bad_steps: int, comm=None,
                 reduced: bool = False, agree: bool = False, clip_norm: float | None = None):
        self.params = [p for p in params if p.requires_grad]
        self.max_bad_steps, self.comm, self.clip_norm = max_bad_steps, comm, clip_norm
        self.clipped = 0
        self.reduced = reduced and comm is not None
        self.agree = agree and comm is not None
        self.together = self.reduced or self.agree  # every rank skips the same steps
        self.skipped = self.consecutive = self.bad_here = 0
        self._run_before = 0  # bad steps in a row before the last one check() let through
        self.overflowed = False  # the last step checked was skipped as fp16's overflow
        self._local: list[torch.Tensor] = []
        if self.reduced:
            for p in self.params:
                p.register_hook(self._see)

    def _see(self, grad: torch.Tensor) -> None:
        self._local.extend(extremes(grad))  # judged only when a step is skipped

    def check(self, update: int, amplified: Callable[[], bool] | None = None,
              loss: torch.Tensor | float = 0.0) -> bool:
        """True if the gradients in ``.grad`` are finite and the step may be applied.

        ``amplified``: whether the step ran at an fp16 loss scale above 1
        (``LossScaler.amplifies``; asked only of a non-finite gradient); ``loss``: the step's
        loss. Then a non-finite gradient may be the scale's overflow (see the module
        docstring): skipped, with ``overflowed`` set."""
        local, self._local = self._local, []
        self.overflowed = False
        finite = all_finite(p.grad for p in self.params if p.grad is not None)
        mine_bad = not finite  # unless reduced: then the hooks saw this rank's own
        if self.agree:
            verdicts = self.comm.allgather((finite, finite or self._overflow(amplified, loss)))
            finite = all(f for f, _ in verdicts)
            overflow = all(ok for _, ok in verdicts)  # every bad rank's was an overflow
        else:
            overflow = not finite and self._overflow(amplified, loss)
        if finite:
            self._run_before, self.consecutive = self.consecutive, 0  # for reject()
            self._clip()
            return True
        self.skipped += 1
        if self.reduced:
            mine_bad = not _finite(local)
        if mine_bad:
            self.bad_here += 1
        if overflow:
            self.overflowed, self.consecutive = True, 0
            return False
        self.consecutive += 1
        if self.consecutive >= self.max_bad_steps:
            self._stop(update)
        return False

    def reject(self, update: int) -> None:
        """A step :meth:`check` let through was not applied after all (Adasum's combined
        update was not finite): skipped, and a bad step toward ``max_bad_steps``."""
        self.skipped += 1
        self.consecutive = self._run_before + 1
        if self.consecutive >= self.max_bad_steps:
            self._stop(update)

    def _overflow(self, amplified: Callable[[], bool] | None,
                  loss: torch.Tensor | float) -> bool:
        """Whether this rank's non-finite gradient is fp16's overflow: computed at a scale
        above 1, from a finite loss (synchronous SGD: the scale alone, as every rank sees)."""
        if amplified is None or not amplified():
            return False
        return self.reduced or math.isfinite(float(loss))

    def _clip(self) -> None:
        if self.clip_norm is None:
            return
        norm = clip_grad_norm_(self.params, self.clip_norm)
        self.clipped += bool(norm > self.clip_norm)

    def _stop(self, update: int) -> None:
        per_worker = self.per_worker() if self.together else None
        first = update - self.consecutive + 1
        counts = f" (per worker: {per_worker})" if per_worker is not None else ""
        adasum = " or combined Adasum updates" if self.agree else ""  # see reject()
        error = TooManyBadSteps(
            f"{self.consecutive} consecutive steps (local steps {first}-{update}) had NaN/Inf "
            f"gradients{counts}{adasum}; stopping (--max-bad-steps {self.max_bad_steps}). "
            "Lower --lr or check the data")
        raise on_every_rank(error) if self.together else error

    def per_worker(self) -> list[int]:
        """Bad gradients seen on each worker (collective with ``comm``)."""
        return [bad for bad, _ in self._gather()]

    def _gather(self) -> list[tuple[int, int]]:
        mine = (self.bad_here, self.clipped)
        return self.comm.allgather(mine) if self.comm is not None else [mine]

    def summary(self) -> dict:
        """For summary.json (collective with ``comm``): steps skipped (summed over workers
        when each skips its own), bad gradients and clipped steps per worker."""
        counts = self._gather()
        per_worker = [bad for bad, _ in counts]
        return {"skipped_steps": self.skipped if self.together else sum(per_worker),
                "bad_gradients_per_worker": per_worker, "max_bad_steps": self.max_bad_steps,
                "clip_grad_norm": self.clip_norm,
                "clipped_steps_per_worker": [clipped for _, clipped in counts]}

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive,
                "bad_here": self.bad_here, "clipped": self.clipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = state["skipped"], state["consecutive"]
        self.bad_here = state["bad_here"]
        self.clipped = state.get("clipped", 0)  # absent from checkpoints before clipping
