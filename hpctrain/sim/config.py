"""The simulator's own options (``hpctrain simulate``), declared as the run's are."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from hpctrain import options
from hpctrain.errors import UsageError
from hpctrain.options import Range, check_fields, option
from hpctrain.sim.network import BANDWIDTH, LATENCY_S, STORE_BANDWIDTH, STORE_LATENCY_S, Network
from hpctrain.sim.steptime import StepTimeModel

DEFAULT_STEP_TIME = "constant:0.01"
COMM_TIMES = ("model", "replay")


@dataclass(frozen=True)
class SimConfig:
    """How many virtual workers, how long their steps take, how fast they communicate."""

    workers: int = option(4, "virtual workers (K)", parse=options.positive(int),
                          range=Range(1, options.HUGE))
    step_time: str = option(DEFAULT_STEP_TIME, "step-time model: constant:S, "
                            "lognormal:MEAN:SIGMA, gamma:MEAN:SHAPE or replay:RUN_DIR (a real "
                            "run's step_times.json)", metavar="MODEL")
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

    def __post_init__(self) -> None:
        check_fields(self)
        model = StepTimeModel(self.step_time, 1)  # its form (and a replay's file)
        if model.kind == "replay":  # config.json repeats the run from any folder
            run = os.path.abspath(self.step_time.partition(":")[2])
            object.__setattr__(self, "step_time", f"replay:{run}")
        if self.comm_time == "replay" and (model.kind != "replay" or model.rests is None):
            raise UsageError(f"--comm-time replay needs --step-time replay:RUN of a run that "
                             f"recorded its rests (step_times.json with \"rest\"); got "
                             f"--step-time {self.step_time}")

    def network(self) -> Network:
        return Network(self.latency, self.bandwidth, self.store_latency, self.store_bandwidth)

    def to_dict(self) -> dict:
        return asdict(self)
