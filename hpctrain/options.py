"""Options: value parsers for the command lines, and options declared on config dataclasses.

The parsers are argparse ``type``s: a bad value fails while the command line is parsed, before
MPI starts, so it is one line naming the value and exit status 2 with rank 0 speaking for all
(``hpctrain.cli`` turns argparse errors into :class:`hpctrain.errors.UsageError`).
:func:`option` declares a configuration field together with its flag, help, parser and range,
so the command line, TOML files and Python callers share one declaration and one check.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path

from hpctrain.errors import UsageError, did_you_mean


def _number(kind, text: str):
    if kind is int:
        try:  # exactly, digit for digit: 2**63 - 1 through a float would be 2**63
            return int(text)
        except ValueError:  # 1e3, 2.0: whole numbers written otherwise, checked below
            pass
    try:
        value = float(text) if kind is float else int(float(text))
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if kind is int and float(text) != value:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return value


def whole(text: str) -> int:
    """A whole number, written as ``3``, ``1e3`` or ``3.0``: every option declared ``int``
    (:func:`option` takes ``parse=int`` to mean this), so that the command line reads what a
    TOML file's ``seed = 1e3`` gives."""
    return _number(int, text)


def number(text: str) -> float:
    """A finite number (``0.5``, ``1e-3``): every option declared ``float`` without a
    ``parse`` of its own."""
    return _number(float, text)


def at_least(minimum: float, kind=int):
    """A number of ``kind`` (int accepts ``1e6``) that is >= ``minimum``."""
    def parse(text: str):
        value = _number(kind, text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g}, got {text}")
        return value
    return parse


def positive(kind=float):
    """A finite number of ``kind`` > 0."""
    def parse(text: str):
        value = _number(kind, text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def number_list(minimum: int = 1, maximum: int | None = None):
    """Comma-separated integers (``1e6`` allowed), each in [``minimum``, ``maximum``], each
    once: ``"1,2,1"`` -> [1, 2]. An empty entry (``"1,,2"``) is refused, not skipped."""
    def parse(text: str) -> list[int]:
        words = [w.strip() for w in str(text).split(",")]
        if not any(words):
            raise argparse.ArgumentTypeError(f"{text!r}: want comma-separated numbers")
        values = []
        for word in filter(None, words):  # a word that is no number named first
            try:
                values.append(_number(int, word))
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
        if not all(words):
            raise argparse.ArgumentTypeError(f"{text!r}: an empty entry")
        bad = [w for w, v in zip(words, values, strict=True) if v < minimum]
        if bad:
            raise argparse.ArgumentTypeError(f"{text!r}: {bad[0]} is below {minimum}")
        big = [v for v in values if maximum is not None and v > maximum]
        if big:
            raise argparse.ArgumentTypeError(f"{text!r}: {shown(big[0])} is above {maximum}")
        return list(dict.fromkeys(values))
    return parse


def name_list(choices: tuple[str, ...]):
    """Comma-separated names from ``choices``, each once: ``"locked,atomic"`` -> [...]. An
    empty entry is refused, as :func:`number_list` refuses one."""
    def parse(text: str) -> list[str]:
        words = [w.strip() for w in str(text).split(",")]
        bad = [w for w in words if w and w not in choices]
        if not any(words) or bad:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {'unknown ' + repr(bad[0]) if bad else 'empty'}; choose from "
                f"{', '.join(choices)}{did_you_mean(bad[0], choices) if bad else ''}")
        if not all(words):
            raise argparse.ArgumentTypeError(f"{text!r}: an empty entry")
        return list(dict.fromkeys(words))
    return parse


# argparse takes a word after an option that takes a value as that value only when the word does
# not look like an option: of the words starting with "-", its own pattern lets through
# ``-3`` and ``-.5`` alone, so ``--slowdown -1:2`` or ``--checkpoint-every -1e`` were "expected
# one argument", naming no value. Any word starting with "-" and a digit (or ".digit"), and
# ``-inf`` and ``-nan``, is a value here, which the option's own check then judges; no option
# of hpctrain's starts so.
_DASH_VALUE = re.compile(r"^-(\.?\d|inf|nan)", re.IGNORECASE)


