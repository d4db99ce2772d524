"""`fedcl plan`: analytic parameter counts, the memory and FLOPs estimate, the thread rule.

The counts are checked parameter for parameter against the built tiny
models (and LoRA's trainable count against `build_lora_model`); the
published DeepSeek shapes against their published sizes. Nothing here loads
a large model: shapes are configs.
"""

from __future__ import annotations

import pytest
import torch

from fedcl import models, shapes
from fedcl.config import load_config
from fedcl.ops.cli import main
from fedcl.plan import ALLOCATOR_SHARE, lora_modules, plan_run, thread_plan
from fedcl.session import configure_threads
from fedcl.shapes import activation_elements

TINY = ("tiny-llama", "tiny-qwen2", "tiny-deepseek-v2", "tiny-deepseek-v3")


def config(*overrides: str):
    return load_config(None, ["model.device=cpu", *overrides] if _has_device() else list(overrides))


def _has_device() -> bool:
    return hasattr(load_config(None).model, "device")


@pytest.mark.parametrize("name", TINY)
def test_tiny_counts_are_exact(name):
    model, _ = models.load_base(name)
    real = sum(p.numel() for p in model.parameters())  # tied weights once
    assert shapes.count_params(models.tiny_config(name)).total == real


@pytest.mark.parametrize("name, settings", [
    ("tiny-llama", []),
    ("tiny-llama", ["lora.target_modules=gate_proj,down_proj", "lora.r=4"]),
    ("tiny-qwen2", ["lora.target_modules=q_proj,v_proj"]),
    ("tiny-deepseek-v2", []),
    ("tiny-deepseek-v3", ["lora.top_layers=1"]),
    ("tiny-deepseek-v3", ["lora.target_modules=kv_b_proj,o_proj", "lora.r=2"]),
])
def test_trainable_count_matches_the_built_adapter(name, settings):
    cfg = config(f"model.name={name}", *settings)
    model, _ = models.build_lora_model(cfg.model, cfg.lora)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan_run(cfg, available=10**12).trainable == real


@pytest.mark.parametrize("name", list(shapes.SHAPES))
def test_published_shapes_have_their_published_size(name):
    shape = shapes.SHAPES[name]
    cfg = shapes.shape_config(name)
    count = shapes.count_params(cfg)
    assert count.total == pytest.approx(shape.published_params, rel=0.02)
    if shape.published_active:
        # DeepSeek's activated figures (V2-Lite 2.4B, V3 37B) leave out the output head.
        head = cfg.vocab_size * cfg.hidden_size
        assert count.active - head == pytest.approx(shape.published_active, rel=0.03)
        assert count.active < count.total / 5


def test_v3_shape_is_transformers_default():
    # the published V3 config is DeepseekV3Config's default (shapes.py says so)
    from transformers import DeepseekV3Config

    assert shapes.count_params(DeepseekV3Config()).total == shapes.count_params(
        shapes.shape_config("deepseek-v3")).total


def test_dp_adds_per_sample_gradients():
    off = plan_run(config("model.name=smollm2-135m"), available=10**12)
    on = plan_run(config("model.name=smollm2-135m", "privacy.noise_multiplier=1.0"), available=10**12)
    micro = plan_run(config("model.name=smollm2-135m", "privacy.noise_multiplier=1.0",
                            "train.micro_batch_size=2"), available=10**12)
    assert off.memory["per_sample"] == 0
    assert on.memory["per_sample"] == (8 + 1) * on.trainable * 4
    assert micro.memory["per_sample"] == (2 + 1) * on.trainable * 4
    assert micro.memory["activations"] * 4 == on.memory["activations"]  # 2 rows a pass, not 8
    assert on.client_bytes > off.client_bytes


def test_top_layers_lowers_activations_and_flops():
    # The instruction task reads every position, so every trained layer runs whole.
    whole = plan_run(config("model.name=smollm2-135m", "data.task=instruction"), available=10**12)
    top = plan_run(config("model.name=smollm2-135m", "data.task=instruction", "lora.top_layers=2"),
                   available=10**12)
    # every SmolLM2 layer has the same shape: 2 of 30 layers keep 2/30 of the layers'
    # activations; the boolean padding mask (B x T x T bytes) and the vocabulary head's
    # three B x T x vocab tensors are one for the model
    fixed = 8 * 64 * 64 + 3 * 8 * 64 * 49152 * 4
    assert (top.memory["activations"] - fixed) * 15 == whole.memory["activations"] - fixed
    assert top.trainable * 15 == whole.trainable
    head_flops = 4 * 576 * 49152 * 8 * 64
    assert top.flops_per_step - head_flops < (whole.flops_per_step - head_flops) / 10
    assert top.memory["weights"] == whole.memory["weights"]  # the frozen base is still held
    # A classification score runs the top layer on the last token: less again.
    scored = plan_run(config("model.name=smollm2-135m", "lora.top_layers=2"), available=10**12)
    assert scored.memory["activations"] < top.memory["activations"] - 3 * 8 * 64 * 49152 * 4
    assert scored.flops_per_step < top.flops_per_step


