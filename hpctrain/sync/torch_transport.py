"""``--sync-backend torch``: hpctrain's collectives on ``torch.distributed`` (NCCL and gloo).

The process group is set up from the MPI world when there is one (its rank and size, and a
rendezvous address that rank 0 broadcasts over MPI), or from torchrun's environment
(``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``) when there is none; a group the user's script
initialised already is used as it is. CUDA tensors go through NCCL and CPU tensors through
gloo (``cpu:gloo,cuda:nccl``), unless two ranks on one node share a GPU, which one NCCL
communicator cannot hold (NCCL >= 2.5: "Duplicate GPU detected"), or a rank cannot use NCCL:
then the group is gloo alone (:func:`backend_for`, on every rank's view of its node and GPUs,
gathered over MPI or, under torchrun, through torch's rendezvous store, so that every rank
chooses alike), and :meth:`TorchTransport.takes` declines CUDA tensors, which the caller stages
through pinned host memory (:class:`hpctrain.devices.HostStage`) as for a host-only MPI.

torch.distributed makes a group on every rank of the job at once (``new_group``), so
:meth:`TorchTransport.split` (a process set, registered by every rank) makes two groups: the
set's, and a spare that the set's one ``DistributedOptimizer`` takes through ``dup()``.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import math
import os
import pickle
import socket
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from hpctrain import comm as mpicomm
from hpctrain import options
from hpctrain.devices import local_rank, nccl_available, shares_gpus, visible_gpus
from hpctrain.errors import UsageError, on_every_rank
from hpctrain.sync.transport import MAX, MIN, PRODUCT, SUM, Request

_OPS = {SUM: dist.ReduceOp.SUM, MIN: dist.ReduceOp.MIN, MAX: dist.ReduceOp.MAX,
        PRODUCT: dist.ReduceOp.PRODUCT}
# Integer types gloo and NCCL have no type for: moved as their bytes (_raw), and reduced in
# int64 (_wide), which holds every 16- and 32-bit value (uint64 is refused for reductions).
# (torch.uint16 and wider came with torch 2.3.)
_UNTYPED = tuple(getattr(torch, t) for t in ("int16", "uint16", "uint32", "uint64")
                 if hasattr(torch, t))
# gloo took bfloat16 from torch 2.2 (torch 2.1: "Invalid scalar type"): moved as its bytes
# and reduced in float32 before that.
if torch.torch_version.TorchVersion(torch.__version__) < "2.2":
    _UNTYPED += (torch.bfloat16,)
# The tensors lent to each operation (_lend) that a work of torch.distributed may still hold.
_LENT: list[tuple[torch.Tensor, ...]] = []
_LENT_LOCK = threading.Lock()  # a CUDA parameter's gradient hook lends from autograd's thread
# Tensor._use_count tells when no work holds a lent tensor any more; a torch without it
# keeps the last operations' tensors instead: more than a group has worker threads (gloo's
# two), each holding at most the one operation it runs.
_COUNTS_USES = hasattr(torch.Tensor, "_use_count")
_WINDOW = 16
_SETTLE_S = 1.0  # at most this long, at shutdown and exit, for the workers to let go:
# they do within milliseconds of an operation's end; a tensor Python itself still holds (a
# work never waited for) keeps the count up for the whole wait, and Python drops it later


def _lend(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Aliases of ``tensors`` (sharing their memory) to hand to one torch.distributed
    operation, which Python holds until no work holds them, so that Python's thread, not a
    worker's, drops the last reference to them.

    A tensor whose last reference goes in a worker thread (gloo's runLoop) needs the GIL
    there (its Python object, or a ``frombuffer`` storage): at interpreter exit that aborted
    the process ("terminate called without an active exception"), and before torch 2.8 a
    group's destructor, which joins its workers holding the GIL, hung. Destroying the groups
    first does not end their workers where something else still holds a group:
    torch.distributed.nn.functional, which ``torch.optim`` imports with Dynamo, takes the
    default group as a default argument when it is imported after init. So each operation
    gets aliases only this module knows, which no work holds any more once :func:`_held`
    says so. Call it once per operation, after the previous operation was started (it forgets the
    settled ones first)."""
    aliases = [t.detach() for t in tensors]
    with _LENT_LOCK:
        _forget_settled()
        _LENT.append(tuple(aliases))
    return aliases


