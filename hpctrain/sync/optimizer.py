"""``DistributedOptimizer`` of hpctrain's backends: Horovod's optimizer wrapper, fused buckets.

As in Horovod, the result is an instance of a class made on the fly as a subclass of the
user's optimizer class, built on the same parameter groups: ``isinstance``, ``state_dict`` and
LR schedulers work as before. Gradients are allreduced during backward (see buckets.py);
``step()`` waits for them first, unless inside ``skip_synchronize()`` after ``synchronize()``.
With ``op=Adasum`` it is Horovod's other wrapper: each rank steps on its own gradients and
the parameters' changes are combined (:class:`_AdasumOptimizer`).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from hpctrain import comm
from hpctrain.errors import UsageError
from hpctrain.sync import adasum, collectives
from hpctrain.sync.buckets import DEFAULT_BUCKET_BYTES, BucketedAllreduce, check_unowned
from hpctrain.sync.collective_check import Call, tensor_entry
from hpctrain.sync.collectives import Adasum, Average, ReduceOp, Sum
from hpctrain.sync.compression import Compression, only_casts
from hpctrain.sync.errors import UsageTypeError
from hpctrain.sync.process_sets import ProcessSet, global_process_set, included_member

if TYPE_CHECKING:
    class HorovodOptimizer(torch.optim.Optimizer):
        """What ``DistributedOptimizer`` returns, for the type checker only: the user's
        optimizer (an instance of a subclass of its class, made on the fly; Horovod's own with
        ``backend="horovod"``) plus Horovod's methods, so ``opt.synchronize()`` and
        ``with opt.skip_synchronize():`` check in a script, and ``opt`` still goes to LR
        schedulers and ``GradScaler``, which take a ``torch.optim.Optimizer`` (a Protocol
        would not; typing has no intersection of the user's class with these). Annotate
        with it; at run time the name is ``torch.optim.Optimizer`` itself (so annotations
        resolve, ``typing.get_type_hints`` included)."""

        backward_passes_per_step: int

        def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None: ...
        def synchronize(self) -> None: ...
        def skip_synchronize(self) -> AbstractContextManager[None]: ...
        def set_backward_passes_per_step(self, passes: int) -> None: ...

    _Mixin = HorovodOptimizer
else:
    HorovodOptimizer = torch.optim.Optimizer  # what it is at run time: annotations resolve
    _Mixin = object  # the user's optimizer class comes after the mixins, at run time


def DistributedOptimizer(optimizer: torch.optim.Optimizer,
                         named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
                         compression: Any = Compression.none, backward_passes_per_step: int = 1,
                         op: Any = Average, gradient_predivide_factor: float = 1.0,
                         num_groups: int = 0, groups: Any = None, sparse_as_dense: bool = False,
                         process_set: ProcessSet = global_process_set, *,
                         bucket_bytes: int = DEFAULT_BUCKET_BYTES
                         ) -> _DistributedOptimizer | _AdasumOptimizer:
    """Wrap ``optimizer`` so that ``step()`` applies gradients allreduced over all processes.

    Horovod's arguments and semantics; ``bucket_bytes`` is the fusion bucket size. ``groups``
    (or the deprecated ``num_groups``): an int splits the parameters into that many fused
    buckets in order, a list of lists of parameters makes each list one bucket (the others
    are bucketed by size). Sparse gradients (an embedding's) are reduced by allgather and
    stay sparse, as in Horovod; ``sparse_as_dense`` reduces them as dense ones instead.
    ``process_set``: gradients are averaged over its ranks only.
    """
    collectives.world("DistributedOptimizer")
    if not isinstance(process_set, ProcessSet):
        raise UsageTypeError(f"DistributedOptimizer: process_set must be an "
                             f"hpctrain.sync.ProcessSet, got {type(process_set).__name__}")
    if num_groups:
        # Horovod's words and category (a UserWarning was shown wherever it was called from)
        warnings.warn("Parameter `num_groups` has been replaced by `groups` and will be "
                      "removed in v0.23.0.", DeprecationWarning, stacklevel=2)
        groups = num_groups if groups is None else groups
    member = included_member(process_set, "DistributedOptimizer")
    # A rank whose arguments are bad tells the set's others, which would otherwise wait in
    # the agreement round the constructor runs (collectives.rejecting).
    with (collectives.rejecting(member, "DistributedOptimizer") if member else nullcontext()):
        op = _check_arguments(compression, backward_passes_per_step, op,
                              gradient_predivide_factor, bucket_bytes)
        names = parameter_names(optimizer, named_parameters)
        trained = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        check_unowned(trained, names)
        if (member is not None and member.transport.name == "mpi" and op is not Adasum
                and any(p.is_cuda for p in trained)):  # Adasum reduces in step()
            check_hook_thread(comm.thread_level())
        if op is Adasum and member is not None:
            for p in trained:
                adasum.check(member.transport.size(), p.dtype, "DistributedOptimizer")
        group_indices = None if op is Adasum else _group_indices(groups, trained)
    if member is not None:  # before the constructor's collectives (Dup), which a rank that
        # rejected its arguments does not make
        member.channel.agree(Call("DistributedOptimizer", op=op.name,
                                  agree=("arguments", backward_passes_per_step,
                                         gradient_predivide_factor),
                                  extra=f"backward_passes_per_step={backward_passes_per_step}, "
                                        f"gradient_predivide_factor={gradient_predivide_factor}",
                                  row="DistributedOptimizer"))
    if op is Adasum:
        cls = type(optimizer.__class__.__name__, (_AdasumOptimizer, optimizer.__class__), {})
        wrapped = cls(optimizer.param_groups, names, compression, backward_passes_per_step,
                      process_set)
    else:
        cls = type(optimizer.__class__.__name__, (_DistributedOptimizer, optimizer.__class__),
                   {})
        wrapped = cls(optimizer.param_groups, names, compression, backward_passes_per_step, op,
                      gradient_predivide_factor, bucket_bytes, group_indices,
                      bool(sparse_as_dense), process_set)
    # The class was built from the groups alone: add_param_group's defaults are the user's
    # (SGD(lr=0.0)'s 0.0, not the class's 1e-3, a required lr on torch 2.1; Horovod: the class's).
    wrapped.defaults = dict(optimizer.defaults)
    return wrapped


def check_hook_thread(level: str) -> None:
    """UsageError unless MPI at ``level`` may be called from autograd's GPU thread: a CUDA
    parameter's gradient hook runs there, not in the thread that called ``backward()``, and
    the mpi backend starts its bucket's Iallreduce from the hook (``serialized`` suffices:
    the caller waits in ``backward()`` meanwhile)."""
    if comm.THREAD_LEVELS.index(level) < comm.THREAD_LEVELS.index("serialized"):
        raise UsageError(f"DistributedOptimizer: MPI runs at thread level {level!r}, but a "
                         "GPU model's gradient hooks call MPI from autograd's own thread, "
                         "which needs 'serialized' or 'multiple' (hpctrain asks for "
                         "'multiple'; this MPI library was built or configured without it)")


def _check_arguments(compression: Any, passes: Any, op: Any, factor: Any,
                     bucket_bytes: Any) -> ReduceOp:
    """DistributedOptimizer's one-line errors for bad arguments; the op they resolve to."""
    op = collectives.resolve_op(op)
    if op not in (Average, Sum, Adasum):
        raise UsageError(f"DistributedOptimizer: op must be Average, Sum or Adasum, got "
                         f"{op.name}")
    _check_passes(passes)
    if not isinstance(factor, (int, float)) or not (0 < factor < math.inf):
        raise UsageError(f"gradient_predivide_factor must be a finite number > 0, got "
                         f"{factor!r}")
    if factor != 1 and op is not Average:
        raise UsageError("gradient_predivide_factor needs op=Average")
    if not only_casts(compression):
        raise UsageTypeError(f"compression must be hpctrain.sync.Compression.none or .fp16, or "
                             f"a compression.CastCompressor with its own wire_dtype(dtype): "
                             f"gradients are fused by the dtype they travel in, and a "
                             f"compress() of one's own would not run; got {compression!r}")
    if not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
        raise UsageError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
    return op


def _group_indices(groups: Any, params: list[torch.Tensor]) -> list[list[int]] | None:
    """``groups`` as lists of indices into ``params`` (the trainable ones); UsageError for a
    bad value. Frozen parameters are left out, as Horovod does (``list(model.parameters())``
    is a natural group); a trainable one not in ``params`` is refused, where Horovod leaves
    it out too: its gradient would not be reduced."""
    if groups is None:
        return None
    if isinstance(groups, int) and not isinstance(groups, bool):
        if groups <= 0:
            raise UsageError(f"groups must be a positive integer or a list of lists of "
                             f"parameters, got {groups}")
        if not params:
            return []
        k = min(groups, len(params))
        bounds = [len(params) * j // k for j in range(k + 1)]
        return [list(range(bounds[j], bounds[j + 1])) for j in range(k)
                if bounds[j + 1] > bounds[j]]
    if not isinstance(groups, list) or not all(isinstance(g, list | tuple) for g in groups):
        raise UsageError(f"groups must be a positive integer or a list of lists of "
                         f"parameters, got {type(groups).__name__}")
    index = {id(p): i for i, p in enumerate(params)}
    seen: set[int] = set()
    result = []
    for group in groups:
        members = []
        for p in group:
            if not isinstance(p, torch.Tensor):
                raise UsageError(f"groups must consist of the optimizer's parameters, got a "
                                 f"{type(p).__name__}")
            if id(p) in seen:
                raise UsageError("a parameter can only appear once in groups")
            seen.add(id(p))
            if id(p) in index:
                members.append(index[id(p)])
            elif p.requires_grad:
                raise UsageError("groups has a parameter that requires gradients but is not "
                                 "one of the optimizer's")
        if members:
            result.append(members)
    return result


def parameter_names(optimizer: torch.optim.Optimizer,
                    named_parameters: Iterable[tuple[str, torch.Tensor]] | None
                    ) -> dict[torch.Tensor, str]:
    """Name of each of the optimizer's parameters; UsageError for duplicate or missing names."""
    if named_parameters is None:
        return {p: f"allreduce.noname.{i}.{j}" for i, group in enumerate(optimizer.param_groups)
                for j, p in enumerate(group["params"])}
    named = list(named_parameters)
    if not all(isinstance(x, tuple) and len(x) == 2 for x in named):
        raise UsageError("named_parameters must be (name, parameter) pairs, as "
                         "model.named_parameters() gives")
    duplicates = sorted(n for n, count in Counter(n for n, _ in named).items() if count > 1)
    if duplicates:
        raise UsageError(f"named_parameters has duplicate names: {', '.join(duplicates)}")
    named_ids = {id(p) for _, p in named}
    unnamed = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in named_ids]
    if unnamed:
        raise UsageError(f"named_parameters leaves {len(unnamed)} of the optimizer's parameters "
                         "unnamed")
    return {p: n for n, p in named}


def _check_passes(passes: Any) -> None:
    if not isinstance(passes, int) or passes < 1:
        raise UsageError(f"backward_passes_per_step must be an integer >= 1, got {passes!r}")


class _DistributedOptimizer(_Mixin):
    """Mixed in before the user's optimizer class; ``super()`` is that class."""

    def __init__(self, params: list[dict], names: dict[torch.Tensor, str], compression: Any,
                 backward_passes_per_step: int, op: Any, gradient_predivide_factor: float,
                 bucket_bytes: int, groups: list[list[int]] | None = None,
                 sparse_as_dense: bool = False,
                 process_set: ProcessSet = global_process_set):
        super().__init__(params)
        self._parameter_names = names
        self._compression = compression
        self.op = op
        self.gradient_predivide_factor = gradient_predivide_factor
        self.backward_passes_per_step = backward_passes_per_step
        self.sparse_as_dense = sparse_as_dense
        self.process_set = process_set
        self._synchronized = False
        self._should_synchronize = True
        collectives.world("DistributedOptimizer")
        # As in Horovod, one process needs no communication at all, and a rank outside the
        # process set none either.
        self._reducer = None
        self._member = member = included_member(process_set, "DistributedOptimizer")
        if member is not None and member.transport.size() > 1:
            grads = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
            self._reduced = {id(p) for p in grads}
            # Its own transport: its collectives may start at different moments on different
            # ranks (from backward, or at synchronize) relative to the user's hvd.* calls; its
            # steps are agreed on the process set's channel, at step time.
            self._reducer = BucketedAllreduce(grads, member.transport.dup(), compression, op,
                                              gradient_predivide_factor,
                                              backward_passes_per_step, bucket_bytes, groups,
                                              sparse_as_dense, member.channel,
                                              [names[p] for p in grads])
            member.channel.agree(Call("DistributedOptimizer", agree=(self._reducer.plan,),
                                      extra=f"{len(self._reducer.plan)} buckets",
                                      row="DistributedOptimizer",
                                      entries=tuple(tensor_entry(repr(names[p]), p)
                                                    for p in grads)))

    @property
    def bucket_sizes(self) -> list[int]:
        """Bytes of each fused bucket, in launch order (none on a single process)."""
        return self._reducer.bucket_sizes if self._reducer else []

    @property
    def buckets_started(self) -> int:
        """Buckets whose allreduce has started since the last synchronize."""
        return self._reducer.started if self._reducer else 0

    def set_backward_passes_per_step(self, passes: int) -> None:
        _check_passes(passes)
        self.backward_passes_per_step = passes
        if self._reducer:
            self._reducer.set_passes(passes)

    def synchronize(self) -> None:
        """Wait until every gradient is allreduced and written to its ``.grad``."""
        if self._reducer:
            assert self._member is not None  # a reducer is made for a member only
            with collectives.rejecting(self._member, "DistributedOptimizer.step"):
                self._check_reduced()
            self._reducer.synchronize()
        self._synchronized = True

    def _check_reduced(self) -> None:
        """UsageError for trainable parameters its hooks do not reduce (added by
        add_param_group or unfrozen since it was made): Horovod leaves them unreduced."""
        new = sum(1 for g in self.param_groups for p in g["params"]
                  if p.requires_grad and id(p) not in self._reduced)
        if new:
            raise UsageError(f"DistributedOptimizer: {new} trainable parameter(s) were added "
                             "(add_param_group) or unfrozen after it was made, and their "
                             "gradients would not be reduced; make a new DistributedOptimizer")

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Make ``step()`` skip its synchronize, after an explicit ``synchronize()``."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if closure is not None and self._should_synchronize:
            return self._step_reducing_in(closure)
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                              "after optimizer.synchronize(): gradients are reduced twice",
                              stacklevel=2)
            self.synchronize()
        self._synchronized = False
        return super().step(closure)

    def _step_reducing_in(self, closure):
        """``step(closure)``: each call of the closure (LBFGS makes several) ends with its
        gradients reduced, before the user's optimizer reads them. Reducing before the
        closure ran stepped every rank on its own gradient (Horovod's ranks drift apart)."""
        if self._reducer and self._reducer.in_flight:  # a backward made before step()
            self.synchronize()

        def reduced():
            loss = closure()
            self.synchronize()
            return loss

        try:
            return super().step(reduced)
        finally:
            self._synchronized = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._reducer and self._reducer.in_flight:
            raise UsageError("optimizer.zero_grad() was called after loss.backward() but before "
                             "optimizer.step() or optimizer.synchronize()")
        super().zero_grad(set_to_none)

    def load_state_dict(self, state_dict: dict) -> None:
        if self._reducer:
            self._reducer.reset()
        self._synchronized = False
        self._should_synchronize = True
        super().load_state_dict(state_dict)


