"""GPU paths against their CPU twins: skipped, with the reason, where torch sees no GPU.

Single process: the device choice, the store's staged push with the CUDA kernel, snapshots,
a GPU run's checkpoint loaded on the host.
MPI (``mpirun -np 2 python -m pytest --with-mpi -m mpi tests/test_gpu.py``; the ranks may
share one GPU): CUDA tensors through the mpi backend (staged through pinned host memory
unless MPI is CUDA-aware) and the torch backend, DistributedOptimizer on a GPU model, model
averaging, ec's ensemble, and GPU workers pushing into one store. scripts/gpu-check.sh runs these.
"""

from __future__ import annotations

import pytest
import torch
from conftest import gpu_missing
from torch import nn
from torch.nn import functional as F

import hpctrain.sync as sync
from hpctrain import comm, devices, kernels, launch_env, provenance
from hpctrain.async_ import DCASGD, ParameterStore
from hpctrain.ec.averaging import average_model
from hpctrain.evaluate import Snapshots

pytestmark = pytest.mark.skipif(gpu_missing() is not None, reason=str(gpu_missing()))
mpi = pytest.mark.mpi(min_size=2)
timeout = pytest.mark.timeout(60)  # seconds on a GPU; a hang must not eat a short lease


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))


def flat_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])


def batches(seed: int, steps: int):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen))
            for _ in range(steps)]


def gpu() -> torch.device:
    return devices.choose("cuda")


# ---------------------------------------------------------------- single process

def local_ranks_of_mpirun(monkeypatch):
    """Set this process's environment as mpirun -np 3 would for each rank in turn: yields
    each local rank."""
    for _, *variables in launch_env.LAUNCHERS:
        for var in variables:
            monkeypatch.delenv(var, raising=False)
    for names in launch_env.LOCAL_RANKS.values():
        for var in names:
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    for local in range(3):
        monkeypatch.setenv("OMPI_COMM_WORLD_RANK", str(local))
        monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", str(local))
        yield local


def test_device_choice_follows_the_local_rank(monkeypatch):
    """choose("cuda") takes gpu_index(local rank, GPUs). With one GPU every rank gets cuda:0
    whatever it reads, so this alone would pass with the local rank ignored: the local-rank
    reading and the mapping are tests/test_devices.py's (no GPU needed), and two GPUs'
    distinct devices the next test's."""
    count = torch.cuda.device_count()
    for local in local_ranks_of_mpirun(monkeypatch):
        assert devices.local_rank() == local
        assert devices.choose("cuda") == torch.device("cuda", devices.gpu_index(local, count))
        assert torch.cuda.current_device() == devices.gpu_index(local, count)
    assert devices.choose("auto").type == "cuda" and devices.choose("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_local_ranks_take_two_gpus(monkeypatch):
    chosen = [devices.choose("cuda") for _ in local_ranks_of_mpirun(monkeypatch)]
    assert chosen[0] != chosen[1] and chosen[0].index == 0 and chosen[1].index == 1


def test_a_direct_stage_leaves_the_wait_to_the_transport():
    """HostStage.to_host() hands a direct CUDA buffer over without waiting for the stream
    (NCCL's stream waits for the current one itself, and a wait there blocked every bucket's
    gradient hook); mpi_buffer, MPI's only way to device memory, does wait."""
    dev = gpu()
    t = torch.ones(1024, device=dev)
    stream = torch.cuda.current_stream(dev)
    torch.cuda._sleep(10**9)  # GPU cycles: about half a second of queued work
    stage = devices.HostStage(t, direct=True)
    assert stage.to_host() is t and not stream.query()  # still queued: not waited for
    assert devices.mpi_buffer(t) is t and stream.query()


def test_a_seeded_convolution_trains_to_the_same_weights_twice(monkeypatch):
    """cudnn_mode() asks cuDNN for deterministic algorithms while a run trains: a second run
    of the same seed (convolutions' weight gradients included) ends with the same weights,
    bit for bit; the process's own cuDNN settings come back afterwards."""
    dev = gpu()
    cudnn = torch.backends.cudnn
    monkeypatch.setattr(cudnn, "benchmark", True)  # a script's own choice
    monkeypatch.setattr(cudnn, "deterministic", False)
    finals = []
    for _ in range(2):
        with devices.cudnn_mode("cuda"):
            assert cudnn.deterministic and not cudnn.benchmark
            torch.manual_seed(5)
            model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3),
                                  nn.Flatten(), nn.Linear(8 * 24 * 24, 10)).to(dev)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            gen = torch.Generator().manual_seed(6)
            for _ in range(10):
                x = torch.randn(32, 1, 28, 28, generator=gen)
                y = torch.randint(0, 10, (32,), generator=gen)
                opt.zero_grad()
                F.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
                opt.step()
            finals.append(flat_of(model))
    assert torch.equal(finals[0], finals[1])
    assert cudnn.benchmark and not cudnn.deterministic


