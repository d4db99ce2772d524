"""One node's side of continual learning: its share of every task, its method, its state folder.

`NodeContinual` holds a node's share of each task (`fedcl.continual.streams.client_share`),
its method (replay buffer, EWC importances; `fedcl.continual.catalog`) kept in
the node's state folder, and one round of training on the current task, plain
or DP-SGD. Replayed records never leave the node.

A task is closed on the node lazily, at the first round of a later task in
which the node trains: `after_task` then sees the *global* adapter after the
task as its anchor (a model the federation already released). Under DP the
Fisher comes from the squared gradients DP-SGD released while training the
task (`GradSquareAccumulator`), never from another pass over the raw data; the
raw (noise-inclusive) mean is kept, whose constant noise floor acts as a plain
L2 pull towards the anchor. Replay under DP trains on ``share + replayed``
as one Poisson-sampled pool; the noise is calibrated once for the whole run at
the highest sample rate any task can have (batch / smallest task share), so
every task's actual, lower rate costs less than planned (`dp_base_plan`,
`task_plan`). Nothing here imports Flower.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from fedcl import adapters
from fedcl.atomic import write_bytes
from fedcl.config import Config, ConfigError
from fedcl.continual.catalog import make_method
from fedcl.continual.ewc import GradSquareAccumulator, check_importance, compute_fisher, fisher_from_grads, trainable
from fedcl.continual.methods import Method
from fedcl.continual.replay import replay_count, replay_pool
from fedcl.continual.schedule import build_stream
from fedcl.continual.state import check_state
from fedcl.continual.streams import Task, client_share
from fedcl.privacy.accounting import sample_plan
from fedcl.regularizers import proximal_term
from fedcl.session import round_seed
from fedcl.train import train_local

logger = logging.getLogger("fedcl.continual")

STATE_FILE = "continual.json"
ACCUMULATOR_FILE = "dp-grad-squares.safetensors"
SHARED_IMPORTANCE_FILE = "federated-importance.safetensors"
ACCUMULATOR_KIND = "fedcl.continual.grad_squares"
SHARED_IMPORTANCE_KIND = "fedcl.continual.shared_importance"
KIND = "fedcl.continual.node"
VERSION = 1


def node_seed(seed: int, client_id: int) -> int:
    return (seed * 1_000_003 + 7919 * (client_id + 1)) & 0xFFFF_FFFF


class NodeContinual:
    """One node's continual state and training; `session` is its `fedcl.session.LocalSession`."""

    def __init__(self, session, state_dir: str | Path, *, share: int, num_shares: int):
        self.session, self.config = session, session.config
        self.state_dir = Path(state_dir)
        stream = build_stream(self.config.data, self.config.train.seed)
        self.shares = client_share(list(stream), share, num_shares, self.config.train.seed,
                                   presence=self.config.continual.task_presence)
        self.method: Method = make_method(self.config.continual, node_seed(self.config.train.seed,
                                                                          session.client_id), self.config.train)
        self.method.load(self.state_dir)
        self.closed = self._read_closed()

    def records(self, task: int) -> list[dict]:
        if not 0 <= task < len(self.shares):
            raise ValueError(f"task index {task} is out of range for a stream of {len(self.shares)} tasks")
        return self.shares[task].train_records

    # -- state in the node's folder ------------------------------------------------------
    def _read_closed(self) -> int:
        path = self.state_dir / STATE_FILE
        if not path.exists():
            return 0
        state = check_state(json.loads(path.read_text(encoding="utf-8")), KIND, VERSION, str(path))
        if state["strategy"] != self.config.continual.strategy:
            raise ConfigError(f"{path}: this node's continual state is for strategy {state['strategy']!r}, "
                              f"the run uses {self.config.continual.strategy!r}; use another state folder")
        return int(state["closed"])

    def save(self) -> None:
        self.method.save(self.state_dir)
        state = {"kind": KIND, "version": VERSION, "strategy": self.config.continual.strategy,
                 "closed": self.closed}
        write_bytes(self.state_dir / STATE_FILE, json.dumps(state).encode("utf-8"))

    # -- lifecycle -------------------------------------------------------------------------
    def catch_up(self, task: int, dp: bool) -> None:
        """Close every task before `task` not closed yet, on the model as now loaded (the global one)."""
        model = self.session.model
        while self.closed < task:
            j = self.closed
            fisher = self._shared_importance(j)
            if fisher is None and self.config.continual.federated_importance:
                logger.info("client %d | task %d | no federated importance received, using its own",
                            self.session.client_id, j)
            if fisher is None:
                fisher = self._released_fisher(j, model) if dp else None
            if dp and self.method.after_task_private is not None:  # its task end reads no records
                self.method.after_task_private(model, self.session.shared.task)
            else:
                self.method.after_task(model, self.session.shared.task, self.records(j), fisher=fisher)
            self.closed += 1
            logger.info("client %d | task %d closed (%s)", self.session.client_id, j, self.method.name)
        self.method.before_task(task, self.records(task))

    def _released_fisher(self, task: int, model) -> dict[str, torch.Tensor]:
        """Fisher from the gradients DP-SGD released on `task`; zeros if this node released none."""
        sums, count = _load_accumulator(self.state_dir / ACCUMULATOR_FILE, task)
        if count:
            return fisher_from_grads(sums, count)
        return OrderedDict((n, torch.zeros_like(p, dtype=torch.float32)) for n, p in trainable(model).items())

    # -- federated importance (strategies/importance.py) ------------------------------------
    def receive_importance(self, task: int, importance: dict[str, torch.Tensor]) -> None:
        """Keep the federation's importance of `task` (sent by the server) for closing that task."""
        reason = check_importance(importance, OrderedDict(trainable(self.session.model)))
        if reason is not None:
            raise ValueError(f"the server's importance for task {task} does not fit this model: {reason}")
        if task < self.closed:
            return  # that task is closed already (e.g. with this node's own importance)
        _write_task_tensors(self.state_dir / SHARED_IMPORTANCE_FILE, SHARED_IMPORTANCE_KIND, task, importance)

    def _shared_importance(self, task: int) -> dict[str, torch.Tensor] | None:
        found = _read_task_tensors(self.state_dir / SHARED_IMPORTANCE_FILE, SHARED_IMPORTANCE_KIND, task)
        if found is None:
            return None
        tensors, _ = found
        return OrderedDict((n, tensors[n]) for n in trainable(self.session.model))

    def local_importance(self, task: int, dp: bool) -> dict[str, torch.Tensor]:
        """This node's importance of `task` at its model now (after the task's last local round).

        Under DP it is the mean square of the gradients DP-SGD released on the
        task (no new privacy cost); otherwise a Fisher pass over the node's share.
        """
        model = self.session.model
        if dp:
            return self._released_fisher(task, model)
        return compute_fisher(model, self.session.shared.task, self.records(task),
                              self.config.continual.fisher_batch_size)

    def begin(self, state: dict, task: int, *, dp: bool) -> dict:
        """Load the global `state`, close earlier tasks; return what the update is measured against."""
        start = self.session.load_global(state)
        self.catch_up(task, dp=dp)
        self.save()
        return start

    def train(self, start: dict, server_round: int, task: int, *, pool: list[dict] | None = None,
              dp_plan=None, progress=None):
        """One round on `task` after `begin` -> (new adapter state, TrainResult).

        With a `dp_plan` the round is DP-SGD on `pool` (`dp_pool`), else plain
        training on the task's share with the method's batch mixing and loss term.
        """
        if dp_plan is not None:
            result = self._train_private(pool if pool is not None else self.records(task), task, dp_plan,
                                         progress)
        else:
            mu = self.config.strategy.client_proximal_mu
            prox = proximal_term(start, mu=mu) if mu > 0 else None
            extra = self.method.extra_loss if prox is None else (
                lambda model: self.method.extra_loss(model) + prox(model))
            seed = round_seed(self.config.train.seed, server_round, self.session.client_id)
            trainer = self.method.train_round
            if trainer is not None:  # a method with its own loop (Avalanche's); the proximal term only
                result = trainer(self.session.model, self.session.shared.task, self.records(task),
                                 self.config.train, self.config.model, seed=seed, extra_loss=prox,
                                 progress=progress)
            else:
                result = train_local(self.session.model, self.session.shared.task, self.records(task),
                                     self.config.train, self.config.model, extra_loss=extra, mix=self.method.mix,
                                     progress=progress, seed=seed)
        self.save()
        return adapters.adapter_state(self.session.model), result

    def dp_pool(self, task: int) -> list[dict]:
        """The DP training set of `task`: the share plus replayed records (a fresh draw each round)."""
        records = self.records(task)
        buffer = getattr(self.method, "buffer", None) or next(
            (p.buffer for p in getattr(self.method, "parts", []) if hasattr(p, "buffer")), None)
        if buffer is None or not len(buffer):
            return list(records)
        k = replay_count(len(records), self.config.continual.replay_ratio)
        return replay_pool(records, buffer, k, np.random.default_rng())

    def _train_private(self, pool_records, task, dp_plan, progress):
        from fedcl.privacy.dpsgd import train_private

        path = self.state_dir / ACCUMULATOR_FILE
        sums, count = _load_accumulator(path, task)
        acc = GradSquareAccumulator()
        acc.sums, acc.count = sums, count
        model, task_kind = self.session.model, self.session.shared.task
        own_loss = self.method.dp_batch_loss  # e.g. Avalanche's LwF: cross-entropy + distillation
        result = train_private(model, task_kind, pool_records, self.config.train,
                               self.config.model, dp_plan, progress=progress,
                               after_noise=(lambda: acc.add(model),
                                            lambda: self.method.add_penalty_gradient(model)),
                               batch_loss=None if own_loss is None else (
                                   lambda m, batch: own_loss(m, task_kind, batch)))
        _save_accumulator(path, task, acc)
        return result


