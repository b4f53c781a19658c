"""hpctrain: distributed deep-learning training on HPC clusters with MPI.

The Python API, for a script launched with ``mpirun``::

    import hpctrain

    summary = hpctrain.train(hpctrain.RunConfig(algo="dcasgd-a",
                                                optim=hpctrain.OptimConfig(epochs=3)))

:func:`train` and the configuration classes are imported on first use, so that
``import hpctrain.sync as hvd`` stays light.
"""

__version__ = "0.1.0"

_API = {
    "train": "hpctrain.run",
    "RunConfig": "hpctrain.config",
    "DataConfig": "hpctrain.config",
    "ModelConfig": "hpctrain.config",
    "OptimConfig": "hpctrain.config",
    "CheckpointConfig": "hpctrain.config",
    "StragglerConfig": "hpctrain.config",
    "load_config": "hpctrain.config",
    "algorithm_options": "hpctrain.registry",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'hpctrain' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_API[name])
    return getattr(module, {"load_config": "load", "algorithm_options": "options_of"}
                   .get(name, name))
