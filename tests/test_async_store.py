"""The RMA parameter store and the ASGD / DC-ASGD optimizers.

Single-process tests use a one-rank store on COMM_SELF; the ``mpi`` tests run under
``mpirun -np 4 python -m pytest --with-mpi -m mpi`` with every rank a worker. MPI is used at
whatever thread level the test process started it (shared-memory windows work at any).
"""

import copy
import io
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from hpctrain import comm, kernels
from hpctrain.async_ import ASGD, DCASGD, ParameterStore, flatten_parameters, shard_bounds
from hpctrain.async_ import trainable as trainable_of
from hpctrain.async_.store import (
    CLOSED,
    MPICH_MAX_SHARDS,
    _shared_model,
    default_shards,
    max_shards,
    shares_memory,
)
from hpctrain.errors import UsageError
from hpctrain.metrics import Tally

HYPER = {"lr": 0.05, "weight_decay": 1e-3}


def self_comm():
    return comm.mpi().COMM_SELF


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4))


def flat_of(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def batches(seed: int, steps: int):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen))
            for _ in range(steps)]


def train(model, opt, data) -> list[torch.Tensor]:
    """Plain loop; returns the flat gradient of every step."""
    grads = []
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        opt.step()
    return grads


def test_shard_bounds_cover_and_align():
    for numel, shards in [(1, 1), (7, 3), (1000, 4), (100003, 7), (64, 4)]:
        b = shard_bounds(numel, shards)
        assert len(b) == shards and b[0][0] == 0 and b[-1][1] == numel
        assert all(lo < hi for lo, hi in b)
        assert all(b[i][1] == b[i + 1][0] for i in range(shards - 1))
        if numel >= 16 * shards:
            assert all(lo % 16 == 0 for lo, _ in b)
    assert default_shards(workers=4, hosts=4) == 4
    assert default_shards(workers=3, hosts=1) == 3
    assert default_shards(workers=5, hosts=2) == 6


def test_shards_stop_before_mpichs_context_ids_run_out():
    """MPICH and the libraries built on it give every window one of about 2048 context ids:
    MPICH 5.0.2 segfaulted, with no message, making a store of 2100 shards. There shards stop
    at 2000 however many ranks, and the default (one per worker) stays within it; Open MPI
    and Intel MPI (4200 windows made) keep 4096 or one per rank."""
    mpich = "MPICH Version:      5.0.2\nMPICH Release date: Fri Sep 25 20:00:00 CDT 2025\n"
    most, why = max_shards(mpich, ranks=2100)
    assert most == MPICH_MAX_SHARDS == 2000
    assert why == ("each is an RMA window, and this MPI (MPICH Version: 5.0.2) runs out of "
                   "communicator context ids, one per window, past about 2040 of them")
    for built_on in ("MVAPICH2 Version     :\t2.3.7", "MPI VERSION    : CRAY MPICH version 8"):
        assert max_shards(built_on, ranks=8)[0] == 2000
    for other in ("Open MPI v4.1.4, package: Debian OpenMPI",
                  "Intel(R) MPI Library 2021.10 for Linux* OS", None):
        assert max_shards(other, ranks=8) == (4096, "each is an RMA window")
        assert max_shards(other, ranks=5000)[0] == 5000
    assert default_shards(workers=2100, hosts=2100, most=2000) == 2000
    assert default_shards(workers=3000, hosts=3, most=2000) == 1998  # the same on every host
    assert default_shards(workers=1500, hosts=1500, most=2000) == 1500
    # The store refuses past the limit of the MPI it runs on, before any window (it made
    # them all before: on MPICH, a segfault).
    most, why = max_shards(comm.library_version(), ranks=1)
    with pytest.raises(UsageError) as e:
        ParameterStore(torch.zeros(10_000), self_comm(), shards=most + 1)
    assert str(e.value) == f"shards={most + 1}: at most {most} ({why})"


def test_shared_windows_only_in_the_unified_memory_model():
    """Ranks read and write each other's window memory with no Win_sync, which MPI defines
    only in the unified memory model: under MPI_WIN_SEPARATE the store takes Get/Put."""
    assert shares_memory(one_node=True, model="unified")
    assert not shares_memory(one_node=True, model="separate")
    assert not shares_memory(one_node=True, model=None)  # no shared window (osc/pt2pt)
    assert not shares_memory(one_node=False, model="unified")
    assert _shared_model(self_comm()) == "unified"  # this MPI's: the store shares here


NOT_SHARED = {None: "this MPI makes no shared-memory window here",
              "separate": "this MPI's shared-memory windows use the separate memory model "
                          "(MPI_WIN_SEPARATE), where reading them in place is not defined"}


