"""The device layer's CPU side: the choice, the local rank, host staging, and what a GPU
run asks of MPI (tests/test_gpu.py runs the GPU side where torch sees one)."""

import re
import sys

import pytest
import torch

from hpctrain import comm, compiled, devices, launch_checks, launch_env, options, precision
from hpctrain.config import RunConfig
from hpctrain.errors import UsageError
from hpctrain.sync.transport import MPITransport


def clear_launchers(monkeypatch):
    for _, size_var, rank_var in launch_env.LAUNCHERS:
        monkeypatch.delenv(size_var, raising=False)
        monkeypatch.delenv(rank_var, raising=False)
    for names in launch_env.LOCAL_RANKS.values():
        for var in names:
            monkeypatch.delenv(var, raising=False)
    for var in launch_env.SLURM_STEP:
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("placed", [
    {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3",
     "OMPI_COMM_WORLD_LOCAL_RANK": "{local}", "LOCAL_RANK": "0"},  # mpirun (a stray LOCAL_RANK)
    {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "{local}"},  # torchrun
    {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_STEP_ID": "0",
     "SLURM_LOCALID": "{local}"},  # srun
], ids=["mpirun", "torchrun", "srun"])
def test_the_local_rank_comes_from_the_launchers_environment(monkeypatch, placed):
    """The rules are launch_env.local_rank's (tests/test_launch_env.py); here, that the GPU
    choice reads this process's environment through them: each launcher's local-rank
    variable, whichever value it holds (a choice that ignored it would give 0 throughout)."""
    clear_launchers(monkeypatch)
    assert devices.local_rank() == 0
    # Four GPUs (none here: their count stubbed), so that the choice shows the local rank.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for local in (1, 2, 3):
        for var, value in placed.items():
            monkeypatch.setenv(var, value.format(local=local))
        assert devices.local_rank() == local
        assert devices.local_gpu() == torch.device("cuda", local)


def test_ranks_go_round_the_gpus():
    """local_gpu's mapping, the one shares_gpus assumes: rank k takes GPU k % count, so two
    local ranks take two GPUs where there are two (tests/test_gpu.py checks the device that
    choose gives against it)."""
    assert [devices.gpu_index(local, 1) for local in range(3)] == [0, 0, 0]
    assert [devices.gpu_index(local, 2) for local in range(5)] == [0, 1, 0, 1, 0]
    assert [devices.gpu_index(local, 4) for local in range(6)] == [0, 1, 2, 3, 0, 1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_without_a_gpu_cuda_is_refused_and_auto_is_the_cpu():
    with pytest.raises(UsageError, match="^--device cuda: .*; use --device cpu or auto$"), \
            options.command_line():  # as typed; from Python the field (test below)
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


@pytest.mark.parametrize("value, forced", [("true", True), (" On ", True), ("yes", True),
                                           ("FALSE", False), ("off", False), ("no", False)])
def test_the_cuda_aware_override_takes_hpctrains_on_off_spellings(monkeypatch, value, forced):
    """``true`` was ignored (only 0 and 1 were read): the library's answer stayed in force."""
    monkeypatch.setenv(devices._AWARE_ENV, value)
    assert devices.cuda_aware_mpi() is forced
    devices.check("cpu")


def test_a_misspelt_cuda_aware_override_is_refused_before_mpi(monkeypatch):
    """``launch_checks.check_compute`` calls devices.check before MPI starts, whatever the
    device."""
    monkeypatch.setenv(devices._AWARE_ENV, "maybe")
    message = "HPCTRAIN_CUDA_AWARE_MPI must be 1 or 0 (true/false, yes/no, on/off), got 'maybe'"
    with pytest.raises(UsageError, match=re.escape(message)):
        devices.check("cpu")
    with pytest.raises(UsageError, match=re.escape(message)):
        devices.cuda_aware_mpi()


def test_open_mpi_gets_no_device_memory_in_non_blocking_collectives(monkeypatch):
    """Open MPI's CUDA support covers point-to-point calls and blocking collectives only; its
    non-blocking collectives, which the mpi transport and model averaging move tensors with,
    reduce and copy in host code and fault on device pointers (open-mpi/ompi#9845): there a
    device tensor is staged through host memory even where the library is CUDA-aware."""
    assert not devices.device_memory_in_nonblocking("Open MPI v4.1.5, package: Debian")
    assert devices.device_memory_in_nonblocking("MPICH Version:      4.2.0")
    assert devices.device_memory_in_nonblocking("Intel(R) MPI Library 2021.12")
    # This job's MPI, as CUDA-aware: a device tensor (a meta one stands for it here) goes to
    # MPI directly unless the library is Open MPI, by HostStage and by the transport alike.
    MPI = comm.mpi()
    monkeypatch.setenv(devices._AWARE_ENV, "1")
    direct = "Open MPI" not in MPI.Get_library_version()
    device_tensor = torch.empty(4, device="meta")
    assert devices.mpi_takes_device_memory() is direct
    assert devices.HostStage(device_tensor).staged is not direct
    transport = MPITransport(MPI.COMM_SELF)
    try:
        assert transport.takes(device_tensor) is direct
        assert transport.takes(torch.empty(4))  # host memory: always
    finally:
        transport.free()
    monkeypatch.setenv(devices._AWARE_ENV, "0")
    assert not devices.mpi_takes_device_memory() and devices.HostStage(device_tensor).staged


def test_ranks_share_a_gpu_when_two_of_a_node_would_take_the_same_one():
    shares_gpus = devices.shares_gpus
    assert not shares_gpus([("a", 0, []), ("a", 1, [])])  # no GPU: nothing shared
    assert shares_gpus([("a", 0, ["G0"]), ("a", 1, ["G0"])])  # two ranks, one GPU
    # Each rank sees all of the node's GPUs and takes its local rank's (Horovod's way);
    # with more ranks than GPUs two take one.
    assert not shares_gpus([("a", 0, ["G0", "G1"]), ("a", 1, ["G0", "G1"])])
    assert shares_gpus([("a", r, ["G0", "G1"]) for r in range(3)])
    # Each rank sees only its own GPU, as its device 0 (Slurm's --gpus-per-task).
    assert not shares_gpus([("a", 0, ["G0"]), ("a", 1, ["G1"]), ("b", 0, ["G0"]),
                            ("b", 1, ["G1"])])
    assert shares_gpus([("a", 0, ["G0"]), ("a", 1, ["G1"]), ("b", 0, ["G0"]), ("b", 1, ["G0"])])
    # --gpu-bind=closest on two sockets: tasks 0 and 2 see the first socket's two GPUs,
    # 1 and 3 the second's; ranks 0 and 2 both take G0 (and 1 and 3 G3), though the node has
    # as many GPUs as ranks.
    first, second = ["G0", "G1"], ["G2", "G3"]
    assert shares_gpus([("a", 0, first), ("a", 1, second), ("a", 2, first), ("a", 3, second)])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="only Linux resets the peak")
