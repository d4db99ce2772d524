"""FedAvg over the LoRA factors, weighted by examples, and its two close relatives.

- ``fedavg``: each factor (A and B of every adapted layer) is averaged on its
  own. This is what most federated LLM frameworks do; it is not the average of
  the clients' updates B_i A_i, because mean(B) mean(A) != mean(B A).
- ``ffa-lora``: the same averaging, but every node freezes lora_A at the shared
  seeded init (`fedcl.layouts.FrozenALayout`), so only B trains and travels and
  mean(B_i) A = mean(B_i A): exact, at about half the traffic.
- ``fedprox``: FedAvg on the server; each client adds mu/2 ||w - w_global||^2
  to its loss (`fedcl.regularizers.proximal_term`, `strategy.proximal_mu`).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedProx

from fedcl.strategies.strategy import FedclStrategy, compose, flower_kwargs


class LoraFedAvg(FedclStrategy):
    """Flower's FedAvg with fedcl's bookkeeping, transport and screening."""


class FfaLora(FedclStrategy):
    """FedAvg over lora_B only; lora_A never leaves its seeded init."""


class LoraFedProx(FedclStrategy):
    """Flower's FedProx (it also tells clients `proximal-mu` in the round config)."""


def build(config, *, round_offset: int = 0, reply_template: dict | None = None) -> FedclStrategy:
    return compose(LoraFedAvg, FedAvg(**flower_kwargs(config)), config, round_offset=round_offset,
                   reply_template=reply_template)


def build_ffa_lora(config, *, round_offset: int = 0, reply_template: dict | None = None) -> FedclStrategy:
    return compose(FfaLora, FedAvg(**flower_kwargs(config)), config, round_offset=round_offset,
                   reply_template=reply_template)


def build_fedprox(config, *, round_offset: int = 0, reply_template: dict | None = None) -> FedclStrategy:
    inner = FedProx(**flower_kwargs(config), proximal_mu=config.strategy.proximal_mu)
    return compose(LoraFedProx, inner, config, round_offset=round_offset, reply_template=reply_template)
