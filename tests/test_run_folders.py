"""Paths the options name: one no file can have (too long) is refused in one line naming the
option, before anything reads it."""

from __future__ import annotations

import json
import os

import pytest
from conftest import SYNTHETIC, refusal

import hpctrain
from hpctrain import arguments, cli, launch_checks, options, paths, run_folders, steptimes
from hpctrain.bench.report import rendering
from hpctrain.errors import UsageError

pytestmark = pytest.mark.unit


def too_long(tmp_path, whole: bool, suffix: str = "") -> tuple[str, str]:
    """A path under ``tmp_path`` ending in ``suffix`` with a name over NAME_MAX, or
    (``whole``) over PATH_MAX with each name short enough; and why the system refuses it."""
    if whole:
        path = str(tmp_path) + ("/" + "b" * 200) * 25 + suffix
        limit = os.pathconf("/", "PC_PATH_MAX")
        return path, f"the path is too long ({len(path)} bytes; the system's limit is {limit - 1})"
    path = str(tmp_path / ("a" * 300)) + suffix
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    return path, f"a name in it is longer than {limit} bytes ({300 + len(suffix)} bytes)"


def shown(flag: str, path: str, why: str) -> str:
    """The refusal, the path cut to its start and end."""
    return f"{flag} {path[:100]}...{path[-50:]} ({len(path)} bytes): {why}"


@pytest.mark.parametrize("whole", [False, True], ids=["name", "path"])
@pytest.mark.parametrize("flag, before, after, more", [
    ("--resume", "", "", []),
    ("--init-from", "", "", []),
    ("--model", "", ".py:Net", []),
    ("--dataset", "npz:", "", []),
    ("--checkpoint-dir", "", "", ["--checkpoint-every", "1e"]),
    ("--out", "", "", []),
])
def test_a_path_too_long_to_exist_is_refused_naming_its_option(tmp_path, whole, flag, before,
                                                               after, more):
    """--resume, --init-from and the files of --model and --dataset raised the system's
    OSError (ENAMETOOLONG) at their first look: exit 1, naming no option, with a path of
    thousands of bytes. The folders a run writes were refused already; now alike, shortened."""
    ext, _, attribute = after.rpartition(":")  # --model's attribute is no part of the path
    path, why = too_long(tmp_path, whole, ext)
    typed = before + path + (f":{attribute}" if attribute else "")
    assert refusal(["--algo", "sgd", *SYNTHETIC, *more, flag, typed]) == shown(flag, path, why)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("whole", [False, True], ids=["name", "path"])
def test_a_replay_and_a_report_too_long_to_exist_are_refused_alike(tmp_path, whole):
    """``--step-time replay:PATH`` and ``hpctrain report DIR`` (or its ``--out``) read the
    path they name: the same OSError, exit 1."""
    path, why = too_long(tmp_path, whole)
    with pytest.raises(UsageError) as e, options.command_line():  # as cli.main reads it
        steptimes.file_of(path)
    assert str(e.value) == shown("--step-time", path, why)
    with pytest.raises(UsageError) as e:  # from Python (SimConfig(step_time=...)): the field
        steptimes.file_of(path)
    assert str(e.value) == f"SimConfig.step_time: {why}"
    with pytest.raises(UsageError) as e:
        rendering.run(cli.build_parser().parse_args(["report", path]))
    assert str(e.value) == shown("report", path, why)
    with pytest.raises(UsageError) as e:
        rendering.run(cli.build_parser().parse_args(["report", str(tmp_path), "--out", path]))
    assert str(e.value) == shown("--out", path, why)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("section, key, flag", [
    ("model", "init_from", "--init-from"),
    ("checkpoint", "dir", "--checkpoint-dir"),
    ("checkpoint", "resume", "--resume"),
])
def test_a_path_holding_a_nul_is_refused_naming_its_option(tmp_path, section, key, flag):
    """A settings file's "\\u0000" in a path (no command line can hold one) reached the os
    calls: ValueError "embedded null byte", exit 1, naming no option; from Python too."""
    settings = {"algo": "sgd", section: {key: "a\0b"}}
    (tmp_path / "run.json").write_text(json.dumps(settings))
    said = refusal(["--config", str(tmp_path / "run.json"), *SYNTHETIC])
    assert said == f"{flag} 'a\\x00b': a path cannot hold a NUL character"
    with pytest.raises(UsageError, match=r": a path cannot hold a NUL character$"):
        cls = {"model": hpctrain.ModelConfig, "checkpoint": hpctrain.CheckpointConfig}[section]
        config = hpctrain.RunConfig(algo="sgd", **{section: cls(**{key: "a\0b"})})
        launch_checks.check_launch(config, 1, frozenset())
    assert os.listdir(tmp_path) == ["run.json"]


