#!/usr/bin/env bash
# make demo: the main job on its embedded default: DC-ASGD-a (asynchronous SGD with adaptive
# delay compensation, model in MPI RMA windows), 4 MPI ranks, LeNet on Fashion-MNIST, then its
# results table. Output directory: runs/demo-<time>. ALGO=ssgd make demo runs another algorithm.
set -euo pipefail
cd "$(dirname "$0")/.."
ALGO=${ALGO:-dcasgd-a}
OUT=runs/demo-$(date +%Y%m%d-%H%M%S)
MPIRUN=(mpirun --oversubscribe); [ "$(id -u)" -eq 0 ] && MPIRUN+=(--allow-run-as-root)
CMD=("${MPIRUN[@]}" -x OMPI_MCA_osc=^ucx -np 4 .venv/bin/hpctrain train --algo "$ALGO"
  --model lenet --dataset fashion-mnist --epochs 3 --batch-size 32 --out "$OUT")
# The command as run, so that it can be typed again (README's "Training" says why each flag).
echo "demo: OMP_NUM_THREADS=1 ${CMD[*]}"
OMP_NUM_THREADS=1 "${CMD[@]}"
echo "demo: outputs in $OUT (config.json, metrics.jsonl, summary.json, model.pt, step_times.json)"
