"""Model shapes without weights: published configs and analytic parameter counts.

`fedcl plan` sizes a run before anything is loaded, so it needs a model's
shape, not its weights. `SHAPES` holds the published ``config.json`` values
of real models (DeepSeek's among them) that fedcl can plan for but does not
ship; `shape_config(name)` builds their transformers config object, which
costs no memory. `layer_linears(config, i)` lists decoder layer i's Linear
modules (what LoRA can wrap) and `count_params(config)` counts parameters
from the config alone, total and active per token (a mixture of experts
runs only its routed top-k), exactly as transformers builds the model (the
tests compare it with the built tiny models, parameter for parameter).
`activation_elements` and `transient_elements` count what
a training step's autograd keeps per token from the same shapes (the plan's
activations; the tests compare them with saved-tensor hooks).

Covers the architectures fedcl trains: llama, qwen2, deepseek_v2 and
deepseek_v3 (multi-head latent attention, mixture of experts). Plain
transformers configs; no weights, no flwr import.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
)

_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "deepseek_v2": DeepseekV2Config,
            "deepseek_v3": DeepseekV3Config}
ARCHITECTURES = tuple(_CONFIGS)


class ShapeError(ValueError):
    """An unknown shape name or an architecture `count_params` does not cover."""


@dataclass(frozen=True)
class Shape:
    model_type: str
    description: str
    settings: dict
    # The size the model is published as (parameters), for the tests and the plan's output.
    published_params: float
    published_active: float = 0.0


# The published config.json values of each model (only the keys that decide its
# shape; everything else is the transformers default, which does not change a
# parameter count). Where transformers' default config class differs, it says so.
_DEEPSEEK_V2_LITE = dict(
    hidden_size=2048, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
    intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2,
    num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=102400,
    n_group=1, topk_group=1, tie_word_embeddings=False)
_DEEPSEEK_V3 = dict(
    hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
    intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
    num_experts_per_tok=8, first_k_dense_replace=3, kv_lora_rank=512, q_lora_rank=1536,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=129280,
    n_group=8, topk_group=4, tie_word_embeddings=False)


def _qwen2(hidden: int, layers: int, heads: int, kv: int, intermediate: int, vocab: int) -> dict:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, intermediate_size=intermediate, vocab_size=vocab,
                tie_word_embeddings=False)


SHAPES: dict[str, Shape] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct config.json: the built-in smollm2-135m.
    "smollm2-135m": Shape("llama", "SmolLM2-135M (the built-in model's shape)", dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True), 135e6),
    # deepseek-ai/deepseek-llm-7b-base config.json. LlamaConfig's defaults are
    # Llama-2-7B's: 32 layers and a 32000 vocabulary, where DeepSeek has 30 and 102400.
    "deepseek-llm-7b": Shape("llama", "DeepSeek-LLM 7B", dict(
        hidden_size=4096, num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, vocab_size=102400, tie_word_embeddings=False), 6.9e9),
    # deepseek-ai/deepseek-llm-67b-base config.json (grouped-query attention, 8 kv heads).
    "deepseek-llm-67b": Shape("llama", "DeepSeek-LLM 67B", dict(
        hidden_size=8192, num_hidden_layers=95, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=22016, vocab_size=102400, tie_word_embeddings=False), 67e9),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-* config.json. Qwen2Config's defaults
    # (4096 hidden, 32 layers, 32 kv heads, 22016 intermediate) match none of them.
    # Untied embeddings, so the sizes the model cards give are 1.78, 7.62, 14.8 and 32.8 B.
    "deepseek-r1-distill-qwen-1.5b": Shape("qwen2", "DeepSeek-R1-Distill-Qwen-1.5B",
                                           _qwen2(1536, 28, 12, 2, 8960, 151936), 1.78e9),
    "deepseek-r1-distill-qwen-7b": Shape("qwen2", "DeepSeek-R1-Distill-Qwen-7B",
                                         _qwen2(3584, 28, 28, 4, 18944, 152064), 7.62e9),
    "deepseek-r1-distill-qwen-14b": Shape("qwen2", "DeepSeek-R1-Distill-Qwen-14B",
                                          _qwen2(5120, 48, 40, 8, 13824, 152064), 14.8e9),
    "deepseek-r1-distill-qwen-32b": Shape("qwen2", "DeepSeek-R1-Distill-Qwen-32B",
                                          _qwen2(5120, 64, 40, 8, 27648, 152064), 32.8e9),
    # deepseek-ai/DeepSeek-V2-Lite config.json. DeepseekV2Config's defaults are the
    # full V2's (4096 hidden, q_lora_rank 1536, moe_intermediate_size 1407,
    # first_k_dense_replace 0), not the Lite's.
    "deepseek-v2-lite": Shape("deepseek_v2", "DeepSeek-V2-Lite (MoE: 64 routed + 2 shared experts, 6 per token)",
                              _DEEPSEEK_V2_LITE, 15.7e9, 2.4e9),
    # deepseek-ai/DeepSeek-V3 config.json; DeepseekV3Config's defaults are these values.
    # 671B is the main model; the published checkpoint adds a 14B multi-token-prediction
    # layer, which transformers does not build and fedcl does not train.
    "deepseek-v3": Shape("deepseek_v3", "DeepSeek-V3 / R1 (MoE: 256 routed + 1 shared expert, 8 per token)",
                         _DEEPSEEK_V3, 671e9, 37e9),
}


def shape_config(name: str) -> PretrainedConfig:
    """The transformers config of shape `name` (see `SHAPES`); no weights."""
    if name not in SHAPES:
        raise ShapeError(f"model.name: {name!r} is not a known shape; shapes: {', '.join(SHAPES)}")
    shape = SHAPES[name]
    return _CONFIGS[shape.model_type](**shape.settings)


@dataclass(frozen=True)
class Linear:
    """One Linear module of a decoder layer; `count` copies (fused experts count as one each)."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False
    count: int = 1
    wrappable: bool = True  # an nn.Linear LoRA can wrap (fused expert tensors are not)
    active: int = 0  # copies a token runs through (mixture of experts); 0: all

    @property
    def params(self) -> int:
        return self.count * (self.in_features * self.out_features + (self.out_features if self.bias else 0))

    @property
    def active_params(self) -> int:
        return self.params * (self.active or self.count) // self.count


