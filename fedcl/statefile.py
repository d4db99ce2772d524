"""Reading fedcl's own state files: parsed and shape-checked, never trusted.

Every JSON file fedcl keeps between commands (a run's ``checkpoint.json``,
``metrics.json`` and ``strategy_state.json``, a registry's ``registry.json``
and ``version.json``, a node's privacy ledger) is read through `read_json`,
and its fields through `field`. A file that is empty, truncated, not UTF-8,
or valid JSON of another shape raises a ValueError (`StateFileError` unless
the caller names its own class) whose one-line message names the file, what
is wrong and what to do. Nothing here writes: a refused file is left as it is.

Usage::

    state = read_json(path, what="run checkpoint", shape=dict, fix=FIX)
    done = field(state, "round", int, path=path, fix=FIX)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class StateFileError(ValueError):
    """A state file cannot be used as it is; the message names the file and the way out."""


_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer",
               float: "a number", bool: "true or false", type(None): "null"}


def describe(value: Any) -> str:
    """What a JSON value is, in the words of the messages ("a list", "a string", ...)."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def read_json(path: str | Path, *, what: str, fix: str, shape: type = dict,
              error: type[Exception] = StateFileError) -> Any:
    """The parsed JSON of `path`, which must be of type `shape` (dict or list).

    `what` says what the file is ("run checkpoint"), `fix` what the user can
    do; both go into the message of the `error` raised for a missing,
    unreadable, empty, truncated or wrongly shaped file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: the {what} is missing; {fix}") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: the {what} is not UTF-8 text ({err.reason} at byte {err.start}); "
                    f"{fix}") from None
    except OSError as err:
        raise error(f"{path}: the {what} cannot be read ({err.strerror or err}); {fix}") from None
    if not text.strip():
        raise error(f"{path}: the {what} is empty (a damaged or hand-truncated file); {fix}")
    try:
        state = json.loads(text)
    except json.JSONDecodeError as err:
        cut = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")
        problem = "is truncated" if cut else "is not valid JSON"
        raise error(f"{path}: the {what} {problem} ({err.msg} at line {err.lineno} column "
                    f"{err.colno}); {fix}") from None
    if not isinstance(state, shape):
        raise error(f"{path}: the {what} is {describe(state)}, expected {_TYPE_NAMES[shape]}; {fix}")
    return state


def field(obj: dict, key: str, types: type | tuple[type, ...], *, path: str | Path, fix: str,
          where: str = "", error: type[Exception] = StateFileError) -> Any:
    """`obj[key]`, checked present and of `types` (an int is never a bool; a float may be an int).

    `where` locates `obj` inside the file ("versions[2]"), for the message.
    """
    types = types if isinstance(types, tuple) else (types,)
    at = f"{where}.{key}" if where else key
    if not isinstance(obj, dict) or key not in obj:
        raise error(f"{path}: {at} is missing; {fix}")
    value = obj[key]
    allowed = types + ((int,) if float in types else ())
    if isinstance(value, bool) and bool not in types or not isinstance(value, allowed):
        wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise error(f"{path}: {at} is {describe(value)} ({value!r:.40}), expected {wanted}; {fix}")
    if isinstance(value, float) and not math.isfinite(value):
        raise error(f"{path}: {at} is {value!r}, expected a finite number; {fix}")
    return value
