"""Bounded staleness (SSP) on the RMA store: :class:`hpctrain.async_.StalenessBound`.

Single-process tests use one worker on COMM_SELF; the ``mpi`` tests run under
``mpirun -np 2|4 python -m pytest --with-mpi -m mpi`` with the real store and ASGD optimizer.
"""

import time

import pytest
import torch
from torch.nn import functional as F

from hpctrain import comm
from hpctrain.async_ import ASGD, ParameterStore, StalenessBound
from hpctrain.errors import UsageError


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def flat_of(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)


def tau_bound(s: int, workers: int) -> int:
    """The module's bound on a push's staleness in updates for the loop of these tests, which
    reads the store only at its pushes (no pull after the wait): 2 (S + 1) (M - 1)."""
    return 2 * (s + 1) * (workers - 1)


class Worker:
    """The intended loop's body: wait, compute and push, tick; records every push."""

    def __init__(self, store, bound, seed: int):
        self.model = small_model()
        self.opt = ASGD(self.model, store, lr=0.1)
        self.bound, self.seed = bound, seed
        self.log = []  # per push: (gap at wait's return, tau, index, clock after tick)

    def step(self, sleep: float = 0.0) -> None:
        self.bound.wait()
        x, y = batch(self.seed + self.bound.clock)
        if sleep:
            time.sleep(sleep)
        self.opt.zero_grad()
        F.cross_entropy(self.model(x), y).backward()
        self.opt.step()
        self.bound.tick()
        push = self.opt.last_push
        self.log.append((self.bound.last_gap, push.tau, push.index, self.bound.clock))


def push_indices(logs) -> list[dict[int, int]]:
    """Per worker: its k-th push's global update index, by k (its clock after the push)."""
    return [{clock: index for _, _, index, clock in log} for log in logs]


def check_order(logs, s: int, clocks) -> None:
    """SSP's order: a worker's (c+1)-th push comes after every worker's (c-S)-th, for the
    pushes numbered c+1 in ``clocks`` (all workers running in between)."""
    pushes = push_indices(logs)
    for mine in pushes:
        for c in clocks:
            if c + 1 in mine and c - s >= 1:
                assert all(mine[c + 1] > other[c - s] for other in pushes), (c, pushes)


def check_bad_arguments(store) -> None:
    """Raised before the window's collective, so one rank alone may hit it."""
    with pytest.raises(UsageError, match="max_staleness=-1"):
        StalenessBound(store, -1)
    with pytest.raises(UsageError, match="integer"):
        StalenessBound(store, 1.5)
    with pytest.raises(UsageError, match="poll_interval=-1"):
        StalenessBound(store, 1, poll_interval=-1)


def test_bad_arguments_rejected():
    with ParameterStore(flat_of(small_model()), comm.mpi().COMM_SELF) as store:
        check_bad_arguments(store)
        store.finish()


def test_one_worker_never_waits_and_state_round_trips():
    with ParameterStore(flat_of(small_model()), comm.mpi().COMM_SELF) as store:
        bound = StalenessBound(store, 0)
        worker = Worker(store, bound, seed=0)
        for _ in range(5):
            worker.step()
        assert bound.clock == 5 and bound.clocks() == [5]
        assert [clock for *_, clock in worker.log] == [1, 2, 3, 4, 5]
        assert [tau for _, tau, _, _ in worker.log] == [0] * 5
        assert bound.summary() == {"ssp_waits": 0, "ssp_wait_s": 0.0, "ssp_max_gap": 0}
        bound.park()
        assert bound.clocks() == [None]
        with pytest.raises(RuntimeError, match="parked"):
            bound.wait()
        bound.unpark()
        assert bound.clocks() == [5]
        state = {**bound.state_dict(), "waits": 3, "wait_s": 0.5, "max_gap": 0}
        bound.close()
        restored = StalenessBound(store, 0)
        assert restored.clocks() == [0]
        restored.load_state_dict(state)  # the slot holds the restored clock
        assert restored.clocks() == [5] and restored.clock == 5
        assert restored.summary() == {"ssp_waits": 3, "ssp_wait_s": 0.5, "ssp_max_gap": 0}
        assert restored.wait() == 0.0
        store.finish()
        restored.close()
        with pytest.raises(RuntimeError, match="after close"):
            restored.tick()


