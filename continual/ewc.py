"""Elastic weight consolidation on the adapter, for plain and DP-SGD training.

EWC keeps parameters that mattered for earlier tasks near their old values:

    penalty(θ) = strength/2 · Σ_i F_i (θ_i − θ*_i)²

with F the diagonal Fisher information and θ* the parameters after the last
task. Only trainable (LoRA) parameters are covered: the frozen base never
changes, so copying it (as Avalanche's EWCPlugin does) would cost memory for a
zero term. Online EWC (Schwarz et al. 2018) keeps one running Fisher,
F ← decay·F + F_new, and moves the anchor to the newest parameters.

Two ways to get F:

- `compute_fisher`: the empirical Fisher, F_i = (1/N) Σ_n (∂ℓ_n/∂θ_i)², from
  per-example gradients (one forward pass per batch, one backward per example
  with `torch.autograd.grad`; exact, and independent of padding or vmap support).
  It reads the raw data, so under DP it would cost privacy budget.
- `fisher_from_grads` (with `GradSquareAccumulator`): squares of the noisy,
  clipped batch gradients DP-SGD already released. This is post-processing, so
  free in privacy terms, but it estimates a different thing: E[g̃²] = ḡ² + (σC/B)²,
  the squared *batch mean* gradient (smaller than the mean squared per-example
  gradient) plus the noise variance, which is the same for every coordinate and
  can be subtracted (`noise_variance`). Expect a flatter, noisier importance.

Opacus' DP optimizer overwrites ``p.grad`` with the privatised per-example sum,
dropping any loss term outside the per-example criterion (opacus#249). So a DP
loop adds `penalty_gradient` = strength·F·(θ−θ*) to ``p.grad`` *after* the noise
(`dp_step`). This spends no privacy: θ is the model DP already released, θ* an
earlier released model (the global adapter) and F comes from released gradients
(or from the federation's aggregate of them). `aggregate_fisher` is the
server's weighted mean of clients' Fisher (the FedCurv idea).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import torch

from fedcl.atomic import write_bytes
from fedcl.continual.state import StateError, check_same, check_state

KIND = "fedcl.continual.online_ewc"
VERSION = 1
Fisher = dict[str, torch.Tensor]  # ordered by parameter name, as model.named_parameters()


def trainable(model: torch.nn.Module) -> "OrderedDict[str, torch.nn.Parameter]":
    """The parameters that train (the adapter), by name, as `fedcl.adapters.adapter_state` orders them."""
    return OrderedDict((n, p) for n, p in model.named_parameters() if p.requires_grad)


@torch.enable_grad()  # callable from evaluation code running under no_grad
def compute_fisher(model: torch.nn.Module, task, records: Sequence[dict], batch_size: int) -> Fisher:
    """Empirical diagonal Fisher of `task.per_example_loss` over `records`, trainable parameters only.

    `task` needs ``encode(records) -> batch`` and ``per_example_loss(model, batch) -> (B,)``
    (`fedcl.tasks` provides both). Dropout is off while it runs; the model's mode is restored.
    """
    if not records:
        raise ValueError("compute_fisher: no records")
    if batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size!r}, expected a positive integer")
    params = trainable(model)
    if not params:
        raise ValueError("compute_fisher: the model has no trainable parameters")
    names, tensors = list(params), list(params.values())
    total = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(records), batch_size):
            losses = task.per_example_loss(model, task.encode(list(records[start:start + batch_size])))
            for i in range(losses.shape[0]):
                grads = torch.autograd.grad(losses[i], tensors, retain_graph=i + 1 < losses.shape[0],
                                            allow_unused=True)
                for acc, grad in zip(total, grads):
                    if grad is not None:
                        acc.add_(grad.detach().float().pow(2))
    finally:
        model.train(was_training)
    return OrderedDict((n, t / len(records)) for n, t in zip(names, total))


class GradSquareAccumulator:
    """Sums the squares of released (DP) gradients, step by step, for `fisher_from_grads`."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = OrderedDict()
        self.count = 0

    def add(self, model: torch.nn.Module) -> None:
        """Read ``p.grad`` of every trainable parameter (call right after the noise is added)."""
        for name, p in trainable(model).items():
            if p.grad is None:
                continue
            square = p.grad.detach().float().pow(2)
            self.sums[name] = self.sums[name] + square if name in self.sums else square.clone()
        self.count += 1


