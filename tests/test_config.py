"""The run configuration, the algorithm registry, the summary schema and the import graph:
one process, no MPI."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import textwrap
import typing
from pathlib import Path

import pytest
from conftest import ROOT

import hpctrain
from hpctrain import arguments, cli, options, registry, summary
from hpctrain import config as configs
from hpctrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from hpctrain.errors import UsageError
from hpctrain.stragglers import Straggler

pytestmark = pytest.mark.unit


def _train_parser():
    """``hpctrain train``'s own parser, as the command line builds it."""
    return cli.build_parser()._subparsers._group_actions[0].choices["train"]


def _action(flag: str):
    """``hpctrain train``'s argparse action of ``flag``: its help as ``--help`` shows it."""
    return next(a for a in _train_parser()._actions if flag in a.option_strings)


def parse(*argv: str):
    return arguments.build(cli.build_parser().parse_args(["train", *argv]))


def test_python_toml_and_command_line_give_the_same_configuration(tmp_path):
    toml = tmp_path / "run.toml"
    # Whole numbers written as floats (seed = 3.0, tau = 7e0) read as the flags' 3 and 7 do.
    toml.write_text('algo = "ec"\nseed = 3.0\n[optim]\nlr = 0.2\nlr_milestones = [1, 2]\n'
                    '[algorithm]\ntau = 7e0\nec_alpha = 0.25\n')
    from_file = parse("--config", str(toml))
    from_flags = parse("--algo", "ec", "--seed", "3", "--lr", "0.2", "--lr-milestones", "1,2",
                       "--tau", "7", "--ec-alpha", "0.25")
    ec = registry.get("ec")
    from_python = RunConfig(algo="ec", seed=3, optim=OptimConfig(lr=0.2, lr_milestones=(1, 2)),
                            algorithm=ec.Options(tau=7, ec_alpha=0.25))
    assert from_file == from_flags == from_python
    assert type(from_file.seed) is int and type(from_file.algorithm.tau) is int


def test_flags_override_the_file_and_config_json_repeats_a_run(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('algo = "ssgd"\n[optim]\nlr = 0.2\nepochs = 2\n')
    config = parse("--config", str(toml), "--lr", "0.3")
    assert (config.optim.lr, config.optim.epochs) == (0.3, 2)
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({**configs.repeatable(configs.resolve(config)),
                                 "run_info": {"workers": 2}}))
    again = configs.load(saved)
    assert again == configs.resolve(config)


def test_a_run_repeated_with_another_algorithm_takes_that_algorithms_defaults(tmp_path, capsys):
    """config.json holds the rates a run resolved: ``--config sgd-run/config.json --algo
    asgd`` trained asgd with sgd's lr 0.05 and momentum 0.9, and ``--optimizer adam`` was
    refused for sgd's momentum. Values the user chose (other than the defaults) stay."""
    def run_json(*argv: str) -> str:
        saved = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
        saved.write_text(json.dumps({**configs.repeatable(configs.resolve(parse(*argv))),
                                     "run_info": {"workers": 2}}))
        return str(saved)

    sgd = run_json("--algo", "sgd")
    asgd = configs.resolve(parse("--config", sgd, "--algo", "asgd")).optim
    assert (asgd.lr, asgd.momentum) == (0.1, 0.0)
    assert "lr 0.1, momentum 0.0 by default" in capsys.readouterr().out
    adam = configs.resolve(parse("--config", sgd, "--optimizer", "adam")).optim
    assert (adam.lr, adam.momentum) == (0.001, None)
    step = configs.resolve(parse("--config", sgd, "--lr-milestones", "2,4")).optim
    assert step.lr_schedule == "step"
    capsys.readouterr()
    # The same algorithm, or a value the user chose: the file's values, said nowhere.
    assert configs.resolve(parse("--config", sgd)) == configs.resolve(parse("--algo", "sgd"))
    chosen = run_json("--algo", "sgd", "--lr", "0.2", "--momentum", "0.5")
    kept = configs.resolve(parse("--config", chosen, "--algo", "asgd")).optim
    assert (kept.lr, kept.momentum) == (0.2, 0.5)
    assert capsys.readouterr().out == ""
    # A TOML file's rate is the user's even when it equals a default.
    toml = tmp_path / "run.toml"
    toml.write_text('algo = "sgd"\n[optim]\nlr = 0.05\n')
    assert configs.resolve(parse("--config", str(toml), "--algo", "asgd")).optim.lr == 0.05


def test_another_algorithm_keeps_the_files_options_it_has_too(tmp_path, capsys):
    """``--config asgd.toml --algo ssp`` dropped the whole [algorithm] table without a word:
    the store's consistency (an option of both) went back to locked."""
    toml = tmp_path / "run.toml"
    toml.write_text('algo = "dcasgd-a"\n[algorithm]\nconsistency = "atomic"\nlam = 1.5\n'
                    'ms_decay = 0.95\n')
    ssp = parse("--config", str(toml), "--algo", "ssp").algorithm
    assert ssp.consistency == "atomic" and not hasattr(ssp, "lam")
    said = f"hpctrain: --algo {{}}: of {toml}'s [algorithm] (for dcasgd-a), {{}}\n"
    # Set otherwise than the default: said, kept or not (ms_decay, at its default, is not).
    assert capsys.readouterr().out == said.format("ssp", "keeping consistency atomic; "
                                                  "leaving out lam 1.5")
    dcasgd = parse("--config", str(toml), "--algo", "dcasgd-c").algorithm
    assert (dcasgd.consistency, dcasgd.lam) == ("atomic", 1.5)
    assert capsys.readouterr().out == said.format("dcasgd-c", "keeping consistency atomic, "
                                                  "lam 1.5")
    assert parse("--config", str(toml), "--algo", "ssgd").algorithm == \
        registry.get("ssgd").Options()
    assert "leaving out consistency atomic, lam 1.5" in capsys.readouterr().out
    # A key neither knows is refused, as under the file's own algorithm; a file whose
    # algorithm cannot be loaded keeps what the new one has.
    toml.write_text('algo = "asgd"\n[algorithm]\nconsistncy = "atomic"\n')
    with pytest.raises(UsageError, match="unknown configuration key algorithm.consistncy$"):
        parse("--config", str(toml), "--algo", "ssp")
    toml.write_text('algo = "./gone.py:Gone"\n[algorithm]\nconsistency = "atomic"\nx = 1\n')
    assert parse("--config", str(toml), "--algo", "ssp").algorithm.consistency == "atomic"
    assert capsys.readouterr().out == said.format(
        "ssp", "keeping consistency atomic; leaving out x 1").replace(
        "(for dcasgd-a)", "(for ./gone.py:Gone, which cannot be loaded: --algo: no file "
        "./gone.py)")
    # A damaged file is refused as under its own algorithm: no name, no table.
    for text, message in (('algo = 5\n[algorithm]\ntau = 5\n', "algo 5 must be the name of"),
                          ('algo = "ma"\nalgorithm = "tau=5"\n',
                           "configuration [algorithm] must be a table, not 'tau=5'")):
        toml.write_text(text)
        with pytest.raises(UsageError, match=re.escape(message)):
            parse("--config", str(toml), "--algo", "ec")


