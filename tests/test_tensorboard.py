"""The run's TensorBoard file (hpctrain.tensorboard.Board, written by rank 0's live.Watch), read
back by TensorBoard itself, and what the Watch tells the summary of its scoring."""

import errno
import json
import threading
import time

import pytest
import torch

pytest.importorskip("tensorboard")
from conftest import SYNTHETIC, fill, full_disk, run_job  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from test_collapse import feed, watch_of  # noqa: E402

from hpctrain import cli, data, live, models, options, tensorboard  # noqa: E402
from hpctrain.config import OptimConfig, RunConfig  # noqa: E402
from hpctrain.errors import UsageError  # noqa: E402
from hpctrain.evaluate import Snapshots  # noqa: E402
from hpctrain.metrics import Tally  # noqa: E402
from hpctrain.metrics import progress as progress_bar  # noqa: E402
from hpctrain.tensorboard import Board  # noqa: E402


def scalars(out, tag: str) -> list:
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    return board.Scalars(tag)


def logged(out, tag: str) -> dict:
    return {e.step: e.value for e in scalars(out, tag)}


def per_file(out, tag: str) -> list[tuple[int, float]]:
    """``tag``'s entries as readers of one event file at a time see them (tbparse,
    EventAccumulator on a file: no purge from the next file), every file's, in order."""
    found = []
    for path in sorted((out / "tensorboard").glob("events.*")):
        board = EventAccumulator(str(path))
        board.Reload()
        if tag in board.Tags()["scalars"]:
            found += [(e.step, e.value) for e in board.Scalars(tag)]
    return found


def attempt(out, value: float, steps, resumed: int = 0) -> None:
    board = Board(out, True, resumed=resumed)
    for step in steps:
        board.scalar("test/accuracy", value, step)
    board.close()


def test_a_fresh_run_removes_a_failed_attempts_entries(tmp_path):
    """A run into a folder an attempt left without a summary kept that attempt's entries: two
    series on one plot; then only TensorBoard's viewer hid them (its purge), a reader of
    each file showed the failed attempt's steps 48 and 64 beside the run's."""
    attempt(tmp_path, 0.25, range(0, 80, 16))
    attempt(tmp_path, 0.5, range(0, 48, 16))
    assert logged(tmp_path, "test/accuracy") == {0: 0.5, 16: 0.5, 32: 0.5}
    assert per_file(tmp_path, "test/accuracy") == [(0, 0.5), (16, 0.5), (32, 0.5)]
    assert len(list((tmp_path / "tensorboard").glob("events.*"))) == 1  # the failed one's went


def test_a_resumed_run_replaces_the_entries_from_its_update_on(tmp_path):
    """Purged for TensorBoard's viewer only, the killed attempt's entries from the checkpoint
    on stayed in its file: a reader of each file had steps 32 and 48 twice."""
    attempt(tmp_path, 0.25, range(0, 80, 16))
    attempt(tmp_path, 0.5, range(32, 96, 16), resumed=32)
    expected = {0: 0.25, 16: 0.25, 32: 0.5, 48: 0.5, 64: 0.5, 80: 0.5}
    assert logged(tmp_path, "test/accuracy") == expected
    assert per_file(tmp_path, "test/accuracy") == list(expected.items())


def test_the_training_entries_of_the_checkpoints_update_stay_in_tensorboards_view(tmp_path):
    """trim keeps the killed attempt's training entries of the checkpoint's update (the
    resumed run does not make them again), but the resumed run's purge step was that update:
    TensorBoard, reading the folder, dropped them (one point of each train/ tag per resume)."""
    board = Board(tmp_path, True)
    for step in range(10, 50, 10):
        board.scalar("train/loss", step / 100, step)
    board.close()
    board = Board(tmp_path, True, resumed=30)
    for step in (40, 50):
        board.scalar("train/loss", 1 + step / 100, step)
    board.close()
    expected = {10: 0.1, 20: 0.2, 30: 0.3, 40: 1.4, 50: 1.5}
    assert logged(tmp_path, "train/loss") == pytest.approx(expected)
    assert dict(per_file(tmp_path, "train/loss")) == pytest.approx(expected)