def _refused_shared_memory(world, monkeypatch) -> None:
    """``shared_memory=True`` where the ranks cannot share is one UsageError on every rank
    naming it and why (an MPI with no shared window or the separate model, which do not run
    here: this MPI's answer replaced); it was taken on trust. Before any window: the ranks'
    collectives still match afterwards, and where they can share it is taken."""
    from hpctrain.async_ import store as store_module

    for model, why in NOT_SHARED.items():
        with monkeypatch.context() as patch:
            patch.setattr(store_module, "_shared_model", lambda comm, model=model: model)
            with pytest.raises(UsageError) as e:
                ParameterStore(torch.zeros(100), world, shared_memory=True)
        assert str(e.value) == (f"ParameterStore: shared_memory=True, but {why}; leave it "
                                "None to share memory where the ranks can")
        assert getattr(e.value, "on_every_rank", False)
    world.Barrier()
    with ParameterStore(torch.ones(100), world, shared_memory=True) as store:
        assert store.shared
        out = torch.zeros(100)
        store.pull(out)
        assert out.tolist() == [1.0] * 100
        store.finish()
    for no in (False, 0, np.False_):  # each a plain no, none of them "as the ranks can"
        with ParameterStore(torch.ones(100), world, shared_memory=no) as store:
            assert not store.shared
            store.finish()


def test_shared_memory_true_is_checked(monkeypatch):
    _refused_shared_memory(self_comm(), monkeypatch)


