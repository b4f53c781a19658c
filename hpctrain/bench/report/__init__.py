"""``hpctrain report DIR``: ``report.md`` and plots from saved run outputs, rerunning nothing.

DIR is a comparison's folder (``compare.json`` and one ``DIR/<algo>/`` per run, written by
``hpctrain bench compare``; with ``--seeds``, ``DIR/<algo>/seed-<S>/``) or any folder whose
subfolders (``<algo>/seed-<S>/`` too: one algorithm's seeds), or itself, hold finished runs
(``summary.json`` and ``metrics.jsonl``). The plots
follow the DC-ASGD paper's figures: test error (%) against wall time and against epochs, one
line per algorithm (with seeds: their mean at the same epoch, shaded from the lowest to the
highest, dashed where a run ended early; against wall time a bar at its end from the
fastest to the slowest seed's end time). Under the table, the machine's load as the runs'
summaries recorded it. With seeds
the table gives each algorithm's mean and sample standard deviation over the seeds whose run
finished, then every run. A run with no end recorded (the comparison stopped) is *unfinished*
if its folder holds files, else *not run*; without ``compare.json``, so is a subfolder with a
run's ``config.json`` and no summary, and a seed an algorithm lacks that others have; the
failed attempts ``bench compare --resume`` set aside (``<run>.failed-N``) are no runs. The
output depends only on the saved files, so rendering twice gives the same bytes.

A value of the wrong type in a run's files (edited by hand, another tool's) does not end the
report: the table shows ``n/a`` there, or the plots leave out that curve point, and one line on
stderr names the file and key. ``report.md`` and the plots are written together or not at all.
The lines hpctrain printed on a run's stderr (``stderr.log`` in its folder, kept by ``bench
compare``) are listed under the tables, since a warning there can explain a figure.

The package, one concept a module, each depending only on those above it:

- :mod:`.reading`: the folder read into one :class:`~.reading.Row` per run (``load``), its
  values checked once;
- :mod:`.formatting`: how a value and a mean ± sd over seeds are written;
- :mod:`.tables`: the runs' and the seeds' tables;
- :mod:`.remarks`: the lines around them (environment, load, the runs' notes, settings);
- :mod:`.plotting`: the curves and the figures;
- :mod:`.document`: report.md put together from those;
- :mod:`.rendering`: the ``hpctrain report`` command, and ``render``, which writes the files.

The names a user of the package calls (the command's ``add_arguments``, ``run`` and
``report_folder``; ``load``, ``markdown``, ``figure``, ``plot`` and ``render``; ``Row`` and
the folder's file names) are importable from ``hpctrain.bench.report`` itself too, as they
were when it was one module; the rest from the module that holds them.
"""

from hpctrain.bench.report.document import markdown
from hpctrain.bench.report.plotting import figure, plot
from hpctrain.bench.report.reading import RECORD, REPORT, Row, load
from hpctrain.bench.report.rendering import add_arguments, render, report_folder, run

__all__ = ["RECORD", "REPORT", "Row", "add_arguments", "figure", "load", "markdown", "plot",
           "render", "report_folder", "run"]
