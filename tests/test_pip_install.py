"""The cluster user's install: ``pip install .`` into a fresh environment that already has
torch and MPI, then ``hpctrain --version`` and one short run that uses the compiled kernel.

The fresh venv sees this checkout's virtualenv only as a path for its dependencies (a
``.pth`` line, as ``--system-site-packages`` would give a module-provided torch): its ``.pth``
files, and so the editable install there, are not processed. ``--no-index`` keeps pip off the
network (every dependency must already be there); the CUDA kernel is skipped to keep the test
short (HPCTRAIN_BUILD_CUDA=0). A job test: ``make test-fast`` skips it.

Also what setup.py builds and packages: no CUDA library of an earlier build in a build that
does not build one, and an sdist that holds every source a build needs (MANIFEST.in).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys

import pytest
from conftest import ROOT


def sh(cmd: list[str], cwd, env, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout}\n{proc.stderr}"
    return proc


def clean_copy(source) -> None:
    """The tracked files (and untracked, not ignored ones) into ``source``, as a fresh clone has
    them: no build/, no built kernel."""
    tracked = sh(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], ROOT,
                 None, 30).stdout.split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)


@pytest.mark.job
@pytest.mark.timeout(300)
def test_pip_install_into_a_fresh_environment_trains(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    py = venv / "bin" / "python"
    own_site = sh([str(py), "-c", "import site; print(site.getsitepackages()[0])"], tmp_path,
                  None, 30).stdout.strip()
    with open(os.path.join(own_site, "deps-from-checkout.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HPCTRAIN_BUILD_CUDA="0", OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    source = tmp_path / "source"
    clean_copy(source)
    assert not list((source / "hpctrain").glob("*.so"))
    for git in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t",
                                                "commit", "-q", "-m", "the cluster's clone"]):
        sh(["git", *git], source, None, 60)  # a clone: the install names its commit
    built_from = sh(["git", "rev-parse", "HEAD"], source, None, 30).stdout.strip()
    sh([str(py), "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation", str(source)],
       tmp_path, env, 240)
    where = sh([str(py), "-c", "import hpctrain, glob, os; d = os.path.dirname(hpctrain.__file__);"
                " print(d); print(glob.glob(os.path.join(d, '_dc_update*.so')))"],
               tmp_path, env, 60).stdout.splitlines()
    assert where[0] == os.path.join(own_site, "hpctrain")  # the installed copy, not the checkout
    assert "_dc_update" in where[1]
    assert os.path.isfile(os.path.join(where[0], "py.typed"))  # type checkers read its hints
    version = sh([str(venv / "bin" / "hpctrain"), "--version"], tmp_path, env, 60)
    assert version.stdout.startswith("hpctrain ")
    assert version.stdout.endswith(f" (commit {built_from})\n")  # no checkout to ask: the build's
    sh([str(venv / "bin" / "hpctrain"), "train", "--algo", "dcasgd-a", "--dataset", "synthetic",
        "--model", "mlp", "--epochs", "1", "--no-progress", "--out", "run"], tmp_path, env, 120)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["algo"] == "dcasgd-a" and summary["final_test_acc"] > 0.5
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["run_info"]
    assert recorded["hpctrain_commit"] == built_from


@pytest.mark.timeout(120)
@pytest.mark.parametrize("build_cuda", ["0", "1"])
def test_a_build_that_does_not_build_cuda_drops_an_earlier_cuda_library(tmp_path, build_cuda):
    """A _dc_update_cuda.so that an earlier build left in build/lib... was packaged and
    installed when the CUDA build was skipped (HPCTRAIN_BUILD_CUDA=0, or nvcc not found) or
    failed: a library of older sources beside a CPU library of the new ones. ``1`` with an
    architecture nvcc does not have is a failed build, with or without nvcc."""
    built = [lib for lib in (ROOT / "hpctrain").glob("_*.so") if lib.name != "_dc_update_cuda.so"]
    if len(built) < 2:
        pytest.skip("the CPU libraries are not built in place (pip install -e .)")
    source = tmp_path / "source"
    clean_copy(source)
    lib = tmp_path / "lib" / "hpctrain"
    lib.mkdir(parents=True)
    for so in built:  # newer than their sources: build_ext does not compile them again
        shutil.copy(so, lib / so.name)
    (lib / "_dc_update_cuda.so").write_bytes(b"built from older sources")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HPCTRAIN_BUILD_CUDA=build_cuda, HPCTRAIN_CUDA_ARCH="sm_none")
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib",
                           str(tmp_path / "lib")], cwd=source, env=env, capture_output=True,
                          text=True, timeout=100)
    assert proc.returncode == (0 if build_cuda == "0" else 1), proc.stderr
    assert not (lib / "_dc_update_cuda.so").exists()
    assert {so.name for so in lib.iterdir()} == {so.name for so in built}


@pytest.mark.timeout(120)
def test_the_sdist_holds_what_building_and_testing_it_need(tmp_path):
    """Without MANIFEST.in the sdist left out kernels/dc_update.cu (setup.py hands it to nvcc
    itself, unseen by setuptools), so a wheel built from it had no CUDA kernel and
    HPCTRAIN_BUILD_CUDA=1 failed; and the tests' conftest and scripts, which its tests need."""
    import tarfile

    source = tmp_path / "source"
    clean_copy(source)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    sh([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], source, env,
       100)
    (sdist,) = (tmp_path / "dist").glob("hpctrain-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    tracked = sh(["git", "ls-files", "-z"], ROOT, None, 30).stdout.split("\0")
    wanted = [name for name in tracked if name.split("/")[0] in (  # those the copy holds
        "hpctrain", "kernels", "docs", "examples", "slurm", "scripts", "tests")
        and (source / name).is_file()]
    assert "kernels/dc_update.cu" in names and "tests/conftest.py" in names
    assert sorted(set(wanted) - names) == []
    assert not [name for name in names if "__pycache__" in name or name.endswith(".so")]
