"""Checks a client's reply must pass before it may touch the global adapter or a record.

Each check returns None when the reply is acceptable, or a reason that names
the problem (logged, and counted in the round's `rejected`). They take plain
values so that they can be tested without Flower's message machinery.

- `check_metrics`: every reply (train and evaluate) first. One MetricRecord;
  every value a finite number (or a list of them); ``partition-id``,
  ``num-examples``, ``task`` whole and not negative, ``status`` a known one.
  Nothing reads a reply's figures before this check.
- `check_agreement`: Flower's aggregation refuses (raises on) replies whose
  MetricRecords differ in keys. The key set a strict majority of a round's
  replies carry is the expected one and a reply with another is rejected;
  with no majority (one of two differs) nothing is rejected and the inner
  strategy sees only the keys all share (`project_metrics`). No list of keys
  is declared here: what the ClientApp sends is client/node.py's decision.
- `check_schema`, `check_update`, `check_examples`: the arrays and the count.

`ReplyScreen`, one part of `strategies.strategy.FedclStrategy`, applies the
last three to a train reply: it knows the wire format
(``strategy.transport``), the float32 state updates are measured against, and
the example count each node first reported, keyed on the node's
authenticated id (Flower's ``src_node_id``), never on the partition id a
reply claims; an admitted reply's arrays become the float32 absolute adapter
state, so that Flower's aggregation runs on it unchanged.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from logging import WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore import log

from fedcl import keys
from fedcl.federation.messages import (SCALE_SUFFIX, WIRE_DTYPES, arrays_to_state, decode_update,
                                       encode_global, reply_metrics, state_to_arrays)


# Whole counts and indices; every other metric is a finite number or a list of them.
WHOLE_METRICS = (keys.PARTITION_ID, keys.NUM_EXAMPLES_MSG, keys.TASK, keys.STATUS)
REQUIRED_METRICS = (keys.NUM_EXAMPLES_MSG, keys.PARTITION_ID)
STATUSES = (keys.STATUS_OK, keys.STATUS_BUDGET_EXHAUSTED, keys.STATUS_NO_TASK_DATA)
# Sent by some nodes only (a deployed node's data fingerprint): not compared, not aggregated.
OPTIONAL_METRICS = frozenset({keys.DATA_SHA256})


def shown(value) -> str:
    """A reported value for a log line or a reason, cut short (a hostile list may be long)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _finite_number(value) -> bool:
    """A float that is finite, or an int the wire can carry (int64; a larger one overflows float math)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -2**63 <= value < 2**63
    return isinstance(value, float) and math.isfinite(value)


def whole(value) -> bool:
    """A finite, non-negative, integer-valued number (13 and 13.0; not nan, -1, 1.5, "7", [1])."""
    return _finite_number(value) and value >= 0 and value == int(value)


def check_metrics(records: dict[str, MetricRecord]) -> str | None:
    """One MetricRecord, with the keys every reply needs and only values fedcl can use."""
    if len(records) != 1:
        return f"expected one MetricRecord, got {len(records)}"
    metrics = next(iter(records.values()))
    for key in REQUIRED_METRICS:
        if key not in metrics:
            return f"metric {key!r} is missing"
    for key, value in metrics.items():
        if key in WHOLE_METRICS:
            if not whole(value):
                return f"metric {key!r} is {shown(value)}, expected a whole number, not negative"
        elif isinstance(value, list):
            if not all(_finite_number(v) for v in value):
                return f"metric {key!r} holds {shown(value)}, expected finite numbers"
        elif not _finite_number(value):
            return f"metric {key!r} is {shown(value)}, expected a finite number"
    if metrics.get(keys.STATUS, keys.STATUS_OK) not in STATUSES:
        return f"metric {keys.STATUS!r} is {shown(metrics[keys.STATUS])}, expected one of {list(STATUSES)}"
    return None


def check_agreement(key_sets: list[frozenset[str]]) -> tuple[frozenset[str], list[str | None]]:
    """The metric keys to aggregate, and per reply why its keys are rejected (None: they agree).

    The set a strict majority of the replies carry is expected. Without one,
    nothing is rejected for its keys and only the keys all replies carry are
    used: of two replies that differ, neither can be told the honest one.
    """
    sets = [frozenset(s) - OPTIONAL_METRICS for s in key_sets]
    if not sets:
        return frozenset(), []
    top, count = Counter(sets).most_common(1)[0]
    if 2 * count <= len(sets):
        if len(set(sets)) > 1:
            log(WARNING, "replies differ in metric keys and no key set has a majority; "
                "aggregating the keys all %d carry", len(sets))
        return frozenset.intersection(*sets), [None] * len(sets)
    reasons = []
    for keyset in sets:
        missing, extra = sorted(top - keyset), sorted(keyset - top)
        reasons.append(None if keyset == top else
                       f"metric keys differ from the other replies' (missing {missing[:3]}, "
                       f"unexpected {[shown(k) for k in extra[:3]]})")
    return top, reasons


def metric_keys(msg: Message) -> frozenset[str]:
    return frozenset(reply_metrics(msg).keys())


def project_metrics(msg: Message, kept: frozenset[str]) -> None:
    """Leave only the `kept` keys in a reply's MetricRecord: the inner strategy aggregates those."""
    name, metrics = next(iter(msg.content.metric_records.items()))
    if set(metrics.keys()) - kept:
        msg.content[name] = MetricRecord({k: v for k, v in metrics.items() if k in kept})


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
    """A positive whole count, within the configured cap and what this node first reported."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value <= 0:
        return f"example count {value!r} is not a positive integer"
    if max_examples and value > max_examples:
        return f"example count {int(value)} exceeds strategy.max_examples={max_examples}"
    if first_reported is not None and value > first_reported:
        # A node's data do not grow during a run; a larger count would only
        # buy its update more weight.
        return f"example count {int(value)} exceeds the {first_reported} this node first reported"
    return None


def number(metrics: MetricRecord, key: str, default: float = 0) -> float:
    """A reply metric as one number, once `check_metrics` has passed the reply (a list raises)."""
    value = metrics.get(key, default)
    if isinstance(value, list):
        raise TypeError(f"reply metric {key!r}: got a list, expected one number")
    return value


def client_label(msg: Message) -> str:
    """How logs name a reply's client: the partition id it reports, and its node id."""
    reported = reply_metrics(msg).get(keys.PARTITION_ID)
    partition = int(reported) if whole(reported) else shown(reported)
    return f"{partition} (node {msg.metadata.src_node_id})"


