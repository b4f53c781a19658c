"""Real data sets from their standard files, and synthetic data for tests.

Fashion-MNIST and MNIST are read from IDX files (``*-ubyte.gz`` or uncompressed), CIFAR-10 from
its binary version (``data_batch_*.bin``, ``test_batch.bin``); nothing is unpickled and
nothing is downloaded. A file that is missing, has the wrong magic number, is truncated or
disagrees with its partner (image and label counts) is rejected with a one-line
:class:`UsageError`. Files are looked for in ``--data-dir`` (or its ``<name>`` subfolder)
when given; otherwise in ``$HPCTRAIN_DATA`` (likewise), then ``/usr/share/datasets/<name>``.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpctrain import options, plugins, userdata
from hpctrain.errors import UsageError

DATASETS = ("fashion-mnist", "mnist", "cifar10", "synthetic")
SYSTEM_DIR = Path("/usr/share/datasets")
_HOW_TO_GET = {
    "fashion-mnist": "install Debian's dataset-fashion-mnist (make setup does), or put its four "
                     "*-ubyte.gz files in a folder and {give} (or set HPCTRAIN_DATA); "
                     "{synthetic} needs no files",
    "mnist": "put the four MNIST *-ubyte.gz files in a folder and {give}",
    "cifar10": "unpack CIFAR-10's binary version (cifar-10-binary.tar.gz) and {give}",
}


def _how_to_get(name: str) -> str:
    """How to get built-in data set ``name``'s files, naming the options as the caller gives
    them: ``pass --data-dir`` on the command line, ``set DataConfig.data_dir`` from Python."""
    typed = options.on_command_line()
    return _HOW_TO_GET[name].format(
        give="pass --data-dir" if typed else "set DataConfig.data_dir",
        synthetic="--dataset synthetic" if typed else "DataConfig.dataset='synthetic'")


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
_CIFAR_RECORD = 1 + 3 * 32 * 32
# Per-channel mean and std of each training set, for normalisation.
_STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
SYNTHETIC_SHAPE = (1, 16, 16)
SYNTHETIC_SIZES = {"train": 2048, "test": 512}


@dataclass
class Dataset:
    """Images (float32, N x C x H x W, normalised), labels (int64), global sample ids."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    num_classes: int = 10

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> Dataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Dataset(self.name, self.images[idx], self.labels[idx], self.ids[idx],
                       self.num_classes)


class DeferredDataset:
    """A split known by its size, sample shape and classes, whose samples are read (as a
    :class:`Dataset`) when first used: :meth:`read`, or ``images``, ``labels``, ``ids``. The
    test set of a rank that may never score it (a worker while rank 0 or ``--eval-rank``
    scores the curve, a store's server): every rank held all of it as float32 for the run."""

    def __init__(self, name: str, split: str = "test", data_dir: str | None = None) -> None:
        first = load(name, split, data_dir, 0, 1)  # one sample: its shape and the classes
        self.name, self.shape, self.num_classes = name, first.shape, first.num_classes
        self._size = size(name, split, data_dir)
        self._where = name, split, data_dir
        self._read: Dataset | None = None

    def __len__(self) -> int:
        return self._size

    def read(self) -> Dataset:
        """The samples, read now unless they were already."""
        if self._read is None:
            self._read = load(*self._where)
        return self._read

    @property
    def images(self) -> torch.Tensor:
        return self.read().images

    @property
    def labels(self) -> torch.Tensor:
        return self.read().labels

    @property
    def ids(self) -> torch.Tensor:
        return self.read().ids


def release(name: str, split: str, data_dir: str | None = None) -> None:
    """This process has taken what it keeps of ``split``: a user's data set lets its whole
    arrays go (:func:`hpctrain.userdata.release`); a built-in one keeps nothing between
    reads."""
    if userdata.is_user(name):
        userdata.release(name, split, data_dir)