def _is_moe(config: PretrainedConfig, index: int) -> bool:
    return config.model_type in ("deepseek_v2", "deepseek_v3") and index >= config.first_k_dense_replace


def _attention(config: PretrainedConfig) -> tuple[list[Linear], int]:
    """The attention's Linear modules and its norm weights beyond the layer's two."""
    h, heads = config.hidden_size, config.num_attention_heads
    if config.model_type in ("llama", "qwen2"):
        dim = getattr(config, "head_dim", None) or h // heads
        kv = config.num_key_value_heads * dim
        qkv_bias = True if config.model_type == "qwen2" else bool(config.attention_bias)
        o_bias = False if config.model_type == "qwen2" else bool(config.attention_bias)
        return [Linear("q_proj", h, heads * dim, qkv_bias), Linear("k_proj", h, kv, qkv_bias),
                Linear("v_proj", h, kv, qkv_bias), Linear("o_proj", heads * dim, h, o_bias)], 0
    bias = bool(config.attention_bias)
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    if config.q_lora_rank is None:
        query, norms = [Linear("q_proj", h, heads * qk)], 0
    else:
        query = [Linear("q_a_proj", h, config.q_lora_rank, bias), Linear("q_b_proj", config.q_lora_rank, heads * qk)]
        norms = config.q_lora_rank
    return query + [
        Linear("kv_a_proj_with_mqa", h, config.kv_lora_rank + config.qk_rope_head_dim, bias),
        Linear("kv_b_proj", config.kv_lora_rank, heads * (config.qk_nope_head_dim + config.v_head_dim)),
        Linear("o_proj", heads * config.v_head_dim, h, bias),
    ], norms + config.kv_lora_rank


