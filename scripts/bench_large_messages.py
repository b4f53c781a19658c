"""What sending tensors' memory out of band saves in hpctrain's pickled collectives.

    mpirun -np 2 python scripts/bench_large_messages.py [MIB_PER_SNAPSHOT] [SNAPSHOTS]

A run's snapshots travel pickled: rank 0's to every rank after an async run, a checkpoint's
gathered and restored, one to ``--eval-rank`` at a time. ``pickled.large_messages`` sends them
through mpi4py's ``pkl5``; torch pickled each tensor's memory into the pickle (through
``torch.save``'s format) and unpickled it the same way. It now goes as an out-of-band buffer
(``pickled.OutOfBand``). For a broadcast and a gather of SNAPSHOTS snapshots of
MIB_PER_SNAPSHOT MiB each (default 8 x 128 MiB), prints the seconds of each way on the
slowest rank, best of 3 runs interleaved, and their ratio: torch's pickling (before, through
the plain ``pkl5`` communicator: the baseline, in the same run) and out of band (now).
"""

import sys
import time

import torch
from mpi4py.util import pkl5

from hpctrain import comm, pickled
from hpctrain.evaluate import Snapshots

MIB = int(sys.argv[1]) if len(sys.argv) > 1 else 128
COUNT = int(sys.argv[2]) if len(sys.argv) > 2 else 8

MPI = comm.init("multiple")
world = MPI.COMM_WORLD
model = torch.nn.Linear(3, 2)
model.register_buffer("table", torch.zeros(MIB * 2**20 // 4))
snapshots = Snapshots()
for i in range(COUNT):
    model.table.fill_(i)
    snapshots.take(model, updates=i)
ways = {"torch's pickling (before)": pkl5.Intracomm(world), "out of band (now)":
        pickled.large_messages(world)}
calls = {"bcast": lambda c: c.bcast(snapshots if world.rank == 0 else None, root=0),
         "gather": lambda c: c.gather(snapshots if world.rank == 1 else Snapshots(), root=0)}

best: dict = {}
for _ in range(3):
    for call, do in calls.items():
        for way, channel in ways.items():
            world.Barrier()
            start = time.perf_counter()
            got = do(channel)
            took = world.allreduce(time.perf_counter() - start, op=MPI.MAX)
            assert got is None or len(got) in (COUNT, world.size), len(got)
            del got
            best[call, way] = min(best.get((call, way), took), took)

if world.rank == 0:
    print(f"{COUNT} snapshots of {MIB} MiB ({COUNT * MIB / 1024:.2f} GiB), {world.size} ranks,"
          " seconds on the slowest rank, best of 3")
    print("| call | torch's pickling (before) | out of band (now) | same-run ratio |")
    print("| --- | --- | --- | --- |")
    for call in calls:
        before, now = (best[call, way] for way in ways)
        print(f"| {call} | {before:.2f} | {now:.2f} | {before / now:.1f} |")