def _held(lent: tuple[torch.Tensor, ...]) -> bool:
    """Whether a work may still hold one of ``lent``'s tensors: its use count, or (torch >=
    2.9) the reference to its Python object that C++ holds while the count is above 1 and
    gives back just after the count drops, in the worker's thread, with the GIL. A tensor
    forgotten between the two (at exit: finalizing) aborted the process the same way."""
    return any(t._use_count() > 1  # type: ignore[attr-defined]  # private, not in the stubs
               or sys.getrefcount(t) > _FREE_REFS for t in lent)


# What sys.getrefcount says in _held of a tensor only a tuple holds (the tuple, the loop's
# name, the call's argument), measured the same way.
_FREE_REFS = max(sys.getrefcount(t) for t in (torch.empty(0),))


def _forget_settled() -> None:
    if _COUNTS_USES:
        _LENT[:] = [lent for lent in _LENT if _held(lent)]
    elif len(_LENT) >= _WINDOW:
        del _LENT[:len(_LENT) - _WINDOW + 1]


def settle(timeout_s: float = _SETTLE_S) -> None:
    """Wait up to ``timeout_s`` until no work holds a lent tensor (at shutdown, and at exit
    for groups the script or the training loop leave running); where the use count is
    unknown, forget the last operations' tensors, as before."""
    if not _COUNTS_USES:
        with _LENT_LOCK:
            _LENT.clear()
        return
    deadline = time.monotonic() + timeout_s
    while True:
        with _LENT_LOCK:
            _forget_settled()
            if not _LENT or time.monotonic() > deadline:
                return
        time.sleep(0.001)


if _COUNTS_USES:
    atexit.register(settle)


