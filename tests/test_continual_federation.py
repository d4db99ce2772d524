"""Continual learning through the real ServerApp and ClientApp, in-process (no Ray)."""

from __future__ import annotations

import json

import pytest
import torch

from fedcl.continual import metrics as clm
from fedcl.continual.ewc import OnlineEWC
from fedcl.config import ConfigError, load_config
from fedcl.continual.schedule import build_stream, ends_task, task_of_round
from tests.test_apps import run_server

pytestmark = pytest.mark.continual

SMALL = ["model.name=tiny-llama", "data.max_records=36", "data.max_test_records=18",
         "train.local_steps=1", "train.batch_size=4", "federation.clients=2",
         "data.task_column=date", "data.task_period=year", "continual.rounds_per_task=1"]


@pytest.fixture(scope="module")
def three_years(tmp_path_factory):
    """drugreview-condition's reviews of 2015-2017 as a user's file: a stream of three yearly tasks."""
    from fedcl.config import DataConfig
    from fedcl.data import load_dataset

    dataset = load_dataset(DataConfig(), 0)
    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for r in dataset.train + dataset.test:
            if r["meta"]["date"][-4:] in ("2015", "2016", "2017"):
                out.write(json.dumps({"text": r["text"], "label": r["label"], "date": r["meta"]["date"]}) + "\n")
    return path


@pytest.fixture
def small(tmp_path, three_years):
    def build(*extra):
        return load_config(None, SMALL + [f"data.path={three_years}", "data.dataset=",
                                          f"run.out_dir={tmp_path / 'run'}",
                                          f"run.state_dir={tmp_path / 'state'}", *extra])
    return build


@pytest.mark.parametrize("rounds_per_task, expected", [(1, [0, 1, 2]), (2, [0, 0, 1, 1, 2, 2])])
def test_round_to_task_is_a_pure_function(rounds_per_task, expected):
    rounds = range(1, len(expected) + 1)
    assert [task_of_round(r, rounds_per_task) for r in rounds] == expected
    assert [r for r in rounds if ends_task(r, rounds_per_task)] == list(range(rounds_per_task, len(expected) + 1,
                                                                              rounds_per_task))


def test_unknown_strategies_are_refused():
    with pytest.raises(ConfigError, match="Avalanche strategies are avalanche:LwF"):
        load_config(None, ["continual.strategy=avalanche:Nope"])
    with pytest.raises(ConfigError, match="continual.strategy: got 'lwf'"):
        load_config(None, ["continual.strategy=lwf"])
    with pytest.raises(ConfigError, match="data.task_period"):
        load_config(None, ["data.task_period=week"])


def check_section(metrics, config):
    section = metrics["continual"]
    names = [t.name for t in build_stream(config.data, config.train.seed)]
    T = len(names)
    R, b = section["accuracy_matrix"], section["zero_shot"]
    assert section["tasks"] == names and len(R) == T and all(len(row) == T for row in R)
    assert len(b) == T and all(0.0 <= a <= 1.0 for row in R + [b] for a in row)
    assert section["average_accuracy"] == pytest.approx(clm.average_accuracy(R))
    assert section["bwt"] == pytest.approx(clm.backward_transfer(R))
    assert section["forgetting"] == pytest.approx(clm.forgetting(R))
    assert section["fwt"] == pytest.approx(clm.forward_transfer(R, b))
    assert [r["task"] for r in metrics["rounds"]] == [task_of_round(r["round"], 1) for r in metrics["rounds"]]
    assert len(metrics["rounds"]) == T * config.continual.rounds_per_task
    # every reply counted: tasks differ in size, which must not look like a client inflating its count
    assert [r["rejected"] for r in metrics["rounds"]] == [0] * len(metrics["rounds"])
    return section


@pytest.mark.parametrize("strategy", ["naive", "replay", "ewc", "replay+ewc"])
def test_each_strategy_writes_the_accuracy_matrix(tmp_path, small, strategy):
    config = small(f"continual.strategy={strategy}")
    _, metrics = run_server(config)
    check_section(metrics, config)
    states = sorted(p.name for p in (tmp_path / "state" / "client-0").iterdir())
    assert "continual.json" in states
    assert ("replay.json" in states) == ("replay" in strategy)
    assert ("ewc.safetensors" in states) == ("ewc" in strategy)


