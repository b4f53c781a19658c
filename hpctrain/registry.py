"""The algorithms hpctrain trains with: name -> class, in the order reports list them.

Adding an algorithm to hpctrain is one module with an :class:`hpctrain.algorithm.Algorithm`
subclass and one line here. The command line's option groups, the refusal of another
algorithm's option, ``bench compare``'s forwarding and the report's order all read this list.

A user's own algorithm needs no line here: it is named by reference, as a model of one's own
is (``--algo my_pkg.algos:Mine``, ``--algo ./mine.py:Mine``, or the class itself in
``RunConfig(algo=Mine)``), loaded on first use by :func:`get` and then listed after the
built-in ones (:func:`known`), its options flags like theirs.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, fields, is_dataclass

from hpctrain import option_names, options, plugins
from hpctrain.algorithm import Algorithm, Options
from hpctrain.async_.algorithm import ASGD, SSP, DCASGDAdaptive, DCASGDConstant
from hpctrain.ec.algorithm import EnsembleCompression, ModelAveraging
from hpctrain.errors import UsageError, did_you_mean
from hpctrain.sync.algorithm import Sequential, Synchronous

ALGORITHMS: dict[str, type[Algorithm]] = {a.name: a for a in (
    Sequential, Synchronous, ASGD, DCASGDConstant, DCASGDAdaptive, SSP,
    ModelAveraging, EnsembleCompression)}

# help(hpctrain.algorithm_options("ec")) lists each option's meaning, as help(RunConfig) does
for _options in {a.Options: None for a in ALGORITHMS.values()}:
    options.document_fields(_options)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a user's algorithm's: a folder name,
# with no dot: none of a comparison's files (compare.json, report.md, the plots); fullmatch,
# as re.match's "$" also matches before a final newline ("mine\n")
# The users' algorithms loaded in this process: reference -> class (see :func:`load`).
_LOADED: dict[str, type[Algorithm]] = {}


def names() -> tuple[str, ...]:
    return tuple(ALGORITHMS)


def choices() -> str:
    """What ``--algo`` takes, for messages: the built-in names, or a reference."""
    return f"{', '.join(ALGORITHMS)}, or MODULE:CLASS, ./FILE.py:CLASS of your own"


def known() -> dict[str, type[Algorithm]]:
    """The built-in algorithms, then the users' loaded so far, each by the reference it was
    first loaded by (``./mine.py:Mine`` as typed, not also the absolute path a run records)."""
    out = dict(ALGORITHMS)
    for reference, cls in _LOADED.items():
        if cls not in out.values():
            out[reference] = cls
    return out


def get(name: str) -> type[Algorithm]:
    """The class of algorithm ``name`` (a built-in name or a reference, loaded on first use);
    UsageError naming the choices if there is none."""
    if isinstance(name, str) and plugins.is_reference(name):
        if plugins.is_file_reference(name):  # read again: a sweep may rewrite the file
            return load(name)  # between runs (the module is reloaded only if it changed)
        return _LOADED.get(name) or load(name)
    try:
        return ALGORITHMS[name]
    except (KeyError, TypeError):  # TypeError: a list or dict, which no name is
        raise UsageError(f"unknown algorithm {name!r}; choose from {choices()}"
                         f"{did_you_mean(name, ALGORITHMS)}") from None


def load(reference: str) -> type[Algorithm]:
    """The user's algorithm class ``reference`` names, imported and checked: an
    :class:`~hpctrain.algorithm.Algorithm` subclass with a ``name`` of its own and options
    declared as the built-in ones' are; UsageError (one line) else."""
    cls = plugins.resolve("--algo", reference)
    if _LOADED.get(reference) is cls:  # checked when it was first loaded
        return cls
    what = option_names.said("--algo", reference, typed=f"--algo {reference}")  # from Python:
    # RunConfig.algo='./mine.py:Mine', the field given
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        kind = "class" if isinstance(cls, type) else type(cls).__name__
        raise UsageError(f"{what}: a {kind}, not a subclass of hpctrain.algorithm.Algorithm")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(f"{what}: the class needs a name of its own (name = \"mine\": its "
                         "runs' label and folder name; letters, digits, '_', '-'), not "
                         f"{cls.__dict__.get('name', getattr(cls, 'name', None))!r}")
    if name in ALGORITHMS and ALGORITHMS[name] is not cls:
        raise UsageError(f"{what}: its name {name!r} is a built-in algorithm's; choose another")
    if not (isinstance(cls.Options, type) and is_dataclass(cls.Options)
            and issubclass(cls.Options, Options)):
        raise UsageError(f"{what}: its Options must be a dataclass subclassing "
                         "hpctrain.algorithm.Options (frozen, fields declared with "
                         "hpctrain.options.option)")
    _check_option_fields(what, cls.Options)
    _check_attributes(what, cls)
    # Its options become flags: none may be a built-in's or a command line's (the command
    # line refused it, so a script's config.json could not be repeated); two of the user's
    # clash only where one command line loads both (bench compare).
    from hpctrain import arguments

    arguments.algorithm_options({**ALGORITHMS, reference: cls})
    for other, known_cls in list(_LOADED.items()):
        if _same_class(known_cls, cls):  # its file changed since: the new one for them all
            _LOADED[other] = cls
        elif known_cls.name == name and other != reference:
            raise UsageError(f"{what}: its name {name!r} is {other}'s too; choose another")
    _LOADED[reference] = cls
    return cls


