"""``python -m hpctrain`` (and ``torchrun -m hpctrain``): the command line."""

from hpctrain.cli import main

main()
