#!/usr/bin/env bash
# make demo: the main job on its embedded default, 4 MPI ranks on Fashion-MNIST (LeNet),
# then its results table. Output directory: runs/demo-<time>.
set -euo pipefail
cd "$(dirname "$0")/.."
ALGO=${ALGO:-ssgd}
OUT=runs/demo-$(date +%Y%m%d-%H%M%S)
ROOT_FLAG=""; [ "$(id -u)" -eq 0 ] && ROOT_FLAG="--allow-run-as-root"
echo "demo: mpirun -np 4 hpctrain train --algo $ALGO --model lenet --dataset fashion-mnist --epochs 2 --out $OUT"
OMP_NUM_THREADS=1 mpirun --oversubscribe $ROOT_FLAG -x OMPI_MCA_osc=^ucx -np 4 \
  .venv/bin/hpctrain train --algo "$ALGO" --model lenet --dataset fashion-mnist \
  --epochs 2 --batch-size 32 --lr 0.05 --momentum 0.9 --eval-every 0.25 --out "$OUT"
echo "demo: outputs in $OUT (config.json, metrics.jsonl, summary.json, model.pt)"
