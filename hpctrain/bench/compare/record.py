"""``compare.json`` and the runs' folders: what a comparison has done, and what a resume keeps.

:func:`start_record` writes nothing: it builds the record a comparison starts with, checks a
``--resume`` against the recorded one (same algorithms, options, simulator, seeds), keeps the
runs that finished (:func:`finished_unrecorded`: also those that finished but were not yet
recorded) and checks every run's folder (:func:`_check_run_folders`). :func:`launch_problem`
says when a finished run did not train on the processes planned, and :func:`set_aside`
moves a failed attempt's folder out of the way before it runs again.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from pathlib import Path

from hpctrain import checkpoint, plugins, provenance, registry, run_folders, steptimes
from hpctrain.bench.compare.arguments import given_options, simulator_words
from hpctrain.bench.compare.planning import Run
from hpctrain.bench.report import reading, rendering
from hpctrain.errors import UsageError
from hpctrain.metrics import read_json, read_points
from hpctrain.summary import own_byte_fields
from hpctrain.summary import read as read_summary

LOGS = ("stdout.log", reading.LOG)  # a run's output, appended in its folder (open_log)


def replayed_sha256(sim_words: list[str]) -> str | None:
    """The sha256 of the step_times.json a simulated comparison replays (``--step-time
    replay:RUN``), so that a resume replays the same times; None without a replay."""
    given = dict(zip(sim_words[::2], sim_words[1::2], strict=True))
    kind, _, run = str(given.get("--step-time", "")).partition(":")
    if kind != "replay":
        return None
    return provenance.sha256_of(steptimes.file_of(run))


def _check_run_folders(out: Path, runs: list[Run], resume: bool) -> None:
    """Each run's folder (``<out>/<algo>``, with ``--seeds`` ``<out>/<algo>/seed-<S>``) must
    be one that run can make or write in, and not another algorithm's run or a comparison,
    nor, without ``--resume``, an unfinished run's: found when the run started, after the
    runs before it had run, a file there was a FileExistsError (exit 1), another run's files
    were written over, and checkpoints got ``train``'s advice, not compare's. Checked after
    :func:`start_record`'s own checks (finished runs; a resume's other algorithm of one
    name); a failed run's folder that holds a summary is set aside on ``--resume``."""
    for r in runs:
        folder, whose = out / r.name, f"{r.label}'s run" + (
            f" of seed {r.seed}" if r.seed is not None else "")
        try:
            run_folders.check_folder("--out", str(folder))
        except UsageError as e:
            raise UsageError(f"{whose}: {e}; choose another --out") from None
        for log in LOGS:  # as open_log refuses them, before any run starts
            with contextlib.suppress(OSError):  # none yet
                run_folders.refuse_unlike_file(f"{whose}: its log", folder / log,
                                               os.lstat(folder / log).st_mode)
        if (folder / reading.RECORD).exists():
            raise UsageError(f"{whose}: --out {folder} holds a bench compare; choose another "
                             "--out")
        recorded = steptimes.recorded_algo(folder / "config.json")  # None: the run says
        if recorded is not None and plugins.absolute(recorded) != plugins.absolute(r.algo):
            raise UsageError(f"{whose}: --out {folder} holds a run of --algo {recorded} "
                             f"(its config.json), not {r.algo}; choose another --out")
        if (folder / "summary.json").exists():  # finished, or set aside on --resume
            continue
        saved = folder / checkpoint.SUBDIR
        usable = checkpoint.listing(saved)
        if usable and not resume:
            raise UsageError(f"{whose}: --out {folder} holds the checkpoints of an unfinished "
                             f"run; continue the comparison with bench compare --resume (--out "
                             f"{out}), or choose another --out")
        if not usable and (aside := checkpoint.corrupt(saved)):  # the run would refuse them,
            # --resume or not
            raise UsageError(f"{whose}: --out {folder} holds an unfinished run's checkpoints, "
                             f"only unusable ones ({checkpoint.named_aside(aside)}): remove "
                             f"them (or {folder}) to run it again, or choose another --out")


def launch_problem(run: Run, summary: dict) -> str | None:
    """Why a finished ``run`` did not train as one job of ``run.np`` processes (its
    ``summary.json``'s ``workers``: the ranks that trained, without ``--eval-rank``'s and
    the ``--servers``), or None."""
    workers = summary["workers"]
    trainers = run.np if run.trainers is None else run.trainers
    if workers == trainers:
        return None
    of = f" of {run.np} processes" if trainers != run.np else ""
    return (f"{workers} rank(s) trained, not {trainers}{of}: the launcher started separate "
            "jobs (inside Slurm try --launcher 'srun --mpi=pmix -n {np}' or 'mpirun -np {np}')")


