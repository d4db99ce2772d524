"""Continual learning core: streams, replay, EWC (plain and DP), methods and metrics, in-process."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from fedcl.continual import metrics as clm
from fedcl.continual.ewc import (GradSquareAccumulator, OnlineEWC, aggregate_fisher, compute_fisher,
                                 fisher_from_grads)
from fedcl.privacy.dpsgd import dp_step
from fedcl.continual.catalog import METHODS, make_method
from fedcl.continual.methods import EWC, Combined, Naive, Replay
from fedcl.continual.replay import ReservoirBuffer, mix_batches, replay_count
from fedcl.continual.state import StateError
from fedcl.continual.streams import StreamError, Task, by_label_groups, by_period, client_share, from_files, parse_date
from fedcl.config import ConfigError, ContinualConfig, DataConfig

pytestmark = pytest.mark.continual


def items(n, label=None, start=0):
    return [{"text": f"t{i}", "label": label or "x", "meta": {"i": str(i)}} for i in range(start, start + n)]


# -- reservoir ---------------------------------------------------------------------

def _inclusion_p_value(n_items, capacity, runs, bins, make):
    counts = np.zeros(bins)
    for run in range(runs):
        kept = make(run)
        for r in kept:
            counts[int(r["meta"]["i"]) * bins // n_items] += 1
    return chisquare(counts).pvalue


def test_reservoir_is_uniform_over_a_long_stream():
    stream = items(10_000)

    def run(seed):
        buf = ReservoirBuffer(100, seed)
        for start in range(0, 10_000, 1_000):  # offered in chunks, as tasks arrive
            buf.add(stream[start:start + 1_000])
        assert len(buf) == 100 and buf.seen() == 10_000
        return buf.records()

    # 100 position bins of 100 items: 60 expected inclusions per bin
    assert _inclusion_p_value(10_000, 100, 60, 100, run) > 0.001
    # the same test rejects a biased memory (keep the first 100)
    assert _inclusion_p_value(10_000, 100, 60, 100, lambda s: items(100)) < 1e-6


def test_reservoir_inclusion_is_uniform_per_item():
    stream = items(500)

    def run(seed):
        buf = ReservoirBuffer(50, seed)
        buf.add(stream)
        return buf.records()

    assert _inclusion_p_value(500, 50, 200, 500, run) > 0.001  # 20 expected per item


def test_class_balanced_reservoir_keeps_equal_quotas():
    buf = ReservoirBuffer(10, seed=3, balanced_by_class=True)
    buf.add(items(50, "a") + items(50, "b", start=50))
    assert buf.quotas() == {"a": 5, "b": 5}
    buf.add(items(5, "c", start=100))
    assert buf.quotas() == {"a": 4, "b": 3, "c": 3}  # remainder to the first label
    labels = [r["label"] for r in buf.records()]
    assert {k: labels.count(k) for k in "abc"} == {"a": 4, "b": 3, "c": 3}
    buf.add(items(50, "b", start=200))
    labels = [r["label"] for r in buf.records()]
    assert labels.count("b") == 3 and len(buf) == 10
    with pytest.raises(ValueError, match="no label"):
        buf.add([{"prompt": "p", "response": "r", "meta": {}}])


@pytest.mark.parametrize("balanced", [False, True])
def test_buffer_state_round_trip_continues_identically(tmp_path, balanced):
    stream = items(300, "a") + items(300, "b", start=300)
    first = ReservoirBuffer(20, seed=7, balanced_by_class=balanced)
    first.add(stream[::2])
    first.save(tmp_path / "replay.json")
    second = ReservoirBuffer(20, seed=999, balanced_by_class=balanced)
    second.load(tmp_path / "replay.json")
    assert second.records() == first.records()
    first.add(stream[1::2])
    second.add(stream[1::2])
    assert second.records() == first.records() and second.seen() == first.seen()


def test_buffer_refuses_mismatched_state():
    buf = ReservoirBuffer(20, seed=0)
    buf.add(items(30))
    with pytest.raises(StateError, match="kind"):
        buf.load_state_dict(OnlineEWC(1.0).state_dict())
    with pytest.raises(StateError, match="capacity=20"):
        ReservoirBuffer(10, seed=0).load_state_dict(buf.state_dict())
    with pytest.raises(StateError, match="balanced_by_class"):
        ReservoirBuffer(20, seed=0, balanced_by_class=True).load_state_dict(buf.state_dict())
    state = {**buf.state_dict(), "version": 99}
    with pytest.raises(StateError, match="version 99"):
        ReservoirBuffer(20, seed=0).load_state_dict(state)


def _ewc_with_state():
    model = torch.nn.Linear(2, 1)
    e = OnlineEWC(2.0, 0.5)
    e.after_task(model, {n: torch.ones_like(p) for n, p in model.named_parameters()})
    return e


@pytest.mark.parametrize("kind", ["replay", "ewc"])
def test_failed_save_leaves_the_old_file(tmp_path, monkeypatch, kind):
    path = tmp_path / "node" / ("replay.json" if kind == "replay" else "ewc.safetensors")
    obj = ReservoirBuffer(5, seed=0) if kind == "replay" else _ewc_with_state()
    if kind == "replay":
        obj.add(items(3))
    obj.save(path)
    before = path.read_bytes()
    if kind == "replay":
        obj.add(items(10, start=3))
    else:
        obj.tasks_seen = 5

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr("fedcl.atomic.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        obj.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


@pytest.mark.parametrize("batch_size, ratio, replayed", [
    (8, 0.5, 8), (8, 0.2, 2), (6, 0.25, 2), (4, 0.75, 12), (8, 0.0, 0),
])
def test_mix_ratio_is_exact(batch_size, ratio, replayed):
    buf = ReservoirBuffer(100, seed=0)
    buf.add(items(100, "old"))
    batches = [items(batch_size, "new", start=k * batch_size) for k in range(3)]
    mixed = list(mix_batches(batches, buf, ratio, np.random.default_rng(0)))
    for batch, out in zip(batches, mixed):
        assert out[:batch_size] == batch  # the current batch is kept whole, first
        assert [r["label"] for r in out[batch_size:]] == ["old"] * replayed
        assert replayed / len(out) == pytest.approx(ratio)
        assert len({r["text"] for r in out[batch_size:]}) == replayed  # distinct records


def test_mix_with_empty_or_small_buffer_and_bad_ratio():
    batches = [items(4, "new")]
    assert list(mix_batches(batches, ReservoirBuffer(5, 0), 0.5, np.random.default_rng(0))) == batches
    small = ReservoirBuffer(5, 0)
    small.add(items(2, "old"))
    assert len(next(iter(mix_batches(batches, small, 0.5, np.random.default_rng(0))))) == 6
    with pytest.raises(ValueError, match="ratio"):
        replay_count(4, 1.0)


# -- EWC on a model whose Fisher is computable by hand ------------------------------

class LinearTask:
    """Per-example loss 0.5 (w.x - y)^2: its gradient is (w.x - y) x."""

    def encode(self, records):
        return (torch.tensor([r["x"] for r in records], dtype=torch.float32),
                torch.tensor([r["y"] for r in records], dtype=torch.float32))

    def per_example_loss(self, model, batch):
        x, y = batch
        return 0.5 * (model(x).squeeze(-1) - y).pow(2)


LINEAR_RECORDS = [{"x": [1.0, 2.0], "y": 0.0}, {"x": [2.0, 0.0], "y": 1.0}, {"x": [0.0, 1.0], "y": 1.0}]


def linear_model(weight=(1.0, -1.0)):
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weight]))
        model.bias.zero_()
    model.bias.requires_grad_(False)  # frozen, like a base weight
    return model


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_fisher_matches_hand_computation(batch_size):
    # residuals -1, 1, -2; squared gradients [1,4], [4,0], [0,4]; mean [5/3, 8/3]
    with torch.no_grad():  # as from evaluation code: compute_fisher turns gradients back on
        fisher = compute_fisher(linear_model(), LinearTask(), LINEAR_RECORDS, batch_size)
    assert list(fisher) == ["weight"]
    assert torch.allclose(fisher["weight"], torch.tensor([[5 / 3, 8 / 3]]))


def test_penalty_and_its_gradient_by_hand():
    model = linear_model()
    ewc = OnlineEWC(strength=2.0)
    assert float(ewc.penalty(model)) == 0.0
    ewc.after_task(model, compute_fisher(model, LinearTask(), LINEAR_RECORDS, 2))
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 1.0]]))  # theta - theta* = [1, 2]
    penalty = ewc.penalty(model)
    assert penalty.item() == pytest.approx(37 / 3)  # 2/2 * (5/3 * 1 + 8/3 * 4)
    manual = ewc.penalty_gradient(model)["weight"]
    assert torch.allclose(manual, torch.tensor([[10 / 3, 32 / 3]]))
    (autograd,) = torch.autograd.grad(penalty, [model.weight])
    assert torch.allclose(manual, autograd)


def test_online_ewc_decay_and_anchor():
    model = linear_model()
    ewc = OnlineEWC(strength=1.0, decay=0.5)
    f1, f2 = {"weight": torch.tensor([[1.0, 2.0]])}, {"weight": torch.tensor([[4.0, 0.0]])}
    ewc.after_task(model, f1)
    with torch.no_grad():
        model.weight.add_(1.0)
    ewc.after_task(model, f2)
    assert torch.allclose(ewc.fisher["weight"], torch.tensor([[4.5, 1.0]]))  # 0.5*F1 + F2
    assert torch.equal(ewc.anchor["weight"], torch.tensor([[2.0, 0.0]]))
    assert ewc.tasks_seen == 2
    with pytest.raises(ValueError, match="unexpected"):
        ewc.after_task(model, {"weight": f1["weight"], "bias": torch.zeros(1)})


def test_ewc_state_round_trip_and_refusals(tmp_path):
    ewc = _ewc_with_state()
    ewc.save(tmp_path / "ewc.safetensors")
    restored = OnlineEWC(2.0, 0.5)
    restored.load(tmp_path / "ewc.safetensors")
    assert restored.tasks_seen == 1 and list(restored.fisher) == list(ewc.fisher)
    for name in ewc.fisher:
        assert torch.equal(restored.fisher[name], ewc.fisher[name])
        assert torch.equal(restored.anchor[name], ewc.anchor[name])
    copy_ = OnlineEWC(2.0, 0.5)
    copy_.load_state_dict(ewc.state_dict())
    assert torch.equal(copy_.anchor["bias"], ewc.anchor["bias"])
    with pytest.raises(StateError, match="decay"):
        OnlineEWC(2.0, 0.9).load(tmp_path / "ewc.safetensors")
    with pytest.raises(StateError, match="kind"):
        OnlineEWC(2.0, 0.5).load_state_dict(ReservoirBuffer(3, 0).state_dict())


def test_aggregate_fisher_is_a_weighted_mean():
    f1 = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    f2 = {"a": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    out = aggregate_fisher([(f1, 1), (f2, 3)])
    assert torch.allclose(out["a"], torch.tensor([2.5, 5.0])) and torch.allclose(out["b"], torch.tensor([3.0]))
    with pytest.raises(ValueError, match="other parameter names"):
        aggregate_fisher([(f1, 1), ({"a": f2["a"]}, 1)])
    with pytest.raises(ValueError, match="sum to 0"):
        aggregate_fisher([(f1, 0), (f2, 0)])


def test_fisher_from_grads_subtracts_noise_variance():
    out = fisher_from_grads({"w": torch.tensor([4.0, 8.0])}, 4, noise_variance=1.5)
    assert torch.allclose(out["w"], torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="count"):
        fisher_from_grads({"w": torch.ones(1)}, 0)


# -- EWC under Opacus DP-SGD ----------------------------------------------------------

def _dp_update(noise, *, hook, penalty_in_loss=False, seed=0, clip=1e6):
    """Weight after one SGD(lr=0.1) DP step on LINEAR_RECORDS, with or without the EWC gradient."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = linear_model()
    ewc = OnlineEWC(strength=0.5)
    ewc.after_task(linear_model((0.0, 0.0)), {"weight": torch.tensor([[1.0, 2.0]])})
    gsm = GradSampleModule(model, loss_reduction="mean", strict=True)
    opt = DPOptimizer(torch.optim.SGD([model.weight], lr=0.1), noise_multiplier=noise, max_grad_norm=clip,
                      expected_batch_size=3, loss_reduction="mean", generator=torch.Generator().manual_seed(seed))
    acc = GradSquareAccumulator()
    task = LinearTask()
    loss = task.per_example_loss(model, task.encode(LINEAR_RECORDS)).mean()
    if penalty_in_loss:
        loss = loss + ewc.penalty(model)
    opt.zero_grad()
    loss.backward()
    callbacks = [lambda: acc.add(model)] + ([lambda: ewc.add_penalty_gradient(model)] if hook else [])
    dp_step(opt, *callbacks)
    gsm._close()
    return model.weight.detach().clone(), ewc, acc


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_penalty_gradient_after_dp_noise_matches_plain_training_without_noise():
    model = linear_model()
    _, ewc, _ = _dp_update(0.0, hook=False)
    task = LinearTask()
    loss = task.per_example_loss(model, task.encode(LINEAR_RECORDS)).mean() + ewc.penalty(model)
    loss.backward()
    plain = model.weight.detach() - 0.1 * model.weight.grad
    dp_with_hook, _, acc = _dp_update(0.0, hook=True)
    assert torch.allclose(dp_with_hook, plain, atol=1e-6)
    # the accumulator saw the released gradient before the penalty was added: mean grad [1/3, -4/3]
    assert torch.allclose(acc.sums["weight"], torch.tensor([[1 / 9, 16 / 9]]), atol=1e-6)
    # opacus#249: a penalty put into the loss is dropped by the DP optimizer
    dropped, _, _ = _dp_update(0.0, hook=False, penalty_in_loss=True)
    no_penalty, _, _ = _dp_update(0.0, hook=False)
    assert torch.equal(dropped, no_penalty) and not torch.allclose(dropped, plain)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_penalty_gradient_changes_the_noisy_dp_update_by_exactly_its_value():
    # clip 10 is above every per-example gradient norm; the noise has std 10 * 1.0 / 3
    with_hook, ewc, _ = _dp_update(1.0, hook=True, seed=5, clip=10.0)
    without, _, _ = _dp_update(1.0, hook=False, seed=5, clip=10.0)
    expected = 0.1 * ewc.penalty_gradient(linear_model())["weight"]  # strength F (theta - 0) = [0.5, -1]
    assert torch.allclose(without - with_hook, expected, atol=1e-6)
    assert not torch.allclose(with_hook, without)