def test_a_piped_configuration_with_several_ranks_is_refused(monkeypatch):
    """``--config /dev/stdin`` under mpirun -np 2: rank 1 read nothing (its stdin is null)
    and said "no algorithm", or the ranks resolved different runs."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    with pytest.raises(UsageError, match="^--config /dev/null is no regular file: a pipe "
                                         "reaches rank 0 only, not the other 1; give a file$"):
        parse("--config", "/dev/null", "--algo", "ssgd")


def test_misplaced_keys_and_missing_parts_are_named_with_a_hint(tmp_path, monkeypatch):
    """``eval = "online"`` got "unknown configuration key 'eval'" and no valid key (the
    sections list theirs); --config of a folder under -np 2 "a pipe reaches rank 0 only";
    RunConfig() "unknown algorithm ''"; RunConfig(algorithm={...}) no hint how to build
    one, where the sections' dicts get one."""
    cases = {"eval": "(the key of --eval is eval_mode); the top level has the keys algo, ",
             "lr": "(its place is [optim] lr)", "tau": "its place is [algorithm] tau",
             "progres": "(progress?)"}
    for key, hint in cases.items():
        with pytest.raises(UsageError) as e:
            configs.from_dict({"algo": "sgd", key: 1})
        assert str(e.value).startswith(f"unknown configuration key '{key}' ") and \
            hint in str(e.value) and "eval_mode" in str(e.value)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    with pytest.raises(UsageError) as e:
        parse("--config", str(tmp_path))
    assert str(e.value) == (f"--config {tmp_path}: is a folder; give a TOML file or a run's "
                            f"config.json ({tmp_path / 'config.json'})")
    with pytest.raises(UsageError) as e:
        RunConfig()
    assert str(e.value) == ("RunConfig needs algo=..., the algorithm: one of "
                            f"{', '.join(registry.names())}, or your own as MODULE:CLASS, "
                            "./FILE.py:CLASS or the class itself")  # each said once
    with pytest.raises(UsageError, match=re.escape(
            "RunConfig(algo='ma', algorithm=...) takes AveragingOptions, not dict "
            "(hpctrain.algorithm_options('ma')"
            "(**...) builds one from a dict)")):
        RunConfig(algo="ma", algorithm={"tau": 5})


def test_the_chunk_size_goes_with_sharded_placement(tmp_path, capsys):
    """--shuffle-chunk-mb 16 (the default) typed with replicated data was taken, and a sharded
    run's config.json with --data-placement replicated was refused for a value never typed."""
    with pytest.raises(UsageError, match="^--shuffle-chunk-mb 16 sizes the rounds"):
        parse("--algo", "ssgd", "--shuffle-chunk-mb", "16")
    sharded = tmp_path / "config.json"
    sharded.write_text(json.dumps({"algo": "ssgd", "data": {
        "data_placement": "sharded", "shuffle_chunk_mb": 8.0}}))
    data = parse("--config", str(sharded), "--data-placement", "replicated").data
    assert (data.data_placement, data.shuffle_chunk_mb) == ("replicated", 16.0)
    assert capsys.readouterr().out == ("hpctrain: --data-placement replicated: leaving out "
                                       f"{sharded}'s shuffle_chunk_mb 8.0 (the sharded "
                                       "exchange's)\n")
    assert parse("--config", str(sharded)).data.shuffle_chunk_mb == 8.0


def test_numpy_numbers_are_taken_as_pythons():
    """README says numpy's numbers are accepted: milestones from np.arange and a checkpoint
    interval of np.int64 were refused."""
    import numpy as np

    from hpctrain.config import CheckpointConfig

    o = OptimConfig(epochs=5, lr_milestones=list(np.arange(1, 3)))
    assert o.lr_milestones == (1, 2) and all(type(v) is int for v in o.lr_milestones)
    assert OptimConfig(epochs=5, lr_milestones=np.array([1.5, 3.0], np.float32)).lr_milestones \
        == (1.5, 3.0)
    assert CheckpointConfig(every=np.int64(30)).every == CheckpointConfig(every=30).every
    json.dumps(configs.to_dict(RunConfig(algo="sgd", optim=o)))  # written as config.json is


def test_flat_records_what_each_flag_says():
    """A checkpoint's options by flag: ``no_progress`` is True for a run with --no-progress
    (it recorded the field, progress, under the flag's name: the opposite)."""
    assert configs.flat(RunConfig(algo="sgd", progress=False))["no_progress"] is True
    assert configs.flat(RunConfig(algo="sgd"))["no_progress"] is False


def test_config_json_records_the_output_folder_absolute(tmp_path, monkeypatch):
    """``--out p1`` was recorded as typed, relative, where every other path is absolute: read
    from another folder, the file named another one."""
    monkeypatch.chdir(tmp_path)
    assert configs.repeatable(RunConfig(algo="sgd", out="p1"))["out"] == str(tmp_path / "p1")
    assert configs.repeatable(RunConfig(algo="sgd"))["out"] is None


