"""Sample-level DP: per-sample gradients, DP-SGD steps, accounting, the lifetime ledger, budget."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedcl.client.app import app as client_app
from fedcl import data
from fedcl.adapters import adapter_state, load_adapter_state
from fedcl.config import ConfigError, load_config
from fedcl.privacy import (LEDGER_FILE, ClientPrivacy, DPPlan, LedgerError, PrivacyLedger, epsilon,
                           plan_for)
from fedcl.privacy.client import EXIT_AFTER_CHARGE_ENV
from fedcl.privacy.dpsgd import train_private
from fedcl.session import Shared
from fedcl.tasks import Batch
from fedcl.train import train_local, trainable_parameters
from fedcl.server.app import main as server_main
from fedcl.federation.messages import state_to_arrays
from fedcl.federation.grid import InProcessGrid, server_context

pytestmark = pytest.mark.privacy

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.name=tiny-llama", "data.max_records=60", "data.max_test_records=16",
         "train.local_steps=2", "train.batch_size=4", "federation.clients=2", "privacy.delta=1e-3"]
TINY = ["tiny-llama", "tiny-qwen2", "tiny-deepseek-v2", "tiny-deepseek-v3"]


def small_config(tmp_path, *extra):
    return load_config(None, SMALL + [f"run.out_dir={tmp_path / 'run'}",
                                      f"run.state_dir={tmp_path / 'state'}", *extra])


def shared_and_records(model_name: str, n: int = 6):
    config = load_config(None, [f"model.name={model_name}", "data.max_records=40", "model.max_length=24"])
    shared = Shared.get(config)
    records = data.client_split(config.data, shared.dataset, 0, 1, 0)[0][:n]
    return config, shared, records


def plan(**kw) -> DPPlan:
    base = dict(noise_multiplier=0.0, sample_rate=1.0, expected_batch_size=4, max_grad_norm=1e6,
                steps_per_round=1, planned_steps=1, delta=1e-5, accountant="rdp", epsilon_cap=math.inf)
    return DPPlan(**{**base, **kw})


@pytest.fixture
def fresh_adapter():
    """Restore the shared model's adapter after a test trains it."""
    saved = []

    def keep(model):
        saved.append((model, adapter_state(model)))
        return model

    yield keep
    for model, state in saved:
        load_adapter_state(model, state)


# -- per-sample gradients and the DP step ------------------------------------
@pytest.mark.parametrize("model_name", TINY)
def test_per_sample_grads_match_one_example_backward(model_name):
    from opacus import GradSampleModule

    config, shared, records = shared_and_records(model_name, n=3)
    model, task = shared.model, shared.task
    params = trainable_parameters(model)
    batch = task.encode(records)
    model.train()
    expected = []
    for i in range(len(records)):  # the same padded rows, one at a time
        one = Batch(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1], batch.targets[i:i + 1])
        model.zero_grad(set_to_none=True)
        task.per_example_loss(model, one).sum().backward()
        expected.append([p.grad.detach().clone() for p in params])
    gsm = GradSampleModule(model, loss_reduction="mean", strict=True)
    try:
        model.zero_grad(set_to_none=True)
        task.per_example_loss(model, batch).mean().backward()
        for j, p in enumerate(params):
            assert p.grad_sample.shape == (len(records), *p.shape)
            for i in range(len(records)):
                torch.testing.assert_close(p.grad_sample[i], expected[i][j], rtol=1e-4, atol=1e-6)
    finally:
        gsm._close()
        model.zero_grad(set_to_none=True)
        model.eval()


def test_dp_step_without_noise_or_clipping_equals_ordinary_step(fresh_adapter):
    config, shared, records = shared_and_records("tiny-llama", n=4)
    model = fresh_adapter(shared.model)
    start = adapter_state(model)
    train_cfg = dataclasses.replace(config.train, max_grad_norm=0.0, local_steps=1, batch_size=4)
    train_local(model, shared.task, records, train_cfg, config.model, seed=0)
    ordinary = adapter_state(model)
    load_adapter_state(model, start)
    # sample rate 1: the Poisson batch is every record, as the ordinary batch is
    train_private(model, shared.task, records, train_cfg, config.model, plan(expected_batch_size=4))
    private = adapter_state(model)
    assert any(not torch.equal(ordinary[k], start[k]) for k in start)
    for key in start:
        torch.testing.assert_close(private[key], ordinary[key], rtol=1e-4, atol=1e-6)


