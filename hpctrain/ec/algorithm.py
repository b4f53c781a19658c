"""``ma`` (model averaging) and ``ec`` (Ensemble-Compression) in the one training loop.

Every rank starts from rank 0's model and trains on its own samples (the shuffle package's
order); every ``tau`` local steps MA averages the parameters, EC relabels samples with the
ensemble and distils it during the next round. Snapshots of every rank's model are scored
after training: rank 0's member, the mean member, the ensemble and, for MA, the average.
``test_acc`` is the run's final model: rank 0's member, or the ensemble with
``--ec-final ensemble``. MA also averages after the last step, so its final model is the
average; a run ``--stop-on-collapse`` ended within a round averages once more in ``finish``
(the lock-step workers stop at the same update), so ``model.pt`` is that average, the model
``test_acc`` scores. EC skips a round that would fall on the last step, as nothing would
distil it, and so refuses a ``tau`` of at least the run's updates per rank (no round at all:
that would be independent training reported as EC).
"""

from __future__ import annotations

import functools
import io
import math
import sys
from dataclasses import dataclass

import torch

from hpctrain import comm, options
from hpctrain.algorithm import Algorithm, Options, Setup
from hpctrain.checkpoint import policy
from hpctrain.checkpoint.resize import mean_tensors
from hpctrain.ec.averaging import ModelAveraging as Averaging
from hpctrain.ec.averaging import broadcast_model, frozen_names
from hpctrain.ec.compression import DISTILL_FROM
from hpctrain.ec.compression import EnsembleCompression as Compression
from hpctrain.ec.evaluation import evaluate_members
from hpctrain.errors import UsageError, plural
from hpctrain.metrics import write_atomic
from hpctrain.options import HUGE, Range, option
from hpctrain.pickled import large_messages
from hpctrain.shuffle import ReplicatedTrainData, steps_per_epoch

DEFAULT_TAU = 20
DEFAULT_DISTILL_SIZE = 512


@dataclass(frozen=True)
class AveragingOptions(Options):
    tau: int | None = option(None, f"local steps between aggregations (default {DEFAULT_TAU})",
                             parse=int, range=Range(1))
    tau_epochs: float | None = option(None, "local epochs between aggregations, instead of "
                                      "--tau", parse=float,
                                      range=Range(0, HUGE, low_open=True), excludes=("tau",))

    def __post_init__(self) -> None:
        if self.tau is not None and self.tau_epochs is not None:
            if options.on_command_line():  # argparse's words, as for two flags typed
                raise UsageError("argument --tau-epochs: not allowed with argument --tau")
            given = functools.partial(options.setting, type(self))
            raise UsageError(f"{given('tau_epochs', self.tau_epochs)} is not allowed with "
                             f"{given('tau', self.tau)}: give one")
        super().__post_init__()

    def local_steps(self, steps_per_epoch: int) -> int:
        """``--tau``, or ``--tau-epochs`` converted to local steps (at least one)."""
        if self.tau_epochs is not None:
            return max(1, round(self.tau_epochs * steps_per_epoch))
        return self.tau if self.tau is not None else DEFAULT_TAU


@dataclass(frozen=True)
class CompressionOptions(AveragingOptions):
    ec_alpha: float = option(0.5, "weight of the distillation term in [0, 1] in the loss of "
                             "the relabelled samples (which join each step's batch, "
                             "distill-size / tau of them; the batch's own take plain "
                             "cross-entropy)", parse=float, range=Range(0, 1))
    ec_temperature: float = option(2.0, "softmax temperature of the ensemble and the student",
                                   parse=float, range=Range(0, 1000, low_open=True))
    ec_distill_size: int | None = option(None, "samples per worker relabelled by the ensemble "
                                         f"each round (default {DEFAULT_DISTILL_SIZE}, or all "
                                         "of a worker's samples if it holds fewer)",
                                         parse=int, range=Range(1))
    ec_distill_from: str = option("own", "whose samples a worker distils: its own draw (the "
                                  "seed's EC) or a random share of every worker's draw",
                                  choices=DISTILL_FROM)
    ec_final: str = option("member", "the reported final model, rank 0's member or the "
                           "ensemble", choices=("member", "ensemble"))

    def distill_size(self, local: int) -> int:
        """``--ec-distill-size``, or the default capped at a worker's ``local`` samples (a
        small data set trains with the default instead of being refused)."""
        if self.ec_distill_size is not None:
            return self.ec_distill_size
        return min(DEFAULT_DISTILL_SIZE, local)


