"""``--profile START:COUNT``: torch.profiler over a window of local steps on every worker."""

from __future__ import annotations

import contextlib
import errno
import json
from collections import Counter

import pytest
from conftest import SYNTHETIC, fill, full_disk, run_job

from hpctrain import options, profiling
from hpctrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from hpctrain.errors import UsageError
from hpctrain.sim import SimConfig, simulate


def test_the_window_is_parsed_and_checked():
    assert profiling.parse("20:5") == (20, 5)
    assert profiling.parse("0:1") == (0, 1)
    for bad in ("5", "a:b", "3:0", "-1:2", "1:2:3"):
        with pytest.raises(UsageError, match="RunConfig.profile="):
            RunConfig(algo="sgd", profile=bad)


def test_a_bad_window_is_named_as_typed_or_as_given():
    """The command line's --profile, and from Python the field given: it said --profile to a
    Python caller too, who typed no flag (and "e.g. 20:5", not the string the field takes)."""

    with pytest.raises(UsageError) as e:
        RunConfig(algo="sgd", profile="a:b")
    assert str(e.value) == ("RunConfig.profile='a:b': want START:COUNT, the first local step "
                            "to profile and how many (e.g. '20:5')")
    with pytest.raises(UsageError) as e:
        RunConfig(algo="sgd", profile="-1:2")
    assert str(e.value) == "RunConfig.profile='-1:2': START must be >= 0 and COUNT >= 1"
    with pytest.raises(UsageError) as e, options.command_line():
        RunConfig(algo="sgd", profile="a:b")
    assert str(e.value) == ("--profile 'a:b': want START:COUNT, the first local step to "
                            "profile and how many (e.g. 20:5)")
    with pytest.raises(UsageError) as e, options.command_line():
        RunConfig(algo="sgd", profile="-1:2")
    assert str(e.value) == "--profile -1:2: START must be >= 0 and COUNT >= 1"


def test_a_window_past_the_runs_steps_is_said_before_it_starts(tmp_path, capsys):
    """It was said only after training; a batch larger than a worker's share, never."""
    from hpctrain import arguments, cli, data, launch_checks

    n = data.size("synthetic", "train", None)
    steps = -(-(n // 2) // 64)  # 2 workers, batches of 64, one epoch
    for window, said in ((f"{steps}:2", f"a worker makes {steps} local steps (0..{steps - 1}); "
                                        "nothing would be profiled"),
                         (f"{steps - 1}:5", f"the window ends at step {steps - 1}, after 1 "
                                            "step(s)"),
                         ("0:2", None)):
        args = ["train", "--algo", "ssgd", *SYNTHETIC, "--epochs", "1", "--batch-size", "64",
                "--profile", window, "--out", str(tmp_path / "run")]
        with options.command_line():  # as cli.main checks it
            launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(args)), 2)
        err = capsys.readouterr().err
        assert (f"warning: --profile {window}: " in err and said in err) if said else not err
    args = ["train", "--algo", "ssgd", *SYNTHETIC, "--batch-size", str(n), "--out",
            str(tmp_path / "run")]
    with options.command_line():
        launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(args)), 2)
    assert capsys.readouterr().err == (f"hpctrain: warning: --batch-size {n}: each worker has "
                                       f"{n // 2} training samples an epoch, so its batches "
                                       "hold that many\n")


def test_a_lone_sample_an_epoch_is_said_in_the_singular(capsys):
    """2 ranks on 3 samples: "each worker has 1 training samples an epoch"."""
    from hpctrain import launch_checks

    config = RunConfig(algo="ssgd", optim=OptimConfig(batch_size=8), profile="5:2")
    with options.command_line():
        launch_checks._say_what_the_sizes_cut(config, 1)
    assert capsys.readouterr().err == (
        "hpctrain: warning: --batch-size 8: each worker has 1 training sample an epoch, so "
        "its batches hold that many\nhpctrain: warning: --profile 5:2: a worker makes 5 "
        "local steps (0..4); nothing would be profiled\n")
    launch_checks._say_what_the_sizes_cut(config, 1)  # from Python: the fields
    assert capsys.readouterr().err == (
        "hpctrain: warning: OptimConfig.batch_size=8: each worker has 1 training sample an "
        "epoch, so its batches hold that many\nhpctrain: warning: RunConfig.profile='5:2': "
        "a worker makes 5 local steps (0..4); nothing would be profiled\n")


