"""The client-level DP strategies (``privacy.mode = "client"``): FedAvg, FFA-LoRA and FedProx
with the `strategies.dp.ClientLevelDP` part (clip, equal weights, noise; see there).

`build` is what `strategies.build_strategy` returns under client-level DP. The
plan is `fedcl.privacy.accounting.client_level_plan(config)`, fixed before
round 1; tests may pass their own `plan` and `rng`.
"""

from __future__ import annotations

from logging import INFO, WARNING

import numpy as np
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.supercore import log

from fedcl.config import ConfigError
from fedcl.privacy.accounting import ClientDPPlan, client_level_plan
from fedcl.strategies.dp import ClientLevelDP
from fedcl.strategies.strategy import FedclStrategy, compose, flower_kwargs

# Below this many clients per round the noise (std ~ clip / n) swamps the mean update.
FEW_CLIENTS = 20


class ClientDPFedAvg(FedclStrategy):
    """FedAvg, equally weighted, with client-level DP."""


class ClientDPFfaLora(FedclStrategy):
    """FFA-LoRA (only lora_B travels) with client-level DP."""


class ClientDPFedProx(FedclStrategy):
    """FedProx (server side: FedAvg) with client-level DP."""


KINDS: dict[str, type[FedclStrategy]] = {
    "fedavg": ClientDPFedAvg, "ffa-lora": ClientDPFfaLora, "fedprox": ClientDPFedProx}


def build(config, *, round_offset: int = 0, reply_template: dict | None = None,
          plan: ClientDPPlan | None = None, rng: np.random.Generator | None = None) -> FedclStrategy:
    """The client-level DP strategy for `config.strategy.name` (`plan`, `rng`: tests may fix them)."""
    name = config.strategy.name
    if name not in KINDS:
        raise ConfigError(f"strategy.name: got {name!r}, expected one of {', '.join(KINDS)} with "
                          'privacy.mode = "client" (the noise is calibrated to a plain average)')
    plan = plan or client_level_plan(config)
    inner = (FedProx(**flower_kwargs(config), proximal_mu=config.strategy.proximal_mu) if name == "fedprox"
             else FedAvg(**flower_kwargs(config)))
    strategy = compose(KINDS[name], inner, config, round_offset=round_offset, reply_template=reply_template,
                       client_dp=ClientLevelDP(plan, rng))
    if plan.num_sampled < FEW_CLIENTS:
        log(WARNING, "client-level DP with %d clients per round: the noise std (noise %.3g x clip %.3g / %d) "
            "is large next to the mean update; it needs many clients", plan.num_sampled,
            plan.noise_multiplier, plan.clip, plan.num_sampled)
    log(INFO, "client-level DP | noise %.4g | clip %.4g | q %.3g | epsilon after %d rounds %.4g at delta %g",
        plan.noise_multiplier, plan.clip, plan.sample_rate, plan.rounds, plan.epsilon_after(plan.rounds),
        plan.delta)
    return strategy
