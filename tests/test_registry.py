"""The adapter registry (atomic, never-overwriting commits) and the `fedcl update` job."""

from __future__ import annotations

import json
import random

import pytest

from fedcl.continual import registry as registry_module
from fedcl.continual.registry import Registry, RegistryError
from fedcl.ops.update import UpdateError, format_versions, run_update

pytestmark = pytest.mark.continual


def stage_version(job, payload: str = "weights") -> None:
    (job.stage / "adapter").mkdir(parents=True)
    (job.stage / "adapter" / "adapter_model.safetensors").write_text(payload)


def commit_one(reg: Registry, payload: str = "weights", **record) -> str:
    with reg.job() as job:
        stage_version(job, payload)
        return reg.commit(job, {"created": "2025-01-01T00:00:00", **record}, parent=reg.latest_name())


def snapshot(root) -> dict:
    """Every file under the registry except job scratch folders and the lock."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".jobs" not in p.parts and p.name != ".lock"}


def test_commits_number_versions_and_record_lineage(tmp_path):
    reg = Registry(tmp_path / "reg")
    assert reg.names() == [] and reg.latest_name() is None
    assert commit_one(reg, "a", epsilon={"max": 1.5}) == "v0001"
    assert commit_one(reg, "b") == "v0002"
    assert [(r["version"], r["parent"]) for r in reg.records()] == [("v0001", None), ("v0002", "v0001")]
    assert reg.record("v0001")["epsilon"] == {"max": 1.5}
    assert (reg.adapter_dir("v0002") / "adapter_model.safetensors").read_text() == "b"
    assert not any((tmp_path / "reg" / ".jobs").iterdir())  # job folders are removed


def test_crash_during_job_leaves_registry_unchanged(tmp_path):
    reg = Registry(tmp_path / "reg")
    commit_one(reg, "a")
    before = snapshot(reg.root)
    with pytest.raises(KeyboardInterrupt):
        with reg.job() as job:
            stage_version(job, "half")
            raise KeyboardInterrupt
    assert snapshot(reg.root) == before and reg.names() == ["v0001"]


def test_crash_between_move_and_index_is_rolled_back(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "reg")
    commit_one(reg, "a")
    before = snapshot(reg.root)
    real = registry_module.write_json

    def die_on_index(path, obj):
        if path.name == "registry.json":
            raise OSError("killed before the index was written")
        real(path, obj)

    monkeypatch.setattr(registry_module, "write_json", die_on_index)
    with pytest.raises(OSError, match="killed"):
        commit_one(reg, "orphan")
    monkeypatch.setattr(registry_module, "write_json", real)
    # The moved folder is not a version: the index (the commit point) does not name it.
    assert reg.names() == ["v0001"] and (reg.versions_dir / "v0002").exists()
    assert [r["version"] for r in reg.records()] == ["v0001"]
    # The next job removes it and commits cleanly in its place.
    assert commit_one(reg, "b") == "v0002"
    assert (reg.adapter_dir("v0002") / "adapter_model.safetensors").read_text() == "b"
    assert snapshot(reg.root).keys() >= before.keys()


def test_killed_job_folder_is_cleaned_by_the_next_job(tmp_path):
    reg = Registry(tmp_path / "reg")
    stale = reg.jobs_dir / "killed-job" / "version" / "adapter"
    stale.mkdir(parents=True)  # as a SIGKILLed job would leave it: no cleanup ran
    assert str(reg.jobs_dir / "killed-job") in reg.recover()
    assert commit_one(reg) == "v0001" and not (reg.jobs_dir / "killed-job").exists()


def test_running_job_folder_is_not_cleaned(tmp_path):
    reg = Registry(tmp_path / "reg")
    with reg.job() as job:
        assert reg.recover() == []  # the job's lock protects it
        assert job.path.exists()


def test_versions_are_never_overwritten(tmp_path):
    reg = Registry(tmp_path / "reg")
    commit_one(reg, "a")
    with reg.job() as job:
        stage_version(job)
        with pytest.raises(RegistryError, match="latest version is now 'v0001'"):
            reg.commit(job, {}, parent=None)  # a job that started before v0001 was committed
    # A folder squatting the next name is refused, not replaced.
    with reg.job() as job:
        stage_version(job)
        (reg.versions_dir / "v0002").mkdir()
        (reg.versions_dir / "v0002" / "keep").write_text("x")
        with pytest.raises(RegistryError, match="never overwritten"):
            reg.commit(job, {}, parent="v0001")
    assert (reg.versions_dir / "v0002" / "keep").read_text() == "x" and reg.names() == ["v0001"]


def test_index_of_another_kind_is_refused(tmp_path):
    (tmp_path / "registry.json").write_text(json.dumps({"kind": "something-else", "format": 1}))
    with pytest.raises(RegistryError, match="kind is 'something-else'"):
        Registry(tmp_path).names()
    with pytest.raises(RegistryError):
        with Registry(tmp_path).job():
            pass
    assert not (tmp_path / ".jobs").exists()


def test_versions_table_lists_parent_score_and_epsilon(tmp_path):
    reg = Registry(tmp_path / "reg")
    commit_one(reg, metrics={"old": {"accuracy": 0.25}, "new": {"accuracy": 0.5}},
               epsilon={"clients": {"0": 1.0}, "max": 1.0}, data_fingerprints={"0:a.jsonl": "ab" * 32})
    commit_one(reg, metrics={"old": {}, "new": {"accuracy": 0.75}}, epsilon={"clients": {}, "max": None})
    lines = format_versions(reg.records()).splitlines()
    assert lines[0].split()[:2] == ["version", "parent"]
    assert "v0001" in lines[1] and "accuracy 0.250 -> 0.500" in lines[1] and "1.00" in lines[1]
    assert "a.jsonl=abababab" in lines[1]
    assert lines[2].split()[:2] == ["v0002", "v0001"] and "? -> 0.750" in lines[2]


# -- the update job, through the real ServerApp and ClientApp in-process ------------

SMALL = ["model.name=tiny-llama", "data.max_records=40", "data.max_test_records=12",
         "train.local_steps=1", "train.batch_size=4", "federation.rounds=1"]


def write_drop(path, seed: int, n: int = 24) -> str:
    rng = random.Random(seed)
    words = {"pos": ["good", "great", "fine"], "neg": ["bad", "awful", "poor"]}
    with open(path, "w") as f:
        for i in range(n):
            label = "pos" if i % 2 else "neg"
            f.write(json.dumps({"text": " ".join(rng.choice(words[label]) for _ in range(4)),
                                "label": label, "site": f"s{seed}"}) + "\n")
    return str(path)


def inprocess_runner(config):
    from fedcl.client.app import app as client_app
    from fedcl.server.app import main as server_main
    from fedcl.federation.grid import InProcessGrid, server_context

    flat = config.to_flat()
    server_main(InProcessGrid(client_app, config.federation.clients, flat), server_context(flat))


def test_update_commits_versions_from_the_parent_adapter(tmp_path):
    from fedcl.config import load_config
    from fedcl.session import GlobalEvaluator

    base = load_config(None, SMALL)
    files = [write_drop(tmp_path / "a.jsonl", 1), write_drop(tmp_path / "b.jsonl", 2)]
    reg = tmp_path / "reg"
    first = run_update(base, reg, files, runner=inprocess_runner, log=lambda _: None)
    assert (first["version"], first["parent"], first["rounds"]) == ("v0001", None, 1)
    assert set(first["data_fingerprints"]) == {"0:a.jsonl", "1:b.jsonl", "test"}
    assert sorted(first["clients"].values()) == ["a.jsonl", "b.jsonl"]
    assert first["config"]["federation"]["clients"] == 2 and "accuracy" in first["metrics"]["new"]
    assert first["epsilon"] == {"clients": {}, "max": None}  # DP off

    second = run_update(base, reg, [write_drop(tmp_path / "c.jsonl", 3)], runner=inprocess_runner,
                        log=lambda _: None)
    assert (second["version"], second["parent"]) == ("v0002", "v0001")
    assert second["config"]["run"]["init_adapter"] == "versions/v0001/adapter"
    # "old" is the parent adapter on the new test split: v0001's weights, not a fresh adapter.
    assert "accuracy" in second["metrics"]["old"]
    evaluator = GlobalEvaluator(base)
    parent_state = evaluator.load_saved(Registry(reg).adapter_dir("v0001"))
    assert any((parent_state[k] != evaluator.initial_state[k]).any() for k in parent_state)

    # A run that stops early commits nothing and leaves the registry as it was.
    before = snapshot(reg)
    with pytest.raises(UpdateError, match="unchanged"):
        run_update(base, reg, files, runner=lambda config: None, log=lambda _: None)
    assert snapshot(reg) == before and Registry(reg).names() == ["v0001", "v0002"]


def test_cli_versions_lists_lineage(tmp_path, capsys):
    from fedcl.ops.cli import main

    reg = Registry(tmp_path / "reg")
    commit_one(reg, metrics={"old": {"accuracy": 0.5}, "new": {"accuracy": 0.6}},
               epsilon={"clients": {"0": 2.0}, "max": 2.0})
    assert main(["versions", str(reg.root)]) == 0
    out = capsys.readouterr().out
    assert "v0001" in out and "0.500 -> 0.600" in out and "2.00" in out
    assert main(["versions", str(tmp_path / "missing")]) == 2


def deployed_runner(files, state_root):
    """The real apps in-process, each node configured as a SuperNode is: its own data-file and state-dir."""
    def run(config):
        from fedcl.client.app import app as client_app
        from fedcl.server.app import main as server_main
        from fedcl.federation.grid import InProcessGrid, server_context

        flat = config.to_flat()
        grid = InProcessGrid(client_app, len(files), flat)
        for i, node in enumerate(grid.node_ids):
            grid.contexts[node].node_config = {"data-file": str(files[i]), "partition-id": i,
                                               "state-dir": str(state_root / f"node-{i}")}
        server_main(grid, server_context(flat))
    return run


def test_deployed_update_records_each_nodes_fingerprint_and_chains_versions(tmp_path):
    from fedcl import data
    from fedcl.config import load_config
    from fedcl.ops.update import run_deployed_update

    server_file = write_drop(tmp_path / "server.jsonl", 9)
    base = load_config(None, SMALL + ["federation.clients=2", "data.dataset=", f"data.path={server_file}"])
    files = [write_drop(tmp_path / "a.jsonl", 1), write_drop(tmp_path / "b.jsonl", 2)]
    reg = tmp_path / "reg"
    first = run_deployed_update(base, reg, submit=deployed_runner(files, tmp_path / "state"), log=lambda _: None)
    # each node reported the hash of its own file, as the simulation's update computes it
    expected = {f"node {i}": data.fingerprint(data.load_records(f, base.data)) for i, f in enumerate(files)}
    assert {k: v for k, v in first["data_fingerprints"].items() if k != "test"} == expected
    assert first["parent"] is None and first["config"]["data"]["path"].startswith("(each node's own")
    second = run_deployed_update(base, reg, submit=deployed_runner(files, tmp_path / "state"), log=lambda _: None)
    assert (second["version"], second["parent"]) == ("v0002", "v0001")
    assert second["config"]["run"]["init_adapter"] == "versions/v0001/adapter"
    before = snapshot(reg)
    with pytest.raises(UpdateError, match="unchanged"):
        run_deployed_update(base, reg, submit=lambda config: None, log=lambda _: None)
    assert snapshot(reg) == before


def test_fingerprint_words_round_trip_and_bad_words_are_refused():
    from fedcl.data import fingerprint_words
    from fedcl.ops.update import words_fingerprint

    digest = "0123456789abcdef" * 4
    assert words_fingerprint(fingerprint_words(digest)) == digest
    assert words_fingerprint([float(w) for w in fingerprint_words(digest)]) == digest  # as JSON may give
    with pytest.raises(ValueError, match="8 whole 32-bit words"):
        words_fingerprint([1, 2, 3])
    with pytest.raises(ValueError, match="8 whole 32-bit words"):
        words_fingerprint([2 ** 32] * 8)
