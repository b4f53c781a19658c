"""Where a rank computes: the device choice, GPU per local rank, and how MPI meets device memory.

One rule for every algorithm (``--device``): ``cpu``; ``cuda`` takes GPU
``local_rank % device_count`` (several ranks may share one GPU; a ``CUDA_VISIBLE_DEVICES``
set by Slurm or the user narrows what torch sees); ``auto`` is ``cuda`` when torch sees a GPU.
MPI moves device memory only when the library is CUDA-aware (:func:`cuda_aware_mpi`) and takes
it in the non-blocking collectives hpctrain calls (:func:`mpi_takes_device_memory`: not Open
MPI's); else data go through :class:`HostStage`, a pinned host copy.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import torch

from hpctrain import launch_env, options
from hpctrain.errors import UsageError
from hpctrain.switches import switch

DEVICES = ("auto", "cpu", "cuda")
_AWARE_ENV = "HPCTRAIN_CUDA_AWARE_MPI"  # on/off (hpctrain.switches): override the detection


def local_rank() -> int:
    """This process's rank on its node, read before MPI starts from the launcher that gave
    its rank (:func:`hpctrain.launch_env.local_rank`: the innermost, so a torchrun started
    by srun, whose workers all inherit ``SLURM_LOCALID=0``, gives each its own); 0 if none."""
    return launch_env.local_rank()


def check(choice: str) -> None:
    """UsageError (before MPI) when ``choice`` cannot be honoured on this machine, or when
    ``HPCTRAIN_CUDA_AWARE_MPI`` is misspelt (it would otherwise be read mid-run)."""
    cuda_aware_override()
    if choice not in DEVICES:
        raise UsageError(f"unknown device {choice!r}; choose from {', '.join(DEVICES)}")
    if choice == "cuda" and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        built = "torch was built without CUDA" if torch.version.cuda is None \
            else "torch sees no GPU"
        given = options.named("--device cuda", "RunConfig", "device", "cuda")
        other = "--device cpu or auto" if options.on_command_line() else \
            "RunConfig.device='cpu' or 'auto'"
        raise UsageError(f"{given}: {built}{where}; use {other}")


def peak_memory(device: torch.device) -> int:
    """The most memory this process has held since :func:`reset_peak_memory` (a run's start,
    in :func:`choose`), in bytes: on a GPU what torch allocated there, on the CPU the
    process's peak resident set (data, model, libraries: everything; outside Linux, since
    the process started: nothing resets it there)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    high_water = _vm_hwm()
    if high_water is not None:
        return high_water
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts KiB


def reset_peak_memory(device: torch.device) -> None:
    """Count :func:`peak_memory` from now: a script's earlier run in the same process (or
    its own work) held memory that is not this run's. On a GPU torch's peak statistics; on
    Linux the high-water mark VmHWM (writing 5 to /proc/self/clear_refs sets it to the
    current resident set); elsewhere, or where that file cannot be written, nothing."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _vm_hwm() -> int | None:
    """The process's peak resident set in bytes from /proc/self/status (Linux), or None.
    Unlike ru_maxrss, it is the one :func:`reset_peak_memory` resets."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # "VmHWM:  1234 kB"
    return None


def resolve(choice: str) -> str:
    """``auto`` as the device type it means here: ``cuda`` or ``cpu``."""
    check(choice)
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def choose(choice: str) -> torch.device:
    """This rank's device for ``choice``; a GPU is made current for the process. A run
    chooses once, as it starts: :func:`peak_memory` counts from here."""
    if resolve(choice) == "cpu":
        device = torch.device("cpu")
    else:
        device = local_gpu()
        torch.cuda.set_device(device)
    reset_peak_memory(device)
    return device


@contextmanager
def cudnn_mode(choice: str, benchmark: bool = False) -> Iterator[None]:
    """While a run trains on a GPU (``choice`` resolves to cuda): cuDNN's deterministic
    algorithms, not benchmarked, so that a deterministic algorithm's run gives the same model
    again there, as on the CPU; or, with ``benchmark`` (``--cudnn-benchmark``), the fastest
    ones cuDNN finds by timing each new shape, which a convnet may train faster with but which
    need not repeat. The process's own settings come back afterwards (a script or notebook
    that calls ``train`` keeps its ``cudnn.benchmark``)."""
    if resolve(choice) != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = not benchmark, benchmark
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``'s current stream (nothing on the CPU): a CUDA
    call returns once its kernels are queued, so a clock read after this one counts them."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def local_gpu() -> torch.device:
    """The GPU this rank takes: ``local_rank % device_count`` (see the module docstring)."""
    return torch.device("cuda", gpu_index(local_rank(), torch.cuda.device_count()))


