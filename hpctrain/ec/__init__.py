"""Ensemble-Compression (EC) and model averaging (MA) with MPI collectives.

Both are hooks for a user's own training loop (``after_step()`` after each optimizer step
decides when to aggregate); :mod:`hpctrain.ec.algorithm` plugs them into the training loop
as ``--algo ma|ec``.
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
