"""``hvd.elastic`` on hpctrain's backends: Horovod Elastic's state, brought back by a restart.

Single process: commit, restore, the commit file and its refusal, the sampler's order.
Jobs: a Horovod elastic script under ``torchrun --max-restarts`` that loses a worker ends at
the uninterrupted run's model bit for bit; under mpirun, a job of 2 ranks that loses one is
started again on 3 and trains each of the epoch's remaining samples once, at the new size's
learning rate.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
import re
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import ROOT, gpu_missing, run_program, torchrun
from torch import nn

import hpctrain.sync as sync
from hpctrain.errors import UsageError
from hpctrain.sync import elastic


@pytest.fixture
def hvd(monkeypatch, tmp_path):
    """hpctrain.sync on a one-rank MPI world; states numbered from 0 again (their files)."""
    monkeypatch.setattr(elastic, "_created", itertools.count())
    monkeypatch.delenv(elastic.ENV, raising=False)
    torch.set_num_threads(1)
    sync.init(backend="mpi")
    yield sync
    sync.shutdown()


def _training(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt


def _step(model, opt) -> None:
    opt.zero_grad()
    model(torch.ones(3, 4)).pow(2).sum().backward()
    opt.step()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hvd_elastic_is_this_module_on_hpctrains_backends(hvd):
    assert hvd.elastic is elastic
    assert callable(hvd.elastic.run) and hvd.elastic.TorchState and hvd.elastic.ElasticSampler


def test_restore_goes_back_to_the_last_commit(hvd):
    model, opt = _training()
    sampler = hvd.elastic.ElasticSampler(range(20), seed=1)
    state = hvd.elastic.TorchState(model, opt, sampler=sampler, epoch=0, notes=["a"])
    _step(model, opt)
    sampler.record_batch(0, 5)
    state.epoch, state.notes = 1, ["a", "b"]
    state.commit()
    kept = (json.dumps(state.notes), state.epoch, sampler.state_dict(),
            {k: v.clone() for k, v in model.state_dict().items()})
    _step(model, opt)
    sampler.record_batch(1, 5)
    state.epoch, state.notes = 2, ["c"]
    state.restore()
    assert (json.dumps(state.notes), state.epoch, sampler.state_dict()) == kept[:3]
    assert _same(model.state_dict(), kept[3])
    assert sampler.processed_num == 5 and len(list(sampler)) == 15
    buf = opt.state[model.weight]["momentum_buffer"]
    assert buf.abs().sum() > 0  # the optimizer's state came back too, not a fresh one


def test_a_commit_written_to_the_folder_brings_a_new_process_back(hvd, monkeypatch, tmp_path):
    """What a restarted job does: same script, fresh objects, the folder of the last run."""
    monkeypatch.setenv(elastic.ENV, str(tmp_path))
    model, opt = _training(0)
    state = hvd.elastic.TorchState(model, opt, epoch=3, seen={"x": 1})
    _step(model, opt)
    state.commit()
    state.commit()  # replaces the file: the newest commit counts
    elastic.flush()  # written in the background
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-0.pt"]
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_opt = copy.deepcopy(opt.state_dict())
    _step(model, opt)  # not committed: lost in the "crash"

    monkeypatch.setattr(elastic, "_created", itertools.count())
    model2, opt2 = _training(1)  # other initial weights, no optimizer state
    fresh = hvd.elastic.TorchState(model2, opt2, epoch=0, seen={})
    resets = []
    fresh.register_reset_callbacks([lambda: resets.append(hvd.size())])

    @hvd.elastic.run
    def train(state, extra):
        return state.epoch, state.seen, extra

    assert train(fresh, "x") == (3, {"x": 1}, "x")
    assert resets == [1]  # a resume is a reset: the callbacks see the new size
    assert _same(model2.state_dict(), want)
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"],
                       want_opt["state"][0]["momentum_buffer"])
    fresh.commit()
    assert fresh._commits == 3  # counted on from the commit it resumed


def test_an_unreadable_commit_is_refused_in_one_line(hvd, monkeypatch, tmp_path):
    monkeypatch.setenv(elastic.ENV, str(tmp_path))
    (tmp_path / "state-0.pt").write_bytes(b"{}\nnot a payload")
    state = hvd.elastic.TorchState(*_training(), epoch=0)
    with pytest.raises(UsageError, match=r"cannot resume from .*state-0\.pt") as e:
        hvd.elastic.run(lambda s: None)(state)
    assert "\n" not in str(e.value)


def test_a_commit_of_another_state_is_refused_in_one_line(hvd, monkeypatch, tmp_path):
    monkeypatch.setenv(elastic.ENV, str(tmp_path))
    hvd.elastic.TorchState(*_training(), epoch=0).commit()
    monkeypatch.setattr(elastic, "_created", itertools.count())
    model = nn.Linear(4, 2)
    sampler = hvd.elastic.ElasticSampler(range(8))
    other = hvd.elastic.TorchState(model, None, sampler=sampler)  # no optimizer; a sampler
    with pytest.raises(UsageError, match="it keeps model, optimizer; this TorchState keeps "
                       "model, sampler"):
        hvd.elastic.run(lambda s: None)(other)
    monkeypatch.setattr(elastic, "_created", itertools.count())
    wide = nn.Linear(5, 2)
    wider = hvd.elastic.TorchState(wide, torch.optim.SGD(wide.parameters(), 0.1), epoch=0)
    with pytest.raises(UsageError, match=r"cannot resume from .*state-0\.pt: .*size mismatch") \
            as e:
        hvd.elastic.run(lambda s: None)(wider)
    assert "\n" not in str(e.value)


def test_a_value_added_to_the_state_since_the_commit_is_refused_in_one_line(
        hvd, monkeypatch, tmp_path):
    """It was dropped: never committed nor synced, and back to its initial value at the
    next restart."""
    monkeypatch.setenv(elastic.ENV, str(tmp_path))
    hvd.elastic.TorchState(*_training(), epoch=0).commit()
    monkeypatch.setattr(elastic, "_created", itertools.count())
    added = hvd.elastic.TorchState(*_training(), epoch=0, best=0.0)
    with pytest.raises(UsageError, match=r"cannot resume from .*state-0\.pt: its values are "
                       r"epoch; this TorchState's are best, epoch \(a fresh folder starts "
                       r"over\)$"):
        hvd.elastic.run(lambda s: None)(added)


def test_schedulers_functions_and_distributed_samplers_are_committed(hvd, monkeypatch,
                                                                     tmp_path):
    """Horovod's cifar10 elastic example keeps a scheduler and DistributedSamplers in its
    TorchState: plain pickle failed on the scheduler (and on a lambda) at the first commit,
    and a DistributedSampler wrote its whole dataset into every commit. The scheduler comes
    back through its state_dict (bound to the live optimizer), the sampler as its epoch."""
    monkeypatch.setenv(elastic.ENV, str(tmp_path))
    data = torch.utils.data.TensorDataset(torch.zeros(100_000, 8))  # 3.2 MB

    def training():
        model, opt = _training(0)
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        sampler = torch.utils.data.distributed.DistributedSampler(data, 1, 0)
        return model, opt, sched, sampler

    model, opt, sched, sampler = training()
    state = hvd.elastic.TorchState(model, opt, scheduler=sched, sampler=sampler, epoch=0,
                                   double=lambda x: 2 * x)
    for epoch in range(1, 3):
        _step(model, opt)
        sched.step()
        sampler.set_epoch(epoch)
        state.epoch = epoch
        state.commit()
    elastic.flush()
    assert (tmp_path / "state-0.pt").stat().st_size < 100_000

    monkeypatch.setattr(elastic, "_created", itertools.count())
    model2, opt2, sched2, sampler2 = training()
    fresh = hvd.elastic.TorchState(model2, opt2, scheduler=sched2, sampler=sampler2, epoch=0,
                                   double=None)
    assert hvd.elastic.run(lambda s: s.double(s.epoch))(fresh) == 4
    assert fresh.scheduler is sched2 and fresh.sampler is sampler2
    assert sched2.last_epoch == 2 and opt2.param_groups[0]["lr"] == 0.1 * 0.5 ** 2
    sched2.step()
    assert opt2.param_groups[0]["lr"] == 0.1 * 0.5 ** 3  # the live optimizer's
    assert sampler2.epoch == 2 and list(sampler2) == list(sampler)


def test_a_value_that_cannot_be_saved_is_refused_at_the_start_naming_it(hvd, monkeypatch,
                                                                        tmp_path):
    monkeypatch.setenv(elastic.ENV, str(tmp_path))
    state = hvd.elastic.TorchState(*_training(), epoch=0, lock=threading.Lock())
    trained = []
    with pytest.raises(UsageError, match=r"^\$HPCTRAIN_ELASTIC_DIR: the state's value 'lock' "
                       r"cannot be saved \(TypeError: .*\); leave it out of the state, or "
                       r"unset the variable$"):
        hvd.elastic.run(lambda s: trained.append(s))(state)
    assert trained == []


def test_a_state_of_horovods_own_is_refused_in_one_line(hvd):
    """What ``from horovod.common.elastic import ObjectState`` gives: not a State of ours
    (it failed on a missing attribute)."""

    class ObjectState:  # horovod.common.elastic.ObjectState's shape
        def __init__(self, bcast_object, get_rank, **kwargs):
            self.__dict__.update(kwargs)

    with pytest.raises(UsageError, match=r"^hvd.elastic.run takes hpctrain's states, not "
                       r".*ObjectState: use hvd.elastic.ObjectState or TorchState "
                       r"\(hpctrain.sync.elastic\)$"):
        hvd.elastic.run(lambda s: None)(ObjectState(hvd.broadcast_object, hvd.rank, epoch=0))


def test_a_commit_that_cannot_be_written_stops_the_next_one(hvd, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(elastic.ENV, str(tmp_path / "file" / "commits"))  # under a file
    state = hvd.elastic.TorchState(*_training(), epoch=0)
    state.commit()  # the write fails in the background...
    with pytest.raises(UsageError, match=r"cannot write the commit .*file/commits/state-0\.pt"):
        state.commit()  # ...and the next commit says so
    state.commit()
    with pytest.raises(UsageError, match="cannot write the commit"):
        elastic.flush()


def test_a_folder_that_cannot_hold_commits_is_refused_at_the_start(hvd, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(elastic.ENV, str(tmp_path / "file" / "commits"))
    state = hvd.elastic.TorchState(*_training(), epoch=0)
    with pytest.raises(UsageError, match=r"HPCTRAIN_ELASTIC_DIR '.*file/commits': cannot make "
                       "the folder: Not a directory"):
        hvd.elastic.run(lambda s: None)(state)


def test_a_state_of_ones_own_that_cannot_be_written_is_refused_at_the_start(hvd, monkeypatch,
                                                                            tmp_path):
    """A State subclass with save, restore and sync (what Horovod asks of one) but no
    _snapshot was refused at its first commit, after training had started."""

    class Counter(hvd.elastic.State):
        def __init__(self):
            super().__init__(hvd.broadcast_object, hvd.rank)
            self.count = self.saved = 0

        def save(self):
            self.saved = self.count

        def restore(self):
            self.count = self.saved

        def sync(self):
            self.count = hvd.broadcast_object(self.count)

    trained = []
    monkeypatch.setenv(elastic.ENV, str(tmp_path))
    with pytest.raises(UsageError, match=r"^Counter cannot be written to \$HPCTRAIN_ELASTIC_DIR: "
                       r"define _snapshot\(\) and _load_snapshot\(\), or unset the variable$"):
        hvd.elastic.run(lambda s: trained.append(s.commit()))(Counter())
    assert trained == [] and list(tmp_path.iterdir()) == []
    monkeypatch.delenv(elastic.ENV)  # in memory, it runs
    hvd.elastic.run(lambda s: trained.append(s.commit()))(Counter())
    assert trained == [None]


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="no sysfs here")
def test_a_folder_that_exists_but_takes_no_files_is_refused_at_the_start(hvd, monkeypatch):
    """/sys passes os.access(W_OK) for root; the check makes a file there instead."""
    monkeypatch.setenv(elastic.ENV, "/sys/kernel")
    state = hvd.elastic.TorchState(*_training(), epoch=0)
    with pytest.raises(UsageError, match="HPCTRAIN_ELASTIC_DIR '/sys/kernel': the folder is "
                       "not writable"):
        hvd.elastic.run(lambda s: None)(state)


def test_the_last_commits_failed_write_is_raised_when_run_returns(hvd, monkeypatch, tmp_path):
    folder = tmp_path / "commits"
    monkeypatch.setenv(elastic.ENV, str(folder))
    state = hvd.elastic.TorchState(*_training(), epoch=0)

    @hvd.elastic.run
    def train(state):
        folder.rmdir()  # the folder was fine at the start, and is a file by the last commit
        folder.write_text("")
        state.commit()

    with pytest.raises(UsageError, match=r"cannot write the commit .*commits/state-0\.pt"):
        train(state)


def test_a_second_run_in_one_process_goes_on_from_the_live_state(hvd, monkeypatch, tmp_path):
    """Horovod's run syncs the live state at every call; only the first call resumes."""
    monkeypatch.setenv(elastic.ENV, str(tmp_path))
    model, opt = _training()
    state = hvd.elastic.TorchState(model, opt, epoch=0)
    resets = []
    state.register_reset_callbacks([lambda: resets.append(1)])

    @hvd.elastic.run
    def epoch(state):
        _step(model, opt)
        state.epoch += 1
        state.commit()
        _step(model, opt)  # after the commit: kept by the live model

    epoch(state)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    epoch(state)
    assert state.epoch == 2 and resets == []
    assert not _same(model.state_dict(), live)
    state.restore()
    assert state.epoch == 2  # the second call's commit, on from the first call's live model


