"""FedAvg over the LoRA factors, weighted by examples: the common baseline.

Each factor (A and B of every adapted layer) is averaged on its own. This is
what most federated LLM frameworks do; it is not the average of the clients'
updates B_i A_i, because mean(B) mean(A) != mean(B A).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from strategies.base import NUM_EXAMPLES, RoundBookkeeping


class LoraFedAvg(RoundBookkeeping, FedAvg):
    """Flower's FedAvg with fedcl's round bookkeeping."""


def build(config, *, round_offset: int = 0) -> LoraFedAvg:
    fed = config.federation
    strategy = LoraFedAvg(
        fraction_train=1.0,  # sampling is done by RoundBookkeeping, from the run seed
        fraction_evaluate=1.0,
        min_train_nodes=fed.clients,
        min_evaluate_nodes=fed.clients,
        min_available_nodes=fed.clients,
        weighted_by_key=NUM_EXAMPLES,
    )
    strategy.setup_bookkeeping(seed=config.train.seed, clients_per_round=fed.clients_per_round,
                               round_offset=round_offset, min_replies=fed.min_replies)
    return strategy
