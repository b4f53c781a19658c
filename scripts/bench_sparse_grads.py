"""What reducing an embedding's sparse gradient by allgather saves over sparse_as_dense.

    mpirun -np K python scripts/bench_sparse_grads.py [ROWS ...]      e.g. 1e5 1e6

An ``nn.Embedding(ROWS, 64, sparse=True)`` and a linear layer; each rank looks up 2048
random tokens a step. For each table size, a ``DistributedOptimizer`` (plain SGD) reduces the
embedding's gradient sparse (the default) and then as dense (``sparse_as_dense=True``), on
hpctrain's mpi backend and, where it imports, on Horovod. Prints the median of 10 timed steps
(forward, backward, ``step()``) after 2 warm-up steps, on rank 0, and sparse / dense.
"""

import statistics
import sys
import time
import warnings

import torch
from torch import nn

import hpctrain.sync as hvd

DIM, TOKENS, WARMUP, REPEATS = 64, 2048, 2, 10
rows = [int(float(a)) for a in sys.argv[1:] or ["1e5", "1e6"]]
torch.set_num_threads(1)
warnings.simplefilter("ignore")


def median_step_ms(n_rows: int, sparse_as_dense: bool) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(n_rows, DIM, sparse=True), nn.Linear(DIM, 1))
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                   named_parameters=model.named_parameters(),
                                   sparse_as_dense=sparse_as_dense)
    gen = torch.Generator().manual_seed(hvd.rank())
    times = []
    for i in range(WARMUP + REPEATS):
        tokens = torch.randint(0, n_rows, (TOKENS,), generator=gen)
        hvd.barrier()
        start = time.perf_counter()
        opt.zero_grad()
        model(tokens).sum().backward()
        opt.step()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    slowest = hvd.allreduce(torch.tensor(statistics.median(times)), op=hvd.Max)
    return float(slowest) * 1e3


backends = ["mpi"]
try:
    import horovod.torch  # noqa: F401
    backends.append("horovod")
except Exception:  # noqa: BLE001
    pass
for backend in backends:
    hvd.init(backend=backend)
    for n in rows:
        sparse, dense = median_step_ms(n, False), median_step_ms(n, True)
        if hvd.rank() == 0:
            print(f"{hvd.size()} ranks, {backend:>7}, {n:>9,} rows x {DIM}: step sparse "
                  f"{sparse:8.1f} ms, as dense {dense:8.1f} ms, sparse / dense "
                  f"{sparse / dense:.3f}", flush=True)
    hvd.shutdown()
