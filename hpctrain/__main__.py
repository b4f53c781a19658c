"""``python -m hpctrain``, ``torchrun -m hpctrain`` and the ``hpctrain`` command."""

import sys


def main() -> None:
    """The command line; ``horovodrun`` goes straight to its launcher, before torch is imported,
    and ``train`` and ``bench compare`` record SIGUSR1 (a time limit's warning) before torch
    is imported too: from then on the signal never ends the run without its checkpoint. The
    one-line abort hook comes before torch too: Ctrl-C during its second of imports printed
    importlib's traceback, not ``hpctrain: interrupted`` and 130."""
    if sys.argv[1:2] == ["horovodrun"]:
        from hpctrain import horovodrun

        horovodrun.main(sys.argv[2:])
        return
    from hpctrain import job_end  # mpi4py's package, not MPI: milliseconds
    from hpctrain.checkpoint import stop

    job_end.install_abort_on_error()  # cli.main installs it again, for a script's calls
    stop.install_for(sys.argv[1:])
    from hpctrain.cli import main as cli_main

    try:
        cli_main()
    finally:
        stop.ignore_from_now()  # the process ends: no signal may end it on the way


if __name__ == "__main__":
    main()
