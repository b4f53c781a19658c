"""hpctrain's ``sgd`` loop against a plain PyTorch loop: the loop's own per-step overhead.

    python scripts/bench_loop_overhead.py [--model mlp] [--dataset synthetic] [--epochs 10]
                                          [--repeats 11] [--progress] [--clock cpu]

Both run in this one process, interleaved (hpctrain, plain, hpctrain, plain, ...), on the
same data, model (built from the same seed), optimizer (SGD, sgd's default rate and
momentum, the cosine schedule set every step) and batch. hpctrain's figure is its summary's
``updates / wall_s`` (set-up and scoring are outside ``wall_s``; one snapshot a run, at the
end, with ``--eval-every`` the whole run); the plain loop's is its steps over the time of
its epochs (a fresh permutation each, as hpctrain's global shuffle draws one). Prints each
pair's steps/s and the ratio hpctrain / plain, then the median and range of the ratios and
the ratio of the best rates (on shared cores another job's load only slows a run: the best
of many short runs is the least disturbed), and the NaN guard's cost per step. A
model this small (the mlp: about 1 ms a step) is where the overhead shows.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import timeit

import torch
import torch.nn.functional as F

import hpctrain
from hpctrain import data, guard, models, optimizers, runtime
from hpctrain.config import resolve

CLOCK = [time.perf_counter]  # --clock cpu: time.process_time, for both loops


def config(args: argparse.Namespace, out: str) -> hpctrain.RunConfig:
    return hpctrain.RunConfig(
        algo="sgd", seed=1, out=out, progress=args.progress, eval_every=float(args.epochs),
        data=hpctrain.DataConfig(dataset=args.dataset),
        model=hpctrain.ModelConfig(name=args.model),
        optim=hpctrain.OptimConfig(epochs=args.epochs))


def hpctrain_steps_per_s(args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as out:
        summary = hpctrain.train(config(args, out + "/run"))
    return summary["updates"] / summary["wall_s"]


def plain_steps_per_s(args: argparse.Namespace, train: data.Dataset) -> float:
    """The plain loop: zero_grad, forward, cross-entropy, backward, step, and the rate."""
    o = resolve(config(args, "unused")).optim
    torch.manual_seed(1)
    model = models.build(args.model, train.shape, train.num_classes)
    model.train()
    opt = optimizers.make(model.parameters(), o)
    n, b = len(train.labels), o.batch_size
    steps = math.ceil(n / b)
    total = steps * o.epochs
    torch.set_num_threads(1)  # hpctrain's --threads default
    start = CLOCK[0]()
    for epoch in range(o.epochs):
        order = torch.randperm(n)
        images, labels = train.images[order], train.labels[order]
        for i in range(steps):
            for group in opt.param_groups:  # the cosine schedule, as hpctrain sets it
                group["lr"] = 0.5 * o.lr * (1 + math.cos(math.pi * (epoch * steps + i) / total))
            x, y = images[i * b:(i + 1) * b], labels[i * b:(i + 1) * b]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return total / (CLOCK[0]() - start)


def guard_us(args: argparse.Namespace, train: data.Dataset) -> tuple[float, float]:
    """The NaN guard's verdict on the model's gradients after one batch, microseconds (best
    of 5 x 2000): ``guard.all_finite`` (sums first) and by ``guard.extremes`` alone (the
    verdict before sums came first)."""
    torch.manual_seed(1)
    model = models.build(args.model, train.shape, train.num_classes)
    F.cross_entropy(model(train.images[:64]), train.labels[:64]).backward()
    grads = [p.grad for p in model.parameters()]
    now = min(timeit.repeat(lambda: guard.all_finite(grads), number=2000, repeat=5))
    before = min(timeit.repeat(lambda: guard._finite([e for g in grads
                                                      for e in guard.extremes(g)]),
                               number=2000, repeat=5))
    return now / 2000 * 1e6, before / 2000 * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=models.MODELS)
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--progress", action="store_true", help="hpctrain's bar on")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time for both (hpctrain's run clock "
                        "replaced), which another job on the same cores disturbs less")
    args = parser.parse_args()
    if args.clock == "cpu":
        CLOCK[0] = runtime.REAL.now = time.process_time  # wall_s becomes the loop's CPU time
    train = data.load(args.dataset, "train")
    hpctrain_steps_per_s(args)  # warm: imports, first allocations
    plain_steps_per_s(args, train)
    ours_all, plain_all, ratios = [], [], []
    print(f"{'repeat':>6} {'hpctrain steps/s':>17} {'plain steps/s':>14} {'ratio':>6}")
    for r in range(args.repeats):
        ours, plain = hpctrain_steps_per_s(args), plain_steps_per_s(args, train)
        ours_all.append(ours), plain_all.append(plain), ratios.append(ours / plain)
        print(f"{r + 1:>6} {ours:>17.0f} {plain:>14.0f} {ours / plain:>6.3f}", flush=True)
    print(f"ratio hpctrain / plain: median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}), {args.model} on {args.dataset}, "
          f"{args.epochs} epochs, {args.repeats} pairs")
    print(f"best of each: hpctrain {max(ours_all):.0f}, plain {max(plain_all):.0f} steps/s, "
          f"ratio {max(ours_all) / max(plain_all):.3f}")
    now, before = guard_us(args, train)
    print(f"NaN guard over the {args.model}'s gradients: {now:.1f} us (sums first), "
          f"{before:.1f} us (extremes alone)")


if __name__ == "__main__":
    main()
