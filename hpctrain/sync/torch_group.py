"""``--sync-backend torch``: torch.distributed's default process group, made for hpctrain's
collectives (:mod:`hpctrain.sync.torch_transport` moves the tensors over it).

The process group is set up from the MPI world when there is one (its rank and size, and a
rendezvous address that rank 0 broadcasts over MPI), or from torchrun's environment
(``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``) when there is none; a group the user's script
initialised already is used as it is, if it has a backend for CPU tensors (:func:`moves_cpu`).
Before any rank makes the group, ``MASTER_ADDR`` and ``GLOO_SOCKET_IFNAME`` are checked
(:func:`master_addr_refusal`, :func:`gloo_interface_refusal`), every rank refusing alike.
CUDA tensors go through NCCL and CPU tensors through gloo (``cpu:gloo,cuda:nccl``), unless two
ranks on one node share a GPU, which one NCCL communicator cannot hold (NCCL >= 2.5:
"Duplicate GPU detected"), or a rank cannot use NCCL: then the group is gloo alone
(:func:`backend_for`, on every rank's view of its node and GPUs, gathered over MPI or, under
torchrun, through torch's rendezvous store, so that every rank chooses alike). The stall
check posts on the group's store (:func:`stall_store`).

Its own module: making the group (addresses, launchers' environments, the backend's choice)
is done once per start, before any tensor moves, and shares nothing with the transport but
torch.distributed itself.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

from hpctrain import comm as mpicomm
from hpctrain import options
from hpctrain.devices import local_rank, nccl_available, shares_gpus, visible_gpus
from hpctrain.errors import UsageError, on_every_rank


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
