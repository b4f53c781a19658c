"""What sending tensors' memory out of band saves in hpctrain.sync's object collectives.

    mpirun -np 2 python scripts/bench_object_collectives.py [MIB] [TENSORS]

``broadcast_object`` and ``allgather_object`` (a Horovod script's state_dict, an elastic
state's sync) pickled the object with cloudpickle, each tensor's memory inside the pickle
through torch's own pickling, and unpickled it the same way. Comm's tensor reducer now sends
each plain CPU tensor's memory beside the pickle, as an out-of-band buffer that ``pkl5``
sends as it is. For a state_dict of MIB MiB in TENSORS float32 tensors (default 64 MiB in
16), prints the seconds of each call on the slowest rank, best of 3 runs interleaved, and
their ratio: the pickle with the memory inside (before: cloudpickle's bytes, the baseline, in
the same run) and beside it (now), both through the mpi backend's transport.
"""

import pickle
import sys
import time

import cloudpickle
import torch

import hpctrain.sync as hvd
from hpctrain import comm
from hpctrain.sync import collectives

MIB = int(sys.argv[1]) if len(sys.argv) > 1 else 64
TENSORS = int(sys.argv[2]) if len(sys.argv) > 2 else 16

MPI = comm.init("multiple")
torch.set_num_threads(1)
hvd.init()
world = MPI.COMM_WORLD
rows = MIB * 2**20 // 4 // TENSORS // 1024
state = {f"layer{i}.weight": torch.full((rows, 1024), float(hvd.rank() + i))
         for i in range(TENSORS)}
now = collectives._pickled


def inside(obj):
    """The object collectives' pickle before: cloudpickle's bytes, tensors' memory in them."""
    return "ok", collectives.Pickled(cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


ways = {"memory in the pickle (before)": inside, "out of band (now)": now}
calls = {"broadcast_object": lambda: hvd.broadcast_object(state, root_rank=0),
         "allgather_object": lambda: hvd.allgather_object(state)}

best: dict = {}
for _ in range(3):
    for call, do in calls.items():
        for way, pickled in ways.items():
            collectives._pickled = pickled
            world.Barrier()
            start = time.perf_counter()
            got = do()
            took = world.allreduce(time.perf_counter() - start, op=MPI.MAX)
            first = got if isinstance(got, dict) else got[0]
            assert torch.equal(first["layer1.weight"], torch.full((rows, 1024), 1.0))
            del got, first
            best[call, way] = min(best.get((call, way), took), took)
collectives._pickled = now
hvd.shutdown()

if world.rank == 0:
    print(f"a state_dict of {MIB} MiB in {TENSORS} tensors, {world.size} ranks, seconds on the "
          "slowest rank, best of 3")
    print("| call | memory in the pickle (before) | out of band (now) | same-run ratio |")
    print("| --- | --- | --- | --- |")
    for call in calls:
        before, after = (best[call, way] for way in ways)
        print(f"| {call} | {before:.2f} | {after:.2f} | {before / after:.1f} |")
