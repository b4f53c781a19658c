"""The fused DC-ASGD compensation kernels (kernels/dc_update.cpp and .cu) on torch tensors.

``dc_update`` writes the new model ``w + d`` (into one or two tensors) and ``dc_delta`` the step
``d`` itself (and ``w + d`` if wanted), in one pass, where

    g' = g + weight_decay * w_bak
    d  = -lr * (g' + lam_t * g'^2 * (w - w_bak))

with ``lam_t = lam`` (DC-ASGD-c; ASGD is ``lam = 0``), or, when the running mean square ``ms``
is given (DC-ASGD-a), ``ms <- ms_decay * ms + (1 - ms_decay) * g'^2`` and
``lam_t = lam / sqrt(ms + 1e-7)``. When a velocity ``v`` is given the step gets momentum:
``v <- momentum * v + d; d <- v`` (the DC-ASGD authors' MXNet optimizer does the same). One
pass reads each input once and writes each output once.

CPU tensors use the OpenMP library built by ``pip install`` (setup.py); CUDA tensors use the
CUDA library that setup.py builds when nvcc is found. Any output may be the very
tensor of an input (in place); partially overlapping tensors are rejected, as are non-contiguous,
non-float32 or differently sized ones.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import math
from functools import lru_cache
from pathlib import Path

import torch

from hpctrain.errors import UsageError

_HERE = Path(__file__).resolve().parent
_REBUILD = "reinstall hpctrain (pip install . from its checkout; make setup in a development one)"
_P, _F, _I64, _INT = ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_int
_HYPER = [_I64, _F, _F, _F, _F, _F]


def rebuild_hint(package_dir: Path | None = None) -> str:
    """How to get a library built. From a source tree (a setup.py beside the package, as in a
    checkout) the cause is rarely a bad install: after ``pip install .``, ``python -m
    hpctrain`` run in the checkout imports the checkout's unbuilt copy (the current directory
    comes first on sys.path), and reinstalling changes nothing."""
    package_dir = _HERE if package_dir is None else package_dir
    if (package_dir.parent / "setup.py").is_file():
        return (f"hpctrain is imported from its source tree {package_dir.parent} (after "
                "pip install . the current directory comes ahead of the installed copy on "
                "sys.path): run from another directory, or build it in place: pip install -e . "
                "(make setup in a development checkout)")
    return _REBUILD


def extension(stem: str) -> ctypes.CDLL:
    """The C-ABI library ``hpctrain/_<stem><extension suffix>`` that setup.py builds."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _HERE / f"_{stem}{suffix}"
        if path.is_file():
            return ctypes.CDLL(str(path))
    raise RuntimeError(f"hpctrain's library _{stem} is not built in {_HERE}; {rebuild_hint()}")


def symbols(lib: ctypes.CDLL, what: str, *names: str) -> dict:
    """``lib``'s functions ``names``: a library built from older sources may lack a renamed or
    new one, which ctypes reports as an AttributeError ("undefined symbol"); a RuntimeError that
    says what to do instead, as for a library that is missing."""
    missing = [name for name in names if not hasattr(lib, name)]
    if missing:
        raise RuntimeError(f"hpctrain's {what} library {lib._name} has no "
                           f"{', '.join(missing)} (built from older sources?); {rebuild_hint()}")
    return {name: getattr(lib, name) for name in names}


@lru_cache(maxsize=1)
def cpu_library() -> ctypes.CDLL:
    """The compiled CPU kernel library."""
    lib = extension("dc_update")
    fn = symbols(lib, "CPU kernel", "hpctrain_dc_step", "hpctrain_dc_openmp")
    fn["hpctrain_dc_step"].argtypes = [_P] * 8 + _HYPER + [_INT]
    fn["hpctrain_dc_step"].restype = None
    fn["hpctrain_dc_openmp"].restype = _INT
    return lib