def test_every_path_option_expands_a_home_folder_alike(tmp_path, monkeypatch):
    """--model, --dataset, --data-dir and --init-from expanded ``~``, but --out,
    --checkpoint-dir and --resume (typed quoted, or a file's ``out = "~/o"``) made a folder
    named ``~`` in the working folder, which the summary printed as ``~/o``, the home's."""
    from hpctrain import launch_checks
    from hpctrain.config import CheckpointConfig

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    config = parse("--algo", "sgd", "--dataset", "synthetic", "--model", "mlp", "--out", "~/o",
                   "--checkpoint-dir", "~/ck", "--checkpoint-every", "1e", "--resume", "~/r")
    assert (config.out, config.checkpoint.dir, config.checkpoint.resume) == (
        str(home / "o"), str(home / "ck"), str(home / "r"))
    toml = tmp_path / "run.toml"
    toml.write_text('algo = "sgd"\nout = "~/x"\n')
    assert configs.load(toml).out == str(home / "x")
    assert RunConfig(algo="sgd", checkpoint=CheckpointConfig(resume="auto")).checkpoint.resume \
        == "auto"
    # A user without a home: one line naming the option, not Path.expanduser's RuntimeError
    nobody = "~hpctrain-no-such-user"
    # (from Python the field, who typed no flag: it said --out there too; then the field
    # without its value)
    with pytest.raises(UsageError, match=rf"^RunConfig.out='{nobody}/o': no home folder for "
                                         rf"{nobody}$"):
        RunConfig(algo="sgd", out=f"{nobody}/o")
    long = f"{nobody}/" + "b" * 400  # its start and end, as the command line's words show it
    with pytest.raises(UsageError) as refused:
        RunConfig(algo="sgd", out=long)
    assert str(refused.value) == (f"RunConfig.out={long[:100]!r}...{long[-50:]!r} "
                                  f"({len(long)} bytes): no home folder for {nobody}")
    with pytest.raises(UsageError) as refused, options.command_line():
        RunConfig(algo="sgd", out=long)
    assert str(refused.value) == (f"--out {long[:100]}...{long[-50:]} ({len(long)} bytes): no "
                                  f"home folder for {nobody}")
    with pytest.raises(UsageError, match=rf"^--out {nobody}/o: no home folder for {nobody}$"):
        parse("--algo", "sgd", "--out", f"{nobody}/o")
    for flags, field in ((["--init-from", f"{nobody}/w.pt"], "ModelConfig.init_from"),
                         (["--model", f"{nobody}/m.py:Net"], "ModelConfig.name")):
        config = parse("--algo", "sgd", "--dataset", "synthetic", "--model", "mlp", *flags)
        with pytest.raises(UsageError, match=rf"^{flags[0]} {nobody}/.*: no home folder for "), \
                options.command_line():
            launch_checks.check_launch(config, 1)
        with pytest.raises(UsageError, match=rf"^{field}: no home folder for {nobody}$"):
            launch_checks.check_launch(config, 1)
    for name in ("dir", "resume"):  # their whole value, as RunConfig.out's
        with pytest.raises(UsageError, match=rf"^CheckpointConfig.{name}='{nobody}/c': no "
                                             rf"home folder for {nobody}$"):
            CheckpointConfig(**{name: f"{nobody}/c"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.toml"]  # no ~ made here


def test_config_json_leaves_out_the_checkpoint_folder_a_resume_chose():
    """Resumed into another --out, a run writes its checkpoints beside the ones it resumed
    (the folder check_launch resolves); config.json recorded that folder as if given, and a
    repeat from it was refused as another run's checkpoints, or wrote into them."""
    from hpctrain.config import CheckpointConfig

    def recorded(dir, resume):
        config = RunConfig(algo="sgd", out="runs/z", checkpoint=CheckpointConfig(
            every="1e", dir=dir, resume=resume))
        return configs.repeatable(config)["checkpoint"]["dir"]

    assert recorded("runs/x/checkpoints", "runs/x/checkpoints") is None
    assert recorded("runs/z/checkpoints", None) is None
    # Given: left out too, a repeat writes its own (the run's held its checkpoints, and a
    # repeat from config.json was refused as "holds another run's checkpoints").
    assert recorded("/scratch/ck", "runs/x/checkpoints") is None
    assert recorded("/scratch/ck", None) is None


@pytest.mark.parametrize("build, message", [
    (lambda: RunConfig(algo="nope"), "unknown algorithm 'nope'"),
    (lambda: RunConfig(algo="sgd", optim=OptimConfig(momentum=1.5)),
     "OptimConfig.momentum=1.5 must be in [0, 1)"),
    (lambda: RunConfig(algo="sgd", optim=OptimConfig(lr=0.0)),
     "OptimConfig.lr=0.0 must be in (0, 1e+06]"),
    (lambda: RunConfig(algo="sgd", stall_timeout=-1.0),
     "RunConfig.stall_timeout=-1.0 must be >= 0"),
    # Accepted, and the rate never got past 4% of --lr. (The refusal once said the rate
    # "would never reach --lr": under the default cosine no warm-up ever does.)
    (lambda: RunConfig(algo="sgd", optim=OptimConfig(epochs=2, warmup_epochs=50)),
     "OptimConfig.warmup_epochs=50 is not below OptimConfig.epochs=2: the run would end "
     "before its warm-up does"),
    (lambda: RunConfig(algo="sgd", out=""), "RunConfig.out='' is empty"),  # not the working folder
    # In range once overflowed at the first step, in float32 or as a whole number.
    (lambda: RunConfig(algo="sgd", optim=OptimConfig(lr=1e308)),
     "OptimConfig.lr=1e+308 must be in (0, 1e+06]"),
    (lambda: RunConfig(algo="sgd", eval_every=1e308),
     "RunConfig.eval_every=1e+308 must be in (0, 1e+06]"),
    (lambda: RunConfig(algo="sgd", threads=10 ** 308),
     "RunConfig.threads=1e+308 must be in [1, 4096]"),
    # Past 2^62 updates an asynchronous run's tickets would read as closed (checkpoint.stop).
    (lambda: RunConfig(algo="asgd", optim=OptimConfig(epochs=10 ** 300)),
     "OptimConfig.epochs=1e+300 must be in (0, 1e+06]"),
    # Types, as a config file or a Python caller may get them wrong.
    (lambda: RunConfig(algo="sgd", optim=OptimConfig(epochs="5")),
     "OptimConfig.epochs='5' must be a whole number, not a string"),
    (lambda: RunConfig(algo="sgd", threads=1.5), "RunConfig.threads=1.5 must be a whole number"),
    (lambda: RunConfig(algo="sgd", seed=True), "RunConfig.seed=True must be a whole number"),
    (lambda: RunConfig(algo="sgd", optim=OptimConfig(momentum="0.5")),
     "OptimConfig.momentum='0.5' must be a number"),
    (lambda: RunConfig(algo="sgd", tensorboard="no"),
     "RunConfig.tensorboard='no' must be true or false"),
    (lambda: RunConfig(algo="sgd", threads=None), "RunConfig.threads=None needs a value"),
    (lambda: hpctrain.train("sgd"), "hpctrain.train takes a RunConfig"),
    (lambda: RunConfig(algo="ma", algorithm=registry.get("ma").Options(tau=0)),
     "AveragingOptions.tau=0 must be >= 1"),
    (lambda: RunConfig(algo="ma", algorithm=registry.get("ec").Options()),
     "RunConfig(algo='ma', algorithm=...) takes AveragingOptions, not CompressionOptions"),
    (lambda: configs.from_dict({"algo": "sgd", "optim": {"lrr": 1}}),
     "unknown configuration key optim.lrr"),
    # A file's messages: "algorithm has: " (no list) for sgd, and the flag for a key
    (lambda: configs.from_dict({"algo": "sgd", "algorithm": {"tau": 5}}),
     "algorithm.tau is an option of ma, ec, not of algo sgd"),
    (lambda: configs.from_dict({"algo": "sgd", "algorithm": {"taux": 5}}),
     "unknown configuration key algorithm.taux; algorithm has no keys"),
    (lambda: configs.from_dict({"algo": "ma", "algorithm": {"taux": 5}}),
     "unknown configuration key algorithm.taux; algorithm has the keys tau, tau_epochs"),
    (lambda: configs.from_dict({"algo": "sgd", "progress": "false"}),
     "RunConfig.progress='false' must be true or false"),
])
def test_library_raises_value_errors_naming_the_value(build, message):
    # README: a sweep catches ValueError (train(), given no RunConfig at all: TypeError)
    with pytest.raises(TypeError if "train takes" in message else ValueError) as e:
        build()
    assert message in str(e.value)


def test_an_option_of_another_algorithm_is_refused():
    with pytest.raises(UsageError, match="--ec-alpha is an option of ec, not of --algo ma"):
        parse("--algo", "ma", "--ec-alpha", "0.3")
    with pytest.raises(UsageError, match="--lam is an option of dcasgd-c, dcasgd-a, not of"):
        parse("--algo", "asgd", "--lam", "0.1")


def test_help_lists_every_algorithms_options_from_the_registry():
    text = _train_parser().format_help()
    for cls in registry.ALGORITHMS.values():
        assert cls.name in text
        for f in dataclasses.fields(cls.Options):
            assert "--" + f.name.replace("_", "-") in text


def test_resolve_fills_the_algorithms_defaults():
    assert configs.resolve(RunConfig(algo="asgd")).optim.lr == 0.1
    assert configs.resolve(RunConfig(algo="ssgd")).optim.momentum == 0.9
    assert configs.resolve(RunConfig(algo="sgd", optim=OptimConfig(lr_milestones=(3,)))) \
        .optim.lr_schedule == "step"


def test_summary_schema_is_documented_whole():
    common = {f.name for f in dataclasses.fields(summary.RunSummary)} - {"algorithm_fields"}
    assert common == set(summary.COMMON_FIELDS)
    doc = (ROOT / "docs" / "SUMMARY.md").read_text()
    assert doc == summary.markdown(registry.ALGORITHMS.values()), \
        "docs/SUMMARY.md is stale: python -m hpctrain.summary > docs/SUMMARY.md"


def test_summary_round_trips_and_refuses_shadowed_fields():
    fields = {f.name: 0 for f in dataclasses.fields(summary.RunSummary)
              if f.name not in ("algorithm_fields", "simulated")}
    record = summary.RunSummary(**fields, algorithm_fields={"tau": 5})
    assert summary.RunSummary.from_dict(record.to_dict()) == record
    with pytest.raises(ValueError, match="shadow"):
        summary.RunSummary(**fields, algorithm_fields={"workers": 1}).to_dict()


def test_the_typed_summary_train_returns_is_the_summarys_schema():
    """``hpctrain.train`` returns a plain dict typed as ``hpctrain.Summary``: the keys every
    run has are RunSummary's fields, in order, with their types; the NotRequired ones are
    the built-in algorithms' own (a dotted summary field lies inside its table)."""
    typed = typing.get_type_hints(hpctrain.Summary)
    held = typing.get_type_hints(summary.RunSummary)
    del held["algorithm_fields"]
    assert hpctrain.Summary.__required_keys__ == set(held)
    assert {k: typed[k] for k in held} == held and list(typed)[:len(held)] == list(held)
    own = {k for cls in registry.ALGORITHMS.values() for k in cls.summary_fields if "." not in k}
    assert hpctrain.Summary.__optional_keys__ == own
    assert typing.get_type_hints(hpctrain.train)["return"] is hpctrain.Summary


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The hpctrain modules ``path`` imports at module level (imports inside functions are
    deliberate and lazy: MPI's thread level, optional packages; TYPE_CHECKING ones are for
    type hints only)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # `from pkg import mod` imports pkg.mod, else pkg itself
                name = f"{node.module}.{a.name}"
                found.add(name if name in modules else node.module)
    return {m for m in found if m in modules}


def _module_graph() -> dict[str, set[str]]:
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "hpctrain").rglob("*.py")}
    return {m: _imports(p, set(files)) - {m} for m, p in files.items()}


