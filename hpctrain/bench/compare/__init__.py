"""``hpctrain bench compare``: the same training under several algorithms, one job each.

Each algorithm runs as its own job through a launcher (``mpirun``, or ``srun`` inside a Slurm
allocation) with the same training options and seed, hence the same initial model and data
order where the algorithm allows; ``sgd`` runs on one process. Options that only some
algorithms take (``--tau``, ``--lam``, ...) go only to those, and the report says which
ignored them (one that no algorithm of ``--algos`` takes is refused); the others
(``--slowdown`` too) go to every run. Bad options, an algorithm this hpctrain does not have
included, are refused before anything runs (one line, exit status 2), and so are a run's
folder that is a file or holds another algorithm's run (or, without ``--resume``, an
unfinished run's checkpoints), and what one run would refuse on its
processes (``hpctrain train``'s own checks, on each planned run: ``--slowdown`` of a rank it
lacks, ``--reduce-op adasum`` on 3 workers, ``--device cuda`` without a GPU where the runs
start on this machine; the line names the run). With ``--eval-rank``,
sgd's run gets a second process, its evaluating rank. A run that fails becomes a row saying why; the
others still run, and the command then exits with status 1 after a line naming the failed
algorithms. With ``--simulate K`` every run is ``hpctrain simulate --workers K`` instead (one
process each, no launcher, virtual times; the simulator's options pass on to every run).
``DIR/<algo>/`` gets each run's outputs plus its
``stdout.log`` and ``stderr.log``; ``DIR/compare.json`` records what ran and how it ended, and
:mod:`hpctrain.bench.report` renders ``report.md`` and the plots from those files as each
run ends (the runs to come: *not run*). SIGUSR1 (a
time limit's warning) goes on to the run going on, no run starts after it, and the command
exits with status 5: ``--resume`` continues (``slurm/compare.sbatch`` requeues itself).
Ctrl-C and SIGTERM end the run going on with the comparison. Either way the report then shows
the run it stopped *unfinished*, and a line names the runs left.
With ``--seeds 1,2,3`` every algorithm runs once per seed (``DIR/<algo>/seed-<S>/``, one run
after the other) and the report gives the mean and spread over the seeds; seeds closer than
the epochs share data orders (global shuffling), which a line at the start and the report say.

The package, one concept a module, each depending only on those above it:

- :mod:`.arguments`: the command's options, its own and the training and simulator options
  it passes on (:class:`~.arguments.TrainOption`);
- :mod:`.launcher`: the command that starts a run's processes (``--launcher`` or the default);
- :mod:`.planning`: the runs planned and checked from the options (``plan``, one
  :class:`~.planning.Run` each), before anything runs;
- :mod:`.record`: ``compare.json`` and the runs' folders: the record a comparison starts
  with, what a ``--resume`` keeps, and whether a finished run is the one planned;
- :mod:`.execution`: one run launched and watched (``execute``): its logs, its progress,
  SIGUSR1, ``--timeout``, and how it ended;
- :mod:`.command`: ``run``, the comparison itself: the runs one after the other, the report
  after each, the signals that stop it, and what it prints at the end.

``hpctrain bench`` finds the command here (``DESCRIPTION``, ``THREAD_LEVEL``,
``add_arguments``, ``run``, as for every benchmark); the rest is imported from the module that
holds it.
"""

from hpctrain.bench.compare.arguments import DESCRIPTION, add_arguments
from hpctrain.bench.compare.command import THREAD_LEVEL, run

__all__ = ["DESCRIPTION", "THREAD_LEVEL", "add_arguments", "run"]
