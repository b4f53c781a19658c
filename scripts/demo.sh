#!/usr/bin/env bash
# make demo: the main job on its embedded default: DC-ASGD-a (asynchronous SGD with adaptive
# delay compensation, model in MPI RMA windows), 4 MPI ranks, LeNet on Fashion-MNIST, then its
# results table. Output directory: runs/demo-<time>. ALGO=ssgd make demo runs another algorithm.
set -euo pipefail
cd "$(dirname "$0")/.."
ALGO=${ALGO:-dcasgd-a}
OUT=runs/demo-$(date +%Y%m%d-%H%M%S)
ROOT_FLAG=""; [ "$(id -u)" -eq 0 ] && ROOT_FLAG="--allow-run-as-root"
ARGS=(--algo "$ALGO" --model lenet --dataset fashion-mnist --epochs 3 --batch-size 32 --out "$OUT")
echo "demo: mpirun -np 4 hpctrain train ${ARGS[*]}"
OMP_NUM_THREADS=1 mpirun --oversubscribe $ROOT_FLAG -x OMPI_MCA_osc=^ucx -np 4 \
  .venv/bin/hpctrain train "${ARGS[@]}"
echo "demo: outputs in $OUT (config.json, metrics.jsonl, summary.json, model.pt, step_times.json)"