def test_an_avalanche_plugin_runs_in_the_federation(tmp_path, small):
    pytest.importorskip("avalanche", reason="avalanche-lib is installed by `make install`")
    config = small("continual.strategy=avalanche:LwF", "train.local_steps=2")
    grid, metrics = run_server(config)
    assert not [r for r in grid.replies if r.has_error()]
    section = check_section(metrics, config)
    R = section["accuracy_matrix"]
    assert section["avalanche_metrics"]["forgetting"] == pytest.approx(clm.avalanche_forgetting(R))
    assert section["avalanche_metrics"]["bwt"] == pytest.approx(clm.backward_transfer(R))
    # each node kept its plugin (with LwF's teacher) in its own state folder
    assert (tmp_path / "state" / "client-0" / "avalanche-lwf.pt").exists()
    assert json.loads((tmp_path / "state" / "client-0" / "continual.json").read_text())["closed"] == 2


@pytest.mark.privacy
def test_avalanche_lwf_runs_under_dp_sgd_with_its_teacher(tmp_path, small, monkeypatch):
    pytest.importorskip("avalanche", reason="avalanche-lib is installed by `make install`")
    from fedcl.continual.avalanche_bridge import AvalancheMethod, VerbalizerClassifier, pack

    distilled = []  # LwF's term in DP-SGD's loss, once a task is closed
    original = AvalancheMethod.dp_batch_loss

    def spy(self, model, task, batch):
        loss = original(self, model, task, batch)
        if self.plugin.lwf.prev_model is not None:
            with torch.no_grad():  # a forward outside the graph: Opacus's hooks record nothing
                distilled.append(float(self.plugin.lwf(pack(batch), task.logits(model, batch),
                                                       VerbalizerClassifier(model, task.label_token_ids))))
        return loss

    monkeypatch.setattr(AvalancheMethod, "dp_batch_loss", spy)
    config = small("continual.strategy=avalanche:LwF", "privacy.target_epsilon=8", "privacy.delta=1e-3",
                   "train.local_steps=2")
    grid, metrics = run_server(config)
    assert not [r for r in grid.replies if r.has_error()]
    check_section(metrics, config)
    eps = [c["epsilon"] for r in metrics["rounds"] for c in r["clients"] if "epsilon" in c]
    assert eps and all(0 < e <= 8.0 + 1e-6 for e in eps)
    assert distilled and max(distilled) > 0
    assert json.loads((tmp_path / "state" / "client-0" / "continual.json").read_text())["closed"] == 2


@pytest.mark.privacy
def test_any_avalanche_plugin_runs_under_client_level_dp(tmp_path, small):
    # The server clips and noises each whole update, so local training may be anything.
    pytest.importorskip("avalanche", reason="avalanche-lib is installed by `make install`")
    config = small("continual.strategy=avalanche:EWC", "privacy.mode=client", "privacy.target_epsilon=8",
                   "privacy.delta=1e-3", "train.local_steps=1")
    grid, metrics = run_server(config)
    assert not [r for r in grid.replies if r.has_error()]
    check_section(metrics, config)
    assert metrics["privacy"]["mode"] == "client"
    assert (tmp_path / "state" / "client-0" / "avalanche-ewc.pt").exists()


def test_dp_replay_ewc_completes_and_reports_epsilon(tmp_path, small, monkeypatch):
    # The EWC gradient added after the DP noise must be non-zero once a task is closed:
    # that is what changes the DP update (continual/test_continual pins its exact effect).
    added = []
    original = OnlineEWC.add_penalty_gradient

    def spy(self, model):
        if self.fisher:
            added.append(max(float(g.abs().max()) for g in self.penalty_gradient(model).values()))
        return original(self, model)

    monkeypatch.setattr(OnlineEWC, "add_penalty_gradient", spy)
    config = small("continual.strategy=replay+ewc", "privacy.target_epsilon=8",
                   "privacy.delta=1e-3", "continual.ewc_strength=1000", "train.local_steps=2")
    _, metrics = run_server(config)
    check_section(metrics, config)
    eps = [c["epsilon"] for r in metrics["rounds"] for c in r["clients"] if "epsilon" in c]
    assert eps and all(0 < e <= 8.0 + 1e-6 for e in eps)
    assert added and max(added) > 0
    # replayed records joined the DP pool after the first task
    pools = [c["train_pool"] for r in metrics["rounds"][1:] for c in r["clients"] if "train_pool" in c]
    exact = [c["num_examples"] for r in metrics["rounds"][1:] for c in r["clients"] if "train_pool" in c]
    assert any(p > n for p, n in zip(pools, exact))


