"""Two ranks calling two collectives in opposite order: one error in seconds, not a hang.

    mpirun -np 2 python examples/horovod_mismatch.py

Under MPI (and Horovod, whose stall check only warns) this script would wait until the
job's time limit. hpctrain.sync checks each collective's name, op, dtype and shape before it
runs, so every rank raises ``CollectiveMismatchError`` naming both calls, and the job ends.
"""

import torch

import hpctrain.sync as hvd

hvd.init()
loss = torch.tensor([0.5])
grads = torch.ones(4, 3)
if hvd.rank() == 0:
    hvd.allreduce(loss, name="loss")
    hvd.allgather(grads, name="grads")
else:
    hvd.allgather(grads, name="grads")
    hvd.allreduce(loss, name="loss")
print("not reached", flush=True)
