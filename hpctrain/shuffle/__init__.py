"""Data shuffling: global, local and partial(q) reshuffling, with data replicated or sharded.

``--shuffle global`` draws a fresh permutation of the whole training set each epoch and deals
it out to the ranks; ``local`` keeps a fixed partition and reshuffles within each rank;
``partial:Q`` also sends a fraction Q of each rank's samples to random other ranks each epoch.
With ``--data-placement sharded`` each rank reads only its part of the files and the samples
themselves move between ranks (MPI Alltoallv, in bounded chunks).
"""

from hpctrain.shuffle.options import TrainDataSpec, parse_strategy
from hpctrain.shuffle.samplers import (
    GlobalShuffleSampler,
    LocalShuffleSampler,
    PartialShuffleSampler,
)
from hpctrain.shuffle.train_data import (
    ReplicatedTrainData,
    TrainData,
    make_train_data,
    steps_per_epoch,
)

__all__ = [
    "GlobalShuffleSampler",
    "LocalShuffleSampler",
    "PartialShuffleSampler",
    "ReplicatedTrainData",
    "TrainData",
    "TrainDataSpec",
    "make_train_data",
    "parse_strategy",
    "steps_per_epoch",
]
