"""report.md as a whole (:func:`markdown`): the tables (:mod:`.tables`) and the remarks
(:mod:`.remarks`) in their order, the notes that say what the columns and the seeds' figures
mean, the plots' section and each run's command.

Only the order and the fixed text live here; it reads no file and writes none
(:mod:`.rendering` does).
"""

from __future__ import annotations

import shlex

from hpctrain.bench.report.formatting import as_code, plain_text
from hpctrain.bench.report.plotting import BAND_NOTE, NO_PLOTS
from hpctrain.bench.report.reading import FROM_PYTHON, NOT_RUN, UNFINISHED, Row
from hpctrain.bench.report.remarks import (
    differing_settings,
    environment,
    final_models_note,
    machine_load,
    notes,
    scoring,
    seed_orders,
    setting,
    simulated_runs,
    simulator_settings,
)
from hpctrain.bench.report.tables import seed_table, table

# What report.md says under the seeds' table: how it summarises a run per seed
SEEDS_NOTE = ("Each algorithm ran once per seed ({seeds}): the table gives the mean ± sample "
              "standard deviation over the seeds whose run finished (the deviation to two "
              "significant figures, whole from 100 up, the mean to the same decimal place, neither "
              "finer than one run's value is written: *± <0.0001*, a deviation below that "
              "place; a time"
              " to a target: over those that reached it; *in 1 of 2*: the value is in that many "
              "of them), the largest peak memory and staleness max of any seed's run, and the "
              "other staleness figures (each run's mean, p50, p90 and p99: a mean of the runs' "
              "percentiles, not a percentile of all their pushes) and byte counts averaged. Every"
              " run:")
# What report.md says under the runs' table: what each of its columns measures, and how
TABLE_NOTE = ("Accuracies are fractions of the test set. *Time to* a target is the wall time (and"
              " the epochs of data consumed) at the first snapshot whose test accuracy reaches "
              "it; snapshots are taken every `--eval-every` epochs and {scoring}. Staleness "
              "(async runs) counts, per push, the other workers' updates the worker's model "
              "lacked (exact with `--consistency locked`; `atomic` counts the pushes finished "
              "since the worker's last one). Its mean is set by the push counts more than the "
              "timing (about M-1 for M workers; `locked`'s a little above on a loaded machine): "
              "p90, p99 and max tell runs apart. *Samples/s* counts training samples (ec's "
              "batches' own, not the relabelled samples distilled beside them). *Peak memory* is "
              "the largest worker's `peak_memory_per_worker` during training (the process's peak "
              "resident set on a CPU, memory torch allocated on a GPU; none in a simulation). "
              "*Bytes communicated per rank* are the byte counts a run's summary.json holds, each"
              " what a rank sent, an allreduce counted as a ring's 2(K-1)/K of its payload "
              "whatever algorithm MPI picked: gradient allreduce (`allreduce_bytes_per_rank`), "
              "model aggregation or exchange of ma/ec (`aggregation.*`), the sharded data "
              "exchange (`bytes_moved`) and, for async runs, the model payload a worker read from"
              " and wrote to the parameter store (`store_bytes_per_worker`, mean over workers, "
              "whether MPI or loads and stores on shared-memory windows moved it; "
              "`store_mpi_bytes_per_worker` is the part of it MPI calls moved, not more bytes).")


def _intro_lines(record: dict, rows: list[Row]) -> list[str]:
    """report.md's lines above the tables: the options the runs got (a comparison's record)
    or that they were found here, then what set them apart from a plain run of each, so
    that the figures below are read with how they were made."""
    if record:
        options = shlex.join(record.get("train_args", [])) or "(defaults)"  # pasteable
        evaluating = "--eval-rank" in record.get("train_args", [])
        per_run = "processes per run, one of them evaluating" if evaluating else \
            "workers per run"
        sgd = "" if "sgd" not in record["algos"] else \
            ", sgd on one process and one evaluating (its --eval-rank 1)" if evaluating else \
            ", sgd on one process"
        out = [f"Training options: {as_code(options)} (each run gets those its algorithm takes); "
               f"{record['workers']} {per_run}{sgd}."]
    else:
        out = ["Runs found in this folder."]
    out += [line for line in (simulated_runs(record, rows), simulator_settings(rows),
                              setting(rows), environment(rows)) if line]
    if differing := differing_settings(rows):
        out += ["", differing]
    return out


def _seed_section(seeds: list, rows: list[Row], targets: list[float]) -> list[str]:
    """With ``seeds``, the table of each algorithm over its seeds and how it summarises
    them, above the table of every run; nothing without."""
    if not seeds:
        return []
    out = ["", seed_table(rows, targets), ""]
    if models := final_models_note(rows):
        out += [models, ""]
    if orders := seed_orders(rows):
        out += [f"**Seeds that share data orders:** {orders}", ""]
    return out + [SEEDS_NOTE.format(seeds=", ".join(map(str, seeds)))]


def _ignored_flags_lines(rows: list[Row]) -> list[str]:
    """One line per flag some algorithms were not given (they do not take it), naming each
    algorithm once, whatever its seeds."""
    ignored: dict[str, list[str]] = {}
    for r in rows:
        for flag in r.ignored:
            names = ignored.setdefault(flag, [])
            if r.name not in names:
                names.append(r.name)
    return [f"\n`{flag}` was not given to {', '.join(names)}: "
            f"{'it does' if len(names) == 1 else 'they do'} not take it."
            for flag, names in ignored.items()]


def _plots_section(plots: bool, seeds: list) -> list[str]:
    """The plots (with seeds, what their lines and shades are), or why there are none."""
    if not plots:
        return ["", f"*No plots: {NO_PLOTS}.*"]
    return (["", BAND_NOTE] if seeds else []) + [
        "", "![test error against wall time](error_vs_time.png)",
        "![test error against epochs](error_vs_epochs.png)"]


def _commands_section(rows: list[Row], record: dict) -> list[str]:
    """The command line of each run that has one; outside a comparison (no ``record``),
    said to be the one its config.json records."""
    commands = [(r.title, r.command) for r in rows if r.command]
    if not commands:
        return []
    out = ["", "## Commands", ""]
    if not record:
        out += ["Each run's command line, as its config.json records it (without the "
                "launcher that started its processes: mpirun, srun, torchrun; a script's "
                "with `python` before it).", ""]
    return out + [f"- {plain_text(title)}: "
                  f"{command if command == FROM_PYTHON else as_code(command)}"
                  for title, command in commands]


def markdown(record: dict, rows: list[Row], targets: list[float], plots: bool = True) -> str:
    """The whole ``report.md`` (``plots``: whether the PNGs it shows were drawn)."""
    seeds = record.get("seeds") or sorted({r.seed for r in rows if r.seed is not None})
    out = ["# Algorithm comparison", "", *_intro_lines(record, rows),
           *_seed_section(seeds, rows, targets),
           "", table(rows, targets), ""]
    if not seeds and (models := final_models_note(rows)):  # under the first table
        out += [models, ""]
    out.append(TABLE_NOTE.format(scoring=scoring(rows)))
    if loaded := machine_load(rows):
        out += ["", loaded]
    if any(r.status in (UNFINISHED, NOT_RUN) for r in rows):
        out.append(f"\n*{UNFINISHED}*: a run that started and has no summary (stopped, or "
                   f"still going on); *{NOT_RUN}*: one that has not started"
                   + ("; `bench compare --resume` runs them." if record else "."))
    out += _ignored_flags_lines(rows)
    if printed := notes(rows):
        out += ["", printed]
    out += _plots_section(plots, seeds) + _commands_section(rows, record)
    return "\n".join(out) + "\n"
