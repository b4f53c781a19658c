"""``hpctrain train``'s options, declared from the configuration dataclasses and the registry.

Every field declared with :func:`hpctrain.options.option` on :class:`hpctrain.config.RunConfig`,
its sections and each algorithm's ``Options`` becomes one flag. Flags default to "not given"
(``argparse.SUPPRESS``), so the values a user typed are known exactly: they override
``--config FILE`` (TOML, or a run's ``config.json``), and an algorithm option given to an
algorithm that does not declare it is refused in one line. ``bench compare`` forwards the same
options to each run, reading their owners from :func:`algorithm_options`.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpctrain import checkpoint, comm, paths, plugins, registry
from hpctrain import config as configs
from hpctrain.checkpoint.policy import AUTO
from hpctrain.config import OptimConfig, RunConfig
from hpctrain.errors import UsageError, plural
from hpctrain.options import (
    as_typed,
    command_line,
    dash_values,
    declared,
    flag_of,
    flat_key,
    parser_of,
)
from hpctrain.run_folders import refuse_finished
from hpctrain.shuffle.options import DEFAULT_CHUNK_MB

if TYPE_CHECKING:
    from dataclasses import Field


@dataclass(frozen=True)
class Declared:
    """One option: its flag, where its value goes (``("optim", "lr")``), and its field."""

    flag: str
    path: tuple[str, ...]
    field: Field[Any]
    owners: tuple[str, ...] | None = None  # algorithms that take it; None: every algorithm

    @property
    def dest(self) -> str:
        return ".".join(self.path)

    @property
    def takes_value(self) -> bool:
        return self.field.type not in ("bool", bool)


def shared_options() -> list[Declared]:
    """The options of every run: RunConfig's own fields, then its sections'."""
    out = [Declared(flag_of(f), (f.name,), f) for f in declared(RunConfig)]
    for section, cls in configs.SECTIONS.items():
        out += [Declared(flag_of(f), (section, f.name), f) for f in declared(cls)]
    return out


# Flags beside train's options that an algorithm's option may not take: argparse's, --config,
# and those bench compare adds (simulate's come from SimConfig). A test checks these against
# the parsers.
COMMAND_FLAGS = ("-h", "--help", "--config")
COMPARE_FLAGS = ("--algos", "--workers", "--targets", "--launcher", "--timeout", "--seeds",
                 "--simulate")
_FLAG = re.compile(r"--[A-Za-z0-9][A-Za-z0-9-]*")  # fullmatch: "$" takes a final "\n"


def algorithm_options(algorithms: dict | None = None) -> list[Declared]:
    """Each algorithm option once, with the algorithms that declare it, in registry order
    (a user's algorithm loaded by :func:`load_named_algorithms` last). UsageError for a user's
    option whose name or flags (an on/off one has two) are already another option's, declared
    otherwise, or a flag of the command lines that take algorithm options. ``algorithms``:
    those to check (name -> class), else every one loaded."""
    taken = _taken_flags()
    seen: dict[str, Declared] = {}
    for name, cls in (registry.known() if algorithms is None else algorithms).items():
        for f in declared(cls.Options):
            d = Declared(flag_of(f), ("algorithm", f.name), f)
            earlier = seen.get(f.name)
            if earlier is not None and _declaration(earlier.field) == _declaration(f):
                continue  # the same option (inherited): one flag, owners from registry.owners
            flags = (d.flag,) if d.takes_value else on_off_flags(d)
            clash = next((flag for flag in flags if flag in taken), None)
            problem = ("is no flag (want --words-with-dashes)"
                       if not all(map(_FLAG.fullmatch, flags))
                       else f"is {_whose(earlier.field)} {earlier.flag} already" if earlier
                       else f"is {_whose(taken[clash])} {clash} already" if clash else None)
            if problem:
                shown = d.flag if _FLAG.fullmatch(d.flag) else repr(d.flag)
                raise UsageError(f"--algo {name}: its option {f.name} ({shown}) {problem}; "
                                 "name it otherwise")
            seen[f.name] = replace(d, owners=tuple(registry.owners(f.name)))
            taken.update(dict.fromkeys(flags, f))
    return list(seen.values())


def _taken_flags() -> dict[str, object]:
    """Flag -> what has it: a shared option's field (both flags of an on/off one), or the
    name of the command that adds it."""
    from hpctrain.sim.config import SimConfig

    taken: dict[str, object] = {}
    for d in shared_options():
        taken.update(dict.fromkeys((d.flag,) if d.takes_value else on_off_flags(d), d.field))
    taken.update(dict.fromkeys(COMMAND_FLAGS, "the command line's"))
    taken.update(dict.fromkeys(COMPARE_FLAGS, "bench compare's"))
    taken.update({flag_of(f): "hpctrain simulate's" for f in declared(SimConfig)})
    return taken


def _whose(owner) -> str:
    """Who has a flag (:func:`_taken_flags`' value): an option field's algorithms, or every
    run, or a command."""
    if isinstance(owner, str):
        return owner
    names = [registry.display_name(n) for n, a in registry.known().items()
             if owner in fields(a.Options)]
    return f"{', '.join(names)}'s" if names else "every run's"


def _declaration(f) -> tuple:
    """What makes two option fields the same option: flag, type, default and metadata (an
    algorithm of one's own may subclass a built-in's Options and so share its fields)."""
    return flag_of(f), f.name, str(f.type), repr(f.default), repr(dict(f.metadata))


class _PreParser(argparse.ArgumentParser):
    """:func:`load_named_algorithms`' parser: its errors are raised, not printed."""

    def error(self, message: str):
        raise argparse.ArgumentError(None, message)


def unknown_option_hint(parsed: dict[str, object]) -> str:
    """Said with an unknown flag of ``train`` or ``simulate``: a user's algorithm's options
    are flags only once its ``--algo`` loaded it (another ``--algo``'s command line does
    not know them), and ``--help`` lists the known ones."""
    algo = parsed.get("algo")
    command = f"hpctrain {parsed.get('command', 'train')}"
    if isinstance(algo, str) and plugins.is_reference(algo):  # loaded: not one of its own
        return f"neither {command}'s nor --algo {algo}'s; {command} --algo {algo} --help " \
               "lists those it knows"
    return ("an option of a user's algorithm is known only with its --algo MODULE:CLASS or "
            f"./FILE.py:CLASS; {command} --help lists those it knows")


def load_named_algorithms(argv: list[str]) -> None:
    """Load the users' algorithms ``argv`` names (``--algo MODULE:CLASS``, ``algo`` in a
    ``--config`` file, a reference among ``bench compare --algos``) before the command line's
    parser is built, so that their options are flags of it; UsageError if one cannot be had."""
    pre = _PreParser(add_help=False)  # abbreviations as the command's parser takes them
    compare = argv[:2] == ["bench", "compare"]
    for flag in ("--algos" if compare else "--algo", "--config"):
        pre.add_argument(flag, default=None)
    try:
        known, _ = pre.parse_known_args(argv)
    except argparse.ArgumentError:  # refused, with its reason, by the command's parser
        return
    named = [w.strip() for w in (known.algos or "").split(",")] if compare else []
    if not compare and known.algo is not None:
        named.append(known.algo)
    # a pipe is read once; a path no file can have is refused where the configuration is built
    elif known.config is not None and os.path.isfile(os.path.expanduser(known.config)):
        try:
            named.append(configs.read_file(known.config).get("algo"))
        except (UsageError, TypeError, AttributeError):
            pass  # refused, with its reason, when the configuration is built
    for name in named:
        if isinstance(name, str) and plugins.is_reference(name):
            try:
                registry.get(name)
            except UsageError as refused:
                if not compare:
                    raise
                # The reference's own refusal names --algo (or from Python RunConfig.algo),
                # which bench compare lacks: its reason follows the first ": ".
                reason = str(refused).partition(": ")[2] or str(refused)
                raise UsageError(f"--algos {known.algos!r}: {name}: {reason}") from None


def _default_text(f) -> str:
    default = f.default
    if default is None or default is False or default in ((), "") or f.metadata.get("store_false"):
        return ""
    return f" (default: {default})"


def on_off_flags(d: Declared) -> tuple[str, str]:
    """An on/off option's two flags, (the one that sets it True, the one that sets it False):
    ``--compile`` and ``--no-compile``, ``--progress`` and ``--no-progress``. The one that
    is not its default undoes what a ``--config`` file set."""
    if d.field.metadata.get("store_false"):
        return "--" + d.flag.removeprefix("--no-"), d.flag
    return d.flag, "--no-" + d.flag.removeprefix("--")


def add_option(group, d: Declared, *, dest: str | None = None, typed: bool = True):
    """Declare ``d`` on an argparse group (an on/off option's undoing flag too, see
    :func:`on_off_flags`); its value is absent unless given. Returns ``d``'s own action."""
    m = d.field.metadata
    kw = {"dest": dest or d.dest, "default": argparse.SUPPRESS,
          "help": m["help"] + _default_text(d.field)
          + ("; none: not set, also over --config's value" if clearable(d) else "")}
    if not d.takes_value:
        kw["action"] = "store_false" if m.get("store_false") else "store_true"
    else:
        if typed and (parse := parser_of(d.field)) is not None:
            kw["type"] = parse
        if typed and clearable(d):
            kw["type"] = _or_none(kw.get("type"), d.field.default)
        if m.get("choices") is not None:
            kw["choices"] = _OrNone(m["choices"]) if typed and clearable(d) and \
                d.field.default is None else m["choices"]
        if m.get("metavar"):
            kw["metavar"] = m["metavar"]
        elif not m.get("choices"):
            kw["metavar"] = d.path[-1].upper()
    action = group.add_argument(d.flag, **kw)
    if not d.takes_value:
        on, off = on_off_flags(d)
        group.add_argument(off if action.const else on, dest=action.dest,
                           default=argparse.SUPPRESS, action="store_const",
                           const=not action.const, help=f"undo {d.flag} (a --config file's)")
    return action


def clearable(d: Declared) -> bool:
    """Whether ``d``'s flag takes ``none`` (its default, undoing a ``--config`` file's value):
    an option declared so, and every one whose default is None (``--lr none``: the
    algorithm's; ``--init-from none``: no weights; ``--out none``: a new folder). A folder
    or file named none is ``./none``."""
    return d.takes_value and (bool(d.field.metadata.get("clearable"))
                              or d.field.default is None)


class _OrNone(tuple):
    """An option's choices that also hold ``none``'s None (argparse checks the parsed
    value against them), listed without it in --help and in argparse's refusal."""

    def __contains__(self, value) -> bool:
        return value is None or tuple.__contains__(self, value)


def _or_none(parse, unset):
    """A clearable option's argparse type: ``none`` is ``unset`` (the field's default)."""
    def parsed(text: str):
        if text.strip().lower() == "none":
            return unset
        return text if parse is None else parse(text)
    parsed.__name__ = getattr(parse, "__name__", "value")  # argparse's "invalid <name> value"
    return parsed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """All of ``hpctrain train``'s options, the algorithms' in groups by who takes them."""
    dash_values(parser)  # --slowdown -1:2 is refused naming -1:2, not "expected one argument"
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="TOML file (or a run's config.json) with the run's settings; "
                             "options given on the command line override it (an on/off "
                             "one by its --no-... flag)")
    for d in shared_options():
        add_option(parser, d)
    groups: dict[tuple[str, ...], argparse._ArgumentGroup] = {}
    for d in algorithm_options():
        owners = d.owners
        assert owners is not None  # algorithm_options names every option's algorithms
        if owners not in groups:
            groups[owners] = parser.add_argument_group(
                f"options of {', '.join(map(registry.display_name, owners))}")
        add_option(groups[owners], d)


def given(args: argparse.Namespace, options: list[Declared]) -> dict:
    """The values given on the command line, nested as in :func:`hpctrain.config.to_dict`."""
    out: dict = {}
    for d in options:
        if hasattr(args, d.dest):
            table = out
            for key in d.path[:-1]:
                table = table.setdefault(key, {})
            table[d.path[-1]] = getattr(args, d.dest)
    return out


def note_other_workers(path: str | None, config: RunConfig) -> None:
    """Rank 0's line when a run's ``config.json`` is repeated (not resumed: a resize says its
    own) on another number of workers than it ran on: the same settings train otherwise
    there (each worker's part of the data, ssgd's samples per update), and nothing in the
    file's options says so."""
    if path is None or config.checkpoint.resume is not None or comm.env_rank() != 0 \
            or not Path(path).is_file():  # a pipe was read once, by build_given
        return
    info = configs.read_file(path).get("run_info")
    had = info.get("workers") if isinstance(info, dict) else None  # a TOML file has none
    now = config.algorithm_class.workers(
        config, comm.launch_size() - (config.eval_rank is not None))
    if isinstance(had, int) and had != now:
        print(f"hpctrain: {path}'s run had {plural(had, 'worker')}, this one has {now}: it "
              f"trains otherwise (each worker's data, the samples per update); launch "
              f"{plural(had, 'rank')} "
              "to repeat it", flush=True)


def rederived(base: dict, given: dict, path: str | None = None) -> dict:
    """A run's ``config.json`` (``base``) without the ``optim`` values it took by default
    where the options they follow from are given anew (``--algo``, ``--optimizer``,
    ``--lr-milestones``): ``--config sgd-run/config.json --algo asgd`` trains with asgd's rate
    and momentum, not sgd's. A value equal to the file's default counts as a default (the
    file does not say which were typed); a TOML file's values are the user's and stay."""
    optim, typed = base.get("optim"), given.get("optim", {})
    if "run_info" not in base or not isinstance(optim, dict) or \
            not isinstance(base.get("algo"), str):
        return base
    try:
        before = configs.defaults(base["algo"], optim.get("optimizer", "sgd"),
                                  optim.get("lr_milestones") or ())
        after = configs.defaults(given.get("algo", base["algo"]),
                                 typed.get("optimizer", optim.get("optimizer", "sgd")),
                                 typed.get("lr_milestones", optim.get("lr_milestones")) or ())
    except UsageError:  # an unknown algorithm: refused, with its name, by the caller
        return base
    stale = [key for key in before if key not in typed and key in optim
             and _same(optim[key], before[key]) and not _same(after[key], before[key])]
    if not stale:
        return base
    if comm.env_rank() == 0:
        print(f"hpctrain: {_listed(after, stale)} by default with the options given, not "
              f"{path}'s {_listed(optim, stale)}, its run's defaults", flush=True)
    return {**base, "optim": {k: v for k, v in optim.items() if k not in stale}}


def _same(a, b) -> bool:
    """Equal values, a JSON list (config.json's betas) as the tuple it was."""
    return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)


