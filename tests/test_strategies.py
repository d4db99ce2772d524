"""Aggregation strategies: exactness, robustness, reply screening, transport, real runs."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedcl.client.app import app as client_app
from fedcl import flora
from fedcl.config import STRATEGY_NAMES, ConfigError, load_config
from fedcl.session import GlobalEvaluator
from fedcl.server.app import main as server_main
from fedcl.strategies import build_strategy
from fedcl.strategies.flora import aggregate_stacked
from fedcl.federation.messages import (SCALE_SUFFIX, arrays_to_state, decode_update, encode_reply,
                             state_to_arrays)
from fedcl.federation.grid import InProcessGrid, server_context, set_task_identity

pytestmark = pytest.mark.strategies

SMALL = ["model.name=tiny-llama", "data.max_records=60", "data.max_test_records=16",
         "train.local_steps=1", "train.batch_size=4", "federation.clients=3"]


def lora_state(modules: dict[str, tuple[int, int, int]], seed: int) -> "OrderedDict[str, torch.Tensor]":
    """{module: (out, rank, in)} -> random trained-naming LoRA state."""
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for m, (out, r, inp) in modules.items():
        state[f"{m}.lora_A.default.weight"] = torch.randn(r, inp, generator=g)
        state[f"{m}.lora_B.default.weight"] = torch.randn(out, r, generator=g)
    return state


def product(state: dict, module: str, scaling: float = 1.0) -> torch.Tensor:
    b, a = flora.factors_of(state)[module]
    return scaling * b.double() @ a.double()


# -- exactness -------------------------------------------------------------
def test_flora_and_ffa_are_exact_fedavg_is_not():
    shapes = {"layer.q": (6, 3, 5)}
    states = [lora_state(shapes, seed) for seed in range(3)]
    weights = [10.0, 30.0, 60.0]
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    target = sum(wi * product(s, "layer.q") for wi, s in zip(w, states))

    residual = aggregate_stacked(flora.zero_residual(states[0]), states, weights, [1.0] * 3)
    assert torch.allclose(product(residual, "layer.q"), target, atol=1e-5)

    # FFA-LoRA: one shared A, so averaging B alone is averaging the products.
    a = states[0]["layer.q.lora_A.default.weight"]
    mean_b = sum(wi * s["layer.q.lora_B.default.weight"].double() for wi, s in zip(w, states))
    ffa_target = sum(wi * s["layer.q.lora_B.default.weight"].double() @ a.double() for wi, s in zip(w, states))
    assert torch.allclose(mean_b @ a.double(), ffa_target, atol=1e-10)

    mean = {k: sum(wi * s[k].double() for wi, s in zip(w, states)) for k in states[0]}
    gap = (product(mean, "layer.q") - target).norm() / target.norm()
    assert gap > 0.3  # averaging factors is far from the mean update


def test_flora_heterogeneous_ranks_and_rounds_accumulate_exactly():
    ranks, alpha = [2, 4, 8], 16
    states = [lora_state({"m.a": (7, r, 9), "m.b": (5, r, 4)}, seed=r) for r in ranks]
    weights, scalings = [1.0, 2.0, 5.0], [alpha / r for r in ranks]
    w = [x / sum(weights) for x in weights]
    first = aggregate_stacked(flora.zero_residual(states[0]), states, weights, scalings)
    second = aggregate_stacked(first, states[:2], [1.0, 1.0], scalings[:2])
    for module in ("m.a", "m.b"):
        round1 = sum(wi * product(s, module, sc) for wi, s, sc in zip(w, states, scalings))
        round2 = sum(0.5 * product(s, module, sc) for s, sc in zip(states[:2], scalings[:2]))
        assert torch.allclose(product(first, module), round1, atol=1e-4)
        assert torch.allclose(product(second, module), round1 + round2, atol=1e-4)
    # Re-factorising bounds the rank by the layers' sizes (zero-padded to one common r).
    assert flora.factors_of(second)["m.a"][0].shape[1] <= max(min(7, 9), min(5, 4))


# -- robust aggregation ----------------------------------------------------
class FakeGrid:
    def __init__(self, n):
        self.ids = list(range(1, n + 1))

    def get_node_ids(self):
        return list(self.ids)


TEMPLATE = OrderedDict([("m.lora_A.default.weight", torch.zeros(2, 4)), ("m.lora_B.default.weight", torch.zeros(4, 2))])


def aggregate_updates(name: str, updates: list[dict], extra=(), examples=None) -> tuple[dict, dict]:
    """Drive a strategy's configure/aggregate with client updates from TEMPLATE."""
    set_task_identity()
    config = load_config(None, [f"strategy.name={name}", f"federation.clients={len(updates)}",
                                "strategy.transport=float32", *extra])
    strategy = build_strategy(config, reply_template=TEMPLATE)
    sent = list(strategy.configure_train(1, state_to_arrays(TEMPLATE), ConfigRecord(), FakeGrid(len(updates))))
    replies = []
    for i, (msg, upd) in enumerate(zip(sent, updates)):
        state = OrderedDict((k, TEMPLATE[k] + upd[k]) for k in TEMPLATE)
        metrics = MetricRecord({"num-examples": (examples or [10] * len(updates))[i], "partition-id": i})
        replies.append(Message(RecordDict({"arrays": encode_reply(state, TEMPLATE, "float32"),
                                           "metrics": metrics}), reply_to=msg))
    arrays, _ = strategy.aggregate_train(1, replies)
    return (None if arrays is None else arrays_to_state(arrays)), strategy.record(1)


