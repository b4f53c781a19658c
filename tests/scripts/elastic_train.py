"""A Horovod Elastic training script for the tests: ``OUT EPOCHS DIE_AT``.

240 samples, batches of 5 per rank, a commit every 4 batches and at each epoch's end; each
rank logs what it trained to ``OUT/log-<attempt>-<rank>.jsonl``. On the first attempt
(torchrun's restart count, or ``$ATTEMPT``: Slurm's restart count, or the test's) rank 1 kills
itself after its step DIE_AT, as a lost worker.
"""

import json
import os
import signal
import sys

import torch
from torch import nn
from torch.nn import functional as F

import hpctrain.sync as hvd

out, epochs, die_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ["ATTEMPT"]
hvd.init()  # the torch backend under torchrun, mpi under mpirun
torch.manual_seed(0)
x = torch.randn(240, 8)
data = torch.utils.data.TensorDataset(torch.arange(240), x, (x.sum(1) > 0).long())
sampler = hvd.elastic.ElasticSampler(data, seed=3)
loader = torch.utils.data.DataLoader(data, batch_size=5, sampler=sampler)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size(), momentum=0.9)
opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
state = hvd.elastic.TorchState(model, opt, sampler=sampler, epoch=0, batch=0)



def scale_lr():
    for group in opt.param_groups:
        group["lr"] = 0.01 * hvd.size()



state.register_reset_callbacks([scale_lr])
log = open(f"{out}/log-{attempt}-{hvd.rank()}.jsonl", "w")



@hvd.elastic.run
def train(state):
    log.write(json.dumps({"start": [state.epoch, state.batch, sampler.processed_num],
                          "size": hvd.size(), "lr": opt.param_groups[0]["lr"]}) + "\n")
    steps = 0
    while state.epoch < epochs:
        for idx, xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            steps += 1
            state.batch += 1
            sampler.record_batch(state.batch, len(idx))
            log.write(json.dumps({"epoch": state.epoch, "idx": idx.tolist()}) + "\n")
            log.flush()
            if state.batch % 4 == 0:
                state.commit()
            if attempt == "0" and hvd.rank() == 1 and steps == die_at:
                os.kill(os.getpid(), signal.SIGKILL)  # a lost worker
        state.epoch += 1
        state.batch = 0
        sampler.set_epoch(state.epoch)
        state.commit()



train(state)
if hvd.rank() == 0:
    torch.save(model.state_dict(), f"{out}/model.pt")
