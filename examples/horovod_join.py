"""A Horovod script whose ranks have different numbers of batches, ending with hvd.join().

    mpirun -np 2 python examples/horovod_join.py

Rank r trains on 3 + r batches. Without join() the ranks with more batches would wait
forever in an allreduce the others never call; with it, a rank that has run out of data
contributes zeros to the others' gradient averages until every rank has joined. Change the
import to ``horovod.torch`` and it runs on Horovod unchanged.
"""

import torch
from torch import nn
from torch.nn import functional as F

import hpctrain.sync as hvd

hvd.init()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.05 * hvd.size())
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())

g = torch.Generator().manual_seed(hvd.rank())
batches = 3 + hvd.rank()
for _ in range(batches):
    x = torch.randn(16, 8, generator=g)
    y = (x.sum(1) > 0).long()
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
last = hvd.join()
print(f"rank {hvd.rank()}: {batches} batches, joined; the last rank to join was {last}",
      flush=True)
