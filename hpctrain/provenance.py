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
import sys
from functools import cache
from pathlib import Path

import torch

import hpctrain
from hpctrain import data, launch_env, plugins, userdata, weights

_CHUNK = 1 << 20
_GIT_LOCATION = frozenset({"GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR",
                           "GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES",
                           "GIT_NAMESPACE", "GIT_PREFIX"})


def software(device: torch.device) -> dict:
    """The versions a run trained with, and its CPU and the kernels torch chose for it (the
    same build gives another model on another CPU); on a GPU also its name and CUDA, cuDNN
    and NCCL."""
    info = {**machine(), **_horovod()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), nccl=_nccl_version())
    return info


def machine() -> dict:
    """What ``hpctrain info`` and every run's ``run_info`` say alike: the versions of
    hpctrain (its commit in a checkout), torch and Python, and the CPU, so that a machine
    can be compared with a run's record."""
    return {"hpctrain": hpctrain.__version__, **commit(), "torch": torch.__version__,
            "python": platform.python_version(), **cpu()}


def host() -> dict:
    """``host``: the node's name; ``machine_cpus``: its CPUs; ``rank_cpus``: those this
    process may run on (its affinity, else the machine's count): what a benchmark's figures
    were measured on. Under mpirun a rank bound to one core said "1 CPUs" of a larger node.
    ``cpus``: ``rank_cpus`` under its old name, for the readers of older records."""
    rank_cpus = launch_env.usable_cpus()
    return {"host": platform.node(), "machine_cpus": os.cpu_count() or rank_cpus,
            "rank_cpus": rank_cpus, "cpus": rank_cpus}


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the system has none): on a shared
    node other jobs' load decides timings more than the code does."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _horovod() -> dict:
    """``horovod``: its version where the run loaded it (``--sync-backend horovod``)."""
    module = sys.modules.get("horovod")
    version = getattr(module, "__version__", None)
    return {"horovod": version} if isinstance(version, str) else {}


def invocation() -> dict:
    """``argv``, the command line of rank 0's process (a script's own for
    ``hpctrain.train``), and ``launcher``, what started the processes (Open MPI's mpirun,
    srun, torchrun, none known), as ``hpctrain info`` names it."""
    from hpctrain import launch_env

    return {"argv": list(sys.argv), "launcher": launch_env.launch().by}


@cache
def commit() -> dict:
    """``hpctrain_commit``: the git commit of the checkout hpctrain runs from (an editable
    install), ``+dirty`` if its tracked files differ from it; for an installed copy, the one
    it was built from (setup.py's ``hpctrain/_build.py``), if built from a checkout. Asked of
    git once per process (:func:`before_mpi`)."""
    source = Path(hpctrain.__file__).resolve().parent.parent
    if not (source / ".git").exists():
        try:
            from hpctrain._build import COMMIT  # type: ignore[import-not-found]
        except ImportError:
            return {}
        return {"hpctrain_commit": COMMIT}
    # The checkout's own repository (a hook's GIT_DIR or GIT_INDEX_FILE names another; the
    # GIT_CONFIG_* ones, say a CI's safe.directory, stay); read only: never the index lock.
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION}
    env["GIT_OPTIONAL_LOCKS"] = "0"

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


@cache
def cpu() -> dict:
    """``cpu``: the processor's name (Linux's /proc/cpuinfo, else what Python says) and
    ``cpu_capability``: the instruction set torch's CPU kernels use (AVX2, AVX512, ...):
    deterministic runs repeat bit for bit only where both are the same."""
    name = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), None)
    except OSError:
        pass
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    info = {"cpu": name or platform.processor() or None, "cpu_capability": capability}
    return {k: v for k, v in info.items() if v}


def resolved(config, algorithm) -> dict:
    """``resolved``: what this run took where its configuration left None to a default
    resolved only as it runs: the algorithm's options (``tau``, ``lam``, ``shards``:
    :meth:`hpctrain.algorithm.Algorithm.resolved_options`) and the folder a built-in data
    set was read from (``$HPCTRAIN_DATA`` or the system's). The tables keep None, so a
    repeat from config.json resolves them as before, on its own workers and machine."""
    out = {}
    if own := algorithm.resolved_options():
        out["algorithm"] = own
    name, folder = config.data.dataset, config.data.data_dir
    if folder is None and name in data.DATASETS and name != "synthetic":
        out["data"] = {"data_dir": str(data.find_dir(name).resolve())}
    return {"resolved": out} if out else {}


