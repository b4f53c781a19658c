"""On/off environment variables, all read one way: 1/0, true/false, yes/no, on/off.

hpctrain's own switches (``HPCTRAIN_CUDA_AWARE_MPI``, ``HPCTRAIN_CHECK_COLLECTIVES``,
``HPCTRAIN_DEBUG``) take the same words in any case; anything else is refused naming the value,
since a misspelt switch otherwise kept its default without a word (``HPCTRAIN_DEBUG``, read by
the hook that reports errors, takes it as on instead). Horovod's own variables keep Horovod's
reading (:mod:`hpctrain.sync.stall`).
"""

from __future__ import annotations

import os
from typing import overload

from hpctrain.errors import UsageError

ON, OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@overload
def switch(variable: str, default: bool) -> bool: ...


@overload
def switch(variable: str, default: None = None) -> bool | None: ...


def switch(variable: str, default: bool | None = None) -> bool | None:
    """``variable`` read as on or off; ``default`` when it is unset or empty."""
    raw = os.environ.get(variable, "")
    word = raw.strip().lower()
    if not word:
        return default
    if word in ON or word in OFF:
        return word in ON
    raise UsageError(f"{variable} must be 1 or 0 (true/false, yes/no, on/off), got {raw!r}")
