"""Every public name of horovod.torch 0.28.1 in hpctrain.sync, against Horovod itself.

mpirun -np 2|4 python -m pytest --with-mpi -m mpi tests/test_sync_horovod_names.py
One module fixture runs the same script of calls (``_exercise``) on each backend in the same
processes (mpi, mpi with every tensor staged through a host copy as CUDA tensors are when MPI
is not CUDA-aware, torch on gloo, and Horovod); each test then compares one name's results
with Horovod's (with the mpi backend's where Horovod cannot be imported). Names that
Horovod cannot run on CPU (SyncBatchNorm) are compared with one process on the union of the
batches instead. Further tests cover join with DistributedOptimizer, the one-line mismatch
error and the stall report. Values are small integers in float tensors, so sums are exact.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import runpy
import subprocess
import sys
import time
import warnings

import pytest
import torch
from conftest import ROOT, SYNTHETIC, horovod_missing, run_program
from torch import nn
from torch.nn import functional as F

import hpctrain.sync as sync
from hpctrain import comm
from hpctrain.errors import UsageError
from hpctrain.models import ResNet20
from hpctrain.sync.buckets import plan_groups, plan_without
from hpctrain.sync.collective_check import Call
from hpctrain.sync.grouped import scatter_rows
from hpctrain.sync.transport import MPITransport
from hpctrain.watchdog import EXIT_STATUS


def _horovod():
    if why := horovod_missing():
        pytest.skip(why)
    import horovod.torch as hvd

    return hvd


# ---------------------------------------------------------------- single process

def test_every_public_horovod_name_is_in_hpctrain_sync():
    horovod = _horovod()
    names = [n for n in dir(horovod) if not n.startswith("_")]
    assert len(names) >= 70
    assert [n for n in names if not hasattr(sync, n)] == []
    # What a script imports to write a compressor of its own (hvd.compression.Compressor).
    assert [n for n in dir(horovod.compression) if not n.startswith("_")
            and not hasattr(sync.compression, n)] == []
    assert issubclass(sync.Compression.fp16, sync.compression.Compressor)
    assert sync.mpi_ops is not None and sync.HorovodInternalError.__name__ == \
        "HorovodInternalError"
    assert issubclass(sync.CollectiveMismatchError, sync.HorovodInternalError)


# What horovod.torch.mpi_ops and .functions have that hpctrain's do not, on purpose: the
# modules and typing names they import for themselves, and Horovod's internals.
NOT_PORTED = {"torch", "warnings", "io", "collections", "cloudpickle", "Iterable",
              "HorovodAllgather", "HorovodAllreduce", "HorovodAlltoall", "HorovodBroadcast",
              "HorovodGroupedAllgather", "HorovodGroupedAllreduce",
              "HorovodGroupedReducescatter", "HorovodReducescatter", "check_installed_version",
              "get_average_backwards_compatibility_fun",
              "handle_average_backwards_compatibility"}


def test_horovods_submodules_names_import_from_hpctrains():
    """``from horovod.torch.mpi_ops import Sum`` ported as ``from hpctrain.sync.mpi_ops
    import Sum`` was a ModuleNotFoundError (``hvd.mpi_ops`` was the backend module, without
    the ops or process sets), and hpctrain.sync.functions had no broadcast_object."""
    horovod = _horovod()
    from hpctrain.sync import functions, mpi_ops

    theirs = {n for module in (horovod.mpi_ops, horovod.functions) for n in dir(module)
              if not n.startswith("_")}
    assert NOT_PORTED <= theirs
    for module, ours in ((horovod.mpi_ops, mpi_ops), (horovod.functions, functions)):
        names = [n for n in dir(module) if not n.startswith("_") and n not in NOT_PORTED]
        assert [n for n in names if not hasattr(ours, n)] == [], module.__name__
        assert set(names) == set(ours.__all__), module.__name__
    assert sync.mpi_ops is mpi_ops and sync.functions is functions
    assert mpi_ops.Sum is sync.Sum and functions.broadcast_object is sync.broadcast_object
    assert mpi_ops.HorovodInternalError is sync.HorovodInternalError
    assert mpi_ops.mpi_lib is None and mpi_ops.num_rank_is_power_2(4)
    assert not mpi_ops.num_rank_is_power_2(6) and not mpi_ops.num_rank_is_power_2(0)
    assert mpi_ops.gpu_available("torch") == torch.cuda.is_available()
    assert not mpi_ops.gpu_available("tensorflow")


def test_fusion_groups_and_reducescatter_rows():
    f32, f16 = torch.float32, torch.float16
    sizes = [(4, f32)] * 5
    # explicit groups are buckets; the rest are bucketed by size; last parameters go first
    assert plan_groups(sizes, 10**6, [[0, 3]]) == [[4, 2, 1], [3, 0]]
    assert plan_groups(sizes, 10**6, [[0, 4]]) == [[4, 0], [3, 2, 1]]  # by last, not first
    assert plan_groups(sizes, 16, [[1, 2]]) == [[4], [3], [2, 1], [0]]
    assert plan_groups([(4, f32), (4, f16), (4, f32)], 10**6, [[0, 1, 2]]) == [[2], [1], [0]]
    assert scatter_rows(3, 2) == [2, 1] and scatter_rows(10, 4) == [3, 3, 2, 2]
    # parameters with sparse gradients leave the plan, and the groups
    assert plan_without(sizes, 32, None, {1, 3}) == [[4, 2], [0]]
    assert plan_without(sizes, 10**6, [[0, 3], [1]], {1, 3}) == [[4, 2], [0]]
    assert plan_without(sizes, 10**6, [[1, 3]], set()) == plan_groups(sizes, 10**6, [[1, 3]])
    # a group's members past a skipped parameter are renumbered, then numbered back
    assert plan_without(sizes, 10**6, [[2, 4]], {1}) == [[4, 2], [3, 0]]


def test_calls_describe_themselves_and_agree_by_key():
    a = Call("allreduce", "loss", "Average", torch.float32, (4,), ((4,), ""))
    b = Call("allgather", None, None, torch.float32, (2, 3), ((3,), ""))
    assert a.describe() == "allreduce(name='loss', op=Average, float32[4])"
    assert b.describe() == "allgather(float32[2, 3])"
    assert a.key() != b.key() and a.key() == dataclasses.replace(a).key()
    assert dataclasses.replace(a, agree=((5,), "")).key() != a.key()  # hashed per Call
    assert 0 <= a.key() < 2**62


def test_process_set_misuse_is_a_one_line_error():
    with pytest.raises(UsageError, match="list of integer ranks"):
        sync.ProcessSet(["a"])
    with pytest.raises(UsageError, match="distinct"):
        sync.ProcessSet([1, 1])
    assert sync.ProcessSet([2, 0]).ranks == [0, 2]
    assert sync.ProcessSet([0]).size() is None  # not registered yet
    with pytest.raises(UsageError, match="add_process_set.*before"):
        sync.add_process_set([0])


# ---------------------------------------------------------------- both backends

def _value(r: int, *shape: int, dtype=torch.float32) -> torch.Tensor:
    """Small integers that differ by rank: sums and averages are exact in float."""
    n = 1
    for s in shape:
        n *= s
    return ((torch.arange(n) % 7) + 3 * r).to(dtype).reshape(shape)


def _grad_of(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    out = fn(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    (out * torch.arange(out.numel()).reshape(out.shape).to(out.dtype)).sum().backward()
    return x.grad


def _exercise(hvd) -> dict:
    """Call every name; return what each gave (compared between the two backends)."""
    r, n = hvd.rank(), hvd.size()
    out: dict = {}
    out["world"] = (hvd.size(), hvd.rank(), hvd.local_size(), hvd.local_rank(),
                    hvd.cross_size(), hvd.cross_rank(), hvd.is_initialized(),
                    hvd.mpi_threads_supported(), hvd.mpi_enabled(), hvd.mpi_built(),
                    hvd.gloo_enabled(), hvd.cuda_built(), hvd.rocm_built(), hvd.ccl_built(),
                    hvd.ddl_built(), hvd.nccl_built())
    t = _value(r, 5, 2)
    out["allreduce"] = [hvd.allreduce(t, op=op) for op in
                        (hvd.Average, hvd.Sum, hvd.Min, hvd.Max)]
    out["allreduce.int"] = [hvd.allreduce(_value(r, 6, dtype=torch.int64), op=op)
                            for op in (hvd.Average, hvd.Product)]
    out["allreduce.scaled"] = hvd.allreduce(t, op=hvd.Sum, prescale_factor=2.0,
                                            postscale_factor=0.25)
    out["allreduce.grad"] = _grad_of(lambda x: hvd.allreduce(x, op=hvd.Sum), t)
    u = t.clone()
    hvd.allreduce_(u, op=hvd.Sum)
    out["allreduce_"] = u
    h1 = hvd.allreduce_async(t, name="a")
    v = t.clone()
    h2 = hvd.allreduce_async_(v, name="b", op=hvd.Max)
    out["allreduce_async"] = (hvd.synchronize(h1), hvd.synchronize(h2), v)
    group = [_value(r, 3), _value(r, 2, 2, dtype=torch.float64), _value(r, 4, dtype=torch.int32)]
    out["grouped_allreduce"] = hvd.grouped_allreduce(group, op=hvd.Sum)
    out["grouped_allreduce.avg"] = hvd.grouped_allreduce(group[:2])
    copies = [g.clone() for g in group]
    out["grouped_allreduce_"] = (hvd.grouped_allreduce_(copies, op=hvd.Sum), copies)
    h = hvd.grouped_allreduce_async(group, op=hvd.Sum)
    copies = [g.clone() for g in group]
    h_ = hvd.grouped_allreduce_async_(copies, op=hvd.Max)
    out["grouped_allreduce_async"] = (hvd.synchronize(h), hvd.synchronize(h_), copies)
    mine = _value(r, r + 1, 3)
    out["allgather"] = (hvd.allgather(mine), hvd.synchronize(hvd.allgather_async(mine)))
    out["allgather.grad"] = _grad_of(hvd.allgather, mine)
    pair = [_value(r, r + 1), _value(r, 2, 2, dtype=torch.int64)]
    out["grouped_allgather"] = (hvd.grouped_allgather(pair),
                                hvd.synchronize(hvd.grouped_allgather_async(pair)))
    root = n - 1
    out["broadcast"] = (hvd.broadcast(t, root), hvd.synchronize(hvd.broadcast_async(t, 0)))
    b = t.clone()
    hvd.broadcast_(b, root)
    b2 = t.clone()
    hvd.synchronize(hvd.broadcast_async_(b2, 0))
    out["broadcast_"] = (b, b2)
    out["broadcast.grad"] = _grad_of(lambda x: hvd.broadcast(x, root), t)
    rows = _value(r, 2 * n, 3)
    out["alltoall"] = hvd.alltoall(rows)
    splits = torch.tensor([(k + r) % 3 for k in range(n)], dtype=torch.int32)
    uneven = _value(r, int(splits.sum()), 2)
    out["alltoall.splits"] = hvd.alltoall(uneven, splits=splits)
    out["alltoall_async"] = hvd.synchronize(hvd.alltoall_async(uneven, splits=splits))
    out["alltoall.grad"] = _grad_of(lambda x: hvd.alltoall(x, splits=splits), uneven)
    scatter = _value(r, 2 * n + 1, 2)
    out["reducescatter"] = [hvd.reducescatter(scatter, op=op) for op in (hvd.Average, hvd.Sum)]
    out["reducescatter.int"] = hvd.reducescatter(_value(r, n + 1, dtype=torch.int64))
    out["reducescatter.scaled"] = hvd.reducescatter(scatter, op=hvd.Sum, prescale_factor=2.0,
                                                    postscale_factor=0.5)
    out["reducescatter.grad"] = _grad_of(lambda x: hvd.reducescatter(x, op=hvd.Sum), scatter)
    out["reducescatter_async"] = hvd.synchronize(hvd.reducescatter_async(scatter, op=hvd.Sum))
    pair = [_value(r, n + 2, 2), _value(r, 2 * n, dtype=torch.float64)]
    out["grouped_reducescatter"] = (
        hvd.grouped_reducescatter(pair, op=hvd.Sum),
        hvd.synchronize(hvd.grouped_reducescatter_async(pair)))
    out["objects"] = (hvd.broadcast_object({"r": r}, root_rank=root),
                      hvd.allgather_object(("r", r)))
    offset = r  # by value (cloudpickle): the root's closure, called on every rank
    out["objects.closures"] = (hvd.broadcast_object(lambda x: 10 * x + offset, root)(r),
                               [f(1) for f in hvd.allgather_object(lambda x: x + offset)])
    hvd.barrier()
    out["barrier"] = True
    indices = torch.tensor([[r % 4, (r + 1) % 4]])
    sparse = torch.sparse_coo_tensor(indices, torch.tensor([1.0, 2.0]), (4,))
    out["sparse_allreduce_async"] = hvd.sparse_allreduce_async(sparse, "s", hvd.Sum)() \
        .to_dense()
    out["join"] = _join_uneven(hvd)
    out["optimizer"] = _optimizer_variants(hvd)
    out["optimizer.sparse"] = _sparse_gradients(hvd)
    out["process_set"] = _process_sets(hvd)
    return out


def _join_uneven(hvd) -> tuple:
    """Rank 0 allreduces twice while the others have joined; everyone then joins."""
    r = hvd.rank()
    results = []
    if r == 0:
        results = [hvd.allreduce(torch.tensor([4.0, 8.0]), name="j1"),
                   hvd.allreduce(torch.tensor([2.0]), name="j2", op=hvd.Sum)]
    last = hvd.join()
    results = hvd.broadcast_object(results, root_rank=0)
    return last, results


def _optimizer_variants(hvd) -> list:
    r = hvd.rank()
    grads = []
    for kwargs in ({"groups": 2}, {"num_groups": 3}, {"groups": "layers"},
                   {"sparse_as_dense": True}):
        torch.manual_seed(0)
        sparse = "sparse_as_dense" in kwargs  # Horovod's groups do not take sparse gradients
        model = nn.Sequential(nn.Embedding(6, 3, sparse=sparse), nn.Flatten(), nn.Linear(6, 2))
        if kwargs.get("groups") == "layers":
            kwargs = {"groups": [list(model[0].parameters()), list(model[2].parameters())]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                           named_parameters=model.named_parameters(), **kwargs)
        x = torch.tensor([[r % 6, (r + 2) % 6], [1, 5]])
        model(x).pow(2).sum().backward()
        opt.step()
        grads.append([p.detach().clone() for p in model.parameters()])
    return grads


def _sparse_gradients(hvd) -> list:
    """An embedding with sparse gradients under SGD and SparseAdam, their state broadcast,
    three steps each (the first reduces it beside the dense buckets, the next ones after
    they are planned again): the parameters, and each step's embedding gradient."""
    r = hvd.rank()
    got = []
    for make in (lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
                 lambda m: torch.optim.SparseAdam(list(m[0].parameters()), lr=0.1)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(8, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2))
        opt = hvd.DistributedOptimizer(make(model), named_parameters=model.named_parameters())
        hvd.broadcast_optimizer_state(opt, root_rank=0)  # a fresh SparseAdam's: sparse zeros
        for step in range(3):
            opt.zero_grad()
            model(torch.tensor([[(r + step) % 8, (3 * r + 1) % 8], [1, 5]])).pow(2).sum() \
                .backward()
            opt.step()
            grad = model[0].weight.grad
            got.append((grad.is_sparse, grad.to_dense()))
        got.append([p.detach().clone() for p in model.parameters()])
    return got


