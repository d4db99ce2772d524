"""Tests of fedcl.frozen (lora.top_layers): cached bottom states against the whole model."""

from __future__ import annotations

import math

import pytest
import torch
from opacus import GradSampleModule
from transformers import LlamaConfig

from fedcl import metrics, models
from fedcl.config import ConfigError, LoraConfig, ModelConfig, load_config
from fedcl.frozen import CACHE_FILE, FrozenBottom, StateStore, read_states, use_frozen_bottom, write_states
from fedcl.models import ModelError, build_lora_model
from fedcl.privacy import DPPlan
from fedcl.privacy.dpsgd import train_private
from fedcl.tasks import WholeDecoder, make_task
from fedcl.train import evaluate, train_local

pytestmark = pytest.mark.models

TINY_NAMES = ["tiny-llama", "tiny-qwen2", "tiny-deepseek-v2", "tiny-deepseek-v3"]
LABELS = ["no", "yes"]
DEEP = "tiny-llama-4"  # a 4-layer tiny Llama, registered for this module only


@pytest.fixture(scope="module", autouse=True)
def deep_model():
    """`tiny-llama-4`: the tiny Llama with 4 layers, so that a bottom can hold more than one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models.BUILTIN_MODELS, DEEP, "4-layer Llama for fedcl.frozen tests")
        patch.setitem(models._TINY_BUILDERS, DEEP, lambda **c: LlamaConfig(
            **{**c, "num_hidden_layers": 4}, num_key_value_heads=2))
        patch.setitem(models._BASE_CACHE, DEEP, models._finish(*models._build_tiny(DEEP), DEEP))
        yield


def classification_records(n=6):
    # different lengths, so that left padding and the padding mask matter
    return [{"text": f"record {i} " + "good " * (3 * i), "label": LABELS[i % 2]} for i in range(n)]


def instruction_records(n=5):
    return [{"prompt": "Say " + "hi " * (2 * i), "response": "ok " * (i + 1)} for i in range(n)]


RECORDS = {"classification": classification_records, "instruction": instruction_records}


def config_for(name, top_layers, *extra):
    return load_config(None, [f"model.name={name}", "model.max_length=48",
                              f"lora.top_layers={top_layers}", *extra])


def lively_model(config):
    """The LoRA model with random A and B (B starts at zero, which would hide A's gradients)."""
    model, tokenizer = build_lora_model(config.model, config.lora)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model, tokenizer


def tasks_for(config, model, tokenizer, kind="classification", store=None):
    """(whole-decoder task, cached task) for the same configuration."""
    def make():
        return make_task(kind, tokenizer, LABELS, config.data, config.model, config.train)
    cached = use_frozen_bottom(make(), model, config.model, config.lora, store=store)
    assert isinstance(cached.body, FrozenBottom)
    return make(), cached


def loss_and_gradients(model, task, records):
    """Per-example loss, summed-batch LoRA gradients and Opacus' per-sample gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    gsm = GradSampleModule(model, loss_reduction="mean", strict=True)
    try:
        batch = task.encode(records)
        losses = task.per_example_loss(model, batch)
        losses.mean().backward()
        grads = [p.grad.clone() for p in params]
        samples = [p.grad_sample.clone() for p in params]
    finally:
        for p in params:
            p.grad = None
        gsm._close()
        model.eval()
    return losses.detach(), grads, samples


def assert_close_lists(got, want, atol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert torch.allclose(g, w, atol=atol, rtol=0), (g - w).abs().max()


# -- equivalence with the whole model ------------------------------------------
@pytest.mark.parametrize("kind", ["classification", "instruction"])
@pytest.mark.parametrize("name, layers, top", [(n, 0, 1) for n in TINY_NAMES]
                         + [(DEEP, 0, 2), (DEEP, 0, 1), (DEEP, 3, 1)])
@pytest.mark.privacy  # the cache under Opacus: part of `pytest -m privacy` too
def test_cached_loss_and_per_sample_gradients_match_the_whole_model(name, layers, top, kind):
    config = config_for(name, top, f"model.layers={layers}")
    model, tokenizer = lively_model(config)
    plain, cached = tasks_for(config, model, tokenizer, kind)
    records = RECORDS[kind]()
    cached.encode(records[1::2])  # half the states come from a batch with other padding
    want = loss_and_gradients(model, plain, records)
    got = loss_and_gradients(model, cached, records)
    assert cached.body.store.hits >= len(records[1::2]) and len(cached.body.store) == len(records)
    assert torch.allclose(got[0], want[0], atol=1e-5, rtol=0)
    assert any(g.abs().max() > 1e-4 for g in want[1])  # the gradients are not trivially zero
    assert_close_lists(got[1], want[1])
    assert_close_lists(got[2], want[2])
    assert want[2][0].shape[0] == len(records)


def test_bfloat16_autocast_builds_the_states_as_the_step_computes_them():
    from fedcl.train import autocast

    config = config_for("tiny-llama", 1, "model.compute_dtype=bfloat16")
    model, tokenizer = lively_model(config)
    plain, cached = tasks_for(config, model, tokenizer)
    records = classification_records()
    with autocast(config.model):
        want = plain.per_example_loss(model, plain.encode(records))
        assert torch.equal(cached.per_example_loss(model, cached.encode(records)), want)  # built here
        # States built in other batches differ by bfloat16 rounding of the padding offset, no
        # more than the whole model's own answer for a record alone differs from it in a batch.
        _, other = tasks_for(config, model, tokenizer)
        for record in records:
            other.encode([record])
        alone = torch.cat([plain.per_example_loss(model, plain.encode([r])) for r in records])
        got = other.per_example_loss(model, other.encode(records))
    assert (got - want).abs().max() <= 2 * (alone - want).abs().max() + 1e-6


def test_a_loss_runs_neither_the_embedding_nor_the_bottom_layers():
    config = config_for(DEEP, 2)
    model, tokenizer = lively_model(config)
    _, cached = tasks_for(config, model, tokenizer)
    decoder = model.get_base_model().get_decoder()
    calls = []
    hooks = [m.register_forward_hook(lambda *a, i=i: calls.append(i))
             for i, m in enumerate([decoder.embed_tokens, *decoder.layers])]
    try:
        batch = cached.encode(classification_records())
        assert calls == [0, 1, 2]  # the embedding and the two frozen layers, once
        calls.clear()
        cached.per_example_loss(model, batch).sum().backward()
        assert calls == [3, 4]  # the two adapted layers only
        calls.clear()
        again = cached.encode(classification_records())  # the next epoch: all from the store
        assert calls == [] and torch.equal(again.hidden, batch.hidden)
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name, shortcut", [("tiny-llama", True), ("tiny-qwen2", True), (DEEP, True),
                                            ("tiny-deepseek-v2", False)])
def test_a_classification_score_runs_the_top_layer_on_the_last_token_only(name, shortcut):
    top = 2 if name == DEEP else 1
    config = config_for(name, top)
    model, tokenizer = lively_model(config)
    plain, cached = tasks_for(config, model, tokenizer)
    decoder = model.get_base_model().get_decoder()
    widths = {}

    def record(i):
        def hook(module, args, output):
            widths[i] = args[0].shape[1]  # returns None: the output is left as it is
        return hook
    hooks = [layer.mlp.register_forward_hook(record(i)) for i, layer in enumerate(decoder.layers)]
    try:
        batch = cached.encode(classification_records())
        widths.clear()
        got = cached.logits(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    width, last = batch.hidden.shape[1], len(decoder.layers) - 1
    assert widths[last] == (1 if shortcut else width)  # the top layer's MLP: the last token alone
    assert all(widths[i] == width for i in range(len(decoder.layers) - top, last))  # layers below it: all
    assert torch.allclose(got, plain.logits(model, plain.encode(classification_records())), atol=1e-5, rtol=0)


def test_padding_enters_the_top_layers_as_zeros():
    config = config_for("tiny-llama", 1)
    model, tokenizer = lively_model(config)
    _, cached = tasks_for(config, model, tokenizer)
    batch = cached.encode(classification_records(3))
    assert batch.hidden.shape[:2] == batch.input_ids.shape
    assert (batch.hidden[batch.attention_mask == 0] == 0).all()
    assert batch.position_ids.tolist() == [list(range(batch.input_ids.shape[1]))]


# -- keys ---------------------------------------------------------------------
SAME = ("identical configuration", (), LABELS)
CHANGED_KEYS = [
    ("lora.top_layers", ("lora.top_layers=1",), LABELS),
    ("model.layers", ("model.layers=3",), LABELS),
    ("model.max_length", ("model.max_length=40",), LABELS),
    ("template", ("data.classification_template=Review: {text}\nVerdict:",), LABELS),
    ("labels", (), ["no", "yes", "maybe"]),
    ("model.compute_dtype", ("model.compute_dtype=bfloat16",), LABELS),
    ("base model", ("model.name=tiny-llama", "lora.top_layers=1"), LABELS),
]


@pytest.mark.parametrize("what, overrides, labels", [SAME, *CHANGED_KEYS], ids=lambda v: str(v)[:20])
def test_a_changed_key_does_not_reuse_cached_states(what, overrides, labels):
    store, records = StateStore(), classification_records()
    first_cfg = config_for(DEEP, 2)
    first_model, tokenizer = lively_model(first_cfg)
    first = use_frozen_bottom(make_task("classification", tokenizer, LABELS, first_cfg.data, first_cfg.model,
                                        first_cfg.train), first_model, first_cfg.model, first_cfg.lora,
                              store=store)
    first.encode(records)
    assert store.misses == len(records) and len(store) == len(records)
    config = config_for(DEEP, 2, *overrides)
    model, _ = lively_model(config)
    task = use_frozen_bottom(make_task("classification", tokenizer, labels, config.data, config.model,
                                       config.train), model, config.model, config.lora, store=store)
    before = store.misses
    task.encode(records)
    reused = len(records) - (store.misses - before)
    assert reused == (len(records) if what == SAME[0] else 0)


def test_top_layers_zero_or_the_whole_depth_keeps_the_whole_decoder():
    for top in (0, 2):
        config = config_for("tiny-llama", top)
        model, tokenizer = build_lora_model(config.model, config.lora)
        task = use_frozen_bottom(make_task("classification", tokenizer, LABELS, config.data, config.model,
                                           config.train), model, config.model, config.lora)
        assert isinstance(task.body, WholeDecoder)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any(".layers.0." in n for n in names) and any(".layers.1." in n for n in names)


# -- training and evaluation through the cache ------------------------------------
@pytest.mark.parametrize("kind", ["classification", "instruction"])
def test_evaluation_through_the_cache_matches_the_whole_model(kind):
    config = config_for("tiny-qwen2", 1, "train.eval_batch_size=4")
    model, tokenizer = lively_model(config)
    plain, cached = tasks_for(config, model, tokenizer, kind)
    records = RECORDS[kind](9)
    cached.encode(records[::3])  # partly warm, from other batches
    want = evaluate(model, plain, records, config.train, config.model)
    got = evaluate(model, cached, records, config.train, config.model)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):
            assert math.isclose(got[key], value, rel_tol=1e-5, abs_tol=1e-6), key
        else:
            assert got[key] == value, key


def test_train_local_through_the_cache_matches_the_whole_model():
    config = config_for("tiny-llama", 1, "train.local_steps=4", "train.batch_size=4", "train.lr=0.01")
    model, tokenizer = lively_model(config)
    plain, cached = tasks_for(config, model, tokenizer)
    records = classification_records(6)  # 4 steps of 4 over 6 records: reused across epochs
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    results = {}
    for label, task in (("plain", plain), ("cached", cached)):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])
        result = train_local(model, task, records, config.train, config.model, seed=3)
        results[label] = (result, {n: p.detach().clone() for n, p in model.named_parameters() if n in start})
    assert math.isclose(results["cached"][0].loss, results["plain"][0].loss, rel_tol=1e-5)
    assert results["cached"][0].tokens == results["plain"][0].tokens
    assert_close_lists(list(results["cached"][1].values()), list(results["plain"][1].values()))
    assert cached.body.store.hits > 0 and len(cached.body.store) == len(records)


@pytest.mark.privacy  # the cache under Opacus: part of `pytest -m privacy` too
def test_dp_sgd_through_the_cache_matches_the_whole_model():
    # Sample rate 1 and no noise make a DP step deterministic; a small clip makes it
    # depend on every example's own gradient.
    config = config_for("tiny-deepseek-v3", 1)
    model, tokenizer = lively_model(config)
    plain, cached = tasks_for(config, model, tokenizer)
    records = classification_records(5)
    plan = DPPlan(noise_multiplier=0.0, sample_rate=1.0, expected_batch_size=5, max_grad_norm=1e-3,
                  steps_per_round=2, planned_steps=2, delta=1e-5, accountant="rdp", epsilon_cap=math.inf)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    after = {}
    for label, task in (("plain", plain), ("cached", cached)):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])
        train_private(model, task, records, config.train, config.model, plan,
                      make_optimizer=lambda params: torch.optim.SGD(params, lr=1.0))
        after[label] = [p.detach() - start[n] for n, p in model.named_parameters() if n in start]
    assert any(u.abs().max() > 1e-6 for u in after["plain"])
    assert_close_lists(after["cached"], after["plain"], atol=1e-7)


# -- validation ---------------------------------------------------------------
@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_lora_top_layers_must_be_a_non_negative_integer(value):
    with pytest.raises(ConfigError, match=r"lora.top_layers: got .*0 \(all layers\) or a positive integer"):
        LoraConfig(top_layers=value)


def test_lora_top_layers_from_the_command_line():
    assert load_config(None, ["lora.top_layers=2"]).lora.top_layers == 2
    with pytest.raises(ConfigError, match="lora.top_layers"):
        load_config(None, ["lora.top_layers=two"])


@pytest.mark.parametrize("model_cfg, lora_cfg, message", [
    (ModelConfig(name="tiny-llama"), LoraConfig(top_layers=3),
     r"lora.top_layers: got 3, this model has 2 layers \(after model.layers\); expected 0 \(all\) or 1..2"),
    (ModelConfig(name=DEEP, layers=2), LoraConfig(top_layers=3), "got 3, this model has 2 layers"),
    (ModelConfig(name="tiny-llama"), LoraConfig(top_layers=1, target_modules="embed_tokens"),
     "lora.target_modules: 'embed_tokens' matches no module in the top 1 layers"),
    (ModelConfig(name="tiny-llama"), LoraConfig(top_layers=1, target_modules="model.layers.0.self_attn.q_proj"),
     "lies outside the top 1 decoder layers"),
])
def test_top_layers_refused_for_the_model(model_cfg, lora_cfg, message):
    with pytest.raises(ModelError, match=message):
        build_lora_model(model_cfg, lora_cfg)


def test_top_layers_refused_for_an_unchecked_architecture_or_dropout(monkeypatch):
    monkeypatch.setattr(models, "TOP_LAYERS_ARCHITECTURES", ("qwen2",))
    with pytest.raises(ModelError, match="lora.top_layers: got 1, but model_type 'llama' is not supported"):
        build_lora_model(ModelConfig(name="tiny-llama"), LoraConfig(top_layers=1))
    monkeypatch.undo()
    base, _ = models.load_base("tiny-llama")
    base.config.attention_dropout = 0.1
    with pytest.raises(ModelError, match="attention_dropout is 0.1"):
        models.top_layer_indices(base, 1)


def test_frozen_bottom_refuses_an_adapted_bottom_layer():
    config = config_for("tiny-llama", 0)  # LoRA in every layer
    model, tokenizer = build_lora_model(config.model, config.lora)
    task = make_task("classification", tokenizer, LABELS, config.data, config.model, config.train)
    with pytest.raises(ValueError, match="layer 0 .* is adapted or trainable"):
        FrozenBottom(model, task, config.model, 1)


# -- layouts and sessions -----------------------------------------------------
@pytest.mark.parametrize("strategy", ["fedavg", "ffa-lora", "flora"])
def test_every_layout_trains_and_travels_the_top_layers_only(strategy):
    from fedcl.session import GlobalEvaluator, LocalSession

    config = load_config(None, ["model.name=tiny-llama", "model.max_length=32", "lora.top_layers=1",
                                f"strategy.name={strategy}", "data.max_records=24",
                                "train.local_steps=2", "train.batch_size=4"])
    server = GlobalEvaluator(config)
    client = LocalSession(config, 0, 2)
    assert isinstance(client.shared.task.body, FrozenBottom)
    assert isinstance(server.shared.task.body, FrozenBottom)
    state = server.initial_state
    assert state and all(".layers.1." in name for name in state)
    reply, result = client.train(state, 1)
    assert result.steps == 2 and math.isfinite(result.loss)
    assert list(reply) == list(client.shared.initial_state)  # what the server screens replies against
    assert all(".layers.1." in name for name in reply)
    if strategy == "ffa-lora":
        assert all(".lora_B." in name for name in reply)
    assert math.isfinite(server.evaluate(state)[metrics.LOSS])


# -- the cache file in the node's state folder (lora.frozen_cache = "file") ----
def _task_with_store(config, labels=LABELS):
    model, tokenizer = lively_model(config)
    store = StateStore()
    task = use_frozen_bottom(make_task("classification", tokenizer, labels, config.data, config.model,
                                       config.train), model, config.model, config.lora, store=store)
    return task, store


def test_the_cache_file_gives_back_the_same_states_in_a_new_process(tmp_path):
    config, records = config_for(DEEP, 2), classification_records()
    task, store = _task_with_store(config)
    task.body.attach(tmp_path)
    expected = task.encode(records).hidden
    task.body.flush()
    assert (tmp_path / CACHE_FILE).is_file()
    # a fresh holder (a restarted node): every record's states come from the file
    fresh, fresh_store = _task_with_store(config)
    fresh.body.attach(tmp_path)
    got = fresh.encode(records).hidden
    assert fresh_store.misses == 0 and fresh_store.hits == len(records)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("what, overrides, labels", CHANGED_KEYS, ids=lambda v: str(v)[:20])
def test_a_cache_file_made_with_other_settings_is_not_reused(tmp_path, what, overrides, labels):
    records = classification_records()
    task, _ = _task_with_store(config_for(DEEP, 2))
    task.body.attach(tmp_path)
    task.encode(records)
    task.body.flush()
    other, store = _task_with_store(config_for(DEEP, 2, *overrides), labels)
    other.body.attach(tmp_path)
    other.encode(records)
    assert store.hits == 0 and store.misses == len(records)
    other.body.flush()  # rebuilt under the new settings, and the file follows them
    again, again_store = _task_with_store(config_for(DEEP, 2, *overrides), labels)
    again.body.attach(tmp_path)
    again.encode(records)
    assert again_store.misses == 0


DAMAGE = {
    "flipped byte": lambda blob: blob[:-40] + bytes([blob[-40] ^ 0xFF]) + blob[-39:],
    "truncated": lambda blob: blob[: len(blob) // 2],
    "garbage": lambda blob: b"not a cache at all",
    "empty": lambda blob: b"",
}


@pytest.mark.parametrize("damage", DAMAGE, ids=str)
def test_a_damaged_cache_file_is_rebuilt_with_a_warning_never_used(tmp_path, caplog, damage):
    config, records = config_for(DEEP, 2), classification_records()
    task, _ = _task_with_store(config)
    task.body.attach(tmp_path)
    expected = task.encode(records).hidden
    task.body.flush()
    path = tmp_path / CACHE_FILE
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    fresh, store = _task_with_store(config)
    with caplog.at_level("WARNING", logger="fedcl.frozen"):
        fresh.body.attach(tmp_path)
    assert any("frozen-layer cache" in r.message and "rebuilding" in r.message for r in caplog.records)
    got = fresh.encode(records).hidden
    assert store.hits == 0 and torch.equal(got, expected)
    fresh.body.flush()
    assert read_states(path, fresh.body.fingerprint).keys() == {fresh.body.key(r) for r in
                                                                _real_ids(fresh, records)}


def test_a_cache_file_with_a_non_finite_state_is_refused(tmp_path, caplog):
    config = config_for(DEEP, 2)
    task, _ = _task_with_store(config)
    write_states(tmp_path / CACHE_FILE, task.body.fingerprint, {b"k": torch.tensor([[float("nan")]])})
    with caplog.at_level("WARNING", logger="fedcl.frozen"):
        assert read_states(tmp_path / CACHE_FILE, task.body.fingerprint) == {}
    assert "unreadable contents" in caplog.text


def test_a_node_file_holds_only_its_own_records(tmp_path):
    """One process serving two nodes (simulation): each node's file has its records, not the other's."""
    config = config_for(DEEP, 2)
    task, _ = _task_with_store(config)
    mine, theirs = classification_records(4), [{"text": f"other {i}", "label": "no"} for i in range(3)]
    task.body.attach(tmp_path / "a")
    task.encode(mine)
    task.body.flush()
    task.body.attach(tmp_path / "b")
    task.encode(theirs)
    task.body.flush()
    held = {name: set(read_states(tmp_path / name / CACHE_FILE, task.body.fingerprint))
            for name in ("a", "b")}
    assert held["a"] == {task.body.key(i) for i in _real_ids(task, mine)}
    assert held["b"] == {task.body.key(i) for i in _real_ids(task, theirs)}


def _real_ids(task, records):
    batch = task.encode(records)
    return [row[row_mask.bool()] for row, row_mask in zip(batch.input_ids, batch.attention_mask)]


def test_lora_frozen_cache_is_checked():
    assert load_config(None, ["lora.frozen_cache=file"]).lora.frozen_cache == "file"
    with pytest.raises(ConfigError, match="lora.frozen_cache: got 'disk'.*memory, file"):
        load_config(None, ["lora.frozen_cache=disk"])


@pytest.mark.parametrize("where", ["file", "memory"])
def test_a_node_keeps_its_frozen_states_in_its_state_folder_when_asked(tmp_path, where):
    from fedcl import adapters
    from fedcl.client.node import evaluate_round

    config = config_for(DEEP, 2, f"lora.frozen_cache={where}", "data.max_records=40",
                        "data.max_test_records=8", "data.labels=", "federation.clients=2")
    model, _ = build_lora_model(config.model, config.lora)
    node_config = {"partition-id": 1, "num-partitions": 2, "state-dir": str(tmp_path)}
    reply = evaluate_round(config, node_config, adapters.adapter_state(model))
    path = tmp_path / CACHE_FILE
    if where == "memory":
        assert not path.exists()
        return
    from fedcl.client.node import node_session

    body = node_session(config, node_config).shared.task.body
    assert len(read_states(path, body.fingerprint)) == reply["num-examples"] > 0
