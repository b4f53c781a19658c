"""Users' own code by reference: ``--model my_pkg.nets:build`` or ``--model ./nets.py:build``.

A reference names a callable as ``MODULE:ATTRIBUTE`` (a module importable from the working
directory or ``PYTHONPATH``) or ``FILE.py:ATTRIBUTE`` (a path, loaded as a module of its own,
its folder put last on the path: it may import a module beside it, refused where Python
takes that name from elsewhere).
:func:`check_form` judges the text alone (at construction, no import); :func:`resolve` imports
it; :func:`check_model` builds the model once before MPI starts and runs two zero samples
through it (and back, as one training step), so a bad reference (no module, no attribute, not
callable, not a Module, wrong output size or type, nothing trainable, an output detached from
the parameters, a sparse gradient the run's optimizer cannot take) is one line, exit 2, on
every rank alike, before any collective call.

A model callable is called as ``build(input_shape, num_classes, **model_args)`` and returns a
``torch.nn.Module`` mapping a batch ``N x *input_shape`` to logits ``N x num_classes``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import errno
import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from hpctrain import comm, models, options
from hpctrain.errors import UsageError, did_you_mean

if TYPE_CHECKING:
    from hpctrain.config import RunConfig

# Used with fullmatch: re.match's "$" also matches before a final newline ("build\n").
_ATTRIBUTE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_MODULE = _ATTRIBUTE
_FILE_MODULE = "hpctrain_user_"  # name prefix of the modules loaded from files
_APPENDED: set[str] = set()  # folders _importable_beside put on sys.path


def is_reference(text: str) -> bool:
    """Whether ``text`` has the form of a reference (``X:Y``), not a built-in name."""
    return ":" in text


def is_file_reference(text: str) -> bool:
    where = text.rsplit(":", 1)[0]
    return where.endswith(".py") or "/" in where


# The options that name code or a file -> the Python field that gives each, as a refusal
# names it to a Python caller (:func:`said`); this library sits below hpctrain.config.
FIELDS = {"--model": ("ModelConfig", "name"), "--dataset": ("DataConfig", "dataset"),
          "--algo": ("RunConfig", "algo"), "--init-from": ("ModelConfig", "init_from"),
          "--data-dir": ("DataConfig", "data_dir"),
          "--step-time": ("SimConfig", "step_time")}  # replay:PATH: a path is a part of it


def said(flag: str, *value: object, typed: str | None = None,
         field: tuple[str, str] | None = None) -> str:
    """Option ``flag`` in a refusal: on the command line as typed (``typed``, else the flag
    alone: ``--model 'x:'``); from Python as the field that gives it (``field``, else
    :data:`FIELDS`'), with ``=value`` where one is given (``ModelConfig.name='x:'``,
    :func:`hpctrain.options.named`), who typed no flag. An option of neither: as typed."""
    shown = flag if typed is None else typed
    field = field or FIELDS.get(flag)
    return shown if field is None else options.named(shown, *field, *value)


def check_form(flag: str, text: str) -> None:
    """UsageError unless ``text`` reads as ``MODULE:ATTRIBUTE`` or ``FILE.py:ATTRIBUTE``."""
    where, _, attribute = text.rpartition(":")
    given = said(flag, text, typed=f"{flag} {text!r}")
    if not where or not _ATTRIBUTE.fullmatch(attribute):
        what = "CLASS" if flag == "--algo" else "CALLABLE"
        raise UsageError(f"{given}: want MODULE:{what} or ./FILE.py:{what}")
    if not is_file_reference(text) and not _MODULE.fullmatch(where):
        raise UsageError(f"{given}: {where!r} is neither a module name nor a .py file")


def model_name(text: str, error: type[Exception] = argparse.ArgumentTypeError) -> str:
    """``--model``'s value: a built-in name or a reference (its form only); ``error`` else."""
    if text in models.MODELS:
        return text
    if not is_reference(text):
        flagged = error is not UsageError or options.on_command_line()
        what = f"unknown --model {text!r}" if flagged else f"ModelConfig.name={text!r} is unknown"
        raise error(f"{what}; choose from {', '.join(models.MODELS)}, or "
                    f"MODULE:CALLABLE, ./FILE.py:CALLABLE{did_you_mean(text, models.MODELS)}")
    try:
        check_form("--model", text)
    except UsageError as e:
        raise error(str(e)) from None
    return text


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are each given once (``json.loads``' ``object_pairs_hook``):
    a file or option edited by hand would otherwise keep the last silently; TOML refuses a
    second one too."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} given twice")
        out[key] = value
    return out