@pytest.mark.mpi(min_size=1)
@pytest.mark.timeout(60)
def test_bad_arguments_raise_on_every_rank_before_any_collective():
    world = comm.mpi().COMM_WORLD
    store = ParameterStore(flat_of(small_model()), world)
    check_bad_arguments(store)  # no collective started: the ranks stay in step
    bound = StalenessBound(store, 0)
    store.finish()
    bound.close()
    store.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("s", [1, 2])
def test_bound_holds_and_is_enforced_with_a_slow_worker(s):
    world = comm.mpi().COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    steps, slow = 12, size - 1
    store = ParameterStore(flat_of(small_model()), world, servers=0, consistency="locked")
    bound = StalenessBound(store, s)
    worker = Worker(store, bound, seed=100 * rank)
    world.Barrier()  # all start together: torch's first optimizer takes seconds on some ranks
    for _ in range(steps):
        worker.step(sleep=0.05 if rank == slow else 0.0)
    assert bound.clocks()[rank] == steps  # published: exactly the pushes made
    bound.park()
    store.finish()
    logs = world.allgather(worker.log)
    stats = world.allgather(bound.summary())
    assert bound.clocks() == [None] * size  # everyone parked
    bound.close()
    store.close()

    for log in logs:
        assert [clock for *_, clock in log] == list(range(1, steps + 1))
        assert all(gap <= s for gap, *_ in log)
    assert sorted(index for log in logs for _, _, index, _ in log) == list(range(size * steps))
    taus = [tau for log in logs for _, tau, _, _ in log]
    assert max(taus) <= tau_bound(s, size), (taus, tau_bound(s, size))
    check_order(logs, s, range(steps))
    assert all(st["ssp_max_gap"] <= s for st in stats)
    # The fast workers got more than S ahead of the slow one and were held back.
    for r, st in enumerate(stats):
        if r != slow:
            assert st["ssp_waits"] > 0 and st["ssp_wait_s"] > 0, (r, st)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_zero_staleness_takes_turns_in_rounds():
    world = comm.mpi().COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    rounds = 6
    store = ParameterStore(flat_of(small_model()), world, servers=0, consistency="locked")
    bound = StalenessBound(store, 0)
    worker = Worker(store, bound, seed=200 * rank)
    world.Barrier()
    for _ in range(rounds):
        worker.step()
    bound.park()
    store.finish()
    pushes = [(index, clock) for log in world.allgather(worker.log) for _, _, index, clock in log]
    taus = [tau for log in world.allgather(worker.log) for _, tau, _, _ in log]
    bound.close()
    store.close()

    pushes.sort()
    assert [index for index, _ in pushes] == list(range(size * rounds))
    # In update order: every worker's c-th push before anyone's (c+1)-th.
    assert [clock for _, clock in pushes] == [c for c in range(1, rounds + 1) for _ in range(size)]
    assert max(taus) <= tau_bound(0, size)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_a_parked_worker_holds_nobody_back_and_unparked_it_does_again():
    """Worker 0 stops at clock 2 and waits at a barrier (a checkpoint's, say) parked; the others
    run S + 5 clocks past it and reach the barrier (unparked it would deadlock). After all
    unpark, the others wait for worker 0 to catch up."""
    world = comm.mpi().COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    s = 1
    store = ParameterStore(flat_of(small_model()), world, servers=0, consistency="locked")
    bound = StalenessBound(store, s)
    worker = Worker(store, bound, seed=300 * rank)
    world.Barrier()
    for _ in range(2):
        worker.step()
    if rank == 0:
        bound.park()
    world.Barrier()
    if rank != 0:
        assert bound.clocks()[0] is None
        waits = bound.waits
        for _ in range(s + 6):
            worker.step()
        assert bound.clock == s + 8 and bound.clocks()[0] is None
        if size == 2:  # the only running worker never waits
            assert bound.waits == waits
        bound.park()
    world.Barrier()  # the "checkpoint" barrier: worker 0 has been in it all along
    bound.unpark()
    world.Barrier()  # nobody steps before all have unparked
    assert bound.clocks() == [2] + [s + 8] * (size - 1)
    world.Barrier()
    for _ in range(12 - bound.clock):
        worker.step()
    assert bound.clock == 12
    bound.park()
    store.finish()
    logs = world.allgather(worker.log)
    bound.close()
    store.close()
    assert all(gap <= s for log in logs for gap, *_ in log)
    # Unparked at clock 2, worker 0 held the others (at S + 8) back again: their pushes after
    # the barrier came only after its pushes up to S behind them.
    check_order(logs, s, range(s + 8, 12))
    assert sorted(index for log in logs for _, _, index, _ in log) == list(range(12 * size))