def test_dp_step_clips_every_per_sample_gradient(fresh_adapter):
    config, shared, records = shared_and_records("tiny-llama", n=4)
    model, task = fresh_adapter(shared.model), shared.task
    load_adapter_state(model, {k: v + 0.05 * torch.randn_like(v) for k, v in adapter_state(model).items()})
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = trainable_parameters(model)
    batch, clip = task.encode(records), 1e-3
    model.train()
    clipped = []
    for i in range(len(records)):
        one = Batch(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1], batch.targets[i:i + 1])
        model.zero_grad(set_to_none=True)
        task.per_example_loss(model, one).sum().backward()
        grads = [p.grad.detach().clone() for p in params]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        assert norm > clip  # the bound binds
        clipped.append([g * min(1.0, clip / float(norm)) for g in grads])
        assert torch.sqrt(sum((g ** 2).sum() for g in clipped[-1])) <= clip * (1 + 1e-5)
    model.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in zip(names, params)}
    # plain SGD at lr 1: the update is minus the privatised (here: clipped, averaged) gradient
    train_private(model, task, records, config.train, config.model,
                  plan(max_grad_norm=clip, expected_batch_size=len(records)),
                  make_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    for j, (name, p) in enumerate(zip(names, params)):
        want = sum(c[j] for c in clipped) / len(records)
        # atol: float32 rounding of the parameters themselves (about 3e-8 at 0.3)
        torch.testing.assert_close(before[name] - p.detach(), want, rtol=1e-3, atol=1e-7)


def test_dp_training_moves_adapter_by_expected_magnitude(fresh_adapter):
    config, shared, records = shared_and_records("tiny-llama", n=12)
    model = fresh_adapter(shared.model)
    start = adapter_state(model)
    steps, lr = 3, config.train.lr
    train_private(model, shared.task, records, config.train, config.model,
                  plan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, expected_batch_size=6,
                       steps_per_round=steps))
    delta = torch.cat([(adapter_state(model)[k] - start[k]).flatten() for k in start]).abs()
    # AdamW moves each weight by about lr per step: noise does not change that scale.
    assert float(delta.max()) <= 5 * steps * lr
    assert float(delta.mean()) >= 0.1 * lr
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())  # hooks removed


def test_empty_poisson_batch_still_takes_a_noisy_step(fresh_adapter):
    config, shared, records = shared_and_records("tiny-llama", n=4)
    model = fresh_adapter(shared.model)
    start = adapter_state(model)
    result = train_private(model, shared.task, records, config.train, config.model,
                           plan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1e-12,
                                steps_per_round=2))
    assert result.steps == 2 and result.examples == 0
    assert any(not torch.equal(adapter_state(model)[k], start[k]) for k in start)


@pytest.mark.parametrize("micro", [1, 2, 5])
def test_micro_batches_release_the_gradient_of_the_logical_batch_in_one_piece(fresh_adapter, micro):
    """Clipped per-example gradients summed over micro-batches, one draw of noise per logical step."""
    config, shared, records = shared_and_records("tiny-llama", n=6)
    labels = shared.task.labels
    # One text for every record (so padding cannot differ between micro-batches), labels varied.
    records = [{**records[0], "label": labels[i % len(labels)]} for i in range(6)]
    model = fresh_adapter(shared.model)
    load_adapter_state(model, {k: v + 0.05 * torch.randn_like(v) for k, v in adapter_state(model).items()})
    start = adapter_state(model)
    dp = plan(noise_multiplier=0.5, max_grad_norm=1e-3, expected_batch_size=6, steps_per_round=2)

    def released(micro_batch_size: int) -> tuple[dict, object]:
        load_adapter_state(model, start)
        train_cfg = dataclasses.replace(config.train, micro_batch_size=micro_batch_size)
        result = train_private(model, shared.task, records, train_cfg, config.model, dp,
                               generator=torch.Generator().manual_seed(7),
                               make_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
        return {k: start[k] - v for k, v in adapter_state(model).items()}, result

    whole, one_piece = released(0)
    split, in_parts = released(micro)
    assert in_parts.steps == one_piece.steps == 2  # the ledger is charged per logical step
    assert in_parts.examples == one_piece.examples == 12
    assert in_parts.loss == pytest.approx(one_piece.loss, rel=1e-5)
    for key in start:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-4, atol=1e-7)
    assert any(float(v.abs().max()) > 0 for v in whole.values())