def json_object(text: str) -> dict:
    """``--model-args '{"width": 32}'``: a JSON object, each key given once."""
    shown = text if len(text) <= 200 else f"{text[:60]}...({len(text)} characters)"
    try:
        value = json.loads(text, object_pairs_hook=unique_keys)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{shown!r} is not JSON ({str(e)[:200]})") from None
    except RecursionError:
        raise argparse.ArgumentTypeError(f"{shown!r}: nested too deeply") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{shown!r}: want a JSON object, e.g. '{{\"width\": 32}}'")
    return value


def home_expanded(path: str | os.PathLike[str], flag: str | None = None,
                  field: tuple[str, str] | None = None) -> str:
    """``path`` with a leading ``~`` or ``~user`` expanded, as a shell expands it unquoted.

    Every path option takes it alike: ``--out "~/o"`` (or a file's ``out = "~/o"``) made a
    folder named ``~`` in the working folder where ``--model "~/m.py:Net"`` read the home
    folder's file. A ``~user`` with no home is refused, naming it (``flag``: the option),
    where Path.expanduser's RuntimeError was a traceback; from Python, the field that gives
    it (:func:`said`): ``field``, whose whole value ``path`` is, with it
    (``RunConfig.out='~x/o'``, a long one shortened), else :data:`FIELDS`' field of ``flag``
    alone (``path`` may be a part of its value: ``--model``'s file)."""
    text = os.fspath(path)
    expanded = os.path.expanduser(text)
    value = (_Shortened(text),) if field else ()
    named = said(flag, *value, typed=f"{flag} {shortened(text)}", field=field) if flag \
        else shortened(text)
    if expanded.startswith("~"):  # os.path.expanduser leaves an unknown user's as typed
        raise UsageError(f"{named}: no home folder for {text.split(os.sep, 1)[0]}")
    if problem := too_long(expanded):
        raise UsageError(f"{named}: {problem}")
    return expanded


def shortened(path: str, most: int = 200) -> str:
    """``path`` as a one-line refusal shows it: whole up to ``most`` characters, else its
    start and end (a path of 5000 bytes filled the terminal with one message)."""
    if len(path) <= most:
        return path
    return f"{path[:most // 2]}...{path[-most // 4:]} ({len(os.fsencode(path))} bytes)"


class _Shortened:
    """A path as a Python value in a refusal (``RunConfig.out='~x/o'``): quoted whole up to
    200 characters, else its start and end quoted, as :func:`shortened` shows it typed."""

    def __init__(self, path: str):
        self.path = path

    def __repr__(self) -> str:
        path = self.path
        if len(path) <= 200:
            return repr(path)
        return f"{path[:100]!r}...{path[-50:]!r} ({len(os.fsencode(path))} bytes)"