@lru_cache(maxsize=1)
def cuda_library() -> ctypes.CDLL:
    """The compiled CUDA kernel library."""
    path = _HERE / "_dc_update_cuda.so"
    if not path.is_file():
        raise RuntimeError(
            f"hpctrain's CUDA kernel library was not built ({path} missing): its build needs "
            f"nvcc (HPCTRAIN_BUILD_CUDA=1 makes it required); {rebuild_hint()}")
    lib = ctypes.CDLL(str(path))
    fn = symbols(lib, "CUDA kernel", "hpctrain_dc_step_cuda", "hpctrain_cuda_error_string")
    fn["hpctrain_dc_step_cuda"].argtypes = [_P] * 8 + _HYPER + [_P]
    fn["hpctrain_dc_step_cuda"].restype = _INT
    fn["hpctrain_cuda_error_string"].argtypes = [_INT]
    fn["hpctrain_cuda_error_string"].restype = ctypes.c_char_p
    return lib


def dc_update(w: torch.Tensor, g: torch.Tensor, w_bak: torch.Tensor,
              ms: torch.Tensor | None = None, v: torch.Tensor | None = None, *, lr: float,
              lam: float = 0.0, ms_decay: float = 0.95, weight_decay: float = 0.0,
              momentum: float = 0.0, out: torch.Tensor | None = None,
              out2: torch.Tensor | None = None, threads: int = 0) -> torch.Tensor:
    """``out = w + d`` (``out`` defaults to ``w``: in place), and the same into ``out2`` if given.

    Updates ``ms``, ``v`` if given. Returns ``out``. ``threads``: OpenMP threads for CPU
    tensors (0: OMP_NUM_THREADS).
    """
    out = w if out is None else out
    _step({"out": out, "out2": out2, "ms": ms, "v": v}, None, out, out2,
          w, g, w_bak, ms, v, (lr, lam, ms_decay, weight_decay, momentum), threads)
    return out


def dc_delta(w: torch.Tensor, g: torch.Tensor, w_bak: torch.Tensor,
             ms: torch.Tensor | None = None, v: torch.Tensor | None = None, *, lr: float,
             lam: float = 0.0, ms_decay: float = 0.95, weight_decay: float = 0.0,
             momentum: float = 0.0, out: torch.Tensor | None = None,
             w_out: torch.Tensor | None = None, threads: int = 0) -> torch.Tensor:
    """The step ``d`` into ``out`` (a new tensor if None), and ``w + d`` into ``w_out`` if given.

    Updates ``ms``, ``v`` if given. Returns ``out``.
    """
    out = torch.empty_like(w) if out is None else out
    _step({"out": out, "w_out": w_out, "ms": ms, "v": v}, out, w_out, None,
          w, g, w_bak, ms, v, (lr, lam, ms_decay, weight_decay, momentum), threads)
    return out


def _step(outputs: dict, d_out, w_out, w_out2, w, g, w_bak, ms, v, hyper: tuple,
          threads: int) -> None:
    if not isinstance(w, torch.Tensor):
        raise UsageError(f"dc kernel: w must be a torch.Tensor, not {type(w).__name__}")
    _check(outputs, {"w": w, "g": g, "w_bak": w_bak}, w.numel(), ms_decay=hyper[2],
           momentum=hyper[4])
    check_rates(lr=hyper[0], lam=hyper[1], weight_decay=hyper[3])
    ptrs = [None if t is None else t.data_ptr() for t in (d_out, w_out, w_out2, w, g, w_bak,
                                                           ms, v)]
    if w.is_cuda:
        with torch.cuda.device(w.device):
            lib = cuda_library()
            stream = torch.cuda.current_stream(w.device).cuda_stream
            err = lib.hpctrain_dc_step_cuda(*ptrs, w.numel(), *hyper, stream)
            if err != 0:
                message = lib.hpctrain_cuda_error_string(err).decode()
                raise RuntimeError(f"hpctrain CUDA kernel: {message}{cuda_error_advice(err)}")
    else:
        cpu_library().hpctrain_dc_step(*ptrs, w.numel(), *hyper, threads)


