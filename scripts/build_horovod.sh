#!/usr/bin/env bash
# Build Horovod 0.28.1 from its PyPI sdist against torch >= 2.1 and install it into .venv.
# The released sdist asks for C++14 where torch needs C++17; we patch those two lines.
# The built wheel is cached in $HOROVOD_WHEEL_CACHE (default ~/.cache/hpctrain) so a second
# set-up does not rebuild it. On failure: one line saying why, exit 1 (set-up goes on).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=.venv/bin/python
VERSION=0.28.1
CACHE=${HOROVOD_WHEEL_CACHE:-$HOME/.cache/hpctrain}
LOG=$CACHE/horovod-build.log
mkdir -p "$CACHE"

if $PYTHON -c "import horovod.torch" 2>/dev/null; then
  exit 0
fi

fail() { echo "setup: Horovod not installed: $1 (log: $LOG)"; exit 1; }

wheel=$(ls "$CACHE"/horovod-$VERSION-*.whl 2>/dev/null | head -n 1)
if [ -z "$wheel" ]; then
  echo "setup: building Horovod $VERSION (about 5 minutes on 2 cores; cached afterwards)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  $PYTHON -m pip download -q --no-deps --no-binary :all: "horovod==$VERSION" -d "$work" >"$LOG" 2>&1 \
    || fail "could not download the horovod==$VERSION sdist from PyPI"
  tar -xzf "$work"/horovod-$VERSION.tar.gz -C "$work" || fail "could not unpack the sdist"
  src=$work/horovod-$VERSION
  sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q "CMAKE_CXX_STANDARD 17" "$src/horovod/torch/CMakeLists.txt" || fail "C++17 patch did not apply"
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
  HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITHOUT_GLOO=1 MAKEFLAGS=-j"$(nproc)" \
    $PYTHON -m pip wheel -v --no-deps --no-build-isolation "$src" -w "$CACHE" >>"$LOG" 2>&1 \
    || fail "the build failed; last line: $(grep -iE 'error' "$LOG" | tail -n 1 | cut -c1-200)"
  wheel=$(ls "$CACHE"/horovod-$VERSION-*.whl 2>/dev/null | head -n 1)
  [ -n "$wheel" ] || fail "the build produced no wheel"
fi
$PYTHON -m pip install -q --no-deps "$wheel" >>"$LOG" 2>&1 || fail "pip could not install $wheel"
# Horovod's own runtime deps (no torch: it is already pinned).
$PYTHON -m pip install -q cloudpickle psutil pyyaml >>"$LOG" 2>&1 || true
$PYTHON -c "import horovod.torch" >>"$LOG" 2>&1 || fail "the installed wheel does not import"
echo "setup: Horovod $VERSION installed"
