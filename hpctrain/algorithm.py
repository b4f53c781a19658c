"""The protocol an algorithm implements to run in the one training loop (:mod:`hpctrain.run`).

Like DDP's communication hooks, an algorithm is a small class that the loop calls at fixed
points; the loop owns everything else (seed, data, model, the step sequence, snapshots,
checkpoints, evaluation, outputs). A subclass declares:

- ``name``, its ``Options`` (a frozen dataclass whose fields are declared with
  :func:`hpctrain.options.option`: flag, type, default, help, range), ``defaults`` for the
  shared optimisation options it sets differently (``lr``, ``momentum``), the MPI
  ``thread_level`` it needs, how its ``snapshots`` are taken, whether it ``averages_updates``
  over the workers (``--scale-lr``) and the ``summary_fields`` it adds (name -> unit and
  meaning, for ``docs/SUMMARY.md`` and the report);
- class-level checks that need the launch's world (:meth:`check`, before MPI starts);
- per-run hooks, in the order the loop calls them: :meth:`restore_model` and :meth:`connect`
  (communication), :meth:`setup` (its optimizer or aggregator), :meth:`guard`,
  :meth:`checkpoint_state` (and :meth:`resize_state` when a checkpoint of another number of
  workers is resumed), :meth:`start`, :meth:`epoch_started` at each epoch of local data;
  per step :meth:`claim`, :meth:`losses` (by default :meth:`loss` per micro-batch),
  :meth:`synchronize`, :meth:`apply` (unless the NaN
  guard skips it), :meth:`progress`, :meth:`after_update`; :meth:`before_checkpoint` /
  :meth:`after_checkpoint` around a checkpoint; :meth:`finish` after the last step; then
  :meth:`evaluate`, :meth:`write_outputs`, :meth:`summary` and :meth:`close`.

The defaults are those of a lock-step algorithm (every worker makes the same number of
updates, together): a plain synchronous loop needs only ``setup``. One with ``lock_step``
False defines :meth:`per_epoch`, :meth:`claim`, :meth:`progress`, :meth:`close_tickets`,
:meth:`before_checkpoint` and :meth:`finish` (``registry.NOT_LOCK_STEP_HOOKS``, checked).
Registration: one line in :mod:`hpctrain.registry`, or none for a user's own (``--algo
./mine.py:Mine``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch.nn import functional as F

from hpctrain.checkpoint import resize
from hpctrain.evaluate import Snapshot, evaluate_snapshots
from hpctrain.guard import GradientGuard
from hpctrain.microbatch import mean_in_parts
from hpctrain.optimizers import OPTIMIZERS
from hpctrain.optimizers import make as make_optimizer
from hpctrain.options import check_fields

if TYPE_CHECKING:
    from hpctrain.checkpoint.folder import Loaded
    from hpctrain.config import RunConfig
    from hpctrain.data import Dataset
    from hpctrain.metrics import RunLog
    from hpctrain.shuffle import TrainData


def _defined_by(cls: type, attribute: str) -> type:
    """The class in ``cls``'s method resolution order that defines ``attribute``."""
    return next(c for c in cls.__mro__ if attribute in vars(c))


class Comm(Protocol):
    """A communicator as the loop hands it to an algorithm: an mpi4py ``Comm`` under MPI, or
    one with its methods (torchrun's :class:`hpctrain.torch_comm.TorchComm`, ``hpctrain
    simulate``'s :class:`hpctrain.sim.comm.LocalComm`); an algorithm uses what it needs."""

    def Get_rank(self) -> int: ...  # noqa: N802 (mpi4py's names)

    def Get_size(self) -> int: ...  # noqa: N802

    # The object collectives each of them has (checkpoints, summaries, agreements).
    def Barrier(self) -> None: ...  # noqa: N802

    def bcast(self, obj: Any, root: int = 0) -> Any: ...

    def gather(self, obj: Any, root: int = 0) -> list | None: ...

    def allgather(self, obj: Any) -> list: ...


@dataclass(frozen=True)
class Options:
    """Base of an algorithm's options: checked when built, as the run's sections are."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class NoOptions(Options):
    """An algorithm without options of its own."""


@dataclass
class Setup:
    """What the loop built for an algorithm's :meth:`Algorithm.setup`."""

    model: torch.nn.Module
    train_data: TrainData
    comm: Comm | None  # the workers' communicator (None: one process)
    workers: int
    steps: int  # this worker's batches per epoch of its data

    @property
    def device(self) -> torch.device:
        """Where the model is, and where batches go (:func:`hpctrain.run.device_for`)."""
        return next(self.model.parameters()).device


