"""Careless hands and broken files: fedcl deletes nothing it did not create, and trusts no state file.

Every case uses real files on disk, the real registry and ledger, and the
real CLI in-process (`fedcl.ops.cli.main`). One tiny finished run (tiny-llama,
one round, no Ray) is built once for the module and copied where a case
needs a run folder. Where a case must not reach the federation, the engine is
replaced by a function that fails the test if it is called.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import signal
from pathlib import Path

import pytest

from fedcl.continual.registry import STAGED_MARK, Registry
from fedcl.ops.cli import main
from fedcl.privacy import LEDGER_FILE, ClientPrivacy, DPPlan, LedgerError, PrivacyLedger

pytestmark = pytest.mark.robustness

REPO = Path(__file__).resolve().parent.parent
SMALL = ["model.name=tiny-llama", "data.max_records=40", "data.max_test_records=12",
         "train.local_steps=1", "train.batch_size=4", "federation.clients=2", "federation.rounds=1"]


# -- helpers ---------------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *parts: str, exit_code: int = 2) -> None:
    assert code == exit_code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedcl: error: "), err
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging (NaN noise once made Opacus' accountant search for many minutes)."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def no_engine(monkeypatch):
    """The federation must not start: a case that reaches it fails."""
    def refuse(config):
        raise AssertionError(f"the federation was started for {config.run.out_dir}")

    monkeypatch.setattr("fedcl.ops.run.simulate", refuse)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny run folder after its one round: config, metrics, checkpoint, strategy state, adapter."""
    from fedcl.config import load_config
    from fedcl.ops.run import run_inprocess

    run = tmp_path_factory.mktemp("finished") / "run"
    run_inprocess(load_config(None, SMALL + [f"run.out_dir={run}"]))
    assert json.loads((run / "checkpoint.json").read_text())["round"] == 1
    assert (run / "strategy_state.json").is_file() and (run / "adapters" / "round-1").is_dir()
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    return copy


# -- nothing the user did not create is deleted ------------------------------------------------

def write_drop(path: Path, n: int = 24) -> Path:
    words = {"pos": "good great fine nice", "neg": "bad awful poor sad"}
    with open(path, "w") as f:
        for i in range(n):
            label = "pos" if i % 2 else "neg"
            f.write(json.dumps({"text": words[label], "label": label}) + "\n")
    return path


def test_failed_update_keeps_a_users_folder_under_versions(tmp_path, capsys, caplog, monkeypatch):
    reg = tmp_path / "reg"
    backup = reg / "versions" / "my-backup"
    backup.mkdir(parents=True)
    (backup / "notes.txt").write_text("keep me")
    monkeypatch.setattr("fedcl.ops.run.simulate", lambda config: None)  # a run that stops early
    code, err = run_cli(capsys, "update", "--registry", reg, "--data", write_drop(tmp_path / "a.jsonl"),
                        "--set", "model.name=tiny-llama", "--set", "data.max_records=24",
                        "--set", "federation.clients=1", "--rounds", "1")
    assert code == 1 and "registry" in err and "unchanged" in err
    moved = list((reg / "versions").glob(".unlisted-*/my-backup/notes.txt"))
    assert [p.read_text() for p in moved] == ["keep me"]
    warning = [r.getMessage() for r in caplog.records if r.name == "fedcl.registry"]
    assert len(warning) == 1 and "my-backup" in warning[0] and "nothing was deleted" in warning[0]
    assert str(moved[0].parent) in warning[0]  # it says where it went


def test_a_committed_version_missing_from_a_stale_index_is_kept(tmp_path):
    reg = Registry(tmp_path / "reg")

    def commit(payload: str) -> str:
        with reg.job() as job:
            (job.stage / "adapter").mkdir(parents=True)
            (job.stage / "adapter" / "adapter_model.safetensors").write_text(payload)
            return reg.commit(job, {"created": "2025-01-01T00:00:00"}, parent=reg.latest_name())

    commit("first")
    stale = reg.index_file.read_text()  # a backup of the index, taken now
    commit("second")
    assert not (reg.version_dir("v0002") / STAGED_MARK).exists()  # committed: no longer marked
    reg.index_file.write_text(stale)  # ... restored later: v0002 is committed but unlisted
    assert commit("third") == "v0002"
    assert (reg.adapter_dir("v0002") / "adapter_model.safetensors").read_text() == "third"
    kept = list(reg.versions_dir.glob(".unlisted-*/v0002/adapter/adapter_model.safetensors"))
    assert [p.read_text() for p in kept] == ["second"]
    assert json.loads(kept[0].parent.parent.joinpath("version.json").read_text())["version"] == "v0002"


