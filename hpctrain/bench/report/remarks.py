"""The lines report.md writes around its tables, each from the rows alone and None where
it has nothing to say: the machine and library versions the runs differ in
(:func:`environment`), the machine's load, the runs' own stderr notes, which final model was
scored, the settings the runs differ in, the simulated runs and their simulator's settings,
how snapshots were scored, and which seeds share data orders (:func:`shared_orders_note`,
which ``bench compare`` prints too).

One function per remark, so a test can ask one; :mod:`.document` orders them.
"""

from __future__ import annotations

from hpctrain.bench.report.formatting import as_code, plain_text
from hpctrain.bench.report.reading import (
    LOG,
    REPORT,
    Row,
    _all_simulated,
    _flat,
    _is_count,
    _is_number,
    _simulated,
    _trained_with,
    by_algorithm,
    final_model,
)
from hpctrain.bench.report.tables import SIMULATED_MARK

# run_info keys the report names, with their labels, in the order it names them
ENVIRONMENT = (("device", "device"), ("gpu", "GPU"), ("library", "MPI"), ("torch", "torch"),
               ("cuda", "CUDA"), ("cudnn", "cuDNN"), ("nccl", "NCCL"), ("python", "Python"),
               ("hpctrain", "hpctrain"), ("hpctrain_commit", "commit"), ("cpu", "CPU"),
               ("cpu_capability", "CPU kernels"))
GPU_ONLY = frozenset({"gpu", "cuda", "cudnn", "nccl"})  # compared among GPU runs only


def _environment_value(key: str, value) -> str | None:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        return None
    text = str(value)
    if key == "library":
        return text.split(",")[0]  # "Open MPI v4.1.4, package: ..."
    if key == "device":
        return text.split(":")[0]  # rank 0's: cuda:0 and cuda:1 are one kind
    if key == "hpctrain_commit":
        return text[:12] + ("+dirty" if text.endswith("+dirty") else "")
    return text


def environment(rows: list[Row]) -> str | None:
    """One line on what the finished runs ran with (their ``config.json``'s ``run_info``);
    where they differ, which ran with what, since the comparison then compares that too.
    None when no run recorded it (runs written before hpctrain recorded it)."""
    finished = [r for r in rows if r.summary is not None]
    on_gpu = [r for r in finished
              if _environment_value("device", r.run_info.get("device")) == "cuda"]
    same, differ = [], []
    for key, label in ENVIRONMENT:
        values: dict[str, list[str]] = {}
        for r in on_gpu if key in GPU_ONLY else finished:
            value = _environment_value(key, r.run_info.get(key))
            values.setdefault("not recorded" if value is None else value, []).append(r.title)
        known = [v for v in values if v != "not recorded"]
        if not known:
            continue
        if len(values) == 1:
            some = " (the GPU runs)" if key in GPU_ONLY and len(on_gpu) < len(finished) else ""
            same.append(f"{label} {known[0]}{some}")
        else:
            differ.append(f"{label} " + "; ".join(f"{v} ({', '.join(names)})"
                                                   for v, names in values.items()))
    if not same and not differ:
        return None
    line = "Ran with " + ", ".join(same) + "." if same else ""
    if differ:
        line += (" " if line else "") + "**The runs differ in** " + "; and ".join(differ) + "."
    return line