def load(name: str, split: str = "train", data_dir: str | None = None,
         start: int = 0, stop: int | None = None) -> Dataset:
    """Samples ``[start, stop)`` of data set ``name``'s ``split`` ("train" or "test").

    Only the requested range is kept in memory, so ranks holding a shard read just that.
    A user's data set (``npz:PATH``, ``imagefolder:PATH``, ``MODULE:CALLABLE``) is read by
    :mod:`hpctrain.userdata`, as in the three functions below.
    """
    if userdata.is_user(name):
        return userdata.load(name, split, data_dir, start, stop)
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise UsageError(f"unknown split {split!r}; choose train or test")
    if name == "synthetic":
        return _synthetic(split, start, stop)
    folder = find_dir(name, data_dir)
    if name == "cifar10":
        images, labels = _read_cifar(folder, split, start, stop)
    else:
        img_path, lbl_path, _ = _idx_split(folder, split)
        images = read_idx(img_path, start, stop)[:, None]
        labels = read_idx(lbl_path, start, stop)
    ids = torch.arange(start, start + len(labels))
    return _make_dataset(name, split, folder, images, labels, ids)


def check(name: str, data_dir: str | None = None) -> None:
    """Before MPI starts: the files of a built-in data set agree with one another (what a run
    reads only after MPI started, when a rank loads its part): each split's images and labels
    by their headers (counts, one label per sample, the same image size in both splits), an
    uncompressed file's length, and every label (the label files are small). A gzipped file
    cut short is found only when read. UsageError naming the file. First
    :func:`check_data_dir`, a user's loader included."""
    check_data_dir(name, data_dir)
    if userdata.is_user(name) or name in ("synthetic", "cifar10"):  # checked elsewhere, or
        return  # by its length alone (CIFAR's records: _cifar_records)
    folder = find_dir(name, data_dir)
    sizes = set()
    for split in _IDX_FILES:
        img_path, _, images = _idx_split(folder, split)
        sizes.add(images[1:])
        load_labels(name, split, data_dir)  # reads them whole: length and range checked
        if img_path.suffix != ".gz":
            need = 4 + 4 * len(images) + int(np.prod(images, dtype=np.int64))
            if img_path.stat().st_size != need:
                raise UsageError(f"{img_path} holds {img_path.stat().st_size} bytes; its "
                                 f"header declares {need}")
    if len(sizes) > 1:
        raise UsageError(f"{folder}: the training and test images differ in size "
                         f"({' and '.join('x'.join(map(str, s)) for s in sorted(sizes))})")


def check_data_dir(name: str, data_dir: str | None, loaders: bool = True) -> None:
    """UsageError when ``--data-dir`` is given to a data set that does not read it (it was
    silently ignored): ``synthetic``, ``npz:FILE`` and ``imagefolder:DIR`` (their path is in
    the name), and, with ``loaders``, a loader of the user's that takes no ``data_dir``
    argument (found by importing it; without ``loaders`` only the name is judged)."""
    if data_dir is None:
        return
    why = None
    if name == "synthetic":
        why = ""
    elif name.partition(":")[0] in userdata.FORMATS:
        why = " (the path is in its name)"
    elif loaders and userdata.is_user(name):
        load = plugins.resolve("--dataset", name)
        try:  # as userdata calls it: with data_dir= if it takes that argument
            takes = "data_dir" in inspect.signature(load).parameters
        except (TypeError, ValueError):
            takes = False
        if not takes:
            why = " (it takes no data_dir argument)"
    if why is not None:
        raise UsageError(f"{_named('data_dir', data_dir)} is not used by "
                         f"{_named('dataset', name)}{why}")


def _named(name: str, value: str) -> str:
    """DataConfig field ``name`` with ``value`` in a refusal: as typed on the command line
    (``--data-dir /tmp``), from Python as the field given (``DataConfig.data_dir='/tmp'``,
    :func:`hpctrain.options.named`)."""
    return options.named(f"--{name.replace('_', '-')} {value}", "DataConfig", name, value)


def _idx_split(folder: Path, split: str) -> tuple[Path, Path, tuple[int, ...]]:
    """A split's image and label files, their headers checked against each other (N x H x W
    images, N labels), and the images' dimensions."""
    img_path, lbl_path = (_idx_path(folder, base) for base in _IDX_FILES[split])
    images, labels = _idx_dims(img_path), _idx_dims(lbl_path)
    if len(images) != 3 or len(labels) != 1:
        bad, dims, want = (img_path, images, "N x H x W images") if len(images) != 3 else \
            (lbl_path, labels, "N labels")
        raise UsageError(f"{bad} holds {' x '.join(map(str, dims))} bytes, not {want}")
    if images[0] != labels[0]:
        raise UsageError(f"{img_path} holds {images[0]} images but {lbl_path} holds "
                         f"{labels[0]} labels")
    return img_path, lbl_path, images


