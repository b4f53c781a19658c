"""hpctrain on MPICH (its PyPI wheel's mpirun and library), not only on Debian's Open MPI.

MPI implementations differ where hpctrain leans on them hardest: passive-target RMA (the async
store's exclusive locks, Accumulate, the ticket counter) and the progress it needs. One MPICH
launch trains each family: the store under both consistencies, ssp, ec, and ssgd, whose
2-rank average is one addition, so it must give Open MPI's model bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import needs_mpich, run_commands

COMMON = ["--dataset", "synthetic", "--model", "mlp", "--epochs", "2", "--seed", "5",
          "--no-progress"]
RUNS = {
    "dcasgd-c-locked": ["--algo", "dcasgd-c", "--consistency", "locked"],
    "dcasgd-a-atomic": ["--algo", "dcasgd-a", "--consistency", "atomic"],
    "ssp": ["--algo", "ssp", "--max-staleness", "1"],
    "ec": ["--algo", "ec", "--tau-epochs", "0.5"],
    "ssgd": ["--algo", "ssgd"],
}


def commands(out, names) -> list[list[str]]:
    return [["train", *RUNS[n], *COMMON, "--out", str(out / n)] for n in names]


@needs_mpich
@pytest.mark.timeout(300)
def test_every_family_trains_on_mpich_and_ssgd_matches_open_mpi_bit_for_bit(tmp_path):
    mpich, ompi = tmp_path / "mpich", tmp_path / "ompi"
    done = run_commands(commands(mpich, RUNS), np=2, mpich=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in RUNS:
        summary = json.loads((mpich / name / "summary.json").read_text())
        assert summary["final_test_acc"] > 0.9, (name, summary["final_test_acc"])
    for name in ("dcasgd-c-locked", "dcasgd-a-atomic"):  # every push took a ticket from the
        summary = json.loads((mpich / name / "summary.json").read_text())  # store's counter
        assert summary["updates"] == sum(summary["pushes_per_worker"]) > 0
        assert summary["staleness"]["count"] == summary["updates"]
    on_ompi = run_commands(commands(ompi, ["ssgd"]), np=2)
    assert on_ompi.returncode == 0, on_ompi.stderr[-3000:]
    a, b = (torch.load(d / "ssgd" / "model.pt", weights_only=True) for d in (mpich, ompi))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