def without_milestones(base: dict, given: dict, path: str | None) -> dict:
    """``base`` without its step decay (``lr_milestones``, ``lr_gamma``) where what is given
    turns it off (another ``--lr-schedule``, ``--lr-milestones none``): the file's would
    refuse it (``--config step-run/config.json --lr-schedule cosine``)."""
    optim, typed = base.get("optim"), given.get("optim", {})
    off = typed.get("lr_schedule") not in (None, "step") or typed.get("lr_milestones") == ()
    if not isinstance(optim, dict) or not off:
        return base
    dropped = [k for k in ("lr_milestones", "lr_gamma") if optim.get(k, OptimConfig.lr_gamma)
               not in ((), [], OptimConfig.lr_gamma) and k not in typed]
    if optim.get("lr_schedule") == "step" and "lr_schedule" not in typed:
        dropped.append("lr_schedule")  # a TOML file's (a run's is rederived before)
    if not dropped:
        return base
    if comm.env_rank() == 0:
        turned = "--lr-milestones none" if typed.get("lr_milestones") == () else \
            f"--lr-schedule {typed['lr_schedule']}"
        print(f"hpctrain: {turned}: leaving out {path}'s {_listed(optim, dropped)} (the "
              "step decay's)", flush=True)
    return {**base, "optim": {k: v for k, v in optim.items() if k not in dropped}}


