"""``flora``: exact aggregation of the clients' LoRA products by stacking.

The global state is the merged residual of `fedcl.flora` (``W0 + B_res A_res``
per adapted layer). Every round each client folds it into its base weights,
trains a fresh LoRA from the seeded init, and replies with that LoRA; the
server stacks the weighted products onto the residual and re-factorises it
exactly. Stacking (rather than averaging factors) is what makes the result
the weighted mean of B_i A_i, for any mix of client ranks; keeping it as one
re-factorised residual keeps every node stateless between rounds and the saved
global a plain PEFT adapter (r = the residual's rank, lora_alpha = r).

`StackedAggregation` is the inner Flower strategy (FedAvg's checks and metric
averaging, stacking for the arrays); `Flora` is the fedcl strategy around it,
screening replies against the clients' seeded LoRA rather than the global.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedcl import flora
from fedcl.federation.messages import arrays_to_state, reply_metrics, state_to_arrays
from fedcl.strategies.screening import number
from fedcl.strategies.strategy import FedclStrategy, compose, flower_kwargs


def aggregate_stacked(residual: dict, client_states: Sequence[dict], weights: list[float],
                      scalings: list[float]) -> dict:
    """New residual state: residual + sum_i w_i s_i B_i A_i, exact (weights normalised)."""
    update = flora.stack_products([flora.factors_of(s) for s in client_states], weights, scalings)
    return flora.residual_state(flora.merge(flora.factors_of(residual), update))


class StackedAggregation(FedAvg):
    """FedAvg's checks and metric averaging, with stacking onto the residual for the arrays."""

    def __init__(self, *, lora_scaling: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lora_scaling = lora_scaling  # PEFT's alpha / r, the same for every client
        self.residual: dict | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # The global it is sent is the residual the round's products stack onto.
        self.residual = arrays_to_state(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid or self.residual is None:
            return None, None
        states = [arrays_to_state(m.content.array_records[self.arrayrecord_key]) for m in valid]
        weights = [float(number(reply_metrics(m), self.weighted_by_key)) for m in valid]
        residual = aggregate_stacked(self.residual, states, weights, [self.lora_scaling] * len(states))
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return state_to_arrays(residual), metrics


class Flora(FedclStrategy):
    """Stacked aggregation of the clients' fresh LoRAs onto the global residual."""


def build_flora(config, *, round_offset: int = 0, reply_template: dict | None = None) -> FedclStrategy:
    if reply_template is None:
        raise ValueError("flora needs the clients' LoRA state as reply_template: the global "
                         "state it sends is the residual, not what clients send back")
    # PEFT's scaling without rslora
    inner = StackedAggregation(**flower_kwargs(config), lora_scaling=config.lora.alpha / config.lora.r)
    return compose(Flora, inner, config, round_offset=round_offset, reply_template=reply_template,
                   updates_from_template=True)