class ModelAveraging(Algorithm):
    """Parameters allreduce-averaged every ``tau`` local steps, and after the last one."""

    name = "ma"
    Options = AveragingOptions
    options: AveragingOptions
    snapshots = "per_rank"
    summary_fields = {
        "tau": "local steps between aggregations",
        "final_model": "which model test_acc scores: averaged (ma: the parameter average), "
                       "member (rank 0's) or ensemble (ec)",
        "final_member_acc": "fraction: rank 0's model on the test set at the end",
        "final_mean_member_acc": "fraction: the members' mean test accuracy at the end",
        "final_ensemble_acc": "fraction: the ensemble (averaged softmax) at the end",
        "final_averaged_acc": "fraction (ma): the parameter average at the end",
        "aggregation": "the fields below, and the seconds of each part of a round (*_s)",
        "aggregation.rounds": "aggregations made",
        "aggregation.bytes_per_rank": "bytes: what one rank sent in aggregations (an "
                                      "allreduce counted as a ring's: 2(K-1)/K of its payload, "
                                      "as ssgd's allreduce_bytes_per_rank)",
        "aggregation.bytes_per_round": "bytes per round (per rank)",
        "aggregation.seconds_per_round": "seconds: distribution over rounds",
        "aggregation.total_s": "seconds spent aggregating",
    }

    def label(self) -> str:
        return f"{self.name} (tau={self.tau})"

    def resolved_options(self) -> dict:
        return {"tau": self.tau} if self.options.tau is None else {}

    def setup(self, s: Setup) -> None:
        broadcast_model(s.model, s.comm)
        super().setup(s)
        self.tau = self.options.local_steps(s.steps)
        self.aggregator = self.make_aggregator(s)
        self.in_round = False  # local steps taken since the last aggregation

    def make_aggregator(self, s: Setup):
        return Averaging(s.model, s.comm, self.tau)

    def checkpoint_state(self) -> tuple[dict, dict]:
        return {}, {"model": self.model, "optimizer": self.optimizer, "agg": self.aggregator}

    def resize_state(self, parts: list[dict], workers: int, position: int) -> list[dict]:
        """MA resumed on another number of workers: every worker starts from the members'
        average (an aggregation at the resume; frozen parameters, equal on every member, are
        the first one's, as rounds leave them) and their averaged momentum; the aggregator
        counts on from ``position`` and keeps old worker ``j mod K``'s statistics."""
        frozen = frozen_names(self.model) if self.model is not None else set()
        first = parts[0]["model"]
        model = {k: first[k] if k in frozen else mean_tensors([p["model"][k] for p in parts])
                 for k in first}
        optimizer = mean_tensors([p["optimizer"] for p in parts])
        return [{"model": model, "optimizer": optimizer,
                 "agg": {**parts[j % len(parts)]["agg"], "steps": position}}
                for j in range(workers)]

    def after_update(self, final: bool) -> None:
        self.in_round = not self.aggregator.after_step(final=final)

    def finish(self, position: int) -> int:
        """A run that ended within a round (``--stop-on-collapse``) averages once more: its
        model is the average, as it is after the final step of a run that did not stop. Every
        worker stops at the same update, so the allreduce meets on all of them."""
        if self.in_round:
            self.aggregator.aggregate()
        return position

    def evaluate(self, model, snapshots, test_set, comm) -> list[dict]:
        final = self.final_model()
        points = evaluate_members(model, snapshots, test_set, comm, averaged=final == "averaged")
        for p in points:
            p.update(test_acc=p[f"{final}_acc"], test_loss=p[f"{final}_loss"])
        return points

    def final_model(self) -> str:
        """MA's model is the members' average (the same as each member right after a round);
        scoring rank 0's member between rounds would time a model MA never offers."""
        return "averaged"

    def summary(self, points: list[dict], comm) -> dict:
        last = points[-1]
        out = {"tau": self.tau, "final_model": self.final_model(),
               "final_member_acc": last["member_acc"],
               "final_mean_member_acc": last["mean_member_acc"],
               "final_ensemble_acc": last["ensemble_acc"],
               "aggregation": self.aggregator.stats.summary()}
        if self.final_model() == "averaged":
            out["final_averaged_acc"] = last["averaged_acc"]
        return out


