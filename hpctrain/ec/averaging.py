"""Model averaging (MA): every ``tau`` local steps, allreduce-average the parameters and buffers.

Floating-point buffers (BatchNorm's running statistics) are averaged with the trainable
parameters; integer buffers (BatchNorm's step counter) are equal on every rank and left alone,
and so are frozen parameters (``requires_grad`` False: every rank holds rank 0's, which no
step changes). A tensor held under two names (tied weights) is sent once. Optimizer
state (momentum) stays local, as in local SGD. Device tensors travel through
:class:`hpctrain.devices.HostStage` (directly where MPI is CUDA-aware).
"""

from __future__ import annotations

import hashlib
import time

import torch
from torch import nn

from hpctrain import compiled, watchdog
from hpctrain.comm import allreduce_bytes, count_pieces
from hpctrain.devices import HostStage, mpi_buffer
from hpctrain.ec.stats import AggregationStats
from hpctrain.errors import UsageError, on_every_rank


def floating_state(model: nn.Module) -> list[torch.Tensor]:
    """What model averaging averages, in ``state_dict`` order: the trainable parameters and
    the floating-point buffers, each tensor once. A frozen parameter is equal on every rank,
    and averaging it sent the whole frozen backbone every round and, on a rank count that is
    not a power of two, changed it by rounding; a tied one was sent once per name."""
    seen: set[int] = set()
    out = []
    for t in model.state_dict(keep_vars=True).values():
        frozen = isinstance(t, nn.Parameter) and not t.requires_grad
        if t.is_floating_point() and not frozen and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def frozen_names(model: nn.Module) -> set[str]:
    """The ``state_dict`` names of ``model``'s frozen parameters (every name of a tied one),
    which model averaging leaves as every rank holds them."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def check_same_layout(model: nn.Module, comm, who: str) -> None:
    """UsageError on every rank unless every rank's ``model`` has parameters and buffers of the
    same shapes and dtypes, in the same order. MPI sizes a collective by each rank's own
    buffer: models that differ overran buffers (a segfault) instead of failing. One allgather
    of a digest; only when the digests differ, one more of the layouts, to name the first
    tensor that differs (every rank judges the same lists, so every rank raises alike)."""
    layout = [(str(t.dtype).removeprefix("torch."), tuple(t.shape))
              for t in model.state_dict().values()]
    digests = comm.allgather(hashlib.sha256(repr(layout).encode()).hexdigest()[:16])
    other = next((r for r, d in enumerate(digests) if d != digests[0]), None)
    if other is None:
        return
    names = list(model.state_dict())
    every = comm.allgather((names, layout))
    (names0, first), (names1, second) = every[0], every[other]
    i = next((i for i, pair in enumerate(zip(first, second, strict=False))
              if pair[0] != pair[1]), min(len(first), len(second)))

    def shown(names: list[str], layout: list) -> str:
        if i == len(layout):
            return f"only {i} tensors"
        return f"{names[i]} {layout[i][0]} {list(layout[i][1])}"

    raise on_every_rank(UsageError(
        f"{who}: the ranks hold different models: rank 0 {shown(names0, first)}, rank "
        f"{other} {shown(names1, second)}; build the same model on every rank"))


@torch.no_grad()
def average_model(model: nn.Module, comm) -> int:
    """Replace ``model``'s trainable parameters and floating buffers (:func:`floating_state`)
    by their mean over ``comm``'s ranks.

    Collective. Returns the bytes this rank sent (ring allreduce). Every rank must hold the
    same layout (:class:`ModelAveraging` checks it once; this, called every round, does not).
    """
    tensors = floating_state(model)
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    if flat.element_size() < 4:  # no MPI sum for fp16/bf16 (numpy has no bf16): sum in fp32
        flat = flat.float()
    stage = HostStage(flat)
    flat = stage.to_host()
    total = torch.empty_like(flat)
    # Non-blocking, as ssgd's mpi backend reduces: one order of additions for both, the one
    # the simulator's LocalComm adds in. Open MPI 4.1's blocking Allreduce adds 4-247 KB on 3
    # ranks in an order of its own (coll/tuned), and simulated ma then rounded otherwise.
    # In pieces past COUNT_PIECE elements (MPI-3's counts are C ints): a model that fits is
    # the one call it was.
    for request in [comm.Iallreduce(mpi_buffer(flat[piece]), mpi_buffer(total[piece]))
                    for piece in count_pieces(flat.numel())]:
        request.Wait()
    # The mean into the stage's (pinned) buffer, and back to the device in one copy: each
    # tensor copied from a host tensor of its own was a synchronous copy from pageable memory.
    # On the host (or CUDA-aware MPI) the buffer is ``flat``, a scratch copy.
    torch.div(total, comm.Get_size(), out=flat)
    mean = stage.to_device()
    offset = 0
    for t in tensors:
        t.copy_(mean[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return allreduce_bytes(flat.numel() * flat.element_size(), comm.Get_size())


@torch.no_grad()
def broadcast_model(model: nn.Module, comm, root: int = 0) -> None:
    """Give every rank ``root``'s parameters and buffers (collective); UsageError on every
    rank if the ranks' models differ (:func:`check_same_layout`)."""
    check_same_layout(model, comm, "broadcast_model")
    for t in model.state_dict(keep_vars=True).values():
        stage = HostStage(_exact(t.detach()))
        comm.Bcast(mpi_buffer(stage.to_host()), root=root)
        stage.to_device()


def _exact(t: torch.Tensor) -> torch.Tensor:
    """``t``, or for fp16/bf16 (no MPI type for them) its bits as int16: a copy is exact."""
    return t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t


class ModelAveraging:
    """Average ``model`` over ``comm`` every ``tau`` calls of :meth:`after_step`.

    Call ``after_step()`` after each ``optimizer.step()`` in your own loop (``final=True`` on
    the last one); it returns True when it aggregated. Start every rank from the same model
    (:func:`broadcast_model`). Every rank must call it as often: a rank that stops early
    leaves the others waiting in an average (or meeting its next collective). Construction is
    collective: it checks that the ranks' models have one layout (:func:`check_same_layout`).
    """

    def __init__(self, model: nn.Module, comm, tau: int):
        if tau < 1:
            raise UsageError(f"tau {tau} must be >= 1")
        check_same_layout(model, comm, "ModelAveraging")
        self.model, self.comm, self.tau = model, comm, tau
        self.steps = 0
        self.stats = AggregationStats()

    def after_step(self, final: bool = False) -> bool:
        """Count one local step; average when ``tau`` steps have passed since the last time,
        and on the ``final`` step of training so that every rank ends with the average."""
        self.steps += 1
        if self.steps % self.tau and not final:
            return False
        self.aggregate()
        return True

    def state_dict(self) -> dict:
        """Steps counted and aggregation statistics (the model is the caller's to save)."""
        return {"steps": self.steps, "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.stats.load_state_dict(state["stats"])

    def aggregate(self) -> None:
        """Average the model now (collective)."""
        if compiled.met_new_shapes(self.model, "round"):  # --compile: others may be compiling
            watchdog.beat("aggregating after a compile", compiling=True)
        start = time.perf_counter()
        nbytes = average_model(self.model, self.comm)
        self.stats.record(nbytes, time.perf_counter() - start)
