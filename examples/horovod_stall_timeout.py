"""A rank that stops calling collectives: a report after 1 s, the job ended after 3 s.

    mpirun -np 2 python examples/horovod_stall_timeout.py

``hvd.init(stall_check_s=..., stall_timeout=...)`` (or Horovod's variables
HOROVOD_STALL_CHECK_TIME_SECONDS and HOROVOD_STALL_SHUTDOWN_TIME_SECONDS) makes a rank that
waits in a collective print which ranks have not arrived and what they last called, then
end the job, as ``hpctrain train --stall-timeout`` does. The check looks every quarter of
the shorter time (at most every second), so rank 0 finds the wait within 0.25 s of each
mark here: "waited 1 s ... still waiting", then "waited 3 s ... ending the job (stall
timeout 3 s)". Each line comes once rank 1 answered what it last called (the ending one
waits two polls for it), and the job exits with status 3, as hpctrain.watchdog's.
"""

import time

import torch

import hpctrain.sync as hvd

hvd.init(stall_check_s=1, stall_timeout=3)
hvd.allreduce(torch.ones(2), name="warmup")
if hvd.rank() == 1:
    time.sleep(60)  # stuck: a hung file system, a deadlock in a data loader...
hvd.allreduce(torch.ones(2), name="step")
print("not reached", flush=True)
