"""The Flower ClientApp: decode the server's message, run the node's round, encode the reply.

Which data a node holds comes from its node config (in simulation Flower sets
`partition-id` and `num-partitions`; a deployed node may instead name its own
file with `data-file`), the run's configuration from the run config, and the
round (and, with continual learning, the task) from the server's ConfigRecord.
What a round does is `fedcl.client.node`'s; only adapter arrays and numeric
metrics leave the node.
"""

from __future__ import annotations

import fedcl  # noqa: F401  (sets offline defaults before flwr loads)
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcl import keys
from fedcl.client import node
from fedcl.config import Config, from_run_config
from fedcl.continual.schedule import resolve_rounds
from fedcl.federation.messages import arrays_to_state, encode_reply, round_config, state_to_arrays

app = ClientApp()


def _config(context: Context) -> Config:
    return resolve_rounds(from_run_config(dict(context.run_config)))


def _request(msg: Message) -> node.TrainRequest:
    config = round_config(msg)
    importance = msg.content.array_records.get(keys.IMPORTANCE)
    return node.TrainRequest(
        state=arrays_to_state(msg.content.array_records[keys.ARRAYS]),
        server_round=int(config.get(keys.SERVER_ROUND, 0)),
        task=int(config[keys.TASK]) if keys.TASK in config else None,
        task_end=bool(int(config.get(keys.TASK_END, 0))),
        shared_importance=arrays_to_state(importance) if importance is not None else None,
        importance_task=int(config[keys.IMPORTANCE_TASK]) if keys.IMPORTANCE_TASK in config else None)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = _config(context)
    reply = node.train_round(config, dict(context.node_config), _request(msg))
    content = RecordDict()
    if reply.state is not None:
        content[keys.ARRAYS] = encode_reply(reply.state, reply.start, config.strategy.transport)
    content[keys.METRICS] = MetricRecord(reply.metrics)
    if reply.importance is not None:
        content[keys.IMPORTANCE] = state_to_arrays(reply.importance)  # float32: importances can be tiny
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    state = arrays_to_state(msg.content.array_records[keys.ARRAYS])
    metrics = node.evaluate_round(_config(context), dict(context.node_config), state)
    return Message(content=RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=msg)
