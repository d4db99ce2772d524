"""Loss terms a client adds to its local objective, as `penalty(model) -> Tensor`.

`train_local`'s `extra_loss` hook takes one of these. Nothing here imports Flower.
"""

from __future__ import annotations

from typing import Callable

import torch


def proximal_term(global_state: dict[str, torch.Tensor], *, mu: float) -> Callable[[torch.nn.Module], torch.Tensor]:
    """FedProx: mu/2 * ||w - w_global||^2 over the trainable parameters named in `global_state`.

    It keeps a client's adapter near the round's global one when client data
    differ; the reference is copied so later changes to `global_state` do not leak in.
    """
    anchors = {name: t.detach().clone() for name, t in global_state.items()}

    def penalty(model: torch.nn.Module) -> torch.Tensor:
        total = None
        for name, param in model.named_parameters():
            if param.requires_grad and name in anchors:
                term = (param - anchors[name].to(param)).pow(2).sum()  # param's dtype and device
                total = term if total is None else total + term
        if total is None:
            raise ValueError("proximal_term: no trainable parameter matches the global state")
        return 0.5 * mu * total

    return penalty
