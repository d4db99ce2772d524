"""Checked, atomic persistence shared by the stateful continual-learning pieces.

Every stateful object here (replay buffer, EWC importances, methods) turns its
state into a dict tagged with a ``kind`` and a ``version``; `check_state`
refuses a dict of another kind or version. Files are written with
`fedcl.atomic.write_bytes`, so a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

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