# How a push reaches the windows: shared memory where it can (CPU kernel on the shard in
# place), Get/Put, or the staged path GPU workers take (read, kernel, write back) on the CPU.
MODES = {"auto": {}, "get-put": {"shared_memory": False}, "staged": {"in_place": False}}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("consistency", ["locked", "atomic"])
def test_one_worker_matches_sequential_sgd_and_compensation_is_zero(consistency, mode):
    MPI = comm.mpi()
    data = batches(1, 25)
    ref_model = small_model()
    train(ref_model, torch.optim.SGD(ref_model.parameters(), **HYPER), data)
    finals = {}
    for name in ("asgd", "dcasgd-c", "dcasgd-a"):
        model = small_model()
        with ParameterStore(flat_of(model), MPI.COMM_SELF, shards=3, consistency=consistency,
                            **MODES[mode]) as store:
            if name == "asgd":
                opt = ASGD(model, store, **HYPER)
            else:
                opt = DCASGD(model, store, lam=5.0, adaptive=name == "dcasgd-a", **HYPER)
            train(model, opt, data)
            assert opt.staleness.counts == {0: 25}
            global_model = torch.empty(store.numel)
            assert store.pull(global_model) == 25
            assert torch.equal(global_model, flat_of(model))
            store.finish()
        finals[name] = flat_of(model)
    # One worker: w == w_bak at every push, so the compensation term is exactly zero.
    assert torch.equal(finals["dcasgd-c"], finals["asgd"])
    assert torch.equal(finals["dcasgd-a"], finals["asgd"])
    torch.testing.assert_close(finals["asgd"], flat_of(ref_model), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("consistency", ["locked", "atomic"])
def test_one_worker_with_momentum_matches_torch_sgd_with_momentum(consistency):
    data = batches(2, 25)
    ref_model = small_model()
    train(ref_model, torch.optim.SGD(ref_model.parameters(), momentum=0.9, **HYPER), data)
    model = small_model()
    with ParameterStore(flat_of(model), self_comm(), shards=2, consistency=consistency) as store:
        train(model, DCASGD(model, store, momentum=0.9, **HYPER), data)
        store.finish()
    torch.testing.assert_close(flat_of(model), flat_of(ref_model), rtol=1e-5, atol=1e-5)


def test_gradients_are_views_of_the_pushed_buffer_however_they_are_zeroed():
    """step copied every gradient into the flat buffer it pushes (15-20 % of a DC-ASGD step):
    now ``.grad`` views that buffer and backward accumulates there after the optimizer's
    zero_grad. A gradient made anew (zero_grad(set_to_none=True), the module's zero_grad,
    the user's own tensor) is copied in, and a parameter left out of a step pushes zeros:
    every way gives the same model."""
    data = batches(5, 6)
    finals = {}
    for zeroing in ("optimizer", "set_to_none", "module", "replaced"):
        model = small_model()
        with ParameterStore(flat_of(model), self_comm(), shards=2) as store:
            opt = DCASGD(model, store, momentum=0.5, **HYPER)
            for step, (x, y) in enumerate(data):
                if zeroing in ("optimizer", "set_to_none"):
                    opt.zero_grad(set_to_none=zeroing == "set_to_none")
                else:
                    model.zero_grad()
                if step == 3:  # the last layer gets no gradient
                    model[0](x).square().mean().backward()
                else:
                    F.cross_entropy(model(x), y).backward()
                if zeroing == "replaced":
                    for p in model.parameters():
                        p.grad = None if p.grad is None else p.grad.clone()
                if zeroing == "optimizer" and step > 0:  # the first backward made new ones
                    where = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
                    assert len(where) == 1
                    assert where.isdisjoint(p.untyped_storage().data_ptr()
                                            for p in model.parameters())
                opt.step()
            store.finish()
        finals[zeroing] = flat_of(model)
    for zeroing, final in finals.items():
        assert torch.equal(final, finals["optimizer"]), zeroing


def test_optimizer_state_round_trip_continues_the_same_run():
    """A DC-ASGD-a worker with momentum restored from state_dict() (through torch.save with
    weights_only) ends where the uninterrupted worker does: mean squares, velocity and the
    staleness record are all in the state."""
    data = batches(4, 12)
    hyper = {"momentum": 0.5, "adaptive": True, **HYPER}
    whole = small_model()
    with ParameterStore(flat_of(whole), self_comm()) as store:
        train(whole, DCASGD(whole, store, **hyper), data)
        store.finish()
    model = small_model()
    with ParameterStore(flat_of(model), self_comm()) as store:
        opt = DCASGD(model, store, **hyper)
        train(model, opt, data[:5])
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        store.finish()
    saved = flat_of(model)
    model = small_model()
    with ParameterStore(saved, self_comm()) as store:
        opt = DCASGD(model, store, **hyper)
        buffer.seek(0)
        opt.load_state_dict(torch.load(buffer, weights_only=True))
        train(model, opt, data[5:])
        assert len(opt.staleness) == 12
        with pytest.raises(UsageError, match="lacks 'v'"):
            DCASGD(small_model(), store, **hyper).load_state_dict(
                {**opt.state_dict(), "worker": {**opt.state_dict()["worker"], "v": None}})
        store.finish()
    torch.testing.assert_close(flat_of(model), flat_of(whole), rtol=0, atol=0)


def saved(state: dict) -> bytes:
    """``state`` as a checkpoint holds it (torch.save)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_a_checkpoints_staleness_stays_the_same_size_as_pushes_grow():
    """The optimizer's state held every push's staleness (a list): ~2 bytes a push in every
    checkpoint, GBs in a week-long run. Its tally holds one count per value: 10 pushes and
    10000 save (near enough) the same bytes."""
    sizes = {}
    for pushes in (10, 10000):
        model = small_model()
        with ParameterStore(flat_of(model), self_comm()) as store:
            opt = ASGD(model, store, lr=0.01)
            for _ in range(pushes):
                opt.step()  # no gradients: zeros pushed, a push all the same
            store.finish()
        assert len(opt.staleness) == pushes and opt.staleness.counts == {0: pushes}
        assert opt.state_dict()["worker"]["staleness"] == {0: pushes}
        sizes[pushes] = len(saved(opt.state_dict()))
    assert sizes[10000] - sizes[10] <= 128, sizes  # torch.save aligns records to 64 bytes


def test_an_old_checkpoints_staleness_list_is_read_as_a_tally():
    """A run resumed from a checkpoint written before tallies (its worker state lists every
    push's staleness) counts those pushes and its own, and saves the new form."""
    data = batches(4, 6)
    model = small_model()
    with ParameterStore(flat_of(model), self_comm()) as store:
        opt = DCASGD(model, store, adaptive=True, **HYPER)
        train(model, opt, data[:2])
        old = opt.state_dict()
        old["worker"] = {**old["worker"], "staleness": [3, 1, 3, 0]}  # as such a run saved it
        resumed = DCASGD(model, store, adaptive=True, **HYPER)
        resumed.load_state_dict(torch.load(io.BytesIO(saved(old)), weights_only=True))
        assert resumed.staleness.counts == {0: 1, 1: 1, 3: 2}
        train(model, resumed, data[2:])
        store.finish()
    assert resumed.staleness.counts == {0: 5, 1: 1, 3: 2} and len(resumed.staleness) == 8
    assert resumed.state_dict()["worker"]["staleness"] == {0: 5, 1: 1, 3: 2}


def test_bad_store_arguments_rejected():
    MPI = comm.mpi()
    v = torch.zeros(10)
    with pytest.raises(UsageError, match="consistency 'eventual'"):
        ParameterStore(v, MPI.COMM_SELF, consistency="eventual")
    with pytest.raises(UsageError, match="servers=1 with 1 rank:"):
        ParameterStore(v, MPI.COMM_SELF, servers=1)
    with pytest.raises(UsageError, match="shards=11"):
        ParameterStore(v, MPI.COMM_SELF, shards=11)
    with pytest.raises(UsageError, match="float64"):
        ParameterStore(v.double(), MPI.COMM_SELF)
    # A list is the model's parameters: a float64 model's were refused as a "vector" the user
    # never passed, and a float16 tensor among float32 ones was promoted by torch.cat silently
    model = torch.nn.Linear(3, 2)
    for params, odd in ((list(model.double().parameters()), "tensor 0 of 2 is torch.float64"),
                        ([torch.zeros(3), torch.zeros(2, dtype=torch.float16)],
                         "tensor 1 of 2 is torch.float16")):
        with pytest.raises(UsageError) as e:
            ParameterStore(params, MPI.COMM_SELF)
        assert str(e.value) == (f"the store holds float32 parameters; {odd} (model.float() "
                                "converts a model)")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("consistency", ["locked", "atomic"])
def test_a_push_that_raises_leaves_the_shards_unlocked(consistency, mode):
    """A push raised inside the shard's lock and kept it: the next pull spun forever on
    shared memory, or MPI refused the nested lock epoch."""
    w = torch.arange(64, dtype=torch.float32)
    with ParameterStore(w, self_comm(), shards=2, consistency=consistency,
                        **MODES[mode]) as store:
        w_bak, g, ms = w.clone(), torch.ones(64), torch.zeros(64)
        with pytest.raises(UsageError, match="ms_decay 1.5 is outside"):
            store.push(w_bak, g, ms, lr=0.1, ms_decay=1.5)  # refused before any lock
        with pytest.raises(UsageError, match="overlaps"):
            store.push(w_bak, g, ms, ms, lr=0.1, momentum=0.5)  # the kernel's own refusal
        out = torch.empty(64)
        assert store.pull(out) == 0
        assert torch.equal(out, w)
        store.push(w.clone(), g, lr=0.5)
        store.pull(out)
        assert torch.equal(out, w - 0.5)
        store.finish()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_a_closed_store_refuses_its_methods_and_closes_once(mode):
    """After close() the store's memory is freed: updates() read it (a segfault on shared
    memory), claim() wrote to it, pull() and the optimizer's step() raised IndexError, and a
    second close() was an MPI error that aborted the job."""
    model = small_model()
    store = ParameterStore(flat_of(model), self_comm(), shards=2, **MODES[mode])
    opt = ASGD(model, store, lr=0.1)
    store.finish()
    store.close()
    n = store.numel
    calls = [("updates", store.updates), ("claim", store.claim), ("finish", store.finish),
             ("shard_updates", store.shard_updates),
             ("close_tickets", lambda: store.close_tickets(1)),
             ("pull", lambda: store.pull(torch.empty(n))),
             ("push", lambda: store.push(torch.zeros(n), torch.zeros(n), lr=0.1)),
             ("push", opt.step), ("pull", opt.pull)]  # the optimizer's, through the store
    for method, call in calls:
        with pytest.raises(UsageError, match=rf"^ParameterStore\.{method}\(\): the parameter "
                                             "store is closed$"):
            call()
    store.close()  # a no-op
    with store:
        pass  # and so is the context manager's close


def test_optimizer_rejects_a_model_of_another_size():
    MPI = comm.mpi()
    with ParameterStore(torch.zeros(10), MPI.COMM_SELF) as store:
        with pytest.raises(UsageError, match="has 256 trainable parameters, the store 10"):
            ASGD(small_model(), store, lr=0.1)
        store.finish()


def test_a_model_loaded_after_building_the_optimizer_stops_the_next_step():
    """torch's usual resume order (build model and optimizer, then load_state_dict) lost the
    checkpoint silently: the store kept the values it was built from, the step's push landed
    on them and its pull overwrote the loaded model. Now the next step raises; loading the
    values already there (hpctrain's own resume), loading into a copy of the model, or a
    pull() after the load does not stop it, and loading before building the store resumes."""
    saved = small_model(seed=1).state_dict()
    model = small_model()
    with ParameterStore(trainable_of(model), self_comm(), shards=2) as store:
        opt = DCASGD(model, store, **HYPER)
        train(model, opt, batches(0, 2))
        model.load_state_dict(model.state_dict())  # the same values: harmless
        copy.deepcopy(model).load_state_dict(saved)  # another model's load
        train(model, opt, batches(1, 1))
        model.load_state_dict(saved)
        assert torch.equal(flat_of(model), flat_of(small_model(seed=1)))  # loaded, for now
        with pytest.raises(UsageError, match=r"^DCASGD\.step\(\): load_state_dict changed the "
                                             "model's parameters after the optimizer was built"):
            train(model, opt, batches(1, 1))
        opt.pull()  # back to the store's values: the user chose them
        train(model, opt, batches(1, 1))
        model[2].load_state_dict(small_model(seed=1)[2].state_dict())  # a submodule's own load
        with pytest.raises(UsageError, match="load the model before building the ParameterStore"):
            opt.step()
        store.finish()
    model = small_model()
    model.load_state_dict(saved)  # the order that works: load, then build the store
    with ParameterStore(trainable_of(model), self_comm()) as store:
        opt = DCASGD(model, store, **HYPER)
        assert torch.equal(flat_of(model), flat_of(small_model(seed=1)))
        train(model, opt, batches(1, 1))
        store.finish()


def test_a_load_that_replaced_the_parameters_stays_refused_after_pull():
    """load_state_dict(assign=True) puts new Parameters in the model, not views of the
    optimizer's flat buffer. pull() cleared the mark as for a load of values, and then every
    step trained the old tensors: no error, and the model never changed. Now pull() and
    step() keep refusing (one line: build a new store and optimizer), even a load of the
    same values, whose new Parameters would get no gradient in the pushed buffer."""
    for loaded in ({k: v + 1 for k, v in small_model().state_dict().items()},
                   None):  # None: the model's own state_dict, the same values
        model = small_model()
        with ParameterStore(trainable_of(model), self_comm()) as store:
            opt = DCASGD(model, store, **HYPER)
            train(model, opt, batches(0, 1))
            model.load_state_dict(loaded or model.state_dict(), assign=True)
            for call in (opt.pull, opt.step, opt.pull):
                with pytest.raises(UsageError, match=r"^DCASGD\.(pull|step)\(\): load_state_dict "
                                   "replaced the model's parameters .*build a new "
                                   "ParameterStore and optimizer"):
                    call()
            store.finish()
            before = flat_of(model)
        rebuilt = ParameterStore(trainable_of(model), self_comm())  # what the error says
        with rebuilt:
            opt = DCASGD(model, rebuilt, **HYPER)
            assert torch.equal(flat_of(model), before)  # starts from the loaded values
            train(model, opt, batches(1, 1))
            assert not torch.equal(flat_of(model), before)  # and trains the model's tensors
            rebuilt.finish()


def test_parameter_groups_are_refused():
    """DCASGD([{...}, {...}], store) ended in AttributeError: 'list' object has no attribute
    'parameters', and add_param_group was accepted and then ignored (its parameters never
    updated, their gradients never zeroed): the store updates one flat vector."""
    model = small_model()
    with ParameterStore(trainable_of(model), self_comm()) as store:
        groups = [{"params": [model[0].weight], "weight_decay": 1e-2},
                  {"params": [model[0].bias], "weight_decay": 0.0}]
        with pytest.raises(TypeError, match=r"^DCASGD\(\) takes the model \(an nn.Module\), not "
                                            "list"):
            DCASGD(groups, store, lr=0.1)
        opt = DCASGD(model, store, lr=0.1)
        with pytest.raises(TypeError, match="DCASGD takes one parameter group"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))]})
        assert len(opt.param_groups) == 1
        store.finish()


