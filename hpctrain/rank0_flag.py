"""Rank 0's one-byte decision, reaching every rank one step late without a blocking message.

Lock-step loops must act on rank 0's decisions (a checkpoint is due, stop the run) at the same
step on every rank. A blocking broadcast per step would hold every rank to rank 0's pace;
instead each step receives the byte rank 0 posted at the step before (by then, as a rule,
already there) and posts the next one in a 1-byte ``Ibcast`` that overlaps the step. Works on
mpi4py communicators, :class:`hpctrain.torch_comm.TorchComm` and the simulator's.
"""

from __future__ import annotations

import numpy as np


class Rank0Flag:
    """Rank 0's byte for every rank of ``comm``, one :meth:`receive` after its :meth:`post`.
    Every rank must call both in the same order (collective)."""

    def __init__(self, comm) -> None:
        self.comm, self._flag, self._request = comm, np.zeros(1, np.uint8), None

    def receive(self) -> int:
        """The byte rank 0 posted last (0 if nothing was posted since the last receive)."""
        if self._request is None:
            return 0
        self._request.Wait()
        self._request = None
        return int(self._flag[0])

    def post(self, value: int) -> None:
        """Send rank 0's ``value`` (other ranks' is ignored) for the next :meth:`receive`."""
        self._flag[0] = value
        self._request = self.comm.Ibcast(self._flag, root=0)

    def close(self) -> None:
        """Complete a post nobody received (collective)."""
        self.receive()
