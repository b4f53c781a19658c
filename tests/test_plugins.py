"""Users' own models, data and update rules, checked before MPI starts; collapse detection
(unit tests: one process, no job)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import refusal

from hpctrain import (
    arguments,
    cli,
    collapse,
    data,
    launch_checks,
    live,
    model_checks,
    optimizers,
    options,
    plugins,
    userdata,
)
from hpctrain.bench.report import reading, tables
from hpctrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from hpctrain.errors import UsageError
from hpctrain.shuffle import TrainDataSpec, make_train_data
from hpctrain.shuffle.train_data import make_sampler

NETS = '''
import random

import numpy as np
import torch
from torch import nn

CALLS = []

def build(input_shape, num_classes, width=8):
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(width * (h // 2) * (w // 2), num_classes))

def wrong_size(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes + 1))

def not_a_module(input_shape, num_classes):
    return "a string"

def lazy(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

NOT_CALLABLE = 3

class Items(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y, self.targets = x, y, y
    def __len__(self):
        return len(self.y)
    def __getitem__(self, i):
        CALLS.append(i)
        return self.x[i], int(self.y[i])

def load():
    g = np.random.default_rng(0)
    x = torch.from_numpy(g.normal(size=(40, 1, 8, 8)).astype(np.float32))
    y = torch.from_numpy(g.integers(0, 3, 40))
    return {"train": Items(x[:30], y[:30]), "test": (x[30:], y[30:]), "num_classes": 3}

def named(names=("ant", "bee", "cow")):
    sets = load()
    sets["train"].classes = list(names)  # as torchvision's data sets name theirs
    return sets

def miscounted():
    return named(("ant", "bee"))

def float_labels():
    x = torch.zeros(4, 1, 8, 8)
    return (x, torch.tensor([0.0, 1.5, 1.0, 0.0])), (x, torch.tensor([0, 1, 1, 0]))

class Linear(nn.Module):
    """A linear model whose forward ``how`` may spoil."""
    def __init__(self, input_shape, num_classes, how=None):
        super().__init__()
        self.how, self.l = how, nn.Linear(int(np.prod(input_shape)), num_classes)
        self.unused = nn.Linear(2, 2)  # gets no gradient, and that is fine
        if how == "frozen":
            self.l.requires_grad_(False)
            self.unused.requires_grad_(False)
        if how == "double":
            self.l.double()
        if how == "bf16":
            self.l.bfloat16()
    def forward(self, x):
        x = x.flatten(1)
        out = self.l(x.to(self.l.weight.dtype))
        return {"detached": out.detach(), "int": out.long()}.get(self.how, out)

class Tokens(nn.Module):
    """Pixels quantised to tokens, through an embedding whose gradients are sparse."""
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.pixels = int(np.prod(input_shape))
        self.emb = nn.EmbeddingBag(self.pixels * 4, 4, mode="mean", sparse=True)
        self.out = nn.Linear(4, num_classes)
    def forward(self, x):
        level = (torch.sigmoid(x.flatten(1)) * 4).long().clamp(0, 3)
        return self.out(self.emb(torch.arange(self.pixels) * 4 + level))

class WrongShape(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.l = nn.Linear(3, num_classes)
    def forward(self, x):
        return self.l(x.flatten(1))  # WrongShape: 64 features, not 3

def load_fails():
    raise OSError("the share is not mounted")  # load_fails

class NoParameters(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.num_classes = num_classes
    def forward(self, x):
        return torch.zeros(len(x), self.num_classes)

SHARED = nn.Sequential(nn.Flatten(), nn.Linear(64, 3), nn.BatchNorm1d(3))

def shared(input_shape, num_classes):
    return SHARED

def lists():
    x = np.zeros((6, 1, 8, 8), np.float32).tolist()
    return (x, [0, 1, 2] * 2), (x, [0, 1, 2] * 2)

class Late(torch.utils.data.Dataset):
    """Item 5 raises; ``targets`` or not, ``x`` a nested list or not, ``label`` as given."""
    def __init__(self, targets=True, lists=False, label=None):
        if targets:
            self.targets = [i % 3 for i in range(8)]
        self.lists, self.label = lists, label
    def __len__(self):
        return 8
    def __getitem__(self, i):
        if i == 5:
            raise KeyError(f"bad item {i}")
        x = [[0.0] * 8] * 8 if self.lists else torch.zeros(1, 8, 8)
        return x, i % 3 if self.label is None else self.label

def late(**kw):
    return Late(**kw), (torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]))

def late_labels():
    return late(targets=False)

def list_items():
    return late(lists=True)

def float_label():
    return late(label=1.5)

def huge_label():
    return late(label=1e20)

def dict_set():
    x, y = np.zeros((4, 1, 8, 8), np.float32), np.array([0, 1, 0, 1])
    return {"x": x, "y": y}, (x, y)

def vector_label():
    return late(label=torch.tensor([0, 1]))

def relabelled():  # as a target_transform does: the items' labels are not their targets
    return late(label=0)  # but item 0's, read before MPI starts

def relabelled_first():
    return late(label=2)

NUM_CLASSES = 3  # what given_classes returns; a test sets it

def given_classes():
    x, y = torch.zeros(6, 1, 8, 8), torch.tensor([0, 1, 2] * 2)
    return {"train": (x, y), "test": (x, y), "num_classes": NUM_CLASSES}

def empty_test():
    return (torch.zeros(6, 1, 8, 8), torch.tensor([0, 1, 2] * 2)), (torch.zeros(0, 1, 8, 8),
                                                                   torch.zeros(0, dtype=int))

def complex_x():
    x, y = torch.zeros(6, 4, dtype=torch.complex64), torch.tensor([0, 1, 2] * 2)
    return (x, y), (x, y)

def empty_samples():
    x, y = np.zeros((6, 0)), np.array([0, 1, 2] * 2)
    return (x, y), (x, y)

class _Complex(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        return torch.ones(3, dtype=torch.complex64), i % 2

def complex_items():
    return _Complex(), _Complex()

def counted(data_dir=None):
    """Counts its calls in data_dir, and says the data_dir it was given."""
    with open(f"{data_dir}/calls", "a") as f:
        f.write(f"{data_dir}\\n")
    x, y = torch.zeros(6, 1, 4, 4), torch.tensor([0, 1, 2] * 2)
    return (x, y), (x, y)

def items_test():
    """Its test set a Dataset (item reads in CALLS)."""
    g = np.random.default_rng(0)
    x = torch.from_numpy(g.normal(size=(40, 1, 8, 8)).astype(np.float32))
    y = torch.from_numpy(g.integers(0, 3, 40))
    return (x[:30], y[:30]), Items(x[30:], y[30:])

def sorted_classes(kind="pairs", n=40):
    """Samples stored class by class (4 classes), each pixel its label; (x, y) arrays or a
    Dataset of them."""
    y = np.repeat(np.arange(4), n // 4)
    x = np.broadcast_to(y[:, None, None, None], (n, 1, 2, 2)).astype(np.float32)
    if kind == "pairs":
        return (x, y), (x, y)
    return Items(torch.from_numpy(x), torch.from_numpy(y)), (x, y)

def sorted_items():
    return sorted_classes("items")

def mixed_scale():
    x = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2] * 2)
    return (x, y), (x.float(), y)

def flat():
    x, y = torch.randn(12, 20), torch.tensor([0, 1, 2] * 4)
    return (x, y), (x, y)

def random_split():
    """Draws from every global generator, as a loader's random split would; counts its calls
    in a file (loaded by path, this file is a module of another name)."""
    with open(__file__ + ".calls", "a") as f:
        f.write("1")
    x = torch.rand(12, 1, 4, 4) + float(np.random.rand()) + random.random()
    y = torch.tensor([0, 1, 2] * 4)
    return (x[:8], y[:8]), (x[8:], y[8:])
'''


@pytest.fixture
def nets(tmp_path, monkeypatch):
    path = tmp_path / "nets_mod.py"
    path.write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    userdata.reading._source.cache_clear()
    yield path
    sys.modules.pop("nets_mod", None)
    userdata.reading._source.cache_clear()


@pytest.fixture
def typed():
    """Refusals worded for the command line, within options.command_line() as cli.main runs
    the library: the tests that use it check the words typed (``--dataset NAME ...``); from
    Python the same refusals name DataConfig.dataset (test_a_user_datas_refusals_...)."""
    with options.command_line():
        yield


def launch(**kw) -> RunConfig:
    kw.setdefault("data", DataConfig(dataset="synthetic"))
    return launch_checks.check_launch(RunConfig(algo="sgd", **kw), 1)


@pytest.mark.parametrize("name, message", [
    ("nets_mod:build", None),
    ("{file}:build", None),
    ("no_such_mod:build", "no module named 'no_such_mod'"),
    ("nets_mod:missing", "nets_mod has no attribute 'missing'"),
    ("nets_mod:NOT_CALLABLE", "NOT_CALLABLE is a int, not callable"),
    ("nets_mod:not_a_module", "returned a str, not a torch.nn.Module"),
    ("nets_mod:wrong_size", "output (2, 11) for a batch of 2; want (2, 10)"),
    ("{dir}/absent.py:build", "no file"),
    # Its check sized a throwaway copy; the run's own crashed (uninitialized parameter).
    ("nets_mod:lazy", "its parameter 1.weight is lazy (nn.Lazy* modules); give the layer its "
     "input size"),
])
def test_a_model_reference_is_checked_before_mpi(nets, name, message):
    name = name.format(file=nets, dir=nets.parent)
    if message is None:
        config = launch(model=ModelConfig(name=name, args={"width": 4}))
        assert config.model.name.split(":")[0] in ("nets_mod", str(nets))
        return
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("*", r"\*")):
        launch(model=ModelConfig(name=name))  # check_launch: before MPI starts
    if "nets_mod" in name:  # the simulator checks it too (was an IndexError, or worse)
        from hpctrain.sim import SimConfig, simulate

        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")
                           .replace("*", r"\*")):
            simulate(RunConfig(algo="ssgd", out=str(nets.parent / "sim"), progress=False,
                               data=DataConfig(dataset="synthetic"),
                               model=ModelConfig(name=name)), SimConfig(workers=2))
        assert not (nets.parent / "sim").exists()


@pytest.mark.parametrize("name, args, message", [
    ("nets_mod:Linear", {}, None),  # one parameter unused: accepted
    ("nets_mod:Linear", {"how": "double"}, None),
    ("nets_mod:NoParameters", {}, "it has no parameters; there is nothing to train"),
    ("nets_mod:Linear", {"how": "frozen"}, "it has no parameter that requires grad"),
    ("nets_mod:Linear", {"how": "int"}, "output of dtype torch.int64; want floating-point"),
    ("nets_mod:Linear", {"how": "detached"},
     r"its output does not depend on its parameters \(detached\?\)"),
])
def test_a_model_that_could_not_train_is_refused_before_mpi(nets, name, args, message):
    """Named as typed on the command line; from Python it said --model too, to a caller of
    ModelConfig(name=...), who typed no flag: the field now."""
    if message is None:
        model_checks.check_model(name, (1, 8, 8), 3, args)
        return
    with pytest.raises(UsageError, match=f"^ModelConfig.name='{name}': {message}"):
        model_checks.check_model(name, (1, 8, 8), 3, args)
    with pytest.raises(UsageError, match=f"^--model {name}: {message}"), options.command_line():
        model_checks.check_model(name, (1, 8, 8), 3, args)


@pytest.mark.usefixtures("typed")  # the library as the command line calls it
def test_a_refusal_of_the_users_own_code_says_where_in_it_the_error_arose(nets):
    """The checks before MPI starts said what a model's forward or a loader raised, not
    where: README's `(at m.py:8, in forward)` held only for errors met in training, and
    a script's traceback lost the user's frames (raised from None)."""
    def line(marker: str) -> int:
        return NETS[:NETS.index(marker)].count("\n") + 1

    with pytest.raises(UsageError) as refused:
        model_checks.check_model("nets_mod:WrongShape", (1, 8, 8), 3)
    assert str(refused.value).endswith(f"(at {nets}:{line('# WrongShape')}, in forward)")
    assert isinstance(refused.value.__cause__, RuntimeError)
    with pytest.raises(UsageError) as refused:
        userdata.describe("nets_mod:load_fails")
    assert str(refused.value) == ("--dataset nets_mod:load_fails raised OSError: the share is "
                                  f"not mounted (at {nets}:{line('# load_fails')}, in load_fails)")


EXITS = """
import sys
import torch
from torch import nn
if "import" in sys.argv[-1:]:
    sys.exit(4)

