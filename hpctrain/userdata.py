"""Users' own data: ``--dataset npz:PATH``, ``imagefolder:PATH`` or ``MODULE:CALLABLE``.

:mod:`hpctrain.data` hands every ``--dataset`` that is not a built-in name to this module, so
the rest of hpctrain (both placements, the shuffles, EC's relabelling) reads user data through
the same four calls as the built-in sets: ``size``, ``load``, ``load_labels``, ``load_indices``.

Formats:

- ``npz:PATH``: arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (``np.savez``), and
  optionally ``num_classes``, in either byte order; other arrays are not read, and one named
  almost as one of these that the file lacks (``n_classes`` without ``num_classes``,
  ``X_train`` without ``x_train``: :func:`_npz_typos`) is refused as its likely typo. Members
  stored uncompressed (``np.savez``) are memory-mapped, so a rank that holds a shard reads
  only its rows; compressed ones (``np.savez_compressed``) are read whole, and let go once the
  rank took its part (:func:`release`).
- ``imagefolder:PATH``: ``PATH/train/<class>/<image>`` and ``PATH/test/<class>/<image>``
  (PNG, JPEG, BMP, GIF, TIFF, WebP; Pillow decodes them). Classes are the sorted folder names
  of ``train``, each holding an image; hidden folders and files (``.ipynb_checkpoints``) are
  skipped. Samples are numbered in a fixed pseudo-random order (seed 0), so blocks in
  "file order" are not one class each; a rank decodes only the images it holds. Images are
  grey (one channel) if the first one is, else RGB (16-bit grey scaled to 8 bits), and must
  all have its size (checked for the first image before MPI starts, for each as it is read).
- ``MODULE:CALLABLE`` or ``./FILE.py:CALLABLE`` (:mod:`hpctrain.plugins`): called once per
  process (with ``data_dir=``, made absolute, if it takes that argument; torch's, numpy's and
  Python's global random numbers seeded to 0 during the call, so every rank gets the same
  data; called again only to read a split :func:`release` let go) and returning
  ``(train, test)`` or ``{"train": ..., "test": ..., "num_classes": C}`` (no other key),
  each set either ``(x, y)`` (tensors or arrays) or a map-style ``torch.utils.data.Dataset``
  of ``(x, y)`` items. A Dataset is read item by item, only the items a rank holds; its labels
  come from its ``targets`` attribute when it has one (else every item is read once to find
  them; an item whose label is not its ``targets`` entry is refused as it is read, item 0
  before MPI starts). An item
  that raises when read, or is no ``(x, y)`` pair with an integer label, is named by its
  index.

Samples are ``N x C x H x W`` (``N x H x W`` gets one channel; ``N x H x W x C`` is warned
of, :func:`channels_last`) or any shape a model of the user's own takes; uint8 values are
scaled to [0, 1], every other type (floats, int16, uint16, ...) is kept as given, as float32,
so a uint8 split needs a uint8 partner; an integer beyond 2**24 in magnitude, which float32
would round, is refused (:func:`_exact_in_float32`). The training samples of an npz file or
a loader are numbered in a fixed pseudo-random order (seed 0), as an image folder's are
(:func:`_numbered`): ``--partition iid`` cuts that order into the ranks' blocks. Labels must
be integers in ``[0, num_classes)``; ``num_classes`` defaults to the largest label plus one, and
either way must be one whole number from 2 to ``MAX_CLASSES``. Neither split may be empty.
Every check fails with one line naming the data set and what is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import inspect
import mmap
import random
import reprlib
import struct
import zipfile
import zlib
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hpctrain import options, plugins
from hpctrain.errors import UsageError, did_you_mean

if TYPE_CHECKING:
    from hpctrain.data import Dataset

FORMATS = ("npz", "imagefolder")
MAX_CLASSES = 1_000_000  # more is a typo or a wrong array: the last layer alone would not fit
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")
SPLITS = ("train", "test")
_WIDE_GREY = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # Pillow's 16- and 32-bit grey


def is_user(name: str) -> bool:
    """Whether ``--dataset name`` is one of the user's (a format prefix or a reference)."""
    return ":" in name


def is_loader(name: str) -> bool:
    """Whether ``--dataset name`` is the user's loader (``MODULE:CALLABLE``, a file's)."""
    return is_user(name) and name.partition(":")[0] not in FORMATS


def check_form(name: str) -> None:
    """The name alone (no file opened): UsageError if it is no form this module reads."""
    kind, _, rest = name.partition(":")
    if kind in FORMATS:
        if not rest:
            what = options.named(f"--dataset {name}", "DataConfig", "dataset", name)
            example = options.example(f"{kind}:data/mine{'.npz' if kind == 'npz' else ''}")
            raise UsageError(f"{what}: give the path, e.g. {example}")
        return
    plugins.check_form("--dataset", name)


def dataset_name(text: str, error: type[Exception] = argparse.ArgumentTypeError) -> str:
    """``--dataset``'s value: a built-in name or a user's form (checked alone); ``error`` else."""
    from hpctrain.data import DATASETS

    if text in DATASETS:
        return text
    if not is_user(text):
        flagged = error is not UsageError or options.on_command_line()
        what = f"unknown --dataset {text!r}" if flagged else \
            f"DataConfig.dataset={text!r} is unknown"
        raise error(f"{what}; choose from {', '.join(DATASETS)}, or "
                    "npz:FILE, imagefolder:DIR, MODULE:CALLABLE, ./FILE.py:CALLABLE"
                    f"{did_you_mean(text, DATASETS)}")
    try:
        check_form(text)
    except UsageError as e:
        raise error(str(e)) from None
    return text