def test_a_run_resumed_without_tensorboard_purges_what_was_trained_again(tmp_path):
    """Its entries from the checkpoint on stayed, the killed attempt's, looking like the run's;
    a rank other than 0 writes nothing."""
    attempt(tmp_path, 0.25, range(0, 80, 16))
    Board(tmp_path, False, resumed=32, rank0=False).close()
    assert len(list((tmp_path / "tensorboard").glob("events.*"))) == 1
    Board(tmp_path, False, resumed=32, rank0=True).close()
    assert logged(tmp_path, "test/accuracy") == {0: 0.25, 16: 0.25}
    assert per_file(tmp_path, "test/accuracy") == [(0, 0.25), (16, 0.25)]
    assert len(list((tmp_path / "tensorboard").glob("events.*"))) == 1  # trimmed, none added
    Board(tmp_path / "fresh", False, resumed=32, rank0=True).close()  # none to purge: none made
    assert not (tmp_path / "fresh").exists()


def test_trimming_replaces_a_file_whole(tmp_path):
    """Written aside under a name TensorBoard does not read (no "tfevents" in it), then
    renamed over the file: a trim killed midway leaves its copy beside the files, and the run
    reads as before. The killed attempt's half-written last entry goes too."""
    attempt(tmp_path, 0.25, range(0, 80, 16))
    (earlier,) = (tmp_path / "tensorboard").glob("events.*")
    earlier.write_bytes(earlier.read_bytes()[:-7])  # killed while writing its last entry
    left = tmp_path / "tensorboard" / tensorboard.STAGING
    left.write_bytes(earlier.read_bytes())  # a trim killed before its rename
    assert logged(tmp_path, "test/accuracy") == {0: 0.25, 16: 0.25, 32: 0.25, 48: 0.25}
    tensorboard.trim(tmp_path / "tensorboard", 32)
    assert per_file(tmp_path, "test/accuracy") == [(0, 0.25), (16, 0.25)]
    assert not left.exists()  # renamed over the file


def test_a_resumed_runs_description_replaces_the_earlier_ones(tmp_path):
    """Each attempt describes the run at step 0 (a run resumed on other workers differs): the
    resumed one's is the run's, unless it writes none (resumed without --tensorboard)."""
    for workers, resumed in ((2, 0), (1, 32)):
        board = Board(tmp_path, True, resumed=resumed)
        board.describe({"workers": workers}, {"workers": workers})
        board.close()
    Board(tmp_path, False, resumed=48, rank0=True).close()
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    (text,) = board.Tensors("config/text_summary")
    assert json.loads(text.tensor_proto.string_val[0]) == {"workers": 1}
    assert board.PluginTagToContent("hparams").keys() == {"_hparams_/session_start_info"}


def test_the_hparams_show_the_values_a_run_resolved(tmp_path):
    """ma's tau, dcasgd's lam and shards are None in the options (resolved as the run starts,
    into config.json's run_info resolved): the HParams dashboard showed no tau for ma runs
    that differed by it. An option left None and not resolved stays out."""
    from tensorboard.plugins.hparams import metadata

    board = Board(tmp_path, True)
    board.describe({"run_info": {"resolved": {"algorithm": {"tau": 20}}}},
                   {"algo": "ma", "tau": None, "tau_epochs": None, "lr": 0.05})
    board.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")[metadata.SESSION_START_INFO_TAG]
    start = metadata.parse_session_start_info_plugin_data(content)
    assert {k: v.number_value or v.string_value for k, v in start.hparams.items()} == {
        "algo": "ma", "tau": 20, "lr": 0.05}


@pytest.mark.parametrize("raised", [True, False])
def test_a_run_that_raised_ends_its_hparams_session_as_failed(tmp_path, raised):
    """A user trial: a run stopped by Ctrl-C (one process) left its HParams session open, so
    the dashboard listed it as a run going on, its last training entries as its metrics.
    Closed on the way out of an error it ends failed at its last step; closed otherwise
    (a SIGUSR1 stop, to be resumed) it stays open, and the resumed run ends it."""
    from tensorboard.plugins.hparams import api_pb2, metadata

    board = Board(tmp_path, True)
    board.describe({}, {"algo": "sgd"})
    for step in (10, 20, 30):
        board.scalar("train/loss", 1.0, step)
    board.close(raising=not raised)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    ended = events.PluginTagToContent("hparams").get(metadata.SESSION_END_INFO_TAG)
    if not raised:
        assert ended is None
        return
    assert metadata.parse_session_end_info_plugin_data(ended).status == api_pb2.STATUS_FAILURE
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (path,) = (tmp_path / "tensorboard").glob("events.*")
    steps = [e.step for e in EventFileLoader(str(path)).Load()
             if any(v.tag == metadata.SESSION_END_INFO_TAG for v in e.summary.value)]
    assert steps == [30]
    # resumed from a checkpoint past the last entry, without --tensorboard: the run goes on
    Board(tmp_path, False, resumed=34, rank0=True).close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert metadata.SESSION_END_INFO_TAG not in events.PluginTagToContent("hparams")
    assert [e.step for e in events.Scalars("train/loss")] == [10, 20, 30]


