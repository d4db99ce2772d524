"""Continual-learning methods as small classes on lifecycle hooks.

A training loop drives a method through these hooks (each a no-op by default):

- ``before_task(index, records)``: a new task starts (its local training records).
- ``mix(batches) -> batches``: rewrite the local batches (replay appends old records).
- ``extra_loss(model) -> Tensor``: a term added to the loss, a zero tensor when there is
  none (plain training only; `fedcl.train.train_local`'s ``extra_loss`` hook takes it).
- ``add_penalty_gradient(model)``: the same term's gradient added to ``p.grad`` after the
  DP optimizer's noise (DP training, where an extra loss term would be dropped).
- ``train_round``: set only by a method with its own loop (Avalanche's), see below.
- ``dp_batch_loss(model, task, batch)``, ``after_task_private(model, task)``: set only by
  a method that brings its own loss term into DP-SGD and closes a task without reading
  records (Avalanche's LwF); DP training then uses them in place of the task's loss and
  of ``after_task``.
- ``after_task(model, task, records, fisher=None)``: the task is over; `task` is the
  `fedcl.tasks` task (encode + per_example_loss), `fisher` an importance computed
  elsewhere (from DP-released gradients, or the server's aggregate) to use instead
  of computing one from `records`.

Methods hold their own state (`state_dict`/`load_state_dict`, `save`/`load`
into the node's state folder) and never reach into the trainer. A new method
is a new class plus an entry in `fedcl.continual.catalog`, which builds the
method a config names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from fedcl.continual.ewc import OnlineEWC, compute_fisher
from fedcl.continual.replay import ReservoirBuffer, mix_batches
from fedcl.continual.state import StateError, check_state

VERSION = 1


class Method:
    """The base of every method: each hook does nothing."""

    name = "method"

    def before_task(self, index: int, records: Sequence[dict]) -> None:
        pass

    def mix(self, batches: Iterable[list[dict]]) -> Iterable[list[dict]]:
        return batches

    def extra_loss(self, model: torch.nn.Module) -> torch.Tensor:
        return torch.zeros(())

    def add_penalty_gradient(self, model: torch.nn.Module) -> None:
        pass

    # A method that runs its own training loop (Avalanche's) defines
    # ``train_round(model, task, records, train_cfg, model_cfg, *, seed, extra_loss, progress)``
    # returning a `fedcl.train.TrainResult`; the others train in `fedcl.train.train_local`.
    train_round = None
    # Under DP-SGD (see the module docstring); None: the task's own loss, and `after_task`.
    dp_batch_loss = None
    after_task_private = None

    def after_task(self, model: torch.nn.Module, task, records: Sequence[dict], *,
                   fisher: dict[str, torch.Tensor] | None = None) -> None:
        pass

    def state_dict(self) -> dict:
        return {"kind": f"fedcl.continual.method.{self.name}", "version": VERSION}

    def load_state_dict(self, state: dict, source: str = "method state") -> None:
        check_state(state, f"fedcl.continual.method.{self.name}", VERSION, source)

    def save(self, folder: str | Path) -> None:
        """Write this method's files into the node's state folder (nothing for naive)."""

    def load(self, folder: str | Path) -> None:
        """Restore from the node's state folder; files that do not exist yet are skipped."""


class Naive(Method):
    """Plain fine-tuning task after task: the lower bound every method is compared against."""

    name = "naive"


class Replay(Method):
    """Keep a reservoir of past tasks' records; append a share of them to every batch."""

    name = "replay"
    FILE = "replay.json"

    def __init__(self, capacity: int, ratio: float, seed: int, balanced_by_class: bool = False):
        self.buffer = ReservoirBuffer(capacity, seed, balanced_by_class)
        self.ratio = ratio
        self._rng = np.random.default_rng([seed & 0xFFFF_FFFF, 1])  # mixing draws, apart from storage

    def mix(self, batches):
        return mix_batches(batches, self.buffer, self.ratio, self._rng)

    def after_task(self, model, task, records, *, fisher=None) -> None:
        # Stored after the task, so task k trains on replay of tasks < k only.
        self.buffer.add(records)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": self.buffer.state_dict(),
                "mix_rng": self._rng.bit_generator.state}

    def load_state_dict(self, state, source="method state") -> None:
        super().load_state_dict(state, source)
        self.buffer.load_state_dict(state["buffer"], source)
        self._rng.bit_generator.state = state["mix_rng"]

    def save(self, folder) -> None:
        self.buffer.save(Path(folder) / self.FILE)

    def load(self, folder) -> None:
        if (Path(folder) / self.FILE).exists():
            self.buffer.load(Path(folder) / self.FILE)


class EWC(Method):
    """Online EWC on the adapter: a quadratic pull towards the previous tasks' parameters."""

    name = "ewc"
    FILE = "ewc.safetensors"

    def __init__(self, strength: float, decay: float = 1.0, fisher_batch_size: int = 8):
        self.ewc = OnlineEWC(strength, decay)
        self.fisher_batch_size = fisher_batch_size

    def extra_loss(self, model):
        return self.ewc.penalty(model)

    def add_penalty_gradient(self, model) -> None:
        self.ewc.add_penalty_gradient(model)

    def after_task(self, model, task, records, *, fisher=None) -> None:
        if fisher is None:
            if not records:  # a client without this task's data learns no importance from it
                return
            fisher = compute_fisher(model, task, records, self.fisher_batch_size)
        self.ewc.after_task(model, fisher)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ewc": self.ewc.state_dict()}

    def load_state_dict(self, state, source="method state") -> None:
        super().load_state_dict(state, source)
        self.ewc.load_state_dict(state["ewc"], source)

    def save(self, folder) -> None:
        self.ewc.save(Path(folder) / self.FILE)

    def load(self, folder) -> None:
        if (Path(folder) / self.FILE).exists():
            self.ewc.load(Path(folder) / self.FILE)


class Combined(Method):
    """Several methods at once (e.g. replay + EWC), each hook called on each in order."""

    def __init__(self, parts: Sequence[Method]):
        if not parts:
            raise ValueError("Combined needs at least one method")
        self.parts = list(parts)
        self.name = "+".join(part.name for part in self.parts)

    def before_task(self, index, records) -> None:
        for part in self.parts:
            part.before_task(index, records)

    def mix(self, batches):
        for part in self.parts:
            batches = part.mix(batches)
        return batches

    def extra_loss(self, model):
        terms = [part.extra_loss(model) for part in self.parts]
        return sum(terms[1:], terms[0])

    def add_penalty_gradient(self, model) -> None:
        for part in self.parts:
            part.add_penalty_gradient(model)

    def after_task(self, model, task, records, *, fisher=None) -> None:
        for part in self.parts:
            part.after_task(model, task, records, fisher=fisher)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state, source="method state") -> None:
        super().load_state_dict(state, source)
        if len(state["parts"]) != len(self.parts):
            raise StateError(f"{source}: {len(state['parts'])} parts saved, this method has {len(self.parts)}")
        for part, sub in zip(self.parts, state["parts"]):
            part.load_state_dict(sub, source)

    def save(self, folder) -> None:
        for part in self.parts:
            part.save(folder)

    def load(self, folder) -> None:
        for part in self.parts:
            part.load(folder)