def test_a_window_the_run_never_reached_is_said_once_by_rank_0(tmp_path, capsys):
    import torch

    for rank in (0, 1):
        profiler = profiling.StepProfiler("50:5", torch.device("cpu"), tmp_path, rank)
        for done in range(17):
            profiler.step(done)
        profiler.write()
        profiler.report([profiler.outcome()] if rank == 0 else None)
    assert capsys.readouterr().err == ("hpctrain: --profile 50:5: this run ended at local step "
                                       "16, before step 50; nothing profiled\n")
    assert not (tmp_path / profiling.SUBDIR).exists()
    resumed = profiling.StepProfiler("5:2", torch.device("cpu"), tmp_path, 0)
    for done in range(64, 70):  # said it ended "before step 5"
        resumed.step(done)
    resumed.write()
    resumed.report([resumed.outcome()])
    assert capsys.readouterr().err == ("hpctrain: --profile 5:2: this run resumed at local step "
                                       "64, past step 5; nothing profiled\n")


def _profile_steps(profiler: profiling.StepProfiler, steps: int) -> profiling.StepProfiler:
    """``steps`` local steps of a little work each, as the loop reports them, then the files
    written, as after training."""
    import torch

    x = torch.ones(8, 8)
    profiler.step(0)
    for done in range(1, steps + 1):
        with profiler.region("hpctrain.apply"):
            x = x @ x / 8
        profiler.step(done)
    profiler.close()
    profiler.write()
    return profiler


def test_the_files_are_written_after_training_not_in_its_last_profiled_step(tmp_path):
    """The export ran inside the window's last step: it counted as training (wall_s, that
    step's rest) and a --stall-timeout shorter than it ended a healthy run. The trace says
    whose it is (distributedInfo, as torch's own with torch.distributed), for Holistic Trace
    Analysis."""
    import torch

    profiler = profiling.StepProfiler("2:3", torch.device("cpu"), tmp_path, 1, workers=2)
    x = torch.ones(8, 8)
    for done in range(8):
        profiler.step(done)
        assert profiling.span("hpctrain.apply").__class__ is (
            torch.profiler.record_function if 2 <= done < 5 else contextlib.nullcontext)
        x = x @ x / 8
    profiler.close()
    folder = tmp_path / profiling.SUBDIR
    assert not folder.exists()  # the loop's clocks stop here
    profiler.write()
    assert sorted(p.name for p in folder.iterdir()) == ["rank-1.json", "rank-1.txt"]
    trace = json.loads((folder / "rank-1.json").read_text())
    assert trace["distributedInfo"] == {"rank": 1, "world_size": 2}
    # the window's three steps (torch 2.1 labels them #0, #0, #1; later ones #0 to #2)
    assert sum(str(e.get("name")).startswith("ProfilerStep#") for e in trace["traceEvents"]) == 3
    profiler.write()  # once: nothing left to write


def test_a_full_disk_is_one_error_naming_the_trace(tmp_path):
    """torch's exporter said only "Failed to write to log file!" and left its half-written
    ``.rank-0.json.partial.tmp``; the run then failed renaming the trace it had not written,
    a FileNotFoundError naming the partial file. Now the line says why, naming the trace,
    and nothing half-written is left."""
    import torch

    with full_disk(tmp_path / "disk") as disk:
        profiler = profiling.StepProfiler("0:3", torch.device("cpu"), disk, 0)
        (disk / profiling.SUBDIR).mkdir()
        fill(disk)
        with pytest.raises(OSError) as e:
            _profile_steps(profiler, 3)
        assert (e.value.errno, e.value.filename) == (
            errno.ENOSPC, str(disk / profiling.SUBDIR / "rank-0.json"))
        assert list((disk / profiling.SUBDIR).iterdir()) == []


