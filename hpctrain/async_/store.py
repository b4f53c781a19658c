"""The parameter store: a flat float32 model sharded over MPI windows, updated one-sidedly.

Shard ``s`` lives in its own window made with ``Win.Allocate(..., comm=comm)`` on host rank
``hosts[s % len(hosts)]``: a 64-byte header (the shard's update count, an int64, then two lock
words used on shared memory) followed by the shard's floats. A window of its own per shard
gives every shard its own exclusive lock. Hosts are all ranks (``servers=0``) or the last
``servers`` ranks, which then only host. A counter window on ``hosts[0]`` holds two int64: the
global update count (``Fetch_and_op``; a push's index, and ``atomic``'s staleness) and a
ticket count that loops use to hand out a fixed budget of pushes (:meth:`claim`;
:meth:`close_tickets` stops it).

``locked``: per shard, exclusive lock, Get count and values, fused update written straight into
the worker's model, Put both, unlock (serialisable; the counts give the lock order).
``atomic``: per shard, shared lock, ``Get_accumulate(NO_OP)`` read, fused delta,
``Accumulate(SUM)``; element-wise atomic, no lost update, no order between workers.

When all ranks share one node, and MPI's shared-memory windows there are in its unified memory
model (:func:`shares_memory`), the windows are shared memory (``Win.Allocate_shared``) and no
MPI call touches them after set-up: the locks are hpctrain's own (:mod:`hpctrain.async_.shm`,
a reader-writer lock word in each shard's header), since MPICH and Intel MPI grant MPI's
locks on shared memory only when the owner calls MPI. ``locked`` runs the fused update on the
shard in place under the exclusive lock, writing the worker's model too; ``atomic``'s kernel
reads the shard in place and its delta is added under the shard's accumulate lock (as Open
MPI's osc/sm does an Accumulate); the counters are CPU atomics.

Workers whose model is on a GPU (and CPU workers with ``in_place=False``) take the *staged*
path, the same in both modes: per shard, under the same lock, read the shard into host memory
(Get, or a copy from shared memory), copy it to the device, run the fused kernel there (the
CUDA kernel), copy the result back to (pinned) host memory and write it (``locked``: Put or a
copy into shared memory; ``atomic``: ``Accumulate`` of the delta). The worker's model then
holds the new values with no second pull. Windows stay in host memory: one-sided MPI on device
memory is not something every MPI library's RMA component does.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hpctrain import comm as hcomm
from hpctrain import kernels, watchdog
from hpctrain.async_ import shm
from hpctrain.errors import UsageError, on_every_rank, plural

CONSISTENCIES = ("locked", "atomic")
_HEADER = 64  # bytes in front of each shard: its update count (int64), then the lock words
_LOCK, _ACCUMULATE = 8, 16  # header offsets of the reader-writer and accumulate lock words
_COUNT = 8  # bytes of a shard's update count, as traffic counts it
_ALIGN = 16  # shard boundaries on multiples of 16 floats (64-byte lines)
_TAG_DONE = 1
CLOSED = 2 ** 62  # added to the ticket count by close_tickets: every later claim is past it


@dataclass(frozen=True)
class Push:
    """What one push did: its global update number, staleness, shard order, shard counts."""

    index: int  # updates completed before this one (the counter's value it fetched)
    tau: int  # staleness: other workers' updates the pushing model lacked (see ParameterStore.push)
    order: tuple[int, ...]  # shards in the order they were pushed
    versions: tuple[int, ...] | None  # locked: per shard in `order`, updates applied before


Shapes = tuple[tuple[int, ...], ...]
SHAPES_TAG = "_hpctrain_shapes"  # flatten_parameters's vector carries its parameters' shapes


def _flat_values(values: torch.Tensor | Sequence[torch.Tensor]
                 ) -> tuple[torch.Tensor, Shapes | None, str | None]:
    """The store's 1-D vector, where known the shapes of the parameters it holds, and the
    first listed tensor that is not float32 (or None): a sequence of tensors is concatenated
    (its shapes known), which would promote a float16 tensor among float32 ones silently and
    make a float64 model's parameters a float64 "vector" the user never passed; a vector is
    taken as it is (its shapes known if :func:`~hpctrain.async_.optim.flatten_parameters`
    made it)."""
    if isinstance(values, torch.Tensor):
        return values, getattr(values, SHAPES_TAG, None), None
    values = list(values)
    shapes = tuple(tuple(t.shape) for t in values)
    odd = next((f"tensor {i} of {len(values)} is {t.dtype}" for i, t in enumerate(values)
                if t.dtype != torch.float32), None)
    flat = torch.cat([t.detach().reshape(-1) for t in values]) if values else torch.empty(0)
    return flat, shapes, odd


def shapes_text(shapes: Shapes | None) -> str:
    """``shapes`` for an error message: listed when short, else counted with a digest (the
    allgather that compares them stays a few words per rank)."""
    if shapes is None:
        return "unknown (a flat vector)"
    text = " ".join(str(s) for s in shapes)
    if len(text) <= 120:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    return f"{len(shapes)} tensors, sha1 {digest}"


def _agree(comm, values: torch.Tensor, shapes: Shapes | None, odd: str | None = None,
           **arguments) -> None:
    """UsageError on every rank unless all of ``comm`` give the same vector size, type (or
    ``odd``, a listed tensor not float32: :func:`_flat_values`), parameter shapes and
    arguments. Before any window: a rank's shard sizes and the initial
    Bcast come from its own vector, so ranks that differ wrote past their buffers (a glibc
    abort) or met different collectives; ranks whose layers differ in shape but not in size
    trained on each other's values as garbage. One allgather of a few words; every rank judges
    the same list."""
    mine = {"ranks hold vectors of different sizes": str(values.numel()),
            "ranks hold vectors of different types":
                f"{odd or values.dtype} {tuple(values.shape)}",
            "ranks hold parameters of different shapes": shapes_text(shapes),
            **{f"ranks give different {k}": f"{k}={v!r}" for k, v in arguments.items()}}
    every = comm.allgather(mine)
    found = hcomm.first_difference(every)
    if found is not None:
        key, other = found
        raise on_every_rank(UsageError(f"ParameterStore: {key}: rank 0 {every[0][key]}, "
                                       f"rank {other} {every[other][key]}"))


def shares_memory(one_node: bool, model: str | None) -> bool:
    """Whether the store may read and write its windows in place: all ranks on one node, a
    shared-memory window made there (``model`` its memory model: "unified", "separate"; None
    if none could be made), and the unified model. Loads and stores on another rank's window
    memory, with no ``Win_sync`` between them, are well defined only there (MPI-3.1 11.4,
    Example 11.21); under ``MPI_WIN_SEPARATE`` they may read stale values."""
    return one_node and model == "unified"


def _shared_model(comm) -> str | None:
    """The memory model of a shared-memory window made over ``comm`` (collective), or None
    where MPI makes none (e.g. Open MPI's osc/pt2pt)."""
    MPI = hcomm.mpi()
    try:
        win = MPI.Win.Allocate_shared(8 if comm.Get_rank() == 0 else 0, 1, comm=comm)
    except MPI.Exception:
        return None
    model = "unified" if win.Get_attr(MPI.WIN_MODEL) == MPI.WIN_UNIFIED else "separate"
    win.Free()
    return model


def _can_share(comm, asked: bool | None = None) -> bool:
    """:func:`shares_memory` for ``comm``, the same answer on every rank. ``asked``: the
    store's ``shared_memory``; True where they cannot is one UsageError on every rank, before
    any window (taken on trust, the windows were made with ``Allocate_shared`` across nodes,
    or read in place under the separate model). None: rank 0 says why not where only the
    memory model stands in the way."""
    MPI = hcomm.mpi()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    one_node = node.Get_size() == comm.Get_size()
    node.Free()
    model = _shared_model(comm) if one_node else None  # the same test on every rank
    ok = comm.allreduce(shares_memory(one_node, model), op=MPI.LAND)
    if asked and not ok:
        why = ("its ranks are on more than one node" if not one_node else
               "this MPI makes no shared-memory window here" if model is None else
               "this MPI's shared-memory windows use the separate memory model "
               "(MPI_WIN_SEPARATE), where reading them in place is not defined"
               if model == "separate" else "not every rank can map the others' memory")
        raise on_every_rank(UsageError(
            f"ParameterStore: shared_memory=True, but {why}; leave it None to share memory "
            "where the ranks can"))
    if one_node and model == "separate" and comm.Get_rank() == 0:
        print("hpctrain: note: this MPI's shared-memory windows use the separate memory "
              "model (MPI_WIN_SEPARATE), where reading them in place is not defined: the "
              "parameter store moves its shards with Get and Put instead",
              file=sys.stderr, flush=True)
    return ok


@dataclass(frozen=True)
class _Mapped:
    """A shard's shared-memory window as this process maps it."""

    count: np.ndarray  # the int64 update count
    values: torch.Tensor  # the shard's floats
    base: int  # the window's address: the count's word (+ _LOCK, + _ACCUMULATE: the locks)


def _map(buffer) -> _Mapped:
    mem = np.frombuffer(buffer, dtype=np.uint8)
    return _Mapped(mem[:8].view(np.int64), torch.from_numpy(mem[_HEADER:].view(np.float32)),
                   buffer.address)


def _pieces(n: int) -> list[tuple[slice, tuple]]:
    """A shard's ``n`` floats in pieces of at most :data:`hpctrain.comm.COUNT_PIECE`, each
    with its target in the window (bytes past the header): one RMA call per piece, since an
    MPI-3 library such as Open MPI 4 refuses a count past 2**31 - 1 (a model that size in
    one shard: ``--servers 1`` with one worker)."""
    MPI = hcomm.mpi()
    return [(p, (_HEADER + 4 * p.start, len(range(n)[p]), MPI.FLOAT))
            for p in hcomm.count_pieces(n)]


def shard_bounds(numel: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous ``[lo, hi)`` ranges covering ``numel``, 16-float aligned if it can."""
    align = _ALIGN if numel >= _ALIGN * shards else 1
    units = -(-numel // align)
    cuts = [min(numel, (units * i // shards) * align) for i in range(shards + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(shards)]


# Each shard is an RMA window, one memory map per process (Linux allows 65530 by default: a
# store of 70,000 shards failed in MPI's shared-memory set-up) and one lock a push takes in
# turn; far fewer already make pushes lock-bound. --shards stops at this, or one per rank.
MAX_SHARDS = 4096
# MPICH and the libraries built on it (MVAPICH, Cray MPICH) give every communicator, and so
# every window, one of about 2048 context ids: MPICH 5.0.2 segfaulted making its 2047th
# window. The store's counter window, its Dup and worker_comm, ssp's clock window and the
# run's own communicators need some too: shards stop here there, however many ranks.
MPICH_MAX_SHARDS = 2000


def context_id_bound(library: str | None) -> bool:
    """Whether ``library`` (MPI's version string, None if unknown) is MPICH or built on it,
    so that its pool of communicator context ids bounds the store's windows (Open MPI and
    Intel MPI made 4200 and more)."""
    name = (library or "").upper()
    return "MPICH" in name or "MVAPICH" in name


def max_shards(library: str | None, ranks: int) -> tuple[int, str]:
    """The most shards a store over ``ranks`` ranks may make on ``library`` (MPI's version
    string, None if unknown), and why, for a refusal."""
    if library is not None and context_id_bound(library):
        name = " ".join(library.splitlines()[0].split())
        return MPICH_MAX_SHARDS, (f"each is an RMA window, and this MPI ({name}) runs out "
                                  "of communicator context ids, one per window, past about "
                                  "2040 of them")
    return max(MAX_SHARDS, ranks), "each is an RMA window"


def default_shards(workers: int, hosts: int, most: int | None = None) -> int:
    """At least one shard per worker (fewer lock convoys), the same number on every host;
    at most ``most`` (:func:`max_shards`): then as many as split evenly over the hosts, or
    ``most`` if they outnumber it (workers then share first shards, which the store
    allows)."""
    shards = hosts * -(-max(workers, hosts) // hosts)
    if most is None or shards <= most:
        return shards
    return hosts * (most // hosts) or most


class ParameterStore:
    """A flat float32 vector sharded over RMA windows; collective over ``comm`` to create.

    ``values``: the trainable parameters (``trainable(model)``; concatenated), or a 1-D
    float32 tensor of the model's size, on every rank; the store starts from rank ``root``'s
    values. Ranks whose sizes, parameter shapes (known from a list, or from
    :func:`~hpctrain.async_.optim.flatten_parameters`'s vector) or arguments differ raise one
    UsageError each (:func:`_agree`); a closed store's methods raise one too
    (:meth:`_check_open`), and a push after :meth:`finish` does.
    ``servers``: 0 (every rank hosts shards and works) or N (the last N ranks only host; they
    call :meth:`finish` right away and poll for progress there).
    ``shards``: number of shards (default :func:`default_shards`). ``poll_interval``: seconds a
    hosting rank sleeps between progress polls in :meth:`finish`. ``shared_memory``: make the
    windows with ``Win.Allocate_shared`` so that pulls, ``locked`` pushes and ``atomic`` pushes'
    reads work on the shard's memory in place (None: when all ranks share one node and the
    MPI's one-sided component can, in the unified memory model; otherwise ``Win.Allocate`` and
    Get/Put, in pieces of at most :data:`hpctrain.comm.COUNT_PIECE` floats; True where the
    ranks cannot is a UsageError on every rank). ``in_place``: CPU
    workers on shared memory run the kernel on the shard itself; False makes them read,
    compute and write back (the staged path GPU workers always take).
    """

    shapes: Shapes | None = None  # of the parameters held, where known (a class default:
    _finished = False  # the simulator's LocalStore does not run this __init__)

    def __init__(self, values: torch.Tensor | Sequence[torch.Tensor], comm=None, *,
                 servers: int = 0,
                 shards: int | None = None, consistency: str = "locked", root: int = 0,
                 poll_interval: float = 2e-4, shared_memory: bool | None = None,
                 in_place: bool = True):
        MPI = hcomm.mpi()
        comm = MPI.COMM_WORLD if comm is None else comm
        size, rank = comm.Get_size(), comm.Get_rank()
        values, self.shapes, odd = _flat_values(values)
        numel = values.numel()
        _agree(comm, values, self.shapes, odd, servers=servers, shards=shards,
               consistency=consistency, root=root, shared_memory=shared_memory)
        if consistency not in CONSISTENCIES:
            raise UsageError(f"unknown consistency {consistency!r}; choose from "
                             f"{', '.join(CONSISTENCIES)}")
        if not 0 <= servers < size:
            raise UsageError(f"servers={servers} with {plural(size, 'rank')}: need 0 <= "
                             "servers < ranks (at least one worker)")
        if odd is not None:  # the same on every rank (agreed): all raise
            raise UsageError(f"the store holds float32 parameters; {odd} (model.float() "
                             "converts a model)")
        if values.dtype != torch.float32 or values.dim() != 1 or numel == 0:
            raise UsageError("the store holds a non-empty 1-D float32 vector, got "
                             f"{values.dtype} of shape {tuple(values.shape)}")
        workers = size - servers
        self.hosts = list(range(workers, size)) if servers else list(range(size))
        most, why = max_shards(hcomm.library_name(MPI), size)
        if shards is None:
            shards = default_shards(workers, len(self.hosts), most)
        if not 1 <= shards <= numel:
            raise UsageError(f"shards={shards}: need 1 <= shards <= {numel} (the model's size)")
        if shards > most:
            raise UsageError(f"shards={shards}: at most {most} ({why})")
        if not 0 <= root < workers:
            raise UsageError(f"root={root} is not a worker rank (0..{workers - 1})")

        # None: as the ranks can; else its truth (a 0 or numpy False as False, not None)
        self.shared = (shared_memory is None or bool(shared_memory)) and \
            _can_share(comm, None if shared_memory is None else True)

        self.comm, self.rank, self.numel = comm, rank, numel
        self.consistency, self.poll_interval = consistency, poll_interval
        self.num_workers, self.is_worker = workers, rank < workers
        self.is_host = rank in self.hosts
        self.bounds = shard_bounds(numel, shards)
        self.owners = [self.hosts[s % len(self.hosts)] for s in range(shards)]
        self._ctl = comm.Dup()
        workers_comm = comm.Split(0 if self.is_worker else MPI.UNDEFINED, rank)
        self.worker_comm = workers_comm if self.is_worker else None
        allocate = MPI.Win.Allocate_shared if self.shared else MPI.Win.Allocate
        self.windows = [
            allocate(_HEADER + 4 * (hi - lo) if owner == rank else 0, 1, comm=comm)
            for (lo, hi), owner in zip(self.bounds, self.owners, strict=True)]
        self._counter = allocate(16 if rank == self.hosts[0] else 0, 8, comm=comm)
        self._initialize(values, root)
        # Shared memory: every shard's header and values, and the counters, mapped here
        # (none otherwise: only the shared-memory paths read them).
        self._mapped = [_map(win.Shared_query(owner)[0])
                        for win, owner in zip(self.windows, self.owners, strict=True)] \
            if self.shared else []
        self._counter_base = self._counter.Shared_query(self.hosts[0])[0].address \
            if self.shared else 0
        # This worker's first shard: workers spread over the shards to avoid lock convoys.
        first = (rank * shards) // workers if self.is_worker else 0
        self.order = tuple((first + i) % shards for i in range(shards))
        self.in_place = in_place
        self._cur = torch.empty(numel)  # host: shard values as read from the store
        self._delta = torch.zeros(numel) if consistency == "atomic" else None
        self._device: _DeviceStage | None = None  # a GPU worker's buffers (first push/pull)
        self._count = np.zeros(2, np.int64)  # a shard's count as read, and as written back
        self._one = np.ones(1, np.int64)
        self._operand = np.zeros(1, np.int64)  # Fetch_and_op's: 1 to count a push, 0 to read
        self._fetched = np.zeros(1, np.int64)
        self._none = np.zeros(1, np.float32)
        self._seen = 0  # the counter's value as of this worker's model
        # locked: each shard's update count as of this worker's model (its last pull read it,
        # its last push wrote it); a push's exact staleness comes from these
        self._model_counts = [0] * shards
        # Traffic, for run summaries: payload bytes this rank read from and wrote to the store
        # (shard values, shard counts, the counters), whether MPI moved them or the process
        # did with loads and stores on shared-memory windows; ``mpi_bytes``: the part that went
        # through MPI calls (Get, Put, Accumulate, Get_accumulate, Fetch_and_op). MPI's own
        # headers, lock and completion messages are not counted.
        self.bytes_read = self.bytes_written = self.mpi_bytes = 0
        k, h = numel, _COUNT * shards
        if consistency == "locked":  # read count and values, write both back
            self._push_traffic = (4 * k + h, 4 * k + h, 0 if self.shared else 8 * k + 2 * h)
        else:  # read values (in place when shared), Accumulate delta and count
            self._push_traffic = (4 * k, 4 * k + h, 0 if self.shared else 8 * k + h)

    @property
    def shards(self) -> int:
        return len(self.bounds)

    @property
    def last_delta(self) -> torch.Tensor | None:
        """``atomic``: the delta the last push accumulated (a view reused by the next push)."""
        return self._delta

    def _initialize(self, values: torch.Tensor, root: int) -> None:
        MPI = hcomm.mpi()
        start = np.array(values.detach().cpu().numpy(), dtype=np.float32)  # a copy: Bcast fills it
        for piece in hcomm.count_pieces(len(start)):  # MPI-3 counts are C ints
            self.comm.Bcast([start[piece], MPI.FLOAT], root=root)
        for win, owner, (lo, hi) in zip(self.windows, self.owners, self.bounds, strict=True):
            if owner == self.rank:
                win.Lock(self.rank, MPI.LOCK_EXCLUSIVE)
                mem = np.frombuffer(win, dtype=np.uint8)
                mem[:_HEADER] = 0  # count 0, locks free
                mem[_HEADER:].view(np.float32)[:] = start[lo:hi]
                win.Unlock(self.rank)
        counter_host = self.hosts[0]
        if self.rank == counter_host:
            self._counter.Lock(counter_host, MPI.LOCK_EXCLUSIVE)
            np.frombuffer(self._counter, dtype=np.int64)[:2] = 0
            self._counter.Unlock(counter_host)
        self.comm.Barrier()

    def pull(self, out: torch.Tensor) -> int:
        """Read the whole model into ``out`` (1-D float32, CPU or GPU); return the update count
        seen."""
        self._check_open("pull")
        self._check_buffer("out", out)
        if out.device.type != "cpu":  # through host memory
            stage = self._device_stage(out.device)
            seen = self.pull(stage.host)
            out.copy_(stage.host)
            return seen
        seen = self.updates()
        locked = self.consistency == "locked"
        for s in self.order:
            lo, hi = self.bounds[s]
            with self._holding(s, exclusive=False):
                count = self._read_shard(s, out[lo:hi], count=locked)
            if locked:
                self._model_counts[s] = count
        read = 4 * self.numel + (_COUNT * self.shards if locked else 0)
        self.bytes_read += read
        self.mpi_bytes += 0 if self.shared else read
        self._seen = seen
        return seen

    def push(self, w_bak: torch.Tensor, g: torch.Tensor, ms: torch.Tensor | None = None,
             v: torch.Tensor | None = None, *, lr: float, lam: float = 0.0,
             ms_decay: float = 0.95, weight_decay: float = 0.0, momentum: float = 0.0) -> Push:
        """Apply one DC-ASGD update computed at model ``w_bak`` with gradient ``g``.

        Shard by shard the current global ``w`` is read and ``w + d`` written (``locked``) or
        ``d`` accumulated (``atomic``), with ``d = -lr*(g' + lam_t*g'^2*(w - w_bak))``
        (see :mod:`hpctrain.kernels`; ``ms`` given: DC-ASGD-a; ``v`` given: momentum). ``w_bak``
        is left holding the updated values this worker computed (the newest it read plus its
        own step), ``ms`` and ``v`` their new values. Tensors: 1-D float32, the store's size,
        all on the CPU or all on one GPU (then the staged path runs the CUDA kernel).

        The returned ``tau`` (staleness) is, ``locked``, exact: the most updates by other
        workers that any shard took between this worker's read of it (its previous push or
        pull) and this push, from the counts the push reads under each shard's lock.
        ``atomic`` has no such order, so it counts the pushes finished (the global counter)
        since this worker's previous push or pull: off by the pushes in flight alongside.
        """
        self._check_open("push")
        if self._finished:
            raise UsageError("ParameterStore.push(): finish() ran, which says every rank's pushes "
                             "are in: push before finish() (pull() reads the final model)")
        if not self.is_worker:
            raise RuntimeError(f"rank {self.rank} is a server of this store; only workers push")
        for name, t in (("w_bak", w_bak), ("g", g), ("ms", ms), ("v", v)):
            if t is not None:
                self._check_buffer(name, t)
                if t.device != w_bak.device:
                    raise UsageError(f"store: {name} is on {t.device}, w_bak on {w_bak.device}")
        # Here, not in the kernel: the kernel runs under a lock, after the count was taken.
        kernels.check_rates(lr=lr, lam=lam, weight_decay=weight_decay)
        kernels.check_decays(ms=ms is not None, v=v is not None, ms_decay=ms_decay,
                             momentum=momentum)
        stage = self._stage(w_bak.device)
        staged = stage is not None or not (self.shared and self.in_place)
        # The kernel's threads as torch's: OpenMP's default is per thread, and a simulated
        # worker is a thread that torch.set_num_threads did not reach.
        hyper = {"lr": lr, "lam": lam, "ms_decay": ms_decay, "weight_decay": weight_decay,
                 "momentum": momentum, "threads": torch.get_num_threads()}
        locked = self.consistency == "locked"
        push_locked = self._push_locked if staged else self._push_locked_in_place
        push_atomic = self._push_atomic if staged else self._push_atomic_in_place
        versions: list[int] = []
        for s in self.order:
            lo, hi = self.bounds[s]
            part = (w_bak[lo:hi], g[lo:hi], None if ms is None else ms[lo:hi],
                    None if v is None else v[lo:hi])
            if locked:
                versions.append(push_locked(s, *part, hyper, stage))
            else:
                push_atomic(s, *part, hyper, stage)
        read, written, mpi = self._push_traffic
        self.bytes_read, self.bytes_written = self.bytes_read + read, self.bytes_written + written
        self.mpi_bytes += mpi
        index = self._fetch_add(1)
        if versions:
            tau = max(before - self._model_counts[s]
                      for s, before in zip(self.order, versions, strict=True))
            for s, before in zip(self.order, versions, strict=True):
                self._model_counts[s] = before + 1  # this push wrote the shard
        else:
            tau = index - self._seen
        self._seen = index + 1
        return Push(index, tau, self.order, tuple(versions) if versions else None)

    def _push_locked_in_place(self, s: int, w_bak, g, ms, v, hyper, stage) -> int:
        """Shared memory, CPU worker: one pass over the shard, the new values also in w_bak."""
        mapped = self._mapped[s]
        with self._holding(s, exclusive=True):
            before = int(mapped.count[0])
            mapped.count[0] = before + 1
            kernels.dc_update(mapped.values, g, w_bak, ms, v, out2=w_bak, **hyper)
        return before

    def _push_atomic_in_place(self, s: int, w_bak, g, ms, v, hyper, stage) -> None:
        """Shared memory, CPU worker: the kernel reads the shard in place, one pass fewer."""
        lo, hi = self.bounds[s]
        delta = self._atomic_delta()[lo:hi]
        with self._holding(s, exclusive=False):
            kernels.dc_delta(self._mapped[s].values, g, w_bak, ms, v, out=delta, w_out=w_bak,
                             **hyper)
            self._accumulate(s, delta)

    def _push_locked(self, s: int, w_bak, g, ms, v, hyper, stage) -> int:
        """Staged, under the exclusive lock: read count and shard, kernel where w_bak is,
        write both back."""
        lo, hi = self.bounds[s]
        host = self._cur[lo:hi]
        with self._holding(s, exclusive=True):
            before = self._read_shard(s, host, count=True)
            cur = host if stage is None else stage.values[lo:hi].copy_(host)
            kernels.dc_update(cur, g, w_bak, ms, v, out=w_bak, **hyper)
            new = w_bak if stage is None else host.copy_(w_bak)
            self._write(s, before + 1, new)
        return before

    def _push_atomic(self, s: int, w_bak, g, ms, v, hyper, stage) -> None:
        """Staged, under a shared lock: read the shard, delta where w_bak is, Accumulate it."""
        lo, hi = self.bounds[s]
        host, delta = self._cur[lo:hi], self._atomic_delta()[lo:hi]
        with self._holding(s, exclusive=False):
            self._read_shard(s, host)
            if stage is None:
                kernels.dc_delta(host, g, w_bak, ms, v, out=delta, w_out=w_bak, **hyper)
            else:
                cur = stage.values[lo:hi].copy_(host)
                kernels.dc_delta(cur, g, w_bak, ms, v, out=stage.delta[lo:hi], w_out=w_bak,
                                 **hyper)
                delta.copy_(stage.delta[lo:hi])
            self._accumulate(s, delta)

    @contextlib.contextmanager
    def _holding(self, s: int, exclusive: bool):
        """Shard ``s`` locked for the block and unlocked however it ends: an error inside (a
        CUDA or MPI one) raises on this rank and leaves no other rank waiting on the lock.
        A push it ends may have written some of its shards; the count of updates misses it."""
        self._lock(s, exclusive)
        try:
            yield
        finally:
            self._unlock(s, exclusive)

    def _lock(self, s: int, exclusive: bool) -> None:
        """Lock shard ``s``: hpctrain's own lock on shared memory, else MPI's on its window
        (an in-process store overrides it)."""
        if self.shared:
            shm.lock(self._mapped[s].base + _LOCK, exclusive)
            return
        MPI = hcomm.mpi()
        self.windows[s].Lock(self.owners[s], MPI.LOCK_EXCLUSIVE if exclusive else MPI.LOCK_SHARED)

    def _unlock(self, s: int, exclusive: bool) -> None:
        if self.shared:
            shm.unlock(self._mapped[s].base + _LOCK, exclusive)
            return
        self.windows[s].Unlock(self.owners[s])

    def _read_shard(self, s: int, host: torch.Tensor, count: bool = False) -> int:
        """Shard ``s``'s values into ``host``, and its update count if ``count`` (else 0);
        the caller holds the shard's lock."""
        if self.shared:
            host.copy_(self._mapped[s].values)
            return int(self._mapped[s].count[0]) if count else 0
        MPI = hcomm.mpi()
        win, owner = self.windows[s], self.owners[s]
        if count:
            win.Get([self._count[:1], MPI.INT64_T], owner, target=(0, 1, MPI.INT64_T))
        self._read(win, owner, host.numpy())
        win.Flush(owner)
        return int(self._count[0]) if count else 0

    def _write(self, s: int, count: int, values: torch.Tensor) -> None:
        """Shard ``s``'s new count and values (the caller holds its exclusive lock)."""
        if self.shared:
            self._mapped[s].count[0] = count
            self._mapped[s].values.copy_(values)
            return
        MPI = hcomm.mpi()
        win, owner = self.windows[s], self.owners[s]
        self._count[1] = count
        win.Put([self._count[1:], MPI.INT64_T], owner, target=(0, 1, MPI.INT64_T))
        buf = values.numpy()
        for piece, target in _pieces(len(buf)):
            win.Put([buf[piece], MPI.FLOAT], owner, target=target)

    def _accumulate(self, s: int, delta: torch.Tensor) -> None:
        """Add ``delta`` to shard ``s`` and one to its count, element-wise atomically."""
        if self.shared:
            mapped = self._mapped[s]
            shm.accumulate(mapped.base + _ACCUMULATE, mapped.values, delta, mapped.base)
            return
        MPI = hcomm.mpi()
        win, owner = self.windows[s], self.owners[s]
        buf = delta.numpy()
        for piece, target in _pieces(len(buf)):
            win.Accumulate([buf[piece], MPI.FLOAT], owner, target=target, op=MPI.SUM)
        win.Accumulate([self._one, MPI.INT64_T], owner, target=(0, 1, MPI.INT64_T), op=MPI.SUM)

    def _atomic_delta(self) -> torch.Tensor:
        """``atomic``'s host delta buffer, which an ``atomic`` store always has."""
        assert self._delta is not None, "only an atomic store accumulates a delta"
        return self._delta

    def _stage(self, device: torch.device) -> _DeviceStage | None:
        """A GPU worker's device buffers and pinned host buffer (None on the CPU)."""
        return None if device.type == "cpu" else self._device_stage(device)

    def _device_stage(self, device: torch.device) -> _DeviceStage:
        """:meth:`_stage` for ``device``, a GPU."""
        if self._device is None or self._device.values.device != device:
            self._device = _DeviceStage(self.numel, device, self.consistency == "atomic")
            self._cur = self._cur.pin_memory()
            if self._delta is not None:
                self._delta = self._delta.pin_memory()
        return self._device

    def _read(self, win, owner: int, buf: np.ndarray) -> None:
        """Read a shard's values through MPI (not shared memory), in pieces (:func:`_pieces`)
        that the caller's one Flush completes before any Put; atomic mode reads with an
        accumulate (writers accumulate)."""
        MPI = hcomm.mpi()
        for piece, target in _pieces(len(buf)):
            if self.consistency == "atomic":
                win.Get_accumulate([self._none, 0, MPI.FLOAT], [buf[piece], MPI.FLOAT], owner,
                                   target=target, op=MPI.NO_OP)
            else:
                win.Get([buf[piece], MPI.FLOAT], owner, target=target)

    def _fetch_add(self, value: int, slot: int = 0) -> int:
        self.bytes_read += 8
        self.bytes_written += 8 if value else 0
        if self.shared:
            return shm.fetch_add(self._counter_base + 8 * slot, value)
        MPI = hcomm.mpi()
        host = self.hosts[0]
        self._operand[0] = value
        self._counter.Lock(host, MPI.LOCK_SHARED)
        self._counter.Fetch_and_op([self._operand, MPI.INT64_T], [self._fetched, MPI.INT64_T],
                                   host, slot, op=MPI.SUM if value else MPI.NO_OP)
        self._counter.Unlock(host)
        self.mpi_bytes += 16 if value else 8
        return int(self._fetched[0])

    def _add_below(self, value: int, limit: int, slot: int) -> bool:
        """Add ``value`` to counter ``slot`` unless it holds ``limit`` or more, atomically with
        respect to every :meth:`_fetch_add`; whether it did. Shared memory: compare-and-swap;
        else the read and the add in one exclusive-lock epoch (Open MPI 4.1's osc/rdma
        crashes in ``Compare_and_swap`` over its tcp and vader transports)."""
        self.bytes_read += 8
        if self.shared:
            word = self._counter_base + 8 * slot
            while (count := shm.fetch_add(word, 0)) < limit:
                if shm.compare_swap(word, count, count + value) == count:
                    self.bytes_written += 8
                    return True
            return False
        MPI = hcomm.mpi()
        host = self.hosts[0]
        self._counter.Lock(host, MPI.LOCK_EXCLUSIVE)
        self._counter.Fetch_and_op([self._operand, MPI.INT64_T], [self._fetched, MPI.INT64_T],
                                   host, slot, op=MPI.NO_OP)
        self._counter.Flush(host)
        below = self._fetched[0] < limit
        if below:
            self._operand[0] = value
            self._counter.Accumulate([self._operand, MPI.INT64_T], host, slot, op=MPI.SUM)
            self.bytes_written += 8
        self._counter.Unlock(host)
        self.mpi_bytes += 16 if below else 8
        return bool(below)

    def updates(self) -> int:
        """The number of global updates so far."""
        self._check_open("updates")
        return self._fetch_add(0)

    def claim(self) -> int:
        """Take the next ticket (0, 1, 2, ... over all workers; atomic ``Fetch_and_op``).

        A loop with a budget of ``n`` pushes lets a worker push only with a ticket below
        ``n``: claimed before the step, the budget holds exactly, where checking
        :meth:`updates` before pushing lets every other worker's push in flight through.
        """
        self._check_open("claim")
        return self._fetch_add(1, slot=1)

    def close_tickets(self, budget: int) -> bool:
        """Hand out no more tickets: every later :meth:`claim` returns :data:`CLOSED` or more
        (a SIGUSR1 stop, :mod:`hpctrain.checkpoint.stop`). Unless all ``budget`` tickets are
        out already (False, nothing changed): a claim past the budget then still says that
        the work is done."""
        self._check_open("close_tickets")
        return self._add_below(CLOSED, budget, slot=1)

    def shard_updates(self) -> list[int]:
        """Updates applied to each shard so far."""
        self._check_open("shard_updates")
        if self.shared:
            return [int(shm.load(m.base, self._count[:1])[0]) for m in self._mapped]
        MPI = hcomm.mpi()
        counts = []
        for win, owner in zip(self.windows, self.owners, strict=True):
            win.Lock(owner, MPI.LOCK_SHARED)
            win.Get_accumulate([self._none, 0, MPI.INT64_T], [self._count[:1], MPI.INT64_T],
                               owner, target=(0, 1, MPI.INT64_T), op=MPI.NO_OP)
            win.Unlock(owner)
            counts.append(int(self._count[0]))
        return counts

    def finish(self) -> None:
        """Collective over ``comm``: workers say they are done; hosts serve until all are.

        A hosting rank polls (``Iprobe``, then a short sleep) so that one-sided operations on
        its windows progress where no hardware does it for them.
        """
        self._check_open("finish")
        self._finished = True
        MPI = hcomm.mpi()
        requests = [self._ctl.Isend([self._none, 0, MPI.FLOAT], host, _TAG_DONE)
                    for host in (self.hosts if self.is_worker else [])]
        done = 0
        while self.is_host and done < self.num_workers:
            watchdog.beat("serving the store")
            if self._ctl.Iprobe(MPI.ANY_SOURCE, _TAG_DONE):
                self._ctl.Recv([self._none, 0, MPI.FLOAT], MPI.ANY_SOURCE, _TAG_DONE)
                done += 1
            else:
                time.sleep(self.poll_interval)
        MPI.Request.Waitall(requests)
        self.comm.Barrier()

    def close(self) -> None:
        """Collective over ``comm``: free the windows and communicators. Closing a closed
        store does nothing: freeing its windows again was an MPI error that aborted the job."""
        if not self.windows:
            return
        windows, self.windows = self.windows, []  # closed, even if a Free below raises
        self._mapped = []  # views of window memory must not outlive it
        for win in windows:
            win.Free()
        self._counter.Free()
        self._ctl.Free()
        if self.worker_comm is not None:
            self.worker_comm.Free()

    def _check_open(self, method: str) -> None:
        """UsageError once :meth:`close` ran: the shard and counter memory is freed, and a
        read of it crashed (shared memory) or a write corrupted the heap. ``windows`` is the
        mark (a store has at least one shard), as the simulator's store keeps it too."""
        if not self.windows:
            raise UsageError(f"ParameterStore.{method}(): the parameter store is closed")

    def __enter__(self) -> ParameterStore:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # After an error, no collective: the other ranks may never reach it (the job aborts).
        if exc_type is None:
            self.close()

    def _check_buffer(self, name: str, t: torch.Tensor) -> None:
        if t.dtype != torch.float32 or t.device.type not in ("cpu", "cuda") \
                or not t.is_contiguous() or t.numel() != self.numel:
            raise UsageError(f"store: {name} must be a contiguous float32 CPU or CUDA vector of "
                             f"{self.numel} elements, got {t.dtype} {tuple(t.shape)} on {t.device}")


class _DeviceStage:
    """A GPU worker's device copies: the shard values read, and (atomic) the delta."""

    def __init__(self, numel: int, device: torch.device, atomic: bool):
        self.values = torch.empty(numel, device=device)
        self.delta = torch.empty(numel, device=device) if atomic else None
        self.host = torch.empty(numel, pin_memory=True)  # a pull's landing place
