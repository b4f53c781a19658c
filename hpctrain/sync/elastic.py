"""``hvd.elastic`` on hpctrain's backends (mpi, torch): Horovod Elastic's state, kept by restarts.

Horovod Elastic keeps a job running while hosts come and go: ``horovodrun`` re-forms the
workers and each rolls back to its last ``state.commit()`` in memory. A job under ``mpirun``,
``srun`` or ``torchrun`` has a fixed size and ends when a worker dies, so here the launcher
starts it again (``torchrun --max-restarts``, ``--nnodes MIN:MAX``, a requeued Slurm job, a
new ``mpirun`` on another number of ranks) and :func:`run` brings the state back:

- With ``HPCTRAIN_ELASTIC_DIR`` set, rank 0 also writes every commit to that folder, in a
  thread while training goes on (one file per state, replaced atomically, with a checksum);
  an error, a stall timeout or a SIGTERM ending rank 0 first lets that write finish (at most
  ``FINISH_S``).
  :func:`run` starts from it when it is there: rank 0 reads it, every rank gets it in the
  first sync, and the reset callbacks run, as after a reset in Horovod (the learning rate
  follows the new size). Without the variable commits stay in memory, as in Horovod, and a
  restarted job starts over.
- ``commit()`` never raises ``HostsUpdatedInterrupt``: hosts do not change inside a job.
  :func:`run` still handles one the script raises, as Horovod's does.
- :class:`~hpctrain.sync.errors.HorovodInternalError` is not caught: here it is a usage error
  (collectives called in different orders, or after ``shutdown()``) that a retry would
  repeat, not a lost worker. An MPI or torch.distributed failure ends the job; the restart
  resumes from the last commit.

The same script runs on Horovod: with ``init(backend="horovod")`` ``hvd.elastic`` is Horovod's.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import os
import pickle
import random
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from hpctrain.checkpoint.format import CorruptCheckpoint, encode_parts, load
from hpctrain.errors import UsageError
from hpctrain.metrics import write_atomic
from hpctrain.sync.collectives import _pickled

ENV = "HPCTRAIN_ELASTIC_DIR"
_KIND = "hpctrain-elastic-state"
FINISH_S = 30.0  # an error's wait for the last commit's write: torchrun's and Slurm's SIGKILL grace
_created = itertools.count()  # states in creation order: the same in every run of a script


def _hvd():
    import hpctrain.sync as hvd  # not at import time: hpctrain.sync imports this module lazily

    return hvd


class HostsUpdatedInterrupt(RuntimeError):
    """Horovod's signal that workers were added or removed; ``skip_sync``: none was lost."""

    def __init__(self, skip_sync: bool = False):
        super().__init__()
        self.skip_sync = skip_sync