def test_wall_times_count_from_the_start_of_training(tmp_path):
    """Counted from when the checkpointer was made, a run's entries were stamped before their
    updates by the start-up that followed (scoring restored snapshots online, waiting for the
    workers: 36 s in a resumed run), the first snapshot's score before the file existed."""
    online = watch(tmp_path, eval_mode="online")
    model, snapshots = model_and_snapshots([0])
    online.begin(model, snapshots)  # scores the first snapshot, of second 0
    time.sleep(0.05)  # the rest of the start-up
    started = time.time()
    online.started()
    online.step(10, 10, torch.tensor(0.5), 0.05, 0.01)
    online.finish()
    online.after([])
    stamps = [e.wall_time for tag in ("test/accuracy", "train/loss")
              for e in scalars(tmp_path, tag)]
    assert len(stamps) == 2 and min(stamps) >= started


def test_scores_of_an_earlier_attempts_snapshots_keep_their_wall_time(tmp_path):
    """Stamped from the resumed attempt's start, scores taken before the checkpoint (--eval
    after) were moved by the time the job was down (hours, after a requeue)."""
    clock = tensorboard.WallClock()
    clock.attempts = [(0.0, 1000.0)]  # the first attempt started at 1000 s
    clock.resume(clock.state_dict(), elapsed=20.0)  # down for a while, 20 s trained
    now = clock.attempts[1][1] + 20.0
    assert clock(5.0) == 1005.0 and clock(25.0) == pytest.approx(now + 5.0)
    assert clock(20.0) == 1020.0  # the checkpoint's second: its snapshot is the first's
    assert clock.this_attempt(20.5) and not clock.this_attempt(20.0)
    board = Board(tmp_path, True, resumed=16, clock=clock)
    board.scalar("test/accuracy", 0.5, 8, t=5.0)
    board.scalar("test/accuracy", 0.75, 24, t=25.0)
    board.close()
    assert [e.wall_time for e in scalars(tmp_path, "test/accuracy")] == \
        pytest.approx([1005.0, now + 5.0])
    older = tensorboard.WallClock()
    older.resume([], elapsed=20.0)  # a checkpoint from before the clock: as before it
    assert older(5.0) == older.attempts[0][1] + 5.0


def test_a_runs_last_steps_reach_the_board(tmp_path):
    """Training entries came every --log-every (10) steps only: never the last few steps of a
    run, and none at all of a run that collapsed within ten."""
    for steps, entries in ((25, {10: 0.95, 20: 1.95, 25: 2.7}), (4, {4: 0.65})):
        out = tmp_path / str(steps)
        watch = watch_of(out, tensorboard=True)
        feed(watch, [0.5 + 0.1 * i for i in range(steps)])
        watch.finish()
        watch.after([])
        assert logged(out, "train/loss") == pytest.approx(entries)
        assert logged(out, "train/lr").keys() == entries.keys()
        assert logged(out, "train/epoch") == {step: step / 32 for step in entries}


def watch(out, algo: str = "sgd", *, resumed: int = 0, elapsed: float = 0.0,
          pushes: list[int] | None = None, **options) -> live.Watch:
    """Rank 0's Watch of a one-worker ``algo`` run with --tensorboard, as the loop makes it
    after restoring a checkpoint of update ``resumed`` at ``elapsed`` s (``pushes``: the
    staleness of the pushes an async optimizer restored with it; ``options``: RunConfig's)."""
    config = RunConfig(algo=algo, out=str(out), progress=False, tensorboard=True,
                       optim=OptimConfig(epochs=8), **options)
    chosen = config.algorithm_class(config)
    if pushes is not None:  # an async optimizer's record of its pushes, as restored
        chosen.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        chosen.optimizer.staleness = Tally.of(pushes)
    return live.Watch(config, chosen, None, test_set=data.load("synthetic", "test"),
                      per_epoch=32, steps=32, samples_per_epoch=512,
                      bar=progress_bar(256, 0, "sgd", enabled=False), resumed=resumed,
                      elapsed=elapsed)