def too_long(path: str) -> str | None:
    """Why no file can have ``path`` (a name in it over the file system's NAME_MAX, or the
    whole over PATH_MAX), or None. Each option that reads a path (``--resume``,
    ``--init-from``, ``--step-time replay:``, the files of ``--model`` and ``--dataset``)
    raised the system's OSError (ENAMETOOLONG) at its first look, exit 1, naming no option;
    the system is asked, as it alone knows its limits."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            return None
    except ValueError:  # a NUL in it: what reads it says so
        return None
    else:
        return None
    length, limit = len(os.fsencode(path)), os.pathconf("/", "PC_PATH_MAX")
    if length >= limit:
        return f"the path is too long ({length} bytes; the system's limit is {limit - 1})"
    parent = Path(path).parent
    while not os.path.isdir(parent):  # the nearest folder that exists says its limit
        parent = parent.parent
    name_max = os.pathconf(parent, "PC_NAME_MAX")
    longest = max(len(os.fsencode(part)) for part in Path(path).parts)
    return f"a name in it is longer than {name_max} bytes ({longest} bytes)"


def absolute(text: str, flag: str | None = None) -> str:
    """A file reference with its path made absolute (what config.json records), so that the
    run repeats from any folder; other references unchanged. ``flag``: the option, named
    in a refusal."""
    if not is_reference(text) or not is_file_reference(text):
        return text
    where, _, attribute = text.rpartition(":")
    return f"{Path(home_expanded(where, flag)).resolve()}:{attribute}"


def reference_to(flag: str, obj: str | os.PathLike[str] | Callable[..., Any]) -> str:
    """The reference that names ``obj``, a module-level function or class (the Python API's
    ``ModelConfig(name=build)``); a string is returned as given.

    A callable of the running script (``__main__``) is named by the script's path, which
    resolves back to the running script itself (:func:`_load_file`), and from config.json in
    a later run to the file. UsageError for what other ranks and config.json could not find
    again by name: a lambda, a nested function, an instance.
    """
    if isinstance(obj, str):
        return obj
    if isinstance(obj, os.PathLike) and isinstance(os.fspath(obj), str):  # "./net.py:Net"
        return os.fspath(obj)
    qualname = getattr(obj, "__qualname__", None)
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    if not callable(obj) or qualname is None or module is None:
        raise UsageError(f"{said(flag)}: want a name, a reference or a module-level function or "
                         f"class, not a {type(obj).__name__}")
    if "<" in qualname:
        raise UsageError(f"{said(flag)}: {qualname} cannot be found again by name (by other ranks, "
                         "or from config.json); define it at module level")
    if module.__name__ != "__main__" and not module.__name__.startswith(_FILE_MODULE) \
            and not _beside_script(module):
        where = module.__name__
    elif not (getattr(module, "__file__", None) or "<").startswith("<"):  # a script, a
        # module loaded from a file or beside the script; not `python - < x.py`'s "<stdin>"
        assert module.__file__ is not None  # just checked
        where = str(Path(module.__file__).resolve())
    else:
        raise UsageError(f"{said(flag)}: {qualname} is defined in {module.__name__}, which has no "
                         "file to find it in again; define it in a module or script")
    reference = f"{where}:{qualname}"
    if resolve(flag, reference) is not obj:
        raise UsageError(f"{said(flag)}: {reference} names another object than the one given; "
                         "define it once, at module level")
    return reference


def _beside_script(module) -> bool:
    """Whether ``module`` was imported from the running script's folder, which Python puts
    first on the path: config.json's ``module:name`` would not import from another working
    folder, so it is named by its file (which resolves back to it: :func:`_load_file`)."""
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    file = getattr(module, "__file__", None)
    if module is None or not script or not file or "." in module.__name__ \
            or Path(file).name == "__init__.py":
        return False
    folder = Path(script).resolve().parent
    return Path(file).resolve().parent == folder  # the working folder too: config.json is
    # repeated from others


def resolve(flag: str, text: str) -> Callable:
    """The callable ``text`` refers to; UsageError (one line) if it cannot be had."""
    check_form(flag, text)
    where, _, attribute = text.rpartition(":")
    module = _load_file(flag, where) if is_file_reference(text) else _import(flag, text)
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            file = ""
            if not is_file_reference(text):
                _refuse_shadowed(flag, text, sys.modules.get(where.partition(".")[0], module))
                file = f" (it is {getattr(module, '__file__', None) or 'a module with no file'})"
            raise UsageError(f"{_typed(flag, text)}: {where} has no attribute "
                             f"{attribute!r}{file}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{_typed(flag, text)}: {attribute} is a {type(obj).__name__}, "
                         "not callable")
    return obj


def _typed(flag: str, text: str) -> str:
    """``flag text`` in a refusal, unquoted, from Python the field given (:func:`said`)."""
    return said(flag, text, typed=f"{flag} {text}")


def _import(flag: str, text: str):
    """The module of reference ``text`` (``MODULE:ATTRIBUTE``), imported."""
    name = text.rpartition(":")[0]
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        # Last, not first as `python -m` puts it (the console script puts it nowhere): a user
        # file named as a module hpctrain or torch imports (types.py) must not replace it.
        # A module the folder holds but Python takes from elsewhere is named where what the
        # reference wants is missing from it (the same package installed is no error).
        sys.path.append(str(Path.cwd()))
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (top := sys.modules.get(name.partition(".")[0])) is not None:
            _refuse_shadowed(flag, text, top)  # my_pkg.nets where my_pkg is another's
        raise UsageError(f"{said(flag)}: no module named {e.name!r} (importing {name} from the "
                         "working directory or PYTHONPATH)") from None
    except Exception as e:
        raise UsageError(f"{said(flag)}: importing {name} raised {one_line(e)}") from e
    return module


def _refuse_shadowed(flag: str, text: str, top) -> None:
    """UsageError when the working folder holds ``NAME.py`` or a package ``NAME/`` but
    ``import NAME`` (``top``) gave another module, which lacks what the reference wants: a
    standard or installed one (``test``, ``code``) comes first on the path, and its missing
    attribute blamed the user's file. Called only then: a package's own checkout beside
    its installed copy imports the installed one, which has it."""
    folder = Path.cwd()
    own = next((f for f in (folder / f"{top.__name__}.py", folder / top.__name__ / "__init__.py")
                if f.is_file()), None)
    file = getattr(top, "__file__", None)
    if own is None or (file and Path(file).resolve() == own.resolve()):
        return
    shown = f"./{top.__name__}/" if own.name == "__init__.py" else f"./{top.__name__}.py"
    found = f"the module {file}" if file else "a module with no file (built in, or a namespace)"
    where, _, attribute = text.rpartition(":")
    hint = f"give the file as {shown}:{attribute} or rename it" \
        if where == top.__name__ and shown.endswith(".py") else "rename it"
    raise UsageError(f"{_typed(flag, text)}: `{top.__name__}` is {found}, not {shown}; "
                     f"{hint}")


def _load_file(flag: str, path_text: str):
    path = Path(home_expanded(path_text, flag)).resolve()
    if path.is_dir():  # ./pkg:build: a package is imported by name, not as a path
        raise UsageError(f"{said(flag)}: {path_text} is a folder; give a package as MODULE:NAME "
                         f"({path.name}.module:NAME, from its parent folder or PYTHONPATH) or "
                         f"a file as {path_text.rstrip('/')}/FILE.py:NAME")
    if not path.is_file():
        raise UsageError(f"{said(flag)}: no file {path_text}")
    running = _imported_from(path)
    if running is not None:
        return running  # the script, or a module it imported, not a copy
    # One module per file, under a name of its own: every rank and call gets the same one,
    # until the file changes (a sweep that rewrites it between runs trains the new one).
    name = _FILE_MODULE + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    try:
        source = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{said(flag)}: cannot read {path_text} ({e.strerror})") from None
    content = hashlib.sha1(source).hexdigest()
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__hpctrain_content__", None) == content:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:  # no loader for its suffix: Python imports .py files only
        raise UsageError(f"{said(flag)}: {path_text} is not a Python file; want FILE.py")
    module = importlib.util.module_from_spec(spec)
    module.__dict__["__hpctrain_content__"] = content
    _importable_beside(path)
    sys.modules[name] = module
    try:
        # Compiled from what was read: the loader's cached bytecode, keyed by the file's
        # mtime in seconds and size, can be a same-sized version written a moment before.
        exec(compile(source, str(path), "exec"), module.__dict__)
    except Exception as e:
        del sys.modules[name]
        raise UsageError(f"{said(flag)}: loading {path_text} raised {one_line(e)}") from e
    clash = _neighbour_elsewhere(path, source)
    if clash is not None:
        del sys.modules[name]
        neighbour, found, hint = clash
        raise UsageError(f"{said(flag)}: {path_text} imports {neighbour} beside it, but "
                         f"{neighbour} is {found} instead; {hint}")
    return module


def _importable_beside(path: Path) -> None:
    """Put the folder of ``path`` on ``sys.path``, so that its file imports a module beside
    it (``from blocks import head``) on every rank and in every process that loads it. At
    the end, not first as ``python FILE`` puts it: a module of the folder named as an
    installed or standard one (``random.py``) then shadows nothing hpctrain, torch or the
    user's other code imports; the file's import of it is refused
    (:func:`_neighbour_elsewhere`). Kept after loading: a function of the file may import
    its neighbour only when called."""
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.append(folder)
    _APPENDED.add(folder)


def _neighbour_elsewhere(path: Path, source: bytes) -> tuple[str, str, str] | None:
    """A module the file at ``path`` imports by a top-level name (anywhere in it, absolute
    imports only) that its folder holds, but which Python takes from elsewhere: (the name,
    where it comes from, what to do), or None. Python keeps one module per name in a process,
    and the appended folder is searched last, so a second file's ``blocks.py`` gets the first
    one's, the running script's folder wins over the file's, and a name of a standard or
    installed module gets that one: each a different model or algorithm, without a word, and
    another for ``--config`` from another folder."""
    folder = path.parent
    names: set[str] = set()
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    for neighbour in sorted(names):
        own = next((f.resolve() for f in (folder / f"{neighbour}.py",
                                          folder / neighbour / "__init__.py") if f.is_file()),
                   None)
        if own is None:  # not a neighbour: no find_spec for torch, numpy, ...
            continue
        found = _origin(neighbour)
        if found == own:
            continue
        if found is None:
            if neighbour not in sys.builtin_module_names:
                continue  # cannot be told
            return neighbour, "a built-in module", f"rename {_display(own)}"
        beside = found.parent.parent if found.name == "__init__.py" else found.parent
        if str(beside) in {str(Path(p).resolve()) for p in _APPENDED}:
            return neighbour, f"imported from {found}", (
                "give the modules beside different files different names, or run them in "
                "separate processes")
        return neighbour, f"imported from {found}", f"rename {_display(own)}"
    return None


def _display(own: Path) -> str:
    return str(own.parent) if own.name == "__init__.py" else str(own)


def _origin(name: str) -> Path | None:
    """The file (resolved) module ``name`` is, or would be imported from now (not importing
    it); None for a built-in one, a namespace package or one not found."""
    module = sys.modules.get(name)
    if module is not None:
        file = getattr(module, "__file__", None)
    else:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        file = spec.origin if spec is not None and spec.has_location else None
    return Path(file).resolve() if file else None


def _imported_from(path: Path):
    """The running script, or a module the user imported, whose file is ``path``: a reference
    to the file names its objects, those the user holds (``from mine import Mine`` and then
    ``--algo ./mine.py:Mine`` are one class), not a copy's. None if there is none."""
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and os.path.basename(file) == path.name \
                and not module.__name__.startswith(_FILE_MODULE) and Path(file).resolve() == path:
            return module
    return None


