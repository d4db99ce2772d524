"""What a node holds between rounds: model, task and data for one configuration.

A `LocalSession` is built once per process and configuration (simulated
clients live in long-lived worker processes, so the base model is loaded once,
not once per round). It trains and evaluates from an adapter state given by
the server. `GlobalEvaluator` is the server's counterpart on the global test
split. Nothing here imports Flower.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
from dataclasses import dataclass

import torch

from fedcl import accelerator, adapters, data, frozen, keys, layouts, models
from fedcl.config import Config
from fedcl.plan import thread_plan
from fedcl.regularizers import proximal_term
from fedcl.tasks import make_task
from fedcl.train import TrainResult, evaluate, train_local

logger = logging.getLogger("fedcl.session")


def configure_threads(config: Config, *, server: bool = False) -> int:
    """Set this process's torch threads from `fedcl.plan.thread_plan`, the one rule
    for clients and server (together at most the cores); one log line when it changes."""
    rule = thread_plan(config)
    threads = rule.server if server else rule.client
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    role = "server" if server else "client"
    if (role, threads) not in _ANNOUNCED:  # once per process and role, not per call
        _ANNOUNCED.add((role, threads))
        logger.info("%s process %d: %d torch thread(s); %s", role, os.getpid(), threads, rule.describe())
        print(f"{role} | threads {threads} | {rule.describe()}", flush=True)
    return threads


_ANNOUNCED: set[tuple[str, int]] = set()


@functools.lru_cache(maxsize=4)
def _lora_model(model_cfg, lora_cfg, layout: str = "lora"):
    # The layout is part of the key: ffa-lora freezes lora_A and flora folds a
    # residual into base weights, neither of which another strategy may see.
    model, tokenizer = models.build_lora_model(model_cfg, lora_cfg)
    layouts.get_layout(layout).prepare(model)
    return model, tokenizer


@functools.lru_cache(maxsize=4)
def _content_free_offset(model_cfg, data_cfg, train_cfg, labels: tuple[str, ...]):
    # From a fresh copy of the base model, never from the session's model: the
    # offset must not depend on the adapter a node happens to hold, so every
    # client and the server subtract the same one. On the CPU in float32 whatever
    # model.device: nodes on different devices and dtypes still share one offset.
    model, tokenizer = models.load_configured_base(model_cfg)
    task = make_task("classification", tokenizer, list(labels), data_cfg, model_cfg, train_cfg)
    return task.content_free_scores(model)


@functools.lru_cache(maxsize=4)
def _dataset(data_cfg, seed: int) -> data.Dataset:
    return data.load_dataset(data_cfg, seed=seed)


def dataset_for(data_cfg, seed: int) -> data.Dataset:
    """The run's dataset, loaded once per process and configuration."""
    return _dataset(data_cfg, seed)


def round_seed(seed: int, server_round: int, client_id: int) -> int:
    """A distinct, reproducible seed per (run seed, round, client)."""
    return random.Random(f"{seed}/{server_round}/{client_id}").randrange(2**31)


@dataclass
class Shared:
    """Model, tokenizer, task and dataset for one configuration in this process."""

    config: Config
    model: object
    tokenizer: object
    task: object
    dataset: data.Dataset
    initial_state: dict

    @classmethod
    def get(cls, config: Config, *, server: bool = False) -> "Shared":
        configure_threads(config, server=server)
        model, tokenizer = _lora_model(config.model, config.lora, config.strategy.adapter_layout)
        dataset = _dataset(config.data, config.train.seed)
        task = make_task(config.data.task, tokenizer, dataset.labels, config.data, config.model,
                         config.train)
        task.device = accelerator.model_device(model)  # batches are made where the model is
        if config.data.calibrate:
            task.offset = _content_free_offset(config.model, config.data, config.train, tuple(dataset.labels))
        # lora.top_layers: this holder's records get their frozen states computed once, kept here.
        frozen.use_frozen_bottom(task, model, config.model, config.lora)
        return cls(config, model, tokenizer, task, dataset, _initial_state(config))


@functools.lru_cache(maxsize=4)
def _initial_state_cached(model_cfg, lora_cfg, layout: str):
    model, _ = _lora_model(model_cfg, lora_cfg, layout)
    return adapters.adapter_state(model)


def _initial_state(config: Config) -> dict:
    return _initial_state_cached(config.model, config.lora, config.strategy.adapter_layout)


