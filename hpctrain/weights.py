"""Starting weights (``--init-from``): a new run that starts from a model an earlier one
wrote, or from a user's own ``torch.save(model.state_dict(), f)``.

A run cannot be made longer by resuming it (``--epochs`` shapes its learning-rate schedule);
this starts a new run, with its own schedule, optimizer state and outputs, from those weights.
The file is read with ``weights_only=True`` (no code from it runs) and checked against the
model before MPI starts (:func:`hpctrain.launch_checks.check_launch`), so a file that does
not fit is one line, not a failure on every rank. Names that DDP (``module.``) or
``torch.compile`` (``_orig_mod.``) put in front of every key are taken off.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from hpctrain import option_names, options, paths
from hpctrain.checkpoint.format import load_weights_only
from hpctrain.errors import UsageError

FLAG = "--init-from"
MODEL_FILE = "model.pt"  # what a finished run writes (:meth:`hpctrain.metrics.RunLog.save_model`)
_WRAPPERS = ("module.", "_orig_mod.")  # DDP's and torch.compile's prefixes


def _given(path: str) -> str:
    """``--init-from PATH`` in a refusal: as typed on the command line, from Python the field
    given (``ModelConfig.init_from='PATH'``, :func:`hpctrain.option_names.said`)."""
    return option_names.said(FLAG, path, typed=f"{FLAG} {path}")


def _resume() -> str:
    """The option that continues a run, as :func:`_given` names options."""
    return options.named("--resume", "CheckpointConfig", "resume")


def file_of(path: str) -> Path:
    """The weights file ``path`` names: the file, or a run folder's ``model.pt``."""
    p = Path(paths.home_expanded(path, FLAG))
    if p.is_dir():
        if not (p / MODEL_FILE).is_file():
            raise UsageError(f"{_given(path)}: the folder has no {MODEL_FILE} (a run writes it "
                             f"when it finishes; {_resume()} continues an unfinished one)")
        return p / MODEL_FILE
    if not p.exists():
        raise UsageError(f"{_given(path)}: no such file or folder")
    return p


def read(path: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (a file or a run folder), on the CPU, with wrapper
    prefixes taken off; UsageError if it is not one."""
    f = file_of(path)
    try:
        with open(f, "rb") as stream:
            head = stream.readline(1 << 20)  # a checkpoint's is its JSON header
    except OSError as e:
        raise UsageError(f"{_given(path)}: cannot read it ({e.strerror})") from None
    if head.startswith(b"{") and b"hpctrain-checkpoint" in head:
        raise UsageError(f"{_given(path)}: an hpctrain checkpoint, not a model's weights; "
                         f"{_resume()} continues its run, or give the finished run's model.pt")
    try:
        state = load_weights_only(f)
    except pickle.UnpicklingError:
        raise UsageError(f"{_given(path)}: holds objects that torch.load does not read with "
                         "weights_only=True (a whole module saved?); save "
                         "model.state_dict()") from None
    except Exception as e:  # noqa: BLE001 (whatever the bytes make torch.load raise)
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise UsageError(f"{_given(path)}: not a file torch.load reads ({type(e).__name__}"
                         f"{': ' + first if first else ''})") from None
    if not isinstance(state, dict) or not state:
        raise UsageError(f"{_given(path)}: holds a {type(state).__name__}"
                         f"{' (empty)' if isinstance(state, dict) else ''}, not a state dict "
                         "of named tensors; save model.state_dict()")
    bad = next((k for k, v in state.items()
                if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UsageError(f"{_given(path)}: entry {bad!r} is not a named tensor; save "
                         "model.state_dict()")
    return state


def _wrapper(keys) -> str:
    """The wrappers' prefixes that every key has, outermost first (DDP of a compiled model:
    ``module._orig_mod.``); empty for none."""
    keys, prefix = list(keys), ""
    while (p := next((p for p in _WRAPPERS if all(k.startswith(p) for k in keys)), None)):
        keys, prefix = [k[len(p):] for k in keys], prefix + p
    return prefix


def aligned(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` keyed as ``model`` names its tensors: as saved when the names agree, else
    with the saving wrapper's prefix taken off and the model's own put on. A model's own
    names may start with ``module.`` or ``_orig_mod.`` (one built by torch.compile, or with a
    child named module), so the file's are not unwrapped blindly."""
    ours = model.state_dict().keys()
    if state.keys() == ours:
        return state
    theirs, own = _wrapper(state), _wrapper(ours)
    return {own + k[len(theirs):]: v for k, v in state.items()}


def mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``state`` from loading into ``model`` (strictly), in words; None if it
    fits. Dtypes may differ: loading converts, as ``load_state_dict`` does."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    shapes = [k for k in ours if k in state and state[k].shape != ours[k].shape]
    problems = []
    if missing:
        problems.append(f"the model's {_some(missing)} missing")
    if unexpected:
        problems.append(f"{_some(unexpected)} not in the model")
    if shapes:
        k = shapes[0]
        more = f" (and {len(shapes) - 1} more of another shape)" if len(shapes) > 1 else ""
        problems.append(f"{k} is {_shape(state[k])} in the file, {_shape(ours[k])} in the "
                        f"model{more}")
    return "; ".join(problems) or None


def _some(keys: list[str]) -> str:
    return keys[0] + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")


def _shape(t: torch.Tensor) -> str:
    return " x ".join(map(str, t.shape)) or "a scalar"


def load_into(model: nn.Module, path: str, model_name: str) -> None:
    """Load the weights in ``path`` into ``model`` (UsageError naming what does not fit)."""
    state = aligned(model, read(path))
    problem = mismatch(model, state)
    if problem:
        model_said = option_names.said("--model", model_name, typed=f"--model {model_name}")
        raise UsageError(f"{_given(path)}: its weights do not fit {model_said}: "
                         f"{problem}")
    model.load_state_dict(state, strict=True)

