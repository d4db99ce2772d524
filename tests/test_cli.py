"""Tests of the `fedcl` command line, in-process through `fedcl.ops.cli.main`.

Every error here must surface before the run starts: exit status 2, a message
naming the key, value or file, and no run folder. The server app creates the
run folder as its first step, so "no run folder" also shows Flower's engine
was never reached. The one model these tests load is `tiny-llama`.
"""

from __future__ import annotations

import pytest

from fedcl.ops.cli import build_parser, main, preflight, resolve_config
from fedcl.config import Config

TINY = ["--model", "tiny-llama"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    # A run folder defaults to runs/<time> under the working directory.
    monkeypatch.chdir(tmp_path)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def good_csv(tmp_path, name="good.csv", rows=12):
    lines = ["text,label"] + [f"review number {i},{'pos' if i % 2 else 'neg'}" for i in range(rows)]
    return write(tmp_path, name, "\n".join(lines) + "\n")


def fake_run(tmp_path, rounds=2, done=0):
    """A run folder as the server leaves it after `done` committed rounds (config and checkpoint)."""
    run = tmp_path / "run"
    run.mkdir()
    config = Config().replace({"model.name": "tiny-llama", "federation.clients": 2,
                               "federation.rounds": rounds, "run.out_dir": str(run)})
    (run / "config.toml").write_text(config.to_toml(), encoding="utf-8")
    (run / "metrics.json").write_text('{"model": {}, "rounds": []}\n', encoding="utf-8")
    if done:
        (run / "checkpoint.json").write_text(
            f'{{"version": 1, "round": {done}, "adapter": "adapters/round-{done}"}}\n', encoding="utf-8")
    return run


def tree(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def assert_usage_error(code: int, err: str, *parts: str) -> None:
    assert code == 2
    assert err.startswith("fedcl: error: ")
    assert "Traceback" not in err
    for part in parts:
        assert part in err, f"{part!r} not in {err!r}"


# -- config errors: found before anything is loaded ---------------------------------------

def test_unknown_set_key(tmp_path, capsys):
    code, err = run_cli(capsys, "simulate", *TINY, "--set", "train.learning_rate=0.1", "--out", "run")
    assert_usage_error(code, err, "unknown key train.learning_rate", "known keys of [train]: lr,")
    assert not (tmp_path / "run").exists()


def test_bad_set_value(tmp_path, capsys):
    code, err = run_cli(capsys, "simulate", *TINY, "--set", "lora.r=0", "--out", "run")
    assert_usage_error(code, err, "--set: lora.r: got 0, expected an integer in [1, 1024]")
    assert not (tmp_path / "run").exists()


def test_bad_flag_value(tmp_path, capsys):
    code, err = run_cli(capsys, "simulate", *TINY, "--clients", "2", "--clients-per-round", "5",
                        "--out", "run")
    assert_usage_error(code, err, "flags: federation.clients_per_round: got 5")
    assert not (tmp_path / "run").exists()


def test_set_without_equals(tmp_path, capsys):
    code, err = run_cli(capsys, "simulate", *TINY, "--set", "lora.r", "--out", "run")
    assert_usage_error(code, err, "--set 'lora.r': expected section.key=value")
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path, capsys):
    code, err = run_cli(capsys, "simulate", "--config", "missing.toml", "--out", "run")
    assert_usage_error(code, err, "missing.toml: config file not found")
    assert not (tmp_path / "run").exists()


def test_out_is_not_empty(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine", encoding="utf-8")
    code, err = run_cli(capsys, "simulate", *TINY, "--out", "run")
    assert_usage_error(code, err, "--out run: exists and is not an empty folder", "--resume run")
    assert tree(tmp_path / "run") == ["notes.txt"]


def test_out_is_a_file(tmp_path, capsys):
    (tmp_path / "run").write_text("mine", encoding="utf-8")
    code, err = run_cli(capsys, "simulate", *TINY, "--out", "run")
    assert_usage_error(code, err, "--out run: exists and is not an empty folder")
    assert (tmp_path / "run").read_text(encoding="utf-8") == "mine"


def test_empty_out_folder_is_accepted(tmp_path):
    (tmp_path / "run").mkdir()
    args = build_parser().parse_args(["simulate", *TINY, "--out", "run"])
    config, out = resolve_config(args)
    assert out == tmp_path.joinpath("run").relative_to(tmp_path)
    assert config.run.out_dir == str(tmp_path / "run")
    assert config.model.name == "tiny-llama"


# -- model and data errors: found by the preflight -----------------------------------------

def test_unknown_model(tmp_path, capsys):
    code, err = run_cli(capsys, "simulate", "--model", "no-such-model", "--out", "run")
    assert_usage_error(code, err, "ModelError: model.name: got 'no-such-model'", "tiny-llama")
    assert not (tmp_path / "run").exists()


def test_missing_data_file(tmp_path, capsys):
    code, err = run_cli(capsys, "simulate", *TINY, "--data", "absent.csv", "--out", "run")
    assert_usage_error(code, err, "DataError: absent.csv: data file not found")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,text,expected", [
    ("ragged.csv", "text,label\ngood film,pos\nbad film,neg,extra\n",
     "ragged.csv, line 3: expected 2 fields (as in the header), found 3"),
    ("nolabel.csv", "text,sentiment\ngood film,pos\n",
     "nolabel.csv, line 1: missing column 'label' (columns found: 'text', 'sentiment'); "
     "set data.label_column"),
    ("broken.jsonl", '{"text": "good", "label": "pos"}\n{"text": "bad", "label": \n',
     "broken.jsonl, line 2, column"),
    ("empty.csv", "text,label\n", "empty.csv: no records"),
])
def test_malformed_data_file(tmp_path, capsys, name, text, expected):
    write(tmp_path, name, text)
    code, err = run_cli(capsys, "simulate", *TINY, "--data", name, "--out", "run")
    assert_usage_error(code, err, "DataError: " + expected)
    assert not (tmp_path / "run").exists()


