"""Ensemble-Compression and model averaging under mpirun (-np 2 and 4).

Run: mpirun -np 4 python -m pytest --with-mpi -m mpi tests/test_ec_mpi.py
"""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from hpctrain import data, models
from hpctrain.ec import (
    EnsembleCompression,
    ModelAveraging,
    broadcast_model,
    ensemble_probabilities,
    evaluate_members,
)
from hpctrain.ec.averaging import floating_state
from hpctrain.ec.ensemble import MAX_COUNT, allgather_rows, allreduce_rows, reduce_scatter_rows
from hpctrain.errors import UsageError
from hpctrain.evaluate import Snapshots

SHAPE = data.SYNTHETIC_SHAPE


def world():
    from hpctrain import comm

    return comm.world()


def member(seed: int, name: str = "mlp") -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build(name, SHAPE)


def gathered_models(comm, model, name: str = "mlp") -> list[torch.nn.Module]:
    """Every rank's model, rebuilt in this process from the gathered state dicts."""
    rebuilt = []
    for state in comm.allgather(model.state_dict()):
        m = models.build(name, SHAPE)
        m.load_state_dict(state)
        rebuilt.append(m.eval())
    return rebuilt


def flat(model) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in floating_state(model)])


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
@pytest.mark.parametrize("by", ["ids", "images"])
def test_ensemble_probabilities_are_the_mean_of_all_models(by, shared):
    comm = world()
    rank, ranks = comm.Get_rank(), comm.Get_size()
    full = data.load("synthetic")
    model = member(100 + rank)  # a different model on every rank
    n = 3 * rank  # unequal counts, and rank 0 contributes none
    draws = [torch.randperm(len(full), generator=torch.Generator().manual_seed(r))[:3 * r]
             for r in range(ranks)]
    ids = draws[rank]
    temperature = 2.5
    if by == "ids":
        out = ensemble_probabilities(model, comm, temperature, 10, ids=ids, lookup=full,
                                     shared=shared)
    else:
        # Images a user's own loop made with autograd on (its .numpy() raised): used as data.
        out = ensemble_probabilities(model, comm, temperature, 10,
                                     images=full.images[ids].requires_grad_(),
                                     labels=full.labels[ids], shared=shared)
    rows = torch.cat(draws) if shared else ids  # shared: every rank's samples, in rank order
    with torch.no_grad():
        expected = torch.stack([F.softmax(m(full.images[rows]) / temperature, dim=1)
                                for m in gathered_models(comm, model)]).mean(0)
    assert out.probs.shape == (len(rows), 10)
    torch.testing.assert_close(out.probs, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.probs.sum(1), torch.ones(len(rows)))
    total = sum(3 * r for r in range(ranks))
    assert out.inferred == total  # every rank runs its model on every rank's samples
    item = 8 if by == "ids" else 4 * full.images[0].numel()
    if shared:
        assert torch.equal(out.samples[0], full.images[rows])
        assert torch.equal(out.samples[1], full.labels[rows])
        labels = 0 if by == "ids" else n * 8 * (ranks - 1)
        returned = 2 * (ranks - 1) * total * 10 * 4 // ranks
        assert out.bytes_sent == n * item * (ranks - 1) + labels + returned
    else:
        assert out.samples is None
        assert out.bytes_sent == n * item * (ranks - 1) + (total - n) * 10 * 4


def whole_rows(rank: int, rows: int, width: int = 7) -> np.ndarray:
    """Rank ``rank``'s float32 rows for the row collectives: small whole numbers, whose sums
    are exact in any order of adding."""
    return np.random.default_rng(rank).integers(-50, 50, (rows, width)).astype(np.float32)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("limit", [MAX_COUNT, 30], ids=["one-call", "in-parts"])
