"""What every user data source's samples and labels pass, and how a refusal names the set.

The npz, image folder and loader sources (the modules beside this one) share these checks
and conversions, so that one mistake reads alike whatever the data came from: samples of at
least two dimensions holding values, of one scale (uint8 or not) in both splits, integers
float32 holds exactly, no NaN or Inf; labels one integer per sample in ``[0, MAX_CLASSES)``;
the number of classes given or found; the training samples' seeded numbering
(:func:`numbered`) and the reading of a shard's rows in file order (:func:`rows_of`).
"""

from __future__ import annotations

import difflib
import mmap
import reprlib

import numpy as np
import torch

from hpctrain import option_names
from hpctrain.errors import UsageError

MAX_CLASSES = 1_000_000  # more is a typo or a wrong array: the last layer alone would not fit
SPLITS = ("train", "test")


def dataset_said(name: str, part: str = "") -> str:
    """Data set ``name`` in a refusal, followed by ``part`` (a split, an array) where one is
    named: as typed on the command line (``--dataset npz:x.npz x_train``), from Python as
    the field given (``DataConfig.dataset='npz:x.npz' x_train``), who typed no flag
    (:func:`hpctrain.option_names.said`)."""
    said = option_names.said("--dataset", name, typed=f"--dataset {name}")
    return f"{said} {part}" if part else said


def first_not_finite(x: torch.Tensor) -> int | None:
    """The first row of ``x`` holding NaN or Inf, or None; checked about 16 MiB at a time, so
    a large set costs no copy of itself (isfinite's temporaries are its input's size)."""
    step = max(1, (1 << 22) // max(1, x[0].numel())) if len(x) else 1
    for start in range(0, len(x), step):
        finite = torch.isfinite(x[start:start + step].flatten(1)).all(dim=1)
        if not finite.all():
            return start + int((~finite).nonzero()[0])
    return None


_EXACT = 1 << 24  # float32 holds every integer up to 2**24 in magnitude, not all above it


def exact_in_float32(what: str, x, row_of=None) -> None:
    """UsageError naming the first sample (its row in ``x``, or ``row_of(row)``: the file's)
    and value of integer samples ``x`` that float32, which training reads them as, would
    round (above 2**24 in magnitude): 16777217 trained as 16777216, without a word. One pass
    of max and min over ``x`` (a memory map's read from its file: :func:`_extremes`); rows are
    searched only when one is out of range."""
    if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()):
        return  # numpy has no bfloat16: .numpy() raised "unsupported ScalarType", exit 1
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


def as_float(images) -> torch.Tensor:
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


def sample_shape(what: str, shape: tuple) -> tuple:
    if len(shape) < 2:
        raise UsageError(f"{what}: want samples of shape N x ... (at least 2 dimensions), got "
                         f"{shape}")
    inner = tuple(int(s) for s in shape[1:])
    if 0 in inner:
        raise UsageError(f"{what}: samples of shape {inner} hold no values")
    return (1, *inner) if len(inner) == 2 else inner


def type_name(x) -> str:
    """The type of numbers ``x`` holds (float32, uint8, ...): one name for a tensor and an
    array of one type, whatever the array's byte order."""
    if isinstance(x, torch.Tensor):
        return str(x.dtype).removeprefix("torch.")
    return np.asarray(x).dtype.newbyteorder("=").name


def one_scale(what: str, types: dict[str, str]) -> None:
    """UsageError when one split is uint8 and the other not: uint8 is scaled to [0, 1] and
    every other type kept as given, so the test set was scored at 255 times (or 1/255 of) the
    scale the model was trained at, and the run reported it without a word. Which scale was
    meant is unknown, so neither is chosen."""
    if (types["train"] == "uint8") != (types["test"] == "uint8"):
        raise UsageError(f"{what}: the training samples are {types['train']} but the test "
                         f"samples {types['test']}; uint8 is scaled to [0, 1] and other "
                         "types are kept as given, so the two would differ in scale: give "
                         "both one type")


def numbered(labels: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """The file rows of a split's samples in the order they are numbered (None: file order),
    and its labels in that order. Training samples are numbered in a fixed pseudo-random
    order (seed 0, as an image folder's files): ``--partition iid`` cuts the numbering into
    the ranks' blocks, which for data stored class by class held one or two classes each
    (label skew, under ``--shuffle local``). Test samples keep the file's order: the whole
    test set is read in one pass."""
    order = {"train": np.random.default_rng(0).permutation(len(labels["train"])), "test": None}
    return order, {s: y if order[s] is None else y[order[s]] for s, y in labels.items()}


def rows_of(x, rows: np.ndarray):
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


def checked_labels(what: str, y, count: int) -> np.ndarray:
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


def class_count(what: str, labels: list[np.ndarray], given) -> int:
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
        v = as_numpy(given)
        shown = reprlib.repr(v.tolist())
    except (TypeError, ValueError):  # a ragged list
        v, shown = np.empty(0), reprlib.repr(given)
    whole = v.size == 1 and v.dtype.kind in "iuf" and float(v.item()).is_integer()
    if not whole or not 2 <= int(v.item()) <= MAX_CLASSES:
        raise UsageError(f"{what}: num_classes {shown}; want one whole number from 2 to "
                         f"{MAX_CLASSES}")
    return int(v.item())


def misspelt(name: str, known: tuple[str, ...]) -> str | None:
    """The name of ``known`` that ``name`` is close to (a typo: ``n_classes``, ``X_train``),
    or None: an array or key of that name was ignored, and the run trained on a class count
    or data the user did not mean, without a word."""
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.8)
    return close[0] if close else None


def numbers_in(where: str, array: np.ndarray) -> np.ndarray:
    """``array`` if it holds numbers (bool, int, float), else UsageError naming it."""
    if array.dtype.hasobject:
        raise UsageError(f"{where} holds Python objects")
    if array.dtype.kind not in "biuf":
        raise UsageError(f"{where} holds {array.dtype}, not numbers")
    return array


def as_numpy(v) -> np.ndarray:
    """``v`` as a numpy array; a bfloat16 tensor (numpy has no such type) as float32."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    return np.asarray(v)