def other_algorithm(base: dict, algo: str, path: str | None) -> dict:
    """``base`` (a file for another algorithm) with only the ``[algorithm]`` options that
    ``algo`` declares too (``--config asgd.toml --algo ssp`` keeps the store's consistency,
    servers, shards); said once: those kept and those left out that are set otherwise than
    their default (all left out when the file's algorithm cannot be loaded). A key neither
    algorithm knows is refused, as under the file's own algorithm."""
    table, was = base.get("algorithm"), base["algo"]
    if not isinstance(was, str) or not was.strip():
        raise UsageError(f"--config {path}: algo {was!r} must be the name of an algorithm")
    if not isinstance(table, dict) or not table:  # not a table: refused by from_dict
        return base if table else {k: v for k, v in base.items() if k != "algorithm"}
    try:
        kept = {f.name: f.default for f in declared(registry.get(algo).Options)}
    except (UsageError, TypeError):  # an unknown algorithm: refused, with its name, later
        return {k: v for k, v in base.items() if k != "algorithm"}
    try:
        old = {f.name: f.default for f in declared(registry.get(was).Options)}
    except (UsageError, TypeError) as e:  # moved, misspelt: its defaults are not known
        old, why = None, str(e)
    unknown = [k for k in table if k not in kept and old is not None and k not in old]
    if unknown:
        raise UsageError(f"--config {path}: unknown configuration key algorithm.{unknown[0]}")
    said = [k for k in table if k in kept and table[k] != kept[k]]
    dropped = [k for k in table if k not in kept and (old is None or table[k] != old[k])]
    if (said or dropped) and comm.env_rank() == 0:
        parts = ([f"keeping {_listed(table, said)}"] if said else []) + (
            [f"leaving out {_listed(table, dropped)}"] if dropped else [])
        lost = "" if old is not None else f", which cannot be loaded: {why}"
        print(f"hpctrain: --algo {registry.display_name(algo)}: of {path}'s [algorithm] "
              f"(for {was}{lost}), {'; '.join(parts)}", flush=True)
    return {**base, "algorithm": {k: v for k, v in table.items() if k in kept}}