def test_row_collectives_move_whole_rows_of_an_odd_width(limit):
    """Rows of 7 floats, uneven counts (rank 0 none); a limit of 30 floats sums the rows in
    parts (2 rows of each block a round on 2 ranks, 1 on more; 4 rows an allreduce call)."""
    comm = world()
    rank, ranks = comm.Get_rank(), comm.Get_size()
    counts = [(0, 5, 2, 9)[r % 4] for r in range(ranks)]
    gathered = allgather_rows(comm, whole_rows(rank, counts[rank]), counts)
    assert np.array_equal(gathered, np.concatenate([whole_rows(r, c)
                                                    for r, c in enumerate(counts)]))
    everyone = [whole_rows(100 + r, sum(counts)) for r in range(ranks)]
    total, start = sum(everyone), sum(counts[:rank])
    mine = reduce_scatter_rows(comm, everyone[rank], counts, limit)
    assert np.array_equal(mine, total[start:start + counts[rank]])
    assert np.array_equal(allreduce_rows(comm, everyone[rank], limit), total)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_model_averaging_with_tau_1_is_synchronous_sgd():
    comm = world()
    rank, ranks = comm.Get_rank(), comm.Get_size()
    full = data.load("synthetic")
    b, lr, steps = 16, 0.1, 4
    model, reference, lonely = member(7, "lenet"), member(7, "lenet"), member(7, "lenet")
    broadcast_model(model, comm)
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in (model, reference, lonely)]
    ma = ModelAveraging(model, comm, tau=1)
    for s in range(steps):
        batch = torch.randperm(len(full), generator=torch.Generator().manual_seed(s))[:b * ranks]
        mine = batch[rank * b:(rank + 1) * b]
        for m, opt, rows in ((model, opts[0], mine), (reference, opts[1], batch),
                             (lonely, opts[2], mine)):
            opt.zero_grad()
            F.cross_entropy(m(full.images[rows]), full.labels[rows]).backward()
            opt.step()
        assert ma.after_step()
    # One process, one step on the union of the ranks' batches == the average of local steps.
    torch.testing.assert_close(flat(model), flat(reference), atol=2e-6, rtol=1e-5)
    # The check can fail: a rank's own steps, not averaged, end elsewhere.
    assert (flat(lonely) - flat(reference)).abs().max() > 1e-3
    assert ma.stats.summary()["rounds"] == steps


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_model_averaging_every_tau_steps_averages_buffers():
    comm = world()
    rank, ranks = comm.Get_rank(), comm.Get_size()
    model = member(rank, "resnet20")  # BatchNorm buffers, different on every rank
    before = torch.stack(comm.allgather(flat(model))).mean(0)
    ma = ModelAveraging(model, comm, tau=3)
    assert [ma.after_step() for _ in range(3)] == [False, False, True]
    torch.testing.assert_close(flat(model), before)
    count = [t for n, t in model.state_dict().items() if n.endswith("num_batches_tracked")]
    assert count and all(t.dtype == torch.int64 for t in count)
    assert ma.after_step(final=True)  # the last step always averages
    assert ma.stats.bytes == [2 * (ranks - 1) * flat(model).numel() * 4 // ranks] * 2


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_model_averaging_in_pieces_is_the_mean(monkeypatch):
    """Pieces of 7 elements stand for 2**30 ones (a model past 2**31 elements was one
    Iallreduce before, which MPI-3 libraries refuse)."""
    from hpctrain import comm as hcomm
    from hpctrain.ec import average_model

    monkeypatch.setattr(hcomm, "COUNT_PIECE", 7)
    comm = world()
    model = member(comm.Get_rank())
    expected = torch.stack(comm.allgather(flat(model))).mean(0)
    average_model(model, comm)
    torch.testing.assert_close(flat(model), expected)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_averaging_staged_brings_the_mean_back_in_one_copy(monkeypatch, dtype):
    """The staged path (a GPU's tensors through pinned host memory; forced here on the host)
    averages bit for bit as the direct one, and the mean goes back through the stage's buffer
    in one copy: it went back one tensor at a time, each a synchronous copy from pageable
    host memory."""
    from hpctrain import devices
    from hpctrain.ec import averaging

    comm = world()
    direct = member(comm.Get_rank()).to(dtype)
    averaging.average_model(direct, comm)
    copies = []

    class Staged(devices.HostStage):
        def __init__(self, tensor):
            super().__init__(tensor, direct=False)

        def to_device(self):
            copies.append(self.tensor.numel())
            return super().to_device()

    monkeypatch.setattr(averaging, "HostStage", Staged)
    staged = member(comm.Get_rank()).to(dtype)
    averaging.average_model(staged, comm)
    for a, b in zip(floating_state(direct), floating_state(staged), strict=True):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)
    assert copies == [sum(t.numel() for t in floating_state(staged))]


