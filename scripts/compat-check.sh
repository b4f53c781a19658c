#!/usr/bin/env bash
# The whole test suite on another Python and torch than make setup's (3.11, torch 2.13.0):
# setup.py promises Python >= 3.10 and torch >= 2.1, and this is how that is checked.
#
#   scripts/compat-check.sh PYTHON_VERSION TORCH_VERSION     e.g. 3.10 2.1.2, or 3.12 2.11.0
#
# The venv (/tmp/hpctrain-compat-PY-TORCH, kept between runs; a CUDA build of torch from
# PyPI, about 5 GB) gets torch, mpi4py against this machine's Open MPI, the test tools, and
# hpctrain from a copy of the tree (its own build of the kernels). Then the three phases of
# `make test`: one process, mpirun -np 2, mpirun -np 4 (about 20 minutes on 2 cores).
# Horovod is not built there: its tests are skipped. Exit status: 0 if every phase passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYV=${1:?usage: scripts/compat-check.sh PYTHON_VERSION TORCH_VERSION}
TORCH=${2:?usage: scripts/compat-check.sh PYTHON_VERSION TORCH_VERSION}
# The first that runs: a pyenv shim is on PATH for every version but runs only the global one.
PY=
for cand in $(command -v "python$PYV") $(ls -d /root/.pyenv/versions/"$PYV".*/bin/python3 \
    2>/dev/null | sort -V -r); do
  "$cand" -c 'import sys' 2>/dev/null && { PY=$cand; break; }
done
[ -n "$PY" ] || { echo "compat-check: no python$PYV found" >&2; exit 2; }
VENV=/tmp/hpctrain-compat-$PYV-$TORCH
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" || exit 2
  # Wheels of torch before 2.3 were built against NumPy 1.
  case $TORCH in 2.[012].*) NUMPY="numpy<2" ;; *) NUMPY=numpy ;; esac
  "$VENV/bin/python" -m pip install -q "torch==$TORCH" "$NUMPY" "mpi4py>=4.0" pytest \
    pytest-mpi pytest-timeout tqdm matplotlib tensorboard pillow setuptools wheel || exit 2
fi

# A copy of the tree, so that its builds stay out of this checkout.
SRC=/tmp/hpctrain-compat-src-$PYV-$TORCH
rm -rf "$SRC" && mkdir -p "$SRC"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC"
cd "$SRC"
# test_pip_install copies the tree it lists with git ls-files; run_info's hpctrain_commit is
# its commit (made before the venv's link, which is no source)
git init -q && git add -A && git -c user.name=compat -c user.email=compat@localhost \
  commit -q -m "compat-check's copy" || exit 2
ln -s "$VENV" .venv
# With its dependencies (install_requires: PyYAML, cloudpickle, ...), as pip install . does.
.venv/bin/python -m pip install -q --no-build-isolation -e . || exit 2
.venv/bin/python -c 'import sys, torch, mpi4py, numpy
print(f"compat-check: Python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"mpi4py {mpi4py.__version__}, numpy {numpy.__version__}")'

export OMP_NUM_THREADS=1
MPIRUN=(mpirun --oversubscribe -x OMPI_MCA_osc=^ucx -x OMPI_MCA_pml=ob1
        -x OMPI_MCA_btl=self,vader,tcp)
[ "$(id -u)" -eq 0 ] && MPIRUN+=(--allow-run-as-root)
export HPCTRAIN_MPIRUN="${MPIRUN[*]}"
failed=0
.venv/bin/python -m pytest -q -p no:cacheprovider tests || failed=1
for n in 2 4; do
  timeout 900 "${MPIRUN[@]}" -np $n .venv/bin/python -m pytest -q -p no:cacheprovider \
    --with-mpi -m mpi tests; s=$?
  [ $s -eq 0 ] || [ $s -eq 5 ] || failed=1
done
echo "compat-check: Python $PYV, torch $TORCH: $([ $failed -eq 0 ] && echo passed || echo FAILED)"
exit $failed
