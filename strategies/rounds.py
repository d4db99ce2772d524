"""Round bookkeeping of a fedcl strategy: run round numbers, sampling, per-round records.

`RoundBook` is one part of `strategies.strategy.FedclStrategy`. It

- numbers rounds from where a resumed run left off (Flower's loop always
  counts from 1; `round_offset` maps its count onto the run's),
- samples clients reproducibly from the run seed and the run round,
- keeps one record per run round (``records``, which the ServerApp pops after
  its evaluation): the bytes the messages carried each way, every client's
  reply (its entry names the partition id it reported and its node id), and
  the failures, rejections (train and evaluation), refusals and idle clients,
- stamps every round's ConfigRecord with the run round and the extra entries
  of `set_round_config` (e.g. the continual task).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import Message
from flwr.supercore import log

from fedcl import keys
from fedcl.federation.messages import message_bytes, reply_metrics
from fedcl.strategies.screening import check_metrics, client_label, number, whole


class RoundBook:
    """Round numbers, client sampling and the records of the rounds not yet committed."""

    def __init__(self, *, seed: int, clients_per_round: int, round_offset: int = 0,
                 min_replies: int = 1) -> None:
        self.seed = seed
        self.clients_per_round = clients_per_round  # 0: every connected node
        self.round_offset = round_offset
        self.min_replies = min_replies
        self.records: dict[int, dict] = {}
        self.round_config: Callable[[int], dict] | None = None

    def run_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    def record(self, server_round: int) -> dict:
        """The record of Flower's round `server_round`, opened on first use."""
        run_round = self.run_round(server_round)
        return self.records.setdefault(run_round, {
            keys.ROUND: run_round, keys.BYTES_DOWN: 0, keys.BYTES_UP: 0, keys.CLIENTS: [],
            keys.FAILURES: 0, keys.REJECTED: 0, keys.REFUSED: 0, keys.IDLE: 0,
        })

    def sample(self, node_ids: Iterable[int], server_round: int) -> list[int]:
        """The nodes that train this round: drawn from the run seed and the run round."""
        nodes = sorted(node_ids)
        k = self.clients_per_round or len(nodes)
        if k >= len(nodes):
            return nodes
        rng = random.Random(f"sample/{self.seed}/{self.run_round(server_round)}")
        return sorted(rng.sample(nodes, k))

    def stamp(self, messages: list[Message], server_round: int) -> None:
        """Write the run round and the round's extra config entries into each message's ConfigRecord."""
        run_round = self.run_round(server_round)
        extra = self.round_config(run_round) if self.round_config is not None else {}
        for m in messages:
            record = m.content.config_records[keys.CONFIG]
            record[keys.SERVER_ROUND] = run_round
            for key, value in extra.items():
                record[key] = value

    def round_task(self, server_round: int) -> int | None:
        """The continual task the round's ConfigRecord names (None without one)."""
        extra = self.round_config(self.run_round(server_round)) if self.round_config is not None else {}
        return None if keys.TASK not in extra else int(extra[keys.TASK])

    def take_replies(self, rec: dict, replies: Iterable[Message]) -> list[tuple[Message, dict]]:
        """Count bytes, failures, rejected metrics, refusals and idle clients and record each
        client; return the replies that carry arrays, each with its client entry (for screening
        to annotate)."""
        with_arrays = []
        for msg in replies:
            if msg.has_error():
                rec[keys.FAILURES] += 1
                log(WARNING, "round %d: node %d failed: %s", rec[keys.ROUND],
                    msg.metadata.src_node_id, msg.error.reason)
                continue
            rec[keys.BYTES_UP] += content_bytes(msg)
            reason = check_metrics(msg.content.metric_records)
            entry = client_entry(msg, valid=reason is None)
            rec[keys.CLIENTS].append(entry)
            if reason is not None:
                self.reject(rec, entry, client_label(msg), reason)
                continue
            metrics = reply_metrics(msg)
            status = int(number(metrics, keys.STATUS, keys.STATUS_OK))
            if keys.ARRAYS in msg.content.array_records:
                with_arrays.append((msg, entry))
            elif status == keys.STATUS_NO_TASK_DATA:
                rec[keys.IDLE] += 1
            elif status != keys.STATUS_OK:
                rec[keys.REFUSED] += 1
                log(WARNING, "round %d: client %d refused to train (status %d, epsilon %.3f)",
                    rec[keys.ROUND], int(number(metrics, keys.PARTITION_ID, -1)), status,
                    number(metrics, keys.EPSILON, float("nan")))
        rec[keys.CLIENTS].sort(key=lambda c: (c[keys.CLIENT_ID], c[keys.CLIENT_NODE_ID]))
        return with_arrays

    def reject(self, rec: dict, entry: dict, client: str, reason: str) -> None:
        """Count a reply that failed screening, and say why in its client entry."""
        rec[keys.REJECTED] += 1
        entry[keys.CLIENT_REJECTED] = reason
        log(WARNING, "round %d: reply of client %s rejected: %s", rec[keys.ROUND], client, reason)

    def enough(self, rec: dict, usable: list[Message]) -> bool:
        """Whether the round has the `min_replies` usable replies it needs to aggregate."""
        if len(usable) < self.min_replies:
            log(WARNING, "round %d: %d usable replies, fewer than federation.min_replies=%d; "
                "the global adapter is left unchanged", rec[keys.ROUND], len(usable), self.min_replies)
            return False
        log(INFO, "round %d: aggregating %d replies", rec[keys.ROUND], len(usable))
        return True

    def reject_evaluation(self, rec: dict, msg: Message, reason: str) -> None:
        """Count an evaluation reply left out of the federated evaluation, and say why."""
        rec[keys.REJECTED_EVAL] = rec.get(keys.REJECTED_EVAL, 0) + 1
        entry = client_entry(msg, valid=False)
        entry[keys.CLIENT_REJECTED] = reason
        rec.setdefault(keys.REJECTED_EVAL_CLIENTS, []).append(entry)
        log(WARNING, "round %d: evaluation reply of client %s rejected: %s", rec[keys.ROUND],
            client_label(msg), reason)

    def note_evaluation(self, rec: dict, replies: list[Message], admitted: list[Message]) -> None:
        """Bytes the evaluation replies carried, how many were rejected, and the slowest
        admitted client's evaluation time."""
        rec[keys.BYTES_UP_EVAL] = sum(content_bytes(r) for r in replies)
        rec.setdefault(keys.REJECTED_EVAL, 0)
        seconds = [float(number(reply_metrics(r), keys.EVAL_SECONDS)) for r in admitted]
        rec[keys.CLIENT_EVAL_SECONDS_MAX] = max(seconds, default=0.0)


