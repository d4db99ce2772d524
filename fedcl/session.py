"""What a node holds between rounds: model, task and data for one configuration.

A `LocalSession` is built once per process and configuration (simulated
clients live in long-lived worker processes, so the base model is loaded once,
not once per round). It trains and evaluates from an adapter state given by
the server. `GlobalEvaluator` is the server's counterpart on the global test
split. Nothing here imports Flower.
"""

from __future__ import annotations

import functools
import os
import random
from dataclasses import dataclass

import torch

from fedcl import adapters, data, models
from fedcl.config import Config
from fedcl.tasks import make_task
from fedcl.train import TrainResult, evaluate, train_local


def configure_threads(config: Config, *, server: bool = False) -> None:
    """Torch threads: what the engine gives a client; the server, idle while
    clients train, evaluates with every core."""
    cores = os.cpu_count() or 1
    threads = config.model.threads or (cores if server else min(config.federation.client_cpus, cores))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=4)
def _lora_model(model_cfg, lora_cfg):
    return models.build_lora_model(model_cfg, lora_cfg)


@functools.lru_cache(maxsize=4)
def _dataset(data_cfg, seed: int) -> data.Dataset:
    return data.load_dataset(data_cfg, seed=seed)


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
        model, tokenizer = _lora_model(config.model, config.lora)
        dataset = _dataset(config.data, config.train.seed)
        task = make_task(config.data.task, tokenizer, dataset.labels, config.data, config.model,
                         config.train)
        return cls(config, model, tokenizer, task, dataset, _initial_state(config))


@functools.lru_cache(maxsize=4)
def _initial_state_cached(model_cfg, lora_cfg):
    model, _ = _lora_model(model_cfg, lora_cfg)
    return adapters.adapter_state(model)


def _initial_state(config: Config) -> dict:
    return _initial_state_cached(config.model, config.lora)


class LocalSession:
    """One client's view: its share of the data and the shared model."""

    def __init__(self, config: Config, client_id: int, num_clients: int):
        self.config = config
        self.client_id = client_id
        self.shared = Shared.get(config)
        self.train_records, self.eval_records = data.client_split(
            config.data, self.shared.dataset, client_id, num_clients, config.train.seed)

    @property
    def model(self):
        return self.shared.model

    def train(self, state: dict, server_round: int, progress=None) -> tuple[dict, TrainResult]:
        """Train from the global `state`; return the new adapter state and what it cost."""
        adapters.load_adapter_state(self.model, state, source="global adapter from the server")
        result = train_local(self.model, self.shared.task, self.train_records, self.config.train,
                             self.config.model, seed=round_seed(self.config.train.seed, server_round,
                                                                self.client_id), progress=progress)
        return adapters.adapter_state(self.model), result

    def evaluate(self, state: dict) -> dict:
        adapters.load_adapter_state(self.model, state, source="global adapter from the server")
        return evaluate(self.model, self.shared.task, self.eval_records, self.config.train,
                        self.config.model)


class GlobalEvaluator:
    """The server's evaluation of the global adapter on the global test split."""

    def __init__(self, config: Config):
        self.config = config
        self.shared = Shared.get(config, server=True)

    @property
    def initial_state(self) -> dict:
        return self.shared.initial_state

    def evaluate(self, state: dict) -> dict:
        adapters.load_adapter_state(self.shared.model, state, source="global adapter")
        return evaluate(self.shared.model, self.shared.task, self.shared.dataset.test,
                        self.config.train, self.config.model)

    def save(self, state: dict, target) -> None:
        adapters.save_adapter(self.shared.model, state, target)

    def base_bytes(self) -> int:
        return models.base_model_bytes(self.shared.model)


@functools.lru_cache(maxsize=64)
def local_session(config: Config, client_id: int, num_clients: int) -> LocalSession:
    return LocalSession(config, client_id, num_clients)
