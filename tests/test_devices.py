"""The device layer's CPU side: the choice, the local rank, host staging, and what a GPU
run asks of MPI (tests/test_gpu.py runs the GPU side where torch sees one)."""

import pytest
import torch

from hpctrain import devices
from hpctrain.errors import UsageError


def test_the_local_rank_comes_from_the_launchers_environment(monkeypatch):
    for var in devices._LOCAL_RANK_ENV:
        monkeypatch.delenv(var, raising=False)
    assert devices.local_rank() == 0
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert devices.local_rank() == 3
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")  # mpirun's, inside an allocation
    assert devices.local_rank() == 1
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_RANK")
    monkeypatch.setenv("SLURM_LOCALID", "0")  # srun's one task on the node ...
    monkeypatch.setenv("LOCAL_RANK", "2")  # ... ran torchrun, whose worker this is
    assert devices.local_rank() == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_without_a_gpu_cuda_is_refused_and_auto_is_the_cpu():
    with pytest.raises(UsageError, match="--device cuda: .*; use --device cpu or auto"):
        devices.check("cuda")
    with pytest.raises(UsageError, match="unknown device 'gpu'"):
        devices.check("gpu")
    assert devices.resolve("auto") == "cpu" and devices.choose("auto") == torch.device("cpu")
    devices.synchronize(torch.device("cpu"))  # nothing to wait for


@pytest.mark.parametrize("benchmark", [False, True])
def test_a_cpu_run_leaves_cudnns_settings_alone(benchmark):
    cudnn = torch.backends.cudnn
    before = cudnn.deterministic, cudnn.benchmark
    with devices.cudnn_mode("cpu", benchmark):
        assert (cudnn.deterministic, cudnn.benchmark) == before


def test_a_host_stage_copies_out_and_back_only_when_staged():
    t = torch.arange(6.0)
    direct = devices.HostStage(t)  # a CPU tensor: MPI reads it where it is
    assert not direct.staged and direct.to_host() is t and direct.to_device() is t
    staged = devices.HostStage(t, direct=False)
    assert staged.staged and staged.to_host().data_ptr() != t.data_ptr()
    assert torch.equal(staged.buffer, t)
    staged.buffer.mul_(2)  # what an allreduce wrote
    assert torch.equal(staged.to_device(), torch.arange(0.0, 12.0, 2.0)) and staged.tensor is t


def test_the_cuda_aware_override_is_read_on_every_call(monkeypatch):
    """HPCTRAIN_CUDA_AWARE_MPI wins over the library's answer, also after an earlier call
    (only the library's answer is kept, and only once MPI runs)."""
    monkeypatch.setenv(devices._AWARE_ENV, "1")
    assert devices.cuda_aware_mpi() is True
    monkeypatch.setenv(devices._AWARE_ENV, "0")
    assert devices.cuda_aware_mpi() is False