class State:
    """What :func:`run` keeps the same on every rank and brings back after a restart.

    Subclasses define ``save`` (copy the live values aside), ``restore`` (put the copy back),
    ``sync`` (rank 0's values everywhere), and for ``HPCTRAIN_ELASTIC_DIR`` ``_snapshot`` and
    ``_load_snapshot`` (the copy as a payload of tensors and plain values, and back).
    """

    def __init__(self, bcast_object: Callable[[Any], Any], get_rank: Callable[[], int]):
        self._bcast_object = bcast_object
        self._rank = get_rank
        self._reset_callbacks: list[Callable[[], None]] = []
        self._file = f"state-{next(_created)}.pt"
        self._commits = 0
        self._resumed = False  # looked in HPCTRAIN_ELASTIC_DIR: once per process, at the first run

    def register_reset_callbacks(self, callbacks: list[Callable[[], None]]) -> None:
        """Functions to call after a reset (here: a restart from a commit), e.g. to scale the
        learning rate to the new number of workers."""
        self._reset_callbacks.extend(callbacks)

    def on_reset(self) -> None:
        self.reset()
        for callback in self._reset_callbacks:
            callback()

    def commit(self) -> None:
        """Copy the state aside (``restore`` brings it back), and to ``HPCTRAIN_ELASTIC_DIR``
        when set: rank 0 writes it in the background, while training goes on; the next
        commit and the return of the function :func:`run` decorates wait for that write.
        Costs a copy of the model: commit every few batches."""
        self.save()
        self._commits += 1
        folder = os.environ.get(ENV)
        if folder and self._rank() == 0:
            _writer.submit(Path(folder) / self._file, self._snapshot(),
                           {"kind": _KIND, "commits": self._commits, "size": _hvd().size()})
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """Nothing to check: a job under mpirun, srun or torchrun keeps its workers."""

    def save(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Adjust to a new job after a reset, before the sync."""

    def _snapshot(self) -> dict:
        raise UsageError(f"{type(self).__name__} cannot be written to ${ENV}: define "
                         "_snapshot() and _load_snapshot(), or unset the variable")

    def _load_snapshot(self, payload: dict) -> None:
        raise UsageError(f"{type(self).__name__} cannot be read from ${ENV}")


class ObjectState(State):
    """Picklable values, each a keyword argument, kept as attributes of the state."""

    def __init__(self, bcast_object: Callable[[Any], Any], get_rank: Callable[[], int],
                 **kwargs: Any):
        self._saved_state = kwargs
        self._set_attrs()
        super().__init__(bcast_object, get_rank)

    def save(self) -> None:
        self._saved_state = {k: getattr(self, k) for k in self._saved_state}

    def restore(self) -> None:
        self._set_attrs()

    def sync(self) -> None:
        if self._saved_state:
            self._saved_state = self._bcast_object(self._saved_state)
            self._set_attrs()

    def _set_attrs(self) -> None:
        for name, value in self._saved_state.items():
            setattr(self, name, value)

    def _snapshot(self) -> dict:
        # Pickled as broadcast_object sends them (cloudpickle: lambdas and the script's own
        # classes too), so that any value sync takes is committable; its tensors' memory in
        # the one blob. Reading them back unpickles them (code can run), so the folder must
        # be as trusted as the script.
        kind, blob = _pickled(self._saved_state, out_of_band=False)
        if kind == "error":
            name, why = next(((name, why) for name, value in self._saved_state.items()
                              for k, why in [_pickled(value)] if k == "error"), ("", blob))
            raise UsageError(f"${ENV}: the state's value {name!r} cannot be saved ({why}); "
                             "leave it out of the state, or unset the variable")
        return {"objects": torch.frombuffer(bytearray(blob.data), dtype=torch.uint8)}

    def _load_snapshot(self, payload: dict) -> None:
        saved = pickle.loads(payload["objects"].numpy().tobytes())
        if sorted(saved) != sorted(self._saved_state):  # a value added or removed since
            raise ValueError(f"its values are {', '.join(sorted(saved)) or 'none'}; this "
                             f"{type(self).__name__}'s are "
                             f"{', '.join(sorted(self._saved_state)) or 'none'} (a fresh "
                             "folder starts over)")
        self._saved_state = saved


class ElasticSampler(torch.utils.data.Sampler):
    """Horovod's ElasticSampler: this rank's share of the samples not yet trained this epoch.

    The epoch's order is ``random.Random(seed + epoch)``'s shuffle of the indices, as in
    Horovod; ``record_batch`` counts the samples every rank has trained, and a state restored
    on another number of ranks shares out only the rest. Call ``set_epoch`` at the end of an
    epoch (it clears the count), not at its start.
    """

    def __init__(self, dataset: Any, shuffle: bool = True, seed: int = 0):
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.processed_num = 0
        self.reset()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.processed_num = 0
        self.reset()

    def record_batch(self, batch_idx: int, batch_size: int) -> None:
        """Count one batch of ``batch_size`` samples on every rank as trained."""
        self.processed_num += batch_size * self.num_replicas

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "processed_num": self.processed_num}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epoch = state_dict["epoch"]
        self.processed_num = state_dict["processed_num"]
        self.reset()

    def reset(self) -> None:
        """Share the epoch's untrained samples among the job's ranks as it is now."""
        hvd = _hvd()
        self.num_replicas, self.rank = hvd.size(), hvd.rank()
        order = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        self.remaining_indices = order[self.processed_num:]
        self.num_samples = math.ceil(len(self.remaining_indices) / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):
        indices = self.remaining_indices[:]
        indices += indices[:self.total_size - len(indices)]  # padded to a multiple of the ranks
        self.indices = indices[self.rank:self.total_size:self.num_replicas]
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


class _Handler:
    """Keeps one model, optimizer or sampler of a TorchState: a saved copy of its state_dict."""

    def __init__(self, value: Any):
        self.value = value
        self.save()

    def save(self) -> None:
        self.saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        # A copy: an optimizer keeps the tensors it is given, and its next step would change
        # the saved state in place (Horovod's restore shares them).
        self.value.load_state_dict(copy.deepcopy(self.saved))

    def set_value(self, value: Any) -> None:
        self.value = value
        self.save()

    def sync(self) -> None:
        """Make every rank's value rank 0's (each kind of handler its own way)."""
        raise NotImplementedError


class _ModelHandler(_Handler):
    def sync(self) -> None:
        _hvd().broadcast_parameters(self.value.state_dict(), root_rank=0)


class _OptimizerHandler(_Handler):
    def restore(self) -> None:
        # load_state_dict puts new dicts in param_groups, where sync()'s broadcast on the
        # other ranks writes into the old ones. What holds those (a scheduler built on the
        # optimizer a DistributedOptimizer wraps: they share them) would drive this
        # optimizer on those ranks only, and after a resume (rank 0 alone restores) the
        # ranks would drift apart: the loaded values go into the dicts it had.
        groups = self.value.param_groups
        kept = list(groups)
        super().restore()
        for mine, loaded in zip(kept, self.value.param_groups, strict=True):
            values = dict(loaded)
            mine.clear()
            mine.update(values)
        self.value.param_groups = groups

    def sync(self) -> None:
        _hvd().broadcast_optimizer_state(self.value, root_rank=0)


class _StateDictHandler(_Handler):
    """An ElasticSampler or a learning-rate scheduler: its state_dict, not the object (a
    scheduler pickled would take a copy of its optimizer along, and come back bound to it)."""

    def sync(self) -> None:
        self.value.load_state_dict(_hvd().broadcast_object(self.value.state_dict()))


class _EpochHandler(_Handler):
    """A torch DistributedSampler: its epoch (with its seed, the order), not the object, which
    pickled would write its whole dataset into every commit."""

    def save(self) -> None:
        self.saved = {"epoch": self.value.epoch}

    def restore(self) -> None:
        self.value.set_epoch(self.saved["epoch"])

    def sync(self) -> None:
        self.value.set_epoch(_hvd().broadcast_object(self.value.epoch))


_HANDLERS = ((torch.nn.Module, _ModelHandler), (torch.optim.Optimizer, _OptimizerHandler),
             (ElasticSampler, _StateDictHandler),
             (torch.optim.lr_scheduler.LRScheduler, _StateDictHandler),
             (torch.optim.lr_scheduler.ReduceLROnPlateau, _StateDictHandler),
             (torch.utils.data.distributed.DistributedSampler, _EpochHandler))


class TorchState(ObjectState):
    """A PyTorch training's state: ``model``, ``optimizer``, samplers, schedulers and any
    other keyword arguments, each an attribute. Modules, optimizers, ElasticSamplers and
    learning-rate schedulers are kept through their ``state_dict``, a DistributedSampler
    through its epoch; everything else as a picklable value."""

    def __init__(self, model: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, **kwargs: Any):
        kwargs.update(model=model, optimizer=optimizer)
        self._handlers: dict[str, _Handler] = {}
        plain = {}
        for name, value in kwargs.items():
            handler = next((h for kind, h in _HANDLERS if isinstance(value, kind)), None)
            if handler is None:
                plain[name] = value
            else:
                self._handlers[name] = handler(value)
                setattr(self, name, value)
        hvd = _hvd()
        super().__init__(hvd.broadcast_object, hvd.rank, **plain)

    def save(self) -> None:
        for handler in self._handlers.values():
            handler.save()
        super().save()

    def restore(self) -> None:
        for handler in self._handlers.values():
            handler.restore()
        super().restore()

    def sync(self) -> None:
        # Models last: a fresh optimizer's state is made by a step on zero gradients (as in
        # Horovod), which moves the parameters with weight decay; the model sync undoes it.
        # (Horovod syncs the model first and leaves those ranks' parameters moved.)
        handlers = sorted(self._handlers.values(), key=lambda h: isinstance(h, _ModelHandler))
        for handler in handlers:
            handler.sync()
        super().sync()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in getattr(self, "_handlers", {}) and hasattr(self, name):
            self._handlers[name].set_value(value)
        super().__setattr__(name, value)

    def _snapshot(self) -> dict:
        return {**super()._snapshot(),
                "handlers": {name: h.saved for name, h in self._handlers.items()}}

    def _load_snapshot(self, payload: dict) -> None:
        kept, mine = sorted(payload["handlers"]), sorted(self._handlers)
        if kept != mine:
            raise ValueError(f"it keeps {', '.join(kept)}; this TorchState keeps "
                             f"{', '.join(mine)}")
        super()._load_snapshot(payload)
        for name, saved in payload["handlers"].items():
            self._handlers[name].saved = saved


class _Writer:
    """Rank 0's commit files, written one at a time by a thread so that the ranks need not
    wait for the disk. Not a daemon: the interpreter waits for the last write at exit; an
    error, a stall timeout or a SIGTERM (the launcher ending the job) waits for it too, up to
    :data:`FINISH_S`, so that the restart resumes from the last commit."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._guarded = False
        self._previous_sigterm: Any = None

    def submit(self, path: Path, snapshot: dict, header: dict) -> None:
        self.wait()
        self._guard()
        self._thread = threading.Thread(target=self._write, args=(path, snapshot, header),
                                        name="hpctrain-elastic-commit")
        self._thread.start()

    def wait(self) -> None:
        """Until the last commit is on disk; UsageError if writing it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise UsageError(error)

    def finish(self, timeout: float | None = None) -> None:
        """Before the process ends on an error: the write under way, at most ``timeout``
        seconds (:data:`FINISH_S`); past that, say the restart goes back a commit."""
        thread = self._thread
        if thread is None:
            return
        timeout = FINISH_S if timeout is None else timeout
        thread.join(timeout)
        if thread.is_alive():
            print(f"hpctrain.sync.elastic: the last commit is not written after {timeout:g} "
                  "s; a restart resumes from the one before", file=sys.__stderr__ or sys.stderr,
                  flush=True)

    def _guard(self) -> None:
        """Once: the abort hook (an uncaught error, also a peer's lost connection) and
        SIGTERM (mpirun, torchrun and Slurm end the other workers with it) first finish the
        write. A handler of the script's own is kept, called after the wait."""
        if self._guarded:
            return
        self._guarded = True
        from hpctrain import job_end  # here: job_end imports comm, which imports MPI

        job_end.before_abort(self.finish)
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGTERM)
            if previous not in (signal.SIG_IGN, None):
                self._previous_sigterm = previous
                signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.finish()
        previous = self._previous_sigterm
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signal.SIGTERM, previous)  # the default: end as SIGTERM would have
        signal.raise_signal(signal.SIGTERM)

    def _write(self, path: Path, snapshot: dict, header: dict) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".{path.name}.*.tmp"):
                stale.unlink(missing_ok=True)  # left by a writer that was killed
            write_atomic(path, encode_parts(snapshot, header)[1], durable=True)
        except Exception as e:  # noqa: BLE001 - reported by the next commit, on rank 0
            self._error = f"${ENV}: cannot write the commit {path}: {e}"