@pytest.mark.parametrize("switch", ["unfreeze", "freeze"])
def test_switching_requires_grad_after_building_stops_the_next_step(switch):
    """The store holds the parameters that required grad at construction: one unfrozen later
    was never updated, one frozen later kept moving (zeros pushed, weight decay applied),
    both without a word."""
    model = small_model()
    if switch == "unfreeze":
        model[0].requires_grad_(False)  # a frozen backbone, to unfreeze after warm-up
    with ParameterStore(trainable_of(model), self_comm()) as store:
        opt = DCASGD(model, store, **HYPER)
        (x, y), = batches(0, 1)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        model[0].requires_grad_(switch == "unfreeze")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(UsageError, match=r"^DCASGD\.step\(\): requires_grad changed on a "
                                             "parameter after the optimizer was built"):
            opt.step()
        store.finish()


def test_a_store_compares_the_shapes_it_knows_with_the_optimizers_model():
    """A store made of a model's parameters (a list, or flatten_parameters's vector) knows
    their shapes: an optimizer on a model of the same size but other shapes is refused."""
    for values in ([torch.zeros(6, 4), torch.zeros(6)],
                   flatten_parameters(trainable_of(torch.nn.Linear(4, 6)))):
        with ParameterStore(values, self_comm()) as store:
            assert store.shapes == ((6, 4), (6,))
            with pytest.raises(UsageError, match=r"shapes \(5, 5\) \(5,\), the store's "
                                                 r"\(6, 4\) \(6,\)"):
                ASGD(torch.nn.Linear(5, 5), store, lr=0.1)
            ASGD(torch.nn.Linear(4, 6), store, lr=0.1)
            store.finish()
    with ParameterStore(torch.zeros(30), self_comm()) as store:  # a plain vector: sizes only
        assert store.shapes is None
        ASGD(torch.nn.Linear(5, 5), store, lr=0.1)
        store.finish()


