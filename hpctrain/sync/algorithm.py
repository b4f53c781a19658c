"""``sgd`` (one process) and ``ssgd`` (synchronous SGD through the Horovod-shaped API).

ssgd is what a Horovod user writes: the model broadcast from rank 0 and the optimizer wrapped
in ``DistributedOptimizer``, which allreduces gradients while backward runs (or, with
``--reduce-op adasum``, combines each rank's update by Adasum in the step). The data order is
the shuffle package's, so ssgd on K ranks with batch b sees, step by step, the same samples as
sgd with batch K*b, and takes the same steps, except for a parameter no rank's forward used:
its gradient is reduced as zeros, as Horovod does (DDP leaves it None), so weight decay and
momentum move it where sgd leaves it (README, own models). With ``--micro-batch-size``
backward runs once per micro-batch, and the wrapper's ``backward_passes_per_step``
(Horovod's gradient accumulation) starts each bucket's allreduce after the last one.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

import hpctrain.sync as hvd
from hpctrain import microbatch, model_checks, options
from hpctrain.algorithm import Algorithm, Options, Setup
from hpctrain.comm import allreduce_bytes
from hpctrain.errors import UsageError, plural
from hpctrain.guard import GradientGuard
from hpctrain.options import option
from hpctrain.sync import horovod_backend
from hpctrain.sync.buckets import default_bucket_bytes

if TYPE_CHECKING:
    from hpctrain.sync.optimizer import HorovodOptimizer


class Sequential(Algorithm):
    """Plain SGD on one process: the baseline every other algorithm is measured against."""

    name = "sgd"

    @classmethod
    def check(cls, config, ranks: int, samples: int) -> None:
        if ranks > 1:
            algo = functools.partial(options.setting, type(config), "algo")
            raise UsageError(f"{algo(config.algo)} runs on one process, not {ranks}; use "
                             f"{algo('ssgd')}")

    @classmethod
    def needs_mpi(cls, config) -> bool:
        return False

    def connect(self, world, model):
        return None


@dataclass(frozen=True)
class SynchronousOptions(Options):
    sync_backend: str = option("mpi", "allreduce through hpctrain's mpi4py backend, its "
                               "torch.distributed one (NCCL/gloo) or Horovod; under torchrun, "
                               "which starts no MPI world, mpi is torch",
                               choices=hvd.BACKENDS)
    fp16_allreduce: bool = option(False, "compress gradients to float16 on the wire")
    reduce_op: str = option("average", "how the workers' steps combine: average the "
                            "gradients, or adasum (Horovod's op=Adasum: each worker steps on its "
                            "own gradient and the changes are combined; 2^m workers)",
                            choices=("average", "adasum"))


class Synchronous(Algorithm):
    """Gradients allreduced every step; every rank applies the same update."""

    name = "ssgd"
    Options = SynchronousOptions
    options: SynchronousOptions
    thread_level = "multiple"  # Horovod's MPI controller needs MPI_THREAD_MULTIPLE
    _started = False  # whether connect() started hpctrain.sync (close() then stops it)
    summary_fields = {"allreduce_bytes_per_rank": "bytes: what one rank sent in gradient "
                                                  "allreduces, counted as a ring's: 2(K-1)/K "
                                                  "of the payload, the trainable parameters' "
                                                  "gradients in the dtype they travel in "
                                                  "(--fp16-allreduce: 2 bytes a value; sparse "
                                                  "ones, gathered, are not counted; a resized "
                                                  "run: at its last K)"}

    @classmethod
    def for_launch(cls, config, launcher: str):
        if launcher == "torchrun" and config.algorithm.sync_backend == "mpi":
            # torchrun starts no MPI world: torch.distributed is what it sets up.
            return replace(config, algorithm=replace(config.algorithm, sync_backend="torch"))
        return config

    @classmethod
    def needs_mpi(cls, config) -> bool:
        return config.algorithm.sync_backend != "torch"

    @classmethod
    def check(cls, config, ranks: int, samples: int) -> None:
        # Each option named by its flag on the command line, by its field from Python.
        o = functools.partial(options.setting, type(config.algorithm))
        if config.algorithm.sync_backend == "horovod" and importlib.util.find_spec("horovod") \
                is None:
            raise UsageError(f"{o('sync_backend', 'horovod')}: horovod is not installed; "
                             f"{horovod_backend.INSTALL}")
        if config.algorithm.sync_backend == "horovod":
            _refuse_bf16_for_horovod(config)
        else:
            default_bucket_bytes()  # HOROVOD_FUSION_THRESHOLD sizes the buckets
        if config.algorithm.reduce_op == "adasum" and ranks & (ranks - 1):
            raise UsageError(f"{o('reduce_op', 'adasum')} needs a power-of-2 number of "
                             f"workers, got {ranks}")
        if config.algorithm.reduce_op == "adasum" and config.optim.scale_lr:
            # The linear scaling rule makes up for an average over K workers; Adasum adds
            # orthogonal updates, so K x --lr made each step K times larger (Horovod's Adasum
            # guide: do not scale the learning rate by the number of workers).
            optim = functools.partial(options.setting, type(config.optim))
            raise UsageError(f"{optim('scale_lr')}: {o('reduce_op', 'adasum')} adds the "
                             "workers' orthogonal updates rather than averaging them, so the "
                             f"linear scaling rule does not apply; set {optim('lr')} itself")
        cls._check_running_backend(config, ranks)

    @staticmethod
    def _check_running_backend(config, ranks: int) -> None:
        """A script's own ``hpctrain.sync.init()`` stays up, and connect() then trains on it
        (init is idempotent): refuse one that is not the run's, here, before any collective,
        rather than a hang (its world holds the evaluating rank) or a late refusal."""
        if not hvd.is_initialized():
            return
        running, wanted = hvd.backend(), config.algorithm.sync_backend
        stop = "call hpctrain.sync.shutdown() before train()"
        o = functools.partial(options.setting, type(config.algorithm), "sync_backend")
        if config.eval_rank is not None:
            given = options.setting(type(config), "eval_rank", config.eval_rank)
            raise UsageError(f"{given}: the script's running hpctrain.sync backend spans the "
                             f"evaluating rank; {stop}")
        if running != wanted:
            raise UsageError(f"{o(wanted)}: the script's hpctrain.sync runs the {running!r} "
                             f"backend; {stop}, or give {o(running)}")
        if hvd.size() != ranks:
            raise UsageError(f"the script's running hpctrain.sync backend has size "
                             f"{hvd.size()}, the run trains on {plural(ranks, 'rank')}; {stop}")

    @property
    def adasum(self) -> bool:
        return self.options.reduce_op == "adasum"

    def label(self) -> str:
        o = self.options
        extras = [x for x, on in (("fp16 allreduce", o.fp16_allreduce), ("adasum", self.adasum))
                  if on]
        return f"{self.name} ({', '.join([f'{o.sync_backend} backend', *extras])})"

    def connect(self, world, model):
        self._started = not hvd.is_initialized()  # a script's own backend stays up
        hvd.init(world, backend=self.options.sync_backend)  # the training ranks only
        return world

    def close(self) -> None:
        # The next train() in the same script may take another backend or other ranks.
        if self._started:
            hvd.shutdown()

    @property
    def compression(self):
        """How gradients travel (``--fp16-allreduce``)."""
        return hvd.Compression.fp16 if self.options.fp16_allreduce else hvd.Compression.none

    def setup(self, s: Setup) -> None:
        super().setup(s)
        assert self.optimizer is not None  # super().setup() made it
        hvd.broadcast_parameters(s.model.state_dict(), root_rank=0)
        o = self.config.optim
        passes = microbatch.parts(o.batch_size, o.micro_batch_size)  # its backward passes
        self.optimizer = hvd.DistributedOptimizer(
            self.optimizer, named_parameters=s.model.named_parameters(),
            compression=self.compression, backward_passes_per_step=passes,
            op=hvd.Adasum if self.adasum else hvd.Average)

    def guard(self, s: Setup) -> GradientGuard:
        # The allreduced gradient is the same everywhere: all ranks skip a bad step together.
        # Adasum's gradients stay local: the ranks agree on the verdict instead.
        return GradientGuard(s.model.parameters(), self.config.max_bad_steps, s.comm,
                             reduced=not self.adasum, agree=self.adasum,
                             clip_norm=self.config.optim.clip_grad_norm)

    def checkpoint_state(self) -> tuple[dict, dict]:
        if self.adasum:  # each worker's optimizer state (momentum, Adam) follows its gradients
            return {"model": self.model}, {"optimizer": self.optimizer}
        return super().checkpoint_state()

    @property
    def _synced(self) -> HorovodOptimizer:
        """The DistributedOptimizer that setup() wrapped ``self.optimizer`` in."""
        return cast("HorovodOptimizer", self.optimizer)

    def synchronize(self) -> None:
        self._synced.synchronize()

    def apply(self) -> bool:
        if self.adasum:  # the update is reduced inside step()
            self._synced.step()
            # hpctrain's Adasum optimizer may drop a non-finite combined update; Horovod's
            # (its averaging one at size 1 too) applies every one and has no such attribute.
            return getattr(self.optimizer, "update_applied", True)
        with self._synced.skip_synchronize():  # synchronize() already waited
            self._synced.step()
        return True

    def summary(self, points: list[dict], comm) -> dict:
        assert self.model is not None  # setup() set it
        step = reduced_bytes(self.model, self.compression, sparse_too=self.adasum)
        ranks = 1 if comm is None else comm.Get_size()
        return {"allreduce_bytes_per_rank": allreduce_bytes(points[-1]["updates"] * step, ranks)}


def _refuse_bf16_for_horovod(config) -> None:
    """UsageError naming the model's first bfloat16 parameter or buffer: horovod.torch 0.28
    moves no bfloat16 tensor, so broadcasting the model raised after MPI started ("Tensor
    type torch.BFloat16Tensor is not supported", naming neither tensor nor backend)."""
    name = next((n for n, t in model_checks.build_for_data(config).state_dict().items()
                 if t.dtype == torch.bfloat16), None)
    if name is not None:
        backend = functools.partial(options.setting, type(config.algorithm), "sync_backend")
        model = options.setting(type(config.model), "name", config.model.name)
        others = "--sync-backend mpi or torch" if options.on_command_line() else \
            f"{backend()}='mpi' or 'torch'"
        bf16 = options.setting(type(config), "mixed_precision", "bf16")
        raise UsageError(f"{backend('horovod')}: {model}'s {name} is torch.bfloat16, which "
                         f"Horovod cannot broadcast or allreduce; use {others}, or a float32 "
                         f"model with {bf16}")


def reduced_bytes(model: nn.Module, compression: Any, sparse_too: bool = False) -> int:
    """Bytes one step allreduces for ``model``: each trainable parameter's gradient (a tied
    one once), in the dtype ``compression`` sends it in. A gradient that came sparse (an
    embedding's: sparse at the end of training) is gathered instead and not counted, unless
    ``sparse_too`` (Adasum combines every parameter's change densely). Counting every
    parameter at 4 bytes made a frozen backbone's, a float64 or bf16 model's and a sparse
    one's figure wrong."""
    return sum(p.numel() * compression.wire_dtype(p.dtype).itemsize
               for p in model.parameters() if p.requires_grad
               and (sparse_too or p.grad is None or not p.grad.is_sparse))
