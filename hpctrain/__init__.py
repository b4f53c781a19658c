"""hpctrain: distributed deep-learning training on HPC clusters with MPI.

The Python API, for a script launched with ``mpirun``::

    import hpctrain

    summary = hpctrain.train(hpctrain.RunConfig(algo="dcasgd-a",
                                                optim=hpctrain.OptimConfig(epochs=3)))

:func:`train` and the configuration classes are imported on first use, so that
``import hpctrain.sync as hvd`` stays light.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # what __getattr__ imports, for type checkers and editors
    from hpctrain.config import (
        CheckpointConfig,
        DataConfig,
        ModelConfig,
        OptimConfig,
        RunConfig,
        StragglerConfig,
    )
    from hpctrain.config import load as load_config
    from hpctrain.registry import options_of as algorithm_options
    from hpctrain.result import Summary
    from hpctrain.run import train

# Public name -> (module, attribute), imported on first use.
_API = {
    "train": ("hpctrain.run", "train"),
    **{name: ("hpctrain.config", name) for name in (
        "RunConfig", "DataConfig", "ModelConfig", "OptimConfig", "CheckpointConfig",
        "StragglerConfig")},
    "load_config": ("hpctrain.config", "load"),
    "algorithm_options": ("hpctrain.registry", "options_of"),
    "Summary": ("hpctrain.result", "Summary"),
}
# Written out (not [*_API]) so that type checkers and ruff see what the package exports.
__all__ = ["train", "RunConfig", "DataConfig", "ModelConfig", "OptimConfig",
           "CheckpointConfig", "StragglerConfig", "load_config", "algorithm_options",
           "Summary", "__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'hpctrain' has no attribute {name!r}")
    import importlib

    module, attribute = _API[name]
    return getattr(importlib.import_module(module), attribute)


def __dir__() -> list[str]:
    """The lazily imported API too, for dir(hpctrain), help() and completion."""
    return sorted({*globals(), *_API})