def without_chunk_size(base: dict, given: dict, path: str | None) -> dict:
    """``base`` without its sharded exchange's ``shuffle_chunk_mb`` where ``--data-placement
    replicated`` is given (the file's would refuse it)."""
    data, typed = base.get("data"), given.get("data", {})
    if typed.get("data_placement") != "replicated" or "shuffle_chunk_mb" in typed or \
            not isinstance(data, dict) or \
            data.get("shuffle_chunk_mb", DEFAULT_CHUNK_MB) == DEFAULT_CHUNK_MB:
        return base  # (a typed chunk size is refused with replicated data: build)
    if comm.env_rank() == 0:
        print(f"hpctrain: --data-placement replicated: leaving out {path}'s "
              f"{_listed(data, ['shuffle_chunk_mb'])} (the sharded exchange's)", flush=True)
    return {**base, "data": {k: v for k, v in data.items() if k != "shuffle_chunk_mb"}}


def without_partners(base: dict, given: dict, path: str | None,
                     declared_options: list[Declared]) -> dict:
    """``base`` (``--config``'s values) without those a typed option stands instead of, which
    would refuse it or send it elsewhere: the other of an exclusive pair (``--tau-epochs``
    over the file's ``tau``: ``excludes`` in :func:`hpctrain.options.option`), the model's
    arguments under another ``--model``, the momentum under another ``--optimizer`` than
    sgd (and its Nesterov switch, also under an asynchronous ``--algo`` or ``--momentum 0``),
    Adam's betas and eps under ``--optimizer sgd``,
    ``--eval-rank`` under ``--eval after``, and under ``--resume DIR`` the file's
    ``out`` and checkpoint folder: the outputs go to DIR's run folder, also a moved or copied
    one's. Each is said once (the output folder only where it differs)."""
    gone: list[tuple[tuple[str, ...], str]] = []  # (the file's value's keys, what displaced it)

    def typed(*keys: str) -> bool:
        return _found(given, keys) is not _ABSENT

    def filed(*keys: str):
        value = _found(base, keys)
        return None if value is _ABSENT else value

    def displace(keys: tuple[str, ...], by: str) -> None:
        if not typed(*keys) and filed(*keys) is not None:
            gone.append((keys, by))

    for d in declared_options:
        for other in d.field.metadata.get("excludes", ()):
            theirs = d.path[:-1] + (other,)
            flag = next((o.flag for o in declared_options if o.path == theirs), other)
            if typed(*d.path):
                displace(theirs, d.flag)
            if typed(*theirs):
                displace(d.path, flag)
    model = _found(given, ("model", "name"))
    if model is not _ABSENT and not _same_algorithm(filed("model", "name"), model):
        displace(("model", "args"), f"--model {model}")
    optimizer = _found(given, ("optim", "optimizer"))
    if optimizer not in (_ABSENT, "sgd"):
        displace(("optim", "momentum"), f"--optimizer {optimizer}")
        if filed("optim", "nesterov"):  # off is no value to leave out
            displace(("optim", "nesterov"), f"--optimizer {optimizer}")
    if optimizer == "sgd":
        for key in ("betas", "eps"):
            displace(("optim", key), "--optimizer sgd")
    if filed("optim", "nesterov"):  # Nesterov's look-ahead needs momentum and torch's SGD
        algo = _found(given, ("algo",))
        if algo is not _ABSENT and not _same_algorithm(filed("algo"), algo) \
                and not _lock_step(algo):  # the async push: plain momentum only
            displace(("optim", "nesterov"), f"--algo {algo}")
        if _found(given, ("optim", "momentum")) == 0:
            displace(("optim", "nesterov"), "--momentum 0")
    if _found(given, ("eval_mode",)) == "after":
        displace(("eval_rank",), "--eval after")
    resume = _found(given, ("checkpoint", "resume"))
    if resume not in (_ABSENT, None, AUTO):
        if not typed("out"):
            _say_resumed_elsewhere(resume, filed("out"), path)
        keys: tuple[str, ...]
        for keys in (("out",), ("checkpoint", "dir")):
            if not typed(*keys) and filed(*keys) is not None:
                base = _without(base, keys)
    for keys, by in gone:
        if comm.env_rank() == 0:
            value = filed(*keys)
            print(f"hpctrain: {by}: leaving out {path}'s {'.'.join(keys)} {as_typed(value)}",
                  flush=True)
        base = _without(base, keys)
    return base


