"""The Flower ClientApp: receive the global adapter, train or evaluate, reply.

Which data a node holds comes from its node config: in simulation Flower sets
`partition-id` and `num-partitions`; a deployed node may instead name its own
file with `data-file`. The run's configuration comes from the run config and
the round number from the server's ConfigRecord. Only adapter arrays and
numeric metrics leave the node.
"""

from __future__ import annotations

import dataclasses
import logging

import fedcl  # noqa: F401  (sets offline defaults before flwr loads)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcl.config import from_run_config
from fedcl.session import local_session
from strategies.base import NUM_EXAMPLES, PARTITION_ID
from strategies.wire import arrays_to_state, state_to_arrays

logger = logging.getLogger("fedcl.client")
app = ClientApp()


def _session(context: Context):
    config = from_run_config(dict(context.run_config))
    node = context.node_config
    data_file = node.get("data-file")
    if data_file:  # a deployed institution's own file
        config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, path=str(data_file), dataset=""))
        return local_session(config, int(node.get("partition-id", 0)), 1)
    return local_session(config, int(node["partition-id"]), int(node["num-partitions"]))


def _round(msg: Message) -> int:
    config: ConfigRecord = msg.content.config_records.get("config", ConfigRecord())
    return int(config.get("server-round", 0))


@app.train()
def train(msg: Message, context: Context) -> Message:
    session = _session(context)
    server_round = _round(msg)
    state = arrays_to_state(msg.content.array_records["arrays"])
    new_state, result = session.train(state, server_round)
    logger.info("client %d | round %d | loss %.4f | steps %d | %.1f s", session.client_id,
                server_round, result.loss, result.steps, result.seconds)
    print(f"client {session.client_id} | round {server_round} | loss {result.loss:.4f} "
          f"| steps {result.steps} | {result.seconds:.1f} s", flush=True)
    metrics = MetricRecord({
        NUM_EXAMPLES: len(session.train_records), PARTITION_ID: session.client_id,
        "train-loss": result.loss, "train-steps": result.steps,
        "train-examples": result.examples, "train-tokens": result.tokens,
        "train-seconds": result.seconds,
    })
    content = RecordDict({"arrays": state_to_arrays(new_state), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    session = _session(context)
    state = arrays_to_state(msg.content.array_records["arrays"])
    result = session.evaluate(state)
    figures = {k: float(v) for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "num_examples"}
    metrics = MetricRecord({**figures, NUM_EXAMPLES: len(session.eval_records),
                            PARTITION_ID: session.client_id})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def with_run_config(run_config: dict) -> ClientApp:
    """A ClientApp for the in-process simulation, carrying the run config itself.

    `flwr run` fills `context.run_config` from pyproject; the Python simulation
    entry point leaves it empty, so this wrapper supplies it to every call.
    """
    wrapped = ClientApp()
    frozen = dict(run_config)

    def with_config(context: Context) -> Context:
        # Context.run_config is read-only once set; the node's state record is
        # passed through by reference so that what a handler stores persists.
        return Context(run_id=context.run_id, node_id=context.node_id,
                       node_config=context.node_config, state=context.state, run_config=frozen)

    @wrapped.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, with_config(context))

    @wrapped.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(msg, with_config(context))

    return wrapped