@pytest.mark.parametrize("mode", MODES)
def test_a_push_after_finish_is_refused(mode):
    """finish() says every rank's pushes are in; a push after it was applied without a word
    (and across ranks raced the others' final pull). pull() still reads the final model."""
    model = small_model()
    with ParameterStore(trainable_of(model), self_comm(), **MODES[mode]) as store:
        opt = ASGD(model, store, lr=0.1)
        train(model, opt, batches(0, 1))
        store.finish()
        before = flat_of(model)
        with pytest.raises(UsageError, match=r"^ParameterStore\.push\(\): finish\(\) ran"):
            train(model, opt, batches(0, 1))
        assert opt.pull() == 1 and store.updates() == 1
        assert torch.equal(flat_of(model), before)


def worker_setup(world, consistency, shards, adaptive, mode="auto"):
    model = small_model()
    store = ParameterStore(flat_of(model), world, shards=shards, consistency=consistency,
                           **MODES[mode])
    assert mode != "get-put" or not store.shared
    initial = flat_of(model)
    opt = DCASGD(model, store, lam=2.0 if adaptive else 0.04, adaptive=adaptive, **HYPER)
    world.Barrier()  # every worker has read the initial model before anyone pushes
    return model, store, opt, initial


@pytest.mark.mpi(min_size=4)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_locked_pushes_replayed_in_lock_order_give_the_identical_model(mode):
    MPI = comm.mpi()
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    model, store, opt, initial = worker_setup(world, "locked", shards=3, adaptive=True,
                                              mode=mode)
    rng = random.Random(rank)
    log = []
    for step, (x, y) in enumerate(batches(100 + rank, 12)):
        time.sleep(rng.random() * 0.004)  # vary the interleaving of workers
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        opt.step()
        push = opt.last_push
        log.append((rank, step, g, push.order, push.versions, push.tau))
    mine = flat_of(model)
    world.Barrier()
    final = torch.empty(store.numel)
    store.pull(final)
    logs = [e for part in world.allgather(log) for e in part]
    workers_final = world.allgather(mine)
    store.finish()
    store.close()

    pushes = size * 12
    assert any(t > 0 for t in world.allgather(max(opt.staleness.counts)))  # did interleave
    # Every shard saw every push exactly once, numbered 0..pushes-1 in lock order.
    for s in range(3):
        counts = sorted(v[o.index(s)] for _, _, _, o, v, _ in logs)
        assert counts == list(range(pushes))
    # A push's tau: the most other workers' pushes on any shard between this worker's
    # previous push there (or the start) and this one, counted in each shard's lock order.
    order = [[e[0] for e in sorted(logs, key=lambda e, s=s: e[4][e[3].index(s)])]
             for s in range(3)]
    for r in range(size):
        mine = [[i for i, who in enumerate(o) if who == r] for o in order]
        lacked = [[sum(who != r for who in o[(m[n - 1] + 1 if n else 0):m[n]])
                   for o, m in zip(order, mine, strict=True)] for n in range(12)]
        assert [e[5] for e in logs if e[0] == r] == [max(x) for x in lacked]
    # Replay in one process, shard by shard in lock order: each worker's w_bak is what its own
    # previous push on that shard wrote, its ms follows its own pushes.
    bounds = store.bounds
    replay = initial.clone()
    w_bak = {r: initial.clone() for r in range(size)}
    ms = {r: torch.zeros_like(initial) for r in range(size)}
    for s, (lo, hi) in enumerate(bounds):
        events = sorted(logs, key=lambda e, s=s: e[4][e[3].index(s)])
        for r, _, g, *_ in events:
            kernels.dc_update(replay[lo:hi], g[lo:hi], w_bak[r][lo:hi], ms[r][lo:hi], lr=0.05,
                              lam=2.0, ms_decay=0.95, weight_decay=1e-3)
            w_bak[r][lo:hi] = replay[lo:hi]
    assert torch.equal(replay, final)
    for r in range(size):
        assert torch.equal(w_bak[r], workers_final[r])