def build(input_shape, num_classes):
    sys.exit(4)

class Forward(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.l = nn.Linear(64, num_classes)

    def forward(self, x):
        sys.exit(3)

def load():
    sys.exit("no data")

class Item(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        sys.exit(4)

def items():
    return Item(), Item()
"""


@pytest.mark.parametrize("what, said", [
    ("import", "--model: loading {path} raised SystemExit: 4 (at {path}:6, in <module>)"),
    ("build", "--model {path}:build raised SystemExit: 4 (at {path}:9, in build) when called "
              "with input_shape=(1, 8, 8), num_classes=3"),
    ("Forward", "--model {path}:Forward: its forward on a batch of shape (2, 1, 8, 8) raised "
                "SystemExit: 3 (at {path}:17, in forward)"),
    ("load", "--dataset {path}:load raised SystemExit: no data (at {path}:20, in load)"),
    ("items", "--dataset {path}:items train: item 0 raised SystemExit: 4 (at {path}:27, in "
              "__getitem__)"),
])
@pytest.mark.usefixtures("typed")  # the library as the command line calls it
def test_sys_exit_in_the_users_own_code_is_a_refusal(tmp_path, monkeypatch, what, said):
    """Its SystemExit passed the checks by: the process exited with the code's status and
    no line, sys.exit(4) read as --stop-on-collapse's status, 3 as a stall's."""
    path = tmp_path / "exits.py"
    path.write_text(EXITS)
    monkeypatch.setattr(sys, "argv", [*sys.argv, what])
    with pytest.raises(UsageError) as refused:
        if what in ("load", "items"):
            userdata.describe(f"{path}:{what}")
        else:
            model_checks.check_model(f"{path}:{'build' if what == 'import' else what}",
                                     (1, 8, 8), 3)
    assert str(refused.value) == said.format(path=path)


ODD_TENSORS = """
import torch

x = (torch.arange(16 * 64) % 16).reshape(16, 1, 8, 8) / 16  # exact in bfloat16 too
y = torch.arange(16) % 2

def autograd():  # x computed with autograd on
    return (x.clone().requires_grad_() * 2, y), (x.clone(), y)

def bfloat16():
    return (x.bfloat16(), y), (x.bfloat16(), y)

class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return x[i].bfloat16(), int(y[i])

def bfloat16_items():
    return Items(), Items()

def sparse():
    return (x.to_sparse(), y), (x, y)

def meta():
    return (x, y), (x, torch.empty(16, dtype=torch.long, device="meta"))

class Length(Items):
    def __len__(self):
        return -1

def length():
    return Length(), Items()

def label_list():
    return (x, y.tolist()), (x, y)
"""


@pytest.mark.parametrize("loader, message", [
    ("autograd", None),  # "Can't call numpy() on Tensor that requires grad", exit 1
    ("bfloat16", None),  # numpy has no bfloat16: "Got unsupported ScalarType", exit 1
    ("bfloat16_items", None),
    ("sparse", "train: x is a sparse_coo tensor; give a dense one (.to_dense())"),
    ("meta", "test: y is on the meta device: it holds no values"),
    ("length", "train: len() of the Dataset raised ValueError: __len__() should return >= 0"),
    # read as a Dataset of two items: "item 0 is a Tensor of shape (16, 1, 8, 8) (float32),
    # not an (x, y) pair"
    ("label_list", "train: y is a list; give x and y both as tensors or numpy arrays"),
])
@pytest.mark.usefixtures("typed")  # the library as the command line calls it
def test_a_loaders_tensors_are_read_as_plain_tensors_or_refused(tmp_path, loader, message):
    """Each was torch's or numpy's error, exit 1, naming neither the loader nor the set."""
    path = tmp_path / "odd.py"
    path.write_text(ODD_TENSORS)
    name = f"{path}:{loader}"
    if message is not None:
        with pytest.raises(UsageError, match=re.escape(f"--dataset {name} {message}")):
            userdata.describe(name)
        return
    assert userdata.describe(name)["classes"] == 2
    shard = data.load_indices(name, "train", [3, 5])
    assert not shard.images.requires_grad and shard.images.dtype == torch.float32
    assert torch.equal(shard.images, (torch.arange(16 * 64) % 16).reshape(16, 1, 8, 8)[
        file_rows([3, 5], 16)] / 16 * (2 if loader == "autograd" else 1))
    data.fingerprint(name)  # read every sample's bytes: numpy() of each


def test_async_models_are_checked_for_shards_and_float32(nets):
    """--shards is checked against the model trained, the user's too (it was looked up among
    the built-in ones: "unknown model")."""
    args = ["--algo", "asgd", "--dataset", "synthetic", "--model", "nets_mod:Linear",
            "--no-progress"]
    assert "--shards 3000 is outside [1, 2576]: at most one shard per parameter of " \
           "nets_mod:Linear (2576 parameters)" in refusal([*args, "--shards", "3000"])
    config = launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(
        ["train", *args, "--shards", "2"])), 1)
    assert config.algorithm.shards == 2
    # A float64 model: the store is float32 (it was refused after MPI started, unnamed)
    assert refusal([*args, "--model-args", '{"how": "double"}']) == (
        "--model nets_mod:Linear: parameter l.weight is torch.float64; --algo asgd keeps the "
        "model in float32 (train it in float32, with --mixed-precision for lower precision)")


@pytest.mark.parametrize("algo, ranks, options, why", [
    ("sgd", 1, ["--weight-decay", "0.01"], "torch's SGD adds no --weight-decay (0.01) to a "
     "sparse gradient: leave it 0"),
    ("ssgd", 2, ["--optimizer", "adam"], "torch's Adam (--optimizer adam) takes no sparse "
     "gradient: use --optimizer sgd"),
    ("ma", 2, ["--optimizer", "adamw", "--weight-decay", "0.01"], "torch's AdamW (--optimizer "
     "adamw) takes no sparse gradient: use --optimizer sgd"),
    ("ec", 2, ["--weight-decay", "1e-4"], "torch's SGD adds no --weight-decay (0.0001)"),
])
def test_sparse_gradients_an_optimizer_cannot_take_are_refused_before_mpi(nets, algo, ranks,
                                                                          options, why):
    """torch's optimizer raised at the first step, after MPI started (exit 1: "add(sparse,
    dense) is not supported", "Adam does not support sparse gradients"), where the README
    said sparse embeddings train with every algorithm."""
    args = ["--algo", algo, "--dataset", "synthetic", "--model", "nets_mod:Tokens",
            "--no-progress"]
    message = refusal([*args, *options], ranks)
    assert message.startswith(f"--model nets_mod:Tokens: emb.weight gets sparse gradients, "
                              f"and {why}")
    assert message.endswith("or build emb (EmbeddingBag, sparse=True) with sparse=False")
    launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(["train", *args])),
                               ranks)  # without the option it trains
    # asgd's push adds sparse gradients densely, weight decay too
    launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(
        ["train", *args[:1], "asgd", *args[2:], "--weight-decay", "0.01"])), 2)


@pytest.mark.skipif(importlib.util.find_spec("horovod") is None, reason="no horovod")
def test_horovod_is_refused_a_bf16_model_before_mpi(nets):
    """horovod.torch moves no bfloat16 tensor: broadcasting the model raised after MPI started
    ("Tensor type torch.BFloat16Tensor is not supported"), naming neither tensor nor backend."""
    args = ["--algo", "ssgd", "--dataset", "synthetic", "--model", "nets_mod:Linear",
            "--model-args", '{"how": "bf16"}', "--no-progress"]
    assert refusal([*args, "--sync-backend", "horovod"], 2) == (
        "--sync-backend horovod: --model nets_mod:Linear's l.weight is torch.bfloat16, which "
        "Horovod cannot broadcast or allreduce; use --sync-backend mpi or torch, or a float32 "
        "model with --mixed-precision bf16")
    launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(["train", *args])), 2)


def test_ssgds_allreduce_bytes_count_what_it_reduces():
    """The summary's allreduce_bytes_per_rank counted every parameter at 4 bytes: 26 times
    too many for a frozen backbone, float64 and bf16 gradients at 4 bytes, sparse ones (which
    go by allgather) as dense."""
    from hpctrain.sync import Compression
    from hpctrain.sync.algorithm import reduced_bytes

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"frozen": torch.nn.Linear(100, 10).requires_grad_(False),
                                 "f64": torch.nn.Linear(10, 10).double(),
                                 "bf16": torch.nn.Linear(10, 10).bfloat16(),
                                 "a": torch.nn.Linear(10, 10, bias=False),
                                 "b": torch.nn.Linear(10, 10, bias=False),
                                 "emb": torch.nn.Embedding(50, 10, sparse=True)})
    model["b"].weight = model["a"].weight  # tied: reduced once
    dense = 110 * 8 + 110 * 2 + 100 * 4
    assert reduced_bytes(model, Compression.none) == dense + 500 * 4  # no gradient seen yet
    model["emb"](torch.tensor([1, 2])).sum().backward()  # its gradient comes sparse
    assert reduced_bytes(model, Compression.none) == dense
    assert reduced_bytes(model, Compression.none, sparse_too=True) == dense + 500 * 4  # Adasum
    assert reduced_bytes(model, Compression.fp16) == (110 + 110 + 100) * 2


def test_the_layout_ranks_compare_is_the_checked_models(nets, monkeypatch):
    """run._agree compares the layout of the model check_model built before MPI: no second
    build at start-up; other arguments (here --model-args) build and describe their own."""
    model_checks.check_model("nets_mod:build", (1, 8, 8), 3)
    checked = model_checks.checked_layout("nets_mod:build", (1, 8, 8), 3)
    assert checked == model_checks.layout(model_checks.build_model("nets_mod:build", (1, 8, 8), 3))
    assert checked.startswith("4 tensors of 467 values (layout ")
    wider = model_checks.checked_layout("nets_mod:build", (1, 8, 8), 3, {"width": 16})
    assert wider.startswith("4 tensors of 931 values")
    monkeypatch.setattr(model_checks, "build_model", lambda *a: pytest.fail("built again"))
    assert model_checks.checked_layout("nets_mod:build", (1, 8, 8), 3) == checked


def test_checking_a_model_leaves_a_shared_one_as_it_was(nets):
    import nets_mod

    before = {k: v.clone() for k, v in nets_mod.SHARED.state_dict().items()}
    model_checks.check_model("nets_mod:shared", (1, 8, 8), 3)  # trained a step, in training mode
    after = nets_mod.SHARED.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm's statistics
    assert all(p.grad is None for p in nets_mod.SHARED.parameters())
    assert nets_mod.SHARED.training


def test_a_class_of_a_script_read_from_stdin_is_refused_for_what_it_is(monkeypatch):
    """`python - < sweep.py`: its __main__'s file is "<stdin>", which was taken for a file
    in the working folder ("no file .../<stdin>")."""
    import types

    script = types.ModuleType("__main__")
    script.__file__ = "<stdin>"
    exec("class Net:\n    pass\n", script.__dict__)
    monkeypatch.setitem(sys.modules, "__main__", script)
    with pytest.raises(UsageError, match="Net is defined in __main__, which has no file to "
                                         "find it in again; define it in a module or script"):
        plugins.reference_to("--model", script.Net)


def test_a_relative_file_reference_is_recorded_absolute(nets, monkeypatch):
    monkeypatch.chdir(nets.parent)
    config = launch(model=ModelConfig(name="./nets_mod.py:build"))
    assert config.model.name == f"{nets}:build"
    (nets.parent / "data").mkdir()  # --data-dir too: it was recorded as given (relative)
    # (given as the run would record it: synthetic data reads no folder, and refuses one)
    config = launch_checks._as_launched(RunConfig(algo="sgd", data=DataConfig(data_dir="data")))
    assert config.data.data_dir == str(nets.parent / "data")
    with pytest.raises(UsageError, match="want MODULE:CALLABLE"):
        ModelConfig(name="nets_mod:")
    with pytest.raises(UsageError, match="^ModelConfig.args are for a model of your own, not "
                       "ModelConfig.name='mlp'$"):
        ModelConfig(name="mlp", args={"width": 3})  # at construction, as every value check


@pytest.mark.parametrize("kind, example", [("npz", "npz:data/mine.npz"),
                                           ("imagefolder", "imagefolder:data/mine")])
def test_a_format_without_its_path_is_named_as_typed_or_as_given(kind, example):
    """``--dataset npz:`` names the flag on the command line; from Python it said the same
    to a caller of ``DataConfig(dataset="npz:")``, who typed no flag: the field now, with
    the example as the field takes it."""
    with pytest.raises(UsageError) as e:
        DataConfig(dataset=f"{kind}:")
    assert str(e.value) == f"DataConfig.dataset='{kind}:': give the path, e.g. '{example}'"
    assert refusal(["--algo", "sgd", "--dataset", f"{kind}:"]) == (
        f"argument --dataset: --dataset {kind}:: give the path, e.g. {example}")


@pytest.mark.parametrize("flag, build, field, text, said", [
    ("--dataset", lambda t: DataConfig(dataset=t), "DataConfig.dataset", "x:",
     "want MODULE:CALLABLE or ./FILE.py:CALLABLE"),
    ("--model", lambda t: ModelConfig(name=t), "ModelConfig.name", "a-b:c",
     "'a-b' is neither a module name nor a .py file"),
    ("--algo", lambda t: RunConfig(algo=t), "RunConfig.algo", "x:",
     "want MODULE:CLASS or ./FILE.py:CLASS"),
])
def test_a_reference_of_a_bad_form_is_named_as_typed_or_as_given(flag, build, field, text,
                                                                 said):
    """plugins.check_form said ``--dataset 'x:': want MODULE:CALLABLE...`` to a Python caller
    of ``DataConfig(dataset="x:")`` too, who typed no flag: the field given now; the command
    line's words unchanged."""
    with pytest.raises(UsageError) as e:
        build(text)
    assert str(e.value) == f"{field}={text!r}: {said}"
    args = ["--algo", "sgd", flag, text] if flag != "--algo" else [flag, text]
    prefix = f"argument {flag}: " if flag != "--algo" else ""  # argparse's own, before it
    assert refusal(args) == f"{prefix}{flag} {text!r}: {said}"


