"""hpctrain: distributed deep-learning training on HPC clusters with MPI."""

__version__ = "0.1.0"
