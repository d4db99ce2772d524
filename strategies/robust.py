"""Byzantine-robust aggregation of adapter states: coordinate-wise median,
trimmed mean, and (Multi-)Krum, each Flower's own with fedcl's bookkeeping.

Flower aggregates the clients' full adapter states; since every reply is
measured from the same global, that is the robust aggregate of the updates
shifted by the global (median, trimmed mean) or the same selection (Krum's
pairwise distances are distances between updates).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, MultiKrum

from strategies.lora import LoraStrategy, finish, flower_kwargs


class LoraMedian(LoraStrategy, FedMedian):
    pass


class LoraTrimmedMean(LoraStrategy, FedTrimmedAvg):
    pass


class LoraKrum(LoraStrategy, MultiKrum):
    pass


def build_median(config, *, round_offset: int = 0, reply_template: dict | None = None) -> LoraMedian:
    return finish(LoraMedian(**flower_kwargs(config)), config, round_offset=round_offset,
                  reply_template=reply_template)


def build_trimmed_mean(config, *, round_offset: int = 0, reply_template: dict | None = None) -> LoraTrimmedMean:
    strategy = LoraTrimmedMean(**flower_kwargs(config), beta=config.strategy.trim_fraction)
    return finish(strategy, config, round_offset=round_offset, reply_template=reply_template)


def build_krum(config, *, round_offset: int = 0, reply_template: dict | None = None) -> LoraKrum:
    s, sampled = config.strategy, config.federation.sampled
    if s.krum_keep > sampled:
        raise ValueError(f"strategy.krum_keep: got {s.krum_keep}, expected at most the "
                         f"{sampled} clients sampled per round")
    strategy = LoraKrum(**flower_kwargs(config), num_malicious_nodes=s.num_malicious,
                        num_nodes_to_select=s.krum_keep)
    return finish(strategy, config, round_offset=round_offset, reply_template=reply_template)
