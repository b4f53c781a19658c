"""``broadcast_parameters`` and ``broadcast_optimizer_state`` of hpctrain's backends."""

from __future__ import annotations

from typing import Any

import torch

from hpctrain.errors import UsageError
from hpctrain.sync import collectives
from hpctrain.sync.collective_check import Call, tensor_entry
from hpctrain.sync.errors import UsageTypeError
from hpctrain.sync.optimizer import _AdasumOptimizer, _DistributedOptimizer
from hpctrain.sync.process_sets import ProcessSet, global_process_set


def broadcast_parameters(params: Any, root_rank: int,
                         process_set: ProcessSet = global_process_set) -> None:
    """Overwrite tensors in place with root_rank's: a ``state_dict()`` (a dict), or a list of
    parameters or of (name, parameter) pairs, e.g. ``list(model.named_parameters())``."""
    if isinstance(params, dict):
        names, tensors = zip(*sorted(params.items()), strict=True) if params else ((), ())
    elif isinstance(params, list):
        names = tuple(p[0] if isinstance(p, tuple) else None for p in params)
        tensors = tuple(p[1] if isinstance(p, tuple) else p for p in params)
    else:
        raise UsageError(f"broadcast_parameters: params must be a dict or a list, got "
                         f"{type(params).__name__}")
    labels = [f"tensor #{i + 1}" if name is None else repr(name)
              for i, name in enumerate(names)]
    _broadcast_tensors(names, labels, tensors, root_rank, process_set, "broadcast_parameters")


def _broadcast_tensors(names: Any, labels: list[str], tensors: Any, root_rank: int,
                       process_set: ProcessSet, caller: str) -> None:
    """Overwrite ``tensors`` with root_rank's, agreed first by their ``names`` (the user's
    keys, or None), and by ``labels`` in an error naming the first tensor that differs."""
    m = collectives.member(process_set, caller)
    with collectives.rejecting(m, caller):  # all checked before any starts
        collectives.check_root(root_rank, caller, process_set)
        for t in tensors:
            collectives.check_tensor(t, caller, in_place=True)
    # Ranks whose lists differ in length would otherwise go on calling broadcasts the others
    # never make; one round agrees on every tensor's name, dtype and shape first (names that
    # differ would copy the root's tensors into other entries: Horovod matches by name).
    shapes = tuple((str(name), str(t.dtype), tuple(t.shape)) for name, t in zip(names, tensors,
                                                                              strict=True))
    entries = tuple(tensor_entry(label, t) for label, t in zip(labels, tensors, strict=True))
    m.channel.agree(Call(caller, agree=(shapes, int(root_rank)), entries=entries,
                         extra=f"{len(tensors)} tensors, root_rank={int(root_rank)}"))
    handles = [collectives.broadcast_async_(t, root_rank, process_set=process_set)
               for t in tensors]
    for handle in handles:
        collectives.synchronize(handle)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int,
                              model: torch.nn.Module | None = None,
                              process_set: ProcessSet = global_process_set) -> None:
    """Make every process's optimizer state and hyper-parameters root_rank's.

    As in Horovod, a fresh optimizer is first stepped once on zero gradients so that its
    state exists everywhere (sparse zeros for ``SparseAdam``, which takes no others).
    ``model`` is accepted for compatibility: Horovod uses it to give SGD sparse zeros for
    sparse embeddings, whose sparse momentum buffer it then cannot broadcast; SGD steps on
    sparse gradients with the dense buffer made here.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageTypeError(f"broadcast_optimizer_state: expected a torch.optim.Optimizer, "
                             f"got {type(optimizer).__name__}")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise UsageError("broadcast_optimizer_state: torch.optim.LBFGS state cannot be broadcast")
    collectives.world("broadcast_optimizer_state")
    # Before the zero-gradient step below changes the state: a bad root changes nothing.
    m = collectives.member(process_set, "broadcast_optimizer_state")
    with collectives.rejecting(m, "broadcast_optimizer_state"):
        collectives.check_root(root_rank, "broadcast_optimizer_state", process_set)
    if not optimizer.state:
        _initialise_state(optimizer)
    tensors: list[torch.Tensor] = []
    labels: list[str] = []  # what an error calls each: "exp_avg of '3.bias'"
    names = getattr(optimizer, "_parameter_names", {})  # a DistributedOptimizer's
    scalars: dict[str, Any] = {}
    for index, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            if key != "params":
                scalars[f"group.{index}.{key}"] = value
        for j, p in enumerate(group["params"]):
            parameter = repr(names[p]) if p in names else f"param_groups[{index}]['params'][{j}]"
            for name, value in sorted(optimizer.state.get(p, {}).items()):
                if torch.is_tensor(value):
                    tensors.append(value)
                    labels.append(f"{name} of {parameter}")
                else:
                    scalars[f"state.{index}.{j}.{name}"] = value
    _broadcast_tensors([None] * len(tensors), labels, tensors, root_rank, process_set,
                       "broadcast_optimizer_state")
    scalars = collectives.broadcast_object(scalars, root_rank, process_set=process_set)
    for key, value in scalars.items():
        kind, at, rest = key.split(".", 2)
        group = optimizer.param_groups[int(at)]
        if kind == "group":
            group[rest] = value
        else:
            row, name = rest.split(".", 1)
            optimizer.state[group["params"][int(row)]][name] = value


def _initialise_state(optimizer: torch.optim.Optimizer) -> None:
    """Make a fresh optimizer's state by one step on zero gradients, as Horovod does, then put
    the parameters and their gradients back: Horovod's step moves them when gradients were
    there already (an extra step) or with weight decay."""
    trained = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    kept = [(p.detach().clone(), p.grad) for p in trained]
    sparse = isinstance(optimizer, torch.optim.SparseAdam)
    for p in trained:
        p.grad = torch.zeros_like(p).to_sparse() if sparse else torch.zeros_like(p)
    try:
        # The wrapped step would reduce, and not every rank may be here with a fresh state.
        if isinstance(optimizer, _DistributedOptimizer):
            step = super(_DistributedOptimizer, optimizer).step
        elif isinstance(optimizer, _AdasumOptimizer):
            step = super(_AdasumOptimizer, optimizer).step
        else:
            step = optimizer.step
        step()
    finally:
        with torch.no_grad():
            for p, (value, grad) in zip(trained, kept, strict=True):
                p.copy_(value)
                p.grad = grad
