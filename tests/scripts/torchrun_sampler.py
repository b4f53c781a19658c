"""Run by tests/test_launch_env.py under ``torchrun --nproc-per-node 2``: which samples each
process's samplers give it, before and after torch.distributed starts, with MPI running as the
singleton world every process under torchrun gets. Writes ``<out>/rank<R>.json``."""

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from hpctrain import comm, shuffle

out = Path(sys.argv[1])
MPI = comm.init("serialized")  # a singleton: MPI alone would say one replica
found = {"mpi_world": MPI.COMM_WORLD.Get_size()}
data = TensorDataset(torch.arange(1001))
found["env_only"] = list(shuffle.GlobalShuffleSampler(data, seed=3))  # WORLD_SIZE, RANK
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
sampler = shuffle.GlobalShuffleSampler(data, seed=3)
sampler.set_epoch(1)
found["loader"] = [int(x) for (batch,) in DataLoader(data, batch_size=100, sampler=sampler)
                   for x in batch]
found["local"] = shuffle.LocalShuffleSampler(1000, seed=3, drop_last=True).indices().tolist()
found["seat"] = [sampler.num_replicas, sampler.rank]
(out / f"rank{dist.get_rank()}.json").write_text(json.dumps(found))
# Gloo's mesh may be whole on one rank before the other: a rank that destroyed the group
# then closed the socket its slower peer was still connecting (CI: "Connection closed by
# peer" on rank 1, rank 0 finished). A barrier needs the whole mesh on every rank.
dist.barrier()
dist.destroy_process_group()
