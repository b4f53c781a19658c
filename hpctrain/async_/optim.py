"""ASGD and DC-ASGD optimizers on a :class:`ParameterStore`, used from the user's own loop.

Like Horovod's optimizer: ``loss.backward(); opt.step()``. ``step`` pushes the (delay-
compensated) update of this worker's gradient into the store and leaves the model holding the
newest global values it read there, plus its own step: the model the next gradient is
computed at (``w_bak``). The model's parameters become views of one flat float32 buffer, so
the store reads into and writes from the model's memory without copies. A model on a GPU
keeps its buffer, gradient, mean squares and velocity there; the store's staged push runs
the CUDA kernel on them. Their gradients are views of a second flat buffer, the one pushed:
backward accumulates into it once :meth:`ASGD.zero_grad` has zeroed it in place, so a step
copies no gradient (a gradient autograd or the user made anew is copied in).

The store, not the model, holds the shared values, so what the user changes in the model
after building the optimizer would be lost at the next step: a ``load_state_dict`` that
changed its trainable parameters, or a ``requires_grad`` switched (the store holds the
parameters that required grad at the start). :meth:`ASGD.step` refuses to run after either,
with an error that says what to do, and one parameter group is all the optimizers take. A load
that replaced the parameters (``assign=True``) is refused by :meth:`ASGD.pull` too: the model
no longer holds the tensors the store reads into, so only a new store and optimizer can train it.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from hpctrain import kernels
from hpctrain.async_.store import SHAPES_TAG, ParameterStore, Push, shapes_text
from hpctrain.errors import UsageError
from hpctrain.metrics import Tally

DEFAULT_LAM = {"constant": 0.04, "adaptive": 2.0}  # DC-ASGD paper: lam0 for -c and -a


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` the store holds and the optimizers update: those that
    require grad. A frozen one (``requires_grad=False``) stays the worker's own, as torch's
    optimizers leave it: in the store, weight decay would change it, and an integer one
    (a counter) could not be stored as float32."""
    return [p for p in model.parameters() if p.requires_grad]