def test_a_window_the_run_ends_inside_holds_only_the_steps_made(tmp_path, capsys):
    """sgd, 32 steps, --profile 30:5: the table said "local steps 30 to 34"; it names the
    steps made, and the trace's third ProfilerStep (torch opens it after step 31) as the
    loop's exit."""
    import torch

    _profile_steps(profiling.StepProfiler("30:5", torch.device("cpu"), tmp_path, 0), 32)
    folder = tmp_path / profiling.SUBDIR
    table = (folder / "rank-0.txt").read_text()
    assert table.startswith("local steps 30 to 31 (the window 30:5 was cut short: the run "
                            "ended after local step 31, and the last ProfilerStep span is the "
                            "loop's exit; ProfilerStep#0 is local step 30)\n")
    names = Counter(e.get("name") for e in _trace(folder / "rank-0.json"))
    assert sum(n for name, n in names.items() if str(name).startswith("ProfilerStep#")) == 3
    assert names["hpctrain.apply"] == 2
    assert capsys.readouterr().err == ""  # it profiled: nothing to say
    # Ended right where the window starts: no step recorded, no files, and said so.
    ended = _profile_steps(profiling.StepProfiler("32:5", torch.device("cpu"), tmp_path / "b", 0),
                           32)
    ended.report([ended.outcome()])
    assert not (tmp_path / "b" / profiling.SUBDIR).exists()
    assert capsys.readouterr().err == ("hpctrain: --profile 32:5: this run ended at local step "
                                       "32, before step 32; nothing profiled\n")


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_rank_0_names_the_workers_that_profiled(tmp_path, capsys):
    """Async workers make different numbers of local steps: rank 0 said "nothing profiled"
    for its own missed window while workers 1 and 2 wrote theirs. Here worker r makes
    10 + 10 r steps: worker 0 misses 15:2, the others profile it."""
    import torch

    from hpctrain import comm

    world = comm.world()
    rank = world.Get_rank()
    profiler = _profile_steps(profiling.StepProfiler("15:2", torch.device("cpu"), tmp_path, rank),
                              10 + 10 * rank)
    profiler.report(world.gather(profiler.outcome(), root=0))  # as the loop gathers them
    err = capsys.readouterr().err
    if rank == 0:
        assert err == ("hpctrain: --profile 15:2: worker(s) 0 (among those that train) ended "
                       f"before the window; the others' files are in "
                       f"{tmp_path / profiling.SUBDIR}\n")
    else:
        assert err == "" and (tmp_path / profiling.SUBDIR / f"rank-{rank}.json").exists()


def test_the_simulator_refuses_it(tmp_path):
    config = RunConfig(algo="ssgd", profile="1:2", out=str(tmp_path), progress=False,
                       data=DataConfig(dataset="synthetic"), model=ModelConfig(name="mlp"))
    with pytest.raises(UsageError, match=r"drop RunConfig\.profile='1:2' \("):  # from Python
        simulate(config, SimConfig(workers=2))


def _trace(path) -> list[dict]:
    trace = json.loads(path.read_text())
    return trace["traceEvents"] if isinstance(trace, dict) else trace