def test_a_resumed_async_runs_first_staleness_entry_is_of_its_own_pushes(tmp_path):
    """It averaged the pushes the checkpoint restored with the run's first ten: 14.7."""
    resumed = watch(tmp_path, "asgd", resumed=32, pushes=[40] * 5)
    for update in range(33, 33 + 2 * resumed.log_every):
        resumed.algo.optimizer.staleness.add(2 if update < 43 else 3)
        resumed.step(update, update, torch.tensor(0.5), 0.05, update * 0.01)
    resumed.finish()
    resumed.after([])
    assert logged(tmp_path, "train/staleness") == {42: 2.0, 52: 3.0}


@pytest.mark.parametrize("algo, resumed, entries", [
    ("sgd", 0, [4, 8, 12, 14]),  # at multiples of 4, and the last step
    ("sgd", 5, [8, 12, 14]),  # resumed at 5 (entries of 4 before): still at multiples
    ("asgd", 5, [9, 13, 14])])  # every 4 of rank 0's own steps, and the last
def test_log_every_sets_the_training_entries_steps(tmp_path, algo, resumed, entries):
    board = watch(tmp_path, algo, resumed=resumed, pushes=[] if algo == "asgd" else None,
                  log_every=4)
    for update in range(resumed + 1, 15):
        board.step(update, update, torch.tensor(0.5), 0.05, update * 0.01)
    board.finish()
    board.after([])
    assert sorted(logged(tmp_path, "train/loss")) == entries


def model_and_snapshots(updates) -> tuple[torch.nn.Module, Snapshots]:
    """An mlp for the synthetic set, and snapshots of it at each of ``updates``."""
    test_set = data.load("synthetic", "test")
    model = models.build("mlp", tuple(test_set.images.shape[1:]), test_set.num_classes)
    snapshots = Snapshots()
    for u in updates:
        snapshots.take(model, t=u / 100, epoch=u / 52, updates=u)
    return model, snapshots


@pytest.mark.parametrize("algo", ["sgd", "ma"])
def test_the_summary_says_whether_scores_were_taken_between_steps(tmp_path, algo):
    """ma online scores rank 0's member between steps, inside wall_s, but its eval_mode is
    "after" (its curve is scored after training): the report took it for out of the clock."""
    online = watch(tmp_path, algo, eval_mode="online")
    model, snapshots = model_and_snapshots([0])
    online.begin(model, snapshots)  # before the clock starts
    online.finish()
    snapshots.take(model, t=1.0, epoch=1.0, updates=32)
    online.snapshot(model, snapshots)  # the final one: after the clock stops
    assert online.fields()["eval_in_clock"] is False
    online.step(33, 33, torch.tensor(0.5), 0.05, 1.1)
    snapshots.take(model, t=1.2, epoch=1.0, updates=33)
    online.snapshot(model, snapshots)
    assert online.fields()["eval_mode"] == ("online" if algo == "sgd" else "after")
    assert online.fields()["eval_in_clock"] is True


def test_a_grown_runs_snapshots_below_the_checkpoints_count_are_logged(tmp_path):
    """Grown from 1 worker to 2 at update 26 (13 of the grown run's): its scores at 13 to 26
    were taken for the earlier run's, already logged, and left out."""
    grown = watch(tmp_path, resumed=26, eval_mode="online")
    model, snapshots = model_and_snapshots([0, 13, 26])  # the earlier run's: logged online
    grown.begin(model, snapshots)
    snapshots.take(model, t=1.0, epoch=20 / 26, updates=20)  # the grown run's
    grown.snapshot(model, snapshots)
    grown.after([])
    assert logged(tmp_path, "test/accuracy").keys() == {26, 20}  # 26: purged, logged again


@pytest.mark.timeout(300)
def test_a_run_resumed_on_fewer_ranks_drops_what_was_trained_after_its_checkpoint(tmp_path):
    """ssgd on 2 ranks (64 updates an epoch), checkpointed at update 32 and killed at 45,
    resumed on 1 (128 an epoch) at update 64: the killed run's entries from 32 on were
    purged from 64 only, so its loss at 40, trained again, stayed on the plot. The resumed
    run logs at another --log-every (an option a resume may change)."""
    out = str(tmp_path / "run")
    train = ["train", "--algo", "ssgd", *SYNTHETIC, "--epochs", "1", "--batch-size", "16",
             "--checkpoint-every", "0.5e", "--tensorboard", "--out", out]
    assert run_job(train, np=2, env={"HPCTRAIN_INJECT": "kill@0:45"}).returncode != 0
    resumed = run_job([*train, "--resume", out, "--log-every", "15"], np=1)
    assert "resized from 2 to 1 workers, going on at update 64" in resumed.stderr
    steps = sorted(logged(tmp_path / "run", "train/loss"))
    assert steps[:3] == [10, 20, 30] and steps[3:] == [75, 90, 105, 120, 128]