def test_a_restored_optimizer_does_not_change_the_saved_state(hvd):
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    state = hvd.elastic.TorchState(model, opt)
    _step(model, opt)
    state.commit()
    saved = copy.deepcopy(state._handlers["optimizer"].saved)
    state.restore()
    _step(model, opt)  # Adam's exp_avg moves in place
    kept = state._handlers["optimizer"].saved["state"][0]["exp_avg"]
    assert torch.equal(kept, saved["state"][0]["exp_avg"])


def test_without_the_folder_commits_stay_in_memory(hvd, tmp_path):
    state = hvd.elastic.TorchState(*_training(), epoch=0)
    state.commit()
    assert list(tmp_path.iterdir()) == []
    assert hvd.elastic.run(lambda s: s.epoch)(state) == 0


def test_hosts_updated_interrupt_resets_and_runs_again(hvd):
    """Never raised by commit() here; a script may still raise it, and run() handles it as
    Horovod's does: reset callbacks, sync unless skip_sync, call again."""
    state = hvd.elastic.TorchState(*_training(), epoch=0)
    calls, resets = [], []
    state.register_reset_callbacks([lambda: resets.append(len(calls))])

    @hvd.elastic.run
    def train(state):
        calls.append(state.epoch)
        if len(calls) < 3:
            state.epoch += 1
            raise hvd.elastic.HostsUpdatedInterrupt(skip_sync=len(calls) == 2)
        return "done"

    assert train(state) == "done"
    # The sync puts back the committed epoch (0); skip_sync leaves the live one (1).
    assert calls == [0, 0, 1] and resets == [1, 2]


