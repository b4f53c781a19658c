"""``--dataset MODULE:CALLABLE``: the train and test sets a user's own loader returns.

The loader (found by :func:`hpctrain.plugins.resolve`) is called with seeded random numbers, so
every rank gets the same data; what it returns is checked before MPI starts: ``(x, y)`` arrays
as a whole, a map-style Dataset by its first item and its labels, and each later item as it is
read, named by its index.
"""

from __future__ import annotations

import contextlib
import inspect
import random
import reprlib

import numpy as np
import torch

from hpctrain import plugins
from hpctrain.errors import UsageError
from hpctrain.userdata.samples import (
    MAX_CLASSES,
    SPLITS,
    as_numpy,
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


class CallableSource:
    """Train and test sets returned by the user's ``MODULE:CALLABLE``."""

    def __init__(self, name: str, data_dir: str | None) -> None:
        self.name, self.data_dir = name, data_dir
        parts, given = self._called()
        self._sets = dict(zip(SPLITS, parts, strict=True))
        self.pairs = all(map(_is_pair, parts))  # items that read alike every time
        labels, shapes, types = {}, {}, {}
        for split, part in self._sets.items():
            what = dataset_said(name, split)
            if _is_pair(part):
                x, y = part
                shapes[split] = sample_shape(what, tuple(np.shape(x)))
                if len(x) == 0:
                    raise UsageError(f"{what}: x has no samples")
                numbers_in(f"{what} x", np.empty(0, _dtype(x)))
                exact_in_float32(f"{what} x", x)
                labels[split] = checked_labels(what, as_numpy(y), len(x))
            elif isinstance(part, dict):  # read as a Dataset, its item 0 "raised KeyError: 0"
                raise UsageError(f"{what} is {_described(part)} ({', '.join(map(repr, part))})"
                                 "; want (x, y) as two tensors or numpy arrays, or a map-style "
                                 "Dataset of (x, y) items")
            elif hasattr(part, "__getitem__") and hasattr(part, "__len__"):
                try:  # a __len__ of -1 or 3.5: Python's ValueError or TypeError, exit 1
                    n = len(part)
                except plugins.USER_ERRORS as e:
                    raise UsageError(f"{what}: len() of the Dataset raised "
                                     f"{plugins.one_line(e)}") from e
                if n == 0:
                    raise UsageError(f"{what}: the Dataset is empty")
                x, y = _item(what, part, 0)
                first = _label(what, 0, y)
                numbers_in(f"{what} item 0's x", np.empty(0, _dtype(x)))
                exact_in_float32(what, as_numpy(x)[None])
                shapes[split] = sample_shape(what, (n, *np.shape(as_numpy(x))))
                targets = getattr(part, "targets", None)
                if targets is None:
                    targets = [_label(what, i, _item(what, part, i)[1]) for i in range(n)]
                labels[split] = checked_labels(what, as_numpy(targets), n)
                if first != labels[split][0]:  # as _item refuses it, but before MPI starts
                    raise _not_targets(what, 0, first, int(labels[split][0]))
            else:
                raise UsageError(f"{what} is a {type(part).__name__}; want (x, y) or a "
                                 "map-style Dataset of (x, y)")
            types[split] = type_name(x)
        if shapes["test"] != shapes["train"]:
            raise UsageError(f"{dataset_said(name)}: test samples are {shapes['test']}, training "
                             f"samples {shapes['train']}")
        one_scale(dataset_said(name), types)
        self.shape = shapes["train"]
        self.num_classes = class_count(dataset_said(name), list(labels.values()), given)
        self._file_labels = labels  # by the loader's own index, as its items are checked
        self._order, self._labels = numbered(labels)
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
        except plugins.USER_ERRORS as e:
            raise UsageError(f"{dataset_said(self.name)} raised {plugins.one_line(e)}") from e
        if isinstance(result, dict):
            # A key it does not take first: {"Train": ...} is a typo, not only a missing key
            keys = (*SPLITS, "num_classes")
            unknown = [key for key in result if key not in keys]
            if unknown:
                meant = misspelt(str(unknown[0]), keys)
                raise UsageError(f"{dataset_said(self.name)} returned a dict with key "
                                 f"{unknown[0]!r}{f' (did you mean {meant!r}?)' if meant else ''}"
                                 f"; it takes {', '.join(map(repr, keys))}")
            missing = [k for k in SPLITS if k not in result]
            if missing:
                raise UsageError(f"{dataset_said(self.name)} returned a dict without "
                                 f"{missing[0]!r}")
            return self._plain((result["train"], result["test"])), result.get("num_classes")
        if isinstance(result, (tuple, list)) and len(result) == 2:
            return self._plain(tuple(result)), None
        raise UsageError(f"{dataset_said(self.name)} returned a {type(result).__name__}; want "
                         "(train, test) or {'train': ..., 'test': ...}")

    def _plain(self, parts: tuple) -> tuple:
        """The sets' (x, y) tensors as training reads them: detached (an x computed with
        autograd on said "Can't call numpy() on Tensor that requires grad", exit 1); one
        that holds no values to read (sparse, on the meta device) refused, naming it (it was
        numpy's or torch's error, exit 1)."""
        plain = []
        for split, part in zip(SPLITS, parts, strict=True):
            arrays = [isinstance(p, (torch.Tensor, np.ndarray)) for p in part] \
                if isinstance(part, (tuple, list)) and len(part) == 2 else []
            if any(arrays) and not all(arrays):  # read as a Dataset of two items: "item 0
                # is a ndarray ..., not an (x, y) pair", which named neither x nor y
                name = "xy"[arrays.index(False)]
                raise UsageError(f"{dataset_said(self.name, split)}: {name} is a "
                                 f"{type(part[arrays.index(False)]).__name__}; give x and y "
                                 "both as tensors or numpy arrays")
            if _is_pair(part):
                for name, t in zip("xy", part, strict=True):
                    if isinstance(t, torch.Tensor) and t.layout != torch.strided:
                        raise UsageError(f"{dataset_said(self.name, split)}: {name} is a "
                                         f"{str(t.layout).removeprefix('torch.')} tensor; give "
                                         "a dense one (.to_dense())")
                    if isinstance(t, torch.Tensor) and t.is_meta:
                        raise UsageError(f"{dataset_said(self.name, split)}: {name} is on the "
                                         "meta device: it holds no values")
                part = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in part)
            plain.append(part)
        return tuple(plain)

    def _part(self, split: str):
        """The loader's ``split``; after :meth:`release`, the loader is called again (its
        arrays must then give the labels they gave: a loader with a generator of its own
        and no seed would give other data)."""
        part = self._sets[split]
        if part is not None:
            return part
        part = self._called()[0][SPLITS.index(split)]
        if _is_pair(part) and not np.array_equal(as_numpy(part[1]), self._file_labels[split]):
            raise UsageError(f"{dataset_said(self.name, split)}: called again, it returned other "
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
            return rows_of(x if isinstance(x, torch.Tensor) else np.asarray(x), rows)
        what = dataset_said(self.name, split)
        items = [as_numpy(self._item(what, part, split, int(i))) for i in rows]
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
    except plugins.USER_ERRORS as e:
        raise UsageError(f"{what}: item {i} raised {plugins.one_line(e)}") from e
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise UsageError(f"{what}: item {i} is {_described(item)}, not an (x, y) pair; give "
                         "(x, y) as tensors or numpy arrays, or a Dataset of (x, y) items")
    return item


def _label(what: str, i: int, y) -> int:
    """Item ``i``'s label ``y`` as an int: an integer, or a float holding one (as labels given
    as arrays may be), alone or in a one-element array or tensor."""
    try:
        v = as_numpy(y)
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
    """The kind of numbers ``v`` holds, as a numpy dtype (for :func:`numbers_in`): a
    tensor's only as complex or not, which is all that can be wrong with it."""
    if isinstance(v, torch.Tensor):
        return np.dtype(np.complex64 if v.is_complex() else np.float32)
    return np.asarray(v).dtype
