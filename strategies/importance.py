"""Federated importance (``continual.federated_importance``): the FedCurv idea on the server.

EWC protects what one client learned about a task; with federated importance
the penalty protects what the whole federation learned. In the last round of
a task (the round's ConfigRecord says ``task-end``) each client sends, next
to its update, its diagonal Fisher importance for the task as a second
ArrayRecord (``importance``). The server checks each against the adapter's
schema, takes the example-weighted mean, and from the next round on sends it
down with the global adapter (``importance`` plus ``importance-task``) until
the next task ends. A client closing that task anchors EWC with this shared
importance instead of its own (continual/node.py).

`FederatedImportance` is an option of the aggregation: a part of
`strategies.strategy.FedclStrategy` present only when the run asks for it.
Flower's aggregation takes exactly one ArrayRecord per reply, so the strategy
takes the importance off a reply before screening and hands it here if the
reply is admitted. Under sample-level DP the clients' importance comes from
the gradients DP-SGD already released (post-processing, no extra privacy
cost); client-level DP would not cover it, so that combination is refused in
`fedcl.config`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from logging import WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.supercore import log

from fedcl import keys
from fedcl.continual.ewc import aggregate_fisher, check_importance
from fedcl.federation.messages import (arrays_to_state, decode_arrays, encode_arrays, reply_metrics,
                                       state_to_arrays)
from fedcl.strategies.screening import number


class FederatedImportance:
    """Collect the clients' task importances, average them, and send the average down."""

    def __init__(self) -> None:
        self.parts: list[tuple[dict, float, int]] = []  # this round's (importance, weight, task)
        self.shared: dict | None = None  # {"task": j, "state": name -> tensor}

    def take(self, msg: Message, record: ArrayRecord, reference: dict[str, torch.Tensor], rec: dict) -> None:
        """Keep an admitted reply's importance `record` (already taken off the reply) if usable."""
        metrics = reply_metrics(msg)
        state = arrays_to_state(record)
        reason = check_importance(state, reference)
        weight = float(number(metrics, keys.NUM_EXAMPLES_MSG))
        if reason is None and not (weight > 0 and math.isfinite(weight)):
            reason = f"importance weight (examples) {weight!r} is not positive"
        if reason is not None:
            rec[keys.IMPORTANCE_REJECTED] = rec.get(keys.IMPORTANCE_REJECTED, 0) + 1
            log(WARNING, "round %d: importance of node %d dropped: %s", rec[keys.ROUND],
                msg.metadata.src_node_id, reason)
            return
        self.parts.append((state, weight, int(number(metrics, keys.TASK, -1))))

    def aggregate(self, rec: dict) -> None:
        """Average the round's importances of the latest task they cover; it becomes the shared one."""
        parts, self.parts = self.parts, []
        if not parts:
            return
        task = max(t for _, _, t in parts)
        latest = [(s, w) for s, w, t in parts if t == task]
        self.shared = {"task": task, "state": aggregate_fisher(latest)}
        rec[keys.IMPORTANCE_CLIENTS] = len(latest)

    def attach(self, contents: Iterable[RecordDict]) -> None:
        """Add the shared importance to each train message content, before its bytes are counted."""
        if self.shared is None:
            return
        for content in contents:
            content[keys.IMPORTANCE] = state_to_arrays(self.shared["state"])
            content.config_records[keys.CONFIG][keys.IMPORTANCE_TASK] = int(self.shared["task"])

    def state_dict(self) -> dict:
        if self.shared is None:
            return {}
        arrays = {n: t.numpy() for n, t in self.shared["state"].items()}
        return {"shared_importance": {"task": self.shared["task"], "arrays": encode_arrays(arrays)}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("shared_importance")
        if saved:
            arrays = decode_arrays(saved["arrays"]) or {}
            self.shared = {"task": int(saved["task"]), "state": OrderedDict(
                (n, torch.from_numpy(np.array(a, dtype=np.float32))) for n, a in arrays.items())}