@pytest.mark.mpi(min_size=3)
@pytest.mark.timeout(60)
def test_dedicated_server_hosts_the_clocks():
    """servers=1: the clocks live on the server rank, which only constructs, serves in
    finish() and closes."""
    MPI = comm.mpi()
    world = MPI.COMM_WORLD
    trio = world.Split(0 if world.Get_rank() < 3 else MPI.UNDEFINED, world.Get_rank())
    if trio == MPI.COMM_NULL:
        return
    rank, s, steps = trio.Get_rank(), 1, 10
    store = ParameterStore(flat_of(small_model()), trio, servers=1, consistency="locked")
    bound = StalenessBound(store, s)
    assert bound.host == 2 and store.is_worker == (rank < 2)
    log, stats = [], {}
    worker = Worker(store, bound, seed=400 * rank) if store.is_worker else None
    trio.Barrier()
    if store.is_worker:
        for _ in range(steps):
            worker.step(sleep=0.05 if rank == 1 else 0.0)
        bound.park()
        log, stats = worker.log, bound.summary()
    else:
        with pytest.raises(RuntimeError, match="server"):
            bound.wait()
    store.finish()
    logs, all_stats = trio.allgather(log), trio.allgather(stats)
    bound.close()
    store.close()
    trio.Free()
    assert all(gap <= s for gap, *_ in logs[0] + logs[1])
    assert max(tau for _, tau, _, _ in logs[0] + logs[1]) <= tau_bound(s, 2)
    check_order(logs[:2], s, range(steps))
    assert all_stats[0]["ssp_waits"] > 0


def test_ssp_waits_after_a_checkpoint_before_its_held_ticket():
    """A worker's last wait before a checkpoint mark may pass while a slower one is parked at
    the checkpoint (left out of the minimum); the ticket it then claimed at the mark is held
    across the checkpoint and computed without a wait in claim: S + 1 clocks ahead. SSP
    waits once more after the checkpoint's save (not before it: the save is collective and
    the slower worker's push that ends the wait follows it), and reads the store after it."""
    from hpctrain.async_.algorithm import SSP

    calls = []

    class Bound:
        clock, last_gap = 5, 0

        def wait(self):
            calls.append("wait")
            return 0.0

    class Optimizer:
        def pull(self):
            calls.append("pull")

    algo = SSP.__new__(SSP)  # the hook alone: no store, no MPI
    # The last wait left the parked worker out and took clock 5 as covered; the model is the
    # mark's pull, which lacks that worker's push after the save: read after the wait.
    algo.bound, algo.optimizer, algo.options, algo._covered = Bound(), Optimizer(), \
        SSP.Options(max_staleness=0), 5
    algo.after_checkpoint()
    assert calls == ["wait", "pull"]
    assert algo._covered == 5