def _process_sets(hvd) -> dict:
    """Even and odd ranks as two sets; collectives and an optimizer within each."""
    r, n = hvd.rank(), hvd.size()
    even = hvd.add_process_set(range(0, n, 2))
    odd = hvd.add_process_set(hvd.ProcessSet(range(1, n, 2)))
    mine = even if r % 2 == 0 else odd
    out = {"ids": (even.process_set_id > 0, odd.process_set_id > 0,
                   even.process_set_id != odd.process_set_id),
           "mine": (mine.size(), mine.rank(), mine.included(), even.ranks, odd.ranks,
                    hvd.global_process_set.ranks, hvd.global_process_set.size(),
                    hvd.global_process_set.rank(), hvd.global_process_set.included())}
    # Named: Horovod names unnamed calls by handle number, which the join above, where
    # rank 0 made two calls more than the others, leaves different between ranks.
    t = _value(r, 3)
    out["allreduce"] = hvd.allreduce(t, op=hvd.Sum, name="ps.a", process_set=mine)
    out["allgather"] = hvd.allgather(_value(r, 1, 2), name="ps.g", process_set=mine)
    out["broadcast"] = hvd.broadcast(t, mine.ranks[-1], name="ps.b", process_set=mine)
    out["grouped"] = hvd.grouped_allreduce([t, t.double()], name="ps.ga", process_set=mine)
    out["reducescatter"] = hvd.reducescatter(_value(r, 4), name="ps.rs", op=hvd.Sum,
                                             process_set=mine)
    out["alltoall"] = hvd.alltoall(_value(r, 2 * mine.size()), name="ps.aa", process_set=mine)
    out["object"] = hvd.broadcast_object(r, root_rank=mine.ranks[0], process_set=mine)
    hvd.barrier(process_set=mine)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0),
                                   named_parameters=model.named_parameters(), process_set=mine)
    model(_value(r, 2, 3)).sum().backward()
    opt.step()
    out["optimizer"] = [p.detach().clone() for p in model.parameters()]
    ids = [even.process_set_id, odd.process_set_id]
    out["removed"] = (hvd.remove_process_set(even), hvd.remove_process_set(odd),
                      hvd.remove_process_set(hvd.global_process_set))
    # A removed set's id is used again, the first removed first (hpctrain's were new ones).
    again = [hvd.add_process_set(range(1, n, 2)), hvd.add_process_set(range(0, n, 2))]
    out["ids again"] = [ps.process_set_id for ps in again] == ids
    for ps in again:
        hvd.remove_process_set(ps)
    return out


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_process_sets_from_communicators(hvd):
    """Sets from split communicators; from one that is MPI.COMM_NULL outside the set, where
    those ranks raised alone and the members hung in the split; and a duplicate, found only
    on the ranks holding it (the others hung)."""
    from mpi4py import MPI

    r, n = hvd.rank(), hvd.size()
    alone = hvd.add_process_set(hvd.ProcessSet(MPI.COMM_WORLD.Split(0 if r == 0 else
                                                                    MPI.UNDEFINED, r)))
    assert alone.ranks == [0] and alone.included() == (r == 0)
    if r == 0:
        assert hvd.allreduce(torch.ones(1), op=hvd.Sum, name="comm.a",
                             process_set=alone).item() == 1
    with pytest.raises(ValueError, match="duplicate process set"):  # [0] and the rest
        hvd.add_process_set(hvd.ProcessSet(MPI.COMM_WORLD.Split(min(r, 1), r)))
    if n > 2:  # else [0] again
        mine = hvd.add_process_set(hvd.ProcessSet(MPI.COMM_WORLD.Split(r % 2, r)))
        assert mine.ranks == list(range(r % 2, n, 2))
        total = hvd.allreduce(torch.tensor([float(r)]), op=hvd.Sum, name="comm.b",
                              process_set=mine)
        assert total.item() == sum(range(r % 2, n, 2))
    hvd.barrier()


