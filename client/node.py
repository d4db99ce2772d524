"""What a node does with each message: one function per message kind, in plain PyTorch.

The ClientApp (`fedcl.client.app`) decodes a message into a `TrainRequest`
(or an adapter state for evaluation), calls `train_round` or `evaluate_round`
here, and encodes what comes back. Everything a round decides lives here:

- which data the node holds: its node config's ``data-file`` (a deployed
  institution's own file, all of it its share) or, in simulation, share
  ``partition-id`` of ``num-partitions``;
- where it computes: ``model.device``, or its node config's ``device``;
- sample-level DP: the node's privacy ledger (in its state folder) is checked
  before training and charged before the reply leaves; a node past its budget
  trains nothing and says why;
- continual learning: the round's task, the node's method and its state
  folder (`fedcl.continual.node`), the shared importance received from the
  server and, in a task's last round, the node's own importance sent back.

Nothing here imports Flower: a `TrainReply` carries plain tensors and
figures named by `fedcl.keys`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedcl import data, frozen, keys
from fedcl.config import Config
from fedcl.continual.node import NodeContinual, dp_base_plan, task_plan
from fedcl.privacy import ClientPrivacy, client_privacy, state_dir_for
from fedcl.session import LocalSession, local_session

logger = logging.getLogger("fedcl.client")


@dataclass(frozen=True)
class TrainRequest:
    """One round's training order from the server, decoded."""

    state: dict[str, torch.Tensor]  # the global adapter
    server_round: int
    task: int | None = None  # continual: the round's task; None when continual learning is off
    task_end: bool = False  # continual: the task's last round (send the node's importance)
    shared_importance: dict[str, torch.Tensor] | None = None  # the federation's importance of a past task
    importance_task: int | None = None  # which task `shared_importance` belongs to
    message_id: str = ""  # Flower's message id: a message re-sent after a dead worker is charged once


@dataclass
class TrainReply:
    """What leaves the node: metrics always; the trained state (and where it started) when it trained."""

    metrics: dict
    state: dict[str, torch.Tensor] | None = None
    start: dict[str, torch.Tensor] | None = None  # what the update is measured against
    importance: dict[str, torch.Tensor] | None = field(default=None)


def node_config_overrides(config: Config, node_config: dict) -> Config:
    """`config` with what the node config says of this node alone: its ``device`` (model.device)."""
    device = node_config.get(keys.NODE_DEVICE)
    if device:  # e.g. flower-supernode --node-config "device='cuda:1'"
        config = config.replace({"model.device": str(device)}, source=f"node config {keys.NODE_DEVICE}")
    return config


def node_session(config: Config, node_config: dict) -> LocalSession:
    """The node's session: its model (on its device), task and share of the data."""
    config = node_config_overrides(config, node_config)
    data_file = node_config.get(keys.NODE_DATA_FILE)
    if data_file:  # a deployed institution's own file
        config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, path=str(data_file), dataset="", test_path=""))
        return local_session(config, int(node_config.get(keys.NODE_PARTITION_ID, 0)), 1, share=0)
    return local_session(config, int(node_config[keys.NODE_PARTITION_ID]),
                         int(node_config[keys.NODE_NUM_PARTITIONS]))


def _dp_on(config: Config) -> bool:
    return config.privacy.enabled and config.privacy.mode == "sample"


def _state_dir(session: LocalSession, node_config: dict) -> Path:
    return state_dir_for(session.config, session.client_id, str(node_config.get(keys.NODE_STATE_DIR, "")))


def _frozen_file(session: LocalSession, node_config: dict):
    """The frozen-layer body to keep in the node's state folder, attached; None when not asked for.

    `lora.frozen_cache = "file"` with `lora.top_layers`: the node's records'
    bottom states are read from and written to its own state folder, which
    needs a state folder of the node's (node config `state-dir` or run.state_dir).
    """
    body = getattr(session.shared.task, "body", None)
    if session.config.lora.frozen_cache != "file" or not isinstance(body, frozen.FrozenBottom):
        return None
    if not (node_config.get(keys.NODE_STATE_DIR) or session.config.run.state_dir):
        logger.warning("client %d: lora.frozen_cache = 'file' needs the node's state folder "
                       "(--state-dir or node config state-dir); keeping the states in memory only",
                       session.client_id)
        return None
    body.attach(_state_dir(session, node_config))
    return body


def _refusal(session: LocalSession, server_round: int, verdict) -> TrainReply:
    """Budget exhausted: no training, no arrays; metrics say why."""
    logger.warning("client %d | round %d | refused: %s", session.client_id, server_round, verdict.reason)
    print(f"client {session.client_id} | round {server_round} | refused | {verdict.reason}", flush=True)
    return TrainReply({keys.NUM_EXAMPLES_MSG: 0, keys.PARTITION_ID: session.client_id,
                       keys.STATUS: keys.STATUS_BUDGET_EXHAUSTED, keys.EPSILON: verdict.epsilon,
                       keys.RUN_EPSILON: verdict.run_epsilon, keys.EPSILON_NEXT: verdict.epsilon_after})


def _no_task_data(session: LocalSession, server_round: int, task: int) -> TrainReply:
    print(f"client {session.client_id} | round {server_round} | task {task} | no records, skipped", flush=True)
    return TrainReply({keys.NUM_EXAMPLES_MSG: 0, keys.PARTITION_ID: session.client_id,
                       keys.STATUS: keys.STATUS_NO_TASK_DATA, keys.TASK: task})


@dataclass
class _Trained:
    """A round's training outcome, whichever path produced it."""

    state: dict
    result: object  # fedcl.train.TrainResult
    guard: ClientPrivacy | None
    num_examples: int
    extra: dict
    importance: dict | None = None


