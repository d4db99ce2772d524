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
from fedcl.plan import plan_run, thread_plan
from fedcl.session import configure_threads

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
    whole = plan_run(config("model.name=smollm2-135m"), available=10**12)
    top = plan_run(config("model.name=smollm2-135m", "lora.top_layers=2"), available=10**12)
    # every SmolLM2 layer has the same shape: 2 of 30 layers keep 2/30 of the activations
    assert top.memory["activations"] * 15 == whole.memory["activations"]
    assert top.trainable * 15 == whole.trainable
    assert top.flops_per_step < whole.flops_per_step / 10
    assert top.memory["weights"] == whole.memory["weights"]  # the frozen base is still held


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
    tokens, per_layer = 8 * 64, whole.memory["activations"] // (8 * 64 * 4 * 30)
    assert ckpt.memory["activations"] == (30 * 576 + per_layer) * tokens * 4
    assert ckpt.flops_per_step > whole.flops_per_step  # the forward runs twice
