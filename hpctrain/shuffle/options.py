"""The shuffling command-line options and their checks."""

from __future__ import annotations

import argparse

from hpctrain.errors import UsageError

STRATEGIES = ("global", "local", "partial:Q")
PLACEMENTS = ("replicated", "sharded")
PARTITIONS = ("iid", "label-skew")
DEFAULT_CHUNK_MB = 16.0


def add_arguments(parser) -> None:
    """``--shuffle``, ``--data-placement``, ``--partition``, ``--shuffle-chunk-mb``."""
    parser.add_argument("--shuffle", default="global",
                        help="global (fresh permutation of all data each epoch), local (each "
                             "rank reshuffles its fixed part) or partial:Q (each rank also "
                             "sends a fraction Q in [0, 1] of its samples to other ranks)")
    parser.add_argument("--data-placement", default="replicated",
                        help="replicated (every rank reads all data) or sharded (each rank "
                             "reads its part; reshuffling moves samples with MPI)")
    parser.add_argument("--partition", default="iid",
                        help="initial split: iid (file order) or label-skew (sorted by label)")
    parser.add_argument("--shuffle-chunk-mb", type=float, default=DEFAULT_CHUNK_MB,
                        help="sharded exchange: at most this many MB sent per rank per round")


def parse_strategy(text: str) -> tuple[str, float]:
    """``"global"`` -> ("global", 0.0); ``"partial:0.1"`` -> ("partial", 0.1)."""
    name, sep, value = str(text).partition(":")
    if name in ("global", "local") and not sep:
        return name, 0.0
    if name == "partial" and sep:
        try:
            q = float(value)
        except ValueError:
            raise UsageError(f"--shuffle {text}: {value!r} is not a number") from None
        if not 0.0 <= q <= 1.0:
            raise UsageError(f"--shuffle {text}: fraction {value} outside [0, 1]")
        return name, q
    raise UsageError(f"unknown --shuffle {text!r}; choose from {', '.join(STRATEGIES)}")


def validate(args: argparse.Namespace) -> None:
    """Check the shuffling options (no MPI needed); raise UsageError on the first bad one."""
    parse_strategy(args.shuffle)
    placement = getattr(args, "data_placement", "replicated")
    if placement not in PLACEMENTS:
        raise UsageError(f"unknown --data-placement {placement!r}; choose from "
                         f"{', '.join(PLACEMENTS)}")
    partition = getattr(args, "partition", "iid")
    if partition not in PARTITIONS:
        raise UsageError(f"unknown --partition {partition!r}; choose from {', '.join(PARTITIONS)}")
    chunk = getattr(args, "shuffle_chunk_mb", DEFAULT_CHUNK_MB)
    if not chunk > 0:
        raise UsageError(f"--shuffle-chunk-mb {chunk} must be > 0")
