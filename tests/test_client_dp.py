"""Client-level DP (privacy.mode = "client"): clipping, equal weights, noise, epsilon.

Runs the real ServerApp and ClientApp in-process (tiny-llama, 3 clients, float16
wire updates) and checks each round's global against the clients' own updates.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import fedcl.server.app as server_app
from fedcl.client.app import app as client_app
from fedcl.config import ConfigError, load_config
from fedcl.privacy.accounting import client_plan
from fedcl.strategies import client_dp
from fedcl.federation.messages import arrays_to_state
from fedcl.federation.grid import InProcessGrid, server_context

pytestmark = pytest.mark.privacy

SMALL = ["model.name=tiny-llama", "data.max_records=60", "data.max_test_records=12",
         "train.local_steps=1", "train.batch_size=4", "federation.clients=3", "federation.rounds=2",
         "privacy.mode=client"]


def small_config(tmp_path, *extra):
    return load_config(None, SMALL + [f"run.out_dir={tmp_path / 'run'}", *extra])


def flat_norm(state: dict) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in state.values())))


def run(config, monkeypatch, plan=None):
    """Run the federation; per round: the global it started from, the raw updates, the result."""
    rounds = []
    real_build = server_app.build_strategy

    def build(cfg, **kwargs):
        strategy = (client_dp.build(cfg, plan=plan, **kwargs) if plan is not None
                    else real_build(cfg, **kwargs))
        aggregate = strategy.aggregate_train

        def capture(server_round, replies):
            replies = list(replies)
            start = {k: v.clone() for k, v in strategy.current_global.items()}
            # float16 wire updates, as sent, before screening decodes them in place
            raw = [arrays_to_state(r.content["arrays"]) for r in replies]
            arrays, metrics = aggregate(server_round, replies)
            sent = [arrays_to_state(r.content["arrays"]) for r in replies]  # decoded and clipped
            rounds.append({"start": start, "updates": raw, "clipped": sent,
                           "result": arrays_to_state(arrays)})
            return arrays, metrics

        strategy.aggregate_train = capture
        return strategy

    monkeypatch.setattr(server_app, "build_strategy", build)
    flat = config.to_flat()
    grid = InProcessGrid(client_app, config.federation.clients, flat)
    server_app.main(grid, server_context(flat))
    metrics = json.loads(open(f"{config.run.out_dir}/metrics.json").read())
    return rounds, metrics


def clipped(update: dict, clip: float) -> dict:
    scale = min(1.0, clip / flat_norm(update))
    return {k: v * scale for k, v in update.items()}


@pytest.mark.parametrize("clip, clips_all", [(1e-3, True), (1e6, False)])
def test_global_is_mean_of_clipped_updates_without_noise(tmp_path, monkeypatch, clip, clips_all):
    config = small_config(tmp_path, "privacy.noise_multiplier=1", f"privacy.max_grad_norm={clip}")
    plan = dataclasses.replace(client_plan(config.privacy, clients=3, clients_per_round=0, rounds=2),
                               noise_multiplier=0.0)
    rounds, metrics = run(config, monkeypatch, plan=plan)
    assert len(rounds) == 2
    for r in rounds:
        assert len(r["updates"]) == 3
        for state in r["clipped"]:  # every update the server averaged is within the clip
            assert flat_norm({k: state[k] - r["start"][k] for k in state}) <= clip * (1 + 1e-5)
        # huge clip: the plain unweighted mean; small clip: the mean of clipped updates
        updates = [clipped(u, clip) for u in r["updates"]] if clips_all else r["updates"]
        for name, value in r["result"].items():
            expected = r["start"][name] + sum(u[name] for u in updates) / 3
            assert torch.allclose(value, expected, rtol=0, atol=1e-7), name
    for record in metrics["rounds"]:
        assert record["client_dp"]["clipped"] == (3 if clips_all else 0)
        assert record["client_dp"]["averaged"] == 3
        assert record["client_dp"]["noise_std"] == 0.0


def test_noise_std_and_epsilon_per_round(tmp_path, monkeypatch):
    from opacus.accountants import RDPAccountant

    clip, noise = 1e-3, 1.5
    config = small_config(tmp_path, f"privacy.noise_multiplier={noise}", f"privacy.max_grad_norm={clip}",
                          "federation.clients_per_round=2")
    rounds, metrics = run(config, monkeypatch)
    residuals = []
    for r in rounds:
        assert len(r["updates"]) == 2
        mean = {k: sum(clipped(u, clip)[k] for u in r["updates"]) / 2 for k in r["start"]}
        residuals += [(r["result"][k] - r["start"][k] - mean[k]).flatten() for k in r["start"]]
    residual = torch.cat(residuals).double()
    assert residual.numel() > 5000
    assert float(residual.mean()) == pytest.approx(0.0, abs=0.05 * noise * clip / 2)
    assert float(residual.std()) == pytest.approx(noise * clip / 2, rel=0.05)  # std = z * clip / n

    epsilons = []
    for record in metrics["rounds"]:
        dp = record["client_dp"]
        assert (dp["noise_multiplier"], dp["clip"], dp["noise_std"]) == (noise, clip, pytest.approx(noise * clip / 2))
        acc = RDPAccountant()
        acc.history = [(noise, 2 / 3, record["round"])]
        assert dp["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
        epsilons.append(dp["epsilon"])
    assert 0 < epsilons[0] < epsilons[1]
    section = metrics["privacy"]
    assert (section["mode"], section["noise_multiplier"], section["sample_rate"]) == ("client", noise, 2 / 3)
    assert section["planned_epsilon"] == pytest.approx(epsilons[-1])


def test_target_epsilon_calibrates_noise_for_the_rounds():
    config = load_config(None, ["privacy.mode=client", "privacy.target_epsilon=8", "federation.clients=100",
                                "federation.clients_per_round=10", "federation.rounds=50"])
    plan = client_plan(config.privacy, clients=100, clients_per_round=10, rounds=50)
    assert plan.sample_rate == 0.1 and plan.num_sampled == 10
    assert 7.5 < plan.epsilon_after(50) <= 8.0
    assert plan.epsilon_after(10) < plan.epsilon_after(50)


@pytest.mark.parametrize("overrides, key", [
    (["privacy.target_epsilon=8", "privacy.budget_epsilon=10"], "privacy.budget_epsilon"),
    (["privacy.noise_multiplier=1", "strategy.name=krum"], "strategy.name"),
    (["privacy.noise_multiplier=1", "strategy.name=fedadam"], "strategy.name"),
])
def test_client_mode_conflicts_are_rejected(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["privacy.mode=client", *overrides])


def test_client_mode_builds_the_dp_strategy_and_clients_skip_dp_sgd(tmp_path):
    from fedcl.strategies import build_strategy
    config = small_config(tmp_path, "privacy.noise_multiplier=1", "strategy.name=ffa-lora")
    strategy = build_strategy(config)
    assert isinstance(strategy, client_dp.ClientDPFfaLora)
    state = strategy.state_dict()
    assert state["kind"] == "ClientDPFfaLora"
    strategy.load_state_dict(state)
    with pytest.raises(ValueError, match="LoraFedAvg"):  # a non-DP run's state is refused
        strategy.load_state_dict({"kind": "LoraFedAvg"})
    assert np.isfinite(strategy.dp_plan.epsilon_after(2))
