"""What hpctrain's own Horovod-shaped backends need from a communication library, twice.

The collectives (collectives.py) and the fused gradient buckets (buckets.py) keep Horovod's
semantics: ops, scaling, handles, autograd, fusion. They move bytes through a
:class:`Transport`: a world of ranks with a few non-blocking tensor operations and two object
ones. :class:`MPITransport` is mpi4py on a communicator (``--sync-backend mpi``);
:class:`hpctrain.sync.torch_transport.TorchTransport` is ``torch.distributed`` (NCCL for CUDA
tensors, gloo for CPU ones: ``--sync-backend torch``). A tensor a transport cannot move where
it is (:meth:`Transport.takes`) is staged by the caller through
:class:`hpctrain.devices.HostStage`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from hpctrain import comm as mpicomm
from hpctrain import pickled
from hpctrain.devices import mpi_buffer, mpi_takes_device_memory
from hpctrain.errors import UsageError
from hpctrain.sync import parts

# Reductions a transport sums with: the ReduceOp values (Average is Sum, scaled by the caller).
SUM, MIN, MAX, PRODUCT = 1, 3, 4, 5
_MPI_OPS = {SUM: "SUM", MIN: "MIN", MAX: "MAX", PRODUCT: "PROD"}
_TORCH_OPS: dict[int, Callable[..., torch.Tensor]] = {
    SUM: torch.add, MIN: torch.minimum, MAX: torch.maximum, PRODUCT: torch.mul}
HALF_TYPES = (torch.float16, torch.bfloat16)
# The point-to-point messages on a transport's communicator, a tag each: isendrecv's, and an
# alltoall's past MAX_COUNT (pkl5's object messages go on a communicator of mpi4py's own).
_SENDRECV_TAG = 7
_ALLTOALL_TAG = 8
PIECE_BYTES = 2**30  # ibcast and isendrecv send a tensor in pieces up to this (MPI-3: < 2 GiB)
PIECE_ELEMENTS = 2**30  # iallreduce reduces a tensor in pieces of up to this many elements,
# ireducescatter and iallgather move windows of up to this many (rows, for iallgather), and
# ialltoall pieces of up to this many rows (and PIECE_BYTES bytes, a row at least) where the
# whole would count past MAX_COUNT (tests lower them to part small tensors)
MAX_COUNT = 2**31 - 1  # a C int: the most one MPI-3 call counts, displaces or reduce-scatters


class Request(Protocol):
    """A started operation."""

    def wait(self) -> None: ...
    def test(self) -> bool: ...


class Transport(Protocol):
    """A world of ranks and the operations hpctrain's collectives are built from."""

    name: str

    def takes(self, tensor: torch.Tensor) -> bool:
        """Whether it moves ``tensor`` where it is (else the caller stages it on the host)."""

    def size(self) -> int: ...
    def rank(self) -> int: ...
    def local_size(self) -> int: ...
    def local_rank(self) -> int: ...

    def iallreduce(self, send: torch.Tensor | None, out: torch.Tensor, op: int) -> Request:
        """Reduce ``send`` (``out`` itself when None) by ``op`` into contiguous ``out``."""

    def iallgather(self, send: torch.Tensor, out: torch.Tensor, rows: list[int]) -> Request:
        """Concatenate every rank's ``send`` (``rows[r]`` rows) along dimension 0 into ``out``."""

    def ibcast(self, tensor: torch.Tensor, root: int) -> Request:
        """Overwrite contiguous ``tensor`` with ``root``'s."""

    def ialltoall(self, send: torch.Tensor, out: torch.Tensor, send_rows: list[int],
                  recv_rows: list[int], *, total: int) -> Request:
        """Send ``send_rows[r]`` rows of ``send`` (dimension 0, in order) to rank r; receive
        ``recv_rows[r]`` rows from rank r into ``out``, in rank order. ``total``: the rows all
        ranks send, the same on every rank, so that each chooses the same way to move them."""

    def isendrecv(self, send: torch.Tensor, out: torch.Tensor, peer: int) -> Request:
        """Send contiguous ``send`` to rank ``peer`` and receive its into contiguous ``out``
        (either may be empty; the peer's sizes mirror these)."""

    def ireducescatter(self, send: torch.Tensor, out: torch.Tensor, counts: list[int],
                       op: int) -> Request:
        """Reduce 1-d ``send`` by ``op``; rank r gets its ``counts[r]`` elements (in order)
        into ``out``."""

    def barrier(self) -> None: ...
    def bcast_object(self, obj: Any, root: int) -> Any: ...
    def allgather_object(self, obj: Any) -> list: ...

    def dup(self) -> Transport:
        """The same ranks, with traffic of their own (never matched with this one's)."""

    def split(self, ranks: list[int]) -> Transport | None:
        """A transport on ``ranks`` (this one's) for its members, None on the other ranks;
        every rank of the job calls it, with the same ranks."""

    def free(self) -> None: ...


