"""The algorithms hpctrain trains with: name -> class, in the order reports list them.

Adding an algorithm is one module with an :class:`hpctrain.algorithm.Algorithm` subclass and one
line here. The command line's option groups, the refusal of another algorithm's option,
``bench compare``'s forwarding and the report's order all read this list.
"""

from __future__ import annotations

from hpctrain.algorithm import Algorithm
from hpctrain.async_.algorithm import ASGD, SSP, DCASGDAdaptive, DCASGDConstant
from hpctrain.ec.algorithm import EnsembleCompression, ModelAveraging
from hpctrain.sync.algorithm import Sequential, Synchronous

ALGORITHMS: dict[str, type[Algorithm]] = {a.name: a for a in (
    Sequential, Synchronous, ASGD, DCASGDConstant, DCASGDAdaptive, SSP,
    ModelAveraging, EnsembleCompression)}


def names() -> tuple[str, ...]:
    return tuple(ALGORITHMS)


def get(name: str) -> type[Algorithm]:
    """The class of algorithm ``name``; UsageError naming the choices if there is none."""
    from hpctrain.errors import UsageError

    try:
        return ALGORITHMS[name]
    except (KeyError, TypeError):  # TypeError: a list or dict, which no name is
        raise UsageError(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}") \
            from None


def owners(field_name: str) -> list[str]:
    """The algorithms whose options include ``field_name``."""
    from dataclasses import fields

    return [n for n, a in ALGORITHMS.items()
            if field_name in {f.name for f in fields(a.Options)}]


def options_of(name: str) -> type:
    """The options dataclass of algorithm ``name`` (``hpctrain.algorithm_options("ec")(tau=5)``)."""
    return get(name).Options
