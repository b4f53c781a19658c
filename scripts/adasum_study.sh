#!/usr/bin/env bash
# Adasum against gradient averaging: ssgd on K = 4 and 8 workers (LeNet, Fashion-MNIST, batch
# 64 a worker, 3 epochs), with the single-worker learning rate, with it scaled by K (the
# linear scaling rule; without and with a 1-epoch warm-up), and with Adasum at the
# single-worker rate; sgd on one process as the single-worker reference; and, with
# `hpctrain simulate`, averaging and Adasum at the single-worker rate on K = 16 and 32 virtual
# workers (sim-*). Seeds 1-3. Writes OUT/<case>-s<seed>/, prints a markdown table and plots
# OUT/adasum-vs-k.png (docs/RESULTS.md "Adasum"). A finished run is kept: rerunning fills in what is missing.
#
#   scripts/adasum_study.sh OUT [SEEDS]      (SEEDS default "1 2 3")
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/adasum_study.sh OUT [SEEDS]}
SEEDS=${2:-1 2 3}
PY=${PYTHON:-.venv/bin/python}
MPIRUN=${HPCTRAIN_MPIRUN:-mpirun --oversubscribe $([ "$(id -u)" -eq 0 ] && echo --allow-run-as-root)}
COMMON=(--epochs 3 --no-progress)
export OMP_NUM_THREADS=1

run() {  # run NAME NP ARGS...: one training, skipped when it finished before
  local name=$1 np=$2; shift 2
  [ -f "$OUT/$name/summary.json" ] && return 0
  rm -rf "${OUT:?}/$name"
  if [ "$np" = sim ]; then
    "$PY" -m hpctrain simulate "$@" "${COMMON[@]}" --out "$OUT/$name" > /dev/null
  elif [ "$np" -eq 0 ]; then
    "$PY" -m hpctrain train "$@" "${COMMON[@]}" --out "$OUT/$name" > /dev/null
  else
    $MPIRUN -np "$np" "$PY" -m hpctrain train "$@" "${COMMON[@]}" --out "$OUT/$name" > /dev/null
  fi
  echo "$name: $(date +%T)"
}

mkdir -p "$OUT"
for seed in $SEEDS; do
  run "sgd-s$seed" 0 --algo sgd --seed "$seed"
  for k in 4 8; do
    run "average-k$k-s$seed" "$k" --algo ssgd --seed "$seed"
    run "average-scaled-k$k-s$seed" "$k" --algo ssgd --scale-lr --seed "$seed"
    run "average-scaled-warmup-k$k-s$seed" "$k" --algo ssgd --scale-lr --warmup-epochs 1 \
      --seed "$seed"
    run "adasum-k$k-s$seed" "$k" --algo ssgd --reduce-op adasum --seed "$seed"
  done
  for k in 16 32; do
    run "sim-average-k$k-s$seed" sim --workers "$k" --algo ssgd --seed "$seed"
    run "sim-adasum-k$k-s$seed" sim --workers "$k" --algo ssgd --reduce-op adasum --seed "$seed"
  done
done

"$PY" - "$OUT" <<'EOF'
import json, re, statistics, sys
from pathlib import Path

rows = {}
for f in sorted(Path(sys.argv[1]).glob("*/summary.json")):
    case, seed = re.fullmatch(r"(.+)-s(\d+)", f.parent.name).groups()
    s = json.loads(f.read_text())
    rows.setdefault(case, []).append((int(seed), s["final_test_acc"], s["wall_s"]))
print("| case | seeds | final test accuracy, each seed | mean | sd | wall s (mean) |")
print("|---|---|---|---|---|---|")
for case, runs in rows.items():
    runs.sort()
    acc = [a for _, a, _ in runs]
    sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
    print(f"| {case} | {','.join(str(s) for s, _, _ in runs)} | "
          f"{', '.join(f'{a:.4f}' for a in acc)} | {statistics.mean(acc):.4f} | {sd:.4f} | "
          f"{statistics.mean(w for _, _, w in runs):.1f} |")

# Accuracy against K at the single-worker rate (real K <= 8, simulated beyond): adasum-vs-k.png
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 4))
for op, color in (("average", "tab:blue"), ("adasum", "tab:orange")):
    points = [(1, rows["sgd"])] if "sgd" in rows else []
    points += [(k, rows[c]) for k in (4, 8, 16, 32)
               for c in (f"{op}-k{k}", f"sim-{op}-k{k}") if c in rows]
    ks = [k for k, _ in points]
    means = [statistics.mean(a for _, a, _ in r) for _, r in points]
    sds = [statistics.stdev([a for _, a, _ in r]) if len(r) > 1 else 0 for _, r in points]
    ax.errorbar(ks, means, yerr=sds, marker="o", capsize=3, color=color, label=op)
ax.axvline(11, color="grey", lw=0.8, ls=":")
ax.text(12, 0.62, "simulated", color="grey")
ax.set_xscale("log", base=2)
ax.set_xlabel("workers K (batch 64 each, lr 0.05; K = 1: sgd)")
ax.set_ylabel("final test accuracy (mean, sd of 3 seeds)")
ax.set_title("ssgd, LeNet on Fashion-MNIST, 3 epochs")
ax.legend()
fig.tight_layout()
fig.savefig(Path(sys.argv[1]) / "adasum-vs-k.png", dpi=120)
EOF