def test_a_short_path_is_shown_whole():
    assert paths.shortened("/runs/x") == "/runs/x"
    assert paths.too_long("/runs/x") is None  # missing, not too long: what reads it says


@pytest.mark.parametrize("whole", [False, True], ids=["name", "path"])
def test_a_config_file_too_long_to_exist_is_refused_alike(tmp_path, whole):
    """``--config PATH`` looked at the file before the configuration was built (for a user's
    algorithm named in it): the system's OSError, exit 1."""
    path, why = too_long(tmp_path, whole, ".toml")
    with pytest.raises(UsageError) as e:
        cli.main(["train", "--config", path])
    assert str(e.value) == shown("--config", path, why)


def test_a_config_file_in_home_is_read_after_an_equals_sign(tmp_path, monkeypatch):
    """``--config=~/run.toml``: no shell expands a ``~`` after ``=``; it read ./~/run.toml."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run.toml").write_text('algo = "ma"\n')
    config = arguments.build(cli.build_parser().parse_args(["train", "--config=~/run.toml"]))
    assert config.algo == "ma"
    assert hpctrain.load_config("~/run.toml").algo == "ma"


def test_a_scripts_run_folder_in_use_is_named_by_its_field(tmp_path):
    """From Python the lock's refusals named the flags (``--out DIR is in use``), which a
    script never typed: they name the field it gave, as the other folder checks do; the
    command line's words are as they were."""
    import contextlib
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    config = hpctrain.RunConfig(algo="sgd", out=str(out))
    with open(out / run_folders.LOCK, "a") as other:  # another run's, going on
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        said = (f" is in use by another run going on now (it holds {out / run_folders.LOCK}); "
                "wait for it to end or choose another folder")
        with pytest.raises(UsageError) as refused, run_folders.claimed(config):
            pass
        assert str(refused.value) == f"RunConfig.out={str(out)!r}{said}"
        with pytest.raises(UsageError) as refused:
            run_folders.refuse_in_use(str(out), None, None)  # the launch checks' probe
        assert str(refused.value) == f"RunConfig.out={str(out)!r}{said}"
        with pytest.raises(UsageError) as refused, options.command_line():
            run_folders.refuse_in_use(str(out), None, None)
        assert str(refused.value) == f"--out {out}{said}"
        with pytest.raises(UsageError) as refused, contextlib.ExitStack() as held:
            run_folders.lock_folder(held, "--out", out, "comparison")  # bench compare's
        assert str(refused.value).startswith(f"--out {out} is in use by another comparison")
    (out / run_folders.LOCK).unlink()
    os.mkfifo(out / run_folders.LOCK)
    with pytest.raises(UsageError) as refused:
        run_folders.refuse_held("--out", out)
    assert str(refused.value).startswith(f"RunConfig.out={str(out)!r}: its lock file ")


def test_a_scripts_checkpoint_folder_in_use_is_named_by_its_field(tmp_path):
    """From Python a given checkpoint folder's lock refusals said ``the checkpoint folder
    DIR is in use``, where the script gave ``CheckpointConfig.dir``: they name the field, as
    ``RunConfig.out``'s do; the command line's words are as they were, and a derived
    checkpoint folder (``<out>/checkpoints``), which no field gave, is named as before."""
    import fcntl

    out, ck = tmp_path / "out", tmp_path / "lk"
    ck.mkdir()
    config = hpctrain.RunConfig(algo="sgd", out=str(out),
                                checkpoint=hpctrain.CheckpointConfig(dir=str(ck)))
    said = (f" is in use by another run going on now (it holds {ck / run_folders.LOCK}); "
            "wait for it to end or choose another folder")
    with open(ck / run_folders.LOCK, "a") as other:  # another run's, going on
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UsageError) as refused, run_folders.claimed(config):
            pass
        assert str(refused.value) == f"CheckpointConfig.dir={str(ck)!r}{said}"
        with pytest.raises(UsageError) as refused:
            run_folders.refuse_in_use(str(out), str(ck), None)  # the launch checks' probe
        assert str(refused.value) == f"CheckpointConfig.dir={str(ck)!r}{said}"
        with pytest.raises(UsageError) as refused, options.command_line():
            run_folders.refuse_in_use(str(out), str(ck), None)
        assert str(refused.value) == f"the checkpoint folder {ck}{said}"
    derived = out / "checkpoints"
    derived.mkdir(parents=True)
    with open(derived / run_folders.LOCK, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UsageError) as refused:
            run_folders.refuse_in_use(str(tmp_path / "elsewhere"), str(derived), None)
        assert str(refused.value).startswith(f"CheckpointConfig.dir={str(derived)!r} is in use")
        with pytest.raises(UsageError) as refused:
            run_folders.refuse_in_use(str(out), None, None)  # <out>/checkpoints: no field's
        assert str(refused.value).startswith(f"the checkpoint folder {derived} is in use")


