"""An in-process communicator for virtual workers: the mpi4py ``Intracomm`` methods hpctrain
calls, over K workers that are threads of one process.

Each virtual worker gets a :class:`LocalComm` of its rank; all of them share one
:class:`LocalGroup`. The aggregators (:mod:`hpctrain.ec`), the evaluation and the training
loop call the same methods they call on ``MPI.COMM_WORLD`` (or on
:class:`hpctrain.torch_comm.TorchComm`): ``Get_rank``, ``Get_size``, ``Barrier``, ``bcast``,
``gather``, ``allgather``, ``scatter``, and on numpy buffers ``Bcast``, ``Allreduce`` (sum),
``Iallreduce`` (the same, complete when it returns: model averaging waits for it at once),
``Allgatherv`` and ``Reduce_scatter`` (sum); and ``Adasum`` (ssgd's ``--reduce-op adasum``);
``Dup`` and the non-blocking ``Ibcast`` (whose request has ``Test`` and ``Wait``), with which
asynchronous workers receive rank 0's ``--stop-on-collapse`` signal.
A collective is complete when every worker has reached it: the last to arrive computes the
result (deterministically: ``Allreduce`` adds in the order of Open MPI's non-blocking
allreduce, ``Reduce_scatter`` in rank order), and every worker continues at the latest
arrival plus the collective's time from the network model (:mod:`hpctrain.sim.network`).
Objects passed to the object collectives are handed over, not copied: hpctrain's callers
only read them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from hpctrain.sim.network import Network
from hpctrain.sim.scheduler import Scheduler
from hpctrain.sync import adasum

if TYPE_CHECKING:
    from hpctrain.sim.simulate import Simulation


@dataclass
class _Pending:
    name: str
    workers: int
    values: list = field(default_factory=list)
    arrivals: list = field(default_factory=list)
    arrived: int = 0
    results: list | None = None

    def __post_init__(self) -> None:
        self.values = [None] * self.workers
        self.arrivals = [0.0] * self.workers


class LocalGroup:
    """What the K virtual workers' communicators share: the scheduler, the network model,
    and the collective in progress. ``infer_s_per_sample``: virtual seconds a worker takes to
    run its model on one sample in an EC exchange (0: free)."""

    simulation: Simulation  # the Simulation that made it sets it (a dup takes it along)

    def __init__(self, scheduler: Scheduler, network: Network, infer_s_per_sample: float = 0.0):
        self.scheduler, self.network = scheduler, network
        self.workers = scheduler.workers
        self.infer_s_per_sample = infer_s_per_sample
        self.pending: _Pending | None = None
        # Ibcast: the n-th broadcast root posted (its virtual time and data), and the workers
        # blocked in Wait for it.
        self.posted: dict[int, tuple[float, np.ndarray]] = {}
        self.post_waiters: dict[int, set[int]] = {}
        self.comms = [LocalComm(self, k) for k in range(self.workers)]


class LocalComm:
    """Virtual worker ``rank``'s communicator (see the module docstring)."""

    def __init__(self, group: LocalGroup, rank: int):
        self.group, self.rank = group, rank
        self.collective_s = 0.0  # virtual seconds in collectives: waiting, moving, inferring
        self.inference_s = 0.0  # the part spent running the model in EC exchanges
        self._ibcasts = 0  # Ibcasts this worker has started (the n-th matches root's n-th)

    # ---- mpi4py's names -----------------------------------------------------------------------

    def Get_rank(self) -> int:  # noqa: N802 (mpi4py's name)
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.group.workers

    def Barrier(self) -> None:  # noqa: N802
        self._collective("Barrier", None, lambda v: [None] * len(v),
                         lambda v: self._net.barrier(self._k))

    def bcast(self, obj, root: int = 0):
        return self._collective("bcast", obj, lambda v: [v[root]] * len(v),
                                lambda v: self._net.barrier(self._k))

    def gather(self, obj, root: int = 0):
        return self._collective("gather", obj,
                                lambda v: [list(v) if r == root else None for r in range(len(v))],
                                lambda v: self._net.barrier(self._k))

    def allgather(self, obj) -> list:
        return self._collective("allgather", obj, lambda v: [list(v) for _ in v],
                                lambda v: self._net.barrier(self._k))

    def scatter(self, parts, root: int = 0):
        return self._collective("scatter", parts, lambda v: list(v[root]),
                                lambda v: self._net.barrier(self._k))

    def Bcast(self, buf, root: int = 0) -> None:  # noqa: N802
        array = _array(buf)

        def combine(v):
            for r, a in enumerate(v):
                if r != root:
                    np.copyto(a, v[root])
            return [None] * len(v)

        self._collective("Bcast", array, combine,
                         lambda v: self._net.broadcast(array.nbytes, self._k))

    def Allreduce(self, sendbuf, recvbuf, op=None) -> None:  # noqa: N802 (a sum)
        mpi = sys.modules.get("mpi4py.MPI")  # imported by whoever passes MPI.SUM
        if op is not None and (mpi is None or op != mpi.SUM):
            raise NotImplementedError("the simulator's Allreduce sums (op=MPI.SUM), as "
                                      "hpctrain's algorithms use it")
        send, recv = _array(sendbuf), _array(recvbuf)
        total = self._collective("Allreduce", send, _pairwise_sum,
                                 lambda v: self._net.allreduce(send.nbytes, self._k))
        np.copyto(recv, total)

    def Iallreduce(self, sendbuf, recvbuf, op=None) -> _Completed:  # noqa: N802
        """:meth:`Allreduce`, done on return (as the real one is after ``Wait``)."""
        self.Allreduce(sendbuf, recvbuf, op)
        return _Completed()

    def Adasum(self, sendbuf, recvbuf, counts: list[int]) -> None:  # noqa: N802
        """Not mpi4py's: the Adasum of every worker's float buffer (fused from tensors of
        ``counts`` elements), up Horovod's tree; costed as an allreduce of the same bytes
        (vector halving, distance doubling moves what Rabenseifner's allreduce moves)."""
        send, recv = _array(sendbuf), _array(recvbuf)

        def combine(v):
            total = adasum.tree([torch.from_numpy(a) for a in v], counts).numpy()
            return [total] * len(v)

        total = self._collective("Adasum", send, combine,
                                 lambda v: self._net.allreduce(send.nbytes, self._k))
        np.copyto(recv, total)

    def Allgatherv(self, sendbuf, recvbuf) -> None:  # noqa: N802
        send = _array(sendbuf)
        out = _array(recvbuf)
        per_row = self.group.infer_s_per_sample

        def inferring(v) -> float:
            # After the gather every worker runs its model on all samples (EC's ensemble).
            return per_row * sum(len(a) for a in v)

        gathered = self._collective(
            "Allgatherv", send, lambda v: [np.concatenate(v)] * len(v),
            lambda v: self._net.ring(sum(a.nbytes for a in v), self._k) + inferring(v),
            infer=inferring)
        np.copyto(out[:len(gathered)], gathered)

    def Reduce_scatter(self, sendbuf, recvbuf, recvcounts) -> None:  # noqa: N802 (sum)
        send, recv = _array(sendbuf), _array(recvbuf)
        counts = list(recvcounts)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)

        def combine(v):
            total = _sum(v)[0]
            return [total[offsets[r]:offsets[r + 1]] for r in range(len(v))]

        mine = self._collective("Reduce_scatter", send, combine,
                                lambda v: self._net.ring(send.nbytes, self._k))
        np.copyto(recv, mine)

    def Dup(self) -> LocalComm:  # noqa: N802
        """A communicator of its own over the same workers (collective, costed as a
        barrier, as MPI's Comm_dup)."""
        g = self.group

        def combine(v):
            dup = LocalGroup(g.scheduler, g.network, g.infer_s_per_sample)
            dup.simulation = getattr(g, "simulation", None)
            return list(dup.comms)

        return self._collective("Dup", None, combine, lambda v: self._net.barrier(self._k))

    def Ibcast(self, buf, root: int = 0) -> _Request:  # noqa: N802
        """Non-blocking broadcast of a small buffer: this worker's n-th Ibcast receives root's
        n-th. Root posts it at its virtual time (no wait); another worker's request completes
        once its own clock has reached that time (``Test``), or waits for it (``Wait``)."""
        array = _array(buf)
        g, sched, k = self.group, self.group.scheduler, self.rank
        n, self._ibcasts = self._ibcasts, self._ibcasts + 1
        if k != root:
            return _Request(self, n, array)
        sched.at(k, sched.now[k])  # in time order with everything else this worker does
        g.posted[n] = (sched.now[k], array.copy())
        for j in sorted(g.post_waiters.pop(n, ())):
            sched.wake(j, sched.now[k])
        return _Request(self, n, None)

    def Free(self) -> None:  # noqa: N802
        pass

    # ---- the mechanism -------------------------------------------------------------------------

    @property
    def _net(self) -> Network:
        return self.group.network

    @property
    def _k(self) -> int:
        return self.group.workers

    def _collective(self, name: str, value, combine: Callable[[list], list],
                    cost: Callable[[list], float], infer: Callable[[list], float] | None = None):
        g, sched, k = self.group, self.group.scheduler, self.rank
        sched.at(k, sched.now[k])  # in time order with everything else this worker does
        c = g.pending
        if c is None:
            c = g.pending = _Pending(name, g.workers)
        elif c.name != name:
            raise RuntimeError(f"simulated collectives out of step: worker {k} calls {name} "
                               f"while others are in {c.name}")
        c.values[k], c.arrivals[k] = value, sched.now[k]
        c.arrived += 1
        if c.arrived < g.workers:
            sched.block(k)
        else:
            g.pending = None
            c.results = combine(c.values)
            spent = cost(c.values)
            done = max(c.arrivals) + spent
            inferred = infer(c.values) if infer is not None else 0.0
            for j, comm in enumerate(g.comms):
                comm.collective_s += done - c.arrivals[j]
                comm.inference_s += inferred
                sched.wake(j, done)
            sched.block(k)  # woken above: continues in (time, worker) order
        assert c.results is not None  # the last to arrive combined them before waking any
        return c.results[k]