def machine_load(rows: list[Row]) -> str | None:
    """One line on the load of the machine the finished runs ran on: the largest 1-minute
    load average their summaries recorded (rank 0's node, at each run's start and end), on
    how many CPUs, and a warning naming the runs whose load exceeded their node's CPUs (load
    5.7 on 2 cores gave 40% between seeds' wall times). None when no run recorded it (runs
    before hpctrain did, simulated runs: their times are virtual)."""
    seen: list[tuple[float, int | None, str, str]] = []  # load, CPUs, run, when
    unrecorded = 0
    for r in rows:
        s = r.summary
        if s is None or _simulated(r):
            continue
        cpus = s.get("machine_cpus") if _is_count(s.get("machine_cpus")) else None
        loads = [(float(s[key]), cpus, r.title, when)
                 for key, when in (("load_average_start", "start"), ("load_average_end", "end"))
                 if _is_number(s.get(key))]
        seen += loads
        unrecorded += not loads
    if not seen:
        return None
    top, _, title, when = max(seen, key=lambda s: s[0])
    counts = sorted({c for _, c, _, _ in seen if c is not None})
    on = "" if not counts else f" on {counts[0]}" if len(counts) == 1 else \
        f" on {counts[0]}-{counts[-1]}"
    line = (f"Machine load (1-minute load average of rank 0's node at each run's start and "
            f"end): at most {top:g} ({plain_text(title)}, at its {when}){on}"
            f"{' CPUs' if on else ''}.")
    over: dict[str, tuple[float, int]] = {}
    for load_, c, name, _ in seen:
        if c is not None and load_ > c and load_ > over.get(name, (0.0, c))[0]:
            over[name] = (load_, c)
    if over:
        line += (" **The load exceeded the CPUs in** " + ", ".join(
            f"{plain_text(name)} ({load_:g} on {c})" for name, (load_, c) in over.items())
            + ": those runs shared cores with other work, which slows and spreads their "
              "wall times.")
    if unrecorded:
        line += f" ({unrecorded} run{'s' if unrecorded > 1 else ''} recorded no load.)"
    return line
NOTES_SHOWN = 3  # of a run's notes, report.md lists this many, then says how many more


def notes(rows: list[Row]) -> str | None:
    """report.md's list of what the runs printed (:func:`run_notes`), at most NOTES_SHOWN
    lines a run; None when none printed any."""
    noted = [r for r in rows if r.notes]
    if not noted:
        return None
    out = ["**The runs printed** (hpctrain's own lines on their stderr, in each run's "
           f"{LOG}; they may explain a figure of that run):", ""]
    for r in noted:
        out += [f"- {plain_text(r.title)}: {as_code(line)}" for line in r.notes[:NOTES_SHOWN]]
        if len(r.notes) > NOTES_SHOWN:
            out.append(f"- {plain_text(r.title)}: {len(r.notes) - NOTES_SHOWN} more in its {LOG}")
    return "\n".join(out)


def notes_line(rows: list[Row]) -> str | None:
    """One line for the console naming the runs that printed notes, which report.md lists."""
    noted = [r.title for r in rows if r.notes]
    return None if not noted else (f"{', '.join(noted)} printed warnings or notes on their "
                                   f"stderr ({LOG}); {REPORT} lists them")


def final_models_note(rows: list[Row]) -> str | None:
    """report.md's line under its first table on what ec's accuracies score (rank 0's
    member, by default) and what stands beside them; None without ec runs."""
    finished = [r for r in rows if r.summary is not None]
    member = [r for r in finished if final_model(r.finished) == "member"]
    ensemble = [r for r in finished if final_model(r.finished) == "ensemble"]
    if not member and not ensemble:
        return None
    out = []
    if member:
        out.append(f"**The final and best acc of {plain_text(_who(member, finished))} are rank 0's "
                   "member's** (ec's `--ec-final member`, the default), one of the run's "
                   "models, trained alike but not the same: one member's luck can be as large "
                   "as the differences compared (ma's score the members' parameter average).")
    if ensemble:
        out.append(f"The final and best acc of {plain_text(_who(ensemble, finished))} are the "
                   "ensemble's (`--ec-final ensemble`: the members' averaged softmax).")
    out.append("Beside ec's final acc, *members' mean* is the mean of every member's test "
               "accuracy at the end (summary.json's `final_mean_member_acc`) and *ensemble* "
               "that of their averaged softmax (`final_ensemble_acc`)" + (
                   ", each over seeds a mean ± sample standard deviation, as the others."
                   if any(r.seed is not None for r in finished) else "."))
    return " ".join(out)


