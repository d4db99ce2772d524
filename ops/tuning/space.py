"""The search space of `fedcl tune`: which config keys vary, and over what.

A space file is TOML with one table per config key (dotted, as in `--set`)::

    [train.lr]                 # a range; log = true samples it on a log scale
    low = 1e-4
    high = 1e-2
    log = true

    [train.local_steps]        # an integer range with a step
    low = 1
    high = 4
    step = 1

    [lora.r]                   # a set of choices
    choices = [4, 8, 16]

`load_space` checks every entry against the base config before any trial runs:
the key must exist (and not be a `run.*` path), ranges need numeric keys with
low < high (and low > 0 on a log scale), every choice and both ends of a range
must be a valid value for the key, and a grid search needs discrete values.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

from fedcl.config import Config, ConfigError

SPEC_KEYS = {"low", "high", "log", "step", "choices"}
SECTIONS = get_type_hints(Config)  # section name -> its dataclass


class SpaceError(ConfigError):
    """A search space entry is wrong; the message names the key."""


@dataclass(frozen=True)
class Param:
    """One tuned config key: a numeric range or a list of choices."""

    key: str
    kind: str  # "int", "float" or "choice"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def grid_values(self) -> list:
        """Every value a grid search visits."""
        if self.kind == "choice":
            return list(self.choices)
        step = self.step if self.step is not None else 1
        count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.kind == "int" else [round(v, 12) for v in values]

    def suggest(self, trial, *, grid: bool = False) -> Any:
        if grid or self.kind == "choice":
            return trial.suggest_categorical(self.key, self.grid_values() if grid else list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high),
                                     step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


def _field_type(key: str) -> Any:
    section, dot, name = key.partition(".")
    if not dot or section not in SECTIONS:
        raise SpaceError(f"space: unknown key {key!r}; keys look like section.key with a section "
                         f"among {', '.join(SECTIONS)}")
    if section == "run":
        raise SpaceError(f"space: {key}: run.* paths are set per trial by `fedcl tune`, not tuned")
    hints = get_type_hints(SECTIONS[section])
    if name not in hints:
        raise SpaceError(f"space: unknown key {key!r}; known keys of [{section}]: {', '.join(hints)}")
    return hints[name]


def _type_name(typ: Any) -> str:
    if get_args(typ):
        return "one of " + ", ".join(map(repr, get_args(typ)))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[typ]


def _has_type(value: Any, typ: Any) -> bool:
    if get_args(typ) or typ is str:
        return isinstance(value, str)
    if typ is bool:
        return isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_value(base: Config, key: str, value: Any, what: str) -> None:
    """The value must be valid for the key on top of the base config."""
    try:
        base.replace({key: value}, source="space")
    except ConfigError as err:
        raise SpaceError(f"space: {key}: {what} {value!r} is not a valid value ({err})") from None


def parse_param(key: str, spec: Any, base: Config) -> Param:
    typ = _field_type(key)
    if not isinstance(spec, dict):
        raise SpaceError(f"space: {key}: expected a table with low/high or choices, got {spec!r}")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise SpaceError(f"space: {key}: unknown setting(s) {', '.join(sorted(unknown))}; "
                         f"allowed: {', '.join(sorted(SPEC_KEYS))}")
    if "choices" in spec:
        if set(spec) - {"choices"}:
            raise SpaceError(f"space: {key}: give either choices or low/high, not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"space: {key}: choices must be a non-empty list, got {choices!r}")
        for choice in choices:
            if not _has_type(choice, typ):
                raise SpaceError(f"space: {key}: choice {choice!r} has the wrong type; "
                                 f"expected {_type_name(typ)}")
            _check_value(base, key, choice, "choice")
        if len(set(map(repr, choices))) != len(choices):
            raise SpaceError(f"space: {key}: choices repeat a value: {choices!r}")
        return Param(key, "choice", choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise SpaceError(f"space: {key}: a range needs both low and high (or give choices)")
    if typ not in (int, float):
        raise SpaceError(f"space: {key}: a range needs a numeric key, but {key} takes "
                         f"{_type_name(typ)}; use choices = [...]")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for name, value in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
        if not _has_type(value, typ) or not math.isfinite(value):
            raise SpaceError(f"space: {key}: {name} = {value!r}, expected {_type_name(typ)}")
    if not isinstance(log, bool):
        raise SpaceError(f"space: {key}: log = {log!r}, expected true or false")
    if low > high:
        raise SpaceError(f"space: {key}: low {low!r} is above high {high!r}")
    if low == high:
        raise SpaceError(f"space: {key}: empty range (low = high = {low!r}); a fixed value "
                         "belongs in the base config")
    if log and low <= 0:
        raise SpaceError(f"space: {key}: a log scale needs low > 0, got low = {low!r} "
                         "(a log range cannot reach or cross zero)")
    if step is not None and step <= 0:
        raise SpaceError(f"space: {key}: step = {step!r}, expected a positive number")
    if step is not None and log:
        raise SpaceError(f"space: {key}: give step or log = true, not both")
    _check_value(base, key, low, "low")
    _check_value(base, key, high, "high")
    return Param(key, "int" if typ is int else "float", low=low, high=high, log=log,
                 step=float(step) if step is not None and typ is float else step)


def _flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """`[train.lr]` and `["train.lr"]` and `[train] lr = {...}` all name train.lr."""
    out: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and value and not (set(value) & SPEC_KEYS):
            out.update(_flatten(value, key + "."))
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]

    def suggest(self, trial, *, grid: bool = False) -> dict[str, Any]:
        return {p.key: p.suggest(trial, grid=grid) for p in self.params}

    def grid(self) -> dict[str, list]:
        """The grid sampler's search space; every key must be discrete."""
        for p in self.params:
            if p.kind == "float" and p.step is None:
                raise SpaceError(f"space: {p.key}: the grid sampler needs discrete values; give "
                                 "this continuous range a step, or choices = [...]")
        return {p.key: p.grid_values() for p in self.params}


def parse_space(table: dict, base: Config) -> SearchSpace:
    flat = _flatten(table)
    if not flat:
        raise SpaceError("space: no keys to tune; add a table such as [train.lr] low = 1e-4 high = 1e-2")
    return SearchSpace(tuple(parse_param(key, spec, base) for key, spec in flat.items()))


def load_space(path: str | Path, base: Config) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"{path}: search space file not found")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SpaceError(f"{path}: not valid TOML: {err}") from None
    try:
        return parse_space(table, base)
    except SpaceError as err:
        raise SpaceError(f"{path}: {err}") from None