def _entry_points(graph) -> set[str]:
    return {"hpctrain.cli", "hpctrain.__main__", "hpctrain.arguments",
            "hpctrain.sim.arguments"} | {m for m in graph if m.startswith("hpctrain.bench")}


def test_nothing_below_the_entry_points_takes_a_namespace():
    """Below the command lines, configuration is typed: no function names argparse's
    Namespace (``hpctrain horovodrun``, a command of its own, and its settings do)."""
    graph = _module_graph()
    below = set(graph) - _entry_points(graph) - {"hpctrain.horovodrun",
                                                 "hpctrain.horovod_settings"}
    for module in below:
        path = ROOT / (module.replace(".", "/") + ".py")
        path = path if path.exists() else path.with_suffix("") / "__init__.py"
        names = {n.attr if isinstance(n, ast.Attribute) else n.id
                 for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, (ast.Attribute, ast.Name))}
        assert "Namespace" not in names, module


def test_import_graph_has_no_cycle_and_the_library_imports_no_entry_point():
    graph = _module_graph()
    entry = _entry_points(graph)
    for module, deps in graph.items():
        if module not in entry:
            assert not deps & entry, f"{module} imports {deps & entry}"
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path, m, d]))
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


# DESIGN §1's layers above the libraries, top first; a name covers its package's modules, and
# a module takes the first row that covers it. Every module not covered here is a library.
_LAYERS = {
    "entry point": ("hpctrain.cli", "hpctrain.__main__", "hpctrain.arguments",
                    "hpctrain.sim.arguments", "hpctrain.bench", "hpctrain.horovodrun",
                    "hpctrain.horovod_settings", "hpctrain.mpirun", "hpctrain.ec.plot",
                    "hpctrain.shuffle.plot"),
    "simulator": ("hpctrain.sim",),
    "run": ("hpctrain.run", "hpctrain.launch_checks", "hpctrain.run_folders",
            "hpctrain.runtime", "hpctrain.steptimes", "hpctrain.config", "hpctrain.registry",
            "hpctrain.algorithm", "hpctrain.summary", "hpctrain.result", "hpctrain.live",
            "hpctrain.sync.algorithm", "hpctrain.ec.algorithm", "hpctrain.async_.algorithm"),
}


def _layer(module: str) -> str:
    for layer, names in _LAYERS.items():
        if any(module == name or module.startswith(name + ".") for name in names):
            return layer
    return "library"


def test_the_libraries_import_nothing_of_the_run_or_the_entry_points():
    """Imports go down only (DESIGN §1): no library module imports one of the run layer, the
    simulator or the entry points at module level."""
    graph = _module_graph()
    assert all(name in graph for names in _LAYERS.values() for name in names)  # no stale row
    upward = {(module, d) for module, deps in graph.items() if _layer(module) == "library"
              for d in deps if _layer(d) != "library"}
    assert not upward, "library modules import from above: " + ", ".join(
        f"{m} -> {d} ({_layer(d)})" for m, d in sorted(upward))


def test_the_libraries_import_each_other_only_for_the_seeded_generator():
    """The library parts of sync/, ec/, async_/ and shuffle/ (all but each <pkg>/algorithm.py,
    the run layer's adapter) import none of the others, but ec.compression takes
    shuffle.order.generator (DESIGN §1)."""
    packages = ("sync", "ec", "async_", "shuffle")
    allowed = {("hpctrain.ec.compression", "hpctrain.shuffle.order")}

    def package(m: str) -> str | None:
        parts = m.split(".")
        return parts[1] if len(parts) > 1 and parts[1] in packages else None

    found = set()
    for module, deps in _module_graph().items():
        if package(module) and not module.endswith(".algorithm"):
            found |= {(module, d) for d in deps if package(d) not in (None, package(module))}
    assert found == allowed


@pytest.mark.parametrize("build, message", [
    # Nested configurations: their own classes, not dicts, lists or None.
    (lambda: RunConfig(algo="sgd", optim={"lr": 0.1}),
     "RunConfig(optim=...) takes OptimConfig, not dict (OptimConfig(**...) builds one"),
    (lambda: RunConfig(algo="sgd", data=None),
     "RunConfig(data=...) takes DataConfig, not NoneType"),
    (lambda: RunConfig(algo="sgd", checkpoint=[1]), "takes CheckpointConfig, not list"),
    (lambda: dataclasses.replace(RunConfig(algo="sgd"), stragglers=OptimConfig()),
     "RunConfig(stragglers=...) takes StragglerConfig, not OptimConfig"),
    (lambda: RunConfig(algo=["sgd"]),
     "RunConfig.algo=['sgd'] must be a string; choose from sgd, "),
    # Whole numbers past a float's range, and seeds past torch's 64 bits.
    (lambda: OptimConfig(epochs=10 ** 400), "OptimConfig.epochs=1e+400 is too large"),
    (lambda: OptimConfig(lr=10 ** 400), "OptimConfig.lr=1e+400 is too large"),
    (lambda: RunConfig(algo="sgd", seed=2 ** 64 - 1),
     "must be in [-9223372036854775808, 9223372036854775807]"),
    (lambda: OptimConfig(micro_batch_size=10 ** 300),
     "OptimConfig.micro_batch_size=1e+300 exceeds OptimConfig.batch_size=64"),
    # --lr-milestones: a list of finite epochs.
    (lambda: OptimConfig(lr_milestones=None),
     "OptimConfig.lr_milestones=None must be a list of epochs"),
    (lambda: OptimConfig(lr_milestones="3,4"),
     "OptimConfig.lr_milestones='3,4' must be a list of epochs"),
    (lambda: OptimConfig(lr_milestones=[1, "a"]),
     "OptimConfig.lr_milestones=[1, 'a']: 'a' is not a number"),
    (lambda: OptimConfig(lr_milestones=[True]), "True is not a number of epochs"),
    (lambda: OptimConfig(lr_milestones=[1, float("inf")]),
     "OptimConfig.lr_milestones=(1, inf): milestones must be increasing finite epochs > 0"),
    (lambda: OptimConfig(epochs=4, lr_milestones=[2, 4]),  # the run ends before epoch 4
     "OptimConfig.lr_milestones=(2, 4): 4 is not before OptimConfig.epochs=4, so the rate "
     "never changes there"),
    (lambda: OptimConfig(lr_milestones=[3, 3]),  # gamma applied twice at epoch 3
     "OptimConfig.lr_milestones=(3, 3): milestones must be increasing"),
    (lambda: hpctrain.algorithm_options(["ma"]), "unknown algorithm ['ma']; choose from sgd"),
    (lambda: configs.DataConfig(data_dir=""), "DataConfig.data_dir='' is empty: give a folder"),
    # Checkpoint folders: strings, not empty (the working folder).
    (lambda: configs.CheckpointConfig(dir=3), "CheckpointConfig.dir=3 must be a string"),
    (lambda: configs.CheckpointConfig(resume=""),
     "CheckpointConfig.resume='' is empty: give a folder"),
    (lambda: configs.CheckpointConfig(dir=" "), "CheckpointConfig.dir=' ' is empty"),
    (lambda: configs.CheckpointConfig(every=True),
     "CheckpointConfig.every=True must be seconds"),
    # --model-args: what config.json can record and a model can take by name.
    (lambda: configs.ModelConfig(name="m:build", args={1: 2}), "--model-args: key 1 is not a"),
    (lambda: configs.ModelConfig(name="m:build", args={"w": object()}),
     "--model-args: not JSON-able"),
    # load_config takes a path.
    (lambda: hpctrain.load_config({"algo": "sgd"}),
     "hpctrain.load_config takes a file's path, not dict"),
    (lambda: hpctrain.load_config(None), "hpctrain.load_config takes a file's path, not NoneType"),
    (lambda: hpctrain.load_config(""), "--config '' is empty"),
])
def test_wrong_types_and_sizes_are_value_or_type_errors(build, message):
    with pytest.raises((ValueError, TypeError)) as e:
        build()
    assert message in str(e.value)