# -- EWC on the real tiny LoRA model ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from fedcl.config import load_config
    from fedcl.models import build_lora_model
    from fedcl.tasks import make_task

    config = load_config(None, ["model.name=tiny-llama", "model.max_length=32"])
    model, tokenizer = build_lora_model(config.model, config.lora)
    task = make_task("classification", tokenizer, ["no", "yes"], config.data, config.model, config.train)
    return model, task


def test_fisher_on_lora_covers_exactly_the_adapter(tiny):
    model, task = tiny
    records = [{"text": f"review {i} " + "good " * i, "label": "yes" if i % 2 else "no", "meta": {}}
               for i in range(4)]
    fisher = compute_fisher(model, task, records, batch_size=3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(fisher) == trainable and all("lora_" in n for n in fisher)
    assert all((f >= 0).all() for f in fisher.values()) and any(f.sum() > 0 for f in fisher.values())
    single = compute_fisher(model, task, records, batch_size=1)  # padding does not change it
    for name in fisher:
        assert torch.allclose(fisher[name], single[name], rtol=1e-3, atol=1e-10)
    method = EWC(strength=1.0)
    method.after_task(model, task, records, fisher=fisher)
    stored = list(method.ewc.fisher.values()) + list(method.ewc.anchor.values())
    assert sum(t.numel() for t in stored) == 2 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert method.extra_loss(model).item() == 0.0  # at the anchor
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b.add_(0.01)
    try:
        penalty = method.extra_loss(model)
        (auto,) = torch.autograd.grad(penalty, [lora_b])
        name = next(n for n, p in model.named_parameters() if p is lora_b)
        assert penalty.item() > 0 and torch.allclose(method.ewc.penalty_gradient(model)[name], auto)
    finally:
        with torch.no_grad():
            lora_b.sub_(0.01)


# -- methods ------------------------------------------------------------------------------

def test_registry_builds_each_method():
    kinds = {name: make_method(ContinualConfig(strategy=name)) for name in METHODS}
    assert type(kinds["naive"]) is Naive and type(kinds["replay"]) is Replay and type(kinds["ewc"]) is EWC
    assert isinstance(kinds["replay+ewc"], Combined) and kinds["replay+ewc"].name == "replay+ewc"
    with pytest.raises(ConfigError, match="continual.strategy: got 'lwf'"):
        ContinualConfig(strategy="lwf")
    with pytest.raises(ConfigError, match="Avalanche strategies are avalanche:LwF"):
        ContinualConfig(strategy="avalanche:EWCPlugins")
    with pytest.raises(ConfigError, match="continual.replay_ratio"):
        ContinualConfig(replay_ratio=1.0)


def test_combined_method_through_its_lifecycle(tmp_path):
    method = make_method(ContinualConfig(strategy="replay+ewc", replay_capacity=2, ewc_strength=2.0))
    model, task = linear_model(), LinearTask()
    naive = Naive()
    assert float(naive.extra_loss(model)) == 0.0 and list(naive.mix([[1]])) == [[1]]
    method.before_task(0, LINEAR_RECORDS)
    assert list(method.mix([LINEAR_RECORDS[:2]])) == [LINEAR_RECORDS[:2]]  # nothing stored yet
    assert method.extra_loss(model).item() == 0.0
    method.after_task(model, task, LINEAR_RECORDS)
    new = [{"x": [5.0, 5.0], "y": 9.0}] * 2
    mixed = next(iter(method.mix([new])))
    assert mixed[:2] == new and len(mixed) == 4 and all(r in LINEAR_RECORDS for r in mixed[2:])
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 1.0]]))
    assert method.extra_loss(model).item() == pytest.approx(37 / 3)
    method.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ewc.safetensors", "replay.json"]
    assert "x" in json.loads((tmp_path / "replay.json").read_text())["pools"][""]["items"][0]
    fresh = make_method(ContinualConfig(strategy="replay+ewc", replay_capacity=2, ewc_strength=2.0))
    fresh.load(tmp_path)
    assert fresh.extra_loss(model).item() == pytest.approx(37 / 3)
    again = make_method(ContinualConfig(strategy="replay+ewc", replay_capacity=2, ewc_strength=2.0))
    again.load_state_dict(method.state_dict())
    assert next(iter(again.mix([new]))) == next(iter(method.mix([new])))  # mixing rng restored too
    with pytest.raises(StateError, match="kind"):
        Replay(2, 0.5, 0).load_state_dict(method.state_dict())


