"""launch_checks' words from Python: the options a refusal or a warning before MPI names are
the fields a script gave (``RunConfig.algo='ma'``), the flags on the command line."""

from __future__ import annotations

import numpy as np
import pytest

import hpctrain
from hpctrain import launch_checks, options
from hpctrain.config import DataConfig, RunConfig
from hpctrain.errors import UsageError

TORCHRUN = {"TORCHELASTIC_RUN_ID": "t", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR":
            "127.0.0.1", "MASTER_PORT": "29500", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}


@pytest.mark.parametrize("config, typed, field", [
    (RunConfig(algo="ma"), "--algo ma", "RunConfig.algo='ma'"),
    (RunConfig(algo="ssgd", algorithm=hpctrain.algorithm_options("ssgd")(
        sync_backend="horovod")), "--algo ssgd --sync-backend horovod",
     "RunConfig.algo='ssgd' SynchronousOptions.sync_backend='horovod'"),
    (RunConfig(algo="sgd", eval_rank=1, eval_mode="online"), "--eval-rank", "RunConfig.eval_rank"),
    (RunConfig(algo="sgd", data=DataConfig(data_placement="sharded")),
     "--data-placement sharded", "DataConfig.data_placement='sharded'"),
])
def test_what_torchrun_cannot_run_is_named_as_given(monkeypatch, config, typed, field):
    """Under torchrun, an option that needs an MPI world was named by its flag to a script's
    hpctrain.train(RunConfig(algo='ma')) too, which typed none: the field given now."""
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    said = " moves data through MPI, and torchrun starts no MPI world: launch with mpirun, " \
           "or srun with PMI/PMIx"
    with pytest.raises(UsageError) as refused:
        launch_checks.check_launch(config, 1)
    assert str(refused.value) == field + said
    with pytest.raises(UsageError) as refused, options.command_line():  # as cli.main
        launch_checks.check_launch(config, 1)
    assert str(refused.value) == typed + said


def test_a_test_class_without_training_samples_is_named_as_given(tmp_path, capsys):
    """The warning of test classes no training sample has named "--dataset npz:..." to a
    script that gave DataConfig(dataset=...): the field now, the flag on the command line."""
    np.savez(tmp_path / "d.npz", x_train=np.zeros((60, 4), np.float32),
             y_train=np.arange(60) % 4, x_test=np.zeros((20, 4), np.float32),
             y_test=np.arange(20) % 5)
    name = f"npz:{tmp_path / 'd.npz'}"
    config = RunConfig(algo="sgd", data=DataConfig(dataset=name))
    launch_checks._say_user_data(config)
    assert f"hpctrain: warning: DataConfig.dataset={name!r}: test class(es) 4 have no " \
           "training sample" in capsys.readouterr().err
    with options.command_line():
        launch_checks._say_user_data(config)
    assert f"hpctrain: warning: --dataset {name}: test class(es) 4 have no " \
           "training sample" in capsys.readouterr().err
