"""When to checkpoint, and whether a run may write or resume the checkpoints it is pointed at.

Pure decisions on plain values (no argparse Namespace, no MPI), so that the command line, a
benchmark driver or a test can ask them before any rank starts: :func:`parse_every` and
:class:`Every` read ``--checkpoint-every``; :func:`check` refuses a resumption of another run
(other algorithm, ranks or trajectory-changing options) and folders that would mix two runs'
checkpoints, and says which output and checkpoint folders the run is to use.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hpctrain.checkpoint.folder import (
    SUBDIR,
    checkpoint_header,
    corrupt,
    listing,
    named_aside,
    refuse_newer_snapshots,
    resolve,
    run_folder,
)
from hpctrain.checkpoint.format import CorruptCheckpoint
from hpctrain.comm import env_rank
from hpctrain.errors import UsageError, plural
from hpctrain.options import (
    HUGE,
    Fields,
    as_typed,
    field_of_key,
    flag_of_key,
    keyed,
    python_shown,
    typed_flag,
)

# Options that may differ between a run and its resumption. Most do not change results at all
# (folders, the checkpoint interval, when a run gives up or stops, logging and profiling, the
# stall watchdog's timeout, the sharded exchange's round size, where and when snapshots are
# scored: --eval, --eval-rank, whose rank trains not); the others only in float
# rounding: --threads (the order of torch's sums), device, compilation, cuDNN's choice of
# kernels, ssgd's allreduce backend, micro-batch size (except with batch norm, whose
# statistics are then each micro-batch's) and mixed precision (the forward's). The backend
# follows the launcher (torchrun has no MPI world, so ssgd there runs --sync-backend torch): an
# mpirun run could not go on under torchrun, told it was started "with --sync-backend mpi,
# not torch", a value never given.
MAY_CHANGE = frozenset({"out", "resume", "checkpoint_every", "checkpoint_dir", "max_bad_steps",
                        "no_progress", "threads", "data_dir", "tensorboard", "log_every", "eval",
                        "eval_rank",
                        "stop_on_collapse", "device", "micro_batch_size",
                        "mixed_precision", "compile", "profile", "sync_backend",
                        "cudnn_benchmark", "stall_timeout", "shuffle_chunk_mb", "data_placement"})

# And on another number of ranks: --slowdown names workers, which the resized run may lack.
RESIZE_MAY_CHANGE = frozenset({"slowdown"})


AUTO = "auto"  # --resume auto: continue from the run's own checkpoints if it has any


OFF = "off"  # --checkpoint-every off: none, over a --config file's or a resumed run's setting


def parse_every(text: str) -> str:
    """``--checkpoint-every``: ``N`` seconds or ``Ne`` epochs, N > 0 (returned stripped),
    or ``off`` (:data:`OFF`: no checkpoints, as without the option, but also none where the
    option would be inherited: over a ``--config`` file's value, or a resumed run's).

    Raises argparse.ArgumentTypeError, so that it serves as an argparse ``type``.
    """
    value = str(text).strip()
    if value == OFF:
        return OFF
    number = value[:-1] if value.endswith("e") else value
    try:
        amount = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither seconds (600) nor epochs (2e)") from None
    if not 0 < amount < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    if value.endswith("e") and amount > HUGE:  # epochs x updates per epoch: a whole number
        raise argparse.ArgumentTypeError(f"must be at most {HUGE:g} epochs, got {text}")
    return value


@dataclass(frozen=True)
class Every:
    """How often to checkpoint: every ``amount`` epochs of updates, or ``amount`` seconds."""

    by_progress: bool
    """True for ``Ne`` (epochs of updates, the same updates in every run), False for seconds."""
    amount: float
    """N: epochs when ``by_progress``, else seconds (> 0)."""

    @classmethod
    def parse(cls, text: str) -> Every:
        """From ``--checkpoint-every``'s text (see :func:`parse_every`, whose errors it
        raises; ``off`` is no interval: ValueError)."""
        value = parse_every(text)
        if value == OFF:
            raise ValueError("--checkpoint-every off is no interval")
        by_progress = value.endswith("e")
        return cls(by_progress, float(value[:-1] if by_progress else value))

    def interval_updates(self, steps_per_epoch: int) -> int:
        """Updates between two checkpoints (at least 1) with ``steps_per_epoch`` updates per
        epoch; only for ``by_progress`` (ValueError otherwise: time is no update count)."""
        if not self.by_progress:
            raise ValueError(f"every {self.amount:g} seconds is no number of updates")
        return max(1, round(self.amount * steps_per_epoch))


@dataclass(frozen=True)
class Resolved:
    """The checkpoint-related folders a run is to use, as :func:`check` resolved them."""

    out: str | None
    """The output folder: as given, or with ``--resume`` and none given, the resumed run's."""
    checkpoint_dir: str | None
    """The checkpoint folder: as given, or with ``--resume`` and none given, the one resumed."""
    resume: str | None
    """The checkpoint folder resumed from (``DIR`` or ``DIR/checkpoints``), or None."""
    every: str | None
    """``--checkpoint-every``: as given, or with ``--resume`` and none given, the resumed
    run's (a run continued keeps writing checkpoints, and stops on SIGUSR1, as it did); None
    for none (``off``)."""