def gpu_index(local: int, count: int) -> int:
    """Which of ``count`` visible GPUs the process of local rank ``local`` takes: ranks go
    round the GPUs, so that more ranks than GPUs share them evenly."""
    return local % count


def visible_gpus() -> list[str]:
    """The GPUs this process sees, by UUID. torch before 2.4 has no UUIDs: then by the entry
    of ``CUDA_VISIBLE_DEVICES`` that names the GPU (a physical index or a UUID, so that two
    ranks which each see one GPU as device 0 still differ), else by its index."""
    if not torch.cuda.is_available():
        return []
    listed = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    names = []
    for i in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
        names.append(str(uuid) if uuid is not None else
                     f"GPU {listed[i] if i < len(listed) and listed[i] else i}")
    return names


def shares_gpus(seen: list[tuple[str, int, list[str]]]) -> bool:
    """Whether two ranks of a node will use the same GPU, which one NCCL communicator cannot
    hold (``seen``: each rank's node, local rank and visible GPUs).

    A rank's GPU is taken to be ``visible[local_rank % len(visible)]``, hpctrain's rule
    (:func:`hpctrain.devices.local_gpu`) and a Horovod-style script's
    (``set_device(hvd.local_rank())``, after ``init``: the current device says nothing yet).
    It covers each rank seeing all of the node's GPUs, only its own as device 0 (Slurm's
    ``--gpus-per-task``), or a NUMA domain's few (``--gpu-bind=closest``), where two ranks
    may land on one GPU while others stay idle. The torch backend chooses gloo then; ``hpctrain
    info`` says so.
    """
    taken = [(node, visible[gpu_index(local, len(visible))]) for node, local, visible in seen
             if visible]
    return len(set(taken)) < len(taken)


def _mpi_library() -> ctypes.CDLL | None:
    """The MPI library mpi4py loaded into this process (found in /proc/self/maps)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        if Path(path).name.startswith(("libmpi.so", "libmpich.so")):
            return ctypes.CDLL(path)
    return None


def cuda_aware_mpi() -> bool:
    """Whether the MPI library takes CUDA device pointers, asked at run time.

    Open MPI: ``MPIX_Query_cuda_support()``; MPICH: ``MPIX_GPU_query_support(CUDA)``;
    ``HPCTRAIN_CUDA_AWARE_MPI`` overrides (:func:`cuda_aware_override`). False when unknown,
    and before MPI started (asked again once it has: only the library's answer is kept).
    """
    forced = cuda_aware_override()
    if forced is not None:
        return forced
    if "mpi4py.MPI" not in sys.modules:
        return False
    return _library_cuda_aware()


def mpi_takes_device_memory() -> bool:
    """Whether hpctrain hands device memory to MPI (:class:`HostStage`'s default, the mpi
    transport's): :func:`cuda_aware_mpi`, unless the library is Open MPI
    (:func:`device_memory_in_nonblocking`)."""
    MPI = sys.modules.get("mpi4py.MPI")
    return cuda_aware_mpi() and device_memory_in_nonblocking(
        _library_version() if MPI is not None else None)


def device_memory_in_nonblocking(library: str | None) -> bool:
    """Whether the MPI library ``library`` (its version string; None: not known) takes device
    memory in non-blocking collectives, once it is CUDA-aware. hpctrain moves tensors with
    them (Iallreduce, Iallgatherv, Ibcast, Ialltoallv, Ireduce_scatter), and Open MPI's CUDA
    support covers point-to-point calls and blocking collectives only: its non-blocking ones
    (libnbc) reduce and copy in host code, which faults on a device pointer (open-mpi/ompi
    issues 9845 and 12045). There device tensors are staged through pinned host memory, as
    for a library that is not CUDA-aware; MPICH's GPU support covers them."""
    return "OPEN MPI" not in (library or "").upper()


@lru_cache(maxsize=1)
def _library_version() -> str:
    return str(sys.modules["mpi4py.MPI"].Get_library_version())


def cuda_aware_override() -> bool | None:
    """What ``HPCTRAIN_CUDA_AWARE_MPI`` forces: 1 or 0 (true/false, yes/no, on/off), None when
    unset or empty. UsageError for anything else: a misspelt override left the library's
    answer in force without a word."""
    return switch(_AWARE_ENV)


@lru_cache(maxsize=1)
def _library_cuda_aware() -> bool:
    lib = _mpi_library()
    if lib is None:
        return False
    if hasattr(lib, "MPIX_Query_cuda_support"):
        lib.MPIX_Query_cuda_support.restype = ctypes.c_int
        return bool(lib.MPIX_Query_cuda_support())
    if hasattr(lib, "MPIX_GPU_query_support"):
        supported = ctypes.c_int(0)
        lib.MPIX_GPU_query_support(0, ctypes.byref(supported))  # MPIX_GPU_SUPPORT_CUDA
        return bool(supported.value)
    return False


def nccl_available() -> bool:
    """Whether torch.distributed can use NCCL here (built with it, and a GPU to run it on)."""
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available())


def describe() -> dict:
    """Devices and transports, for ``hpctrain info`` and run records."""
    import torch.distributed as dist

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"cuda": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
            "gpus": gpus, "cuda_aware_mpi": cuda_aware_mpi(), "nccl": nccl_available(),
            "gloo": bool(dist.is_available() and dist.is_gloo_available())}