class EnsembleCompression(ModelAveraging):
    """Every ``tau`` local steps the ensemble relabels samples that the next round distils."""

    name = "ec"
    Options = CompressionOptions
    options: CompressionOptions
    averages_updates = False  # each member steps on its own batches: no --scale-lr
    summary_fields = {
        **{k: v for k, v in ModelAveraging.summary_fields.items() if k != "final_averaged_acc"},
        "distill_size": "samples per worker relabelled each round (--ec-distill-size)",
        "distilled_samples_per_rank": "relabelled samples rank 0 trained on, in all",
        "aggregation.inferred_samples": "samples rank 0 ran its model on for the ensemble, in "
                                        "all (aggregation.inference_s is their time)",
    }

    @classmethod
    def check(cls, config, ranks: int, samples: int) -> None:
        if cls.loss is not EnsembleCompression.loss and \
                cls.losses is EnsembleCompression.losses:  # a subclass's, taken silently
            algo = options.setting(type(config), "algo", config.algo)
            raise UsageError(f"{algo}: {cls.__name__}.loss() would never be "
                             "called: ec's step loss comes from losses() (cross-entropy plus "
                             "the distillation of relabelled samples); override losses()")
        o = config.algorithm
        local = samples // ranks  # as the loop counts them (TrainData.samples_per_rank)
        steps = steps_per_epoch(samples, ranks, config.optim.batch_size)
        if o.ec_distill_size is not None and o.ec_distill_size > local:
            holder = "the one rank" if ranks == 1 else f"each of the {ranks} ranks"
            given = options.named(f"--ec-distill-size {o.ec_distill_size}",
                                  "CompressionOptions", "ec_distill_size", o.ec_distill_size)
            raise UsageError(f"{given} exceeds the {local} training samples {holder} holds")
        _check_rounds(config, samples, ranks, steps)
        if ranks == 1 and comm.env_rank() == 0:
            print("hpctrain: warning: --algo ec on one worker: its ensemble is its own model, "
                  "so each round distils the model into itself (self-distillation, not "
                  "ensemble compression); give it 2 or more workers", file=sys.stderr,
                  flush=True)

    def label(self) -> str:
        o = self.options
        source = "" if o.ec_distill_from == "own" else f" from {o.ec_distill_from}"
        return (f"{self.name} (tau={self.tau}, alpha={o.ec_alpha}, T={o.ec_temperature}, "
                f"distill={self.distill_size}{source}, final={o.ec_final})")

    def resolved_options(self) -> dict:
        return {**super().resolved_options(),
                **({"ec_distill_size": self.distill_size}
                   if self.options.ec_distill_size is None else {})}

    def make_aggregator(self, s: Setup):
        o = self.options
        lookup = s.train_data.full if isinstance(s.train_data, ReplicatedTrainData) else None
        self.distill_size = o.distill_size(s.train_data.samples_per_rank)
        return Compression(s.model, s.comm, self.tau, o.ec_alpha, o.ec_temperature,
                           self.distill_size, lookup=lookup, seed=self.config.seed,
                           distill_from=o.ec_distill_from)

    def resize_state(self, parts: list[dict], workers: int, position: int) -> list[dict]:
        """EC resumed on another number of workers: member ``j`` is old member ``j mod K``
        (model, momentum, its round's relabelled samples and statistics), so a smaller run
        keeps the first members and a larger one copies members; the round goes on at the
        same place relative to ``position``: it keeps its ``tau`` steps, so every slice of
        its relabelled samples is distilled, and the next round follows ``tau`` steps after
        its start (with ``--tau-epochs``, ``tau`` follows the new steps per epoch: a round
        that already had that many steps ends at the next one)."""
        out = []
        for j in range(workers):
            part = parts[j % len(parts)]
            agg = part["agg"]
            into_round = agg["steps"] - agg["round_start"]
            out.append({**part, "agg": {**agg, "steps": position,
                                        "round_start": position - into_round}})
        return out

    def epoch_started(self, local) -> None:
        self.aggregator.set_local_data(local)

    def progress(self, position: int, applied: bool) -> int:
        self.aggregator.step_made(applied)
        return super().progress(position, applied)

    def loss(self, x, y):
        return self.aggregator.loss(x, y)

    def losses(self, x, y, size):
        return self.aggregator.losses(x, y, size)

    def loss_parts(self) -> dict[str, float]:
        """TensorBoard's ``train/ce_loss`` and ``train/distill_loss`` (see
        :meth:`~hpctrain.ec.compression.EnsembleCompression.take_loss_parts`)."""
        return self.aggregator.take_loss_parts()

    def final_model(self) -> str:
        return self.options.ec_final

    def finish(self, position: int) -> int:
        """EC's final model is a member or the ensemble: no average at the end."""
        return position

    def write_outputs(self, log, snapshots, comm) -> None:
        if self.final_model() != "ensemble":
            return
        members = large_messages(comm).gather(snapshots[-1].state, root=0)  # K models
        if log.rank == 0:
            buf = io.BytesIO()
            torch.save({"members": members}, buf)
            write_atomic(log.dir / "ensemble.pt", buf.getvalue(), durable=True)

    def summary(self, points: list[dict], comm) -> dict:
        return {**super().summary(points, comm), "distill_size": self.distill_size,
                "distilled_samples_per_rank": self.aggregator.distilled}


