"""``--sync-backend torch`` under MPI: the process group's rendezvous, checked before it is made.

Rank 0 runs torch's store at ``MASTER_ADDR``: one that did not resolve, or was not rank 0's
host's, kept every rank retrying until the stall check ended the job, naming neither. An
unknown ``GLOO_SOCKET_IFNAME`` failed in gloo on the ranks of the host that lacked it. Both are
refused in one line on every rank alike, exit status 2 (the multi-node loopback refusal is
tested in test_launchers.py). The group's backend is chosen from every rank's view of its
GPUs alike on every rank; under torchrun the views go through torch's rendezvous store.
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import ROOT, SYNTHETIC, run_job, run_program

from hpctrain.errors import UsageError
from hpctrain.sync import torch_group
from hpctrain.sync.torch_group import (
    backend_for,
    gloo_interface_refusal,
    master_addr_refusal,
    rendezvous_host,
    url_host,
)

NOT_HERE = "192.0.2.1"  # TEST-NET-1 (RFC 5737): an address of no host
TRAIN = ["train", "--algo", "ssgd", "--sync-backend", "torch", *SYNTHETIC, "--epochs", "1"]
UNBOUND = "binding there: Cannot assign requested address"
MEET = "the other ranks meet rank 0 at MASTER_ADDR: set it to an address of node0, or unset it"


@pytest.mark.parametrize("value, nodes, bindings", [
    ("127.0.0.1", 1, {"127.0.0.1": None}),  # one node: the loopback serves
    ("localhost", 1, {"127.0.0.1": None, "::1": UNBOUND}),  # one of its addresses binds
    ("10.0.0.5", 2, {"10.0.0.5": None}),
    ("node0-ib", 3, {"127.0.1.1": None, "10.0.0.5": None}),  # one the others reach
])
def test_a_master_addr_of_rank_0s_host_is_taken(value, nodes, bindings):
    assert master_addr_refusal(value, "node0", nodes, bindings) is None


@pytest.mark.parametrize("value, nodes, bindings, said", [
    ("no.such.host.invalid", 1, "Name or service not known",
     f"MASTER_ADDR='no.such.host.invalid' does not resolve (Name or service not known); {MEET}"),
    ("node9", 1, {}, f"MASTER_ADDR='node9' resolves to no address; {MEET}"),
    (NOT_HERE, 2, {NOT_HERE: UNBOUND},
     f"MASTER_ADDR='{NOT_HERE}' is no address of rank 0's host node0 ({UNBOUND}); {MEET}"),
    ("node9", 1, {NOT_HERE: UNBOUND, "2001:db8::1": "binding there: x"},
     f"MASTER_ADDR='node9' ({NOT_HERE}, 2001:db8::1) is no address of rank 0's host node0 "
     f"({UNBOUND}); {MEET}"),
    ("localhost", 2, {"127.0.0.1": None, "::1": None},
     "MASTER_ADDR='localhost' (127.0.0.1, ::1) is a local-only address of rank 0's host node0, "
     "which the other nodes cannot reach: set it to an address of node0 they reach, or unset "
     "it"),
    ("0.0.0.0", 2, {"0.0.0.0": None},
     "MASTER_ADDR='0.0.0.0' is a local-only address of rank 0's host node0, which the other "
     "nodes cannot reach: set it to an address of node0 they reach, or unset it"),
])
def test_a_master_addr_the_others_cannot_meet_rank_0_at_is_refused(value, nodes, bindings,
                                                                   said):
    assert master_addr_refusal(value, "node0", nodes, bindings) == said


def test_the_addresses_of_master_addr_are_found_by_binding_there():
    assert torch_group._bindings("127.0.0.1") == {"127.0.0.1": None}
    assert torch_group._bindings(NOT_HERE) == {NOT_HERE: UNBOUND}
    assert isinstance(torch_group._bindings("no.such.host.invalid"), str)


def test_rank_0_checks_master_addr_and_the_loopback_refusal_stands(monkeypatch):
    """_rendezvous_host: MASTER_ADDR checked where given; where not, on several nodes, the
    host name's loopback address is refused as before."""
    monkeypatch.setenv("MASTER_ADDR", NOT_HERE)
    with pytest.raises(UsageError, match=f"MASTER_ADDR='{NOT_HERE}' is no address of"):
        torch_group._rendezvous_host("node0", ["node0", "node0"])
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert torch_group._rendezvous_host("node0", ["node0", "node0"]) == "127.0.0.1"
    with pytest.raises(UsageError, match="is a local-only address of rank 0's host node0"):
        torch_group._rendezvous_host("node0", ["node0", "node1"])
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.setattr(torch_group, "_address_of", lambda host: "127.0.1.1")
    monkeypatch.setattr(torch_group, "_outward_address", lambda peer: None)
    with pytest.raises(UsageError, match="rank 0's host node0 resolves to 127.0.1.1, which"):
        torch_group._rendezvous_host("node0", ["node0", "node1"])


