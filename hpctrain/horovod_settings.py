"""horovodrun's tuning settings: one table for the flags, the ``--config-file`` and the variables.

Horovod reads its tuning from ``HOROVOD_*`` variables that horovodrun sets from its flags or
from a YAML file (``--config-file``; a flag given on the command line wins over the file).
:data:`SETTINGS` lists them all, in Horovod's sections and names, so a job script or a config
file written for horovodrun means the same here. ``here`` marks what hpctrain's own backends
(mpi, torch) read; the rest reach only ``backend="horovod"``, which reads them all.
Pure: nothing here imports torch or starts MPI.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpctrain.errors import UsageError

LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "FATAL")


@dataclass(frozen=True)
class Setting:
    """One tuning setting: ``flag`` (an on/off pair with ``off_flag``), ``section.key`` in the
    config file, the ``variable`` a rank reads.

    ``kind`` is int, float, str or bool. A bool writes 1 or 0, the other way round with
    ``inverted`` (``--no-stall-check`` sets HOROVOD_STALL_CHECK_DISABLE=1). ``scale``
    multiplies a number on its way to the variable (MiB to bytes); ``only_with`` names the
    setting that must be on for this one to be written (horovodrun's rule for autotune and
    its details, and for the timeline's cycle marks)."""

    flag: str
    section: str
    key: str
    variable: str
    kind: type
    help: str
    here: bool = False
    off_flag: str | None = None
    inverted: bool = False
    scale: int = 1
    at_most: float | None = None
    choices: tuple[str, ...] | None = None
    only_with: str | None = None

    @property
    def name(self) -> str:
        """``section.key``: argparse's destination and the config file's path."""
        return f"{self.section}.{self.key}"


def _bool(flag: str, off: str, section: str, key: str, variable: str, help: str,
          **kw: Any) -> Setting:
    return Setting(flag, section, key, variable, bool, help, off_flag=off, **kw)


SETTINGS: tuple[Setting, ...] = (
    Setting("--fusion-threshold-mb", "params", "fusion_threshold_mb", "HOROVOD_FUSION_THRESHOLD",
            int, "largest fused bucket in MiB (0: no fusion)", here=True, scale=1024 * 1024),
    Setting("--cycle-time-ms", "params", "cycle_time_ms", "HOROVOD_CYCLE_TIME", float,
            "delay between Horovod's fusion cycles"),
    Setting("--cache-capacity", "params", "cache_capacity", "HOROVOD_CACHE_CAPACITY", int,
            "tensor names Horovod caches to skip coordination"),
    _bool("--hierarchical-allreduce", "--no-hierarchical-allreduce", "params",
          "hierarchical_allreduce", "HOROVOD_HIERARCHICAL_ALLREDUCE",
          "allreduce within each host first, then across hosts"),
    _bool("--hierarchical-allgather", "--no-hierarchical-allgather", "params",
          "hierarchical_allgather", "HOROVOD_HIERARCHICAL_ALLGATHER",
          "allgather within each host first, then across hosts"),
    _bool("--torus-allreduce", "--no-torus-allreduce", "params", "torus_allreduce",
          "HOROVOD_TORUS_ALLREDUCE", "2D torus allreduce over NCCL"),
    _bool("--autotune", "--no-autotune", "autotune", "enabled", "HOROVOD_AUTOTUNE",
          "tune the fusion threshold and cycle time while training",
          only_with="autotune.enabled"),  # written only when on, as horovodrun does
    Setting("--autotune-log-file", "autotune", "log_file", "HOROVOD_AUTOTUNE_LOG", str,
            "CSV of the autotune trials", only_with="autotune.enabled"),
    Setting("--autotune-warmup-samples", "autotune", "warmup_samples",
            "HOROVOD_AUTOTUNE_WARMUP_SAMPLES", int, "samples discarded first",
            only_with="autotune.enabled"),
    Setting("--autotune-steps-per-sample", "autotune", "steps_per_sample",
            "HOROVOD_AUTOTUNE_STEPS_PER_SAMPLE", int, "steps a sample records",
            only_with="autotune.enabled"),
    Setting("--autotune-bayes-opt-max-samples", "autotune", "bayes_opt_max_samples",
            "HOROVOD_AUTOTUNE_BAYES_OPT_MAX_SAMPLES", int, "samples per Bayesian optimisation",
            only_with="autotune.enabled"),
    Setting("--autotune-gaussian-process-noise", "autotune", "gaussian_process_noise",
            "HOROVOD_AUTOTUNE_GAUSSIAN_PROCESS_NOISE", float, "noise regularisation in [0, 1]",
            at_most=1.0, only_with="autotune.enabled"),
    Setting("--timeline-filename", "timeline", "filename", "HOROVOD_TIMELINE", str,
            "write a timeline of the collectives to this file", here=True),
    _bool("--timeline-mark-cycles", "--no-timeline-mark-cycles", "timeline", "mark_cycles",
          "HOROVOD_TIMELINE_MARK_CYCLES", "mark cycles on the timeline", here=False,
          only_with="timeline.filename"),
    _bool("--stall-check", "--no-stall-check", "stall_check", "enabled",
          "HOROVOD_STALL_CHECK_DISABLE", "report ranks that stall a collective (default on)",
          here=True, inverted=True),
    Setting("--stall-check-warning-time-seconds", "stall_check", "warning_time_seconds",
            "HOROVOD_STALL_CHECK_TIME_SECONDS", int, "seconds before a stall is reported",
            here=True),
    Setting("--stall-check-shutdown-time-seconds", "stall_check", "shutdown_time_seconds",
            "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", int, "seconds before a stall ends the job "
            "(0: never)", here=True),
    _bool("--mpi-threads-disable", "--no-mpi-threads-disable", "library_options",
          "mpi_threads_disable", "HOROVOD_MPI_THREADS_DISABLE",
          "start MPI without thread support"),
    Setting("--num-nccl-streams", "library_options", "num_nccl_streams",
            "HOROVOD_NUM_NCCL_STREAMS", int, "NCCL streams"),
    Setting("--thread-affinity", "library_options", "thread_affinity", "HOROVOD_THREAD_AFFINITY",
            int, "core of Horovod's background thread"),
    Setting("--gloo-timeout-seconds", "library_options", "gloo_timeout_seconds",
            "HOROVOD_GLOO_TIMEOUT_SECONDS", int, "Gloo operations' timeout"),
    Setting("--log-level", "logging", "level", "HOROVOD_LOG_LEVEL", str,
            "Horovod's own log level", choices=LOG_LEVELS),
    _bool("--log-with-timestamp", "--log-without-timestamp", "logging", "with_timestamp",
          "HOROVOD_LOG_HIDE_TIME", "timestamps in Horovod's own log", inverted=True),
)
BY_NAME = {s.name: s for s in SETTINGS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting's flag (and its off flag), each storing under ``Setting.name``."""
    for s in SETTINGS:
        note = "" if s.here else " (backend='horovod' only)"
        if s.kind is bool:
            assert s.off_flag is not None  # _bool gives every on/off setting its off flag
            pair = parser.add_mutually_exclusive_group()
            pair.add_argument(s.flag, dest=s.name, action="store_const", const=True,
                              help=s.help + note)
            pair.add_argument(s.off_flag, dest=s.name, action="store_const", const=False,
                              help=f"off: the opposite of {s.flag}")
        else:
            parser.add_argument(s.flag, dest=s.name, type=s.kind, choices=s.choices,
                                metavar=None if s.choices else s.key.upper(),
                                help=s.help + note)
    # Horovod's names before 0.21, still taken by its horovodrun.
    parser.add_argument("--log-hide-timestamp", dest="logging.with_timestamp",
                        action="store_const", const=False, help=argparse.SUPPRESS)
    parser.add_argument("--no-log-hide-timestamp", dest="logging.with_timestamp",
                        action="store_const", const=True, help=argparse.SUPPRESS)


def read_config(path: str) -> dict[str, Any]:
    """A horovodrun config file as ``{section.key: value}``, every value checked as its flag's.

    Horovod's layout: sections ``params``, ``autotune``, ``timeline``, ``stall_check``,
    ``library_options``, ``logging`` of ``key: value``, and ``controller: mpi``. A section or
    key Horovod does not know is refused rather than skipped: a misspelt setting would
    otherwise change nothing without a word."""
    try:
        import yaml
    except ImportError:
        raise UsageError(f"--config-file {path!r}: reading it needs PyYAML "
                         "(pip install pyyaml), as horovodrun does") from None
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"--config-file {path!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--config-file {path!r}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or "unreadable"
        raise UsageError(f"--config-file {path!r}: not YAML{at}: {problem}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UsageError(f"--config-file {path!r}: want a mapping of sections, got "
                         f"{type(config).__name__}")
    values: dict[str, Any] = {}
    sections = {s.section for s in SETTINGS}
    for section, body in config.items():
        if section == "controller":
            values["controller"] = body
            continue
        if section not in sections:
            raise UsageError(f"--config-file {path!r}: unknown section {section!r}; Horovod's "
                             f"are {', '.join(sorted(sections | {'controller'}))}")
        if body is None:  # every key commented out: an empty section, as Horovod reads it
            body = {}
        if not isinstance(body, dict):
            raise UsageError(f"--config-file {path!r}: section {section!r} wants key: value "
                             "lines")
        if section == "stall_check" and body:  # Horovod: on, unless the section says not
            values["stall_check.enabled"] = True
        for key, value in body.items():
            setting = BY_NAME.get(f"{section}.{key}")
            if setting is None:
                known = ", ".join(s.key for s in SETTINGS if s.section == section)
                raise UsageError(f"--config-file {path!r}: unknown key {section}.{key}; "
                                 f"{section} has {known}")
            values[setting.name] = _typed(setting, value, f"--config-file {path!r}: "
                                          f"{setting.name}")
    return values


def _typed(setting: Setting, value: Any, where: str) -> Any:
    """``value`` if it is of the setting's kind (an int for a float too); UsageError if not."""
    kind = setting.kind
    ok = (isinstance(value, bool) if kind is bool
          else isinstance(value, str) if kind is str
          else isinstance(value, int | float) and not isinstance(value, bool)
          and (kind is float or isinstance(value, int)))
    if not ok:
        want = {bool: "true or false", str: "a string", int: "a whole number",
                float: "a number"}[kind]
        raise UsageError(f"{where}: want {want}, got {value!r}")
    if setting.choices and isinstance(value, str) and value.upper() in setting.choices:
        value = value.upper()  # Horovod's core reads its log level in any case
    if setting.choices and value not in setting.choices:
        raise UsageError(f"{where}: {value!r} is not one of {', '.join(setting.choices)}")
    return value


def resolve(args: argparse.Namespace, config: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: value}`` of every setting given, the command line before the config file;
    UsageError for a value out of range (Horovod's checks), naming where it came from."""
    chosen: dict[str, Any] = {}
    for s in SETTINGS:
        given = getattr(args, s.name)
        value = given if given is not None else config.get(s.name)
        if value is None:
            continue
        source = s.flag if given is not None else \
            f"--config-file {getattr(args, 'config_file', None)!r}: {s.name}"
        if s.kind in (int, float) and not 0 <= value < math.inf:  # nan and inf too
            raise UsageError(f"{source} {value}: want a finite number >= 0")
        if s.at_most is not None and value > s.at_most:
            raise UsageError(f"{source} {value}: want <= {s.at_most:g}")
        chosen[s.name] = value
    return chosen


def variables(chosen: Mapping[str, Any]) -> dict[str, str]:
    """The ``HOROVOD_*`` variables for the chosen settings, as horovodrun writes them."""
    out = {}
    for name, value in chosen.items():
        s = BY_NAME[name]
        if s.only_with is not None and not chosen.get(s.only_with):
            continue
        if s.kind is bool:
            out[s.variable] = "1" if value != s.inverted else "0"
        elif s.scale != 1:
            out[s.variable] = str(value * s.scale)
        else:
            out[s.variable] = str(value)
    return out
