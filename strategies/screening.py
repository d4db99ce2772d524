"""Checks a client's reply must pass before it may touch the global adapter.

Each check returns None when the reply is acceptable, or a reason that names
the problem (logged, and counted in the round's `rejected`). They take plain
values so that they can be tested without Flower's message machinery.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import ArrayRecord

from strategies.wire import SCALE_SUFFIX, WIRE_DTYPES


def check_schema(record: ArrayRecord, template: dict[str, torch.Tensor], transport: str) -> str | None:
    """Same names, shapes and wire dtype as the adapter the server expects back."""
    expected = set(template)
    if transport == "int8":
        expected |= {name + SCALE_SUFFIX for name in template}
    names = set(record.keys())
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        return f"parameter names differ (missing {missing[:2]}, unexpected {extra[:2]})"
    wire = np.dtype(WIRE_DTYPES[transport])
    for name, ref in template.items():
        array = record[name]
        if tuple(array.shape) != tuple(ref.shape):
            return f"{name} has shape {tuple(array.shape)}, expected {tuple(ref.shape)}"
        if np.dtype(array.dtype) != wire:
            return f"{name} has dtype {array.dtype}, strategy.transport={transport} sends {wire.name}"
        if transport == "int8":
            scale = record[name + SCALE_SUFFIX]
            if tuple(scale.shape) != (1,) or np.dtype(scale.dtype) != np.float32:
                return f"{name}{SCALE_SUFFIX} must be one float32 value"
    return None


def update_norm(update: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


def check_update(update: dict[str, torch.Tensor], *, max_norm: float) -> str | None:
    """Finite values, and an L2 norm within `max_norm` (0: no limit)."""
    for name, tensor in update.items():
        if not torch.isfinite(tensor).all():
            return f"{name} holds non-finite values"
    norm = update_norm(update)
    if max_norm > 0 and norm > max_norm:
        return f"update norm {norm:.4g} exceeds strategy.max_update_norm={max_norm:g}"
    return None


def check_examples(value, *, max_examples: int, first_reported: int | None) -> str | None:
    """A positive whole count, within the configured cap and what this client first reported."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value <= 0:
        return f"example count {value!r} is not a positive integer"
    if max_examples and value > max_examples:
        return f"example count {int(value)} exceeds strategy.max_examples={max_examples}"
    if first_reported is not None and value > first_reported:
        # A client's data do not grow during a run; a larger count would only
        # buy its update more weight.
        return f"example count {int(value)} exceeds the {first_reported} this client first reported"
    return None
