"""Byzantine-robust aggregation of adapter states: coordinate-wise median,
trimmed mean, and (Multi-)Krum, each Flower's own inside a fedcl strategy.

Flower aggregates the clients' full adapter states; since every reply is
measured from the same global, that is the robust aggregate of the updates
shifted by the global (median, trimmed mean) or the same selection (Krum's
pairwise distances are distances between updates).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, MultiKrum

from fedcl.strategies.strategy import FedclStrategy, compose, flower_kwargs


class LoraMedian(FedclStrategy):
    """Flower's FedMedian: the coordinate-wise median of the clients' states."""


class LoraTrimmedMean(FedclStrategy):
    """Flower's FedTrimmedAvg: the mean after cutting `strategy.trim_fraction` off each end."""


class LoraKrum(FedclStrategy):
    """Flower's MultiKrum: the mean of the `strategy.krum_keep` most central replies."""


def build_median(config, *, round_offset: int = 0, reply_template: dict | None = None) -> FedclStrategy:
    return compose(LoraMedian, FedMedian(**flower_kwargs(config)), config, round_offset=round_offset,
                   reply_template=reply_template)


def build_trimmed_mean(config, *, round_offset: int = 0, reply_template: dict | None = None) -> FedclStrategy:
    inner = FedTrimmedAvg(**flower_kwargs(config), beta=config.strategy.trim_fraction)
    return compose(LoraTrimmedMean, inner, config, round_offset=round_offset, reply_template=reply_template)


def build_krum(config, *, round_offset: int = 0, reply_template: dict | None = None) -> FedclStrategy:
    s, sampled = config.strategy, config.federation.sampled
    if s.krum_keep > sampled:
        raise ValueError(f"strategy.krum_keep: got {s.krum_keep}, expected at most the "
                         f"{sampled} clients sampled per round")
    inner = MultiKrum(**flower_kwargs(config), num_malicious_nodes=s.num_malicious,
                      num_nodes_to_select=s.krum_keep)
    return compose(LoraKrum, inner, config, round_offset=round_offset, reply_template=reply_template)
