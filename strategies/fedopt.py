"""Server-side optimisers over the averaged adapter update: FedAdam, FedYogi, FedAvgM.

Flower's classes do the math; these add fedcl's bookkeeping and make the
optimiser's state (moments, momentum) part of `state_dict()`, so a resumed run
continues exactly as an uninterrupted one would. They also see the run's round
number (`RunRoundNumbers`), which FedAdam's bias correction depends on.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi

from strategies.lora import (LoraStrategy, RunRoundNumbers, decode_arrays, encode_arrays, finish,
                             flower_kwargs)


class FedOptState:
    """state_dict for Flower's FedOpt family: first and second moments."""

    def state_dict(self) -> dict:
        return {**super().state_dict(), "m_t": encode_arrays(self.m_t),  # type: ignore[misc]
                "v_t": encode_arrays(self.v_t)}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)  # type: ignore[misc]
        self.m_t, self.v_t = decode_arrays(state.get("m_t")), decode_arrays(state.get("v_t"))

    def aggregate_train(self, server_round, replies):
        result = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        # Keep the moments float32, as they are saved: whether numpy promotes
        # them to float64 depends on its promotion mode, and a resumed run must
        # continue from exactly what an uninterrupted one holds in memory.
        for name in ("m_t", "v_t"):
            moments = getattr(self, name)
            if moments:
                setattr(self, name, {k: np.asarray(v, dtype=np.float32) for k, v in moments.items()})
        arrays, metrics = result
        if arrays is not None:  # the global adapter is float32 wherever it is kept
            arrays = ArrayRecord({k: Array(np.asarray(a.numpy(), dtype=np.float32)) for k, a in arrays.items()})
        return arrays, metrics


class LoraFedAdam(FedOptState, LoraStrategy, RunRoundNumbers, FedAdam):
    pass


class LoraFedYogi(FedOptState, LoraStrategy, RunRoundNumbers, FedYogi):
    pass


class LoraFedAvgM(LoraStrategy, FedAvgM):
    def state_dict(self) -> dict:
        vector = self.momentum_vector
        # A resumed strategy has its momentum before it has seen a global adapter.
        keys = list(self.current_arrays.keys()) if self.current_arrays is not None \
            else getattr(self, "momentum_keys", [])
        return {**super().state_dict(),
                "momentum": None if vector is None else encode_arrays(dict(zip(keys, vector, strict=True)))}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        momentum = decode_arrays(state.get("momentum"))
        # Flower keeps the vector as a list in the global adapter's key order,
        # which a resumed run's first global (the saved adapter) shares.
        self.momentum_vector = None if momentum is None else list(momentum.values())
        self.momentum_keys = [] if momentum is None else list(momentum)


def _fedopt_kwargs(config) -> dict:
    s = config.strategy
    return dict(**flower_kwargs(config), eta=s.server_lr, eta_l=config.train.lr, beta_1=s.beta_1,
                beta_2=s.beta_2, tau=s.tau)


def build_fedadam(config, *, round_offset: int = 0, reply_template: dict | None = None) -> LoraFedAdam:
    return finish(LoraFedAdam(**_fedopt_kwargs(config)), config, round_offset=round_offset,
                  reply_template=reply_template)


def build_fedyogi(config, *, round_offset: int = 0, reply_template: dict | None = None) -> LoraFedYogi:
    return finish(LoraFedYogi(**_fedopt_kwargs(config)), config, round_offset=round_offset,
                  reply_template=reply_template)


def build_fedavgm(config, *, round_offset: int = 0, reply_template: dict | None = None) -> LoraFedAvgM:
    s = config.strategy
    strategy = LoraFedAvgM(**flower_kwargs(config), server_learning_rate=s.momentum_lr,
                           server_momentum=s.momentum)
    return finish(strategy, config, round_offset=round_offset, reply_template=reply_template)