def absolute(name: str) -> str:
    """Paths made absolute (what config.json records), so the run repeats from any folder."""
    kind, _, rest = name.partition(":")
    if kind in FORMATS:
        return f"{kind}:{Path(plugins.home_expanded(rest, '--dataset')).resolve()}"
    return plugins.absolute(name, "--dataset")


def _given(name: str, part: str = "") -> str:
    """Data set ``name`` in a refusal, followed by ``part`` (a split, an array) where one is
    named: as typed on the command line (``--dataset npz:x.npz x_train``), from Python as
    the field given (``DataConfig.dataset='npz:x.npz' x_train``), who typed no flag
    (:func:`hpctrain.plugins.said`)."""
    said = plugins.said("--dataset", name, typed=f"--dataset {name}")
    return f"{said} {part}" if part else said


# ---- the four calls data.py makes ----------------------------------------------------------

def absolute_dir(data_dir: str | None) -> str | None:
    """``--data-dir`` in the one spelling a run uses (absolute, no trailing slash): what
    ``config.json`` records and what a loader is called with, so that a relative or an
    absolute spelling reads (and caches) the data once."""
    return data_dir and str(Path(plugins.home_expanded(data_dir, "--data-dir")).resolve())


def size(name: str, split: str, data_dir: str | None = None) -> int:
    return _opened(name, data_dir).size(_split(split))


def load(name: str, split: str, data_dir: str | None = None, start: int = 0,
         stop: int | None = None) -> Dataset:
    src = _opened(name, data_dir)
    n = src.size(_split(split))
    stop = n if stop is None else stop
    if not 0 <= start <= stop <= n:
        raise UsageError(f"{name} {split}: range [{start}, {stop}) outside its {n} samples")
    return _dataset(name, src, split, np.arange(start, stop))


def load_labels(name: str, split: str, data_dir: str | None = None) -> torch.Tensor:
    return torch.from_numpy(_opened(name, data_dir).labels(_split(split)))


def load_indices(name: str, split: str, indices: Sequence[int] | np.ndarray | torch.Tensor,
                 data_dir: str | None = None) -> Dataset:
    src = _opened(name, data_dir)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    wanted, back = np.unique(idx, return_inverse=True)
    n = src.size(_split(split))
    if wanted.size and (wanted[0] < 0 or wanted[-1] >= n):
        raise UsageError(f"{name} {split}: sample indices outside [0, {n})")
    ds = _dataset(name, src, split, wanted)
    return ds if np.array_equal(wanted, idx) else ds.subset(torch.from_numpy(back))


def items_fixed(name: str, data_dir: str | None = None) -> bool:
    """Whether reading a sample twice gives the same pixels: not for a loader's map-style
    Dataset, whose items a transform may draw at random (augmentation), on each rank its own."""
    src = _opened(name, data_dir)
    return not isinstance(src, CallableSource) or src.pairs


def release(name: str, split: str, data_dir: str | None = None) -> None:
    """This process has taken what it keeps of ``split`` (its shard, its test set): the source
    lets the split's whole arrays go (a compressed .npz's, read whole; a loader's returned
    sets), keeping its labels and sizes. They stayed for the whole run, so a sharded rank held
    all of the data anyway. A later read of the split reads them again (the file, or the
    loader called again)."""
    _opened(name, data_dir).release(_split(split))


def class_names(name: str, data_dir: str | None = None) -> list[str] | None:
    """The classes' names in label order, where the data name them: an image folder's class
    folders (label i: the i-th in sorted order, as torchvision's ``classes``), a loader's
    training Dataset's ``classes`` (torchvision's data sets have one), one name a class; None
    where they name none (an npz file, arrays). A model saved without them was scored with
    a user's own label order."""
    return getattr(_opened(name, data_dir), "class_names", None)


def channels_last(shape: tuple) -> bool:
    """Whether samples of ``shape`` look channels-last (``H x W x C``: the last dimension 1, 3
    or 4, the first not), which would be taken as ``C x H x W`` without a word: 16 channels
    of 16 x 3 images."""
    return len(shape) == 3 and shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4)


def describe(name: str, data_dir: str | None = None) -> dict:
    """Sizes, sample shape and classes, with every label checked (before MPI starts);
    ``untrained``: the test set's classes no training sample has (no model can learn them)."""
    src = _opened(name, data_dir)
    train, test = (src.labels(split) for split in SPLITS)  # checks them
    return {"train": src.size("train"), "test": src.size("test"), "shape": src.shape,
            "classes": src.num_classes,
            "untrained": sorted(int(c) for c in np.setdiff1d(test, train))}


# ---- shared checks and conversion ----------------------------------------------------------

def _split(split: str) -> str:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; choose train or test")
    return split