_ABSENT = object()


def _lock_step(algo) -> bool:
    """Whether algorithm ``algo`` steps in lock-step (an unknown one counts: it is refused
    by name later)."""
    try:
        return registry.get(algo).lock_step
    except (UsageError, TypeError):
        return True


def _found(values: dict, keys: tuple[str, ...]):
    """``values[keys[0]][keys[1]]...``, or :data:`_ABSENT`."""
    for key in keys:
        if not isinstance(values, dict) or key not in values:
            return _ABSENT
        values = values[key]
    return values


def _without(values: dict, keys: tuple[str, ...]) -> dict:
    """``values`` without ``values[keys[0]]...[keys[-1]]`` (a copy; the tables on the way
    copied)."""
    if len(keys) == 1:
        return {k: v for k, v in values.items() if k != keys[0]}
    return {**values, keys[0]: _without(values[keys[0]], keys[1:])}


def _say_resumed_elsewhere(resume: str, out, path: str | None) -> None:
    """Rank 0 says where the outputs of ``--resume DIR`` go when the ``--config`` file's
    ``out`` is another folder (the run was moved or copied): DIR's run folder."""
    if not isinstance(out, str) or comm.env_rank() != 0:
        return
    try:
        goes = checkpoint.policy.recorded_out(checkpoint.folder.resolve(resume))
    except OSError:
        return  # an unreadable folder: the resume check says what is wrong
    if goes is not None and Path(goes).resolve() != Path(out).resolve():
        print(f"hpctrain: --resume {resume}: writing the outputs to {goes}, the resumed "
              f"run's folder, not to {path}'s out {out}", flush=True)


