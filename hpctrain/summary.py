"""The summary of a run (``summary.json``): one typed record every run fills, plus the
algorithm's own part.

:class:`RunSummary` holds the fields every run has; ``algorithm_fields`` the ones its algorithm
adds (declared in its ``summary_fields``). ``summary.json`` is the two merged into one JSON
object, so readers find every field by its name; :func:`read` gives it back, and
``docs/SUMMARY.md`` lists every field with its unit (a unit test keeps it complete).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from hpctrain.metrics import read_json


def _doc(text: str, **kw):
    """A summary field with its unit and meaning (for docs/SUMMARY.md and the report)."""
    return field(metadata={"doc": text}, **kw)


@dataclass
class RunSummary:
    """What every run reports; ``algorithm_fields``: its algorithm's own part."""

    algo: str = _doc("algorithm name (--algo)")
    algo_label: str = _doc("algorithm and its main settings, for tables and plots")
    workers: int = _doc("ranks that trained")
    model: str = _doc("--model")
    dataset: str = _doc("--dataset")
    epochs: int = _doc("--epochs: passes over the data, all workers together")
    updates: int = _doc("model updates made (async: pushes of all workers, a skipped NaN "
                        "push not counted; lock-step: steps, those the NaN guard skipped "
                        "included, see skipped_steps); resumed on another number of workers, "
                        "counted on the new run's scale from where it went on (see resized)")
    final_test_acc: float = _doc("fraction in [0, 1]: the final model on the test set")
    final_test_loss: float | None = _doc("mean cross-entropy of the final model on the test set "
                                         "(null if not finite)")
    best_test_acc: float = _doc("fraction: the best curve point")
    wall_s: float = _doc("seconds of training, without start-up and the scoring after it "
                         "(--eval online on rank 0 scores between steps, inside this time; a "
                         "resumed run adds the time before)")
    scoring_s: float = _doc("seconds from the end of training until the curve's snapshots were "
                            "scored, on rank 0's clock (not in wall_s; eval_mode online: its "
                            "last point only; ma and ec score their whole curve after training, "
                            "--eval online or not; hpctrain simulate: virtual, its collectives' "
                            "modelled time)")
    samples_per_s: float = _doc("training samples per second, all workers together: "
                                "samples_per_worker's sum over wall_s (ec: its batches' own "
                                "samples, not the relabelled ones distilled beside them, "
                                "--ec-distill-size / --tau more a step)")
    params: int = _doc("parameters of the model")
    samples_per_worker: list[int] = _doc("training samples each worker consumed (ec: its "
                                         "batches' own, not the relabelled ones distilled "
                                         "beside them)")
    busy_s_per_worker: list[float] = _doc("seconds each worker trained before waiting for the "
                                          "others at the end, each timed by its own rank's "
                                          "clock from its own start (wall_s is rank 0's, to "
                                          "after the algorithm's finish), so one may exceed "
                                          "wall_s slightly")
    straggler_sleep_s_per_worker: list[float] = _doc("seconds each worker slept to emulate a "
                                                     "straggler")
    slowdown: str | None = _doc("--slowdown (null: none)")
    jitter: float = _doc("--jitter")
    skipped_steps: int = _doc("steps skipped for NaN/Inf gradients (summed over workers that skip"
                              " alone)")
    bad_gradients_per_worker: list[int] = _doc("NaN/Inf gradients each worker saw")
    max_bad_steps: int = _doc("--max-bad-steps")
    checkpoints: int = _doc("checkpoints written over the whole run")
    checkpoint_s: float = _doc("seconds spent writing checkpoints (a resumed run: all but "
                               "the write of the checkpoint it resumed from, which that "
                               "checkpoint cannot hold)")
    resumed_from_updates: list[int] = _doc("updates at which the run was resumed, in order: "
                                           "those of the checkpoints it ended from, each in "
                                           "the count of the attempt that wrote it (after a "
                                           "resize, `resized` gives the same place in the "
                                           "resumed run's updates; an attempt whose "
                                           "checkpoints were all passed over is not among "
                                           "them)")
    bytes_moved: int = _doc("bytes: training samples this rank (rank 0) sent to others in "
                            "reshuffles (a resumed run: those of this process, see "
                            "exchange_per_epoch)")
    exchange_s: float = _doc("seconds rank 0 spent in data exchanges (a resumed run: in this "
                             "process)")
    exchange_per_epoch: list[dict] = _doc("per exchange: epoch, bytes_moved (bytes), exchange_s "
                                          "(seconds); a resumed run lists those of this "
                                          "process: global shuffling the epochs from the one "
                                          "it resumed in, partial every epoch from 0 (it "
                                          "replays them to rebuild its shard)")
    eval_mode: str = _doc("what scored the curve: after (after training), online (rank 0, "
                          "between steps) or online (rank R) (a rank that did not train)",
                          default="after")
    eval_in_clock: bool = _doc("true when rank 0 scored snapshots between its steps (--eval "
                               "online without --eval-rank; ma and ec too, though they score "
                               "their curve after training), so wall_s holds that evaluation "
                               "(a resumed run: since its resume)", default=False)
    collapsed_at: int | None = _doc("updates: when training was found collapsed (loss not "
                                    "finite, exploding or flat at ln(classes), or test "
                                    "accuracy back at chance); null: never", default=None)
    collapse_reason: str | None = _doc("why it was found collapsed (null: never)", default=None)
    stopped_on_collapse: bool = _doc("true when --stop-on-collapse was given and training "
                                     "collapsed (collapsed_at set): the run ended for it "
                                     "with exit status 4 (its loop left early, or had ended: "
                                     "a collapse at the last update or in the scores after "
                                     "training)", default=False)
    clip_grad_norm: float | None = _doc("--clip-grad-norm (null: no clipping)", default=None)
    clipped_steps_per_worker: list[int] = _doc("steps whose gradient each worker scaled down "
                                               "to --clip-grad-norm", default_factory=list)
    peak_memory_per_worker: list[int | None] = _doc(
        "the most memory each worker held while training, in bytes: on a GPU what torch "
        "allocated there (torch.cuda.max_memory_allocated, reset as the run starts), on the "
        "CPU the process's peak resident set since the run started (Linux's VmHWM; "
        "elsewhere since the process started; data and libraries included); each null in a "
        "simulated run",
        default_factory=list)
    device: str | None = _doc("where the workers computed: cpu or cuda (--device as resolved)",
                              default=None)
    gpu: str | None = _doc("rank 0's GPU (torch.cuda.get_device_name; null on the CPU)",
                           default=None)
    load_average_start: float | None = _doc(
        "the 1-minute load average of rank 0's node as training started (a resumed run: as "
        "this attempt's did; null where the system has none, and in a simulation, whose times "
        "are virtual): above machine_cpus, the workers shared cores with other work, which "
        "slows and spreads wall times", default=None)
    load_average_end: float | None = _doc(
        "the 1-minute load average of rank 0's node as training ended, before the scoring "
        "(null where the system has none, and in a simulation)", default=None)
    machine_cpus: int | None = _doc("CPUs of rank 0's node (os.cpu_count), which the load "
                                    "averages are of", default=None)
    loss_scale_per_worker: list[float | None] = _doc(
        "--mixed-precision fp16: each worker's loss scale at the end (it halves after an "
        "overflow, doubles after 2,000 clean steps); each null otherwise", default_factory=list)
    overflow_steps_per_worker: list[int | None] = _doc(
        "--mixed-precision fp16: steps each worker skipped because its loss scale (above 1) "
        "overflowed: among skipped_steps, but not counted toward --max-bad-steps (the scale "
        "halves instead); each null otherwise", default_factory=list)
    out: str | None = _doc("the run's output folder", default=None)
    resized: list[dict] = _doc("resumptions on another number of workers, in order: "
                               "from_workers, to_workers, updates (the checkpoint's count) and "
                               "resumed_at (the same progress in the resumed run's updates); "
                               "empty if never", default_factory=list)
    simulated: bool = _doc("false for a run of real processes; true for `hpctrain simulate` "
                           "(times are then virtual seconds)", default=False)
    simulation: dict | None = _doc("simulated runs: the step-time model and the seed of its "
                                   "draws (timing_seed), the network and EC inference models "
                                   "used (null for real processes)", default=None)
    algorithm_fields: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON form: the common fields and the algorithm's, side by side."""
        out = asdict(self)
        own = out.pop("algorithm_fields")
        clash = own.keys() & out.keys()
        if clash:
            raise ValueError(f"algorithm summary fields {sorted(clash)} shadow common ones")
        return {**out, **own}

    @classmethod
    def from_dict(cls, values: dict) -> RunSummary:
        common = {f.name for f in fields(cls)} - {"algorithm_fields"}
        return cls(**{k: v for k, v in values.items() if k in common},
                   algorithm_fields={k: v for k, v in values.items() if k not in common})


