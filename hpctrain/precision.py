"""Mixed precision (``--mixed-precision``): the forward pass in bfloat16 or float16, everything
else in float32.

Each part of a step's loss (:meth:`hpctrain.algorithm.Algorithm.losses`) is computed under
``torch.autocast`` (:func:`each_under`): matrix products and convolutions run in the half
type, and autocast keeps the losses, softmaxes and reductions in float32. Backward runs
outside the context, as torch advises, so the gradients, the parameters, the optimizer
state, the allreduce and the asynchronous store all stay float32, and every algorithm takes
it alike. Evaluation runs in float32.

bfloat16 has float32's exponent range and needs nothing more. float16's small gradients
would underflow, so ``fp16`` scales the loss (:class:`LossScaler`, torch's ``GradScaler``):
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

from collections.abc import Iterator

import torch

from hpctrain import devices
from hpctrain.errors import UsageError

CHOICES = ("no", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check(choice: str, device_type: str) -> None:
    """UsageError (before MPI) when ``choice`` cannot run on ``device_type`` here."""
    if choice not in CHOICES:
        raise UsageError(f"--mixed-precision {choice!r}: choose from {', '.join(CHOICES)}")
    # Native bfloat16 starts with Ampere (8.0); torch would emulate it, slowly, before that.
    gpu = devices.local_gpu() if device_type == "cuda" else None  # this rank's, as it will run
    if choice == "bf16" and gpu is not None and torch.cuda.get_device_capability(gpu) < (8, 0):
        major, minor = torch.cuda.get_device_capability(gpu)
        raise UsageError(f"--mixed-precision bf16: {torch.cuda.get_device_name(gpu)} (compute "
                         f"capability {major}.{minor}) has no native bfloat16; use "
                         "--mixed-precision fp16")
    if choice == "fp16" and device_type == "cpu" and not hasattr(torch.amp, "GradScaler"):
        raise UsageError(f"--mixed-precision fp16 on the CPU needs torch >= 2.3 (its loss "
                         f"scaler), not {torch.__version__}; use bf16")


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
    gradients once they are complete, :meth:`update` after the step (taken or skipped).
    ``overflows``: steps skipped as the scale's overflow (the guard's verdict, given to
    :meth:`update`); kept in its checkpoint state.
    """

    def __init__(self, choice: str, device: torch.device):
        self._scaler = None
        self.overflows = 0
        if choice == "fp16":
            self._scaler = torch.amp.GradScaler(device.type) if hasattr(torch.amp, "GradScaler") \
                else torch.cuda.amp.GradScaler()  # torch < 2.3: CUDA only (check() said so)

    @property
    def on(self) -> bool:
        return self._scaler is not None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self._scaler is None else self._scaler.scale(loss)

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide ``optimizer``'s gradients by the scale (an overflow stays Inf/NaN)."""
        if self._scaler is not None:
            self._scaler.unscale_(optimizer)

    def amplifies(self) -> bool:
        """Whether this step's gradient was computed at a scale above 1 (fp16): a NaN/Inf in
        it may be the scale's overflow, which halving the scale cures."""
        return self._scaler is not None and self._scaler.get_scale() > 1.0

    def update(self, overflowed: bool = False) -> None:
        """Halve the scale after an overflow; double it after enough clean steps.
        ``overflowed``: the guard skipped this step as the scale's overflow (counted)."""
        if self._scaler is not None:
            self.overflows += overflowed
            self._scaler.update()

    def get_scale(self) -> float | None:
        """The current scale (None when off)."""
        return None if self._scaler is None else self._scaler.get_scale()

    def overflow_steps(self) -> int | None:
        """Steps skipped as the scale's overflow (None when off), for the summary."""
        return None if self._scaler is None else self.overflows

    def state_dict(self) -> dict:
        if self._scaler is None:
            return {}
        return {**self._scaler.state_dict(), "overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        if self._scaler is not None:
            state = dict(state)
            self.overflows = state.pop("overflows", 0)  # absent from older checkpoints
            self._scaler.load_state_dict(state)
