"""hpctrain on MPICH and on Intel MPI (their PyPI wheels' mpirun and library), not only on
Debian's Open MPI.

MPI implementations differ where hpctrain leans on them hardest: passive-target RMA (the async
store's exclusive locks, Accumulate, the ticket counter) and the progress it needs. One launch
on each trains every family: the store under both consistencies, ssp, ec, and ssgd, whose
2-rank average is one addition, so it must give Open MPI's model bit for bit. And Hydra's
mpirun starting processes whose mpi4py loaded Open MPI's library is refused, not run as
several one-process jobs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ON_OTHER_MPIS, run_commands, run_job

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


@pytest.fixture(scope="module")
def open_mpi_ssgd(tmp_path_factory):
    """The ssgd model trained on Debian's Open MPI, to compare the others' with."""
    out = tmp_path_factory.mktemp("ompi")
    done = run_commands(commands(out, ["ssgd"]), np=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "ssgd" / "model.pt", weights_only=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mpi", ON_OTHER_MPIS)
def test_every_family_trains_and_ssgd_matches_open_mpi_bit_for_bit(mpi, open_mpi_ssgd,
                                                                   tmp_path):
    done = run_commands(commands(tmp_path, RUNS), np=2, mpi=mpi)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in RUNS:
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["final_test_acc"] > 0.9, (name, summary["final_test_acc"])
    for name in ("dcasgd-c-locked", "dcasgd-a-atomic"):  # every push took a ticket from the
        summary = json.loads((tmp_path / name / "summary.json").read_text())  # store's counter
        assert summary["updates"] == sum(summary["pushes_per_worker"]) > 0
        assert summary["staleness"]["count"] == summary["updates"]
    model = torch.load(tmp_path / "ssgd" / "model.pt", weights_only=True)
    assert model.keys() == open_mpi_ssgd.keys()
    assert all(torch.equal(model[k], open_mpi_ssgd[k]) for k in model)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mpi", ON_OTHER_MPIS)
def test_hydras_mpirun_with_open_mpis_library_is_refused_before_anything_is_written(mpi,
                                                                                    tmp_path):
    """Without the MPI's lib on the loader's path mpi4py loads Open MPI's: each process is a
    world of 1 and would train alone into the same folder. Each says so in one line."""
    out = tmp_path / "run"
    done = run_job(["train", *RUNS["ssgd"], *COMMON, "--out", str(out)], np=2, mpi=mpi,
                   env={"LD_LIBRARY_PATH": ""})
    assert done.returncode == 2, done.stderr[-2000:]
    refusals = [line for line in done.stderr.splitlines() if line.startswith("hpctrain: error")]
    assert len(refusals) == 2 and all("gives this process a world of 1" in line
                                      and "is not the launcher's" in line for line in refusals)
    assert {"PMI_RANK=0" in line for line in refusals} == {True, False}
    assert not out.exists()
