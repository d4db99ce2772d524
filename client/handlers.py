"""What a ClientApp message does, content in and content out: decode the server's
arrays and round config, run the node's round (`fedcl.client.node`), encode the reply.

`fedcl.client.app` calls these in its own process; a deployed node's worker
(`fedcl.client.worker`) calls the same ones with the model kept loaded, so a
reply is the same whichever process made it. This module imports torch.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedcl import keys
from fedcl.client import node
from fedcl.config import Config, from_run_config
from fedcl.continual.schedule import resolve_rounds
from fedcl.federation.messages import arrays_to_state, encode_reply, state_to_arrays


def _config(run_config: dict) -> Config:
    return resolve_rounds(from_run_config(run_config))


def _request(content: RecordDict, message_id: str) -> node.TrainRequest:
    config = content.config_records.get(keys.CONFIG, ConfigRecord())  # as messages.round_config
    importance = content.array_records.get(keys.IMPORTANCE)
    return node.TrainRequest(
        state=arrays_to_state(content.array_records[keys.ARRAYS]),
        server_round=int(config.get(keys.SERVER_ROUND, 0)),
        task=int(config[keys.TASK]) if keys.TASK in config else None,
        task_end=bool(int(config.get(keys.TASK_END, 0))),
        shared_importance=arrays_to_state(importance) if importance is not None else None,
        importance_task=int(config[keys.IMPORTANCE_TASK]) if keys.IMPORTANCE_TASK in config else None,
        message_id=message_id)


def train_content(content: RecordDict, run_config: dict, node_config: dict, message_id: str = "") -> RecordDict:
    """A train message's content in, the reply's content out."""
    config = _config(run_config)
    reply = node.train_round(config, node_config, _request(content, message_id))
    out = RecordDict()
    if reply.state is not None:
        out[keys.ARRAYS] = encode_reply(reply.state, reply.start, config.strategy.transport)
    out[keys.METRICS] = MetricRecord(reply.metrics)
    if reply.importance is not None:
        out[keys.IMPORTANCE] = state_to_arrays(reply.importance)  # float32: importances can be tiny
    return out


def evaluate_content(content: RecordDict, run_config: dict, node_config: dict, message_id: str = "") -> RecordDict:
    """An evaluate message's content in, the reply's metrics out."""
    state = arrays_to_state(content.array_records[keys.ARRAYS])
    metrics = node.evaluate_round(_config(run_config), node_config, state)
    return RecordDict({keys.METRICS: MetricRecord(metrics)})


HANDLERS = {"train": train_content, "evaluate": evaluate_content}
