"""Accounting of aggregation rounds: bytes each rank sends and seconds each round takes.

Bytes are the payload volume a rank sends under the bandwidth-optimal (ring) algorithms, so
they do not depend on which algorithm the MPI library picks: an allreduce of ``B`` bytes sends
``2 (K-1)/K B`` per rank (:func:`hpctrain.comm.allreduce_bytes`), an allgather sends the
rank's own block to ``K-1`` peers, and a reduce-scatter sends the rows that belong to the other
ranks.
"""

from __future__ import annotations

from collections import defaultdict

from hpctrain.metrics import distribution


class AggregationStats:
    """Bytes and seconds of every aggregation round on this rank, with optional time parts,
    and (EC) the samples its model inferred: with ``inference_s``, the rate at which this
    machine runs the model, which a simulation replaying the run charges (sim.simulate)."""

    def __init__(self, counts_inference: bool = False) -> None:
        # EC's: inferred_samples is in every summary, 0 before a round (a schema's required
        # field), not only once a round counted some.
        self.counts_inference = counts_inference
        self.bytes: list[int] = []
        self.seconds: list[float] = []
        self.parts: dict[str, float] = defaultdict(float)
        self.inferred: int | None = 0  # None: unknown (resumed from a checkpoint without it)

    def record(self, nbytes: int, seconds: float, inferred: int = 0, **parts: float) -> None:
        self.bytes.append(int(nbytes))
        self.seconds.append(seconds)
        if self.inferred is not None:
            self.inferred += int(inferred)
        for name, value in parts.items():
            self.parts[name] += value

    def state_dict(self) -> dict:
        return {"bytes": list(self.bytes), "seconds": list(self.seconds),
                "parts": dict(self.parts), "inferred": self.inferred}

    def load_state_dict(self, state: dict) -> None:
        self.bytes, self.seconds = list(state["bytes"]), list(state["seconds"])
        self.parts = defaultdict(float, state["parts"])
        # A checkpoint from before the count: the rounds after it alone would be a part
        # count against inference_s's whole time (a wrong rate for a replay), so none is said.
        self.inferred = state.get("inferred")

    def summary(self) -> dict:
        """Rounds, bytes sent per rank (total, and per round: the mean to the byte, as rounds
        differ after a resume on another number of ranks), and the seconds per round.
        JSON types hold with no round too: bytes integers, seconds floats."""
        rounds = len(self.bytes)
        total = sum(self.bytes)
        shown = self.inferred is not None and (self.counts_inference or self.inferred > 0)
        return {
            "rounds": rounds,
            "bytes_per_rank": total,
            "bytes_per_round": round(total / rounds) if rounds else 0,
            "seconds_per_round": distribution(self.seconds),
            "total_s": sum(self.seconds, 0.0),
            **{f"{name}_s": value for name, value in sorted(self.parts.items())},
            **({"inferred_samples": self.inferred} if shown else {}),
        }