def _idx_dims(path: Path) -> tuple[int, ...]:
    """The dimensions an IDX file's header declares."""
    try:
        with _open(path) as f:
            return _idx_header(f, path)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UsageError(f"cannot read {path}: {e}") from None


def _make_dataset(name: str, split: str, folder: Path, images: np.ndarray, labels: np.ndarray,
                  ids: torch.Tensor) -> Dataset:
    """Check the labels, normalise the uint8 images, wrap them as a Dataset.

    The images are normalised in place in their one float32 copy: each out-of-place step
    made a full temporary, so loading peaked at ~3x the images' size, which set a small
    model's peak memory. Same operations in the same order and dtype, so the same bits.
    """
    if labels.size and labels.max() >= 10:
        raise UsageError(f"labels in {folder} for {name} {split} exceed 9: not {name}")
    mean, std = (np.asarray(stat, np.float32).reshape(1, -1, 1, 1) for stat in _STATS[name])
    x = images.astype(np.float32)
    x /= 255.0
    x -= mean
    x /= std
    return Dataset(name, torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64)), ids)


def load_labels(name: str, split: str = "train", data_dir: str | None = None) -> torch.Tensor:
    """All labels of a split (int64), streamed without keeping any image."""
    if userdata.is_user(name):
        return userdata.load_labels(name, split, data_dir)
    if name == "synthetic":
        return _synthetic(split, 0, None).labels
    folder = find_dir(name, data_dir)
    if name == "cifar10":
        parts = []
        for path in (folder / f for f in _CIFAR_FILES[split]):
            with _readable(path) as f:
                parts.append(_read_rows(f, path, np.arange(_cifar_records(path)),
                                        _CIFAR_RECORD, keep=slice(0, 1))[:, 0])
        labels = np.concatenate(parts)
    else:
        labels = read_idx(_idx_path(folder, _IDX_FILES[split][1]))
    if labels.size and labels.max() >= 10:
        raise UsageError(f"labels in {folder} for {name} {split} exceed 9: not {name}")
    return torch.from_numpy(labels.astype(np.int64))


def load_indices(name: str, split: str, indices: Sequence[int] | np.ndarray | torch.Tensor,
                 data_dir: str | None = None) -> Dataset:
    """The samples at ``indices`` (any order), in that order, with their ids.

    Streams through the files once and keeps only the wanted samples, so a rank holding an
    arbitrary shard (e.g. label-skew) never holds the whole set.
    """
    if userdata.is_user(name):
        return userdata.load_indices(name, split, indices, data_dir)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    wanted, back = np.unique(idx, return_inverse=True)
    n = size(name, split, data_dir)
    if wanted.size and (wanted[0] < 0 or wanted[-1] >= n):
        raise UsageError(f"{name} {split}: sample indices outside [0, {n})")
    if name == "synthetic":
        return _synthetic(split, 0, None).subset(idx)
    folder = find_dir(name, data_dir)
    if name == "cifar10":
        parts, offset = [], 0
        for path in (folder / f for f in _CIFAR_FILES[split]):
            count = _cifar_records(path)
            mine = wanted[(wanted >= offset) & (wanted < offset + count)] - offset
            with _readable(path) as f:
                parts.append(_read_rows(f, path, mine, _CIFAR_RECORD))
            offset += count
        records = np.concatenate(parts)
        images, labels = records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0]
    else:
        rows = []
        for base in _IDX_FILES[split]:
            path = _idx_path(folder, base)
            try:
                with _open(path) as f:
                    dims = _idx_header(f, path)
                    item = int(np.prod(dims[1:], dtype=np.int64)) if dims[1:] else 1
                    rows.append(_read_rows(f, path, wanted, item).reshape(-1, *dims[1:]))
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise UsageError(f"cannot read {path}: {e}") from None
        images, labels = rows[0][:, None], rows[1]
    ds = _make_dataset(name, split, folder, images, labels, torch.from_numpy(wanted))
    return ds if np.array_equal(wanted, idx) else ds.subset(torch.from_numpy(back))


