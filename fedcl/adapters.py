"""The adapter: the only part of the model that trains, travels and is saved.

An adapter state is an ordered ``{name: float32 CPU tensor}`` of the
trainable parameters, with names independent of the PEFT adapter name so that
every node's state lines up, whatever device (model.device) trained it. Saving writes PEFT's own format (loadable with
``PeftModel.from_pretrained``) atomically.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from fedcl.atomic import write_dir


class AdapterError(ValueError):
    """An adapter state does not match the model it is meant for."""


def adapter_state(model) -> "OrderedDict[str, torch.Tensor]":
    """Detached float32 copies of the trainable parameters on the CPU, in a fixed order."""
    return OrderedDict(
        (name, p.detach().to(device="cpu", dtype=torch.float32, copy=True))
        for name, p in model.named_parameters() if p.requires_grad
    )


def check_schema(reference: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                 source: str = "adapter") -> None:
    """Raise AdapterError unless `state` has exactly the reference's names and shapes, all finite."""
    missing = [k for k in reference if k not in state]
    extra = [k for k in state if k not in reference]
    if missing or extra:
        raise AdapterError(
            f"{source}: parameter names do not match the model "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
        )
    for name, ref in reference.items():
        value = state[name]
        if tuple(value.shape) != tuple(ref.shape):
            raise AdapterError(f"{source}: {name} has shape {tuple(value.shape)}, "
                               f"the model expects {tuple(ref.shape)}")
        if not torch.isfinite(value).all():
            raise AdapterError(f"{source}: {name} holds non-finite values")


@torch.no_grad()
def load_adapter_state(model, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy `state` into the model's trainable parameters after checking its schema."""
    params = OrderedDict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    check_schema(params, state, source)
    for name, p in params.items():
        p.copy_(state[name].to(p.dtype))  # copy_ moves it onto the parameter's device


def save_adapter(model, state: dict[str, torch.Tensor], target: str | Path) -> Path:
    """Write `state` in PEFT's format to `target`, atomically: all or nothing."""
    load_adapter_state(model, state)
    return write_dir(target, lambda tmp: model.save_pretrained(str(tmp)))


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
