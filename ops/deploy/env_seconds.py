"""A number of seconds read from an environment variable, checked, with an error that
names the variable, what is wrong and a value that works."""

from __future__ import annotations

import os
from collections.abc import Callable


def env_seconds(name: str, default: float, *, hint: str, valid: Callable[[float], bool], bounds: str) -> float:
    """`name`'s value in seconds, or `default` when it is unset or blank. A value that is
    not a number, or for which `valid` is false, ends the process with an error that says
    it "must be `bounds`" and suggests `hint` (e.g. "FEDCL_SUPERNODE_PULL_S=1")."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"fedcl: {name}={raw!r} is not a number of seconds (hint: {hint})") from None
    if not valid(value):
        raise SystemExit(f"fedcl: {name}={raw!r} must be {bounds} (hint: {hint})")
    return value
