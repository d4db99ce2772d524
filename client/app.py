"""The Flower ClientApp: receive the global adapter, train or evaluate, reply.

Which data a node holds comes from its node config: in simulation Flower sets
`partition-id` and `num-partitions`; a deployed node may instead name its own
file with `data-file`. The run's configuration comes from the run config and
the round number from the server's ConfigRecord. Only adapter arrays and
numeric metrics leave the node. With sample-level DP on, the node's privacy
ledger (in its state folder) is checked before training and charged before
the reply leaves; a node past its budget replies without arrays.

With continual learning on, the ConfigRecord's ``task`` says which task the
round trains on; the node trains on its share of it with its method (state in
the node's state folder, see fedcl/continual_session.py), or, holding no
records of the task, replies with metrics only (status "no data for this task").
With ``continual.federated_importance`` the node also sends, in a task's last
round, its importance (an adapter-shaped array of mean squared gradients) and
uses the federation's average when it closes the task (strategies/importance.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

import fedcl  # noqa: F401  (sets offline defaults before flwr loads)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcl import data
from fedcl.config import from_run_config
from fedcl.continual_session import NodeContinual, dp_base_plan, resolve_rounds, task_plan
from fedcl.privacy import STATUS_BUDGET_EXHAUSTED, ClientPrivacy, client_privacy, state_dir_for
from fedcl.session import local_session
from strategies.base import EPSILON, NUM_EXAMPLES, PARTITION_ID, STATUS, STATUS_NO_TASK_DATA, TASK
from strategies.importance import IMPORTANCE, IMPORTANCE_TASK, TASK_END
from strategies.wire import arrays_to_state, encode_reply, state_to_arrays

logger = logging.getLogger("fedcl.client")
app = ClientApp()


def _session(context: Context):
    config = resolve_rounds(from_run_config(dict(context.run_config)))
    node = context.node_config
    data_file = node.get("data-file")
    if data_file:  # a deployed institution's own file
        config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, path=str(data_file), dataset="", test_path=""))
        return local_session(config, int(node.get("partition-id", 0)), 1, share=0)
    return local_session(config, int(node["partition-id"]), int(node["num-partitions"]))


def _file_fingerprint(path: str, data_cfg) -> list[int]:
    """sha256 of the node's file's records (as `fedcl.data.fingerprint`), as 8 words; cached per file state."""
    stat = Path(path).stat()
    return _fingerprint_cached(path, stat.st_mtime_ns, stat.st_size, data_cfg)


@functools.lru_cache(maxsize=4)
def _fingerprint_cached(path: str, mtime_ns: int, size: int, data_cfg) -> list[int]:
    return data.fingerprint_words(data.fingerprint(data.load_records(path, data_cfg)))


def _round(msg: Message) -> int:
    config: ConfigRecord = msg.content.config_records.get("config", ConfigRecord())
    return int(config.get("server-round", 0))


def _task(msg: Message) -> int:
    config: ConfigRecord = msg.content.config_records.get("config", ConfigRecord())
    if TASK not in config:
        raise ValueError("continual learning is on (data.task_column, task_groups or task_files), but the server sent no task index")
    return int(config[TASK])


def _node_continual(session, context: Context) -> NodeContinual:
    node = context.node_config
    state_dir = state_dir_for(session.config, session.client_id, str(node.get("state-dir", "")))
    if node.get("data-file"):  # the node's own file is its whole share
        return NodeContinual(session, state_dir, share=0, num_shares=1)
    return NodeContinual(session, state_dir, share=session.client_id, num_shares=int(node["num-partitions"]))


def _privacy(session, context: Context):
    """The client's DP guard (sample-level DP on), else None."""
    cfg = session.config
    if not (cfg.privacy.enabled and cfg.privacy.mode == "sample"):
        return None
    state_dir = state_dir_for(cfg, session.client_id, str(context.node_config.get("state-dir", "")))
    return client_privacy(cfg, session.client_id, len(session.train_records), state_dir)