# -- metrics ---------------------------------------------------------------------------------

# Accuracy on task j (column) after training task k (row). Task 0 rises after task 1
# (0.8 -> 0.9), so the maximum-based forgetting counts 0.9 - 0.6 while Avalanche counts 0.8 - 0.6.
R = [[0.8, 0.1, 0.2],
     [0.9, 0.7, 0.3],
     [0.6, 0.5, 0.9]]
B = [0.3, 0.2, 0.25]


def test_metrics_on_a_worked_three_task_example():
    assert clm.average_accuracy(R) == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    assert clm.backward_transfer(R) == pytest.approx(((0.6 - 0.8) + (0.5 - 0.7)) / 2)  # -0.2
    assert clm.forgetting(R) == pytest.approx(((0.9 - 0.6) + (0.7 - 0.5)) / 2)  # 0.25
    assert clm.avalanche_forgetting(R) == pytest.approx(((0.8 - 0.6) + (0.7 - 0.5)) / 2)  # 0.20
    assert clm.avalanche_forgetting(R) == pytest.approx(-clm.backward_transfer(R))
    assert clm.forward_transfer(R, B) == pytest.approx(((0.1 - 0.2) + (0.3 - 0.25)) / 2)  # -0.025
    assert set(clm.summary(R, B)) == {clm.ACC, clm.BWT, clm.FORGETTING, clm.FORGETTING_AVALANCHE, clm.FWT}


