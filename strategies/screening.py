"""Checks a client's reply must pass before it may touch the global adapter.

Each check returns None when the reply is acceptable, or a reason that names
the problem (logged, and counted in the round's `rejected`). They take plain
values so that they can be tested without Flower's message machinery.

`ReplyScreen`, one part of `strategies.strategy.FedclStrategy`, applies them
to a reply message: it knows the wire format (``strategy.transport``), the
float32 state updates are measured against, and the example count each
client first reported; an admitted reply's arrays become the float32 absolute
adapter state, so that Flower's aggregation runs on it unchanged.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedcl import keys
from fedcl.federation.messages import (SCALE_SUFFIX, WIRE_DTYPES, arrays_to_state, decode_update,
                                       encode_global, reply_metrics, state_to_arrays)


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


def number(metrics: MetricRecord, key: str, default: float = 0) -> float:
    """A reply metric as one number (Flower's MetricRecord also holds lists; fedcl's replies send none)."""
    value = metrics.get(key, default)
    if isinstance(value, list):
        raise TypeError(f"reply metric {key!r}: got a list, expected one number")
    return value


def client_label(msg: Message) -> str:
    """How logs name a reply's client: its partition id, else its node id."""
    return str(reply_metrics(msg).get(keys.PARTITION_ID, msg.metadata.src_node_id))


class ReplyScreen:
    """The wire format down and the checks up: what a reply must be to be aggregated."""

    def __init__(self, *, transport: str, reply_template: dict[str, torch.Tensor] | None,
                 max_update_norm: float, max_examples: int, updates_from_template: bool = False) -> None:
        self.transport = transport
        self.reply_template = reply_template  # the clients' trainable state at its seeded init
        self.max_update_norm = max_update_norm
        self.max_examples = max_examples
        # flora: clients return a fresh LoRA trained from the seeded init, not from the global.
        self.updates_from_template = updates_from_template
        self.first_examples: dict[str, int] = {}
        self.current_global: dict[str, torch.Tensor] | None = None

    def encode_global(self, content: RecordDict, *, train: bool) -> None:
        """Put the global adapter in `content` into its wire form. A train round's global
        (float32, as the strategy holds it) is what that round's replies are measured against."""
        state = arrays_to_state(content.array_records[keys.ARRAYS])
        if train:
            self.current_global = state
        content[keys.ARRAYS] = encode_global(state, self.transport)

    def start(self) -> dict[str, torch.Tensor]:
        """The float32 state a reply's update is measured against."""
        start = self.reply_template if self.updates_from_template else self.current_global
        if start is None:
            raise RuntimeError("a reply arrived before any global adapter was sent (configure_train)")
        return start

    def template(self) -> dict[str, torch.Tensor]:
        """What a reply must look like: names and shapes."""
        return self.reply_template or self.start()

    def admit(self, msg: Message) -> str | None:
        """None if `msg` passes every check (its arrays are then the float32 absolute state), else why not."""
        start = self.start()
        record = msg.content.array_records[keys.ARRAYS]
        reason = check_schema(record, self.template(), self.transport)
        if reason is not None:
            return reason
        update = decode_update(record, start, self.transport)
        reason = check_update(update, max_norm=self.max_update_norm)
        if reason is not None:
            return reason
        metrics = reply_metrics(msg)
        # A client's data do not grow within a task; across a continual stream each task
        # has its own size, so the count is held to what it first reported for the task.
        client = client_label(msg)
        count_key = client if keys.TASK not in metrics else f"{client}/task-{int(number(metrics, keys.TASK))}"
        reason = check_examples(metrics.get(keys.NUM_EXAMPLES_MSG), max_examples=self.max_examples,
                                first_reported=self.first_examples.get(count_key))
        if reason is not None:
            return reason
        self.first_examples.setdefault(count_key, int(number(metrics, keys.NUM_EXAMPLES_MSG)))
        msg.content[keys.ARRAYS] = state_to_arrays(OrderedDict(
            (name, start[name] + delta) for name, delta in update.items()))
        return None

    def state_dict(self) -> dict:
        return {"first_examples": dict(self.first_examples)}

    def load_state_dict(self, state: dict) -> None:
        self.first_examples = {str(k): int(v) for k, v in state.get("first_examples", {}).items()}
