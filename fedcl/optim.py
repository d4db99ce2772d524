"""The one place a node's optimiser is built from the training config.

Plain training (`fedcl.train`), DP-SGD (`fedcl.privacy.dpsgd`, which wraps
it in Opacus' DPOptimizer) and Avalanche's strategies
(`fedcl.continual.avalanche_bridge`) all train with what this returns, so a
change of optimiser or of how `train.lr` and `train.weight_decay` reach it is
made here once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedcl.config import TrainConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over `params` at `train.lr` with `train.weight_decay`."""
    return torch.optim.AdamW(list(params), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