def _dataset(name: str, src, split: str, rows: np.ndarray) -> Dataset:
    from hpctrain.data import Dataset

    images = src.images(split, rows) if len(rows) else np.empty((0, *src.shape), np.float32)
    if isinstance(src, CallableSource) and not src.pairs:  # the others checked before MPI
        _exact_in_float32(_given(name, split), images,
                          lambda j: int(src.file_rows(split, rows[j:j + 1])[0]))
    x = _as_float(images)
    if len(rows) and tuple(x.shape[1:]) != src.shape:
        raise UsageError(f"{_given(name, split)}: samples of shape {tuple(x.shape[1:])}, "
                         f"but the training set's are {src.shape}")
    bad = _first_not_finite(x)
    if bad is not None:  # one NaN pixel made its batch's every step a skipped one
        row = int(src.file_rows(split, rows[bad:bad + 1])[0])  # the file's, not our numbering
        raise UsageError(f"{_given(name, split)}: sample {row} holds NaN or Inf")
    y = torch.from_numpy(src.labels(split)[rows])
    return Dataset(name, x.contiguous(), y, torch.from_numpy(np.asarray(rows, np.int64)),
                   src.num_classes)


def _first_not_finite(x: torch.Tensor) -> int | None:
    """The first row of ``x`` holding NaN or Inf, or None; checked about 16 MiB at a time, so
    a large set costs no copy of itself (isfinite's temporaries are its input's size)."""
    step = max(1, (1 << 22) // max(1, x[0].numel())) if len(x) else 1
    for start in range(0, len(x), step):
        finite = torch.isfinite(x[start:start + step].flatten(1)).all(dim=1)
        if not finite.all():
            return start + int((~finite).nonzero()[0])
    return None


_EXACT = 1 << 24  # float32 holds every integer up to 2**24 in magnitude, not all above it


def _exact_in_float32(what: str, x, row_of=None) -> None:
    """UsageError naming the first sample (its row in ``x``, or ``row_of(row)``: the file's)
    and value of integer samples ``x`` that float32, which training reads them as, would
    round (above 2**24 in magnitude): 16777217 trained as 16777216, without a word. One pass
    of max and min over ``x`` (a memory map's read from its file: :func:`_extremes`); rows are
    searched only when one is out of range."""
    v = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else \
        np.asanyarray(x)  # a memory map kept one (_extremes)
    if v.dtype.kind not in "iu" or v.dtype.itemsize < 4 or not v.size:  # int16 fits
        return
    low, high = _extremes(v)
    if high <= _EXACT and (v.dtype.kind == "u" or low >= -_EXACT):
        return
    step = max(1, (1 << 20) // max(1, v[0].size))
    for start in range(0, len(v), step):
        block = v[start:start + step].reshape(min(step, len(v) - start), -1)
        bad = block > _EXACT if v.dtype.kind == "u" else (block > _EXACT) | (block < -_EXACT)
        if bad.any():
            j, k = (int(i[0]) for i in np.nonzero(bad))
            row = start + j if row_of is None else row_of(start + j)
            raise UsageError(f"{what}: sample {row} holds the integer {block[j, k].item()}, "
                             "which float32 (what training reads) would round: it holds "
                             f"integers exactly only up to 2**24 = {_EXACT} in magnitude; "
                             "scale the samples")


def _extremes(v: np.ndarray) -> tuple:
    """The smallest and the largest value of ``v``. A memory map of a whole file member (an
    uncompressed .npz's samples, C or Fortran order) is read from the file about 16 MiB at a
    time, not through the map: max and min over the map paged all of it into the process,
    which then held the whole member (every rank, before MPI starts: a 2 GB x_train of int32
    cost each rank 2.2 GB of resident memory); read into one buffer, 16 MiB."""
    if not (isinstance(v, np.memmap) and isinstance(v.base, mmap.mmap) and v.filename
            and (v.flags.c_contiguous or v.flags.f_contiguous)):
        return v.min(), v.max()
    step = max(1, (1 << 24) // v.dtype.itemsize)
    buffer = np.empty(min(step, v.size), v.dtype)
    low, high, left = None, None, v.size
    with open(str(v.filename), "rb", buffering=0) as f:
        f.seek(v.offset)
        while left:
            part = buffer[:min(step, left)]
            got = f.readinto(part.view(np.uint8)) or 0
            if got < part.nbytes:  # the file changed since its header was checked
                return v.min(), v.max()  # as the map reads it
            low = part.min() if low is None else min(low, part.min())
            high = part.max() if high is None else max(high, part.max())
            left -= len(part)
    return low, high


def _as_float(images) -> torch.Tensor:
    """uint8 scaled to [0, 1]; other numbers as float32; ``N x H x W`` given one channel.
    Arrays in the other byte order (``>f4`` saved on a big-endian machine) are converted:
    torch takes only the native one."""
    if not isinstance(images, torch.Tensor):
        images = np.asarray(images)
        if not images.dtype.isnative:
            images = images.astype(images.dtype.newbyteorder("="))
        if images.dtype.itemsize > 8 or images.dtype.kind == "u" and images.dtype.itemsize > 1:
            images = images.astype(np.float32)  # long double, uint16..64: not all torch takes
    x = torch.as_tensor(images)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x[:, None] if x.dim() == 3 else x


def _sample_shape(what: str, shape: tuple) -> tuple:
    if len(shape) < 2:
        raise UsageError(f"{what}: want samples of shape N x ... (at least 2 dimensions), got "
                         f"{shape}")
    inner = tuple(int(s) for s in shape[1:])
    if 0 in inner:
        raise UsageError(f"{what}: samples of shape {inner} hold no values")
    return (1, *inner) if len(inner) == 2 else inner


def _type_name(x) -> str:
    """The type of numbers ``x`` holds (float32, uint8, ...): one name for a tensor and an
    array of one type, whatever the array's byte order."""
    if isinstance(x, torch.Tensor):
        return str(x.dtype).removeprefix("torch.")
    return np.asarray(x).dtype.newbyteorder("=").name


def _one_scale(what: str, types: dict[str, str]) -> None:
    """UsageError when one split is uint8 and the other not: uint8 is scaled to [0, 1] and
    every other type kept as given, so the test set was scored at 255 times (or 1/255 of) the
    scale the model was trained at, and the run reported it without a word. Which scale was
    meant is unknown, so neither is chosen."""
    if (types["train"] == "uint8") != (types["test"] == "uint8"):
        raise UsageError(f"{what}: the training samples are {types['train']} but the test "
                         f"samples {types['test']}; uint8 is scaled to [0, 1] and other "
                         "types are kept as given, so the two would differ in scale: give "
                         "both one type")


def _numbered(labels: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """The file rows of a split's samples in the order they are numbered (None: file order),
    and its labels in that order. Training samples are numbered in a fixed pseudo-random
    order (seed 0, as an image folder's files): ``--partition iid`` cuts the numbering into
    the ranks' blocks, which for data stored class by class held one or two classes each
    (label skew, under ``--shuffle local``). Test samples keep the file's order: the whole
    test set is read in one pass."""
    order = {"train": np.random.default_rng(0).permutation(len(labels["train"])), "test": None}
    return order, {s: y if order[s] is None else y[order[s]] for s, y in labels.items()}


def _rows_of(x, rows: np.ndarray):
    """``x[rows]`` (an array, a memory map or a tensor) as an array or a tensor. Rows not in
    ascending order (a shard of the training samples, numbered in a seeded order) are read in
    ascending order, about 4 MiB at a time: a memory-mapped file is read front to back, not
    at random, and no second copy of the rows is made."""
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(rows)]
    if np.all(rows[1:] >= rows[:-1]):
        return np.ascontiguousarray(x[rows])
    ascending = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *x.shape[1:]), x.dtype)
    step = max(1, (1 << 22) // max(1, x.dtype.itemsize * int(np.prod(x.shape[1:]))))
    for start in range(0, len(rows), step):
        part = ascending[start:start + step]
        out[part] = x[rows[part]]
    return out


def _checked_labels(what: str, y, count: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise UsageError(f"{what}: labels must be one integer per sample, got shape {y.shape}")
    if len(y) != count:
        raise UsageError(f"{what}: {count} samples but {len(y)} labels")
    if y.dtype.kind not in "iu" and not (
            y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
        raise UsageError(f"{what}: labels must be integers, not {y.dtype}")
    # The range before int64, and each value as given: a uint64 above 2**63 wraps negative,
    # a float 1e20 becomes -2**63 (and numpy warns of an invalid cast).
    if y.size and y.min() < 0:
        raise UsageError(f"{what}: label {y.min().item()} is negative; labels are class "
                         "indices 0, 1, ...")
    if y.size and y.max() >= MAX_CLASSES:
        raise UsageError(f"{what}: label {y.max().item()} is too large; labels are class "
                         f"indices below {MAX_CLASSES}")
    return y.astype(np.int64)


def _classes(what: str, labels: list[np.ndarray], given) -> int:
    """The number of classes: ``given`` with the data (checked), else the largest label + 1."""
    top = max((int(y.max()) for y in labels if y.size), default=-1)
    if given is None:
        if top < 1:
            raise UsageError(f"{what}: every label is 0, one class; a classifier needs 2 or "
                             "more (give num_classes with the data if the others are only "
                             "absent here)")
        return top + 1
    c = _num_classes(what, given)
    if top >= c:
        raise UsageError(f"{what}: label {top} is outside [0, {c}) (num_classes {c})")
    return c


def _num_classes(what: str, given) -> int:
    """``num_classes`` as a user gave it, as an int: one whole number (3, or 3.0, alone or in a
    one-element array or tensor) from 2 to MAX_CLASSES, else UsageError naming the value."""
    try:
        v = _numpy(given)
        shown = reprlib.repr(v.tolist())
    except (TypeError, ValueError):  # a ragged list
        v, shown = np.empty(0), reprlib.repr(given)
    whole = v.size == 1 and v.dtype.kind in "iuf" and float(v.item()).is_integer()
    if not whole or not 2 <= int(v.item()) <= MAX_CLASSES:
        raise UsageError(f"{what}: num_classes {shown}; want one whole number from 2 to "
                         f"{MAX_CLASSES}")
    return int(v.item())


def forget() -> None:
    """Drop the data sources read so far: each run (``train``, ``simulate``) reads its data
    once, and a script's next run reads a file rewritten, or a loader's new data, again."""
    _source.cache_clear()


def _opened(name: str, data_dir: str | None):
    """``name``'s source, read once per process: by ``data_dir``'s one spelling
    (:func:`absolute_dir`), as the four calls' users spell it differently (a relative
    ``--data-dir`` before launch, absolute after); a loader was called, and held, twice."""
    return _source(name, absolute_dir(data_dir))


@cache
def _source(name: str, data_dir: str | None):
    check_form(name)
    kind, _, rest = name.partition(":")
    if kind == "npz":
        return NpzSource(name, Path(plugins.home_expanded(rest, "--dataset")))
    if kind == "imagefolder":
        return ImageFolderSource(name, Path(plugins.home_expanded(rest, "--dataset")))
    return CallableSource(name, data_dir)


# ---- npz -------------------------------------------------------------------------------------

def _misspelt(name: str, known: tuple[str, ...]) -> str | None:
    """The name of ``known`` that ``name`` is close to (a typo: ``n_classes``, ``X_train``),
    or None: an array or key of that name was ignored, and the run trained on a class count
    or data the user did not mean, without a word."""
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.8)
    return close[0] if close else None


def _npz_typos(files: list[str], read: tuple[str, ...]) -> list[tuple[str, str]]:
    """(array, the name it is likely a typo of) for the arrays of ``files`` named almost as
    one of ``read`` that the file lacks (``X_train`` without ``x_train``, ``n_classes``
    without ``num_classes``). Not where that name is there too: ``x_test_c`` beside
    ``x_test`` is the user's own array (a corrupted test set), not a typo."""
    close = ((k, _misspelt(k, read)) for k in files if k not in read)
    return [(k, meant) for k, meant in close if meant is not None and meant not in files]


class NpzSource:
    """``x_train``, ``y_train``, ``x_test``, ``y_test`` in one ``.npz`` file."""

    KEYS = ("x_train", "y_train", "x_test", "y_test")
    READ = (*KEYS, "num_classes")

    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path = name, path
        if not path.is_file():
            raise UsageError(f"{_given(name)}: no file {path}")
        try:
            z = np.load(path, mmap_mode="r", allow_pickle=False)  # mmap: a .npy is not read
            if isinstance(z, np.ndarray):
                raise UsageError(f"{_given(name)}: {path} is a .npy array, not an .npz archive "
                                 f"of {', '.join(self.KEYS)} (save them with np.savez)")
            with z:
                missing = [k for k in self.KEYS if k not in z.files]
                typos = _npz_typos(z.files, self.READ)
                given = z["num_classes"] if "num_classes" in z.files else None
                self._labels = {s: z[f"y_{s}"] for s in SPLITS} if not missing else {}
        except UsageError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            if not zipfile.is_zipfile(path):  # numpy took it for a pickle: say what it is not
                raise UsageError(f"{_given(name)}: {path} is not an .npz archive (a zip of "
                                 f"{', '.join(self.KEYS)} saved with np.savez)") from None
            raise UsageError(f"{_given(name)}: cannot read {path} as .npz ({e})") from None
        if missing:
            likely = "".join(f"; {key!r} is likely a typo of {meant!r}" for key, meant in typos)
            raise UsageError(f"{_given(name)}: {path} has no {', '.join(missing)} (it has "
                             f"{', '.join(z.files) or 'nothing'}{likely})")
        if typos:
            key, meant = typos[0]
            raise UsageError(f"{_given(name)}: {path} has an array {key!r}, which is not "
                             f"read; did you mean {meant!r}? (it reads "
                             f"{', '.join(self.READ)})")
        self._x = {s: self._member(f"x_{s}") for s in SPLITS}
        self.shape = _sample_shape(_given(name, "x_train"), self._x["train"].shape)
        test_shape = _sample_shape(_given(name, "x_test"), self._x["test"].shape)
        if test_shape != self.shape:
            raise UsageError(f"{_given(name)}: x_test samples are {test_shape}, x_train's "
                             f"{self.shape}")
        _one_scale(_given(name), {s: _type_name(self._x[s]) for s in SPLITS})
        empty = [f"x_{s}" for s in SPLITS if len(self._x[s]) == 0]
        if empty:
            raise UsageError(f"{_given(name)}: {path} has no samples in {empty[0]}")
        for s in SPLITS:
            _exact_in_float32(_given(name, f"x_{s}"), self._x[s])
        labels = {s: _checked_labels(_given(name, f"y_{s}"), self._labels[s],
                                     len(self._x[s])) for s in SPLITS}
        self.num_classes = _classes(_given(name), list(labels.values()), given)
        self._order, self._labels = _numbered(labels)

    def _member(self, key: str):
        """The array ``key``: memory-mapped when stored uncompressed, else read whole.
        UsageError naming it when it is no numpy array, holds Python objects or is cut short
        (a memory map would read on into the next member)."""
        where = f"{_given(self.name)}: {key} in {self.path}"
        with zipfile.ZipFile(self.path) as zf:
            try:
                info = zf.getinfo(key + ".npy")
            except KeyError:  # np.load lists a member saved without the suffix as well
                raise UsageError(f"{where} is not a .npy member (save it with np.savez)") \
                    from None
        compressed = info.compress_type != zipfile.ZIP_STORED
        try:
            if compressed:
                with np.load(self.path, allow_pickle=False) as z:
                    array = z[key]
                if not isinstance(array, np.ndarray):  # np.load gives a non-.npy member's bytes
                    raise ValueError("not in .npy format")
            else:
                shape, fortran, dtype, start, offset = self._header(info)
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise UsageError(f"{where} holds Python objects") from None
            raise UsageError(f"{where} is not a numpy array ({e})") from None
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # a damaged member
            raise UsageError(f"{where} cannot be read: {type(e).__name__}: {e}") from None
        if compressed:
            return _numbers_in(where, array)
        _numbers_in(where, np.empty(0, dtype))
        size = int(np.prod(shape)) * dtype.itemsize
        if offset - start + size > info.file_size:
            raise UsageError(f"{where} is cut short: its header promises {size} bytes of data, "
                             f"{info.file_size - (offset - start)} are stored")
        if size == 0:
            return np.empty(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", shape=shape, offset=offset,
                         order="F" if fortran else "C")

    def _header(self, info: zipfile.ZipInfo):
        """An uncompressed member's array header: shape, Fortran order, dtype, and where in
        the file the member's bytes and its array data start."""
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            f.seek(start)
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            return shape, fortran, dtype, start, f.tell()

    def size(self, split: str) -> int:
        return len(self._labels[split])

    def labels(self, split: str) -> np.ndarray:
        return self._labels[split]

    def file_rows(self, split: str, rows: np.ndarray) -> np.ndarray:
        order = self._order[split]
        return rows if order is None else order[rows]

    def images(self, split: str, rows: np.ndarray) -> np.ndarray:
        x = self._x[split]
        if x is None:  # released: read again (a memory map, or a compressed member whole)
            x = self._member(f"x_{split}")
        return _rows_of(x, self.file_rows(split, rows))

    def release(self, split: str) -> None:
        self._x[split] = None


def _numbers_in(where: str, array: np.ndarray) -> np.ndarray:
    """``array`` if it holds numbers (bool, int, float), else UsageError naming it."""
    if array.dtype.hasobject:
        raise UsageError(f"{where} holds Python objects")
    if array.dtype.kind not in "biuf":
        raise UsageError(f"{where} holds {array.dtype}, not numbers")
    return array


# ---- image folders ---------------------------------------------------------------------------

class ImageFolderSource:
    """``PATH/{train,test}/<class>/<image>``: one folder per class."""

    def __init__(self, name: str, root: Path) -> None:
        self.name, self.root = name, root
        for split in SPLITS:
            if not (root / split).is_dir():
                raise UsageError(f"{_given(name)}: no folder {root / split} (want "
                                 f"{root}/train/<class>/ and {root}/test/<class>/)")
        self.classes = [p.name for p in _visible(root / "train") if p.is_dir()]
        if len(self.classes) < 2:
            raise UsageError(f"{_given(name)}: {root / 'train'} has {len(self.classes)} "
                             "class folders; want at least 2")
        self.num_classes = len(self.classes)
        self.class_names = list(self.classes)
        self._files = {s: self._listing(s) for s in SPLITS}
        for split in SPLITS:
            if not self._files[split][0]:
                raise UsageError(f"{_given(name)}: no images under {root / split} (want "
                                 f"{root / split}/<class>/<image>)")
        counts = np.bincount(self._files["train"][1], minlength=self.num_classes)
        if (counts == 0).any():  # a class no sample has: no model learns it, nor is told
            empty = root / "train" / self.classes[int(np.argmin(counts))]
            raise UsageError(f"{_given(name)}: class folder {empty} holds no images "
                             f"({', '.join(IMAGE_SUFFIXES)}); add them or remove the folder")
        self.first = self._files["train"][0][0]
        first = self._open(self.first)
        self.mode = "L" if first.mode in ("L", "1", "LA", *_WIDE_GREY) else "RGB"
        self._pixels(first, self.first)  # a first image whose pixels cannot be read fails here
        self.size_wh = first.size
        self.shape = (1 if self.mode == "L" else 3, first.size[1], first.size[0])

    def _listing(self, split: str) -> tuple[list[Path], np.ndarray]:
        files, labels = [], []
        folders = [p for p in _visible(self.root / split) if p.is_dir()]
        for folder in folders:
            if folder.name not in self.classes:
                raise UsageError(f"{_given(self.name)}: {folder} is a class the training set "
                                 f"does not have ({', '.join(self.classes)})")
            mine = [p for p in _visible(folder) if p.suffix.lower() in IMAGE_SUFFIXES]
            files += mine
            labels += [self.classes.index(folder.name)] * len(mine)
        order = np.random.default_rng(0).permutation(len(files))
        return [files[i] for i in order], np.asarray(labels, np.int64)[order]

    def _open(self, path: Path):
        try:
            from PIL import Image, UnidentifiedImageError
        except ImportError:
            raise UsageError(f"{_given(self.name)}: image folders need Pillow (pip install "
                             "pillow)") from None

        try:
            img = Image.open(path)
            img.load()
            return img
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise UsageError(f"{_given(self.name)}: cannot read image {path} ({e})") from None

    def size(self, split: str) -> int:
        return len(self._files[split][0])

    def labels(self, split: str) -> np.ndarray:
        return self._files[split][1]

    def file_rows(self, split: str, rows: np.ndarray) -> np.ndarray:
        return rows  # numbered in its own seeded order already (_listing)

    def release(self, split: str) -> None:
        """Nothing to let go: an image is decoded when read, and not kept."""

    def images(self, split: str, rows: np.ndarray) -> np.ndarray:
        files = self._files[split][0]
        out = np.empty((len(rows), self.shape[1], self.shape[2], self.shape[0]), np.uint8)
        for j, i in enumerate(rows):
            img = self._open(files[i])
            if img.size != self.size_wh:
                raise UsageError(f"{_given(self.name)}: {files[i]} is {img.size[0]}x"
                                 f"{img.size[1]}, the first image ({self.first}) "
                                 f"{self.size_wh[0]}x{self.size_wh[1]}; all must have one size")
            out[j] = self._pixels(img, files[i]).reshape(out.shape[1:])
        return out.transpose(0, 3, 1, 2)

    def _pixels(self, img, path: Path) -> np.ndarray:
        """``img`` in the folder's mode, 8 bits a channel: 16-bit grey scaled down (Pillow's
        ``convert`` would clip it to white); float pixels refused."""
        if img.mode not in _WIDE_GREY:
            return np.asarray(img.convert(self.mode))
        a = np.asarray(img)
        if img.mode == "F" or a.size and (a.min() < 0 or a.max() > 65535):
            raise UsageError(f"{_given(self.name)}: {path} has {img.mode} pixels beyond 16 "
                             "bits; save 8- or 16-bit images, or the arrays as npz:PATH")
        grey = np.rint(a / 257.0).astype(np.uint8)
        return grey if self.mode == "L" else np.repeat(grey[..., None], 3, axis=-1)


def _visible(folder: Path) -> list[Path]:
    """The entries of ``folder`` not hidden (a name starting with "."), sorted: an editor's or
    a tool's (``.ipynb_checkpoints``, ``.git``, macOS's ``._img.png``) is no class or image.
    torchvision's ImageFolder takes a hidden folder as a class, and then refuses it as empty
    (or, allowed empty, trains a class no sample has)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


# ---- the user's own loader -------------------------------------------------------------------

class CallableSource:
    """Train and test sets returned by the user's ``MODULE:CALLABLE``."""

    def __init__(self, name: str, data_dir: str | None) -> None:
        self.name, self.data_dir = name, data_dir
        parts, given = self._called()
        self._sets = dict(zip(SPLITS, parts, strict=True))
        self.pairs = all(map(_is_pair, parts))  # items that read alike every time
        labels, shapes, types = {}, {}, {}
        for split, part in self._sets.items():
            what = _given(name, split)
            if _is_pair(part):
                x, y = part
                shapes[split] = _sample_shape(what, tuple(np.shape(x)))
                if len(x) == 0:
                    raise UsageError(f"{what}: x has no samples")
                _numbers_in(f"{what} x", np.empty(0, _dtype(x)))
                _exact_in_float32(f"{what} x", x)
                labels[split] = _checked_labels(what, _numpy(y), len(x))
            elif isinstance(part, dict):  # read as a Dataset, its item 0 "raised KeyError: 0"
                raise UsageError(f"{what} is {_described(part)} ({', '.join(map(repr, part))})"
                                 "; want (x, y) as two tensors or numpy arrays, or a map-style "
                                 "Dataset of (x, y) items")
            elif hasattr(part, "__getitem__") and hasattr(part, "__len__"):
                n = len(part)
                if n == 0:
                    raise UsageError(f"{what}: the Dataset is empty")
                x, y = _item(what, part, 0)
                first = _label(what, 0, y)
                _numbers_in(f"{what} item 0's x", np.empty(0, _dtype(x)))
                _exact_in_float32(what, _numpy(x)[None])
                shapes[split] = _sample_shape(what, (n, *np.shape(_numpy(x))))
                targets = getattr(part, "targets", None)
                if targets is None:
                    targets = [_label(what, i, _item(what, part, i)[1]) for i in range(n)]
                labels[split] = _checked_labels(what, _numpy(targets), n)
                if first != labels[split][0]:  # as _item refuses it, but before MPI starts
                    raise _not_targets(what, 0, first, int(labels[split][0]))
            else:
                raise UsageError(f"{what} is a {type(part).__name__}; want (x, y) or a "
                                 "map-style Dataset of (x, y)")
            types[split] = _type_name(x)
        if shapes["test"] != shapes["train"]:
            raise UsageError(f"{_given(name)}: test samples are {shapes['test']}, training "
                             f"samples {shapes['train']}")
        _one_scale(_given(name), types)
        self.shape = shapes["train"]
        self.num_classes = _classes(_given(name), list(labels.values()), given)
        self._file_labels = labels  # by the loader's own index, as its items are checked
        self._order, self._labels = _numbered(labels)
        names = getattr(self._sets["train"], "classes", None)  # a Dataset's (torchvision's)
        self.class_names = [*names] if isinstance(names, list | tuple) \
            and len(names) == self.num_classes and all(isinstance(n, str) for n in names) \
            else None

    def _called(self) -> tuple[tuple, object]:
        """The loader's train and test sets, and the ``num_classes`` it gave (or None)."""
        load = plugins.resolve("--dataset", self.name)
        try:
            takes_dir = "data_dir" in inspect.signature(load).parameters
        except (TypeError, ValueError):
            takes_dir = False
        try:
            with _seeded():
                result = load(data_dir=self.data_dir) if takes_dir else load()
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"{_given(self.name)} raised {plugins.one_line(e)}") from e
        if isinstance(result, dict):
            # A key it does not take first: {"Train": ...} is a typo, not only a missing key
            keys = (*SPLITS, "num_classes")
            unknown = [key for key in result if key not in keys]
            if unknown:
                meant = _misspelt(str(unknown[0]), keys)
                raise UsageError(f"{_given(self.name)} returned a dict with key "
                                 f"{unknown[0]!r}{f' (did you mean {meant!r}?)' if meant else ''}"
                                 f"; it takes {', '.join(map(repr, keys))}")
            missing = [k for k in SPLITS if k not in result]
            if missing:
                raise UsageError(f"{_given(self.name)} returned a dict without "
                                 f"{missing[0]!r}")
            return (result["train"], result["test"]), result.get("num_classes")
        if isinstance(result, (tuple, list)) and len(result) == 2:
            return tuple(result), None
        raise UsageError(f"{_given(self.name)} returned a {type(result).__name__}; want "
                         "(train, test) or {'train': ..., 'test': ...}")

    def _part(self, split: str):
        """The loader's ``split``; after :meth:`release`, the loader is called again (its
        arrays must then give the labels they gave: a loader with a generator of its own
        and no seed would give other data)."""
        part = self._sets[split]
        if part is not None:
            return part
        part = self._called()[0][SPLITS.index(split)]
        if _is_pair(part) and not np.array_equal(_numpy(part[1]), self._file_labels[split]):
            raise UsageError(f"{_given(self.name, split)}: called again, it returned other "
                             "labels; a loader must give the same data every call")
        return part

    def size(self, split: str) -> int:
        return len(self._labels[split])

    def labels(self, split: str) -> np.ndarray:
        return self._labels[split]

    def file_rows(self, split: str, rows: np.ndarray) -> np.ndarray:
        order = self._order[split]
        return rows if order is None else order[rows]

    def release(self, split: str) -> None:
        self._sets[split] = None

    def images(self, split: str, rows: np.ndarray):
        part = self._part(split)
        rows = self.file_rows(split, rows)
        if _is_pair(part):
            x = part[0]
            return _rows_of(x if isinstance(x, torch.Tensor) else np.asarray(x), rows)
        what = _given(self.name, split)
        items = [_numpy(self._item(what, part, split, int(i))) for i in rows]
        shapes = {item.shape for item in items}
        if len(shapes) > 1:
            raise UsageError(f"{what}: items of shapes {', '.join(map(str, sorted(shapes)))}; "
                             "want one shape")
        x = np.stack(items)
        return x[:, None] if x.ndim == 3 else x

    def _item(self, what: str, part, split: str, i: int):
        """Item ``i``'s x, once its label is found to be the one training uses (from
        ``targets``, or read before MPI started): a ``target_transform`` that changes only
        the items' labels would otherwise go unseen."""
        x, y = _item(what, part, i)
        label, expected = _label(what, i, y), int(self._file_labels[split][i])
        if label != expected and getattr(part, "targets", None) is not None:
            raise _not_targets(what, i, label, expected)
        if label != expected:
            raise UsageError(f"{what}: item {i}'s label is {label}, not the {expected} it "
                             "gave before training; a label must not change between reads")
        return x


def _not_targets(what: str, i: int, label: int, target: int) -> UsageError:
    return UsageError(f"{what}: item {i}'s label is {label} but targets[{i}] is {target}; "
                      "hpctrain trains on targets, so make them agree")


@contextlib.contextmanager
def _seeded():
    """torch's, numpy's and Python's global random numbers seeded to 0 while a user's loader
    runs, and put back after: a loader that draws from them (a random split, a shuffle) gives
    every rank, and every run, the same data."""
    state = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    try:
        yield
    finally:
        torch.random.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])