def _refusal(msg: Message, session, server_round: int, verdict) -> Message:
    """Budget exhausted: no training, no arrays; metrics say why."""
    logger.warning("client %d | round %d | refused: %s", session.client_id, server_round, verdict.reason)
    print(f"client {session.client_id} | round {server_round} | refused | {verdict.reason}", flush=True)
    metrics = MetricRecord({NUM_EXAMPLES: 0, PARTITION_ID: session.client_id,
                            STATUS: STATUS_BUDGET_EXHAUSTED, EPSILON: verdict.epsilon,
                            "epsilon-next": verdict.epsilon_after})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def _no_task_data(msg: Message, session, server_round: int, task: int) -> Message:
    print(f"client {session.client_id} | round {server_round} | task {task} | no records, skipped", flush=True)
    metrics = MetricRecord({NUM_EXAMPLES: 0, PARTITION_ID: session.client_id, STATUS: STATUS_NO_TASK_DATA,
                            TASK: task})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def _train_continual(msg: Message, context: Context, session, server_round: int, state: dict):
    """One continual round -> (reply, or None and (new_state, result, guard, records, extra metrics))."""
    task = _task(msg)
    node = _node_continual(session, context)
    records = node.records(task)
    if not records:
        return _no_task_data(msg, session, server_round, task), None
    dp_on = session.config.privacy.enabled and session.config.privacy.mode == "sample"
    config: ConfigRecord = msg.content.config_records.get("config", ConfigRecord())
    shared = session.config.continual.federated_importance
    if shared and IMPORTANCE in msg.content.array_records:  # the federation's importance of a past task
        node.receive_importance(int(config[IMPORTANCE_TASK]), arrays_to_state(msg.content.array_records[IMPORTANCE]))
    node.begin(state, task, dp=dp_on)
    guard, pool = None, None
    if dp_on:
        pool = node.dp_pool(task)
        plan = task_plan(dp_base_plan(session.config, node.shares), len(pool), session.config.train.batch_size)
        guard = ClientPrivacy(plan, node.state_dir)
        verdict = guard.check()
        if not verdict.allowed:
            return _refusal(msg, session, server_round, verdict), None
    new_state, result = node.train(state, server_round, task, pool=pool,
                                   dp_plan=guard.plan if guard else None)
    # The task's last round: this node's importance travels up with its update.
    importance = node.local_importance(task, dp_on) if shared and int(config.get(TASK_END, 0)) else None
    return None, (new_state, result, guard, len(records), {TASK: task, "train-pool": len(pool or records)},
                  importance)


@app.train()
def train(msg: Message, context: Context) -> Message:
    session = _session(context)
    server_round = _round(msg)
    state = arrays_to_state(msg.content.array_records["arrays"])
    extra, importance = {}, None
    if session.config.continual_on:
        reply, trained = _train_continual(msg, context, session, server_round, state)
        if reply is not None:
            return reply
        new_state, result, guard, num_examples, extra, importance = trained
    else:
        guard = _privacy(session, context)
        if guard is not None:
            verdict = guard.check()
            if not verdict.allowed:
                return _refusal(msg, session, server_round, verdict)
        new_state, result = session.train(state, server_round, dp_plan=guard.plan if guard else None)
        num_examples = len(session.train_records)
    dp = {}
    if guard is not None:  # charged before the reply leaves the node
        eps = guard.charge(run=session.config.run.out_dir, server_round=server_round, steps=result.steps)
        dp = {EPSILON: eps, "noise-multiplier": guard.plan.noise_multiplier,
              "sample-rate": guard.plan.sample_rate}
    eps_text = f" | eps {dp[EPSILON]:.2f}" if dp else ""
    logger.info("client %d | round %d | loss %.4f | steps %d | %.1f s%s", session.client_id,
                server_round, result.loss, result.steps, result.seconds, eps_text)
    print(f"client {session.client_id} | round {server_round} | loss {result.loss:.4f} "
          f"| steps {result.steps} | {result.seconds:.1f} s{eps_text}", flush=True)
    data_file = context.node_config.get("data-file")
    if data_file:  # a deployed node: which data trained this update, as a hash (continual/update.py)
        extra = {**extra, "data-sha256": _file_fingerprint(str(data_file), session.config.data)}
    metrics = MetricRecord({
        NUM_EXAMPLES: num_examples, PARTITION_ID: session.client_id, **extra,
        "train-loss": result.loss, "train-steps": result.steps,
        "train-examples": result.examples, "train-tokens": result.tokens,
        "train-seconds": result.seconds, **dp,
    })
    arrays = encode_reply(new_state, session.update_start(state), session.config.strategy.transport)
    content = RecordDict({"arrays": arrays, "metrics": metrics})
    if importance is not None:
        content[IMPORTANCE] = state_to_arrays(importance)  # float32: importances can be tiny
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    session = _session(context)
    state = arrays_to_state(msg.content.array_records["arrays"])
    started = time.perf_counter()
    result = session.evaluate(state)
    result["eval_seconds"] = time.perf_counter() - started
    figures = {k.replace("_", "-") if k == "eval_seconds" else k: float(v) for k, v in result.items()
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
