"""What a run records beside its configuration (hpctrain.provenance): the software it ran
with and the hash of the weights it started from. On a GPU: tests/test_gpu.py."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

import torch

from hpctrain import launch_env, provenance


def test_a_cpu_run_records_its_software():
    info = provenance.software(torch.device("cpu"))
    assert info["torch"] == torch.__version__
    assert info["python"] == platform.python_version()
    assert "gpu" not in info and "cudnn" not in info
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if Path("/proc/cpuinfo").exists():
        assert info["cpu"] in Path("/proc/cpuinfo").read_text()


def test_a_run_records_how_it_was_started_and_hpctrain_info_the_same_facts(monkeypatch):
    """run_info had no command line, no launcher and no Horovod version; ``hpctrain info``
    said none of the commit, Python and CPU that run_info has, to compare a machine with."""
    monkeypatch.setattr("sys.argv", ["hpctrain", "train", "--algo", "sgd"])
    said = provenance.invocation()
    assert said["argv"] == ["hpctrain", "train", "--algo", "sgd"]
    assert said["launcher"] == launch_env.launch().by
    machine = provenance.machine()
    assert {"hpctrain", "torch", "python", "cpu_capability"} <= machine.keys()
    assert machine.items() <= provenance.software(torch.device("cpu")).items()
    try:
        import horovod
    except ImportError:
        assert "horovod" not in provenance.software(torch.device("cpu"))
    else:
        assert provenance.software(torch.device("cpu"))["horovod"] == horovod.__version__


def test_what_a_run_resolved_is_recorded_beside_the_null_it_keeps(tmp_path, monkeypatch):
    """A run that found its data through $HPCTRAIN_DATA recorded data_dir null, and a
    model's file only by its path: the folder read and the file's hash are recorded."""
    from hpctrain import registry
    from hpctrain.config import DataConfig, ModelConfig, RunConfig

    monkeypatch.setenv("HPCTRAIN_DATA", str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    net = tmp_path / "net.py"
    net.write_text("def build(shape, classes):\n    pass\n")
    config = RunConfig(algo="sgd", data=DataConfig(dataset="mnist"),
                       model=ModelConfig(name=f"{net}:build"))
    assert provenance.resolved(config, registry.get("sgd")(config)) == {
        "resolved": {"data": {"data_dir": str(tmp_path)}}}
    assert provenance.code_files(config) == {
        "model_sha256": hashlib.sha256(net.read_bytes()).hexdigest()}
    given = RunConfig(algo="sgd", data=DataConfig(dataset="mnist", data_dir=str(tmp_path)))
    assert provenance.resolved(given, registry.get("sgd")(given)) == {}
    assert provenance.code_files(given) == {}


def test_a_checkout_records_its_commit():
    """From a git checkout (this one, CI's clone): HEAD's commit, as git says it."""
    root = Path(provenance.__file__).resolve().parent.parent
    recorded = provenance.commit().get("hpctrain_commit")
    head = None
    if (root / ".git").exists() and shutil.which("git"):
        said = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                              capture_output=True, text=True)
        head = said.stdout.strip() if said.returncode == 0 else None  # else not git's to read
    if head is None:
        assert recorded is None
    else:
        assert re.fullmatch(re.escape(head) + r"(\+dirty)?", recorded)


def test_the_hash_is_of_the_bytes_and_follows_a_rewrite(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(bytes(range(256)) * 9000)  # more than one read
    assert provenance.sha256_of(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(b"other weights")
    assert provenance.sha256_of(path) == hashlib.sha256(b"other weights").hexdigest()
    kept = os.stat(path)
    time.sleep(0.05)  # past the file system clock's tick (change times are coarse)
    path.write_bytes(b"OTHER WEIGHTS")  # the same size, and (cp -p) the same mtime
    os.utime(path, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert provenance.sha256_of(path) == hashlib.sha256(b"OTHER WEIGHTS").hexdigest()


def test_starting_weights_hash_the_file_a_folder_names(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"weights")
    wanted = hashlib.sha256(b"weights").hexdigest()
    assert provenance.starting_weights(str(tmp_path), None) == {"init_from_sha256": wanted}
    assert provenance.starting_weights(None, None) == {}


def test_a_resumed_run_keeps_the_hash_its_checkpoint_carries(tmp_path):
    """The file is not read again on resume: replaced since, its new hash would be wrong."""
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"changed since")
    assert provenance.starting_weights(str(weights), {"init_from_sha256": "abc"}) == \
        {"init_from_sha256": "abc"}
    assert provenance.starting_weights(str(weights), {"algo": "sgd"}) == {}  # none recorded
