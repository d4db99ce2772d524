"""Drive a ServerApp and ClientApp in one process, without Ray.

`InProcessGrid` is a Flower `Grid` whose nodes are ClientApp calls in this
process, each node with its own Context (node config, persistent state), as
the simulation engine would give it. Messages pass through the real apps and
the real strategy; only the transport is replaced. Tests and benchmarks use
it where Ray's start (about 15 s and 1.4 GB) would dominate;
`fedcl.ops.run.run_inprocess` runs fedcl's own apps on it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedcl import keys


def set_task_identity() -> None:
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1


class InProcessGrid(Grid):
    def __init__(self, client_app, num_nodes: int, run_config: dict,
                 intercept: Callable[[int, Message], Message | None] | None = None):
        set_task_identity()
        self.client_app = client_app
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            node: Context(run_id=1, node_id=node, state=RecordDict(), run_config=dict(run_config),
                          node_config={keys.NODE_PARTITION_ID: i, keys.NODE_NUM_PARTITIONS: num_nodes})
            for i, node in enumerate(self.node_ids)
        }
        # intercept(partition_id, reply) may replace a reply (None drops it: a timeout).
        self.intercept = intercept
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._ids = itertools.count()

    def set_run(self, run) -> None:  # pragma: no cover - not used in-process
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            context = self.contexts[node]
            try:
                reply = self.client_app(msg, context)
            except Exception as err:  # the engine turns a ClientApp exception into an error reply
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if self.intercept is not None:
                reply = self.intercept(int(context.node_config[keys.NODE_PARTITION_ID]), reply)
                if reply is None:
                    continue
            self.replies.append(reply)
            replies.append(reply)
        return replies


def server_context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
