"""``--model``: a built-in name or the user's ``MODULE:CALLABLE``, built and checked.

:func:`build_model` builds either for the data's sample shape and classes; :func:`check_model`
builds the model once before MPI starts and runs two zero samples through it (and back, as
one training step), so a bad model (not a Module, wrong output size or type, nothing
trainable, an output detached from the parameters, a sparse gradient the run's optimizer
cannot take) is one line, exit 2, on every rank alike, before any collective call. The
reference itself is found by :mod:`hpctrain.plugins`.

A model callable is called as ``build(input_shape, num_classes, **model_args)`` and returns a
``torch.nn.Module`` mapping a batch ``N x *input_shape`` to logits ``N x num_classes``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from hpctrain import data, models, options
from hpctrain.errors import UsageError, did_you_mean
from hpctrain.option_names import said
from hpctrain.plugins import USER_ERRORS, check_form, is_reference, one_line, resolve

if TYPE_CHECKING:
    from hpctrain.config import RunConfig


def model_name(text: str, error: type[Exception] = argparse.ArgumentTypeError) -> str:
    """``--model``'s value: a built-in name or a reference (its form only); ``error`` else."""
    if text in models.MODELS:
        return text
    if not is_reference(text):
        flagged = error is not UsageError or options.on_command_line()
        what = f"unknown --model {text!r}" if flagged else f"ModelConfig.name={text!r} is unknown"
        raise error(f"{what}; choose from {', '.join(models.MODELS)}, or "
                    f"MODULE:CALLABLE, ./FILE.py:CALLABLE{did_you_mean(text, models.MODELS)}")
    try:
        check_form("--model", text)
    except UsageError as e:
        raise error(str(e)) from None
    return text


def _model(name: str) -> str:
    """``--model NAME`` in a refusal, from Python ``ModelConfig.name='NAME'`` (:func:`said`)."""
    return said("--model", name, typed=f"--model {name}")


def build_model(name: str, input_shape: tuple, num_classes: int,
                model_args: dict | None = None) -> nn.Module:
    """Built-in model ``name`` or the user's ``MODULE:CALLABLE`` for this data."""
    if not is_reference(name):
        if model_args:
            raise UsageError(f"{said('--model-args', field=('ModelConfig', 'args'))} are for a "
                             f"model of your own, not {_model(name)}")
        if len(input_shape) != 3 and name != "mlp":  # mlp flattens any shape
            raise UsageError(f"{_model(name)} needs samples of shape C x H x W, not "
                             f"{' x '.join(map(str, input_shape))}; use a model of your own")
        return models.build(name, tuple(input_shape), num_classes)
    build = resolve("--model", name)
    try:
        model = build(tuple(input_shape), num_classes, **(model_args or {}))
    except UsageError:
        raise
    except USER_ERRORS as e:
        extra = "".join(f", {k}={v!r}" for k, v in (model_args or {}).items())
        raise UsageError(f"{_model(name)} raised {one_line(e)} when called with "
                         f"input_shape={tuple(input_shape)}, num_classes={num_classes}"
                         f"{extra}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"{_model(name)} returned a {type(model).__name__}, not a "
                         "torch.nn.Module")
    return model


def build_for_data(config: RunConfig) -> nn.Module:
    """The run's model (``config``: a RunConfig) for its data set's sample shape and classes
    (one test sample read): what an algorithm's check before MPI judges, such as its
    parameters' dtypes."""
    sample = data.load(options.text(config.data.dataset), "test",
                       options.text_or_none(config.data.data_dir), 0, 1)
    return build_model(options.text(config.model.name), sample.shape, sample.num_classes,
                       config.model.args)


def layout(model: nn.Module) -> str:
    """The model's parameters and buffers in a few words, with a digest of their names,
    shapes and dtypes: what every rank must build alike (a user's model file may differ
    between nodes)."""
    tensors = [(n, tuple(t.shape), str(t.dtype)) for n, t in model.state_dict().items()]
    digest = hashlib.sha256(repr(tensors).encode()).hexdigest()[:12]
    values = sum(t.numel() for t in model.state_dict().values())
    return f"{len(tensors)} tensors of {values} values (layout {digest})"


# layout() of the model each check_model built, by its arguments: run._agree compares it
# across ranks without building the model a second time at start-up.
_checked: dict[tuple, str] = {}


def _key(name: str, input_shape: tuple, num_classes: int, model_args: dict | None) -> tuple:
    return name, tuple(input_shape), num_classes, json.dumps(model_args or {}, sort_keys=True)


def checked_layout(name: str, input_shape: tuple, num_classes: int,
                   model_args: dict | None = None) -> str:
    """:func:`layout` of the model these arguments build: as :func:`check_model` found it
    (this run checked it before MPI started), else built now."""
    key = _key(name, input_shape, num_classes, model_args)
    if key not in _checked:
        _checked[key] = layout(build_model(name, input_shape, num_classes, model_args))
    return _checked[key]


