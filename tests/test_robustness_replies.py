"""Hostile replies: one client must not stop or steer the federation.

Each federation test runs a tiny in-process federation (3 clients, 2 rounds)
through the real ServerApp and ClientApp; `InProcessGrid`'s intercept hook
turns one node's train or evaluate replies hostile. Each checks that the run
finishes every round, that the hostile reply is counted as rejected with a
reason, and that the global adapter (or the federated evaluation) is exactly
what the honest replies make of it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord

from fedcl.client.app import app as client_app
from fedcl.config import load_config
from fedcl.federation.grid import InProcessGrid, server_context
from fedcl.federation.messages import arrays_to_state
from fedcl.server.app import main as server_main
from fedcl.session import GlobalEvaluator

pytestmark = pytest.mark.robustness

TINY = ["model.name=tiny-llama", "data.max_records=48", "data.max_test_records=16", "train.local_steps=1",
        "train.batch_size=4", "federation.clients=3", "federation.rounds=2"]
HOSTILE = 2  # the partition whose node turns hostile, unless a test says otherwise
ROUNDS = (1, 2)


def put_metric(reply, key, value) -> None:
    """Set a reply metric; values MetricRecord refuses ("7", None) are written past its type
    check, as a broken or foreign transport could hand them to the strategy."""
    record = reply.content["metrics"]
    try:
        record[key] = value
    except TypeError:
        record.__dict__["_data"][key] = value


class Federation:
    """One run whose replies pass through `tamper(reply, kind, run_round, partition)`, which may
    change a reply and returns True for one that must be left out of every aggregate."""

    def __init__(self, tmp_path, tamper, *overrides: str, folder: str = "run"):
        self.out = tmp_path / folder
        self.config = load_config(None, TINY + [f"run.out_dir={self.out}", *overrides])
        self.tamper = tamper
        self.counted: list[tuple[str, int, dict, dict | None]] = []  # kind, round, metrics, update
        flat = self.config.to_flat()
        self.grid = InProcessGrid(client_app, self.config.federation.clients, flat, intercept=self._intercept)
        server_main(self.grid, server_context(flat))
        self.metrics = json.loads((self.out / "metrics.json").read_text())

    def _intercept(self, partition: int, reply):
        kind = reply.metadata.message_type
        run_round = int(self.grid.sent[-1].content["config"]["server-round"])
        if not self.tamper(reply, kind, run_round, partition):
            update = arrays_to_state(reply.content["arrays"]) if kind == "train" else None
            self.counted.append((kind, run_round, dict(reply.content["metrics"]), update))
        return reply

    def node(self, partition: int) -> int:
        return self.grid.node_ids[partition]

    def record(self, run_round: int) -> dict:
        return next(r for r in self.metrics["rounds"] if r["round"] == run_round)

    def entries(self, run_round: int, partition: int) -> list[dict]:
        return [c for c in self.record(run_round)["clients"] if c["node_id"] == self.node(partition)]

    def check_all_rounds(self) -> None:
        assert [r["round"] for r in self.metrics["rounds"]] == list(ROUNDS)

    def check_global_is_the_counted_mean(self) -> None:
        """Each round's saved global: the last one plus the example-weighted mean of the counted
        updates (float16 transport: the wire carries the update itself)."""
        evaluator = GlobalEvaluator(self.config)
        previous = evaluator.initial_state
        for run_round in ROUNDS:
            counted = [(m["num-examples"], u) for k, r, m, u in self.counted if k == "train" and r == run_round]
            total = sum(w for w, _ in counted)
            saved = evaluator.load_saved(self.out / "adapters" / f"round-{run_round}")
            for name, start in previous.items():
                mean = sum(w * u[name] for w, u in counted) / total
                assert torch.allclose(saved[name], start + mean, atol=1e-6), (run_round, name)
            previous = saved

    def check_federated_eval_is_the_counted_mean(self) -> None:
        for run_round in ROUNDS:
            counted = [m for k, r, m, _ in self.counted if k == "evaluate" and r == run_round]
            total = sum(m["num-examples"] for m in counted)
            federated = self.record(run_round)["federated_eval"]
            assert set(federated) == set(counted[0]) - {"num-examples", "partition-id"}
            for key, value in federated.items():
                assert value == pytest.approx(sum(m["num-examples"] * m[key] for m in counted) / total), key


def check_hostile_rejected(fed: Federation, kind: str, words: str) -> None:
    """In every round, the hostile node's `kind` reply was rejected with a reason naming `words`."""
    for run_round in ROUNDS:
        record = fed.record(run_round)
        if kind == "train":
            assert record["rejected"] == 1 and record.get("rejected_eval") == 0
            (hostile,) = fed.entries(run_round, HOSTILE)
            assert words in hostile["rejected"], hostile
        else:
            assert record["rejected"] == 0 and record["rejected_eval"] == 1
            (hostile,) = record["rejected_eval_clients"]
            assert hostile["node_id"] == fed.node(HOSTILE) and words in hostile["rejected"], hostile
        honest = [c for c in record["clients"] if c["node_id"] != fed.node(HOSTILE)]
        assert [c["id"] for c in honest] == [0, 1] and not any("rejected" in c for c in honest)


