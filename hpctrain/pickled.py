"""Pickled messages between ranks that may pass 2 GiB, their tensors out of band.

A run's snapshots together, a checkpoint's gathering, the gather of every worker's step
times: an MPI-3 library such as Open MPI 4 refuses one message past 2 GiB, so
:func:`large_messages` gives mpi4py's ``pkl5`` communicator, which sends it in parts. What
it sends goes as :class:`OutOfBand`, each plain CPU tensor's memory an out-of-band buffer
of pickle protocol 5 (:func:`tensor_reduction`, which hpctrain.sync's object collectives
use too), where torch's own pickling copied it through ``torch.save``'s format.

Apart from :mod:`hpctrain.comm` (the MPI world) since it is a concept of its own, the
pickling of messages, over a communicator that module gives.
"""

from __future__ import annotations

import io
import pickle
import sys
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from hpctrain.comm import is_mpi4py

if TYPE_CHECKING:
    import torch


def large_messages(comm_):
    """``comm_`` for pickled messages past 2 GiB (a run's snapshots together, a checkpoint's
    gathering): MPI-3 libraries such as Open MPI 4 refuse one (``MPI_ERR_ARG``), and
    mpi4py's ``pkl5`` sends it in parts. Its ``bcast``, ``gather`` and ``scatter`` are
    collectives every rank makes through it. What it sends travels as :class:`OutOfBand`:
    tensors' memory as it is, not through torch's pickling. Another communicator
    (torchrun's, the simulator's) is returned as it is."""
    if not is_mpi4py(comm_):
        return comm_
    return _large_messages_class()(comm_)


@lru_cache(maxsize=1)
def _large_messages_class() -> type:
    from mpi4py.util import pkl5  # imports mpi4py.MPI: made at first use, after init()

    class LargeMessages(pkl5.Intracomm):
        """pkl5's communicator, whose sends wrap what they send in :class:`OutOfBand`."""

        def send(self, obj, dest, tag=0):
            return super().send(OutOfBand(obj), dest, tag)

        def isend(self, obj, dest, tag=0):
            return super().isend(OutOfBand(obj), dest, tag)

        def bcast(self, obj, root=0):
            return super().bcast(OutOfBand(obj), root)

        def gather(self, sendobj, root=0):
            return super().gather(OutOfBand(sendobj), root)

        def scatter(self, sendobj, root=0):
            parts = None if sendobj is None else [OutOfBand(part) for part in sendobj]
            return super().scatter(parts, root)

        def allgather(self, sendobj):
            return super().allgather(OutOfBand(sendobj))

    return LargeMessages


class OutOfBand:
    """``obj`` to be pickled with its CPU tensors' memory as out-of-band buffers (pickle
    protocol 5), which ``pkl5`` sends as they are and the receiver's tensors then use. Torch
    pickles a tensor's memory in band, through ``torch.save``'s format: a 2 GB broadcast of
    snapshots spent 18 of its 20 s there (unpickling). Unpickled, it is ``obj`` again."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __reduce_ex__(self, protocol):
        if protocol < 5:
            return _same, (self.obj,)
        buffers: list[pickle.PickleBuffer] = []
        data = io.BytesIO()
        _TensorPickler(data, protocol=5, buffer_callback=buffers.append).dump(self.obj)
        return _unpickled, (data.getvalue(), *buffers)


class _TensorPickler(pickle.Pickler):
    """A plain CPU tensor's memory pickled as one buffer (:func:`tensor_reduction`); any
    other object as it pickles itself."""

    def reducer_override(self, obj):
        return tensor_reduction(obj)


def tensor_reduction(obj: Any) -> Any:
    """A pickler's ``reducer_override`` for tensors: a plain CPU tensor's memory as one
    ``PickleBuffer`` (out of band under protocol 5 with a ``buffer_callback``), shape and
    dtype beside it, its elements contiguous and apart from any other tensor's; NotImplemented
    for anything else (a parameter, a sparse tensor, one that needs its gradient: torch's
    pickling keeps what they are). Shared with hpctrain.sync's object collectives."""
    # torch as imported already: where it is not imported there is no tensor to pickle
    torch = sys.modules.get("torch")
    if (torch is None or type(obj) is not torch.Tensor or obj.device.type != "cpu"
            or obj.requires_grad or obj.layout != torch.strided or obj.is_quantized
            or obj.is_nested):
        return NotImplemented
    flat = obj.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    memory = pickle.PickleBuffer(flat.view(torch.uint8).numpy())
    return unpickled_tensor, (memory, obj.dtype, tuple(obj.shape))


def unpickled_tensor(buffer: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor of :class:`_TensorPickler`'s buffer. A received buffer (MPI's, or pickle's
    for one pickled in band) is the tensor's memory; the sender's own (``pickle.loads`` on a
    broadcast's root) is copied, so that what comes back never shares memory with what was
    sent."""
    import torch

    if isinstance(buffer, pickle.PickleBuffer):
        buffer = bytearray(buffer)
    if not memoryview(buffer).nbytes:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)


def _unpickled(data: bytes, *buffers: Any) -> Any:
    return pickle.loads(data, buffers=buffers)


def _same(obj: Any) -> Any:
    return obj
