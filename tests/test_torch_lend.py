"""What hpctrain lends to torch.distributed's works (``torch_transport._lend``) is let go by
Python's thread last, never by a gloo worker's: at interpreter exit a worker that needs the
GIL aborts the process ("terminate called without an active exception"), which failed a
finished torchrun job now and then."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import run_program

from hpctrain.sync import torch_transport

pytestmark = pytest.mark.skipif(not torch_transport._COUNTS_USES,
                                reason="this torch has no Tensor._use_count")

# Two gloo ranks of one group in this process (each constructor waits for the other). Rank
# 0's allreduce is started and its Work dropped, so rank 0's worker holds the last one; rank
# 1's starts it (16 MiB: the exchange outlasts this thread's return from the call). A huge
# switch interval keeps the GIL with this thread while it spins: a worker that needs it gets
# it only when this thread waits (time.sleep, settle()).
TWO_RANKS = """
import sys, threading, time
import torch, torch.distributed as dist
from hpctrain.sync import torch_transport

store, groups = dist.HashStore(), [None, None]
def make(rank): groups[rank] = dist.ProcessGroupGloo(store, rank, 2)
other = threading.Thread(target=make, args=(1,))
other.start(); make(0); other.join()
rank0, rank1 = groups
rank0.allreduce(torch_transport._lend(torch.ones(1 << 22)))
lent = torch_transport._LENT[-1]  # the tensor itself only there: no reference of ours
sys.setswitchinterval(30.0)
rank1.allreduce(torch_transport._lend(torch.ones(1 << 22)))
deadline = time.monotonic() + 20
while any(t._use_count() > 1 for ts in torch_transport._LENT for t in ts) \\
        and time.monotonic() < deadline:
    pass  # spinning keeps the GIL
"""


@pytest.mark.timeout(60)
def test_a_tensor_is_held_until_the_worker_gave_its_python_object_back():
    """Rank 0's worker ends the allreduce and drops the tensor: its use count falls to 1,
    then (torch >= 2.9) the worker gives back the reference C++ held to its Python object,
    which needs the GIL. The use count alone called the tensor settled in between."""
    space: dict = {}
    interval = sys.getswitchinterval()
    try:
        exec(TWO_RANKS, space)
        lent = space["lent"]
        counted_once = lent[0]._use_count() == 1
        held_in_window = torch_transport._held(lent)
    finally:
        sys.setswitchinterval(interval)
    assert counted_once
    assert held_in_window  # the worker still holds the Python object: not settled
    torch_transport.settle(timeout_s=20)  # the worker takes the GIL and lets go
    assert not torch_transport._held(lent)
    assert torch.equal(lent[0], torch.full((1 << 22,), 2.0))


# Finalizing, Python gives the GIL away now and then (a write to a pipe; here a sleep in a
# module global's __del__): a worker waiting for it then aborted the process.
GIVES_THE_GIL_AWAY_AT_EXIT = """
class Sleeps:
    def __del__(self):
        time.sleep(0.2)
sleeps = Sleeps()
"""


@pytest.mark.timeout(120)
def test_a_process_exits_cleanly_once_its_works_have_ended(tmp_path):
    """The process ends right after the works' use counts fell to 1: exit's settle() waits
    for the workers to give their references back (it returned at once, and all of 10 such
    exits aborted)."""
    script = tmp_path / "exits.py"
    script.write_text(TWO_RANKS + GIVES_THE_GIL_AWAY_AT_EXIT)  # nothing else: a print, a
    proc = run_program([sys.executable, str(script)], timeout=90)  # write, gives it away too
    assert proc.returncode == 0, proc.stderr