# The bytes _read_rows reads at a time: few reads, and little memory beyond the rows kept.
_CHUNK_BYTES = 1 << 22


def _read_rows(f, path: Path, wanted: np.ndarray, row: int,
               keep: slice = slice(None)) -> np.ndarray:
    """Rows ``wanted`` (sorted, unique) of ``row`` bytes each from ``f``'s current position on,
    read in chunks so that only the wanted rows stay in memory; ``keep`` selects their bytes."""
    width = len(range(row)[keep])
    out = np.empty((len(wanted), width), np.uint8)
    per = max(1, _CHUNK_BYTES // row)
    base, done = f.tell(), 0
    stop = int(wanted[-1]) + 1 if len(wanted) else 0
    for lo in range(0, stop, per):
        hi = min(lo + per, stop)
        upto = int(np.searchsorted(wanted, hi))
        if upto == done:
            continue
        f.seek(base + lo * row)
        buf = f.read((hi - lo) * row)
        if len(buf) != (hi - lo) * row:
            raise UsageError(f"{path} is truncated: data ends before row {lo + len(buf) // row}")
        rows = np.frombuffer(buf, np.uint8).reshape(hi - lo, row)
        out[done:upto] = rows[wanted[done:upto] - lo, keep]
        done = upto
    return out


def size(name: str, split: str = "train", data_dir: str | None = None) -> int:
    """Number of samples in a split, read from the file headers only."""
    if userdata.is_user(name):
        return userdata.size(name, split, data_dir)
    if name == "synthetic":
        return SYNTHETIC_SIZES[split]
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    folder = find_dir(name, data_dir)
    if name == "cifar10":
        return sum(_cifar_records(folder / f) for f in _CIFAR_FILES[split])
    return idx_count(_idx_path(folder, _IDX_FILES[split][1]))


def fingerprint(name: str, data_dir: str | None = None) -> str:
    """A digest of every label and of a few samples (first, middle, last of each split):
    what ranks compare to find that they read different data of the same sizes. CIFAR-10's
    labels sit in every record, so only the few samples' are read (all of them would read
    every file, where a sharded rank reads its part); a loader's Dataset gives its labels
    only, its items being perhaps drawn at random."""
    digest = hashlib.sha256()
    fixed = not userdata.is_user(name) or userdata.items_fixed(name, data_dir)
    for split in ("train", "test"):
        n = size(name, split, data_dir)
        if name != "cifar10":
            digest.update(load_labels(name, split, data_dir).numpy().tobytes())
        if fixed:
            rows = load_indices(name, split, sorted({0, n // 2, n - 1}), data_dir)
            digest.update(rows.labels.numpy().tobytes())
            digest.update(rows.images.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def find_dir(name: str, data_dir: str | None = None) -> Path:
    """The folder that holds ``name``'s files: ``data_dir`` if given, else the search path."""
    if data_dir:
        if not Path(data_dir).is_dir():
            said = "is a file, not a folder" if Path(data_dir).exists() else "does not exist"
            raise UsageError(f"{_named('data_dir', data_dir)} {said}: give the folder that holds "
                             f"{_wanted_files(name)}")  # not "pass --data-dir": it was
        candidates = [Path(data_dir), Path(data_dir) / name]
    else:
        candidates = [SYSTEM_DIR / name]
        if os.environ.get("HPCTRAIN_DATA"):
            env = Path(os.environ["HPCTRAIN_DATA"])
            if not env.is_dir():  # a typo would fall back to the system's copy unseen
                raise UsageError(f"HPCTRAIN_DATA {env} is not a folder")
            candidates[:0] = [env, env / name]
    tried: list[Path] = []
    for folder in candidates:
        for sub in (folder, folder / "cifar-10-batches-bin")[:2 if name == "cifar10" else 1]:
            tried.append(sub)
            if _has_files(name, sub):
                return sub
    shown = ", ".join(str(p) for p in tried)
    hint = _how_to_get(name) if not data_dir else "want " + _wanted_files(name)
    raise UsageError(f"no {name} files found (tried {shown}); {hint}")


def _wanted_files(name: str) -> str:
    """The files of built-in data set ``name`` that a ``--data-dir`` holds."""
    if name == "cifar10":
        return "data_batch_1.bin .. data_batch_5.bin and test_batch.bin"
    return f"{_IDX_FILES['train'][0]}[.gz] and the other three IDX files of {name}"


def _has_files(name: str, folder: Path) -> bool:
    if name == "cifar10":
        return (folder / "test_batch.bin").is_file()
    return any((folder / (_IDX_FILES["train"][0] + ext)).is_file() for ext in (".gz", ""))


def _idx_path(folder: Path, base: str) -> Path:
    for ext in (".gz", ""):
        if (folder / (base + ext)).is_file():
            return folder / (base + ext)
    raise UsageError(f"missing {folder / base}.gz")


def _readable(path: Path):
    """``path`` opened for reading (CIFAR's files); UsageError naming it if it cannot be."""
    try:
        return open(path, "rb")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _idx_header(f, path: Path) -> tuple[int, ...]:
    head = f.read(4)
    if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
        raise UsageError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = head[3]
    raw = f.read(4 * ndim)
    if ndim == 0 or len(raw) != 4 * ndim:
        raise UsageError(f"{path} has a truncated IDX header")
    return struct.unpack(f">{ndim}I", raw)


def idx_count(path: Path) -> int:
    """The number of items an IDX file declares (its first dimension)."""
    return _idx_dims(path)[0]


def read_idx(path: Path, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Items ``[start, stop)`` of an IDX file of unsigned bytes, checked against its header.

    Reading the whole file also checks that nothing follows the declared data.
    """
    try:
        with _open(path) as f:
            dims = _idx_header(f, path)
            n, item_shape = dims[0], dims[1:]
            stop = n if stop is None else stop
            if not 0 <= start <= stop <= n:
                raise UsageError(f"{path}: range [{start}, {stop}) outside its {n} items")
            item = int(np.prod(item_shape, dtype=np.int64)) if item_shape else 1
            f.seek(f.tell() + start * item)
            want = (stop - start) * item
            buf = f.read(want)
            if len(buf) != want:
                raise UsageError(
                    f"{path} is truncated: header declares {n} items, data ends before item "
                    f"{start + len(buf) // item}"
                )
            if start == 0 and stop == n and f.read(1):
                raise UsageError(f"{path} has data after the {n} items its header declares")
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    return np.frombuffer(buf, dtype=np.uint8).reshape((stop - start, *item_shape))


def _cifar_records(path: Path) -> int:
    if not path.is_file():
        raise UsageError(f"missing {path}; {_how_to_get('cifar10')}")
    nbytes = path.stat().st_size
    if nbytes % _CIFAR_RECORD:
        raise UsageError(f"{path} is truncated: {nbytes} bytes is not a whole number of records")
    return nbytes // _CIFAR_RECORD


def _read_cifar(folder: Path, split: str, start: int, stop: int | None):
    files = [folder / f for f in _CIFAR_FILES[split]]
    counts = [_cifar_records(p) for p in files]
    total = sum(counts)
    stop = total if stop is None else stop
    if not 0 <= start <= stop <= total:
        raise UsageError(f"{folder}: range [{start}, {stop}) outside its {total} records")
    parts, offset = [], 0
    for path, count in zip(files, counts, strict=True):
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            with _readable(path) as f:
                f.seek((lo - offset) * _CIFAR_RECORD)
                raw = f.read((hi - lo) * _CIFAR_RECORD)
            parts.append(np.frombuffer(raw, dtype=np.uint8).reshape(hi - lo, _CIFAR_RECORD))
        offset += count
    records = np.concatenate(parts) if parts else np.empty((0, _CIFAR_RECORD), np.uint8)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0]


def _synthetic(split: str, start: int, stop: int | None) -> Dataset:
    """Ten smooth class prototypes plus noise: learnable, deterministic, for tests only."""
    n = SYNTHETIC_SIZES[split]
    stop = n if stop is None else stop
    g = torch.Generator().manual_seed(1234)
    protos = torch.nn.functional.avg_pool2d(torch.randn(10, *SYNTHETIC_SHAPE, generator=g), 3, 1, 1)
    g.manual_seed(1 if split == "train" else 2)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = protos[labels] * 3 + torch.randn(n, *SYNTHETIC_SHAPE, generator=g)
    return Dataset("synthetic", images[start:stop].contiguous(), labels[start:stop].clone(),
                   torch.arange(start, stop))