class _Request:
    """A simulated Ibcast's request (see :meth:`LocalComm.Ibcast`); ``buf`` None: root's."""

    def __init__(self, comm: LocalComm, n: int, buf: np.ndarray | None):
        self.comm, self.n, self.buf = comm, n, buf
        self.done = buf is None

    def Test(self) -> bool:  # noqa: N802
        if self.done:
            return True
        g, sched, k = self.comm.group, self.comm.group.scheduler, self.comm.rank
        sched.at(k, sched.now[k])
        posted = g.posted.get(self.n)
        if posted is None or posted[0] > sched.now[k]:  # not sent, or not arrived by now
            return False
        assert self.buf is not None  # done from the start without one (root's)
        np.copyto(self.buf, posted[1])
        self.done = True
        return True

    def Wait(self) -> None:  # noqa: N802
        g, sched, k = self.comm.group, self.comm.group.scheduler, self.comm.rank
        while not self.Test():
            posted = g.posted.get(self.n)
            if posted is not None:  # sent at a later virtual time: this worker waits till then
                sched.at(k, posted[0])
            else:
                g.post_waiters.setdefault(self.n, set()).add(k)
                sched.block(k)


class _Completed:
    """The request of a simulated collective that completed in the call."""

    def Test(self) -> bool:  # noqa: N802
        return True

    def Wait(self) -> None:  # noqa: N802
        pass


