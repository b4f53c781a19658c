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


# Horovod's own stall check from init's arguments: rank 1 comes 20 s late.
HOROVOD_LATE = """
import sys, time, torch, hpctrain.sync as hvd
hvd.init(backend="horovod", stall_check_s=0, stall_timeout=0.5)
hvd.allreduce(torch.ones(1), name="a")
if hvd.rank() == 1:
    time.sleep(20)
try:
    hvd.allreduce(torch.ones(1), name="b")
    print("DONE", hvd.rank(), flush=True)
except hvd.HorovodInternalError:
    print("SHUT DOWN", hvd.rank(), flush=True)
"""


@pytest.mark.timeout(120)
def test_stall_settings_on_the_horovod_backend_mean_what_they_mean_on_the_others():
    """int() made stall_timeout=0.5 Horovod's "0" (never) and stall_check_s=0 its report
    every cycle (here: none): rank 0 waited out the late rank with a flood of warnings.
    Rounded up, and a check of 0 with a timeout its check time, Horovod shuts down."""
    from conftest import horovod_missing

    if why := horovod_missing():
        pytest.skip(why)
    proc = run_program([sys.executable, "-c", HOROVOD_LATE], np=2, timeout=90)
    assert "SHUT DOWN 0" in proc.stdout and "DONE" not in proc.stdout, proc.stderr
    assert proc.stderr.count("One or more tensors were submitted") <= 2, proc.stderr


@pytest.mark.parametrize("check_s, timeout_s, env", [
    (0, None, {"HOROVOD_STALL_CHECK_DISABLE": "1"}),
    # Horovod never shuts down with a timeout below its check time (60 s by default)
    (None, 0.5, {"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "1",
                 "HOROVOD_STALL_CHECK_TIME_SECONDS": "1", "HOROVOD_STALL_CHECK_DISABLE": "0"}),
    (None, 2.5, {"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "3",
                 "HOROVOD_STALL_CHECK_TIME_SECONDS": "3", "HOROVOD_STALL_CHECK_DISABLE": "0"}),
    (30, 5, {"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "5",
             "HOROVOD_STALL_CHECK_TIME_SECONDS": "5", "HOROVOD_STALL_CHECK_DISABLE": "0"}),
    (2.5, 0.5, {"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "1",
                "HOROVOD_STALL_CHECK_TIME_SECONDS": "1", "HOROVOD_STALL_CHECK_DISABLE": "0"}),
    (1.5, 0, {"HOROVOD_STALL_CHECK_TIME_SECONDS": "2", "HOROVOD_STALL_CHECK_DISABLE": "0",
              "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "0"}),
    (0, 2.5, {"HOROVOD_STALL_CHECK_TIME_SECONDS": "3", "HOROVOD_STALL_CHECK_DISABLE": "0",
              "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "3"}),
])
def test_horovods_stall_variables_from_inits_arguments(monkeypatch, check_s, timeout_s, env):
    from hpctrain.sync.horovod_backend import stall_environment

    for name in ("HOROVOD_STALL_CHECK_DISABLE", "HOROVOD_STALL_CHECK_TIME_SECONDS",
                 "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    assert stall_environment(check_s, timeout_s) == env


@pytest.mark.timeout(60)
def test_the_stall_report_is_repeated_every_check_time(monkeypatch):
    """It said "still waiting (stall check every N s)" but came once per wait; Horovod's
    comes every check time while the wait lasts."""
    import threading
    import time
    from types import SimpleNamespace

    from hpctrain.sync import stall

    said: list[str] = []
    two = threading.Event()

    def say(line: str) -> None:
        said.append(line)
        if len(said) >= 2:
            two.set()

    monkeypatch.setattr(stall, "say", say)
    peers = SimpleNamespace(serve=lambda status: None, close=lambda: None,
                            ask=lambda others, status, wait_s: {})
    channel = SimpleNamespace(label="process set 0", transport=SimpleNamespace(size=lambda: 2),
                              global_rank=lambda r: r)
    call = SimpleNamespace(describe=lambda: "allreduce(name='late')")
    monitor = stall._Monitor(peers, 0, check_s=0.05, timeout_s=0)  # type: ignore[arg-type]
    try:
        monitor.waiting = stall._Waiting(channel, call, 0, time.monotonic())
        assert two.wait(30), said
    finally:
        monitor.stop()
    assert all(ln.startswith("hpctrain.sync: stall: rank 0 waited ") and
               ln.endswith("in allreduce(name='late') (call #1 on process set 0); not arrived: "
                           "rank 1 (no answer); still waiting (stall check every 0.05 s)")
               for ln in said[:2]), said


def test_a_rank_a_lower_one_reports_for_stops_asking(monkeypatch):
    """Every waiting rank asked every other at each check time, though only the lowest
    waiting one prints: N^2 messages a check time through a long hang on many ranks. Once a
    lower rank is seen waiting in the same call, this one asks again only to end the job."""
    import threading
    import time
    from types import SimpleNamespace

    from hpctrain.sync import stall

    said: list[str] = []
    monkeypatch.setattr(stall, "say", said.append)
    asked = threading.Event()
    asks: list[float] = []
    here = ("process set 0", 0, "allreduce(name='late')", 0.0)  # rank 0 waits there too

    def ask(others, status, wait_s):
        asks.append(time.monotonic())
        asked.set()
        return {0: (here, "nothing yet", 0.0)}

    peers = SimpleNamespace(serve=lambda status: None, close=lambda: None, ask=ask)
    channel = SimpleNamespace(label="process set 0", transport=SimpleNamespace(size=lambda: 3),
                              global_rank=lambda r: r)
    call = SimpleNamespace(describe=lambda: "allreduce(name='late')")
    monitor = stall._Monitor(peers, 1, check_s=0.02, timeout_s=0)  # type: ignore[arg-type]
    try:
        waiting = stall._Waiting(channel, call, 0, time.monotonic())
        monitor.waiting = waiting
        assert asked.wait(30)
        time.sleep(0.5)  # many check times
    finally:
        monitor.stop()
    assert waiting.quiet and len(asks) == 1 and said == [], (asks, said)