def check(*, algo: str, ranks: int, every: str | None, checkpoint_dir: str | None,
          resume: str | None, out: str | None, run_config: dict,
          may_change: frozenset[str], resize: bool = False,
          defaults: dict | None = None, absent: dict | None = None,
          names: Fields | None = None) -> Resolved:
    """Check the checkpoint options before MPI starts; for ``resume``, check that the newest
    checkpoint's run is this one (same ``algo``, ``ranks`` unless ``resize`` allows another
    number, and ``run_config`` values over the keys it also recorded, except ``may_change``);
    return the folders and interval to use (``out`` and ``every`` default to the resumed
    run's). UsageError, naming the flag, when the run must not go ahead.

    ``run_config``: the run's effective configuration, flat and JSON-able (what its checkpoints
    record in their header's ``args``; keys are option names with ``_`` for ``-``);
    ``defaults``: the same of a run given no option, so that a refusal says which value is
    the default a left-out option took; ``absent``: every option this hpctrain knows, with
    the value a run whose header lacks it trained with (its default: the option did not exist
    then), so that a resumption that sets one otherwise is refused too, and a header option
    outside it (a newer hpctrain's) is refused. None: the header's keys only are compared.
    ``names``: each option's field (:data:`Fields`): outside the command line the refusals
    name the options by them, as a Python caller gave them (``OptimConfig.lr=0.1``); None:
    by their flags.
    """
    off, every = every == OFF, None if every == OFF else every  # off: not even the resumed run's
    # Without an interval the folder was made and locked, and nothing written in it. With
    # --resume (auto too: a requeued job looks there) it is the folder resumed from.
    if checkpoint_dir is not None and every is None and resume is None:
        raise UsageError(f"{keyed('checkpoint_dir', names, checkpoint_dir)} needs "
                         f"{keyed('checkpoint_every', names)}: without it no checkpoint is "
                         "written")
    typed = resume
    if resume == AUTO:
        resume = _auto(checkpoint_dir, out, names)
    if resume is not None:
        folder, old = _resumed_run(resume, typed == AUTO, algo=algo, ranks=ranks,
                                   resize=resize, run_config=run_config,
                                   may_change=may_change, defaults=defaults, absent=absent,
                                   names=names)
        if out is None:
            out = _resumed_out(folder, old)
        if checkpoint_dir is None:
            checkpoint_dir = str(folder)
        recorded = old.get("checkpoint_every")
        if every is None and not off and isinstance(recorded, str) and recorded != OFF:
            every = recorded
        resume = str(folder)
    if resume is None and out is not None:
        given_out = keyed("out", names, out)
        _refuse_theirs(
            Path(out) / SUBDIR,
            lambda problems: f"{given_out} holds the checkpoints of an unfinished run, none "
                             f"of which can be read ({problems}): "
                             f"{_none_read(keyed('out', names))}",
            f"{given_out} holds the checkpoints of an unfinished run; continue it with "
            f"{keyed('resume', names, out)} or choose another folder",
            lambda aside: f"{given_out} holds an unfinished run's checkpoints, only unusable "
                          f"ones {aside}, or choose another folder for a new run")
    if out is not None and listing(out) and (resume is None or
                                             Path(out).resolve() != Path(resume).resolve()):
        raise UsageError(f"{keyed('out', names, out)} is a folder of checkpoints (a run's "
                         f"{keyed('checkpoint_dir', names)}); continue that run with "
                         f"{keyed('resume', names, out)} or choose another folder")
    if every is not None and (out is not None or checkpoint_dir is not None):
        _check_checkpoint_dir(run_folder(checkpoint_dir, out), out, resume, names,
                              checkpoint_dir)
    return Resolved(out=out, checkpoint_dir=checkpoint_dir, resume=resume, every=every)


