"""DistributedOptimizer of hpctrain's own backends (mpi, torch) against Horovod 0.28.1's.

Single-process tests: its argument checks. MPI tests:
mpirun -np 2|4 python -m pytest --with-mpi -m mpi tests/test_sync_optimizer.py
Every rank r feeds its model inputs scaled by r + 1, so an averaged gradient is the mean of
1..n times the one-rank gradient.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import hpctrain.sync as sync
from hpctrain import comm
from hpctrain.errors import UsageError
from hpctrain.sync import torch_transport
from hpctrain.sync.collectives import Average
from hpctrain.sync.compression import CastCompressor, Compressor
from hpctrain.sync.optimizer import _check_arguments, _group_indices

mpi = pytest.mark.mpi(min_size=2)
timeout = pytest.mark.timeout(120)


def _one_line(error: type, match: str, call) -> None:
    with pytest.raises(error, match=match) as e:
        call()
    assert isinstance(e.value, UsageError) and "\n" not in str(e.value)


def _mean(hvd) -> float:
    """The average over the ranks of r + 1."""
    return (hvd.size() + 1) / 2


def _wrap(hvd, model, optimizer=torch.optim.SGD, **kwargs):
    """``model``'s wrapped optimizer (lr 0: the weights stay)."""
    return hvd.DistributedOptimizer(optimizer(model.parameters(), lr=0.0),
                                    named_parameters=model.named_parameters(), **kwargs)


def _linear(hvd, **kwargs):
    """A bias-free linear model and its wrapped optimizer."""
    model = nn.Linear(4, 1, bias=False)
    return model, _wrap(hvd, model, **kwargs)


def _freed(transport) -> bool:
    if transport.name == "mpi":
        return transport.comm == comm.mpi().COMM_NULL
    return transport.group is torch_transport._FREED


def _backward(hvd, model) -> None:
    model(torch.full((1, 4), hvd.rank() + 1.0)).sum().backward()


# ---------------------------------------------------------------- single process, no MPI

def test_groups_leave_frozen_parameters_out_as_horovod_does():
    """groups=[list(model.parameters())] with a frozen one was refused; Horovod leaves it
    out. A trainable parameter the optimizer lacks is still refused (its gradient would go
    unreduced), as are non-tensors and repeats. An int with nothing trainable divided by 0."""
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    assert _group_indices([[a, frozen, b]], [a, b]) == [[0, 1]]
    assert _group_indices([[frozen], [b]], [a, b]) == [[1]]
    assert _group_indices(2, []) == []
    _one_line(UsageError, "requires gradients but is not one of the optimizer's",
              lambda: _group_indices([[a, nn.Parameter(torch.ones(2))]], [a, b]))
    _one_line(UsageError, "optimizer's parameters, got a str", lambda: _group_indices([["a"]],
                                                                                      [a]))
    _one_line(UsageError, "only appear once", lambda: _group_indices([[a], [frozen, a]], [a]))


class _Scaling(Compressor):
    """A compressor that does more than cast: DistributedOptimizer never ran it."""

    @staticmethod
    def compress(tensor):
        return tensor * 2, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor / 2

    @staticmethod
    def wire_dtype(dtype):
        return dtype


class _BF16(CastCompressor):
    @staticmethod
    def wire_dtype(dtype):
        return torch.bfloat16 if dtype.is_floating_point else dtype


def test_a_compressor_that_does_more_than_cast_is_refused():
    """Only the wire dtype reached the fused buckets, so _Scaling was silently a cast."""
    for bad in (_Scaling, _Scaling()):
        _one_line(TypeError, "compression must be .*CastCompressor.* got",
                  lambda b=bad: _check_arguments(b, 1, Average, 1.0, 1024))
    for good in (sync.Compression.none, sync.Compression.fp16, _BF16, _BF16()):
        assert _check_arguments(good, 1, Average, 1.0, 1024) is Average
    wire, ctx = _BF16.compress(torch.ones(2))
    assert wire.dtype == torch.bfloat16 and _BF16.decompress(wire, ctx).dtype == torch.float32
    wire, ctx = sync.Compression.fp16.compress(torch.ones(2, dtype=torch.float64))
    assert (wire.dtype, ctx) == (torch.float16, torch.float64)