def _raw(t: torch.Tensor) -> torch.Tensor:
    """A contiguous ``t`` of an untyped dtype as its bytes (a view, rows kept as the first
    dimension, so that row counts and writes stay those of ``t``); other tensors as given."""
    if t.dtype not in _UNTYPED:
        return t
    rows = t.shape[0] if t.dim() else 1
    cols = math.prod(t.shape[1:]) if t.dim() else 1  # not -1: no rows would give width 0
    return t.reshape(rows, cols).view(torch.uint8)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` to reduce an untyped dtype in: int64, float32 for bfloat16."""
    if t.dtype == getattr(torch, "uint64", None):
        raise UsageError("backend 'torch': reducing torch.uint64 tensors is not supported "
                         "(gloo and NCCL have no such type); use the mpi backend")
    return t.to(torch.float32 if t.is_floating_point() else torch.int64)


def release(world: TorchTransport) -> None:
    """At shutdown: free every transport made from another (``dup``, ``split``) and not freed
    yet, then ``world`` (whose default group, if it owns it, takes every group with it), then
    wait until the workers let go of what :func:`_lend` lent them. A DistributedOptimizer's
    own transport (``dup``) has no other owner to free it: its group and the group's worker
    threads lived on to interpreter exit. The loop's own transport under torchrun
    (:class:`hpctrain.torch_comm.TorchComm`) is made from none and stays."""
    for transport in list(_DERIVED):
        transport.free()
    world.free()
    settle()


def _backend() -> str:
    """This backend in a refusal: the flag typed on the command line; from Python, where a
    RunConfig's ``sync_backend`` or a script's own ``hpctrain.sync.init(backend="torch")``
    chose it, the backend."""
    return "--sync-backend torch" if options.on_command_line() else \
        "hpctrain.sync's torch backend"


def start_process_group(comm: Any = None) -> bool:
    """Initialise torch.distributed's default group on the ranks of MPI ``comm`` (None: the
    world, or torchrun's environment when MPI runs one process); return whether this call
    created it (False: it existed already)."""
    if not dist.is_available():
        raise UsageError(f"{_backend()}: this torch was built without torch.distributed")
    if dist.is_initialized():
        backend = str(dist.get_backend())
        if not moves_cpu(backend):
            raise UsageError(f"backend 'torch': torch.distributed's default group ({backend!r})"
                             " has no backend for CPU tensors, which hpctrain also moves "
                             "(objects, the agreement rounds): init_process_group('cpu:gloo,"
                             "cuda:nccl'), or let hpctrain.sync.init() make the group")
        if comm is not None and comm.Get_size() != dist.get_world_size():
            raise UsageError(f"backend 'torch': torch.distributed runs {dist.get_world_size()} "
                             f"ranks already, comm has {comm.Get_size()}")
        return False
    node = socket.gethostname()
    refusal = gloo_interface_refusal(os.environ.get("GLOO_SOCKET_IFNAME", ""), node,
                                     _interfaces())
    if comm is None and mpicomm.launcher() == "torchrun":
        if refusal:  # each worker its own: torchrun's agent ends the others
            raise UsageError(refusal)
        store, rank, size = _torchrun_store()
        _SEEN[:] = exchange_views(store, rank, size, _view())
        dist.init_process_group(backend_for(_SEEN), store=store, rank=rank, world_size=size)
        return True
    comm = mpicomm.world() if comm is None else comm
    rank, size = comm.Get_rank(), comm.Get_size()
    seen = comm.allgather((node, refusal))
    nodes = [n for n, _ in seen]
    first = next((r for r, (_, said) in enumerate(seen) if said), None)
    if first is not None:  # every rank, before any of them makes the group
        where = f" (found on rank {first})" if first else ""
        raise on_every_rank(UsageError(seen[first][1] + where))
    address: str | UsageError | None = None
    if rank == 0:
        try:
            host = _rendezvous_host(node, nodes)
        except UsageError as refused:
            address = refused
        else:
            with socket.socket() as s:  # a free port (released again for the store to bind)
                s.bind(("", 0))
                address = f"{url_host(host)}:{s.getsockname()[1]}"
    address = comm.bcast(address, root=0)
    if isinstance(address, UsageError):  # every rank: a script that catches it stays in step
        raise on_every_rank(address)
    _SEEN[:] = comm.allgather(_view())
    dist.init_process_group(backend_for(_SEEN), init_method=f"tcp://{address}", rank=rank,
                            world_size=size)
    return True


def url_host(host: str) -> str:
    """``host`` as a URL names it: an IPv6 address in brackets (``tcp://::1:29500`` is no
    URL torch can split into host and port)."""
    return f"[{host}]" if ":" in host else host


def _rendezvous_host(node: str, nodes: list[str]) -> str:
    """:func:`rendezvous_host` for rank 0 on ``node``, the ranks' nodes being ``nodes``: its
    own address and the one it reaches another node from are looked up only where needed."""
    resolved = outward = None
    if not os.environ.get("MASTER_ADDR") and len(set(nodes)) > 1:
        resolved = _address_of(node)
        outward = _outward_address(next(n for n in nodes if n != node))
    host = rendezvous_host(node, len(set(nodes)), resolved, outward, os.environ)
    if os.environ.get("MASTER_ADDR"):
        refusal = master_addr_refusal(host, node, len(set(nodes)), _bindings(host))
        if refusal:
            raise UsageError(refusal)
    return host


def rendezvous_host(node: str, nodes: int, resolved: str | None, outward: str | None,
                    environ: Mapping[str, str]) -> str:
    """The address rank 0 (on host ``node``, of ``nodes`` nodes) gives the others to meet it
    at: ``MASTER_ADDR`` if set; on one node the loopback; else ``node``'s address
    (``resolved``), unless that is a loopback one (Debian's /etc/hosts maps the host name to
    127.0.1.1), which the other nodes would wait on until torch's timeout (30 minutes). Then
    gloo binds there too unless ``GLOO_SOCKET_IFNAME`` names an interface: with it, the
    address rank 0 reaches another node from (``outward``); without, a UsageError naming
    both variables."""
    if environ.get("MASTER_ADDR"):  # an IPv6 address as torchrun takes it, or as a URL has it
        return environ["MASTER_ADDR"].removeprefix("[").removesuffix("]")
    if nodes == 1:
        return "127.0.0.1"
    if resolved is not None and not ipaddress.ip_address(resolved).is_loopback:
        return resolved
    reachable = outward is not None and not ipaddress.ip_address(outward).is_loopback
    if reachable and environ.get("GLOO_SOCKET_IFNAME"):
        assert outward is not None  # reachable says so
        return outward
    such = f", such as {outward}," if reachable else ""
    raise UsageError(f"{_backend()} on {nodes} nodes: rank 0's host {node} resolves to "
                     f"{resolved or 'no address'}, which the other nodes cannot reach: set "
                     f"MASTER_ADDR to an address of {node} they reach{such} and "
                     "GLOO_SOCKET_IFNAME to its network interface (gloo binds to the host "
                     "name's address otherwise)")


def master_addr_refusal(value: str, node: str, nodes: int,
                        bindings: dict[str, str | None] | str) -> str | None:
    """Why ``MASTER_ADDR=value`` is no place for the others to meet rank 0 (on host ``node``,
    of ``nodes`` nodes), or None where it is. Rank 0 runs the store there: an address that
    does not resolve, or is not this host's, kept every rank retrying (c10d's warnings) until
    hpctrain's stall check or torch's timeout ended the job, and a loopback one kept the other
    nodes so. ``bindings``: each address ``value`` resolves to, with why a socket cannot bind
    there (None: it can; an address of another host cannot), or why it does not resolve."""
    meet = (f"the other ranks meet rank 0 at MASTER_ADDR: set it to an address of {node}, or "
            "unset it")
    if isinstance(bindings, str):
        return f"MASTER_ADDR={value!r} does not resolve ({bindings}); {meet}"
    if not bindings:
        return f"MASTER_ADDR={value!r} resolves to no address; {meet}"
    mine = [a for a, why in bindings.items() if why is None]
    shown = "" if list(bindings) == [value] else f" ({', '.join(bindings)})"
    if not mine:
        why = next(iter(bindings.values()))
        return f"MASTER_ADDR={value!r}{shown} is no address of rank 0's host {node} ({why}); {meet}"
    if nodes > 1 and all(ipaddress.ip_address(a.split("%")[0]).is_loopback
                         or ipaddress.ip_address(a.split("%")[0]).is_unspecified for a in mine):
        return (f"MASTER_ADDR={value!r}{shown} is a local-only address of rank 0's host {node}, "
                f"which the other nodes cannot reach: set it to an address of {node} they "
                "reach, or unset it")
    return None


def _bindings(host: str) -> dict[str, str | None] | str:
    """The addresses ``host`` resolves to, each with why a TCP socket cannot bind there (None
    where it can: an address of this host), or why it does not resolve (for
    :func:`master_addr_refusal`)."""
    try:
        found = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        return getattr(e, "strerror", None) or str(e)
    bindings: dict[str, str | None] = {}
    for family, kind, proto, _, where in found:
        assert isinstance(where[0], str)  # an IPv4 or IPv6 address: a host's only families
        try:
            with socket.socket(family, kind, proto) as s:
                s.bind(where)
        except OSError as e:
            bindings.setdefault(where[0], f"binding there: {e.strerror or e}")
        else:
            bindings[where[0]] = None
    return bindings


def gloo_interface_refusal(value: str, node: str, interfaces: list[str] | None) -> str | None:
    """Why ``GLOO_SOCKET_IFNAME=value`` cannot be used on host ``node``, whose network
    interfaces are ``interfaces`` (None: not known, nothing checked), or None where it can.
    torch reads it so: a value of fewer than two characters is ignored, else a comma-separated
    list (one trailing comma allowed) whose every name must be an interface here; an unknown
    one failed in init_process_group ("Unable to find address for: ...") on that host's ranks
    only, an empty one ("interface or hostname can't be empty") on every host's."""
    if len(value) < 2 or interfaces is None:
        return None
    names = value.split(",")
    if names[-1] == "":
        names.pop()
    # An alias label (eth0:1, from getifaddrs, which gloo reads) is on its interface's line
    unknown = [n for n in names if n not in interfaces and n.split(":")[0] not in interfaces]
    if not unknown:
        return None
    which = "interface" if len(unknown) == 1 else "interfaces"
    return (f"GLOO_SOCKET_IFNAME={value!r}: host {node} has no network {which} "
            f"{', '.join(map(repr, unknown))} (its interfaces: {', '.join(interfaces)}); set "
            "it to a comma-separated list of them, or unset it")


def _interfaces() -> list[str] | None:
    """This host's network interfaces' names (None where they cannot be listed)."""
    try:
        return [name for _, name in socket.if_nameindex()]
    except OSError:
        return None


def _address_of(host: str) -> str | None:
    """``host``'s IPv4 address, or None where it does not resolve."""
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None


def _outward_address(peer: str) -> str | None:
    """The address this host sends from to ``peer`` (a UDP socket's connect sends nothing,
    the kernel picks the route), or None where ``peer`` does not resolve or is unreachable."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(peer), 9))
            return s.getsockname()[0]
    except OSError:
        return None


def _torchrun_store() -> tuple[Any, int, int]:
    """The default group's store under torchrun, this worker's rank and the job's size, from
    torch's env:// rendezvous (as ``init_method="env://"`` would get them, with its timeout;
    the agent's store where ``TORCHELASTIC_USE_AGENT_STORE`` says so). The agent keeps one
    store for all of a job's restarts (``--max-restarts``), so a restarted worker may read
    what its predecessor posted there (the views of :func:`exchange_views`, the group's
    addresses: pytorch#135712). On one node every worker has the same
    ``TORCHELASTIC_RESTART_COUNT``, so everything goes under that attempt's prefix; across
    nodes the counts may differ (an agent whose own workers did not fail restarts them without
    counting), and a prefix that differs would leave the nodes waiting for each other, so it
    is torch's own ``default_pg`` prefix there (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for
    torchrun gives each attempt a store of its own)."""
    env = os.environ
    store, rank, size = next(dist.rendezvous("env://"))
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and \
            env.get("LOCAL_WORLD_SIZE") == env.get("WORLD_SIZE"):
        attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
        return dist.PrefixStore(f"hpctrain/attempt_{attempt}/", store), rank, size
    if rank == 0 and (warning := shared_store_warning(env)) is not None:
        print(warning, file=sys.stderr, flush=True)
    return dist.PrefixStore("default_pg", store), rank, size


def shared_store_warning(env: Mapping[str, str]) -> str | None:
    """A line for rank 0 where torchrun's workers on several nodes share the agent's store
    and may restart (``--max-restarts``): a restart would then read its predecessor's group
    addresses and fail to connect (pytorch#135712), only after the first failure; else
    None."""
    try:
        restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        return None
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restarts <= 0 or \
            env.get("LOCAL_WORLD_SIZE") == env.get("WORLD_SIZE"):
        return None
    return ("hpctrain: warning: torchrun on several nodes with --max-restarts "
            f"{restarts} keeps one rendezvous store for every restart, where a restarted "
            "worker reads its predecessor's addresses and fails to connect (pytorch#135712): "
            "start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")


View = tuple[str, int, list[str], bool]  # a rank's node, local rank, GPUs, NCCL usable


def _view() -> View:
    """What this rank brings to :func:`backend_for`."""
    return socket.gethostname(), local_rank(), visible_gpus(), nccl_available()


def backend_for(views: list[View]) -> str:
    """The default group's backend, from every rank's view (its node, local rank, the GPUs it
    sees, whether NCCL is usable there): ``cpu:gloo,cuda:nccl`` where every rank can use NCCL
    and no two ranks of a node will take one GPU (:func:`hpctrain.devices.shares_gpus`), else
    gloo. Every rank decides from the same list, so all choose alike: one node's own view
    (more workers than GPUs on one node, not on another) gave NCCL on some ranks and gloo
    on the others, which hang or fail at the first collective of a CUDA tensor."""
    if views and all(nccl for *_, nccl in views) and \
            not shares_gpus([(node, local, gpus) for node, local, gpus, _ in views]):
        return "cpu:gloo,cuda:nccl"
    return "gloo"


_VIEWS = "hpctrain.backend/"  # exchange_views's keys: this, then the rank
_SEEN: list[View] = []  # the views the last default group made here was chosen from


def views_seen() -> list[View]:
    """Every rank's view that the default group's backend was chosen from, where this
    process made the group (:func:`start_process_group`; empty where it did not)."""
    return list(_SEEN)


def exchange_views(store: Any, rank: int, size: int, view: View) -> list[View]:
    """Every rank's view, through ``store`` (torchrun's, before the group exists): this rank
    posts ``view``, then reads the ``size`` ranks'. A rank that never posts (it died, or
    never started) is an error naming it once the store's timeout has passed (from the
    post before it, waited for in rank order)."""
    store.set(f"{_VIEWS}{rank}", json.dumps(view))
    keys = [f"{_VIEWS}{r}" for r in range(size)]
    for r, key in enumerate(keys):  # one at a time, to name the first that never came
        try:
            store.wait([key])
        except RuntimeError as e:  # torch's DistStoreError: "wait timeout"
            waited = getattr(store, "timeout", None)
            raise RuntimeError(f"torch.distributed under torchrun: rank {rank} waited "
                               f"{'the store timeout' if waited is None else waited} for "
                               f"rank {r} to post which GPUs it sees (every rank chooses the "
                               "group's backend from all of them); none came") from e
    views: list[View] = []
    for key in keys:
        node, local, gpus, nccl = json.loads(store.get(key))
        views.append((node, local, gpus, nccl))
    return views


def stall_store(token: str) -> Any:
    """The default group's store, under a prefix of the stall check's own (stall.py) and of
    ``token``, which every rank must give alike and each start of the collectives anew
    (collectives.init: rank 0's random one), so that a restarted job does not read its
    predecessor's posts on a store torchrun's agent keeps across restarts (nor a second
    ``init`` the first's). Not torchrun's ``TORCHELASTIC_RESTART_COUNT``: across nodes the
    agents' counts differ after a restart (an agent whose own workers did not fail restarts
    them without counting), and the ranks of different counts never read each other's posts
    (every report said "no answer" for the ranks of the other nodes)."""
    return dist.PrefixStore(f"hpctrain.stall/{token}/",
                            dist.distributed_c10d._get_default_store())


def moves_cpu(backend: str) -> bool:
    """Whether a group of ``backend`` (``dist.get_backend``'s text: a name such as ``nccl``,
    or a device map such as ``cpu:gloo,cuda:nccl``) has a backend for CPU tensors."""
    backend = backend.lower()
    if ":" in backend:
        return any(part.split(":")[0].strip() == "cpu" for part in backend.split(","))
    return backend != "nccl"


class _Work:
    __slots__ = ("_work", "_then")

    def __init__(self, work: Any, then=None):
        self._work, self._then = work, then

    def wait(self) -> None:
        self._work.wait()
        if self._then is not None:
            self._then()
            self._then = None

    def test(self) -> bool:
        return self._work.is_completed()


class _Works:
    __slots__ = ("_works",)

    def __init__(self, works: list):
        self._works = works

    def wait(self) -> None:
        for work in self._works:
            work.wait()

    def test(self) -> bool:
        return all([work.is_completed() for work in self._works])


_FREED = object()  # a freed transport's group: neither a group nor None (the default group)
_DERIVED: weakref.WeakSet = weakref.WeakSet()  # made by dup/split, not freed yet (release)


class TorchTransport:
    """torch.distributed collectives on ``group`` (None: the default group)."""

    name = "torch"

    def __init__(self, group: Any = None, *, owns_default: bool = False, spare: Any = None):
        self.group = group
        self._owns_default = owns_default
        self._spare = spare  # a second group on the same ranks, for dup() (see split)
        self.nccl = "nccl" in str(dist.get_backend(group)).lower()
        nodes = self.allgather_object(socket.gethostname())
        me = nodes[self.rank()]
        self._local = (sum(1 for n in nodes[:self.rank()] if n == me), nodes.count(me))

    def takes(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu" or self.nccl

    def size(self) -> int:
        return dist.get_world_size(self.group)

    def rank(self) -> int:
        return dist.get_rank(self.group)

    def local_size(self) -> int:
        return self._local[1]

    def local_rank(self) -> int:
        return self._local[0]

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def iallreduce(self, send: torch.Tensor | None, out: torch.Tensor, op: int) -> Request:
        if out.dtype in _UNTYPED:
            wide = _wide(out if send is None else send)
            (lent,) = _lend(wide)
            work = dist.all_reduce(lent, op=_OPS[int(op)], group=self.group, async_op=True)
            return _Work(work, lambda: out.copy_(wide))
        if send is not None:
            out.copy_(send)
        (lent,) = _lend(out)
        return _Work(dist.all_reduce(lent, op=_OPS[int(op)], group=self.group, async_op=True))

    def iallgather(self, send: torch.Tensor, out: torch.Tensor, rows: list[int]) -> Request:
        send, out = _raw(send), _raw(out)
        most = max(rows)
        padded = send.new_zeros((most, *send.shape[1:]))
        padded[:len(send)] = send
        parts = [torch.empty_like(padded) for _ in rows]
        lent, *lent_parts = _lend(padded, *parts)
        work = dist.all_gather(lent_parts, lent, group=self.group, async_op=True)

        def unpad() -> None:
            torch.cat([p[:r] for p, r in zip(parts, rows, strict=True)], out=out)

        return _Work(work, unpad)

    def ibcast(self, tensor: torch.Tensor, root: int) -> Request:
        (lent,) = _lend(_raw(tensor))
        return _Work(dist.broadcast(lent, src=self._global(root), group=self.group,
                                    async_op=True))

    def ialltoall(self, send: torch.Tensor, out: torch.Tensor, send_rows: list[int],
                  recv_rows: list[int], *, total: int) -> Request:
        # One call whatever ``total``: torch.distributed takes split sizes as int64.
        out, send = _lend(_raw(out), _raw(send))
        return _Work(dist.all_to_all_single(out, send, output_split_sizes=recv_rows,
                                            input_split_sizes=send_rows, group=self.group,
                                            async_op=True))

    def isendrecv(self, send: torch.Tensor, out: torch.Tensor, peer: int) -> Request:
        peer = self._global(peer)
        moved = [(f, t) for f, t in ((dist.isend, _raw(send)), (dist.irecv, _raw(out)))
                 if t.numel()]
        lent = _lend(*(t for _, t in moved))
        ops = [dist.P2POp(f, t, peer, self.group) for (f, _), t in zip(moved, lent, strict=True)]
        return _Works(dist.batch_isend_irecv(ops) if ops else [])

    def ireducescatter(self, send: torch.Tensor, out: torch.Tensor, counts: list[int],
                       op: int) -> Request:
        if self.nccl and send.device.type != "cpu" and send.dtype not in _UNTYPED:
            lent, *parts = _lend(out, *send.split(counts))
            return _Work(dist.reduce_scatter(lent, parts, op=_OPS[int(op)], group=self.group,
                                             async_op=True))
        # gloo: one allreduce of the whole vector, this rank's rows kept. gloo has no
        # reduce_scatter before torch 2.8, and from 2.8 runs one allreduce per rank.
        whole = _wide(send) if send.dtype in _UNTYPED else send.clone()
        (lent,) = _lend(whole)
        work = dist.all_reduce(lent, op=_OPS[int(op)], group=self.group, async_op=True)
        mine = whole.narrow(0, sum(counts[:self.rank()]), counts[self.rank()])
        return _Work(work, lambda: out.copy_(mine))

    def barrier(self) -> None:
        # An allreduce of a CPU tensor: gloo's, whatever backend CUDA tensors use.
        self.iallreduce(None, torch.zeros(1), SUM).wait()

    def bcast_object(self, obj: Any, root: int) -> Any:
        data = _pickle(obj) if self.rank() == root else torch.empty(0, dtype=torch.uint8)
        length = torch.tensor([data.numel()])
        self.ibcast(length, root).wait()
        if self.rank() != root:
            data = torch.empty(int(length), dtype=torch.uint8)
        self.ibcast(data, root).wait()
        return pickle.loads(data.numpy().tobytes())

    def _lengths(self, data: torch.Tensor) -> list[int]:
        """Every rank's ``data.numel()`` (collective): the sizes of pickled objects."""
        lengths = torch.empty(self.size(), dtype=torch.int64)
        self.iallgather(torch.tensor([data.numel()]), lengths, [1] * self.size()).wait()
        return lengths.tolist()

    def allgather_object(self, obj: Any) -> list:
        data = _pickle(obj)
        rows = self._lengths(data)
        out = torch.empty(sum(rows), dtype=torch.uint8)
        self.iallgather(data, out, rows).wait()
        return [pickle.loads(part.numpy().tobytes()) for part in out.split(rows)]

    def gather_object(self, obj: Any, root: int) -> list | None:
        """Every rank's ``obj`` at ``root`` (None elsewhere); only the lengths go to all."""
        data = _pickle(obj)
        rows = self._lengths(data)
        padded = data.new_zeros(max(rows))
        padded[:len(data)] = data
        parts = [torch.empty_like(padded) for _ in rows] if self.rank() == root else None
        lent, *lent_parts = _lend(padded, *(parts or []))
        dist.gather(lent, lent_parts if parts is not None else None, dst=self._global(root),
                    group=self.group, async_op=True).wait()
        if parts is None:
            return None
        return [pickle.loads(p[:r].numpy().tobytes()) for p, r in zip(parts, rows, strict=True)]

    def dup(self) -> TorchTransport:
        """torch.distributed makes a group on every rank of the job at once; so a set of
        fewer ranks (split) has one group made for dup() in advance, and no more."""
        if self._spare is not None:
            group, self._spare = self._spare, None
            return _derived(TorchTransport(group))
        if self.size() != dist.get_world_size():
            raise UsageError("backend 'torch': a process set other than the global one takes "
                             "one DistributedOptimizer (torch.distributed makes groups on "
                             "every rank at once); use the mpi backend for more")
        ranks = [self._global(r) for r in range(self.size())]
        return _derived(TorchTransport(dist.new_group(ranks,
                                                      backend=dist.get_backend(self.group))))

    def split(self, ranks: list[int]) -> TorchTransport | None:
        members = [self._global(r) for r in ranks]
        backend = dist.get_backend(self.group)
        group = dist.new_group(members, backend=backend)
        spare = dist.new_group(members, backend=backend)
        if dist.get_rank() not in members:
            return None
        return _derived(TorchTransport(group, spare=spare))

    def free(self) -> None:
        """Destroy the groups, and drop this transport's references to them: the last one
        going ends a group's worker threads now, where nothing else holds the group (what
        they ran, :func:`_lend` holds until they let go of it)."""
        if self.group is _FREED:
            return
        if self._spare is not None:
            dist.destroy_process_group(self._spare)
        if self.group is not None:
            dist.destroy_process_group(self.group)
        elif self._owns_default:
            dist.destroy_process_group()
        self.group = self._spare = _FREED
        _DERIVED.discard(self)


def _derived(transport: TorchTransport) -> TorchTransport:
    _DERIVED.add(transport)
    return transport


def _pickle(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
