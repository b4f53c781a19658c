"""Mixed precision (``--mixed-precision``): the forward pass in bfloat16, everything else in
float32.

With ``bf16`` each part of a step's loss (:meth:`hpctrain.algorithm.Algorithm.losses`) is
computed under ``torch.autocast``: matrix products and convolutions run in bfloat16, and
autocast keeps the losses, softmaxes and reductions in float32. Backward runs outside the
context, as torch advises, so the gradients, the parameters, the optimizer state, the
allreduce and the asynchronous store all stay float32, and every algorithm takes it alike.
bfloat16 has float32's exponent range, so no loss scaling is needed (float16 would need a
gradient scaler, which hpctrain does not provide). Evaluation runs in float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from hpctrain.errors import UsageError

CHOICES = ("no", "bf16")


def check(choice: str, device_type: str) -> None:
    """UsageError (before MPI) when ``choice`` cannot run on ``device_type`` here."""
    if choice not in CHOICES:
        raise UsageError(f"--mixed-precision {choice!r}: choose from {', '.join(CHOICES)}")
    # Native bfloat16 starts with Ampere (8.0); torch would emulate it, slowly, before that.
    if choice == "bf16" and device_type == "cuda" and torch.cuda.get_device_capability() < (8, 0):
        major, minor = torch.cuda.get_device_capability()
        raise UsageError(f"--mixed-precision bf16: {torch.cuda.get_device_name()} (compute "
                         f"capability {major}.{minor}) has no native bfloat16; use "
                         "--mixed-precision no")


def each_under(choice: str, device: torch.device,
               parts: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``parts`` (a step's loss parts), each computed under autocast for ``choice``; the
    caller's backward of a part runs outside it. ``no``: ``parts`` themselves."""
    if choice == "no":
        yield from parts
        return
    while True:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            part = next(parts, None)
        if part is None:
            return
        yield part