def _mlp(config: PretrainedConfig, index: int) -> list[Linear]:
    h = config.hidden_size
    bias = bool(getattr(config, "mlp_bias", False)) and config.model_type in ("llama", "deepseek_v2")
    if not _is_moe(config, index):
        i = config.intermediate_size
        return [Linear("gate_proj", h, i, bias), Linear("up_proj", h, i, bias), Linear("down_proj", i, h, bias)]
    m, experts, top = config.moe_intermediate_size, config.n_routed_experts, config.num_experts_per_tok
    shared = m * config.n_shared_experts
    return [
        # Fused (experts, 2m, h) and (experts, h, m) tensors in transformers 5: no nn.Linear.
        Linear("experts.gate_up_proj", h, 2 * m, count=experts, wrappable=False, active=top),
        Linear("experts.down_proj", m, h, count=experts, wrappable=False, active=top),
        Linear("gate", h, experts, wrappable=False),  # the router
        Linear("shared_experts.gate_proj", h, shared), Linear("shared_experts.up_proj", h, shared),
        Linear("shared_experts.down_proj", shared, h),
    ]


def layer_linears(config: PretrainedConfig, index: int) -> list[Linear]:
    """Decoder layer `index`'s Linear modules (names as in the model, without the layer prefix)."""
    _check_architecture(config)
    attention, _ = _attention(config)
    return attention + _mlp(config, index)


def layer_norm_params(config: PretrainedConfig) -> int:
    """Norm weights of one decoder layer: input and post-attention norms, MLA's latent norms."""
    return 2 * config.hidden_size + _attention(config)[1]


def _check_architecture(config: PretrainedConfig) -> None:
    if config.model_type not in _CONFIGS:
        raise ShapeError(f"model_type {config.model_type!r}: parameter counts cover "
                         f"{', '.join(ARCHITECTURES)} only")


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int  # what one token runs through (routed experts: top-k of them)
    embedding: int  # input embedding (and an untied output head)
    layers: list[int]  # each decoder layer's parameters
    layers_active: list[int]


def count_params(config: PretrainedConfig) -> ParamCount:
    """Parameters of the causal LM transformers builds from `config` (tied weights once)."""
    _check_architecture(config)
    h, vocab = config.hidden_size, config.vocab_size
    embedding = vocab * h * (1 if config.tie_word_embeddings else 2)
    norms = layer_norm_params(config)
    layers, active = [], []
    for index in range(config.num_hidden_layers):
        linears = layer_linears(config, index)
        layers.append(norms + sum(lin.params for lin in linears))
        active.append(norms + sum(lin.active_params for lin in linears))
    final_norm = h
    return ParamCount(total=embedding + sum(layers) + final_norm, active=embedding + sum(active) + final_norm,
                      embedding=embedding, layers=layers, layers_active=active)


# -- activations: what autograd keeps, from the shape (`fedcl.plan` sums them) ----
# The tensor each LoRA module's lora_A keeps (its input), by module name: modules
# fed by the same tensor share it. o_proj's input is SDPA's output (a view of it),
# counted with the attention, so it is no extra tensor.
_LORA_INPUT = {"q_proj": "attention norm", "k_proj": "attention norm", "v_proj": "attention norm",
               "q_a_proj": "attention norm", "kv_a_proj_with_mqa": "attention norm",
               "q_b_proj": "query latent", "kv_b_proj": "kv latent", "o_proj": "",
               "gate_proj": "mlp norm", "up_proj": "mlp norm", "down_proj": "mlp product",
               "shared_experts.gate_proj": "mlp norm", "shared_experts.up_proj": "mlp norm",
               "shared_experts.down_proj": "shared product"}


def _head_dim(shape_cfg) -> int:
    return getattr(shape_cfg, "head_dim", None) or shape_cfg.hidden_size // shape_cfg.num_attention_heads


def _mlp_elements(shape_cfg, linears: dict) -> int:
    """What the MLP keeps per token: gate, its activation and up (3 x intermediate); a
    mixture of experts that per routed copy plus the copy's output (which the routing
    weight multiplies), its shared experts' three and its router's scores."""
    if "gate_proj" in linears:
        return 3 * linears["gate_proj"].out_features
    experts, shared = linears["experts.down_proj"], linears["shared_experts.gate_proj"].out_features
    return (experts.active * (3 * experts.in_features + shape_cfg.hidden_size) + 3 * shared
            + 2 * linears["gate"].out_features)