# Field -> unit and meaning of the fields every run has.
COMMON_FIELDS: dict[str, str] = {f.name: f.metadata["doc"] for f in fields(RunSummary)
                                 if "doc" in f.metadata}


# The fields readers of a summary rely on (the report's columns, compare's checks).
READ_KEYS = ("algo", "workers", "final_test_acc", "best_test_acc", "wall_s", "samples_per_s")


def read(run_dir: str | Path) -> dict:
    """A finished run's ``summary.json``; UsageError naming the file if it is not one."""
    return read_json(Path(run_dir) / "summary.json", "a run's summary", READ_KEYS)


def byte_fields(algorithm_classes) -> list[str]:
    """Summary fields whose unit is bytes (common ones and those of ``algorithm_classes``),
    in a fixed order: what the report's traffic column adds up."""
    names = [k for k, v in COMMON_FIELDS.items() if v.startswith("bytes:")]
    for cls in algorithm_classes:
        names += [k for k in own_byte_fields(cls) if k not in names]
    return names


def own_byte_fields(algorithm_class) -> list[str]:
    """The summary fields in bytes that ``algorithm_class`` declares itself: recorded for a
    user's algorithm (config.json, compare.json) so that the report counts them without
    importing the user's code."""
    return [k for k, v in algorithm_class.summary_fields.items() if v.startswith("bytes:")]


def markdown(algorithm_classes) -> str:
    """``docs/SUMMARY.md``: every field of summary.json with its unit and meaning."""
    lines = ["# summary.json", "",
             "Every run's `summary.json` holds the common fields, then its algorithm's own. "
             "Accuracies are fractions in [0, 1]; times are seconds; `bytes:` marks byte "
             "counts (what `hpctrain report` adds up for its traffic column). Generated from "
             "`hpctrain/summary.py` and each algorithm's `summary_fields` "
             "(`python -m hpctrain.summary > docs/SUMMARY.md`; a unit test keeps it current).",
             "", "## Every run", "", "| field | unit and meaning |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in COMMON_FIELDS.items()]
    groups: dict[tuple, list[str]] = {}
    for cls in algorithm_classes:
        groups.setdefault(tuple(cls.summary_fields.items()), []).append(cls.name)
    for items, names in groups.items():
        if not items:
            continue
        lines += ["", f"## {', '.join(names)}", "", "| field | unit and meaning |", "|---|---|"]
        lines += [f"| `{k}` | {v} |" for k, v in items]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from hpctrain import registry

    print(markdown(registry.ALGORITHMS.values()), end="")