OWN = ("mpi", "mpi-staged", "torch")  # hpctrain's backends, as the tests run them


@pytest.fixture(scope="module")
def results():
    """{backend: _exercise's results}, Horovod's only where it can be imported."""
    torch.set_num_threads(1)
    got = {}
    for backend in (*OWN, "horovod"):
        if backend == "horovod" and horovod_missing():
            continue
        with pytest.MonkeyPatch.context() as patch:
            if backend == "mpi-staged":
                patch.setattr(MPITransport, "takes", lambda self, tensor: False)
            sync.init(backend=backend.removesuffix("-staged"))
            try:
                got[backend] = _exercise(sync)
            finally:
                sync.shutdown()
    return got


def _same(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a} vs {b}"
        # Gradients are arbitrary floats: averaged in another order they differ in the last bit.
        tol = {"rtol": 1e-6, "atol": 1e-7} if "optimizer" in path else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(a, b, msg=path, **tol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a} vs {b}"
        assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


NAMES = ["world", "allreduce", "allreduce.int", "allreduce.scaled", "allreduce.grad",
         "allreduce_", "allreduce_async", "grouped_allreduce", "grouped_allreduce.avg",
         "grouped_allreduce_", "grouped_allreduce_async", "allgather", "allgather.grad",
         "grouped_allgather", "broadcast", "broadcast_", "broadcast.grad", "alltoall",
         "alltoall.splits", "alltoall_async", "alltoall.grad", "reducescatter",
         "reducescatter.int", "reducescatter.scaled", "reducescatter.grad",
         "reducescatter_async", "grouped_reducescatter", "objects", "objects.closures", "barrier",
         "sparse_allreduce_async", "join", "optimizer", "optimizer.sparse", "process_set"]
