"""Scoring every rank's snapshots after training: each member, their mean, the ensemble, and
(for MA) the parameter average, without moving any model between ranks.

Each rank scores its own snapshot on the test set; an allreduce of the test-set probabilities
gives the ensemble's (the mean of the members' softmax outputs), an allreduce of the
snapshot's parameters gives the averaged model, scored by one rank per snapshot in turn.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hpctrain import compiled, watchdog
from hpctrain.data import Dataset
from hpctrain.ec.averaging import average_model
from hpctrain.ec.ensemble import allreduce_rows, predict_logits
from hpctrain.evaluate import Snapshot, loss_or_none


def score_probs(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean negative log-likelihood of class probabilities ``probs``."""
    acc = (probs.argmax(1) == labels).double().mean().item()
    nll = -torch.log(probs.gather(1, labels[:, None]).clamp_min(1e-30)).mean().item()
    return acc, nll


def score_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``logits``."""
    acc = (logits.argmax(1) == labels).double().mean().item()
    return acc, F.cross_entropy(logits, labels).item()


def evaluate_members(model: nn.Module, snapshots: list[Snapshot], test_set: Dataset, comm,
                     averaged: bool = False) -> list[dict]:
    """One curve point per snapshot, the same on every rank (collective).

    Every rank holds its own model's snapshots, taken at the same steps. A point carries rank
    0's snapshot info (t, epoch, updates), ``member_acc``/``member_loss`` (rank 0's model),
    ``mean_member_acc``, ``ensemble_acc``/``ensemble_loss`` and, with ``averaged``,
    ``averaged_acc``/``averaged_loss``. ``model`` is scratch space and left changed.
    """
    rank, ranks = comm.Get_rank(), comm.Get_size()
    # --compile: the first evaluation may compile on any rank (rank 0's member, scored online,
    # has compiled before), and the others wait in its collectives meanwhile; in this bcast
    # also for a rank whose last step compiled (ec's last may be its first with a new size).
    watchdog.beat("evaluating snapshot", 0, compiling=compiled.is_compiled(model))
    infos = comm.bcast([s.info for s in snapshots], root=0)
    points, averaged_scores = [], {}
    for i, snap in enumerate(snapshots):
        if i:  # the first's allowance holds until this beat
            watchdog.beat("evaluating snapshot", i)
        model.load_state_dict(snap.state)
        logits = predict_logits(model, test_set.images)
        members = comm.allgather(score_logits(logits, test_set.labels))
        probs = F.softmax(logits, dim=1).to(torch.float32).contiguous().numpy()
        total = allreduce_rows(comm, probs)  # in parts past 2**31 - 1 floats
        ens_acc, ens_loss = score_probs(torch.from_numpy(total) / ranks, test_set.labels)
        points.append({**infos[i], "member_acc": members[0][0],
                       "member_loss": loss_or_none(members[0][1]),
                       "mean_member_acc": sum(a for a, _ in members) / ranks,
                       "ensemble_acc": ens_acc, "ensemble_loss": loss_or_none(ens_loss)})
        if averaged:
            average_model(model, comm)
            if i % ranks == rank:
                averaged_scores[i] = score_logits(predict_logits(model, test_set.images),
                                                  test_set.labels)
    if averaged:
        for part in comm.allgather(averaged_scores):
            averaged_scores.update(part)
        for i, point in enumerate(points):
            acc, loss = averaged_scores[i]
            point.update(averaged_acc=acc, averaged_loss=loss_or_none(loss))
    return points