def one_line(e: BaseException) -> str:
    """``e`` from the user's own code (a model, a loader) in a refusal's one line: its type,
    its message's first line and where in that code it arose, ``(at m.py:8, in forward)``."""
    text = str(e).strip().splitlines()
    where = comm.user_frame(e.__traceback__)
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ") + \
        (f" (at {where})" if where else "")


def _model(name: str) -> str:
    """``--model NAME`` in a refusal, from Python ``ModelConfig.name='NAME'`` (:func:`said`)."""
    return said("--model", name, typed=f"--model {name}")


def build_model(name: str, input_shape: tuple, num_classes: int,
                model_args: dict | None = None) -> nn.Module:
    """Built-in model ``name`` or the user's ``MODULE:CALLABLE`` for this data."""
    if not is_reference(name):
        if model_args:
            raise UsageError(f"{said('--model-args', field=('ModelConfig', 'args'))} are for a "
                             f"model of your own, not {_model(name)}")
        if len(input_shape) != 3 and name != "mlp":  # mlp flattens any shape
            raise UsageError(f"{_model(name)} needs samples of shape C x H x W, not "
                             f"{' x '.join(map(str, input_shape))}; use a model of your own")
        return models.build(name, tuple(input_shape), num_classes)
    build = resolve("--model", name)
    try:
        model = build(tuple(input_shape), num_classes, **(model_args or {}))
    except UsageError:
        raise
    except Exception as e:
        extra = "".join(f", {k}={v!r}" for k, v in (model_args or {}).items())
        raise UsageError(f"{_model(name)} raised {one_line(e)} when called with "
                         f"input_shape={tuple(input_shape)}, num_classes={num_classes}"
                         f"{extra}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"{_model(name)} returned a {type(model).__name__}, not a "
                         "torch.nn.Module")
    return model