def _write_task_tensors(path: Path, kind: str, task: int, tensors: dict[str, torch.Tensor], **meta) -> None:
    """Tensors of one task, their order, kind and task in the file's metadata; written atomically."""
    from safetensors.torch import save as to_bytes

    header = {"kind": kind, "task": str(task), "names": "\n".join(tensors), **{k: str(v) for k, v in meta.items()}}
    write_bytes(path, to_bytes({n: t.contiguous() for n, t in tensors.items()}, metadata=header))


def _read_task_tensors(path: Path, kind: str, task: int) -> tuple[dict, dict] | None:
    """What `_write_task_tensors` wrote for this `kind` and `task` (tensors in order, metadata), else None."""
    if not path.exists():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if meta.get("kind") != kind or int(meta.get("task", -1)) != task:
        return None
    tensors = load_file(str(path))
    names = [n for n in meta.get("names", "").split("\n") if n] or list(tensors)
    return OrderedDict((n, tensors[n]) for n in names), meta


def _load_accumulator(path: Path, task: int) -> tuple[dict, int]:
    """The squared released gradients of `task` so far (empty for another task or none)."""
    found = _read_task_tensors(path, ACCUMULATOR_KIND, task)
    if found is None:
        return OrderedDict(), 0
    sums, meta = found
    return sums, int(meta["count"])


def _save_accumulator(path: Path, task: int, acc: GradSquareAccumulator) -> None:
    _write_task_tensors(path, ACCUMULATOR_KIND, task, acc.sums, count=acc.count)


def dp_base_plan(config: Config, shares: list[Task]):
    """The node's run-long DP plan: noise calibrated at the highest sample rate of its tasks."""
    sizes = [len(t.train_records) for t in shares if t.train_records]
    if not sizes:
        raise ConfigError("privacy: this client holds no training records in any task")
    return sample_plan(config, min(sizes))


def task_plan(base, pool_size: int, batch_size: int):
    """`base` with this task's sample rate (<= the calibrated one, as its pool is >= the smallest share)."""
    rate = min(1.0, batch_size / pool_size)
    return dataclasses.replace(base, sample_rate=rate, expected_batch_size=max(1, round(rate * pool_size)))
