"""The real ServerApp, ClientApp and strategy, driven in-process (no Ray)."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedcl.client.app import app as client_app
from fedcl.adapters import adapter_state, load_adapter_state
from fedcl.config import load_config
from fedcl.session import GlobalEvaluator
from fedcl.server.app import main as server_main
from fedcl.federation.messages import arrays_to_state, message_bytes, state_to_arrays
from fedcl.federation.grid import InProcessGrid, server_context

SMALL = ["model.name=tiny-llama", "data.max_records=60", "data.max_test_records=24",
         "train.local_steps=2", "train.batch_size=4", "federation.clients=2",
         "strategy.transport=float32"]  # these tests pin float32 wire sizes and exact round trips


def small_config(tmp_path, *extra):
    return load_config(None, SMALL + [f"run.out_dir={tmp_path / 'run'}", *extra])


def run_server(config, intercept=None):
    flat = config.to_flat()
    grid = InProcessGrid(client_app, config.federation.clients, flat, intercept=intercept)
    server_main(grid, server_context(flat))
    return grid, json.loads((config.run.out_dir and open(f"{config.run.out_dir}/metrics.json").read()))


def test_run_writes_metrics_and_peft_adapters(tmp_path):
    config = small_config(tmp_path, "federation.rounds=2")
    grid, metrics = run_server(config)
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["model"]["base_bytes"] > 100 * metrics["model"]["adapter_bytes"] > 0
    for record in metrics["rounds"]:
        assert 0.0 <= record["eval"]["accuracy"] <= 1.0
        assert "majority_baseline" in record["eval"] and "macro_f1" in record["eval"]
        assert [c["id"] for c in record["clients"]] == [0, 1]
        assert all(c["num_examples"] > 0 for c in record["clients"])
        # bytes are what the messages carried: the float32 adapter per client (round 1's
        # all-zero B factors are identical objects, which Flower's object tree holds once)
        down_floor = (2 if record["round"] > 1 else 1) * metrics["model"]["adapter_bytes"]
        assert record["bytes_down"] >= down_floor
        assert record["bytes_up"] >= 2 * metrics["model"]["adapter_bytes"]
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert metrics["rounds"][0]["bytes_down"] == sum(message_bytes(m.content) for m in train_msgs[:2])

    # The saved round-2 adapter loads with PEFT on the same base and matches the server's state.
    from peft import PeftModel

    from fedcl import models
    base, _ = models.load_base("tiny-llama")
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapters" / "round-2"))
    evaluator = GlobalEvaluator(config)
    ids = torch.tensor([[5, 6, 7, 8]])
    from fedcl.server.app import _load_round
    from fedcl.rundir import RunDir
    load_adapter_state(evaluator.shared.model, _load_round(evaluator, RunDir(tmp_path / "run"), 2))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, evaluator.shared.model(input_ids=ids).logits,
                              atol=1e-5)
    assert not torch.equal(_load_round(evaluator, RunDir(tmp_path / "run"), 2)[next(
        k for k in evaluator.initial_state if "lora_B" in k)], evaluator.initial_state[next(
            k for k in evaluator.initial_state if "lora_B" in k)])


def test_resume_continues_with_identical_state(tmp_path):
    straight = small_config(tmp_path / "a", "federation.rounds=2")
    _, full = run_server(straight)
    first = small_config(tmp_path / "b", "federation.rounds=1")
    run_server(first)
    resumed = small_config(tmp_path / "b", "federation.rounds=2")
    _, metrics = run_server(resumed)
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for a, b in zip(full["rounds"], metrics["rounds"]):
        assert a["eval"]["loss"] == pytest.approx(b["eval"]["loss"], abs=1e-6)
        assert [c["train_loss"] for c in a["clients"]] == pytest.approx(
            [c["train_loss"] for c in b["clients"]], abs=1e-6)


def test_failed_client_is_counted_and_round_goes_on(tmp_path):
    config = small_config(tmp_path, "federation.rounds=1")

    def fail_client_1(pid, reply):
        if pid == 1 and reply.metadata.message_type == "train":
            return None  # a node that never answers
        return reply

    _, metrics = run_server(config, intercept=fail_client_1)
    record = metrics["rounds"][0]
    assert [c["id"] for c in record["clients"]] == [0]
    assert record["eval"]["num_examples"] == 24


def test_client_error_reply_is_logged_as_failure(tmp_path):
    config = small_config(tmp_path, "federation.rounds=1")
    flat = config.to_flat()
    grid = InProcessGrid(client_app, 2, flat)
    # node 1 gets a broken data setting: its ClientApp raises, the engine returns an error reply
    grid.contexts[grid.node_ids[1]].node_config["partition-id"] = 99
    server_main(grid, server_context(flat))
    record = json.loads(open(f"{config.run.out_dir}/metrics.json").read())["rounds"][0]
    assert record["failures"] >= 1 and [c["id"] for c in record["clients"]] == [0]


def test_client_train_reply_holds_only_adapter_and_metrics(tmp_path):
    config = small_config(tmp_path)
    evaluator = GlobalEvaluator(config)
    grid = InProcessGrid(client_app, 2, config.to_flat())
    msg = Message(content=RecordDict({"arrays": state_to_arrays(evaluator.initial_state),
                                      "config": __import__("flwr.app", fromlist=["ConfigRecord"]).ConfigRecord(
                                          {"server-round": 1})}),
                  dst_node_id=grid.node_ids[0], message_type="train")
    reply = grid.send_and_receive([msg])[0]
    assert set(reply.content.array_records) == {"arrays"}
    assert set(reply.content.metric_records) == {"metrics"}
    assert not reply.content.config_records
    state = arrays_to_state(reply.content.array_records["arrays"])
    assert list(state) == list(evaluator.initial_state)
    assert all(state[k].shape == evaluator.initial_state[k].shape for k in state)
    metrics: MetricRecord = reply.content.metric_records["metrics"]
    assert metrics["partition-id"] == 0 and metrics["num-examples"] > 0


def test_client_refuses_adapter_that_does_not_match(tmp_path):
    config = small_config(tmp_path)
    evaluator = GlobalEvaluator(config)
    grid = InProcessGrid(client_app, 2, config.to_flat())
    bad = dict(evaluator.initial_state)
    first = next(iter(bad))
    bad[first] = torch.zeros(3, 3)
    msg = Message(content=RecordDict({"arrays": state_to_arrays(bad)}),
                  dst_node_id=grid.node_ids[0], message_type="train")
    reply = grid.send_and_receive([msg])[0]
    assert reply.has_error() and "shape" in reply.error.reason and first in reply.error.reason


def test_array_record_round_trip_is_exact():
    state = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    back = arrays_to_state(state_to_arrays(state))
    assert all(torch.equal(state[k], back[k]) for k in state)
    assert isinstance(state_to_arrays({"x": torch.ones(2, dtype=torch.bfloat16)}), ArrayRecord)


def test_adapter_state_round_trip(tmp_path):
    config = small_config(tmp_path)
    model = GlobalEvaluator(config).shared.model
    before = adapter_state(model)
    changed = {k: v + 1.0 for k, v in before.items()}
    load_adapter_state(model, changed)
    assert all(torch.equal(adapter_state(model)[k], changed[k]) for k in before)
    load_adapter_state(model, before)


def test_a_client_without_evaluation_records_does_not_break_the_round(tmp_path):
    # data.eval_fraction=0: no client holds evaluation records; their evaluate replies must
    # still carry the figures the others send (Flower refuses inconsistent replies).
    config = small_config(tmp_path, "federation.rounds=1", "data.eval_fraction=0")
    grid, metrics = run_server(config)
    replies = [r for r in grid.replies if r.metadata.message_type == "evaluate"]
    assert replies and not any(r.has_error() for r in replies)
    keys = [set(next(iter(r.content.metric_records.values())).keys()) for r in replies]
    assert all(k == keys[0] for k in keys) and "accuracy" in keys[0]
    assert metrics["rounds"][0]["failures"] == 0 and "federated_eval" not in metrics["rounds"][0]


def test_an_empty_evaluation_has_the_keys_of_a_scored_one(tmp_path):
    from fedcl.train import evaluate

    config = small_config(tmp_path)
    evaluator = GlobalEvaluator(config)
    model, task = evaluator.shared.model, evaluator.shared.task
    scored = evaluate(model, task, evaluator.shared.dataset.test[:4], config.train, config.model)
    empty = evaluate(model, task, [], config.train, config.model)
    assert set(empty) == set(scored) and empty["num_examples"] == 0 and empty["accuracy"] == 0.0
