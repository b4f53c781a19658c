"""Data sets read from their real files; malformed files are rejected with one line."""

import gzip
import struct
import tracemalloc

import numpy as np
import pytest
import torch

from hpctrain import data, options
from hpctrain.errors import UsageError

FMNIST = data.SYSTEM_DIR / "fashion-mnist"


def write_idx(path, array: np.ndarray, magic_type=0x08, extra=b""):
    header = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes() + extra)


@pytest.fixture
def tiny_idx(tmp_path):
    """A valid 5-sample IDX data set in the Fashion-MNIST layout."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("t10k", 3)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return tmp_path


def test_fashion_mnist_real_files():
    train = data.load("fashion-mnist", "train")
    test = data.load("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert abs(train.images.mean().item()) < 0.01 and abs(train.images.std().item() - 1) < 0.01
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))
    assert torch.equal(train.ids, torch.arange(60000))
    part = data.load("fashion-mnist", "train", start=59990, stop=60000)
    assert torch.equal(part.images, train.images[59990:]) and torch.equal(part.ids[:1],
                                                                           torch.tensor([59990]))
    assert data.size("fashion-mnist", "test") == 10000


def test_loading_normalises_in_place_to_the_same_values(tmp_path):
    """Normalising out of place made a full temporary at each step (loading Fashion-MNIST
    peaked at ~3x its images, the run's peak memory): now one float32 copy, changed in place,
    with the same bits as the out-of-place formula for every byte value."""
    rng = np.random.default_rng(2)
    pixels = np.concatenate([np.arange(256), rng.integers(0, 256, 2000 * 28 * 28 - 256)])
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", pixels.reshape(2000, 28, 28))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 2000))
    tracemalloc.start()  # sees numpy's (and the reader's) buffers, which is where the work is
    try:
        loaded = data.load("fashion-mnist", data_dir=str(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    image_bytes = loaded.images.numel() * loaded.images.element_size()
    assert peak < 1.5 * image_bytes, f"loading peaked at {peak / image_bytes:.2f}x the images"
    mean, std = (torch.tensor(stat).view(1, -1, 1, 1) for stat in data._STATS["fashion-mnist"])
    scaled = torch.from_numpy(pixels.reshape(2000, 1, 28, 28).astype(np.float32) / 255.0)
    reference = (scaled - mean) / std  # the out-of-place formula it replaced
    assert torch.equal(loaded.images, reference)


def test_search_path_order(tiny_idx, monkeypatch):
    monkeypatch.setenv("HPCTRAIN_DATA", str(tiny_idx))
    assert len(data.load("fashion-mnist")) == 5  # $HPCTRAIN_DATA before the system folder
    assert len(data.load("fashion-mnist", data_dir=str(FMNIST))) == 60000  # --data-dir first


def test_missing_dir_names_paths(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="does not exist"):
        data.load("mnist", data_dir=str(tmp_path / "nope"))
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="/file' is a file, not a folder"):  # from Python
        data.load("mnist", data_dir=str(tmp_path / "file"))
    monkeypatch.setenv("HPCTRAIN_DATA", str(tmp_path / "nope"))  # not the system's copy unseen
    with pytest.raises(UsageError, match=f"^HPCTRAIN_DATA {tmp_path}/nope is not a folder$"):
        data.load("fashion-mnist")
    with pytest.raises(UsageError) as refused:  # it said "or pass --data-dir", given one
        data.load("mnist", data_dir=str(tmp_path))
    assert str(refused.value) == (f"no mnist files found (tried {tmp_path}, {tmp_path}/mnist); "
                                  "want train-images-idx3-ubyte[.gz] and the other three IDX "
                                  "files of mnist")


@pytest.mark.parametrize("damage, message", [
    ("magic", "bad magic number"),
    ("truncate", "truncated"),
    ("trailing", "data after"),
    ("count", "holds 5 images but .* holds 4 labels"),
    ("labels", "exceed 9"),
])
def test_malformed_idx_rejected(tiny_idx, damage, message):
    images = tiny_idx / "train-images-idx3-ubyte.gz"
    labels = tiny_idx / "train-labels-idx1-ubyte.gz"
    pixels = np.zeros((5, 28, 28))
    if damage == "magic":
        write_idx(images, pixels, magic_type=0x0D)
    elif damage == "truncate":
        raw = gzip.decompress(images.read_bytes())
        images.write_bytes(gzip.compress(raw[:-100]))
    elif damage == "trailing":
        write_idx(images, pixels, extra=b"\0" * 10)
    elif damage == "count":
        write_idx(labels, np.zeros(4))
    elif damage == "labels":
        write_idx(labels, np.full(5, 12))
    with pytest.raises(UsageError, match=message) as err:
        data.load("fashion-mnist", data_dir=str(tiny_idx))
    assert "\n" not in str(err.value)


def write_plain_idx(path, array: np.ndarray, cut: int = 0):
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(raw[:len(raw) - cut])


@pytest.mark.parametrize("damage, message", [
    ("count", "train-images-idx3-ubyte.gz holds 4 images but .* holds 5 labels"),
    ("labels", "labels in .* for fashion-mnist train exceed 9"),
    ("2-d labels", "train-labels-idx1-ubyte.gz holds 5 x 2 bytes, not N labels"),
    ("image size", "the training and test images differ in size \\(28x28 and 32x32\\)"),
    ("cut", "train-images-idx3-ubyte holds 3932 bytes; its header declares 3936"),
])
def test_the_training_files_are_checked_before_mpi(tiny_idx, damage, message):
    """Before MPI, check_launch read the training labels' header and one test sample: a
    training split whose files disagree ended the job after MPI started, some of them with a
    shape error deep in the first step (exit 1)."""
    images = tiny_idx / "train-images-idx3-ubyte.gz"
    labels = tiny_idx / "train-labels-idx1-ubyte.gz"
    if damage == "count":
        write_idx(images, np.zeros((4, 28, 28)))
    elif damage == "labels":
        write_idx(labels, np.full(5, 12))
    elif damage == "2-d labels":
        write_idx(labels, np.zeros((5, 2)))
    elif damage == "image size":
        write_idx(images, np.zeros((5, 32, 32)))
    else:  # an uncompressed file cut short: its length says so without reading it
        images.unlink()
        write_plain_idx(tiny_idx / "train-images-idx3-ubyte", np.zeros((5, 28, 28)), cut=4)
    with pytest.raises(UsageError, match=message) as err:
        data.check("fashion-mnist", str(tiny_idx))
    assert "\n" not in str(err.value)


def test_sound_files_pass_the_check(tiny_idx):
    data.check("fashion-mnist", str(tiny_idx))
    data.check("fashion-mnist")  # the real files


def test_not_gzip_is_one_line_error(tiny_idx):
    (tiny_idx / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip")
    with pytest.raises(UsageError, match="cannot read"):
        data.load("fashion-mnist", data_dir=str(tiny_idx))


def test_cifar10_binary(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    records = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = rng.integers(0, 256, (4, 3073)).astype(np.uint8)
        rec[:, 0] %= 10
        records[name] = rec
        (folder / name).write_bytes(rec.tobytes())
    train = data.load("cifar10", "train", data_dir=str(tmp_path))
    assert train.images.shape == (20, 3, 32, 32)
    assert train.labels.tolist() == np.concatenate(
        [records[f"data_batch_{i}.bin"][:, 0] for i in range(1, 6)]).tolist()
    middle = data.load("cifar10", "train", data_dir=str(tmp_path), start=3, stop=9)
    assert torch.equal(middle.images, train.images[3:9])
    (folder / "test_batch.bin").write_bytes(records["test_batch.bin"].tobytes()[:-7])
    with pytest.raises(UsageError, match="truncated"):
        data.load("cifar10", "test", data_dir=str(tmp_path))


def test_synthetic_is_deterministic_and_learnable_shape():
    a, b = data.load("synthetic"), data.load("synthetic")
    assert torch.equal(a.images, b.images) and a.shape == data.SYNTHETIC_SHAPE
    assert len(data.load("synthetic", "test")) == data.SYNTHETIC_SIZES["test"]


def test_unknown_dataset():
    with pytest.raises(UsageError, match="unknown dataset 'imagenet'"):
        data.load("imagenet")


def test_a_data_dir_that_is_no_folder_says_what_it_should_hold(tmp_path):
    """It advised "... or pass --data-dir" to one who had passed it."""
    missing, a_file = tmp_path / "none", tmp_path / "file"
    a_file.write_text("")
    for name, folder, said, holds in (
            ("fashion-mnist", missing, "does not exist",
             "train-images-idx3-ubyte[.gz] and the other three IDX files of fashion-mnist"),
            ("cifar10", a_file, "is a file, not a folder",
             "data_batch_1.bin .. data_batch_5.bin and test_batch.bin")):
        with pytest.raises(UsageError) as refused, options.command_line():
            data.find_dir(name, str(folder))
        assert str(refused.value) == \
            f"--data-dir {folder} {said}: give the folder that holds {holds}"
        with pytest.raises(UsageError) as refused:  # from Python: the field, not a flag
            data.find_dir(name, str(folder))
        assert str(refused.value) == \
            f"DataConfig.data_dir={str(folder)!r} {said}: give the folder that holds {holds}"


def test_how_to_get_a_data_set_names_the_options_as_the_caller_gives_them(tmp_path,
                                                                           monkeypatch):
    """From Python it advised "pass --data-dir" and "--dataset synthetic" to a script that
    types no flag: there it names DataConfig's fields."""
    monkeypatch.setenv("HPCTRAIN_DATA", str(tmp_path))  # empty: nothing found there
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path)  # nor the system's copy
    with pytest.raises(UsageError) as typed, options.command_line():
        data.load("fashion-mnist")
    assert str(typed.value).endswith(
        "or put its four *-ubyte.gz files in a folder and pass --data-dir (or set "
        "HPCTRAIN_DATA); --dataset synthetic needs no files")
    with pytest.raises(UsageError) as python:
        data.load("fashion-mnist")
    assert str(python.value).endswith(
        "or put its four *-ubyte.gz files in a folder and set DataConfig.data_dir (or set "
        "HPCTRAIN_DATA); DataConfig.dataset='synthetic' needs no files")
