"""Options that were accepted and did nothing, or were read differently in different places.

Each was found by a review of the command line: a value taken and ignored (``--checkpoint-dir``
without an interval, ``--data-dir`` of a data set that reads none, ``--stall-timeout`` in the
simulator), a combination that silently meant something else (``--partition label-skew`` with
global shuffling), a value with no bound (``--lam``, ``--stall-timeout``), or a value read one
way on the command line and another in a file (``--seed 1e3``). All single-process: the
parser, the configuration and the checks a launch runs before MPI starts.
"""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import SYNTHETIC, refusal, run_job

import hpctrain
from hpctrain import arguments, checkpoint, cli, launch_checks, options, run
from hpctrain import config as configs
from hpctrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig, StragglerConfig
from hpctrain.errors import UsageError
from hpctrain.sim import arguments as sim_arguments
from hpctrain.sim.config import SimConfig
from hpctrain.sim.simulate import check_options as check_simulation


def parse(*argv: str) -> RunConfig:
    return arguments.build(cli.build_parser().parse_args(["train", *argv]))


def one_line(call) -> str:
    with pytest.raises(UsageError) as refused:
        call()
    message = str(refused.value)
    assert "\n" not in message
    return message


# 1. --checkpoint-dir without --checkpoint-every: the folder was made and locked, nothing written.

def test_on_off_options_set_in_a_file_can_be_undone_on_the_command_line(tmp_path):
    """--compile, --tensorboard, --no-progress from --config had no way back."""
    from hpctrain.bench.compare import arguments as compare_arguments

    config = tmp_path / "run.toml"
    config.write_text('algo = "ssgd"\ncompile = true\ntensorboard = true\nprogress = false\n')
    base = ("--config", str(config))
    assert (parse(*base).compile, parse(*base).tensorboard, parse(*base).progress) == \
        (True, True, False)
    undone = parse(*base, "--no-compile", "--no-tensorboard", "--progress")
    assert (undone.compile, undone.tensorboard, undone.progress) == (False, False, True)
    args = cli.build_parser().parse_args(["bench", "compare", "--algos", "ssgd", "--out",
                                          str(tmp_path / "c"), "--no-compile", "--progress",
                                          "--tensorboard"])
    assert sorted(w for _, words in compare_arguments.given_options(args) for w in words) == \
        ["--no-compile", "--progress", "--tensorboard"]  # passed on as typed


def test_a_checkpoint_folder_without_an_interval_is_refused(tmp_path):
    folder = tmp_path / "ck"
    assert refusal(["--algo", "sgd", *SYNTHETIC, "--checkpoint-dir", str(folder)]) == (
        f"--checkpoint-dir {folder} needs --checkpoint-every: without it no checkpoint is "
        "written")
    assert not folder.exists()
    # With --resume it is the folder resumed from; --resume auto looks there (a requeued job).
    config = launch_checks.check_launch(parse("--algo", "sgd", *SYNTHETIC, "--checkpoint-dir",
                                              str(folder), "--resume", "auto"), 1)
    assert config.checkpoint.dir == str(folder) and config.checkpoint.resume is None
    config = launch_checks.check_launch(parse("--algo", "sgd", *SYNTHETIC, "--checkpoint-dir",
                                              str(folder), "--checkpoint-every", "1e"), 1)
    assert config.checkpoint.dir == str(folder)


# 2. --partition label-skew with --shuffle global on replicated data was iid.

def test_label_skew_with_global_shuffling_of_replicated_data_is_refused():
    message = ("--partition label-skew with --shuffle global trains on iid data (each epoch "
               "deals a fresh permutation of all of it): use --shuffle local|partial:Q")
    assert one_line(lambda: DataConfig(partition="label-skew")) == (  # from Python: fields
        "DataConfig.partition='label-skew' with DataConfig.shuffle='global' trains on iid "
        "data (each epoch deals a fresh permutation of all of it): use "
        "DataConfig.shuffle='local' or 'partial:Q'")
    assert refusal(["--algo", "sgd", *SYNTHETIC, "--partition", "label-skew"]) == message
    for shuffle, placement in (("local", "replicated"), ("partial:0.1", "replicated"),
                               ("global", "sharded")):
        DataConfig(partition="label-skew", shuffle=shuffle, data_placement=placement)


def test_an_exchange_round_size_without_an_exchange_is_refused():
    """--shuffle-chunk-mb sizes the sharded exchange's rounds: with replicated data nothing
    moves, and it was accepted and ignored."""
    message = ("--shuffle-chunk-mb 4 sizes the rounds of the sharded exchange, and "
               "replicated data are not moved")
    assert refusal(["--algo", "sgd", *SYNTHETIC, "--shuffle-chunk-mb", "4"]) == message
    DataConfig(data_placement="sharded", shuffle_chunk_mb=4.0)
    DataConfig(shuffle_chunk_mb=16)  # the default (the command line refuses it typed)


# 3. --lam had no upper bound: 1e300 reached the float32 compensation kernel as inf.

def test_lam_stops_at_the_largest_factor():
    assert refusal(["--algo", "dcasgd-a", *SYNTHETIC, "--lam", "1e300"], 2) == \
        "--lam 1e+300 must be in [0, 1e+06]"
    assert hpctrain.algorithm_options("dcasgd-c")(lam=options.HUGE).lam == options.HUGE
    with pytest.raises(UsageError, match=r"^ConstantOptions.lam=1000001.0 must be in "
                                         r"\[0, 1e\+06\]$"):  # from Python: the field
        hpctrain.algorithm_options("dcasgd-c")(lam=options.HUGE + 1)


# 4. --data-dir was ignored by data sets that read no folder.

@pytest.fixture
def loaders(tmp_path):
    """A loader of the user's that takes no data_dir, and one that does."""
    path = tmp_path / "loaders.py"
    path.write_text(
        "import torch\n"
        "def _sets():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    def part(n):\n"
        "        return torch.rand(n, 1, 4, 4, generator=g), torch.arange(n) % 2\n"
        "    return part(16), part(8)\n"
        "def plain():\n"
        "    return _sets()\n"
        "def with_dir(data_dir=None):\n"
        "    return _sets()\n")
    return path