def content_bytes(msg: Message) -> int:
    """What a reply carried; 0 for one Flower could not have sent (a value its records refuse)."""
    try:
        return message_bytes(msg.content)
    except TypeError:  # e.g. a string written past MetricRecord's type check
        return 0


def client_entry(msg: Message, *, valid: bool) -> dict:
    """A reply's entry under a round's ``clients``: the partition id it reported, its node id,
    its example count, then (`valid`: it passed `check_metrics`) the rest of its metrics."""
    node = msg.metadata.src_node_id
    metrics = reply_metrics(msg)
    if valid:
        entry = keys.reply_to_record(dict(metrics))
        return {keys.CLIENT_ID: entry.pop(keys.CLIENT_ID), keys.CLIENT_NODE_ID: node, **entry}
    # What it reported cannot be trusted to be JSON or a number: only usable identities.
    partition, examples = metrics.get(keys.PARTITION_ID), metrics.get(keys.NUM_EXAMPLES_MSG)
    return {keys.CLIENT_ID: int(partition) if whole(partition) else -1, keys.CLIENT_NODE_ID: node,
            keys.NUM_EXAMPLES: int(examples) if whole(examples) else 0}


def bytes_sent(messages: list[Message]) -> int:
    """What `messages` carry, each counted in full even where Flower shares one content."""
    return sum(message_bytes(m.content) for m in messages)