@pytest.mark.mpi(min_size=4)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_atomic_loses_no_update(mode):
    MPI = comm.mpi()
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    # Integer steps: the sum is exact whatever the order, so a lost update cannot hide.
    numel, steps = 5000, 40
    start = torch.arange(numel, dtype=torch.float32)
    with ParameterStore(start, world, shards=3, consistency="atomic", **MODES[mode]) as store:
        w = torch.empty(numel)
        store.pull(w)
        world.Barrier()
        g = torch.full((numel,), float(rank + 1))
        for _ in range(steps):
            store.push(w, g, lr=1.0)
        world.Barrier()
        final = torch.empty(numel)
        store.pull(final)
        total = steps * sum(r + 1 for r in range(world.Get_size()))
        assert torch.equal(start - final, torch.full((numel,), float(total)))
        assert store.updates() == steps * world.Get_size()
        assert store.shard_updates() == [steps * world.Get_size()] * 3
        store.finish()

    # DC-ASGD-a through the optimizer: final - initial is the sum of every pushed delta.
    model, store, opt, initial = worker_setup(world, "atomic", shards=4, adaptive=True,
                                              mode=mode)
    pushed = torch.zeros_like(initial, dtype=torch.float64)
    for x, y in batches(200 + rank, 15):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pushed += store.last_delta.double()
    world.Barrier()
    final = torch.empty(store.numel)
    store.pull(final)
    world.Allreduce(MPI.IN_PLACE, pushed.numpy(), op=MPI.SUM)
    store.finish()
    store.close()
    torch.testing.assert_close((final.double() - initial.double()), pushed, rtol=0, atol=1e-5)
    assert pushed.abs().max() > 1e-3


