"""Ensemble-Compression (EC): aggregate model outputs, not parameters, and distil them back.

Every ``tau`` local steps each rank picks ``distill_size`` random samples of its local data
and relabels them with the ensemble's probabilities (:mod:`hpctrain.ec.ensemble`). During the
next ``tau`` steps the relabelled samples ride along with the ordinary batches: step ``j`` of
the round appends relabelled samples ``[j D / tau, (j+1) D / tau)``, so each is seen once per
round. The batch loss is the mean over all its samples of plain cross-entropy (ordinary
samples) and of :func:`~hpctrain.ec.distill.distillation_loss` (relabelled samples). The first
round has no teacher yet and is plain cross-entropy. Model size never changes, and every rank
keeps its own model.

``distill_from="all"`` departs from the seed's EC: the ensemble labels every rank's draw for
every rank, and each rank distils ``distill_size`` samples picked at random from all of them
(true labels included), so a worker whose own data hold a few classes sees the others'.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from hpctrain import compiled, options, watchdog
from hpctrain.data import Dataset
from hpctrain.ec.distill import distillation_loss
from hpctrain.ec.ensemble import ensemble_probabilities
from hpctrain.ec.stats import AggregationStats
from hpctrain.errors import UsageError
from hpctrain.microbatch import mean_in_parts, parts
from hpctrain.shuffle.order import generator

DISTILL_FROM = ("own", "all")


def check_options(tau: int, alpha: float, temperature: float, distill_size: int,
                  distill_from: str = "own") -> None:
    """Raise UsageError, naming the value, for EC options out of range: the command line's
    own checks (:class:`hpctrain.ec.algorithm.CompressionOptions`), so that a user's loop
    and ``--algo ec`` take the same values (this had no upper bound on the temperature)."""
    from hpctrain.ec.algorithm import CompressionOptions  # it imports this module

    # A refusal names the argument the caller gave (EnsembleCompression(alpha=1.5)), not the
    # options field it is checked as (CompressionOptions.ec_alpha), which the caller never wrote.
    with options.arguments_of("CompressionOptions", "EnsembleCompression", _ARGUMENTS):
        CompressionOptions(tau=tau, ec_alpha=alpha, ec_temperature=temperature,
                           ec_distill_size=distill_size, ec_distill_from=distill_from)


# CompressionOptions' fields -> EnsembleCompression's arguments.
_ARGUMENTS = {"tau": "tau", "ec_alpha": "alpha", "ec_temperature": "temperature",
              "ec_distill_size": "distill_size", "ec_distill_from": "distill_from"}


class EnsembleCompression:
    """EC for a user's own loop: ``loss = ec.loss(x, y)``, backward, step, ``ec.after_step()``
    (with gradient accumulation: a backward of each of ``ec.losses(x, y, size)``).

    ``local`` is this rank's training data (give or update it with :meth:`set_local_data`
    before the first aggregation and whenever it changes). ``lookup``, when every rank holds
    the whole training set with ``ids`` equal to row numbers, lets ranks exchange sample ids
    instead of inputs. ``distill_from``: "own" (the seed's EC) or "all" (module docstring).
    """

    def __init__(self, model: nn.Module, comm, tau: int, alpha: float, temperature: float,
                 distill_size: int, local: Dataset | None = None,
                 lookup: Dataset | None = None, seed: int = 0, distill_from: str = "own"):
        check_options(tau, alpha, temperature, distill_size, distill_from)
        if lookup is not None and not torch.equal(lookup.ids, torch.arange(len(lookup))):
            raise ValueError("lookup's ids must be its row numbers")
        self.model, self.comm, self.tau = model, comm, tau
        self.alpha, self.temperature, self.distill_size = alpha, temperature, distill_size
        self.lookup, self.seed, self.distill_from = lookup, seed, distill_from
        self.local: Dataset | None = None
        if local is not None:
            self.set_local_data(local)
        self.steps = 0
        self.rounds = 0
        self._round_start = 0
        self.relabelled: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.distilled = 0  # relabelled samples trained on so far
        self._fed = 0  # this step's relabelled samples, uncounted if the step is dropped
        self.stats = AggregationStats(counts_inference=True)  # in every summary
        self._parts: dict[str, list] = {}  # take_loss_parts's: part -> [sum, samples]

    def state_dict(self) -> dict:
        """The round's position and relabelled samples, and the aggregation statistics."""
        return {"steps": self.steps, "rounds": self.rounds, "round_start": self._round_start,
                "relabelled": self.relabelled, "distilled": self.distilled,
                "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.rounds = state["steps"], state["rounds"]
        self._round_start, self.distilled = state["round_start"], state["distilled"]
        self.relabelled = None if state["relabelled"] is None else tuple(state["relabelled"])
        self.stats.load_state_dict(state["stats"])

    def set_local_data(self, local: Dataset) -> None:
        """The data this rank draws its next distillation samples from."""
        if not isinstance(local, Dataset):  # an (x, y) pair failed at the first aggregation
            raise TypeError("local must be an hpctrain.data.Dataset (hpctrain.data.load's, "
                            "or Dataset(name, images, labels, ids, num_classes)), not "
                            f"{type(local).__name__}")
        if self.distill_size > len(local):
            given = f"--ec-distill-size {self.distill_size}" if options.on_command_line() \
                else f"EnsembleCompression(distill_size={self.distill_size})"
            raise UsageError(f"{given} exceeds the {len(local)} local samples")
        self.local = local

    def distill_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """This step's relabelled samples (inputs, labels, ensemble probabilities), or None."""
        if self.relabelled is None:
            return None
        x, y, p = self.relabelled
        n = len(x)  # distill_size, unless a run resumed on other ranks relabelled another size
        j = self.steps - self._round_start
        lo, hi = j * n // self.tau, (j + 1) * n // self.tau
        if lo >= hi or lo >= n:
            return None
        return x[lo:hi], y[lo:hi], p[lo:hi]

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward ``x`` with this step's relabelled samples; the mean loss over all of them."""
        (whole,) = self.losses(x, y)
        return whole

    def losses(self, x: torch.Tensor, y: torch.Tensor,
               size: int | None = None) -> Iterator[torch.Tensor]:
        """:meth:`loss` in near-equal parts of at most ``size`` samples, relabelled ones
        included (:func:`~hpctrain.microbatch.parts` of them); the parts add up to it, so a
        backward of each accumulates its gradient (one part when ``size`` is None)."""
        extra = self.distill_batch()
        if extra is None:
            self._count("ce_loss", 0.0, len(x))
            for part in mean_in_parts(lambda a, b: F.cross_entropy(self.model(a), b), x, y,
                                      size):
                self._count("ce_loss", part.detach() * len(x), 0)  # shares of the mean
                yield part
            return
        xd, yd, pd = (t.to(x.device) for t in extra)
        self.distilled += len(xd)
        self._fed = len(xd)
        inputs, n = torch.cat([x, xd]), len(x)
        lo = 0  # near-equal parts, as mean_in_parts's: a remainder of 1 broke batch norm
        for part in inputs.tensor_split(parts(len(inputs), size)):
            if compiled.first_call(self.model, "train", len(part)):  # --compile: a new size
                watchdog.beat("compiling for a batch of", len(part), compiling=True)
                compiled.verify(self.model, part, self.comm.Get_rank())
            out = self.model(part)
            k = min(max(n - lo, 0), len(out))  # the part's ordinary samples, then relabelled
            d = slice(max(lo - n, 0), max(lo - n, 0) + len(out) - k)
            sums = [F.cross_entropy(out[:k], y[lo:lo + k], reduction="sum")] if k else []
            if k:
                self._count("ce_loss", sums[0], k)
            if k < len(out):
                sums.append(distillation_loss(out[k:], yd[d], pd[d], self.alpha,
                                              self.temperature, reduction="sum"))
                self._count("distill_loss", sums[-1], len(out) - k)
            yield sum(sums[1:], sums[0]) / len(inputs)
            lo += len(part)

    def step_made(self, applied: bool) -> None:
        """Told by the loop after each step: a dropped step (a NaN/Inf gradient, an fp16
        overflow) trained on nothing, and its slice of the round is never learned, as the
        next step takes the next one, so its relabelled samples are uncounted. (A loop of
        one's own that applies every step need not call it.)"""
        if not applied:
            self.distilled -= self._fed
        self._fed = 0

    def _count(self, part: str, total, samples: int) -> None:
        kept = self._parts.setdefault(part, [0.0, 0])
        kept[0] = kept[0] + (total.detach() if isinstance(total, torch.Tensor) else total)
        kept[1] += samples

    def take_loss_parts(self) -> dict[str, float]:
        """The parts of the loss, each a mean over its samples of the steps since the last
        call: ``ce_loss``, cross-entropy on the true labels of the ordinary samples (what
        other algorithms' loss is), and from the first aggregation on ``distill_loss``,
        :func:`~hpctrain.ec.distill.distillation_loss` of the relabelled ones. The loss
        itself is their mean over all samples."""
        parts, self._parts = self._parts, {}
        return {part: float(total) / samples for part, (total, samples) in parts.items()
                if samples}

    def after_step(self, final: bool = False) -> bool:
        """Count one local step; relabel with the ensemble once the round has had its ``tau``
        steps, except on the ``final`` step of training (no step follows to distil it).
        Only that one is skipped: a round with fewer than ``tau`` steps left after it runs,
        and since its distillation is spread over the next ``tau`` steps and the run ends
        first, it distils only the slices of the steps left (``--tau 3 --ec-distill-size 12``
        over 64 steps: the 21st round, after step 63, distils 4 of its 12 samples).
        Rounds are counted from the round's start, not as multiples of ``tau``: a run resumed
        on another number of workers goes on within its round at another step count
        (:meth:`hpctrain.ec.algorithm.EnsembleCompression.resize_state`), and a multiple of
        ``tau`` cut that round short (its last slices never distilled) or let it run past
        ``tau`` steps (plain cross-entropy, nothing left to distil)."""
        self.steps += 1
        if self.steps - self._round_start < self.tau or final:
            return False
        self.aggregate()
        return True

    def aggregate(self) -> None:
        """Pick this round's distillation samples and fetch their ensemble labels (collective)."""
        if self.local is None:
            raise RuntimeError("EnsembleCompression needs set_local_data() before aggregating")
        # --compile: the first ensemble pass (eval mode: a graph of its own) compiles on every
        # rank, and a rank may still be compiling a size met since the last round (the first
        # batch with relabelled samples) while the others wait in this round's collectives.
        compiled.first_call(self.model, "ensemble")  # a new shape, counted just below
        if compiled.met_new_shapes(self.model, "round"):
            watchdog.beat("aggregating after a compile", compiling=True)
        start = time.perf_counter()
        gen = generator(self.seed, self.comm.Get_rank(), self.rounds)
        chosen = self.local.subset(torch.randperm(len(self.local), generator=gen)
                                   [:self.distill_size])
        shared = self.distill_from == "all"
        if self.lookup is not None:
            out = ensemble_probabilities(self.model, self.comm, self.temperature,
                                         self.local.num_classes, ids=chosen.ids,
                                         lookup=self.lookup, shared=shared)
        else:
            out = ensemble_probabilities(self.model, self.comm, self.temperature,
                                         self.local.num_classes, images=chosen.images,
                                         labels=chosen.labels, shared=shared)
        if shared:  # this rank's share of everyone's draw, from the same generator
            assert out.samples is not None  # shared: everyone's samples come back
            x, y = out.samples
            pick = torch.randperm(len(x), generator=gen)[:self.distill_size]
            self.relabelled = (x[pick], y[pick], out.probs[pick])
        else:
            self.relabelled = (chosen.images, chosen.labels, out.probs)
        self.rounds += 1
        self._round_start = self.steps
        self.stats.record(out.bytes_sent, time.perf_counter() - start, inferred=out.inferred,
                          exchange=out.exchange_s, inference=out.inference_s)
