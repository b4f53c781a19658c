"""Locks and atomics the CPU takes on shared-memory windows (kernels/shm_sync.cpp).

On one node the store's windows are memory that every rank maps (``Win.Allocate_shared``).
Open MPI takes a passive-target lock on such a window in shared memory, but MPICH and Intel
MPI grant it from the owner's progress engine: a push waits until the shard's owner next calls
MPI, which a worker deep in its forward and backward does not (docs/BENCHMARKS.md, "The store
on MPICH and Intel MPI"). These primitives make no MPI call, so they need no owner on any MPI.

Every argument named ``word`` is the address of an 8-byte aligned word in mapped memory
(``ndarray.ctypes.data`` plus an offset). The C functions run without the GIL (ctypes), so a
worker waiting for a lock does not stop its own watchdog thread.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import numpy as np
import torch

from hpctrain import kernels


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The compiled library (kernels/shm_sync.cpp); a RuntimeError that says how to build it
    when it is missing or older than its sources."""
    lib = kernels.extension("shm_sync")
    names = ("lock_shared", "unlock_shared", "lock_exclusive", "unlock_exclusive", "accumulate",
             "fetch_add", "compare_swap", "load", "store")
    kernels.symbols(lib, "shared-memory lock", *(f"hpctrain_shm_{name}" for name in names))
    addr, i64 = ctypes.c_void_p, ctypes.c_int64
    for name in names[:4]:
        getattr(lib, f"hpctrain_shm_{name}").argtypes = [addr]
        getattr(lib, f"hpctrain_shm_{name}").restype = None
    lib.hpctrain_shm_accumulate.argtypes = [addr, addr, addr, i64, addr]
    lib.hpctrain_shm_accumulate.restype = None
    lib.hpctrain_shm_fetch_add.argtypes = [addr, i64]
    lib.hpctrain_shm_fetch_add.restype = i64
    lib.hpctrain_shm_compare_swap.argtypes = [addr, i64, i64]
    lib.hpctrain_shm_compare_swap.restype = i64
    lib.hpctrain_shm_load.argtypes = [addr, addr, i64]
    lib.hpctrain_shm_load.restype = None
    lib.hpctrain_shm_store.argtypes = [addr, i64]
    lib.hpctrain_shm_store.restype = None
    return lib


def lock(word: int, exclusive: bool) -> None:
    """Take the reader-writer lock at ``word`` (0 when free): shared or exclusive. A waiting
    exclusive taker bars new shared takers, so readers cannot starve it."""
    lib = library()
    (lib.hpctrain_shm_lock_exclusive if exclusive else lib.hpctrain_shm_lock_shared)(word)


def unlock(word: int, exclusive: bool) -> None:
    """Release the lock at ``word`` as it was taken; the holder's stores become visible to the
    next taker."""
    lib = library()
    (lib.hpctrain_shm_unlock_exclusive if exclusive else lib.hpctrain_shm_unlock_shared)(word)


def accumulate(word: int, dst: torch.Tensor, src: torch.Tensor, count: int) -> None:
    """``dst += src`` and one added to the int64 at address ``count``, as one step under the
    lock at ``word`` (as Open MPI's osc/sm makes an Accumulate atomic): concurrent accumulates
    lose nothing. ``dst`` and ``src``: contiguous float32 CPU tensors of one size."""
    library().hpctrain_shm_accumulate(word, dst.data_ptr(), src.data_ptr(), dst.numel(), count)


def fetch_add(word: int, value: int) -> int:
    """Add ``value`` to the int64 at ``word`` atomically; return what it held before."""
    return library().hpctrain_shm_fetch_add(word, value)


def compare_swap(word: int, expected: int, desired: int) -> int:
    """Write ``desired`` to the int64 at ``word`` if it holds ``expected``, atomically; return
    what it held (``expected``: written)."""
    return library().hpctrain_shm_compare_swap(word, expected, desired)


def load(word: int, out: np.ndarray) -> np.ndarray:
    """``len(out)`` int64 words from ``word`` into ``out`` (int64), each read atomically."""
    library().hpctrain_shm_load(word, out.ctypes.data, len(out))
    return out


def store(word: int, value: int) -> None:
    """Write the int64 at ``word`` atomically."""
    library().hpctrain_shm_store(word, value)