def test_cudnn_benchmark_is_asked_for_and_put_back(monkeypatch):
    cudnn = torch.backends.cudnn
    monkeypatch.setattr(cudnn, "benchmark", False)
    monkeypatch.setattr(cudnn, "deterministic", True)
    with devices.cudnn_mode("cuda", benchmark=True):
        assert cudnn.benchmark and not cudnn.deterministic
    assert not cudnn.benchmark and cudnn.deterministic


def test_a_gpu_run_records_the_gpu_and_its_libraries():
    info = provenance.software(torch.device("cuda", 0))
    assert info["gpu"] == torch.cuda.get_device_name(0)
    assert info["cuda"] == torch.version.cuda and info["cudnn"] is not None


@pytest.mark.parametrize("shared_memory", [None, False], ids=["shared", "get-put"])
@pytest.mark.parametrize("consistency", ["locked", "atomic"])
def test_one_gpu_worker_pushes_like_a_cpu_worker(consistency, shared_memory):
    """The staged push (read shard, CUDA kernel, write back) gives the CPU path's model, with
    the shards in shared memory and read and written through MPI (Get and Put or Accumulate
    into the pinned host buffers)."""
    data = batches(7, 20)
    finals, staleness = {}, {}
    for device in ("cpu", gpu()):
        model = small_model().to(device)
        with ParameterStore(flat_of(model), comm.mpi().COMM_SELF, shards=3,
                            consistency=consistency, shared_memory=shared_memory) as store:
            opt = DCASGD(model, store, lr=0.05, lam=2.0, adaptive=True, momentum=0.9,
                         weight_decay=1e-3)
            for x, y in data:
                opt.zero_grad()
                F.cross_entropy(model(x.to(device)), y.to(device)).backward()
                opt.step()
            global_model = torch.empty(store.numel)
            store.pull(global_model)
            store.finish()
        assert torch.equal(global_model, flat_of(model))  # the worker holds what it wrote
        finals[str(device)], staleness[str(device)] = global_model, opt.staleness
    cpu, cuda = finals.pop("cpu"), next(iter(finals.values()))
    torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-5)
    assert all(s.counts == {0: 20} for s in staleness.values())


def test_pull_into_gpu_memory_and_cuda_kernel_library():
    kernels.cuda_library()  # built by setup.py with nvcc
    values = torch.arange(100, dtype=torch.float32)
    with ParameterStore(values, comm.mpi().COMM_SELF, shards=4) as store:
        out = torch.empty(100, device=gpu())
        assert store.pull(out) == 0
        assert torch.equal(out.cpu(), values)
        store.finish()


def test_snapshots_of_a_gpu_model_live_on_the_host():
    model = small_model().to(gpu())
    snaps = Snapshots()
    snaps.take(model, t=0.0)
    assert all(t.device.type == "cpu" for t in snaps[0].state.values())
    model.load_state_dict(snaps[0].state)