def _same_class(old: type, new: type) -> bool:
    """Whether ``new`` is ``old`` or ``old`` loaded again (its file rewritten: the same module
    name and qualified name)."""
    return old is new or (old.__module__, old.__qualname__) == (new.__module__, new.__qualname__)


def _check_option_fields(what: str, opts: type[Options]) -> None:
    """UsageError for a field of ``opts`` without a default (the run builds the options from
    the flags given, so it failed later, blaming a --config never given) or not declared
    with :func:`hpctrain.options.option` (it had no flag, no place in config.json and no
    resume check: a value the run could not record or repeat)."""
    for f in fields(opts):
        if f.default is MISSING and f.default_factory is MISSING:
            raise UsageError(f"{what}: {opts.__qualname__}.{f.name} has no default; give it "
                             "one with hpctrain.options.option(default, help)")
        if "help" not in f.metadata:  # what option() marks its fields by (options.declared)
            raise UsageError(f"{what}: {opts.__qualname__}.{f.name} is not declared with "
                             "hpctrain.options.option, so it would be no flag and not in "
                             "config.json; declare it so")


def _check_attributes(what: str, cls: type[Algorithm]) -> None:
    """UsageError for class attributes the loop would misread or take silently: ``defaults``
    other than a positive ``lr`` and a ``momentum`` in [0, 1), a ``snapshots``, ``optimizers``
    or ``thread_level`` that is none of the choices, ``summary_fields`` that are a run's
    own (found after training, summary.json was not written)."""
    from hpctrain.comm import THREAD_LEVELS
    from hpctrain.optimizers import OPTIMIZERS
    from hpctrain.summary import COMMON_FIELDS

    defaults = cls.defaults
    if not isinstance(defaults, dict) or set(defaults) - {"lr", "momentum"}:
        raise UsageError(f"{what}: defaults {defaults!r} may set lr and momentum only")
    lr, momentum = defaults.get("lr", 0.05), defaults.get("momentum", 0.9)
    if not (_number(lr) and 0 < lr <= 1e6 and _number(momentum) and 0 <= momentum < 1):
        raise UsageError(f"{what}: defaults {defaults!r}: want lr in (0, 1e6] and momentum "
                         "in [0, 1)")
    for attribute, choices in (("snapshots", ("replicated", "per_rank", "root")),
                               ("thread_level", THREAD_LEVELS)):
        if getattr(cls, attribute) not in choices:
            raise UsageError(f"{what}: {attribute} {getattr(cls, attribute)!r} is none of "
                             f"{', '.join(choices)}")
    if not (isinstance(cls.optimizers, tuple) and cls.optimizers
            and set(cls.optimizers) <= set(OPTIMIZERS)):
        raise UsageError(f"{what}: optimizers {cls.optimizers!r}: want a tuple of some of "
                         f"{', '.join(OPTIMIZERS)}")
    own = cls.summary_fields
    if not (isinstance(own, dict) and all(isinstance(k, str) and isinstance(v, str)
                                          for k, v in own.items())):
        raise UsageError(f"{what}: summary_fields {own!r}: want a dict of field name to "
                         "its description")
    if clash := sorted(own.keys() & COMMON_FIELDS.keys()):
        raise UsageError(f"{what}: summary_fields {', '.join(clash)} are every run's own "
                         "(docs/SUMMARY.md); name yours otherwise")
    for attribute in ("lock_step", "averages_updates"):
        if not isinstance(getattr(cls, attribute), bool):
            raise UsageError(f"{what}: {attribute} {getattr(cls, attribute)!r}: want True or "
                             "False")
    if not cls.lock_step:
        from hpctrain.algorithm import Algorithm

        missing = [h for h in NOT_LOCK_STEP_HOOKS if getattr(cls, h) is getattr(Algorithm, h)]
        if missing:
            raise UsageError(f"{what}: lock_step = False needs its own {', '.join(missing)} "
                             "(the defaults are lock-step's)")


# The hooks whose defaults assume every worker updates together: an algorithm whose workers
# run on their own defines each (the asgd family does; see hpctrain.algorithm).
NOT_LOCK_STEP_HOOKS = ("per_epoch", "claim", "progress", "close_tickets", "before_checkpoint",
                       "finish")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and value == value  # not NaN


def display_name(name: str) -> str:
    """What runs of algorithm ``name`` are called in folders, bars and reports: its own
    ``name`` (a built-in's is ``name`` itself)."""
    return get(name).name


def owners(field_name: str) -> list[str]:
    """The algorithms whose options include ``field_name``."""
    from dataclasses import fields

    return [n for n, a in known().items()
            if field_name in {f.name for f in fields(a.Options)}]


def options_of(name: str | type[Algorithm]) -> type[Options]:
    """The options dataclass of algorithm ``name`` (``hpctrain.algorithm_options("ec")(tau=5)``;
    a class of one's own: its ``Options``)."""
    if isinstance(name, type) and issubclass(name, Algorithm):
        return name.Options
    return get(name).Options