class HostStage:
    """Host memory MPI can read and write for a tensor that may live on a GPU.

    For a CPU tensor, or a CUDA tensor when MPI takes device memory
    (:func:`mpi_takes_device_memory`; or ``direct=True``: a
    transport that moves it where it is, NCCL), :attr:`buffer` is the tensor itself and the
    copies are no-ops; otherwise (or with ``direct=False``) it is a host copy of the same
    shape, pinned for a CUDA tensor: :meth:`to_host` fills it (waiting for the device), or
    :meth:`start_to_host` starts filling it and says when it is full, and :meth:`to_device`
    copies it back.

    A direct CUDA buffer is handed over without waiting for the device: NCCL's stream waits
    for the current stream when a collective is queued (ProcessGroupNCCL's stream sync), and
    MPI gets device memory only through :func:`mpi_buffer`, which waits for the stream then.
    """

    def __init__(self, tensor: torch.Tensor, *, direct: bool | None = None):
        self.tensor = tensor
        if direct is None:
            direct = tensor.device.type == "cpu" or mpi_takes_device_memory()
        self.staged = not direct
        self.buffer = torch.empty(tensor.shape, dtype=tensor.dtype,
                                  pin_memory=tensor.is_cuda) if self.staged else tensor

    def to_host(self) -> torch.Tensor:
        """The tensor's current values where the transport reads them (see the class)."""
        if self.staged:
            self.buffer.copy_(self.tensor)
        return self.buffer

    def start_to_host(self) -> Copying:
        """Start filling :attr:`buffer` with the tensor's current values without waiting for
        the device; what it returns says when the buffer holds them. A staged CUDA tensor's
        copy is queued on the current stream (behind the kernels that wrote the tensor), and a
        CUDA event recorded after it; anything else is done at once (:data:`DONE`)."""
        if not (self.staged and self.tensor.is_cuda):
            self.to_host()
            return DONE
        stream = torch.cuda.current_stream(self.tensor.device)
        self.buffer.copy_(self.tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def to_device(self, non_blocking: bool = False) -> torch.Tensor:
        """Copy what MPI wrote into the buffer back into the tensor; ``non_blocking``: queue
        a CUDA tensor's copy on the current stream and return (from pinned memory), so that
        only the work queued after it on that stream is sure to see it."""
        if self.staged:
            self.tensor.copy_(self.buffer, non_blocking=non_blocking)
        return self.tensor


class Copying(Protocol):
    """A copy under way (:meth:`HostStage.start_to_host`), as a ``torch.cuda.Event`` is."""

    def query(self) -> bool:
        """Whether it is done."""
        ...

    def synchronize(self) -> None:
        """Wait until it is done."""
        ...


class _Done:
    """A copy that was done when it was started (a CPU or direct stage's)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


DONE: Copying = _Done()


def mpi_buffer(tensor: torch.Tensor):
    """``tensor``'s memory as mpi4py takes it: a numpy view of CPU memory, or the CUDA tensor
    itself (its ``__cuda_array_interface__``) for a CUDA-aware MPI.

    A CUDA tensor's stream is synchronised first: MPI reads and writes device memory outside
    torch's streams, so the kernels that filled the tensor (or that still read the memory the
    caching allocator gave it) must be done before MPI starts.
    """
    if tensor.device.type == "cpu":
        return tensor.numpy()
    synchronize(tensor.device)
    return tensor