@pytest.mark.timeout(300)
def test_the_hparams_dashboard_tells_runs_apart(tmp_path):
    """No settings were written: the HParams dashboard of a folder of runs was empty, and
    nothing but folder names told an sgd run from a simulated ssgd run on 2 workers. Read
    as TensorBoard's HParams plugin reads a logdir."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider
    from tensorboard.backend.event_processing import plugin_event_multiplexer as multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context, metadata

    common = [*SYNTHETIC, "--epochs", "1", "--tensorboard"]
    proc = run_job(["train", "--algo", "sgd", *common, "--out", str(tmp_path / "sgd")])
    assert proc.returncode == 0, proc.stderr
    cli.main(["simulate", "--algo", "ssgd", "--workers", "2", *common,
              "--out", str(tmp_path / "sim")])
    runs = multiplexer.EventMultiplexer()
    runs.AddRunsFromDirectory(str(tmp_path))
    runs.Reload()
    provider = data_provider.MultiplexerDataProvider(runs, str(tmp_path))
    hparams = backend_context.Context(base_plugin.TBContext(
        logdir=str(tmp_path), multiplexer=runs, data_provider=provider))
    request = context.RequestContext()
    found = hparams.hparams_metadata(request, "")
    experiment = hparams.experiment_from_metadata(
        request, "", True, found, hparams.hparams_from_data_provider(request, "", 0))
    differ = {h.name: sorted(v.string_value or str(v.number_value)
                             for v in h.domain_discrete.values)
              for h in experiment.hparam_infos if h.differs}
    assert differ["algo"] == ["sgd", "ssgd"] and differ["simulated"] == ["false", "true"]
    assert "workers" in differ and "out" in differ
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"summary/final_test_acc", "summary/best_test_acc", "test/accuracy"} <= metrics
    for run in ("sgd", "sim"):
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        assert logged(tmp_path / run, "summary/final_test_acc") == pytest.approx(
            {summary["updates"]: summary["final_test_acc"]})
        assert logged(tmp_path / run, "summary/best_test_acc") == pytest.approx(
            {summary["updates"]: summary["best_test_acc"]})
        ended = found[f"{run}/tensorboard"][metadata.SESSION_END_INFO_TAG]
        assert metadata.parse_session_end_info_plugin_data(ended).status == 1  # success
        board = EventAccumulator(str(tmp_path / run / "tensorboard"))
        board.Reload()
        (text,) = board.Tensors("config/text_summary")
        assert json.loads(text.tensor_proto.string_val[0]) == \
            json.loads((tmp_path / run / "config.json").read_text())


# hpctrain <argv> for each argv in turn (conftest.run_commands' way, one launch), the last with
# rank 0 SIGKILLed as it starts to write the summary (after the board closed).
KILLED_WRITING_OUTPUTS = """
import json, os, signal, sys
from hpctrain import cli
from hpctrain.metrics import RunLog
*first, last = json.loads(sys.argv[1])
for argv in first:
    cli.main(argv)  # a failure raises: the launch ends
    print("returned:", argv[-1], flush=True)