mpi = pytest.mark.mpi(min_size=2)


@mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", OWN)
@pytest.mark.parametrize("name", NAMES)
def test_same_results_as_horovod(results, name, backend):
    reference = "horovod" if "horovod" in results else "mpi"
    if backend == reference:  # no Horovod to hold the mpi backend against: why not
        pytest.skip(horovod_missing() or "the reference itself")
    got, want = results[backend][name], results[reference][name]
    if name == "world" and backend == "torch":  # gloo moves the bytes, not MPI
        import torch.distributed as dist

        # mpi_enabled, mpi_built, gloo_enabled; nccl_built
        assert got[8:11] == (False, True, dist.is_gloo_available())
        assert isinstance(got[-1], int) and bool(got[-1]) == dist.is_nccl_available()
        got, want = got[:8] + got[11:15], want[:8] + want[11:15]
    _same(got, want, name)


@mpi
@pytest.mark.timeout(120)
def test_results_are_the_documented_values(results):
    """Independently of Horovod: a few values worked out by hand."""
    got, n, r = results["mpi"], comm.size(), comm.rank()
    total = sum(_value(k, 5, 2) for k in range(n))
    torch.testing.assert_close(got["allreduce"][0], total / n)
    last, (avg, summed) = got["join"]
    assert last == 0  # rank 0 joined last
    torch.testing.assert_close(avg, torch.tensor([4.0, 8.0]) / n)  # zeros, counted in size
    torch.testing.assert_close(summed, torch.tensor([2.0]))
    rows = scatter_rows(2 * n + 1, n)
    start = sum(rows[:r])
    full = sum(_value(k, 2 * n + 1, 2) for k in range(n))
    torch.testing.assert_close(got["reducescatter"][1], full[start:start + rows[r]])
    out, received = got["alltoall.splits"]
    assert received.tolist() == [(r + k) % 3 for k in range(n)]
    assert out.shape == (sum(received.tolist()), 2)
    assert got["objects.closures"] == (10 * r + n - 1, [1 + k for k in range(n)])