@pytest.mark.parametrize("text", ["nets:build\n", "nets\n:build"])
def test_a_reference_ending_in_a_newline_is_refused_by_its_form(text):
    """re.match's "$" matches before a final newline: "nets:build\\n" passed the form check."""
    with pytest.raises(UsageError, match="want MODULE:CALLABLE|is neither a module name"):
        plugins.check_form("--model", text)


def test_a_file_loads_once_until_it_changes(tmp_path):
    """A sweep that rewrote its model file between runs in one process trained the first."""
    path = tmp_path / "widths.py"
    path.write_text("WIDTH = 3\ndef build(): return WIDTH\n")
    first = plugins.resolve("--model", f"{path}:build")
    assert first() == 3 and plugins.resolve("--model", f"{path}:build") is first  # one module
    path.write_text("WIDTH = 5\ndef build(): return WIDTH\n")
    assert plugins.resolve("--model", f"{path}:build")() == 5


def test_a_package_folder_given_as_a_file_names_the_module_form(tmp_path):
    """``./pkg:build`` said "no file ./pkg"."""
    (tmp_path / "pkg").mkdir()
    said = (f"{tmp_path}/pkg is a folder; give a package as MODULE:NAME (pkg.module:NAME, "
            f"from its parent folder or PYTHONPATH) or a file as {tmp_path}/pkg/FILE.py:NAME")
    with pytest.raises(UsageError, match=re.escape(f"ModelConfig.name: {said}")):
        plugins.resolve("--model", f"{tmp_path}/pkg:build")  # from Python: the field
    with pytest.raises(UsageError, match=re.escape(f"--model: {said}")), options.command_line():
        plugins.resolve("--model", f"{tmp_path}/pkg:build")


def test_a_file_that_python_cannot_import_is_one_line(tmp_path):
    """A file reference need not end in .py (``./model:build`` reads as one by its slash),
    but Python imports only .py files: its None spec crashed (AttributeError: 'NoneType'
    object has no attribute 'loader')."""
    path = tmp_path / "net.txt"
    path.write_text("def build(): return 3\n")
    with pytest.raises(UsageError, match=r"ModelConfig.name: .*net\.txt is not a Python file"):
        plugins.resolve("--model", f"{path}:build")


def test_a_module_of_the_working_folder_named_as_a_standard_one_is_refused(tmp_path,
                                                                           monkeypatch):
    """``--model code:build`` with code.py in the working folder imported the standard
    module (the folder goes last on the path) and blamed the user's file: "code has no
    attribute 'build'"."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "code.py").write_text("def build(): return 3\n")
    import code

    with pytest.raises(UsageError, match=re.escape(
            f"ModelConfig.name='code:build': `code` is the module {code.__file__}, not "
            "./code.py; give the file as ./code.py:build or rename it")):
        plugins.resolve("--model", "code:build")
    (tmp_path / "code.py").unlink()
    (tmp_path / "email").mkdir()  # a package too, also under a dotted name
    (tmp_path / "email" / "__init__.py").write_text("")
    with pytest.raises(UsageError, match=r"`email` is the module .*email/__init__\.py, not "
                       r"\./email/; rename it$"):
        plugins.resolve("--model", "email.nets:build")
    # A module of its own the folder does not hide: its file named where an attribute lacks.
    for said, typed in (("ModelConfig.name='code:nothing'", False),  # from Python: the field
                        ("--model code:nothing", True)):
        with pytest.raises(UsageError, match=re.escape(
                f"{said}: code has no attribute 'nothing' (it is {code.__file__})")), \
                options.command_line() if typed else contextlib.nullcontext():
            plugins.resolve("--model", "code:nothing")
    (tmp_path / "mine_s77.py").write_text("def build(): return 3\n")  # not hidden: taken
    try:
        assert plugins.resolve("--model", "mine_s77:build")() == 3
    finally:
        sys.modules.pop("mine_s77", None)
    # A package's checkout beside its installed copy (or one on PYTHONPATH): the installed
    # one is imported, and it has what the reference wants, so it is no error.
    site = tmp_path / "site" / "pkg_s77"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("def build(): return 4\n")
    (tmp_path / "pkg_s77").mkdir()
    (tmp_path / "pkg_s77" / "__init__.py").write_text("def build(): return 5\n")
    monkeypatch.syspath_prepend(str(site.parent))
    try:
        assert plugins.resolve("--model", "pkg_s77:build")() == 4
        with pytest.raises(UsageError, match=r"`pkg_s77` is the module .*site/pkg_s77/"):
            plugins.resolve("--model", "pkg_s77:other")  # missing there: the folder's named
    finally:
        sys.modules.pop("pkg_s77", None)


def test_a_file_imports_a_module_beside_it(tmp_path, monkeypatch):
    """A file reference ran without its folder on the path: ``from blocks_s66 import WIDTH``
    beside it raised ModuleNotFoundError. Its folder goes last on the path, so it hides
    nothing imported by name later."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "net.py").write_text("from blocks_s66 import WIDTH\n"
                                     "def build():\n    import blocks_s66.x\n"
                                     "    return WIDTH\n")
    (tmp_path / "blocks_s66").mkdir()  # a package: blocks_s66.x is of the same name
    (tmp_path / "blocks_s66" / "__init__.py").write_text("WIDTH = 7\n")
    (tmp_path / "blocks_s66" / "x.py").write_text("")
    try:
        assert plugins.resolve("--model", f"{tmp_path}/net.py:build")() == 7
    finally:
        sys.modules.pop("blocks_s66", None)
        sys.modules.pop("blocks_s66.x", None)
    assert sys.path[-1] == str(tmp_path) and sys.path.count(str(tmp_path)) == 1


def test_two_files_whose_neighbours_share_a_name_are_refused_the_second(tmp_path,
                                                                        monkeypatch):
    """A sweep trained a/net.py then b/net.py, each ``from blocks_s66 import WIDTH`` beside
    it: b's run used a's blocks (Python keeps one module per name), a different model
    without a word."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    for folder, width in [("a", 8), ("b", 4)]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "blocks_s66.py").write_text(f"WIDTH = {width}\n")
        (tmp_path / folder / "net.py").write_text(
            "def build():\n    from blocks_s66 import WIDTH\n    return WIDTH\n")
    try:
        assert plugins.resolve("--model", f"{tmp_path}/a/net.py:build")() == 8
        with pytest.raises(UsageError, match=re.escape(
                f"ModelConfig.name: {tmp_path}/b/net.py imports blocks_s66 beside it, but "
                f"blocks_s66 is imported from {tmp_path.resolve()}/a/blocks_s66.py instead; "
                "give the modules beside different files different names, or run them in "
                "separate processes")):
            plugins.resolve("--model", f"{tmp_path}/b/net.py:build")
        assert plugins.resolve("--model", f"{tmp_path}/a/net.py:build")() == 8  # a still runs
    finally:
        sys.modules.pop("blocks_s66", None)


def test_a_file_importing_a_neighbour_named_as_a_standard_module_is_refused(tmp_path,
                                                                            monkeypatch):
    """``import tabnanny`` with tabnanny.py beside the file imported the standard one (the
    appended folder comes last), not the file's."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "tabnanny.py").write_text("HIDDEN = True\n")
    (tmp_path / "net.py").write_text("def build():\n    import tabnanny\n"
                                     "    return hasattr(tabnanny, 'HIDDEN')\n")
    import tabnanny

    with pytest.raises(UsageError, match=re.escape(
            f"ModelConfig.name: {tmp_path}/net.py imports tabnanny beside it, but tabnanny is "
            f"imported from {Path(tabnanny.__file__).resolve()} instead; rename "
            f"{tmp_path.resolve()}/tabnanny.py")):
        plugins.resolve("--model", f"{tmp_path}/net.py:build")
    assert getattr(sys.modules["tabnanny"], "HIDDEN", False) is False  # the standard one kept