@pytest.mark.mpi(min_size=4)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("consistency", ["locked", "atomic"])
def test_staleness_in_lock_step(consistency):
    MPI = comm.mpi()
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    model, store, opt, _ = worker_setup(world, consistency, shards=size, adaptive=False)
    rounds, taus = 5, []
    for x, y in batches(300 + rank, rounds):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for turn in range(size):  # workers push one after another, then the next round
            if turn == rank:
                opt.step()
                taus.append(opt.last_push.tau)
            world.Barrier()
    # First round: the workers before me pushed since my pull; then every other worker once.
    assert taus == [rank] + [size - 1] * (rounds - 1)
    assert opt.staleness == Tally.of(taus)  # the tally counts each push's
    assert store.updates() == rounds * size
    store.finish()
    store.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_shared_memory_true_is_checked_on_every_rank(monkeypatch):
    _refused_shared_memory(comm.mpi().COMM_WORLD, monkeypatch)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("shared", [None, False], ids=["auto", "get-put"])
def test_closing_the_tickets_while_others_claim(shared):
    """SIGUSR1's stop in an asynchronous run: rank 0 closes the ticket counter while every
    rank claims. The tickets handed out before are 0..M-1, each once; every claim after is at
    or past CLOSED. Once the budget's tickets are all out, closing refuses and changes nothing."""
    MPI = comm.mpi()
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    with ParameterStore(torch.zeros(100), world, shared_memory=shared) as store:
        world.Barrier()
        mine = []
        while (ticket := store.claim()) < CLOSED:
            mine.append(ticket)
            if rank == 0 and len(mine) == 100:
                assert store.close_tickets(budget=10**9)
            time.sleep(1e-3)  # a step (a claim back to back starves MPI's exclusive lock)
        claimed = sorted(t for tickets in world.allgather(mine) for t in tickets)
        assert claimed == list(range(len(claimed))) and len(claimed) >= 100
        store.finish()

    with ParameterStore(torch.zeros(100), world, shared_memory=shared) as store:
        while store.claim() < 20:
            pass
        world.Barrier()  # all 20 are out
        if rank == 0:
            assert not store.close_tickets(budget=20)
        world.Barrier()
        assert 20 <= store.claim() < CLOSED
        store.finish()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("shared", [None, False], ids=["auto", "get-put"])
def test_dedicated_server_serves_one_worker_like_sequential_sgd(shared):
    MPI = comm.mpi()
    world = MPI.COMM_WORLD
    pair = world.Split(0 if world.Get_rank() < 2 else MPI.UNDEFINED, world.Get_rank())
    if pair == MPI.COMM_NULL:
        return
    data = batches(3, 20)
    model = small_model()
    with ParameterStore(flat_of(model), pair, servers=1, consistency="locked",
                        shared_memory=shared) as store:
        assert store.hosts == [1] and store.is_worker == (pair.Get_rank() == 0)
        if store.is_worker:
            opt = DCASGD(model, store, lam=2.0, adaptive=True, **HYPER)
            train(model, opt, data)
            assert opt.staleness.counts == {0: 20}
            ref_model = small_model()
            train(ref_model, torch.optim.SGD(ref_model.parameters(), **HYPER), data)
            torch.testing.assert_close(flat_of(model), flat_of(ref_model), rtol=1e-5, atol=1e-6)
        store.finish()
    pair.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("consistency", ["locked", "atomic"])
def test_pushes_on_one_node_need_no_call_from_the_owner(consistency, tmp_path):
    """On shared memory the locks and counters are hpctrain's own: workers pull and push while
    the rank that hosts every shard and counter makes no MPI call (MPICH's and Intel MPI's
    passive-target locks would wait for it to call MPI). Workers say they are done with a
    file; the host waits for those, 30 s at most, then checks what landed."""
    MPI = comm.mpi()
    world = MPI.COMM_WORLD
    folder = Path(world.bcast(str(tmp_path)))
    numel, pushes = 3000, 10
    with ParameterStore(torch.zeros(numel), world, servers=1, shards=3,
                        consistency=consistency) as store:
        assert store.shared  # all ranks are on this node
        expected = pushes * store.num_workers
        if store.is_worker:
            w = torch.empty(numel)
            for _ in range(pushes):
                store.pull(w)
                store.push(w, torch.ones(numel), lr=1.0)
            (folder / f"done.{store.rank}").touch()
        else:
            deadline = time.monotonic() + 30
            while len(list(folder.glob("done.*"))) < store.num_workers \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(list(folder.glob("done.*"))) == store.num_workers
            assert store.shard_updates() == [expected] * 3
            final = torch.empty(numel)
            store.pull(final)  # each push added -1 everywhere
            assert torch.equal(final, torch.full((numel,), -float(expected)))
        store.finish()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("algo", ["asgd", "ssp"])
def test_a_worker_at_a_checkpoint_mark_ends_with_one_that_stopped(algo):
    """Rank 0 stops early (it saw a collapse) while the others wait at a checkpoint mark: its
    end-of-run barrier matched their mark's, and then it waited in its final broadcast while
    they waited in the checkpoint's gather (a hang the watchdog ended). Now one collective
    serves both, and the others learn there that the run ends, with no checkpoint."""
    from hpctrain import config as configs
    from hpctrain.algorithm import Setup
    from hpctrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig

    world = comm.init("serialized").COMM_WORLD
    config = configs.resolve(RunConfig(algo=algo, data=DataConfig(dataset="synthetic"),
                                       model=ModelConfig(name="mlp"),
                                       optim=OptimConfig(epochs=1)))
    algorithm = config.algorithm_class(config)
    model = torch.nn.Linear(4, 2)
    workers = algorithm.connect(world, model)
    algorithm.setup(Setup(model, None, workers, workers.Get_size(), steps=4))
    algorithm.start(0)
    if world.Get_rank() == 0:
        algorithm.finish(0)
    else:
        assert algorithm.before_checkpoint(0) is None
        algorithm.finish(0)  # no second collective
    algorithm.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("differs", ["size", "dtype", "servers", "shapes"])