ATTACKS = {
    "scaled": lambda u, g: {k: 100.0 * v for k, v in u.items()},
    "sign-flipped": lambda u, g: {k: -20.0 * v for k, v in u.items()},
    "random": lambda u, g: {k: 5.0 * torch.randn(v.shape, generator=g) for k, v in u.items()},
}


@pytest.mark.parametrize("name,extra", [
    ("median", ()), ("trimmed-mean", ("strategy.trim_fraction=0.2",)),
    ("krum", ("strategy.num_malicious=1",)), ("krum", ("strategy.num_malicious=1", "strategy.krum_keep=3")),
])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_robust_aggregators_ignore_one_bad_client(name, extra, attack):
    g = torch.Generator().manual_seed(0)
    true = {k: torch.full_like(v, 0.5) for k, v in TEMPLATE.items()}
    honest = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in true.items()} for _ in range(4)]
    bad = ATTACKS[attack](true, g)
    result, _ = aggregate_updates(name, [*honest[:2], bad, *honest[2:]], extra)
    worst = max(float((result[k] - true[k]).abs().max()) for k in true)
    assert worst < 0.05, f"{name} moved {worst} away from the honest update"
    plain, _ = aggregate_updates("fedavg", [*honest[:2], bad, *honest[2:]])
    assert max(float((plain[k] - true[k]).abs().max()) for k in true) > 0.5  # the attack is real


def test_min_replies_not_met_leaves_global_unchanged():
    upd = {k: torch.ones_like(v) for k, v in TEMPLATE.items()}
    result, record = aggregate_updates("fedavg", [upd, upd], ("federation.min_replies=2",),
                                       examples=[10, 0])
    assert result is None and record["rejected"] == 1


# -- reply screening in a real round -----------------------------------------
def _replace(reply, name, values):
    arrays = OrderedDict((k, v) for k, v in reply.content["arrays"].items())
    arrays[name] = Array(np.asarray(values))
    reply.content["arrays"] = ArrayRecord(arrays)


def _first(reply):
    return next(iter(reply.content["arrays"].keys()))


MALFORMED = {
    "wrong-names": lambda r: r.content.__setitem__("arrays", ArrayRecord(OrderedDict(
        (k.replace("q_proj", "x_proj"), v) for k, v in r.content["arrays"].items()))),
    "wrong-shape": lambda r: _replace(r, _first(r), np.zeros((3, 3), np.float16)),
    "wrong-dtype": lambda r: _replace(r, _first(r), r.content["arrays"][_first(r)].numpy().astype(np.float32)),
    "nan": lambda r: _replace(r, _first(r), np.full(r.content["arrays"][_first(r)].shape, np.nan, np.float16)),
    "inf": lambda r: _replace(r, _first(r), np.full(r.content["arrays"][_first(r)].shape, np.inf, np.float16)),
    "norm-too-large": lambda r: _replace(r, _first(r), np.full(r.content["arrays"][_first(r)].shape, 100, np.float16)),
    "zero-examples": lambda r: r.content["metrics"].__setitem__("num-examples", 0),
    "too-many-examples": lambda r: r.content["metrics"].__setitem__("num-examples", 10**6),
}


