"""Gradient compression, with the interface of ``horovod.torch.Compression``.

A compressor's ``compress(tensor) -> (tensor, ctx)`` and ``decompress(tensor, ctx)`` are what
Horovod calls, so these classes also work with the horovod backend. ``wire_dtype`` is what the
mpi backend's fused buckets need: the dtype a gradient of ``dtype`` travels in. A compressor of
one's own (a :class:`Compressor`, as in Horovod) works in the collectives as it is;
``DistributedOptimizer`` also needs its ``wire_dtype``, since it fuses gradients by the dtype
they travel in rather than compressing each one.
"""

from __future__ import annotations

import torch


class Compressor:
    """Horovod's interface for compressing a tensor and decompressing it again."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, object]:
        """The tensor to send, and what :meth:`decompress` needs to undo it."""
        raise NotImplementedError

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: object) -> torch.Tensor:
        raise NotImplementedError


class NoneCompressor(Compressor):
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


class FP16Compressor(Compressor):
    """Floating-point tensors travel as float16 (half the bytes); others unchanged."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        return tensor.to(FP16Compressor.wire_dtype(tensor.dtype)), tensor.dtype

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: torch.dtype) -> torch.Tensor:
        return tensor.to(ctx)

    @staticmethod
    def wire_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float16 if dtype.is_floating_point else dtype


class Compression:
    """``Compression.none`` or ``Compression.fp16``, as in Horovod."""

    none = NoneCompressor
    fp16 = FP16Compressor