# ---------------------------------------------------------------- mpi backend behaviour

@pytest.fixture
def hvd():
    torch.set_num_threads(1)
    sync.init()
    yield sync
    sync.shutdown()


@mpi
@pytest.mark.timeout(60)
def test_join_with_uneven_batches_averages_over_all_ranks(hvd):
    """Rank r trains r + 1 batches; each step averages the active ranks' gradients over the
    full size (joined ranks send zeros), which one process reproduces."""
    r, n = hvd.rank(), hvd.size()

    def batch(k, step):
        g = torch.Generator().manual_seed(100 * k + step)
        return torch.randn(4, 3, generator=g, dtype=torch.float64)

    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    ref = nn.Linear(3, 1).double()
    ref.load_state_dict(model.state_dict())
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())
    for step in range(r + 1):
        opt.zero_grad()
        model(batch(r, step)).pow(2).mean().backward()
        opt.step()
    assert hvd.join() == n - 1
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(r + 1):  # a rank's model stops changing when it joins
        ref_opt.zero_grad()
        for k in range(step, n):  # ranks k >= step still have a batch
            (ref(batch(k, step)).pow(2).mean() / n).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def _embedding_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"emb": nn.Embedding(10, 4, sparse=True), "out": nn.Linear(4, 1)})


def _embedding_loss(model: nn.Module, tokens: torch.Tensor | None) -> torch.Tensor:
    """The embedding takes part only when there are tokens (else its gradient is None)."""
    x = model["emb"](tokens).mean(0) if tokens is not None else torch.ones(4)
    return model["out"](x).pow(2).sum()


@mpi
@pytest.mark.timeout(60)
def test_sparse_gradients_are_the_average_of_every_ranks_and_leave_the_buckets(hvd):
    """Each step's sparse gradient equals the allreduced dense one, also when a rank's
    embedding was not used (its gradient None); from the second step the embedding is no
    longer in a fused bucket."""
    r, n = hvd.rank(), hvd.size()
    model, alone = _embedding_model(), _embedding_model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())
    dense_bytes = 4 * (4 + 1)
    assert sum(opt.bucket_sizes) == 4 * 40 + dense_bytes
    for tokens in ([r, 9 - r, r], None if r == 1 else [r + 1], [7]):
        tokens = None if tokens is None else torch.tensor(tokens)
        opt.zero_grad()
        _embedding_loss(model, tokens).backward()
        kept = model["emb"].weight.grad  # as in Horovod, the reduction is written into it
        opt.step()
        assert kept is None or kept is model["emb"].weight.grad
        alone.zero_grad()
        _embedding_loss(alone, tokens).backward()
        own = alone["emb"].weight.grad
        want = hvd.allreduce(torch.zeros(10, 4) if own is None else own.to_dense())
        got = model["emb"].weight.grad
        assert got.is_sparse
        torch.testing.assert_close(got.to_dense(), want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(model["out"].weight.grad,
                                   hvd.allreduce(alone["out"].weight.grad))
        with torch.no_grad():  # keep the two models' parameters the same
            for p, q in zip(alone.parameters(), model.parameters(), strict=True):
                p.copy_(q)
        assert sum(opt.bucket_sizes) == dense_bytes
    assert n >= 2


@mpi
@pytest.mark.timeout(60)
def test_a_gradient_sparse_on_some_ranks_only_is_one_error(hvd):
    """At the first step rank 1 leaves the embedding out (None gradient) while the others
    reduce it sparse: one error on every rank, no hang (Horovod would mismatch too)."""
    r = hvd.rank()
    model = _embedding_model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())
    _embedding_loss(model, None if r == 1 else torch.tensor([r])).backward()
    with pytest.raises(sync.CollectiveMismatchError) as e:
        opt.step()
    assert "rank 0 called DistributedOptimizer.step(sparse gradients: emb.weight)" in str(e.value)


@mpi
@pytest.mark.timeout(60)
def test_sparse_gradients_while_ranks_have_joined(hvd):
    """Rank 0 steps twice after the others joined: its sparse gradient divided by the full
    size (the joined ranks add no entries). Then every rank steps once more, on the plan
    the joined ranks followed."""
    r, n = hvd.rank(), hvd.size()
    model, alone = _embedding_model(), _embedding_model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())
    if r == 0:
        for tokens in ([1, 2], [3]):
            for m in (model, alone):
                m.zero_grad()
                _embedding_loss(m, torch.tensor(tokens)).backward()
            opt.step()
            torch.testing.assert_close(model["emb"].weight.grad.to_dense(),
                                       alone["emb"].weight.grad.to_dense() / n)
            alone.load_state_dict(model.state_dict())
    assert hvd.join() == 0
    opt.zero_grad()
    _embedding_loss(model, torch.tensor([r])).backward()
    opt.step()
    assert model["emb"].weight.grad.is_sparse and sum(opt.bucket_sizes) == 4 * 5