def build_for_data(config: RunConfig) -> nn.Module:
    """The run's model (``config``: a RunConfig) for its data set's sample shape and classes
    (one test sample read): what an algorithm's check before MPI judges, such as its
    parameters' dtypes."""
    from hpctrain import data  # data imports this module

    sample = data.load(options.text(config.data.dataset), "test",
                       options.text_or_none(config.data.data_dir), 0, 1)
    return build_model(options.text(config.model.name), sample.shape, sample.num_classes,
                       config.model.args)


def layout(model: nn.Module) -> str:
    """The model's parameters and buffers in a few words, with a digest of their names,
    shapes and dtypes: what every rank must build alike (a user's model file may differ
    between nodes)."""
    tensors = [(n, tuple(t.shape), str(t.dtype)) for n, t in model.state_dict().items()]
    digest = hashlib.sha256(repr(tensors).encode()).hexdigest()[:12]
    values = sum(t.numel() for t in model.state_dict().values())
    return f"{len(tensors)} tensors of {values} values (layout {digest})"


# layout() of the model each check_model built, by its arguments: run._agree compares it
# across ranks without building the model a second time at start-up.
_checked: dict[tuple, str] = {}


def _key(name: str, input_shape: tuple, num_classes: int, model_args: dict | None) -> tuple:
    return name, tuple(input_shape), num_classes, json.dumps(model_args or {}, sort_keys=True)