def _resumed_run(given: str, auto: bool, *, algo: str, ranks: int, resize: bool,
                 run_config: dict, may_change: frozenset[str], defaults: dict | None,
                 absent: dict | None, names: Fields | None = None) -> tuple[Path, dict]:
    """The checkpoint folder ``--resume given`` (``auto``: found by ``--resume auto``)
    resolves to, and the options its newest checkpoint records, once that is found to be
    this run's (see :func:`check`); UsageError, naming what differs, otherwise."""
    # the option resumed from, as typed: --resume DIR, --resume auto (DIR); from Python
    # CheckpointConfig.resume='DIR'
    said = f"{keyed('resume', names, AUTO)} ({given})" if auto else keyed("resume", names, given)
    if Path(given).is_file():  # a checkpoint file: "no such folder" said it was not there
        raise UsageError(f"{said}: is a file; give the folder that holds it "
                         f"({Path(given).parent}): {keyed('resume', names)} takes its newest "
                         "valid checkpoint")
    if not Path(given).is_dir():
        raise UsageError(f"{said}: no such folder")
    folder = resolve(given)
    header = _newest_header(folder, said, names)
    if env_rank() == 0:  # one rank opens them all (hundreds, on a shared file system); its
        refuse_newer_snapshots(folder)  # refusal before MPI ends the job, as refuse_in_use's
    refused = _other_run(header, algo, ranks, resize, names)
    if refused:
        raise UsageError(f"{said}: its checkpoint is of {refused}")
    old = _as_trained(header.get("args", {}), absent, said)
    if header.get("ranks") != ranks:
        may_change |= RESIZE_MAY_CHANGE
    if same_weights(old.get("init_from"), run_config.get("init_from"), header):
        may_change |= {"init_from"}
    change = changed_option(old, run_config, may_change, defaults, names)
    if change:
        raise UsageError(f"{said}: the run was started {change}"
                         f"{_hint(old, run_config, may_change, defaults, header, names)}")
    return folder, old


def _other_run(header: dict, algo: str, ranks: int, resize: bool,
               names: Fields | None = None) -> str:
    """What of the checkpoint's run this one may not go on from (``"--algo ma, not --algo
    sgd"``), else "": the ranks are named only where they are refused too (``resize``
    False), since a resumption on another number of ranks is otherwise allowed."""
    old_algo, old_ranks = header.get("algo"), header.get("ranks")
    other_algo, other_ranks = old_algo != algo, old_ranks != ranks and not resize

    def named(value) -> str:  # --algo ma, or from Python RunConfig.algo='ma'
        return keyed("algo", names, value, typed=str(value))

    if not other_ranks:
        return f"{named(old_algo)}, not {named(algo)}" if other_algo else ""
    had = plural(old_ranks, "rank") if isinstance(old_ranks, int) else f"{old_ranks} ranks"
    cannot = "and this run cannot be resized"
    if not other_algo:
        return f"{had}, not {ranks}, {cannot}"
    return f"{named(old_algo)} on {had}, not {named(algo)} on {ranks}, {cannot}"