def test_a_file_whose_neighbour_the_running_scripts_folder_hides_is_refused(tmp_path):
    """A Python-API script in folder b trained a/net.py, which imported b's blocks.py (the
    script's folder comes first); ``--config`` from another folder then built a's: two
    models for one config.json."""
    for folder, width in [("a", 8), ("b", 4)]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "blocks_s66.py").write_text(f"WIDTH = {width}\n")
    (tmp_path / "a" / "net.py").write_text("from blocks_s66 import WIDTH\n"
                                           "def build(): return WIDTH\n")
    (tmp_path / "b" / "one.py").write_text(
        "import sys\nfrom hpctrain import plugins\nfrom hpctrain.errors import UsageError\n"
        "try:\n    plugins.resolve('--model', sys.argv[1])\n"
        "except UsageError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, str(tmp_path / "b" / "one.py"),
                          f"{tmp_path}/a/net.py:build"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    # A script calling the library: the field (``--model:`` was a flag it never typed)
    assert out == (f"ModelConfig.name: {tmp_path}/a/net.py imports blocks_s66 beside it, but "
                   f"blocks_s66 is imported from {tmp_path.resolve()}/b/blocks_s66.py instead; "
                   f"rename {tmp_path.resolve()}/a/blocks_s66.py\n")


def test_the_python_api_takes_functions_and_classes_as_their_references(nets):
    import nets_mod

    from hpctrain import models

    assert ModelConfig(name=nets_mod.build).name == "nets_mod:build"
    assert ModelConfig(name=models.LeNet).name == "hpctrain.models:LeNet"
    assert DataConfig(dataset=nets_mod.load).dataset == "nets_mod:load"
    config = launch(model=ModelConfig(name=nets_mod.build), data=DataConfig(dataset=nets_mod.load))
    assert (config.model.name, config.data.dataset) == ("nets_mod:build", "nets_mod:load")
    # A function of a module loaded from its file is named by the file; one the user
    # imported is that module's (not a copy)
    assert plugins.resolve("--model", f"{nets}:build") is nets_mod.build
    copy = nets.with_name("nets_copy.py")
    copy.write_text(nets.read_text())
    from_file = plugins.resolve("--model", f"{copy}:build")
    assert ModelConfig(name=from_file).name == f"{copy}:build"

    def nested(input_shape, num_classes):
        return nets_mod.build(input_shape, num_classes)

    for bad, message in [(nested, ".*<locals>.nested cannot be found again by name.*module level"),
                         (lambda s, c: None, ".*<lambda> cannot be found again by name"),
                         (torch.nn.Linear(2, 2), "want a name, .* or class, not a Linear"),
                         (3, ".*not a int")]:
        with pytest.raises(UsageError, match=f"^ModelConfig.name: {message}"):
            ModelConfig(name=bad)
    with pytest.raises(UsageError, match="^DataConfig.dataset: .*not a list"):
        DataConfig(dataset=[1, 2])


def write_npz(path, n=60, compressed=False, **override):
    g = np.random.default_rng(1)
    arrays = {"x_train": g.integers(0, 256, (n, 6, 6), dtype=np.uint8),
              "y_train": g.integers(0, 4, n), "x_test": g.integers(0, 256, (20, 6, 6),
                                                                   dtype=np.uint8),
              "y_test": g.integers(0, 4, 20)}
    if "x_train" in override and "x_test" not in override:  # a uint8 split's partner is uint8
        arrays["x_test"] = arrays["x_test"].astype(override["x_train"].dtype)
    arrays.update(override)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return arrays


def file_rows(numbers, n):
    """The file rows (a loader's item indices) of training samples ``numbers`` of ``n``: they
    are numbered in a fixed pseudo-random order (seed 0)."""
    return np.random.default_rng(0).permutation(n)[numbers]


def numbers(rows, n):
    """The numbers of the training samples at file rows ``rows`` (of ``n``)."""
    return np.argsort(np.random.default_rng(0).permutation(n))[rows].tolist()


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_rows_are_read_as_given(tmp_path, compressed):
    arrays = write_npz(tmp_path / "d.npz", compressed=compressed)
    name = f"npz:{tmp_path / 'd.npz'}"
    src = userdata.reading._source(name, None)
    assert isinstance(src._x["train"], np.memmap) != compressed  # np.savez: rows read alone
    assert data.size(name, "train") == 60 and data.size(name, "test") == 20
    part = data.load_indices(name, "train", [7, 3, 3])
    assert part.shape == (1, 6, 6) and part.num_classes == 4
    assert torch.equal(part.ids, torch.tensor([7, 3, 3]))
    rows = file_rows([7, 3, 3], 60)  # training samples are numbered in a seeded order
    want = torch.from_numpy(arrays["x_train"][rows]).float()[:, None] / 255
    assert torch.equal(part.images, want)
    assert torch.equal(part.labels, torch.from_numpy(arrays["y_train"][rows]))
    assert torch.equal(data.load(name, "train").images[[7, 3, 3]], want)
    test = data.load(name, "test")  # the file's order
    assert torch.equal(test.images, torch.from_numpy(arrays["x_test"]).float()[:, None] / 255)
    assert torch.equal(test.labels, torch.from_numpy(arrays["y_test"]))


@pytest.mark.parametrize("override, message", [
    ({"y_train": np.full(60, -1)}, "label -1 is negative"),
    ({"y_train": np.zeros(59, np.int64)}, "60 samples but 59 labels"),
    ({"y_test": np.full(20, 0.5)}, "labels must be integers, not float64"),
    ({"x_test": np.zeros((20, 5, 5), np.uint8)}, r"x_test samples are \(1, 5, 5\)"),
    ({"num_classes": np.int64(3), "y_train": np.full(60, 3)}, r"label 3 is outside \[0, 3\)"),
    # Taken as 10**10 classes (a model no rank could build), and wrapped negative:
    ({"y_train": np.full(60, 10**10)}, "label 10000000000 is too large; labels are class "
                                       "indices below 1000000"),
    ({"y_test": np.full(20, 2**63 + 5, np.uint64)}, "label 9223372036854775813 is too large"),
    # Cast to int64 first: "label -9223372036854775808 is negative", and a numpy warning.
    ({"y_train": np.full(60, 1e20)}, r"label 1e\+20 is too large; labels are class indices"),
    ({"y_train": np.full(60, -2.0)}, "label -2.0 is negative"),
])
def test_npz_labels_and_shapes_are_checked(tmp_path, override, message):
    write_npz(tmp_path / "d.npz", **override)
    with pytest.raises(UsageError, match=message):
        userdata.describe(f"npz:{tmp_path / 'd.npz'}")


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("member, message", [
    (np.zeros((0, 6, 6), np.uint8), "has no samples in x_test"),
    (np.full((20, 6, 6), "a"), "x_test in .* holds <U1, not numbers"),
    (b"garbage", "x_test in .* is not a numpy array"),
    ("cut", r"x_test in .* is cut short: its header promises 720 bytes of data, 360 are"),
])
def test_npz_members_that_are_no_samples_are_named(tmp_path, compressed, member, message):
    """Each gave exit 1 with numpy's or torch's error; a cut-short member stored uncompressed
    was memory-mapped on into the next member's bytes and trained on them."""
    path = tmp_path / "d.npz"
    arrays = write_npz(path, compressed=compressed)
    if not isinstance(member, np.ndarray):
        blob = io.BytesIO()
        np.save(blob, arrays["x_test"])
        raw = member if member != "cut" else blob.getvalue()[:128 + 360]
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compressed else 0) as z:
            for key, value in arrays.items():
                if key != "x_test":
                    one = io.BytesIO()
                    np.save(one, value)
                    z.writestr(key + ".npy", one.getvalue())
            z.writestr("x_test.npy", raw)
    else:
        write_npz(path, compressed=compressed, x_test=member)
    with pytest.raises(UsageError, match=message):
        userdata.describe(f"npz:{path}")


def _lying(shape):
    """An array's .npy bytes with a header that promises ``shape`` (the data left as is)."""
    def damage(raw: bytes, value: np.ndarray) -> bytes:
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(
            value.dtype), "fortran_order": False, "shape": shape})
        return head.getvalue() + value.tobytes()
    return damage


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("key, damage, message", [
    # numpy's header parser raised tokenize's TokenError: exit 1, naming neither file nor array
    ("x_train", lambda raw, value: raw[:20] + b"(((" + raw[23:],
     r"x_train in .* is not a numpy array \(TokenError"),
    # numpy allocated the 2 TB the header promised: MemoryError, exit 1
    ("x_train", _lying((60_000_000_000, 6, 6)),
     r"x_train in .* is cut short: its header promises 2160000000000 bytes of data, 2160 are"),
    ("y_train", _lying((60_000_000_000,)),
     r"y_train in .* is cut short: its header promises 480000000000 bytes of data, 480 are"),
    # numpy's refusal named the file, not the array
    ("y_test", "pickled", r"y_test in .* holds Python objects"),
])
def test_npz_members_with_a_damaged_header_are_named(tmp_path, compressed, key, damage,
                                                     message):
    path = tmp_path / "d.npz"
    arrays = write_npz(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compressed else 0) as z:
        for name, value in arrays.items():
            one = io.BytesIO()
            pickled = name == key and damage == "pickled"
            np.save(one, value.astype(object) if pickled else value, allow_pickle=pickled)
            raw = one.getvalue()
            z.writestr(name + ".npy", damage(raw, value) if name == key and not pickled
                       else raw)
    with pytest.raises(UsageError, match=message):
        userdata.describe(f"npz:{path}")


def test_an_npz_member_saved_without_the_npy_suffix_is_named(tmp_path):
    """np.load lists it as x_test too; the reader looked up x_test.npy and gave a KeyError."""
    path = tmp_path / "d.npz"
    arrays = write_npz(path)
    with zipfile.ZipFile(path, "w") as z:
        for key, value in arrays.items():
            one = io.BytesIO()
            np.save(one, value)
            z.writestr(key if key == "x_test" else key + ".npy", one.getvalue())
    with pytest.raises(UsageError, match=r"x_test in .*d\.npz is not a \.npy member"):
        userdata.describe(f"npz:{path}")


def test_a_damaged_compressed_member_is_named(tmp_path):
    """Bytes flipped inside x_train's deflated data: zipfile's BadZipFile (a CRC) or zlib's
    error ended the run with exit 1, naming neither the file nor the member."""
    path = tmp_path / "d.npz"
    write_npz(path, compressed=True)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("x_train.npy")
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)  # the local header
    middle = start + info.compress_size // 2
    raw[middle:middle + 16] = bytes(255 - b for b in raw[middle:middle + 16])
    path.write_bytes(bytes(raw))
    with pytest.raises(UsageError, match=r"x_train in .*d\.npz cannot be read: "):
        userdata.describe(f"npz:{path}")


