"""``--dataset imagefolder:PATH``: ``PATH/{train,test}/<class>/<image>``, decoded by Pillow.

The folders are listed when the source is opened (before MPI starts: two classes at least,
every class with an image, the first image readable); each image is decoded only when a rank
reads it, and checked then to have the first one's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpctrain.errors import UsageError
from hpctrain.userdata.samples import SPLITS, dataset_said

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")
_WIDE_GREY = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # Pillow's 16- and 32-bit grey


class ImageFolderSource:
    """``PATH/{train,test}/<class>/<image>``: one folder per class."""

    def __init__(self, name: str, root: Path) -> None:
        self.name, self.root = name, root
        for split in SPLITS:
            if not (root / split).is_dir():
                raise UsageError(f"{dataset_said(name)}: no folder {root / split} (want "
                                 f"{root}/train/<class>/ and {root}/test/<class>/)")
        self.classes = [p.name for p in _visible(root / "train") if p.is_dir()]
        if len(self.classes) < 2:
            raise UsageError(f"{dataset_said(name)}: {root / 'train'} has {len(self.classes)} "
                             "class folders; want at least 2")
        self.num_classes = len(self.classes)
        self.class_names = list(self.classes)
        self._files = {s: self._listing(s) for s in SPLITS}
        for split in SPLITS:
            if not self._files[split][0]:
                raise UsageError(f"{dataset_said(name)}: no images under {root / split} (want "
                                 f"{root / split}/<class>/<image>)")
        counts = np.bincount(self._files["train"][1], minlength=self.num_classes)
        if (counts == 0).any():  # a class no sample has: no model learns it, nor is told
            empty = root / "train" / self.classes[int(np.argmin(counts))]
            raise UsageError(f"{dataset_said(name)}: class folder {empty} holds no images "
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
                raise UsageError(f"{dataset_said(self.name)}: {folder} is a class the training set "
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
            raise UsageError(f"{dataset_said(self.name)}: image folders need Pillow (pip install "
                             "pillow)") from None

        try:
            img = Image.open(path)
            img.load()
            return img
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise UsageError(f"{dataset_said(self.name)}: cannot read image {path} ({e})") from None

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
                raise UsageError(f"{dataset_said(self.name)}: {files[i]} is {img.size[0]}x"
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
            raise UsageError(f"{dataset_said(self.name)}: {path} has {img.mode} pixels beyond 16 "
                             "bits; save 8- or 16-bit images, or the arrays as npz:PATH")
        grey = np.rint(a / 257.0).astype(np.uint8)
        return grey if self.mode == "L" else np.repeat(grey[..., None], 3, axis=-1)


def _visible(folder: Path) -> list[Path]:
    """The entries of ``folder`` not hidden (a name starting with "."), sorted: an editor's or
    a tool's (``.ipynb_checkpoints``, ``.git``, macOS's ``._img.png``) is no class or image.
    torchvision's ImageFolder takes a hidden folder as a class, and then refuses it as empty
    (or, allowed empty, trains a class no sample has)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
