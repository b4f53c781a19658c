"""What a run records beside its configuration (hpctrain.provenance): the software it ran
with and the hash of the weights it started from. On a GPU: tests/test_gpu.py."""

from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
from pathlib import Path

import torch

from hpctrain import provenance


def test_a_cpu_run_records_its_software():
    info = provenance.software(torch.device("cpu"))
    assert info["torch"] == torch.__version__
    assert info["python"] == platform.python_version()
    assert "gpu" not in info and "cudnn" not in info


def test_a_checkout_records_its_commit():
    """From a git checkout (this one, CI's clone): HEAD's commit, as git says it."""
    root = Path(provenance.__file__).resolve().parent.parent
    recorded = provenance.commit().get("hpctrain_commit")
    if not (root / ".git").exists():
        assert recorded is None
        return
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert re.fullmatch(re.escape(head) + r"(\+dirty)?", recorded)


def test_the_hash_is_of_the_bytes(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(bytes(range(256)) * 9000)  # more than one read
    assert provenance.sha256_of(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_starting_weights_hash_the_file_a_folder_names(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"weights")
    wanted = hashlib.sha256(b"weights").hexdigest()
    assert provenance.starting_weights(str(tmp_path), False, None) == \
        {"init_from_sha256": wanted}
    assert provenance.starting_weights(None, False, None) == {}


def test_a_resumed_run_keeps_the_hash_of_its_first_start(tmp_path):
    """The file is not read again on resume: replaced since, its new hash would be wrong."""
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"changed since")
    out = tmp_path / "run"
    assert provenance.starting_weights(str(weights), True, str(out)) == {}  # none recorded
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"run_info": {"init_from_sha256": "abc"}}))
    assert provenance.starting_weights(str(weights), True, str(out)) == \
        {"init_from_sha256": "abc"}