@pytest.mark.timeout(120)
def test_every_rank_profiles_its_window_with_the_hooks_labelled(tmp_path):
    """ssgd on 2 ranks, steps 2-4: each rank's Chrome trace has the three steps, the
    forward's matrix products, each bucket's allreduce launched in backward (the mpi backend's
    had no span: only its completion showed, under hpctrain.synchronize) and the rank, as
    Holistic Trace Analysis reads it; its table lists the operators."""
    proc = run_job(["train", "--algo", "ssgd", *SYNTHETIC, "--epochs", "1", "--profile", "2:3",
                    "--out", str(tmp_path)], np=2)
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):
        events = _trace(tmp_path / "profile" / f"rank-{rank}.json")
        names = Counter(e.get("name") for e in events)
        assert names["hpctrain.synchronize"] == names["hpctrain.apply"] == 3  # the window
        # One span per step (torch 2.1 leaves the last step's out), none past the window.
        assert {"ProfilerStep#0", "ProfilerStep#1"} <= names.keys()
        assert "ProfilerStep#3" not in names and names["aten::addmm"] > 0
        assert names["hpctrain.allreduce_bucket"] == 3  # one bucket a step
        assert names["hpctrain.allreduce_progress"] > 0
        info = json.loads((tmp_path / "profile" / f"rank-{rank}.json").read_text())
        assert info["distributedInfo"] == {"rank": rank, "world_size": 2}
        table = (tmp_path / "profile" / f"rank-{rank}.txt").read_text()
        assert "aten::addmm" in table
        assert table.startswith("local steps 2 to 4 (ProfilerStep#0 is local step 2)\n")
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == [
        "rank-0.json", "rank-0.txt", "rank-1.json", "rank-1.txt"]  # no partial file left
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["profile"] == "2:3"


def _in_place_like_torch_2_1(monkeypatch, scratch):
    """torch 2.1's exporter: it wrote the trace into the path it was given through a C++
    stream, which stops writing at the first error and says nothing. On torch 2.1 itself
    (scripts/compat-check.sh 3.10 2.1.2) it is its own; a later torch exports the trace to
    ``scratch``, and it is then written in place so."""
    import torch

    if torch.__version__.startswith("2.1."):
        return
    export = torch.profiler.profile.export_chrome_trace

    def in_place(self, path):
        export(self, str(scratch))
        data = scratch.read_bytes()
        with contextlib.suppress(OSError), open(path, "wb", buffering=0) as f:
            for at in range(0, len(data), 8192):
                f.write(data[at:at + 8192])

    monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", in_place)


def test_a_trace_written_in_place_on_a_full_disk_is_not_taken_as_whole(tmp_path, monkeypatch):
    """torch 2.1 wrote the trace in place: on a full disk, the cut-off trace was renamed to
    ``rank-0.json`` and the run went on as if it were whole. Now it is read back when written
    in place: one error naming the trace, nothing left; a whole one is kept."""
    import torch

    _in_place_like_torch_2_1(monkeypatch, tmp_path / "scratch.json")
    _profile_steps(profiling.StepProfiler("0:3", torch.device("cpu"), tmp_path / "ok", 0), 3)
    assert len(_trace(tmp_path / "ok" / profiling.SUBDIR / "rank-0.json")) > 0
    with full_disk(tmp_path / "disk") as disk:
        profiler = profiling.StepProfiler("0:3", torch.device("cpu"), disk, 0)
        (disk / profiling.SUBDIR).mkdir()
        (disk / "room").write_bytes(bytes(8192))  # two pages: part of a trace gets written
        fill(disk)
        (disk / "room").unlink()
        with pytest.raises(OSError) as e:
            _profile_steps(profiler, 3)
        assert (e.value.errno, e.value.filename) == (
            errno.ENOSPC, str(disk / profiling.SUBDIR / "rank-0.json"))
        assert list((disk / profiling.SUBDIR).iterdir()) == []


def test_a_trace_ends_whole_only_with_its_closing_brace(tmp_path):
    """A trace written in place is judged by its tail: the whole one is, and no prefix of it
    is, however it was cut (within an event, after one's closing brace, in ``traceName``)."""
    import torch

    with torch.profiler.profile() as profile:
        for _ in range(3):
            torch.ones(64).sum()
    whole = tmp_path / "trace.json"
    profile.export_chrome_trace(str(whole))
    data = whole.read_bytes()
    json.loads(data)
    assert profiling._ends_whole(whole)
    cut = tmp_path / "cut.json"
    ends = [i for i in range(len(data) - 1) if data[i:i + 1] == b"}"]  # after a brace
    for size in [0, 1, len(data) // 2, *[e + 1 for e in ends], *range(len(data) - 40,
                                                                       len(data))]:
        if data[:size].rstrip() == data.rstrip():
            continue  # only whitespace cut: whole
        cut.write_bytes(data[:size])
        assert not profiling._ends_whole(cut), size