def _train_plain(session: LocalSession, node_config: dict, request: TrainRequest) -> _Trained | TrainReply:
    guard = None
    if _dp_on(session.config):
        guard = client_privacy(session.config, session.client_id, len(session.train_records),
                               _state_dir(session, node_config))
        verdict = guard.check(message=request.message_id, run=session.config.run.out_dir)
        if not verdict.allowed:
            return _refusal(session, request.server_round, verdict)
    state, result = session.train(request.state, request.server_round, dp_plan=guard.plan if guard else None)
    return _Trained(state, result, guard, len(session.train_records), {})


def _train_continual(session: LocalSession, node_config: dict, request: TrainRequest) -> _Trained | TrainReply:
    if request.task is None:
        raise ValueError("continual learning is on (data.task_column, task_groups or task_files), "
                         "but the server sent no task index")
    task, cfg = request.task, session.config
    state_dir = _state_dir(session, node_config)
    if node_config.get(keys.NODE_DATA_FILE):  # the node's own file is its whole share
        node = NodeContinual(session, state_dir, share=0, num_shares=1)
    else:
        node = NodeContinual(session, state_dir, share=session.client_id,
                             num_shares=int(node_config[keys.NODE_NUM_PARTITIONS]))
    records = node.records(task)
    if not records:
        return _no_task_data(session, request.server_round, task)
    dp_on, shared = _dp_on(cfg), cfg.continual.federated_importance
    if shared and request.shared_importance is not None:
        node.receive_importance(int(request.importance_task), request.shared_importance)
    node.begin(request.state, task, dp=dp_on)
    guard, pool = None, None
    if dp_on:
        pool = node.dp_pool(task)
        guard = ClientPrivacy(task_plan(dp_base_plan(cfg, node.shares), len(pool), cfg.train.batch_size),
                              node.state_dir)
        verdict = guard.check(message=request.message_id, run=session.config.run.out_dir)
        if not verdict.allowed:
            return _refusal(session, request.server_round, verdict)
    state, result = node.train(request.state, request.server_round, task, pool=pool,
                               dp_plan=guard.plan if guard else None)
    # The task's last round: this node's importance travels up with its update.
    importance = node.local_importance(task, dp_on) if shared and request.task_end else None
    return _Trained(state, result, guard, len(records),
                    {keys.TASK: task, keys.TRAIN_POOL: len(pool or records)}, importance)


def train_round(config: Config, node_config: dict, request: TrainRequest) -> TrainReply:
    """Train one round from the server's global adapter; charge the ledger before replying."""
    session = node_session(config, node_config)
    trainer = _train_continual if session.config.continual_on else _train_plain
    cache = _frozen_file(session, node_config)
    trained = trainer(session, node_config, request)
    if cache is not None:
        cache.flush()
    if isinstance(trained, TrainReply):  # refused, or nothing to train on
        return trained
    result, guard = trained.result, trained.guard
    dp = {}
    if guard is not None:  # charged before the reply leaves the node
        eps = guard.charge(run=session.config.run.out_dir, server_round=request.server_round, steps=result.steps,
                           message=request.message_id)
        dp = {keys.EPSILON: eps, keys.RUN_EPSILON: guard.run_epsilon(session.config.run.out_dir),
              keys.NOISE_MULTIPLIER: guard.plan.noise_multiplier,
              keys.SAMPLE_RATE: guard.plan.sample_rate}
    eps_text = f" | eps {dp[keys.EPSILON]:.2f}" if dp else ""
    logger.info("client %d | round %d | loss %.4f | steps %d | %.1f s%s", session.client_id,
                request.server_round, result.loss, result.steps, result.seconds, eps_text)
    print(f"client {session.client_id} | round {request.server_round} | loss {result.loss:.4f} "
          f"| steps {result.steps} | {result.seconds:.1f} s{eps_text}", flush=True)
    extra = trained.extra
    data_file = node_config.get(keys.NODE_DATA_FILE)
    if data_file:  # a deployed node: which data trained this update, as a hash (fedcl.ops.update)
        extra = {**extra, keys.DATA_SHA256: _file_fingerprint(str(data_file), session.config.data)}
    metrics = {
        keys.NUM_EXAMPLES_MSG: trained.num_examples, keys.PARTITION_ID: session.client_id, **extra,
        keys.TRAIN_LOSS: result.loss, keys.TRAIN_STEPS: result.steps,
        keys.TRAIN_EXAMPLES: result.examples, keys.TRAIN_TOKENS: result.tokens,
        keys.TRAIN_SECONDS: result.seconds, **dp,
    }
    return TrainReply(metrics, trained.state, session.update_start(request.state), trained.importance)


def evaluate_round(config: Config, node_config: dict, state: dict) -> dict:
    """The global `state` scored on the node's own held-out records, as reply metrics."""
    session = node_session(config, node_config)
    started = time.perf_counter()
    cache = _frozen_file(session, node_config)
    report = session.evaluate(state)
    if cache is not None:
        cache.flush()
    report["eval_seconds"] = time.perf_counter() - started
    return {**keys.report_to_reply(report), keys.NUM_EXAMPLES_MSG: len(session.eval_records),
            keys.PARTITION_ID: session.client_id}


def _file_fingerprint(path: str, data_cfg) -> list[int]:
    """sha256 of the node's file's records (as `fedcl.data.fingerprint`), as 8 words; cached per file state."""
    stat = Path(path).stat()
    return _fingerprint_cached(path, stat.st_mtime_ns, stat.st_size, data_cfg)


@functools.lru_cache(maxsize=4)
def _fingerprint_cached(path: str, mtime_ns: int, size: int, data_cfg) -> list[int]:
    return data.fingerprint_words(data.fingerprint(data.load_records(path, data_cfg)))
