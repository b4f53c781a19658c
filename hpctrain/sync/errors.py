"""The exceptions of hpctrain.sync's own backends (mpi, torch), named as Horovod names them."""

from __future__ import annotations

from hpctrain.errors import UsageError


class HorovodInternalError(RuntimeError):
    """A collective failed (Horovod's name; its elastic mode treats it as recoverable)."""


class NotInitializedError(UsageError, HorovodInternalError):
    """A call before init() or after shutdown(). Horovod raises HorovodInternalError from its
    collectives there and ValueError from size() and rank(): this is both, so that a ported
    script's ``except hvd.HorovodInternalError`` catches it, as ``except ValueError`` does."""


def not_initialized(caller: str) -> NotInitializedError:
    return NotInitializedError(f"hpctrain.sync.{caller}() called before hpctrain.sync.init() "
                               "or after hpctrain.sync.shutdown()")


class CollectiveMismatchError(HorovodInternalError):
    """Ranks called different collectives at the same point: raised on every rank, not a hang."""


class UsageTypeError(UsageError, TypeError):
    """An argument of the wrong type: a TypeError, as torch and Horovod raise for one, and a
    UsageError, so that hpctrain reports it in one line as it does other bad input."""


class UsageNotImplementedError(UsageError, NotImplementedError):
    """What Horovod does not implement either (Adasum on a number of processes not a power of
    2): Horovod's NotImplementedError, for scripts that catch it and fall back, and a
    UsageError, reported in one line."""
