"""How the global adapter state maps onto a node's LoRA model.

The strategy decides what the global state is (`StrategyConfig.adapter_layout`):

- ``lora``: the trainable LoRA factors themselves (FedAvg and its relatives);
- ``frozen-a``: the same with every lora_A frozen at the seeded init, so the
  state that trains, travels and is aggregated holds only the lora_B factors
  (FFA-LoRA); saved adapters still carry A, which never leaves its init;
- ``residual``: the merged FLoRA residual (see `fedcl.flora`); the client
  trains a fresh LoRA from the seeded init on top of it.

A layout knows how to load a global state into the model (returning the
trainable state training starts from, which is what a client's update is
measured against), and how to save and re-read it. Nothing here imports Flower.
"""

from __future__ import annotations

from pathlib import Path

from fedcl import adapters, flora
from fedcl.atomic import write_dir


class LoraLayout:
    """The global state is the trainable adapter state."""

    freeze_lora_a = False

    def prepare(self, model) -> None:
        if self.freeze_lora_a:
            for name, param in model.named_parameters():
                if ".lora_A." in name:
                    param.requires_grad_(False)

    def initial_global(self, trainable: dict) -> dict:
        return trainable

    def update_start(self, state: dict, trainable_init: dict) -> dict:
        """The trainable state a client starts from, given the global `state`."""
        return state

    def load(self, model, state: dict, trainable_init: dict, source: str) -> dict:
        adapters.load_adapter_state(model, state, source=source)
        return state

    def save(self, model, state: dict, target: Path) -> None:
        adapters.save_adapter(model, state, target)

    def read(self, model, source: Path) -> dict:
        """The global state saved in `source`, in the model's trainable naming."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        before = adapters.adapter_state(model)
        set_peft_model_state_dict(model, load_file(str(Path(source) / "adapter_model.safetensors")))
        state = adapters.adapter_state(model)
        adapters.load_adapter_state(model, before)
        return state


class FrozenALayout(LoraLayout):
    freeze_lora_a = True


class ResidualLayout(LoraLayout):
    """The global state is the FLoRA residual; the trained LoRA restarts each round."""

    def initial_global(self, trainable: dict) -> dict:
        return flora.zero_residual(trainable)

    def update_start(self, state: dict, trainable_init: dict) -> dict:
        return trainable_init

    def load(self, model, state: dict, trainable_init: dict, source: str) -> dict:
        try:
            flora.apply_residual(model, state)
        except (ValueError, RuntimeError) as err:
            raise adapters.AdapterError(f"{source}: {err}") from None
        adapters.load_adapter_state(model, trainable_init, source="seeded LoRA init")
        return trainable_init

    def save(self, model, state: dict, target: Path) -> None:
        write_dir(target, lambda tmp: flora.save_residual(model, state, tmp))

    def read(self, model, source: Path) -> dict:
        return flora.load_residual(source)


LAYOUTS = {"lora": LoraLayout(), "frozen-a": FrozenALayout(), "residual": ResidualLayout()}


def get_layout(name: str) -> LoraLayout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"adapter layout: got {name!r}, expected one of {', '.join(LAYOUTS)}") from None