def test_labels_of_one_class_are_refused(tmp_path):
    """Every label 0 and no num_classes: trained as 2 classes and scored 1.0."""
    write_npz(tmp_path / "d.npz", y_train=np.zeros(60, np.int64), y_test=np.zeros(20, np.int64))
    with pytest.raises(UsageError, match="every label is 0, one class; a classifier needs 2"):
        userdata.describe(f"npz:{tmp_path / 'd.npz'}")
    write_npz(tmp_path / "d.npz", y_train=np.zeros(60, np.int64), y_test=np.zeros(20, np.int64),
              num_classes=np.int64(2))
    assert userdata.describe(f"npz:{tmp_path / 'd.npz'}")["classes"] == 2


def test_a_test_class_no_training_sample_has_is_warned_of(tmp_path, capsys):
    """Class 4 only in the test set: trained without a word, its samples all scored wrong."""
    write_npz(tmp_path / "d.npz", y_train=np.arange(60) % 4, y_test=np.arange(20) % 5)
    name = f"npz:{tmp_path / 'd.npz'}"
    assert userdata.describe(name)["untrained"] == [4]
    config = arguments.build(cli.build_parser().parse_args(["train", "--algo", "sgd",
                                                                  "--dataset", name]))
    launch_checks._say_user_data(config)
    assert "test class(es) 4 have no training sample" in capsys.readouterr().err
    write_npz(tmp_path / "e.npz", y_train=np.arange(60) % 5, y_test=np.arange(20) % 4)
    assert userdata.describe(f"npz:{tmp_path / 'e.npz'}")["untrained"] == []


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.longdouble])
def test_npz_samples_of_types_torch_lacks_are_read_as_float32(tmp_path, dtype):
    x = np.arange(60 * 36).reshape(60, 6, 6).astype(dtype)
    write_npz(tmp_path / "d.npz", x_train=x)
    part = data.load_indices(f"npz:{tmp_path / 'd.npz'}", "train", numbers([2, 0], 60))
    assert part.images.dtype == torch.float32
    assert torch.equal(part.images[:, 0], torch.from_numpy(x[[2, 0]].astype(np.float32)))


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32, np.uint64])
@pytest.mark.usefixtures("typed")  # the library as the command line calls it
def test_integer_samples_float32_would_round_are_refused_before_mpi(tmp_path, dtype,
                                                                    compressed):
    """16777217 trained as 16777216: float32 holds integers exactly only up to 2**24."""
    x = np.zeros((60, 6, 6), dtype)
    x[:, 0, 0] = 2 ** 24  # exact: taken
    write_npz(tmp_path / "d.npz", compressed=compressed, x_train=x)
    assert userdata.describe(f"npz:{tmp_path / 'd.npz'}")["train"] == 60
    x[41, 3, 2] = 2 ** 24 + 1
    write_npz(tmp_path / "e.npz", compressed=compressed, x_train=x)
    with pytest.raises(UsageError, match=re.escape(
            f"--dataset npz:{tmp_path / 'e.npz'} x_train: sample 41 holds the integer 16777217, "
            "which float32 (what training reads) would round: it holds integers exactly only "
            "up to 2**24 = 16777216 in magnitude")):
        userdata.describe(f"npz:{tmp_path / 'e.npz'}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux's /proc only")
def test_npz_samples_are_checked_without_paging_them_in(tmp_path):
    """Every rank checks an uncompressed x_train's integers before MPI starts: max and min
    over its memory map paged the whole member into each rank (8 copies of a 2 GB x_train on
    a node of 8 ranks). Read from the file instead, the map's pages stay untouched."""
    path = tmp_path / "d.npz"
    x = np.zeros((1024, 32, 32), np.int32)  # 4 MiB
    x[-1, -1, -1] = 2 ** 24
    write_npz(path, n=len(x), x_train=x, x_test=x[:20])

    def resident_kib() -> int:  # of this process's maps of the file
        lines = Path("/proc/self/smaps").read_text().splitlines()
        total, mine = 0, False
        for line in lines:
            fields = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                mine = fields[-1] == str(path)
            elif mine and fields[0] == "Rss:":
                total += int(fields[1])
        return total

    assert userdata.describe(f"npz:{path}")["train"] == len(x)
    assert resident_kib() < x.nbytes // 1024 // 8
    data.load_indices(f"npz:{path}", "train", list(range(len(x))))  # what the check counts
    assert resident_kib() >= x.nbytes // 1024


@pytest.mark.usefixtures("typed")  # the library as the command line calls it
def test_a_loaders_integer_samples_float32_would_round_are_refused(nets):
    """Arrays before MPI starts; a Dataset's items (but item 0's) as they are read."""
    nets.write_text(nets.read_text() + """
BIG = torch.zeros(8, 1, 8, 8, dtype=torch.int64)
BIG[5, 0, 0, 0] = -(2 ** 24) - 3

def big_pairs():
    return (BIG, torch.tensor([0, 1] * 4)), (BIG[:2], torch.tensor([0, 1]))

class BigItems(torch.utils.data.Dataset):
    targets = [0, 1] * 4
    def __len__(self):
        return 8
    def __getitem__(self, i):
        return BIG[i], self.targets[i]

def big_items():
    return BigItems(), (BIG[:2], torch.tensor([0, 1]))
""")
    with pytest.raises(UsageError, match=re.escape(
            "--dataset nets_mod:big_pairs train x: sample 5 holds the integer -16777219")):
        userdata.describe("nets_mod:big_pairs")
    assert userdata.describe("nets_mod:big_items")["train"] == 8
    with pytest.raises(UsageError, match=re.escape(  # by the loader's index
            "--dataset nets_mod:big_items train: sample 5 holds the integer -16777219")):
        data.load_indices("nets_mod:big_items", "train", numbers([3, 5], 8))


@pytest.mark.usefixtures("typed")  # the library as the command line calls it
def test_npz_samples_that_are_not_finite_are_refused_by_the_rank_that_reads_them(tmp_path):
    """One NaN pixel in x_train: the batch holding it was skipped as a bad step every epoch
    and the run finished as if nothing were wrong; float64 beyond float32's range is Inf."""
    x = np.zeros((60, 6, 6))
    x[7, 2, 3], x[40, 0, 0] = np.nan, 1e300
    write_npz(tmp_path / "d.npz", x_train=x)
    name = f"npz:{tmp_path / 'd.npz'}"
    # Named by its row in the file (not the seeded order training numbers samples in)
    with pytest.raises(UsageError, match=rf"^--dataset {name} train: sample 7 holds NaN or Inf$"):
        data.load_indices(name, "train", numbers([0, 7], 60))
    with pytest.raises(UsageError, match="sample 40 holds NaN or Inf$"):
        data.load_indices(name, "train", numbers([8, 40], 60))
    assert len(data.load_indices(name, "train", numbers([0, 8, 59], 60))) == 3  # without them
    # Checked in parts (isfinite's temporaries are its input's size): one past the first part
    x = torch.zeros(300_000, 16)
    x[290_001, 5] = float("inf")
    assert userdata.samples.first_not_finite(x) == 290_001
    assert userdata.samples.first_not_finite(x[:290_000]) is None


def test_the_data_fingerprint_reads_a_datasets_labels_not_its_random_items(tmp_path):
    """Ranks compare data.fingerprint: it read items of a loader's Dataset, which a random
    transform (augmentation) makes differ from rank to rank, and refused the run."""
    (tmp_path / "aug.py").write_text(
        "import torch\n\n\nclass Noisy(torch.utils.data.Dataset):\n"
        "    def __init__(self, n):\n        self.targets = [i % 3 for i in range(n)]\n"
        "    def __len__(self):\n        return len(self.targets)\n"
        "    def __getitem__(self, i):\n"
        "        return torch.randn(1, 4, 4), self.targets[i]\n\n\n"
        "def load():\n    return Noisy(30), Noisy(9)\n")
    name = f"{tmp_path / 'aug.py'}:load"
    assert not userdata.items_fixed(name)
    first = data.fingerprint(name)
    userdata.forget()  # another rank: its own load, its own random items
    assert data.fingerprint(name) == first
    write_npz(tmp_path / "d.npz")
    assert userdata.items_fixed(f"npz:{tmp_path / 'd.npz'}")


def test_a_loader_is_called_once_and_seeded(nets, monkeypatch):
    """A relative ./FILE.py name was loaded twice (once as given, once made absolute), and a
    loader drawing random numbers gave each rank other data."""
    monkeypatch.chdir(nets.parent)
    config = launch_checks.check_launch(RunConfig(
        algo="sgd", model=ModelConfig(name="mlp"),
        data=DataConfig(dataset="./nets_mod.py:random_split")), 1)
    assert (nets.parent / "nets_mod.py.calls").read_text() == "1"
    first = data.load(config.data.dataset, "train").images
    torch.manual_seed(5)
    np.random.seed(5)
    before = torch.rand(1), np.random.rand()
    torch.manual_seed(5)
    np.random.seed(5)
    userdata.reading._source.cache_clear()
    again = data.load(config.data.dataset, "train").images
    assert torch.equal(first, again)
    assert (torch.rand(1), np.random.rand()) == before  # the caller's generators put back


@pytest.mark.parametrize("spelling", ["ddir", "ddir/", "{abs}/ddir/"])
def test_a_loader_is_called_once_whatever_the_data_dir_s_spelling(nets, monkeypatch, spelling):
    """A relative --data-dir reached the loader as typed before launch and made absolute after:
    it was called twice in every process, and both results held (cached by each spelling)."""
    monkeypatch.chdir(nets.parent)
    (nets.parent / "ddir").mkdir()
    config = launch_checks.check_launch(RunConfig(
        algo="sgd", model=ModelConfig(name="mlp"),
        data=DataConfig(dataset="nets_mod:counted", data_dir=spelling.format(abs=nets.parent))), 1)
    assert config.data.data_dir == str(nets.parent / "ddir")
    data.load(config.data.dataset, "test", config.data.data_dir)  # as a rank does after launch
    assert data.size("nets_mod:counted", "train", spelling.format(abs=nets.parent)) == 6
    assert (nets.parent / "ddir" / "calls").read_text() == f"{nets.parent / 'ddir'}\n"


@pytest.mark.parametrize("kind", ["compressed", "loader"])
def test_the_whole_arrays_are_let_go_once_a_rank_took_its_part(tmp_path, nets, kind):
    """A compressed .npz's arrays (read whole) and a loader's stayed in the cache for the whole
    run: a sharded rank held all of the data next to its shard. Read again, they are the same."""
    import gc
    import weakref

    if kind == "compressed":
        write_npz(tmp_path / "d.npz", compressed=True)
        name = f"npz:{tmp_path / 'd.npz'}"
        whole = userdata.reading._source(name, None)._x
    else:
        name = "nets_mod:items_test"  # the training set (x, y) tensors, the test set a Dataset
        whole = {s: part[0] if s == "train" else part
                 for s, part in userdata.reading._source(name, None)._sets.items()}
    train, test = weakref.ref(whole["train"]), weakref.ref(whole["test"])
    del whole
    before = data.load(name, "train"), data.load(name, "test")
    spec = TrainDataSpec(seed=0, dataset=name, data_dir=None, shuffle="local",
                         data_placement="sharded", partition="iid", shuffle_chunk_mb=1.0)
    shard = make_train_data(spec, None).epoch(0)
    gc.collect()
    assert train() is None and test() is not None  # the test set is the run's to let go
    data.release(name, "test")
    gc.collect()
    assert test() is None
    assert torch.equal(shard.images, before[0].subset(shard.ids).images)
    for split, was in zip(("train", "test"), before, strict=True):  # read again
        again = data.load(name, split)
        assert torch.equal(again.images, was.images) and torch.equal(again.labels, was.labels)