def fisher_from_grads(grad_sq_sum: dict[str, torch.Tensor], count: int, *,
                      noise_variance: float = 0.0) -> Fisher:
    """Mean squared released gradient per coordinate, minus `noise_variance`, floored at 0.

    `noise_variance` is (noise_multiplier · max_grad_norm / expected_batch_size)²
    for Opacus' mean reduction; 0 keeps the raw (upward-biased) estimate.
    """
    if count < 1:
        raise ValueError(f"count: got {count!r}, expected a positive number of steps")
    if noise_variance < 0:
        raise ValueError(f"noise_variance: got {noise_variance!r}, expected >= 0")
    return OrderedDict((n, (t.float() / count - noise_variance).clamp_min(0.0)) for n, t in grad_sq_sum.items())


def aggregate_fisher(fishers: Iterable[tuple[dict[str, torch.Tensor], float]]) -> Fisher:
    """Weighted mean Σ w_k F_k / Σ w_k of clients' Fisher (weights: e.g. example counts)."""
    fishers = list(fishers)
    if not fishers:
        raise ValueError("aggregate_fisher: no Fisher to aggregate")
    reference = fishers[0][0]
    total_weight = 0.0
    out = OrderedDict((n, torch.zeros_like(t, dtype=torch.float32)) for n, t in reference.items())
    for k, (fisher, weight) in enumerate(fishers):
        if weight < 0:
            raise ValueError(f"aggregate_fisher: weight {k} is {weight!r}, expected >= 0")
        if list(fisher) != list(reference) or any(fisher[n].shape != reference[n].shape for n in reference):
            raise ValueError(f"aggregate_fisher: Fisher {k} has other parameter names or shapes than Fisher 0")
        for name, t in fisher.items():
            out[name].add_(t.float(), alpha=float(weight))
        total_weight += float(weight)
    if total_weight <= 0:
        raise ValueError("aggregate_fisher: the weights sum to 0")
    return OrderedDict((n, t / total_weight) for n, t in out.items())


