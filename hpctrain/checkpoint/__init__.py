"""Checkpoints: a run's whole state, written so that a killed job never loses a good one.

A checkpoint file is one line of JSON (the header: format, SHA-256 and length of the payload,
the algorithm, the numbers of ranks and workers, the update count, the run's configuration
under ``args``), then the payload, a ``torch.save`` of plain tensors, dicts, lists and numbers
that is loaded with ``weights_only=True`` after its checksum matched, so loading never executes
code from the file.

Rank 0 writes ``ckpt-<updates>.pt`` to a temporary file, fsyncs it, renames it into place and
fsyncs the folder; only then does it delete checkpoints older than the last :data:`KEEP`. A
writer killed at any moment therefore leaves the previous good checkpoint (and at worst a
temporary file, removed by the next writer). Resuming takes the newest checkpoint that passes
its checksum; a corrupt or truncated one is reported in one line, renamed ``*.corrupt`` and
skipped. Snapshots of the model (the curve points, evaluated after training) are written once
each to ``snapshots/`` and listed with their checksums in every later checkpoint, so
checkpoints stay small however long the run.

The position in the data is the update count: epoch ``updates // steps`` at step
``updates % steps``, whose order the shuffle package derives from (seed, epoch) alone (an
asynchronous worker keeps its own position among its per-rank counters).

By concern:

- :mod:`~hpctrain.checkpoint.format`: the bytes of one file (:func:`encode`, :func:`load`,
  :func:`read_header`, :class:`CorruptCheckpoint`);
- :mod:`~hpctrain.checkpoint.folder`: a folder of them (:func:`save` with rotation,
  :func:`listing`, :func:`load_newest`/:func:`newest` giving a :class:`Loaded`,
  :func:`resolve`);
- :mod:`~hpctrain.checkpoint.rng`: one rank's random-number state;
- :mod:`~hpctrain.checkpoint.policy`: when to checkpoint (:func:`parse_every`, :class:`Every`)
  and whether a run may write or resume (:func:`check` giving a :class:`Resolved`), on plain
  values: the command line declares the options;
- :mod:`~hpctrain.checkpoint.resize`: :class:`Resizer`, the rules that carry per-worker state
  over when a run resumes on another number of workers;
- :mod:`~hpctrain.checkpoint.checkpointer`: :class:`Checkpointer`, used by the training loops;
- :mod:`~hpctrain.checkpoint.stop`: SIGUSR1, a checkpoint and a stop before a time limit
  (:class:`Stopped`).
"""

from hpctrain.checkpoint.checkpointer import Checkpointer
from hpctrain.checkpoint.folder import (
    KEEP,
    SUBDIR,
    Loaded,
    listing,
    load_newest,
    newest,
    resolve,
    run_folder,
    save,
)
from hpctrain.checkpoint.format import FORMAT, CorruptCheckpoint, encode, load, read_header
from hpctrain.checkpoint.policy import AUTO, MAY_CHANGE, Every, Resolved, check, parse_every
from hpctrain.checkpoint.resize import Resize, Resizer
from hpctrain.checkpoint.rng import rng_state, set_rng_state
from hpctrain.checkpoint.stop import Stopped

__all__ = [
    "AUTO", "FORMAT", "KEEP", "MAY_CHANGE", "SUBDIR", "Checkpointer", "CorruptCheckpoint", "Every",
    "Loaded", "Resize", "Resizer", "Resolved", "Stopped", "check", "encode", "listing", "load",
    "load_newest", "newest", "parse_every", "read_header", "resolve", "rng_state", "run_folder",
    "save", "set_rng_state",
]
