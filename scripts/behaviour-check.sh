#!/usr/bin/env bash
# Behaviour check for refactors: deterministic runs (sgd, ssgd on the mpi, torch and horovod backends,
# ma, ec; fixed seed) and a checkpoint/resume pair, each reduced to its final test accuracy and
# a SHA-256 of model.pt's tensors (names, dtypes, shapes and bytes, in state-dict order) and
# one of the curve (every snapshot's updates, test accuracy and loss).
# Run it before and after a change and compare the tables: they must be equal, bit for bit.
#   scripts/behaviour-check.sh OUT_DIR [PYTHON]
set -euo pipefail
OUT=${1:?usage: scripts/behaviour-check.sh OUT_DIR [PYTHON]}
PY=${2:-.venv/bin/python}
ROOT_FLAG=""; [ "$(id -u)" -eq 0 ] && ROOT_FLAG="--allow-run-as-root"
MPIRUN="mpirun --oversubscribe $ROOT_FLAG -x OMPI_MCA_osc=^ucx -x OMPI_MCA_pml=ob1 -x OMPI_MCA_btl=self,vader,tcp"
export OMP_NUM_THREADS=1
COMMON=(--dataset fashion-mnist --model lenet --epochs 1 --batch-size 64 --seed 3 --no-progress)
mkdir -p "$OUT"
run() {  # name np args...
  local name=$1 np=$2; shift 2
  $MPIRUN -np "$np" "$PY" -m hpctrain.cli train "${COMMON[@]}" "$@" --out "$OUT/$name" \
    > "$OUT/$name.log" 2>&1 || { echo "$name failed:"; tail -5 "$OUT/$name.log"; exit 1; }
}
run sgd 1 --algo sgd
run ssgd-mpi 2 --algo ssgd --sync-backend mpi
run ssgd-torch 2 --algo ssgd --sync-backend torch
if "$PY" -c "import horovod.torch" 2>/dev/null; then run ssgd-horovod 2 --algo ssgd --sync-backend horovod; fi
run ma 2 --algo ma --tau 50
run ec 2 --algo ec --tau 50 --ec-distill-size 256
# Resume: stopped at a checkpoint (raise at update 300), continued; equals the ma run above.
HPCTRAIN_INJECT=raise@1:300 $MPIRUN -np 2 "$PY" -m hpctrain.cli train "${COMMON[@]}" --algo ma \
  --tau 50 --checkpoint-every 0.3e --out "$OUT/ma-resumed" > "$OUT/ma-resumed.1.log" 2>&1 || true
run ma-resumed 2 --algo ma --tau 50 --checkpoint-every 0.3e --resume "$OUT/ma-resumed"
"$PY" - "$OUT" <<'PY'
import hashlib, json, sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
print("| run | final_test_acc | sha256(model.pt tensors)[:16] | sha256(curve)[:16] |\n"
      "|---|---|---|---|")
for d in sorted(p for p in out.iterdir() if (p / "summary.json").is_file()):
    h = hashlib.sha256()
    for name, t in torch.load(d / "model.pt", weights_only=True).items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    acc = json.loads((d / "summary.json").read_text())["final_test_acc"]
    curve = [(p["updates"], p["test_acc"], p["test_loss"])  # every snapshot's score
             for p in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    c = hashlib.sha256(json.dumps(curve).encode()).hexdigest()[:16]
    print(f"| {d.name} | {acc:.4f} | {h.hexdigest()[:16]} | {c} |")
PY
