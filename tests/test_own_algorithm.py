"""A user's own algorithm by reference (``--algo ./mine.py:Mine``, ``RunConfig(algo=Mine)``):
loaded and checked before MPI, its options flags, trained, resumed, compared and simulated
by the same code as a built-in one (``examples/signum_vote.py``)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SYNTHETIC, refusal, run_commands, run_job

from hpctrain import arguments, cli, options, registry
from hpctrain.bench.compare import arguments as compare_arguments
from hpctrain.bench.report import rendering
from hpctrain.config import CheckpointConfig, DataConfig, RunConfig, from_dict, to_dict
from hpctrain.errors import UsageError

EXAMPLE = ROOT / "examples" / "signum_vote.py"
SIGNUM = f"{EXAMPLE}:SignumVote"
SMALL = [*SYNTHETIC, "--model", "mlp", "--epochs", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def fresh_registry():
    """Each test starts and ends with the algorithms it found (the users' are per process)."""
    before = dict(registry._LOADED)
    yield
    registry._LOADED.clear()
    registry._LOADED.update(before)


def own(tmp_path: Path, body: str, name: str = "algos.py") -> Path:
    path = tmp_path / name
    path.write_text("from dataclasses import dataclass\n"
                    "from hpctrain.algorithm import Algorithm, Options\n"
                    "from hpctrain.options import option\n" + textwrap.dedent(body))
    return path


def test_a_reference_loads_the_class_and_its_options_become_flags():
    cls = registry.get(SIGNUM)
    assert cls.name == "signum-vote" and registry.display_name(SIGNUM) == "signum-vote"
    flags = {d.flag: d for d in arguments.algorithm_options()}
    assert flags["--vote"].owners == (SIGNUM,)
    parser = compare_arguments._train_parser()
    config = arguments.build(parser.parse_args(["--algo", SIGNUM, "--vote", "mean"]))
    assert config.algorithm.vote == "mean" and config.optim.lr is None
    with pytest.raises(UsageError, match="--vote is an option of .*signum_vote.py:SignumVote, "
                                         "not of --algo ssgd"):
        arguments.build(parser.parse_args(["--algo", "ssgd", "--vote", "mean"]))


def test_a_user_algorithms_option_with_another_algo_says_where_options_come_from(tmp_path):
    """A user trial: ``--algo sgd --vote mean`` (signum_vote.py's option, not loaded) was
    argparse's bare "unrecognized arguments: --vote mean", while a built-in's option is said
    to be an option of ma, ec. hpctrain cannot know --vote then; it says where options come
    from. With the user's algorithm loaded, a flag of neither is said to be neither."""
    out = ["--out", str(tmp_path / "run")]
    assert refusal(["--algo", "sgd", "--vote", "mean", *out]) == (
        "unrecognized arguments: --vote mean (an option of a user's algorithm is known only "
        "with its --algo MODULE:CLASS or ./FILE.py:CLASS; hpctrain train --help lists those "
        "it knows)")
    argv = ["train", "--algo", SIGNUM, "--vote", "mean", "--bogus", "1", *out]
    arguments.load_named_algorithms(argv)  # as cli.main does before its parser is built
    with pytest.raises(UsageError) as refused:
        cli.build_parser().parse_args(argv)
    assert str(refused.value) == (
        f"unrecognized arguments: --bogus 1 (neither hpctrain train's nor --algo {SIGNUM}'s; "
        f"hpctrain train --algo {SIGNUM} --help lists those it knows)")


@pytest.mark.timeout(60)
def test_an_unknown_option_is_one_line_with_exit_status_2(tmp_path):
    proc = run_job(["train", "--algo", "sgd", "--vote", "mean", "--out", str(tmp_path / "run")],
                   np=0, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("hpctrain")] == [
        "hpctrain: error: unrecognized arguments: --vote mean (an option of a user's algorithm "
        "is known only with its --algo MODULE:CLASS or ./FILE.py:CLASS; hpctrain train --help "
        "lists those it knows)"], proc.stderr
    assert not (tmp_path / "run").exists()


def test_an_options_flag_reads_its_declared_type_without_a_parse(tmp_path):
    """README's plug-in options name no parse: ``--every-k 3`` was refused as "'3' must be a
    whole number" (the flag gave the text, which the field's check then judged)."""
    path = own(tmp_path, """
        @dataclass(frozen=True)
        class KOptions(Options):
            every_k: int = option(2, "sync every k steps")
            rate: float | None = option(None, "a rate")
            label: str = option("x", "a name")

        class K(Algorithm):
            name = "every-k"
            Options = KOptions
        """)
    registry.get(f"{path}:K")
    parser = compare_arguments._train_parser()
    config = arguments.build(parser.parse_args(["--algo", f"{path}:K", "--every-k", "1e3",
                                                "--rate", "0.5", "--label", "7"]))
    assert (config.algorithm.every_k, config.algorithm.rate) == (1000, 0.5)
    assert config.algorithm.label == "7"
    with pytest.raises(UsageError, match="--every-k: '2.5' is not a whole number"):
        arguments.build(parser.parse_args(["--algo", f"{path}:K", "--every-k", "2.5"]))


def test_a_config_files_options_stay_with_its_algorithm_spelt_otherwise(tmp_path, monkeypatch):
    """config.json records a file's reference absolute; typed relative it is the same class,
    whose options the file holds (they were dropped as another algorithm's)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"algo": SIGNUM, "algorithm": {"vote": "mean"}}))
    monkeypatch.chdir(ROOT)
    typed = f"./{EXAMPLE.relative_to(ROOT)}:SignumVote"
    arguments.load_named_algorithms(["train", "--alg", typed])  # abbreviated, as argparse takes
    assert typed in registry._LOADED
    config = arguments.build(compare_arguments._train_parser().parse_args(
        ["--config", str(path), "--algo", typed]))
    assert config.algorithm.vote == "mean"


@pytest.mark.timeout(60)
def test_a_config_that_is_a_pipe_is_read_once(tmp_path):
    """Looking for an algorithm in --config leaves a pipe unopened for the configuration's
    one read. Opened, it waits for a writer: the wait is bounded here, and then a writer
    lets it go on, so the failure says why instead of the suite's timeout."""
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    raised: list[BaseException] = []

    def load() -> None:
        try:
            arguments.load_named_algorithms(["train", "--config", str(fifo)])
        except BaseException as e:  # noqa: BLE001 (the test's thread says what it raised)
            raised.append(e)

    loading = threading.Thread(target=load, daemon=True)
    loading.start()
    loading.join(20)
    opened = loading.is_alive()
    if opened:  # its reader waits: a writer that closes at once gives it an empty file
        with contextlib.suppress(OSError):  # ENXIO: it waits elsewhere
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        loading.join(20)
    assert not opened, f"load_named_algorithms opened the pipe {fifo} (waited 20 s for a writer)"
    assert raised == []


def test_the_python_api_takes_the_class_and_config_json_its_reference(tmp_path, monkeypatch):
    own(tmp_path, "class Mine(Algorithm):\n    name = 'mine'\n", "my_algos.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    from my_algos import Mine

    config = RunConfig(algo=Mine)
    assert config.algo == "my_algos:Mine" and config.algorithm_class is Mine
    again = from_dict(json.loads(json.dumps(to_dict(config))))
    assert again == config and again.algorithm_class is Mine
    assert RunConfig(algo=registry.ALGORITHMS["ssgd"]).algo == "ssgd"  # a built-in by name


@pytest.mark.parametrize("body, attribute, message", [
    ("def build(): pass\n", "build", "a function, not a subclass of hpctrain.algorithm.Algorithm"),
    ("class Plain: pass\n", "Plain", "a class, not a subclass of hpctrain.algorithm.Algorithm"),
    ("class Nameless(Algorithm): pass\n", "Nameless", "needs a name of its own"),
    ("class Slashed(Algorithm):\n    name = 'a/b'\n", "Slashed", "needs a name of its own"),
    ("class Dotted(Algorithm):\n    name = 'report.md'\n", "Dotted", "needs a name of its own"),
    # re.match's "$" took a final newline: a folder name ending in one
    ("class Newline(Algorithm):\n    name = 'mine\\n'\n", "Newline", "needs a name of its own"),
    ("class Clash(Algorithm):\n    name = 'ssgd'\n", "Clash", "is a built-in algorithm's"),
    ("class Loose(Algorithm):\n    name = 'loose'\n    Options = dict\n", "Loose",
     "its Options must be a dataclass subclassing hpctrain.algorithm.Options"),
    # Loaded, then its run failed blaming a "--config None" never given.
    ("@dataclass(frozen=True)\nclass O(Options):\n    k: int\n"
     "class Bare(Algorithm):\n    name = 'bare'\n    Options = O\n", "Bare",
     r"^--algo .*:Bare: O\.k has no default; give it one with hpctrain\.options\.option"),
    # Taken silently: no flag, not in config.json, not checked on resume.
    ("@dataclass(frozen=True)\nclass O(Options):\n    k: int = 3\n"
     "class Plain(Algorithm):\n    name = 'plain'\n    Options = O\n", "Plain",
     r"^--algo .*:Plain: O\.k is not declared with hpctrain\.options\.option"),
])
def test_a_class_that_is_no_algorithm_is_refused_in_one_line(tmp_path, body, attribute,
                                                               message):
    path = own(tmp_path, body)
    with pytest.raises(UsageError, match=message), options.command_line():  # as cli.main
        registry.get(f"{path}:{attribute}")


@pytest.mark.parametrize("body, attribute", [
    ("class Plain: pass\n", "Plain"),
    ("@dataclass(frozen=True)\nclass O(Options):\n    k: int = 3\n"
     "class Plain(Algorithm):\n    name = 'plain'\n    Options = O\n", "Plain"),
])
def test_a_class_that_is_no_algorithm_names_the_field_from_python(tmp_path, body, attribute):
    """RunConfig(algo='./x.py:Plain') was refused as "--algo ./x.py:Plain: ...", a flag
    the script never typed: the field given now."""
    reference = f"{own(tmp_path, body)}:{attribute}"
    with pytest.raises(UsageError) as refused:
        RunConfig(algo=reference)
    message = str(refused.value)
    assert message.startswith(f"RunConfig.algo={reference!r}: "), message
    assert "--algo" not in message, message


def test_options_that_fail_to_build_do_not_blame_a_config_never_given(tmp_path):
    """A TypeError building the options said "--config None: ..." with no --config given."""
    path = own(tmp_path, """
        @dataclass(frozen=True)
        class Picky(Options):
            k: int = option(3, "k", parse=int)

            def __post_init__(self):
                raise TypeError("k must be odd")

        class Mine(Algorithm):
            name = 'mine'
            Options = Picky
        """)
    registry.get(f"{path}:Mine")
    parser = compare_arguments._train_parser()
    with pytest.raises(UsageError, match=r"^the options given: .*k must be odd"):
        arguments.build(parser.parse_args(["--algo", f"{path}:Mine", *SMALL]))


def test_two_algorithms_of_one_name_are_refused(tmp_path):
    first = own(tmp_path, "class Mine(Algorithm):\n    name = 'mine'\n", "a.py")
    second = own(tmp_path, "class Mine(Algorithm):\n    name = 'mine'\n", "b.py")
    registry.get(f"{first}:Mine")
    registry.get(f"{os.path.relpath(first)}:Mine")  # the same class by another reference
    with pytest.raises(UsageError, match=r"its name 'mine' is .*a.py:Mine's too"):
        registry.get(f"{second}:Mine")


@pytest.mark.parametrize("field, message", [
    ("lr: float = option(0.1, 'a rate of its own', parse=float)",
     r"its option lr \(--lr\) is every run's --lr already"),
    ("tau: str = option('x', 'another tau')",
     r"its option tau \(--tau\) is ma, ec's --tau already"),
    ("workers: int = option(1, 'w', parse=int)", r"\(--workers\) is hpctrain simulate's --workers"),
    ("seeds: str = option('1', 's')", r"\(--seeds\) is bench compare's --seeds"),
    ("help: str = option('x', 'h')", r"\(--help\) is the command line's --help"),
    ("compile: bool = option(False, 'c', flag='--kompile')", None),  # its flags are free
    ("kompile: bool = option(False, 'c', flag='--no-compile')",
     r"\(--no-compile\) is every run's --no-compile"),
    ("odd: str = option('x', 'o', flag='xx')", r"its option odd \('xx'\) is no flag"),
    ("odd: str = option('x', 'o', flag='--xx\\n')", r"its option odd \('--xx\\n'\) is no flag"),
])
def test_an_option_that_is_another_options_flag_is_refused(tmp_path, field, message):
    """Also a flag of the command lines that take algorithm options (simulate's, bench
    compare's, argparse's) and an on/off option's other flag; when loaded, so that a
    script's RunConfig(algo=Mine) is refused as the command line is (it trained, and its
    config.json could not be repeated; an option `seed` hid the run's own)."""
    path = own(tmp_path, f"""
        @dataclass(frozen=True)
        class MyOptions(Options):
            {field}

        class Mine(Algorithm):
            name = 'mine'
            Options = MyOptions
        """)
    if message is None:
        registry.get(f"{path}:Mine")
        assert any(d.flag == "--kompile" for d in arguments.algorithm_options())
        return
    with pytest.raises(UsageError, match=message):
        registry.get(f"{path}:Mine")
    assert registry.known() == registry.ALGORITHMS  # not loaded
    with pytest.raises(ValueError, match=message):
        RunConfig(algo=f"{path}:Mine")


def test_two_own_algorithms_may_each_declare_an_option_of_one_name(tmp_path):
    """A script's runs of two algorithms of its own, each with its own `rate`: each run's
    config.json loads only its own, so loading the second is not refused; a command line
    that loads both (bench compare --algos a,b) is."""
    paths = [own(tmp_path, f"""
        @dataclass(frozen=True)
        class MyOptions(Options):
            rate: float = option({default}, 'a rate of its own', parse=float)

        class Mine(Algorithm):
            name = 'mine-{default}'
            Options = MyOptions
        """, name=f"algos{i}.py") for i, default in enumerate((1, 2))]
    assert [registry.get(f"{path}:Mine").name for path in paths] == ["mine-1", "mine-2"]
    with pytest.raises(UsageError, match=r"its option rate \(--rate\) is mine-1's --rate"):
        arguments.algorithm_options()


def test_a_subclass_of_a_built_in_shares_its_options(tmp_path):
    path = own(tmp_path, """
        from hpctrain.ec.algorithm import EnsembleCompression

        class Mine(EnsembleCompression):
            name = 'ec-mine'
        """)
    registry.get(f"{path}:Mine")
    tau = next(d for d in arguments.algorithm_options() if d.flag == "--tau")
    assert tau.owners == ("ma", "ec", f"{path}:Mine")


def test_the_command_line_names_a_bad_reference_before_mpi(tmp_path):
    missing = f"{tmp_path}/none.py:Mine"
    for args in (["train", "--algo", missing, *SMALL], ["train", "--config", str(
            tmp_path / "run.toml"), *SMALL], ["bench", "compare", "--algos", f"ssgd,{missing}",
                                             "--out", str(tmp_path / "c"), *SMALL]):
        (tmp_path / "run.toml").write_text(f'algo = "{missing}"\n')
        job = run_job(args, np=0)
        assert job.returncode == 2, job.stderr
        named = f"--algos 'ssgd,{missing}': {missing}" if args[0] == "bench" else "--algo"
        assert job.stderr.strip().splitlines() == [
            f"hpctrain: error: {named}: no file {tmp_path}/none.py"]


def _model(folder: Path) -> dict:
    state = torch.load(folder / "model.pt")
    return state.get("model", state)


def test_trains_resumes_and_repeats_as_a_built_in_does(tmp_path):
    train = ["train", "--algo", SIGNUM, "--vote", "mean", *SMALL]
    whole, cut, again = tmp_path / "whole", tmp_path / "cut", tmp_path / "again"
    # Two launches (conftest.run_commands: the CLI's main() for each command in turn, one
    # start-up): the whole run, then one killed after a checkpoint (which ends its launch);
    # the resume, then a repeat of the whole run from its config.json.
    # Killed after a checkpoint, then resumed: the same model and count of bytes sent (each
    # rank's momentum and count are in the checkpoint).
    killed = run_commands([[*train, "--out", str(whole)],
                           [*train, "--out", str(cut), "--checkpoint-every", "0.25e"]],
                          np=2, injects=[None, "kill@1:25"])
    assert (whole / "summary.json").exists(), killed.stderr  # the whole run ended
    config = json.loads((whole / "config.json").read_text())
    assert config["algo"] == SIGNUM and config["algorithm"] == {"vote": "mean"}
    assert config["optim"]["lr"] == 0.0005  # the algorithm's own default
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["algo_label"] == "signum-vote" and summary["vote"] == "mean"
    params = sum(t.numel() for t in _model(whole).values())
    # int16 votes; a ring of two ranks sends each its whole payload (2(K-1)/K = 1)
    assert summary["vote_bytes_per_rank"] == 2 * params * summary["updates"]
    assert summary["final_test_acc"] > 0.9
    assert killed.returncode != 0 and not (cut / "model.pt").exists()
    # the whole run returned (a failure ends the launch): the killed one ran, to a checkpoint
    assert any((cut / "checkpoints").glob("*.pt")), killed.stderr
    # The resume, then --config of the whole run's config.json, from another working folder:
    # the same run again.
    resumed = run_commands([[*train, "--resume", str(cut)],
                            ["train", "--config", str(whole / "config.json"), "--out",
                             str(again)]], np=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert json.loads((cut / "summary.json").read_text())["vote_bytes_per_rank"] == \
        summary["vote_bytes_per_rank"]
    for other in (cut, again):
        assert all(torch.equal(a, b) for a, b in zip(_model(whole).values(),
                                                     _model(other).values(), strict=True))
    # The report of the runs' folder (no compare.json) counts its bytes from config.json.
    assert config["run_info"]["byte_fields"] == ["vote_bytes_per_rank"]
    rendering.run(cli.build_parser().parse_args(["report", str(tmp_path)]))
    rows = [line for line in (tmp_path / "report.md").read_text().splitlines()
            if line.startswith("| signum-vote (whole) |")]
    assert rows and "vote_bytes_per_rank" in rows[0]


def test_compared_and_simulated(tmp_path):
    relative = f"./{EXAMPLE.relative_to(ROOT)}:SignumVote"  # jobs run in the checkout
    # One process (conftest.run_commands: one start-up): the comparison (its runs, mpiruns of
    # their own), then the simulation.
    job = run_commands([["bench", "compare", "--algos", f"ssgd,{relative}", "--workers", "2",
                         *SMALL[:-1], "--vote", "mean", "--out", str(tmp_path / "cmp")],
                        ["simulate", "--algo", relative, "--workers", "4", *SMALL, "--out",
                         str(tmp_path / "sim")]], np=0, timeout=280)
    assert job.returncode == 0, job.stderr
    record = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert record["algos"] == ["ssgd", "signum-vote"]
    assert record["runs"]["ssgd"]["ignored"] == ["--vote"]
    assert "--vote mean" in record["runs"]["signum-vote"]["command"]
    row = next(line for line in (tmp_path / "cmp" / "report.md").read_text().splitlines()
               if line.startswith("| signum-vote | 2 |"))
    assert "vote_bytes_per_rank" in row  # its own byte count, in the traffic column
    assert record["byte_fields"] == {"signum-vote": ["vote_bytes_per_rank"]}  # report imports
    # nothing
    simulated = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert simulated["workers"] == 4
    assert json.loads((tmp_path / "sim" / "config.json").read_text())["algo"] == SIGNUM
    # Its votes counted as a ring sends them, on ssgd's scale: 2(K-1)/K = 1.5 at 4 workers
    params = sum(t.numel() for t in _model(tmp_path / "sim").values())
    assert simulated["vote_bytes_per_rank"] == 3 * params * simulated["updates"]


def test_the_reserved_flags_are_those_of_simulate_and_compare():
    from hpctrain.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    compare_parser = commands["bench"]._subparsers._group_actions[0].choices["compare"]
    train_flags = {s for a in commands["train"]._actions for s in a.option_strings}
    for command in (compare_parser, commands["simulate"]):
        own = {s for a in command._actions for s in a.option_strings} - train_flags
        assert own <= set(arguments._taken_flags())


@pytest.mark.parametrize("attributes, message", [
    ("defaults = {'lrr': 0.1}", r"defaults \{'lrr': 0.1\} may set lr and momentum only"),
    ("defaults = {'lr': -1.0}", r"want lr in \(0, 1e6\] and momentum in \[0, 1\)"),
    ("snapshots = 'bogus'", "snapshots 'bogus' is none of replicated, per_rank, root"),
    ("thread_level = 'many'", "thread_level 'many' is none of single"),
    ("optimizers = ('sgd', 'lion')", r"optimizers \('sgd', 'lion'\): want a tuple of some of"),
    ("lock_step = 'yes'", "lock_step 'yes': want True or False"),
    ("averages_updates = 1", "averages_updates 1: want True or False"),
    # A run's own field: refused only after training, and summary.json was never written.
    ("summary_fields = {'wall_s': 'mine', 'votes': 'count'}",
     r"summary_fields wall_s are every run's own \(docs/SUMMARY.md\)"),
    ("summary_fields = {'votes': 3}", r"summary_fields \{'votes': 3\}: want a dict of"),
    # Not lock-step with lock-step's hooks: its checkpoints hung, its count was one worker's.
    ("lock_step = False\n    def claim(self, position):\n        return position",
     "lock_step = False needs its own per_epoch, progress, close_tickets, before_checkpoint, "
     r"finish \(the defaults are lock-step's\)"),
])
def test_class_attributes_the_loop_would_misread_are_refused(tmp_path, attributes, message):
    path = own(tmp_path, f"class Mine(Algorithm):\n    name = 'mine'\n    {attributes}\n")
    with pytest.raises(UsageError, match=message):
        registry.get(f"{path}:Mine")


def test_a_subclass_of_ec_refuses_the_linear_scaling_rule_as_ec_does(tmp_path):
    """Its members step on their own batches, as ec's do: ``averages_updates`` is inherited."""
    path = own(tmp_path, "from hpctrain.ec.algorithm import EnsembleCompression\n"
                         "class MyEC(EnsembleCompression):\n    name = 'my-ec'\n")
    assert refusal(["--algo", f"{path}:MyEC", *SYNTHETIC, "--scale-lr"], ranks=2) == (
        "--scale-lr: --algo my-ec applies each worker's gradient on its own, not averaged over "
        "the workers, so the linear scaling rule does not apply; set --lr itself")


def test_an_optimizer_it_does_not_take_is_refused_for_what_it_is(tmp_path):
    path = own(tmp_path, "class Mine(Algorithm):\n    name = 'mine'\n    optimizers = ('sgd',)\n")
    parser = compare_arguments._train_parser()
    from hpctrain import launch_checks

    with pytest.raises(UsageError) as refused, options.command_line():  # as cli.main
        launch_checks.check_launch(arguments.build(parser.parse_args(
            ["--algo", f"{path}:Mine", "--optimizer", "adam", *SYNTHETIC])), 1)
    assert str(refused.value) == "--optimizer adam: --algo mine keeps its own update rule; only sgd"


def test_an_ec_subclass_whose_loss_ec_never_calls_is_refused(tmp_path):
    """ec's step loss comes from its losses(): a subclass overriding loss() alone trained
    with ec's own loss, silently."""
    path = own(tmp_path, """
        from hpctrain.ec.algorithm import EnsembleCompression
        from torch.nn import functional as F

        class SmoothEC(EnsembleCompression):
            name = "smooth-ec"
            def loss(self, x, y):
                return F.cross_entropy(self.model(x), y, label_smoothing=0.1)
        """)
    from hpctrain import launch_checks

    with pytest.raises(UsageError) as refused, options.command_line():
        launch_checks.check_launch(arguments.build(compare_arguments._train_parser().parse_args(
            ["--algo", f"{path}:SmoothEC", *SMALL])), 2)
    assert str(refused.value) == (
        f"--algo {path}:SmoothEC: SmoothEC.loss() would never be called: ec's step loss comes "
        "from losses() (cross-entropy plus the distillation of relabelled samples); override "
        "losses()")


NOT_LOCK_STEP = """
class Mine(Algorithm):
    name = "mine"
    lock_step = False
""" + "".join(f"    def {hook}(self, *args):\n        pass\n"
              for hook in registry.NOT_LOCK_STEP_HOOKS)


def test_a_class_not_lock_step_checkpoints_by_progress(tmp_path):
    """A user's class not lock-step wrote no checkpoint with an interval in seconds (the
    built-in async ones refused it; the refusal is the loop's now)."""
    from hpctrain import launch_checks

    path = own(tmp_path, NOT_LOCK_STEP)

    def launched(every: str):
        with options.command_line():  # the flags typed: the words a command line is told
            return launch_checks.check_launch(arguments.build(
                compare_arguments._train_parser().parse_args(["--algo", f"{path}:Mine",
                                                    "--checkpoint-every", every, *SYNTHETIC,
                                                    "--out", str(tmp_path / "out")])), 2)

    with pytest.raises(UsageError, match="^--checkpoint-every 10: asynchronous runs "
                                         "checkpoint by global progress; give epochs, e.g. 1e$"):
        launched("10")
    assert launched("1e").checkpoint.interval == "1e"
    config = RunConfig(algo=f"{path}:Mine", data=DataConfig(dataset="synthetic"),
                       checkpoint=CheckpointConfig(every=10), out=str(tmp_path / "py"))
    with pytest.raises(UsageError, match=r"^CheckpointConfig.every='10': asynchronous runs "
                                         r"checkpoint by global progress; give epochs, e.g. "
                                         r"CheckpointConfig.every='1e'$"):  # from Python
        launch_checks.check_launch(config, 2)


def test_built_in_algorithms_pass_the_checks_a_users_does():
    for cls in registry.ALGORITHMS.values():
        registry._check_option_fields(cls.name, cls.Options)
        registry._check_attributes(cls.name, cls)


SUBCLASSES = """
from hpctrain.ec.algorithm import ModelAveraging
from hpctrain.sync.algorithm import Synchronous

@dataclass(frozen=True)
class MyOptions(ModelAveraging.Options):
    warm_rounds: int = option(0, "rounds before ...", parse=int)

class MyMA(ModelAveraging):
    name = "my-ma"
    Options = MyOptions

class MySSGD(Synchronous):
    name = "my-ssgd"
"""


def test_subclasses_of_built_ins_train_under_their_own_names(tmp_path):
    path = own(tmp_path, SUBCLASSES)
    for cls, extra, label in (("MyMA", ["--tau", "4", "--warm-rounds", "1"], "my-ma (tau=4)"),
                              ("MySSGD", [], "my-ssgd (mpi backend)")):
        out = tmp_path / cls
        job = run_job(["train", "--algo", f"{path}:{cls}", *extra, *SMALL, "--out", str(out)],
                      np=2)
        assert job.returncode == 0, job.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["algo_label"] == label
        if cls == "MyMA":  # scored as ma is: the average
            assert summary["final_model"] == "averaged" and "final_averaged_acc" in summary


def test_a_comparison_resumed_with_another_class_of_that_name_is_refused(tmp_path):
    first = own(tmp_path, "class Mine(Algorithm):\n    name = 'mine'\n", "first.py")
    second = own(tmp_path, "class Mine(Algorithm):\n    name = 'mine'\n", "second.py")
    out = tmp_path / "cmp"
    compare_args = ["bench", "compare", "--simulate", "2", *SMALL[:-1], "--out", str(out)]
    assert run_job([*compare_args, "--algos", f"{first}:Mine"], np=0).returncode == 0
    (out / "mine" / "summary.json").unlink()  # as if it had not finished
    job = run_job([*compare_args, "--algos", f"{second}:Mine", "--resume"], np=0)
    assert job.returncode == 2
    assert job.stderr.strip() == (f"hpctrain: error: --resume: {out}'s mine runs are --algo "
                                  f"{first}:Mine, not {second}:Mine; give the same")


def test_a_module_beside_the_script_is_named_by_its_file_from_its_folder(tmp_path,
                                                                         monkeypatch):
    import sys
    import types

    from hpctrain import plugins

    (tmp_path / "beside_algos.py").write_text("def build(shape, classes):\n    pass\n")
    script = types.ModuleType("__main__")
    script.__file__ = str(tmp_path / "script.py")
    monkeypatch.setitem(sys.modules, "__main__", script)
    monkeypatch.chdir(tmp_path)  # run from the script's own folder
    monkeypatch.syspath_prepend(str(tmp_path))
    import beside_algos

    monkeypatch.setitem(sys.modules, "beside_algos", beside_algos)
    assert plugins.reference_to("--model", beside_algos.build) == \
        f"{tmp_path}/beside_algos.py:build"


def test_a_file_rewritten_between_runs_gives_its_new_class(tmp_path, monkeypatch):
    """A sweep rewrote its algorithm file between train() calls and ran the first class
    again (its model file was read anew), while config.json named the rewritten file."""
    monkeypatch.chdir(tmp_path)
    body = "class Mine(Algorithm):\n    name = 'mine'\n    VERSION = {}\n"
    path = own(tmp_path, body.format(1), "mine.py")
    assert registry.get(f"{path}:Mine").VERSION == 1
    assert registry.get("./mine.py:Mine") is registry.get(f"{path}:Mine")
    own(tmp_path, body.format(22), "mine.py")
    new = registry.get("./mine.py:Mine")  # not refused as another class of that name
    assert new.VERSION == 22 and registry.get(f"{path}:Mine") is new
    assert [cls for cls in registry.known().values() if cls.name == "mine"] == [new]


def test_a_module_the_user_imported_is_the_class_its_file_names(tmp_path, monkeypatch):
    """``from mine import Mine`` (from PYTHONPATH) and ``./plug/mine.py:Mine`` were refused as
    two algorithms of one name ("choose another")."""
    (tmp_path / "plug").mkdir()
    own(tmp_path / "plug", "class Mine(Algorithm):\n    name = 'mine-imported'\n",
        "mine_imported.py")
    monkeypatch.syspath_prepend(str(tmp_path / "plug"))
    import mine_imported

    try:
        assert registry.get("mine_imported:Mine") is mine_imported.Mine
        assert registry.get(f"{tmp_path / 'plug' / 'mine_imported.py'}:Mine") \
            is mine_imported.Mine
    finally:
        del sys.modules["mine_imported"]


def test_a_user_algorithms_bad_option_names_its_field_from_python_and_its_flag_typed(tmp_path):
    """A user trial: ``algorithm_options(TopK)(keep_frac="x")`` was refused naming the flag
    --keep-frac and advising on a config file's quotes, neither of which the Python caller
    had; the command line's refusal is as it was."""
    import hpctrain

    path = own(tmp_path, """
        from hpctrain.options import Range

        @dataclass(frozen=True)
        class KOptions(Options):
            keep_frac: float = option(0.1, "fraction kept", range=Range(0, 1, low_open=True))

        class K(Algorithm):
            name = "keep-k"
            Options = KOptions
        """)
    cls = registry.get(f"{path}:K")
    with pytest.raises(UsageError) as refused:
        hpctrain.algorithm_options(cls)(keep_frac="x")
    assert str(refused.value) == "KOptions.keep_frac='x' must be a number, not a string"
    with pytest.raises(UsageError) as refused:
        RunConfig(algo=cls, algorithm=hpctrain.algorithm_options(cls)(keep_frac=2))
    assert str(refused.value) == "KOptions.keep_frac=2 must be in (0, 1]"
    file = tmp_path / "run.toml"
    file.write_text(f'algo = "{path}:K"\n[algorithm]\nkeep_frac = "x"\n')
    assert refusal(["--config", str(file)]) == ("--keep-frac 'x' must be a number, not a string "
                                                "(in a config file, write it without quotes)")
    assert refusal(["--algo", f"{path}:K", "--keep-frac", "2"]) == \
        "--keep-frac 2.0 must be in (0, 1]"


def test_the_examples_resize_gives_new_workers_a_momentum_and_no_votes_sent(capsys):
    """The default rule copied a worker's byte count to the new ones (and warned of it)."""
    cls = registry.get(SIGNUM)
    parts = [{"worker": {"buffers": [torch.full((2,), float(k))], "sent": 100 * (k + 1)}}
             for k in range(2)]
    grown = cls.resize_state(object.__new__(cls), parts, 3, position=10)
    assert [p["worker"]["sent"] for p in grown] == [100, 200, 0]
    assert [p["worker"]["buffers"][0][0].item() for p in grown] == [0.0, 1.0, 0.0]
    shrunk = cls.resize_state(object.__new__(cls), parts, 1, position=10)
    assert shrunk == [parts[0]] and capsys.readouterr().err == ""


def test_an_option_is_its_class_s_under_any_spelling_of_the_class(tmp_path, monkeypatch):
    """A user trial: one process (a test file, run_commands' launch) that loaded the class as
    ``./mine.py:Mine`` (or imported it, ``mine:Mine``) refused ``--algo /abs/mine.py:Mine
    --every 2``: "--every is an option of ./mine.py:Mine, not of --algo /abs/mine.py:Mine"
    (the owners were compared by spelling, not by class)."""
    path = own(tmp_path, """
        @dataclass(frozen=True)
        class EveryOptions(Options):
            every: int = option(1, "sync every k steps")

        class Mine(Algorithm):
            name = "mine-spelt"
            Options = EveryOptions
        """, "mine_spelt.py")
    monkeypatch.chdir(tmp_path)
    for spelt in ("./mine_spelt.py:Mine", f"{path}:Mine"):
        registry.get(spelt)  # as the command line loads it before parsing
        parser = compare_arguments._train_parser()
        config = arguments.build(parser.parse_args(["--algo", spelt, "--every", "2"]))
        assert config.algorithm.every == 2
    with pytest.raises(UsageError, match="--every is an option of ./mine_spelt.py:Mine, not of "
                                         "--algo ssgd"):
        arguments.build(parser.parse_args(["--algo", "ssgd", "--every", "2"]))
    d = next(d for d in arguments.algorithm_options() if d.flag == "--every")
    every = compare_arguments.TrainOption(d.flag, d.dest, d.takes_value, d.owners)
    assert [every.given_to(a) for a in ("./mine_spelt.py:Mine", f"{path}:Mine", "ssgd")] == \
        [True, True, False]  # bench compare passed it to the first spelling alone


def test_readmes_single_process_test_of_an_algorithm_runs(tmp_path, monkeypatch):
    """README's "An algorithm of your own" shows how to test one in one process: its snippet,
    run as written on a ``mine.py`` of one option (it failed at ``main``: the class imported
    as ``mine:Mine`` made ``--every`` another algorithm's than ``./mine.py:Mine``'s)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## An algorithm of your own\n"):]
    start = section.index("```python\n") + len("```python\n")
    snippet = section[start:section.index("```", start)]
    own(tmp_path, """
        @dataclass(frozen=True)
        class MineOptions(Options):
            every: int = option(1, "sync every k steps")

        class Mine(Algorithm):
            name = "mine-readme"
            Options = MineOptions
            summary_fields = {"every_taken": "its --every"}

            def summary(self, points, comm):
                return {"every_taken": self.options.every}
        """, "mine.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mine", raising=False)
    scope: dict = {}
    try:
        exec(compile(snippet, "README.md", "exec"), scope)
    finally:
        sys.modules.pop("mine", None)
    assert scope["summary"]["every_taken"] == 2
    simulated = json.loads((tmp_path / "runs" / "t2" / "summary.json").read_text())
    assert simulated["workers"] == 2 and simulated["every_taken"] == 2
