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
"""

from __future__ import annotations

import torch
from torch import nn

from hpctrain import kernels
from hpctrain.async_.store import ParameterStore, Push
from hpctrain.errors import UsageError

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

    The buffer is where the parameters are (the CPU or one GPU)."""
    device = params[0].device if params else torch.device("cpu")
    for p in params:
        if p.dtype != torch.float32 or p.device != device:
            raise UsageError(f"async optimizers need float32 parameters on one device, got "
                             f"{p.dtype} on {p.device} (first on {device})")
    flat = torch.empty(sum(p.numel() for p in params), device=device)
    for p, view in zip(params, _views(flat, params), strict=True):
        view.copy_(p.detach())
        p.data = view
    return flat


class ASGD(torch.optim.Optimizer):
    """Asynchronous SGD: ``w <- w - lr * g`` applied to the store's current ``w``.

    ``momentum`` > 0 keeps a velocity of this worker's own steps (``v <- momentum*v + d``,
    ``d`` the step, learning rate included, as MXNet's DCASGD has it; torch's SGD keeps
    gradients instead, the same at a constant rate only) and pushes it. A parameter without a
    gradient in a step is pushed as zeros, so weight decay and momentum still move it (as
    Horovod's optimizer, which fills a missing gradient with zeros; torch's SGD would skip it).
    Construction pulls the store's values into ``model``. ``staleness`` lists the measured
    tau of every push; ``last_push`` describes the latest (:class:`Push`).
    """

    def __init__(self, model: nn.Module, store: ParameterStore, lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0, *, lam: float = 0.0,
                 adaptive: bool = False, ms_decay: float = 0.95):
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
        self._grad = torch.zeros_like(self._flat)
        self._grad_views = _views(self._grad, params)
        self._ms = torch.zeros_like(self._flat) if adaptive else None
        self._v = torch.zeros_like(self._flat) if momentum > 0 else None
        self.staleness: list[int] = []
        self.last_push: Push | None = None
        store.pull(self._flat)

    @torch.no_grad()
    def step(self, closure=None):
        """Push this worker's update; the model then holds the newest values it read."""
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
        self.staleness.append(self.last_push.tau)
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
        """torch's optimizer state, plus this worker's mean squares, velocity and staleness."""
        state = super().state_dict()
        state["worker"] = {"ms": self._ms, "v": self._v, "staleness": list(self.staleness)}
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
        self.staleness = list(worker["staleness"])

    @torch.no_grad()
    def pull(self) -> int:
        """Refresh the model with the store's newest values; return the update count seen."""
        return self.store.pull(self._flat)


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
