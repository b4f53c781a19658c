"""hpctrain.sync's stall check and timeout where a wait is not an active rank's round: a rank
in ``join()``, the checks switched off, rank 0's elastic commit, the horovod backend."""

from __future__ import annotations

import sys

import pytest
from conftest import run_program

from hpctrain.watchdog import EXIT_STATUS

# Rank 0 joins; rank 1 returns without joining: rank 0's join() would wait for ever.
JOIN_WITHOUT_ME = """
import torch, hpctrain.sync as hvd
hvd.init(stall_check_s=1, stall_timeout=3)
hvd.allreduce(torch.ones(1), name="first")
if hvd.rank() == 0:
    hvd.join()
    print("JOINED", flush=True)
"""


@pytest.mark.timeout(120)
def test_a_rank_in_join_that_the_others_never_join_is_ended_by_the_stall_timeout():
    """The rounds of a joined rank polled unwatched: rank 0 hung in join() until killed,
    with no report (Horovod raises after its shutdown time)."""
    proc = run_program([sys.executable, "-c", JOIN_WITHOUT_ME], np=2, timeout=90)
    assert proc.returncode == EXIT_STATUS, proc.stderr
    assert "JOINED" not in proc.stdout
    ending = [ln for ln in proc.stderr.splitlines() if "ending the job" in ln]
    assert ending and "hpctrain.sync: stall: rank 0 waited" in ending[0], proc.stderr
    assert " in join() (call #2 on process set 0); not arrived: rank 1 " in ending[0]
