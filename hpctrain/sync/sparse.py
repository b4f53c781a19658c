"""Sparse gradients reduced as Horovod reduces them: by allgather, not allreduce.

An embedding's gradient touches a few rows of a large table; allreducing it as a dense
tensor would move the whole table. Every rank's indices and values are concatenated instead,
and the result is an uncoalesced sparse tensor whose duplicate indices add up where it is
used (Horovod's ``sparse_allreduce_async``; Average divides the values by the size). One step
of ``DistributedOptimizer`` posts all its sparse gradients together: one allgather of every
gradient's row count, then two allgathers (indices, values) per gradient; the public
``sparse_allreduce_async`` is the same reduction of one tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hpctrain.devices import HostStage
from hpctrain.errors import UsageError
from hpctrain.sync import timeline
from hpctrain.sync.collective_check import Call
from hpctrain.sync.collectives import (
    Average,
    Sum,
    check_name,
    member,
    rejecting,
    resolve_op,
    tensor_call,
)
from hpctrain.sync.errors import UsageTypeError
from hpctrain.sync.process_sets import ProcessSet, global_process_set
from hpctrain.sync.transport import Request, Transport


def contribution(grad: torch.Tensor | None, param: torch.Tensor,
                 sparse_dim: int) -> torch.Tensor:
    """This rank's share of a sparse reduction: the gradient as a sparse tensor with
    ``sparse_dim`` sparse dimensions (no entries when there is no gradient)."""
    if grad is None:
        indices = torch.empty((sparse_dim, 0), dtype=torch.int64, device=param.device)
        values = param.new_empty((0, *param.shape[sparse_dim:]))
        return torch.sparse_coo_tensor(indices, values, param.shape, check_invariants=False)
    return grad if grad.is_sparse else grad.detach().to_sparse(sparse_dim)


class _Gather:
    """One tensor's allgather into a new tensor on the tensor's device."""

    def __init__(self, transport: Transport, send: torch.Tensor, rows: list[int], name: str):
        self.output = send.new_empty((sum(rows), *send.shape[1:]))
        self._request: Request | None = None
        if not self.output.numel():  # nothing to move on any rank (rows agree everywhere)
            return
        self._stage = HostStage(self.output, direct=transport.takes(self.output))
        self._send = send if transport.takes(send) else send.cpu()
        self._request = transport.iallgather(self._send, self._stage.buffer, rows)
        call = Call("allgather", name=name, dtype=send.dtype, shape=tuple(self.output.shape))
        self._token = timeline.started(call, transport.name.upper())

    def done(self) -> bool:
        """Whether MPI is done with the buffers (a look that also lets it progress)."""
        return self._request is None or self._request.test()

    def wait(self) -> torch.Tensor:
        if self._request is not None:
            self._request.wait()
            timeline.finished(self._token)
            self._stage.to_device()
        return self.output


class SparseAllgather:
    """The reduction of several sparse tensors (each rank's ``grads``, in the same order on
    every rank), started at construction; :meth:`results` waits for them."""

    def __init__(self, transport: Transport, grads: list[torch.Tensor], average: bool,
                 names: list[str] | None = None):
        names = names or [f"DistributedOptimizer.sparse{j}" for j in range(len(grads))]
        self._shapes = [g.shape for g in grads]
        self._divisor = transport.size() if average else 1
        size, n = transport.size(), len(grads)
        mine = torch.tensor([g._nnz() for g in grads], dtype=torch.int64)
        every = torch.empty(size * n, dtype=torch.int64)
        transport.iallgather(mine, every, [n] * size).wait()
        rows = every.view(size, n).t().tolist()  # rows[j][r]: rank r's entries in gradient j
        self._gathers = [(_Gather(transport, g._indices().t().contiguous(), rows[j],
                                  f"{names[j]}.indices"),
                          _Gather(transport, g._values().contiguous(), rows[j],
                                  f"{names[j]}.values"))
                         for j, g in enumerate(grads)]

    def done(self) -> bool:
        """Whether every allgather has completed (MPI holds none of its buffers)."""
        return all(indices.done() and values.done() for indices, values in self._gathers)

    def results(self) -> list[torch.Tensor]:
        """The reduced tensors, uncoalesced, in the order of ``grads``."""
        out = []
        for (indices, values), shape in zip(self._gathers, self._shapes, strict=True):
            v = values.wait()
            if self._divisor != 1:
                v = v / self._divisor
            out.append(torch.sparse_coo_tensor(indices.wait().t(), v, shape,
                                               check_invariants=False))
        return out


def sparse_allreduce_async(tensor: torch.Tensor, name: str, op: int,
                           process_set: ProcessSet = global_process_set
                           ) -> Callable[[], torch.Tensor]:
    """Start reducing a sparse COO tensor by allgather; returns a function that waits and
    gives the uncoalesced sum (op=Sum) or average (op=Average), as Horovod's does."""
    m = member(process_set, "sparse_allreduce_async")
    with rejecting(m, "allgather", name):
        if not isinstance(tensor, torch.Tensor):
            raise UsageTypeError(f"sparse_allreduce_async: expected a torch.Tensor, got "
                                 f"{type(tensor).__name__}")
        if tensor.layout != torch.sparse_coo:
            raise UsageError(f"sparse_allreduce_async: needs a sparse COO tensor, got layout "
                             f"{tensor.layout} (use allreduce_async)")
        check_name(name, "sparse_allreduce_async")
        op = resolve_op(op)
        if op not in (Sum, Average):
            raise UsageError(f"sparse_allreduce_async: op={op.name} needs dense tensors; "
                             "sparse ones take Sum or Average")
    m.channel.agree(tensor_call("allgather", tensor, name, op=op))
    _forget_completed()
    reduction = SparseAllgather(m.transport, [tensor], average=op is Average,
                                names=[str(name)])
    # Kept until its function is called: a function dropped uncalled (``synchronize`` of it
    # is None, as in Horovod) would free the buffers of allgathers MPI is still filling.
    _unfinished[id(reduction)] = reduction

    def result() -> torch.Tensor:
        _unfinished.pop(id(reduction), None)
        return reduction.results()[0]

    return result


# sparse_allreduce_async's reductions whose function has not been called (Horovod too keeps
# its handles until they are synchronized), until MPI is done with them.
_unfinished: dict[int, SparseAllgather] = {}


def _forget_completed() -> None:
    """Drop the kept reductions MPI is done with: a function called later still has its own,
    and one dropped uncalled no longer holds memory for the life of the process."""
    for key in [k for k, r in _unfinished.items() if r.done()]:
        del _unfinished[key]


def finish_unfinished() -> None:
    """Wait for the kept reductions and drop them, before the backend frees its
    communicators (:func:`hpctrain.sync.shutdown`): every rank started them alike."""
    while _unfinished:
        _unfinished.popitem()[1].results()
