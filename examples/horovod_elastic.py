"""A Horovod Elastic script (LeNet on Fashion-MNIST) that survives a lost worker by restarting.

    HPCTRAIN_ELASTIC_DIR=ckpt torchrun --nproc-per-node 4 --max-restarts 3 \\
        examples/horovod_elastic.py
    HPCTRAIN_ELASTIC_DIR=ckpt mpirun -np 4 python examples/horovod_elastic.py   # then again,
                                                            # on any number of ranks

Everything that must survive is in ``hvd.elastic.TorchState``: the model, the optimizer, the
sampler (which samples of the epoch are trained) and the epoch and batch counters. The state
is committed every ``--batches-per-commit`` batches; rank 0 writes each commit to
``$HPCTRAIN_ELASTIC_DIR``. When a worker dies the job ends; started again (by torchrun's
restarts, a requeued Slurm job or by hand), ``hvd.elastic.run`` continues from the last
commit, on the new number of ranks: the reset callback scales the learning rate to it and the
sampler shares out the epoch's untrained samples. Change the import to ``horovod.torch`` and
it runs on Horovod Elastic (``horovodrun`` with host discovery), recovering in memory.
"""

import argparse

import torch
from torch.nn import functional as F

import hpctrain.sync as hvd
from hpctrain import data, models

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--lr", type=float, default=0.01, help="per rank; scaled by the ranks")
parser.add_argument("--batches-per-commit", type=int, default=50)
parser.add_argument("--samples", type=int, default=None, help="the first N training samples")
args = parser.parse_args()

hvd.init()
torch.set_num_threads(1)
torch.manual_seed(0)
train_set = data.load("fashion-mnist", "train", stop=args.samples)
test_set = data.load("fashion-mnist", "test", stop=2000)
dataset = torch.utils.data.TensorDataset(train_set.images, train_set.labels)
sampler = hvd.elastic.ElasticSampler(dataset, seed=0)
loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)

model = models.LeNet(train_set.shape, train_set.num_classes)
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=0.9)
optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
state = hvd.elastic.TorchState(model, optimizer, sampler=sampler, epoch=0, batch=0)


def scale_lr() -> None:
    """After a restart on another number of ranks: the learning rate follows the ranks."""
    for group in optimizer.param_groups:
        group["lr"] = args.lr * hvd.size()


state.register_reset_callbacks([scale_lr])


@hvd.elastic.run
def train(state: hvd.elastic.TorchState) -> None:
    while state.epoch < args.epochs:
        model.train()
        for images, labels in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
            state.batch += 1
            sampler.record_batch(state.batch, len(labels))
            if state.batch % args.batches_per_commit == 0:
                state.commit()
        model.eval()
        with torch.no_grad():
            right = (model(test_set.images).argmax(1) == test_set.labels).float().mean()
        if hvd.rank() == 0:
            print(f"epoch {state.epoch + 1}: test accuracy {right.item():.4f} on {hvd.size()} "
                  f"ranks, lr {optimizer.param_groups[0]['lr']:g}", flush=True)
        state.epoch += 1
        state.batch = 0
        sampler.set_epoch(state.epoch)  # at the end of the epoch: it clears the trained count
        state.commit()


train(state)