def node(name: str, workers: int, gpus: int, nccl: bool = True) -> list:
    """The views of a node's ``workers`` ranks (torch_group.backend_for's), each seeing
    all of its ``gpus`` GPUs."""
    seen = [f"{name}:GPU{i}" for i in range(gpus)]
    return [(name, local, seen, nccl) for local in range(workers)]


NCCL = "cpu:gloo,cuda:nccl"


def test_every_rank_chooses_the_backend_from_every_nodes_view():
    """torchrun on a node with 4 GPUs for its 4 workers and one with 2 GPUs for 4: each node
    judged by itself (LOCAL_WORLD_SIZE against its GPUs), the first node's ranks made
    NCCL-capable groups and the second's gloo ones, a hang or an error at the first
    collective of a CUDA tensor. Every rank decides from all the views alike: gloo."""
    roomy, crowded = node("a", 4, 4), node("b", 4, 2)
    assert backend_for(roomy) == NCCL and backend_for(crowded) == "gloo"  # each by itself
    assert backend_for(roomy + crowded) == backend_for(crowded + roomy) == "gloo"
    assert backend_for(roomy + node("b", 4, 4)) == NCCL  # nodes alike: NCCL
    # A rank where NCCL cannot run (a node without GPUs) makes the group gloo too
    assert backend_for(roomy + node("c", 2, 0, nccl=False)) == "gloo"
    # Each rank seeing only its own GPU as device 0 (Slurm's --gpus-per-task): NCCL
    own = [("a", r, [f"a:GPU{r}"], True) for r in range(2)]
    assert backend_for(own + [("b", r, [f"b:GPU{r}"], True) for r in range(2)]) == NCCL


def test_rank_0_warns_where_nodes_share_the_agents_store_across_restarts():
    """Across nodes torchrun's shared store makes a restart fail to connect (pytorch#135712),
    which README answers with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; a job that may restart
    and lacks it hears so at its start, not after its first failure."""
    several = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3",
               "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"}
    warning = torch_group.shared_store_warning(several)
    assert warning is not None and "--max-restarts 3" in warning
    assert warning.endswith("start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    for quiet in ({"LOCAL_WORLD_SIZE": "8"}, {"TORCHELASTIC_MAX_RESTARTS": "0"},
                  {"TORCHELASTIC_USE_AGENT_STORE": "False"}):  # one node, no restarts, unshared
        assert torch_group.shared_store_warning({**several, **quiet}) is None


