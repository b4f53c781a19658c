"""The simulator studies of docs/RESULTS.md ("Simulated: ..."), one process, sequentially.

    OMP_NUM_THREADS=1 PYTHONPATH=. nice -n 10 .venv/bin/python scripts/sim_study.py dcasgd OUT
    ... shuffle OUT
    ... ecma OUT
    ... ecma-lr OUT      (the same at lr 0.02, relabelled samples 40% of each batch)
    ... ecma-full OUT    (the real runs' settings: all 60,000 samples, batch 64)
    ... ecma-batch16 OUT, ecma-subset OUT (ecma-full at K = 16, one setting reduced)
    ... ecma-steps OUT   (ecma-subset for 16 and 40 epochs)
    ... ecma-rounds OUT  (ecma-steps in 4 rounds, as the full-data runs)
    ... ecma-share OUT   (40 epochs in rounds of 4, with D 192 and 375)
    ... ecma-full-share OUT (ecma-full at K = 16 with D 625, 1,875 and 3,750)
    ... ecma-batch32-share OUT (ecma-share's question at batch 32: D 128, 256 and 375)
    ... ecma-k8-share OUT (the share rule at K = 8: D 256 and 750)
    ... dcasgd-long OUT  (M = 8 to 64 with four times the updates)
    ... shuffle-long OUT (16 epochs; --seeds 1,2 and --seeds 3 can run side by side)
    ... fidelity OUT     (real runs under $HPCTRAIN_MPIRUN, each replayed in the simulator)
    ... fidelity-async OUT (real asgd/dcasgd-a runs, replayed with and without their rests)

Each run is ``hpctrain.sim.simulate`` with the settings printed in OUT/runs.jsonl (one line
per run: the study's variables, the final test accuracy, divergence, staleness); the study's
table and plot are written to OUT/table.md and OUT/*.png. A run that stops on NaN/Inf
gradients (--max-bad-steps) counts as diverged (error 0.9, the chance level).
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hpctrain import algorithm_options
from hpctrain.config import DataConfig, OptimConfig, RunConfig
from hpctrain.guard import TooManyBadSteps
from hpctrain.sim import SimConfig, simulate

SUBSET = 6000  # training samples (a fixed random subset of Fashion-MNIST's 60000)
STEP = "lognormal:0.01:0.3"
CHANCE_ERROR = 0.9
REPORT_ONLY = "--report-only" in sys.argv  # tables and plots from the runs done so far
# --seeds 1,2: only these seeds (two processes can share one OUT, each its own seeds)
SEEDS = {int(s) for s in sys.argv[sys.argv.index("--seeds") + 1].split(",")} \
    if "--seeds" in sys.argv else None


def run(out: Path, name: str, algo: str, workers: int, seed: int, *, epochs: int,
        batch: int, lr: float, momentum: float = 0.0, data: DataConfig | None = None,
        algorithm=None, subset: int | None = SUBSET) -> dict:
    folder = out / "runs" / name
    done = out / "runs.jsonl"
    if done.exists():
        for line in done.read_text().splitlines():
            row = json.loads(line)
            if row["name"] == name and row["lr"] == lr:
                return row
    if REPORT_ONLY:
        return {"name": name, "missing": True}
    config = RunConfig(algo=algo, seed=seed, out=str(folder), progress=False,
                       eval_every=float(epochs), data=data or DataConfig(),
                       optim=OptimConfig(epochs=epochs, batch_size=batch, lr=lr,
                                         momentum=momentum), algorithm=algorithm)
    sim = SimConfig(workers=workers, step_time=STEP, train_subset=subset)
    start = time.perf_counter()
    row = {"name": name, "algo": algo, "workers": workers, "seed": seed, "lr": lr,
           "epochs": epochs, "batch": batch}
    try:
        s = simulate(config, sim)
        row.update(error=1 - s["final_test_acc"], diverged=False, updates=s["updates"],
                   virtual_s=s["wall_s"], staleness=s.get("staleness"),
                   member=s.get("final_member_acc"), ensemble=s.get("final_ensemble_acc"))
    except TooManyBadSteps:
        row.update(error=CHANCE_ERROR, diverged=True)
    row["real_s"] = round(time.perf_counter() - start, 1)
    with open(done, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


def dcasgd(out: Path, ms: tuple = (1, 4, 8, 16, 32, 64), epochs: int = 2,
           algos: tuple = ("ssgd", "asgd", "dcasgd-c", "dcasgd-a", "ssp")) -> None:
    """DC-ASGD at scale: error against M; the lr chosen per M on a grid for asgd."""
    ms, seeds, batch = list(ms), [1, 2, 3], 32
    grid = [0.0125, 0.025, 0.05, 0.1]
    chosen = {}
    for m in ms:
        algo = "sgd" if m == 1 else "asgd"
        errs = {lr: run(out, f"grid-{algo}-M{m}-lr{lr}", algo, m, 0, epochs=epochs,
                        batch=batch, lr=lr).get("error") for lr in grid}
        errs = {lr: e for lr, e in errs.items() if e is not None}
        chosen[m] = min(errs, key=lambda lr: (errs[lr], lr)) if errs else None
    rows: dict = {}
    for seed in seeds:  # one seed of everything first: a partial study still spans M
        for m in ms:
            for algo in ["sgd"] if m == 1 else algos:
                if chosen[m] is None:
                    continue
                r = run(out, f"{algo}-M{m}-s{seed}", algo, m, seed, epochs=epochs,
                        batch=batch, lr=chosen[m])
                if "missing" not in r:
                    rows.setdefault((m, algo), []).append(r)
    lines = ["| M | lr (asgd grid) | algorithm | test error: median [min, max] | diverged | "
             "staleness mean (median run) |", "|---|---|---|---|---|---|"]
    for (m, algo), rs in rows.items():
        st = [r["staleness"]["mean"] for r in rs if r.get("staleness")]
        lines.append(f"| {m} | {chosen[m]} | {algo} | {spread([r['error'] for r in rs])} | "
                     f"{sum(r['diverged'] for r in rs)}/{len(rs)} | "
                     f"{statistics.median(st):.1f} |" if st else
                     f"| {m} | {chosen[m]} | {algo} | {spread([r['error'] for r in rs])} | "
                     f"{sum(r['diverged'] for r in rs)}/{len(rs)} | - |")
    seq = statistics.median(r["error"] for r in rows[(1, "sgd")])
    lines += ["", "| M | asgd gap to sgd | dcasgd-a gap | share of asgd's gap closed |",
              "|---|---|---|---|"]
    done = [m for m in ms[1:] if (m, "asgd") in rows and (m, "dcasgd-a") in rows]
    for m in done:
        ga = statistics.median(r["error"] for r in rows[(m, "asgd")]) - seq
        gd = statistics.median(r["error"] for r in rows[(m, "dcasgd-a")]) - seq
        closed = f"{(ga - gd) / ga:.2f}" if ga > 0 else "n/a (no gap)"
        lines.append(f"| {m} | {ga:+.4f} | {gd:+.4f} | {closed} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    if done:
        _plot(out / "error_vs_M.png", done, {a: [[r["error"] for r in rows[(m, a)]]
                                                 for m in done]
                                               for a in algos},
              "workers M", "final test error", hline=seq)
    print("\n".join(lines))


def dcasgd_long(out: Path) -> None:
    """The same with four times the updates (8 epochs of the subset), from M = 8."""
    dcasgd(out, ms=(1, 8, 16, 32, 64), epochs=8, algos=("asgd", "dcasgd-c", "dcasgd-a"))


def shuffle(out: Path, ks: tuple = (16, 64, 128), epochs: int = 4) -> None:
    """global / local / partial(0.1) on label-skewed data, ma with a long tau."""
    ks, strategies = list(ks), ["global", "local", "partial:0.1"]
    seeds = [s for s in [1, 2, 3] if SEEDS is None or s in SEEDS]
    rows = {}
    for k in ks:
        for strat in strategies:
            # global shuffling of replicated data deals all of it: the partition is moot
            data = DataConfig(shuffle=strat,
                              partition="iid" if strat == "global" else "label-skew")
            rows[(k, strat)] = [run(out, f"ma-K{k}-{strat}-s{seed}", "ma", k, seed, epochs=epochs,
                                    batch=16, lr=0.05, momentum=0.9, data=data,
                                    algorithm=algorithm_options("ma")(tau_epochs=1.0))
                                for seed in seeds]
    lines = ["| K | shuffle | test error: median [min, max] |", "|---|---|---|"]
    for (k, strat), rs in rows.items():
        errors = [r["error"] for r in rs if "missing" not in r]
        if errors:
            lines.append(f"| {k} | {strat} | {spread(errors)} ({len(errors)} seeds) |")
    lines += ["", "| K | shuffle | gap to global, per seed: median [min, max] |", "|---|---|---|"]
    ks = [k for k in ks if all("missing" not in r for s in strategies for r in rows[(k, s)])]
    gaps = {s: [[a["error"] - b["error"] for a, b in zip(rows[(k, s)], rows[(k, "global")],
                                                       strict=True)] for k in ks]
            for s in strategies[1:]}
    for s in strategies[1:]:
        lines += [f"| {k} | {s} | {spread(g)} |" for k, g in zip(ks, gaps[s], strict=True)]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    if ks:
        _plot(out / "gap_vs_K.png", ks, gaps, "workers K",
              "test error minus global shuffling's (same seed)", hline=0.0, hlabel="global")
    print("\n".join(lines))


def shuffle_long(out: Path) -> None:
    """The same with four times the epochs (16): at 4, no strategy trains at K = 128."""
    shuffle(out, epochs=16)


def _ma(k: int) -> tuple[str, dict]:
    return "ma", {}


def _ec(size, source: str = "own"):
    """An EC variant distilling ``size`` samples (an int, or a function of K) from ``source``."""
    return lambda k: ("ec", {"ec_distill_size": size(k) if callable(size) else size,
                             "ec_distill_from": source})


def ecma(out: Path) -> None:
    """EC against MA, long tau, label-skewed data; EC distilling its own or all draws."""
    _ecma(out, lr=0.05, variants={"ma": _ma, "ec": _ec(64), "ec-all": _ec(64, "all"),
                                  "ec-all-d128": _ec(128, "all")})


def ecma_lr(out: Path) -> None:
    """The same at lr 0.02, with about 11 relabelled samples beside each batch of 16: a
    round of one local epoch (6000 / 16K steps) spreads D = 4096 / K of them."""
    _ecma(out, lr=0.02, variants={"ma": _ma, "ec": _ec(lambda k: 4096 // k),
                                  "ec-all": _ec(lambda k: 4096 // k, "all")})


def ecma_full(out: Path) -> None:
    """The real 8-rank runs' settings at K = 16 and 32: all 60,000 samples, batch 64,
    lr 0.02, D = 30,000 / K (about 32 relabelled samples beside each batch)."""
    _ecma(out, lr=0.02, batch=64, subset=None,
          variants={"ma": _ma, "ec-all": _ec(lambda k: 30000 // k, "all")})


def ecma_batch16(out: Path) -> None:
    """ecma-full at K = 16 with batch 16 (D 1,875: a third of each batch again)."""
    _ecma(out, lr=0.02, batch=16, subset=None, ks=(16,),
          variants={"ma": _ma, "ec-all": _ec(1875, "all")})


def ecma_subset(out: Path) -> None:
    """ecma-full at K = 16 on the 6,000-sample subset (6 steps a round, D 192)."""
    _ecma(out, lr=0.02, batch=64, ks=(16,), variants={"ma": _ma, "ec-all": _ec(192, "all")})


def ecma_steps(out: Path) -> None:
    """ecma-subset for longer: 16 and 40 epochs of 6 local steps each (96 and 240 steps in
    all; the full-data runs make 234, in 4 rounds of 58)."""
    _ecma(out, lr=0.02, batch=64, ks=(16,), schedules=((16, 1.0), (40, 1.0)),
          variants={"ma": _ma, "ec-all": _ec(192, "all")})


def ecma_rounds(out: Path) -> None:
    """ecma-steps in 4 rounds, as the full-data runs: of 24 steps (16 epochs, tau 4 epochs)
    and of 60 (40 epochs, tau 10)."""
    _ecma(out, lr=0.02, batch=64, ks=(16,), schedules=((16, 4.0), (40, 10.0)),
          variants={"ma": _ma, "ec-all": _ec(192, "all")})


def ecma_share(out: Path) -> None:
    """40 epochs in rounds of 24 steps (tau 4 epochs), D 192 or the most, 375 (a worker's
    samples): a larger relabelled share of each batch in the same rounds."""
    _ecma(out, lr=0.02, batch=64, ks=(16,), schedules=((40, 4.0),),
          variants={"ma": _ma, "ec-all": _ec(192, "all"), "ec-all-d375": _ec(375, "all")})


def ecma_full_share(out: Path) -> None:
    """ecma-full at K = 16 with D 625 and 3,750 (all a worker has) beside 1,875: 11, 32 and
    64 relabelled samples a batch of 64, in the same 4 rounds of 59 steps."""
    _ecma(out, lr=0.02, batch=64, subset=None, ks=(16,),
          variants={"ma": _ma, "ec-all-d625": _ec(625, "all"),
                    "ec-all": _ec(lambda k: 30000 // k, "all"),
                    "ec-all-d3750": _ec(3750, "all")})


def ecma_batch32_share(out: Path) -> None:
    """ecma-share's question at batch 32: 40 epochs in rounds of 24 steps (tau 2 epochs), D
    128, 256 and 375 (a worker's samples), that is 5, 11 and 16 relabelled a batch of 32."""
    _ecma(out, lr=0.02, batch=32, ks=(16,), schedules=((40, 2.0),),
          variants={"ma": _ma, "ec-all-d128": _ec(128, "all"), "ec-all-d256": _ec(256, "all"),
                    "ec-all-d375": _ec(375, "all")})


def ecma_k8_share(out: Path) -> None:
    """The share rule at K = 8: 750 samples a worker, 40 epochs in rounds of 24 steps (tau 2
    epochs), D 256 and 750 (a worker's samples), that is 11 and 31 relabelled a batch of 64
    (a seventh and nearly a third of what a step forwards)."""
    _ecma(out, lr=0.02, batch=64, ks=(8,), schedules=((40, 2.0),),
          variants={"ma": _ma, "ec-all-d256": _ec(256, "all"), "ec-all-d750": _ec(750, "all")})


def _ecma(out: Path, lr: float, variants: dict, batch: int = 16,
          subset: int | None = SUBSET, ks: tuple = (16, 32),
          schedules: tuple = ((4, 1.0),)) -> None:
    """``variants``: name -> (K -> (algorithm, its options)); seeds 1-3; ``schedules``:
    (epochs, tau in epochs) pairs. Run names carry them where a study has several."""
    seeds = [s for s in [1, 2, 3] if SEEDS is None or s in SEEDS]
    rows = {}
    data = DataConfig(shuffle="local", partition="label-skew")
    several = len(schedules) > 1
    for k in ks:
        for e, tau in schedules:
            tag = (f"-e{e}" + (f"-t{tau:g}" if tau != 1 else "")) if several else ""
            for name, variant in variants.items():
                algo, extra = variant(k)
                options = algorithm_options(algo)(tau_epochs=tau, **extra)
                rows[(k, (e, tau), name)] = [
                    run(out, f"{name}-K{k}{tag}-s{seed}", algo, k, seed, epochs=e,
                        batch=batch, lr=lr, momentum=0.9, data=data, algorithm=options,
                        subset=subset) for seed in seeds]
    lines = [f"| K |{' epochs | tau (epochs) |' * several} algorithm | test error (final "
             "model): median [min, max] | member error | ensemble error | diverged |",
             "|---|---|---|---|---|---|" + "---|---|" * several]
    for (k, (e, tau), algo), rs in rows.items():
        rs = [r for r in rs if "missing" not in r]
        if not rs:
            continue
        member, ensemble = (spread([CHANCE_ERROR if r.get(m) is None else 1 - r[m]
                                    for r in rs]) for m in ("member", "ensemble"))
        lines.append(f"| {k} |{f' {e} | {tau:g} |' * several} {algo} | "
                     f"{spread([r['error'] for r in rs])} | {member} | {ensemble} | "
                     f"{sum(r['diverged'] for r in rs)}/{len(rs)} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


CLI = [sys.executable, "-m", "hpctrain.cli"]
ONE_EPOCH = ["--epochs", "1", "--eval-every", "1", "--no-progress"]  # the fidelity runs'


def _train_command(ranks: int, args: list[str], folder: Path) -> list[str]:
    """A real run on ``ranks`` processes under ``$HPCTRAIN_MPIRUN``."""
    mpirun = shlex.split(os.environ.get("HPCTRAIN_MPIRUN", "mpirun"))
    return [*mpirun, "-np", str(ranks), *CLI, "train", "--algo", *args, "--out", str(folder)]


def _replay_command(ranks: int, args: list[str], real: Path, folder: Path,
                    *extra: str) -> list[str]:
    """A simulation of the same run with the step times ``real`` recorded."""
    return [*CLI, "simulate", "--workers", str(ranks), "--algo", *args,
            "--step-time", f"replay:{real}", *extra, "--out", str(folder)]


FIDELITY = [  # (ranks, algo and options, seeds): the straggler pair first, on a quiet machine
    (4, "ssgd", [1]), (4, "ssgd --slowdown 0:3", [1]),
    (4, "asgd", [1, 2, 3]), (4, "dcasgd-a", [1, 2, 3]), (4, "ma --tau 20", [1]),
    (4, "ec --tau 20", [1]),
    (8, "ssgd", [1]), (8, "ma --tau 20", [1]), (8, "ec --tau 20", [1]), (8, "asgd", [1, 2, 3]),
    (8, "dcasgd-a", [1, 2, 3]),
    # At M = 8 the default lr (0.1) is at the edge of stability: three seeds more there, and
    # six at the lr the scale study's grid picks for M = 8.
    (8, "asgd", [4, 5, 6]), (8, "dcasgd-a", [4, 5, 6]),
    (8, "asgd --lr 0.025", [1, 2, 3, 4, 5, 6]), (8, "dcasgd-a --lr 0.025", [1, 2, 3, 4, 5, 6]),
    # EC's members on label-skewed data (RESULTS "EC against MA"): real processes too?
    (8, "ec --tau 20 --partition label-skew --shuffle local", [1]),
    (8, "ma --tau 20 --partition label-skew --shuffle local", [1]),
]


def fidelity(out: Path) -> None:
    """Real runs (1 epoch of LeNet on Fashion-MNIST), each replayed with its own step times."""
    # Staleness p90/p99/max: the mean is set by the push counts (about M-1), whatever the timing.
    lines = ["| ranks | run | seed | test acc real / sim | same model | staleness p90 real / sim"
             " | p99 real / sim | max real / sim | wall s real / sim | ec: member, ensemble acc"
             " real / sim |", "|---|---|---|---|---|---|---|---|---|---|"]
    for ranks, case, seeds in FIDELITY:
        for seed in seeds:
            name = f"{ranks}-{case.replace(' ', '').replace(':', '_')}-s{seed}"
            real, simulated = out / "real" / name, out / "sim" / name
            args = [*case.split(), *ONE_EPOCH, "--seed", str(seed)]
            _logged(out, name + ".real", _train_command(ranks, args, real))
            # A replayed step already holds the straggler's sleep: no second --slowdown.
            sim_args = [a for a in args if a not in ("--slowdown", "0:3")]
            _logged(out, name + ".sim", _replay_command(ranks, sim_args, real, simulated))
            r, s = (_summary(out, name, kind) for kind in ("real", "sim"))
            if any(x is None or "failed" in x for x in (r, s)):
                lines.append(f"| {ranks} | {case} | {seed} | {_outcome(r)} / {_outcome(s)} | "
                             "- | - | - | - | - | - |")
                continue
            st = [x.get("staleness") for x in (r, s)]
            lines.append(f"| {ranks} | {case} | {seed} | {r['final_test_acc']:.4f} / "
                         f"{s['final_test_acc']:.4f} | {_same_model(real, simulated)} | "
                         f"{_pair(st, 'p90', '{:.0f}')} | {_pair(st, 'p99', '{:.0f}')} | "
                         f"{_pair(st, 'max', '{:.0f}')} | {r['wall_s']:.1f} / {s['wall_s']:.1f} | "
                         f"{_ensemble(r, s)} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


ASYNC_FIDELITY = [(8, "dcasgd-a --lr 0.025"), (8, "asgd --lr 0.025"), (4, "asgd"),
                  (4, "dcasgd-a")]


def fidelity_async(out: Path, seeds: tuple = (1, 2, 3, 4, 5, 6), reruns: int = 2) -> None:
    """Real asgd/dcasgd-a runs, each replayed twice: with the network model's communication
    times (``--comm-time model``) and with the rests the real run recorded (``replay``); and
    ``reruns`` more real runs of each seed, to see how far real runs of one seed spread."""
    kinds = ("real", "model", "replay")
    rows = ["| ranks | run | seed | test acc real / model / replay | staleness p90 | p99 | "
            "max | wall s | the seed's real runs: [min, max] |",
            "|---|---|---|---|---|---|---|---|---|"]
    spans = ["| ranks | run | all real runs: median [min, max] (runs) | model: median "
             "[min, max], inside | replay: median [min, max], inside | inside the seed's real "
             "runs, model / replay | mean abs. difference to the replayed real run, model / "
             "replay | the same between two real runs of one seed | standard deviation: all real "
             "/ model / replay |", "|---|---|---|---|---|---|---|---|---|"]
    panels: dict = {}  # (ranks, case) -> [(seed, the seed's real runs, model, replay)]
    for ranks, case in ASYNC_FIDELITY:
        acc: dict = {k: [] for k in kinds}
        points = panels.setdefault((ranks, case), [])
        inside_seed, real_gaps, every_real = {"model": 0, "replay": 0}, [], []
        for seed in seeds if SEEDS is None else sorted(SEEDS):
            name = f"{ranks}-{case.replace(' ', '')}-s{seed}"
            args = [*case.split(), *ONE_EPOCH, "--seed", str(seed)]
            real = out / "real" / name
            _logged(out, name + ".real", _train_command(ranks, args, real))
            for kind in kinds[1:]:
                _logged(out, f"{name}.{kind}", _replay_command(ranks, args, real, out / kind / name,
                                                               "--comm-time", kind))
            for j in range(2, reruns + 2):
                _logged(out, f"{name}-r{j}.real",
                        _train_command(ranks, args, out / "real" / f"{name}-r{j}"))
            got = {k: _summary(out, name, k) for k in kinds}
            again = [_summary(out, f"{name}-r{j}", "real") for j in range(2, reruns + 2)]
            if any(x is None or "failed" in x for x in [*got.values(), *again]):
                rows.append(f"| {ranks} | {case} | {seed} | "
                            f"{' / '.join(_outcome(got[k]) for k in kinds)} | - | - | - | - | "
                            f"{', '.join(_outcome(x) for x in again)} |")
                continue
            for k in kinds:
                acc[k].append(got[k]["final_test_acc"])
            same = [acc["real"][-1], *(x["final_test_acc"] for x in again)]
            for k in inside_seed:
                inside_seed[k] += min(same) <= acc[k][-1] <= max(same)
            every_real += same
            points.append((seed, same, acc["model"][-1], acc["replay"][-1]))
            real_gaps += [abs(a - b) for i, a in enumerate(same) for b in same[i + 1:]]
            st = [got[k]["staleness"] for k in kinds]
            walls = " / ".join(f"{got[k]['wall_s']:.1f}" for k in kinds)
            rows.append(f"| {ranks} | {case} | {seed} | "
                        f"{' / '.join(f'{acc[k][-1]:.4f}' for k in kinds)} | "
                        f"{_pair(st, 'p90', '{:.0f}')} | {_pair(st, 'p99', '{:.0f}')} | "
                        f"{_pair(st, 'max', '{:.0f}')} | {walls} | "
                        f"[{min(same):.4f}, {max(same):.4f}] |")
        if not acc["real"]:
            continue
        spans.append(f"| {ranks} | {case} | {spread(every_real)} ({len(every_real)}) | "
                     f"{_against(acc['model'], every_real)} | "
                     f"{_against(acc['replay'], every_real)} | "
                     f"{inside_seed['model']} / {inside_seed['replay']} of {len(acc['real'])} | "
                     f"{_off(acc['model'], acc['real'])} / {_off(acc['replay'], acc['real'])} | "
                     f"{statistics.mean(real_gaps):.4f} | "
                     f"{' / '.join(_sd(x) for x in (every_real, acc['model'], acc['replay']))} |")
    text = "\n".join(rows + [""] + spans) + "\n"
    (out / "table.md").write_text(text)
    print(text)
    _seed_plot(out / "fidelity-async.png", panels)


def _seed_plot(path: Path, panels: dict) -> None:
    """Per case, per seed: the real runs' accuracies and the two replays of the first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), sharey=False)
    for ax, ((ranks, case), points) in zip(axes, panels.items(), strict=True):
        for i, (seed, same, model, replay) in enumerate(points):
            ax.scatter([seed] * len(same), same, color="0.4", s=14,
                       label="real runs" if i == 0 else None)
            ax.scatter(seed - 0.15, model, color="C0", marker="x",
                       label="sim, --comm-time model" if i == 0 else None)
            ax.scatter(seed + 0.15, replay, color="C1", marker="+", s=60,
                       label="sim, --comm-time replay" if i == 0 else None)
        ax.set_title(f"{case}, {ranks} ranks", fontsize=9)
        ax.set_xlabel("seed")
    axes[0].set_ylabel("final test accuracy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _sd(xs: list) -> str:
    return f"{statistics.stdev(xs):.4f}" if len(xs) > 1 else "-"


def _against(xs: list, real: list) -> str:
    """Simulated accuracies' span and how many fall inside the real runs' span."""
    inside = sum(min(real) <= x <= max(real) for x in xs)
    return f"{spread(xs)}, {inside} of {len(xs)}"


def _off(xs: list, real: list) -> str:
    """Mean absolute difference between each simulated run and its own real run."""
    return f"{statistics.mean(abs(a - b) for a, b in zip(xs, real, strict=True)):.4f}"


def _pair(staleness: list, key: str, fmt: str) -> str:
    """"real / simulated" of one staleness statistic, or "-" for a synchronous run."""
    return " / ".join(fmt.format(x[key]) for x in staleness) if all(staleness) else "-"


def _ensemble(real: dict, simulated: dict) -> str:
    """EC's member and ensemble accuracies, "real / simulated"; "-" for other algorithms."""
    if real.get("algo") != "ec":
        return "-"
    return ", ".join(f"{real[k]:.4f} / {simulated[k]:.4f}"
                     for k in ("final_member_acc", "final_ensemble_acc"))


def _logged(out: Path, name: str, command: list[str]) -> None:
    """Run ``command`` once, its output in OUT/NAME.log (kept: a run that failed stays failed)."""
    log = out / f"{name}.log"
    if log.exists() or REPORT_ONLY:
        return
    print(" ".join(command), flush=True)
    with open(log, "w") as f:
        subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)


def _summary(out: Path, name: str, kind: str) -> dict | None:
    """A run's summary, or None with the reason when it wrote none."""
    path = out / kind / name / "summary.json"
    if path.exists():
        return json.loads(path.read_text())
    log = out / f"{name}.{kind}.log"
    return {"failed": "diverged" if log.exists() and "TooManyBadSteps" in log.read_text()
            else "failed"} if log.exists() else None


def _outcome(summary: dict | None) -> str:
    return "not run" if summary is None else summary.get("failed") or \
        f"{summary['final_test_acc']:.4f}"


def _same_model(a: Path, b: Path) -> str:
    import torch

    ma, mb = (torch.load(d / "model.pt", map_location="cpu") for d in (a, b))
    return "bit for bit" if all(torch.equal(ma[k], mb[k]) for k in ma) else "no"


def _plot(path: Path, xs: list, series: dict, xlabel: str, ylabel: str,
          hline: float | None = None, hlabel: str = "sequential sgd") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, per_x) in enumerate(series.items()):
        med = [statistics.median(v) for v in per_x]
        ax.plot(xs, med, marker="o", label=name, color=f"C{i}")
        for x, v in zip(xs, per_x, strict=True):
            ax.plot([x, x], [min(v), max(v)], color=f"C{i}", alpha=0.4)
    if hline is not None:
        ax.axhline(hline, color="k", ls="--", label=hlabel)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    STUDIES = {"dcasgd": dcasgd, "shuffle": shuffle, "ecma": ecma, "ecma-lr": ecma_lr,
     "ecma-full": ecma_full, "ecma-batch16": ecma_batch16, "ecma-subset": ecma_subset,
     "ecma-steps": ecma_steps, "ecma-rounds": ecma_rounds,
     "ecma-share": ecma_share, "ecma-full-share": ecma_full_share,
     "ecma-batch32-share": ecma_batch32_share, "ecma-k8-share": ecma_k8_share,
     "fidelity": fidelity, "fidelity-async": fidelity_async,
     "dcasgd-long": dcasgd_long, "shuffle-long": shuffle_long}
    if len(sys.argv) < 3 or sys.argv[1] not in STUDIES:
        print(f"usage: scripts/sim_study.py {{{','.join(STUDIES)}}} OUT [--report-only] "
              "[--seeds 1,2] (the module docstring says what each study runs)", file=sys.stderr)
        sys.exit(2)
    study, folder = sys.argv[1], Path(sys.argv[2])
    if REPORT_ONLY and not (folder / "runs.jsonl").exists():  # a KeyError on nothing, before
        print(f"--report-only: {folder} holds no runs.jsonl: no run of a study to report",
              file=sys.stderr)
        sys.exit(2)
    folder.mkdir(parents=True, exist_ok=True)
    STUDIES[study](folder)