def test_a_device_too_small_is_warned_about():
    cfg = config("model.name=deepseek-llm-7b")
    small = plan_run(cfg, available=8 * 10**9)
    assert any("cannot hold" in w and "train.batch_size" in w for w in small.warnings)
    big = plan_run(cfg, available=10**13)
    assert not any("cannot hold" in w for w in big.warnings)
    assert big.memory["weights"] == shapes.count_params(shapes.shape_config("deepseek-llm-7b")).total * 4


def test_cli_prints_the_plan(capsys):
    assert main(["plan", "--model", "smollm2-135m", "--set", "model.threads=1"]) == 0
    out = capsys.readouterr().out
    for part in ("weights", "adapter", "gradients", "optimizer", "activations", "per_sample", "flops/step",
                 "threads (set)"):
        assert part in out
    assert "134.52M" in out  # SmolLM2-135M's parameters


def test_cli_plans_a_7b_shape_without_weights(capsys):
    assert main(["plan", "--model", "deepseek-llm-7b", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "DeepSeek-LLM 7B" in out and "6.91B" in out
    assert "deepseek-llm-7b" not in models._BASE_CACHE


def test_bad_shape_name_lists_the_names(capsys):
    assert main(["plan", "--model", "deepseek-llm-8b"]) == 2
    err = capsys.readouterr().err
    assert "deepseek-llm-8b" in err and "deepseek-llm-7b" in err and "tiny-llama" in err


# (cores, clients, clients_per_round, client_cpus) -> (clients at once, client threads, server threads)
THREAD_CASES = [
    ((2, 3, 0, 1), (2, 1, 1)),    # this machine: one thread each (two at 1 + server 1 is the least possible)
    ((2, 3, 0, 2), (1, 1, 1)),    # Flower's default 2 CPUs a client: no longer 2 + 2 on 2 cores
    ((1, 3, 0, 1), (1, 1, 1)),
    ((16, 3, 0, 1), (3, 1, 13)),  # clients keep their one CPU; the server gets the rest
    ((16, 3, 0, 4), (3, 4, 4)),
    ((16, 3, 0, 8), (2, 5, 6)),
    ((16, 10, 2, 1), (2, 1, 14)),
    ((64, 1, 0, 64), (1, 32, 32)),
]


@pytest.mark.parametrize("case, expected", THREAD_CASES)
def test_thread_rule_never_oversubscribes(case, expected):
    cores, clients, per_round, cpus = case
    rule = thread_plan(config(f"federation.clients={clients}", f"federation.clients_per_round={per_round}",
                              f"federation.client_cpus={cpus}"), cores=cores)
    assert (rule.concurrent, rule.client, rule.server) == expected
    assert rule.total <= max(cores, rule.concurrent + 1)  # every process 1 at the least
    assert "oversubscribed" not in rule.describe()


def test_thread_counts_can_be_set_and_are_applied():
    cfg = config("model.threads=3", "federation.server_threads=5")
    rule = thread_plan(cfg, cores=2)
    assert (rule.client, rule.server, rule.set_by_user) == (3, 5, True)
    assert "oversubscribed" in rule.describe()
    before = torch.get_num_threads()
    try:
        auto = config()
        assert configure_threads(auto, server=True) == thread_plan(auto).server == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_gradient_checkpointing_keeps_one_hidden_state_per_layer():
    if not hasattr(load_config(None).model, "gradient_checkpointing"):
        pytest.skip("model.gradient_checkpointing is not a setting here")
    whole = plan_run(config("model.name=smollm2-135m"), available=10**12)
    ckpt = plan_run(config("model.name=smollm2-135m", "model.gradient_checkpointing=true"), available=10**12)
    tokens, mask = 8 * 64, 8 * 64 * 64
    per_layer = (whole.memory["activations"] - mask) // (tokens * 4 * 30)
    assert ckpt.memory["activations"] == (30 * 576 + per_layer) * tokens * 4 + mask
    assert ckpt.flops_per_step > whole.flops_per_step  # the forward runs twice


def saved_float_bytes(model, forward) -> int:
    """Bytes of the distinct floating tensors autograd saves while `forward()` runs (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and t.dtype.is_floating_point:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(saved.values())


@pytest.mark.parametrize("name, tolerance", [("tiny-llama", 0.02), ("tiny-qwen2", 0.02),
                                             ("tiny-deepseek-v2", 0.1), ("tiny-deepseek-v3", 0.1)])
def test_kept_activations_match_what_autograd_saves(name, tolerance):
    """On a padded batch the plan's kept elements are the distinct tensors autograd saves."""
    cfg = config(f"model.name={name}", "model.max_length=32", "train.batch_size=4")
    model, _ = models.build_lora_model(cfg.model, cfg.lora)
    ids = torch.randint(2, 1000, (4, 32))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: the masked path, as batches padded to their longest record
    decoder = model.get_base_model().get_decoder()
    saved = saved_float_bytes(
        model, lambda: decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1].sum())
    shape_cfg = models.tiny_config(name)
    planned = sum(activation_elements(shape_cfg, i, lora_modules(shape_cfg, "auto", i), cfg.lora.r, 32)
                  for i in range(shape_cfg.num_hidden_layers)) * 4 * 32 * 4
    assert saved == pytest.approx(planned, rel=tolerance)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_a_top_layer_run_on_the_last_token_keeps_what_the_plan_counts(name):
    """lora.top_layers with a classification score: the top layer's keys and values for every
    token, the rest for the last token of a row (fedcl.frozen.FrozenBottom.last_token)."""
    from fedcl.frozen import use_frozen_bottom
    from fedcl.tasks import Batch, make_task

    rows, seq = 4, 32
    cfg = config(f"model.name={name}", f"model.max_length={seq}", f"train.batch_size={rows}", "lora.top_layers=1")
    model, tokenizer = models.build_lora_model(cfg.model, cfg.lora)
    task = use_frozen_bottom(make_task("classification", tokenizer, ["no", "yes"], cfg.data, cfg.model, cfg.train),
                             model, cfg.model, cfg.lora)
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[0, :5] = 0  # left padding, as batches padded to their longest record
    hidden = torch.randn(rows, seq, models.tiny_config(name).hidden_size) * mask[..., None]
    batch = Batch(torch.ones_like(mask), mask, torch.zeros(rows, dtype=torch.long), hidden=hidden,
                  position_ids=torch.arange(seq)[None])
    saved = saved_float_bytes(model, lambda: task.body.last_token(model, batch).sum())
    plan = plan_run(cfg, available=10**12)
    planned = plan.memory["activations"] - rows * seq * seq  # the boolean mask is no float tensor
    assert saved == pytest.approx(planned, rel=0.1)
    # Under checkpointing the whole top layer runs (forward, backward, forward again).
    whole = plan_run(config(f"model.name={name}", f"model.max_length={seq}", f"train.batch_size={rows}",
                            "lora.top_layers=1", "model.gradient_checkpointing=true"), available=10**12)
    lora_grads = 6 * plan.trainable * rows * seq
    assert (whole.flops_per_step - lora_grads) / 3 > 4 * (plan.flops_per_step - lora_grads) / 2


def test_padding_mask_and_repeated_heads_grow_with_the_sequence():
    shape_cfg = shapes.shape_config("smollm2-135m")  # 9 query heads, 3 key/value heads of 64
    lora = lora_modules(shape_cfg, "auto", 0)
    short, long = (activation_elements(shape_cfg, 0, lora, 8, seq) for seq in (64, 128))
    assert long - short == 64  # SDPA's float mask: one row of T per token and layer
    plans = [plan_run(config("model.name=smollm2-135m", f"model.max_length={t}"), available=10**12)
             for t in (64, 128)]
    # activations are (elements per token x 4 + T) bytes per token: the boolean mask is B x T x T
    per_token = [(p.memory["activations"] - p.tokens_per_pass * t) / (p.tokens_per_pass * 4 * 30)
                 for p, t in zip(plans, (64, 128))]
    assert per_token == [short, long]


def test_cpu_plan_counts_the_allocator_and_the_frozen_states():
    cpu = plan_run(config("model.name=smollm2-135m", "privacy.noise_multiplier=1.0"), available=10**12)
    parts = cpu.memory
    working_set = parts["activations"] + parts["transient"] + parts["per_sample"]
    assert parts["allocator"] == int(ALLOCATOR_SHARE * working_set)
    assert parts["runtime"] > 0
    gpu = plan_run(config("model.name=smollm2-135m", "model.device=cuda"), available=10**12)
    assert "allocator" not in gpu.memory and "runtime" not in gpu.memory
    top = plan_run(config("model.name=smollm2-135m", "lora.top_layers=2", "data.max_records=200",
                          "federation.clients=2"), available=10**12)
    assert top.memory["frozen_states"] == 100 * 64 * 576 * 4  # records per client x T x hidden x 4
    assert "frozen_states" not in cpu.memory


def test_instruction_head_grows_with_vocabulary_rows_and_length():
    """The logits' three B x T x vocab float32 tensors; mapped apart by glibc, so no allocator share."""
    def plan(batch, length):
        return plan_run(config("model.name=tiny-llama", "data.task=instruction", f"train.batch_size={batch}",
                               f"model.max_length={length}"), available=10**12)

    def head(p, batch, length):
        classification = plan_run(config("model.name=tiny-llama", f"train.batch_size={batch}",
                                         f"model.max_length={length}"), available=10**12)
        return p.memory["activations"] - classification.memory["activations"]

    vocab = models.tiny_config("tiny-llama").vocab_size
    for batch, length in ((8, 64), (16, 64), (8, 128)):
        p = plan(batch, length)
        assert head(p, batch, length) == 3 * batch * length * vocab * 4
        working_set = p.memory["activations"] - head(p, batch, length) + p.memory["transient"]
        assert p.memory["allocator"] == int(ALLOCATOR_SHARE * working_set)