def shared_orders(seeds: list[int], epochs: int, shuffle: str) -> list[tuple[int, int]]:
    """The pairs of ``seeds`` (s < t) whose runs of ``epochs`` epochs train on some of the
    same data orders: ``--shuffle global`` seeds epoch e's order with seed + e
    (:func:`hpctrain.shuffle.order.global_permutation`), so seed t's epochs are seed s's
    t - s epochs later, shared where t - s < epochs. Local and partial shuffling draw from
    streams of their own (seed, epoch, rank)."""
    if shuffle != "global":
        return []
    ordered = sorted(set(seeds))
    return [(s, t) for i, s in enumerate(ordered) for t in ordered[i + 1:] if t - s < epochs]


def shared_orders_note(seeds: list[int], epochs: int, shuffle: str,
                       every: list[int] | None = None) -> str | None:
    """One line saying which seeds share data orders (:func:`shared_orders`), so that the ±
    over them understates the spread, and as many seeds (``every``: the comparison's, else
    ``seeds``) that do not; None where none do. README said it, the report and the console
    did not."""
    pairs = shared_orders(seeds, epochs, shuffle)
    if not pairs:
        return None
    s, t = pairs[0]
    more = f" (and {len(pairs) - 1} more pair{'s' if len(pairs) > 2 else ''})" \
        if len(pairs) > 1 else ""
    every = sorted(set(every or seeds))
    apart = ",".join(str(every[0] + i * epochs) for i in range(len(every)))
    return (f"`--shuffle global` seeds each epoch's data order with seed + epoch: over "
            f"{epochs} epochs seed {t}'s orders are seed {s}'s, {t - s} epoch"
            f"{'s' if t - s > 1 else ''} later{more}, so the ± over the seeds understates the "
            f"spread; for orders of their own take seeds at least {epochs} apart "
            f"(`--seeds {apart}`).")


def seed_orders(rows: list[Row]) -> str | None:
    """:func:`shared_orders_note` of the finished runs, for report.md: each algorithm's
    seeds, with the shuffle and epochs their config.json records (compared with those of
    its other seeds that ran alike)."""
    every = [r.seed for r in rows if r.seed is not None]
    for runs in by_algorithm(rows).values():
        alike: dict[tuple, list[int]] = {}
        for r in runs:
            flat = _flat(r.config)
            how = (flat.get("data.shuffle"), flat.get("optim.epochs"))
            if r.summary is not None and r.seed is not None and isinstance(how[0], str) and \
                    _is_count(how[1]):
                alike.setdefault(how, []).append(r.seed)
        for (shuffle, epochs), seeds in alike.items():
            if note := shared_orders_note(seeds, epochs, shuffle, every):
                return note
    return None


def _who(chosen: list[Row], rows: list[Row]) -> str:
    """The runs ``chosen`` among ``rows``, for a sentence: an algorithm's name where all of its
    finished runs are chosen (its seeds), else each run's title."""
    names = []
    for name, runs in by_algorithm([r for r in rows if r.summary is not None]).items():
        picked = [r for r in runs if any(r is c for c in chosen)]
        if picked and len(picked) == len(runs):
            names.append(name)
        else:
            names += [r.title for r in picked]
    return ", ".join(names)