def test_numpy_numbers_and_paths_are_taken_as_plain_values(tmp_path):
    """A sweep's np.int64 was refused as "--batch-size np.int64(32) must be a whole number",
    np.float32 as no number, and a pathlib.Path as no string; each is now the plain value,
    which config.json records."""
    import numpy as np

    config = RunConfig(algo="ma", seed=np.int64(3), out=tmp_path / "run",
                       optim=OptimConfig(batch_size=np.int32(32), lr=np.float32(0.5),
                                         weight_decay=np.float64(0.25), epochs=np.uint8(2)),
                       data=configs.DataConfig(data_dir=tmp_path),
                       checkpoint=configs.CheckpointConfig(resume=tmp_path / "old"),
                       algorithm=hpctrain.algorithm_options("ma")(tau=np.int64(4)))
    o = config.optim
    values = (config.seed, o.batch_size, o.epochs, o.lr, o.weight_decay, config.algorithm.tau,
              config.out, config.data.data_dir, config.checkpoint.resume)
    assert values == (3, 32, 2, 0.5, 0.25, 4, str(tmp_path / "run"), str(tmp_path),
                      str(tmp_path / "old"))
    assert [type(v) for v in values] == [int] * 3 + [float] * 2 + [int] + [str] * 3
    assert configs.from_dict(json.loads(json.dumps(configs.to_dict(config)))) == config
    # And where README said so but they were refused: a model's arguments, a bool, a
    # reference given as a path.
    own = tmp_path / "own.py"
    own.write_text("def build(input_shape, num_classes, width=4, sizes=()):\n    pass\n")
    model = configs.ModelConfig(name=Path(f"{own}:build"),
                                args={"width": np.int64(8), "sizes": [np.float32(0.5)]})
    assert model.name == f"{own}:build" and model.args == {"width": 8, "sizes": [0.5]}
    assert type(model.args["width"]) is int and type(model.args["sizes"][0]) is float
    assert RunConfig(algo="sgd", tensorboard=np.bool_(True)).tensorboard is True
    for bad, message in ((lambda: RunConfig(algo="sgd", seed=np.bool_(True)),
                          r"^RunConfig\.seed=.*True.* must be a whole number$"),
                         (lambda: OptimConfig(epochs=np.float64(1.5)),
                          r"^OptimConfig\.epochs=.*1.5.* must be a whole number$"),
                         (lambda: OptimConfig(lr=np.float64("nan")),
                          r"^OptimConfig\.lr=nan must be in")):
        with pytest.raises(UsageError, match=message):
            bad()


def test_an_int_past_64_bits_for_a_float_field_is_the_float_it_stands_for():
    """A JSON --config's (or Python's) ``clip_grad_norm`` of 10**30 stayed a Python int, which
    the clipping compared with the gradient's norm tensor: torch's "int too big to convert",
    exit 1 mid-run; the command line's --clip-grad-norm 1e30 was a float and trained. Ints
    within 64 bits stay as given; one past float's range is refused."""
    import torch

    for config in (OptimConfig(clip_grad_norm=10 ** 30),
                   configs.from_dict({"algo": "sgd", "optim": {"clip_grad_norm": 10 ** 30}}).optim):
        assert type(config.clip_grad_norm) is float and config.clip_grad_norm == 1e30
        assert not bool(torch.tensor(5.0) > config.clip_grad_norm)  # as guard's clipping
    assert type(OptimConfig(clip_grad_norm=3).clip_grad_norm) is int  # refusals show 3
    with pytest.raises(UsageError, match=r"^OptimConfig\.clip_grad_norm=.* is too large$"):
        OptimConfig(clip_grad_norm=10 ** 400)


def test_a_field_typed_with_what_a_caller_may_give_is_checked_as_the_string_it_holds():
    """The annotations name what a Python caller may give (``out: str | os.PathLike[str] |
    None``, ``algo: str | type[Algorithm]``, a model's function): the checks and the flags
    read the type the field holds, a string, as when they were annotated ``str``."""
    held = {f"{cls.__name__}.{f.name}": options._declared_type(f)
            for cls in (RunConfig, *configs.SECTIONS.values()) for f in dataclasses.fields(cls)}
    assert {key: held[key] for key in ("RunConfig.algo", "RunConfig.out", "DataConfig.dataset",
                                       "DataConfig.data_dir", "ModelConfig.name",
                                       "CheckpointConfig.resume")} == {
        "RunConfig.algo": "str", "RunConfig.out": "str | None", "DataConfig.dataset": "str",
        "DataConfig.data_dir": "str | None", "ModelConfig.name": "str",
        "CheckpointConfig.resume": "str | None"}
    with pytest.raises(UsageError, match=r"^RunConfig\.out=3 must be a string$"):
        RunConfig(algo="sgd", out=3)
    with pytest.raises(UsageError, match=r"^CheckpointConfig\.dir=3 must be a string$"):
        configs.CheckpointConfig(dir=3)
    for cls in (RunConfig, *configs.SECTIONS.values()):  # their names resolve at run time
        typing.get_type_hints(cls)


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("name, text, message", [
    ("algo.toml", 'algo = {a = 1}\n', "algo {'a': 1} must be a string; choose from sgd"),
    ("algo.json", '{"algo": ["sgd"]}', "algo ['sgd'] must be a string"),
    ("dir.toml", 'algo = "sgd"\n[checkpoint]\ndir = 3\n', "--checkpoint-dir 3 must be a string"),
    ("resume.toml", 'algo = "sgd"\n[checkpoint]\nresume = ["a"]\n',
     "--resume ['a'] must be a string"),
    ("ms.toml", 'algo = "sgd"\n[optim]\nlr_milestones = "3,4"\n',
     "--lr-milestones '3,4' must be a list of epochs"),
    ("ms.json", '{"algo": "sgd", "optim": {"lr_milestones": null}}',
     "--lr-milestones None must be a list of epochs"),
    ("algorithm.toml", 'algo = "ma"\nalgorithm = false\n',
     "configuration [algorithm] must be a table, not False"),
    ("deep.json", DEEP, "nested too deeply to be settings"),
    ("twice.json", '{"algo": "sgd", "algo": "ssgd"}', "not valid JSON (key 'algo' given twice)"),
    ("conf.yaml", 'algo: sgd\n', "conf.yaml: YAML is not read; give a TOML file or a run's"),
    ("conf.cfg", 'algo: sgd\n', "conf.cfg: not valid TOML (Expected '=' after a key"),
    ("big.json", '{"algo": "sgd", "optim": {"epochs": 1' + "0" * 400 + "}}",
     "--epochs 1e+400 is too large"),
    ("seed.toml", 'algo = "sgd"\nseed = 18446744073709551615\n',
     "--seed 18446744073709551615 must be in"),
])
def test_bad_config_files_are_one_line_naming_the_value(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(UsageError) as e:
        parse("--config", str(tmp_path / name))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text, typed, message", [
    ('algo = "sgd"\noptim = 3\n', ("--epochs", "1"), "[optim] must be a table, not 3"),
    ('algo = "ma"\nalgorithm = false\n', ("--tau", "5"),
     "[algorithm] must be a table, not False"),
])
def test_a_files_bad_table_is_refused_also_where_an_option_of_it_is_typed(
        tmp_path, text, typed, message):
    """The typed option's table took the file's value's place, and the run went on."""
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)):
        parse("--config", str(tmp_path / "bad.toml"), *typed)


