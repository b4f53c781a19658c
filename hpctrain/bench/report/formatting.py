"""How report.md writes a value: Markdown-safe text (:func:`plain_text`, :func:`as_code`), counts
of updates and bytes, and a mean ± sample standard deviation over seeds (:func:`mean_sd`),
written no finer than the values themselves are.

Kept apart so that the tables, the notes and the plots' legends write a number one way.
"""

from __future__ import annotations

import decimal
import math
import re

from hpctrain.bench.report.reading import NA


def plain_text(text: str) -> str:
    """``text`` (a run's name: its folder's, which may be any) shown as itself in a Markdown
    table cell or list item: ``|`` split a cell in two, and ``*``, ``_``, a backtick or a
    bracket turned into emphasis, code or a link; a line break ended the table row."""
    text = " ".join(str(text).splitlines())
    return re.sub(r"([\\`*_\[\]<>|])", r"\\\1", text)


def as_code(text: str) -> str:
    """``text`` as a Markdown code span, which may hold backticks."""
    fence = "`" * (max((len(m) for m in re.findall("`+", text)), default=0) + 1)
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def updates_text(n: float) -> str:
    """A staleness percentile (interpolated: 14.14, or a mean over seeds: 0.5) as 14.14 and
    0.5, a whole one as 14: rounding to whole updates showed 0.5 as 0."""
    return f"{n:.2f}".rstrip("0").rstrip(".")


def bytes_text(n: float) -> str:
    """1023 B, 1.5 KiB, ..., GiB the largest unit. A unit is taken while the value rounds,
    as written, below 1024 of it: 1048575 B is 1.0 MiB, not 1024.0 KiB."""
    if abs(round(n, 0)) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(round(n, 1)) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def _spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = mean_of(values)
    if len(values) < 2:
        return mean, 0.0
    # x * x, not x ** 2: a float's ** raises OverflowError where * gives inf
    sd = math.sqrt(sum((v - mean) * (v - mean) for v in values) / (len(values) - 1))
    # 0 for equal values summed in another order; a NaN stays NaN (nan ± nan, not nan ± 0)
    return mean, 0.0 if sd <= 1e-12 * abs(mean) else sd


def mean_of(values: list[float]) -> float:
    return sum(values) / len(values)


def mean_sd(values: list[float], fmt) -> str:
    """``values``' mean ± sample standard deviation as a scientist writes it: the sd to two
    significant figures and the mean to the same decimal place (2.50 ± 0.71, 0.8930 ±
    0.0012, 26 ± 11, 150 ± 71), never rounded past the units (an sd of 100 or more is whole:
    752 ± 1059) nor so far that the mean loses the leading digit that ``fmt``, the column's
    format of one value, shows (0.004 ± 0.430, not 0.00 ± 0.43). The mean so keeps every
    digit ``fmt`` shows unless the sd is 10 or more units of ``fmt``'s last one, a digit the
    spread makes noise (0.893 ± 0.017 for accuracies, ``fmt`` ``{:.4f}``). One value is
    ``fmt(mean)``, equal values (an sd of 0) ``fmt(mean) ± fmt(0)``. Both were ``fmt``'s:
    "2.5 ± 0.707 s" gave the sd more digits than the mean. Nor is either written finer than
    a value carries: the decimals ``fmt`` shows of the mean, or the mean's third significant
    figure where ``fmt`` drops zeros (2.50 s, :func:`hpctrain.metrics.seconds`'s ``.3g``);
    an sd that rounds to zero there reads ``<`` one unit of that place (0.8930 ± <0.0001,
    not 0.89300050 ± 0.00000071: digits no run's value shows; not ± 0.0000, which says the
    seeds' values are equal)."""
    if not values:
        return NA
    mean, sd = _spread(values)
    if len(values) == 1:
        return fmt(mean)
    if sd == 0 or not math.isfinite(sd + mean):  # an overflow of huge values too: as fmt has it
        return f"{fmt(mean)} ± {fmt(sd)}"
    rounded = float(f"{sd:.1e}")  # two significant figures: 0.0996 is 0.10, its place 2
    place = max(1 - math.floor(math.log10(rounded)), 0)
    finest = _decimals(fmt(mean))  # the finest place a value is written to
    if mean != 0:  # the place of the mean's leading digit, as far as fmt shows one
        lead = -math.floor(math.log10(abs(mean)))
        place = max(place, min(lead, _decimals(fmt(mean), zero=False)))
        if _drops_zeros(fmt):
            finest = max(finest, lead + 2)
    place = min(place, finest)
    shown = f"{mean:.{place}f}"
    if float(shown) == 0:  # -0.00: a mean rounded to zero has no sign
        shown = f"{0:.{place}f}"
    spread = f"{sd:.{place}f}"
    if float(spread) == 0:  # below the last place shown: less than one unit of it
        spread = f"<{10.0 ** -place:.{place}f}"
    return f"{shown} ± {spread}"


def _drops_zeros(fmt) -> bool:
    """Whether ``fmt`` writes a value to the places it needs (``.3g``: 0.125, 0.5) rather
    than to a fixed number of them (``.4f``, ``.0f``), whose own places bound a spread's."""
    return _decimals(fmt(0.125)) != _decimals(fmt(0.5))


def _decimals(text: str, zero: bool = True) -> int:
    """The decimal places a formatted number shows: 4 for 0.8930, 0 for 150, 5 for 5e-05; a
    zero's too (4 for -0.0000) with ``zero``, else 0 for it (float noise of a mean of zero);
    0 for anything not a number."""
    try:
        number = decimal.Decimal(text)
    except decimal.InvalidOperation:
        return 0
    exponent = number.as_tuple().exponent
    return max(-exponent, 0) if (number or zero) and isinstance(exponent, int) else 0