# ---------------------------------------------------------------- MPI: mpi and torch backends

@mpi
@timeout
def test_an_optimizer_let_go_unhooks_itself_so_a_new_one_reduces_once(own_backend):
    """Fine-tuning: a new optimizer on the same parameters after ``del opt``. The old one's
    hooks lived on (they held it), so both reduced: wrong gradients, then "computed more
    than backward_passes_per_step=1 times". Its own transport is freed too, unless it was
    let go between backward and step, with its bucket's allreduce started: then MPI may
    still write into the bucket, and both are kept."""
    hvd = own_backend
    model = nn.Linear(4, 1, bias=False)
    for mid_step in (True, False):
        opt = _wrap(hvd, model)
        _backward(hvd, model)
        if not mid_step:
            opt.step()
        reducer = weakref.ref(opt._reducer)
        transport = opt._reducer._transport
        del opt
        gc.collect()
        assert reducer() is None
        assert _freed(transport) is not mid_step
        model.zero_grad()
    opt = _wrap(hvd, model, torch.optim.Adam)
    for _ in range(2):
        opt.zero_grad()
        _backward(hvd, model)
        opt.step()
        torch.testing.assert_close(model.weight.grad, torch.full((1, 4), _mean(hvd)))


@mpi
@timeout
def test_a_second_live_optimizer_on_the_same_parameters_is_refused(own_backend):
    """Both would reduce the gradient (Horovod fails at backward, on a duplicate name); the
    refusal names the parameter, on every rank, and the first optimizer works on."""
    hvd = own_backend
    model, opt = _linear(hvd)
    _one_line(UsageError, "parameter 'weight' belongs to a live DistributedOptimizer",
              lambda: _wrap(hvd, model, torch.optim.Adam))
    _backward(hvd, model)
    opt.step()
    torch.testing.assert_close(model.weight.grad, torch.full((1, 4), _mean(hvd)))


@mpi
@timeout
@pytest.mark.parametrize("compression", ["none", "fp16"])
def test_sparse_as_dense_hands_the_gradient_back_sparse(own_backend, compression):
    """As Horovod: reduced dense, given back sparse, so SparseAdam steps (it refused the
    dense gradient left in .grad)."""
    hvd, r, n = own_backend, own_backend.rank(), own_backend.size()
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, sparse=True)
    opt = hvd.DistributedOptimizer(torch.optim.SparseAdam(emb.parameters(), lr=0.1),
                                   named_parameters=emb.named_parameters(),
                                   compression=getattr(hvd.Compression, compression),
                                   sparse_as_dense=True)
    expected = torch.zeros(10, 3)
    expected[:n] = 1 / n  # row r from rank r only
    expected[9] = 1.0  # from every rank
    for _ in range(2):
        before = emb.weight.detach().clone()
        opt.zero_grad()
        emb(torch.tensor([r, 9])).sum().backward()
        opt.step()
        grad = emb.weight.grad
        assert grad.is_sparse and grad.sparse_dim() == 1
        torch.testing.assert_close(grad.to_dense(), expected)
        moved = (emb.weight.detach() != before).any(dim=1)
        assert moved.tolist() == (expected != 0).any(dim=1).tolist()


@mpi
@timeout
def test_an_unregistered_process_set_is_refused_on_every_rank(own_backend):
    """Made from a communicator it was taken as one this rank is not in, and nothing was
    reduced; made from ranks it was refused on its members only."""
    hvd, r = own_backend, own_backend.rank()
    MPI = comm.mpi()
    sub = MPI.COMM_WORLD.Split(0 if r == 0 else MPI.UNDEFINED, r)
    try:
        for ps in (hvd.ProcessSet(sub), hvd.ProcessSet([0])):
            _one_line(UsageError, r"ProcessSet\(process_set_id=None.* is not registered",
                      lambda p=ps: _linear(hvd, process_set=p))
    finally:
        if sub != MPI.COMM_NULL:
            sub.Free()


