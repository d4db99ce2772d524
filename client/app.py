"""The Flower ClientApp: decode the server's message, run the node's round, encode the reply.

Which data a node holds comes from its node config (in simulation Flower sets
`partition-id` and `num-partitions`; a deployed node may instead name its own
file with `data-file`, and its device with `device`, overriding model.device),
the run's configuration from the run config, and the
round (and, with continual learning, the task) from the server's ConfigRecord.
What a round does is `fedcl.client.node`'s; only adapter arrays and numeric
metrics leave the node.

A deployed node whose node config names a `worker` socket has its long-lived
worker (`fedcl.client.worker`) handle the message, with the model kept loaded;
this module then imports no torch, so the per-message process Flower starts
stays small. What either side runs is `fedcl.client.handlers`.
"""

from __future__ import annotations

import fedcl  # noqa: F401  (sets offline defaults before flwr loads)
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcl import keys
from fedcl.client import worker
from fedcl.federation import packing

app = ClientApp()


def _handle(kind: str, msg: Message, context: Context) -> Message:
    """The reply to `msg`, packed as `msg` was (a deployed server packs each record's
    arrays into one, `fedcl.federation.packing`; the simulation engine does not)."""
    packed = packing.is_packed(msg.content)
    content = packing.unpack(msg.content) if packed else msg.content
    reply = _reply(kind, msg, content, context)
    return Message(content=packing.pack(reply), reply_to=msg) if packed else Message(content=reply, reply_to=msg)


def _reply(kind: str, msg: Message, content, context: Context):
    run_config, node_config = dict(context.run_config), dict(context.node_config)
    message_id = msg.metadata.message_id
    socket_file = node_config.get(keys.NODE_WORKER)
    if socket_file:  # the node's worker, model kept loaded; the same bytes the ClientApp got
        from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
        from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

        body = worker.forward(socket_file, kind, recorddict_to_proto(content).SerializeToString(),
                              run_config=run_config, node_config=node_config,
                              run_id=msg.metadata.run_id, message_id=message_id)
        if body is not None:
            return recorddict_from_proto(ProtoRecordDict.FromString(body))
    # torch and the model: only when this process does the work itself
    from fedcl.client.handlers import HANDLERS

    return HANDLERS[kind](content, run_config, node_config, message_id)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle("evaluate", msg, context)