class FrozenAndTied(torch.nn.Module):
    """A frozen first layer, and one weight shared by two layers."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(6, 4).requires_grad_(False)
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.bn = torch.nn.BatchNorm1d(4)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_model_averaging_leaves_frozen_parameters_and_sends_tied_ones_once():
    """MA averaged frozen parameters into themselves (on 3 ranks rounding changed them) and
    sent the whole frozen part every round, and a tied weight once per name."""
    from hpctrain.comm import allreduce_bytes
    from hpctrain.ec import average_model

    comm = world()
    rank, ranks = comm.Get_rank(), comm.Get_size()
    torch.manual_seed(rank)  # every rank's own values, the frozen layer's too
    model = FrozenAndTied()
    frozen = [t.clone() for t in (model.inp.weight, model.inp.bias)]
    sent = average_model(model, comm)
    assert torch.equal(model.inp.weight, frozen[0]) and torch.equal(model.inp.bias, frozen[1])
    members = [(torch.manual_seed(r), FrozenAndTied())[1] for r in range(ranks)]
    torch.testing.assert_close(model.a.weight, torch.stack([m.a.weight for m in members]).mean(0))
    assert model.b.weight is model.a.weight
    # a.weight, a.bias, b.bias, the batch norm's weight, bias and two running statistics
    assert sent == allreduce_bytes((16 + 4 + 4 + 4 * 4) * 4, ranks)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_broadcast_and_averaged(dtype):
    """MPI has no sum for fp16/bf16 and numpy no bf16: broadcast copies their bits, and the
    average is taken in fp32 and rounded once (both raised before)."""
    from hpctrain.ec import average_model

    comm = world()
    root = comm.Get_size() - 1  # broadcast_model(root=...), a public parameter
    model = member(comm.Get_rank()).to(dtype)
    broadcast_model(model, comm, root=root)
    assert torch.equal(torch.cat([t.reshape(-1) for t in floating_state(model)]),
                       torch.cat([t.reshape(-1) for t in floating_state(member(root).to(dtype))]))
    model = member(comm.Get_rank()).to(dtype)
    average_model(model, comm)
    members = [member(r).to(dtype) for r in range(comm.Get_size())]
    for got, *each in zip(floating_state(model), *map(floating_state, members), strict=True):
        mean = torch.stack([t.float() for t in each]).mean(0)  # MPI may sum in another order
        assert got.dtype == dtype and torch.allclose(got.float(), mean, rtol=1e-2, atol=1e-3)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_ec_hook_relabels_with_the_ensemble_and_keeps_members_apart():
    comm = world()
    rank = comm.Get_rank()
    full = data.load("synthetic")
    model = member(3)
    broadcast_model(model, comm)
    params = models.num_parameters(model)
    local = full.subset(torch.arange(rank * 200, (rank + 1) * 200))
    tau, size = 4, 10
    ec = EnsembleCompression(model, comm, tau, alpha=0.7, temperature=3.0, distill_size=size,
                             local=local, lookup=full, seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    previous = None
    for round_ in range(3):
        seen = []
        for i in range(tau):
            extra = ec.distill_batch()
            assert (extra is None) == (round_ == 0)
            if extra is not None:
                seen.append(extra[0])
            x, y = local.images[i * 8:(i + 1) * 8], local.labels[i * 8:(i + 1) * 8]
            opt.zero_grad()
            ec.loss(x, y).backward()
            opt.step()
            if i == tau - 1:
                teachers = gathered_models(comm, model)  # the models the ensemble is made of
            ec.after_step()
        if previous is not None:  # every relabelled sample rode along once in the round
            assert torch.equal(torch.cat(seen), previous[0])
        previous = ec.relabelled
        with torch.no_grad():  # the labels are the ensemble's, at the round's end
            expected = torch.stack([F.softmax(m(previous[0]) / 3.0, dim=1)
                                    for m in teachers]).mean(0)
        torch.testing.assert_close(previous[2], expected, atol=1e-6, rtol=1e-5)
        assert len(previous[0]) == size
    assert ec.rounds == 3 and ec.distilled == 2 * size
    # the samples its model inferred, whose rate a simulation replaying the run charges
    assert ec.stats.summary()["inferred_samples"] == 3 * size * comm.Get_size()
    for _ in range(tau - 1):
        ec.after_step()
    assert not ec.after_step(final=True) and ec.rounds == 3  # nothing would distil a last round
    assert models.num_parameters(model) == params  # compression: the model never grows
    others = comm.allgather(flat(model))
    assert not torch.equal(others[0], others[1])  # each worker keeps its own model


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("by", ["ids", "images"])
def test_ec_distilling_from_all_shares_every_workers_draw(by):
    """A worker whose own data hold one class distils samples of the others' classes."""
    comm = world()
    rank = comm.Get_rank()
    full = data.load("synthetic")
    local = full.subset(torch.nonzero(full.labels == rank).flatten()[:40])  # one class each
    model = member(3)
    broadcast_model(model, comm)
    size = 12
    ec = EnsembleCompression(model, comm, tau=2, alpha=0.5, temperature=2.0,
                             distill_size=size, local=local,
                             lookup=full if by == "ids" else None, seed=5,
                             distill_from="all")
    ec.after_step()
    ec.after_step()
    teachers = gathered_models(comm, model)
    x, y, p = ec.relabelled
    assert len(x) == len(y) == len(p) == size
    # Each relabelled sample is one of some worker's local samples, with its true label.
    drawn = torch.cat(comm.allgather(local.ids))
    rows = torch.stack([torch.nonzero((full.images == xi).flatten(1).all(1)).flatten()[0]
                        for xi in x])
    assert set(rows.tolist()) <= set(drawn.tolist())
    assert torch.equal(y, full.labels[rows])
    assert len(set(y.tolist())) > 1  # not only this worker's class
    with torch.no_grad():
        expected = torch.stack([F.softmax(m(x) / 2.0, dim=1) for m in teachers]).mean(0)
    torch.testing.assert_close(p, expected, atol=1e-6, rtol=1e-5)
    picks = comm.allgather(rows)
    assert any(not torch.equal(picks[0], other) for other in picks[1:])  # a share each
    # The same rank, seed and round pick the same samples: a resumed run goes on alike.
    again = EnsembleCompression(model, comm, tau=1, alpha=0.5, temperature=2.0,
                                distill_size=size, local=local,
                                lookup=full if by == "ids" else None, seed=5,
                                distill_from="all")
    again.aggregate()
    assert torch.equal(again.relabelled[0], x) and torch.equal(again.relabelled[1], y)