@mpi
@timeout
def test_gradient_predivide_factors_that_differ_between_ranks_are_a_mismatch(own_backend):
    """They gave each rank another gradient; Horovod refuses them ("Mismatched prescale
    and/or postscale factors"). The same factor everywhere still averages."""
    hvd = own_backend
    with pytest.raises(sync.CollectiveMismatchError, match=r"gradient_predivide_factor=2\.0"):
        _linear(hvd, gradient_predivide_factor=1.0 + hvd.rank())
    model, opt = _linear(hvd, gradient_predivide_factor=2.0)
    _backward(hvd, model)
    opt.step()
    torch.testing.assert_close(model.weight.grad, torch.full((1, 4), _mean(hvd)))


@mpi
@timeout
def test_num_groups_gives_horovods_deprecation_warning(own_backend):
    """It was a UserWarning of other words, shown wherever the call was, where Horovod's
    is a DeprecationWarning (hidden outside ``__main__``); num_groups still groups."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    with pytest.warns(DeprecationWarning, match="^Parameter `num_groups` has been replaced "
                                                "by `groups` and will be removed in v0.23.0.$"):
        opt = _wrap(own_backend, model, num_groups=2)
    assert len(opt.bucket_sizes) == 2


@mpi
@timeout
def test_set_backward_passes_per_step_while_accumulating_counts_anew(own_backend):
    """As Horovod, the counts restart: one pass of 3, then 2 of the new 2, then the step
    (the old count made the third pass "more than backward_passes_per_step")."""
    hvd = own_backend
    model, opt = _linear(hvd, backward_passes_per_step=3)
    _backward(hvd, model)
    opt.set_backward_passes_per_step(2)
    _backward(hvd, model)
    _backward(hvd, model)
    opt.step()
    torch.testing.assert_close(model.weight.grad, torch.full((1, 4), 3 * _mean(hvd)))


@mpi
@timeout
def test_parameters_the_hooks_do_not_reduce_are_refused_at_step(own_backend):
    """Added by add_param_group or unfrozen after wrapping, their gradients stayed each
    rank's own (as in Horovod); the step refuses them on every rank, and steps once they
    are gone."""
    hvd = own_backend
    model, opt = _linear(hvd)
    extra = nn.Parameter(torch.ones(4))
    opt.add_param_group({"params": [extra]})
    assert opt.param_groups[-1]["lr"] == 0.0  # the user's optimizer's (SGD's own: 1e-3)
    _backward(hvd, model)
    _one_line(UsageError, r"1 trainable parameter\(s\) were added .*make a new "
              "DistributedOptimizer", opt.step)
    opt.param_groups.pop()
    opt.step()
    torch.testing.assert_close(model.weight.grad, torch.full((1, 4), _mean(hvd)))

    frozen = nn.Linear(4, 1, bias=False).requires_grad_(False)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(frozen.parameters(), lr=0.0))
    frozen.requires_grad_(True)
    _backward(hvd, frozen)
    _one_line(UsageError, r"1 trainable parameter\(s\)", opt.synchronize)


@mpi
@timeout
@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.LBFGS])
def test_a_step_with_a_closure_steps_on_the_reduced_gradient(own_backend, optimizer):
    """``step(closure)`` reduced before the closure ran its backward: each rank stepped on its
    own gradient and the ranks' weights drifted apart (SGD); LBFGS, which calls the closure
    several times, was refused for a zero_grad "before step()" inside its own step."""
    hvd = own_backend
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    opt = hvd.DistributedOptimizer(optimizer(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())
    seen = []

    def closure():
        opt.zero_grad()
        x = torch.full((1, 4), hvd.rank() + 1.0)
        seen.append(2 * (model.weight.detach() @ x.T) * x)  # this rank's own gradient
        loss = model(x).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
        torch.testing.assert_close(model.weight.grad,  # reduced in place: the average
                                   hvd.allreduce(seen[-1], op=Average))
    weights = hvd.allgather(model.weight.detach())
    assert all(torch.equal(w, weights[0]) for w in weights)  # every rank the same model
    if optimizer is torch.optim.SGD:  # a plain step after: no warning of a second reduction
        opt.zero_grad()
        _backward(hvd, model)
        opt.step()
