"""``asgd``, ``dcasgd-c``, ``dcasgd-a`` and ``ssp``: asynchronous training on the RMA store.

Every worker runs the one training loop over its own part of the data (replicated placement,
the shuffle package's order, local epochs at its own pace) and pushes after every batch. The
run makes exactly ``--epochs`` worth of updates (all workers together; a partial last batch
counts as one): before each step a worker claims a ticket from a global counter
(``ParameterStore.claim``) and stops once the tickets reach the budget, so fast workers do more
of the work and none pushes past the budget. A checkpoint mark works the same way: a worker
whose ticket is at or past it waits at a barrier until the others are there too, by which
time exactly the updates before the mark are in. SIGUSR1 closes the counter
(:meth:`ASGD.close_tickets`): every worker's next claim brings it to a checkpoint of the
updates claimed so far, and the run stops. The learning-rate schedule follows the
same global count. Rank 0 snapshots its model (the newest global values it read); snapshots
are scored after training.

``--momentum`` gives each worker a velocity of its own (compensated) steps, which it pushes,
as the DC-ASGD authors' MXNet optimizer does (the learning rate inside the velocity: torch's
SGD in a Hogwild run matches it at a constant rate only); ``--momentum 0`` is the paper's
algorithm exactly.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from hpctrain import comm as hcomm
from hpctrain import devices, kernels, model_checks, options, watchdog
from hpctrain.algorithm import Algorithm, Comm, Options, Setup
from hpctrain.async_ import shm
from hpctrain.async_.optim import ASGD as ASGDOptimizer
from hpctrain.async_.optim import DCASGD as DCASGDOptimizer
from hpctrain.async_.optim import DEFAULT_LAM, trainable
from hpctrain.async_.ssp import StalenessBound
from hpctrain.async_.store import CLOSED, CONSISTENCIES, ParameterStore, max_shards
from hpctrain.checkpoint import stop
from hpctrain.checkpoint.resize import fold, mean_tensors
from hpctrain.errors import UsageError, plural
from hpctrain.metrics import Tally
from hpctrain.options import HUGE, Range, option

if TYPE_CHECKING:
    from hpctrain.checkpoint.folder import Loaded
    from hpctrain.config import RunConfig


@dataclass(frozen=True)
class StoreOptions(Options):
    servers: int = option(0, "ranks that only host the model (the last N); 0: all ranks host "
                          "shards and train (one node)", parse=int, range=Range(0))
    consistency: str = option("locked", "locked (exclusive lock per shard, serialisable) or "
                              "atomic (Accumulate of the delta, element-wise atomic)",
                              choices=CONSISTENCIES)
    shards: int | None = option(None, "number of model shards (default: one per worker at "
                                "least)", parse=int)


@dataclass(frozen=True)
class ConstantOptions(StoreOptions):
    lam: float | None = option(None, "DC-ASGD's lambda0 (default 0.04 for dcasgd-c, 2.0 for "
                               "dcasgd-a)", parse=float, range=Range(0))

    def __post_init__(self) -> None:
        super().__post_init__()
        # A factor, so at most HUGE as the others: 1e300 reached the float32 kernel as inf.
        # (Not in the Range: its "must be >= 0" for a negative or NaN lambda is kept.)
        if self.lam is not None and self.lam > HUGE:
            raise UsageError(f"{options.setting(type(self), 'lam', self.lam)} must be in "
                             f"[0, {HUGE:g}]")


@dataclass(frozen=True)
class AdaptiveOptions(ConstantOptions):
    ms_decay: float = option(0.95, "decay of the mean square of the gradient", parse=float,
                             range=Range(0, 1, high_open=True))


@dataclass(frozen=True)
class SSPOptions(StoreOptions):
    max_staleness: int = option(3, "clocks (pushes) a worker may run ahead of the slowest "
                                "running worker before it waits", parse=int, range=Range(0))


def _model_size(config) -> int:
    """The number of values the store holds for the model and data set (one test sample
    read): the trainable parameters of a built-in model or the user's, which must be float32
    (the store's windows and the compensation kernel are; found after MPI started, else)."""
    model = model_checks.build_for_data(config)
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            run = functools.partial(options.setting, type(config))
            given = options.setting(type(config.model), "name", config.model.name)
            raise UsageError(f"{given}: parameter {name} is {p.dtype}; "
                             f"{run('algo', config.algo)} keeps the model in float32 (train "
                             f"it in float32, with {run('mixed_precision')} for lower "
                             "precision)")
    return sum(p.numel() for p in trainable(model))


class ASGD(Algorithm):
    """Asynchronous SGD: ``w <- w - lr * g`` pushed into the store without waiting."""

    name = "asgd"
    Options = StoreOptions
    options: StoreOptions
    # Set by setup(), on the workers only, before the hooks that read them run.
    optimizer: ASGDOptimizer
    workers_comm: Comm
    ticket: int | None  # the update claimed and not yet pushed
    # Momentum hurts here (each worker's velocity keeps acting on the shared model, and
    # asynchrony adds momentum of its own); the DC-ASGD paper's algorithm has none.
    defaults = {"lr": 0.1, "momentum": 0.0}
    snapshots = "root"
    lock_step = False
    optimizers = ("sgd",)  # the update is the store's push (DC-ASGD's rule), not torch's
    summary_fields = {
        "servers": "ranks that only hosted the store",
        "consistency": "locked or atomic pushes",
        "shards": "model shards in the store",
        "shared_windows": "whether the store's windows were shared memory (all ranks on one "
                          "node), read and written without MPI calls",
        "lam": "DC-ASGD's lambda0 (0 for asgd and ssp)",
        "ms_decay": "dcasgd-a's mean-square decay (else null)",
        "staleness": "updates: per push, the other workers' updates its model lacked "
                     "(locked: exact, the most any shard took between the worker's read of it "
                     "and the push; atomic: the pushes finished since the worker's previous "
                     "push or pull, off by those in flight) (mean, p50, p90, p99, max, count). "
                     "The mean is (atomic) set by the push counts, not the timing (about, "
                     "never above, M-1 for M workers); locked's exceeds that where pushes "
                     "overlapped shard by shard: p90, p99 and max tell runs apart",
        "pushes_per_worker": "pushes each worker made (a skipped NaN step pushes nothing)",
        "store_bytes_per_worker": "bytes: model payload a worker read from and wrote to the "
                                  "store, mean over workers (a resumed run: since its resume; "
                                  "the counts above cover the whole run)",
        "store_mpi_bytes_per_worker": "bytes: the part of it MPI calls moved (none on "
                                      "shared-memory windows)",
        "store_traffic_per_worker": "bytes: read, written and mpi, per worker",
    }

    @classmethod
    def check(cls, config: RunConfig, ranks: int, samples: int) -> None:
        o = cast(StoreOptions, config.algorithm)  # cls.Options's
        # Each option named by its flag on the command line, by its field from Python.
        given = functools.partial(options.setting, type(o))
        run = functools.partial(options.setting, type(config))
        if not 0 <= o.servers < ranks:
            raise UsageError(f"{given('servers', o.servers)} with {plural(ranks, 'rank')}: "
                             "need 0 <= servers < ranks (at least one worker)")
        numel = _model_size(config)
        if o.shards is not None:
            most, why = max_shards(hcomm.library_version(), ranks)
            if not 1 <= o.shards <= min(numel, most):
                raise UsageError(f"{given('shards', o.shards)} is outside "
                                 f"[1, {min(numel, most)}]: at "
                                 f"most one shard per parameter of {config.model.name} "
                                 f"({numel} parameters), and {most} in all ({why})")
        # The compiled libraries a push needs: CPU workers' kernel and the shared-memory locks
        # (on one node), GPU workers' CUDA kernel.
        needed = [kernels.cpu_library, shm.library]
        if devices.resolve(config.device) == "cuda":
            needed.append(kernels.cuda_library)
        for library in needed:
            try:
                library()
            except (RuntimeError, OSError) as e:
                raise UsageError(f"{run('algo', config.algo)} with "
                                 f"{run('device', config.device)}: {e}") from None
        if config.data.data_placement != "replicated":
            placement = options.setting(type(config.data), "data_placement", "replicated")
            raise UsageError(f"{run('algo', config.algo)} needs {placement}: sharded "
                             "placement serves lock-step algorithms (its global and partial "
                             "shuffles exchange data collectively each epoch, which would make "
                             "the asynchronous workers wait for each other; its local shuffle, "
                             "which exchanges nothing, is not supported for them either)")

    @classmethod
    def workers(cls, config: RunConfig, ranks: int) -> int:
        return ranks - cast(StoreOptions, config.algorithm).servers

    def lam(self) -> float:
        return 0.0

    def resolved_options(self) -> dict:
        shards = getattr(getattr(self, "store", None), "shards", None)
        return {"shards": shards} if self.options.shards is None and shards else {}

    def label(self) -> str:
        o = self.options
        return f"{self.name} ({o.consistency}, {self.store.shards} shards, {o.servers} servers)"

    def per_epoch(self, steps: int, workers: int) -> int:
        return steps * workers  # every worker's push is a global update

    def restore_model(self, loaded: Loaded | None) -> None:
        self._loaded = loaded

    def connect(self, world: Comm, model: torch.nn.Module) -> Comm | None:
        loaded = getattr(self, "_loaded", None)
        if loaded is not None:  # the store starts from rank 0's values: the checkpoint's
            model.load_state_dict(loaded.payload["shared"]["model"])
        o = self.options
        self.store = ParameterStore(trainable(model), world, servers=o.servers, shards=o.shards,
                                    consistency=o.consistency)
        return self.store.worker_comm

    def is_worker(self) -> bool:
        return self.store.is_worker

    def make_optimizer(self, model: torch.nn.Module) -> ASGDOptimizer:
        o = self.config.optim
        # The run's config is resolved (config.resolve) and sgd's, the one optimizer here.
        assert o.lr is not None and o.momentum is not None
        return ASGDOptimizer(model, self.store, lr=o.lr, momentum=o.momentum,
                             weight_decay=o.weight_decay)

    def setup(self, s: Setup) -> None:
        self.model = s.model
        self.optimizer = self.make_optimizer(s.model)
        assert s.comm is not None  # a worker's: the store's worker_comm
        self.workers_comm = s.comm
        self.base, self.ticket, self._finished = 0, None, False
        self.total = self.config.optim.epochs * self.per_epoch(s.steps, s.workers)  # the loop's

    def checkpoint_state(self) -> tuple[dict, dict]:
        return {"model": self.model}, {"opt": self.optimizer}

    def resize_state(self, parts: list[dict], workers: int, position: int) -> list[dict]:
        """Resumed on another number of workers: DC-ASGD-a's mean squares (each an estimate of
        the same gradient statistics) are averaged for every worker; a worker keeps the
        velocity of the old worker of its rank (its own steps, all pushed), a new one starts
        at rest; the staleness tallies are folded (merged) so that the summary counts every
        push. A checkpoint from before tallies holds lists: they are read as tallies."""
        opts = [p["opt"] for p in parts]
        ms = [o["worker"]["ms"] for o in opts]
        mean_ms = None if ms[0] is None else mean_tensors(ms)
        staleness = fold([Tally.of(o["worker"]["staleness"]) for o in opts], workers)
        out = []
        for j in range(workers):
            opt = opts[j % len(opts)]
            v = opt["worker"]["v"]
            if v is not None and j >= len(opts):
                v = torch.zeros_like(v)
            worker = {"ms": mean_ms, "v": v, "staleness": Tally.merged(staleness[j]).state()}
            out.append({**parts[j % len(parts)], "opt": {**opt, "worker": worker}})
        return out

    def start(self, position: int) -> None:
        self.base = position  # the store counts the updates of this process only

    def claim(self, position: int) -> int:
        if self.ticket is None:
            ticket = self.store.claim()
            self.ticket = stop.CLOSED if ticket >= CLOSED else self.base + ticket
        return self.ticket

    def close_tickets(self) -> bool:
        """SIGUSR1 on rank 0: no more tickets, unless the budget's are all out (False)."""
        return self.store.close_tickets(self.total - self.base)

    def progress(self, position: int, applied: bool) -> int:
        if not applied:  # a skipped step pushes nothing: the ticket stays for the next batch
            return self.base + self.store.updates()
        self.ticket = None
        push = self.optimizer.last_push
        assert push is not None  # an applied step pushed
        return self.base + push.index + 1

    def before_checkpoint(self, position: int) -> int | None:
        # Every ticket below the mark is claimed, each by a worker that pushes it before it
        # claims again, and every worker stops here with its first ticket past the mark:
        # after the agreement exactly the mark's updates are in, none past it. All continue
        # from the global model, as a run resumed from this checkpoint does.
        if self._finishing(False):
            return None
        return self.base + self.optimizer.pull()

    def finish(self, position: int) -> int:
        if not self._finished:  # else agreed at a checkpoint mark already
            self._finishing(True)  # every push is in
        return self.base + self.optimizer.pull()

    def _finishing(self, mine: bool) -> bool:
        """The workers' one collective at a checkpoint mark (``mine`` False) and at the end
        (True): whether any of them is finishing. A worker that stopped early (rank 0 saw a
        collapse) meets those waiting at a mark in this same call, and they end with it,
        where two barriers matched each other and left them in different collectives."""
        # allgather, not an allreduce: the simulator's workers talk through a LocalComm, and
        # the answer is the same. With --compile another worker's step here may be compiling
        # (its short last batch): the wait for it has a compile's allowance.
        with watchdog.busy("waiting for the other workers' steps") if self.config.compile \
                else contextlib.nullcontext():
            self._finished = any(self.workers_comm.allgather(mine))
        return self._finished

    def summary(self, points: list[dict], comm) -> dict:
        store, opt = self.store, self.optimizer
        # The tally's counts, not every push's: a long run's gather stays small.
        mine = {"staleness": opt.staleness.state(),
                "traffic": {"read": store.bytes_read, "written": store.bytes_written,
                            "mpi": store.mpi_bytes}}
        every = comm.gather(mine, root=0)
        if comm.Get_rank() != 0:
            return {}
        size = len(every)
        stale = [Tally.of(w["staleness"]) for w in every]
        o = self.options
        return {
            "servers": o.servers,
            "consistency": o.consistency,
            "shards": store.shards,
            "shared_windows": store.shared,
            "lam": self.lam(),
            "ms_decay": getattr(o, "ms_decay", None),
            "staleness": Tally.merged(stale).distribution(),
            "pushes_per_worker": [len(t) for t in stale],
            "store_bytes_per_worker": round(sum(w["traffic"]["read"] + w["traffic"]["written"]
                                                for w in every) / size),
            "store_mpi_bytes_per_worker": round(sum(w["traffic"]["mpi"] for w in every) / size),
            "store_traffic_per_worker": [w["traffic"] for w in every],
        }

    def close(self) -> None:
        self.store.finish()
        self.store.close()


class DCASGDConstant(ASGD):
    """DC-ASGD-c: the stale gradient corrected by ``lam0 * g*g*(w - w_bak)``."""

    name = "dcasgd-c"
    Options = ConstantOptions
    options: ConstantOptions
    adaptive = False

    def lam(self) -> float:
        if self.options.lam is not None:
            return self.options.lam
        return DEFAULT_LAM["adaptive" if self.adaptive else "constant"]

    def resolved_options(self) -> dict:
        return {**super().resolved_options(),
                **({"lam": self.lam()} if self.options.lam is None else {})}

    def make_optimizer(self, model: torch.nn.Module) -> DCASGDOptimizer:
        o = self.config.optim
        # The run's config is resolved (config.resolve) and sgd's, the one optimizer here.
        assert o.lr is not None and o.momentum is not None
        return DCASGDOptimizer(model, self.store, lr=o.lr, lam=self.lam(),
                               adaptive=self.adaptive,
                               ms_decay=getattr(self.options, "ms_decay", 0.95),
                               momentum=o.momentum, weight_decay=o.weight_decay)


class DCASGDAdaptive(DCASGDConstant):
    """DC-ASGD-a: ``lam0`` divided by the root of the gradient's running mean square."""

    name = "dcasgd-a"
    Options = AdaptiveOptions
    options: AdaptiveOptions
    adaptive = True


class SSP(ASGD):
    """Stale synchronous parallel (Ho et al., 2013): asgd whose workers never run more than
    ``--max-staleness`` clocks (pushes) ahead of the slowest running one."""

    name = "ssp"
    Options = SSPOptions
    options: SSPOptions
    summary_fields = {
        **ASGD.summary_fields,
        "max_staleness": "the bound S, in clocks (pushes)",
        "ssp_waits_per_worker": "times each worker waited for the slowest",
        "ssp_wait_s_per_worker": "seconds each worker waited",
        "ssp_max_gap": "clocks: the largest lead over the slowest seen when a worker went on "
                       "(never above S)",
    }

    def label(self) -> str:
        return f"{self.name} (S={self.options.max_staleness}, {self.options.consistency})"

    def connect(self, world: Comm, model: torch.nn.Module) -> Comm | None:
        workers = super().connect(world, model)
        self.bound = StalenessBound(self.store, self.options.max_staleness,
                                    patient=self.config.compile)
        return workers

    def setup(self, s: Setup) -> None:
        super().setup(s)
        # Every running worker's first ``_covered`` pushes are in this worker's model: those
        # counted when it last left a wait, which its push or pull after that read (_wait).
        self._covered = 0

    def _wait(self) -> None:
        """The bound's wait, then SSP's read guarantee (Ho et al. 2013): a worker with clock
        ``c`` computes its next gradient at a model holding every running worker's first
        ``c - S`` pushes. The wait makes them all counted; the model from this worker's last
        push holds those counted when it left its previous wait (``_covered``), so it is read
        again from the store (``pull``: the model, w_bak and the staleness baseline) when that
        falls short: after a wait that slept, or after a previous wait left at the full lead
        S (with S = 0, every step; with S large, never)."""
        bound = self.bound
        bound.wait()
        if self._covered < bound.clock - self.options.max_staleness:
            self.optimizer.pull()
        self._covered = bound.clock - bound.last_gap  # the slowest running clock just read

    def claim(self, position: int) -> int:
        if self.ticket is None:  # wait before claiming: a held ticket never waits on others
            self._wait()
        ticket = super().claim(position)
        if ticket >= self.total and not self.bound.parked:
            # Out of budget: this worker pushes no more, so it parks now, not in finish().
            # Between the loop and finish() it may block (--stop-on-collapse's signal waits
            # for rank 0), and a worker S clocks ahead of its last clock would wait for it
            # forever: a hang at the end of the run.
            self.bound.park()
        return ticket

    def progress(self, position: int, applied: bool) -> int:
        if applied:
            self.bound.tick()
        return super().progress(position, applied)

    def before_checkpoint(self, position: int) -> int | None:
        self.bound.park()  # a worker at the barrier must not hold back those still pushing
        seen = super().before_checkpoint(position)
        if seen is None:  # finishing, parked
            return None
        self.bound.unpark()
        self.workers_comm.Barrier()  # all unparked before anyone steps: the bound holds again
        return seen

    def after_checkpoint(self) -> None:
        # A worker may hold a ticket across the checkpoint, claimed without waiting: its last
        # wait passed while a slower worker was parked at the barrier (left out of the
        # minimum), so it could now push S + 1 clocks ahead of that one. Wait here, not in
        # before_checkpoint: the save after it is collective, and the slower worker's push
        # that ends this wait comes after the save. Every worker is unparked (Barrier above)
        # and the slowest passes at once, so the minimum moves on: no deadlock.
        # ``_covered`` came from that last wait, which left the parked worker out: the model
        # (the mark's pull) may lack its pushes, so none is taken as covered, and the wait
        # reads the store again wherever the bound asks for a push (clock > S).
        super().after_checkpoint()
        self._covered = 0
        self._wait()

    def finish(self, position: int) -> int:
        if not self.bound.parked:  # stopped early (--stop-on-collapse): not parked in claim
            self.bound.park()
        return super().finish(position)

    def checkpoint_state(self) -> tuple[dict, dict]:
        shared, per_rank = super().checkpoint_state()
        return shared, {**per_rank, "ssp": self.bound}

    def resize_state(self, parts: list[dict], workers: int, position: int) -> list[dict]:
        """As asgd, and every clock starts level, at the slowest old worker's: the bound
        holds differences, and a new worker at 0 would stop the others until it caught up.
        Waits are folded like the staleness records."""
        out = super().resize_state(parts, workers, position)
        clock = min(p["ssp"]["clock"] for p in parts)
        for j, mine in enumerate(fold([p["ssp"] for p in parts], workers)):
            out[j]["ssp"] = {"clock": clock, "waits": sum(s["waits"] for s in mine),
                             "wait_s": sum(s["wait_s"] for s in mine),
                             "max_gap": max((s["max_gap"] for s in mine), default=0)}
        return out

    def summary(self, points: list[dict], comm) -> dict:
        stats = comm.gather(self.bound.summary(), root=0)
        out = super().summary(points, comm)
        if comm.Get_rank() != 0:
            return {}
        return {**out, "max_staleness": self.options.max_staleness,
                "ssp_waits_per_worker": [s["ssp_waits"] for s in stats],
                "ssp_wait_s_per_worker": [s["ssp_wait_s"] for s in stats],
                "ssp_max_gap": max(s["ssp_max_gap"] for s in stats)}

    def close(self) -> None:
        self.store.finish()
        self.bound.close()
        self.store.close()