# CUDA runtime errors a build for the wrong machine gives at the kernel's first call.
_TOO_NEW = (35, 222)  # cudaErrorInsufficientDriver, cudaErrorUnsupportedPtxVersion
_NO_IMAGE = 209  # cudaErrorNoKernelImageForDevice


def cuda_error_advice(err: int) -> str:
    """What to do about CUDA runtime error ``err`` from the kernel library, or "" when the
    error is not one of a build that does not fit this machine."""
    if err in _TOO_NEW:
        return (f" (error {err}): the kernel library was built by an nvcc newer than this "
                f"node's driver runs; rebuild it with the CUDA toolkit torch was built with "
                f"(CUDA {torch.version.cuda}: CUDA_HOME=that toolkit); {rebuild_hint()}")
    if err == _NO_IMAGE:
        return (f" (error {err}): the kernel library was built for other GPU architectures; "
                f"rebuild it for this GPU's (HPCTRAIN_CUDA_ARCH=sm_XY); {rebuild_hint()}")
    return ""


def _check(outputs: dict, inputs: dict, n: int, ms_decay: float, momentum: float) -> None:
    tensors = {**inputs, **{k: t for k, t in outputs.items() if t is not None}}
    device = inputs["w"].device
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise UsageError(f"dc kernel: {name} must be a torch.Tensor, not {type(t).__name__}")
        if t.dtype != torch.float32:
            raise UsageError(f"dc kernel: {name} has dtype {t.dtype}; float32 is needed")
        if not t.is_contiguous():
            raise UsageError(f"dc kernel: {name} is not contiguous (call .contiguous())")
        if t.numel() != n:
            raise UsageError(f"dc kernel: {name} has {t.numel()} elements, w has {n}")
        if t.device != device:
            raise UsageError(f"dc kernel: {name} is on {t.device}, w on {device}")
        if t.device.type not in ("cpu", "cuda"):
            raise UsageError(f"dc kernel: {name} is on {t.device}; cpu or cuda is needed")
    check_decays(ms=outputs.get("ms") is not None, v=outputs.get("v") is not None,
                 ms_decay=ms_decay, momentum=momentum)
    if n == 0:
        return  # every empty tensor's data_ptr is 0: nothing to overlap
    # Outputs may be the same memory as anything else, never a shifted overlap; no two outputs
    # may share memory at all.
    written = [(k, t) for k, t in outputs.items() if t is not None]
    for i, (name, t) in enumerate(written):
        for other, u in [*written[i + 1:], *inputs.items()]:
            same = t.data_ptr() == u.data_ptr()
            if (same and other in outputs) or (not same and _overlap(t, u)):
                raise UsageError(f"dc kernel: {name} overlaps {other} in memory")


def check_decays(*, ms: bool, v: bool, ms_decay: float, momentum: float) -> None:
    """UsageError unless the decays of the state kept (``ms``: DC-ASGD-a's mean square;
    ``v``: momentum) lie in [0, 1). A caller that holds a lock checks before taking it."""
    if ms and not 0.0 <= ms_decay < 1.0:
        raise UsageError(f"dc kernel: ms_decay {ms_decay} is outside [0, 1)")
    if v and not 0.0 <= momentum < 1.0:
        raise UsageError(f"dc kernel: momentum {momentum} is outside [0, 1)")


def check_rates(*, lr: float, lam: float, weight_decay: float) -> None:
    """UsageError unless ``lr``, ``lam`` and ``weight_decay`` are finite and >= 0 (a NaN, or
    a negative rate's ascent, would reach the model unseen)."""
    for name, value in (("lr", lr), ("lam", lam), ("weight_decay", weight_decay)):
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"dc kernel: {name} {value} must be a finite number >= 0")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + 4 * b.numel() and b0 < a0 + 4 * a.numel() and a.numel() > 0 and b.numel() > 0