def check_model(name: str, input_shape: tuple, num_classes: int,
                model_args: dict | None = None, one_sample: str | None = None,
                no_sparse: str | None = None) -> None:
    """Build the model once and try it on two zero samples: UsageError if it cannot be built,
    gives logits of the wrong size or type, or could not train (no trainable parameter, no
    gradient path from its output to them), which would otherwise fail only at the first
    step, after MPI started. The model is thrown away; the run seeds torch before it builds
    its own, so what this draws from torch's RNG changes nothing.

    ``one_sample``: why the run forwards a single sample in training mode (a batch or a
    micro-batch of one, :func:`hpctrain.microbatch.one_sample`); then any model, built-in
    too, must take one there (batch norm raises), or the refusal gives that reason.

    ``no_sparse``: why the run's optimizer cannot step on a sparse gradient
    (:func:`hpctrain.optimizers.sparse_refusal`); then a model whose check step gives one
    (an embedding with ``sparse=True``) is refused, naming the parameter, its module and
    that reason."""
    model = build_model(name, input_shape, num_classes, model_args)
    if is_reference(name):  # a built-in model passes these by construction
        _check_own_model(name, model, input_shape, num_classes, no_sparse)
    if one_sample is not None:
        _check_one_sample(name, model, input_shape, one_sample)
    _checked[_key(name, input_shape, num_classes, model_args)] = layout(model)  # no lazy ones


def _check_own_model(name: str, model: nn.Module, input_shape: tuple,
                     num_classes: int, no_sparse: str | None) -> None:
    """:func:`check_model`'s checks of a user's model."""
    lazy = next((n for n, p in model.named_parameters()
                 if isinstance(p, nn.parameter.UninitializedParameter)), None)
    if lazy is not None:  # sized by a first forward on each rank: none of the run's checks see it
        raise UsageError(f"{_model(name)}: its parameter {lazy} is lazy (nn.Lazy* modules); "
                         "give the layer its input size")
    model.eval()
    with torch.no_grad():
        _logits(name, model, input_shape, num_classes)
    params = list(model.parameters())
    if not any(p.requires_grad for p in params):
        what = "no parameter that requires grad (all frozen)" if params else "no parameters"
        raise UsageError(f"{_model(name)}: it has {what}; there is nothing to train")
    # One training step's forward and backward, as training takes them.
    with _as_it_was(model):
        model.train()
        with torch.enable_grad():
            out = _logits(name, model, input_shape, num_classes)
            if out.requires_grad:
                try:
                    F.cross_entropy(out, torch.zeros(2, dtype=torch.long)).backward()
                except USER_ERRORS as e:
                    raise UsageError(f"{_model(name)}: the backward of its loss raised "
                                     f"{one_line(e)}") from e
        if all(p.grad is None for p in params):
            raise UsageError(f"{_model(name)}: its output does not depend on its parameters "
                             "(detached?); no gradient reaches them")
        if no_sparse is not None:
            _refuse_sparse_gradients(name, model, no_sparse)


def _refuse_sparse_gradients(name: str, model: nn.Module, why: str) -> None:
    """UsageError naming the first parameter whose gradient the check's backward made sparse,
    and its module, because ``why``."""
    sparse = next((n for n, p in model.named_parameters()
                   if p.grad is not None and p.grad.is_sparse), None)
    if sparse is None:
        return
    owner, _, _ = sparse.rpartition(".")
    module = model.get_submodule(owner)
    built = f"{owner or 'the model'} ({type(module).__name__}, sparse=True)" \
        if getattr(module, "sparse", False) is True else f"its module {owner or 'itself'}"
    raise UsageError(f"{_model(name)}: {sparse} gets sparse gradients, and {why}, or build "
                     f"{built} with sparse=False")


@contextlib.contextmanager
def _as_it_was(model: nn.Module):
    """A build that hands out one module every call gets it back as it was after a check's
    forward in training mode: buffers (BatchNorm's statistics) restored, no gradients."""
    buffers = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers, strict=False):
                b.copy_(saved)
        for p in model.parameters():
            p.grad = None


def _check_one_sample(name: str, model: nn.Module, input_shape: tuple, why: str) -> None:
    """UsageError naming ``why`` when ``model``'s forward in training mode fails on one
    sample (BatchNorm1d: "Expected more than 1 value per channel when training")."""
    mode = model.training
    try:
        with _as_it_was(model), torch.no_grad():
            model.train()
            model(torch.zeros(1, *input_shape))
    except USER_ERRORS as e:
        raise UsageError(f"{_model(name)} cannot train on one sample (its forward in "
                         f"training mode raised {one_line(e)}), and {why}") from e
    finally:
        model.train(mode)


def _logits(name: str, model: nn.Module, input_shape: tuple, num_classes: int) -> torch.Tensor:
    """The model's output for two zero samples: UsageError unless floating-point logits of
    shape ``(2, num_classes)``."""
    mode = " in training mode" if model.training else ""
    try:
        out = model(torch.zeros(2, *input_shape))
    except USER_ERRORS as e:
        raise UsageError(f"{_model(name)}: its forward{mode} on a batch of shape "
                         f"{(2, *input_shape)} raised {one_line(e)}") from e
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"{_model(name)}: output {got}{mode} for a batch of 2; want (2, "
                         f"{num_classes}): one logit per class")
    if not out.is_floating_point():
        raise UsageError(f"{_model(name)}: output of dtype {out.dtype}; want floating-point "
                         "logits")
    return out