def test_a_data_folder_no_data_set_reads_is_refused(tmp_path, loaders, capsys):
    folder = str(tmp_path)
    assert refusal(["--algo", "sgd", *SYNTHETIC, "--data-dir", folder]) == \
        f"--data-dir {folder} is not used by --dataset synthetic"
    for name in (f"npz:{tmp_path / 'x.npz'}", f"imagefolder:{tmp_path}"):
        with options.command_line():
            assert one_line(lambda name=name: DataConfig(dataset=name, data_dir=folder)) == \
                f"--data-dir {folder} is not used by --dataset {name} (the path is in its name)"
        # From Python it named the flags, which the caller never typed.
        assert one_line(lambda name=name: DataConfig(dataset=name, data_dir=folder)) == \
            (f"DataConfig.data_dir={folder!r} is not used by DataConfig.dataset={name!r} (the "
             "path is in its name)")
    assert one_line(lambda: DataConfig(dataset="synthetic", data_dir="/tmp")) == \
        "DataConfig.data_dir='/tmp' is not used by DataConfig.dataset='synthetic'"
    name = f"{loaders}:plain"
    assert refusal(["--algo", "sgd", "--dataset", name, "--model", "mlp", "--no-progress",
                    "--data-dir", folder]) == \
        f"--data-dir {folder} is not used by --dataset {name} (it takes no data_dir argument)"
    assert "hpctrain: data" not in capsys.readouterr().out  # refused before the loader ran
    config = launch_checks.check_launch(parse("--algo", "sgd", "--dataset", f"{loaders}:with_dir",
                                              "--model", "mlp", "--no-progress", "--data-dir",
                                              folder), 1)
    assert config.data.data_dir == folder
    DataConfig(dataset="mnist", data_dir=folder)  # a built-in set's files: checked at launch


# 5. A repeat from config.json of a run with its own --checkpoint-dir was refused.

def test_config_json_repeats_a_run_that_had_a_checkpoint_folder_of_its_own(tmp_path):
    first, ck = tmp_path / "first", tmp_path / "ck"
    config = launch_checks.check_launch(parse("--algo", "sgd", *SYNTHETIC, "--out", str(first),
                                              "--checkpoint-every", "1e", "--checkpoint-dir",
                                              str(ck)), 1)
    checkpoint.save(ck, 32, {"x": 1}, {"algo": "sgd", "ranks": 1, "workers": 1,
                                       "args": configs.flat(config)})  # the run's, left there
    first.mkdir()
    (first / "config.json").write_text(json.dumps(configs.repeatable(config)))
    again = launch_checks.check_launch(parse("--config", str(first / "config.json"), "--out",
                                             str(tmp_path / "again")), 1)
    assert again.checkpoint.dir is None and again.checkpoint.every == "1e"  # its own folder


