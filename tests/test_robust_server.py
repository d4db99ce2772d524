"""The server's own bounds and claims: how much one client weighs, reproducibility, run config.

The federation tests run a tiny in-process federation through the real ServerApp
and ClientApp (`tests.test_robustness_replies.Federation`: its intercept hook
turns one node's replies hostile) and check what the saved global adapter and the
federated evaluation are made of.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from fedcl.config import Config, ConfigError, flwr_app_config, from_run_config, load_config
from fedcl.session import GlobalEvaluator
from fedcl.strategies.weighting import bounded_weights
from fedcl.federation import ray_leftovers
from fedcl.federation.grid import InProcessGrid, server_context
from tests.test_robustness_replies import HOSTILE, TINY, Federation

pytestmark = pytest.mark.robustness

INFLATED = 10**6
ROUNDS = (1, 2)


def _inflates_both_counts(reply, kind, run_round, partition):
    """The hostile node claims a million examples in its first reply and every later one
    (train and evaluate), and reports a zero accuracy, so its weight shows in the average."""
    if partition == HOSTILE and not reply.has_error():
        reply.content["metrics"]["num-examples"] = INFLATED
        if kind == "evaluate":
            reply.content["metrics"]["accuracy"] = 0.0
    return False  # counted: the claim is well formed, only its weight is bounded


def _weights(counts: list[int], cap: float = 3.0) -> list[int]:
    """The rule written out again, independently of strategies/weighting.py."""
    limit = int(cap * statistics.median_low([c for c in counts if c > 0]))
    return [min(c, limit) for c in counts]


def test_an_inflated_count_weighs_at_most_weight_cap_times_the_median(tmp_path):
    fed = Federation(tmp_path, _inflates_both_counts)
    fed.check_all_rounds()
    evaluator = GlobalEvaluator(fed.config)
    previous = evaluator.initial_state
    for run_round in ROUNDS:
        record = fed.record(run_round)
        counted = [(m["num-examples"], u) for k, r, m, u in fed.counted if k == "train" and r == run_round]
        weights = _weights([c for c, _ in counted])
        honest = [c for c, _ in counted if c != INFLATED]
        assert len(counted) == 3 and max(weights) == 3 * max(honest) < INFLATED
        # The global: the last one plus the capped-weighted mean of the three updates.
        saved = evaluator.load_saved(fed.out / "adapters" / f"round-{run_round}")
        for name, start in previous.items():
            mean = sum(w * u[name] for w, (_, u) in zip(weights, counted)) / sum(weights)
            assert torch.allclose(saved[name], start + mean, atol=1e-6), (run_round, name)
        previous = saved
        # The record keeps the claim and says what it weighed.
        (hostile,) = fed.entries(run_round, HOSTILE)
        assert hostile["num_examples"] == INFLATED and hostile["aggregation_weight"] == max(weights)
        assert record["rejected"] == 0 and record["weight_capped"] == 1
        # Evaluation: the same rule among the round's evaluation replies.
        evaluated = [m for k, r, m, _ in fed.counted if k == "evaluate" and r == run_round]
        eval_weights = _weights([m["num-examples"] for m in evaluated])
        expected = sum(w * m["accuracy"] for w, m in zip(eval_weights, evaluated)) / sum(eval_weights)
        assert record["federated_eval"]["accuracy"] == pytest.approx(expected)
        assert record["weight_capped_eval"] == 1
        # Weighted as reported, the hostile zero would have pulled the average to about 0.
        reported = sum(m["num-examples"] * m["accuracy"] for m in evaluated) / sum(
            m["num-examples"] for m in evaluated)
        assert reported < expected / 100


def test_reported_weighting_keeps_flowers_fedavg_weights(tmp_path):
    fed = Federation(tmp_path, _inflates_both_counts, "strategy.weighting=reported", "federation.rounds=1")
    record = fed.record(1)
    assert record["weight_capped"] == 0 and record["weight_capped_eval"] == 0
    evaluated = [m for k, r, m, _ in fed.counted if k == "evaluate"]
    total = sum(m["num-examples"] for m in evaluated)
    expected = sum(m["num-examples"] * m["accuracy"] for m in evaluated) / total
    assert record["federated_eval"]["accuracy"] == pytest.approx(expected) and expected < 1e-3


def test_flora_stacks_with_the_same_bounded_weights(tmp_path):
    """Exact LoRA aggregation reads its weights from the one weighting place: a claim of a
    million examples gives the very global that a claim of the cap (3 x 13) gives, and not
    the one an honest count (13) gives."""
    def claiming(count):
        def tamper(reply, kind, run_round, partition):
            if partition == HOSTILE and kind == "train":
                reply.content["metrics"]["num-examples"] = count
            return False
        return tamper

    globals_ = {}
    for count in (INFLATED, 39, 13):
        fed = Federation(tmp_path, claiming(count), "strategy.name=flora", "federation.rounds=1",
                         folder=f"claims-{count}")
        globals_[count] = GlobalEvaluator(fed.config).load_saved(fed.out / "adapters" / "round-1")
    assert all(torch.equal(globals_[INFLATED][k], globals_[39][k]) for k in globals_[39])
    assert not all(torch.equal(globals_[13][k], globals_[39][k]) for k in globals_[39])


@pytest.mark.parametrize("weighting,counts,expected", [
    ("capped", [13, 13, 10**6], [13, 13, 39]),
    ("capped", [44, 84, 3, 1, 25], [44, 75, 3, 1, 25]),  # Dirichlet(0.1), 5 clients, seed 0
    ("capped", [100, 500], [100, 300]),  # two clients: the lower median is the smaller count
    ("capped", [0, 0, 5], [0, 0, 5]),  # clients without evaluation records take no part
    ("capped", [1, 1, 1], [1, 1, 1]),
    ("reported", [13, 10**6], [13, 10**6]),
    ("equal", [13, 0, 10**6], [1, 0, 1]),
    ("capped", [], []),
])
def test_bounded_weights(weighting, counts, expected):
    assert bounded_weights(counts, weighting=weighting, cap=3.0) == expected


def test_weight_cap_one_is_the_median_and_bad_settings_are_refused():
    assert bounded_weights([5, 7, 9], weighting="capped", cap=1.0) == [5, 7, 7]
    with pytest.raises(ConfigError, match="strategy.weight_cap"):
        load_config(None, ["strategy.weight_cap=0.5"])
    with pytest.raises(ConfigError, match="strategy.weighting"):
        load_config(None, ["strategy.weighting=median"])
    with pytest.raises(ValueError, match="strategy.weighting"):
        bounded_weights([1], weighting="median", cap=3.0)


# -- flwr run's run config ---------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent
RUN_CONFIG_ARG = re.compile(r"--run-config\s+(?:\\\n\s*)?('[^']*'|\"(?:[^\"\\]|\\.)*\")")


def test_pyproject_declares_every_config_key_and_only_those():
    from flwr.common.config import flatten_dict

    declared = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    expected = flwr_app_config()
    missing, extra = sorted(set(expected) - set(declared)), sorted(set(declared) - set(expected))
    assert not missing and not extra, (
        f"pyproject's [tool.flwr.app.config] lacks {missing} and has keys that are no fedcl setting "
        f"{extra}: declare each key of fedcl.config.flwr_app_config() under its section, as \"\"")
    assert declared == expected


def test_the_readmes_run_config_examples_are_accepted_by_flower_and_fedcl(tmp_path):
    """Each `--run-config` of the README, parsed and validated as Flower does (`flwr run`
    parses it, the SuperLink fuses it with the app's declared config, refusing undeclared
    keys), gives a fedcl config with those values and the config file's for the rest."""
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    (tmp_path / "run.toml").write_text("[train]\nlr = 0.05\n[federation]\nrounds = 7\n")
    examples = [shlex.split(m)[0] for m in RUN_CONFIG_ARG.findall((ROOT / "README.md").read_text())]
    assert any("model.name" in e for e in examples) and any("config=" in e for e in examples), examples
    for example in examples:
        overrides = parse_config_args([example.replace("$D", str(tmp_path))])
        config = from_run_config(get_fused_config_from_dir(ROOT, overrides))
        flat = config.to_flat()
        for key, value in overrides.items():
            if key != "config":
                assert flat[key] == value, (example, key)
        if "config" in overrides:  # the file's values hold where the run config is silent
            assert config.train.lr == 0.05 and config.federation.rounds == overrides.get("federation.rounds", 7)
        else:
            assert config.train.lr == Config().train.lr


