"""Ensemble-Compression (EC) and model averaging (MA) with MPI collectives.

Both are hooks for a user's own training loop (``after_step()`` after each optimizer step
decides when to aggregate); :mod:`hpctrain.ec.algorithm` plugs them into the training loop
as ``--algo ma|ec``.

Where they depart from the seed's design, and why:

- EC's batch loss is the mean over all its samples: cross-entropy on the ordinary ones,
  distillation on the relabelled ones (the design names only the latter), so that the
  relabelled samples add to the data rather than replace it.
- EC's teacher is each model in eval mode (BatchNorm's running statistics, no dropout): the
  ensemble's probabilities should not depend on the batch they were computed in.
- ``distill_from="all"`` (:mod:`~hpctrain.ec.compression`): every rank distils from every
  rank's relabelled draw, for data split by label.
- MA averages floating-point buffers with the parameters, keeps momentum local (local SGD)
  and averages once more after the last step, so its final model is the average
  (:mod:`~hpctrain.ec.averaging`).
"""

from hpctrain.ec.averaging import ModelAveraging, average_model, broadcast_model
from hpctrain.ec.compression import EnsembleCompression
from hpctrain.ec.distill import distillation_loss
from hpctrain.ec.ensemble import ensemble_probabilities, predict_logits
from hpctrain.ec.evaluation import evaluate_members

__all__ = [
    "EnsembleCompression",
    "ModelAveraging",
    "average_model",
    "broadcast_model",
    "distillation_loss",
    "ensemble_probabilities",
    "evaluate_members",
    "predict_logits",
]
