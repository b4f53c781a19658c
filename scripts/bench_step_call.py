"""What reusing ``DistributedOptimizer.step``'s agreement call saves, per step.

    python scripts/bench_step_call.py

Before every step ssgd's optimizer agrees with the other ranks on one ``Call`` whose
``agree`` holds its bucket plan (a list with one entry per gradient); its key is a hash of
that plan's ``repr``. The step made a new Call, and hashed the plan, every step; it now
makes one per plan (``BucketedAllreduce._step_call``) and the Call hashes once. For real
plans (the mlp, ResNet-20) and plans of 161 and 400 tensors (ResNet-50's and a
transformer's counts), prints the microseconds per step of a fresh Call's ``key()`` and
``describe()`` (before: the baseline, in the same run) and of a reused one's (now), best of
5 runs of 2000.
"""

import timeit

import torch

from hpctrain import models
from hpctrain.sync.buckets import plan_buckets
from hpctrain.sync.collective_check import Call

BUCKET_BYTES = 25 * 2**20  # Horovod's default fusion threshold, as ssgd's


def plan_of(sizes: list[int]) -> list:
    """A BucketedAllreduce's ``plan`` for float32 gradients of ``sizes`` elements."""
    typed = [(n, torch.float32) for n in sizes]
    return [[(typed[i][0], str(typed[i][1])) for i in b]
            for b in plan_buckets(typed, BUCKET_BYTES)]


def call(plan: list) -> Call:
    return Call("DistributedOptimizer.step", agree=(plan, []), join_plan=("step", ("x", 0), []),
                row="DistributedOptimizer.step")


cases = {"mlp": models.build("mlp", (1, 28, 28)), "resnet20": models.build("resnet20", (3, 32, 32))}
plans = {name: plan_of([p.numel() for p in m.parameters()]) for name, m in cases.items()}
plans |= {f"{n} tensors": plan_of([1000] * n) for n in (161, 400)}
print(f"{'plan':<12} {'tensors':>7} {'fresh us':>9} {'reused us':>10} {'fresh/reused':>13}")
for name, plan in plans.items():
    reused = call(plan)
    fresh_s = min(timeit.repeat(lambda p=plan: (c := call(p)).key() and c.describe(),
                                number=2000, repeat=5)) / 2000
    reused_s = min(timeit.repeat(lambda c=reused: c.key() and c.describe(),
                                 number=2000, repeat=5)) / 2000
    tensors = sum(len(b) for b in plan)
    print(f"{name:<12} {tensors:>7} {fresh_s * 1e6:>9.1f} {reused_s * 1e6:>10.2f} "
          f"{fresh_s / reused_s:>13.0f}")