def code_files(config) -> dict:
    """``model_sha256``, ``algo_sha256``: the hash of the file a model or algorithm of the
    user's own comes from (``./net.py:build``), which config.json names by its path only: an
    edit between two runs is seen. A module's (``mypkg.nets:build``) is left out: it is
    an installed package's, which the run names by its module, not by a file."""
    out = {}
    for key, reference in (("model_sha256", config.model.name), ("algo_sha256", config.algo)):
        if plugins.is_reference(reference) and plugins.is_file_reference(reference):
            path = reference.rpartition(":")[0]
            try:
                out[key] = sha256_of(path)
            except OSError:  # read at the launch's checks: gone since, a run's own business
                pass
    return out


def classes(config) -> dict:
    """``classes``: the names of the data's classes in label order, where the data name them
    (an image folder's class folders, a loader's Dataset's ``classes``:
    :func:`hpctrain.userdata.class_names`), so that ``model.pt``'s outputs can be read as
    names (torchvision's ``classes``); nothing where they name none."""
    name = config.data.dataset
    if not isinstance(name, str) or not userdata.is_user(name):
        return {}
    names = userdata.class_names(name, config.data.data_dir)
    return {"classes": names} if names else {}


def process_group() -> dict:
    """``process_group``: the backend of torch.distributed's group where the run set one up
    (the torch sync backend, torchrun): gloo where ranks share a GPU, which one NCCL
    communicator cannot hold, so a run's record says which library reduced its gradients."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return {"process_group": str(dist.get_backend())}
    return {}


def resumes(resumptions: list[dict], written: Path, info: dict) -> dict:
    """``resumes`` for config.json's ``run_info`` (nothing for a run not resumed):
    :func:`hpctrain.checkpoint.resumptions`, each with ``run_info``, what the attempt before
    it recorded otherwise (its workers, device, versions), taken from config.json
    ``written`` before this attempt writes over it (``info``: this attempt's run_info), so
    that nothing an earlier attempt wrote there is lost."""
    if not resumptions:
        return {}
    try:
        earlier = json.loads(written.read_text()).get("run_info")
    except (OSError, ValueError, AttributeError):  # none (another --out), or not readable
        earlier = None
    earlier = earlier if isinstance(earlier, dict) else {}
    resumes = earlier.get("resumes")
    kept = resumes if isinstance(resumes, list) else []
    entries = []
    for i, entry in enumerate(resumptions[:-1]):  # as the file said, where it is that one
        old = kept[i] if i < len(kept) and isinstance(kept[i], dict) else {}
        same = old.get("update") == entry.get("update") and "run_info" in old
        entries.append({**entry, **({"run_info": old["run_info"]} if same else {})})
    before = {k: v for k, v in earlier.items() if k != "resumes" and info.get(k) != v}
    entries.append({**resumptions[-1], **({"run_info": before} if before else {})})
    return {"resumes": entries}


def _nccl_version() -> str | None:
    try:
        version = torch.cuda.nccl.version()  # a tuple since torch 1.x; raises if not built
    except (AttributeError, RuntimeError):
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def starting_weights(init_from: str | None, resumed_header: dict | None) -> dict:
    """``init_from_sha256``: the hash of the ``--init-from`` file the run started from, so a
    file replaced under the same name is seen; it goes into config.json's ``run_info`` and
    every checkpoint's header. A run resumed from a checkpoint (``resumed_header``) did not
    read the file again: the hash that header carries is kept (none if it has none), also
    when the resumed run writes to another ``--out``."""
    if not init_from:
        return {}
    if resumed_header is not None:
        value = resumed_header.get("init_from_sha256")
        return {"init_from_sha256": value} if isinstance(value, str) else {}
    return {"init_from_sha256": sha256_of(weights.file_of(init_from))}


def before_mpi(init_from: str | None, resumed: bool) -> None:
    """What rank 0 asks of git and of the file system before MPI starts, cached for the
    write: the commit (a fork, which some networks' drivers dislike once MPI runs) and the
    starting weights' hash (a large file on a slow file system would hold up the others)."""
    commit()
    if init_from and not resumed:
        sha256_of(weights.file_of(init_from))


def sha256_of(path: str | Path) -> str:
    """The sha256 of a file's bytes, read a megabyte at a time (a model file can be large);
    remembered while the file is the same: its inode, size and change time (which a copy
    that keeps the modification time, ``cp -p`` or ``rsync -a``, still moves)."""
    stat = os.stat(path)
    return _sha256(str(Path(path).resolve()), stat.st_dev, stat.st_ino, stat.st_size,
                   stat.st_ctime_ns)


@cache
def _sha256(path: str, *same_file: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