def test_a_collective_after_shutdown_in_run_is_raised_not_retried(hvd):
    """It is a HorovodInternalError (as in Horovod), which Horovod's run restores and retries
    on: here run lets it through, once, so a shutdown() inside the function cannot loop."""
    calls = []

    @hvd.elastic.run
    def train(state):
        calls.append(state.steps)
        hvd.shutdown()
        return hvd.allreduce(torch.ones(1))

    with pytest.raises(hvd.HorovodInternalError, match=r"allreduce\(\) called before"):
        train(hvd.elastic.ObjectState(hvd.broadcast_object, hvd.rank, steps=0))
    assert calls == [0]


def test_elastic_sampler_follows_horovods_order_and_skips_what_was_trained(hvd):
    data = list(range(23))
    sampler = hvd.elastic.ElasticSampler(data, shuffle=True, seed=4)
    order = list(range(23))
    random.Random(4).shuffle(order)
    assert list(sampler) == order and len(sampler) == 23
    sampler.record_batch(0, 6)
    sampler.record_batch(1, 6)
    again = hvd.elastic.ElasticSampler(data, shuffle=True, seed=4)
    again.load_state_dict(sampler.state_dict())
    assert list(again) == order[12:]
    again.set_epoch(1)
    order1 = list(range(23))
    random.Random(5).shuffle(order1)
    assert list(again) == order1
    assert list(hvd.elastic.ElasticSampler(data, shuffle=False)) == data


