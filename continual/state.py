"""Checked, atomic persistence shared by the stateful continual-learning pieces.

Every stateful object here (replay buffer, EWC importances, methods) turns its
state into a dict tagged with a ``kind`` and a ``version``; `check_state`
refuses a dict of another kind or version, and `atomic_write` puts bytes on
disk all or nothing (temporary file in the same folder, fsync, `os.replace`),
so a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


class StateError(ValueError):
    """A saved state does not belong to the object it is loaded into."""


def check_state(state: Any, kind: str, version: int, source: str = "state") -> dict:
    """Return `state` if it is a dict of this `kind` and `version`, else raise StateError."""
    if not isinstance(state, dict):
        raise StateError(f"{source}: expected a dict, got {type(state).__name__}")
    if state.get("kind") != kind:
        raise StateError(f"{source}: kind is {state.get('kind')!r}, expected {kind!r}")
    if state.get("version") != version:
        raise StateError(f"{source}: {kind} version {state.get('version')!r} is not supported "
                         f"(this code reads version {version})")
    return state


def check_same(source: str, key: str, saved: Any, current: Any) -> None:
    """Refuse a state whose setting `key` differs from the object's own."""
    if saved != current:
        raise StateError(f"{source}: saved with {key}={saved!r}, but this object has {key}={current!r}; "
                         "start a fresh state or restore the old setting")


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` all or nothing; the folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)  # makes the rename itself durable
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
