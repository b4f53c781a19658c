"""``op=Adasum`` on every backend, against Horovod's own reference: a binary tree of pairwise
Adasums in rank order, computed in numpy in one process from every rank's tensors.

Single-process tests: the halving plan. MPI tests (np 2 and 4; Adasum needs 2^m ranks): the
mpi and torch backends, the mpi backend staged through host copies, and real Horovod, which
checks that the reference is Horovod's behaviour.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SYNTHETIC, horovod_missing, run_commands
from torch import nn
from torch.nn import functional as F

import hpctrain.sync as sync
from hpctrain.errors import UsageError
from hpctrain.sync.adasum import coefficients, pieces, plan, tree
from hpctrain.sync.transport import MPITransport

# ---------------------------------------------------------------- reference (Horovod's tests)


def _pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dot, a_sq, b_sq = float(a.ravel() @ b.ravel()), float(a.ravel() @ a.ravel()), \
        float(b.ravel() @ b.ravel())
    a_c = 1.0 - dot / a_sq * 0.5 if a_sq != 0 else 1.0
    b_c = 1.0 - dot / b_sq * 0.5 if b_sq != 0 else 1.0
    return a_c * a + b_c * b


def _tree(vectors: list[np.ndarray]) -> np.ndarray:
    """Rank 0 with 1, 2 with 3, ...; then those results pairwise, and so on."""
    while len(vectors) > 1:
        vectors = [_pair(vectors[i], vectors[i + 1]) for i in range(0, len(vectors), 2)]
    return vectors[0]


def _tensor(k: int, shape: tuple, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * seed + k)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _expected(n: int, shape: tuple, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    vectors = [_tensor(k, shape, dtype, seed).double().numpy() for k in range(n)]
    return torch.from_numpy(_tree(vectors)).to(dtype)


# ---------------------------------------------------------------- single process


@pytest.mark.parametrize("n, size", [(10, 4), (7, 8), (1, 4), (0, 2), (33, 2)])
def test_halving_plan_partitions_the_buffer_and_pairs_ranks(n, size):
    levels = {r: plan(n, size, r) for r in range(size)}
    for r, mine in levels.items():
        for depth, level in enumerate(mine):
            theirs = levels[level.peer][depth]
            assert theirs.peer == r and theirs.left != level.left
            assert (theirs.keep, theirs.give) == (level.give, level.keep)  # one range, halved
    finals = sorted(mine[-1].keep for mine in levels.values())
    assert [a for a, _ in finals][0] == 0 and finals[-1][1] == n
    assert all(finals[i][1] == finals[i + 1][0] for i in range(size - 1))  # no gap, no overlap


def test_pieces_clip_fused_tensors_and_coefficients_match_the_formula():
    assert pieces([3, 4, 2], (2, 8)) == [(0, 2, 3), (1, 3, 7), (2, 7, 8)]
    assert pieces([3, 0, 2], (3, 5)) == [(2, 3, 5)]
    assert coefficients(0.0, 4.0, 9.0) == (1.0, 1.0)  # orthogonal: the sum
    assert coefficients(4.0, 4.0, 4.0) == (0.5, 0.5)  # equal: the average
    assert coefficients(0.0, 0.0, 1.0) == (1.0, 1.0)  # a zero vector changes nothing


def test_tree_in_one_process_is_the_reference_per_tensor():
    counts = [5, 1, 7]
    vectors = [_tensor(k, (13,)) for k in range(4)]
    got = tree(vectors, counts)
    offset = 0
    for c in counts:
        parts = [v[offset:offset + c].numpy() for v in vectors]
        torch.testing.assert_close(got[offset:offset + c], torch.from_numpy(_tree(parts)))
        offset += c
    assert tree(vectors[:1], counts) is not vectors[0]


def test_ssgd_adasum_runs_on_horovods_own_optimizer(tmp_path):
    """ssgd --sync-backend horovod --reduce-op adasum: Horovod's Adasum optimizer has no
    ``update_applied`` (it applies every combined update), which the step read (AttributeError),
    on 2 ranks; in one process Horovod wraps with its averaging optimizer, which has none
    either."""
    why = horovod_missing()
    if why:
        pytest.skip(why)
    for ranks in (2, 0):
        out = tmp_path / f"np{ranks}"
        proc = run_commands([["train", "--algo", "ssgd", *SYNTHETIC, "--epochs", "1",
                              "--batch-size", "64", "--sync-backend", "horovod",
                              "--reduce-op", "adasum", "--out", str(out)]], np=ranks)
        assert proc.returncode == 0, proc.stderr
        assert json.loads((out / "summary.json").read_text())["workers"] == max(ranks, 1)


def test_ssgd_reduce_op_adasum_is_refused_on_3_workers_before_mpi():
    import hpctrain
    from hpctrain.sync.algorithm import Synchronous

    options = hpctrain.algorithm_options("ssgd")
    config = hpctrain.RunConfig(algo="ssgd", algorithm=options(reduce_op="adasum"))
    Synchronous.check(config, 4, 64)
    with pytest.raises(UsageError, match="^SynchronousOptions.reduce_op='adasum' needs a "
                                         "power-of-2 number of workers, got 3$"):
        Synchronous.check(config, 3, 64)
    with pytest.raises(UsageError, match="'sum'"):
        options(reduce_op="sum")


# ---------------------------------------------------------------- MPI: every backend

mpi = pytest.mark.mpi(min_size=2)
timeout = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=["mpi", "torch", "horovod", "mpi-staged"])
def hvd(request):
    """One backend for all of this module's tests on it (started once: a torch or Horovod
    start costs more than the tests)."""
    if request.param == "horovod" and (why := horovod_missing()):
        pytest.skip(why)
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "mpi-staged":  # as CUDA tensors go when MPI is not CUDA-aware
            patch.setattr(MPITransport, "takes", lambda self, tensor: False)
        torch.set_num_threads(1)
        sync.init(backend=request.param.removesuffix("-staged"))
        try:
            if sync.size() & (sync.size() - 1):
                pytest.skip("Adasum needs 2^m ranks")
            yield sync
        finally:
            sync.shutdown()


def _same_on_every_rank(hvd, t: torch.Tensor) -> bool:
    everyone = hvd.allgather_object(t.numpy().tobytes())
    return all(b == everyone[0] for b in everyone)


@mpi
@timeout
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_adasum_is_the_pairwise_tree_of_every_ranks_tensor(hvd, dtype, tol):
    r, n = hvd.rank(), hvd.size()
    for shape in [(17,), (3, 5), (1,)]:  # (1,): some ranks hold no element at all
        t = _tensor(r, shape, dtype)
        out = hvd.allreduce(t, op=hvd.Adasum)
        assert out.dtype == dtype and out.shape == t.shape
        torch.testing.assert_close(out, _expected(n, shape, dtype), rtol=tol, atol=tol)
        assert torch.equal(t, _tensor(r, shape, dtype))  # input untouched
        assert _same_on_every_rank(hvd, out)
    u = _tensor(r, (6,), dtype, seed=1)
    handle = hvd.allreduce_async_(u, op=hvd.Adasum, prescale_factor=2.0, postscale_factor=0.25)
    assert hvd.synchronize(handle).data_ptr() == u.data_ptr()
    torch.testing.assert_close(u, _expected(n, (6,), dtype, seed=1) * 0.5, rtol=tol, atol=tol)


@mpi
@timeout
def test_adasum_of_a_large_float32_tensor_sums_its_dot_products_in_float64(hvd):
    """Horovod sums a float32 tensor's a·b, |a|² and |b|² in double. In float32 (torch.dot)
    Horovod's ImageNet example's fc.weight (512k elements) took coefficients 3e-5 off: here
    small elements after large ones, lost from float32 partial sums, put them 2e-4 off."""
    r = hvd.rank()
    t = torch.full((1 << 18,), 1e-3 * (1 + r)).view(-1, 1 << 16)  # a rank's share at 4 ranks
    t[:, :512 * (1 + r % 2)] = 1.0  # large ones first: float32 partial sums lose the rest
    t = t.flatten()
    vectors = [v.double().numpy() for v in hvd.allgather_object(t)]
    out = hvd.allreduce(t, op=hvd.Adasum)
    torch.testing.assert_close(out, torch.from_numpy(_tree(vectors)).float(), rtol=2e-6, atol=0)


@mpi
@timeout
def test_adasum_adds_orthogonal_gradients_and_keeps_parallel_ones(hvd):
    r, n = hvd.rank(), hvd.size()
    mine = torch.zeros(n, dtype=torch.float64)
    mine[r] = r + 1.0
    assert hvd.allreduce(mine, op=hvd.Adasum).tolist() == [k + 1.0 for k in range(n)]
    same = torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(hvd.allreduce(same, op=hvd.Adasum), same)


@mpi
@timeout
def test_grouped_adasum_gives_each_tensor_its_own_coefficients(hvd):
    r, n = hvd.rank(), hvd.size()
    shapes = [(5,), (2, 3), (4,)]
    tensors = [_tensor(r, s, seed=i) for i, s in enumerate(shapes)]
    tensors[1] = tensors[1].float()
    out = hvd.grouped_allreduce(tensors, op=hvd.Adasum)
    for i, (o, s) in enumerate(zip(out, shapes, strict=True)):
        expected = _expected(n, s, seed=i).to(o.dtype)
        tol = 1e-5 if o.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(o, expected, rtol=tol, atol=tol)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batch(k: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * k + step)
    return (torch.randn(6, 5, generator=g, dtype=torch.float64),
            torch.randn(6, 3, generator=g, dtype=torch.float64))


def _momentum(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


@mpi
@timeout
@pytest.mark.parametrize("fp16, tol", [(False, 1e-10), (True, 2e-3)])
def test_adasum_optimizer_combines_each_ranks_update_as_horovod_does(hvd, fp16, tol):
    """Every rank steps (with its own momentum) on its own batch; the parameters' changes are
    combined by Adasum, per parameter (in float16 on the wire with ``fp16``). One process
    replays all ranks."""
    r, n = hvd.rank(), hvd.size()
    model = _model()
    compression = hvd.Compression.fp16 if fp16 else hvd.Compression.none
    opt = hvd.DistributedOptimizer(_momentum(model.parameters()), compression=compression,
                                   named_parameters=model.named_parameters(), op=hvd.Adasum)
    assert isinstance(opt, torch.optim.SGD)
    replicas = [_model() for _ in range(n)]
    optimizers = [_momentum(m.parameters()) for m in replicas]
    common = [p.detach().clone() for p in replicas[0].parameters()]
    for step in range(3):
        opt.zero_grad()
        x, y = _batch(r, step)
        F.mse_loss(model(x), y).backward()
        opt.step()
        changes = []
        for k, (m, o) in enumerate(zip(replicas, optimizers, strict=True)):
            with torch.no_grad():
                for p, c in zip(m.parameters(), common, strict=True):
                    p.copy_(c)
            o.zero_grad()
            F.mse_loss(m(_batch(k, step)[0]), _batch(k, step)[1]).backward()
            o.step()
            changes.append([(p - c).detach().numpy() for p, c in zip(m.parameters(), common,
                                                                      strict=True)])
        common = [c + torch.from_numpy(_tree([ch[i] for ch in changes]))
                  for i, c in enumerate(common)]
    for p, c in zip(model.parameters(), common, strict=True):
        torch.testing.assert_close(p.detach(), c, rtol=tol, atol=tol / 100)


@mpi
@timeout
def test_adasum_misuse_is_one_line_before_any_collective(hvd):
    if hvd.backend() == "horovod":
        pytest.skip("hpctrain's own backends' errors")
    with pytest.raises(UsageError, match="op=Adasum reduces floating-point tensors, got "
                                         "torch.int64"):
        hvd.allreduce(torch.ones(3, dtype=torch.int64), op=hvd.Adasum)
    with pytest.raises(UsageError, match="allreduce only"):
        hvd.reducescatter(torch.ones(4, 2), op=hvd.Adasum)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1),
                                   op=hvd.Adasum)
    with pytest.raises(UsageError, match="skip_synchronize"):
        opt.skip_synchronize()
    n = hvd.size()
    if n >= 4:
        three = hvd.add_process_set([0, 1, 2])
        if hvd.rank() < 3:
            with pytest.raises(UsageError, match="power-of-2 number of processes, got 3") \
                    as refused:
                hvd.allreduce(torch.ones(2), op=hvd.Adasum, process_set=three)
            assert isinstance(refused.value, NotImplementedError)  # Horovod's, to fall back
        hvd.remove_process_set(three)
    assert hvd.allreduce(torch.ones(2), op=hvd.Sum).tolist() == [n, n]  # still in step


@mpi
@timeout
def test_a_joined_rank_counts_as_a_zero_in_the_adasum_tree(hvd):
    if hvd.backend() == "horovod":
        pytest.skip("hpctrain's own join")
    r, n = hvd.rank(), hvd.size()
    if r < n - 1:  # rank n - 1 has joined already
        out = hvd.allreduce(_tensor(r, (9,)), op=hvd.Adasum)
        vectors = [_tensor(k, (9,)).numpy() for k in range(n - 1)] + [np.zeros(9)]
        torch.testing.assert_close(out, torch.from_numpy(_tree(vectors)))
    hvd.join()



@mpi
@timeout
def test_a_combined_update_that_is_not_finite_is_not_applied(hvd):
    """Changes that overflow float32 (a diverging learning rate; the dot products, summed in
    float64 as Horovod's, do not) combine into NaN: every rank keeps the values the step
    started from and says so in ``update_applied``; a sane step afterwards is applied again.
    (Horovod applies the NaN.)"""
    if hvd.backend() == "horovod":
        pytest.skip("Horovod applies the combined update as it comes")
    model = _model().float()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=3e38),
                                   named_parameters=model.named_parameters(), op=hvd.Adasum)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = (t.float() for t in _batch(hvd.rank(), 0))
    (F.mse_loss(model(x), y) * 1e6).backward()  # finite gradients, changes beyond float32
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    opt.step()
    assert not opt.update_applied
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before,
                                                          strict=True))
    opt.param_groups[0]["lr"] = 0.1
    opt.step()  # the same gradients, at a learning rate that does not diverge
    assert opt.update_applied
    assert all(bool(torch.isfinite(p).all()) and not torch.equal(p.detach(), b)
               for p, b in zip(model.parameters(), before, strict=True))
    assert _same_on_every_rank(hvd, torch.cat([p.detach().reshape(-1)
                                               for p in model.parameters()]))