RunLog.write_summary = lambda self, summary: os.kill(os.getpid(), signal.SIGKILL)
cli.main(last)
"""


def entries(out) -> dict[str, list[int]]:
    """Every scalar tag's steps over the event files, as readers of one file at a time see
    them, sorted (a step twice: an entry logged twice)."""
    found: dict[str, list[int]] = {}
    for path in sorted((out / "tensorboard").glob("events.*")):
        board = EventAccumulator(str(path))
        board.Reload()
        for tag in board.Tags()["scalars"]:
            found.setdefault(tag, []).extend(e.step for e in board.Scalars(tag))
    return {tag: sorted(steps) for tag, steps in found.items()}


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """For --eval after and online: ssgd on 2 ranks straight ("straight"), and killed writing
    its outputs then resumed ("run"), in three launches (a killed one ends its launch):
    (the runs' root, [the launches' processes: straights and after's kill, online's kill,
    the resumes], {evaluation: whether the killed run had a summary before its resume})."""
    import sys

    from conftest import run_commands, run_program
    root = tmp_path_factory.mktemp("killed")

    def train(evaluation: str, run: str) -> list[str]:
        return ["train", "--algo", "ssgd", *SYNTHETIC, "--epochs", "1", "--batch-size", "16",
                "--seed", "1", "--checkpoint-every", "0.5e", "--eval", evaluation,
                "--tensorboard", "--out", str(root / evaluation / run)]

    launches = [run_program([sys.executable, "-c", KILLED_WRITING_OUTPUTS, json.dumps(
        [train(e, "straight") for e in ("after", "online")] + [train("after", "run")])],
        np=2, timeout=200)]
    launches.append(run_program([sys.executable, "-c", KILLED_WRITING_OUTPUTS,
                                 json.dumps([train("online", "run")])], np=2))
    summarized = {e: (root / e / "run" / "summary.json").exists() for e in ("after", "online")}
    launches.append(run_commands([[*train(e, "run"), "--resume", "auto"]
                                  for e in ("after", "online")], np=2, timeout=200))
    return root, launches, summarized


@pytest.mark.timeout(400)
@pytest.mark.parametrize("evaluation", ["after", "online"])
def test_a_run_killed_writing_its_outputs_has_each_entry_once_when_resumed(killed_and_resumed,
                                                                           evaluation):
    """Killed after training, its last checkpoint at its end, and resumed: the curve scored
    after training was logged again beside the killed attempt's (test/* twice at every
    step), and the last training entry (update 64, written after that checkpoint) was trimmed
    and never written again: the resumed run makes no step."""
    root, (first, killed_online, resumed), summarized = killed_and_resumed
    killed = first if evaluation == "after" else killed_online
    straight, run = root / evaluation / "straight", root / evaluation / "run"
    # the straight runs returned (a failed command ends the launch before the killed one)
    assert (straight / "summary.json").exists(), first.stderr
    assert f"returned: {straight}" in first.stdout, first.stderr
    assert killed.returncode != 0 and not summarized[evaluation], killed.stderr
    assert resumed.returncode == 0, resumed.stderr
    expected = entries(straight)
    assert expected["train/loss"][-1] == 64 and len(expected["test/accuracy"]) > 2
    assert entries(run) == expected


def test_tensorboard_missing_names_pip_first(monkeypatch):
    """The refusal named ``make setup``, which a cluster user who installed with pip has no
    use for, as the way to get the package."""
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # find_spec: None, as if not installed
    with pytest.raises(UsageError) as e, options.command_line():  # as typed
        tensorboard.check_installed()
    assert str(e.value).startswith("--tensorboard needs the tensorboard package: pip install "
                                   'tensorboard (or pip install "hpctrain[tensorboard]"')
    # From Python (hpctrain.train(RunConfig(tensorboard=True))): the field given, not a flag
    with pytest.raises(UsageError) as e:
        tensorboard.check_installed()
    assert str(e.value).startswith("RunConfig.tensorboard=True needs the tensorboard package: ")


def test_a_full_disk_is_one_error_naming_the_event_file(tmp_path, monkeypatch):
    """The writer's thread met the full disk: its traceback was printed, the run's line named
    no file, and where the writer was closed next, close() dropped the error: the last
    entries lost without a word. Now close (or the next entry) raises it, naming the file."""
    seen = []
    monkeypatch.setattr(threading, "excepthook", seen.append)  # pytest's own hook, else
    with full_disk(tmp_path / "disk") as disk:
        board = Board(disk, True)
        board.scalar("test/acc", 0.5, 0, t=0.0)  # waits for training's clock to start
        fill(disk)
        with pytest.raises(OSError) as e:  # at an entry, or at close (the thread's pace)
            for step in range(500):  # more than the event file's first page holds
                board.scalar("train/loss", 1.0, step)
            board.close()
        board.close(raising=False)  # as the run lets go after an error: no second one
        assert not board.enabled
        board.start()  # closed: what waited went with the writer (it asserted a writer)
    assert e.value.errno == errno.ENOSPC
    assert e.value.filename.startswith(str(disk / tensorboard.SUBDIR / "events.out.tfevents."))
    assert seen == []  # no traceback of the writer's thread
    assert threading.excepthook == seen.append  # given back at close
