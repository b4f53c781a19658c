"""``--init-from``: a new run that starts from saved weights (hpctrain.weights), the file
checked against the model before MPI starts."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import SYNTHETIC, refusal, run_commands

from hpctrain import data, launch_checks, model_checks, options, weights
from hpctrain.checkpoint import format as checkpoint_format
from hpctrain.config import CheckpointConfig, DataConfig, ModelConfig, OptimConfig, RunConfig
from hpctrain.errors import UsageError
from hpctrain.sim import SimConfig, simulate


def mlp() -> torch.nn.Module:
    sample = data.load("synthetic", "test", None, 0, 1)
    return model_checks.build_model("mlp", sample.shape, sample.num_classes)


def saved(tmp_path: Path, state, name: str = "w.pt") -> Path:
    torch.save(state, tmp_path / name)
    return tmp_path / name


def config(out, init_from=None, algo="sgd", **kw) -> RunConfig:
    return RunConfig(algo=algo, seed=kw.pop("seed", 3), out=str(out), progress=False,
                     data=DataConfig(dataset="synthetic"),
                     model=ModelConfig(name="mlp", init_from=init_from),  # a Path too
                     optim=OptimConfig(epochs=1, batch_size=32), **kw)


def test_loading_weights_and_checkpoints_warns_nothing(tmp_path):
    """torch 2.1's weights-only loader warned "UserWarning: TypedStorage is deprecated" at
    every --init-from and resume, once per rank, for files of any torch. No warning at all
    comes from either loader (fails on torch 2.1 without the filter; later torches do not
    warn)."""
    state = mlp().state_dict()
    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(checkpoint_format.encode({"model": state}, {"updates": 1}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read = weights.read(str(saved(tmp_path, state)))
        _, payload = checkpoint_format.load(checkpoint)
    assert all(torch.equal(read[k], v) and torch.equal(payload["model"][k], v)
               for k, v in state.items())


def test_a_run_folder_means_its_model_pt(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    assert weights.file_of(str(tmp_path)) == tmp_path / "model.pt"
    assert weights.file_of(str(tmp_path / "model.pt")) == tmp_path / "model.pt"


@pytest.mark.parametrize("prefixes", [["module."], ["_orig_mod."], ["module.", "_orig_mod."]])
def test_the_prefixes_of_ddp_and_compile_are_taken_off(tmp_path, prefixes):
    model = mlp()
    state = model.state_dict()
    wrapped = {"".join(prefixes) + k: v for k, v in state.items()}
    read = weights.aligned(model, weights.read(str(saved(tmp_path, wrapped))))
    assert read.keys() == state.keys()
    assert all(torch.equal(read[k], state[k]) for k in state)


class Wrapping(torch.nn.Module):
    """A user's model whose one child is named ``module``: its own names start with module."""

    def __init__(self):
        super().__init__()
        self.module = torch.nn.Linear(3, 2)


@pytest.mark.parametrize("build", [Wrapping, lambda: torch.compile(torch.nn.Linear(3, 2))],
                         ids=["child-named-module", "compiled"])
def test_a_models_own_prefix_is_kept(tmp_path, build):
    """--init-from refused a run's own model.pt when the model's names start with a wrapper's
    prefix (read took it off blindly); a plain file fits such a model too."""
    own = build().state_dict()
    for state in (own, {k.split(".", 1)[1]: v for k, v in own.items()}):  # the plain file's
        model = build()  # initialised afresh: other values than the file's
        assert any(not torch.equal(v, own[k]) for k, v in model.state_dict().items())
        weights.load_into(model, str(saved(tmp_path, state)), "mine")
        loaded = model.state_dict()
        assert loaded.keys() == own.keys()
        assert all(torch.equal(loaded[k], own[k]) for k in own)


def test_a_prefix_only_some_keys_have_stays():
    model = mlp()
    state = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    assert weights.aligned(model, state).keys() == state.keys()