def checked_layout(name: str, input_shape: tuple, num_classes: int,
                   model_args: dict | None = None) -> str:
    """:func:`layout` of the model these arguments build: as :func:`check_model` found it
    (this run checked it before MPI started), else built now."""
    key = _key(name, input_shape, num_classes, model_args)
    if key not in _checked:
        _checked[key] = layout(build_model(name, input_shape, num_classes, model_args))
    return _checked[key]


def check_model(name: str, input_shape: tuple, num_classes: int,
                model_args: dict | None = None, one_sample: str | None = None,
                no_sparse: str | None = None) -> None:
    """Build the model once and try it on two zero samples: UsageError if it cannot be built,
    gives logits of the wrong size or type, or could not train (no trainable parameter, no
    gradient path from its output to them), which would otherwise fail only at the first
    step, after MPI started. The model is thrown away; the run seeds torch before it builds
    its own, so what this draws from torch's RNG changes nothing.

    ``one_sample``: why the run forwards a single sample in training mode (a batch or a
    micro-batch of one, :func:`hpctrain.microbatch.one_sample`); then any model, built-in
    too, must take one there (batch norm raises), or the refusal gives that reason.

    ``no_sparse``: why the run's optimizer cannot step on a sparse gradient
    (:func:`hpctrain.optimizers.sparse_refusal`); then a model whose check step gives one
    (an embedding with ``sparse=True``) is refused, naming the parameter, its module and
    that reason."""
    model = build_model(name, input_shape, num_classes, model_args)
    if is_reference(name):  # a built-in model passes these by construction
        _check_own_model(name, model, input_shape, num_classes, no_sparse)
    if one_sample is not None:
        _check_one_sample(name, model, input_shape, one_sample)
    _checked[_key(name, input_shape, num_classes, model_args)] = layout(model)  # no lazy ones