def test_a_resumes_derived_folders_name_the_fields_from_python(tmp_path):
    """The folders a resume writes in without their options: from Python the refusal said
    ``written to without --out ...; give --out a folder`` (and ``--checkpoint-dir``,
    ``--checkpoint-every off``) to a caller who typed no flag: the fields now; the command
    line's words are as they were."""
    from hpctrain import checkpoint

    (tmp_path / "file").write_text("")
    bad, resume = str(tmp_path / "file" / "run"), str(tmp_path / "old")
    why = f"{tmp_path / 'file'} is a file, not a folder"
    for resolved, python, typed in (
            (checkpoint.Resolved(out=bad, checkpoint_dir=None, resume=resume, every=None),
             f"CheckpointConfig.resume={resume!r}: the run's folder {bad}, written to without "
             f"RunConfig.out: {why}; give RunConfig.out a folder for this attempt's outputs",
             f"--resume {resume}: the run's folder {bad}, written to without --out: {why}; "
             "give --out a folder for this attempt's outputs"),
            (checkpoint.Resolved(out=str(tmp_path), checkpoint_dir=bad, resume=resume,
                                 every="1e"),
             f"CheckpointConfig.resume={resume!r}: its checkpoint folder {bad}, written to "
             f"without CheckpointConfig.dir: {why}; give CheckpointConfig.dir a folder for the "
             "new checkpoints, or CheckpointConfig.every='off'",
             f"--resume {resume}: its checkpoint folder {bad}, written to without "
             f"--checkpoint-dir: {why}; give --checkpoint-dir a folder for the new "
             "checkpoints, or --checkpoint-every off")):
        out = None if resolved.every is None else str(tmp_path)
        with pytest.raises(UsageError) as e:
            run_folders.check_resumed_folders(resume, out, None, resolved)
        assert str(e.value) == python
        with pytest.raises(UsageError) as e, options.command_line():
            run_folders.check_resumed_folders(resume, out, None, resolved)
        assert str(e.value) == typed


def test_a_finished_run_resumed_and_a_tensorboard_file_name_fields_from_python(tmp_path):
    """From Python, a finished run resumed was told to start anew "with --init-from DIR and
    another --out", and a file where the TensorBoard folder goes was "--tensorboard: ...":
    flags a script never typed; the fields now, the command line's words as they were."""
    ran = tmp_path / "ran"
    ran.mkdir()
    (ran / "summary.json").write_text("{}")
    said = (f": the run has finished ({ran / 'summary.json'}); there is nothing to resume: to "
            "train on from its model, start a new run with ")
    with pytest.raises(UsageError) as e:
        run_folders.refuse_finished(None, str(ran))
    assert str(e.value) == (f"CheckpointConfig.resume={str(ran)!r}{said}"
                            f"ModelConfig.init_from={str(ran)!r} and another RunConfig.out")
    with pytest.raises(UsageError) as e, options.command_line():
        run_folders.refuse_finished(None, str(ran))
    assert str(e.value) == f"--resume {ran}{said}--init-from {ran} and another --out"
    out = tmp_path / "out"
    out.mkdir()
    (out / "tensorboard").write_text("")
    config = hpctrain.RunConfig(algo="sgd", out=str(out), tensorboard=True)
    said = f": {out / 'tensorboard'} is a file; the run writes its event files in a folder of " \
        "that name"
    with pytest.raises(UsageError) as e:
        run_folders.refuse_taken_names(config)
    assert str(e.value) == f"RunConfig.tensorboard=True{said}"
    with pytest.raises(UsageError) as e, options.command_line():
        run_folders.refuse_taken_names(config)
    assert str(e.value) == f"--tensorboard{said}"
