"""Gradient compression, with the interface of ``horovod.torch.Compression``.

A compressor's ``compress(tensor) -> (tensor, ctx)`` and ``decompress(tensor, ctx)`` are what
Horovod calls, so these classes also work with the horovod backend. ``wire_dtype`` is what the
mpi backend's fused buckets need: the dtype a gradient of ``dtype`` travels in. A compressor of
one's own (a :class:`Compressor`, as in Horovod) works in the collectives as it is;
``DistributedOptimizer`` fuses gradients by the dtype they travel in rather than compressing
each one, so it takes only compressors that cast (:func:`only_casts`): ``Compression.none``,
``.fp16``, or a :class:`CastCompressor` with a ``wire_dtype`` of its own.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import torch

Ctx = TypeVar("Ctx")


class Compressor(Generic[Ctx]):
    """Horovod's interface for compressing a tensor and decompressing it again; ``Ctx``:
    what compress gives decompress."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Ctx]:
        """The tensor to send, and what :meth:`decompress` needs to undo it."""
        raise NotImplementedError

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        raise NotImplementedError


class NoneCompressor(Compressor[None]):
    """No compression (the default)."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, None]:
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: None) -> torch.Tensor:
        return tensor

    @staticmethod
    def wire_dtype(dtype: torch.dtype) -> torch.dtype:
        return dtype


class CastCompressor(Compressor[torch.dtype]):
    """Tensors travel in ``wire_dtype(dtype)`` and come back in their own dtype; a subclass
    chooses the wire dtype (e.g. bfloat16) by overriding ``wire_dtype`` alone."""

    @classmethod
    def compress(cls, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        return tensor.to(cls.wire_dtype(tensor.dtype)), tensor.dtype

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: torch.dtype) -> torch.Tensor:
        return tensor.to(ctx)

    @staticmethod
    def wire_dtype(dtype: torch.dtype) -> torch.dtype:
        return dtype


class FP16Compressor(CastCompressor):
    """Floating-point tensors travel as float16 (half the bytes); others unchanged."""

    @staticmethod
    def wire_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float16 if dtype.is_floating_point else dtype


def only_casts(compression: object) -> bool:
    """Whether ``compression`` (a class or an instance) does no more than cast to its
    ``wire_dtype`` and back: all that DistributedOptimizer's fused buckets do with it."""
    def like(kind: type, names: tuple[str, ...]) -> bool:
        return all(_function(compression, n) is _function(kind, n) for n in names)

    return like(NoneCompressor, ("compress", "decompress", "wire_dtype")) or (
        callable(getattr(compression, "wire_dtype", None))
        and like(CastCompressor, ("compress", "decompress")))


def _function(owner: object, name: str) -> object:
    """The function behind ``owner.name``, however it is bound (static, class, instance)."""
    method = getattr(owner, name, None)
    return getattr(method, "__func__", method)


class Compression:
    """``Compression.none`` or ``Compression.fp16``, as in Horovod."""

    none = NoneCompressor
    fp16 = FP16Compressor
