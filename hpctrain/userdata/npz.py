"""``--dataset npz:PATH``: arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` in one file.

The file is checked when it is opened (before MPI starts): each array there and a numpy
array of numbers, none cut short, no array named as a likely typo of one it reads
(:func:`_npz_typos`). Members stored uncompressed are memory-mapped, so that a rank reads only
its rows; compressed ones are read whole.
"""

from __future__ import annotations

import struct
import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np

from hpctrain.errors import UsageError
from hpctrain.userdata.samples import (
    SPLITS,
    checked_labels,
    class_count,
    dataset_said,
    exact_in_float32,
    misspelt,
    numbered,
    numbers_in,
    one_scale,
    rows_of,
    sample_shape,
    type_name,
)

# What numpy and zipfile raise for a damaged archive or member: a bit flipped in an array's
# header made numpy's header parser raise tokenize's TokenError, which was no UsageError.
_DAMAGED = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, tokenize.TokenError,
            struct.error)


def _npz_typos(files: list[str], read: tuple[str, ...]) -> list[tuple[str, str]]:
    """(array, the name it is likely a typo of) for the arrays of ``files`` named almost as
    one of ``read`` that the file lacks (``X_train`` without ``x_train``, ``n_classes``
    without ``num_classes``). Not where that name is there too: ``x_test_c`` beside
    ``x_test`` is the user's own array (a corrupted test set), not a typo."""
    close = ((k, misspelt(k, read)) for k in files if k not in read)
    return [(k, meant) for k, meant in close if meant is not None and meant not in files]


class NpzSource:
    """``x_train``, ``y_train``, ``x_test``, ``y_test`` in one ``.npz`` file."""

    KEYS = ("x_train", "y_train", "x_test", "y_test")
    READ = (*KEYS, "num_classes")

    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path = name, path
        if not path.is_file():
            raise UsageError(f"{dataset_said(name)}: no file {path}")
        try:
            z = np.load(path, mmap_mode="r", allow_pickle=False)  # mmap: a .npy is not read
            if isinstance(z, np.ndarray):
                raise UsageError(f"{dataset_said(name)}: {path} is a .npy array, not an .npz "
                                 f"archive of {', '.join(self.KEYS)} (save them with np.savez)")
            with z:
                missing = [k for k in self.KEYS if k not in z.files]
                typos = _npz_typos(z.files, self.READ)
                for key in self.READ:
                    if key in z.files:
                        self._promised(key)
                given = z["num_classes"] if "num_classes" in z.files else None
                self._labels = {s: z[f"y_{s}"] for s in SPLITS} if not missing else {}
        except UsageError:
            raise
        except _DAMAGED as e:
            if not zipfile.is_zipfile(path):  # numpy took it for a pickle: say what it is not
                raise UsageError(f"{dataset_said(name)}: {path} is not an .npz archive (a zip of "
                                 f"{', '.join(self.KEYS)} saved with np.savez)") from None
            raise UsageError(f"{dataset_said(name)}: cannot read {path} as .npz ({e})") from None
        if missing:
            likely = "".join(f"; {key!r} is likely a typo of {meant!r}" for key, meant in typos)
            raise UsageError(f"{dataset_said(name)}: {path} has no {', '.join(missing)} (it has "
                             f"{', '.join(z.files) or 'nothing'}{likely})")
        if typos:
            key, meant = typos[0]
            raise UsageError(f"{dataset_said(name)}: {path} has an array {key!r}, which is not "
                             f"read; did you mean {meant!r}? (it reads "
                             f"{', '.join(self.READ)})")
        self._x = {s: self._member(f"x_{s}") for s in SPLITS}
        self.shape = sample_shape(dataset_said(name, "x_train"), self._x["train"].shape)
        test_shape = sample_shape(dataset_said(name, "x_test"), self._x["test"].shape)
        if test_shape != self.shape:
            raise UsageError(f"{dataset_said(name)}: x_test samples are {test_shape}, x_train's "
                             f"{self.shape}")
        one_scale(dataset_said(name), {s: type_name(self._x[s]) for s in SPLITS})
        empty = [f"x_{s}" for s in SPLITS if len(self._x[s]) == 0]
        if empty:
            raise UsageError(f"{dataset_said(name)}: {path} has no samples in {empty[0]}")
        for s in SPLITS:
            exact_in_float32(dataset_said(name, f"x_{s}"), self._x[s])
        labels = {s: checked_labels(dataset_said(name, f"y_{s}"), self._labels[s],
                                     len(self._x[s])) for s in SPLITS}
        self.num_classes = class_count(dataset_said(name), list(labels.values()), given)
        self._order, self._labels = numbered(labels)

    def _member(self, key: str):
        """The array ``key``: memory-mapped when stored uncompressed, else read whole.
        UsageError naming it when it is no numpy array, holds Python objects or is cut short
        (a memory map would read on into the next member)."""
        where = f"{dataset_said(self.name)}: {key} in {self.path}"
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
        except _DAMAGED as e:  # a damaged member
            raise UsageError(f"{where} cannot be read: {type(e).__name__}: {e}") from None
        if compressed:
            return numbers_in(where, array)
        numbers_in(where, np.empty(0, dtype))
        size = int(np.prod(shape)) * dtype.itemsize
        if offset - start + size > info.file_size:
            raise UsageError(f"{where} is cut short: its header promises {size} bytes of data, "
                             f"{info.file_size - (offset - start)} are stored")
        if size == 0:
            return np.empty(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", shape=shape, offset=offset,
                         order="F" if fortran else "C")

    def _promised(self, key: str) -> None:
        """UsageError naming array ``key`` when its header cannot be read, is of Python
        objects (pickled, never loaded) or promises more bytes than the member holds: numpy
        allocates what the header promises before it reads (a compressed member's, and every
        label array's), so a damaged header of 32000000000 samples raised MemoryError (exit
        1), or held memory it had no data for."""
        where = f"{dataset_said(self.name)}: {key} in {self.path}"
        with zipfile.ZipFile(self.path) as zf:
            try:
                info = zf.getinfo(key + ".npy")
            except KeyError:  # no .npy member: _member names it
                return
            try:
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(f)
                    header = f.tell()
            except (ValueError, tokenize.TokenError) as e:  # its header is no .npy header
                raise UsageError(f"{where} is not a numpy array ({type(e).__name__}: {e})") \
                    from None
            except _DAMAGED as e:  # its compressed bytes (a small member is read whole)
                raise UsageError(f"{where} cannot be read: {type(e).__name__}: {e}") from None
        if dtype.hasobject:  # pickled; numpy's refusal named the file, not the array
            raise UsageError(f"{where} holds Python objects")
        size = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if header + size > info.file_size:
            raise UsageError(f"{where} is cut short: its header promises {size} bytes of data, "
                             f"{info.file_size - header} are stored")

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
        return rows_of(x, self.file_rows(split, rows))

    def release(self, split: str) -> None:
        self._x[split] = None