def test_recover_removes_only_the_folder_its_own_commit_marked(tmp_path):
    reg = Registry(tmp_path / "reg")
    orphan = reg.versions_dir / "v0001"  # what a commit killed before the index leaves
    (orphan / "adapter").mkdir(parents=True)
    (orphan / STAGED_MARK).write_text("{}")
    assert reg.recover() == [str(orphan)]
    assert not reg.versions_dir.exists() or not any(reg.versions_dir.iterdir())


def test_stage_app_refuses_a_folder_fedcl_did_not_stage(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, err = run_cli(capsys, "deploy", "stage-app", "--out", out, "--source", REPO)
    assert_one_line_error(code, err, str(out), "--overwrite")
    assert snapshot(out) == {"thesis.tex": b"years of work"}

    fresh = tmp_path / "app"
    assert main(["deploy", "stage-app", "--out", str(fresh), "--source", str(REPO)]) == 0
    (fresh / "stale.py").write_text("# left from an older staging")
    assert main(["deploy", "stage-app", "--out", str(fresh), "--source", str(REPO)]) == 0  # its own
    assert not (fresh / "stale.py").exists() and (fresh / "server" / "app.py").is_file()

    assert main(["deploy", "stage-app", "--out", str(out), "--source", str(REPO), "--overwrite"]) == 0
    assert not (out / "thesis.tex").exists() and (out / "pyproject.toml").is_file()


def test_resume_of_a_copied_run_writes_the_copy(finished_run, run_copy, capsys, monkeypatch):
    from fedcl.ops.run import run_inprocess

    original = snapshot(finished_run)
    monkeypatch.setattr("fedcl.ops.run.simulate", run_inprocess)
    assert main(["simulate", "--resume", str(run_copy), "--rounds", "2"]) == 0, capsys.readouterr().err
    assert json.loads((run_copy / "checkpoint.json").read_text())["round"] == 2
    assert (run_copy / "adapters" / "round-2").is_dir()
    assert [r["round"] for r in json.loads((run_copy / "metrics.json").read_text())["rounds"]] == [1, 2]
    assert snapshot(finished_run) == original  # the folder copied from is untouched


# -- the privacy ledger is checked, not trusted ------------------------------------------------

def write_ledger(folder: Path, change) -> Path:
    """A real two-round ledger, saved, then edited by `change(state)` as a careless hand would."""
    ledger = PrivacyLedger()
    for r in (1, 2):
        ledger.record(run="runs/a", server_round=r, steps=5, noise_multiplier=1.1, sample_rate=0.05,
                      delta=1e-5, accountant="rdp")
    ledger.save(folder / LEDGER_FILE)
    state = json.loads((folder / LEDGER_FILE).read_text())
    change(state)
    (folder / LEDGER_FILE).write_text(json.dumps(state))  # json writes NaN and Infinity as such
    return folder / LEDGER_FILE


def _set(*path_and_value):
    *path, value = path_and_value

    def change(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def _emptied(state):
    state["history"] = []


def _both_emptied(state):
    state["history"], state["entries"] = [], []


LEDGER_CASES = [
    # (edit, what the message must name)
    (_emptied, "differs from the 2 entries"),
    (_set("history", 0, 2, -500), "history[0]: steps: got -500"),
    (_set("entries", 1, "steps", -5), "entries[1].steps: got -5"),
    (_set("entries", 0, "steps", 2.5), "entries[0].steps: got 2.5"),
    (_set("history", 0, 0, math.nan), "history[0]: noise_multiplier: got nan"),
    (_set("entries", 1, "noise_multiplier", math.inf), "entries[1].noise_multiplier: got inf"),
    (_set("entries", 0, "noise_multiplier", 0.0), "entries[0].noise_multiplier: got 0.0"),
    (_set("entries", 0, "sample_rate", 1.5), "entries[0].sample_rate: got 1.5"),
    (_set("entries", 1, "delta", 0), "entries[1].delta: got 0"),
    (_set("entries", 1, "accountant", "gdp"), "entries[1].accountant: got 'gdp'"),
    (_set("entries", 1, "epsilon", 0.01), "entries[1].epsilon is 0.01, but the history recomputes"),
    (_set("entries", 0, "epsilon", math.nan), "entries[0].epsilon: got nan"),
    (lambda s: s["entries"][1].pop("steps"), "entries[1] has no steps"),
    (_set("entries", 0, "oops"), "entries[0] is not an object"),
    (_both_emptied, "charged is {'entries': 2, 'steps': 10}, but the entries hold {'entries': 0"),
]


@pytest.mark.parametrize("change, named", LEDGER_CASES, ids=[c[1][:30] for c in LEDGER_CASES])
def test_privacy_command_refuses_a_bad_ledger(tmp_path, capsys, change, named):
    path = write_ledger(tmp_path, change)
    before = path.read_bytes()
    with time_limit(60):
        code, err = run_cli(capsys, "privacy", tmp_path)
    assert_one_line_error(code, err, str(path), named)
    assert path.read_bytes() == before


@pytest.mark.parametrize("text, named", [
    ("", "privacy ledger is empty"),
    ('{"kind": "fedcl.PrivacyLedger", "version": 1, "hist', "privacy ledger is truncated"),
    ("[1, 2]", "privacy ledger is a list, expected an object"),
])
def test_privacy_command_refuses_a_broken_ledger_file(tmp_path, capsys, text, named):
    (tmp_path / LEDGER_FILE).write_text(text)
    code, err = run_cli(capsys, "privacy", tmp_path)
    assert_one_line_error(code, err, str(tmp_path / LEDGER_FILE), named)


def test_an_emptied_history_cannot_buy_more_budget(tmp_path):
    from fedcl.privacy import epsilon

    cap = epsilon([(1.1, 0.05, 10)], delta=1e-5, accountant="rdp") + 1e-6  # two rounds' worth
    plan = DPPlan(noise_multiplier=1.1, sample_rate=0.05, expected_batch_size=4, max_grad_norm=1.0,
                  steps_per_round=5, planned_steps=10, delta=1e-5, accountant="rdp", epsilon_cap=cap)
    guard = ClientPrivacy(plan, tmp_path)
    write_ledger(tmp_path, lambda state: None)
    assert not guard.check().allowed  # the budget is spent
    write_ledger(tmp_path, _emptied)
    with pytest.raises(LedgerError, match="differs from the 2 entries"):
        guard.check()
    with pytest.raises(LedgerError, match="differs from the 2 entries"):
        guard.charge(run="runs/b", server_round=1, steps=5)


def test_a_ledger_refuses_to_record_a_bad_charge():
    ledger = PrivacyLedger()
    with time_limit(60), pytest.raises(LedgerError, match="noise_multiplier: got nan"):
        ledger.record(run="r", server_round=1, steps=5, noise_multiplier=math.nan, sample_rate=0.05,
                      delta=1e-5, accountant="rdp")
    assert ledger.entries == [] and ledger.history == []


def test_a_ledger_without_the_charged_count_still_loads(tmp_path):
    """Ledgers written before `charged` existed are checked on their entries alone."""
    path = write_ledger(tmp_path, lambda state: state.pop("charged"))
    assert len(PrivacyLedger.load(path).entries) == 2


# -- run folder state files ----------------------------------------------------------------------

RUN_CASES = [
    ("checkpoint.json", "", "run checkpoint is empty"),
    ("checkpoint.json", '{"version": 1, "round"', "run checkpoint is truncated"),
    ("checkpoint.json", "[1]", "run checkpoint is a list, expected an object"),
    ("checkpoint.json", '{"version": 1, "adapter": "adapters/round-1"}', "round is missing"),
    ("checkpoint.json", '{"version": 1, "round": "1", "adapter": "adapters/round-1"}',
     "round is a string"),
    ("checkpoint.json", '{"version": 1, "round": 1, "adapter": "adapters/round-9"}',
     "its adapter folder"),
    ("metrics.json", "", "run metrics is empty"),
    ("metrics.json", '{"model": {}, "rounds": [{"round": 1, "eval"', "run metrics is truncated"),
    ("metrics.json", "[]", "run metrics is a list"),
    ("metrics.json", '{"model": {}}', "rounds is missing"),
    ("metrics.json", '{"model": {}, "rounds": [{"eval": {}}]}', "rounds[0].round is missing"),
    ("metrics.json", '{"model": {}, "rounds": []}', "has no record of round 1"),
    ("strategy_state.json", "", "server strategy state is empty"),
    ("strategy_state.json", '{"kind": "fed', "server strategy state is truncated"),
    ("strategy_state.json", '["fedavg"]', "server strategy state is a list"),
    ("strategy_state.json", "{}", "kind is missing"),
]


@pytest.mark.parametrize("name, text, named", RUN_CASES, ids=[f"{c[0]}:{c[2]}" for c in RUN_CASES])
def test_resume_refuses_a_broken_run_file(run_copy, capsys, no_engine, name, text, named):
    (run_copy / name).write_text(text)
    before = snapshot(run_copy)
    code, err = run_cli(capsys, "simulate", "--resume", run_copy, "--rounds", "2")
    assert_one_line_error(code, err, str(run_copy / name), named, "fedcl changed nothing")
    assert snapshot(run_copy) == before


# -- registry state files ----------------------------------------------------------------------------

def good_registry(root: Path) -> Registry:
    reg = Registry(root)
    for payload in ("a", "b"):
        with reg.job() as job:
            (job.stage / "adapter").mkdir(parents=True)
            (job.stage / "adapter" / "adapter_model.safetensors").write_text(payload)
            reg.commit(job, {"created": "2025-01-01T00:00:00"}, parent=reg.latest_name())
    return reg


def _index(change):
    def edit(state):
        change(state)
        return json.dumps(state)
    return edit


REGISTRY_CASES = [
    (lambda s: "", "registry index is empty"),
    (lambda s: json.dumps(s)[:40], "registry index is truncated"),
    (lambda s: json.dumps(s["versions"]), "registry index is a list, expected an object"),
    (_index(lambda s: s.pop("versions")), "versions is missing"),
    (_index(lambda s: s["versions"][1].pop("parent")), "versions[1].parent is missing"),
    (_index(lambda s: s["versions"][0].pop("created")), "versions[0].created is missing"),
    (_index(lambda s: s["versions"][1].update(version=7)), "versions[1].version is an integer"),
    (_index(lambda s: s["versions"].pop(0)), "versions[0] is 'v0002' with parent 'v0001', expected"),
    (_index(lambda s: s.update(versions=["v0001"])), "versions[0] is not an object"),
]


@pytest.mark.parametrize("edit, named", REGISTRY_CASES, ids=[c[1][:30] for c in REGISTRY_CASES])
def test_versions_command_refuses_a_broken_index(tmp_path, capsys, edit, named):
    reg = good_registry(tmp_path / "reg")
    reg.index_file.write_text(edit(json.loads(reg.index_file.read_text())))
    before = snapshot(reg.root)
    code, err = run_cli(capsys, "versions", reg.root)
    assert_one_line_error(code, err, str(reg.index_file), named)
    assert snapshot(reg.root) == before


def test_versions_command_refuses_a_broken_version_record(tmp_path, capsys):
    reg = good_registry(tmp_path / "reg")
    record = reg.version_dir("v0002") / "version.json"
    record.write_text(record.read_text()[:30])
    code, err = run_cli(capsys, "versions", reg.root)
    assert_one_line_error(code, err, str(record), "record of version v0002 is truncated")


def test_update_refuses_a_broken_index_before_writing(tmp_path, capsys, no_engine):
    reg = good_registry(tmp_path / "reg")
    reg.index_file.write_text("[]")
    before = snapshot(reg.root)
    code, err = run_cli(capsys, "update", "--registry", reg.root, "--data",
                        write_drop(tmp_path / "a.jsonl"), "--set", "model.name=tiny-llama")
    assert_one_line_error(code, err, str(reg.index_file), "registry index is a list")
    assert snapshot(reg.root) == before


def test_the_server_flags_a_node_whose_lifetime_epsilon_goes_back_and_keeps_the_maximum():
    from fedcl.privacy.report import note_clients

    section: dict = {}
    note_clients(section, [{"id": 0, "node_id": 11, "epsilon": 2.0}, {"id": 1, "node_id": 12, "epsilon": 3.0}],
                 server_round=1)
    assert section["max_client_epsilon"] == 3.0 and "epsilon_went_back" not in section
    # node 12 resets its ledger and reports under client 0's id: flagged, and the maximum stands
    note_clients(section, [{"id": 0, "node_id": 12, "epsilon": 0.5}, {"id": 1, "node_id": 11, "epsilon": 2.5}],
                 server_round=2)
    assert section["epsilon_went_back"] == [{"node_id": 12, "id": 0, "round": 2, "before": 3.0, "now": 0.5}]
    assert section["max_client_epsilon"] == 3.0
    assert section["nodes"]["12"]["epsilon"] == 3.0  # what the node has spent at least
    note_clients(section, [{"id": 1, "node_id": 11, "epsilon": 4.0}], server_round=3)
    assert section["max_client_epsilon"] == 4.0


FLOAT_SETTINGS = [f"{section}.{f.name}" for section, cls in
                  [("data", "DataConfig"), ("train", "TrainConfig"), ("federation", "FederationConfig"),
                   ("strategy", "StrategyConfig"), ("privacy", "PrivacyConfig"), ("continual", "ContinualConfig"),
                   ("lora", "LoraConfig")]
                  for f in __import__("dataclasses").fields(getattr(__import__("fedcl.config").config, cls))
                  if f.type in ("float", float)]


@pytest.mark.parametrize("key", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_every_float_setting_must_be_finite(key, value):
    from fedcl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(key) + r": got .*expected"):
        load_config(None, [f"{key}={value}"])
