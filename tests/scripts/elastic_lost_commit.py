"""A failure right after a commit of a large state: ``MODE`` (``raise0``: rank 0 raises;
``kill1``: rank 1 is SIGKILLed; ``stall1``: rank 1 stops, and rank 0's stall timeout ends
the job while its write of commit 2, slowed, is under way) once every rank has made commit 2
(the collective of each step: none goes on alone), on the first attempt
(torchrun's restart count, or ``$ATTEMPT``). Rank 0's write of that commit (16 MB) is still
under way when the failure comes; the restart must resume from it, not from commit 1."""

import os
import signal
import sys
import time

import torch
from torch import nn

import hpctrain.sync as hvd

mode = sys.argv[1]
attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ["ATTEMPT"]
if mode == "stall1" and attempt == "0":
    from hpctrain.sync import elastic

    writes, write = [], elastic.write_atomic

    def slow_write(*args, **kwargs):  # commit 2's write outlasts the stall timeout
        writes.append(1)
        if len(writes) == 2:
            time.sleep(10)
        write(*args, **kwargs)

    elastic.write_atomic = slow_write
    hvd.init(stall_check_s=0, stall_timeout=3)
else:
    hvd.init()
torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Linear(2000, 2000)  # 4M parameters
state = hvd.elastic.TorchState(model, step=0)


@hvd.elastic.run
def train(state):
    print(f"rank {hvd.rank()} starts at step {state.step}", flush=True)
    while state.step < 6:
        hvd.allreduce(torch.zeros(1), name="step")  # a training step's collective
        state.step += 1
        if state.step % 2 == 0:
            state.commit()
            if attempt == "0" and state.step == 4:
                # every rank past its commit 2 (a commit has no collective of its own): rank
                # 0's write is under way, not still to start, when the failure comes
                hvd.allreduce(torch.zeros(1), name="committed")
                if mode == "raise0" and hvd.rank() == 0:
                    raise ValueError("a bad batch")
                if mode == "kill1" and hvd.rank() == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
                if mode == "stall1" and hvd.rank() == 1:
                    time.sleep(120)  # rank 0 waits in the next step's collective


train(state)
