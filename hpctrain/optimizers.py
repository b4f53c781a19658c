"""The update rule of the lock-step algorithms (``--optimizer``), the learning rate's linear
scaling rule (``--scale-lr``: --lr x workers, Goyal et al., 2017, as Horovod's examples apply
it by hand) and its warm-up (``--warmup-epochs``).

The warm-up is not Horovod's examples' (nor Goyal's): theirs rises linearly from the
1-worker --lr to --lr x workers and then holds that rate. This one multiplies the scheduled
rate (cosine by default, already decaying) by a factor rising linearly from 0 (1 / (W x the
updates per epoch) at the first update) to 1 at the end of W epochs: the rate starts near 0,
stays below theirs all through the warm-up, and under the cosine never reaches the full
rate. It is kept as it is so that earlier runs' results stay reproducible.

sgd, ssgd, ma and ec build their optimizer here (ssgd wraps it in ``DistributedOptimizer``,
which subclasses whatever class it is given): torch's SGD (``--momentum``, ``--nesterov``) or
Adam / AdamW (``--betas``, ``--eps``). The asynchronous algorithms apply their update
inside the parameter store's push, so they take only ``sgd`` (their own rule, plain momentum)
and refuse the others and ``--nesterov``, in one line before MPI starts. They and ec (whose
members never average their updates) refuse ``--scale-lr`` there too; ssgd refuses it with
``--reduce-op adasum`` in its own ``check`` (Adasum adds orthogonal updates rather than
averaging them).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch

from hpctrain import comm, options
from hpctrain.errors import UsageError
from hpctrain.schedule import learning_rate

OPTIMIZERS = ("sgd", "adam", "adamw")
# check sees the resolved value, not where it came from: a --config file's nesterov is undone
# only by the switch's off form, which a refusal names too.
_OVER_A_FILE = " (--no-nesterov over a --config file's)"


def make(params: Iterable, optim) -> torch.optim.Optimizer:
    """The optimizer ``optim`` (an OptimConfig, resolved) names, over ``params``."""
    if optim.optimizer == "sgd":  # nesterov only when set: the default build is as before
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum,
                               weight_decay=optim.weight_decay,
                               **({"nesterov": True} if optim.nesterov else {}))
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optim.optimizer]
    given = {"betas": optim.betas, "eps": optim.eps}  # None: torch's (resolve fills them in)
    return cls(params, lr=optim.lr, weight_decay=optim.weight_decay,
               **{k: v for k, v in given.items() if v is not None})


def _check_adam_options(algorithm_class, optim) -> None:
    """Refuse Adam's ``betas`` and ``eps`` under SGD, which has neither: a lock-step
    algorithm is told of ``--optimizer adam``; one that takes sgd only (the asynchronous
    ones), which then refuses adam, that its own update rule has none."""
    given = [_named("betas", optim.betas, options.shown_list(optim.betas))] \
        if optim.betas is not None else []
    given += [_named("eps", optim.eps)] if optim.eps is not None else []
    if optim.optimizer != "sgd" or not given:
        return
    typed = options.on_command_line()
    if not {"adam", "adamw"} & set(algorithm_class.optimizers):  # asgd, dcasgd-*, ssp
        raise UsageError(f"{' and '.join(given)}: Adam's, and {_algo(algorithm_class)} "
                         f"keeps its own update rule (SGD with {_named('momentum')}), which "
                         f"has none; leave {'them' if len(given) > 1 else 'it'} out"
                         + (" (none over a --config file's)" if typed else ""))
    remedy = "--optimizer adam or adamw" if typed else "OptimConfig.optimizer='adam' or 'adamw'"
    raise UsageError(f"{' and '.join(given)}: Adam's, and {_named('optimizer', 'sgd')} has "
                     f"none; give {remedy} (SGD has {_named('momentum')})")


def _named(field: str, value=None, typed: str | None = None) -> str:
    """OptimConfig's ``field`` in a refusal: its flag (with ``typed``, else the value as
    :func:`options.shown` writes it) on the command line, the field from Python
    (:func:`options.named`); no value given: the flag or field alone."""
    flag = "--" + field.replace("_", "-")
    if value is None:
        return options.named(flag, "OptimConfig", field)
    return options.named(f"{flag} {typed if typed is not None else options.shown(value)}",
                         "OptimConfig", field, value)


def _algo(algorithm_class) -> str:
    """The run's algorithm in a refusal: ``--algo NAME``, or from Python ``the algorithm
    NAME`` (a script's RunConfig.algo may be the class itself, or a reference)."""
    name = algorithm_class.name
    return f"--algo {name}" if options.on_command_line() else f"the algorithm {name}"


def check(algorithm_class, optim) -> None:
    """Refuse an optimizer the algorithm cannot use, ``--nesterov`` where the update is not
    torch's SGD with momentum, and ``--scale-lr`` where no gradient is averaged over the
    workers; warn (rank 0) of adamw without weight decay (before MPI starts). ``optim`` is
    resolved (the algorithm's default momentum filled in)."""
    if optim.optimizer not in algorithm_class.optimizers:
        why = " (applied in the parameter store's push)" if not algorithm_class.lock_step else ""
        raise UsageError(f"{_named('optimizer', optim.optimizer)}: {_algo(algorithm_class)} "
                         f"keeps its own update rule{why}; only "
                         f"{', '.join(algorithm_class.optimizers)}")
    _check_adam_options(algorithm_class, optim)
    # The asynchronous algorithms' push applies plain momentum (v <- m*v + d, in the shared
    # CPU/CUDA kernel); Nesterov's look-ahead is not theirs.
    over_a_file = _OVER_A_FILE if options.on_command_line() else ""
    if optim.nesterov and not algorithm_class.lock_step:
        raise UsageError(f"{_named('nesterov')}: {_algo(algorithm_class)} keeps its own update "
                         "rule (applied in the parameter store's push, with plain "
                         f"{_named('momentum')}); leave {_named('nesterov')} out{over_a_file}")
    # Checked here, resolved, not in OptimConfig: the default momentum is the algorithm's.
    if optim.nesterov and not optim.momentum:  # torch's SGD refuses it too, at its build
        default = f" (the default of {_algo(algorithm_class)})" \
            if algorithm_class.defaults.get("momentum", 0.9) == 0 else ""
        momentum = optim.momentum or 0
        given = _named("momentum", momentum, f"{momentum:g}")
        raise UsageError(f"{_named('nesterov')} with {given}{default}: Nesterov momentum "
                         "needs momentum > 0, as torch's SGD says; give "
                         f"{_named('momentum')} above 0, or leave {_named('nesterov')} "
                         f"out{over_a_file}")
    # The linear scaling rule makes up for a gradient averaged over K workers' batches: a
    # K-times larger batch per update. An asynchronous worker's push applies its own batch's
    # gradient alone, and so does an ec member's step to its own model: K x --lr would only
    # make every such step K times larger.
    if optim.scale_lr and not (algorithm_class.lock_step and algorithm_class.averages_updates):
        raise UsageError(f"{_named('scale_lr')}: {_algo(algorithm_class)} applies each "
                         "worker's gradient on its own, not averaged over the workers, so the "
                         f"linear scaling rule does not apply; set {_named('lr')} itself")
    # --weight-decay defaults to 0 for every optimizer, torch's AdamW to 0.01: adamw at the
    # default trained bit for bit as adam, and nothing said so.
    if optim.optimizer == "adamw" and not optim.weight_decay and comm.env_rank() == 0:
        print("hpctrain: warning: --optimizer adamw with --weight-decay 0 (the default) is "
              "plain Adam; give --weight-decay (torch's AdamW default is 0.01)",
              file=sys.stderr, flush=True)


def sparse_refusal(algorithm_class, optim) -> str | None:
    """Why the run's optimizer cannot step on a sparse gradient (an embedding's, built with
    ``sparse=True``), naming the option and what does; None when it can. The lock-step
    algorithms step with torch's optimizer, which raised at the first step, after MPI
    started: SGD adds weight decay to the gradient (torch adds no dense tensor to a sparse
    one), and Adam and AdamW take no sparse gradient. The asynchronous algorithms' push
    adds gradients into a dense vector, so they take them with every option."""
    if not algorithm_class.lock_step:
        return None
    if optim.optimizer != "sgd":
        kind = {"adam": "Adam", "adamw": "AdamW"}[optim.optimizer]
        return (f"torch's {kind} (--optimizer {optim.optimizer}) takes no sparse gradient: use "
                "--optimizer sgd")
    if optim.weight_decay:
        return (f"torch's SGD adds no --weight-decay ({optim.weight_decay:g}) to a sparse "
                "gradient: leave it 0")
    return None


def base_lr(optim, workers: int) -> float:
    """``--lr``, times the number of workers with ``--scale-lr`` (the linear scaling rule)."""
    return optim.lr * workers if optim.scale_lr else optim.lr


def warmup_factor(epoch: float, warmup_epochs: float) -> float:
    """What the scheduled learning rate (cosine, step or constant) is multiplied by at
    (fractional) ``epoch``: rising linearly from 0 to 1 over ``warmup_epochs``, then 1. A
    factor, not Horovod's ramp from the 1-worker rate (see the module docstring)."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return 1.0
    return epoch / warmup_epochs


def scheduled_lr(optim, base: float, per_epoch: int, index: int) -> float:
    """The learning rate of update ``index`` (from 0) of a run of ``per_epoch`` updates an
    epoch from rate ``base`` (:func:`base_lr`): the schedule at the epoch it starts at, times
    the warm-up factor at the epoch it ends at. The loop steps with it, and each curve point
    records that of the update before it (``lr`` in metrics.jsonl)."""
    # Milestones are compared with one correctly rounded division, which is a milestone's
    # float where an update starts at it (1 + 9/25 was 1.3599999999999999, so
    # --lr-milestones 1.36 decayed an update late); cosine keeps its operations (its rates,
    # and so its runs, bit for bit as before).
    epoch = index / per_epoch if optim.lr_milestones \
        else index // per_epoch + index % per_epoch / per_epoch
    lr = learning_rate(base, epoch, optim.epochs, optim.lr_schedule, optim.lr_milestones,
                       optim.lr_gamma)
    if optim.warmup_epochs:
        lr *= warmup_factor((index + 1) / per_epoch, optim.warmup_epochs)
    return lr