def test_resume_mid_stream_keeps_the_matrix(tmp_path, small):
    config = small("continual.strategy=replay")
    T = len(build_stream(config.data, config.train.seed))
    # A first run killed right after round 2's commit (of 3), then resumed.
    from fedcl.rundir import RunDir

    original = RunDir.commit_round

    def stop_after_two(self, metrics, server_round, strategy_state):
        original(self, metrics, server_round, strategy_state)
        if server_round == 2:
            raise KeyboardInterrupt

    RunDir.commit_round = stop_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            run_server(config)
    finally:
        RunDir.commit_round = original
    first = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(first["continual"]["accuracy_matrix"]) == 2
    _, metrics = run_server(config)
    section = check_section(metrics, config)
    assert section["accuracy_matrix"][:2] == first["continual"]["accuracy_matrix"]
    assert section["zero_shot"] == first["continual"]["zero_shot"]
    assert len(section["accuracy_matrix"]) == T


def test_report_draws_the_continual_figures(tmp_path):
    from fedcl.ops.report import continual_figures, write_report

    run = tmp_path / "run"
    run.mkdir()
    R = [[0.6, 0.3, 0.2], [0.5, 0.7, 0.3], [0.4, 0.6, 0.8]]
    metrics = {"model": {}, "rounds": [{"round": 1, "eval": {"accuracy": 0.5, "loss": 1.0}, "clients": []}],
               "continual": {"tasks": ["2015", "2016", "2017"], "accuracy_matrix": R,
                             "zero_shot": [0.3, 0.3, 0.3], "strategy": "naive"}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    written = {p.name for p in write_report(run)}
    assert {"accuracy_matrix.png", "task_accuracy.png"} <= written
    assert continual_figures({"rounds": []}) == {}


def test_federated_importance_is_averaged_and_anchors_every_client(tmp_path, small):
    from fedcl.continual.methods import EWC
    from fedcl.federation.messages import arrays_to_state

    config = small("continual.strategy=ewc", "continual.federated_importance=true", "train.local_steps=2")
    sent_up = []  # (round, examples, importance) as each client sent it

    def capture(partition_id, reply):
        if "importance" in reply.content.array_records:
            metrics = reply.content.metric_records["metrics"]
            sent_up.append((len(sent_up) // 2 + 1, float(metrics["num-examples"]),
                            arrays_to_state(reply.content.array_records["importance"])))
        return reply

    grid, metrics = run_server(config, intercept=capture)
    assert not [r for r in grid.replies if r.has_error()]
    check_section(metrics, config)
    # every round ends a task here: both clients sent an importance each round, and the
    # server took it off the reply before Flower's aggregation (one ArrayRecord per reply)
    assert [r for r, _, _ in sent_up] == [1, 1, 2, 2, 3, 3]
    assert not any("importance" in r.content.array_records for r in grid.replies)
    assert [r["importance_clients"] for r in metrics["rounds"]] == [2, 2, 2]
    # from round 2 on, the train messages carry the example-weighted mean of the last task's
    expected = {}
    for task in (0, 1):
        parts = [(w, imp) for r, w, imp in sent_up if r == task + 1]
        total = sum(w for w, _ in parts)
        expected[task] = {n: sum(w * imp[n] for w, imp in parts) / total for n in parts[0][1]}
    train = [m for m in grid.sent if m.metadata.message_type == "train"]  # 2 per round, in order
    assert not any("importance" in m.content.array_records for m in train[:2])
    for task, messages in ((0, train[2:4]), (1, train[4:6])):
        for m in messages:
            got = arrays_to_state(m.content.array_records["importance"])
            for name, value in got.items():
                assert torch.allclose(value, expected[task][name], rtol=1e-5, atol=1e-12), name
    downs = expected
    # both clients closed tasks 0 and 1 with the shared importances, not their own
    for client in ("client-0", "client-1"):
        ewc = EWC(strength=config.continual.ewc_strength)
        ewc.load(tmp_path / "state" / client)
        assert ewc.ewc.tasks_seen == 2
        for name, fisher in ewc.ewc.fisher.items():
            assert torch.allclose(fisher, downs[0][name] + downs[1][name], rtol=1e-5, atol=1e-12), name


def test_federated_importance_needs_ewc():
    with pytest.raises(ConfigError, match="continual.federated_importance"):
        load_config(None, ["continual.strategy=replay", "continual.federated_importance=true"])


def test_label_groups_make_a_class_incremental_stream_some_clients_lack(tmp_path):
    config = load_config(None, ["model.name=tiny-llama", "data.max_records=36", "data.max_test_records=18",
                                "train.local_steps=1", "train.batch_size=4", "federation.clients=3",
                                "data.task_groups=Birth Control; Pain,Acne; Depression",
                                "continual.rounds_per_task=1", "continual.task_presence=0.5",
                                "continual.strategy=replay", f"run.out_dir={tmp_path / 'run'}",
                                f"run.state_dir={tmp_path / 'state'}"])
    stream = build_stream(config.data, config.train.seed)
    assert [t.name for t in stream] == ["Birth Control", "Pain+Acne", "Depression"]
    assert all({r["label"] for r in t.train_records} <= set(t.name.split("+")) for t in stream)
    _, metrics = run_server(config)
    section = check_section(metrics, config)
    assert section["task_groups"] == config.data.task_groups
    # with presence 0.5 some client lacks some task: it replied idle, and no round failed
    assert sum(r["idle"] for r in metrics["rounds"]) > 0
    assert all(r["failures"] == 0 for r in metrics["rounds"])


def test_bad_label_groups_are_refused_with_the_key():
    with pytest.raises(ConfigError, match="data.task_groups"):
        load_config(None, ["data.task_groups=Acne"])  # one group is no stream
    with pytest.raises(ConfigError, match="each label in one group only"):
        load_config(None, ["data.task_groups=Acne,Pain; Pain"])
    with pytest.raises(ConfigError, match="data.task_groups"):
        load_config(None, ["data.task_groups=Acne; Pain", "data.task_column=date"])
    with pytest.raises(ConfigError, match="continual.task_presence"):
        load_config(None, ["continual.task_presence=0"])
    from fedcl.continual.streams import StreamError

    config = load_config(None, ["data.max_records=36", "data.task_groups=Acne; Pain; Depression; Nope"])
    with pytest.raises(StreamError, match="'Nope'"):
        build_stream(config.data, config.train.seed)


@pytest.fixture(scope="module")
def year_files(tmp_path_factory, three_years):
    """The same reviews as one file per year (each file named by its year)."""
    folder = tmp_path_factory.mktemp("years")
    rows = [json.loads(line) for line in three_years.read_text(encoding="utf-8").splitlines()]
    paths = []
    for year in ("2015", "2016", "2017"):
        path = folder / f"reviews-{year}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["date"].endswith(year)), encoding="utf-8")
        paths.append(path)
    return paths


def test_task_files_make_the_stream_in_the_order_given(tmp_path, year_files):
    base = [o for o in SMALL if not o.startswith(("data.task_column", "data.task_period"))] + [
        f"run.out_dir={tmp_path / 'run'}", f"run.state_dir={tmp_path / 'state'}", "train.local_steps=1"]
    order = [year_files[2], year_files[0], year_files[1]]
    config = load_config(None, base + ["data.task_files=" + ",".join(map(str, order))])
    assert config.continual_on
    stream = build_stream(config.data, config.train.seed)
    assert [t.name for t in stream] == ["reviews-2017", "reviews-2015", "reviews-2016"]
    for task, path in zip(stream, order):  # each task holds its own file's records only
        year = path.stem[-4:]
        assert task.train_records and task.test_records
        assert all(r["meta"]["date"].endswith(year) for r in task.train_records + task.test_records)
    _, metrics = run_server(config)
    section = check_section(metrics, config)
    assert section["task_files"] == [str(p) for p in order]
    # one test file per task: those records are the task's test split, none held out of training
    tests = ",".join(map(str, order))
    paired = load_config(None, base + ["data.task_files=" + ",".join(map(str, order)), f"data.task_test_files={tests}",
                                       "data.max_records=0", "data.max_test_records=0"])
    stream = build_stream(paired.data, paired.train.seed)
    for task, path in zip(stream, order):
        n = len(path.read_text(encoding="utf-8").splitlines())
        assert len(task.train_records) == len(task.test_records) == n


def test_bad_task_files_are_refused_by_name(tmp_path, year_files):
    files = ",".join(map(str, year_files))
    with pytest.raises(ConfigError, match="data.task_files.*at least two"):
        load_config(None, [f"data.task_files={year_files[0]}"])
    with pytest.raises(ConfigError, match="data.task_test_files.*one test file per task"):
        load_config(None, [f"data.task_files={files}", f"data.task_test_files={year_files[0]}"])
    with pytest.raises(ConfigError, match="data.task_column.*empty when data.task_files"):
        load_config(None, [f"data.task_files={files}", "data.task_column=date"])
    missing = load_config(None, [f"data.task_files={year_files[0]},{tmp_path / 'nope.jsonl'}"])
    with pytest.raises(Exception, match="nope.jsonl"):
        build_stream(missing.data, 0)