def test_a_runs_peak_memory_counts_from_its_start_not_the_processs():
    """A script's second run reported the first one's peak (ru_maxrss never goes down)."""
    cpu = torch.device("cpu")
    earlier = torch.ones(256 * 2**20, dtype=torch.uint8)  # 256 MiB, touched: resident
    held = devices.peak_memory(cpu)
    del earlier  # an earlier run's memory, given back (munmap)
    devices.choose("cpu")  # a run's start
    assert devices.peak_memory(cpu) < held - 128 * 2**20


def _no_gpu() -> RunConfig:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    return RunConfig(algo="sgd", device="cuda")


def _no_cxx(monkeypatch, tmp_path) -> RunConfig:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no compiler on PATH
    monkeypatch.delenv("CXX", raising=False)
    return RunConfig(algo="sgd", device="cpu", compile=True)


def _old_torch(monkeypatch) -> RunConfig:
    """torch < 2.3 (no CPU loss scaler): the real one under scripts/compat-check.sh's 2.1."""
    if hasattr(torch.amp, "GradScaler"):
        monkeypatch.delattr(torch.amp, "GradScaler")
    return RunConfig(algo="sgd", device="cpu", mixed_precision="fp16")


def _old_gpu(monkeypatch) -> RunConfig:
    """A V100 (compute capability 7.0) as this rank's GPU: none here, so stubbed."""
    monkeypatch.setattr(devices, "local_gpu", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda gpu=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda gpu=None: "Tesla V100")
    return RunConfig(algo="sgd", mixed_precision="bf16")


@pytest.mark.parametrize("case", ["device", "compile", "fp16_cpu", "bf16_old_gpu"])
def test_what_this_machine_lacks_names_the_fields_from_python(monkeypatch, tmp_path, case):
    """The checks of what this machine can run (RunConfig's device, mixed_precision and
    compile, checked before MPI starts) said "--device cuda: ...; use --device cpu or auto",
    "--mixed-precision fp16 on the CPU ...", "--compile on the CPU needs ..." to a caller of
    hpctrain.train(RunConfig(...)), who typed no flag: the fields now; the command line's
    words are as they were."""
    if case == "device":
        config = _no_gpu()
        python = r"RunConfig\.device='cuda': .+; use RunConfig\.device='cpu' or 'auto'"
        typed = r"--device cuda: .+; use --device cpu or auto"
    elif case == "compile":
        config = _no_cxx(monkeypatch, tmp_path)
        why = re.escape(str(compiled.problem("cpu")))
        python, typed = rf"RunConfig\.compile=True {why}", rf"--compile {why}"
    elif case == "fp16_cpu":
        config = _old_torch(monkeypatch)
        said = re.escape(f" on the CPU needs torch >= 2.3, not {torch.__version__}; use ")
        python = rf"RunConfig\.mixed_precision='fp16'{said}'bf16'"
        typed = rf"--mixed-precision fp16{said}bf16"
    else:
        config = _old_gpu(monkeypatch)
        said = re.escape(": Tesla V100 (compute capability 7.0) has no native bfloat16; use ")
        python = rf"RunConfig\.mixed_precision='bf16'{said}RunConfig\.mixed_precision='fp16'"
        typed = rf"--mixed-precision bf16{said}--mixed-precision fp16"
    check = (lambda: precision.check(config.mixed_precision, "cuda")) if case == "bf16_old_gpu" \
        else (lambda: launch_checks.check_compute(config))
    with pytest.raises(UsageError) as refused:
        check()
    assert re.fullmatch(python, str(refused.value)), str(refused.value)
    with pytest.raises(UsageError) as refused, options.command_line():
        check()
    assert re.fullmatch(typed, str(refused.value)), str(refused.value)