def test_a_test_set_deferred_is_read_only_when_used(nets):
    """Every rank held the whole test set as float32, also those that never score it."""
    import nets_mod

    name = "nets_mod:items_test"
    deferred = data.DeferredDataset(name, "test")
    assert (deferred.shape, deferred.num_classes, len(deferred)) == ((1, 8, 8), 3, 10)
    assert set(nets_mod.CALLS) == {0}  # item 0 only: its shape
    whole = data.load(name, "test")
    assert torch.equal(deferred.images, whole.images) and set(nets_mod.CALLS) == set(range(10))
    assert torch.equal(deferred.labels, whole.labels) and deferred.read() is deferred.read()


@pytest.mark.parametrize("algo, eval_mode, eval_rank, ranks", [
    ("ssgd", "after", None, [0, 1, 2]),  # the snapshots spread over the workers
    ("ssgd", "online", None, [0]),  # rank 0 between its steps
    ("ssgd", "online", 2, []),  # the evaluating rank
    ("asgd", "online", None, [0]),
    ("ma", "online", None, [0, 1, 2]),  # every member, after training
    ("ec", "online", 2, [0, 1, 2]),
])
def test_the_workers_that_score_the_test_set_read_it(algo, eval_mode, eval_rank, ranks):
    config = RunConfig(algo=algo, eval_mode=eval_mode, eval_rank=eval_rank)
    algorithm = config.algorithm_class(config)
    assert [r for r in range(3) if live.scores_test_set(config, algorithm, r)] == ranks


@pytest.mark.parametrize("name, message", [
    ("npz", "the training samples are uint8 but the test samples float32; uint8 is scaled to "
            "[0, 1] and other types are kept as given, so the two would differ in scale"),
    ("nets_mod:mixed_scale", "the training samples are uint8 but the test samples float32"),
])
def test_splits_scaled_differently_are_refused_before_mpi(tmp_path, nets, name, message):
    """x_train uint8 and x_test the same pixels as float32: trained on [0, 1], scored on
    [0, 255], and reported (a test loss of 0.00) without a word."""
    if name == "npz":
        x = write_npz(tmp_path / "d.npz")["x_test"]
        write_npz(tmp_path / "d.npz", x_test=x.astype(np.float32))
        name = f"npz:{tmp_path / 'd.npz'}"
    assert refusal(["--algo", "sgd", "--dataset", name, "--model", "mlp"]).startswith(
        f"--dataset {name}: {message}")
    write_npz(tmp_path / "f.npz", x_train=np.zeros((60, 6, 6), np.float64),
              x_test=np.zeros((20, 6, 6), np.float32))  # kept as given, both
    assert userdata.describe(f"npz:{tmp_path / 'f.npz'}")["train"] == 60


def test_samples_that_look_channels_last_are_warned_of(tmp_path, nets, capsys):
    """N x 16 x 16 x 3 trained as 16 channels of 16 x 3 images without a word (lenet refused
    them as too small, which hid the cause)."""
    write_npz(tmp_path / "d.npz", x_train=np.zeros((60, 16, 16, 3), np.uint8),
              x_test=np.zeros((20, 16, 16, 3), np.uint8))
    name = f"npz:{tmp_path / 'd.npz'}"
    launch(data=DataConfig(dataset=name), model=ModelConfig(name="mlp"),
           optim=OptimConfig(batch_size=10))
    assert capsys.readouterr().err == (
        f"hpctrain: warning: DataConfig.dataset={name!r}: samples of shape 16 x 16 x 3 look "
        "channels-last "
        "(H x W x C); they are taken as C x H x W (16 channels of 16 x 3): give them as "
        "N x C x H x W (x.transpose(0, 3, 1, 2))\n")
    write_npz(tmp_path / "d.npz", x_train=np.zeros((60, 3, 16, 16), np.uint8),
              x_test=np.zeros((20, 3, 16, 16), np.uint8))
    userdata.forget()
    launch(data=DataConfig(dataset=name), model=ModelConfig(name="mlp"),
           optim=OptimConfig(batch_size=10))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", ["npz", "nets_mod:sorted_classes", "nets_mod:sorted_items"])
def test_iid_blocks_of_data_stored_class_by_class_hold_every_class(tmp_path, nets, name):
    """--partition iid cut an npz file's or a loader's file order into the ranks' blocks: data
    stored class by class gave each rank one or two classes under --shuffle local."""
    import nets_mod

    if name == "npz":
        (x, y), _ = nets_mod.sorted_classes()
        np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
        name = f"npz:{tmp_path / 'd.npz'}"
    stored = np.repeat(np.arange(4), 10)
    full = data.load(name, "train")
    assert torch.equal(full.images[:, 0, 0, 0], full.labels.float())  # each sample its label
    assert torch.equal(full.labels, torch.from_numpy(stored[file_rows(np.arange(40), 40)]))
    for rank in range(4):  # --shuffle local's fixed blocks
        held = full.labels[make_sampler("local", 40, 4, rank, 0).indices()]
        assert len(set(held.tolist())) >= 3
    spec = TrainDataSpec(seed=0, dataset=name, data_dir=None, shuffle="local",
                         data_placement="sharded", partition="iid", shuffle_chunk_mb=1.0)
    shard = make_train_data(spec, None).epoch(0)  # read by rows: the same numbering
    assert torch.equal(shard.images, full.subset(shard.ids).images)
    assert torch.equal(data.load(name, "test").labels, torch.from_numpy(stored))  # file order


def test_the_built_in_mlp_takes_samples_of_any_shape(nets):
    """It only flattens, yet refused feature vectors (N x 20); lenet and resnet20 need images."""
    config = launch(data=DataConfig(dataset="nets_mod:flat"), model=ModelConfig(name="mlp"))
    assert model_checks.build_model("mlp", (20,), 3)(torch.zeros(2, 20)).shape == (2, 3)
    assert config.model.name == "mlp"
    with pytest.raises(UsageError, match="^ModelConfig.name='lenet' needs samples of shape C x "
                                         "H x W, not 20"):
        model_checks.build_model("lenet", (20,), 3)  # from Python: the field; typed: the flag
    with pytest.raises(UsageError, match="^--model lenet needs samples of shape C x H x W, "
                                         "not 20"), options.command_line():
        model_checks.build_model("lenet", (20,), 3)


def test_each_run_of_a_script_reads_its_data_again(tmp_path, monkeypatch):
    """A script's second run reused the first's cached source: an npz rewritten between them
    gave the new images with the old labels (a loader's new data were never read)."""
    from hpctrain.sim import SimConfig, simulate

    monkeypatch.chdir(tmp_path)
    summaries = []
    for n in (60, 90):
        write_npz(tmp_path / "d.npz", n=n)
        config = RunConfig(algo="sgd", out=f"run-{n}", progress=False,
                           data=DataConfig(dataset="npz:d.npz"), model=ModelConfig(name="mlp"),
                           optim=OptimConfig(epochs=1, batch_size=10))
        summaries.append(simulate(config, SimConfig(workers=1)))
    assert [s["samples_per_worker"] for s in summaries] == [[60], [90]]
    labels = userdata.load_labels("npz:d.npz", "train")
    y = write_npz(tmp_path / "d.npz", n=90)["y_train"]
    assert torch.equal(labels, torch.from_numpy(y[file_rows(np.arange(90), 90)]))


def test_sharded_placement_reads_only_its_part_of_a_dataset(nets):
    import nets_mod

    name = "nets_mod:load"
    about = userdata.describe(name)
    assert about == {"train": 30, "test": 10, "shape": (1, 8, 8), "classes": 3,
                     "untrained": []}
    nets_mod.CALLS.clear()
    spec = TrainDataSpec(seed=0, dataset=name, data_dir=None, shuffle="local",
                         data_placement="sharded", partition="iid", shuffle_chunk_mb=1.0)
    held = make_train_data(spec, None).epoch(0)
    assert sorted(set(nets_mod.CALLS)) == sorted(held.ids.tolist())  # no other item read
    with pytest.raises(UsageError, match="labels must be integers"):
        userdata.describe("nets_mod:float_labels")


def test_a_loaders_dataset_names_its_classes_where_it_has_one_name_a_class(nets):
    """A loader's Dataset with torchvision's ``classes``: no output recorded them, so a user
    scoring model.pt had to know the label order some other way."""
    assert userdata.class_names("nets_mod:named") == ["ant", "bee", "cow"]
    assert userdata.class_names("nets_mod:miscounted") is None  # 2 names for 3 classes
    assert userdata.class_names("nets_mod:load") is None  # no classes attribute


@pytest.mark.parametrize("name, message", [
    ("lists", "train: item 0 is a list of 6 elements, not an (x, y) pair; give (x, y) as "
              "tensors or numpy arrays"),
    ("late_labels", "train: item 5 raised KeyError: 'bad item 5'"),  # labels read item by item
    ("float_label", "train: item 0's label is a float (1.5); want an integer class index"),
    ("vector_label", "train: item 0's label is a Tensor of shape (2,) (torch.int64)"),
    ("huge_label", "train: item 0's label 1e+20 is outside [0, 1000000)"),
    ("dict_set", "train is a dict of 2 elements ('x', 'y'); want (x, y) as two tensors or "
                 "numpy arrays, or a map-style Dataset of (x, y) items"),  # was KeyError: 0
])
@pytest.mark.usefixtures("typed")  # the library as the command line calls it
def test_a_dataset_of_no_x_y_items_is_refused_naming_the_item(nets, name, message):
    with pytest.raises(UsageError, match=re.escape(f"--dataset nets_mod:{name} {message}")):
        userdata.describe(f"nets_mod:{name}")


@pytest.mark.usefixtures("typed")  # the library as the command line calls it
def test_a_dataset_item_that_raises_is_named_when_read(nets):
    assert userdata.describe("nets_mod:list_items")["shape"] == (1, 8, 8)  # x as nested lists
    assert data.load_indices("nets_mod:list_items", "train", [0, 7]).images.shape == (2, 1, 8, 8)
    assert userdata.describe("nets_mod:late")["train"] == 8  # its targets: no item 5 read yet
    assert len(data.load_indices("nets_mod:late", "train", numbers([0, 4, 6], 8))) == 3
    with pytest.raises(UsageError, match=re.escape(  # by the loader's index, not our number
            "--dataset nets_mod:late train: item 5 raised KeyError: 'bad item 5'")):
        data.load_indices("nets_mod:late", "train", numbers([4, 5], 8))


@pytest.mark.usefixtures("typed")  # the library as the command line calls it
def test_a_dataset_item_whose_label_is_not_its_targets_entry_is_refused_when_read(nets):
    """Training takes the labels from targets: an item saying another went unseen."""
    assert userdata.describe("nets_mod:relabelled")["train"] == 8
    with pytest.raises(UsageError, match=re.escape(
            "--dataset nets_mod:relabelled train: item 4's label is 0 but targets[4] is 1; "
            "hpctrain trains on targets, so make them agree")):
        data.load_indices("nets_mod:relabelled", "train", numbers([3, 4], 8))
    # Item 0 is read before MPI starts: its mismatch is one line then, not each rank's abort.
    with pytest.raises(UsageError, match=re.escape(
            "--dataset nets_mod:relabelled_first train: item 0's label is 2 but targets[0] is "
            "0; hpctrain trains on targets, so make them agree")):
        userdata.describe("nets_mod:relabelled_first")