@pytest.fixture
def agent_store(monkeypatch):
    """torchrun's agent store on one node of 2 workers, in its second attempt (a TCPStore
    here, which the workers' env:// rendezvous reaches as torchrun's do), with a short
    timeout."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=30))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    for var, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "TORCHELASTIC_USE_AGENT_STORE": "True",
                       "TORCHELASTIC_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(var, value)

    def worker(rank: int):
        monkeypatch.setenv("RANK", str(rank))
        client, seat, size = torch_group._torchrun_store()
        assert (seat, size) == (rank, 2)
        client.set_timeout(timedelta(seconds=1))
        return client

    return store, worker


def test_a_restarted_worker_waits_for_this_attempts_views_and_names_a_missing_rank(
        agent_store):
    """The agent's store outlives an attempt: rank 1's view from the first attempt is not
    read in the second, where rank 0 waits for rank 1 the store's timeout, then says so;
    once rank 1 posts, both read this attempt's two views."""
    import json

    store, worker = agent_store
    earlier = ("old-node", 1, ["G9"], True)
    store.set("hpctrain/attempt_0/hpctrain.backend/1", json.dumps(earlier))  # attempt 0's
    views = node("a", 2, 2)
    with pytest.raises(RuntimeError, match=r"^torch.distributed under torchrun: rank 0 "
                       r"waited 0:00:01 for rank 1 to post which GPUs it sees"):
        torch_group.exchange_views(worker(0), 0, 2, views[0])
    assert torch_group.exchange_views(worker(1), 1, 2, views[1]) == views


@pytest.mark.parametrize("given", ["::1", "[::1]"])
def test_an_ipv6_master_addr_is_bracketed_in_the_url(given):
    """``tcp://::1:port`` failed in torch ("Port could not be cast to integer value as
    ':1:...'"); torchrun takes MASTER_ADDR bare, a URL bracketed: both are taken."""
    host = rendezvous_host("node0", 1, None, None, {"MASTER_ADDR": given})
    assert host == "::1"
    assert url_host(host) == "[::1]"
    assert url_host("10.0.0.5") == "10.0.0.5" and url_host("node0-ib") == "node0-ib"


def _ipv6_loopback() -> bool:
    bindings = torch_group._bindings("::1")
    return isinstance(bindings, dict) and bindings.get("::1", "") is None


# hpctrain's training on each rank, which writes to $SEEN/<rank> what the process group it
# made met at: the init_method rank 0 published, the store's host and port, and whether a
# connection to that port at ::1 was up (/proc/net/tcp6: ::1, remote port, ESTABLISHED).
MET_AT = """\
import json, os, sys
from pathlib import Path
import torch.distributed as dist
made = dist.init_process_group
def observed(*args, **kwargs):
    made(*args, **kwargs)
    store = dist.distributed_c10d._get_default_store()
    while hasattr(store, "underlying_store"):  # PrefixStore's
        store = store.underlying_store
    remote = f"{'0' * 24}01000000:{store.port:04X}"
    up = any(f.split()[2] == remote and f.split()[3] == "01"
             for f in Path("/proc/net/tcp6").read_text().splitlines()[1:])
    Path(os.environ["SEEN"], os.environ["OMPI_COMM_WORLD_RANK"]).write_text(json.dumps(
        {"init_method": kwargs.get("init_method"), "store": [store.host, store.port],
         "connected_at_ipv6_loopback": up}))
dist.init_process_group = observed
from hpctrain import cli
cli.main(sys.argv[1:])
"""


