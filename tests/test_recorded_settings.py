"""What a run folder records is data: reading a finished run's config.json back (``--resume
auto``) runs none of the code it names, which anyone who can write the folder may have put
there; only code the command names runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpctrain import launch_checks, options
from hpctrain.config import CheckpointConfig, DataConfig, ModelConfig, RunConfig
from hpctrain.errors import UsageError

pytestmark = pytest.mark.unit

SIGNUM = f"{Path(__file__).resolve().parents[1] / 'examples' / 'signum_vote.py'}:SignumVote"


def planted(folder: Path) -> tuple[Path, Path]:
    """A file whose import writes a marker (another user's, beside the run), and the marker."""
    marker = folder / "imported"
    code = folder / "evil.py"
    code.write_text(f"open({str(marker)!r}, 'w').close()\n"
                    "def Evil(*a, **k):\n    raise SystemExit\n")
    return code, marker


def finished(out: Path, config: RunConfig, **edits) -> None:
    """A finished run of ``config`` in ``out``: its config.json (``edits``: its values, as
    another user rewrote them, ``model.name`` for a table's) and a summary."""
    from hpctrain import config as configs

    recorded = configs.repeatable(launch_checks._as_launched(config))
    for place, value in edits.items():
        table, _, key = place.rpartition(".")
        (recorded[table] if table else recorded)[key] = value
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**recorded, "run_info": {"workers": 1}}))
    (out / "summary.json").write_text(json.dumps(
        {"algo": config.algo, "workers": 1, "final_test_acc": 1.0, "best_test_acc": 1.0,
         "wall_s": 1.0, "samples_per_s": 1.0}))


def requeued(out: Path, algo: str = "ssgd", **model) -> RunConfig:
    """docs/SLURM.md's requeued command: the same run, ``--resume auto``."""
    return RunConfig(algo=algo, out=str(out), data=DataConfig(dataset="synthetic"),
                     model=ModelConfig(**({"name": "mlp"} | model)),
                     checkpoint=CheckpointConfig(every="1e", resume="auto"))


@pytest.mark.parametrize("place, flag", [("algo", "--algo"), ("model.name", "--model"),
                                         ("data.dataset", "--dataset")])
def test_a_rewritten_config_json_names_code_that_is_never_imported(tmp_path, place, flag):
    """Another user rewrote a finished run's config.json to name their file; the requeued
    command imported it (its algorithm: on every rank) while comparing the options. The
    other code is now the change refused, found without importing it."""
    code, marker = planted(tmp_path)
    out = tmp_path / "run"
    config = requeued(out)
    finished(out, config, **{place: f"{code}:Evil"})
    with pytest.raises(UsageError) as refused, options.command_line():  # the requeued command
        launch_checks.finished_run(config)
    assert not marker.exists()
    launched = {"--algo": "ssgd", "--model": "mlp", "--dataset": "synthetic"}[flag]
    assert str(refused.value) == (
        f"--resume auto: --out {out} holds a finished run, started with {flag} {code}:Evil, "
        f"not {launched}; choose another --out for a new run")
    with pytest.raises(UsageError) as refused:  # a script's: the fields it gave
        launch_checks.finished_run(config)
    field = {"--algo": "RunConfig.algo", "--model": "ModelConfig.name",
             "--dataset": "DataConfig.dataset"}[flag]
    assert str(refused.value) == (
        f"CheckpointConfig.resume='auto': RunConfig.out={str(out)!r} holds a finished run, "
        f"started with {field}='{code}:Evil', not {launched!r}; choose another RunConfig.out "
        "for a new run")
    assert str(refused.value).endswith("; choose another RunConfig.out for a new run")


def test_a_finished_run_of_ones_own_code_is_still_finished(tmp_path):
    """The code the command names is the run's: where config.json names the same algorithm
    and model, the run is found finished, as before."""
    net = tmp_path / "net.py"
    net.write_text("from hpctrain import models\n"
                   "def Net(shape, classes):\n    return models.build('mlp', shape, classes)\n")
    out = tmp_path / "run"
    config = requeued(out, SIGNUM, name=f"{net}:Net")
    finished(out, config)
    assert launch_checks.finished_run(config)["workers"] == 1