def test_what_does_not_fit_is_named():
    model = mlp()
    state = model.state_dict()
    first, *rest = state
    assert weights.mismatch(model, state) is None
    assert weights.mismatch(model, {k: v.double() for k, v in state.items()}) is None  # cast
    missing = {k: v for k, v in state.items() if k != first}
    assert weights.mismatch(model, missing) == f"the model's {first} missing"
    extra = {**state, "head.weight": torch.zeros(2), "head.bias": torch.zeros(2)}
    assert weights.mismatch(model, extra) == "head.weight and 1 more not in the model"
    shaped = {**state, first: torch.zeros(3, 2)}
    assert weights.mismatch(model, shaped) == (
        f"{first} is 3 x 2 in the file, {' x '.join(map(str, state[first].shape))} in the "
        "model")
    second = rest[0]
    assert weights.mismatch(model, {**shaped, second: torch.tensor(1.0)}).endswith(
        "in the model (and 1 more of another shape)")


def _checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt-1.pt"
    path.write_bytes(checkpoint_format.encode({"model": mlp().state_dict()},
                                              {"algo": "sgd", "ranks": 1}))
    return path


# A file or folder that cannot start a run -> what its refusal says after the option.
FILES = [
    (lambda t: t / "absent.pt", "no such file or folder"),
    (lambda t: t, "the folder has no model.pt"),
    (lambda t: saved(t, torch.nn.Linear(2, 2)), "a whole module saved?"),
    (lambda t: saved(t, [1, 2]), "holds a list, not a state dict"),
    (lambda t: saved(t, {}), "holds a dict (empty)"),
    (lambda t: saved(t, {"w": 1.0}), "entry 'w' is not a named tensor"),
    (lambda t: (t / "junk.pt").write_text("hello") and t / "junk.pt",
     "not a file torch.load reads"),
    (_checkpoint, "an hpctrain checkpoint, not a model's weights"),
    (lambda t: saved(t, {"layer.weight": torch.zeros(2, 2)}),
     "its weights do not fit --model mlp: the model's"),
]


@pytest.mark.parametrize("make, said", FILES)
def test_a_file_that_cannot_start_the_run_is_refused_before_mpi(tmp_path, make, said):
    message = refusal(["--algo", "sgd", *SYNTHETIC, "--init-from", str(make(tmp_path))])
    assert message.startswith("--init-from ") and said in message


@pytest.mark.parametrize("make, said", FILES)
def test_a_file_that_cannot_start_the_run_names_the_field_from_python(tmp_path, make, said):
    """From Python (hpctrain.train(RunConfig(model=ModelConfig(init_from=...)))) the
    refusal said "--init-from PATH: ...", "--resume continues ..." and "--model mlp", flags
    a script never typed: the fields given now."""
    path = str(make(tmp_path))
    with pytest.raises(UsageError) as refused:
        launch_checks.check_launch(config(tmp_path / "out", init_from=path), 1)
    message = str(refused.value)
    assert message.startswith(f"ModelConfig.init_from={path!r}: "), message
    assert said.replace("--model mlp", "ModelConfig.name='mlp'") in message
    assert "--" not in message.removeprefix(f"ModelConfig.init_from={path!r}"), message


def test_the_hint_to_resume_instead_is_the_field_from_python(tmp_path):
    """A run folder without model.pt, or a checkpoint given as weights, pointed to --resume,
    from Python too: CheckpointConfig.resume there; --resume on the command line."""
    for path, said in ((tmp_path, "(a run writes it when it finishes; {} continues an "
                                  "unfinished one)"),
                       (_checkpoint(tmp_path), "{} continues its run, or give the finished "
                                               "run's model.pt")):
        with pytest.raises(UsageError) as refused:
            weights.read(str(path))
        assert str(refused.value).endswith(said.format("CheckpointConfig.resume"))
        with pytest.raises(UsageError) as refused, options.command_line():
            weights.read(str(path))
        assert str(refused.value).endswith(said.format("--resume"))


def test_a_truncated_file_is_refused(tmp_path):
    path = saved(tmp_path, mlp().state_dict())
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UsageError, match="not a file torch.load reads"):
        weights.read(str(path))


def test_an_empty_path_is_refused():
    with pytest.raises(UsageError, match="ModelConfig.init_from=' ' is empty"):
        ModelConfig(init_from=" ")


def test_config_json_records_the_absolute_path(tmp_path, monkeypatch):
    saved(tmp_path, mlp().state_dict())
    monkeypatch.chdir(tmp_path)
    launched = launch_checks.check_launch(config(tmp_path / "out", init_from="w.pt"), 1)
    assert launched.model.init_from == str(tmp_path / "w.pt")