_writer = _Writer()


def flush() -> None:
    """Wait until this process's last commit is written (rank 0; elsewhere nothing to do)."""
    _writer.wait()


def _read(state: State, path: Path) -> dict | None:
    """Rank 0: put ``state`` back to its commit in ``path``, if there is one."""
    _writer.wait()  # a commit of this process still being written
    if not path.exists():
        return None
    header, payload = load(path)
    if header.get("kind") != _KIND:
        raise CorruptCheckpoint(f"{path.name}: not an elastic state")
    # The checksum holds and the header says elastic: the dict a commit wrote.
    state._load_snapshot(cast(dict, payload))
    state.restore()
    n = _hvd().size()
    print(f"hpctrain.sync.elastic: resuming from commit {header['commits']} of a "
          f"{header['size']}-rank job ({path}) on {n} rank{'s' * (n != 1)}",
          file=sys.stderr, flush=True)
    return {"commits": header["commits"], "size": header["size"]}


def _writable(folder: Path) -> None:
    """Make ``folder`` and check that rank 0 can write its commits there (UsageError if not),
    so that a wrong path fails at the start, not silently at the first commit."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"${ENV} {str(folder)!r}: cannot make the folder: "
                         f"{e.strerror}") from None
    try:  # tried, not asked: os.access is wrong for root and with ACLs
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UsageError(f"${ENV} {str(folder)!r}: the folder is not writable "
                         f"({e.strerror})") from None


def _resume(state: State) -> bool:
    """Rank 0 loads ``state``'s last commit from ``HPCTRAIN_ELASTIC_DIR``, if there is one;
    every rank learns whether it did (one broadcast, also of a refusal, so none hangs)."""
    folder = os.environ.get(ENV)
    hvd = _hvd()
    found: dict | str | None = None
    if folder and hvd.rank() == 0:
        path = Path(folder) / state._file
        try:
            state._snapshot()  # a value that cannot be saved: refused now, not mid-training
            _writable(Path(folder))
            found = _read(state, path)
        except UsageError as e:  # the last write failed
            found = str(e)
        except Exception as e:  # noqa: BLE001 - unreadable, or not this script's state
            found = f"${ENV}: cannot resume from {path}: {' '.join(str(e).split())}"
    found = hvd.broadcast_object(found)
    if isinstance(found, str):
        raise UsageError(found)
    if found is None:
        return False
    state._commits = found["commits"]
    return True


def run(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate the training function ``func(state, ...)``: every rank starts from the same
    state (rank 0's, or its last commit in ``HPCTRAIN_ELASTIC_DIR`` after a restart). A
    later call in the same process goes on from the live state, as in Horovod; it returns
    once rank 0's last commit is on disk (UsageError there if writing it failed)."""

    @functools.wraps(func)
    def wrapper(state: State, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(state, State):  # horovod.common.elastic's: not one run can keep
            raise UsageError(f"hvd.elastic.run takes hpctrain's states, not "
                             f"{type(state).__module__}.{type(state).__qualname__}: use "
                             "hvd.elastic.ObjectState or TorchState (hpctrain.sync.elastic)")
        if not state._resumed:
            state._resumed = True
            if _resume(state):
                # Every rank at the commit before the callbacks, as in Horovod, where each
                # restores its own copy: only rank 0 read it here.
                state.sync()
                state.save()
                state.on_reset()
        skip_sync = False
        while True:
            try:
                if not skip_sync:
                    state.sync()
                result = func(state, *args, **kwargs)
                flush()
                return result
            except HostsUpdatedInterrupt as e:
                skip_sync = e.skip_sync
            state.on_reset()

    return wrapper
