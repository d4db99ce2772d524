"""``flora``: exact aggregation of the clients' LoRA products by stacking.

The global state is the merged residual of `fedcl.flora` (``W0 + B_res A_res``
per adapted layer). Every round each client folds it into its base weights,
trains a fresh LoRA from the seeded init, and replies with that LoRA; the
server stacks the weighted products onto the residual and re-factorises it
exactly. Stacking (rather than averaging factors) is what makes the result
the weighted mean of B_i A_i, for any mix of client ranks; keeping it as one
re-factorised residual keeps every node stateless between rounds and the saved
global a plain PEFT adapter (r = the residual's rank, lora_alpha = r).
"""

from __future__ import annotations

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg

from fedcl import flora
from strategies.lora import LoraStrategy, finish, flower_kwargs
from strategies.wire import arrays_to_state, state_to_arrays


def aggregate_stacked(residual: dict, client_states: list[dict], weights: list[float],
                      scalings: list[float]) -> dict:
    """New residual state: residual + sum_i w_i s_i B_i A_i, exact (weights normalised)."""
    update = flora.stack_products([flora.factors_of(s) for s in client_states], weights, scalings)
    return flora.residual_state(flora.merge(flora.factors_of(residual), update))


class StackedAggregation(FedAvg):
    """FedAvg's checks and metric averaging, with stacking for the arrays."""

    lora_scaling = 1.0

    def aggregate_train(self, server_round: int, replies):
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        states = [arrays_to_state(m.content[self.arrayrecord_key]) for m in valid]
        weights = [float(m.content.metric_records[next(iter(m.content.metric_records))][self.weighted_by_key])
                   for m in valid]
        residual = aggregate_stacked(self.current_global, states, weights,  # type: ignore[attr-defined]
                                     [self.lora_scaling] * len(states))
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return state_to_arrays(residual), metrics


class Flora(LoraStrategy, StackedAggregation):
    replies_start_from_template = True


def build_flora(config, *, round_offset: int = 0, reply_template: dict | None = None) -> Flora:
    if reply_template is None:
        raise ValueError("flora needs the clients' LoRA state as reply_template: the global "
                         "state it sends is the residual, not what clients send back")
    strategy = Flora(**flower_kwargs(config))
    strategy.lora_scaling = config.lora.alpha / config.lora.r  # PEFT's scaling without rslora
    return finish(strategy, config, round_offset=round_offset, reply_template=reply_template)
