"""What the shuffle package needs to know about a run's training data, and its checks.

A plain frozen dataclass rather than an ``argparse.Namespace``, so the package does not
depend on how (or whether) a command line declares its options.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpctrain import options
from hpctrain.errors import UsageError
from hpctrain.options import HUGE

STRATEGIES = ("global", "local", "partial:Q")
PLACEMENTS = ("replicated", "sharded")
PARTITIONS = ("iid", "label-skew")
DEFAULT_CHUNK_MB = 16.0


def parse_strategy(text: str) -> tuple[str, float]:
    """``"global"`` -> ("global", 0.0); ``"partial:0.1"`` -> ("partial", 0.1)."""
    name, sep, value = str(text).partition(":")
    if name in ("global", "local") and not sep:
        return name, 0.0
    if name == "partial" and sep:
        try:
            q = float(value)
        except ValueError:
            raise UsageError(f"{_named('shuffle', text)}: {value!r} is not a number") from None
        q = q or 0.0  # -0 (partial:-0, a tiny negative) is 0: one spelling, partial:0
        if not 0.0 <= q <= 1.0:
            raise UsageError(f"{_named('shuffle', text)}: fraction {value} outside [0, 1]")
        return name, q
    raise _unknown("shuffle", text, STRATEGIES)


def _named(name: str, value: object) -> str:
    """DataConfig field ``name`` with ``value`` in a refusal: as typed on the command line
    (``--shuffle partial:x``), from Python as the field given (``DataConfig.shuffle=...``,
    :func:`hpctrain.options.named`), who typed no flag."""
    flag = "--" + name.replace("_", "-")
    return options.named(f"{flag} {value}", "DataConfig", name, value)


def _unknown(name: str, value: object, choices: tuple[str, ...]) -> UsageError:
    """The refusal of an unknown value, worded as :func:`hpctrain.options.check_fields`
    words one: ``unknown --shuffle 'x'; ...`` typed, ``DataConfig.shuffle='x' is unknown;
    ...`` from Python."""
    listed = f"choose from {', '.join(choices)}"
    if options.on_command_line():
        return UsageError(f"unknown --{name.replace('_', '-')} {value!r}; {listed}")
    return UsageError(f"{options.named('', 'DataConfig', name, value)} is unknown; {listed}")


def canonical_strategy(text: str) -> str:
    """``--shuffle`` as one spelling of its value (``partial:.5`` and ``partial:5e-1`` are
    ``partial:0.5``): a resumed run compares it with the run's as text."""
    name, q = parse_strategy(text)
    return name if name != "partial" else f"partial:{q!r}".removesuffix(".0")


@dataclass(frozen=True)
class TrainDataSpec:
    """The training set to load and how to shuffle it over the ranks.

    Checked on construction (no MPI needed), so a bad value fails with a one-line UsageError
    before any rank starts loading; the messages name the command-line options, and from
    Python DataConfig's fields, which build it.
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    seed: int = 0
    shuffle: str = "global"  # global, local or partial:Q
    data_placement: str = "replicated"  # replicated or sharded
    partition: str = "iid"  # iid or label-skew
    shuffle_chunk_mb: float = DEFAULT_CHUNK_MB  # sharded: max MiB sent per rank per round

    def __post_init__(self) -> None:
        parse_strategy(self.shuffle)
        if self.data_placement not in PLACEMENTS:
            raise _unknown("data_placement", self.data_placement, PLACEMENTS)
        if self.partition not in PARTITIONS:
            raise _unknown("partition", self.partition, PARTITIONS)
        if not 0 < self.shuffle_chunk_mb <= HUGE:  # also rejects NaN; MiB x 2**20 is an int
            raise UsageError(f"{_named('shuffle_chunk_mb', self.shuffle_chunk_mb)} must be in "
                             f"(0, {HUGE:g}]")