def check_importance(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> str | None:
    """Why an importance cannot be used (None if it can): names, shapes, finite and >= 0."""
    if list(state) != list(reference):
        missing = sorted(set(reference) - set(state))[:2]
        extra = sorted(set(state) - set(reference))[:2]
        return f"importance names differ from the adapter's (missing {missing}, unexpected {extra})"
    for name, t in state.items():
        if t.shape != reference[name].shape:
            return f"importance {name}: shape {tuple(t.shape)}, expected {tuple(reference[name].shape)}"
        if not torch.isfinite(t).all():
            return f"importance {name}: non-finite values"
        if (t < 0).any():
            return f"importance {name}: negative values (an importance is a mean of squares)"
    return None


class OnlineEWC:
    """Running Fisher and anchor over tasks; `penalty` for plain training, `penalty_gradient` for DP."""

    def __init__(self, strength: float, decay: float = 1.0):
        if not strength >= 0:
            raise ValueError(f"strength: got {strength!r}, expected a number >= 0")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay: got {decay!r}, expected a float in [0, 1]")
        self.strength, self.decay = float(strength), float(decay)
        self.fisher: Fisher = OrderedDict()
        self.anchor: Fisher = OrderedDict()
        self.tasks_seen = 0

    def after_task(self, model: torch.nn.Module, fisher: dict[str, torch.Tensor]) -> None:
        """F ← decay·F + fisher (F = fisher the first time); θ* ← the model's trainable parameters now."""
        params = trainable(model)
        if set(fisher) != set(params):
            raise ValueError(f"after_task: Fisher names differ from the trainable parameters "
                             f"(missing {sorted(set(params) - set(fisher))[:3]}, "
                             f"unexpected {sorted(set(fisher) - set(params))[:3]})")
        new = OrderedDict((n, fisher[n].detach().float().clone()) for n in params)
        if self.fisher:
            new = OrderedDict((n, self.decay * self.fisher[n] + t) for n, t in new.items())
        self.fisher = new
        self.anchor = OrderedDict((n, p.detach().float().clone()) for n, p in params.items())
        self.tasks_seen += 1

    def _pairs(self, model: torch.nn.Module):
        params = trainable(model)
        missing = [n for n in self.fisher if n not in params]
        if missing:
            raise ValueError(f"EWC: the model lacks trainable parameters {missing[:3]} it was anchored on")
        return [(params[n], self.fisher[n], self.anchor[n]) for n in self.fisher]

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """strength/2 · Σ F (θ − θ*)² (a zero tensor before the first task)."""
        total = torch.zeros(())
        for p, f, a in self._pairs(model):
            total = total + (f.to(p) * (p - a.to(p)).pow(2)).sum()
        return 0.5 * self.strength * total

    @torch.no_grad()
    def penalty_gradient(self, model: torch.nn.Module) -> Fisher:
        """∂penalty/∂θ = strength · F · (θ − θ*), by parameter name."""
        params = trainable(model)
        return OrderedDict((n, self.strength * f.to(params[n]) * (params[n] - a.to(params[n])))
                           for (n, f), a in zip(self.fisher.items(), self.anchor.values()))

    @torch.no_grad()
    def add_penalty_gradient(self, model: torch.nn.Module) -> None:
        """p.grad += penalty_gradient: call after the DP optimizer's noise, before its inner step."""
        if not self.fisher:
            return
        self._pairs(model)  # name check
        params = trainable(model)
        for name, grad in self.penalty_gradient(model).items():
            p = params[name]
            p.grad = grad.clone() if p.grad is None else p.grad.add_(grad)

    # -- state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"kind": KIND, "version": VERSION, "strength": self.strength, "decay": self.decay,
                "tasks_seen": self.tasks_seen, "fisher": OrderedDict(self.fisher),
                "anchor": OrderedDict(self.anchor)}

    def load_state_dict(self, state: dict, source: str = "EWC state") -> None:
        check_state(state, KIND, VERSION, source)
        check_same(source, "strength", float(state["strength"]), self.strength)
        check_same(source, "decay", float(state["decay"]), self.decay)
        if list(state["fisher"]) != list(state["anchor"]):
            raise StateError(f"{source}: Fisher and anchor name different parameters")
        self.fisher = OrderedDict((n, t.float().clone()) for n, t in state["fisher"].items())
        self.anchor = OrderedDict((n, t.float().clone()) for n, t in state["anchor"].items())
        self.tasks_seen = int(state["tasks_seen"])

    def save(self, path: str | Path) -> Path:
        """Write the state as one safetensors file (metadata holds kind and settings), atomically."""
        from safetensors.torch import save as to_bytes

        tensors = {f"fisher.{n}": t.contiguous() for n, t in self.fisher.items()}
        tensors.update({f"anchor.{n}": t.contiguous() for n, t in self.anchor.items()})
        meta = {"kind": KIND, "version": str(VERSION), "strength": repr(self.strength),
                "decay": repr(self.decay), "tasks_seen": str(self.tasks_seen),
                "names": "\n".join(self.fisher)}
        return write_bytes(path, to_bytes(tensors, metadata=meta))

    def load(self, path: str | Path) -> None:
        """Restore a state written by `save`; refuses another kind, version or setting."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            names = [n for n in meta.get("names", "").split("\n") if n]
            try:
                fisher = OrderedDict((n, handle.get_tensor(f"fisher.{n}")) for n in names)
                anchor = OrderedDict((n, handle.get_tensor(f"anchor.{n}")) for n in names)
            except Exception as err:  # safetensors raises its own error types for missing keys
                raise StateError(f"{path}: incomplete EWC state ({err})") from None
        version = int(meta["version"]) if meta.get("version", "").isdigit() else meta.get("version")
        state = {"kind": meta.get("kind"), "version": version, "strength": float(meta.get("strength", "nan")),
                 "decay": float(meta.get("decay", "nan")), "tasks_seen": int(meta.get("tasks_seen", "0")),
                 "fisher": fisher, "anchor": anchor}
        self.load_state_dict(state, source=str(path))