def run_server(config, intercept=None):
    flat = config.to_flat()
    grid = InProcessGrid(client_app, config.federation.clients, flat, intercept=intercept)
    server_main(grid, server_context(flat))
    with open(f"{config.run.out_dir}/metrics.json") as f:
        return grid, json.load(f)


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_reply_is_rejected_and_round_completes(tmp_path, kind):
    config = load_config(None, SMALL + ["federation.clients=2", "federation.rounds=1",
                                        "strategy.max_update_norm=50", "strategy.max_examples=1000",
                                        f"run.out_dir={tmp_path / 'run'}"])
    honest = {}

    def corrupt_client_1(pid, reply):
        if reply.metadata.message_type == "train":
            if pid == 1:
                MALFORMED[kind](reply)
            else:
                honest["update"] = arrays_to_state(reply.content["arrays"])
        return reply

    _, metrics = run_server(config, corrupt_client_1)
    record = metrics["rounds"][0]
    assert record["rejected"] == 1 and record["failures"] == 0
    assert "rejected" in next(c for c in record["clients"] if c["id"] == 1)
    assert record["eval"]["num_examples"] == 16
    # The global is client 0's reply alone: the rejected one never touched it.
    evaluator = GlobalEvaluator(config)
    saved = evaluator.load_saved(tmp_path / "run" / "adapters" / "round-1")
    for name, start in evaluator.initial_state.items():
        assert torch.allclose(saved[name], start + honest["update"][name], atol=1e-6)


# -- transport ---------------------------------------------------------------
def test_float16_and_int8_update_error():
    g = torch.Generator().manual_seed(0)
    start = OrderedDict(a=torch.randn(64, 8, generator=g), b=torch.randn(8, 64, generator=g) * 0.01)
    trained = OrderedDict((k, v + 1e-3 * torch.randn(v.shape, generator=g)) for k, v in start.items())
    true = {k: trained[k] - start[k] for k in start}
    exact = decode_update(encode_reply(trained, start, "float32"), start, "float32")
    assert all(torch.allclose(exact[k], true[k], atol=1e-7) for k in start)
    half = decode_update(encode_reply(trained, start, "float16"), start, "float16")
    # float16 rounds to 11 significant bits, relative to the update (not the
    # weight); below 2^-14 it is subnormal with a fixed step of 2^-24.
    for k in start:
        assert ((half[k] - true[k]).abs() <= 2 ** -11 * true[k].abs() + 2 ** -25 + 1e-9).all()
    fp16_rel = max(float((half[k] - true[k]).abs().max() / true[k].abs().max()) for k in start)
    record = encode_reply(trained, start, "int8")
    assert record["a"].numpy().dtype == np.int8 and (SCALE_SUFFIX and "a" + SCALE_SUFFIX in record)
    q = decode_update(record, start, "int8")
    int8_err = max(float((q[k] - true[k]).abs().max() / true[k].abs().max()) for k in start)
    print(f"update error: float16 max relative {fp16_rel:.2e}, int8 max error / peak {int8_err:.2e}")
    assert int8_err <= 0.5 / 127 + 1e-6  # half a quantisation step of the per-tensor scale


# -- config ----------------------------------------------------------------
@pytest.mark.parametrize("key,value", [
    ("strategy.transport", "bf16"), ("strategy.trim_fraction", "0.5"), ("strategy.krum_keep", "0"),
    ("strategy.max_update_norm", "-1"), ("strategy.beta_1", "1.0"), ("strategy.name", "fedsgd"),
])
def test_strategy_config_rejects_bad_values(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [f"{key}={value}"])


# -- every strategy, in-process through the real apps -------------------------
_RUNS: dict[str, tuple] = {}


def run_named(name, tmp_path_factory):
    if name not in _RUNS:
        out = tmp_path_factory.mktemp(name)
        # Square targets and r=32: A and B are the same size, and arrays large enough
        # that per-array message overhead does not hide the payload. Two local
        # steps: in the first, A's gradient is zero (B starts at 0), and Flower's
        # wire format compresses an all-zero update to almost nothing.
        config = load_config(None, SMALL + ["federation.rounds=1", f"strategy.name={name}",
                                            "train.local_steps=2",
                                            "lora.r=32", "lora.target_modules=q_proj,o_proj",
                                            f"run.out_dir={out / 'run'}"])
        _RUNS[name] = (config, *run_server(config))
    return _RUNS[name]


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_completes_a_round(name, tmp_path_factory):
    config, _, metrics = run_named(name, tmp_path_factory)
    record = metrics["rounds"][0]
    assert record["bytes_up"] > 0 and record["bytes_down"] > 0 and record["rejected"] == 0
    assert [c["id"] for c in record["clients"]] == [0, 1, 2]
    assert 0.0 <= record["eval"]["accuracy"] <= 1.0