@pytest.mark.parametrize("indices, size, runs", [([1, 2, 3], 0, [[1, 2, 3]]), ([1, 2, 3], 3, [[1, 2, 3]]),
                                                 ([1, 2, 3], 2, [[1, 2], [3]]), ([4], 1, [[4]])])
def test_micro_batches_cut_a_logical_batch_in_order(indices, size, runs):
    from fedcl.privacy.dpsgd import micro_batches

    assert micro_batches(indices, size) == runs


def test_micro_batch_size_must_not_be_negative():
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        load_config(None, ["train.micro_batch_size=-1"])


# -- accounting ------------------------------------------------------------------
# Opacus' own reference values (opacus/tests/accountants_test.py). Its PRV test
# runs int(90 // 0.04) = 2249 steps, not 2250: floor division of floats.
@pytest.mark.parametrize("accountant, steps, reference", [("rdp", 2250, 7.32911117143),
                                                          ("prv", 2249, 6.777395712150674)])
def test_ledger_reproduces_opacus_reference_epsilon(accountant, steps, reference):
    ledger = PrivacyLedger()
    eps = ledger.record(run="r", server_round=1, steps=steps, noise_multiplier=1.5, sample_rate=0.04,
                        delta=1e-5, accountant=accountant)
    assert eps == pytest.approx(reference, rel=1e-9)
    split = PrivacyLedger()  # the same steps charged over many rounds compose to the same value
    for r, chunk in enumerate([250] * 8 + [steps - 2000], start=1):
        split.record(run="r", server_round=r, steps=chunk, noise_multiplier=1.5, sample_rate=0.04,
                     delta=1e-5, accountant=accountant)
    assert split.epsilon(delta=1e-5, accountant=accountant) == pytest.approx(reference, rel=1e-9)


def test_noise_is_calibrated_once_for_the_whole_schedule():
    cfg = load_config(None, ["privacy.target_epsilon=4", "privacy.delta=1e-4"]).privacy
    p = plan_for(cfg, num_records=400, batch_size=16, local_steps=5, rounds=6)
    assert p.planned_steps == 30 and p.sample_rate == 16 / 400
    spent = epsilon([(p.noise_multiplier, p.sample_rate, 30)], delta=1e-4, accountant="rdp")
    assert 3.9 <= spent <= 4.0


# -- the ledger ---------------------------------------------------------------------
def _ledger(rounds: int = 2) -> PrivacyLedger:
    ledger = PrivacyLedger()
    for r in range(1, rounds + 1):
        ledger.record(run="runs/a", server_round=r, steps=5, noise_multiplier=1.1, sample_rate=0.05,
                      delta=1e-5, accountant="rdp")
    return ledger


def test_ledger_state_dict_round_trip(tmp_path):
    ledger = _ledger()
    back = PrivacyLedger()
    back.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert back.history == ledger.history == [(1.1, 0.05, 10)]
    assert back.entries == ledger.entries
    ledger.save(tmp_path / LEDGER_FILE)
    loaded = PrivacyLedger.load(tmp_path / LEDGER_FILE)
    assert loaded.epsilon(delta=1e-5, accountant="rdp") == ledger.entries[-1]["epsilon"]


@pytest.mark.parametrize("change", [{"kind": "opacus.RDPAccountant"}, {"version": 99},
                                    {"history": [[1.0, 0.1]]}, {"entries": "x"}])
def test_ledger_refuses_mismatched_state(change):
    state = {**_ledger().state_dict(), **change}
    with pytest.raises(LedgerError):
        PrivacyLedger().load_state_dict(state)