def test_an_image_folder_is_read_image_by_image(tmp_path):
    from PIL import Image

    g = np.random.default_rng(2)
    for split, count in (("train", 4), ("test", 2)):
        for cls in ("cat", "dog", "emu"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(g.integers(0, 256, (5, 7), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png")
    name = f"imagefolder:{tmp_path}"
    assert userdata.describe(name) == {"train": 12, "test": 6, "shape": (1, 5, 7),
                                       "classes": 3, "untrained": []}
    assert userdata.class_names(name) == ["cat", "dog", "emu"]  # label i: the i-th folder
    labels = data.load_labels(name, "train")
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert labels[:3].tolist() != [0, 0, 0] or labels[3:6].tolist() != [0, 1, 1]  # mixed order
    part = data.load_indices(name, "train", [5])
    src = userdata.reading._source(name, None)
    path = src._files["train"][0][5]
    assert part.labels.item() == ["cat", "dog", "emu"].index(path.parent.name)
    assert torch.equal(part.images[0, 0], torch.from_numpy(np.array(Image.open(path))) / 255)
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "train" / "cat" / "9.png")
    userdata.reading._source.cache_clear()
    first = userdata.reading._source(name, None).first
    with pytest.raises(UsageError, match=re.escape(f"the first image ({first}) 7x5; all must "
                                                   "have one size")):
        data.load(name, "train")


@pytest.mark.usefixtures("typed")  # the library as the command line calls it
def test_an_image_folders_hidden_entries_and_empty_classes(tmp_path):
    """``.ipynb_checkpoints`` beside the class folders became a class (and in the test split
    "a class the training set does not have"); an empty training class folder became a
    class no sample has, silently."""
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog", ".ipynb_checkpoints"):
            (tmp_path / split / cls).mkdir(parents=True)
            if not cls.startswith("."):
                Image.fromarray(np.zeros((5, 7), np.uint8)).save(tmp_path / split / cls / "0.png")
    (tmp_path / "train" / "cat" / "._0.png").write_bytes(b"macOS resource fork")  # no image
    name = f"imagefolder:{tmp_path}"
    assert userdata.describe(name)["classes"] == 2
    assert data.load(name, "train").images.shape == (2, 1, 5, 7)  # ._0.png not read
    (tmp_path / "train" / "emu").mkdir()
    userdata.reading._source.cache_clear()
    with pytest.raises(UsageError, match=re.escape(
            f"--dataset {name}: class folder {tmp_path / 'train' / 'emu'} holds no images")):
        userdata.describe(name)
    (tmp_path / "train" / "emu").rmdir()
    (tmp_path / "test" / "emu").mkdir()  # an empty test class folder is no class of its own
    userdata.reading._source.cache_clear()
    with pytest.raises(UsageError, match="emu is a class the training set does not have"):
        userdata.describe(name)


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path):
    """Pillow's convert("L") clipped them: every pixel above 255 became white."""
    from PIL import Image

    g = np.random.default_rng(3)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            pixels = g.integers(0, 65536, (4, 5)).astype(np.uint16)
            Image.fromarray(pixels).save(tmp_path / split / cls / "0.png")
    name = f"imagefolder:{tmp_path}"
    src = userdata.reading._source(name, None)
    path = src._files["train"][0][0]
    pixels = np.asarray(Image.open(path)).astype(np.float64)
    assert pixels.max() > 255
    got = data.load(name, "train").images[0, 0].double()
    assert torch.allclose(got, torch.from_numpy(np.rint(pixels / 257) / 255))
    Image.fromarray(np.full((4, 5), 0.5, np.float32)).save(tmp_path / "train" / "a" / "0.tiff")
    userdata.reading._source.cache_clear()
    with pytest.raises(UsageError, match=r"0\.tiff has F pixels beyond 16 bits"):
        data.load(name, "train")


@pytest.mark.parametrize("kind", ["npz", "loader"])
@pytest.mark.parametrize("given, shown", [
    ("three", "'three'"),
    ([3, 4], "[3, 4]"),
    (3.5, "3.5"),  # was cut to 3
    (10**12, "1000000000000"),  # was taken: the model's last layer alone could not be built
    (1, "1"),
    (4.0, 4),  # a whole number stored as a float: taken
    (np.int32(5), 5),
])
@pytest.mark.usefixtures("typed")  # the library as the command line calls it
def test_a_num_classes_given_with_the_data_is_one_whole_number(tmp_path, nets, kind, given,
                                                               shown):
    """Every path takes num_classes through one check; a bad one gave exit 1 with int()'s
    error, or was cut or taken as given."""
    if kind == "npz":
        write_npz(tmp_path / "d.npz", num_classes=given)  # labels 0..3
        name = f"npz:{tmp_path / 'd.npz'}"
    else:
        import nets_mod

        nets_mod.NUM_CLASSES = given  # labels 0..2
        name = "nets_mod:given_classes"
    if isinstance(shown, int):
        assert userdata.describe(name)["classes"] == shown
        return
    with pytest.raises(UsageError, match=re.escape(
            f"--dataset {name}: num_classes {shown}; want one whole number from 2 to 1000000")):
        userdata.describe(name)


@pytest.mark.parametrize("extra, message", [
    ({"n_classes": 10}, "has an array 'n_classes', which is not read; did you mean "
                        "'num_classes'?"),
    ({"nclasses": 10}, "has an array 'nclasses', which is not read; did you mean "
                       "'num_classes'?"),
    ({"X_train": np.zeros((60, 6, 6)), "x_train": None},
     "has no x_train (it has y_train, x_test, y_test, X_train; 'X_train' is likely a typo of "
     "'x_train')"),
    ({"class_names": np.array(list("abcd")), "mean": 0.5}, None),  # the user's own: not read
    # Named almost as an array the file has: the user's own, not a typo (these were refused)
    ({"x_test_c": np.zeros((20, 6, 6)), "y_test_c": np.zeros(20)}, None),
    ({"x_train0": 0, "x_train_c": 0, "x_tests": 0, "y_trains": 0, "x_testing": 0}, None),
    ({"num_classes": 4, "num_classes_": 4}, None),
])
def test_an_npz_array_named_almost_as_one_it_lacks_is_refused(tmp_path, extra, message):
    """``n_classes=10`` beside labels 0..3 trained with 4 classes, without a word; but
    ``x_test_c`` beside ``x_test`` (a corrupted test set) was refused as a typo too."""
    arrays = write_npz(tmp_path / "d.npz", **{k: v for k, v in extra.items() if v is not None})
    np.savez(tmp_path / "d.npz", **{k: v for k, v in arrays.items() if extra.get(k, 0) is not None})
    args = ["--algo", "ssgd", "--dataset", f"npz:{tmp_path / 'd.npz'}", "--model", "mlp"]
    if message is None:
        assert launch_checks.check_launch(arguments.build(cli.build_parser().parse_args(
            ["train", *args])), 1).data.dataset.startswith("npz:")
    else:
        assert message in refusal(args, ranks=2)


@pytest.mark.parametrize("entries, message", [
    ("'train': (x, y), 'test': (x, y), 'n_classes': 10",
     "returned a dict with key 'n_classes' (did you mean 'num_classes'?); it takes 'train', "
     "'test', 'num_classes'"),
    ("'train': (x, y), 'test': (x, y), 'validation': 10",
     "returned a dict with key 'validation'; it takes 'train', 'test', 'num_classes'"),
    # a typo of a key it needs: said only "without 'train'", not the key it has instead
    ("'Train': (x, y), 'test': (x, y)",
     "returned a dict with key 'Train' (did you mean 'train'?); it takes 'train', 'test', "
     "'num_classes'"),
])
def test_a_loaders_dict_with_a_key_it_does_not_take_is_refused(tmp_path, entries, message):
    """``{"train": ..., "test": ..., "n_classes": 10}`` trained with 3 classes, silently."""
    (tmp_path / "keyed.py").write_text(
        "import torch\n"
        "def load():\n"
        "    x, y = torch.zeros(6, 1, 8, 8), torch.tensor([0, 1, 2] * 2)\n"
        f"    return {{{entries}}}\n")
    userdata.reading._source.cache_clear()
    try:
        assert message in refusal(["--algo", "ssgd", "--dataset", f"{tmp_path}/keyed.py:load",
                                   "--model", "mlp"], ranks=2)
    finally:
        userdata.reading._source.cache_clear()


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_arrays_in_the_other_byte_order_are_read(tmp_path, compressed):
    """Big-endian arrays (as saved on such a machine) gave exit 1: torch takes only the
    native byte order."""
    native = write_npz(tmp_path / "n.npz", x_train=np.arange(60 * 36, dtype=np.float32)
                       .reshape(60, 6, 6), y_test=np.arange(20, dtype=np.float64) % 4)
    other = ">" if sys.byteorder == "little" else "<"
    swapped = {k: v.astype(v.dtype.newbyteorder(other)) for k, v in native.items()}
    assert not any(swapped[k].dtype.isnative for k in ("x_train", "y_train", "y_test"))
    write_npz(tmp_path / "d.npz", compressed=compressed, **swapped)
    name = f"npz:{tmp_path / 'd.npz'}"
    assert userdata.describe(name)["classes"] == 4
    part = data.load_indices(name, "train", numbers([7, 3], 60))
    assert torch.equal(part.images, torch.from_numpy(native["x_train"][[7, 3]])[:, None])
    assert torch.equal(part.labels, torch.from_numpy(native["y_train"][[7, 3]]))
    assert data.load_labels(name, "test").tolist() == [i % 4 for i in range(20)]


@pytest.mark.parametrize("content, message", [
    ("npy", "{path} is a .npy array, not an .npz archive of x_train, y_train, x_test, y_test "
            "(save them with np.savez)"),  # was a TypeError about a context manager
    # a bare EOFError; then numpy's "cannot read as .npz (No data left in file)"
    (b"", "{path} is not an .npz archive (a zip of x_train, y_train, x_test, y_test saved "
          "with np.savez)"),
    # text: numpy took it for a pickle and said to load it with allow_pickle=True
    (b"x_train,y_train\n1,2\n", "{path} is not an .npz archive (a zip of x_train, y_train, "
                                  "x_test, y_test saved with np.savez)"),
])
@pytest.mark.usefixtures("typed")  # the library as the command line calls it
def test_a_file_that_is_no_npz_archive_is_named(tmp_path, content, message):
    path = tmp_path / "d.npz"
    with open(path, "wb") as f:
        if content == "npy":
            np.save(f, np.zeros((4, 1, 8, 8), np.float32))
        else:
            f.write(content)
    with pytest.raises(UsageError, match=re.escape(
            f"--dataset npz:{path}: {message.format(path=path)}")):
        userdata.describe(f"npz:{path}")


@pytest.mark.usefixtures("typed")  # the library as the command line calls it
def test_an_empty_test_split_is_named_before_mpi(tmp_path, nets):
    """An image folder's empty test split, or a loader's, was found only by check_launch's
    first read: "range [0, 1) outside its 0 samples"."""
    from PIL import Image

    for cls in ("cat", "dog"):
        for split in ("train", "test"):
            (tmp_path / split / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((5, 7), np.uint8)).save(tmp_path / "train" / cls / "0.png")
    (tmp_path / "test" / "cat" / "notes.txt").write_text("no image")
    with pytest.raises(UsageError, match=re.escape(
            f"--dataset imagefolder:{tmp_path}: no images under {tmp_path / 'test'} (want "
            f"{tmp_path / 'test'}/<class>/<image>)")):
        userdata.describe(f"imagefolder:{tmp_path}")
    with pytest.raises(UsageError, match=re.escape(
            "--dataset nets_mod:empty_test test: x has no samples")):
        userdata.describe("nets_mod:empty_test")


@pytest.mark.parametrize("loader, message", [
    ("complex_x", "train x holds complex64, not numbers"),
    ("complex_items", "train item 0's x holds complex64, not numbers"),
    ("empty_samples", "train: samples of shape (0,) hold no values")])
@pytest.mark.usefixtures("typed")  # the library as the command line calls it
def test_a_loader_of_samples_that_are_no_real_numbers_is_refused(nets, loader, message):
    """Complex samples lost their imaginary part with a warning, and empty samples built a
    model of no inputs."""
    with pytest.raises(UsageError, match=re.escape(f"--dataset nets_mod:{loader} {message}")):
        userdata.describe(f"nets_mod:{loader}")


def test_optimizer_choice_defaults_and_refusals():
    adam = launch_checks.check_launch(RunConfig(algo="ssgd", data=DataConfig(dataset="synthetic"),
                                                optim=OptimConfig(optimizer="adamw")), 2)
    assert adam.optim.lr == 0.001 and adam.optim.momentum is None
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert type(optimizers.make(params, adam.optim)) is torch.optim.AdamW
    # It once said "--momentum is SGD's", not naming the value as the other refusals do.
    with pytest.raises(UsageError, match=r"^OptimConfig.momentum=0\.5 is SGD's; "
                       r"OptimConfig.optimizer='adam' has OptimConfig.betas"):
        OptimConfig(optimizer="adam", momentum=0.5)
    with pytest.raises(UsageError, match="the algorithm dcasgd-a keeps its own update rule"):
        launch_checks.check_launch(RunConfig(algo="dcasgd-a",
                                             optim=OptimConfig(optimizer="adam")), 2)
    assert optimizers.base_lr(OptimConfig(lr=0.1, scale_lr=True), 4) == pytest.approx(0.4)
    assert optimizers.base_lr(OptimConfig(lr=0.1), 4) == 0.1
    assert [optimizers.warmup_factor(e, 2.0) for e in (0.5, 1.0, 2.0, 3.0)] == \
        [0.25, 0.5, 1.0, 1.0]
    assert optimizers.warmup_factor(0.0, 0.0) == 1.0


def _steps(optimizer_of, steps: int = 2) -> torch.Tensor:
    """A parameter after ``steps`` steps of the optimizer ``optimizer_of([param])`` builds on
    one seeded quadratic."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    opt = optimizer_of([w])
    for _ in range(steps):
        opt.zero_grad()
        (w.square().sum() + w.sum()).backward()
        opt.step()
    return w.detach().clone()


SYNTHETIC_DATA = DataConfig(dataset="synthetic")


def test_nesterov_steps_as_torchs_sgd_with_nesterov():
    """--nesterov was missing (torch.optim.SGD(nesterov=True)); without it the optimizer is
    built as before, so default runs do not change."""
    nesterov = launch_checks.check_launch(RunConfig(
        algo="sgd", data=SYNTHETIC_DATA,
        optim=OptimConfig(nesterov=True, weight_decay=0.01)), 1).optim
    assert arguments.build(cli.build_parser().parse_args(
        ["train", "--algo", "sgd", "--nesterov", "--weight-decay", "0.01"])).optim == \
        OptimConfig(nesterov=True, weight_decay=0.01)
    ours = _steps(lambda p: optimizers.make(p, nesterov))
    torchs = _steps(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01,
                                              nesterov=True))
    assert torch.equal(ours, torchs)
    plain = launch_checks.check_launch(RunConfig(algo="sgd", data=SYNTHETIC_DATA,
                                                 optim=OptimConfig(weight_decay=0.01)), 1).optim
    assert optimizers.make([torch.nn.Parameter(torch.zeros(1))], plain) \
        .param_groups[0]["nesterov"] is False
    assert not torch.equal(_steps(lambda p: optimizers.make(p, plain)), ours)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_betas_and_eps_reach_torchs_adam(kind):
    """--betas and --eps were missing: torch's defaults only. Left out, they resolve to
    torch's defaults, which step bit for bit as before (torch's own defaults)."""
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    given = launch_checks.check_launch(RunConfig(
        algo="ssgd", data=SYNTHETIC_DATA,
        optim=OptimConfig(optimizer=kind, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)), 2).optim
    assert (given.betas, given.eps) == ((0.8, 0.99), 1e-6)
    group = optimizers.make([torch.nn.Parameter(torch.zeros(1))], given).param_groups[0]
    assert (group["betas"], group["eps"]) == ((0.8, 0.99), 1e-6)
    assert torch.equal(_steps(lambda p: optimizers.make(p, given), 3),
                       _steps(lambda p: cls(p, lr=0.001, betas=(0.8, 0.99), eps=1e-6,
                                            weight_decay=0.01), 3))
    default = launch_checks.check_launch(RunConfig(
        algo="ssgd", data=SYNTHETIC_DATA,
        optim=OptimConfig(optimizer=kind, weight_decay=0.01)), 2).optim
    assert (default.betas, default.eps) == ((0.9, 0.999), 1e-8)
    assert torch.equal(_steps(lambda p: optimizers.make(p, default), 3),
                       _steps(lambda p: cls(p, lr=0.001, weight_decay=0.01), 3))
    typed = arguments.build(cli.build_parser().parse_args(
        ["train", "--algo", "ssgd", "--optimizer", kind, "--betas", "0.8,0.99", "--eps", "1e-6",
         "--weight-decay", "0.01"]))
    assert typed.optim == OptimConfig(optimizer=kind, betas=(0.8, 0.99), eps=1e-6,
                                      weight_decay=0.01)


def test_collapse_detection_fires_on_each_rule_and_not_on_learning():
    chance = math.log(10)
    healthy = collapse.CollapseDetector(10, window=20)
    losses = [chance * math.exp(-i / 40) + 0.05 * math.sin(i) for i in range(400)]
    assert all(healthy.loss(i, v) is None for i, v in enumerate(losses))
    assert all(healthy.accuracy(i, a) is None for i, a in enumerate([0.1, 0.5, 0.8, 0.85]))

    flat = collapse.CollapseDetector(10, window=20)
    seq = [2.0] * 30 + [chance] * 60
    found = [i for i, v in enumerate(seq) if flat.loss(i, v)]
    assert len(found) == 1 and flat.collapsed_at == found[0] and "flat at chance" in flat.reason
    assert found[0] < 30 + 40

    boom = collapse.CollapseDetector(10, window=20)
    assert [boom.loss(i, v) is not None for i, v in enumerate([2.3, 2.2, 5e3])] == \
        [False, False, True] and "exploding" in boom.reason
    nan = collapse.CollapseDetector(10, window=20)
    assert [nan.loss(i, float("nan")) is not None for i in range(3)] == [False, False, True]

    acc = collapse.CollapseDetector(10, window=20)
    assert acc.accuracy(0, 0.1) is None and acc.accuracy(50, 0.6) is None
    assert "back at chance" in acc.accuracy(75, 0.1) and acc.collapsed_at == 75


def test_the_report_marks_a_collapsed_row():
    base = {"workers": 2, "final_test_acc": 0.1, "best_test_acc": 0.6, "wall_s": 1.0,
            "samples_per_s": 10.0}
    collapsed = {"collapsed_at": 40, "collapse_reason": "test accuracy 0.1 back at chance",
                 "stopped_on_collapse": True}
    row = reading.Row("asgd", "ok", summary={**base, **collapsed})
    cells = tables.table([row, reading.Row("ssgd", "ok", summary=base)], [])
    lines = cells.splitlines()
    assert "**collapsed** at update 40" in lines[2] and "stopped there" in lines[2]
    assert lines[3].endswith("| ok |")
    peak = tables.table([reading.Row("ssgd", "ok", summary={
        **base, "peak_memory_per_worker": [300 * 2**20, 512 * 2**20]})], [])
    assert "| peak memory |" in peak and "| 512.0 MiB |" in peak  # the largest worker's


def test_the_cli_says_its_version(capsys):
    from hpctrain import cli

    with pytest.raises(SystemExit) as stop:
        cli.build_parser().parse_args(["--version"])
    from hpctrain import __version__, provenance

    commit = provenance.commit().get("hpctrain_commit")  # a checkout's: git's
    assert stop.value.code == 0 and capsys.readouterr().out == (
        f"hpctrain {__version__}" + (f" (commit {commit})" if commit else "") + "\n")


def _npy_named_npz(t: Path) -> str:
    with open(t / "d.npz", "wb") as f:  # a path's name would get .npy added
        np.save(f, np.zeros((4, 1, 8, 8), np.float32))
    return f"npz:{t / 'd.npz'}"


def _flat_samples(t: Path) -> str:
    write_npz(t / "d.npz", x_train=np.zeros(60))
    return f"npz:{t / 'd.npz'}"


def _a_nan_sample(t: Path) -> str:
    x = np.zeros((60, 6, 6))
    x[7, 2, 3] = np.nan
    write_npz(t / "d.npz", x_train=x)
    return f"npz:{t / 'd.npz'}"


@pytest.mark.parametrize("make, read, said", [
    (lambda t: f"npz:{t / 'absent.npz'}", False, ": no file {t}/absent.npz"),
    (_npy_named_npz, False, ": {t}/d.npz is a .npy array, not an .npz archive of x_train, "
                            "y_train, x_test, y_test (save them with np.savez)"),
    (_flat_samples, False, " x_train: want samples of shape N x ... (at least 2 dimensions), "
                           "got (60,)"),
    (lambda t: f"imagefolder:{t}", False, ": no folder {t}/train (want {t}/train/<class>/ "
                                          "and {t}/test/<class>/)"),
    (lambda t: "nets_mod:load_fails", False, " raised OSError: the share is not mounted"),
    (lambda t: "nets_mod:dict_set", False, " train is a dict of 2 elements ('x', 'y'); want "
                                           "(x, y) as two tensors or numpy arrays, or a "
                                           "map-style Dataset of (x, y) items"),
    (_a_nan_sample, True, " train: sample 7 holds NaN or Inf"),  # read after launch
])
def test_a_user_datas_refusals_name_the_field_from_python(tmp_path, nets, make, read, said):
    """A user's data refused (its file, its folder, what its loader returned, a sample read
    in training) said ``--dataset npz:... ...`` to a Python caller of
    ``DataConfig(dataset=...)``, who typed no flag: the field now, with its value; the command
    line's words are as they were."""
    name = make(tmp_path)
    said = said.format(t=tmp_path).split(" (at ")[0]  # a loader's error: where it arose

    def refused() -> str:
        userdata.forget()  # read afresh: a refusal is not kept, but a source read is
        with pytest.raises(UsageError) as e:
            if read:
                data.load_indices(name, "train", numbers([0, 7], 60))
            else:
                launch(data=DataConfig(dataset=name), model=ModelConfig(name="mlp"))
        return str(e.value).split(" (at ")[0]

    assert refused() == f"DataConfig.dataset={name!r}{said}"
    with options.command_line():
        assert refused() == f"--dataset {name}{said}"