def test_the_initial_model_has_the_weights_unless_the_run_resumes(tmp_path):
    torch.manual_seed(11)
    path = saved(tmp_path, mlp().state_dict())
    wanted = torch.load(path, weights_only=True)
    sample = data.load("synthetic", "test", None, 0, 1)

    def initial(c: RunConfig) -> dict:
        torch.manual_seed(c.seed)
        return launch_checks.initial_model(c, sample.shape, sample.num_classes).state_dict()

    given = initial(config(tmp_path / "a", init_from=path))
    assert all(torch.equal(given[k], wanted[k]) for k in wanted)
    resumed = initial(config(tmp_path / "b", init_from=path,
                             checkpoint=CheckpointConfig(resume=str(tmp_path))))
    seeded = initial(config(tmp_path / "c"))
    assert all(torch.equal(resumed[k], seeded[k]) for k in seeded)  # the checkpoint's, later


def test_a_simulated_async_run_starts_from_the_weights_of_a_finished_run(tmp_path):
    """The first point of the new run's curve scores the model the first run saved, and the
    store the virtual workers push to starts from it."""
    first = simulate(config(tmp_path / "a"), SimConfig(workers=1))
    second = simulate(config(tmp_path / "b", init_from=tmp_path / "a", algo="dcasgd-a", seed=4),
                      SimConfig(workers=2))
    start = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["updates"] == 0 and start["test_loss"] == first["final_test_loss"]
    run_info = json.loads((tmp_path / "b" / "config.json").read_text())["run_info"]
    model_pt = (tmp_path / "a" / "model.pt").read_bytes()
    assert run_info["init_from_sha256"] == hashlib.sha256(model_pt).hexdigest()
    assert run_info["torch"] == torch.__version__
    gpu = torch.cuda.is_available()  # --device auto
    assert (second["device"], second["gpu"] is None) == ("cuda" if gpu else "cpu", not gpu)


def test_ssgd_then_dcasgd_from_its_model_on_two_ranks(tmp_path):
    """The real launch: rank 0 and rank 1 each read the file; the async store starts from
    it; config.json records where the weights came from, as an absolute path."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["train", *SYNTHETIC, "--epochs", "1"]
    done = run_commands([[*common, "--algo", "ssgd", "--out", str(a)],
                         [*common, "--algo", "dcasgd-a", "--out", str(b), "--init-from",
                          str(a)]], np=2)
    assert done.returncode == 0, done.stderr
    first = json.loads((a / "summary.json").read_text())
    start = json.loads((b / "metrics.jsonl").read_text().splitlines()[0])
    assert start["updates"] == 0 and start["test_loss"] == first["final_test_loss"]
    recorded = json.loads((b / "config.json").read_text())
    assert recorded["model"]["init_from"] == str(a)


def test_a_run_resumed_into_another_folder_keeps_the_hash_of_its_start(tmp_path):
    """The hash travels in the checkpoints' headers: the resumed run does not read the file
    again, so one replaced since (or another --out) changes nothing."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = ["train", *SYNTHETIC, "--algo", "sgd"]
    done = run_commands([[*common, "--epochs", "1", "--out", str(a)]], np=0)
    assert done.returncode == 0, done.stderr
    started = hashlib.sha256((a / "model.pt").read_bytes()).hexdigest()
    longer = [*common, "--epochs", "2", "--init-from", str(a)]
    stopped = run_commands([[*longer, "--checkpoint-every", "1e", "--out", str(b)]], np=0,
                           injects=["raise@0:40"])  # after the first epoch's checkpoint
    assert stopped.returncode != 0 and list((b / "checkpoints").glob("ckpt-*"))
    state = torch.load(a / "model.pt", weights_only=True)
    torch.save({k: v + 1 for k, v in state.items()}, a / "model.pt")  # replaced since
    resumed = run_commands([[*longer, "--resume", str(b), "--out", str(c)]], np=0)
    assert resumed.returncode == 0, resumed.stderr
    for run_dir in (b, c):
        info = json.loads((run_dir / "config.json").read_text())["run_info"]
        assert info["init_from_sha256"] == started