class Algorithm:
    """Base class and protocol of a training algorithm (see the module docstring)."""

    name: ClassVar[str]
    Options: ClassVar[type[Options]] = NoOptions
    thread_level: ClassVar[str] = "serialized"  # MPI thread level (Horovod needs "multiple")
    defaults: ClassVar[dict] = {}  # shared optimisation options it sets differently
    # "replicated": every rank holds the same model and snapshots it; "per_rank": each its own
    # (ma, ec); "root": rank 0 snapshots, the others receive them for evaluation (async).
    snapshots: ClassVar[str] = "replicated"
    # Every worker makes the same updates, together (the hooks' defaults); False: workers run
    # on their own and count global progress (asynchronous algorithms, their own per_epoch).
    lock_step: ClassVar[bool] = True
    # Each update applies the workers' gradients (or models) averaged over their batches, so
    # that --scale-lr's linear scaling rule applies; False: every worker steps its own model
    # on its own batch (ec's members, distilled but never averaged). Not lock-step: never.
    averages_updates: ClassVar[bool] = True
    summary_fields: ClassVar[dict[str, str]] = {}
    optimizers: ClassVar[tuple[str, ...]] = OPTIMIZERS  # the --optimizer values it takes

    # ---- before MPI starts ------------------------------------------------------------------

    @classmethod
    def check(cls, config: RunConfig, ranks: int, samples: int) -> None:
        """Refuse ``config`` on ``ranks`` ranks training on ``samples`` samples (the data
        set's, or a simulation's subset) with a UsageError, one line, before MPI starts."""

    @classmethod
    def for_launch(cls, config: RunConfig, launcher: str) -> RunConfig:
        """``config`` adapted to how the job was launched (``hpctrain.comm.launcher()``)."""
        return config

    @classmethod
    def needs_mpi(cls, config: RunConfig) -> bool:
        """Whether it moves data through MPI (RMA windows, buffer collectives): then a launch
        without an MPI world (torchrun) is refused."""
        return True

    @classmethod
    def workers(cls, config: RunConfig, ranks: int) -> int:
        """How many of ``ranks`` train (the others serve)."""
        return ranks

    # ---- one run ----------------------------------------------------------------------------

    def __init__(self, config: RunConfig) -> None:
        assert config.algorithm is not None  # RunConfig.__post_init__ fills in the defaults
        self.config = config
        # This run's instance of ``Options``: a subclass redeclares the attribute with its own
        # class (``options: StoreOptions``), so that reading its fields type-checks.
        self.options: Options = config.algorithm
        self.optimizer: torch.optim.Optimizer | None = None
        self.model: torch.nn.Module | None = None

    def label(self) -> str:
        """The run's name in tables and plots (after :meth:`setup`)."""
        return self.name

    def resolved_options(self) -> dict:
        """The values this run took for its options left None (``tau`` 20, a store's
        ``shards``), once :meth:`setup` has run: config.json records them in ``run_info``'s
        ``resolved``, as the table keeps None (a repeat resolves them anew: ``shards``
        follows the workers). None by default."""
        return {}

    def connect(self, world: Comm, model: torch.nn.Module) -> Comm | None:
        """Set up communication (``model`` is rank 0's initial model); return the workers'
        communicator (None: one process)."""
        return world

    def per_epoch(self, steps: int, workers: int) -> int:
        """Updates in one epoch of the data: lock-step algorithms update all workers at once."""
        return steps

    def is_worker(self) -> bool:
        """False on a rank that only serves (async's dedicated store hosts): it goes straight
        to :meth:`close`, which serves until the workers are done."""
        return True

    def setup(self, s: Setup) -> None:
        """Build the optimizer (and aggregator) for ``s.model``; the default is torch's SGD,
        or Adam / AdamW (``--optimizer``). An override sets ``self.optimizer`` to a torch
        optimizer: the loop sets its learning rate and zeroes its gradients."""
        self.model = s.model
        self.optimizer = make_optimizer(s.model.parameters(), self.config.optim)

    def guard(self, s: Setup) -> GradientGuard:
        """The NaN/Inf guard: each worker skips its own bad steps by default."""
        return GradientGuard(s.model.parameters(), self.config.max_bad_steps, s.comm,
                             clip_norm=self.config.optim.clip_grad_norm)

    def restore_model(self, loaded: Loaded | None) -> None:
        """With ``--resume``, before :meth:`connect`: rank 0's loaded checkpoint (async
        algorithms start the store from its model); nothing by default."""

    def start(self, position: int) -> None:
        """Training starts, or resumes, at global progress ``position``."""

    def close_tickets(self) -> bool:
        """Not lock-step only (``lock_step`` False): SIGUSR1 on rank 0 ends the handing out
        of updates, so that every worker's next :meth:`claim` is ``stop.CLOSED``; False when
        every one was out already."""
        raise NotImplementedError(f"{type(self).__name__} is not lock-step (lock_step = False) "
                                  "and must define close_tickets()")

    def checkpoint_state(self) -> tuple[dict, dict]:
        """``(shared, per_rank)`` objects with ``state_dict``/``load_state_dict``: shared ones
        are the same on every worker (saved from rank 0), per-rank ones each worker's own."""
        return {"model": self.model, "optimizer": self.optimizer}, {}

    def resize_state(self, parts: list[dict], workers: int, position: int) -> list[dict]:
        """Resuming on another number of workers: the per-rank states of
        :meth:`checkpoint_state` that the checkpoint's ``len(parts)`` workers saved, made into
        ``workers`` states for a run that goes on at global progress ``position``
        (:mod:`hpctrain.checkpoint.resize` has the loop's own rules). By default new worker
        ``j`` takes old worker ``j mod len(parts)``'s: growing copies a worker's state to
        others, shrinking drops workers ``workers..len(parts)-1``'s. Override it for state that
        must be neither copied nor dropped (an error-feedback residual, applied once per copy;
        a count). A user's class that keeps this default while its per-rank states differ
        gets one warning line on rank 0 saying what happened
        (:func:`hpctrain.checkpoint.resize.default_rule_warning`)."""
        cls = type(self)
        # Quiet for the built-in algorithms that keep the default, which is right for them:
        # sgd runs on one process (never resized); ssgd's per-rank state is none, or with
        # Adasum each worker's optimizer momentum, which a new worker may start from a copy
        # of (a running mean of gradients like any worker's, not a debt paid once as a
        # residual is). So it warns only where checkpoint_state is a user's (a user's
        # subclass of ssgd that adds no per-rank state of its own is quiet too); an
        # override that calls this one has a rule of its own and is quiet as well.
        if _defined_by(cls, "resize_state") is Algorithm and \
                not _defined_by(cls, "checkpoint_state").__module__.startswith("hpctrain."):
            resize.warn_default_rule(cls.__name__, parts, workers)
        return [parts[j % len(parts)] for j in range(workers)]

    def epoch_started(self, local: Dataset) -> None:
        """This worker's data for the epoch that starts now (EC relabels from it). Valid
        until the next epoch starts: the next epoch's samples are gathered into the same
        buffers (:class:`~hpctrain.shuffle.TrainData`), so copy what must outlive it."""

    def claim(self, position: int) -> int:
        """The index of the update this worker makes next (lock-step: ``position``, the
        updates done; async: a ticket from the global counter). The loop stops at the budget."""
        return position

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of the batch ``x``, ``y``: a scalar floating-point tensor computed
        from ``self.model``."""
        assert self.model is not None  # setup() set it
        return F.cross_entropy(self.model(x), y)

    def losses(self, x: torch.Tensor, y: torch.Tensor,
               size: int | None) -> Iterator[torch.Tensor]:
        """The step's loss in parts of at most ``size`` samples (``--micro-batch-size``) whose
        sum is the step's loss; the loop runs backward on each as it comes."""
        return mean_in_parts(self._scalar_loss, x, y, size)

    def _scalar_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:meth:`loss`, refused unless backward can start from it: a per-sample loss or an
        integer stopped the first step with torch's message, which names no loss()."""
        loss = self.loss(x, y)
        if isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point() \
                and loss.requires_grad:
            return loss
        if not isinstance(loss, torch.Tensor):
            got = f"a {type(loss).__name__}"
        elif loss.dim() != 0:
            got = f"a tensor of shape {tuple(loss.shape)} (per-sample losses? take their mean)"
        elif not loss.is_floating_point():
            got = f"a {loss.dtype} tensor"
        else:
            got = "a tensor with no gradient path to self.model (detached?)"
        raise TypeError(f"{type(self).__name__}.loss() must return the batch's mean loss, a "
                        f"scalar floating-point tensor computed from self.model, not {got}")

    def synchronize(self) -> None:
        """Complete the gradient (ssgd: finish its allreduce) before the NaN guard sees it."""

    def apply(self) -> bool:
        """Take the step (the guard found the gradient finite); False where it was not
        applied after all (ssgd with Adasum: the combined update was not finite)."""
        assert self.optimizer is not None  # setup() set it
        self.optimizer.step()
        return True

    def progress(self, position: int, applied: bool) -> int:
        """Global progress (updates) after this worker's step at ``position``."""
        return position + 1

    def after_update(self, final: bool) -> None:
        """After every step, applied or skipped (MA and EC aggregate here)."""

    def before_checkpoint(self, position: int) -> int | None:
        """Make the workers' state consistent for a checkpoint; the position it is of, or None
        when another worker is finishing (an async run stopped early): no checkpoint, and
        this worker ends its loop too."""
        return position

    def after_checkpoint(self) -> None:
        """Continue after a checkpoint."""

    def finish(self, position: int) -> int:
        """After the last step (collective over the workers): the final global update count.
        Lock-step algorithms leave the model as the last step left it (async: the store's)."""
        return position

    def evaluate(self, model: torch.nn.Module, snapshots: list[Snapshot], test_set: Dataset,
                 comm: Comm | None) -> list[dict]:
        """One curve point per snapshot (``test_acc`` and ``test_loss`` of the run's model)."""
        return evaluate_snapshots(model, snapshots, test_set, comm)

    def write_outputs(self, log: RunLog, snapshots: list[Snapshot], comm: Comm | None) -> None:
        """Files beyond the shared ones (EC's ``ensemble.pt``); collective over the workers."""

    def summary(self, points: list[dict], comm: Comm | None) -> dict:
        """The algorithm's own summary fields (collective over the workers)."""
        return {}

    def close(self) -> None:
        """Free communication resources (collective over all ranks)."""
