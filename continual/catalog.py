"""The continual method a config names: `make_method(cfg)`.

Each name of ``continual.strategy`` maps to a builder of one method object
(`fedcl.continual.methods`); an ``avalanche:<Plugin>`` name builds the bridge to
Avalanche's plugin (`fedcl.continual.avalanche_bridge`, imported only then:
Avalanche's import chain takes seconds).
"""

from __future__ import annotations

from typing import Callable

from fedcl.config import ContinualConfig, TrainConfig, avalanche_plugin
from fedcl.continual.methods import EWC, Combined, Method, Naive, Replay


def _replay(cfg: ContinualConfig, seed: int) -> Replay:
    return Replay(cfg.replay_capacity, cfg.replay_ratio, seed, cfg.replay_balanced)


def _ewc(cfg: ContinualConfig, seed: int) -> EWC:
    return EWC(cfg.ewc_strength, cfg.ewc_decay, cfg.fisher_batch_size)


METHODS: dict[str, Callable[[ContinualConfig, int], Method]] = {
    "naive": lambda cfg, seed: Naive(),
    "replay": _replay,
    "ewc": _ewc,
    "replay+ewc": lambda cfg, seed: Combined([_replay(cfg, seed), _ewc(cfg, seed)]),
}


def make_method(cfg: ContinualConfig, seed: int = 0, train: TrainConfig | None = None) -> Method:
    """A fresh method object for `cfg.strategy` (`fedcl.config`'s [continual] section,
    which validates the name); `seed` drives replay's draws (e.g. per node); `train`
    sizes an Avalanche strategy's batches and optimiser."""
    plugin = avalanche_plugin(cfg.strategy)
    if plugin is not None:
        from fedcl.continual.avalanche_bridge import AvalancheMethod

        return AvalancheMethod(plugin, cfg, train or TrainConfig())
    return METHODS[cfg.strategy](cfg, seed)
