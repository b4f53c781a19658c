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


# A stall check asked for, or left to its default, with the collective check's rounds off.
NO_ROUNDS = """
import sys, hpctrain.sync as hvd
hvd.init(**({"stall_check_s": 1, "stall_timeout": 3} if sys.argv[1] == "asked" else {}))
hvd.barrier()
print("END", hvd.rank(), flush=True)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("asked", ["asked", "default"])
def test_a_stall_check_asked_for_without_the_collective_check_is_a_warning(asked):
    """HPCTRAIN_CHECK_COLLECTIVES=0 turned the stall check off without a word: the monitor
    watches the rounds only. Rank 0 says it once; a check left to its default says nothing."""
    proc = run_program([sys.executable, "-c", NO_ROUNDS, asked], np=2,
                       env={"HPCTRAIN_CHECK_COLLECTIVES": "0"})
    assert proc.returncode == 0 and proc.stdout.count("END") == 2, proc.stderr
    said = [ln for ln in proc.stderr.splitlines() if "stall check" in ln]
    assert said == ([] if asked == "default" else [
        "hpctrain.sync: warning: the stall check asked for (a report after 1 s, the job ended "
        "after 3 s) does not run: it watches the collective check's rounds, which "
        "HPCTRAIN_CHECK_COLLECTIVES=0 turns off; unset it"]), proc.stderr
