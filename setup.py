"""hpctrain package, with the compensation kernels (kernels/dc_update.cpp, kernels/dc_update.cu)
and the shared-memory locks (kernels/shm_sync.cpp).

The CPU kernel is a plain C-ABI shared library (OpenMP, no Python or torch headers) built as a
setuptools Extension and loaded with ctypes by hpctrain/kernels.py; the locks likewise, loaded
by hpctrain/async_/shm.py. Flags stay portable: no -march=native, since the build machine and
the compute nodes may differ.

The CUDA kernel is a C-ABI library too (no torch headers), so it needs only nvcc: it is built
when nvcc is found (CUDA_HOME, CUDA_PATH, PATH or /usr/local/cuda), and a failed build is then
a warning, not a failed install; HPCTRAIN_BUILD_CUDA=1 makes it required, HPCTRAIN_BUILD_CUDA=0
skips it.
HPCTRAIN_CUDA_ARCH overrides the GPU architectures (nvcc -gencode list, comma-separated sm_XY).
Where torch is importable here, an nvcc whose CUDA major version differs from torch's is a
warning (the library links its own CUDA runtime: built by a CUDA newer than the node's driver,
it loads and then fails at its first call).

``pip install .`` into any environment with torch and an MPI library (mpi4py built against
it) is the cluster install; ``make setup`` the one-command set-up of a fresh Debian machine.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

# -ffp-contract=off (here) and nvcc's --fmad=false (_build_cuda): no fused multiply-adds, so the
# kernel gives the same bits on CPU and GPU workers, as the replay tests and the simulator
# assume. nvcc fuses by default, and so does GCC where FMA is in the baseline (aarch64); on
# x86-64 without -mfma there is no FMA to fuse into, so these CPU results do not change.
CPU_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wall",
             "-Wextra"]
CUDA_ARCHS = "sm_75,sm_80,sm_90"
CUDA_LIB = "_dc_update_cuda.so"


def _version() -> str:
    text = (Path(__file__).parent / "hpctrain" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _want_cuda() -> str | None:
    """``"required"``, ``"optional"`` (nvcc found) or None (skip)."""
    choice = os.environ.get("HPCTRAIN_BUILD_CUDA", "")
    if choice not in ("", "0", "1"):
        sys.exit(f"HPCTRAIN_BUILD_CUDA={choice}: give 1 (build the CUDA kernel), 0 (do not) or "
                 "leave it unset (build it when nvcc is found)")
    if choice:
        return "required" if choice == "1" else None
    return "optional" if _nvcc() else None


def _cuda_archs() -> list[str]:
    """HPCTRAIN_CUDA_ARCH's architectures (``sm_80,sm_90``), each checked: nvcc's own error
    for a bad one is a page long, and only a warning when the build is optional."""
    text = os.environ.get("HPCTRAIN_CUDA_ARCH") or CUDA_ARCHS
    archs = [a.strip() for a in text.split(",")]
    bad = [a for a in archs if not re.fullmatch(r"sm_\d+[af]?", a)]
    if bad:
        sys.exit(f"HPCTRAIN_CUDA_ARCH={text}: {bad[0]!r} is not an architecture; give a "
                 f"comma-separated list such as {CUDA_ARCHS}")
    return archs


def _nvcc() -> str | None:
    """nvcc from CUDA_HOME or CUDA_PATH, else PATH, else CUDA's default /usr/local/cuda (where
    torch's cpp_extension looks too: images often install it there without PATH)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    default = Path("/usr/local/cuda/bin/nvcc")
    return shutil.which("nvcc") or (str(default) if default.is_file() else None)