def test_a_toml_file_may_start_with_a_byte_order_mark_and_config_may_not_be_empty(tmp_path):
    (tmp_path / "bom.toml").write_bytes(b'\xef\xbb\xbfalgo = "ma"\n')
    assert parse("--config", str(tmp_path / "bom.toml")).algo == "ma"
    with pytest.raises(UsageError, match="^--config '' is empty"):  # not silently no file
        parse("--algo", "sgd", "--config", "")


@pytest.mark.parametrize("args, message", [
    (["--model-args", '{"w": 1, "w": 2}'], "key 'w' given twice"),
    (["--model-args", '{"a": ' + DEEP + "}"], "nested too deeply"),
    (["--lr-milestones", ","], "',': want comma-separated epochs, e.g. 3,4"),
    (["--lr-milestones", "1,inf"], "milestones must be increasing finite epochs > 0"),
    (["--checkpoint-every", "1e308e"], "must be at most 1e+06 epochs, got 1e308e"),
    (["--checkpoint-dir", ""], "--checkpoint-dir '' is empty"),
    (["--resume", ""], "--resume '' is empty"),
    (["--seed", str(2 ** 64 - 1)], "--seed 18446744073709551615 must be in"),
])
def test_bad_flags_are_one_short_line(args, message):
    with pytest.raises(UsageError) as e:
        parse("--algo", "sgd", "--model", "m:build", *args)
    assert message in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 300


def _repeat(tmp_path: Path, optim: OptimConfig, *typed: str):
    """A run's config.json with ``optim`` (resolved, with run_info) repeated with ``typed``."""
    config = configs.resolve(RunConfig(algo="sgd", optim=optim))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**configs.to_dict(config), "run_info": {"workers": 1}}))
    train = _train_parser()
    return arguments.build(train.parse_args(["--config", str(path), *typed]))


def test_none_undoes_a_config_files_optional_value(tmp_path, capsys):
    optim = OptimConfig(epochs=4, lr_milestones=(2,), lr_gamma=0.5, clip_grad_norm=1.0,
                        micro_batch_size=16)
    repeat = _repeat(tmp_path, optim, "--clip-grad-norm", "none", "--micro-batch-size", "None",
                     "--lr-milestones", "none", "--profile", "none")
    assert (repeat.optim.clip_grad_norm, repeat.optim.micro_batch_size) == (None, None)
    assert repeat.optim.lr_milestones == () and repeat.profile is None
    assert configs.resolve(repeat).optim.lr_schedule == "cosine"  # the step decay's gone


def test_none_undoes_every_optional_value_of_a_file(tmp_path):
    """README: "an optional value by none"; --eval-rank, --tau, --lr, --momentum,
    --slowdown, --init-from and --model-args took none as a value (not a number, cannot
    parse, a path), so a file's value had to be edited out."""
    toml = tmp_path / "run.toml"
    toml.write_text('algo = "ma"\neval_mode = "online"\neval_rank = 1\nout = "o"\n'
                    '[model]\nname = "./net.py:build"\nargs = {width = 16}\ninit_from = "w.pt"\n'
                    '[optim]\nlr = 0.2\nmomentum = 0.5\nlr_schedule = "constant"\n'
                    '[stragglers]\nslowdown = "1:2"\n[algorithm]\ntau = 5\n')
    config = parse("--config", str(toml), *[w for flag in (
        "eval-rank", "tau", "lr", "momentum", "slowdown", "init-from", "model-args", "out",
        "lr-schedule") for w in (f"--{flag}", "none")])
    assert config == RunConfig(algo="ma", eval_mode="online",
                               model=configs.ModelConfig(name="./net.py:build"))
    assert "none: not set, also over --config's value" in " ".join(
        _train_parser().format_help().split())


def test_checkpoint_every_help_tells_off_from_none():
    """It read "off (the default): none, also over --config's value; none: not set, also
    over --config's value": the default is not off, and the two differ on --resume (README)."""
    every = _action("--checkpoint-every")
    assert every.help.endswith(
        "Not set (the default): none, but --resume keeps the resumed run's interval; off: "
        "none, not even on --resume, also over --config's value; none: not set, also over "
        "--config's value")


def test_jitter_help_says_a_draw_below_1_shortens_the_delay():
    """It said a step takes max(1, exp(SIGMA*z)) times as long, "a --slowdown DELAY
    included"; ``Straggler.stretched`` takes max(t, draw * (FACTOR t + DELAY)): a draw below 1
    shortens the delay, and only t bounds the step from below."""
    jitter = _action("--jitter")
    assert jitter.help.startswith(
        "injected noise: a step of t takes exp(SIGMA*z) times (FACTOR*t + DELAY) of its "
        "--slowdown (FACTOR 1, DELAY 0 without), but no less than t; z ~ N(0,1) drawn per "
        "step, seeded")
    straggler = Straggler(factor=2.0, delay=1.0, jitter=1.0, seed=0)
    draws = Straggler(jitter=1.0, seed=0)
    for _ in range(20):
        draw = draws.draw()
        assert straggler.stretched(0.5) == pytest.approx(max(0.5, draw * (2.0 * 0.5 + 1.0)))


def _typed_init(cls) -> dict[str, str]:
    """The parameters of ``cls``'s ``__init__`` declared for type checkers only (``if
    TYPE_CHECKING``), in order, with their annotations as written."""
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(cls)))):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            init = next(d for d in node.body if isinstance(d, ast.FunctionDef))
            assert init.name == "__init__"
            assert all(isinstance(d, ast.Constant) and d.value is Ellipsis
                       for d in init.args.defaults)
            return {a.arg: ast.unparse(a.annotation) for a in init.args.args[1:]}
    return {}


TYPED_TWICE = {RunConfig: {"algo", "out"}, configs.DataConfig: {"dataset", "data_dir"},
               configs.ModelConfig: {"name", "init_from"},
               configs.CheckpointConfig: {"every", "dir", "resume"}}


@pytest.mark.parametrize("cls", [RunConfig, *configs.SECTIONS.values()])
def test_a_constructor_typed_for_callers_keeps_in_step_with_the_fields(cls):
    """A field is typed as what it holds (``out: str | None``), so readers need no
    narrowing; the ``__init__`` that type checkers see takes what a caller may give (a path,
    the class itself, ``every=600``): every field in order, each with the field's type or a
    wider one; only the fields that widen declare it so."""
    typed = _typed_init(cls)
    if cls not in TYPED_TWICE:
        assert typed == {}
        return
    held = {f.name: f.type for f in dataclasses.fields(cls)}
    assert list(typed) == list(held)  # a field added to one and not the other: here
    wider = set()
    for name, given in typed.items():
        alternatives = options._alternatives(given)
        assert set(options._alternatives(held[name])) <= set(alternatives), name
        if len(alternatives) > len(options._alternatives(held[name])):
            wider.add(name)
    assert wider == TYPED_TWICE[cls]


def test_checkpoint_every_is_typed_as_the_seconds_it_takes():
    """``CheckpointConfig(every=600)`` runs (600 seconds), but the field was annotated
    ``str | None``: a type checker refused what the docs show. Its constructor takes the
    number; the field holds the string it becomes."""
    assert "float" in options._alternatives(_typed_init(configs.CheckpointConfig)["every"])
    assert typing.get_type_hints(configs.CheckpointConfig)["every"] == str | None
    every = configs.CheckpointConfig(every=600)
    assert every.every == "600" and every.interval == "600"