@pytest.mark.timeout(200)
@pytest.mark.skipif(not _ipv6_loopback(), reason="this host cannot bind its IPv6 loopback ::1")
def test_ranks_meet_at_an_ipv6_master_addr(tmp_path):
    """The store rank 0 published at tcp://[::1]:port is where both ranks met, over ::1 (a
    run that fell back to 127.0.0.1, or to a default address, trained as well)."""
    seen = tmp_path / "seen"
    seen.mkdir()
    proc = run_program([sys.executable, "-c", MET_AT, *TRAIN, "--out", str(tmp_path / "run")],
                       np=2, timeout=120, env={"MASTER_ADDR": "::1", "SEEN": str(seen),
                                               "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "summary.json").exists()
    met = [json.loads((seen / str(rank)).read_text()) for rank in range(2)]
    port = met[0]["store"][1]
    assert met[0]["init_method"] == f"tcp://[::1]:{port}", met
    assert all(m == {"init_method": f"tcp://[::1]:{port}", "store": ["::1", port],
                     "connected_at_ipv6_loopback": True} for m in met), met


HERE = ["lo", "eth0", "ib0"]


@pytest.mark.parametrize("value, interfaces", [
    ("", HERE), ("x", HERE), ("lo", HERE), ("eth0,ib0", HERE), ("eth0,", HERE),
    ("lo:7", HERE),  # an alias label (ip addr ... label lo:7), which gloo finds: was refused
    ("nosuchif0", None),  # this host's interfaces could not be listed: nothing checked
])
def test_gloo_socket_ifname_of_this_hosts_interfaces_is_taken(value, interfaces):
    """As torch reads it: under two characters ignored, one trailing comma allowed."""
    assert gloo_interface_refusal(value, "node0", interfaces) is None


@pytest.mark.parametrize("value, unknown", [
    ("nosuchif0", "interface 'nosuchif0'"),
    ("eth0,ib1,eth9", "interfaces 'ib1', 'eth9'"),
    ("eth0,,ib0", "interface ''"),  # torch: "interface or hostname can't be empty"
    (" eth0", "interface ' eth0'"),
    ("eth9:1", "interface 'eth9:1'"),
])
def test_gloo_socket_ifname_naming_no_interface_here_is_refused(value, unknown):
    assert gloo_interface_refusal(value, "node0", HERE) == (
        f"GLOO_SOCKET_IFNAME={value!r}: host node0 has no network {unknown} (its interfaces: "
        "lo, eth0, ib0); set it to a comma-separated list of them, or unset it")


def _errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("hpctrain: error")]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("np, env, said", [
    (0, {"MASTER_ADDR": "no.such.host.invalid"},
     "hpctrain: error: MASTER_ADDR='no.such.host.invalid' does not resolve ("),
    (2, {"MASTER_ADDR": NOT_HERE},
     f"hpctrain: error (rank 0 of 2): MASTER_ADDR='{NOT_HERE}' is no address of rank 0's host "),
    (2, {"GLOO_SOCKET_IFNAME": "nosuchif0"},
     "hpctrain: error (rank 0 of 2): GLOO_SOCKET_IFNAME='nosuchif0': host "),
])
def test_a_rendezvous_variable_that_cannot_work_is_refused_in_one_line(tmp_path, np, env, said):
    """Before: 10 minutes of c10d's warnings then the stall check (exit 3), or gloo's
    RuntimeError (exit 1)."""
    proc = run_job([*TRAIN, "--out", str(tmp_path / "run")], np=np, timeout=90, env=env)
    errors = _errors(proc)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert errors[0].startswith(said), errors[0]
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.timeout(200)
def test_an_interface_one_rank_lacks_ends_every_rank_in_step(tmp_path):
    """GLOO_SOCKET_IFNAME for rank 1 only: rank 0, whose own is fine, says rank 1's."""
    script = tmp_path / "job.py"
    script.write_text("import os, sys\n"
                      "if os.environ['OMPI_COMM_WORLD_RANK'] == '1':\n"
                      "    os.environ['GLOO_SOCKET_IFNAME'] = 'lo,nosuchif0'\n"
                      "from hpctrain import cli\n"
                      "cli.main(sys.argv[1:])\n")
    proc = run_program([sys.executable, str(script), *TRAIN, "--out", str(tmp_path / "run")],
                       np=2, timeout=90, env={"PYTHONPATH": str(ROOT)})
    errors = _errors(proc)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert errors[0].startswith("hpctrain: error (rank 0 of 2): GLOO_SOCKET_IFNAME='lo,"
                                "nosuchif0': host "), errors[0]
    assert errors[0].endswith(" or unset it (found on rank 1)"), errors[0]