def _array(buf) -> np.ndarray:
    """The numpy array of an mpi4py-style buffer argument (an array, or [array, ...])."""
    if isinstance(buf, (list, tuple)):
        buf = buf[0]
    if not isinstance(buf, np.ndarray):
        raise TypeError(f"simulated collectives take numpy buffers, not {type(buf).__name__}")
    return buf


def _pairwise_sum(values: list[np.ndarray]) -> list[np.ndarray]:
    """The element-wise sum in recursive-doubling order, the same array for every rank.

    The order of Open MPI 4.1's non-blocking allreduce as hpctrain sets libnbc up
    (Rabenseifner's; measured, K = 2 to 8, 4 B to 4 MB), through which ssgd's mpi backend and
    model averaging reduce: the first ``2 * extra`` ranks fold pairwise to a power of two, then
    neighbours add pairwise. Adding in the order the real run adds makes a simulated ssgd or ma
    run round as the real one. Not modelled: libnbc's order for fewer elements than the
    largest power of two <= K (a buffer of under K values), nor the blocking
    ``MPI_Allreduce``'s, which on 3 ranks adds 4-247 KB in another order.
    """
    power = 1 << (len(values).bit_length() - 1)
    extra = len(values) - power
    level = [values[i] + values[i + 1] for i in range(0, 2 * extra, 2)] + values[2 * extra:]
    while len(level) > 1:
        level = [level[i] + level[i + 1] for i in range(0, len(level), 2)]
    # Every addition makes a new array; only a single worker's sum would alias its input.
    return [level[0] if len(values) > 1 else values[0].copy()] * len(values)


def _sum(values: list[np.ndarray]) -> list[np.ndarray]:
    """The element-wise sum in rank order (deterministic), the same array for every rank."""
    total = values[0].copy()
    for v in values[1:]:
        total += v
    return [total] * len(values)