def _check_rounds(config, samples: int, ranks: int, steps: int) -> None:
    """EC with no round before the last step is independent training: refuse it.

    Rounds fall after every ``tau`` local steps except the last (no round follows to distil
    it), so EC needs ``tau`` below the run's updates per rank. ``steps``: the batches per
    epoch of a rank's ``samples // ranks`` samples.
    """
    o, epochs, batch = config.algorithm, config.optim.epochs, config.optim.batch_size
    # Each option named by its flag on the command line, by its field from Python.
    a = functools.partial(options.setting, type(o))
    optim = functools.partial(options.setting, type(config.optim))
    total = epochs * steps
    tau = o.local_steps(steps)
    if tau < total:
        return
    local = samples // ranks
    ck = config.checkpoint
    if policy.resumes(ck.resume, ck.dir, config.out):  # its --tau and --epochs: fewer ranks
        fewer = next((k for k in range(ranks - 1, 0, -1) if o.local_steps(
            steps_per_epoch(samples, k, batch)) < epochs * steps_per_epoch(samples, k, batch)),
            None)
        fix = f"resume it on at most {plural(fewer, 'rank')}" if fewer else "start a new run"
        resume = options.setting(type(ck), "resume")
        raise UsageError(
            f"{resume} on {plural(ranks, 'rank')}: the run's {a('tau')} never aggregates in its "
            f"{total} updates per rank ({epochs} epochs of {steps} batches of {batch} from {local} "
            f"samples per rank, tau {tau} updates): {fix}")
    if o.tau_epochs is not None:
        given, fix = (f"{a('tau_epochs', o.tau_epochs)} ({tau} local steps)",
                      f"{a('tau_epochs')} of at most {_floor4((total - 1) / steps):g}")
    else:
        given = a("tau", tau) + (" (the default)" if o.tau is None else "")
        fix = f"{a('tau')} below {total}"
    fix = f"{fix} or more {optim('epochs')}" if total > 1 else \
        f"more {optim('epochs')} or a smaller {optim('batch_size')}"
    raise UsageError(
        f"{given} never aggregates in {total} updates per rank ({optim('epochs', epochs)} x "
        f"{steps} batches of {batch} from {local} samples per rank on {plural(ranks, 'rank')}; "
        f"ec's rounds come after every tau updates but the last): give {fix}")


def _floor4(x: float) -> float:
    """``x`` rounded down to 4 decimals: a suggested bound rounded up would be refused too."""
    return math.floor(x * 1e4) / 1e4