def _item(what: str, part, i: int):
    """Item ``i`` of a user's Dataset, an (x, y) pair: UsageError naming the item if reading
    it raises or it is no pair, not a bare exception in the middle of training."""
    try:
        item = part[i]
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"{what}: item {i} raised {plugins.one_line(e)}") from e
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise UsageError(f"{what}: item {i} is {_described(item)}, not an (x, y) pair; give "
                         "(x, y) as tensors or numpy arrays, or a Dataset of (x, y) items")
    return item


def _label(what: str, i: int, y) -> int:
    """Item ``i``'s label ``y`` as an int: an integer, or a float holding one (as labels given
    as arrays may be), alone or in a one-element array or tensor."""
    try:
        v = _numpy(y)
    except ValueError:  # a ragged list
        v = np.empty(0)
    if v.size != 1 or v.dtype.kind not in "iuf" or not float(v.item()).is_integer():
        raise UsageError(f"{what}: item {i}'s label is {_described(y)}; want an integer "
                         "class index")
    if not 0 <= v.item() < MAX_CLASSES:  # 1e20 would be no int64, and numpy's labels no ints
        raise UsageError(f"{what}: item {i}'s label {v.item()} is outside [0, {MAX_CLASSES}); "
                         "labels are class indices 0, 1, ...")
    return int(v.item())


def _described(v) -> str:
    """What ``v`` is, in a few words, for a message."""
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return f"a {type(v).__name__} of shape {tuple(v.shape)} ({v.dtype})"
    if isinstance(v, (tuple, list, dict)):
        return f"a {type(v).__name__} of {len(v)} elements"
    return f"a {type(v).__name__} ({reprlib.repr(v)})"


def _is_pair(part) -> bool:
    return isinstance(part, (tuple, list)) and len(part) == 2 and all(
        isinstance(p, (torch.Tensor, np.ndarray)) for p in part)


def _dtype(v) -> np.dtype:
    """The kind of numbers ``v`` holds, as a numpy dtype (for :func:`_numbers_in`): a
    tensor's only as complex or not, which is all that can be wrong with it."""
    if isinstance(v, torch.Tensor):
        return np.dtype(np.complex64 if v.is_complex() else np.float32)
    return np.asarray(v).dtype


def _numpy(v) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    return np.asarray(v)
