"""A path a user gave (an option, a settings file's value, a Python field), made usable.

Every path option takes ``~`` and ``~user`` alike (:func:`home_expanded`), refuses in one line
a path no file can have (:func:`too_long`: a name over NAME_MAX, the whole over PATH_MAX),
and shows a long one shortened in a message (:func:`shortened`), so that a refusal stays one
line.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from hpctrain.errors import UsageError
from hpctrain.option_names import said


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
    value = (_Shortened(text),) if field else ()
    # A NUL (a settings file's "\u0000", or Python's; no command line holds one) made the os
    # calls' ValueError, exit 1 naming no option; the path is shown quoted, as NUL is unseen.
    shown = repr(_Shortened(text)) if "\0" in text else shortened(text)
    named = said(flag, *value, typed=f"{flag} {shown}", field=field) if flag else shown
    if "\0" in text:
        raise UsageError(f"{named}: a path cannot hold a NUL character")
    expanded = os.path.expanduser(text)
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
