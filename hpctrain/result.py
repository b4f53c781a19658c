"""What :func:`hpctrain.train` returns: :class:`Summary`, the run's ``summary.json`` as a
typed dict, so that an editor completes ``summary["final_test_acc"]`` and a type checker
knows it is a float, while existing callers keep a plain ``dict``.

The keys every run has are :class:`hpctrain.summary.RunSummary`'s fields, with its types;
those an algorithm adds (its ``summary_fields``) are ``NotRequired``: each built-in
algorithm returns its own only. A unit test keeps both in step with the summary's schema
(``docs/SUMMARY.md``). An algorithm of one's own may return keys of its own besides.

No ``from __future__ import annotations`` here: ``NotRequired`` is seen at run time only in
evaluated annotations (``Summary.__optional_keys__``, which the tests read).
"""

import sys
from typing import Any

if sys.version_info >= (3, 11):
    from typing import NotRequired, TypedDict
else:  # Python 3.10: typing_extensions, which torch requires
    from typing_extensions import NotRequired, TypedDict


class Summary(TypedDict):
    """A run's summary (``summary.json``), as :func:`hpctrain.train` returns it on every
    rank; docs/SUMMARY.md gives each field's unit and meaning."""

    # Every run (hpctrain.summary.RunSummary's fields, in its order and with its types).
    algo: str
    algo_label: str
    workers: int
    model: str
    dataset: str
    epochs: int
    updates: int
    final_test_acc: float
    final_test_loss: float | None
    best_test_acc: float
    wall_s: float
    scoring_s: float
    samples_per_s: float
    params: int
    samples_per_worker: list[int]
    busy_s_per_worker: list[float]
    straggler_sleep_s_per_worker: list[float]
    slowdown: str | None
    jitter: float
    skipped_steps: int
    bad_gradients_per_worker: list[int]
    max_bad_steps: int
    checkpoints: int
    checkpoint_s: float
    resumed_from_updates: list[int]
    bytes_moved: int
    exchange_s: float
    exchange_per_epoch: list[dict]
    eval_mode: str
    eval_in_clock: bool
    collapsed_at: int | None
    collapse_reason: str | None
    stopped_on_collapse: bool
    clip_grad_norm: float | None
    clipped_steps_per_worker: list[int]
    peak_memory_per_worker: list[int | None]
    device: str | None
    gpu: str | None
    load_average_start: float | None
    load_average_end: float | None
    machine_cpus: int | None
    loss_scale_per_worker: list[float | None]
    overflow_steps_per_worker: list[int | None]
    out: str | None
    resized: list[dict]
    simulated: bool
    simulation: dict | None

    # ssgd
    allreduce_bytes_per_rank: NotRequired[int]
    # asgd, dcasgd-c, dcasgd-a, ssp
    servers: NotRequired[int]
    consistency: NotRequired[str]
    shards: NotRequired[int]
    shared_windows: NotRequired[bool]
    lam: NotRequired[float]
    ms_decay: NotRequired[float | None]
    staleness: NotRequired[dict[str, float]]  # mean, p50, p90, p99, max and count
    pushes_per_worker: NotRequired[list[int]]
    store_bytes_per_worker: NotRequired[int]
    store_mpi_bytes_per_worker: NotRequired[int]
    store_traffic_per_worker: NotRequired[list[dict[str, int]]]  # read, written, mpi
    # ssp
    max_staleness: NotRequired[int]
    ssp_waits_per_worker: NotRequired[list[int]]
    ssp_wait_s_per_worker: NotRequired[list[float]]
    ssp_max_gap: NotRequired[int]
    # ma, ec
    tau: NotRequired[int]
    final_model: NotRequired[str]
    final_member_acc: NotRequired[float]
    final_mean_member_acc: NotRequired[float]
    final_ensemble_acc: NotRequired[float]
    final_averaged_acc: NotRequired[float]  # ma's averaged model only
    aggregation: NotRequired[dict[str, Any]]  # counts, bytes, seconds and their distribution
    # ec
    distill_size: NotRequired[int]
    distilled_samples_per_rank: NotRequired[int]