# -- a metric value that is not a usable number ------------------------------------------------
HOSTILE_VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "string": "7", "list": [1],
                  "none": None}


@pytest.mark.parametrize("value", list(HOSTILE_VALUES))
@pytest.mark.parametrize("key", ["partition-id", "num-examples", "status"])
@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_a_hostile_metric_value_is_rejected_and_the_run_goes_on(tmp_path, kind, key, value):
    def tamper(reply, reply_kind, run_round, partition):
        if reply_kind == kind and partition == HOSTILE:
            put_metric(reply, key, HOSTILE_VALUES[value])
            return True
        return False

    fed = Federation(tmp_path, tamper)
    fed.check_all_rounds()
    check_hostile_rejected(fed, kind, repr(key))
    fed.check_global_is_the_counted_mean()
    fed.check_federated_eval_is_the_counted_mean()


# -- metric keys that differ from the other replies' -------------------------------------------
@pytest.mark.parametrize("kind,change,key", [
    ("train", "extra", "weight"), ("train", "missing", "train-loss"), ("train", "missing", "num-examples"),
    ("evaluate", "extra", "weight"), ("evaluate", "missing", "accuracy"),
    ("evaluate", "missing", "partition-id"),
])
def test_an_extra_or_a_missing_metric_key_is_rejected(tmp_path, kind, change, key):
    def tamper(reply, reply_kind, run_round, partition):
        if reply_kind != kind or partition != HOSTILE:
            return False
        if change == "extra":
            reply.content["metrics"][key] = 1e6
        else:
            del reply.content["metrics"][key]
        return True

    fed = Federation(tmp_path, tamper)
    fed.check_all_rounds()
    check_hostile_rejected(fed, kind, key)
    fed.check_global_is_the_counted_mean()
    fed.check_federated_eval_is_the_counted_mean()


@pytest.mark.parametrize("how", ["as-config-record", "two-metric-records"])
@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_metrics_outside_one_metric_record_are_rejected(tmp_path, kind, how):
    def tamper(reply, reply_kind, run_round, partition):
        if reply_kind != kind or partition != HOSTILE:
            return False
        metrics = dict(reply.content["metrics"])
        if how == "as-config-record":  # a ConfigRecord takes strings: "num-examples" = "1000000"
            reply.content["metrics"] = ConfigRecord({k: str(v) for k, v in metrics.items()})
        else:
            reply.content["more-metrics"] = MetricRecord({**metrics, "num-examples": 10**6})
        return True

    fed = Federation(tmp_path, tamper)
    fed.check_all_rounds()
    check_hostile_rejected(fed, kind, "MetricRecord")
    fed.check_global_is_the_counted_mean()
    fed.check_federated_eval_is_the_counted_mean()


# -- the example-count cap follows the node, not the partition id it claims ---------------------
def test_two_nodes_claiming_one_partition_id_each_keep_their_own_cap(tmp_path):
    # Partition 0's node claims partition 1 and answers first: with a small count in round 1
    # (which counts) and an inflated one in round 2. Neither may touch node 1's cap.
    def tamper(reply, kind, run_round, partition):
        if kind != "train" or partition != 0:
            return False
        reply.content["metrics"]["partition-id"] = 1
        reply.content["metrics"]["num-examples"] = 1 if run_round == 1 else 10**6
        return run_round == 2

    fed = Federation(tmp_path, tamper)
    fed.check_all_rounds()
    first, second = fed.record(1), fed.record(2)
    assert first["rejected"] == 0 and [(c["id"], c["node_id"]) for c in first["clients"]] == [
        (1, fed.node(0)), (1, fed.node(1)), (2, fed.node(2))]
    assert second["rejected"] == 1
    (hostile,) = fed.entries(2, 0)
    assert hostile["id"] == 1 and "exceeds the 1 this node first reported" in hostile["rejected"]
    for run_round in ROUNDS:
        (honest,) = fed.entries(run_round, 1)
        assert honest["id"] == 1 and honest["num_examples"] > 1 and "rejected" not in honest
    fed.check_global_is_the_counted_mean()


