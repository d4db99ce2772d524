"""Server-side optimisers over the averaged adapter update: FedAdam, FedYogi, FedAvgM.

Flower's classes do the math as the inner strategy; the parts here make the
optimiser's state (moments, momentum) part of the strategy's `state_dict()`,
so a resumed run continues exactly as an uninterrupted one would. The inner
strategy is told the run's round number, which FedAdam's bias correction
depends on (`FedclStrategy.aggregate_train`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi
from flwr.serverapp.strategy.fedopt import FedOpt

from fedcl.federation.messages import decode_arrays, encode_arrays
from fedcl.strategies.strategy import FedclStrategy, compose, flower_kwargs


class FedOptMoments:
    """FedAdam's and FedYogi's first and second moments, saved and kept float32."""

    def __init__(self, inner: FedOpt) -> None:
        self.inner = inner

    def after_aggregate(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        # Keep the moments float32, as they are saved: whether numpy promotes
        # them to float64 depends on its promotion mode, and a resumed run must
        # continue from exactly what an uninterrupted one holds in memory.
        if self.inner.m_t:
            self.inner.m_t = {k: np.asarray(v, dtype=np.float32) for k, v in self.inner.m_t.items()}
        if self.inner.v_t:
            self.inner.v_t = {k: np.asarray(v, dtype=np.float32) for k, v in self.inner.v_t.items()}
        if arrays is None:
            return None
        # the global adapter is float32 wherever it is kept
        return ArrayRecord({k: Array(np.asarray(a.numpy(), dtype=np.float32)) for k, a in arrays.items()})

    def state_dict(self) -> dict:
        return {"m_t": encode_arrays(self.inner.m_t), "v_t": encode_arrays(self.inner.v_t)}

    def load_state_dict(self, state: dict) -> None:
        self.inner.m_t, self.inner.v_t = decode_arrays(state.get("m_t")), decode_arrays(state.get("v_t"))


class FedAvgMMomentum:
    """FedAvgM's server momentum, saved by parameter name."""

    def __init__(self, inner: FedAvgM) -> None:
        self.inner = inner
        self.momentum_keys: list[str] = []  # a resumed run's names, before it has seen a global

    def after_aggregate(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        return arrays

    def state_dict(self) -> dict:
        vector = self.inner.momentum_vector
        current = self.inner.current_arrays
        names = list(current.keys()) if current is not None else self.momentum_keys
        return {"momentum": None if vector is None else encode_arrays(dict(zip(names, vector, strict=True)))}

    def load_state_dict(self, state: dict) -> None:
        momentum = decode_arrays(state.get("momentum"))
        # Flower keeps the vector as a list in the global adapter's key order,
        # which a resumed run's first global (the saved adapter) shares.
        self.inner.momentum_vector = None if momentum is None else list(momentum.values())
        self.momentum_keys = [] if momentum is None else list(momentum)


class LoraFedAdam(FedclStrategy):
    """Flower's FedAdam over the averaged adapter update."""


class LoraFedYogi(FedclStrategy):
    """Flower's FedYogi over the averaged adapter update."""


class LoraFedAvgM(FedclStrategy):
    """Flower's FedAvgM: FedAvg with server learning rate and momentum."""


def _fedopt_kwargs(config) -> dict:
    s = config.strategy
    return dict(**flower_kwargs(config), eta=s.server_lr, eta_l=config.train.lr, beta_1=s.beta_1,
                beta_2=s.beta_2, tau=s.tau)


def build_fedadam(config, *, round_offset: int = 0, reply_template: dict | None = None) -> FedclStrategy:
    inner = FedAdam(**_fedopt_kwargs(config))
    return compose(LoraFedAdam, inner, config, round_offset=round_offset, reply_template=reply_template,
                   inner_state=FedOptMoments(inner))


def build_fedyogi(config, *, round_offset: int = 0, reply_template: dict | None = None) -> FedclStrategy:
    inner = FedYogi(**_fedopt_kwargs(config))
    return compose(LoraFedYogi, inner, config, round_offset=round_offset, reply_template=reply_template,
                   inner_state=FedOptMoments(inner))


def build_fedavgm(config, *, round_offset: int = 0, reply_template: dict | None = None) -> FedclStrategy:
    s = config.strategy
    inner = FedAvgM(**flower_kwargs(config), server_learning_rate=s.momentum_lr, server_momentum=s.momentum)
    return compose(LoraFedAvgM, inner, config, round_offset=round_offset, reply_template=reply_template,
                   inner_state=FedAvgMMomentum(inner))