def tensors_in(obj) -> list[torch.Tensor]:
    """Every tensor in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors_in(item)]
    return []


def test_a_gpu_runs_checkpoint_holds_host_tensors_and_resumes_anywhere(tmp_path):
    """A checkpoint written from a GPU model and optimizer holds host tensors only (the model,
    the momentum buffers, the GPU generator's state), so that a reader without a GPU loads
    it; it resumes a CPU model and a GPU one alike (the optimizer's state on the parameters'
    device), and the GPU generator draws again what it drew after the checkpoint."""
    from hpctrain import checkpoint

    dev = gpu()
    model = small_model().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batches(3, 1)[0]
    F.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
    opt.step()
    snaps = Snapshots()
    snaps.take(model, updates=1)
    header = {"algo": "sgd", "ranks": 1, "args": {}}
    ckpt = checkpoint.Checkpointer(None, 10, 40, shared={"model": model}, per_rank={"opt": opt},
                                   every="1e", folder=tmp_path, resume=None, header=header)
    ckpt.save(1, {}, snaps)
    after = torch.rand(3, device=dev)  # drawn from the state the checkpoint holds
    found = checkpoint.load_newest(tmp_path)
    assert isinstance(found, checkpoint.Loaded)
    held = tensors_in(found.payload)
    assert held and all(t.device.type == "cpu" for t in held)
    assert "cuda" in found.payload["ranks"][0]["rng"]
    for device in (torch.device("cpu"), dev):
        fresh = small_model(seed=1).to(device)
        fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
        resumed = checkpoint.Checkpointer(None, 10, 40, shared={"model": fresh},
                                          per_rank={"opt": fresh_opt}, every="1e",
                                          folder=tmp_path, resume=str(tmp_path), header=header)
        assert resumed.restore(Snapshots(), found)["updates"] == 1
        assert torch.equal(flat_of(fresh), flat_of(model))
        momentum = [fresh_opt.state[p]["momentum_buffer"] for p in fresh.parameters()]
        assert all(b.device == device for b in momentum)
        assert torch.equal(torch.rand(3, device=dev), after)


def test_each_virtual_worker_draws_from_its_own_gpu_stream():
    """The simulator's workers each keep the GPU generator's state too (a model's dropout on
    the GPU draws from it): worker k's draws are one stream's from the state at the start."""
    from hpctrain.sim.scheduler import Scheduler, WorkerStreams

    torch.manual_seed(7)
    streams = WorkerStreams(2, gpu())
    alone = [torch.rand(1, device=gpu()).item() for _ in range(3)]
    scheduler = Scheduler(2)

    def body(k: int) -> list:
        draws = []
        for step in range(3):
            draws.append(torch.rand(1, device=gpu()).item())
            scheduler.at(k, step * (k + 1))
        return draws

    assert scheduler.run(body, streams) == [alone] * 2


def test_nccl_in_one_process_moves_and_reduces_cuda_tensors():
    """One rank with a GPU of its own takes NCCL for CUDA tensors (ranks sharing a GPU, as
    in the MPI tests below, take gloo), so NCCL's own calls run here: all_reduce,
    reduce_scatter, all_to_all_single, broadcast, all_gather, and the integers NCCL has no
    type for."""
    from hpctrain.sync import collectives

    dev = gpu()
    sync.init(backend="torch")
    try:
        assert collectives.world("test").transport.nccl
        t = torch.arange(6.0, device=dev)
        for got in (sync.allreduce(t, op=sync.Sum), sync.reducescatter(t, op=sync.Sum),
                    sync.alltoall(t), sync.broadcast(t, 0), sync.allgather(t)):
            assert got.device == dev and torch.equal(got, t)
        small = torch.tensor([1, 2], dtype=torch.int16, device=dev)
        assert sync.allreduce(small, op=sync.Sum).tolist() == [1, 2]
        assert torch.equal(sync.broadcast(small, 0), small)
    finally:
        sync.shutdown()


# ---------------------------------------------------------------- MPI, ranks sharing GPUs

@pytest.fixture
def hvd(own_backend):
    return own_backend


@mpi
@timeout
def test_collectives_take_cuda_tensors(hvd):
    r, n = hvd.rank(), hvd.size()
    dev = gpu()
    t = torch.arange(6.0, device=dev) + r
    expected = torch.arange(6.0) * n + n * (n - 1) / 2
    out = hvd.allreduce(t, op=hvd.Sum)
    assert out.device == dev and torch.equal(out.cpu(), expected)
    hvd.allreduce_(t, op=hvd.Average)
    torch.testing.assert_close(t.cpu(), expected / n)
    half = hvd.allreduce(torch.full((4,), 0.5, dtype=torch.float16, device=dev), op=hvd.Sum)
    assert torch.equal(half.cpu(), torch.full((4,), 0.5 * n, dtype=torch.float16))
    gathered = hvd.allgather(torch.full((r + 1, 2), float(r), device=dev))
    assert gathered.device == dev and gathered.shape == (n * (n + 1) // 2, 2)
    b = torch.full((3,), float(r), device=dev)
    hvd.broadcast_(b, root_rank=n - 1)
    assert torch.equal(b.cpu(), torch.full((3,), float(n - 1)))
    if n & (n - 1) == 0:  # Adasum of orthogonal vectors is their sum, of equal ones the one
        e = torch.zeros(n, device=dev)
        e[r] = r + 1.0
        summed = hvd.allreduce(e, op=hvd.Adasum)
        assert summed.device == dev and summed.cpu().tolist() == [k + 1.0 for k in range(n)]
        same = hvd.allreduce(torch.full((5,), 2.0, device=dev), op=hvd.Adasum)
        torch.testing.assert_close(same.cpu(), torch.full((5,), 2.0))


@mpi
@timeout
def test_horovod_extensions_take_cuda_tensors(hvd):
    """grouped ops, alltoall, reducescatter, a process set, join and SyncBatchNorm on CUDA."""
    r, n = hvd.rank(), hvd.size()
    dev = gpu()
    a, b = torch.full((3,), float(r), device=dev), torch.ones(2, 2, device=dev, dtype=torch.half)
    ga, gb = hvd.grouped_allreduce([a, b], op=hvd.Sum)
    assert ga.device == dev and torch.equal(ga.cpu(), torch.full((3,), n * (n - 1) / 2))
    assert torch.equal(gb.cpu(), torch.full((2, 2), float(n), dtype=torch.half))
    rows, = hvd.grouped_allgather([torch.full((r + 1,), float(r), device=dev)])
    assert rows.device == dev and rows.numel() == n * (n + 1) // 2
    out, got = hvd.alltoall(torch.arange(float(n), device=dev) + 10 * r,
                            splits=torch.ones(n, dtype=torch.int32))
    assert out.device == dev and out.cpu().tolist() == [10.0 * k + r for k in range(n)]
    assert got.tolist() == [1] * n
    part = hvd.reducescatter(torch.ones(n, 2, device=dev), op=hvd.Sum)
    assert part.device == dev and torch.equal(part.cpu(), torch.full((1, 2), float(n)))
    ps = hvd.add_process_set(list(range(n - 1)))  # all but the last rank
    if r < n - 1:
        s = hvd.allreduce(torch.ones(2, device=dev), op=hvd.Sum, process_set=ps)
        assert s.device == dev and torch.equal(s.cpu(), torch.full((2,), n - 1.0))
    hvd.remove_process_set(ps)
    if r == 0:
        avg = hvd.allreduce(torch.full((2,), float(n), device=dev))  # the others joined
        assert torch.equal(avg.cpu(), torch.ones(2))
    assert hvd.join() == 0
    bn = hvd.SyncBatchNorm(2).to(dev)
    y = bn(torch.randn(4, 2, 3, device=dev))
    assert y.device == dev and bn.running_mean.device == dev


@mpi
@timeout
def test_distributed_optimizer_on_a_gpu_model_equals_the_cpu_one(hvd):
    r = hvd.rank()
    results = {}
    for device in ("cpu", gpu()):
        model = small_model().to(device)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1,
                                                       momentum=0.9),
                                       named_parameters=model.named_parameters(),
                                       bucket_bytes=256)
        for x, y in batches(100 + r, 5):
            opt.zero_grad()
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
        results[str(device)] = flat_of(model)
    cpu = results.pop("cpu")
    torch.testing.assert_close(next(iter(results.values())), cpu, rtol=1e-4, atol=1e-5)


@mpi
@timeout
def test_staged_gpu_buckets_copy_without_waiting_and_reduce_exactly(hvd):
    """ssgd on the GPU with several buckets, staged through pinned host memory (the kit's
    Open MPI, and gloo for ranks sharing a GPU): each bucket's copy to the host is started
    in its hook without waiting for the GPU (half a second of queued GPU work is still
    queued when backward returns, and the last bucket waits for synchronize), and three
    steps of SGD with momentum equal one GPU's on every rank's batch at once, with nothing
    reduced: a bucket launched before its copy was done would reduce stale values."""
    r, n = hvd.rank(), hvd.size()
    dev = gpu()
    stream = torch.cuda.current_stream(dev)
    model = small_model().to(dev, torch.float64)
    reference = small_model().to(dev, torch.float64)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                   named_parameters=model.named_parameters(), bucket_bytes=256)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    assert len(opt.bucket_sizes) == 4  # one per parameter
    staged = all(b.stage.staged for b in opt._reducer._buckets)
    for step in range(3):
        data = [batches(100 * step + k, 1)[0] for k in range(n)]
        x, y = (t.to(dev) for t in data[r])
        x = x.double()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        torch.cuda._sleep(10**9)  # GPU cycles: about half a second queued before backward
        loss.backward()
        if staged:
            assert not stream.query() and opt.buckets_started < len(opt.bucket_sizes)
        opt.step()
        ref_opt.zero_grad()
        F.cross_entropy(reference(torch.cat([x for x, _ in data]).to(dev).double()),
                        torch.cat([y for _, y in data]).to(dev)).backward()
        ref_opt.step()
    torch.testing.assert_close(flat_of(model), flat_of(reference), rtol=1e-12, atol=1e-12)


@mpi
@timeout
def test_sparse_gradients_of_a_gpu_embedding_equal_the_cpu_ones(hvd):
    """An embedding with sparse gradients on the GPU: reduced by allgather on the device (or
    staged), three steps of SGD equal the CPU run's."""
    r = hvd.rank()
    results = {}
    for device in ("cpu", gpu()):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(20, 4, sparse=True), torch.nn.Flatten(),
                                    torch.nn.Linear(8, 1)).to(device)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       named_parameters=model.named_parameters())
        for step in range(3):
            opt.zero_grad()
            tokens = torch.tensor([[r + step, 7], [2 * r, 19 - r]], device=device)
            model(tokens).pow(2).mean().backward()
            opt.step()
            grad = model[0].weight.grad
            assert grad.is_sparse and grad.device == torch.device(device)
        results[str(device)] = flat_of(model)
    cpu = results.pop("cpu")
    torch.testing.assert_close(next(iter(results.values())), cpu, rtol=1e-5, atol=1e-6)