@mpi
@pytest.mark.timeout(60)
def test_collectives_in_opposite_order_raise_one_error_naming_both(hvd):
    r = hvd.rank()
    first = (lambda: hvd.allreduce(torch.ones(4), name="grads")) if r % 2 == 0 else \
        (lambda: hvd.allgather(torch.ones(2, 3), name="rows"))
    with pytest.raises(sync.CollectiveMismatchError) as e:
        first()
    message = str(e.value)
    assert "\n" not in message
    assert "rank 0 called allreduce(name='grads', op=Average, float32[4])" in message
    assert "rank 1 called allgather(name='rows', float32[2, 3])" in message
    # the error left the ranks in step: the next collective works
    assert hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum).item() == hvd.size()


@mpi
@pytest.mark.timeout(60)
def test_unsupported_call_while_a_rank_has_joined_is_an_error(hvd):
    if hvd.rank() == 0:
        with pytest.raises(sync.HorovodInternalError, match="allgather is not supported while"):
            hvd.allgather(torch.ones(1))
        hvd.barrier()  # barrier is supported, as in Horovod
    assert hvd.join() == 0


@mpi
@pytest.mark.timeout(60)
def test_stall_check_names_the_late_rank_and_its_last_call(capfd):
    torch.set_num_threads(1)
    sync.init(stall_check_s=0.5)
    try:
        r = sync.rank()
        # Untimed (no stall check): ranks that start more than 0.5 s apart (4 on 2 cores)
        # would otherwise be reported in "before" too.
        comm.mpi().COMM_WORLD.Barrier()
        sync.allreduce(torch.ones(1), name="before")
        if r == 1:
            time.sleep(3)
        sync.allreduce(torch.ones(2), name="late")
    finally:
        sync.shutdown()
    err = capfd.readouterr().err
    # Only the reports of the wait for "late" (one that starts late in "before" is the
    # machine's, not the test's).
    late = [ln for ln in err.splitlines()
            if ln.startswith("hpctrain.sync: stall:") and "allreduce(name='late'" in ln]
    if r == 0:
        # rank 0, the lowest waiting rank, reports (again every check time while it waits)
        assert late and all(ln.startswith("hpctrain.sync: stall: rank 0") for ln in late), err
        assert "rank 1 (last called allreduce(name='before', op=Average, float32[1])" \
            in late[0], err
    if r == 1:
        assert late == [], err  # the late rank waits for nobody