class _AdasumOptimizer(_Mixin):
    """Mixed in before the user's optimizer class for ``op=Adasum``, as Horovod's
    ``_DistributedAdasumOptimizer``: every rank steps on its own gradients and the changes of
    the parameters, not the gradients, are combined by Adasum (for plain SGD these are -lr·g;
    with momentum or Adam they are the update Adasum's argument is about). One fused Adasum
    per dtype at ``step()``, each parameter with its own coefficients; nothing moves during
    backward. A combined update holding NaN or Inf (finite changes whose dot products
    overflow, at a diverging learning rate) is not applied, where Horovod applies it: the
    parameters keep the values the step started from and ``update_applied`` is False, on
    every rank alike (each holds the same combined bits)."""

    def __init__(self, params: list[dict], names: dict[torch.Tensor, str], compression: Any,
                 backward_passes_per_step: int, process_set: ProcessSet = global_process_set):
        super().__init__(params)
        self._parameter_names = names
        self._compression = compression
        self.op = Adasum
        self.backward_passes_per_step = backward_passes_per_step
        self.process_set = process_set
        member = included_member(process_set, "DistributedOptimizer")
        self._packs: list[_Packed] | None = None  # made at the first step that reduces
        self._reduces = member is not None and member.transport.size() > 1
        self.update_applied = True  # whether the last step() applied its combined update

    def set_backward_passes_per_step(self, passes: int) -> None:
        _check_passes(passes)  # the update is reduced at step(), after however many passes
        self.backward_passes_per_step = passes

    def synchronize(self) -> None:
        """Nothing to wait for: the update is reduced inside ``step()`` (as in Horovod)."""

    def skip_synchronize(self) -> NoReturn:
        raise UsageError("skip_synchronize() does not apply to op=Adasum: the update, not the "
                         "gradient, is reduced inside step() (as in Horovod)")

    def step(self, closure=None):
        if not self._reduces:
            return super().step(closure)
        if self._packs is None:
            trained = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
            kinds: dict[tuple, list[torch.Tensor]] = {}
            for p in trained:
                kinds.setdefault((p.dtype, p.device), []).append(p)
            self._packs = [_Packed(ps) for ps in kinds.values()]
        with torch.no_grad():
            for pack in self._packs:
                pack.save()
        loss = super().step(closure)
        with torch.no_grad():
            for pack in self._packs:
                pack.measure()
                wire, ctx = self._compression.compress(pack.change)
                collectives.fused_adasum_(wire, pack.counts, "adasum.update", self.process_set)
                if wire is not pack.change:
                    pack.change.copy_(self._compression.decompress(wire, ctx))
            self.update_applied = all(bool(torch.isfinite(pack.change).all())
                                      for pack in self._packs)
            for pack in self._packs:
                if self.update_applied:
                    pack.apply()
                else:
                    pack.restore()
        return loss


class _Packed:
    """Parameters of one dtype and device and two flat buffers, kept from step to step: the
    values a step started from and the change it made (Adasum reduces that buffer in place).
    The per-parameter views into them are made once, not on every step."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.counts = [p.numel() for p in params]
        self.start = params[0].new_empty(sum(self.counts))
        self.change = torch.empty_like(self.start)
        bounds = [0, *itertools.accumulate(self.counts)]
        spans = list(itertools.pairwise(bounds))
        self._starts = [self.start[a:b].view_as(p) for (a, b), p in zip(spans, params,
                                                                          strict=True)]
        self._changes = [self.change[a:b].view_as(p) for (a, b), p in zip(spans, params,
                                                                            strict=True)]

    def save(self) -> None:
        for s, p in zip(self._starts, self.params, strict=True):
            s.copy_(p)

    def measure(self) -> None:
        for c, p, s in zip(self._changes, self.params, self._starts, strict=True):
            torch.sub(p, s, out=c)

    def apply(self) -> None:
        for p, s, c in zip(self.params, self._starts, self._changes, strict=True):
            torch.add(s, c, out=p)

    def restore(self) -> None:
        for p, s in zip(self.params, self._starts, strict=True):
            p.copy_(s)