def _nvcc_release(nvcc: str) -> tuple[int, int] | None:
    """nvcc's CUDA version (``release 13.0``), or None where it does not say."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def _nvcc_threads(release: tuple[int, int] | None) -> list[str]:
    """``--threads 0`` (one architecture per core) where nvcc has it (CUDA >= 11.5): the
    architectures otherwise compile one after another."""
    return ["--threads", "0"] if release and release >= (11, 5) else []


def _torch_cuda() -> str | None:
    """The CUDA version torch was built with, where torch is importable here (not in pip's
    isolated build environment) and built with CUDA."""
    try:
        import torch
    except Exception:  # noqa: BLE001 (a broken torch install raises anything)
        return None
    return torch.version.cuda


def cuda_mismatch(release: tuple[int, int] | None, torch_cuda: str | None) -> str | None:
    """A warning when nvcc's CUDA major version differs from torch's: the kernel library
    links its own CUDA runtime, so one built by a CUDA newer than the node's driver builds and
    loads, then fails at its first call ("CUDA driver version is insufficient")."""
    if release is None or not torch_cuda or release[0] == int(torch_cuda.split(".")[0]):
        return None
    return (f"hpctrain: warning: nvcc is CUDA {release[0]}.{release[1]}, torch was built with "
            f"CUDA {torch_cuda}: where the driver is older than nvcc's CUDA the kernel fails at "
            f"its first call; set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]} toolkit to "
            "build it with torch's")


def _commit() -> str | None:
    """The git commit of the checkout this builds from, ``+dirty`` if its tracked files differ
    from it; None outside a checkout (an sdist) or without git."""
    here = Path(__file__).resolve().parent
    if not (here / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(here), "diff", "--quiet", "HEAD", "--"],
                               capture_output=True, timeout=10).returncode == 1
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "") if head.returncode == 0 else None


class BuildWithCommit(build_py):
    """build_py plus ``hpctrain/_build.py``, naming the commit built from: an installed copy
    has no checkout to ask, and its runs record the commit as a checkout's do
    (provenance.commit)."""

    def run(self):
        super().run()
        # An editable install copies nothing (setuptools >= 64): the package is the
        # checkout, whose commit provenance asks git for; build_lib has no hpctrain/ to write in.
        if getattr(self, "editable_mode", False):
            return
        commit = _commit()
        if commit is not None:
            target = Path(self.build_lib) / "hpctrain" / "_build.py"
            target.write_text(f'"""Written by setup.py."""\n\nCOMMIT = "{commit}"\n')


class BuildKernels(build_ext):
    """build_ext plus the CUDA library, placed next to the CPU extension."""

    def run(self):
        super().run()
        want = _want_cuda()
        # The library an earlier build left (build/lib..., or the package itself in place) is of
        # older sources: packaged beside a CPU library of the new ones when this build skips
        # CUDA (HPCTRAIN_BUILD_CUDA=0, no nvcc) or fails, it would be loaded. Built now, or none.
        self._cuda_target().unlink(missing_ok=True)
        if want == "required":
            self._build_cuda()
        elif want == "optional":
            try:
                self._build_cuda()
            except (OSError, subprocess.CalledProcessError) as e:
                print(f"hpctrain: warning: the CUDA kernel was not built ({e}); CPU only. "
                      "HPCTRAIN_BUILD_CUDA=1 makes its build required", file=sys.stderr)

    def _cuda_target(self) -> Path:
        """Where the CUDA library goes: beside the CPU extension."""
        return Path(self.get_ext_fullpath("hpctrain._dc_update")).parent / CUDA_LIB

    def _build_cuda(self):
        nvcc = _nvcc()
        if nvcc is None:
            sys.exit("HPCTRAIN_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        target = self._cuda_target()
        target.parent.mkdir(parents=True, exist_ok=True)
        archs = _cuda_archs()
        release = _nvcc_release(nvcc)
        warning = cuda_mismatch(release, _torch_cuda())
        if warning:
            print(warning, file=sys.stderr)
        gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]
        last = archs[-1][3:]
        gencode.append(f"-gencode=arch=compute_{last},code=compute_{last}")  # PTX for newer GPUs
        cmd = [nvcc, "-O3", "-std=c++17", "--fmad=false", "-shared", "-Xcompiler", "-fPIC",
               *gencode,
               *_nvcc_threads(release), "kernels/dc_update.cu", "-o", str(target)]
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)


setup(
    name="hpctrain",
    version=_version(),
    description="Distributed deep-learning training on HPC clusters: DC-ASGD on MPI RMA, "
    "ensemble compression, data shuffling, Horovod-compatible synchronous SGD",
    packages=find_packages(include=["hpctrain", "hpctrain.*"]),
    package_data={"hpctrain": ["py.typed"]},  # PEP 561: its type hints are for checkers
    python_requires=">=3.10",
    install_requires=["torch>=2.1", "mpi4py>=4.0", "numpy", "tqdm", "pyyaml", "cloudpickle",
                      "tomli; python_version < '3.11'"],
    extras_require={
        "test": ["pytest", "pytest-mpi", "pytest-timeout", "pytest-xdist",
                 "ruff==0.17.6",  # the rules CI lints with: a new release adds some
                 "mypy==2.4.1"],  # make typecheck's: hpctrain checks clean with it
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "images": ["pillow"],
        # Built from source by scripts/build_horovod.sh (0.28.1 needs a C++17 patch for torch>=2.1).
        "horovod": ["horovod==0.28.1"],
    },
    ext_modules=[
        Extension("hpctrain._dc_update", sources=["kernels/dc_update.cpp"], language="c++",
                  depends=["kernels/dc_update.h"],
                  extra_compile_args=CPU_FLAGS, extra_link_args=["-fopenmp"]),
        Extension("hpctrain._shm_sync", sources=["kernels/shm_sync.cpp"], language="c++",
                  extra_compile_args=CPU_FLAGS),
    ],
    cmdclass={"build_ext": BuildKernels, "build_py": BuildWithCommit},
    entry_points={"console_scripts": ["hpctrain=hpctrain.__main__:main"]},
)