def test_an_undeclared_key_is_refused_by_flower_and_a_declared_one_left_unset_is_the_files(tmp_path):
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    with pytest.raises(ValueError, match="model.nme"):
        get_fused_config_from_dir(ROOT, parse_config_args(['model.nme="tiny-llama"']))
    (tmp_path / "run.toml").write_text('[model]\nname = "tiny-qwen2"\n')
    fused = get_fused_config_from_dir(ROOT, parse_config_args([f'config="{tmp_path / "run.toml"}"']))
    assert fused["model.name"] == "" and from_run_config(fused).model.name == "tiny-qwen2"


# -- reproducibility ---------------------------------------------------------------------------
class ArrivingReversed(InProcessGrid):
    """Replies arrive in the reverse order of the nodes, as Ray's workers may finish."""

    def send_and_receive(self, messages, *, timeout=None):
        return list(reversed(super().send_and_receive(messages, timeout=timeout)))


def _without_timings(value):
    """metrics.json less the wall-clock figures (every key naming seconds), which differ run to run."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_two_runs_give_bitwise_identical_adapters_and_metrics_whatever_the_arrival_order(tmp_path):
    """Aggregation in node-id order: float sums do not depend on which reply came first. In
    arrival order, the same two runs differed by about 1e-8 in the adapter after round 1 (and
    1e-4 after round 2) and in the federated evaluation loss."""
    from fedcl.client.app import app as client_app
    from fedcl.server.app import main as server_main

    runs = []
    for grid_kind in (InProcessGrid, ArrivingReversed):
        out = tmp_path / grid_kind.__name__
        config = load_config(None, TINY + ["federation.rounds=1", f"run.out_dir={out}"])
        flat = config.to_flat()
        server_main(grid_kind(client_app, config.federation.clients, flat), server_context(flat))
        runs.append((config, out))
    (config, first), (_, second) = runs
    evaluator = GlobalEvaluator(config)
    a, b = (evaluator.load_saved(out / "adapters" / "round-1") for out in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    metrics = [_without_timings(json.loads((out / "metrics.json").read_text())) for out in (first, second)]
    assert metrics[0] == metrics[1]


# -- Ray's leftovers after a kill -9 -----------------------------------------------------------
IGNORES_SIGTERM = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                   "print('ready', flush=True); time.sleep(60)")


def _start(env_token: str | None) -> subprocess.Popen:
    """A real process that ignores SIGTERM (as Ray's runtime-env agent does), marked with `env_token`."""
    env = {k: v for k, v in os.environ.items() if k != ray_leftovers.OWNER_VAR}
    if env_token is not None:
        env[ray_leftovers.OWNER_VAR] = env_token
    process = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM], env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"  # SIGTERM is ignored from here on
    return process