def _grouped(rows: list[Row], value) -> dict[str, list[Row]]:
    """The finished ``rows`` by ``value(row)``, in the rows' order."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        if r.summary is not None:
            groups.setdefault(value(r), []).append(r)
    return groups


# Summary keys of what the runs trained, with their labels where they differ
SETTING = (("model", "model"), ("dataset", "data set"), ("epochs", "epochs"))


def setting(rows: list[Row]) -> str | None:
    """One line on the finished runs' model, data set and epochs (their summaries'); where the
    runs differ, which ran with what. None when no run finished."""
    finished = [r for r in rows if r.summary is not None]
    if not finished:
        return None
    groups = {key: _grouped(finished, lambda r, key=key: str(r.summary.get(key, "?")))
              for key, _ in SETTING}
    same = {key: next(iter(g)) for key, g in groups.items() if len(g) == 1}
    if len(same) == len(SETTING):
        return f"Model {same['model']} on {same['dataset']}; epochs: {same['epochs']}."
    what = " ".join(([f"Model {same['model']}"] if "model" in same else [])
                    + ([f"on {same['dataset']}" if "model" in same else
                        f"data set {same['dataset']}"] if "dataset" in same else []))
    first = "; ".join(([what] if what else [])
                      + ([f"epochs: {same['epochs']}"] if "epochs" in same else []))
    first = first[:1].upper() + first[1:]
    differ = [f"{label} " + "; ".join(f"{value} ({_who(runs, finished)})"
                                      for value, runs in groups[key].items())
              for key, label in SETTING if key not in same]
    return (f"{first}. " if first else "") + "**The runs differ in** " + "; and ".join(
        differ) + "."


def _flags() -> dict[str, str]:
    """Each training option's flag by its dotted configuration key (``optim.lr``: --lr)."""
    from hpctrain import arguments

    return {d.dest: d.flag for d in arguments.shared_options() + arguments.algorithm_options()}


def differing_settings(rows: list[Row]) -> str | None:
    """A Markdown table of every training setting in the finished runs' config.json that
    differs between them (lr, momentum, batch size, an algorithm's tau...), one row per set
    of runs that share their values; None when none differs. Defaults differ by algorithm
    (asgd's lr 0.1, ssgd's 0.05): the training options a comparison gives do not say them.
    An algorithm's option only some runs have differs where two of those differ; any other
    setting some runs lack (a config.json of an older hpctrain) differs. Either is "—" for
    the runs without it."""
    finished = [r for r in rows if r.summary is not None and r.config]
    settings = [_trained_with(r) for r in finished]
    keys = sorted({k for s in settings for k in s},
                  key=lambda k: (k.startswith("algorithm."), k))
    differ = [k for k in keys if len({s.get(k) for s in settings
                                      if k in s or not k.startswith("algorithm.")}) > 1]
    if not differ:
        return None
    groups: dict[tuple[str, ...], list[Row]] = {}
    for row, s in zip(finished, settings, strict=True):
        groups.setdefault(tuple(s.get(k, "—") for k in differ), []).append(row)
    flags = _flags()
    head = ["runs", *(f"`{flags.get(k, k)}`" for k in differ)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([plain_text(_who(runs, finished)), *(
                  c.replace("|", "\\|").replace("\n", " ") for c in values)]) + " |"
              for values, runs in groups.items()]
    return ("**The runs' training settings differ** (their config.json, where a setting left "
            "to a default is the algorithm's; —: the run has no such setting (another "
            "algorithm's option, or a config.json from an older hpctrain)):\n\n"
            + "\n".join(lines))


def simulated_runs(record: dict, rows: list[Row]) -> str | None:
    """The line saying which runs were simulated (virtual seconds), or None when none was."""
    if record.get("simulated"):
        return (f"Simulated (`hpctrain simulate --workers {record['workers']}`): virtual "
                "workers in one process; wall times are virtual seconds.")
    finished = [r for r in rows if r.summary is not None]
    simulated = [r for r in finished if _simulated(r)]
    if not simulated:
        return None
    if _all_simulated(finished):
        return ("Simulated (`hpctrain simulate`): virtual workers in one process; wall times "
                "are virtual seconds.")
    return (f"Simulated by `hpctrain simulate` (virtual workers in one process), marked "
            f"{SIMULATED_MARK} in the table: {_who(simulated, finished)}. Their wall times and "
            "times to a target are virtual seconds, not comparable with the other runs'.")


# What sets a simulated run's times and staleness, as its summary.json records it: keys of its
# `simulation`, then its straggler fields, with the flags that set them
SIMULATOR_SETTINGS = (("step_time", "--step-time"), ("timing_seed", "--timing-seed"),
                      ("comm_time", "--comm-time"), ("latency", "--latency"),
                      ("bandwidth", "--bandwidth"), ("store_latency", "--store-latency"),
                      ("store_bandwidth", "--store-bandwidth"),
                      ("train_subset", "--train-subset"))