def test_a_relative_out_is_resumed_from_another_working_folder(tmp_path, monkeypatch):
    """A run whose checkpoints were outside its relative --out, resumed from another working
    folder without --out, wrote its outputs to a new folder of that name there."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    ck = tmp_path / "ck"
    config = launch_checks.check_launch(parse("--algo", "sgd", *SYNTHETIC, "--out", "runs/x",
                                              "--checkpoint-every", "1e", "--checkpoint-dir",
                                              str(ck)), 1)
    checkpoint.save(ck, 32, {"x": 1}, {"algo": "sgd", "ranks": 1, "workers": 1, "args":
                                       checkpoint.recorded_args(configs.flat(config))})
    monkeypatch.chdir(tmp_path / "b")
    again = launch_checks.check_launch(parse("--algo", "sgd", *SYNTHETIC, "--resume", str(ck)), 1)
    assert again.out == str(tmp_path / "a" / "runs" / "x")


def test_a_resume_takes_another_spelling_of_the_runs_shuffle(tmp_path):
    """--shuffle partial:.5 was refused on a run started with partial:0.5: compared as text."""
    old = configs.flat(configs.resolve(RunConfig(algo="sgd", data=DataConfig(
        shuffle="partial:0.5"))))
    checkpoint.save(tmp_path, 5, {"x": 1}, {"algo": "sgd", "ranks": 1, "workers": 1,
                                            "args": old})
    for spelling in ("partial:.5", "partial:5e-1", "partial:0.50"):
        new = configs.flat(configs.resolve(RunConfig(algo="sgd", data=DataConfig(
            shuffle=spelling))))
        assert new["shuffle"] == "partial:0.5"
        checkpoint.check(algo="sgd", ranks=1, every=None, checkpoint_dir=None,
                         resume=str(tmp_path), out=str(tmp_path / "out"), run_config=new,
                         may_change=checkpoint.MAY_CHANGE)
    assert DataConfig(shuffle="partial:1").shuffle == "partial:1"  # as older runs recorded it


# 6. Options that change nothing in the results may change when a run is resumed.

def test_a_resume_may_change_the_stall_timeout_and_the_exchange_round(tmp_path):
    old = configs.flat(configs.resolve(RunConfig(algo="sgd", data=DataConfig(
        data_placement="sharded"))))
    checkpoint.save(tmp_path, 5, {"x": 1}, {"algo": "sgd", "ranks": 1, "workers": 1,
                                            "args": old})
    new = configs.flat(configs.resolve(RunConfig(algo="sgd", stall_timeout=30.0,
                                                 data=DataConfig(data_placement="sharded",
                                                                 shuffle_chunk_mb=4.0))))
    resolved = checkpoint.check(algo="sgd", ranks=1, every=None, checkpoint_dir=None,
                                resume=str(tmp_path), out=str(tmp_path / "out"),
                                run_config=new, may_change=checkpoint.MAY_CHANGE)
    assert resolved.resume == str(tmp_path)
    with pytest.raises(UsageError, match="started with --lr 0.05, not 0.1"):  # still refused
        checkpoint.check(algo="sgd", ranks=1, every=None, checkpoint_dir=None,
                         resume=str(tmp_path), out=None, run_config={**new, "lr": 0.1},
                         may_change=checkpoint.MAY_CHANGE)


# 7. The simulator took --stall-timeout and --sync-backend and ignored them; sgd's refusal
# named --algo ssgd, not the --workers 1 a simulation needs.

def simulate_args(*argv: str):
    return cli.build_parser().parse_args(["simulate", *argv])


@pytest.mark.parametrize("argv, named", [
    (["--algo", "ssgd", "--stall-timeout", "30"], "--stall-timeout 30.0"),
    (["--algo", "asgd", "--stall-timeout", "600"], "--stall-timeout 600.0"),  # typed: given
    (["--algo", "ssgd", "--sync-backend", "horovod"], "--sync-backend horovod"),
    (["--algo", "ssgd", "--sync-backend", "torch"], "--sync-backend torch"),
    (["--algo", "ssgd", "--sync-backend", "mpi"], "--sync-backend mpi"),
])
def test_the_simulator_refuses_the_options_it_does_not_use(argv, named):
    args = simulate_args(*argv, *SYNTHETIC)
    message = one_line(lambda: sim_arguments.build(args))
    assert message.startswith(f"hpctrain simulate does not use {named} (") and \
        message.endswith("): drop it")


def test_the_simulators_help_leaves_out_trains_options_it_refuses(capsys):
    """simulate --help offered --checkpoint-every, --eval-rank, --data-placement sharded and
    the rest, each refused when given."""
    helps = {}
    for command in ("train", "simulate"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    for flag in sim_arguments.REFUSED:  # usage lists [--flag ...] for each option shown
        shown = re.compile(rf"\[{re.escape(flag)}[ \]]")  # with a value, or on/off
        assert shown.search(helps["train"]) and not shown.search(helps["simulate"]), flag
    assert "[--fp16-allreduce]" not in helps["simulate"]  # listed, and always refused
    # its undoing flag stays, for a --config file's, saying so (it read as train's "undo
    # --fp16-allreduce (a --config file's)", beside no --fp16-allreduce)
    assert "--no-fp16-allreduce undo a --config file's --fp16-allreduce, which hpctrain " \
           "simulate refuses (it averages ssgd's gradients in float32)" in helps["simulate"]
    assert "--no-fp16-allreduce undo --fp16-allreduce (a --config file's)" in helps["train"]
    assert "".join(helps["simulate"].split()).endswith(  # wrapped, also at hyphens
        "".join(sim_arguments.REFUSED_EPILOG.split()))


def simulation_checked(*argv: str) -> RunConfig:
    """What ``hpctrain simulate`` checks before it starts, in this process."""
    args = simulate_args("--algo", "ssgd", *SYNTHETIC, *argv)
    return check_simulation(cli._without_real_run_settings(args, arguments.build(args)),
                            sim_arguments.build(args))


@pytest.mark.parametrize("argv", [
    ["--checkpoint-every", "off"], ["--checkpoint-every", "none"], ["--checkpoint-dir", "none"],
    ["--resume", "none"], ["--eval-rank", "none"], ["--profile", "none"],
    ["--data-placement", "replicated"], ["--no-fp16-allreduce"],
])
def test_the_simulator_takes_the_options_its_help_leaves_out_where_they_change_nothing(argv):
    """As simulate --help's closing note says (it said every refused option was taken so,
    --stall-timeout 600 and --sync-backend mpi too, which are refused)."""
    simulation_checked(*argv)


@pytest.mark.parametrize("argv", [["--eval-rank", "0"], ["--eval-rank", "1"],
                                  ["--eval", "after", "--eval-rank", "2"], ["--profile", "x"],
                                  ["--profile", "20:5"]])
def test_a_typed_real_run_option_is_refused_as_the_simulators_first(argv):
    """--eval-rank 0 said "must be >= 1", --eval-rank 1 "needs --eval online", and only a
    third try that the simulator takes none; --profile x a format error first. (Named as
    typed: from Python, by the field given, tests/test_sim.py.)"""
    flag, value = argv[-2:]
    with options.command_line():  # as cli.main calls it
        said = one_line(lambda: cli.simulate(simulate_args("--algo", "ssgd", *SYNTHETIC,
                                                           *argv)))
    assert said == (f"hpctrain simulate scores snapshots on worker 0 (--eval online): drop "
                    f"--eval-rank {value}, which needs a real run's extra rank"
                    if flag == "--eval-rank" else
                    "hpctrain simulate runs every worker in one process, which one profiler "
                    "cannot tell apart: drop --profile (profile a real run)")


def test_the_simulator_refuses_fp16_allreduce_saying_how_to_undo_a_files(tmp_path):
    """simulate --help listed --fp16-allreduce, which the simulator always refuses; a real
    run's config.json with it was refused with "drop --fp16-allreduce", not typed."""
    config = tmp_path / "fp16.toml"
    config.write_text('algo = "ssgd"\n[algorithm]\nfp16_allreduce = true\n')
    for argv in (["--fp16-allreduce"], ["--config", str(config)]):
        with options.command_line():  # as cli.main checks it
            assert one_line(lambda: simulation_checked(*argv)) == (  # noqa: B023
                "hpctrain simulate averages ssgd's gradients in float32: drop --fp16-allreduce "
                "(--no-fp16-allreduce undoes a --config file's)")
    # From Python it said the flags too, to a caller who typed none (and has no --config)
    fp16 = hpctrain.algorithm_options("ssgd")(fp16_allreduce=True)
    assert one_line(lambda: check_simulation(
        RunConfig(algo="ssgd", data=DataConfig(dataset="synthetic"), algorithm=fp16),
        SimConfig(workers=2))) == ("hpctrain simulate averages ssgd's gradients in float32: "
                                   "drop SynchronousOptions.fp16_allreduce=True")
    assert not simulation_checked("--config", str(config),
                                  "--no-fp16-allreduce").algorithm.fp16_allreduce


def test_the_simulator_takes_a_real_runs_config_with_those_options():
    """From a file (a real run's config.json, simulated) they are ignored, not refused."""
    config = RunConfig(algo="ssgd", data=DataConfig(dataset="synthetic"),
                       model=ModelConfig(name="mlp"), stall_timeout=30.0,
                       algorithm=hpctrain.algorithm_options("ssgd")(sync_backend="torch"))
    check_simulation(config, SimConfig(workers=2))