def test_a_typed_option_wins_over_the_files_and_its_partners(tmp_path, capsys):
    """--model-args was merged into the file's ({"width": 16} + {"depth": 2}); --model mlp
    was refused for the file's model arguments; a file's tau refused --tau-epochs ("not
    allowed with argument --tau", never typed), its momentum --optimizer adam, its
    --eval-rank --eval after. The file's partner of a typed option gives way, said once."""
    toml = tmp_path / "run.toml"
    toml.write_text('algo = "ma"\neval_mode = "online"\neval_rank = 1\n[model]\n'
                    'name = "./net.py:build"\nargs = {width = 16}\n[optim]\nmomentum = 0.5\n'
                    '[algorithm]\ntau = 5\n')
    assert parse("--config", str(toml), "--model-args", '{"depth": 2}').model.args == \
        {"depth": 2}
    cases = [(["--model", "mlp"], "--model mlp", "model.args {\"width\": 16}"),
             (["--tau-epochs", "1"], "--tau-epochs", "algorithm.tau 5"),
             (["--optimizer", "adam"], "--optimizer adam", "optim.momentum 0.5"),
             (["--eval", "after"], "--eval after", "eval_rank 1")]
    for typed, by, left in cases:
        capsys.readouterr()
        parse("--config", str(toml), *typed)
        assert capsys.readouterr().out == f"hpctrain: {by}: leaving out {toml}'s {left}\n"
    config = parse("--config", str(toml), "--model", "mlp", "--tau-epochs", "1", "--optimizer",
                   "adam", "--eval", "after")
    assert (config.model.args, config.algorithm.tau, config.optim.momentum, config.eval_rank) \
        == (None, None, None, None)
    # Either way round; both typed, or both in one file, are refused.
    epochs = tmp_path / "epochs.toml"
    epochs.write_text('algo = "ma"\n[algorithm]\ntau_epochs = 0.5\n')
    assert parse("--config", str(epochs), "--tau", "3").algorithm.tau_epochs is None
    with pytest.raises(UsageError, match="--tau-epochs: not allowed with argument --tau"):
        parse("--algo", "ma", "--tau", "3", "--tau-epochs", "1")
    # The same model given again keeps its arguments.
    assert parse("--config", str(toml), "--model", "./net.py:build").model.args == {"width": 16}


def test_resume_of_a_copied_run_from_its_config_json_writes_into_the_copy(tmp_path, capsys):
    """``--config COPY/config.json --resume COPY``: the file's out (the original folder) was
    taken as --out, and the outputs of the copy's resumption went to the original. The
    file's out and checkpoint folder give way to a typed --resume, as without --config."""
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({**configs.repeatable(RunConfig(
        algo="sgd", out=str(tmp_path / "original"), checkpoint=configs.CheckpointConfig(
            every="1e", dir=str(tmp_path / "ck")))), "run_info": {}}))
    config = parse("--config", str(saved), "--resume", str(tmp_path / "copy"))
    assert (config.out, config.checkpoint.dir) == (None, None)
    assert parse("--config", str(saved), "--resume", "auto").out == str(tmp_path / "original")
    assert parse("--config", str(saved), "--resume", str(tmp_path / "copy"), "--out",
                 str(tmp_path / "x")).out == str(tmp_path / "x")


def test_a_repeat_on_another_number_of_workers_says_so(tmp_path, capsys):
    """config.json is how a run is repeated, but a 3-rank run's file launched on 1 rank
    trained otherwise (each worker's data, ssgd's samples per update) and said nothing."""
    saved = tmp_path / "config.json"
    for workers, said in ((3, True), (1, False)):
        saved.write_text(json.dumps({**configs.repeatable(RunConfig(algo="ssgd")),
                                     "run_info": {"workers": workers}}))
        config = parse("--config", str(saved))
        arguments.note_other_workers(str(saved), config)
        expected = f"hpctrain: {saved}'s run had 3 workers, this one has 1: it trains otherwise"
        assert (expected in capsys.readouterr().out) == said
    arguments.note_other_workers(str(saved), parse("--config", str(saved), "--resume", "auto"))
    saved.write_text(saved.read_text().replace('"workers": 1', '"workers": 2'))
    arguments.note_other_workers(str(saved), parse("--config", str(saved), "--resume", "auto"))
    assert capsys.readouterr().out == ""  # a resize says its own


def test_a_nesterov_runs_config_repeats_under_an_async_algo_or_no_momentum(tmp_path, capsys):
    """README's --config run/config.json --algo asgd: an ma run's file with --nesterov was
    refused ("--nesterov: --algo asgd keeps its own update rule"), and --momentum 0 beside
    it named --nesterov, which nobody typed. The file's switch gives way, said once."""
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({**configs.repeatable(configs.resolve(RunConfig(
        algo="ma", optim=OptimConfig(nesterov=True)))), "run_info": {"workers": 2}}))
    capsys.readouterr()
    for typed, by in ((("--algo", "asgd"), "--algo asgd"), (("--momentum", "0"), "--momentum 0")):
        config = configs.resolve(parse("--config", str(saved), *typed))
        assert config.optim.nesterov is False
        assert f"hpctrain: {by}: leaving out {saved}'s optim.nesterov True\n" in \
            capsys.readouterr().out
    assert configs.resolve(parse("--config", str(saved), "--algo", "ssgd")).optim.nesterov
    typed = parse("--config", str(saved), "--algo", "asgd", "--nesterov")
    assert typed.optim.nesterov is True  # typed: kept, for the launch check to refuse


def test_another_schedule_leaves_out_the_files_milestones(tmp_path, capsys):
    repeat = _repeat(tmp_path, OptimConfig(epochs=4, lr_milestones=(2,), lr_gamma=0.5),
                     "--lr-schedule", "constant")
    assert (repeat.optim.lr_schedule, repeat.optim.lr_milestones) == ("constant", ())
    assert repeat.optim.lr_gamma == OptimConfig.lr_gamma
    assert f"leaving out {tmp_path}/config.json's lr_milestones 2, lr_gamma 0.5" in \
        capsys.readouterr().out


def test_milestones_none_undoes_a_toml_files_step_decay(tmp_path, capsys):
    path = tmp_path / "step.toml"
    path.write_text('algo = "sgd"\n[optim]\nepochs = 4\nlr_schedule = "step"\n'
                    'lr_milestones = [2]\nlr_gamma = 0.5\n')
    train = _train_parser()
    config = arguments.build(train.parse_args(["--config", str(path), "--lr-milestones", "none"]))
    assert (config.optim.lr_schedule, config.optim.lr_milestones) == (None, ())
    assert "--lr-milestones none: leaving out" in capsys.readouterr().out


def test_the_lazy_api_is_listed():
    """dir(hpctrain) and help(hpctrain) did not list train, RunConfig or load_config (they
    are imported on first use)."""
    assert set(hpctrain.__all__) <= set(dir(hpctrain))
    assert set(hpctrain.__all__) == {*hpctrain._API, "__version__"}  # the written-out list
    assert "train" in dir(hpctrain) and hpctrain.train.__module__ == "hpctrain.run"


def test_each_configuration_class_says_its_fields():
    """help(RunConfig) and the other sections explained no field: a Python user had to find
    the command line's --help. Each docstring names every field, with its flag and default."""
    from dataclasses import fields

    for cls in (hpctrain.RunConfig, *configs.SECTIONS.values()):
        for f in fields(cls):
            assert f"\n    {f.name}: " in cls.__doc__, (cls.__name__, f.name)
    assert "    lr: --lr, default None." in hpctrain.OptimConfig.__doc__
    assert "    data: its DataConfig (see help(hpctrain.DataConfig))" in \
        hpctrain.RunConfig.__doc__