STRAGGLER_SETTINGS = (("slowdown", "--slowdown"), ("jitter", "--jitter"))


def simulator_settings(rows: list[Row]) -> str | None:
    """One line on what set the simulated runs' times and staleness (their summaries': the
    step-time model and its seed, the network model, stragglers, the training subset, ec's
    inference rate), every setting's value or, where the runs differ, which ran with what;
    None when no run was simulated. The header named only ``--workers``, and the step-time
    model was left to each run's command."""
    simulated = [r for r in rows if _simulated(r)]
    if not simulated:
        return None
    missing = object()

    def value(r: Row, key: str):
        if key in dict(STRAGGLER_SETTINGS):
            return r.finished.get(key, missing)
        return (r.finished.get("simulation") or {}).get(key, missing)

    def text(v) -> str:
        return "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    parts = []
    for key, flag in SIMULATOR_SETTINGS + STRAGGLER_SETTINGS:
        if all(value(r, key) is missing for r in simulated):  # a summary from before it
            continue
        groups = _grouped(simulated, lambda r, key=key: text(value(r, key))
                          if value(r, key) is not missing else "?")
        if len(groups) == 1:
            parts.append(f"`{flag} {next(iter(groups))}`")
        elif key == "timing_seed" and all(value(r, key) == r.seed for r in simulated):
            parts.append(f"`{flag}` each run's `--seed`")
        else:
            parts.append(f"`{flag}` " + "; ".join(f"{v} ({_who(runs, simulated)})"
                                                  for v, runs in groups.items()))
    ec = [r for r in simulated if r.finished.get("algo") == "ec"]
    rates = _grouped(ec, lambda r: "{:g} s ({})".format(
        *(value(r, k) for k in ("inference_s_per_sample", "inference_from"))))
    if rates and all(value(r, "inference_s_per_sample") is not missing for r in ec):
        parts.append("ec's inference per sample " + "; ".join(
            f"{v}" + (f" ({_who(runs, simulated)})" if len(rates) > 1 else "")
            for v, runs in rates.items()))
    if not parts:
        return None
    return ("Simulator settings, which set every time and staleness figure: "
            + ", ".join(parts) + ".")


# How a run's snapshots were scored (its summary's eval_mode) and whether evaluation is in its
# wall time (eval_in_clock), for report.md
SCORING = {"after": "scored after training, so evaluation is not in the clock",
           "online": "scored while training, on rank 0 between steps, so evaluation is in the "
                     "clock",
           "member": "scored after training, but rank 0's own model was scored between steps "
                     "too (`--eval online`), so evaluation is in the clock",
           "outside": "scored on rank 0 before and after training, none between steps, so "
                      "evaluation is not in the clock",
           "rank": "scored while training, on a rank that does not train (`--eval-rank`), so "
                   "evaluation is not in the clock",
           "unknown": "scored in a way the summary's `eval_mode` does not name"}


def _scoring(summary: dict) -> str:
    """The key in SCORING of a run's ``eval_mode`` and ``eval_in_clock`` (runs from before
    either was recorded: scored after training; online, in the clock)."""
    mode = summary.get("eval_mode", "after")
    in_clock = summary.get("eval_in_clock")  # None: eval_mode alone says it
    if mode == "after":  # ma and ec online score rank 0's member between steps
        return "member" if in_clock else "after"
    if mode == "online":
        return "outside" if in_clock is False else "online"
    if isinstance(mode, str) and mode.startswith("online (rank "):
        return "rank"
    return "unknown"


def scoring(rows: list[Row]) -> str:
    """How the snapshots of the finished runs were scored (``eval_mode``), and whether
    evaluation is in their clock (``eval_in_clock``): one clause, or one per way with the runs
    scored so."""
    finished = [r for r in rows if r.summary is not None]
    groups = _grouped(finished, lambda r: _scoring(r.summary))
    if len(groups) <= 1:
        return SCORING[next(iter(groups), "after")]
    return "; ".join(f"{SCORING[way]} ({_who(runs, finished)})" for way, runs in groups.items())