def _as_trained(recorded: dict, absent: dict | None, said: str) -> dict:
    """The options a checkpoint's run trained with: those its header ``recorded``, and for
    each option it lacks (newer than the checkpoint) the ``absent`` value, its default. An
    option it records that this hpctrain does not know is refused: a newer hpctrain wrote
    it, and whether its value is what a run without the option does cannot be told, so the
    run's update rule could not be kept. ``said``: the resume option, as refusals name it."""
    if absent is None:
        return dict(recorded)
    unknown = [key for key in sorted(recorded) if key not in absent]
    if unknown:
        named = ", ".join(typed_flag(flag_of_key(key), recorded[key]) for key in unknown)
        them = "them" if len(unknown) > 1 else "it"
        raise UsageError(f"{said}: its checkpoint records {named}, "
                         f"{'options' if len(unknown) > 1 else 'an option'} this hpctrain "
                         f"does not know (a newer hpctrain wrote {them}); whether the run can "
                         f"go on without {them} cannot be told: go on with the hpctrain that "
                         "wrote the checkpoint")
    return {**absent, **recorded}


def _check_checkpoint_dir(folder: Path, out: str | None, resume: str | None,
                          names: Fields | None = None, typed: str | None = None) -> None:
    """Refuse a checkpoint folder that holds another run's checkpoints (but the ones
    resumed), is another run's ``--out`` or holds a bench compare: the run's would mix
    with theirs. ``names``: see :func:`check`; ``typed``: the folder as given (``ck/``,
    which ``folder``, a Path, writes ``ck``), None where none was (``<out>/checkpoints``)."""
    given = keyed("checkpoint_dir", names, str(folder) if typed is None else typed)
    held = (f"{given} holds another run's checkpoints; resume it with "
            f"{keyed('resume', names)} or choose another folder")
    if resume is None:  # a new run would mix its checkpoints with theirs, or write over them
        _refuse_theirs(
            folder,
            lambda problems: f"{given} holds another run's checkpoints, "
                             f"none of which can be read ({problems}): "
                             f"{_none_read(keyed('checkpoint_dir', names))}",
            held,
            lambda aside: f"{given} holds another run's checkpoints, only "
                          f"unusable ones {aside}, or choose another folder")
    elif listing(folder) and folder.resolve() != Path(resume).resolve():
        raise UsageError(held)
    own = [Path(f).resolve() for f in (out, resume) if f is not None]
    if folder.resolve() not in own and ((folder / "config.json").exists()
                                         or listing(folder / SUBDIR)):
        raise UsageError(f"{given} is another run's {keyed('out', names)} folder; "
                         "choose another folder")
    if (folder / "compare.json").exists():
        raise UsageError(f"{given} holds a bench compare; choose another folder")


def _refuse_theirs(folder: Path, unreadable: Callable[[str], str], held: str,
                   unusable: Callable[[str], str]) -> None:
    """Refuse a new run's checkpoints in ``folder`` when another run's are there: none
    readable (``unreadable`` of their problems), some (``held``), or only unusable ones set
    aside (``unusable`` of :func:`_unusable`'s words). One order of checks for ``--out``'s
    checkpoints and ``--checkpoint-dir``, so that a folder is judged alike under either."""
    if problems := _unreadable(folder):
        raise UsageError(unreadable(_listed(problems)))
    if listing(folder):
        raise UsageError(held)
    if aside := corrupt(folder):
        raise UsageError(unusable(_unusable(aside)))


def _unusable(aside: list[Path]) -> str:
    """Checkpoints set aside as unusable (``*.corrupt``), in a refusal: the first's name,
    and the one way to go on from them."""
    return f"({named_aside(aside)}): resume from a good copy"