def test_too_many_clients_for_the_data(tmp_path, capsys):
    good_csv(tmp_path, rows=6)
    code, err = run_cli(capsys, "simulate", *TINY, "--data", "good.csv", "--clients", "8", "--out", "run")
    assert_usage_error(code, err, "DataError: cannot give 8 clients at least one record each from 5 "
                       "training records")
    assert not (tmp_path / "run").exists()


def test_preflight_accepts_a_good_file(tmp_path):
    # The counterpart of the failures above: the same path with a sound file passes.
    good_csv(tmp_path)
    args = build_parser().parse_args(["simulate", *TINY, "--data", "good.csv", "--clients", "2",
                                      "--out", "run"])
    config, _ = resolve_config(args)
    assert (config.data.dataset, config.data.path) == ("", "good.csv")
    preflight(config)
    assert tree(tmp_path) == ["good.csv"]


def test_no_runs_folder_is_left_behind(tmp_path, capsys):
    code, _ = run_cli(capsys, "simulate", *TINY, "--data", "absent.csv")
    assert code == 2
    assert tree(tmp_path) == []


# -- resuming -------------------------------------------------------------------------------

def test_resume_not_a_run(tmp_path, capsys):
    (tmp_path / "elsewhere").mkdir()
    code, err = run_cli(capsys, "simulate", "--resume", "elsewhere")
    assert_usage_error(code, err, "--resume elsewhere: not a fedcl run folder (no config.toml)")
    assert tree(tmp_path) == ["elsewhere"]


@pytest.mark.parametrize("extra,named", [
    (["--set", "train.lr=0.1"], "train.lr"),
    (["--lr", "0.1"], "train.lr"),
    (["--clients", "3"], "federation.clients"),
    (["--model", "tiny-qwen2"], "model.name"),
    (["--data", "good.csv"], "--data"),
    (["--config", "other.toml"], "--config"),
    (["--state-dir", "states"], "--state-dir"),
    (["--out", "other"], "--out"),
])
def test_resume_refuses_changed_settings(tmp_path, capsys, extra, named):
    run = fake_run(tmp_path, rounds=2, done=1)
    before = tree(run)
    code, err = run_cli(capsys, "simulate", "--resume", str(run), "--rounds", "3", *extra)
    assert_usage_error(code, err, "only --rounds and federation.timeout may change", named)
    assert tree(run) == before
    assert tree(tmp_path) == ["run"] + [f"run/{p}" for p in before]


def test_resume_allows_rounds_and_timeout(tmp_path):
    run = fake_run(tmp_path, rounds=2, done=1)
    args = build_parser().parse_args(["simulate", "--resume", str(run), "--rounds", "5",
                                      "--set", "federation.timeout=60"])
    config, out = resolve_config(args)
    assert out == run
    assert (config.federation.rounds, config.federation.timeout) == (5, 60.0)
    assert (config.model.name, config.federation.clients) == ("tiny-llama", 2)
    assert config.run.out_dir == str(run)


def test_resume_of_a_finished_run_does_nothing(tmp_path, capsys):
    run = fake_run(tmp_path, rounds=2, done=2)
    before = tree(run)
    assert main(["simulate", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "already has 2 rounds" in out and "--rounds N with N > 2" in out
    assert tree(run) == before


# -- parsing --------------------------------------------------------------------------------

def test_bad_flag_type_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--rounds", "many"])
    assert info.value.code == 2
    assert "--rounds: invalid int value: 'many'" in capsys.readouterr().err


def test_flags_map_to_config_keys(tmp_path):
    args = build_parser().parse_args(["simulate", "--model", "tiny-llama", "--clients", "4",
                                      "--clients-per-round", "2", "--rounds", "6", "--local-steps", "3",
                                      "--lr", "0.01", "--batch-size", "4", "--lora-r", "4",
                                      "--lora-alpha", "8", "--lora-targets", "q_proj", "--seed", "7",
                                      "--strategy", "fedavg", "--state-dir", "states", "--out", "run"])
    config, _ = resolve_config(args)
    assert config.federation.clients == 4 and config.federation.sampled == 2
    assert config.federation.rounds == 6
    assert (config.train.local_steps, config.train.lr, config.train.batch_size) == (3, 0.01, 4)
    assert (config.lora.r, config.lora.alpha, config.lora.target_modules) == (4, 8, "q_proj")
    assert config.train.seed == 7
    assert config.run.state_dir == str(tmp_path / "states")