# A script that starts MPI below thread level multiple, then the backend.
SERIALIZED = """
import sys, hpctrain.comm, hpctrain.sync as hvd
hpctrain.comm.init("serialized")
hvd.init(**({"stall_check_s": 2, "stall_timeout": 5} if sys.argv[1] == "asked" else {}))
hvd.barrier()
print("END", hvd.rank(), flush=True)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("asked, env, warned", [
    ("asked", {}, "(a report after 2 s, the job ended after 5 s)"),
    ("default", {"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "7"},
     "(a report after 60 s, the job ended after 7 s)"),
    ("default", {}, None),
])
def test_a_stall_check_asked_for_below_thread_level_multiple_is_a_warning(asked, env, warned):
    """hvd.init(stall_check_s=2, stall_timeout=5) after comm.init("serialized") checked
    nothing and said nothing: a stuck rank then hung for ever. Rank 0 says it once; the
    check left to its default says nothing."""
    proc = run_program([sys.executable, "-c", SERIALIZED, asked], np=2, env=env)
    assert proc.returncode == 0 and proc.stdout.count("END") == 2, proc.stderr
    said = [ln for ln in proc.stderr.splitlines() if "stall check" in ln]
    if warned is None:
        assert said == [], proc.stderr
        return
    assert said == [f"hpctrain.sync: warning: the stall check asked for {warned} does not "
                    "run: it needs MPI thread level 'multiple', and MPI runs at 'serialized'; "
                    "call hpctrain.comm.init('multiple') before anything starts MPI"]


@mpi
@pytest.mark.timeout(60)
def test_timeline_is_chrome_trace_json_with_the_phases(hvd, tmp_path_factory):
    path = hvd.broadcast_object(str(tmp_path_factory.mktemp("tl") / "timeline.json"))
    hvd.start_timeline(path)
    hvd.allreduce(torch.ones(3), name="x")
    hvd.synchronize(hvd.allgather_async(torch.ones(2), name="g"))
    hvd.stop_timeline()
    if hvd.rank() != 0:
        return
    events = json.load(open(path))
    rows = {e["args"]["name"] for e in events if e.get("name") == "process_name"
            and "name" in e.get("args", {})}
    assert {"allreduce.x", "allgather.g"} <= rows
    names = [e.get("name") for e in events if e.get("ph") == "B"]
    for phase in ("NEGOTIATE_ALLREDUCE", "ALLREDUCE", "MPI_ALLREDUCE", "NEGOTIATE_ALLGATHER",
                  "MPI_ALLGATHER"):
        assert phase in names
    begins = sum(e.get("ph") == "B" for e in events)
    assert begins == sum(e.get("ph") == "E" for e in events)


@mpi
@pytest.mark.timeout(60)
def test_mpi_ops_names_run_on_the_backend(own_backend):
    from hpctrain.sync.functions import allgather_object
    from hpctrain.sync.mpi_ops import Sum, allreduce, is_homogeneous

    assert is_homogeneous()  # every rank on this one node
    assert allreduce(torch.ones(2), op=Sum).tolist() == [own_backend.size()] * 2
    assert allgather_object(own_backend.rank()) == list(range(own_backend.size()))


@mpi
@pytest.mark.timeout(60)
def test_an_optimizers_timeline_rows_do_not_grow_with_its_steps(hvd, tmp_path_factory):
    """Its step's agreement round, unnamed, got a row of its own every step
    (``DistributedOptimizer.step.noname.<n>``), as did the two of its construction: 20 steps
    gave 23 rows, a long run tens of thousands. Now a row per bucket and one for each kind of
    round, their phases repeated."""
    path = hvd.broadcast_object(str(tmp_path_factory.mktemp("tl") / "timeline.json"))
    hvd.start_timeline(path)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), groups=2)
    for _ in range(5):
        opt.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
    hvd.stop_timeline()
    if hvd.rank() != 0:
        return
    events = json.load(open(path))
    rows = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"
            and "name" in e.get("args", {})}
    assert sorted(rows.values()) == ["DistributedOptimizer", "DistributedOptimizer.step",
                                     "allreduce.DistributedOptimizer.bucket0",
                                     "allreduce.DistributedOptimizer.bucket1"]
    phases = [(rows[e["pid"]], e["name"]) for e in events if e.get("ph") == "B"]
    assert phases.count(("DistributedOptimizer", "NEGOTIATE_DISTRIBUTEDOPTIMIZER")) == 2
    assert phases.count(("DistributedOptimizer.step",
                         "NEGOTIATE_DISTRIBUTEDOPTIMIZER.STEP")) == 5
    assert phases.count(("allreduce.DistributedOptimizer.bucket1", "ALLREDUCE")) == 5


@mpi
@pytest.mark.timeout(120)
def test_resnet_with_sync_batchnorm_trains_like_one_process_on_the_union(hvd):
    """ResNet-20 with norm_layer=hvd.SyncBatchNorm, 2 steps: outputs, batch statistics and
    weights equal nn.BatchNorm2d's in one process on all ranks' batches."""
    r, n = hvd.rank(), hvd.size()

    def batch(k, step):
        g = torch.Generator().manual_seed(10 * k + step)
        return (torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64),
                torch.randint(0, 10, (3,), generator=g))

    torch.manual_seed(0)
    model = ResNet20(norm_layer=hvd.SyncBatchNorm).double()
    torch.manual_seed(0)
    ref = ResNet20().double()
    ref.load_state_dict(model.state_dict())
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                   named_parameters=model.named_parameters())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step in range(2):
        x, y = batch(r, step)
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out, y).backward()
        opt.step()
        xs, ys = zip(*(batch(k, step) for k in range(n)), strict=True)
        ref_opt.zero_grad()
        ref_out = ref(torch.cat(xs))
        F.cross_entropy(ref_out, torch.cat(ys)).backward()
        ref_opt.step()
        torch.testing.assert_close(out, ref_out[3 * r:3 * r + 3], rtol=1e-9, atol=1e-10)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    model.eval()
    ref.eval()
    x, _ = batch(r, 9)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-9, atol=1e-10)


@mpi
@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sync_batchnorm_of_half_precision_inputs_sums_in_float32(hvd, dtype):
    """Statistics in the input's dtype: a count above 65504 was inf in fp16, and with it the
    output and running variance NaN (autocast's convolutions give fp16). Now float32 sums,
    the output in the input's dtype, as nn.BatchNorm2d on the union of the batches."""
    r, n = hvd.rank(), hvd.size()
    batches = [torch.randn(24, 2, 56, 56, generator=torch.Generator().manual_seed(k)) * 3 + 1
               for k in range(n)]
    bn, ref = hvd.SyncBatchNorm(2), nn.BatchNorm2d(2)
    x = batches[r].to(dtype).requires_grad_()
    out = bn(x)
    out.float().square().sum().backward()
    union = torch.cat([b.to(dtype).float() for b in batches]).requires_grad_()
    ref_out = ref(union)
    ref_out.square().sum().backward()
    assert out.dtype == dtype and x.grad.dtype == dtype
    rows = slice(24 * r, 24 * r + 24)
    tol = {"rtol": 2e-2, "atol": 2e-2}  # the output's own rounding
    torch.testing.assert_close(out.float(), ref_out[rows], **tol)
    torch.testing.assert_close(x.grad.float(), union.grad[rows], **tol)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the example scripts

def _run_example(script: str) -> subprocess.CompletedProcess:
    """``mpirun -np 2 python examples/<script>``, this checkout's hpctrain first on the path."""
    return run_program([sys.executable, str(ROOT / "examples" / script)], np=2, timeout=90,
                       env={"PYTHONPATH": str(ROOT)})


# One launch per backend for the two timeline tests below: `hpctrain train --algo ssgd` (the
# job's code, hpctrain.cli.main) under HOROVOD_TIMELINE from the launch, then a script's own
# timeline that it never closes.
TIMELINE_JOB = """
import os, sys, torch
import hpctrain.sync as hvd
from hpctrain import cli

out, backend = sys.argv[1], sys.argv[2]
cli.main(["train", "--algo", "ssgd", *sys.argv[3:], "--sync-backend", backend,
          "--out", f"{out}/run"])
del os.environ["HOROVOD_TIMELINE"]  # read by init(): the next one starts none of its own
hvd.init(backend=backend)
hvd.start_timeline(f"{out}/timeline{hvd.rank()}.json")
hvd.allreduce(torch.ones(4), name="x")
"""  # and ends without shutdown(), as Horovod scripts do


@pytest.fixture(scope="module")
def timeline_job(tmp_path_factory):
    """TIMELINE_JOB on 2 ranks, run once per backend: its launch and folder."""
    @functools.cache
    def get(backend: str):
        out = tmp_path_factory.mktemp(f"timeline-{backend}")
        script = out / "job.py"
        script.write_text(TIMELINE_JOB)
        env = {"PYTHONPATH": str(ROOT), "HOROVOD_TIMELINE": str(out / "ssgd-timeline.json")}
        proc = run_program([sys.executable, str(script), str(out), backend, *SYNTHETIC,
                            "--epochs", "1"], np=2, timeout=110, env=env)
        return proc, out
    return get


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["mpi", "torch"], ids=["mpi-backend", "torch-backend"])
def test_a_script_that_never_calls_shutdown_leaves_a_closed_timeline(timeline_job, backend):
    """shutdown() runs at exit, as Horovod's does: before, the timeline stayed open (not
    JSON) when a script ended without it."""
    proc, out = timeline_job(backend)
    assert proc.returncode == 0, proc.stderr
    events = json.loads((out / "timeline0.json").read_text())  # rank 0 writes it
    assert any(e.get("args", {}).get("shape") == "[4]" for e in events)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["mpi", "torch"], ids=["mpi-backend", "torch-backend"])
