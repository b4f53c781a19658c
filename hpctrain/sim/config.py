"""The simulator's own options (``hpctrain simulate``), declared as the run's are."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from hpctrain import options, provenance, steptimes
from hpctrain.config import RunConfig
from hpctrain.errors import UsageError
from hpctrain.options import Range, check_fields, option
from hpctrain.sim.network import BANDWIDTH, LATENCY_S, STORE_BANDWIDTH, STORE_LATENCY_S, Network
from hpctrain.sim.steptime import StepTimeModel, named

DEFAULT_STEP_TIME = "constant:0.01"
COMM_TIMES = ("model", "replay")
# A real run's options a simulation refuses at every value but none, and why (typed: said
# before the checks of their values, which a simulation never uses; from a file: sim.simulate),
# in :func:`real_run_only`'s words: ``{given}`` the option, ``{online}`` --eval online.
REAL_RUN_ONLY = {
    "eval_rank": "hpctrain simulate scores snapshots on worker 0 ({online}): drop {given}, "
                 "which needs a real run's extra rank",
    "profile": "hpctrain simulate runs every worker in one process, which one profiler cannot "
               "tell apart: drop {given} (profile a real run)",
}


def real_run_only(name: str, value: object) -> str:
    """:data:`REAL_RUN_ONLY`'s refusal of RunConfig field ``name`` given ``value``: by its
    flag on the command line (``--eval-rank 1``, ``--profile``), from Python by the field
    given (``RunConfig.eval_rank=1``, ``RunConfig.profile='20:5'``), who typed no flag."""
    given = options.setting(RunConfig, name, value) if name == "eval_rank" else \
        options.named(options.setting(RunConfig, name), "RunConfig", name, value)  # no value
    return REAL_RUN_ONLY[name].format(given=given,
                                      online=options.setting(RunConfig, "eval_mode", "online"))
STRAGGLER_OPTIONS = ("slowdown", "jitter")  # StragglerConfig's: a real straggler's delays


@dataclass(frozen=True)
class SimConfig:
    """How many virtual workers, how long their steps take, how fast they communicate."""

    workers: int = option(4, "virtual workers (K)", parse=options.positive(int),
                          range=Range(1, options.HUGE))
    step_time: str = option(DEFAULT_STEP_TIME, "step-time model: constant:S, "
                            "lognormal:MEAN:SIGMA, gamma:MEAN:SHAPE or replay:RUN_DIR (a real "
                            "run's step_times.json, its stragglers' delays included)",
                            metavar="MODEL")
    comm_time: str = option("model", "model: communication costs the network model's time; "
                            "replay (with --step-time replay:RUN, asgd and dcasgd-c/-a, RUN "
                            "one of theirs too): each push takes the time the real worker "
                            "spent between that step's compute and the next", choices=COMM_TIMES)
    # Latencies up to options.HUGE seconds, bandwidths from 1 byte/s: past them the virtual
    # times overflow to inf and NaN (--latency 1e308, --store-bandwidth 1e-300).
    latency: float = option(LATENCY_S, "seconds per message between workers "
                            "(collectives)", parse=options.at_least(0, float),
                            range=Range(0, options.HUGE))
    bandwidth: float = option(BANDWIDTH, "bytes/s between workers (collectives)",
                              parse=options.at_least(1, float), range=Range(1))
    store_latency: float = option(STORE_LATENCY_S, "seconds per shard access or "
                                  "counter operation in the parameter store",
                                  parse=options.at_least(0, float),
                                  range=Range(0, options.HUGE))
    store_bandwidth: float = option(STORE_BANDWIDTH, "bytes/s of shard reads and "
                                    "writes in the parameter store",
                                    parse=options.at_least(1, float), range=Range(1))
    train_subset: int | None = option(None, "train on this many samples of the training set "
                                      "(a fixed random subset, the same for every seed), for "
                                      "quick studies", parse=options.positive(int),
                                      range=Range(1))
    # --seed's range: the two seed the same draws by default.
    timing_seed: int | None = option(None, "seeds the step-time and --jitter draws alone "
                                     "(default: --seed), so that a seed study can hold the "
                                     "timing fixed while --seed varies, or vary the timing "
                                     "alone", parse=int, range=Range(-2 ** 63, 2 ** 63 - 1),
                                     metavar="N")
    # Not options. step_times_sha256: the hash of the step_times.json a replay reads (and of
    # its rests), recorded in config.json's sim table, so that a repeat from it replays the
    # same times or is refused (a file rewritten since: a run resumed into RUN, a copy).
    # replayed_stragglers: the run's straggler options (STRAGGLER_OPTIONS) the simulation
    # leaves out, as the replayed real step times already hold their delays (a real run's
    # config.json given to --config: sim.arguments.build); not recorded.
    step_times_sha256: str | None = field(default=None, kw_only=True)
    replayed_stragglers: tuple[str, ...] = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        check_fields(self)
        model = StepTimeModel(self.step_time, 1)  # its form (and a replay's file)
        if model.kind == "replay":  # config.json repeats the run from any folder
            run = os.path.abspath(steptimes.expanded(self.step_time.partition(":")[2]))
            object.__setattr__(self, "step_time", f"replay:{run}")
        object.__setattr__(self, "step_times_sha256", self._replayed_sha256(model.kind))
        object.__setattr__(self, "replayed_stragglers", self._straggler_names())
        if self.comm_time == "replay" and (model.kind != "replay" or model.rests is None):
            replay = options.named("--comm-time replay", "SimConfig", "comm_time", "replay")
            example = options.named("--step-time replay:RUN", "SimConfig", "step_time",
                                    "replay:RUN")
            raise UsageError(f"{replay} needs {example} of a run that recorded its rests "
                             f"(step_times.json with \"rest\"); got {named(self.step_time)}")

    def _straggler_names(self) -> tuple[str, ...]:
        """``replayed_stragglers`` as a tuple of StragglerConfig's field names (one name: a
        tuple of it); UsageError naming one that is not."""
        names = self.replayed_stragglers
        names = (names,) if isinstance(names, str) else tuple(names)
        if unknown := [n for n in names if n not in STRAGGLER_OPTIONS]:
            raise UsageError(f"replayed_stragglers: {unknown[0]!r} is no straggler option; "
                             f"choose from {', '.join(STRAGGLER_OPTIONS)}")
        return names

    def _replayed_sha256(self, kind: str) -> str | None:
        """The sha256 of the step_times.json a replay reads; UsageError where it is not the
        one recorded: a repeat would silently replay other times."""
        recorded = self.step_times_sha256
        if kind != "replay":
            if recorded is not None:
                raise UsageError(f"step_times_sha256 {recorded!r} hashes a replayed run's "
                                 f"step times, not {named(self.step_time)}: drop it")
            return None
        path = steptimes.file_of(self.step_time.partition(":")[2])
        digest = provenance.sha256_of(path)
        if recorded is not None and recorded != digest:
            raise UsageError(f"{named(self.step_time)}: {path} changed since it was "
                             f"replayed (now sha256 {digest}, recorded {recorded}): give "
                             f"{named(self.step_time)} anew to replay it as it is now")
        return digest

    def network(self) -> Network:
        return Network(self.latency, self.bandwidth, self.store_latency, self.store_bandwidth)

    def to_dict(self) -> dict:
        """The options and, for a replay, ``step_times_sha256`` (config.json's sim table)."""
        values = asdict(self)
        del values["replayed_stragglers"]  # done: the run's config no longer holds them
        if values["step_times_sha256"] is None:
            del values["step_times_sha256"]
        return values
