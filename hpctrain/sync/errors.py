"""The exceptions of hpctrain.sync's own backends (mpi, torch), named as Horovod names them."""

from __future__ import annotations


class HorovodInternalError(RuntimeError):
    """A collective failed (Horovod's name; its elastic mode treats it as recoverable)."""


class CollectiveMismatchError(HorovodInternalError):
    """Ranks called different collectives at the same point: raised on every rank, not a hang."""