def test_horovod_timeline_variable_gives_ssgd_a_timeline(timeline_job, backend):
    """HOROVOD_TIMELINE=FILE starts the timeline at init, as in Horovod: here for
    ``hpctrain train --algo ssgd``, whose gradient buckets it shows; closed at the end."""
    proc, out = timeline_job(backend)
    assert proc.returncode == 0, proc.stderr
    events = json.loads((out / "ssgd-timeline.json").read_text())
    phases = {e.get("name") for e in events if e.get("ph") == "B"}
    wire = "MPI_ALLREDUCE" if backend == "mpi" else "TORCH_ALLREDUCE"
    assert {"NEGOTIATE_DISTRIBUTEDOPTIMIZER.STEP", "ALLREDUCE", wire} <= phases
    rows = {e["args"].get("name") for e in events if e.get("name") == "process_name"}
    assert "allreduce.DistributedOptimizer.bucket0" in rows  # a row per fusion bucket
    updates = json.loads((out / "run" / "summary.json").read_text())["updates"]
    assert sum(e.get("name") == wire and e["ph"] == "B" for e in events) >= updates  # buckets
    assert not any(e.get("args", {}).get("shape") == "[4]" for e in events)  # the script's own


@mpi
@pytest.mark.timeout(120)
def test_example_with_uneven_batches_finishes_with_join(capsys):
    """Run in this mpirun's processes (runpy), not as a job of its own."""
    torch.set_num_threads(1)
    try:
        runpy.run_path(str(ROOT / "examples" / "horovod_join.py"), run_name="__main__")
    finally:
        sync.shutdown()
    r, n = comm.rank(), comm.size()
    assert (f"rank {r}: {3 + r} batches, joined; the last rank to join was {n - 1}"
            in capsys.readouterr().out)


@pytest.mark.timeout(120)
def test_example_with_collectives_in_opposite_order_ends_with_one_line():
    done = _run_example("horovod_mismatch.py")
    assert done.returncode != 0
    lines = [x for x in done.stderr.splitlines() if "CollectiveMismatchError" in x]
    assert lines, done.stderr
    assert ("ranks called different collectives at call #1 on process set 0: rank 0 called "
            "allreduce(name='loss', op=Average, float32[1]), rank 1 called "
            "allgather(name='grads', float32[4, 3])") in lines[0]
    assert "not reached" not in done.stdout


@pytest.mark.timeout(120)
def test_example_with_a_stuck_rank_is_ended_by_the_stall_timeout():
    done = _run_example("horovod_stall_timeout.py")
    assert done.returncode == EXIT_STATUS, done.stderr
    report = [x for x in done.stderr.splitlines() if "ending the job" in x]
    assert report and "rank 0 waited" in report[0], done.stderr
    assert "rank 1 (last called allreduce(name='warmup'" in report[0]


NODE_LOCAL_TIMELINE = """
import os, sys, torch
from mpi4py import MPI
import hpctrain.sync as hvd
rank = MPI.COMM_WORLD.Get_rank()  # rank 1's node lacks the folder rank 0 writes into
os.environ["HOROVOD_TIMELINE"] = sys.argv[1] if rank == 0 else "/nonexistent/t.json"
hvd.init()
hvd.allreduce(torch.ones(2))
"""


@pytest.mark.timeout(120)
def test_a_refusal_on_one_rank_at_init_ends_the_job(tmp_path):
    """Rank 1 refused the timeline before hpctrain's abort hook was in place: it went into
    MPI_Finalize at exit while rank 0 waited in init's first collective, forever."""
    script = tmp_path / "job.py"
    script.write_text(NODE_LOCAL_TIMELINE)
    proc = run_program([sys.executable, str(script), str(tmp_path / "t.json")], np=2,
                       timeout=90, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert "hpctrain: error (rank 1 of 2): HOROVOD_TIMELINE /nonexistent/t.json: cannot " \
           "write a file there" in proc.stderr


@mpi
@pytest.mark.timeout(60)
def test_init_takes_horovods_dynamic_and_start_timeline_checks_its_path():
    """Horovod's ``init(process_sets="dynamic")`` was refused as not a list; Horovod's list of
    ranks as ``comm`` crashed the torch backend; a timeline path rank 0 cannot write was an
    OSError there mid-job, not one line."""
    with pytest.raises(UsageError, match="list of hpctrain.sync.ProcessSet or 'dynamic', got "
                                         "'static'"):
        sync.init(process_sets="static")
    for backend in ("mpi", "torch"):  # Horovod's ranks as comm: the torch backend crashed
        with pytest.raises(UsageError, match=r"^comm=\[0, 1\]: a list of ranks is taken by "):
            sync.init(comm=[0, 1], backend=backend)
    sync.init(process_sets="dynamic")
    try:
        assert sync.allreduce(torch.ones(2), op=sync.Sum).tolist() == [sync.size()] * 2
        if sync.rank() == 0:
            with pytest.raises(UsageError, match="start_timeline /nonexistent/t.json: cannot"):
                sync.start_timeline("/nonexistent/t.json")
        else:  # only rank 0 writes it: a folder on rank 0's node only is enough
            sync.start_timeline("/nonexistent/t.json")
            sync.stop_timeline()
    finally:
        sync.shutdown()
