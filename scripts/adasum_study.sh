#!/usr/bin/env bash
# Adasum against gradient averaging: ssgd on K = 4 and 8 workers (LeNet, Fashion-MNIST, batch
# 64 a worker, 3 epochs), with the single-worker learning rate, with it scaled by K (the
# linear scaling rule; without and with a 1-epoch warm-up), and with Adasum at the
# single-worker rate; sgd on one process as the
# single-worker reference. Seeds 1-3. Writes OUT/<case>-s<seed>/ and prints a markdown table
# (docs/RESULTS.md "Adasum"). A finished run is kept: rerunning fills in what is missing.
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
  if [ "$np" -eq 0 ]; then
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
EOF