def recorded_out(checkpoint_dir: str | Path) -> str | None:
    """The outputs' folder of the run whose checkpoints are in ``checkpoint_dir``, as
    ``--resume`` without ``--out`` would take it (from the newest readable checkpoint's
    header); None when the folder holds none that can be read."""
    folder = Path(checkpoint_dir)
    if not listing(folder):
        return None
    try:
        header = _newest_header(folder, f"--resume {folder}")
    except UsageError:  # unreadable: what check() says about the folder is the line to see
        return None
    args = header.get("args")
    return _resumed_out(folder, args) if isinstance(args, dict) else None


def recorded_args(args: dict) -> dict:
    """A run's flat options (:func:`hpctrain.config.flat`) as its checkpoints record them:
    ``out`` and ``checkpoint_dir`` absolute, so that a run resumed from another working
    folder writes to its own outputs' folder, not to one of that name made there."""
    return {**args, **{key: os.path.abspath(args[key]) for key in ("out", "checkpoint_dir")
                       if isinstance(args.get(key), str)}}


def _resumed_out(folder: Path, old: dict) -> str | None:
    """The outputs' folder of a run resumed from ``folder`` without ``--out``: the folder's
    parent when it is the run's own ``<out>/checkpoints`` (wherever the run folder is now:
    moved, copied, or named from another working folder), else the ``--out`` it recorded."""
    out, own = old.get("out"), old.get("checkpoint_dir")
    if not isinstance(out, str):
        return None
    default = own is None or (isinstance(own, str) and Path(own) == Path(out) / SUBDIR)
    return str(folder.parent) if default and folder.name == SUBDIR else out


def resumptions(header: dict | None, args: dict, ranks: int) -> list[dict]:
    """The run's resumptions, oldest first, this one last (None: not resumed, []): each at
    which ``update`` and what ``changed`` there, ``{"--flag": [before, after]}`` over the
    options of :func:`hpctrain.config.flat` (``args``, as :func:`recorded_args` records them)
    and ``"ranks"``. Checkpoint headers carry the list, so that each resumption of the run
    knows those before it, and config.json's ``run_info`` shows it: config.json holds the
    last attempt's settings, with which a repeat trains throughout."""
    if header is None:
        return []
    earlier = header.get("resumes")
    old = header.get("args")
    before = _with_folders(old if isinstance(old, dict) else {})
    after = _with_folders(args)
    changed = {flag_of_key(key): [before[key], after[key]]
               for key in sorted(before.keys() & after.keys() - {"resume"})
               if before[key] != after[key]}
    if header.get("ranks") != ranks:
        changed["ranks"] = [header.get("ranks"), ranks]
    return [*(earlier if isinstance(earlier, list) else []),
            {"update": header.get("updates"), "changed": changed}]


def _with_folders(args: dict) -> dict:
    """Flat options with the checkpoint folder a run wrote to (None: ``<out>/checkpoints``),
    as a resumption, which names it, compares it."""
    out, own = args.get("out"), args.get("checkpoint_dir")
    if own is None and isinstance(out, str):
        return {**args, "checkpoint_dir": str(Path(out) / SUBDIR)}
    return args


def changed_option(old: dict, new: dict, may_change: frozenset[str],
                   defaults: dict | None = None, names: Fields | None = None) -> str | None:
    """The options (of :func:`hpctrain.config.flat`'s, outside ``may_change``) whose values
    in ``new`` differ from ``old``'s, said as "with --lr 0.1, not 0.2"; None if none. All of
    them: a changed ``--optimizer`` changes the default ``--lr`` too, and naming only that
    would hide the one the user changed. ``defaults`` (flat): a value that is its option's
    default is said to be, as a flag left out gives it. ``names``: outside the command line
    (:func:`hpctrain.options.on_command_line`), the options are said as the fields a Python
    caller gave ("with OptimConfig.lr=0.1, not 0.2")."""
    changes = [_changed(key, old[key], new[key], (defaults or {}).get(key, _NONE), names)
               for key in _changed_keys(old, new, may_change)]
    return "; ".join(changes) or None