def test_ranks_that_disagree_on_the_store_all_raise_one_error(differs):
    """A rank whose vector (or arguments) differs: shard sizes and the initial Bcast came from
    each rank's own, so 8586 floats on rank 0 and 4426 on rank 1 ended in a glibc abort, and a
    float64 vector on one rank left the others waiting. Now every rank raises, before any
    window, naming rank 0's value and the first other rank's."""
    world = comm.mpi().COMM_WORLD
    rank = world.Get_rank()
    last = rank == world.Get_size() - 1
    values = torch.zeros(4426 if last and differs == "size" else 8586,
                         dtype=torch.float64 if last and differs == "dtype" else torch.float32)
    if differs == "shapes":  # as many values, other layers: rank 0 Linear(4, 6), the last (5, 5)
        values = flatten_parameters(trainable_of(torch.nn.Linear(5, 5) if last
                                                 else torch.nn.Linear(4, 6)))
    servers = 1 if last and differs == "servers" else 0
    expected = {"size": "ranks hold vectors of different sizes: rank 0 8586, rank {r} 4426",
                "dtype": "ranks hold vectors of different types: rank 0 torch.float32 (8586,), "
                         "rank {r} torch.float64 (8586,)",
                "servers": "ranks give different servers: rank 0 servers=0, rank {r} servers=1",
                "shapes": "ranks hold parameters of different shapes: rank 0 (6, 4) (6,), "
                          "rank {r} (5, 5) (5,)"}
    with pytest.raises(UsageError) as err:
        ParameterStore(values, world, servers=servers)
    assert str(err.value) == "ParameterStore: " + expected[differs].format(r=world.Get_size() - 1)
    world.Barrier()  # every rank got here: none is left in a collective


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_the_roots_values_reach_the_store_in_pieces(monkeypatch):
    """Pieces of 7 floats stand for 2**30 ones (a model past 2**31 floats was one Bcast
    before, which MPI-3 libraries refuse): every rank pulls the root's values."""
    monkeypatch.setattr(comm, "COUNT_PIECE", 7)
    world = comm.world()
    root = world.Get_size() - 1
    values = torch.arange(50, dtype=torch.float32) * (world.Get_rank() + 1)
    with ParameterStore(values, world, shards=3, root=root) as store:
        pulled = torch.empty(50)
        store.pull(pulled)
        world.Barrier()
    assert torch.equal(pulled, torch.arange(50, dtype=torch.float32) * (root + 1))


class _CountingWindow:
    """A store's real window, passed through, noting the count of each RMA call's target."""

    def __init__(self, win, counts: list[int]):
        self._win, self._counts = win, counts

    def __getattr__(self, name):
        call = getattr(self._win, name)
        if name not in ("Get", "Put", "Accumulate", "Get_accumulate"):
            return call

        def noted(*args, target, **kwargs):
            self._counts.append(target[1])
            return call(*args, target=target, **kwargs)
        return noted


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("consistency", ["locked", "atomic"])
def test_each_shard_moves_in_pieces(consistency, mode, monkeypatch):
    """Pieces of 7 floats stand for 2**30 ones: a shard past 2**31 floats was one Get, Put,
    Accumulate or Get_accumulate, which MPI-3 libraries refuse (``--servers 1`` with one
    worker makes the whole model one shard). Integer steps: the sums are exact."""
    monkeypatch.setattr(comm, "COUNT_PIECE", 7)
    world = comm.world()
    rank, size = world.Get_rank(), world.Get_size()
    numel, steps = 50, 4
    start = torch.arange(numel, dtype=torch.float32)
    counts: list[int] = []
    with ParameterStore(start, world, shards=3, consistency=consistency,
                        **MODES[mode]) as store:
        store.windows = [_CountingWindow(w, counts) for w in store.windows]
        w = torch.empty(numel)
        store.pull(w)
        world.Barrier()
        for _ in range(steps):
            store.push(w, torch.full((numel,), float(rank + 1)), lr=1.0)
        world.Barrier()
        final = torch.empty(numel)
        store.pull(final)
        assert store.shard_updates() == [steps * size] * 3
        store.finish()
    total = steps * sum(r + 1 for r in range(size))
    assert torch.equal(start - final, torch.full((numel,), float(total)))
    assert max(counts, default=0) <= 7
    assert bool(counts) == (not store.shared)  # shared memory: no RMA call moves a shard
