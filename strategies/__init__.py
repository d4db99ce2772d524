"""Aggregation strategies on Flower's strategy interface, selectable by name.

Every builder takes the run's config and returns a `strategies.strategy.FedclStrategy`:
one Flower `Strategy` holding an inner Flower strategy for the aggregation
math and the parts fedcl adds (round bookkeeping, reply screening, and, when
the run asks for them, federated importance and client-level DP).
`reply_template` is the clients' trainable adapter state at its seeded init:
what a reply must look like.
"""

from __future__ import annotations

from fedcl.strategies import client_dp, fedavg, fedopt, flora, robust
from fedcl.strategies.strategy import FedclStrategy

BUILDERS = {
    "fedavg": fedavg.build,
    "ffa-lora": fedavg.build_ffa_lora,
    "flora": flora.build_flora,
    "fedprox": fedavg.build_fedprox,
    "fedadam": fedopt.build_fedadam,
    "fedyogi": fedopt.build_fedyogi,
    "fedavgm": fedopt.build_fedavgm,
    "median": robust.build_median,
    "trimmed-mean": robust.build_trimmed_mean,
    "krum": robust.build_krum,
}


def build_strategy(config, *, round_offset: int = 0, reply_template: dict | None = None) -> FedclStrategy:
    """The strategy named by `config.strategy.name`, resumed at `round_offset`.

    With client-level DP on (privacy.mode = "client") it is that strategy's
    equally weighted, clipped and noised variant (strategies/client_dp.py).
    """
    if config.privacy.enabled and config.privacy.mode == "client":
        return client_dp.build(config, round_offset=round_offset, reply_template=reply_template)
    try:
        builder = BUILDERS[config.strategy.name]
    except KeyError:
        raise ValueError(f"strategy.name: got {config.strategy.name!r}, expected one of "
                         f"{', '.join(BUILDERS)}") from None
    return builder(config, round_offset=round_offset, reply_template=reply_template)