@mpi
@timeout
def test_model_averaging_of_gpu_models():
    world = comm.world()
    r, n = world.Get_rank(), world.Get_size()
    models = {d: small_model(seed=r).to(d) for d in ("cpu", str(gpu()))}
    for m in models.values():
        average_model(m, world)
    torch.testing.assert_close(flat_of(models[str(gpu())]), flat_of(models["cpu"]))
    expected = sum(flat_of(small_model(seed=k)) for k in range(n)) / n
    torch.testing.assert_close(flat_of(models["cpu"]), expected)


@mpi
@timeout
@pytest.mark.parametrize("shared", [False, True])
def test_ensemble_probabilities_of_gpu_models(shared):
    """ec's ensemble of GPU members (each rank's own model and number of samples): the same
    probabilities as of the CPU members, in host memory; samples given on the GPU (a user's
    own loop's) too."""
    from hpctrain.ec.ensemble import ensemble_probabilities

    world = comm.world()
    r = world.Get_rank()
    x = torch.randn(5 + r, 16, generator=torch.Generator().manual_seed(r))
    y = torch.randint(0, 4, (5 + r,), generator=torch.Generator().manual_seed(r))
    probs = {}
    for device in ("cpu", str(gpu())):
        out = ensemble_probabilities(small_model(seed=r).to(device), world, 2.0, 4, images=x,
                                     labels=y, shared=shared)
        assert out.probs.device.type == "cpu"
        probs[device] = out.probs
    torch.testing.assert_close(probs[str(gpu())], probs["cpu"])
    on_gpu = ensemble_probabilities(small_model(seed=r).to(gpu()), world, 2.0, 4,
                                    images=x.to(gpu()), labels=y.to(gpu()), shared=shared)
    torch.testing.assert_close(on_gpu.probs, probs["cpu"])


@mpi
@timeout
@pytest.mark.parametrize("consistency", ["locked", "atomic"])
def test_gpu_workers_lose_no_update(consistency):
    """Integer steps from every GPU worker: the store's final values count each one."""
    world = comm.world()
    numel, steps = 3000, 15
    start = torch.arange(numel, dtype=torch.float32)
    with ParameterStore(start, world, shards=3, consistency=consistency) as store:
        w = torch.empty(numel, device=gpu())
        store.pull(w)
        world.Barrier()
        g = torch.full((numel,), float(world.Get_rank() + 1), device=gpu())
        for _ in range(steps):
            store.push(w, g, lr=1.0)
        world.Barrier()
        final = torch.empty(numel)
        store.pull(final)
        total = steps * sum(k + 1 for k in range(world.Get_size()))
        assert torch.equal(start - final, torch.full((numel,), float(total)))
        assert store.updates() == steps * world.Get_size()
        store.finish()
