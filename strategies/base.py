"""What every fedcl strategy adds to Flower's: round bookkeeping.

`RoundBookkeeping` is a mixin placed before a Flower strategy class
(``class LoraFedAvg(RoundBookkeeping, FedAvg)``). It

- numbers rounds from where a resumed run left off (Flower's loop always
  counts from 1; `round_offset` maps its count onto the run's),
- samples clients reproducibly from the run seed and the round,
- records per round the bytes the messages carried each way, every client's
  reply (partition id, examples, loss, status) and the failures,

so that the ServerApp can write one complete record per round.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from strategies.wire import message_bytes

# Keys of the clients' reply MetricRecords, shared with the ClientApp.
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
# Sample-level DP: the client's lifetime epsilon, and a reply's status (0: trained;
# otherwise the client did not train and sent no arrays, e.g. 1: privacy budget spent).
EPSILON = "epsilon"
STATUS = "status"
# Continual learning: the client holds no records of this round's task; it sent
# metrics only. Not a failure or a refusal, just nothing to aggregate.
STATUS_NO_TASK_DATA = 2
# The per-round ConfigRecord key naming the continual task (0-based) of the round.
TASK = "task"


class RoundBookkeeping:
    """Mixin: reproducible sampling, real byte counts and per-client records."""

    def setup_bookkeeping(self, *, seed: int, clients_per_round: int, round_offset: int = 0,
                          min_replies: int = 1) -> None:
        self.seed = seed
        self.clients_per_round = clients_per_round
        self.round_offset = round_offset
        self.min_replies = min_replies
        self.records: dict[int, dict] = {}
        self.round_config: Callable[[int], dict] | None = None

    def set_round_config(self, round_config: Callable[[int], dict]) -> None:
        """`round_config(run_round)` adds entries (e.g. the continual task) to every round's ConfigRecord."""
        self.round_config = round_config

    def _add_round_config(self, messages: list[Message], run_round: int) -> None:
        extra = self.round_config(run_round) if self.round_config is not None else {}
        for m in messages:
            record = m.content.config_records[self.configrecord_key]  # type: ignore[attr-defined]
            record["server-round"] = run_round
            for key, value in extra.items():
                record[key] = value

    def run_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    def record(self, server_round: int) -> dict:
        return self.records.setdefault(self.run_round(server_round), {
            "round": self.run_round(server_round), "bytes_down": 0, "bytes_up": 0,
            "clients": [], "failures": 0, "rejected": 0, "refused": 0, "idle": 0,
        })

    def _sample(self, grid: Grid, server_round: int) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        k = self.clients_per_round or len(nodes)
        if k >= len(nodes):
            return nodes
        rng = random.Random(f"sample/{self.seed}/{self.run_round(server_round)}")
        return sorted(rng.sample(nodes, k))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # Round wall time starts here; the ServerApp closes it after its evaluation.
        self.record(server_round)["started_at"] = time.time()
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        chosen = set(self._sample(grid, server_round))
        messages = [m for m in messages if m.metadata.dst_node_id in chosen]
        self._add_round_config(messages, self.run_round(server_round))
        self.before_send(messages, train=True)
        self.record(server_round)["bytes_down"] += sum(message_bytes(m.content) for m in messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))  # type: ignore[misc]
        self._add_round_config(messages, self.run_round(server_round))
        self.before_send(messages, train=False)
        self.record(server_round)["bytes_down_eval"] = sum(message_bytes(m.content) for m in messages)
        return messages

    def split_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Count bytes, log failures and record each client; return the usable replies."""
        rec = self.record(server_round)
        usable = []
        for msg in replies:
            if msg.has_error():
                rec["failures"] += 1
                log(WARNING, "round %d: node %d failed: %s", rec["round"],
                    msg.metadata.src_node_id, msg.error.reason)
                continue
            rec["bytes_up"] += message_bytes(msg.content)
            metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
            rec["clients"].append(client_entry(metrics))
            if "arrays" in msg.content.array_records:
                screened = self.screen_reply(msg, rec)
                if screened is not None:
                    usable.append(screened)
            elif int(metrics.get(STATUS, 0)) == STATUS_NO_TASK_DATA:
                rec["idle"] += 1
            elif int(metrics.get(STATUS, 0)) != 0:
                rec["refused"] += 1
                log(WARNING, "round %d: client %d refused to train (status %d, epsilon %.3f)",
                    rec["round"], int(metrics.get(PARTITION_ID, -1)), int(metrics[STATUS]),
                    float(metrics.get(EPSILON, float("nan"))))
        rec["clients"].sort(key=lambda c: c["id"])
        if len(usable) < self.min_replies:
            log(WARNING, "round %d: %d usable replies, fewer than federation.min_replies=%d; "
                "the global adapter is left unchanged", rec["round"], len(usable), self.min_replies)
            return []
        log(INFO, "round %d: aggregating %d replies", rec["round"], len(usable))
        return usable

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        usable = self.split_replies(server_round, list(replies))
        if not usable:
            return None, None
        return super().aggregate_train(server_round, usable)  # type: ignore[misc]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = [r for r in replies if not r.has_error()]
        rec = self.record(server_round)
        rec["bytes_up_eval"] = sum(message_bytes(r.content) for r in replies)
        seconds = [float(m.get("eval-seconds", 0.0)) for r in replies
                   for m in r.content.metric_records.values()]
        rec["client_eval_seconds_max"] = max(seconds, default=0.0)
        weight = sum(float(m.get(NUM_EXAMPLES, 0)) for r in replies for m in r.content.metric_records.values())
        # No client holds evaluation records (e.g. data.eval_fraction = 0): nothing to average.
        result = super().aggregate_evaluate(server_round, replies) if replies and weight > 0 else None  # type: ignore[misc]
        if result is not None:
            rec["federated_eval"] = {k: v for k, v in result.items() if k != PARTITION_ID}
        return result

    # Hooks for subclasses (see strategies/lora.py): encode what is sent before
    # its bytes are counted; check and decode a reply, or return None to reject it.
    def before_send(self, messages: list[Message], *, train: bool) -> None:
        pass

    def screen_reply(self, msg: Message, rec: dict) -> Message | None:
        return msg

    # Strategy state beyond the global adapter (none for plain averaging).
    def state_dict(self) -> dict:
        return {"kind": type(self).__name__}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != type(self).__name__:
            raise ValueError(f"strategy state is for {state.get('kind')!r}, "
                             f"this run uses {type(self).__name__!r}")


def client_entry(metrics: MetricRecord) -> dict:
    entry = {"id": int(metrics.get(PARTITION_ID, -1)), "num_examples": int(metrics.get(NUM_EXAMPLES, 0))}
    for key, value in metrics.items():
        if key not in (PARTITION_ID, NUM_EXAMPLES):
            entry[key.replace("-", "_")] = value
    return entry