def count_key(node_id: int, task: int | None) -> str:
    """Whose first example count caps a reply: its node's (per task in a continual run)."""
    return str(node_id) if task is None else f"{node_id}/task-{task}"


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
        # count_key(node, task) -> the count that node first reported (for the task)
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

    def admit(self, msg: Message, *, task: int | None = None) -> str | None:
        """None if `msg` passes every check (its arrays are then the float32 absolute state), else why not.

        `msg` has passed `check_metrics`; `task` is the continual task the server
        sent this round (None without continual learning).
        """
        start = self.start()
        if set(msg.content.array_records) != {keys.ARRAYS}:
            return f"expected one ArrayRecord {keys.ARRAYS!r}, got {sorted(msg.content.array_records)[:3]}"
        metrics = reply_metrics(msg)
        if task is not None and metrics.get(keys.TASK) != task:
            return f"reply is for task {shown(metrics.get(keys.TASK))}, the round trains task {task}"
        record = msg.content.array_records[keys.ARRAYS]
        reason = check_schema(record, self.template(), self.transport)
        if reason is not None:
            return reason
        update = decode_update(record, start, self.transport)
        reason = check_update(update, max_norm=self.max_update_norm)
        if reason is not None:
            return reason
        # A node's data do not grow within a task; across a continual stream each task
        # has its own size, so the count is held to what the node first reported for the
        # task. Keyed on the node, not the partition id a reply claims: a node cannot
        # take a fresh cap under a new id, nor set another node's.
        capped = count_key(msg.metadata.src_node_id, task)
        reason = check_examples(metrics.get(keys.NUM_EXAMPLES_MSG), max_examples=self.max_examples,
                                first_reported=self.first_examples.get(capped))
        if reason is not None:
            return reason
        self.first_examples.setdefault(capped, int(number(metrics, keys.NUM_EXAMPLES_MSG)))
        msg.content[keys.ARRAYS] = state_to_arrays(OrderedDict(
            (name, start[name] + delta) for name, delta in update.items()))
        return None

    def state_dict(self) -> dict:
        return {"first_examples_by_node": dict(self.first_examples)}

    def load_state_dict(self, state: dict) -> None:
        self.first_examples = {str(k): int(v) for k, v in state.get("first_examples_by_node", {}).items()}
        old = state.get("first_examples")
        if old:
            # Saved before the caps were keyed on nodes: a partition id says nothing about
            # which node reported the count, so each node's cap starts at its next reply.
            log(WARNING, "strategy state: %d example-count caps keyed by partition id (saved by an "
                "older fedcl) dropped; each node's cap is set again by its next admitted reply", len(old))