def test_ledger_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / LEDGER_FILE
    _ledger(1).save(path)
    before = path.read_text()

    def crash(*args):
        raise OSError("simulated crash mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        _ledger(3).save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [LEDGER_FILE]  # no temp file left


def test_a_runs_own_epsilon_composes_its_entries_alone():
    ledger = PrivacyLedger()
    for run, r in [("a", 1), ("b", 1), ("a", 2), ("b", 2)]:
        ledger.record(run=run, server_round=r, steps=5, noise_multiplier=1.1, sample_rate=0.05,
                      delta=1e-5, accountant="rdp")
    alone = epsilon([(1.1, 0.05, 10)], delta=1e-5, accountant="rdp")
    assert ledger.run_epsilon("a", delta=1e-5, accountant="rdp") == pytest.approx(alone, rel=1e-9)
    assert ledger.run_epsilon("b", delta=1e-5, accountant="rdp") == pytest.approx(alone, rel=1e-9)
    assert ledger.epsilon(delta=1e-5, accountant="rdp") > alone
    assert ledger.run_epsilon("never", delta=1e-5, accountant="rdp") == 0.0


def test_guard_refuses_to_train_past_the_budget(tmp_path):
    cap = epsilon([(1.0, 0.1, 10)], delta=1e-5, accountant="rdp") + 1e-6
    guard = ClientPrivacy(plan(noise_multiplier=1.0, sample_rate=0.1, steps_per_round=4,
                               epsilon_cap=cap), tmp_path)
    guard.charge(run="a", server_round=1, steps=4)
    guard.charge(run="a", server_round=2, steps=4)
    verdict = guard.check()
    assert not verdict.allowed and verdict.epsilon_after > cap > verdict.epsilon
    assert "budget" in verdict.reason


# -- bad settings, before any training ------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("privacy.noise_multiplier=-1", "privacy.noise_multiplier"),
    ("privacy.delta=0", "privacy.delta"),
    ("privacy.accountant=gdp", "privacy.accountant"),
    ("privacy.budget_epsilon=3", "privacy.budget_epsilon"),  # a budget with DP off
    ("privacy.target_epsilon=-2", "privacy.target_epsilon"),
    ("privacy.max_grad_norm=0", "privacy.max_grad_norm"),
])
def test_bad_privacy_settings_are_rejected(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, key", [
    (["privacy.noise_multiplier=1", "privacy.target_epsilon=8"], "privacy.noise_multiplier"),
    # one mode at a time: a node's lifetime budget is sample-level DP
    (["privacy.mode=client", "privacy.target_epsilon=8", "privacy.budget_epsilon=10"], "privacy.budget_epsilon"),
])
def test_conflicting_privacy_settings_are_rejected(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


@pytest.mark.parametrize("extra, key", [
    (["privacy.target_epsilon=8", "privacy.delta=0.05"], "privacy.delta"),  # delta >= 1/N
    (["privacy.noise_multiplier=0.5", "privacy.budget_epsilon=0.01"], "privacy.budget_epsilon"),
])
def test_settings_checked_against_client_data_before_any_write(tmp_path, capsys, extra, key):
    from fedcl.ops.cli import main

    out = tmp_path / "run"
    args = ["simulate", "--model", "tiny-llama", "--clients", "2", "--out", str(out),
            "--set", "data.max_records=60"] + [a for e in extra for a in ("--set", e)]
    assert main(args) == 2
    assert key in capsys.readouterr().err
    assert not out.exists()


# -- the real apps, in process ----------------------------------------------------------
def run_server(config):
    flat = config.to_flat()
    server_main(InProcessGrid(client_app, config.federation.clients, flat), server_context(flat))
    return json.loads((Path(config.run.out_dir) / "metrics.json").read_text())


def epsilons(metrics, field: str = "epsilon") -> list[list[float]]:
    return [[c[field] for c in r["clients"]] for r in metrics["rounds"]]


def test_dp_run_reports_growing_epsilon_and_continues_across_runs(tmp_path):
    first = small_config(tmp_path, "federation.rounds=3", "privacy.target_epsilon=6")
    m1 = run_server(first)
    eps = epsilons(m1)
    assert all(len(row) == 2 for row in eps)
    for a, b in zip(eps, eps[1:]):
        assert all(y > x for x, y in zip(a, b))
    assert all(0 < e <= 6 for e in eps[-1])
    assert m1["privacy"]["mode"] == "sample" and m1["privacy"]["delta"] == 1e-3
    assert set(m1["privacy"]["clients"]) == {"0", "1"}
    assert all(r["refused"] == 0 for r in m1["rounds"])
    # A new run on the same state folder starts from the first's epsilon.
    second = dataclasses.replace(first, run=dataclasses.replace(first.run, out_dir=str(tmp_path / "run2")))
    # no budget: target_epsilon is per run, so the second run trains and composes
    m2 = run_server(second)
    for before, after in zip(eps[-1], epsilons(m2)[0]):
        assert after > before
    # Each reply also says what its own run spent: the first run's from a fresh ledger is its
    # lifetime figure, and the second run, on the same schedule, cost the same alone.
    flat = [e for row in eps for e in row]
    assert [e for row in epsilons(m1, "run_epsilon") for e in row] == pytest.approx(flat)
    assert [e for row in epsilons(m2, "run_epsilon") for e in row] == pytest.approx(flat)
    assert all(r < e for row, erow in zip(epsilons(m2, "run_epsilon"), epsilons(m2)) for r, e in zip(row, erow))
    ledger = PrivacyLedger.load(tmp_path / "state" / "client-0" / LEDGER_FILE)
    assert [e["run"] for e in ledger.entries] == [first.run.out_dir] * 3 + [second.run.out_dir] * 3
    # A budget below a further round's cost: clients refuse, the run still completes.
    third = second.replace({"run.out_dir": str(tmp_path / "run3"),
                            "privacy.budget_epsilon": max(epsilons(m2)[-1]) + 0.01})
    m3 = run_server(third)
    assert [r["refused"] for r in m3["rounds"]] == [2, 2, 2]
    assert all(c["status"] == 1 and "train_loss" not in c for r in m3["rounds"] for c in r["clients"])
    assert epsilons(m3)[-1] == pytest.approx(epsilons(m2)[-1])
    assert epsilons(m3, "run_epsilon") == [[0.0, 0.0]] * 3  # refused every round: this run spent nothing
    assert len(PrivacyLedger.load(tmp_path / "state" / "client-0" / LEDGER_FILE).entries) == 6


_CLIENT_ROUND = """
import sys
from flwr.app import ConfigRecord, Message, RecordDict
from fedcl.client.app import app
from fedcl.config import load_config
from fedcl.session import GlobalEvaluator
from fedcl.federation.messages import state_to_arrays
from fedcl.federation.grid import InProcessGrid
config = load_config(None, sys.argv[1:])
grid = InProcessGrid(app, 2, config.to_flat())
msg = Message(content=RecordDict({"arrays": state_to_arrays(GlobalEvaluator(config).initial_state),
                                  "config": ConfigRecord({"server-round": 1})}),
              dst_node_id=grid.node_ids[0], message_type="train")
reply = grid.send_and_receive([msg])[0]
print("REPLIED", reply.has_error())
"""


def test_ledger_survives_a_client_killed_before_its_reply(tmp_path):
    config = small_config(tmp_path, "privacy.target_epsilon=6")
    args = [o for o in SMALL] + [f"run.out_dir={config.run.out_dir}", f"run.state_dir={config.run.state_dir}",
                                 "privacy.target_epsilon=6"]
    env = {**os.environ, EXIT_AFTER_CHARGE_ENV: "1"}
    done = subprocess.run([sys.executable, "-c", _CLIENT_ROUND, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 75, done.stderr[-2000:]
    assert "REPLIED" not in done.stdout  # killed after the ledger write, before the reply
    path = tmp_path / "state" / "client-0" / LEDGER_FILE
    killed = PrivacyLedger.load(path)
    assert [e["round"] for e in killed.entries] == [1]
    # The node comes back; its next round continues from the charged epsilon.
    grid = InProcessGrid(client_app, 2, config.to_flat())
    msg = Message(content=RecordDict({"arrays": state_to_arrays(Shared.get(config).initial_state),
                                      "config": ConfigRecord({"server-round": 2})}),
                  dst_node_id=grid.node_ids[0], message_type="train")
    reply = grid.send_and_receive([msg])[0]
    eps = reply.content.metric_records["metrics"]["epsilon"]
    assert eps > killed.entries[0]["epsilon"]
    assert [e["round"] for e in PrivacyLedger.load(path).entries] == [1, 2]


# -- the canary audit's statistics ---------------------------------------------------
def test_audit_bound_of_perfectly_separated_scores_is_what_n_canaries_can_prove():
    from fedcl.privacy.audit import audit_bound, epsilon_lower_bound, max_provable_epsilon

    n, alpha = 50, 0.05
    members, others = [100.0 + i for i in range(n)], [float(i) for i in range(n)]
    bound = audit_bound(members, others, alpha=alpha)
    # Best threshold: every member above, no non-member. TPR = 1 has the one-sided
    # Clopper-Pearson lower bound beta^(1/n), FPR = 0 the upper bound 1 - beta^(1/n),
    # beta being alpha split over the 2 bounds of each of the 2n thresholds.
    beta = alpha / (2 * 2 * n)
    expected = math.log(beta ** (1 / n) / (1 - beta ** (1 / n)))
    assert bound.epsilon == pytest.approx(expected, rel=1e-9)
    assert bound.threshold == 100.0 and bound.thresholds == 2 * n
    assert max_provable_epsilon(n, n, alpha=alpha) == pytest.approx(expected, rel=1e-9)
    # delta is subtracted from TPR, as (eps, delta)-DP allows: a slightly smaller bound.
    with_delta = epsilon_lower_bound(members, others, alpha=alpha, delta=0.01)
    assert with_delta == pytest.approx(math.log((beta ** (1 / n) - 0.01) / (1 - beta ** (1 / n))), rel=1e-9)
    assert with_delta < bound.epsilon
    # More canaries prove more; fewer, less.
    assert max_provable_epsilon(200, 200) > expected > max_provable_epsilon(10, 10)


@pytest.mark.parametrize("seed", range(5))
def test_audit_bound_of_identical_distributions_is_about_zero(seed):
    from fedcl.privacy.audit import epsilon_lower_bound

    rng = torch.Generator().manual_seed(seed)
    scores = torch.randn(400, generator=rng).tolist()
    assert epsilon_lower_bound(scores[:200], scores[200:]) < 0.15
    # The very same scores on both sides: nothing to tell apart, exactly 0.
    assert epsilon_lower_bound(scores[:200], scores[:200]) == 0.0


@pytest.mark.parametrize("scores_in, scores_out", [
    ([0.0], [0.0]), ([1.0], [0.0]), ([0.0], [1.0]),  # one canary a side
    ([0.0] * 5, [1.0] * 5),  # members scored below non-members: no evidence, not negative
    ([3.0, 3.0, 3.0], [3.0, 3.0]),  # ties everywhere
])
def test_audit_bound_is_never_negative_or_nan(scores_in, scores_out):
    from fedcl.privacy.audit import audit_bound

    bound = audit_bound(scores_in, scores_out, delta=1e-5)
    assert bound.epsilon >= 0.0 and math.isfinite(bound.epsilon)
    json.dumps(bound.to_dict(), allow_nan=False)  # a result file never holds NaN


@pytest.mark.parametrize("scores_in, scores_out, kw, key", [
    ([], [1.0], {}, "scores_in"), ([1.0], [float("nan")], {}, "scores_out"),
    ([1.0], [0.0], {"alpha": 0.0}, "alpha"), ([1.0], [0.0], {"delta": 1.0}, "delta"),
])
def test_audit_bound_rejects_bad_input(scores_in, scores_out, kw, key):
    from fedcl.privacy.audit import audit_bound

    with pytest.raises(ValueError, match=key):
        audit_bound(scores_in, scores_out, **kw)