def wait_all(requests: list[Request]) -> None:
    for r in requests:
        r.wait()


def test_all(requests: list[Request]) -> None:
    """Give every request a chance to progress (Open MPI progresses inside MPI calls only)."""
    for r in requests:
        r.test()


class _MPIRequest:
    __slots__ = ("_request",)

    def __init__(self, request: Any):
        self._request = request

    def wait(self) -> None:
        self._request.Wait()

    def test(self) -> bool:
        return self._request.Test()


class _MPIRequests:
    __slots__ = ("_requests",)

    def __init__(self, requests: list):
        self._requests = requests

    def wait(self) -> None:
        mpicomm.mpi().Request.Waitall(self._requests)

    def test(self) -> bool:
        return mpicomm.mpi().Request.Testall(self._requests)


class MPITransport:
    """mpi4py non-blocking collectives on a private duplicate of ``comm``.

    Device memory goes to MPI directly when the library is CUDA-aware (asked at run time) and
    takes it in non-blocking collectives (not Open MPI: :func:`mpi_takes_device_memory`);
    16-bit floats are reduced by a torch operation on the host, since MPI has no such type.
    """

    name = "mpi"

    def __init__(self, comm: Any):
        MPI = mpicomm.mpi()
        if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
            raise UsageError(f"comm must be an mpi4py intracommunicator or None, got "
                             f"{type(comm).__name__}")
        self.comm = comm.Dup()
        self.local_comm = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.comm.Get_rank())
        self.device_memory = mpi_takes_device_memory()

    def takes(self, tensor: torch.Tensor) -> bool:
        # The 16-bit reduction runs on the host; so must its buffers.
        return tensor.device.type == "cpu" or (self.device_memory and
                                               tensor.dtype not in HALF_TYPES)

    def size(self) -> int:
        return self.comm.Get_size()

    def rank(self) -> int:
        return self.comm.Get_rank()

    def local_size(self) -> int:
        return self.local_comm.Get_size()

    def local_rank(self) -> int:
        return self.local_comm.Get_rank()

    def iallreduce(self, send: torch.Tensor | None, out: torch.Tensor, op: int) -> Request:
        # In pieces of elements, matched in the order posted (MPI-3 counts are C ints).
        MPI = mpicomm.mpi()
        requests = []
        for piece in mpicomm.count_pieces(out.numel(), PIECE_ELEMENTS):
            out_buf, mpi_op = reduce_spec(out.detach().reshape(-1)[piece], op)
            send_buf = MPI.IN_PLACE if send is None else \
                reduce_spec(send.detach().reshape(-1)[piece], op)[0]
            requests.append(self.comm.Iallreduce(send_buf, out_buf, mpi_op))
        return _requests(requests)

    def iallgather(self, send: torch.Tensor, out: torch.Tensor, rows: list[int]) -> Request:
        row = _row_bytes(send)
        plan = parts.window_parts(rows if row else [0] * len(rows), MAX_COUNT, PIECE_ELEMENTS)
        if len(plan) == 1:
            return _MPIRequest(self.comm.Iallgatherv(
                [_bytes(send), len(send) if row else 0, _row_type(row)], _rows(out, rows, row)))
        # Windows of out's rows (parts.py): counts and displacements within each window.
        me, row_type = self.rank(), _row_type(row)
        return _requests([self.comm.Iallgatherv(
            [_bytes(send[p.offsets[me]:p.offsets[me] + p.counts[me]]), p.counts[me], row_type],
            [_bytes(out[p.start:p.stop]), list(p.counts), list(p.displs), row_type])
            for p in plan])

    def ibcast(self, tensor: torch.Tensor, root: int) -> Request:
        return _MPIRequests([self.comm.Ibcast(piece, root=root) for piece in _pieces(tensor)])

    def ialltoall(self, send: torch.Tensor, out: torch.Tensor, send_rows: list[int],
                  recv_rows: list[int], *, total: int) -> Request:
        # No rank's count, displacement or total of rows passes ``total``: what it keeps under
        # MAX_COUNT is one Ialltoallv; past it every rank (the same total) goes point to point.
        row = _row_bytes(send)
        if not row or total <= MAX_COUNT:
            return _MPIRequest(self.comm.Ialltoallv(_rows(send, send_rows, row),
                                                    _rows(out, recv_rows, row)))
        return self._alltoall_in_pieces(send, out, send_rows, recv_rows, row)

    def _alltoall_in_pieces(self, send: torch.Tensor, out: torch.Tensor, send_rows: list[int],
                            recv_rows: list[int], row: int) -> Request:
        """An alltoall past MPI-3's count: each peer's block in pieces of rows (parts.py's
        ``block_pieces``), one ``Irecv`` or ``Isend`` of the row datatype each; this rank's own
        block is copied. Messages of one tag between two ranks are matched in the order
        posted, and alltoalls start in the same order on every rank, as collectives do, so
        no piece meets another's receive, of this alltoall or the next; collectives never
        match point-to-point messages. Every buffer is made and the own block copied before
        the first is posted: nothing of this rank's can fail between its receives and its
        sends (posted receives left behind took the next alltoall's pieces, its peers hung)."""
        me, row_type = self.rank(), _row_type(row)
        piece = max(1, min(PIECE_ELEMENTS, PIECE_BYTES // row))
        recvs = [(peer, [_bytes(out[a:b]), b - a, row_type])
                 for peer, a, b in parts.block_pieces(recv_rows, piece) if peer != me]
        sends = [(peer, [_bytes(send[a:b]), b - a, row_type])
                 for peer, a, b in parts.block_pieces(send_rows, piece) if peer != me]
        own = send_rows[me]
        out.narrow(0, sum(recv_rows[:me]), own).copy_(send.narrow(0, sum(send_rows[:me]), own))
        requests = [self.comm.Irecv(buf, source=peer, tag=_ALLTOALL_TAG) for peer, buf in recvs]
        requests += [self.comm.Isend(buf, dest=peer, tag=_ALLTOALL_TAG) for peer, buf in sends]
        return _MPIRequests(requests)

    def isendrecv(self, send: torch.Tensor, out: torch.Tensor, peer: int) -> Request:
        # The peer's pieces mirror these; one tag's messages are matched in the order posted.
        return _MPIRequests(
            [self.comm.Irecv(piece, source=peer, tag=_SENDRECV_TAG) for piece in _pieces(out)]
            + [self.comm.Isend(piece, dest=peer, tag=_SENDRECV_TAG) for piece in _pieces(send)])

    def ireducescatter(self, send: torch.Tensor, out: torch.Tensor, counts: list[int],
                       op: int) -> Request:
        flat_send, flat_out = send.detach().reshape(-1), out.detach().reshape(-1)
        plan = parts.window_parts(counts, MAX_COUNT, PIECE_ELEMENTS)
        if len(plan) == 1:
            send_buf, mpi_op = reduce_spec(flat_send, op)
            out_buf, _ = reduce_spec(flat_out, op)
            return _MPIRequest(self.comm.Ireduce_scatter(send_buf, out_buf, counts, mpi_op))
        # Windows of send (parts.py): this rank's share of each is the next part of out.
        me, requests = self.rank(), []
        for p in plan:
            send_buf, mpi_op = reduce_spec(flat_send[p.start:p.stop], op)
            out_buf, _ = reduce_spec(
                flat_out[p.offsets[me]:p.offsets[me] + p.counts[me]], op)
            requests.append(self.comm.Ireduce_scatter(send_buf, out_buf, list(p.counts),
                                                      mpi_op))
        return _requests(requests)

    def barrier(self) -> None:
        self.comm.Barrier()

    def bcast_object(self, obj: Any, root: int) -> Any:
        # In parts (pkl5): a pickle past 2 GiB is refused whole by MPI-3 libraries.
        return pickled.large_messages(self.comm).bcast(obj, root=root)

    def allgather_object(self, obj: Any) -> list:
        return pickled.large_messages(self.comm).allgather(obj)

    def dup(self) -> MPITransport:
        return MPITransport(self.comm)

    def split(self, ranks: list[int]) -> MPITransport | None:
        MPI = mpicomm.mpi()
        me = self.rank()
        sub = self.comm.Split(0 if me in ranks else MPI.UNDEFINED, key=me)
        if sub == MPI.COMM_NULL:
            return None
        transport = MPITransport(sub)
        sub.Free()
        return transport

    def free(self) -> None:
        self.local_comm.Free()
        self.comm.Free()


def _requests(requests: list) -> Request:
    """One request for the calls of one operation."""
    return _MPIRequests(requests) if len(requests) > 1 else _MPIRequest(requests[0])


def reduce_spec(flat: torch.Tensor, op: int) -> tuple[Any, Any]:
    """mpi4py buffer of contiguous 1-d ``flat`` and the MPI op that reduces it by ``op``."""
    if flat.dtype in HALF_TYPES:  # MPI has no 16-bit float type: reduce the words with torch
        return mpi_buffer(flat.view(torch.int16)), _half_op(op, flat.dtype)
    if flat.dtype == torch.bool:
        raise UsageError("allreduce of torch.bool tensors is not supported; use an integer dtype")
    return mpi_buffer(flat), getattr(mpicomm.mpi(), _MPI_OPS[int(op)])


@functools.cache
def _half_op(op: int, dtype: torch.dtype) -> Any:
    combine = _TORCH_OPS[int(op)]

    def reduce(inbuf, inoutbuf, datatype) -> None:
        if not len(inoutbuf):  # Open MPI's ring and Rabenseifner allreduces hand a rank an
            return  # empty piece when there are fewer elements than ranks
        acc = torch.frombuffer(inoutbuf, dtype=dtype)
        combine(acc, torch.frombuffer(inbuf, dtype=dtype), out=acc)

    return mpicomm.mpi().Op.Create(reduce, commute=True)


def _displs(counts: list[int]) -> list[int]:
    return [sum(counts[:i]) for i in range(len(counts))]


def _bytes(tensor: torch.Tensor) -> Any:
    """A contiguous tensor's memory as bytes, for MPI."""
    return mpi_buffer(tensor.detach().reshape(-1).view(torch.uint8))


def _pieces(tensor: torch.Tensor) -> list:
    """A contiguous tensor's bytes in pieces of at most :data:`PIECE_BYTES` (one, maybe empty,
    below that): each piece's count stays a C int, which MPI-3 counts are."""
    flat = _bytes(tensor)
    return [flat[piece] for piece in mpicomm.count_pieces(len(flat), PIECE_BYTES)]


def _row_bytes(tensor: torch.Tensor) -> int:
    """Bytes of one row (dimension 0) of ``tensor``."""
    return math.prod(tensor.shape[1:]) * tensor.element_size()


def _rows(tensor: torch.Tensor, rows: list[int], row_bytes: int) -> list:
    """mpi4py's ``[buffer, counts, displacements, datatype]`` for ``rows[r]`` rows per rank,
    counted in rows: in bytes, a total past 2**31 - 1 would not fit MPI-3's C int counts."""
    counts = rows if row_bytes else [0] * len(rows)
    return [_bytes(tensor), counts, _displs(counts), _row_type(row_bytes)]


@functools.cache
def _row_type(row_bytes: int) -> Any:
    """The MPI datatype of a row of ``row_bytes`` bytes: made once per size (a run has a few)
    and kept, never freed under an operation that still uses it."""
    MPI = mpicomm.mpi()
    return MPI.BYTE if row_bytes <= 1 else MPI.BYTE.Create_contiguous(row_bytes).Commit()
