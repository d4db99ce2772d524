"""Federated importance (``continual.federated_importance``): the FedCurv idea on the server.

EWC protects what one client learned about a task; with federated importance
the penalty protects what the whole federation learned. In the last round of
a task (the round's ConfigRecord says ``task-end``) each client sends, next
to its update, its diagonal Fisher importance for the task as a second
ArrayRecord (``importance``). The server checks each against the adapter's
schema, takes the example-weighted mean, and from the next round on sends it
down with the global adapter (``importance`` plus ``importance-task``) until
the next task ends. A client closing that task anchors EWC with this shared
importance instead of its own (fedcl/continual_session.py).

Flower's aggregation takes exactly one ArrayRecord per reply, so the
importance is taken off a reply before Flower sees it. Under sample-level DP
the clients' importance comes from the gradients DP-SGD already released
(post-processing, no extra privacy cost); client-level DP would not cover it,
so that combination is refused in `fedcl.config`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from logging import WARNING

import numpy as np
import torch
from flwr.app import Message, MetricRecord
from flwr.supercore import log

from continual.ewc import check_importance
from strategies.base import NUM_EXAMPLES, TASK
from strategies.wire import arrays_to_state, state_to_arrays

IMPORTANCE = "importance"
IMPORTANCE_TASK = "importance-task"
TASK_END = "task-end"


class FederatedImportance:
    """Mixin for `strategies.lora.LoraStrategy`: collect, average and broadcast task importances."""

    def setup_importance(self, enabled: bool) -> None:
        self.importance_on = enabled
        self.importance_parts: list[tuple[dict, float, int]] = []
        self.shared_importance: dict | None = None  # {"task": j, "state": name -> tensor}

    def take_importance(self, msg: Message, record, reference: dict[str, torch.Tensor], rec: dict) -> None:
        """Keep an accepted reply's importance `record` (already taken off the reply) if usable."""
        if not self.importance_on:
            return
        metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
        state = arrays_to_state(record)
        reason = check_importance(state, reference)
        weight = float(metrics.get(NUM_EXAMPLES, 0))
        if reason is None and not (weight > 0 and math.isfinite(weight)):
            reason = f"importance weight (examples) {weight!r} is not positive"
        if reason is not None:
            rec["importance_rejected"] = rec.get("importance_rejected", 0) + 1
            log(WARNING, "round %d: importance of node %d dropped: %s", rec["round"],
                msg.metadata.src_node_id, reason)
            return
        self.importance_parts.append((state, weight, int(metrics.get(TASK, -1))))

    def aggregate_importance(self, rec: dict) -> None:
        parts, self.importance_parts = self.importance_parts, []
        if not parts:
            return
        from continual.ewc import aggregate_fisher

        task = max(t for _, _, t in parts)
        parts = [(s, w) for s, w, t in parts if t == task]
        self.shared_importance = {"task": task, "state": aggregate_fisher(parts)}
        rec["importance_clients"] = len(parts)

    def attach_importance(self, contents, configrecord_key: str) -> None:
        """Add the shared importance to each (train) message content, before its bytes are counted."""
        if not self.importance_on or self.shared_importance is None:
            return
        for content in contents:
            content[IMPORTANCE] = state_to_arrays(self.shared_importance["state"])
            content.config_records[configrecord_key][IMPORTANCE_TASK] = int(self.shared_importance["task"])

    def importance_state(self) -> dict:
        from strategies.lora import encode_arrays

        if self.shared_importance is None:
            return {}
        arrays = {n: t.numpy() for n, t in self.shared_importance["state"].items()}
        return {"shared_importance": {"task": self.shared_importance["task"], "arrays": encode_arrays(arrays)}}

    def load_importance_state(self, state: dict) -> None:
        from strategies.lora import decode_arrays

        saved = state.get("shared_importance")
        if saved:
            arrays = decode_arrays(saved["arrays"])
            self.shared_importance = {"task": int(saved["task"]), "state": OrderedDict(
                (n, torch.from_numpy(np.array(a, dtype=np.float32))) for n, a in arrays.items())}