def _views(flat: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Each parameter's slice of ``flat``, one after another, shaped as the parameter."""
    views, offset = [], 0
    for p in params:
        views.append(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return views


def flatten_parameters(params: list[nn.Parameter]) -> torch.Tensor:
    """Copy ``params`` into one new flat buffer and make each parameter a view of it.

    The buffer is where the parameters are (the CPU or one GPU). It records the parameters'
    shapes, which a :class:`ParameterStore` built from it compares across ranks."""
    device = params[0].device if params else torch.device("cpu")
    for p in params:
        if p.dtype != torch.float32 or p.device != device:
            raise UsageError(f"async optimizers need float32 parameters on one device, got "
                             f"{p.dtype} on {p.device} (first on {device})")
    flat = torch.empty(sum(p.numel() for p in params), device=device)
    for p, view in zip(params, _views(flat, params), strict=True):
        view.copy_(p.detach())
        p.data = view
    setattr(flat, SHAPES_TAG, tuple(tuple(p.shape) for p in params))
    return flat


class _LoadWatch:
    """``load_state_dict`` hooks on a module that owns trainable parameters: they mark the
    optimizer when a load changed one of them (other values, or ``assign=True``'s new
    tensors), since its next step would overwrite them with the store's values. Only the
    loading is marked, not refused: loading a snapshot of values to evaluate it, then
    :meth:`ASGD.pull`, is fine. A load that replaced a parameter (another tensor object, or
    one no longer in the flat buffer) is marked for good: a pull would fill the old tensors,
    which the model no longer uses, and step() would train them. Loading the values already
    there (hpctrain's own resume) marks nothing. A copy of the model (deepcopy, pickle) gets
    an inert watch."""

    def __init__(self, opt: ASGD | None, owned: list[tuple[str, nn.Parameter]]):
        self._opt = None if opt is None else weakref.ref(opt)
        self._owned = [(name, p, p.data_ptr()) for name, p in owned]

    def _mark(self, replaced: bool = False) -> None:
        opt = None if self._opt is None else self._opt()
        if opt is not None:
            opt._loaded_after = True
            opt._replaced = opt._replaced or replaced

    def before(self, module: nn.Module, state_dict, prefix: str, *_) -> None:
        for name, p, _ptr in self._owned:
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and module._parameters.get(name) is p \
                    and (value.shape != p.shape
                         or not torch.equal(value.to(p.device, p.dtype), p.detach())):
                self._mark()

    def after(self, module: nn.Module, _incompatible) -> None:
        if any(module._parameters.get(name) is not p or p.data_ptr() != ptr
               for name, p, ptr in self._owned):
            self._mark(replaced=True)

    def __reduce__(self):
        return _LoadWatch, (None, [])


def _watch_loads(opt: ASGD, model: nn.Module, params: list[nn.Parameter]) -> None:
    """A :class:`_LoadWatch` on every module of ``model`` that owns some of ``params``: a
    submodule's own ``load_state_dict`` is caught too. Removed with the optimizer."""
    ids, handles = {id(p) for p in params}, []
    for module in model.modules():
        owned = [(n, p) for n, p in module._parameters.items() if p is not None and id(p) in ids]
        if not owned:
            continue
        watch = _LoadWatch(opt, owned)
        pre = getattr(module, "register_load_state_dict_pre_hook", None)  # public: torch 2.5
        handles.append(pre(watch.before) if pre is not None else
                       module._register_load_state_dict_pre_hook(watch.before, with_module=True))
        handles.append(module.register_load_state_dict_post_hook(watch.after))
    weakref.finalize(opt, _remove, handles)


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()


class ASGD(torch.optim.Optimizer):
    """Asynchronous SGD: ``w <- w - lr * g`` applied to the store's current ``w``.

    ``momentum`` > 0 keeps a velocity of this worker's own steps (``v <- momentum*v + d``,
    ``d`` the step, learning rate included, as MXNet's DCASGD has it; torch's SGD keeps
    gradients instead, the same at a constant rate only) and pushes it. A parameter without a
    gradient in a step is pushed as zeros, so weight decay and momentum still move it (as
    Horovod's optimizer, which fills a missing gradient with zeros; torch's SGD would skip it).
    Construction pulls the store's values into ``model``. ``staleness`` tallies the measured
    tau of every push (a :class:`~hpctrain.metrics.Tally`: counts per value, so a long run's
    record stays small); ``last_push`` describes the latest (:class:`Push`).

    One parameter group, ``model``'s trainable parameters: the store's kernel updates them as
    one flat vector with one ``lr`` and ``weight_decay`` (a scheduler changes group 0's).
    """

    def __init__(self, model: nn.Module, store: ParameterStore, lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0, *, lam: float = 0.0,
                 adaptive: bool = False, ms_decay: float = 0.95):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}() takes the model (an nn.Module), not "
                            f"{type(model).__name__}: it updates the model's trainable parameters "
                            "as one group (no parameter groups)")
        kernels.check_rates(lr=lr, lam=lam, weight_decay=weight_decay)
        kernels.check_decays(ms=adaptive, v=True, ms_decay=ms_decay, momentum=momentum)
        params = trainable(model)
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "lam": lam,
                    "ms_decay": ms_decay}
        super().__init__(params, defaults)
        self.store = store
        self.model = model
        self._flat = flatten_parameters(params)
        if self._flat.numel() != store.numel:
            raise UsageError(f"the model has {self._flat.numel()} trainable parameters, the "
                             f"store {store.numel} (give the store trainable(model)'s)")
        shapes = getattr(self._flat, SHAPES_TAG)
        if store.shapes is not None and store.shapes != shapes:
            raise UsageError(f"the model's trainable parameters have shapes {shapes_text(shapes)}"
                             f", the store's {shapes_text(store.shapes)} (give the store "
                             "trainable(model))")
        # What step() checks the model against (_check_model): the parameters that did not
        # require grad then, and whether a load_state_dict changed the trainable ones since
        # (their values: pull() clears it; or the tensors themselves: for good).
        self._frozen = [p for p in model.parameters() if not p.requires_grad]
        self._loaded_after = False
        self._replaced = False
        _watch_loads(self, model, params)
        self._grad = torch.zeros_like(self._flat)
        self._grad_views = _views(self._grad, params)
        self._ms = torch.zeros_like(self._flat) if adaptive else None
        self._v = torch.zeros_like(self._flat) if momentum > 0 else None
        self.staleness = Tally()
        self.last_push: Push | None = None
        store.pull(self._flat)

    def add_param_group(self, param_group: dict) -> None:
        """torch's, for the one group construction makes; another is refused: the store
        updates one flat vector with one set of hyperparameters (and step() pushed only the
        first group's parameters, leaving the added ones untouched)."""
        if self.param_groups:
            raise TypeError(f"{type(self).__name__} takes one parameter group (the model's "
                            "trainable parameters, the store's vector): add_param_group is "
                            "not supported")
        super().add_param_group(param_group)

    def _check_model(self) -> None:
        """UsageError if the model changed under the optimizer in a way a step would undo or
        ignore: a load_state_dict of other parameter values (the step's pull overwrote them
        with the store's), a ``requires_grad`` switched (the store holds the parameters that
        required grad at construction), or a load that replaced them (``assign=True``:
        :meth:`_check_not_replaced`). One flag and a pass over the flags: cheap per step."""
        name = type(self).__name__
        self._check_not_replaced("step")
        if self._loaded_after:
            raise UsageError(f"{name}.step(): load_state_dict changed the model's parameters "
                             "after the optimizer was built, and the step would replace them "
                             "with the store's values: load the model before building the "
                             "ParameterStore (its values start the shared model), or pull() "
                             "to go on from the store's")
        if any(not p.requires_grad for p in self.param_groups[0]["params"]) \
                or any(p.requires_grad for p in self._frozen):
            raise UsageError(f"{name}.step(): requires_grad changed on a parameter after the "
                             "optimizer was built (the store holds the parameters that required "
                             "grad then): build a new ParameterStore and optimizer after "
                             "freezing or unfreezing")

    def _check_not_replaced(self, call: str) -> None:
        """UsageError if a load_state_dict replaced trainable parameters (``assign=True``):
        the model's new tensors are not views of the flat buffer the store reads into and
        the kernel updates, so a pull would not reach them and a step would train the old
        ones. No pull undoes that; a new store and optimizer take the new tensors."""
        if self._replaced:
            raise UsageError(f"{type(self).__name__}.{call}(): load_state_dict replaced the "
                             "model's parameters (assign=True) after the optimizer was built, "
                             "so it no longer updates the tensors the model uses: build a new "
                             "ParameterStore and optimizer after the load")

    @torch.no_grad()
    def step(self, closure=None):
        """Push this worker's update; the model then holds the newest values it read."""
        self._check_model()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        for p, view in zip(group["params"], self._grad_views, strict=True):
            if p.grad is None:
                view.zero_()
            elif p.grad.is_sparse:  # an embedding's: the store's update is dense
                view.zero_().add_(p.grad)
            elif p.grad.data_ptr() != view.data_ptr():  # new: set to None, or the user's
                view.copy_(p.grad)
                p.grad = view  # the next in-place zero_grad and backward use the buffer
        self.last_push = self.store.push(self._flat, self._grad, self._ms, self._v,
                                         lr=group["lr"], lam=group["lam"],
                                         ms_decay=group["ms_decay"],
                                         weight_decay=group["weight_decay"],
                                         momentum=group["momentum"] if self._v is not None
                                         else 0.0)
        self.staleness.add(self.last_push.tau)
        return loss

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradients in place, by default: ``.grad`` views the flat buffer that
        :meth:`step` pushes, so backward accumulates there and the step copies nothing.
        torch's default, ``set_to_none=True`` (kept here when asked for), makes autograd
        allocate every gradient anew and the step copy it in: 15-20 % of a DC-ASGD step."""
        if set_to_none:
            super().zero_grad(set_to_none=True)
            return
        self._grad.zero_()
        for p, view in zip(self.param_groups[0]["params"], self._grad_views, strict=True):
            if p.grad is not None and (p.grad.is_sparse or p.grad.data_ptr() != view.data_ptr()):
                p.grad = view

    def state_dict(self) -> dict:
        """torch's optimizer state, plus this worker's mean squares, velocity and staleness
        (its tally's state: value -> count)."""
        state = super().state_dict()
        state["worker"] = {"ms": self._ms, "v": self._v, "staleness": self.staleness.state()}
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        worker = state_dict["worker"]
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "worker"})
        for name, mine in (("ms", self._ms), ("v", self._v)):
            if (mine is None) != (worker[name] is None):
                raise UsageError(f"the saved optimizer state {'has' if mine is None else 'lacks'}"
                                 f" {name!r}: adaptive/momentum differ from the saved run's")
            if mine is not None:
                mine.copy_(worker[name])
        self.staleness = Tally.of(worker["staleness"])  # or an older checkpoint's list

    @torch.no_grad()
    def pull(self) -> int:
        """Refresh the model with the store's newest values; return the update count seen.
        The model's trainable parameters are the store's again: a load_state_dict of other
        values before it no longer stops :meth:`step`. One that replaced the parameters
        (``assign=True``) raises here too: the pull would not reach the model."""
        self._check_not_replaced("pull")
        seen = self.store.pull(self._flat)
        self._loaded_after = False
        return seen


class DCASGD(ASGD):
    """DC-ASGD (Zheng et al., 2017): ``w <- w - lr*(g + lam_t*g*g*(w - w_bak))``.

    ``adaptive=False``: DC-ASGD-c, ``lam_t = lam`` (default 0.04). ``adaptive=True``:
    DC-ASGD-a, ``ms <- ms_decay*ms + (1-ms_decay)*g*g`` per worker and
    ``lam_t = lam / sqrt(ms + 1e-7)`` (default lam 2.0). Weight decay joins ``g`` first;
    ``momentum`` applies to the compensated step (as in the authors' MXNet optimizer).
    """

    def __init__(self, model: nn.Module, store: ParameterStore, lr: float,
                 lam: float | None = None, *, adaptive: bool = True, ms_decay: float = 0.95,
                 momentum: float = 0.0, weight_decay: float = 0.0):
        if lam is None:
            lam = DEFAULT_LAM["adaptive" if adaptive else "constant"]
        super().__init__(model, store, lr, momentum, weight_decay, lam=lam, adaptive=adaptive,
                         ms_decay=ms_decay)
