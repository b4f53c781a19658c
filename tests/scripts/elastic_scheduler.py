"""A Horovod Elastic script whose scheduler is built on the optimizer it then wraps: ``OUT``.

64 samples, batches of 4 per rank, a commit every 2 batches, StepLR halving the learning
rate at each of 3 epochs' end. ``$ATTEMPT`` names the runs, one after the other in this
launch, each from scratch (its own model, optimizer, scheduler and state): "0", "1" (commits
in ``$HPCTRAIN_ELASTIC_DIR``) or "clean" (the run that loses nobody, commits in ``OUT/clean``),
comma-separated. On attempt "0" rank 1 exits in epoch 1, as a lost worker. Each rank logs its
learning rate after each epoch to ``OUT/lr-<attempt>-<rank>.jsonl`` and saves its model to
``OUT/model-<attempt>-<rank>.pt``.
"""

import json
import os
import sys

import torch
from torch import nn
from torch.nn import functional as F

import hpctrain.sync as hvd

out, attempts = sys.argv[1], os.environ["ATTEMPT"].split(",")
hvd.init()
commits = os.environ[hvd.elastic.ENV]


def attempt_run(attempt: str) -> None:
    # A state's commit file is named by its place among the process's states (state-0.pt
    # first): the attempts that resume each other come first in their launches.
    os.environ[hvd.elastic.ENV] = f"{out}/clean" if attempt == "clean" else commits
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1 * hvd.size(), momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)  # on the optimizer wrapped next
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    x = torch.randn(64, 4)
    data = torch.utils.data.TensorDataset(x, (x.sum(1) > 0).long())
    sampler = hvd.elastic.ElasticSampler(data, shuffle=False)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)
    state = hvd.elastic.TorchState(model, opt, sampler=sampler, scheduler=sched, epoch=0,
                                   batch=0)
    log = open(f"{out}/lr-{attempt}-{hvd.rank()}.jsonl", "w")

    @hvd.elastic.run
    def train(state):
        while state.epoch < 3:
            for xb, yb in loader:
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
                state.batch += 1
                sampler.record_batch(state.batch, len(xb))
                if state.batch % 2 == 0:
                    state.commit()
                if attempt == "0" and hvd.rank() == 1 and state.epoch == 1 \
                        and state.batch == 5:
                    os._exit(3)  # a lost worker
            sched.step()
            state.epoch += 1
            state.batch = 0
            sampler.set_epoch(state.epoch)
            log.write(json.dumps({"epoch": state.epoch, "lr": opt.param_groups[0]["lr"]})
                      + "\n")
            log.flush()

    train(state)
    log.close()
    torch.save(model.state_dict(), f"{out}/model-{attempt}-{hvd.rank()}.pt")


for attempt in attempts:
    attempt_run(attempt)