_NONE = object()  # no default known


def _changed_keys(old: dict, new: dict, may_change: frozenset[str]) -> list[str]:
    """The keys of the options whose values differ, :data:`_SAME_WHEN` judging (the
    spelling of a ``--slowdown`` is no other value)."""
    return [key for key in sorted(old.keys() & new.keys() - may_change)
            if not _SAME_WHEN.get(key, _equal)(old[key], new[key])]


def _equal(a, b) -> bool:
    return a == b


def _same_slowdown(a, b) -> bool:
    """``--slowdown 1:2`` and ``" 1:2.0"`` are the same factors."""
    from hpctrain.stragglers import parse_slowdown

    try:
        return a == b or parse_slowdown(a, 1 << 30) == parse_slowdown(b, 1 << 30)
    except (UsageError, TypeError, AttributeError):  # a header edited by hand: compared as is
        return False


_SAME_WHEN = {"slowdown": _same_slowdown}


def same_weights(recorded, given, header: dict) -> bool:
    """Whether ``--init-from given`` names the weights a run ``recorded`` starting from: the
    same path (a resumed run does not read the file again: it may be gone since), or a file
    whose sha256 is the one its checkpoint's ``header`` carries (the file was moved)."""
    if not isinstance(recorded, str) or not isinstance(given, str):
        return False
    digest = header.get("init_from_sha256")
    if recorded == given:
        return True
    if not isinstance(digest, str):
        return False
    from hpctrain import provenance, weights

    try:
        return provenance.sha256_of(weights.file_of(given)) == digest
    except (OSError, UsageError):  # no such file: not the weights the run started from
        return False


def _hint(old: dict, new: dict, may_change: frozenset[str], defaults: dict | None,
          header: dict, names: Fields | None = None) -> str:
    """What a resume refused for ``old`` and ``new``'s differences may do instead: give the
    run's values of the options left out (at their defaults); the run's length cannot
    change; ``--init-from`` names the run's weights by its path or by their hash."""
    keys = _changed_keys(old, new, may_change)
    left_out = [key for key in keys if defaults and key in defaults and old[key] is not None
                and new[key] == defaults[key]]
    notes = []
    if left_out:
        notes.append("to go on, give " + " ".join(keyed(k, names, old[k]) for k in left_out))
    if "epochs" in keys and "epochs" not in left_out:
        notes.append(f"{keyed('epochs', names)} shapes the learning-rate schedule, so a run "
                     "keeps its length: to train longer, start a new run, with "
                     f"{keyed('init_from', names)} a finished run's model")
    if "init_from" in keys and isinstance(header.get("init_from_sha256"), str):
        notes.append(f"{keyed('init_from', names)} takes the run's path, or a file of its "
                     f"weights (sha256 {header['init_from_sha256'][:12]}...)")
    return f": {'; '.join(notes)}" if notes else ""


def _changed(key: str, old, new, default=_NONE, names: Fields | None = None) -> str:
    """An option's recorded and given values, in a message, as the flags a user types (an
    on/off option by its flag alone; None: left to a default the run resolves later, as
    ``--tau``, or not given at all, as ``--eval-rank``; a default is not compared with a
    value, which may or may not be the same: leaving the flag out goes on). From Python
    (:func:`hpctrain.options.keyed`), as the fields given: ``with OptimConfig.lr=0.1, not
    0.2``."""
    note = " (the default)" if default is not _NONE and new == default else ""
    field = field_of_key(key, names)
    if field is None and isinstance(old, bool) and isinstance(new, bool):
        flag = flag_of_key(key)
        return f"with {flag}, not without it" if old else f"without {flag}, not with it"
    if old is None:
        return f"without {keyed(key, names)} (its default; leave it out), not with " \
               f"{keyed(key, names, new)}"
    if new is None:
        return f"with {keyed(key, names, old)}, not without it"
    if field is None:  # as its flag takes it, a table in quotes: what to type
        value = as_typed(new, quote="'")
    else:  # as the field holds it
        value = python_shown(not new if field[2] and isinstance(new, bool) else new)
    return f"with {keyed(key, names, old)}, not {value}{note}"