def _listed(values: dict, keys: list[str]) -> str:
    """A file's or a default's values in a note, each as its flag takes it: betas were
    ``(0.9, 0.999)`` from a default and ``[0.9, 0.999]`` from config.json, ``0.9,0.999``
    typed."""
    return ", ".join(f"{key} {as_typed(values[key])}" for key in keys)


def _same_algorithm(recorded, typed: str) -> bool:
    """Whether ``typed`` names the algorithm a file records: the same name, or references to
    one file spelt differently (``./mine.py:Mine`` and config.json's absolute path)."""
    if not isinstance(recorded, str):
        return False
    return plugins.absolute(recorded) == plugins.absolute(typed)


def build(args: argparse.Namespace) -> RunConfig:
    """The run's configuration from ``--config`` and the options given; UsageError if bad."""
    return build_given(args)[0]


@command_line()  # its refusals name the flags typed (--lr -1), not Python's fields
def build_given(args: argparse.Namespace) -> tuple[RunConfig, frozenset[str]]:
    """:func:`build`, and the options set, typed or in the ``--config`` file, by their
    :func:`hpctrain.config.flat` names: the others were left out, and took their defaults
    (a resume refusal says so of those only, not of a typed value equal to a default)."""
    algo_options = algorithm_options()
    values = given(args, shared_options() + algo_options)
    out_typed = "out" in values
    if args.config is not None and args.config.strip():  # --config=~/x: no shell expands it
        args.config = paths.home_expanded(args.config, "--config")
    if args.config is not None and args.config.strip() and Path(args.config).is_dir():
        raise UsageError(f"--config {args.config}: is a folder; give a TOML file or a run's "
                         f"config.json ({Path(args.config) / 'config.json'})")
    if args.config is not None and comm.env_size() > 1 and Path(args.config).exists() \
            and not Path(args.config).is_file():  # /dev/stdin: rank 0's pipe, the others' null
        raise UsageError(f"--config {args.config} is no regular file: a pipe reaches rank 0 "
                         f"only, not the other {comm.env_size() - 1}; give a file")
    base = configs.read_file(args.config) if args.config is not None else {}
    if "algo" in values and base.get("algo") is not None and not _same_algorithm(
            base["algo"], values["algo"]):
        base = other_algorithm(base, values["algo"], args.config)
    base = without_milestones(rederived(base, values, args.config), values, args.config)
    base = without_partners(base, values, args.config, shared_options() + algo_options)
    values = configs.merge(without_chunk_size(base, values, args.config), values)
    algo = values.get("algo")
    if algo is None or algo == "":
        raise UsageError("no algorithm: give --algo (or algo in --config)")
    if not isinstance(algo, str):
        raise UsageError(f"--config {args.config}: algo {algo!r} must be a string; choose from "
                         f"{registry.choices()}")
    cls = registry.get(algo)  # an unknown name is refused before the options are judged
    # Owners are named by the reference each class was first loaded by: compare classes, as
    # ./mine.py:Mine, its absolute path and an imported mine:Mine are one algorithm.
    known = registry.known()
    for d in algo_options:
        assert d.owners is not None  # algorithm_options names every option's algorithms
        if hasattr(args, d.dest) and not any(known.get(o) is cls for o in d.owners):
            raise UsageError(f"{d.flag} is an option of {', '.join(d.owners)}, not of --algo "
                             f"{algo}")
    try:
        config = configs.from_dict(values)
    except TypeError as e:  # a value of the wrong type in a file
        where = f"--config {args.config}" if args.config is not None else "the options given"
        raise UsageError(f"{where}: {e}") from None
    if not out_typed and config.checkpoint.resume is None:  # auto: a finished run's summary
        refuse_finished(config.out, config_file=args.config)  # its out, not one typed
    chunk = getattr(args, "data.shuffle_chunk_mb", None)
    if chunk is not None and config.data.data_placement == "replicated":  # the default typed
        raise configs.unmoved_chunk(chunk)
    return config, frozenset(flat_key(d.flag) for d in shared_options() + algo_options
                             if _found(values, d.path) is not _ABSENT)
