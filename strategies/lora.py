"""What every fedcl strategy adds on top of the round bookkeeping: the adapter's
transport encoding and the screening of replies.

`LoraStrategy` is a `RoundBookkeeping` whose hooks

- encode the global adapter for the wire (``strategy.transport``) before the
  bytes of what is sent are counted, and remember the float32 global the
  clients' updates are measured against;
- check every reply (names, shapes, wire dtype, finite values, update norm,
  example count), drop a failing one with a logged reason and count it in the
  round's ``rejected``, and hand the rest to Flower's aggregation as float32
  absolute adapter states, so Flower's strategies run unchanged.

Strategies are then ``class X(LoraStrategy, <Flower strategy>)``; `build_with`
makes one from the configuration.
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from logging import WARNING

import numpy as np
import torch
from flwr.app import Message, MetricRecord
from flwr.supercore import log

from strategies import screening
from strategies.base import NUM_EXAMPLES, PARTITION_ID, TASK, RoundBookkeeping
from strategies.importance import IMPORTANCE, FederatedImportance
from strategies.wire import arrays_to_state, decode_update, encode_global, state_to_arrays


class LoraStrategy(FederatedImportance, RoundBookkeeping):
    """RoundBookkeeping plus transport encoding, reply screening and federated importance."""

    # flora: clients return a fresh LoRA trained from the seeded init, not the global.
    replies_start_from_template = False

    def setup_lora(self, *, transport: str, reply_template: dict | None, max_update_norm: float,
                   max_examples: int) -> None:
        self.transport = transport
        self.reply_template = reply_template
        self.max_update_norm = max_update_norm
        self.max_examples = max_examples
        self.first_examples: dict[str, int] = {}
        self.current_global: dict[str, torch.Tensor] | None = None
        if not hasattr(self, "importance_on"):
            self.setup_importance(False)

    def before_send(self, messages: list[Message], *, train: bool) -> None:
        # Flower sends one shared RecordDict to all nodes: encode each content once.
        contents = {id(m.content): m.content for m in messages}
        for content in contents.values():
            state = arrays_to_state(content[self.arrayrecord_key])  # type: ignore[attr-defined]
            if train:
                self.current_global = state
            content[self.arrayrecord_key] = encode_global(state, self.transport)  # type: ignore[attr-defined]
        if train:
            self.attach_importance(contents.values(), self.configrecord_key)  # type: ignore[attr-defined]

    def update_start(self) -> dict[str, torch.Tensor]:
        """The float32 state a reply's update is measured against."""
        if self.replies_start_from_template:
            return self.reply_template  # type: ignore[return-value]
        return self.current_global  # type: ignore[return-value]

    def screen_reply(self, msg: Message, rec: dict) -> Message | None:
        metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
        client = str(metrics.get(PARTITION_ID, msg.metadata.src_node_id))
        # A client's data do not grow within a task; across a continual stream each task
        # has its own size, so the count is held to what it first reported for the task.
        count_key = client if TASK not in metrics else f"{client}/task-{int(metrics[TASK])}"
        start = self.update_start()
        # taken off before anything else: Flower aggregates exactly one ArrayRecord per reply
        importance = msg.content.array_records.get(IMPORTANCE)
        if importance is not None:
            del msg.content[IMPORTANCE]
        record = msg.content.array_records["arrays"]
        reason = screening.check_schema(record, self.reply_template or start, self.transport)
        update = None
        if reason is None:
            update = decode_update(record, start, self.transport)
            reason = screening.check_update(update, max_norm=self.max_update_norm)
        if reason is None:
            reason = screening.check_examples(metrics.get(NUM_EXAMPLES), max_examples=self.max_examples,
                                              first_reported=self.first_examples.get(count_key))
        if reason is not None:
            rec["rejected"] += 1
            if rec["clients"]:
                rec["clients"][-1]["rejected"] = reason  # split_replies appended this reply last
            log(WARNING, "round %d: reply of client %s rejected: %s", rec["round"], client, reason)
            return None
        self.first_examples.setdefault(count_key, int(metrics[NUM_EXAMPLES]))
        if importance is not None:
            self.take_importance(msg, importance, self.reply_template or start, rec)
        msg.content["arrays"] = state_to_arrays(OrderedDict(  # type: ignore[index]
            (name, start[name] + delta) for name, delta in update.items()))
        return msg

    def aggregate_train(self, server_round: int, replies):
        result = super().aggregate_train(server_round, replies)
        self.aggregate_importance(self.record(server_round))
        return result

    def state_dict(self) -> dict:
        return {**super().state_dict(), "first_examples": dict(self.first_examples), **self.importance_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.first_examples = {str(k): int(v) for k, v in state.get("first_examples", {}).items()}
        self.load_importance_state(state)


class RunRoundNumbers:
    """Placed between LoraStrategy and a Flower optimiser so that it sees the run's
    round, not Flower's count since the resume (FedAdam's bias correction uses it)."""

    def aggregate_train(self, server_round: int, replies):
        return super().aggregate_train(self.run_round(server_round), replies)  # type: ignore[misc]


def encode_arrays(arrays: dict[str, np.ndarray] | None) -> dict | None:
    """ndarrays -> JSON-safe, exact (base64 of the raw little-endian bytes)."""
    if arrays is None:
        return None
    return {k: {"dtype": np.asarray(v).dtype.str, "shape": list(np.shape(v)),
                "data": base64.b64encode(np.ascontiguousarray(v).tobytes()).decode("ascii")}
            for k, v in arrays.items()}


def decode_arrays(encoded: dict | None) -> dict[str, np.ndarray] | None:
    if encoded is None:
        return None
    return {k: np.frombuffer(base64.b64decode(v["data"]), dtype=np.dtype(v["dtype"])).reshape(v["shape"]).copy()
            for k, v in encoded.items()}


def flower_kwargs(config) -> dict:
    """Arguments every Flower strategy takes.

    Sampling is RoundBookkeeping's (from the run seed); Flower is only asked to
    wait for `federation.min_replies` connected nodes, so a dead node never
    blocks sampling, and a round goes on while that many reply.
    """
    fed = config.federation
    return dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=fed.min_replies,
                min_evaluate_nodes=fed.min_replies, min_available_nodes=fed.min_replies,
                weighted_by_key=NUM_EXAMPLES)


def finish(strategy: LoraStrategy, config, *, round_offset: int, reply_template: dict | None) -> LoraStrategy:
    fed, strat = config.federation, config.strategy
    strategy.setup_bookkeeping(seed=config.train.seed, clients_per_round=fed.clients_per_round,
                               round_offset=round_offset, min_replies=fed.min_replies)
    strategy.setup_lora(transport=strat.transport, reply_template=reply_template,
                        max_update_norm=strat.max_update_norm, max_examples=strat.max_examples)
    strategy.setup_importance(config.continual_on and config.continual.federated_importance)
    return strategy
