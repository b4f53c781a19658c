"""How long ``hvd.elastic``'s ``commit()`` holds training up: in memory, and with rank 0
writing to ``HPCTRAIN_ELASTIC_DIR`` in the background.

    python scripts/bench_elastic_commit.py FOLDER [PARAMETERS ...]    e.g. /tmp/c 1e6 25e6

One process; a linear layer of PARAMETERS weights with SGD momentum (so a commit copies twice
the parameters). Each case commits 5 times with 3 s of "training" (a sleep) between: in
memory, to the folder (written in the background), and to the folder waiting for each write
(what writing in the foreground would cost). Prints the median and the least commit time.
"""

import os
import statistics
import sys
import time

import torch
from torch import nn

import hpctrain.sync as hvd
from hpctrain.sync import elastic

folder, sizes = sys.argv[1], [int(float(a)) for a in sys.argv[2:] or ["1e6", "25e6"]]
hvd.init()
torch.set_num_threads(1)
for n in sizes:
    model = nn.Linear(n // 1000, 1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, n // 1000)).sum().backward()
    opt.step()
    for case in ("in memory", "to the folder", "to the folder, waiting for the write"):
        if case == "in memory":
            os.environ.pop(elastic.ENV, None)
        else:
            os.environ[elastic.ENV] = folder
        state = elastic.TorchState(model, opt, epoch=0)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            state.commit()
            if case.endswith("write"):
                elastic.flush()  # what a commit written in the foreground would cost
            times.append(time.perf_counter() - start)
            time.sleep(3)
        elastic.flush()
        print(f"{n:>11,} parameters, commit {case}: median "
              f"{statistics.median(times) * 1e3:.0f} ms (min {min(times) * 1e3:.0f})",
              flush=True)
