"""Where a node's tensors live and in which precision: `model.device` and `model.compute_dtype`.

`resolve_device(spec)` turns ``model.device`` ("auto", "cpu", "cuda",
"cuda:N") into a `torch.device`; "auto" is CUDA when torch sees a CUDA
device and the CPU otherwise. Asking for CUDA where torch sees none raises
`DeviceError` naming the device, which every command runs (`fedcl.ops.preflight`)
before it writes anything.

`base_dtype(model_cfg, device)` is the frozen base's weight dtype: on CUDA
bfloat16 or float16 halve its memory and use the tensor cores, while the
trainable LoRA factors and the optimiser state stay float32 (PEFT casts a
layer's input to the adapter's dtype and the sum back to the base's). On the
CPU the base stays float32 and ``bfloat16`` means autocast (`fedcl.train.autocast`),
as before. float16's narrow range can underflow the gradients flowing back
through the base, so it trains with loss scaling (`needs_loss_scaling`):
`torch.amp.GradScaler` without DP, `scale_for_dp` with DP.

`enable_checkpointing(model)` turns on activation checkpointing in the
decoder layers, reentrant: it is the variant under which Opacus' per-sample
hooks see each layer's forward exactly once (the first, gradient-free pass
registers nothing; the recomputation registers what the backward pass
consumes). The non-reentrant variant fires the forward hooks twice and the
backward hooks not at all: no per-sample gradients (checked in
tests/test_device.py).

Plain PyTorch; no flwr import.
"""

from __future__ import annotations

import re

import torch

from fedcl.config import ModelConfig

_CUDA = re.compile(r"cuda(?::(\d+))?")


class DeviceError(ValueError):
    """`model.device` or `model.compute_dtype` cannot be honoured on this machine."""


def cuda_summary() -> str:
    """What torch says about CUDA here, for error messages."""
    built = torch.version.cuda or "none"
    return f"torch {torch.__version__} (built for CUDA {built}) sees {torch.cuda.device_count()} CUDA device(s)"


def resolve_device(spec: str, *, key: str = "model.device") -> torch.device:
    """The device `spec` names on this machine; DeviceError when it is not there."""
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(spec)
    if match is None:
        raise DeviceError(f"{key}: got {spec!r}, expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"{key}: got {spec!r}, but no CUDA device is available here "
                          f"({cuda_summary()}); use {key}=cpu, or auto to take a GPU only where there is one")
    index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceError(f"{key}: got {spec!r}, but {cuda_summary()}; expected cuda:0.."
                          f"cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def base_dtype(model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The frozen base's weight dtype for `model.compute_dtype` on `device` (see the module docstring)."""
    if device.type == "cpu":
        if model_cfg.compute_dtype == "float16":
            raise DeviceError("model.compute_dtype: got 'float16', which needs a CUDA device (model.device "
                              f"is {model_cfg.device!r}, here the CPU); on the CPU use float32 or bfloat16")
        return torch.float32  # bfloat16 on the CPU is autocast, not a cast of the weights
    if model_cfg.compute_dtype == "bfloat16" and device.type == "cuda" and \
            not torch.cuda.is_bf16_supported(including_emulation=False):
        raise DeviceError(f"model.compute_dtype: got 'bfloat16', but {torch.cuda.get_device_name(device)} "
                          "has no bfloat16 arithmetic; use float16 (trained with loss scaling) or float32")
    return getattr(torch, model_cfg.compute_dtype)


def check(model_cfg: ModelConfig) -> torch.device:
    """`model.device` and `model.compute_dtype` can be honoured here; the device. Raises DeviceError."""
    device = resolve_device(model_cfg.device)
    base_dtype(model_cfg, device)
    return device


def needs_loss_scaling(model_cfg: ModelConfig) -> bool:
    """float16 on an accelerator: gradients through the base need scaling against underflow."""
    return model_cfg.compute_dtype == "float16"


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's weights are on (its first parameter's)."""
    return next(model.parameters()).device


def enable_checkpointing(model) -> None:
    """Reentrant activation checkpointing in every decoder layer of a (PEFT-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise DeviceError(f"model.gradient_checkpointing: {type(base).__name__} does not support "
                          "activation checkpointing; set model.gradient_checkpointing = false")
    # Also makes the embedding output require grad: reentrant checkpointing passes
    # gradients only to a layer whose input requires them.
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})


def checkpointing_on(module: torch.nn.Module) -> bool:
    """Whether any layer under `module` recomputes its activations in the backward pass."""
    return any(getattr(m, "gradient_checkpointing", False) for m in module.modules())


def device_facts(model: torch.nn.Module, model_cfg: ModelConfig) -> dict:
    """What a run's metrics record about where and how a model computes."""
    device = model_device(model)
    facts = {"device": str(device), "device_setting": model_cfg.device,
             "compute_dtype": model_cfg.compute_dtype,
             "base_dtype": str(next(p for n, p in model.named_parameters() if "lora_" not in n).dtype),
             "gradient_checkpointing": model_cfg.gradient_checkpointing}
    if device.type == "cuda":
        facts["device_name"] = torch.cuda.get_device_name(device)
    return facts


# -- float16 loss scaling under DP-SGD ----------------------------------------
# GradScaler unscales p.grad, but Opacus clips the per-sample gradients
# (p.grad_sample) before any p.grad exists, and a scaled one would be clipped at
# scale x C. So DP training scales the loss itself, divides the per-sample
# gradients back before the optimizer clips them, and on an overflow (inf/NaN)
# recomputes the same micro-batch at half the scale: the released step is the
# same function of the same batch, so privacy is unchanged.
DP_INITIAL_SCALE = 2.0 ** 16


def unscale_grad_samples(params: list[torch.nn.Parameter], scale: float) -> bool:
    """Divide each parameter's per-sample gradients by `scale`; False (and cleared) on inf/NaN."""
    finite = True
    for p in params:
        sample = getattr(p, "grad_sample", None)
        if sample is None:
            continue
        parts = sample if isinstance(sample, list) else [sample]
        for part in parts:
            part.div_(scale)
            finite = finite and bool(torch.isfinite(part).all())
    if not finite:
        for p in params:
            p.grad_sample = None
            p.grad = None
    return finite
