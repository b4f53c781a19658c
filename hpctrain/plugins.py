"""Users' own code by reference: ``--model my_pkg.nets:build`` or ``--model ./nets.py:build``.

A reference names a callable as ``MODULE:ATTRIBUTE`` (a module importable from the working
directory or ``PYTHONPATH``) or ``FILE.py:ATTRIBUTE`` (a path, loaded as a module of its own,
its folder put last on the path: it may import a module beside it, refused where Python
takes that name from elsewhere).
:func:`check_form` judges the text alone (at construction, no import); :func:`resolve` imports
it, so a bad reference (no module, no attribute, not callable, a file that raises as it
loads) is one line, exit 2, on every rank alike, before any collective call;
:func:`reference_to` names the object a Python caller gave instead of a reference. What the
callable gives is judged where it is used: a model by :mod:`hpctrain.model_checks`, a data
loader by :mod:`hpctrain.userdata`, an algorithm by :mod:`hpctrain.registry`.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpctrain import job_end
from hpctrain.errors import UsageError
from hpctrain.option_names import said
from hpctrain.paths import home_expanded

# Used with fullmatch: re.match's "$" also matches before a final newline ("build\n").
_ATTRIBUTE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_MODULE = _ATTRIBUTE
_FILE_MODULE = "hpctrain_user_"  # name prefix of the modules loaded from files
_APPENDED: set[str] = set()  # folders _importable_beside put on sys.path


# What a user's code (a file's import, a model's build or forward, a loader) may raise that is
# said as one refusal: sys.exit there too. Its SystemExit passed by, and the process exited
# with the code's status and no line: sys.exit(4) read as --stop-on-collapse's 4, 3 as a stall.
USER_ERRORS = (Exception, SystemExit)


def is_reference(text: str) -> bool:
    """Whether ``text`` has the form of a reference (``X:Y``), not a built-in name."""
    return ":" in text


def is_file_reference(text: str) -> bool:
    where = text.rsplit(":", 1)[0]
    return where.endswith(".py") or "/" in where


def check_form(flag: str, text: str) -> None:
    """UsageError unless ``text`` reads as ``MODULE:ATTRIBUTE`` or ``FILE.py:ATTRIBUTE``."""
    where, _, attribute = text.rpartition(":")
    given = said(flag, text, typed=f"{flag} {text!r}")
    if not where or not _ATTRIBUTE.fullmatch(attribute):
        what = "CLASS" if flag == "--algo" else "CALLABLE"
        raise UsageError(f"{given}: want MODULE:{what} or ./FILE.py:{what}")
    if not is_file_reference(text) and not _MODULE.fullmatch(where):
        raise UsageError(f"{given}: {where!r} is neither a module name nor a .py file")


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
    except USER_ERRORS as e:
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
    except USER_ERRORS as e:
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
    where = job_end.user_frame(e.__traceback__)
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ") + \
        (f" (at {where})" if where else "")