def dash_values(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser`` taking ``-1:2``, ``-1e`` or ``-1,2`` as an option's value (see above)."""
    parser._negative_number_matcher = _DASH_VALUE
    return parser


def existing_dir(text: str) -> str:
    """A folder that exists."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return text


# The largest rate, factor or interval (in epochs) an option takes: far past any useful value,
# and small enough that what is computed from it (lr x gradient in float32, epochs x steps per
# epoch as a whole number) cannot overflow.
HUGE = 1e6


# ----------------------------------------------------------------------------------------------
# Declaring an option on a configuration dataclass


@dataclass(frozen=True)
class Range:
    """The values a number may take: ``Range(0, 1, high_open=True)`` is [0, 1)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""  # appended to the error, e.g. "(0: never)"

    def problem(self, value: float) -> str | None:
        """Why ``value`` is out of range (``"must be >= 0"``), or None when it is in it."""
        # A whole number of any size is finite (math.isfinite would overflow on 10**400).
        ok = isinstance(value, int) or isinstance(value, float) and math.isfinite(value)
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if ok:
            return None
        low, high = _bound(self.low), _bound(self.high)
        if self.high is None:  # inf is >= 0 too: say why it is refused
            finite = "a finite number " if isinstance(value, float) and \
                not math.isfinite(value) else ""
            text = f"must be {finite}{'>' if self.low_open else '>='} {low}"
        elif self.low is None:
            text = f"must be {'<' if self.high_open else '<='} {high}"
        else:
            text = (f"must be in {'(' if self.low_open else '['}{low}, {high}"
                    f"{')' if self.high_open else ']'}")
        return f"{text} {self.note}".strip()


def _bound(value: float | None) -> str:
    """A bound in a message: a whole number exactly (a seed's 2**63 - 1), else as ``:g``."""
    return "" if value is None else str(value) if isinstance(value, int) else f"{value:g}"


def shown(value) -> str:
    """A number in a message as given, a huge one short: ``1e+308``, not 309 digits. A whole
    number that 64 bits hold (a seed's 2**63, 2**64 - 1) is written exactly."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) < 1e16 \
            or isinstance(value, int) and abs(value) < 2 ** 64:
        return str(value)
    try:
        return f"{value:g}"
    except OverflowError:  # a whole number past a float's range (an int: a float has one)
        digits = int(abs(int(value)).bit_length() * math.log10(2))
        return f"{'-' if value < 0 else ''}1e+{digits}"


def shown_list(values) -> str:
    """Numbers in a message as a comma-list flag takes them: ``0.9,0.999`` (``--betas``),
    whether they came as a tuple (a default), a list (config.json) or typed."""
    return ",".join(map(shown, values))


def as_typed(value, *, quote: str = "") -> str:
    """A value in a message as its flag takes it: a list comma-separated (:func:`shown_list`),
    a table as JSON, ``quote``d where the message is a command line to type (``'{"a": 1}'``),
    None as ``none``. One spelling, for the notes on a ``--config`` file's values and the
    refusals of a resume alike."""
    if value is None:
        return "none"
    if isinstance(value, dict):
        return f"{quote}{json.dumps(value)}{quote}"
    if isinstance(value, (list, tuple)):
        return shown_list(value)
    return shown(value)


def option(default, help: str, *, flag: str | None = None, parse=None, choices=None,
           range: Range | None = None, metavar: str | None = None, store_false: bool = False,
           clearable: bool = False, excludes: tuple[str, ...] = ()):
    """A dataclass field that is also a command-line option.

    ``flag`` defaults to ``--`` + the field's name with dashes; ``parse`` is the argparse type
    (a bad value fails while parsing; ``int`` means :func:`whole`, which reads ``1e3``; left
    out, the field's declared type says, see :func:`parser_of`);
    ``choices`` and ``range`` are checked again when the configuration is built, so Python
    callers get the same checks as the command line.
    ``store_false``: a boolean field set False by its flag (``--no-progress``).
    ``clearable``: its flag takes ``none`` for the default (unset), so that a ``--config``
    file's value can be undone on the command line (``--clip-grad-norm none``); every option
    whose default is None takes it too.
    ``excludes``: the fields of the same dataclass this option stands instead of (``tau_epochs``
    excludes ``tau``; the dataclass refuses both set): typed, it makes a ``--config`` file's
    value of theirs give way, and they its (:func:`hpctrain.arguments.build`).
    """
    if parse is int:  # one reading of whole numbers everywhere: 1e3 as in a TOML file
        parse = whole
    return field(default=default, metadata={
        "help": help, "flag": flag, "parse": parse, "choices": choices, "range": range,
        "metavar": metavar, "store_false": store_false, "clearable": clearable,
        "excludes": tuple(excludes)})


def flag_of(f: Field) -> str:
    """The command-line flag of a dataclass field declared with :func:`option`."""
    return f.metadata.get("flag") or flag_of_key(f.name)


def flag_of_key(key: str) -> str:
    """The flag a :func:`hpctrain.config.flat` key stands for (``lr_milestones``:
    ``--lr-milestones``), as a message names it."""
    return "--" + key.replace("_", "-")


def flat_key(flag: str) -> str:
    """An option's :func:`hpctrain.config.flat` key, its flag's words (``--no-progress``:
    ``no_progress``), the inverse of :func:`flag_of_key`."""
    return flag.removeprefix("--").replace("-", "_")


# A declared type -> the parser of its flag's value when the option gives none.
_PARSERS = {"int": whole, "float": number}


def document_fields(cls: type, others: dict[str, str] | None = None) -> None:
    """Each field's help (its command-line flag's, with the default) appended to ``cls``'s
    docstring, for ``help()`` and an editor's hover, from the one declaration; ``others``:
    the words for fields declared without :func:`option`."""
    lines = []  # none for a class without fields: its docstring says so
    for f in fields(cls):
        if "help" in f.metadata:
            default = f.default if f.default_factory is MISSING else f.default_factory()
            lines.append(f"    {f.name}: {flag_of(f)}, default {default!r}. {f.metadata['help']}")
        else:
            lines.append(f"    {f.name}: {(others or {}).get(f.name, '')}".rstrip())
    if lines:
        cls.__doc__ = f"{cls.__doc__ or ''}\n\n    Fields:\n\n" + "\n".join(lines)


def parser_of(f: Field):
    """The argparse type of ``f``'s flag: its ``parse``, else its declared type's (``int``:
    :func:`whole`, ``float``: :func:`number`, either ``| None`` too); None: the text as
    given. A plug-in's ``every_k: int = option(2, ...)`` reads ``--every-k 3`` as 3."""
    parse = f.metadata.get("parse")
    return parse if parse is not None else _PARSERS.get(
        _declared_type(f).removesuffix(" | None"))


def declared(cls) -> list[Field]:
    """The fields of dataclass ``cls`` declared with :func:`option`, in order."""
    return [f for f in fields(cls) if "help" in f.metadata]


# A field's declared type -> the Python types its values may have, and how to say so.
_KINDS = {"int": ((int,), "a whole number"), "float": ((int, float), "a number"),
          "str": ((str,), "a string"), "bool": ((bool,), "true or false")}


# Alternatives a field's type may name beside the type it holds: what a Python caller may
# give instead, which the dataclass makes a string of before :func:`check_fields` runs
# (``ModelConfig(name=Net)``, ``RunConfig(out=Path(...))``).
_GIVEN_AS = frozenset({"PathLike", "type", "Callable"})


def _declared_type(f: Field) -> str:
    """``f``'s declared type as written (a string under postponed annotations), less the
    alternatives only a caller gives: "str | os.PathLike[str] | None" is "str | None"."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    held = [t for t in _alternatives(text)
            if t.split("[", 1)[0].rsplit(".", 1)[-1] not in _GIVEN_AS]
    return " | ".join(held)


def _alternatives(text: str) -> list[str]:
    """The alternatives of a union written ``A | B[C | D]``: ["A", "B[C | D]"]."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c == "[") - (c == "]")
        if c == "|" and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [*parts, text[start:].strip()]


# ----------------------------------------------------------------------------------------------
# Naming an option in a refusal: by its flag on the command line, by its field from Python

# True while the command line builds and checks its configuration (:func:`command_line`).
_COMMAND_LINE: ContextVar[bool] = ContextVar("hpctrain_command_line", default=False)


@contextmanager
def command_line() -> Iterator[None]:
    """Within it, a refusal names an option by the flag the command line's user typed
    (``--lr -1``); outside it, by the field a Python caller gave (``OptimConfig.lr=-1``),
    who typed no flag. :func:`hpctrain.cli.main` and :func:`hpctrain.arguments.build_given`
    build and check the command line's configuration in it; ``hpctrain.train(config)`` and
    the config classes built from Python are outside it."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def on_command_line() -> bool:
    """Whether a refusal now speaks to the command line's user (see :func:`command_line`)."""
    return _COMMAND_LINE.get()


# Set while a Python class of the own-loop API checks its arguments through an options
# dataclass (:func:`arguments_of`): (the dataclass, the class called, field -> argument).
_ARGUMENTS: ContextVar[tuple[str, str, dict[str, str]] | None] = ContextVar(
    "hpctrain_arguments", default=None)


@contextmanager
def arguments_of(owner: str, called: str, names: dict[str, str]) -> Iterator[None]:
    """Within it, a refusal from Python names a field of the dataclass ``owner`` that
    ``names`` maps as the argument of ``called`` the caller typed:
    ``EnsembleCompression(alpha=1.5)``, not ``CompressionOptions.ec_alpha=1.5``, which
    a caller of ``EnsembleCompression(..., alpha=1.5)`` never wrote."""
    token = _ARGUMENTS.set((owner, called, names))
    try:
        yield
    finally:
        _ARGUMENTS.reset(token)


_NOTHING = object()


def named(typed: str, owner: str, name: str, value=_NOTHING) -> str:
    """How a refusal names an option and its value: ``typed``, the command line's words
    (``--lr -1``), within :func:`command_line`; else the Python field ``owner.name``, with
    ``=value`` where a value is given (``OptimConfig.lr=-1``, ``RunConfig.out='runs/a'``),
    or within :func:`arguments_of` the argument given (``EnsembleCompression(alpha=1.5)``)."""
    if on_command_line():
        return typed
    given = "" if value is _NOTHING else f"={python_shown(value)}"
    arguments = _ARGUMENTS.get()
    if arguments is not None and arguments[0] == owner and name in arguments[2]:
        return f"{arguments[1]}({arguments[2][name]}{given})"
    return f"{owner}.{name}{given}"


def setting(cls: type, name: str, value=_NOTHING, typed: str | None = None) -> str:
    """Field ``name`` of configuration class ``cls`` in a refusal that weighs it against
    another (:func:`named`): its flag, followed by ``typed`` (else the value as the flag takes
    it, :func:`as_typed`) on the command line (``--epochs 2``); ``Cls.name=value`` from
    Python (``OptimConfig.epochs=2``). Without a value, the flag or the field alone."""
    f = next(f for f in fields(cls) if f.name == name)
    flag = flag_of(f)
    if value is _NOTHING:
        return named(flag, cls.__name__, name)
    shown_typed = typed if typed is not None else as_typed(value)
    return named(f"{flag} {shown_typed}", cls.__name__, name, value)


# A :func:`hpctrain.config.flat` key (an option by its flag's words: ``lr``, ``no_progress``)
# -> the field it stands for: its class's name, the field's, and whether the key is the field
# negated, as its flag (``no_progress``: ``RunConfig.progress``); made by
# :func:`hpctrain.config.flat_fields`. What :func:`keyed` names a key by from Python.
Fields = dict[str, tuple[str, str, bool]]


def field_of_key(key: str, names: Fields | None) -> tuple[str, str, bool] | None:
    """``key``'s field (``names[key]``) where a refusal names it so: outside
    :func:`command_line`, and ``names`` knows the key; else None, its flag names it."""
    if names is None or key not in names or on_command_line():
        return None
    return names[key]


def keyed(key: str, names: Fields | None, value=_NOTHING, typed: str | None = None) -> str:
    """A :func:`hpctrain.config.flat` key's option in a refusal, as :func:`setting` names a
    dataclass's field (checkpoint headers and config.json hold flat keys, not fields): on
    the command line, or where ``names`` (:data:`Fields`) lacks the key, its flag followed
    by ``typed``, else by ``value`` as the flag takes it (:func:`typed_flag`: ``--lr 0.1``,
    ``--no-progress``, ``--model-args '{"depth": 2}'``); from Python its field, with
    ``=value`` (``OptimConfig.lr=0.1``; a negated key's on/off value turned over, as the
    field holds it: ``RunConfig.progress=False``). Without a value, the flag or the field
    alone."""
    flag = flag_of_key(key)
    if value is _NOTHING:
        said = flag
    else:
        said = f"{flag} {typed}" if typed is not None else typed_flag(flag, value)
    field = field_of_key(key, names)
    if field is None:
        return said
    owner, name, negated = field
    if negated and isinstance(value, bool):
        value = not value
    return named(said, owner, name, value)


def typed_flag(flag: str, value) -> str:
    """``flag`` with ``value`` as the command line's user types it: ``--lr 0.1``,
    ``--lr-milestones 3,4``, a table in quotes (``--model-args '{"depth": 2}'``), an on/off
    option by its flag alone (``--compile``, ``--no-compile``)."""
    if isinstance(value, bool):
        return flag if value else f"--no-{flag.removeprefix('--')}"
    text = as_typed(value, quote="'")
    return f"{flag} {text}"


def example(value) -> str:
    """A value a refusal gives as an example or a default, as its user writes it: as the
    flag takes it on the command line (``3,4``, :func:`as_typed`), as Python writes it from
    Python (``(3, 4)``, :func:`python_shown`), which passes no ``3,4``."""
    return as_typed(value) if on_command_line() else python_shown(value)


def python_shown(value) -> str:
    """A value in a message as Python writes it: a number as :func:`shown` (a huge one
    short), anything else as its repr (a string quoted)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return shown(value)
    return repr(value)


def _kind_problem(f: Field, value) -> str | None:
    """Why ``value`` does not have ``f``'s declared type (a config file or a Python caller
    can give any), or None; a bool is no number. Other types (tuples, dicts) are the fields'
    own business."""
    declared_type = _declared_type(f)
    if value is None:
        return None if declared_type.endswith("| None") else "needs a value"
    kind = _KINDS.get(declared_type.removesuffix(" | None"))
    if kind is None:
        return None
    types, name = kind
    if isinstance(value, types) and (bool in types or not isinstance(value, bool)):
        return None
    if isinstance(value, str):  # TOML's epochs = "3": the flag's text is read, a file's is not
        where = " (in a config file, write it without quotes)" if on_command_line() else ""
        return f"must be {name}, not a string{where}"
    return f"must be {name}"


def _plain(f: Field, value):
    """``value`` as a plain Python value of ``f``'s declared type where it is one in another
    guise: a float holding a whole number for an int (TOML's ``epochs = 1.0`` or ``1e3``, as
    the command line's ``--epochs 1e3``), an int past 64 bits for a float (as the command
    line's ``--clip-grad-norm 1e30`` is one), a NumPy number (a sweep over ``np.arange``), a
    path (``pathlib.Path``) for a string. Anything else is returned as given, for
    :func:`_kind_problem` to judge; a bool stays a bool, which is no number."""
    kind = _declared_type(f).removesuffix(" | None")
    if value is None or isinstance(value, bool):
        return value
    if kind == "bool" and _numpy_scalar(value) and isinstance(value.item(), bool):
        return value.item()
    if kind == "int" and (isinstance(value, float) and value.is_integer()
                          or isinstance(value, numbers.Integral) and type(value) is not int):
        return int(value)
    if kind == "float" and isinstance(value, numbers.Real) and type(value) not in (int, float):
        return float(value)
    if kind == "float" and type(value) is int and not -2 ** 63 <= value < 2 ** 63:
        # a file's or Python's 10**30: torch takes 64-bit ints only, and compared it with a
        # tensor (--clip-grad-norm's) in an OverflowError mid-run, exit 1; smaller ints stay
        # as given, as a refusal shows them
        try:
            return float(value)
        except OverflowError:  # past float's range: "too large", below
            return value
    if kind == "str" and isinstance(value, os.PathLike) and isinstance(os.fspath(value), str):
        return os.fspath(value)
    return value


def _numpy_scalar(value) -> bool:
    return type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0


def plain_numbers(value):
    """``value`` with NumPy numbers (a sweep over ``np.arange``) made Python's, inside lists,
    tuples and dicts too: what JSON, and so config.json, holds."""
    if isinstance(value, dict):
        return {k: plain_numbers(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(plain_numbers(v) for v in value)
    return value.item() if _numpy_scalar(value) else value


def text(value: object) -> str:
    """A path or code option's value as the string :func:`check_fields` made it (each
    configuration's ``__post_init__``). The built-in sections' fields are typed as that
    string already (:mod:`hpctrain.config`); this narrows a value typed wider."""
    assert isinstance(value, str), value
    return value


def text_or_none(value: object) -> str | None:
    """:func:`text` for an option that may be left out (None)."""
    assert value is None or isinstance(value, str), value
    return value


def check_fields(obj) -> None:
    """Check a configuration dataclass's option values (types, choices, ranges); UsageError
    naming the option and the bad value on the first that is wrong: by its flag on the
    command line, by its field from Python (:func:`named`). None means "not given" where
    the field allows it."""
    owner = type(obj).__name__
    for f in declared(type(obj)):
        value = getattr(obj, f.name)
        if (plain := _plain(f, value)) is not value:
            value = plain
            object.__setattr__(obj, f.name, value)
        if (problem := _kind_problem(f, value)) is not None:  # from a file or Python: a
            # store_false flag (--no-progress) cannot give it, so the key is named (progress)
            key = f.name if f.metadata.get("store_false") else flag_of(f)
            raise UsageError(f"{named(f'{key} {value!r}', owner, f.name, value)} {problem}")
        if value is None:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                float(value)  # what the run computes with it (rates, ratios, the progress bar)
            except OverflowError:
                raise UsageError(f"{named(f'{flag_of(f)} {shown(value)}', owner, f.name, value)}"
                                 " is too large") from None
        choices, bounds = f.metadata["choices"], f.metadata["range"]
        if choices is not None and value not in choices:
            listed = f"choose from {', '.join(choices)}{did_you_mean(value, choices)}"
            if on_command_line():
                raise UsageError(f"unknown {flag_of(f)} {value!r}; {listed}")
            raise UsageError(f"{named('', owner, f.name, value)} is unknown; {listed}")
        if bounds is not None and (problem := bounds.problem(value)) is not None:
            raise UsageError(f"{named(f'{flag_of(f)} {shown(value)}', owner, f.name, value)} "
                             f"{problem}")