class LocalSession:
    """One client's view: its share of the data and the shared model."""

    def __init__(self, config: Config, client_id: int, num_clients: int, *, share: int | None = None):
        # `share`: which of the `num_clients` shares of the data to hold (default: the
        # client's id); a deployed node with its own file holds share 0 of 1 whatever its id.
        self.config = config
        self.client_id = client_id
        self.shared = Shared.get(config)
        self.train_records, self.eval_records = data.client_split(
            config.data, self.shared.dataset, client_id if share is None else share, num_clients,
            config.train.seed)

    @property
    def model(self):
        return self.shared.model

    def train(self, state: dict, server_round: int, progress=None, *,
              dp_plan=None) -> tuple[dict, TrainResult]:
        """Train from the global `state`; return the new adapter state and what it cost.

        With a `dp_plan` (`fedcl.privacy.plan_for`) the round is DP-SGD.
        """
        start = self.load_global(state)
        if dp_plan is not None:
            from fedcl.privacy.dpsgd import train_private

            result = train_private(self.model, self.shared.task, self.train_records,
                                   self.config.train, self.config.model, dp_plan, progress=progress)
            return adapters.adapter_state(self.model), result
        mu = self.config.strategy.client_proximal_mu
        result = train_local(self.model, self.shared.task, self.train_records, self.config.train,
                             self.config.model, seed=round_seed(self.config.train.seed, server_round,
                                                                self.client_id), progress=progress,
                             extra_loss=proximal_term(start, mu=mu) if mu > 0 else None)
        return adapters.adapter_state(self.model), result

    def load_global(self, state: dict) -> dict:
        """Load the server's global state; return the trainable state training starts
        from (what this client's update is measured against)."""
        return layouts.get_layout(self.config.strategy.adapter_layout).load(
            self.model, state, self.shared.initial_state, source="global adapter from the server")

    def update_start(self, state: dict) -> dict:
        """What this client's reply to the global `state` is measured against."""
        return layouts.get_layout(self.config.strategy.adapter_layout).update_start(
            state, self.shared.initial_state)

    def evaluate(self, state: dict) -> dict:
        self.load_global(state)
        return evaluate(self.model, self.shared.task, self.eval_records, self.config.train,
                        self.config.model)


class GlobalEvaluator:
    """The server's evaluation of the global adapter on the global test split."""

    def __init__(self, config: Config):
        self.config = config
        self.shared = Shared.get(config, server=True)
        # A binary task with a class that matters: its threshold is chosen on a
        # validation split of the server's records, never on the test split.
        self.validation, self.test = [], self.shared.dataset.test
        fraction = config.train.threshold_validation
        if fraction > 0 and _ranks_positive(self.shared.task, config.train) and len(self.test) >= 2:
            self.test, self.validation = data.split_holdout(
                self.test, fraction, random.Random(f"{config.train.seed}/threshold").randrange(2**31))

    @property
    def layout(self) -> layouts.LoraLayout:
        return layouts.get_layout(self.config.strategy.adapter_layout)

    @property
    def initial_state(self) -> dict:
        """The global state before round 1 (for most strategies the seeded adapter)."""
        return self.layout.initial_global(self.shared.initial_state)

    def evaluate(self, state: dict, *, progress=None) -> dict:
        """The global `state` on the test split (binary with a positive class: at the validation's
        threshold); `progress(done, total)` as `fedcl.train.evaluate` calls it, for the test split."""
        if not self.validation:
            return self.evaluate_records(state, self.test, progress=progress)
        self.layout.load(self.shared.model, state, self.shared.initial_state, source="global adapter")
        train_cfg = self.config.train
        chosen = evaluate(self.shared.model, self.shared.task, self.validation, train_cfg, self.config.model)
        threshold = chosen[keys.THRESHOLD_AT_PRECISION]
        source = "validation" if threshold is not None else "train.threshold"
        threshold = train_cfg.threshold if threshold is None else threshold
        report = evaluate(self.shared.model, self.shared.task, self.test,
                          dataclasses.replace(train_cfg, threshold=threshold), self.config.model,
                          progress=progress)
        positive = report[keys.PER_CLASS].get(train_cfg.positive_label, {})
        del report[keys.THRESHOLD_AT_PRECISION]  # chosen on the test split: never reported as a threshold
        report.update({keys.THRESHOLD: threshold, keys.THRESHOLD_SOURCE: source,
                       keys.VALIDATION_RECORDS: len(self.validation),
                       keys.VALIDATION_RECALL_AT_PRECISION: chosen[keys.RECALL_AT_PRECISION],
                       keys.PRECISION_AT_THRESHOLD: positive.get("precision", 0.0),
                       keys.RECALL_AT_THRESHOLD: positive.get("recall", 0.0)})
        return report

    def evaluate_records(self, state: dict, records: list, *, progress=None) -> dict:
        """The global `state` scored on `records` (e.g. one continual task's test split)."""
        self.layout.load(self.shared.model, state, self.shared.initial_state, source="global adapter")
        return evaluate(self.shared.model, self.shared.task, records, self.config.train, self.config.model,
                        progress=progress)

    def save(self, state: dict, target) -> None:
        self.layout.save(self.shared.model, state, target)

    def load_saved(self, source) -> dict:
        """The global state saved by `save` in folder `source`."""
        return self.layout.read(self.shared.model, source)

    def base_bytes(self) -> int:
        return models.base_model_bytes(self.shared.model)


def _ranks_positive(task, train_cfg) -> bool:
    """A binary classification task with a named positive class (`fedcl.train.positive_index`)."""
    labels = getattr(task, "labels", None) or []
    return bool(train_cfg.positive_label) and len(labels) == 2 and train_cfg.positive_label in labels


@functools.lru_cache(maxsize=64)
def local_session(config: Config, client_id: int, num_clients: int, *,
                  share: int | None = None) -> LocalSession:
    return LocalSession(config, client_id, num_clients, share=share)