def _check_own_model(name: str, model: nn.Module, input_shape: tuple,
                     num_classes: int, no_sparse: str | None) -> None:
    """:func:`check_model`'s checks of a user's model."""
    lazy = next((n for n, p in model.named_parameters()
                 if isinstance(p, nn.parameter.UninitializedParameter)), None)
    if lazy is not None:  # sized by a first forward on each rank: none of the run's checks see it
        raise UsageError(f"{_model(name)}: its parameter {lazy} is lazy (nn.Lazy* modules); "
                         "give the layer its input size")
    model.eval()
    with torch.no_grad():
        _logits(name, model, input_shape, num_classes)
    params = list(model.parameters())
    if not any(p.requires_grad for p in params):
        what = "no parameter that requires grad (all frozen)" if params else "no parameters"
        raise UsageError(f"{_model(name)}: it has {what}; there is nothing to train")
    # One training step's forward and backward, as training takes them.
    with _as_it_was(model):
        model.train()
        with torch.enable_grad():
            out = _logits(name, model, input_shape, num_classes)
            if out.requires_grad:
                try:
                    F.cross_entropy(out, torch.zeros(2, dtype=torch.long)).backward()
                except Exception as e:
                    raise UsageError(f"{_model(name)}: the backward of its loss raised "
                                     f"{one_line(e)}") from e
        if all(p.grad is None for p in params):
            raise UsageError(f"{_model(name)}: its output does not depend on its parameters "
                             "(detached?); no gradient reaches them")
        if no_sparse is not None:
            _refuse_sparse_gradients(name, model, no_sparse)


def _refuse_sparse_gradients(name: str, model: nn.Module, why: str) -> None:
    """UsageError naming the first parameter whose gradient the check's backward made sparse,
    and its module, because ``why``."""
    sparse = next((n for n, p in model.named_parameters()
                   if p.grad is not None and p.grad.is_sparse), None)
    if sparse is None:
        return
    owner, _, _ = sparse.rpartition(".")
    module = model.get_submodule(owner)
    built = f"{owner or 'the model'} ({type(module).__name__}, sparse=True)" \
        if getattr(module, "sparse", False) is True else f"its module {owner or 'itself'}"
    raise UsageError(f"{_model(name)}: {sparse} gets sparse gradients, and {why}, or build "
                     f"{built} with sparse=False")


@contextlib.contextmanager
def _as_it_was(model: nn.Module):
    """A build that hands out one module every call gets it back as it was after a check's
    forward in training mode: buffers (BatchNorm's statistics) restored, no gradients."""
    buffers = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers, strict=False):
                b.copy_(saved)
        for p in model.parameters():
            p.grad = None


def _check_one_sample(name: str, model: nn.Module, input_shape: tuple, why: str) -> None:
    """UsageError naming ``why`` when ``model``'s forward in training mode fails on one
    sample (BatchNorm1d: "Expected more than 1 value per channel when training")."""
    mode = model.training
    try:
        with _as_it_was(model), torch.no_grad():
            model.train()
            model(torch.zeros(1, *input_shape))
    except Exception as e:
        raise UsageError(f"{_model(name)} cannot train on one sample (its forward in "
                         f"training mode raised {one_line(e)}), and {why}") from e
    finally:
        model.train(mode)


def _logits(name: str, model: nn.Module, input_shape: tuple, num_classes: int) -> torch.Tensor:
    """The model's output for two zero samples: UsageError unless floating-point logits of
    shape ``(2, num_classes)``."""
    mode = " in training mode" if model.training else ""
    try:
        out = model(torch.zeros(2, *input_shape))
    except Exception as e:
        raise UsageError(f"{_model(name)}: its forward{mode} on a batch of shape "
                         f"{(2, *input_shape)} raised {one_line(e)}") from e
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"{_model(name)}: output {got}{mode} for a batch of 2; want (2, "
                         f"{num_classes}): one logit per class")
    if not out.is_floating_point():
        raise UsageError(f"{_model(name)}: output of dtype {out.dtype}; want floating-point "
                         "logits")
    return out