def activation_elements(shape_cfg, index: int, lora: list[Linear], r: int, seq: int) -> int:
    """Elements autograd keeps per token in trained decoder layer `index` (float32 each), `seq` tokens a row.

    Counted for a padded batch (batches are padded to their longest record),
    the larger case, checked with saved-tensor hooks (BENCHMARKS.md):
    the two RMS norms keep their inputs (the residual stream before and after
    the attention); each distinct input of a LoRA module is kept once (the
    norms' outputs, a latent, the MLP's product) with its rank-r intermediate;
    attention keeps the query, key and value it hands SDPA, SDPA's output and
    log-sum-exp, and the padding mask as SDPA's float copy, seq per token
    (its CPU kernel keeps no T x T score matrix). With padding transformers
    repeats grouped key/value heads for every query head (`repeat_kv`), so
    key and value are as wide as the query. MLA (DeepSeek) also keeps its
    latents and up-projected key/value.
    """
    h, heads = shape_cfg.hidden_size, shape_cfg.num_attention_heads
    linears = {lin.name: lin for lin in layer_linears(shape_cfg, index)}
    if shape_cfg.model_type in ("llama", "qwen2"):
        out = heads * _head_dim(shape_cfg)
        attention = 4 * out  # query, key and value repeated to every head, SDPA's output
    else:
        out = heads * shape_cfg.v_head_dim
        qk = heads * (shape_cfg.qk_nope_head_dim + shape_cfg.qk_rope_head_dim)
        attention = (2 * qk + out + linears["kv_a_proj_with_mqa"].out_features
                     + linears["kv_b_proj"].out_features + (shape_cfg.q_lora_rank or 0))
    attention += heads + seq  # SDPA's log-sum-exp; the float padding mask, one row of T per token
    widths = {"attention norm": h, "mlp norm": h,
              "query latent": getattr(shape_cfg, "q_lora_rank", None) or 0,
              "kv latent": getattr(shape_cfg, "kv_lora_rank", 0)}
    if "gate_proj" in linears:
        widths["mlp product"] = linears["gate_proj"].out_features
    else:
        widths["shared product"] = linears["shared_experts.gate_proj"].out_features
    kept_inputs = sum(widths[name] for name in {_LORA_INPUT.get(lin.name, "") for lin in lora} if name)
    return 2 * h + kept_inputs + attention + _mlp_elements(shape_cfg, linears) + r * len(lora)


def key_value_elements(shape_cfg, lora: list[Linear], r: int, *, input_grad: bool) -> int:
    """Per token, what the top layer keeps when it runs on the last token alone
    (`fedcl.frozen.FrozenBottom.last_token`): the attention norm's output when k_proj
    or v_proj carries LoRA (with their rank-r intermediates), the key and value handed
    to SDPA (grouped heads, not repeated for a single query: measured with saved-tensor
    hooks), and the norm's input when it needs a gradient (a trained layer below). The
    rest of the layer is kept for one token a row."""
    h = shape_cfg.hidden_size
    on_kv = [lin for lin in lora if lin.name in ("k_proj", "v_proj")]
    kv_width = getattr(shape_cfg, "num_key_value_heads", None) or shape_cfg.num_attention_heads
    return ((h if on_kv else 0) + r * len(on_kv) + 2 * kv_width * _head_dim(shape_cfg)
            + (h if input_grad else 0))


def key_value_params(shape_cfg, index: int) -> int:
    """Parameters of layer `index`'s key and value projections (what every position still runs)."""
    return sum(lin.count * lin.in_features * lin.out_features for lin in layer_linears(shape_cfg, index)
               if lin.name in ("k_proj", "v_proj"))


def transient_elements(shape_cfg, top: int) -> int:
    """Per token, what lives beside the kept tensors at the step's peak: the top layer's
    backward (the gradients of its MLP's three kept tensors and two hidden-width
    gradients), which outgrows the forward's end (its MLP product and output and the
    final norm: intermediate + 2 x hidden; training fills no key/value cache)."""
    h = shape_cfg.hidden_size
    mlp = _mlp_elements(shape_cfg, {lin.name: lin for lin in layer_linears(shape_cfg, top)})
    return mlp + 2 * h
