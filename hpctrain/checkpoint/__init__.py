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
skipped (one a newer hpctrain wrote is refused, and left as it is). Snapshots of the model
(the curve points, evaluated after training) are written once each to ``snapshots/`` and
listed with their checksums in every later checkpoint, so checkpoints stay small however
long the run; a bad or missing one costs only its curve point (reported in one line), not
the checkpoints that list it.

The position in the data is the update count: epoch ``updates // steps`` at step
``updates % steps``, whose order the shuffle package derives from (seed, epoch) alone (an
asynchronous worker keeps its own position among its per-rank counters).

By concern:

- :mod:`~hpctrain.checkpoint.format`: the bytes of one file (:func:`encode`, :func:`load`,
  :func:`read_header`, :class:`CorruptCheckpoint`, :class:`NewerCheckpoint`);
- :mod:`~hpctrain.checkpoint.folder`: a folder of them (:func:`save` with rotation,
  :func:`listing`, :func:`number`, :func:`corrupt`, :func:`load_newest`/:func:`newest`
  giving a :class:`Loaded`, :func:`resolve`);
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

import importlib

# Public name -> its module, imported on first use: ``hpctrain train`` imports
# :mod:`~hpctrain.checkpoint.stop` before torch, to record SIGUSR1 from its first moment.
_EXPORTS = {
    **dict.fromkeys(["Checkpointer"], "checkpointer"),
    **dict.fromkeys(["KEEP", "SUBDIR", "Loaded", "corrupt", "listing", "load_newest",
                     "named_aside", "newest", "number", "resolve", "run_folder", "save",
                     "writes_to"], "folder"),
    **dict.fromkeys(["FORMAT", "CorruptCheckpoint", "NewerCheckpoint", "encode", "load",
                     "read_header"], "format"),
    **dict.fromkeys(["AUTO", "MAY_CHANGE", "Every", "Resolved", "changed_option", "check",
                     "parse_every", "recorded_args", "resumptions"],
                    "policy"),
    **dict.fromkeys(["Resize", "Resizer"], "resize"),
    **dict.fromkeys(["rng_state", "set_rng_state"], "rng"),
    **dict.fromkeys(["Stopped"], "stop"),
}
_SUBMODULES = set(_EXPORTS.values())  # every module exports something
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
