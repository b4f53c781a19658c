"""What keeping an async optimizer's gradients in its flat buffer saves: DC-ASGD-a steps.

    python scripts/bench_async_step.py [WIDTH ...]      default: 512 1600 (1.05M, 10.2M)

A 4-layer MLP (``nn.Linear(WIDTH, WIDTH)`` each), batch 64, one worker on a ``locked``
store over COMM_SELF. Each iteration: ``opt.zero_grad(...)``, forward, backward,
``opt.step()`` (the push). With ``zero_grad()`` (the optimizer's default, in place) backward
accumulates into the buffer the push reads; with ``zero_grad(set_to_none=True)`` (torch's
default) autograd makes new gradients and the step copies them in, as every step did before
the gradients became views of the buffer. Runs of 40 timed iterations (after 4 warm-up) take
turns, each mode on a fresh model and store, two runs each; prints the medians (ms) of the
step and of the whole iteration, and in-place / set_to_none.
"""

import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

from hpctrain import comm
from hpctrain.async_ import DCASGD, ParameterStore

WARMUP, REPEATS, ROUNDS, BATCH = 4, 40, 2, 64
widths = [int(a) for a in sys.argv[1:]] or [512, 1600]
torch.set_num_threads(1)


def run(width: int, set_to_none: bool) -> tuple[list[float], list[float]]:
    """ms of each timed step and iteration."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
    x, y = torch.randn(BATCH, width), torch.randint(0, width, (BATCH,))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    steps, iterations = [], []
    with ParameterStore(flat, comm.mpi().COMM_SELF, consistency="locked") as store:
        opt = DCASGD(model, store, lr=0.01, adaptive=True)
        for i in range(WARMUP + REPEATS):
            start = time.perf_counter()
            opt.zero_grad(set_to_none=set_to_none)
            F.cross_entropy(model(x), y).backward()
            pushing = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            if i >= WARMUP:
                steps.append((end - pushing) * 1e3)
                iterations.append((end - start) * 1e3)
        store.finish()
    return steps, iterations


print("params | step in place | step set_to_none | ratio | iteration in place | "
      "iteration set_to_none | ratio")
for width in widths:
    times = {mode: ([], []) for mode in (False, True)}
    for _ in range(ROUNDS):
        for mode in (False, True):
            for kept, new in zip(times[mode], run(width, mode), strict=True):
                kept.extend(new)
    (step, whole), (step_none, whole_none) = (
        [statistics.median(t) for t in times[mode]] for mode in (False, True))
    print(f"{4 * (width * width + width) / 1e6:.2f}M | {step:.2f} | {step_none:.2f} | "
          f"{step / step_none:.2f} | {whole:.1f} | {whole_none:.1f} | {whole / whole_none:.2f}")