def test_metrics_mid_stream_and_bad_input():
    partial = R[:2]  # after task 1 of 3
    assert clm.average_accuracy(partial) == pytest.approx(0.8)
    assert clm.backward_transfer(partial) == pytest.approx(0.1)
    assert clm.forgetting(partial) == pytest.approx(-0.1)
    assert clm.forward_transfer(partial, B) == pytest.approx(-0.1)
    assert clm.summary(R[:1]) == {clm.ACC: pytest.approx(0.8)}
    assert math.isnan(clm.backward_transfer(R[:1]))
    with pytest.raises(ValueError, match="shape"):
        clm.average_accuracy([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    with pytest.raises(ValueError, match="zero-shot"):
        clm.forward_transfer(R, B[:2])


# -- streams ----------------------------------------------------------------------------------

def dated(values):
    return [{"text": f"r{i}", "label": "a" if i % 2 else "b", "meta": {"date": v}} for i, v in enumerate(values)]


DATES = ["May 30, 2011", "2011-02-01", "2012-07", "2011-11-15T10:00:00", "Jan 3, 2012", "30 May 2011"]


@pytest.mark.parametrize("period, names, sizes", [
    ("year", ["2011", "2012"], [4, 2]),
    ("quarter", ["2011-Q1", "2011-Q2", "2011-Q4", "2012-Q1", "2012-Q3"], [1, 2, 1, 1, 1]),
    ("month", ["2011-02", "2011-05", "2011-11", "2012-01", "2012-07"], [1, 2, 1, 1, 1]),
])
def test_by_period_orders_tasks_in_time(period, names, sizes):
    records = dated(DATES)
    stream = by_period(records, "date", period, test_records=dated(DATES[:2]))
    assert [t.name for t in stream] == names
    assert [len(t.train_records) for t in stream] == sizes
    assert sum(len(t.test_records) for t in stream) == 2
    held = by_period(records, "date", period, test_fraction=0.5, seed=1)
    assert [len(t.train_records) + len(t.test_records) for t in held] == sizes


@pytest.mark.parametrize("values, message", [
    (["2011-01-01", "2011-02-01", "yesterday"], "record 2: column 'date' holds 'yesterday'"),
    (["2011-13"], "record 0: column 'date' holds '2011-13'"),
    (["05/30/2011"], "not a date"),
])
def test_by_period_names_a_bad_date(values, message):
    with pytest.raises(StreamError, match=message):
        by_period(dated(values), "date", "year")


def test_by_period_refuses_missing_column_and_bad_period():
    with pytest.raises(StreamError, match="no column 'when'.*'date'"):
        by_period(dated(DATES), "when", "year")
    with pytest.raises(StreamError, match="period: got 'week'"):
        by_period(dated(DATES), "date", "week")
    assert parse_date("2020-07").month == 7 and parse_date("2019").year == 2019


def test_by_label_groups_is_class_incremental():
    records = [{"text": f"t{i}", "label": "abcd"[i % 4], "meta": {}} for i in range(40)]
    stream = by_label_groups(records, [["a", "b"], ["c", "d"]], seed=3)
    assert [t.name for t in stream] == ["a+b", "c+d"]
    assert {r["label"] for r in stream[0].train_records + stream[0].test_records} == {"a", "b"}
    assert {r["label"] for r in stream[1].test_records} == {"c", "d"}  # stratified holdout
    assert sum(len(t.train_records) + len(t.test_records) for t in stream) == 40
    with pytest.raises(StreamError, match="label 'b' is in group 0 and group 1"):
        by_label_groups(records, [["a", "b"], ["b", "c", "d"]])
    with pytest.raises(StreamError, match="label 'd' is in no group"):
        by_label_groups(records, [["a", "b"], ["c"]])


def test_from_files_keeps_file_order(tmp_path):
    paths = []
    for name, label_set in [("2019", "xy"), ("2020", "xz")]:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps({"text": f"{name} {i}", "label": label_set[i % 2]})
                                  for i in range(10)))
        paths.append(path)
    stream = from_files(paths[::-1], DataConfig(dataset="", path=str(paths[0]), test_fraction=0.2))
    assert [t.name for t in stream] == ["2020", "2019"]
    assert [(len(t.train_records), len(t.test_records)) for t in stream] == [(8, 2), (8, 2)]
    with pytest.raises(StreamError, match="2 training files but 1 test"):
        from_files(paths, DataConfig(), test_paths=paths[:1])


def test_client_share_partitions_each_task_and_allows_gaps():
    stream = [Task(f"t{k}", items(10 + k, start=100 * k), items(4, start=100 * k + 50)) for k in range(6)]
    for presence in (1.0, 0.4):
        shares = [client_share(stream, c, 4, seed=9, presence=presence) for c in range(4)]
        assert shares[0] == client_share(stream, 0, 4, seed=9, presence=presence)  # pure
        for k, task in enumerate(stream):
            assert [s[k].name for s in shares] == [task.name] * 4
            train = sorted(r["text"] for s in shares for r in s[k].train_records)
            assert train == sorted(r["text"] for r in task.train_records)
        empty = sum(not s[k].train_records for s in shares for k in range(6))
        assert (empty == 0) if presence == 1.0 else (empty > 0)
    with pytest.raises(StreamError, match="client id 4"):
        client_share(stream, 4, 4, seed=0)
