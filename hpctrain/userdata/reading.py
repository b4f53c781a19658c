"""The calls :mod:`hpctrain.data` makes for a user's ``--dataset``, and its value's form.

``size``, ``load``, ``load_labels`` and ``load_indices`` (and ``release``, ``describe``, ...)
read through the source the name gives (:mod:`.npz`, :mod:`.imagefolder`, :mod:`.loader`),
opened once per process (:func:`_source`) and kept until :func:`forget`; the samples a rank
reads become one :class:`hpctrain.data.Dataset`, checked for NaN and Inf.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hpctrain import options, paths, plugins
from hpctrain.errors import UsageError, did_you_mean
from hpctrain.userdata.imagefolder import ImageFolderSource
from hpctrain.userdata.loader import CallableSource
from hpctrain.userdata.npz import NpzSource
from hpctrain.userdata.samples import (
    SPLITS,
    as_float,
    dataset_said,
    exact_in_float32,
    first_not_finite,
)

if TYPE_CHECKING:
    from hpctrain.data import Dataset


FORMATS = ("npz", "imagefolder")


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
        return f"{kind}:{Path(paths.home_expanded(rest, '--dataset')).resolve()}"
    return plugins.absolute(name, "--dataset")


def absolute_dir(data_dir: str | None) -> str | None:
    """``--data-dir`` in the one spelling a run uses (absolute, no trailing slash): what
    ``config.json`` records and what a loader is called with, so that a relative or an
    absolute spelling reads (and caches) the data once."""
    return data_dir and str(Path(paths.home_expanded(data_dir, "--data-dir")).resolve())


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


def _split(split: str) -> str:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; choose train or test")
    return split


def _dataset(name: str, src, split: str, rows: np.ndarray) -> Dataset:
    from hpctrain.data import Dataset

    images = src.images(split, rows) if len(rows) else np.empty((0, *src.shape), np.float32)
    if isinstance(src, CallableSource) and not src.pairs:  # the others checked before MPI
        exact_in_float32(dataset_said(name, split), images,
                          lambda j: int(src.file_rows(split, rows[j:j + 1])[0]))
    x = as_float(images)
    if len(rows) and tuple(x.shape[1:]) != src.shape:
        raise UsageError(f"{dataset_said(name, split)}: samples of shape {tuple(x.shape[1:])}, "
                         f"but the training set's are {src.shape}")
    bad = first_not_finite(x)
    if bad is not None:  # one NaN pixel made its batch's every step a skipped one
        row = int(src.file_rows(split, rows[bad:bad + 1])[0])  # the file's, not our numbering
        raise UsageError(f"{dataset_said(name, split)}: sample {row} holds NaN or Inf")
    y = torch.from_numpy(src.labels(split)[rows])
    return Dataset(name, x.contiguous(), y, torch.from_numpy(np.asarray(rows, np.int64)),
                   src.num_classes)


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
        return NpzSource(name, Path(paths.home_expanded(rest, "--dataset")))
    if kind == "imagefolder":
        return ImageFolderSource(name, Path(paths.home_expanded(rest, "--dataset")))
    return CallableSource(name, data_dir)
