"""What produced a run, beside its configuration: for ``config.json``'s ``run_info``.

Two runs with the same configuration can still differ: another torch, another GPU or cuDNN,
other starting weights in a file of the same name. A run records these so that a comparison
(CPU against GPU, one build against another, a fine-tuned model against its parent) can say
what it compared. The MPI library's own description is :func:`hpctrain.comm.library_info`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from functools import cache
from pathlib import Path

import torch

import hpctrain
from hpctrain import weights

_CHUNK = 1 << 20


def software(device: torch.device) -> dict:
    """The versions a run trained with; on a GPU also its name and CUDA, cuDNN and NCCL."""
    info = {"hpctrain": hpctrain.__version__, **commit(), "torch": torch.__version__,
            "python": platform.python_version()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), nccl=_nccl_version())
    return info


@cache
def commit() -> dict:
    """``hpctrain_commit``: the git commit of the checkout hpctrain runs from (an editable
    install), ``+dirty`` if its tracked files differ from it; nothing for an installed copy.
    Asked of git once per process: :func:`hpctrain.run.train` asks before MPI starts, since
    some networks' drivers warn of a process that forks once MPI runs."""
    source = Path(hpctrain.__file__).resolve().parent.parent
    if not (source / ".git").exists():
        return {}
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: never take the index lock

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(source), *args], capture_output=True,
                              text=True, timeout=10, env=env)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {}
        dirty = git("diff", "--quiet", "HEAD", "--").returncode == 1
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {"hpctrain_commit": head.stdout.strip() + ("+dirty" if dirty else "")}


def _nccl_version() -> str | None:
    try:
        version = torch.cuda.nccl.version()  # a tuple since torch 1.x; raises if not built
    except (AttributeError, RuntimeError):
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def starting_weights(init_from: str | None, resumed: bool, out: str | None) -> dict:
    """``init_from_sha256``: the hash of the ``--init-from`` file the run started from, so a
    file replaced under the same name is seen. A resumed run did not read the file again: the
    hash its first start wrote in the run folder's ``config.json`` is kept (none if absent)."""
    if not init_from:
        return {}
    if not resumed:
        return {"init_from_sha256": sha256_of(weights.file_of(init_from))}
    try:
        earlier = json.loads((Path(out) / "config.json").read_text())["run_info"]
        return {"init_from_sha256": earlier["init_from_sha256"]}
    except (OSError, TypeError, ValueError, KeyError):
        return {}


def sha256_of(path: str | Path) -> str:
    """The sha256 of a file's bytes, read a megabyte at a time (a model file can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