def _marker(directory: Path, token: str) -> Path:
    path = directory / f"owner-{token.replace(':', '-')}"
    path.write_text(token + "\n")
    return path


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc (Linux)")
def test_the_next_start_ends_what_a_killed_run_left_and_nothing_else(tmp_path):
    killed_driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = ray_leftovers.owner_token(killed_driver.pid)
    live_driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = ray_leftovers.owner_token(live_driver.pid)
    leftover, running, foreign = _start(dead), _start(live), _start(None)
    processes = (killed_driver, live_driver, leftover, running, foreign)
    try:
        dead_marker, live_marker = _marker(tmp_path, dead), _marker(tmp_path, live)
        killed_driver.kill()
        killed_driver.wait()
        assert ray_leftovers.reap_leftovers(tmp_path, grace=0.5) == [leftover.pid]
        assert leftover.wait(timeout=10) == -signal.SIGKILL  # SIGTERM ignored: killed after the grace
        assert running.poll() is None and foreign.poll() is None and live_driver.poll() is None
        assert not dead_marker.exists() and live_marker.exists()
        assert ray_leftovers.reap_leftovers(tmp_path, grace=0.5) == []  # nothing left to end
    finally:
        for process in processes:
            process.kill()
            process.wait()


def test_owned_ray_marks_the_environment_and_records_the_owner_for_the_block(tmp_path, monkeypatch):
    monkeypatch.delenv(ray_leftovers.OWNER_VAR, raising=False)
    with ray_leftovers.owned_ray(tmp_path) as token:
        assert os.environ[ray_leftovers.OWNER_VAR] == token == ray_leftovers.owner_token()
        (marker,) = tmp_path.glob("owner-*")
        assert marker.read_text().strip() == token and ray_leftovers.is_alive(token)
        with ray_leftovers.owned_ray(tmp_path):  # nested (a tuning study's shared Ray, then a run)
            pass
        assert marker.exists()
    assert not list(tmp_path.glob("owner-*")) and ray_leftovers.OWNER_VAR not in os.environ
