"""How an uncaught error is said: a user's own script (``hvd.init()``, ``hpctrain.comm.init``)
shows Python's traceback for its own bugs, hpctrain's commands and runs one line; either way
an error on one rank ends the whole job."""

import sys

import pytest
from conftest import SYNTHETIC, run_job, run_program

# A script's own bug after hpctrain started MPI, on every rank or on rank 1 only (rank 0
# then waits in a collective that the abort ends).
BUG = """
import atexit, json, sys
atexit.register(lambda: print("atexit ran", flush=True))
if sys.argv[1] == "sync":
    import hpctrain.sync as hvd
    hvd.init()
    rank = hvd.rank()
else:
    import hpctrain.comm
    rank = hpctrain.comm.init("serialized").COMM_WORLD.Get_rank()

def helper(text):
    return json.loads(text)

if sys.argv[2] in ("all", str(rank)):
    helper("{bad")
hpctrain.comm.world().Barrier() if sys.argv[1] != "sync" else hvd.barrier()
print("END", rank, flush=True)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("started_by", ["sync", "comm"])
def test_a_scripts_own_error_in_one_process_is_pythons_traceback(started_by):
    """hvd.init() replaced it by one line labelled hpctrain's ("hpctrain: error:
    JSONDecodeError: ..."), without the file and line a Horovod script's user expects; and
    the process ended without running atexit, as Python does not."""
    proc = run_program([sys.executable, "-c", BUG, started_by, "all"])
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):", proc.stderr
    assert '  File "<string>", line 13, in helper' in lines
    assert lines[-1].startswith("json.decoder.JSONDecodeError: Expecting property name")
    assert "hpctrain" not in proc.stderr and "atexit ran" in proc.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("started_by", ["sync", "comm"])
def test_a_scripts_own_error_on_one_rank_shows_its_traceback_and_ends_the_job(started_by):
    """The traceback, labelled with the rank in one write, then MPI_Abort: rank 0, waiting
    in a barrier for rank 1, is ended too."""
    proc = run_program([sys.executable, "-c", BUG, started_by, "1"], np=2)
    assert proc.returncode != 0 and "END" not in proc.stdout, proc.stderr
    assert ("hpctrain: error (rank 1 of 2):\nTraceback (most recent call last):\n"
            in proc.stderr), proc.stderr
    assert '  File "<string>", line 13, in helper\n' in proc.stderr
    assert "\njson.decoder.JSONDecodeError: Expecting property name" in proc.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("debug", [None, "1"])
def test_hpctrains_own_error_in_a_script_stays_one_line(debug):
    """A usage error is said in one line, exit 2; HPCTRAIN_DEBUG=1 adds the traceback."""
    script = ("import hpctrain.sync as hvd\nhvd.init()\n"
              "hvd.broadcast_object(1, root_rank=5)\n")
    proc = run_program([sys.executable, "-c", script],
                       env={"HPCTRAIN_DEBUG": debug} if debug else None)
    line = "hpctrain: error: broadcast_object: root_rank 5 is not a rank of the 1 process"
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == line
    assert ("Traceback (most recent call last)" in proc.stderr) == bool(debug), proc.stderr


# Its forward fails in training, after the checks' calls.
FAILING_MODEL = """
import math

import torch

calls = 0


class Net(torch.nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.linear = torch.nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x):
        global calls
        calls += 1
        if calls > 5:
            raise ValueError("no forward here")
        return self.linear(x.flatten(1))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("raised, said", [
    ('ValueError("no forward here")', "ValueError: no forward here"),
    # sys.exit: the process exited with status 3 (a stall's) and no line; on one rank of
    # several the others waited for it in a collective forever
    ("SystemExit(3)", "RuntimeError: the code called sys.exit(3) during the run (one rank "
     "cannot leave a running job alone)"),
], ids=["error", "sys.exit"])
def test_the_command_line_says_a_users_model_error_in_one_line(tmp_path, raised, said):
    """`hpctrain train` keeps its one line naming where in the user's code (README)."""
    (tmp_path / "net.py").write_text(FAILING_MODEL.replace('ValueError("no forward here")',
                                                           raised))
    proc = run_job(["train", "--algo", "sgd", *SYNTHETIC, "--model", f"{tmp_path / 'net.py'}:Net",
                    "--epochs", "1", "--out", str(tmp_path / "run")], np=0)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"hpctrain: error: {said} (at {tmp_path / 'net.py'}:18, in forward)")
    assert "Traceback" not in proc.stderr
