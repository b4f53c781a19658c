"""An option named in a refusal: on the command line as typed, from Python as its field.

A value that names code or a file (``--model``, ``--dataset``, ``--algo``, ``--init-from``,
``--data-dir``, ``--step-time``) is checked below :mod:`hpctrain.config`, by modules that do
not know which dataclass field gave it; :data:`FIELDS` says, and :func:`said` names it
through :func:`hpctrain.options.named` (``--model 'x:'`` typed, ``ModelConfig.name='x:'``
from Python).
"""

from __future__ import annotations

from hpctrain import options

# The options that name code or a file -> the Python field that gives each, as a refusal
# names it to a Python caller (:func:`said`); this library sits below hpctrain.config.
FIELDS = {"--model": ("ModelConfig", "name"), "--dataset": ("DataConfig", "dataset"),
          "--algo": ("RunConfig", "algo"), "--init-from": ("ModelConfig", "init_from"),
          "--data-dir": ("DataConfig", "data_dir"),
          "--step-time": ("SimConfig", "step_time")}  # replay:PATH: a path is a part of it


def said(flag: str, *value: object, typed: str | None = None,
         field: tuple[str, str] | None = None) -> str:
    """Option ``flag`` in a refusal: on the command line as typed (``typed``, else the flag
    alone: ``--model 'x:'``); from Python as the field that gives it (``field``, else
    :data:`FIELDS`'), with ``=value`` where one is given (``ModelConfig.name='x:'``,
    :func:`hpctrain.options.named`), who typed no flag. An option of neither: as typed."""
    shown = flag if typed is None else typed
    field = field or FIELDS.get(flag)
    return shown if field is None else options.named(shown, *field, *value)