def mlp(width: int = 32) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, 10))


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("differs", ["width", "dtype", "depth"])
@pytest.mark.parametrize("call", ["broadcast_model", "ModelAveraging"])
def test_models_that_differ_between_ranks_raise_one_error_on_every_rank(call, differs):
    """broadcast_model, and ModelAveraging's first average without it, sized each Bcast or
    Allreduce by the rank's own tensors: a model of another shape on one rank segfaulted.
    Now every rank raises before the first, naming the first tensor that differs."""
    comm = world()
    last = comm.Get_rank() == comm.Get_size() - 1
    model = mlp(16 if last and differs == "width" else 32)
    if last and differs == "dtype":
        model = model.double()
    if last and differs == "depth":
        model.extend([torch.nn.ReLU(), torch.nn.Linear(10, 10)])
    theirs = {"width": "1.weight float32 [16, 256]", "dtype": "1.weight float64 [32, 256]",
              "depth": "5.weight float32 [10, 10]"}[differs]
    mine = "only 4 tensors" if differs == "depth" else "1.weight float32 [32, 256]"
    with pytest.raises(UsageError) as err:
        broadcast_model(model, comm) if call == "broadcast_model" else \
            ModelAveraging(model, comm, tau=1).after_step()
    assert str(err.value) == (f"{call}: the ranks hold different models: rank 0 {mine}, rank "
                              f"{comm.Get_size() - 1} {theirs}; build the same model on every "
                              "rank")
    comm.Barrier()  # every rank got here: none is left in a collective


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("by", ["ids", "images"])
def test_ec_trains_a_float64_model(by):
    """The ensemble ran each model on the exchanged float32 inputs, and a float64 model
    raised "mat1 and mat2 must have the same dtype" at the first aggregation."""
    comm = world()
    rank = comm.Get_rank()
    full = data.load("synthetic")
    local = full.subset(torch.arange(rank * 100, (rank + 1) * 100))
    torch.manual_seed(rank)
    model = mlp().double()
    ec = EnsembleCompression(model, comm, tau=1, alpha=0.5, temperature=2.0, distill_size=8,
                             local=local, lookup=full if by == "ids" else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(2):
        x, y = local.images[step * 8:(step + 1) * 8].double(), local.labels[step * 8:(step + 1) * 8]
        opt.zero_grad()
        ec.loss(x, y).backward()  # the second distils the first round's samples
        opt.step()
        assert ec.after_step()
    teachers = comm.allgather(model.state_dict())
    with torch.no_grad():
        expected = torch.stack([F.softmax(torch.func.functional_call(model, t, (
            ec.relabelled[0].double(),)) / 2.0, dim=1) for t in teachers]).mean(0)
    assert ec.relabelled[2].dtype == torch.float32
    torch.testing.assert_close(ec.relabelled[2], expected.float(), atol=1e-6, rtol=1e-5)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(180)
def test_evaluate_members_matches_one_process():
    comm = world()
    rank, ranks = comm.Get_rank(), comm.Get_size()
    test = data.load("synthetic", "test")
    model = member(20 + rank)
    snaps = Snapshots()
    for step in range(2):
        snaps.take(model, t=float(step + rank), epoch=float(step), updates=step)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    everyone = [gathered_models(comm, _load(model, s.state)) for s in snaps]
    points = evaluate_members(member(0), snaps, test, comm, averaged=True)
    assert [p["t"] for p in points] == [0.0, 1.0]  # rank 0's clock
    for point, members in zip(points, everyone, strict=True):
        with torch.no_grad():
            logits = [m(test.images) for m in members]
            accs = [(z.argmax(1) == test.labels).double().mean().item() for z in logits]
            ensemble = torch.stack([F.softmax(z, 1) for z in logits]).mean(0)
            mean_model = models.build("mlp", SHAPE)
            for t, *ts in zip(floating_state(mean_model), *map(floating_state, members),
                              strict=True):
                t.copy_(torch.stack(ts).mean(0))
            averaged = (mean_model(test.images).argmax(1) == test.labels).double().mean()
        assert point["member_acc"] == pytest.approx(accs[0])
        assert point["mean_member_acc"] == pytest.approx(sum(accs) / ranks)
        assert point["ensemble_acc"] == pytest.approx(
            (ensemble.argmax(1) == test.labels).double().mean().item())
        assert point["averaged_acc"] == pytest.approx(averaged.item(), abs=2 / len(test))


def _load(model, state):
    model.load_state_dict(state)
    return model