@pytest.mark.parametrize("name", ["ffa-lora", "flora"])
def test_saved_global_loads_with_peft_and_matches(name, tmp_path_factory):
    from peft import PeftModel

    from fedcl import models
    config, _, _ = run_named(name, tmp_path_factory)
    folder = f"{config.run.out_dir}/adapters/round-1"
    base, _ = models.load_base("tiny-llama")
    loaded = PeftModel.from_pretrained(base, folder)
    evaluator = GlobalEvaluator(config)
    state = evaluator.load_saved(folder)
    evaluator.layout.load(evaluator.shared.model, state, evaluator.shared.initial_state, source="test")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, evaluator.shared.model(input_ids=ids).logits,
                              atol=1e-4)


def test_ffa_lora_sends_only_b_and_about_half_the_bytes(tmp_path_factory):
    _, fed_grid, fedavg = run_named("fedavg", tmp_path_factory)
    _, ffa_grid, ffa = run_named("ffa-lora", tmp_path_factory)
    ratio = ffa["rounds"][0]["bytes_up"] / fedavg["rounds"][0]["bytes_up"]
    assert 0.45 < ratio < 0.6, ratio
    reply = next(r for r in ffa_grid.replies if r.metadata.message_type == "train")
    assert all(".lora_B." in k for k in reply.content["arrays"].keys())


def test_fedadam_resume_restores_moments(tmp_path):
    def cfg(folder, rounds):
        return load_config(None, SMALL + ["federation.clients=2", f"federation.rounds={rounds}",
                                          "strategy.name=fedadam", f"run.out_dir={tmp_path / folder}"])
    _, straight = run_server(cfg("a", 2))
    run_server(cfg("b", 1))
    _, resumed = run_server(cfg("b", 2))
    state_a = json.loads((tmp_path / "a" / "strategy_state.json").read_text())
    state_b = json.loads((tmp_path / "b" / "strategy_state.json").read_text())
    assert state_a["m_t"] and state_a == state_b
    assert straight["rounds"][1]["eval"]["loss"] == pytest.approx(resumed["rounds"][1]["eval"]["loss"], abs=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedavgm"])
def test_optimiser_state_dict_round_trip(name):
    upd = {k: torch.ones_like(v) for k, v in TEMPLATE.items()}
    config = load_config(None, [f"strategy.name={name}", "federation.clients=2", "strategy.transport=float32"])
    set_task_identity()
    strategy = build_strategy(config, reply_template=TEMPLATE)
    sent = list(strategy.configure_train(1, state_to_arrays(TEMPLATE), ConfigRecord(), FakeGrid(2)))
    replies = [Message(RecordDict({"arrays": state_to_arrays({k: TEMPLATE[k] + upd[k] for k in TEMPLATE}),
                                   "metrics": MetricRecord({"num-examples": 5, "partition-id": i})}),
                       reply_to=m) for i, m in enumerate(sent)]
    strategy.aggregate_train(1, replies)
    saved = json.loads(json.dumps(strategy.state_dict()))
    fresh = build_strategy(config, reply_template=TEMPLATE)
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == saved
    with pytest.raises(ValueError, match="strategy state is for"):
        build_strategy(load_config(None, ["strategy.name=fedavg"]), reply_template=TEMPLATE).load_state_dict(saved)


# -- federated importance (continual.federated_importance) ----------------------------------

def test_importance_checks_and_the_shared_importance_survives_a_restart():
    from fedcl.continual.ewc import check_importance

    reference = OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4))
    good = OrderedDict(a=torch.rand(2, 3), b=torch.rand(4))
    assert check_importance(good, reference) is None
    assert "names differ" in check_importance(OrderedDict(a=good["a"]), reference)
    assert "shape" in check_importance(OrderedDict(a=torch.rand(3, 2), b=good["b"]), reference)
    assert "non-finite" in check_importance(OrderedDict(a=good["a"], b=torch.tensor([1, 2, float("nan"), 0.])),
                                            reference)
    assert "negative" in check_importance(OrderedDict(a=-good["a"], b=good["b"]), reference)

    config = load_config(None, ["model.name=tiny-llama", "data.task_column=date", "continual.strategy=ewc",
                                "continual.federated_importance=true"])
    strategy = build_strategy(config)
    strategy.shared_importance = {"task": 3, "state": good}
    saved = json.loads(json.dumps(strategy.state_dict()))  # as strategy_state.json holds it
    again = build_strategy(config)
    again.load_state_dict(saved)
    assert again.shared_importance["task"] == 3
    for name in good:
        assert torch.equal(again.shared_importance["state"][name], good[name])