def test_compare_simulate_refuses_them_before_any_run(tmp_path):
    """bench compare --simulate checked the simulator's options without train's typed ones:
    each simulated run then failed on its own."""
    proc = run_job(["bench", "compare", "--simulate", "2", "--algos", "ssgd,ma", *SYNTHETIC,
                    "--stall-timeout", "30", "--out", str(tmp_path / "cmp")], np=0, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "hpctrain simulate does not use --stall-timeout 30.0" in proc.stderr
    assert not (tmp_path / "cmp").exists()


def test_simulated_sgd_is_told_to_take_one_worker():
    """Without --workers it said "not --workers 4", a value the user never typed: now it says
    that 4 is the default."""
    def refusal(*argv: str) -> str:
        args = simulate_args("--algo", "sgd", *SYNTHETIC, *argv)
        with options.command_line():  # as cli.main checks it
            return one_line(lambda: check_simulation(arguments.build(args),
                                                     sim_arguments.build(args)))

    assert refusal() == ("--algo sgd runs on one process, not --workers 4 (the default): give "
                         "--workers 1 (or --algo ssgd for 4 workers)")
    assert refusal("--workers", "8") == ("--algo sgd runs on one process, not --workers 8: "
                                         "give --workers 1 (or --algo ssgd for 8 workers)")
    args = simulate_args("--algo", "sgd", *SYNTHETIC, "--workers", "1")
    check_simulation(arguments.build(args), sim_arguments.build(args))
    # From Python it said the flags too, to a caller who typed none: the fields given
    assert one_line(lambda: check_simulation(
        RunConfig(algo="sgd", data=DataConfig(dataset="synthetic")), SimConfig(workers=3))) == (
        "RunConfig.algo='sgd' runs on one process, not SimConfig.workers=3: give "
        "SimConfig.workers=1 (or RunConfig.algo='ssgd' for 3 workers)")


# 8. Whole numbers: the command line read --seed 1e3 as no int, a TOML file as 1000.

INT_OPTIONS = [("sgd", "--seed"), ("sgd", "--eval-rank"), ("ma", "--tau"), ("asgd", "--servers"),
               ("asgd", "--shards"), ("ssp", "--max-staleness"), ("ec", "--ec-distill-size")]


@pytest.mark.parametrize("algo, flag", INT_OPTIONS)
def test_every_whole_number_option_reads_1e0_as_a_file_does(algo, flag):
    extra = ["--eval", "online"] if flag == "--eval-rank" else []
    config = parse("--algo", algo, *extra, flag, "1e0")
    name = flag.lstrip("-").replace("-", "_")
    assert configs.flat(config)[name] == 1 and type(configs.flat(config)[name]) is int
    with pytest.raises(UsageError, match=f"^argument {flag}: '1.5' is not a whole number$"):
        parse("--algo", algo, *extra, flag, "1.5")


def test_every_option_declared_int_has_the_one_whole_number_parser():
    every = arguments.shared_options() + arguments.algorithm_options()
    ints = [d for d in every if str(d.field.type).removesuffix(" | None") == "int"]
    assert {flag for _, flag in INT_OPTIONS} <= {d.flag for d in ints}
    # options.whole, or a range of it (options.positive(int)): never Python's int, which
    # refused 1e3
    assert [d.flag for d in ints if d.field.metadata["parse"] is int] == []
    assert options.whole("9223372036854775807") == 2 ** 63 - 1  # not rounded through a float


def test_a_seed_from_the_command_line_is_the_seed_a_toml_file_gives(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('algo = "sgd"\nseed = 1e3\n')
    assert parse("--algo", "sgd", "--seed", "1e3").seed == configs.load(toml).seed == 1000
    assert parse("--algo", "sgd", "--seed", str(2 ** 63 - 1)).seed == 2 ** 63 - 1  # exactly


@pytest.mark.parametrize("seed", [str(2 ** 63), str(-2 ** 63 - 1), str(2 ** 64 - 1)])
def test_an_out_of_range_seed_is_shown_as_given(seed):
    assert one_line(lambda: parse("--algo", "sgd", "--seed", seed)) == (
        f"--seed {seed} must be in [-9223372036854775808, 9223372036854775807]")


# 9. Values starting with "-": argparse's "expected one argument" named none.

@pytest.mark.parametrize("flag, value, named", [
    ("--profile", "-1:2", "--profile -1:2: START must be >= 0"),
    ("--slowdown", "-1:2", "--slowdown -1:2: rank -1 is not a worker"),
    ("--checkpoint-every", "-1e", "--checkpoint-every: must be a finite number > 0, got -1e"),
    ("--lr-milestones", "-1,2", "--lr-milestones -1.0,2.0: milestones must be increasing"),
    ("--lr", "-inf", "--lr: '-inf' is not a finite number"),
    ("--seed", "-1e30", "--seed -1e+30 must be in"),
])
def test_a_value_starting_with_a_minus_is_judged_as_a_value(flag, value, named):
    for argv in ([flag, value], [f"{flag}={value}"]):  # as with "=", which always worked
        assert named in refusal(["--algo", "sgd", *SYNTHETIC, *argv]), argv


def test_the_other_parsers_take_values_starting_with_a_minus(tmp_path):
    args = cli.build_parser().parse_args(["bench", "compare", "--algos", "ma", "--out",
                                          str(tmp_path), "--slowdown", "-1:2"])
    assert getattr(args, "train_stragglers.slowdown") == "-1:2"  # each run's parser judges it
    assert simulate_args("--algo", "ma", "--slowdown", "-1:2").__dict__[
        "stragglers.slowdown"] == "-1:2"
    with pytest.raises(UsageError, match="^argument --latency: must be >= 0, got -1e-3$"):
        simulate_args("--algo", "ma", "--latency", "-1e-3")


@pytest.mark.parametrize("value", ["", " ", ","])
def test_an_empty_slowdown_is_refused_as_an_empty_out_is(value):
    assert refusal(["--algo", "sgd", *SYNTHETIC, "--slowdown", value]) == \
        f"--slowdown {value!r} is empty: give RANK:FACTOR or RANK:+DELAY[,...], or leave it " \
        "out for none"
    assert StragglerConfig(slowdown=None).factor(0, 1) == 1.0
    assert refusal(["--algo", "ssgd", *SYNTHETIC, "--slowdown", "0:2,,1:3"], 2) == \
        "--slowdown 0:2,,1:3: an empty entry; want RANK:FACTOR|RANK:+DELAY[,...]"  # was skipped


# 10. --resume auto --checkpoint-dir without --out, the run finished: "trains nothing and
# exits 0", not "--out runs/... already holds a finished run" (exit 2).

def finished_run(tmp_path: Path, *extra: str) -> tuple[RunConfig, Path, Path]:
    """The folders a finished run given --checkpoint-dir and no --out leaves: its outputs
    (here tmp_path/run, as if named for it) and its checkpoints, whose header records them."""
    out, ck = tmp_path / "run", tmp_path / "ck"
    flags = ("--algo", "sgd", *SYNTHETIC, "--epochs", "1", "--checkpoint-every", "0.5e",
             "--checkpoint-dir", str(ck), "--resume", "auto", *extra)
    ran = launch_checks._as_launched(replace(parse(*flags), out=str(out)))
    checkpoint.save(ck, 32, {"x": 1}, {"algo": "sgd", "ranks": 1, "workers": 1,
                                       "args": configs.flat(ran)})
    out.mkdir()
    (out / "config.json").write_text(json.dumps(configs.repeatable(ran)))
    summary = {"algo": "sgd", "workers": 1, "final_test_acc": 0.5, "best_test_acc": 0.5,
               "wall_s": 1.0, "samples_per_s": 2.0, "out": str(out)}
    (out / "summary.json").write_text(json.dumps(summary))
    return parse(*flags), out, ck


def test_resume_auto_of_a_finished_run_by_its_checkpoint_folder_trains_nothing(tmp_path,
                                                                               capsys):
    config, out, ck = finished_run(tmp_path)
    assert config.out is None
    with options.command_line():  # as hpctrain train runs it
        done = run.train(config)  # returns before anything starts: no MPI in this process
    assert done == json.loads((out / "summary.json").read_text())
    assert capsys.readouterr().out == (f"hpctrain: {out} (the run of --checkpoint-dir {ck}) "
                                       "holds a finished run; nothing to train (--resume "
                                       "auto)\n")
    changed = parse("--algo", "sgd", *SYNTHETIC, "--epochs", "1", "--checkpoint-every", "0.5e",
                    "--checkpoint-dir", str(ck), "--resume", "auto", "--lr", "0.3")
    with options.command_line():
        assert one_line(lambda: run.train(changed)) == (
            f"--resume auto: {out} (the run of --checkpoint-dir {ck}) holds a finished run, "
            "started with --lr 0.05, not 0.3; choose another --checkpoint-dir for a new run")
    # hpctrain.train(config) from Python: the fields the script gave, not flags it never typed
    assert run.train(config) == done
    assert capsys.readouterr().out == (
        f"hpctrain: {out} (the run of CheckpointConfig.dir={str(ck)!r}) holds a finished run; "
        "nothing to train (CheckpointConfig.resume='auto')\n")
    assert one_line(lambda: run.train(changed)) == (
        f"CheckpointConfig.resume='auto': {out} (the run of CheckpointConfig.dir={str(ck)!r}) "
        "holds a finished run, started with OptimConfig.lr=0.05, not 0.3; choose another "
        "CheckpointConfig.dir for a new run")


# 11. The benchmarks' --device cuda hint and --json file.

def test_bench_allreduce_without_a_gpu_names_its_own_device_choice():
    import torch

    from hpctrain.bench import allreduce

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = cli.build_parser().parse_args(["bench", "allreduce", "--device", "cuda"])
    with options.command_line():  # as cli.main runs it (from Python: RunConfig.device)
        message = one_line(lambda: allreduce.validate(args))
    assert message.startswith("--device cuda: ") and message.endswith("; use --device cpu")


@pytest.mark.parametrize("path, message", [
    ("", "--json '' is empty: give a file"),
    ("/proc/hpctrain.json", "--json /proc/hpctrain.json: cannot write a file in /proc ("),
])
def test_a_bench_json_file_that_cannot_be_written_is_refused_before_measuring(path, message):
    with pytest.raises(UsageError) as refused:
        cli.main(["bench", "kernel", "--elements", "1000", "--repeats", "1", "--json", path])
    assert str(refused.value).startswith(message)


# 12. A tiny --stall-timeout ended healthy jobs (the watchdog polls at a tenth of it) or spun.

@pytest.mark.parametrize("value", ["0.001", "1e-300", "0.999"])
def test_a_stall_timeout_under_a_second_is_refused(value):
    assert refusal(["--algo", "sgd", *SYNTHETIC, "--stall-timeout", value]) == \
        f"--stall-timeout {float(value)} must be 0 (never) or >= 1 (seconds)"


def test_a_stall_timeout_of_0_or_a_second_is_taken():
    assert RunConfig(algo="sgd", stall_timeout=0).stall_timeout == 0
    assert RunConfig(algo="sgd", stall_timeout=1).stall_timeout == 1.0
    with pytest.raises(UsageError, match="^RunConfig.stall_timeout=0.5 must be 0 .never. or >= 1"):
        RunConfig(algo="sgd", stall_timeout=0.5)


# 13. --lr-gamma without --lr-milestones: the step decay it sets never happens.

@pytest.mark.parametrize("extra", [[], ["--lr-schedule", "constant"], ["--lr-schedule", "cosine"]])
def test_a_step_decay_factor_without_milestones_is_refused(extra):
    assert refusal(["--algo", "sgd", *SYNTHETIC, "--lr-gamma", "0.5", *extra]) == (
        "--lr-gamma 0.5 is the step decay at --lr-milestones, and none are given: it would "
        "change nothing; give --lr-milestones (e.g. 3,4) or leave --lr-gamma out")
    with pytest.raises(UsageError) as refused:  # from Python: the fields the caller gave
        OptimConfig(lr_gamma=0.5)
    assert str(refused.value) == (
        "OptimConfig.lr_gamma=0.5 is the step decay at OptimConfig.lr_milestones, and none "
        "are given: it would change nothing; give OptimConfig.lr_milestones (e.g. (3, 4)) "
        "or leave OptimConfig.lr_gamma out")  # the example as Python writes it, not 3,4


def test_a_step_decay_factor_with_milestones_is_taken():
    config = parse("--algo", "sgd", *SYNTHETIC, "--lr-gamma", "0.5", "--lr-milestones", "3")
    assert config.optim.lr_gamma == 0.5 and config.optim.lr_milestones == (3.0,)
    assert OptimConfig(lr_milestones=(3,), lr_gamma=0.5).lr_gamma == 0.5


# 14. --scale-lr on an asynchronous algorithm made every push K times larger: no gradient
# there is averaged over the K workers, which is what the linear scaling rule makes up for.
# ec's members never average either (only their outputs, to distil): --scale-lr --lr 0.05 on
# 2 ranks trained the model --lr 0.1 does.

@pytest.mark.parametrize("algo", ["asgd", "dcasgd-c", "dcasgd-a", "ssp", "ec"])
def test_the_linear_scaling_rule_is_refused_where_no_update_is_averaged(algo):
    assert refusal(["--algo", algo, *SYNTHETIC, "--scale-lr"], ranks=3) == (
        f"--scale-lr: --algo {algo} applies each worker's gradient on its own, not averaged "
        "over the workers, so the linear scaling rule does not apply; set --lr itself")
    config = replace(parse("--algo", algo, *SYNTHETIC, "--scale-lr"), out=None)
    with pytest.raises(UsageError, match="^OptimConfig.scale_lr: the algorithm"):  # the
        # simulator's check too, called from Python: the fields
        check_simulation(config, SimConfig(workers=2))


# Adasum adds the workers' orthogonal updates rather than averaging them: --scale-lr made
# each step K times larger, and was taken without a word.

def test_the_linear_scaling_rule_is_refused_with_adasum():
    args = ["--algo", "ssgd", *SYNTHETIC, "--reduce-op", "adasum", "--scale-lr"]
    assert refusal(args, ranks=2) == (
        "--scale-lr: --reduce-op adasum adds the workers' orthogonal updates rather than "
        "averaging them, so the linear scaling rule does not apply; set --lr itself")
    assert not launch_checks.check_launch(parse(*args[:-1]), 2).optim.scale_lr  # unscaled: taken


@pytest.mark.parametrize("algo", ["ssgd", "ma"])
def test_the_linear_scaling_rule_is_taken_where_updates_are_averaged(algo):
    config = launch_checks.check_launch(parse("--algo", algo, *SYNTHETIC, "--scale-lr"), 2)
    assert config.optim.scale_lr


# --weight-decay defaults to 0 for every optimizer, torch's AdamW to 0.01: --optimizer adamw
# at the defaults trained bit for bit as adam, and nothing said so.

def test_adamw_without_weight_decay_is_warned_of_as_plain_adam(capsys):
    launch_checks.check_launch(parse("--algo", "sgd", *SYNTHETIC, "--optimizer", "adamw"), 1)
    assert capsys.readouterr().err == (
        "hpctrain: warning: --optimizer adamw with --weight-decay 0 (the default) is plain "
        "Adam; give --weight-decay (torch's AdamW default is 0.01)\n")
    launch_checks.check_launch(parse("--algo", "sgd", *SYNTHETIC, "--optimizer", "adamw",
                                     "--weight-decay", "0.01"), 1)
    launch_checks.check_launch(parse("--algo", "sgd", *SYNTHETIC, "--optimizer", "adam"), 1)
    assert "adamw" not in capsys.readouterr().err


# --nesterov, --betas and --eps were missing; each is refused where it would mean nothing or
# be taken silently, in one line before MPI starts, naming the value.

_OWN_RULE = ("--nesterov: --algo {} keeps its own update rule (applied in the parameter "
             "store's push, with plain --momentum); leave --nesterov out (--no-nesterov over a "
             "--config file's)")
_ABOVE_0 = ("Nesterov momentum needs momentum > 0, as torch's SGD says; give --momentum "
            "above 0, or leave --nesterov out (--no-nesterov over a --config file's)")
_OWN_SGD = ("Adam's, and --algo {} keeps its own update rule (SGD with --momentum), which has "
            "none; leave {} out (none over a --config file's)")
_ADAMS = ("Adam's, and --optimizer sgd has none; give --optimizer adam or adamw (SGD has "
          "--momentum)")


@pytest.mark.parametrize("args, ranks, said", [
    (["--algo", "sgd", "--nesterov", "--momentum", "0"], 1,
     f"--nesterov with --momentum 0: {_ABOVE_0}"),
    (["--algo", "ssgd", "--nesterov", "--optimizer", "adam"], 2,
     "--nesterov is SGD's Nesterov momentum; --optimizer adam has none (torch's NAdam is "
     "another optimizer)"),
    (["--algo", "ma", "--nesterov", "--optimizer", "adamw", "--weight-decay", "0.01"], 2,
     "--nesterov is SGD's Nesterov momentum; --optimizer adamw has none (torch's NAdam is "
     "another optimizer)"),
    (["--algo", "asgd", "--nesterov"], 3, _OWN_RULE.format("asgd")),
    (["--algo", "dcasgd-a", "--nesterov", "--momentum", "0.5"], 3,
     _OWN_RULE.format("dcasgd-a")),
    (["--algo", "ssp", "--nesterov", "--momentum", "0.5"], 3, _OWN_RULE.format("ssp")),
    (["--algo", "sgd", "--betas", "0.8,0.99"], 1, f"--betas 0.8,0.99: {_ADAMS}"),
    (["--algo", "ec", "--eps", "1e-6"], 2, f"--eps 1e-06: {_ADAMS}"),
    (["--algo", "sgd", "--betas", "0.8,0.99", "--eps", "0.1"], 1,
     f"--betas 0.8,0.99 and --eps 0.1: {_ADAMS}"),
    # An asynchronous algorithm takes sgd only: --optimizer adam was no way on.
    (["--algo", "asgd", "--betas", "0.8,0.99"], 3,
     f"--betas 0.8,0.99: {_OWN_SGD.format('asgd', 'it')}"),
    (["--algo", "dcasgd-a", "--eps", "1e-6"], 3,
     f"--eps 1e-06: {_OWN_SGD.format('dcasgd-a', 'it')}"),
    (["--algo", "ssp", "--betas", "0.8,0.99", "--eps", "0.1"], 3,
     f"--betas 0.8,0.99 and --eps 0.1: {_OWN_SGD.format('ssp', 'them')}"),
    (["--algo", "sgd", "--optimizer", "adam", "--betas", "0.9,1"], 1,
     "--betas 0.9,1.0: each must be in [0, 1)"),
    (["--algo", "sgd", "--optimizer", "adam", "--betas", "-0.1,0.9"], 1,
     "--betas -0.1,0.9: each must be in [0, 1)"),
    (["--algo", "sgd", "--optimizer", "adam", "--betas", "0.9"], 1,
     "argument --betas: '0.9': want two comma-separated numbers, e.g. 0.9,0.999"),
    # The word that is no number, and why: "want two numbers" hid nan's reason.
    (["--algo", "sgd", "--optimizer", "adam", "--betas", "0.9,x"], 1,
     "argument --betas: '0.9,x': 'x' is not a number"),
    (["--algo", "sgd", "--optimizer", "adam", "--betas", "nan,0.9"], 1,
     "argument --betas: 'nan,0.9': 'nan' is not a finite number"),
    (["--algo", "sgd", "--optimizer", "adam", "--eps", "0"], 1,
     "argument --eps: must be > 0, got 0"),
    # float32's 0, where Adam divides 0 by 0: the run's loss went NaN at once.
    (["--algo", "sgd", "--optimizer", "adam", "--eps", "1e-300"], 1,
     "--eps 1e-300 is 0 in float32, the optimizer state's type (its smallest positive number "
     "is 1.4e-45), and Adam's 0/0 then makes NaN; give at least 1.4e-45"),
    # float32's infinity: every step m / inf was 0, and the run trained nothing
    (["--algo", "sgd", "--optimizer", "adamw", "--eps", "1e300"], 1,
     "--eps 1e+300 is infinite in float32, the optimizer state's type (its largest number is "
     "3.4e+38), and every Adam step is then 0: nothing trains; give at most 3.4e+38"),
])
def test_nesterov_betas_and_eps_are_refused_where_they_do_not_apply(args, ranks, said):
    assert refusal([*args, *SYNTHETIC], ranks) == said


def test_a_files_nesterov_gives_way_to_an_async_algo_or_no_momentum(tmp_path, capsys):
    """A --config file's nesterov was refused beside --algo asgd or --momentum 0 (naming
    --no-nesterov); it gives way now, said once, as to another --optimizer. Typed, it is
    refused still, and --no-nesterov switches it off as before."""
    toml = tmp_path / "nesterov.toml"
    toml.write_text('algo = "ssgd"\n[optim]\nnesterov = true\n')
    for args, said in ((["--algo", "asgd"], _OWN_RULE.format("asgd")),
                       (["--momentum", "0"], f"--nesterov with --momentum 0: {_ABOVE_0}")):
        for more in ([], ["--no-nesterov"]):
            config = launch_checks.check_launch(parse("--config", str(toml), *args, *SYNTHETIC,
                                                      *more), 3)
            assert not config.optim.nesterov
        assert "leaving out" in capsys.readouterr().out
        assert refusal(["--config", str(toml), *args, "--nesterov", *SYNTHETIC], 3) == said


def test_a_python_callers_betas_and_eps_are_checked_as_the_flags_are():
    assert one_line(lambda: OptimConfig(optimizer="adam", betas=(0.9, float("nan")))) == \
        "OptimConfig.betas=(0.9, nan): each must be in [0, 1)"
    assert one_line(lambda: OptimConfig(optimizer="adam", betas=[0.9])) == \
        "OptimConfig.betas=[0.9]: want two numbers, e.g. [0.9, 0.999]"
    assert one_line(lambda: OptimConfig(optimizer="adam", betas=(True, 0.9))) == \
        "OptimConfig.betas=(True, 0.9): want two numbers, e.g. [0.9, 0.999]"
    assert one_line(lambda: OptimConfig(optimizer="adam", eps=0.0)) == \
        "OptimConfig.eps=0.0 must be > 0"
    assert one_line(lambda: OptimConfig(optimizer="adamw", nesterov=True)).startswith(
        "OptimConfig.nesterov is SGD's Nesterov momentum; OptimConfig.optimizer='adamw' has "
        "none")
    assert OptimConfig(optimizer="adam", betas=[0, 0.5]).betas == (0.0, 0.5)  # a file's list
    assert OptimConfig(optimizer="adam", eps=1.4e-45).eps == 1.4e-45  # float32's smallest
    assert one_line(lambda: OptimConfig(optimizer="adam", eps=7e-46)).startswith(
        "OptimConfig.eps=7e-46 is 0 in float32")
    largest = 3.4028234663852886e38  # float32's largest: held, as a file may give it
    assert OptimConfig(optimizer="adam", eps=largest).eps == largest
    assert one_line(lambda: OptimConfig(optimizer="adam", eps=configs.FLOAT32_INF_AT)) \
        .startswith("OptimConfig.eps=3.40282e+38 is infinite in float32")
    # A momentum of 0 is refused once resolved: the algorithm's default may be 0 (asgd's).
    assert OptimConfig(momentum=0.0, nesterov=True).nesterov



def test_a_python_callers_choices_and_range_ends_are_checked_as_the_flags_are():
    """A config file or a Python caller reaches check_fields, not argparse: a choice not
    offered, the open end of a range, infinity past a lower bound alone, and the range's
    note are each said; an on/off option set False by its flag is named by its key."""
    assert one_line(lambda: OptimConfig(lr_schedule="bogus")) == \
        "OptimConfig.lr_schedule='bogus' is unknown; choose from cosine, step, constant"
    assert one_line(lambda: OptimConfig(momentum=1.0)) == \
        "OptimConfig.momentum=1.0 must be in [0, 1)"
    assert OptimConfig(momentum=0.0).momentum == 0.0  # the closed end
    assert one_line(lambda: RunConfig(algo="sgd", stall_timeout=-1.0)) == \
        "RunConfig.stall_timeout=-1.0 must be >= 0 (0: never)"
    assert one_line(lambda: RunConfig(algo="sgd", stall_timeout=float("inf"))) == \
        "RunConfig.stall_timeout=inf must be a finite number >= 0 (0: never)"
    assert one_line(lambda: RunConfig(algo="sgd", progress="yes")).startswith(
        "RunConfig.progress='yes' must be true or false")
    assert options.Range(high=1, high_open=True).problem(1) == "must be < 1"
    assert options.Range(high=1).problem(1) is None and options.Range(high=1).problem(2) == \
        "must be <= 1"

def test_a_refused_nesterov_exits_with_status_2_before_mpi():
    proc = run_job(["train", "--algo", "sgd", *SYNTHETIC, "--nesterov", "--momentum", "0"],
                   np=0, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        f"--nesterov with --momentum 0: {_ABOVE_0}")


def test_a_python_caller_is_told_the_field_it_gave_and_the_command_line_the_flag(tmp_path):
    """A user trial of the Python API: ``OptimConfig(lr=-1)`` was refused as "--lr -1 must be
    in ...", a flag the caller never typed, and a finished ``RunConfig(out=...)`` as "--out
    ... already holds a finished run". From Python the refusal names the class and field;
    the command line's (flags typed, or a --config file's keys) are as they were."""
    assert one_line(lambda: OptimConfig(lr=-1)) == "OptimConfig.lr=-1 must be in (0, 1e+06]"
    assert one_line(lambda: RunConfig(algo="sgd", threads=0)) == \
        "RunConfig.threads=0 must be in [1, 4096]"
    assert one_line(lambda: RunConfig(algo="sgd", eval_every="x")) == \
        "RunConfig.eval_every='x' must be a number, not a string"  # no config file's advice
    assert one_line(lambda: OptimConfig(optimizer="adm")) == (
        "OptimConfig.optimizer='adm' is unknown; choose from sgd, adam, adamw; did you mean "
        "'adam'?")
    finished = tmp_path / "done"
    finished.mkdir()
    (finished / "summary.json").write_text("{}")
    config = RunConfig(algo="sgd", out=str(finished), data=DataConfig(dataset="synthetic"),
                       model=ModelConfig(name="mlp"))
    assert one_line(lambda: launch_checks.check_launch(config, 1)) == \
        f"RunConfig.out={str(finished)!r} already holds a finished run; choose another folder"
    # The command line: the same values, typed or in a --config file.
    assert refusal(["--algo", "sgd", "--lr", "-1"]) == "argument --lr: must be > 0, got -1"
    assert refusal(["--algo", "sgd", "--lr", "1e7"]) == "--lr 10000000.0 must be in (0, 1e+06]"
    assert refusal(["--algo", "sgd", "--optimizer", "adm"]).startswith(
        "argument --optimizer: invalid choice: 'adm'")
    assert refusal(["--algo", "sgd", *SYNTHETIC, "--out", str(finished)]) == \
        f"--out {finished} already holds a finished run; choose another folder"
    file = tmp_path / "run.toml"
    file.write_text('algo = "sgd"\neval_every = "x"\n[optim]\nlr = -1\noptimizer = "adm"\n')
    assert refusal(["--config", str(file)]) == "--lr -1 must be in (0, 1e+06]"
    file.write_text('algo = "sgd"\nthreads = 0\n')
    assert refusal(["--config", str(file)]) == "--threads 0 must be in [1, 4096]"
    file.write_text('algo = "sgd"\neval_every = "x"\n')
    assert refusal(["--config", str(file)]) == ("--eval-every 'x' must be a number, not a "
                                                "string (in a config file, write it without "
                                                "quotes)")
    file.write_text('algo = "sgd"\n[optim]\noptimizer = "adm"\n')
    assert refusal(["--config", str(file)]) == (
        "unknown --optimizer 'adm'; choose from sgd, adam, adamw; did you mean 'adam'?")


def test_an_optimizer_the_algorithm_cannot_use_is_named_by_fields_from_python():
    """optimizers.check, at the launch checks, named flags to a script that typed none
    (``--optimizer adam: --algo asgd keeps its own update rule``); the command line's
    words are as they were (the refusal() tests above)."""
    def said(algo: str, **optim) -> str:
        return one_line(lambda: launch_checks.check_launch(
            RunConfig(algo=algo, data=DataConfig(dataset="synthetic"),
                      optim=OptimConfig(**optim)), 2))

    assert said("asgd", optimizer="adam") == (
        "OptimConfig.optimizer='adam': the algorithm asgd keeps its own update rule "
        "(applied in the parameter store's push); only sgd")
    assert said("ssgd", eps=1e-6) == (
        "OptimConfig.eps=1e-06: Adam's, and OptimConfig.optimizer='sgd' has none; give "
        "OptimConfig.optimizer='adam' or 'adamw' (SGD has OptimConfig.momentum)")
    assert said("ssgd", nesterov=True, momentum=0) == (
        "OptimConfig.nesterov with OptimConfig.momentum=0: Nesterov momentum needs momentum "
        "> 0, as torch's SGD says; give OptimConfig.momentum above 0, or leave "
        "OptimConfig.nesterov out")
    assert said("asgd", scale_lr=True).startswith(
        "OptimConfig.scale_lr: the algorithm asgd applies each worker's gradient")


def test_an_algorithms_launch_checks_name_a_python_callers_fields():
    """The algorithms' own checks at launch (sync/, async_/, ec/, live, launch_checks) named
    flags to hpctrain.train(config) from Python, e.g. ``--scale-lr: --reduce-op adasum``, a
    script typed neither; it is told the fields it gave (the command line's words: the
    refusal() tests, unchanged)."""
    synthetic = DataConfig(dataset="synthetic")

    def said(ranks: int, algo: str, algorithm: dict | None = None, **run) -> str:
        options_of = hpctrain.algorithm_options(algo)
        return one_line(lambda: launch_checks.check_launch(RunConfig(
            algo=algo, data=run.pop("data", synthetic),
            algorithm=options_of(**(algorithm or {})), **run), ranks))

    assert said(2, "sgd") == ("RunConfig.algo='sgd' runs on one process, not 2; use "
                              "RunConfig.algo='ssgd'")
    assert said(2, "ssgd", {"reduce_op": "adasum"}, optim=OptimConfig(scale_lr=True)) == (
        "OptimConfig.scale_lr: SynchronousOptions.reduce_op='adasum' adds the workers' "
        "orthogonal updates rather than averaging them, so the linear scaling rule does not "
        "apply; set OptimConfig.lr itself")
    assert said(3, "ssgd", {"reduce_op": "adasum"}) == (
        "SynchronousOptions.reduce_op='adasum' needs a power-of-2 number of workers, got 3")
    assert said(2, "asgd", {"servers": 2}) == (
        "StoreOptions.servers=2 with 2 ranks: need 0 <= servers < ranks (at least one worker)")
    assert said(2, "asgd", data=DataConfig(dataset="synthetic", data_placement="sharded")
                ).startswith("RunConfig.algo='asgd' needs DataConfig.data_placement="
                             "'replicated': sharded placement serves lock-step algorithms")
    assert said(2, "asgd", checkpoint=configs.CheckpointConfig(every="10")) == (
        "CheckpointConfig.every='10': asynchronous runs checkpoint by global progress; give "
        "epochs, e.g. CheckpointConfig.every='1e'")
    assert said(2, "ssgd", eval_rank=2, eval_mode="online") == (
        "RunConfig.eval_rank=2: the job has ranks 0..1")
    assert re.match(r"CompressionOptions.tau=1000 never aggregates in \d+ updates per rank "
                    r"\(OptimConfig.epochs=5 x .*: give CompressionOptions.tau below \d+ or "
                    r"more OptimConfig.epochs$", said(2, "ec", {"tau": 1000}))
    with pytest.raises(UsageError) as refused:  # ma's options built from Python
        hpctrain.algorithm_options("ma")(tau=3, tau_epochs=1.0)
    assert str(refused.value) == ("AveragingOptions.tau_epochs=1.0 is not allowed with "
                                  "AveragingOptions.tau=3: give one")
    # the command line's words, as before
    assert refusal(["--algo", "ssgd", *SYNTHETIC, "--reduce-op", "adasum", "--scale-lr"],
                   2).startswith("--scale-lr: --reduce-op adasum adds the workers' ")
    assert refusal(["--algo", "asgd", *SYNTHETIC, "--servers", "2"], 2) == (
        "--servers 2 with 2 ranks: need 0 <= servers < ranks (at least one worker)")
    assert re.match(r"--tau 1000 never aggregates in \d+ updates per rank \(--epochs 5 x .*: "
                    r"give --tau below \d+ or more --epochs$",
                    refusal(["--algo", "ec", *SYNTHETIC, "--tau", "1000"], 2))
