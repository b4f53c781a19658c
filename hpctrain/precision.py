"""Mixed precision (``--mixed-precision``): the forward pass in bfloat16 or float16, everything
else in float32.

Each part of a step's loss (:meth:`hpctrain.algorithm.Algorithm.losses`) is computed under
``torch.autocast`` (:func:`each_under`): matrix products and convolutions run in the half
type, and autocast keeps the losses (``cross_entropy``, ``nll_loss``, ``mse_loss``) in float32;
on a GPU also softmaxes and sums, but on the CPU torch's autocast leaves ``softmax``,
``log_softmax``, ``sum`` and ``mean`` in the half type when their input is (a model's own
``log_softmax`` runs in bfloat16 there: cast to float32 first where that matters). Backward runs
outside the context, as torch advises, so the gradients, the parameters, the optimizer
state, the allreduce and the asynchronous store all stay float32, and every algorithm takes
it alike. Evaluation runs in float32.

bfloat16 has float32's exponent range and needs nothing more. float16's small gradients
would underflow, so ``fp16`` scales the loss (:class:`LossScaler`, torch's ``GradScaler``'s rules):
backward of ``loss * scale``, then the gradients are divided by the scale before the NaN
guard, clipping and the step see them (after ssgd's allreduce, which sums scaled values). A
step whose gradients overflowed is skipped by the guard like any NaN/Inf step, and the scale
halves; it doubles after 2,000 clean steps. While the scale is above 1 (``amplifies``), such
a step is the scale's overflow, not a bad one: the guard does not count it toward
``--max-bad-steps`` (the scale starts at 65,536: a model whose gradients need it at 2
overflows 15 times in a row first), and ``LossScaler.overflows`` counts it. At a scale of 1
or below, halving it no longer undoes an amplification: those count as bad steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from hpctrain import devices, options
from hpctrain.errors import UsageError

CHOICES = ("no", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check(choice: str, device_type: str) -> None:
    """UsageError (before MPI) when ``choice`` cannot run on ``device_type`` here."""
    if choice not in CHOICES:
        raise UsageError(f"{_given(choice, repr(choice))}: choose from {', '.join(CHOICES)}")
    # Native bfloat16 starts with Ampere (8.0); torch would emulate it, slowly, before that.
    gpu = devices.local_gpu() if device_type == "cuda" else None  # this rank's, as it will run
    if choice == "bf16" and gpu is not None and torch.cuda.get_device_capability(gpu) < (8, 0):
        major, minor = torch.cuda.get_device_capability(gpu)
        raise UsageError(f"{_given('bf16')}: {torch.cuda.get_device_name(gpu)} (compute "
                         f"capability {major}.{minor}) has no native bfloat16; use "
                         f"{_given('fp16')}")
    if choice == "fp16" and device_type == "cpu" and not hasattr(torch.amp, "GradScaler"):
        raise UsageError(f"{_given('fp16')} on the CPU needs torch >= 2.3, not "
                         f"{torch.__version__}; use {options.example('bf16')}")


def _given(choice: str, typed: str | None = None) -> str:
    """``--mixed-precision CHOICE`` (``typed``: the choice as written there) in a refusal;
    from Python the field given, ``RunConfig.mixed_precision='CHOICE'``."""
    return options.named(f"--mixed-precision {typed or choice}", "RunConfig",
                         "mixed_precision", choice)


def each_under(choice: str, device: torch.device,
               parts: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``parts`` (a step's loss parts), each computed under autocast for ``choice``; the
    caller's backward of a part runs outside it. ``no``: ``parts`` themselves."""
    if choice == "no":
        yield from parts
        return
    while True:
        with torch.autocast(device.type, dtype=_DTYPES[choice]):
            part = next(parts, None)
        if part is None:
            return
        yield part


class LossScaler:
    """``fp16``'s loss scaling for one worker's steps; it does nothing for ``no`` and ``bf16``.

    Per step: :meth:`scale` each loss part before its backward, :meth:`unscale` the
    gradients once they are complete, :meth:`update` after the step with the guard's verdict
    (skipped for a non-finite gradient; as the scale's overflow). torch's ``GradScaler``
    rules (start at 2**16, halve after a skipped step, double after 2,000 clean ones), but
    driven by that verdict, not by this rank's own look at its gradients: where the ranks
    skip together on an agreed verdict (Adasum's local gradients), a ``GradScaler`` halved
    only on the ranks whose own gradient overflowed, and the ranks' scales drifted apart.
    ``overflows``: steps skipped as the scale's overflow; kept in its checkpoint state, with
    the scale, under ``GradScaler.state_dict``'s names.
    """

    INIT_SCALE, GROWTH_INTERVAL = 2.0**16, 2000

    def __init__(self, choice: str):
        self.on = choice == "fp16"
        self._scale, self._clean = self.INIT_SCALE, 0  # clean: steps since the last change
        self.overflows = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self._scale if self.on else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide ``optimizer``'s gradients by the scale (an overflow stays Inf/NaN); the
        scale is a power of 2, so the division is exact."""
        if self.on:
            inverse = 1.0 / self._scale
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(inverse)

    def amplifies(self) -> bool:
        """Whether this step's gradient was computed at a scale above 1 (fp16): a NaN/Inf in
        it may be the scale's overflow, which halving the scale cures."""
        return self.on and self._scale > 1.0

    def update(self, skipped: bool, overflowed: bool = False) -> None:
        """After a step: halve the scale if it was ``skipped`` (a non-finite gradient), else
        double it after enough clean steps; ``overflowed``: skipped as the scale's overflow
        (counted)."""
        if not self.on:
            return
        self.overflows += overflowed
        if skipped:
            self._scale, self._clean = self._scale * 0.5, 0
            return
        self._clean += 1
        if self._clean >= self.GROWTH_INTERVAL:  # past it: a GradScaler's longer interval
            grown = self._scale * 2.0
            self._scale = grown if math.isfinite(grown) else self._scale
            self._clean = 0

    def get_scale(self) -> float | None:
        """The current scale (None when off)."""
        return self._scale if self.on else None

    def overflow_steps(self) -> int | None:
        """Steps skipped as the scale's overflow (None when off), for the summary."""
        return self.overflows if self.on else None

    def state_dict(self) -> dict:
        if not self.on:
            return {}
        return {"scale": self._scale, "growth_factor": 2.0, "backoff_factor": 0.5,
                "growth_interval": self.GROWTH_INTERVAL, "_growth_tracker": self._clean,
                "overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's state (also one a ``GradScaler`` wrote: the same names)."""
        if self.on:
            self._scale, self._clean = float(state["scale"]), int(state["_growth_tracker"])
            self.overflows = state.get("overflows", 0)  # absent from older checkpoints