def test_the_horovod_backend_refuses_the_folder_it_would_not_write(monkeypatch, tmp_path):
    """Horovod's hvd.elastic commits in memory only: with the variable set the folder stayed
    empty, and nothing said so."""
    monkeypatch.setenv(elastic.ENV, str(tmp_path))
    with pytest.raises(UsageError, match=r"^HPCTRAIN_ELASTIC_DIR is set, but "
                       r"init\(backend='horovod'\) runs Horovod's own hvd.elastic"):
        sync.init(backend="horovod")
    assert sync._active is None


def test_init_under_torchrun_is_torch_and_refuses_mpi(monkeypatch):
    """Under torchrun every worker is an MPI world of its own: an MPI backend there would
    train each alone. Refused before anything starts; the default is the torch backend."""
    for name, value in (("TORCHELASTIC_RUN_ID", "x"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "1"), ("RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    for backend in ("mpi", "horovod"):
        with pytest.raises(UsageError, match=f"init.backend='{backend}'. under torchrun: its 2"):
            sync.init(backend=backend)
    assert not sync.is_initialized()


# ---------------------------------------------------------------- MPI

mpi = pytest.mark.mpi(min_size=2)


@pytest.fixture(params=["mpi", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setattr(elastic, "_created", itertools.count())
    torch.set_num_threads(1)
    sync.init(backend=request.param)
    yield sync
    sync.shutdown()


@mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_rank_resumes_from_rank_0s_commit(backend, device, tmp_path, monkeypatch):
    """Rank 0 writes the commit; fresh objects with other weights on every rank come back
    to it through run()'s sync, on the model's device (scripts/gpu-check.sh runs cuda)."""
    if device == "cuda" and (why := gpu_missing()):
        pytest.skip(why)
    hvd = backend
    dev = torch.device(device, hvd.local_rank() % torch.cuda.device_count()) \
        if device == "cuda" else torch.device("cpu")
    monkeypatch.setenv(elastic.ENV, hvd.broadcast_object(str(tmp_path)))

    def training(seed):
        model, opt = _training(seed)
        model.to(dev)
        opt.param_groups[0]["weight_decay"] = 0.1  # a fresh optimizer's zero step moves them
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
        return model, opt

    model, opt = training(0)
    state = hvd.elastic.TorchState(model, opt, steps=0)
    for k in range(3):
        opt.zero_grad()
        model(torch.full((2, 4), float(k + hvd.rank()), device=dev)).pow(2).sum().backward()
        opt.step()
        state.steps += 1
    state.commit()
    want = {k: v.cpu() for k, v in model.state_dict().items()}

    monkeypatch.setattr(elastic, "_created", itertools.count())  # "the restarted script"
    model2, opt2 = training(10 + hvd.rank())
    fresh = hvd.elastic.TorchState(model2, opt2, steps=0)
    seen = []  # what the reset callback sees: the commit on every rank, as in Horovod
    fresh.register_reset_callbacks([lambda: seen.append(
        (fresh.steps, {k: v.cpu() for k, v in model2.state_dict().items()}))])
    assert hvd.elastic.run(lambda s: s.steps)(fresh) == 3
    assert seen[0][0] == 3 and _same(seen[0][1], want)
    assert _same({k: v.cpu() for k, v in model2.state_dict().items()}, want)
    buf = opt2.state[model2.weight]["momentum_buffer"]
    assert buf.device == dev and torch.equal(buf.cpu(),
                                             opt.state[model.weight]["momentum_buffer"].cpu())


# ---------------------------------------------------------------- jobs

ELASTIC = ROOT / "tests" / "scripts" / "elastic_train.py"


def _resumed(stderr: str, size: int) -> int:
    """The commit a job said it resumed from, after one of ``size`` ranks."""
    found = re.findall(rf"resuming from commit (\d+) of a {size}-rank job", stderr)
    assert len(found) == 1, stderr
    return int(found[0])


def _logs(folder, attempt: str) -> list[list[dict]]:
    files = sorted(folder.glob(f"log-{attempt}-*.jsonl"))
    return [[json.loads(line) for line in f.read_text().splitlines()] for f in files]


@pytest.mark.timeout(300)
def test_torchrun_restart_resumes_from_the_last_commit_bit_for_bit(tmp_path):
    """Rank 1 dies at its 30th step (epoch 1, two steps past the commit at batch 4 of it):
    torchrun restarts both workers, which go on from that commit and end at the model of
    the run that lost nobody."""
    runs = {}
    for name, die_at in (("clean", -1), ("killed", 30)):
        out = tmp_path / name
        out.mkdir()
        proc = torchrun([str(out), "2", str(die_at)], 2, tmp_path / f"{name}-torch-logs",
                        script=str(ELASTIC),
                        options=("--max-restarts", "1"),
                        env={"HPCTRAIN_ELASTIC_DIR": str(out / "commits"),
                             "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr
        runs[name] = (out, proc)
    out, proc = runs["killed"]
    first = _logs(out, "0")
    assert [len([e for e in log if "idx" in e]) for log in first] == [30, 30]
    # Commit 8 is epoch 1's batch 4 (40 samples of it trained).
    assert _resumed(proc.stderr, 2) == 8
    assert [log[0]["start"] for log in _logs(out, "1")] == [[1, 4, 40]] * 2
    a, b = (torch.load(runs[n][0] / "model.pt", weights_only=True) for n in ("clean", "killed"))
    assert _same(a, b)


LOST_COMMIT = ROOT / "tests" / "scripts" / "elastic_lost_commit.py"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_a_failure_right_after_a_commit_keeps_it(launcher, tmp_path):
    """Every rank made commit 2 (16 MB: rank 0 is still writing it) when rank 0 raises
    (mpirun) or rank 1 is SIGKILLed (torchrun: rank 0 sees its lost connection, then the
    agent's SIGTERM): the restart resumes from commit 2. The abort hook and SIGTERM used to
    end rank 0 before its write, and the restart went back to commit 1."""
    env = {"PYTHONPATH": str(ROOT), elastic.ENV: str(tmp_path / "commits")}
    if launcher == "torchrun":
        proc = torchrun(["kill1"], 2, tmp_path / "torch-logs", script=str(LOST_COMMIT),
                        options=("--max-restarts", "1"), env=env)
        assert proc.returncode == 0, proc.stderr
        again = proc
    else:
        failed, again = (run_program([sys.executable, str(LOST_COMMIT), "raise0"], 2,
                                     timeout=120, env={**env, "ATTEMPT": attempt})
                         for attempt in ("0", "1"))
        assert "ValueError: a bad batch" in failed.stderr, failed.stderr
        assert again.returncode == 0, again.stderr
    assert _resumed(again.stderr, 2) == 2
    assert sorted(re.findall(r"rank \d starts at step (\d)", again.stdout))[-2:] == ["4", "4"]


@pytest.mark.timeout(300)
def test_a_stall_timeout_right_after_a_commit_keeps_it(tmp_path):
    """Rank 1 stops after commit 2, and rank 0's stall timeout ends the job while it writes
    that commit: the restart resumes from commit 2. The stall exit used to skip the wait for
    the write (the abort hook's), and the restart went back to commit 1."""
    from hpctrain.watchdog import EXIT_STATUS

    env = {"PYTHONPATH": str(ROOT), elastic.ENV: str(tmp_path / "commits")}
    stalled, again = (run_program([sys.executable, str(LOST_COMMIT), "stall1"], 2,
                                  timeout=120, env={**env, "ATTEMPT": attempt})
                      for attempt in ("0", "1"))
    assert stalled.returncode == EXIT_STATUS, stalled.stderr
    assert "ending the job (stall timeout 3 s)" in stalled.stderr
    assert again.returncode == 0, again.stderr
    assert _resumed(again.stderr, 2) == 2


@pytest.mark.timeout(300)
def test_a_job_restarted_on_more_ranks_shares_out_the_rest_of_the_epoch(tmp_path):
    """2 ranks, rank 1 dies at step 10 (last commit: 8 batches, 80 samples); the same script
    on 3 ranks resumes there at 3/2 the learning rate and trains the other 160 samples of
    the epoch once (the sampler pads 160 to 162, as Horovod's: 2 of them twice)."""
    env = {"PYTHONPATH": str(ROOT), "HPCTRAIN_ELASTIC_DIR": str(tmp_path / "commits")}
    procs = [run_program([sys.executable, str(ELASTIC), str(tmp_path), "1", "10"], np_,
                         timeout=150, env={**env, "ATTEMPT": attempt})
             for np_, attempt in ((2, "0"), (3, "1"))]
    assert procs[0].returncode != 0  # the job that lost a worker ended
    assert procs[1].returncode == 0, procs[1].stderr
    assert _resumed(procs[1].stderr, 2) == 2
    done = 80
    order = list(range(240))
    random.Random(3).shuffle(order)
    second = _logs(tmp_path, "1")
    assert [log[0] for log in second] == [{"start": [0, done // 10, done], "size": 3,
                                           "lr": 0.03}] * 3
    share = -(-(240 - done) // 3)  # 54 of the 160 left
    trained = [i for log in second for e in log if "idx" in e for i in e["idx"]]
    assert len(trained) == 3 * share and set(trained) == set(order[done:])
    mine = [{i for e in log if "idx" in e for i in e["idx"]} for log in second]
    assert all(len(m) == share for m in mine)  # each rank its own third


@pytest.mark.timeout(300)
def test_the_example_goes_on_from_its_last_epoch_on_another_number_of_ranks(tmp_path):
    """Epoch 1 on 2 ranks, epoch 2 on 1: the reset callback scales the learning rate down."""
    env = {"PYTHONPATH": str(ROOT), elastic.ENV: str(tmp_path)}
    example = [sys.executable, str(ROOT / "examples" / "horovod_elastic.py"), "--samples",
               "3000", "--batches-per-commit", "10"]
    done = []
    for np_, epochs in ((2, "1"), (1, "2")):
        done.append(run_program([*example, "--epochs", epochs], np_, timeout=150, env=env))
        assert done[-1].returncode == 0, done[-1].stderr
    assert "epoch 1: test accuracy" in done[0].stdout and "on 2 ranks, lr 0.02" in done[0].stdout
    assert "resuming from commit 3 of a 2-rank job" in done[1].stderr  # batches 10, 20; epoch
    assert "epoch 1" not in done[1].stdout
    assert "epoch 2: test accuracy" in done[1].stdout and "on 1 ranks, lr 0.01" in done[1].stdout


SCHEDULER = ROOT / "tests" / "scripts" / "elastic_scheduler.py"


@pytest.mark.timeout(300)
def test_a_scheduler_on_the_wrapped_optimizer_keeps_working_after_a_resume(tmp_path):
    """StepLR built on the optimizer that DistributedOptimizer wraps (they share the
    param_groups dicts); rank 1 is lost in epoch 1 and the job resumes. Restoring on rank 0
    alone used to give its optimizer new dicts: its learning rate stayed put at every
    sched.step() after the resume, and the ranks' models drifted apart, with no error.
    Two launches: the job that loses rank 1, then the resumed one and, after it in the same
    launch, the run that loses nobody (from scratch, with a commit folder of its own)."""
    procs = {attempts: run_program([sys.executable, str(SCHEDULER), str(tmp_path)], 2,
                                   timeout=150, env={"PYTHONPATH": str(ROOT), "ATTEMPT": attempts,
                                                     elastic.ENV: str(tmp_path / "commits")})
             for attempts in ("0", "1,clean")}
    assert procs["0"].returncode != 0  # the job that lost a worker ended
    again = procs["1,clean"]
    assert again.returncode == 0, again.stderr
    # once, by the resumed run: the clean one, after it, resumed nothing
    assert again.stderr.count("resuming") == 1 and "resuming from commit" in again.stderr
    assert not list((tmp_path / "commits").glob("state-1.pt"))  # the clean one's is its own
    assert (tmp_path / "clean" / "state-1.pt").is_file()
    lrs = [[json.loads(line) for line in (tmp_path / f"lr-1-{r}.jsonl").read_text().splitlines()]
           for r in range(2)]
    assert lrs == [[{"epoch": 2, "lr": 0.05}, {"epoch": 3, "lr": 0.025}]] * 2
    models = [torch.load(tmp_path / f"model-{a}-{r}.pt", weights_only=True)
              for a in ("1", "clean") for r in range(2)]
    assert all(_same(models[0], m) for m in models[1:])  # as the run that lost nobody
