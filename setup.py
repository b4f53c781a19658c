"""hpctrain package. The CPU compensation kernel is built here (kernels/dc_update.cpp)."""

from setuptools import find_packages, setup

setup(
    name="hpctrain",
    version="0.1.0",
    description="Distributed deep-learning training on HPC clusters: DC-ASGD on MPI RMA, "
    "ensemble compression, data shuffling, Horovod-compatible synchronous SGD",
    packages=find_packages(include=["hpctrain", "hpctrain.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.1", "mpi4py>=4.0", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-mpi", "pytest-timeout", "ruff"],
        "plot": ["matplotlib"],
        # Built from source by scripts/build_horovod.sh (0.28.1 needs a C++17 patch for torch>=2.1).
        "horovod": ["horovod==0.28.1"],
    },
    entry_points={"console_scripts": ["hpctrain=hpctrain.cli:main"]},
)