def start_record(args: argparse.Namespace, runs: list[Run]) -> dict:
    out = Path(args.out)
    train_args = [w for _, ws in given_options(args) for w in ws]
    path = out / reading.RECORD
    simulated = args.simulate is not None
    sim_args = simulator_words(args)
    seeds = getattr(args, "seeds", None)
    sha = replayed_sha256(sim_args) if simulated else None
    record = {"algos": list(dict.fromkeys(r.label for r in runs)), "workers": args.workers,
              "targets": rendering.parse_targets(args.targets), "train_args": train_args,
              "simulated": simulated, "sim_args": sim_args, "runs": {},
              **({"step_times_sha256": sha} if sha else {}),
              **({"seeds": seeds} if seeds else {}), **_own_algorithms(runs)}
    if path.exists():
        if not args.resume:
            raise UsageError(f"--out {out} already holds a comparison; pass --resume to finish "
                             "it, or choose another folder")
        old = reading.read_record(out)
        if sorted(old["algos"]) != sorted(record["algos"]):  # the report would lose rows
            raise UsageError(f"--resume: {out} was run with --algos {','.join(old['algos'])}, "
                             f"not {','.join(record['algos'])}; give the same")
        if (old["train_args"], old["workers"]) != (train_args, args.workers):
            flag = "--simulate" if old.get("simulated") else "--workers"
            raise UsageError(f"--resume: {out} was run with {flag} {old['workers']} and "
                             f"options {shlex.join(old['train_args']) or '(none)'}; give the same")
        # Simulated and real runs, or simulations of other networks, are not one comparison.
        # (A record from before "sim_args" was kept says nothing of them.)
        old_simulated = old.get("simulated", False)
        old_sim_args = old.get("sim_args", sim_args if old_simulated == simulated else None)
        if (old_simulated, old_sim_args) != (simulated, sim_args):
            was = (f"--simulate {old['workers']} " + shlex.join(old_sim_args or [])).strip() \
                if old_simulated else "real jobs (no --simulate)"
            raise UsageError(f"--resume: {out} was run with {was}; give the same")
        for label, reference in old.get("references", {}).items():
            if record["references"].get(label, reference) != reference:
                raise UsageError(f"--resume: {out}'s {label} runs are --algo {reference}, not "
                                 f"{record['references'][label]}; give the same")
        if old.get("step_times_sha256", sha) != sha:
            raise UsageError(f"--resume: the step times {out}'s runs replayed have changed "
                             f"since (now sha256 {sha}, recorded {old['step_times_sha256']}); "
                             "its runs would replay other times")
        if old.get("seeds") != seeds:
            was = "--seeds " + ",".join(map(str, old["seeds"])) if old.get("seeds") else \
                "no --seeds"
            raise UsageError(f"--resume: {out} was run with {was}; give the same")
        record["runs"] = {a: r for a, r in old["runs"].items()
                          if r["status"] == "ok" and (out / a / "summary.json").is_file()}
        for r in runs:  # stopped as it ended: finished, but not yet recorded
            if r.name not in old["runs"] and (found := finished_unrecorded(r, out / r.name)):
                record["runs"][r.name] = found
    else:
        done = [r.name for r in runs if (out / r.name / "summary.json").exists()]
        if done:
            raise UsageError(f"--out {out} already holds finished runs ({', '.join(done)}); "
                             "choose another folder")
    _check_run_folders(out, runs, args.resume)
    return record


def finished_unrecorded(run: Run, run_dir: Path) -> dict | None:
    """The record of ``run`` where its folder holds it finished (its summary.json and curve),
    though the comparison stopped (SIGTERM, Ctrl-C, SIGKILL) before recording it, or
    ``--timeout`` stopped the run after it wrote them (:func:`execute`), else None.
    It must be that run: its config.json's command line (``run_info``'s ``argv``) is the run's
    command, on its ``--out`` (a continued attempt's ``--resume`` allowed), and its summary
    has the ranks it planned. ``--resume`` took such a run for a failed attempt, set it aside
    and trained it again."""
    try:
        summary = read_summary(run_dir)
        read_points(run_dir)
        config = read_json(run_dir / "config.json", "a run's configuration")
        argv, out = config["run_info"]["argv"][1:], config["out"]
    except (UsageError, KeyError, TypeError):
        return None
    resumed = argv[-2:] if argv[-2:-1] == ["--resume"] else []

    def elsewhere(words: list[str]) -> list[str]:  # --out as spelt: the folder is compared
        i = words.index("--out") if "--out" in words[:-1] else len(words)
        return words[:i] + words[i + 2:]

    if elsewhere(argv[:len(argv) - len(resumed)]) != elsewhere(list(run.words)) \
            or not isinstance(out, str) or Path(out).resolve() != run_dir.resolve() \
            or launch_problem(run, summary):
        return None
    return {"np": run.np, "command": shlex.join([*run.command, *resumed]),
            "ignored": run.ignored, "returncode": None, "seconds": None, "status": "ok",
            "error": None}


def _own_algorithms(runs: list[Run]) -> dict:
    """compare.json's record of the users' algorithms among ``runs``: the class each name
    stands for (``references``: a resume must run the same) and its summary fields in bytes
    (``byte_fields``: the report counts them without importing the user's code)."""
    own = {r.label: r.algo for r in runs if plugins.is_reference(r.algo)}
    return {"references": {name: plugins.absolute(algo) for name, algo in own.items()},
            "byte_fields": {name: own_byte_fields(registry.get(algo))
                            for name, algo in own.items()}}


def set_aside(run_dir: Path, label: str) -> None:
    """Before a failed run starts again (``--resume``): a folder of it that holds a summary
    (a launch problem, a run not the one planned:
    :func:`finished_unrecorded` keeps the others) is moved to ``<name>.failed-N``, its logs
    kept, since ``hpctrain train`` refuses an ``--out`` that holds a finished run."""
    if not (run_dir / "summary.json").exists():
        return
    n = 1
    while (aside := run_dir.with_name(reading.set_aside_name(run_dir.name, n))).exists():
        n += 1
    run_dir.rename(aside)
    print(f"{label} the failed attempt's folder is kept as {aside}", file=sys.stderr, flush=True)