def resumes(resume: str | None, checkpoint_dir: str | None, out: str | None) -> bool:
    """Whether a run goes on from checkpoints, for checks made before :func:`check` resolves
    ``--resume auto``: a folder given, or auto where the run's folder holds a checkpoint."""
    if resume != AUTO:
        return resume is not None
    return (checkpoint_dir, out) != (None, None) and bool(listing(run_folder(checkpoint_dir,
                                                                             out)))


def _auto(checkpoint_dir: str | None, out: str | None,
          names: Fields | None = None) -> str | None:
    """``--resume auto``: the run's own checkpoint folder when it holds a checkpoint (a
    restarted or requeued job), else None (a first start)."""
    auto = keyed("resume", names, AUTO)
    if checkpoint_dir is None and out is None:
        raise UsageError(f"{auto} needs {keyed('out', names)} or "
                         f"{keyed('checkpoint_dir', names)}: the folder a restarted job looks "
                         "in for its checkpoints")
    folder = run_folder(checkpoint_dir, out)
    if listing(folder):
        return str(folder)
    if aside := corrupt(folder):  # a fresh start would write over their run
        raise UsageError(f"{auto}: {folder} holds only unusable checkpoints "
                         f"{_unusable(aside)}, or choose another folder for a new run")
    return None


def _none_read(flag: str) -> str:
    """What to do with a folder of checkpoints none of which can be read: no resume goes on
    from them (nor are they set aside as *.corrupt here: a resume does that, once MPI runs),
    and a new run (a new ``flag``) would mix its checkpoints with theirs."""
    return (f"to go on, put back a good copy of one; to start anew, choose another {flag}, "
            "or first move them out of the folder")


def _header_or_problems(folder: Path) -> dict | list[str]:
    """The newest checkpoint's header in ``folder`` that can be read, else each one's
    problem (CorruptCheckpoint's line: ``ckpt-...pt: truncated header``), newest first; one
    it cannot read (an I/O error, permissions) or in a newer hpctrain's format
    (NewerCheckpoint) is a UsageError, in the line rank 0 would raise."""
    problems = []
    for path in listing(folder):
        try:
            return checkpoint_header(path)
        except CorruptCheckpoint as e:
            problems.append(str(e))
    return problems


def _unreadable(folder: Path) -> list[str]:
    """Each checkpoint's problem in ``folder`` when it holds some and none can be read;
    else []."""
    found = _header_or_problems(folder)
    return found if isinstance(found, list) else []


def _listed(problems: list[str]) -> str:
    """Unreadable checkpoints' problems in a message: the first three, and how many more."""
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def _newest_header(folder: Path, said: str, names: Fields | None = None) -> dict:
    """The newest checkpoint's header, skipping the ones
    :func:`hpctrain.checkpoint.folder.load_newest` would set aside; one it cannot read (an
    I/O error, permissions) is refused here, before MPI, in the line rank 0 would raise
    (taking the older one's header instead let the run start). ``said``: the resume option
    as a refusal names it (``--resume DIR``); ``names``: see :func:`check`."""
    found = _header_or_problems(folder)
    if isinstance(found, dict):
        return found
    if found:  # each one's problem: what a user must act on is there, file by file
        raise UsageError(f"{said}: none of the checkpoints there can be read "
                         f"({_listed(found)}): {_none_read(keyed('out', names))}")
    if aside := corrupt(folder):  # set aside by an earlier attempt: say so, as auto does
        raise UsageError(f"{said}: {folder} holds only unusable checkpoints "
                         f"{_unusable(aside)}")
    raise UsageError(f"{said}: no checkpoint found there")