def _claims_a_new_partition_id_with_more_examples(reply, kind, run_round, partition):
    if kind == "train" and partition == HOSTILE and run_round == 2:
        reply.content["metrics"]["partition-id"] = 7
        reply.content["metrics"]["num-examples"] = 10**6
        return True
    return False


def test_a_node_changing_its_partition_id_keeps_its_cap(tmp_path):
    fed = Federation(tmp_path, _claims_a_new_partition_id_with_more_examples)
    fed.check_all_rounds()
    assert fed.record(1)["rejected"] == 0 and fed.record(2)["rejected"] == 1
    (hostile,) = fed.entries(2, HOSTILE)
    first = fed.entries(1, HOSTILE)[0]["num_examples"]
    assert hostile["id"] == 7 and f"exceeds the {first} this node first reported" in hostile["rejected"]
    fed.check_global_is_the_counted_mean()


def test_the_cap_survives_a_resume(tmp_path):
    Federation(tmp_path, lambda *_: False, "federation.rounds=1")
    state = json.loads((tmp_path / "run" / "strategy_state.json").read_text())
    assert state["first_examples_by_node"] == {"1000": 13, "1001": 13, "1002": 13}
    resumed = Federation(tmp_path, _claims_a_new_partition_id_with_more_examples)
    record = resumed.record(2)
    assert record["rejected"] == 1 and "this node first reported" in resumed.entries(2, HOSTILE)[0]["rejected"]


def test_an_old_state_keyed_by_partition_id_loads_without_its_caps():
    from fedcl.strategies import build_strategy

    strategy = build_strategy(load_config(None, ["model.name=tiny-llama"]))
    strategy.load_state_dict({"kind": "LoraFedAvg", "first_examples": {"0": 13, "1/task-0": 5}})
    assert strategy.state_dict() == {"kind": "LoraFedAvg", "first_examples_by_node": {}}


# -- the checks on their own ---------------------------------------------------------------------
def test_metric_checks_name_the_key_and_the_value():
    from fedcl.strategies.screening import check_metrics

    good = {"num-examples": 13, "partition-id": 0, "train-loss": 1.2, "data-sha256": [1, 2]}
    assert check_metrics({"metrics": MetricRecord(good)}) is None
    assert check_metrics({"metrics": MetricRecord({**good, "status": 2, "task": 1.0})}) is None
    cases = {"partition-id": -1, "num-examples": 1.5, "status": 9, "task": math.nan,
             "train-loss": math.inf, "data-sha256": [1, math.nan]}
    for key, value in cases.items():
        metrics = MetricRecord(good)
        metrics.__dict__["_data"][key] = value  # [1, nan]: a list MetricRecord itself refuses
        assert repr(key) in check_metrics({"metrics": metrics}), key
    assert "missing" in check_metrics({"metrics": MetricRecord({"num-examples": 1})})
    assert "got 2" in check_metrics({"a": MetricRecord(good), "b": MetricRecord(good)})


def test_key_agreement_takes_the_majority_and_without_one_the_common_keys():
    from fedcl.strategies.screening import check_agreement

    full, short = frozenset({"num-examples", "partition-id", "train-loss"}), frozenset({"num-examples",
                                                                                         "partition-id"})
    kept, reasons = check_agreement([full, short, full])
    assert kept == full and reasons[0] is None and reasons[2] is None and "train-loss" in reasons[1]
    # two replies that differ: neither can be told the honest one; aggregate what both carry
    assert check_agreement([full, short]) == (short, [None, None])
    # a deployed node's data fingerprint is sent by some nodes only: not compared, not aggregated
    assert check_agreement([full | {"data-sha256"}, full]) == (full, [None, None])


@pytest.mark.parametrize("rejecting", [True, False])
def test_a_run_in_which_no_update_counted_exits_non_zero_with_why(tmp_path, capsys, monkeypatch, rejecting):
    """`fedcl simulate` through the real apps (in-process instead of Ray): every update over
    strategy.max_update_norm is rejected, so nothing was learned and the command says so."""
    from fedcl.ops import run
    from fedcl.ops.cli import main

    monkeypatch.setattr(run, "simulate", run.run_inprocess)  # the same apps, without Ray's start
    sets = [item for key in TINY for item in ("--set", key)]
    if rejecting:
        sets += ["--set", "strategy.max_update_norm=1e-12"]
    code = main(["simulate", *sets, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    if rejecting:
        assert code == 1
        assert "no client update counted in 2 round(s): 6 rejected" in err
        assert "exceeds strategy.max_update_norm" in err
    else:
        assert code == 0 and "no client update counted" not in err
