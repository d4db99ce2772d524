"""FLoRA-style exact aggregation of LoRA products, as a merged "residual" adapter.

FedAvg over factors computes mean(B) mean(A), which is not the mean of the
clients' updates B_i A_i. Stacking is exact: concatenating the weighted B_i
along the rank axis and the A_i likewise gives [w_1 B_1 .. w_K B_K] [A_1; ..; A_K]
= sum_i w_i B_i A_i, for any mix of client ranks.

In fedcl the global model is ``W0 + R`` per adapted layer, where the residual
``R = B_res A_res`` holds every round's stacked product. Each round every
client folds R into its base weights (from a pristine copy, so nothing depends
on which rounds a node saw), trains a fresh LoRA from the seeded init and sends
that back. The server stacks the replies onto R and re-factorises the result
exactly (QR + SVD, dropping only numerically zero directions), so R's rank
never exceeds min(out, in). The residual is saved as a plain PEFT LoRA adapter
with r = its rank and lora_alpha = r (scaling 1): ``PeftModel.from_pretrained``
then reproduces ``W0 + R`` exactly.

Nothing here imports Flower.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path

import torch

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (B, A)

# Singular values below this fraction of the largest are numerical noise of the
# float64 re-factorisation, not directions of the update.
RELATIVE_RANK_TOL = 1e-9


def split_name(name: str) -> tuple[str, str]:
    """'...q_proj.lora_A.default.weight' -> ('...q_proj', 'A')."""
    for kind in ("A", "B"):
        marker = f".lora_{kind}."
        if marker in name:
            return name.split(marker)[0], kind
    raise ValueError(f"{name!r} is not a LoRA factor (no .lora_A. or .lora_B. in it)")


def factors_of(state: dict[str, torch.Tensor]) -> Factors:
    """Adapter state (trained or residual naming) -> {module: (B, A)}."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        module, kind = split_name(name)
        parts.setdefault(module, {})[kind] = tensor
    return {m: (p["B"], p["A"]) for m, p in parts.items()}


def stack_products(client_factors: list[Factors], weights: list[float], scalings: list[float]) -> Factors:
    """Factors whose product is sum_i w_i s_i B_i A_i exactly (weights normalised to 1)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {weights}")
    stacked = {}
    for module in client_factors[0]:
        bs = [(w / total) * s * f[module][0].double() for f, w, s in zip(client_factors, weights, scalings)]
        stacked[module] = (torch.cat(bs, dim=1), torch.cat([f[module][1].double() for f in client_factors], dim=0))
    return stacked


def refactorise(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with B'A' == BA and rank(B') the numerical rank of BA (at least 1)."""
    b, a = b.double(), a.double()
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    keep = int((s > RELATIVE_RANK_TOL * s.max()).sum()) if s.numel() and s.max() > 0 else 0
    keep = max(keep, 1)  # a zero residual still needs a shape
    return qb @ (u[:, :keep] * s[:keep]), vh[:keep] @ qa.T


def merge(residual: Factors, update: Factors) -> Factors:
    """Residual plus this round's stacked update, re-factorised exactly."""
    return {m: refactorise(torch.cat([residual[m][0].double(), update[m][0]], dim=1),
                           torch.cat([residual[m][1].double(), update[m][1]], dim=0))
            for m in update}


def residual_state(factors: Factors) -> "OrderedDict[str, torch.Tensor]":
    """Factors -> float32 state in PEFT's saved naming, zero-padded to one common rank.

    Zero padding keeps the product exact and lets one PEFT `r` describe every layer.
    """
    rank = max(b.shape[1] for b, _ in factors.values())
    state = OrderedDict()
    for module, (b, a) in factors.items():
        pad = rank - b.shape[1]
        state[f"{module}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).float()
        state[f"{module}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1).float()
    return state


def zero_residual(trainable: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """The starting residual (rank 1, all zeros) for the layers of a LoRA state."""
    return residual_state({m: (b.new_zeros(b.shape[0], 1), a.new_zeros(1, a.shape[1]))
                           for m, (b, a) in factors_of(trainable).items()})


@torch.no_grad()
def apply_residual(model, residual: dict[str, torch.Tensor]) -> None:
    """Set each adapted layer's base weight to pristine W0 + B_res A_res."""
    pristine = _pristine_weights(model)
    for module, (b, a) in factors_of(residual).items():
        if module not in pristine:
            raise ValueError(f"residual names layer {module!r}, which the model does not adapt")
        base = model.get_submodule(module).get_base_layer()
        # A new Parameter, never an in-place write: `models.load_base` shares
        # base weight storage between every model in the process.
        delta = (b.double() @ a.double()).to(pristine[module].device)  # the residual travels on the CPU
        merged = (pristine[module].double() + delta).to(pristine[module].dtype)
        base.weight = torch.nn.Parameter(merged, requires_grad=False)


def _pristine_weights(model) -> dict[str, torch.Tensor]:
    # Kept on the model: a simulated node shares one model across clients, and
    # every residual must be applied to W0, never on top of a previous one.
    if not hasattr(model, "_fedcl_pristine"):
        modules = {split_name(n)[0] for n, _ in model.named_parameters() if ".lora_" in n}
        model._fedcl_pristine = {m: model.get_submodule(m).get_base_layer().weight.detach()
                                 for m in sorted(modules)}
    return model._fedcl_pristine


def save_residual(model, residual: dict[str, torch.Tensor], target: str | Path) -> None:
    """Write the residual as a PEFT LoRA adapter (r = its rank, scaling 1) into `target`."""
    from safetensors.torch import save_file

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    rank = next(t.shape[0] for n, t in residual.items() if ".lora_A." in n)
    base_cfg = model.peft_config["default"]
    cfg = dataclasses.replace(base_cfg, r=rank, lora_alpha=rank, use_rslora=False,
                              rank_pattern={}, alpha_pattern={})
    cfg.save_pretrained(str(target))
    save_file({k: v.contiguous() for k, v in residual.items()}, str(target / "adapter_model.safetensors"))


def load_residual(source: str | Path) -> "OrderedDict[str, torch.Tensor]":
    from safetensors.torch import load_file

    return OrderedDict(sorted(load_file(str(Path(source) / "adapter_model.safetensors")).items()))