def test_each_algorithms_options_say_their_fields():
    """help(hpctrain.algorithm_options("dcasgd-a")) showed only the dataclass's signature: what
    lam means was in the fields' metadata alone."""
    from dataclasses import fields

    for name in registry.names():
        cls = hpctrain.algorithm_options(name)
        for f in fields(cls):
            assert f"\n    {f.name}: {options.flag_of(f)}, default " in cls.__doc__, (name, f)
        assert cls.__doc__.count("Fields:") == (1 if fields(cls) else 0), name
    assert "    lam: --lam, default None. DC-ASGD's lambda0" in \
        hpctrain.algorithm_options("dcasgd-a").__doc__


def test_nesterov_betas_and_eps_from_python_toml_flags_and_config_json(tmp_path, capsys):
    """The optimisation options added later go through every way in, config.json repeats
    them, and a config.json written before them (no such keys) still loads, as it ran."""
    toml = tmp_path / "run.toml"
    toml.write_text('algo = "ssgd"\n[optim]\noptimizer = "adam"\nbetas = [0.8, 0.99]\n'
                    'eps = 1e-6\n')
    from_python = RunConfig(algo="ssgd", optim=OptimConfig(optimizer="adam", betas=(0.8, 0.99),
                                                           eps=1e-6))
    assert parse("--config", str(toml)) == from_python == parse(
        "--algo", "ssgd", "--optimizer", "adam", "--betas", "0.8,0.99", "--eps", "1e-6")
    assert parse("--config", str(toml), "--betas", "none").optim.betas is None
    nesterov = RunConfig(algo="ma", optim=OptimConfig(nesterov=True))
    assert parse("--algo", "ma", "--nesterov") == nesterov
    for config in (from_python, nesterov):
        saved = tmp_path / "config.json"
        saved.write_text(json.dumps({**configs.repeatable(configs.resolve(config)),
                                     "run_info": {"workers": 2}}))
        assert configs.load(saved) == configs.resolve(config)
    # An adam run's config.json from before: no keys; resolved, torch's defaults it ran with.
    old = configs.repeatable(configs.resolve(RunConfig(algo="ssgd", optim=OptimConfig(
        optimizer="adam"))))
    old["optim"] = {k: v for k, v in old["optim"].items()
                    if k not in ("nesterov", "betas", "eps")}
    saved.write_text(json.dumps({**old, "run_info": {"workers": 2}}))
    assert configs.resolve(configs.load(saved)).optim.betas == (0.9, 0.999)
    assert configs.flat(configs.resolve(configs.load(saved))) == configs.flat(
        configs.resolve(RunConfig(algo="ssgd", optim=OptimConfig(optimizer="adam"))))
    # Another optimizer leaves out the file's options of the one it had, said once.
    capsys.readouterr()
    sgd = configs.resolve(parse("--config", str(toml), "--optimizer", "sgd")).optim
    assert (sgd.betas, sgd.eps, sgd.momentum) == (None, None, 0.9)
    assert capsys.readouterr().out == (f"hpctrain: --optimizer sgd: leaving out {toml}'s "
                                       f"optim.betas 0.8,0.99\nhpctrain: --optimizer sgd: "
                                       f"leaving out {toml}'s optim.eps 1e-06\n")
    saved.write_text(json.dumps({**configs.repeatable(configs.resolve(from_python)),
                                 "run_info": {"workers": 2}}))
    capsys.readouterr()
    assert configs.resolve(parse("--config", str(saved), "--optimizer", "sgd")).optim.betas \
        is None
    # A default's betas as the file's, as --betas takes them: "(0.9, 0.999)" and "[0.9, 0.999]"
    # were one value written two ways.
    saved.write_text(json.dumps({**configs.repeatable(configs.resolve(RunConfig(
        algo="ssgd", optim=OptimConfig(optimizer="adam")))), "run_info": {"workers": 2}}))
    capsys.readouterr()
    parse("--config", str(saved), "--optimizer", "sgd")
    assert capsys.readouterr().out == (
        "hpctrain: lr 0.05, momentum 0.9, betas none, eps none by default with the options "
        f"given, not {saved}'s lr 0.001, momentum none, betas 0.9,0.999, eps 1e-08, its run's "
        "defaults\n")
    nesterov_toml = tmp_path / "nesterov.toml"
    nesterov_toml.write_text('algo = "ssgd"\n[optim]\nnesterov = true\nmomentum = 0.5\n')
    capsys.readouterr()
    adam = parse("--config", str(nesterov_toml), "--optimizer", "adam").optim
    assert (adam.nesterov, adam.momentum) == (False, None)
    assert f"hpctrain: --optimizer adam: leaving out {nesterov_toml}'s optim.nesterov True\n" \
        in capsys.readouterr().out
    assert parse("--config", str(nesterov_toml), "--no-nesterov").optim.nesterov is False


@pytest.mark.parametrize("build, python, typed", [
    (lambda: OptimConfig(epochs=2, warmup_epochs=50),
     "OptimConfig.warmup_epochs=50 is not below OptimConfig.epochs=2",
     "--warmup-epochs 50 is not below --epochs 2"),
    (lambda: OptimConfig(batch_size=8, micro_batch_size=9),
     "OptimConfig.micro_batch_size=9 exceeds OptimConfig.batch_size=8",
     "--micro-batch-size 9 exceeds --batch-size 8"),
    (lambda: OptimConfig(lr_schedule="step"),  # an example as the caller writes one
     "OptimConfig.lr_schedule='step' needs OptimConfig.lr_milestones, the epochs at which "
     "the learning rate is multiplied by OptimConfig.lr_gamma (e.g. (3, 4))",
     "--lr-schedule step needs --lr-milestones, the epochs at which the learning rate is "
     "multiplied by --lr-gamma (e.g. 3,4)"),
    (lambda: OptimConfig(optimizer="adam", momentum=0.5),  # a default as the caller writes one
     "OptimConfig.momentum=0.5 is SGD's; OptimConfig.optimizer='adam' has OptimConfig.betas "
     "(default (0.9, 0.999))",
     "--momentum 0.5 is SGD's; --optimizer adam has --betas (default 0.9,0.999)"),
    (lambda: OptimConfig(lr_milestones=[1], lr_schedule="constant"),
     "OptimConfig.lr_milestones need OptimConfig.lr_schedule='step', not 'constant'",
     "--lr-milestones need --lr-schedule step, not constant"),
    (lambda: DataConfig(shuffle_chunk_mb=8),
     "DataConfig.shuffle_chunk_mb=8 sizes the rounds of the sharded exchange, and replicated "
     "data (DataConfig.data_placement='replicated') are not moved",
     "--shuffle-chunk-mb 8 sizes the rounds of the sharded exchange, and replicated data "
     "are not moved"),
    (lambda: DataConfig(dataset="fashion-mnst"),
     "DataConfig.dataset='fashion-mnst' is unknown; choose from ",
     "unknown --dataset 'fashion-mnst'; choose from "),
    (lambda: ModelConfig(name="lenett"), "ModelConfig.name='lenett' is unknown; choose from ",
     "unknown --model 'lenett'; choose from "),
    (lambda: RunConfig(algo="sgd", eval_rank=1),
     "RunConfig.eval_rank=1 needs RunConfig.eval_mode='online'",
     "--eval-rank 1 needs --eval online"),
])
def test_checks_weighing_settings_name_the_fields_a_script_gave(build, python, typed):
    """Checks that weigh one setting against another, and unknown model and data names,
    named the flags (--warmup-epochs 50 is not below --epochs 2) to a script that typed
    none: they name its fields now, and the command line's flags as before."""
    with pytest.raises(UsageError) as refused:
        build()
    assert str(refused.value).startswith(python)
    with pytest.raises(UsageError) as refused, options.command_line():
        build()
    assert str(refused.value).startswith(typed)
