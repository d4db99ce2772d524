"""Records in, client shares out: reading, checking and splitting the data.

A record is a plain dict. Classification records are
``{"text": str, "label": str, "meta": {column: str}}``, instruction records
``{"prompt": str, "response": str, "meta": {...}}``; ``meta`` keeps every other
column as a string, which is what the "column" partition groups by.

`load_dataset` gives the global train/test split (the user's JSONL/CSV file or
a built-in demo from `fedcl.demo_data`); `client_split` gives one client its
share of the training records and its own held-out eval split. Every split is a
pure function of its arguments and a seed, because each simulated client
process recomputes its share and must get the same one as every other process.

This module imports neither torch nor flwr.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fedcl import demo_data
from fedcl.config import DataConfig, split_list
from fedcl.records import (DataError, as_str, clean_text, decode_text, is_missing, iter_csv_rows,
                           iter_json_rows, missing_column, report_hygiene)


@dataclass
class Dataset:
    train: list[dict]
    test: list[dict]
    labels: list[str]  # empty for instruction tasks
    name: str


PARTITION_KINDS = ("iid", "dirichlet", "column")
_CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_JSON_SUFFIXES = (".jsonl", ".json")
# Salts keep the seeded draws for different purposes independent of each other.
_SALT_TEST, _SALT_CAP, _SALT_TEST_CAP, _SALT_PARTITION, _SALT_EVAL = range(5)


def _rng(seed: int, *salt: int) -> np.random.Generator:
    # SeedSequence needs non-negative entropy; masking keeps negative seeds usable.
    return np.random.default_rng([seed & 0xFFFF_FFFF_FFFF_FFFF, *salt])


def _required_columns(cfg: DataConfig) -> tuple[tuple[str, str], tuple[str, str]]:
    """((record key, column), (record key, column)) for the task's two fields."""
    if cfg.task == "classification":
        return ("text", cfg.text_column), ("label", cfg.label_column)
    return ("prompt", cfg.prompt_column), ("response", cfg.response_column)


def _is_missing_label(row: dict, cfg: DataConfig) -> bool:
    if cfg.label_column not in row:
        return False  # reported as a missing column
    declared = set(split_list(cfg.labels)) | set(cfg.label_word_map())
    return is_missing(row[cfg.label_column], declared)


def _to_record(row: dict, line: int, source: str, cfg: DataConfig, allowed: list[str] | None) -> tuple[dict, bool]:
    """(record, whether control characters were removed from its text fields)."""
    record: dict = {}
    cleaned = False
    columns = _required_columns(cfg)
    for key, column in columns:
        if column not in row:
            raise missing_column(source, f", line {line}", column, list(row), key)
        value = row[column]
        if isinstance(value, (dict, list)):
            raise DataError(f"{source}, line {line}: column {column!r} must hold text, got a JSON "
                            f"{'object' if isinstance(value, dict) else 'array'}")
        text, changed = clean_text(as_str(value))
        if not text.strip():
            raise DataError(f"{source}, line {line}: missing value in column {column!r}")
        record[key] = text
        cleaned = cleaned or changed
    if cfg.task == "classification":
        record["label"] = record["label"].strip()
        if allowed is not None and record["label"] not in allowed:
            raise DataError(f"{source}, line {line}: unknown label {record['label']!r} in column "
                            f"{cfg.label_column!r}; allowed labels: {', '.join(allowed)}")
    used = {column for _, column in columns}
    record["meta"] = {name: as_str(value) for name, value in row.items() if name not in used}
    return record, cleaned


def _read_records(path: str | Path, cfg: DataConfig, allowed: list[str] | None) -> list[dict]:
    path = Path(path)
    source = str(path)
    suffix = path.suffix.lower()
    if suffix not in _JSON_SUFFIXES and suffix not in _CSV_DELIMITERS:
        raise DataError(f"{source}: unsupported file type {path.suffix or '(none)'!r}; "
                        "expected .jsonl or .json (one JSON object per line), .csv or .tsv")
    if not path.is_file():
        raise DataError(f"{source}: data file not found")
    text = decode_text(path.read_bytes(), source)
    if suffix in _JSON_SUFFIXES:
        rows = iter_json_rows(text, source)
    else:
        required = {column: key for key, column in _required_columns(cfg)}
        rows = iter_csv_rows(text, source, _CSV_DELIMITERS[suffix], required)
    records, missing, cleaned = [], [], 0
    for line, row in rows:
        if cfg.task == "classification" and _is_missing_label(row, cfg):
            missing.append(line)
            continue
        record, changed = _to_record(row, line, source, cfg, allowed)
        records.append(record)
        cleaned += changed
    report_hygiene(source, cfg.label_column, missing, cleaned, refuse=cfg.missing_labels == "error")
    if not records:
        why = "every record lacks a label" if missing else "the file is empty or has only a header"
        raise DataError(f"{source}: no records ({why})")
    return records


def load_records(path: str | Path, cfg: DataConfig) -> list[dict]:
    """Records of a local .jsonl/.json (one object per line) or .csv/.tsv file, checked.

    Raises DataError naming the file, line and column for anything wrong; when
    `cfg.labels` is set, a label outside it is an error.
    """
    allowed = split_list(cfg.labels) if cfg.task == "classification" and cfg.labels else None
    return _read_records(path, cfg, allowed)


# -- seeded, stratified selection -------------------------------------------------

def _groups(records: list[dict]) -> list[list[int]]:
    """Indices grouped by label (sorted by label), or one group when records have no label."""
    if not records or not all("label" in r for r in records):
        return [list(range(len(records)))]
    by_label: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        by_label.setdefault(record["label"], []).append(index)
    return [by_label[label] for label in sorted(by_label)]


def _quotas(sizes: list[int], k: int) -> list[int]:
    """Split `k` over groups in proportion to their sizes (largest remainder, ties to the first)."""
    total = sum(sizes)
    if not total:
        return [0] * len(sizes)
    exact = [k * size / total for size in sizes]
    quotas = [int(x) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in order[: k - sum(quotas)]:
        quotas[i] += 1
    return quotas


def _pick(records: list[dict], k: int, rng: np.random.Generator) -> set[int]:
    """Indices of `k` records drawn at random, stratified by label when there is one."""
    groups = _groups(records)
    picked: set[int] = set()
    for group, quota in zip(groups, _quotas([len(g) for g in groups], k)):
        picked.update(group[i] for i in rng.permutation(len(group))[:quota])
    return picked


def _holdout(records: list[dict], fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    n = len(records)
    k = round(fraction * n)
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)  # both sides keep at least one record
    held = _pick(records, k, rng)
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def split_holdout(records: list[dict], fraction: float, seed: int) -> tuple[list, list]:
    """(train, heldout) with about `fraction` held out, stratified by label when records have one.

    Both keep the records' original order. At least one record is held out when
    fraction > 0 and there are two or more records.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"holdout fraction: got {fraction!r}, expected a float in [0, 1)")
    return _holdout(records, fraction, _rng(seed))


def _cap(records: list[dict], limit: int, rng: np.random.Generator) -> list[dict]:
    if not limit or len(records) <= limit:
        return records
    kept = _pick(records, limit, rng)
    return [r for i, r in enumerate(records) if i in kept]


# -- datasets ----------------------------------------------------------------------

def _label_order(train: list[dict], cfg: DataConfig, source: str) -> list[str]:
    if cfg.task != "classification":
        return []
    present = sorted({r["label"] for r in train})
    if len(present) < 2:
        raise DataError(f"{source}: a classification task needs at least 2 labels in the training "
                        f"records, found {len(present)} ({', '.join(present) or 'none'})")
    return split_list(cfg.labels) or present


def _user_files(cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    train = load_records(cfg.path, cfg)
    if not cfg.test_path:
        return _holdout(train, cfg.test_fraction, _rng(seed, _SALT_TEST))
    return train, _read_records(cfg.test_path, cfg, _test_labels(cfg, train))


def _test_labels(cfg: DataConfig, train: list[dict]) -> list[str] | None:
    """Labels a test file may hold: ones the model trains on (the training records', unless data.labels says)."""
    if cfg.task != "classification":
        return None
    return split_list(cfg.labels) or sorted({r["label"] for r in train})


# Records read from task files carry their file's index here (in `meta`), which
# `continual.streams.by_file` cuts the stream by.
TASK_FILE_KEY = "task-file"


def _tagged(records: list[dict], index: int) -> list[dict]:
    return [{**r, "meta": {**r.get("meta", {}), TASK_FILE_KEY: index}} for r in records]


def task_file_records(paths: Sequence[str | Path], cfg: DataConfig, seed: int = 0,
                      test_paths: Sequence[str | Path] = ()) -> tuple[list[dict], list[dict]]:
    """(train, test) of one task per file, each record tagged with its file's index.

    `test_paths`, when given, pairs one test file with each task; otherwise each
    file holds out `cfg.test_fraction` (stratified), so every task has test
    records of its own.
    """
    parts = [load_records(path, cfg) for path in paths]
    allowed = _test_labels(cfg, [r for part in parts for r in part])
    train, test = [], []
    for index, (path, part) in enumerate(zip(paths, parts)):
        if not part:
            raise DataError(f"{path}: no records (a task file needs at least one)")
        if test_paths:
            kept, held = part, _read_records(test_paths[index], cfg, allowed)
        else:
            kept, held = _holdout(part, cfg.test_fraction, _rng(seed, _SALT_TEST, index))
        train += _tagged(kept, index)
        test += _tagged(held, index)
    return train, test


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """The global train/test records: `cfg.path` (and `cfg.test_path`) or the built-in demo.

    Without a test file, `cfg.test_fraction` is held out (stratified by label);
    `cfg.max_records` and `cfg.max_test_records` then cap each side. The same
    config and seed always give the same Dataset.
    """
    if cfg.task_files:
        train, test = task_file_records(cfg.task_file_list(), cfg, seed, cfg.task_test_file_list())
        name, source = "+".join(Path(p).stem for p in cfg.task_file_list()), "data.task_files"
    elif cfg.path:
        train, test = _user_files(cfg, seed)
        name, source = Path(cfg.path).stem, cfg.path
    else:
        if cfg.test_path:
            raise DataError(f"data.test_path = {cfg.test_path!r} needs data.path: "
                            "a built-in demo brings its own test split")

        train, test = demo_data.load_demo(cfg)
        if test is None:
            train, test = _holdout(train, cfg.test_fraction, _rng(seed, _SALT_TEST))
        name, source = cfg.dataset, f"data.dataset = {cfg.dataset!r}"
    train = _cap(train, cfg.max_records, _rng(seed, _SALT_CAP))
    test = _cap(test, cfg.max_test_records, _rng(seed, _SALT_TEST_CAP))
    labels = _label_order(train, cfg, source)
    if not test:
        raise DataError(f"{source}: no test records")
    return Dataset(train=train, test=test, labels=labels, name=name)


# -- partitions --------------------------------------------------------------------

def _iid(records: list[dict], num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    return [[int(i) for i in part] for part in np.array_split(rng.permutation(len(records)), num_clients)]


def _fill_empty(shares: list[list[int]]) -> list[list[int]]:
    """Give each empty client one record from the currently largest (lowest id on ties)."""
    for client, share in enumerate(shares):
        if not share:
            donor = max(range(len(shares)), key=lambda c: (len(shares[c]), -c))
            share.append(shares[donor].pop())
    return shares


def _dirichlet(records: list[dict], num_clients: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    if not all("label" in r for r in records):
        raise DataError("data.partition = 'dirichlet' skews labels, but these records have none "
                        "(an instruction task); use 'iid' or 'column'")
    shares: list[list[int]] = []
    for _ in range(10):  # re-draw a few times for a split where every client has data
        shares = [[] for _ in range(num_clients)]
        for group in _groups(records):
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(group)).astype(int)
            shuffled = [group[i] for i in rng.permutation(len(group))]
            for client, part in enumerate(np.split(np.array(shuffled, dtype=int), cuts)):
                shares[client].extend(int(i) for i in part)
        if all(shares):
            return shares
    return _fill_empty(shares)


def _by_column(records: list[dict], num_clients: int, column: str) -> list[list[int]]:
    if not column:
        raise DataError("data.partition = 'column' needs data.partition_column")
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        meta = record.get("meta", {})
        if column not in meta:
            found = ", ".join(repr(name) for name in meta) or "none"
            raise DataError(f"data.partition_column: record {index + 1} has no column {column!r} "
                            f"(columns found: {found})")
        groups.setdefault(meta[column], []).append(index)
    if len(groups) < num_clients:
        raise DataError(f"data.partition_column = {column!r} has {len(groups)} distinct values, "
                        f"fewer than the {num_clients} clients; each client needs at least one")
    shares: list[list[int]] = [[] for _ in range(num_clients)]
    # Largest groups first, each to the currently smallest client: whole groups, balanced sizes.
    for value in sorted(groups, key=lambda v: (-len(groups[v]), v)):
        smallest = min(range(num_clients), key=lambda c: (len(shares[c]), c))
        shares[smallest].extend(groups[value])
    return shares


def partition(records: list[dict], num_clients: int, kind: str, *, alpha: float = 0.5,
              column: str = "", seed: int = 0) -> list[list[dict]]:
    """Split `records` among `num_clients`; every client gets at least one record.

    "iid": a seeded shuffle cut into near-equal shares. "dirichlet": label skew,
    each label's records spread by proportions drawn from Dirichlet(alpha)
    (smaller alpha, more skew). "column": whole groups of equal
    ``meta[column]`` values, balanced greedily by size (no randomness).
    """
    if kind not in PARTITION_KINDS:
        raise DataError(f"data.partition: got {kind!r}, expected one of {', '.join(PARTITION_KINDS)}")
    if num_clients < 1:
        raise DataError(f"federation.clients: got {num_clients}, expected a positive integer")
    if num_clients > len(records):
        raise DataError(f"cannot give {num_clients} clients at least one record each from "
                        f"{len(records)} training records; use fewer clients or more data")
    rng = _rng(seed, _SALT_PARTITION)
    if kind == "iid":
        shares = _iid(records, num_clients, rng)
    elif kind == "dirichlet":
        shares = _dirichlet(records, num_clients, alpha, rng)
    else:
        shares = _by_column(records, num_clients, column)
    return [[records[i] for i in share] for share in shares]


def client_split(cfg: DataConfig, dataset: Dataset, client_id: int, num_clients: int,
                 seed: int) -> tuple[list, list]:
    """(train, eval) of client `client_id`: its share of `dataset.train` minus `cfg.eval_fraction`.

    A pure function of its arguments, so every client process computes the same partition.
    """
    if not 0 <= client_id < num_clients:
        raise DataError(f"client id {client_id} is out of range for {num_clients} clients")
    shares = partition(dataset.train, num_clients, cfg.partition, alpha=cfg.alpha,
                       column=cfg.partition_column, seed=seed)
    return _holdout(shares[client_id], cfg.eval_fraction, _rng(seed, _SALT_EVAL, client_id))


def fingerprint(records: list[dict]) -> str:
    """sha256 hex of the records' canonical JSON: identifies data without revealing it."""
    dump = json.dumps(records, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(dump.encode("utf-8")).hexdigest()


def fingerprint_words(hex_digest: str) -> list[int]:
    """A sha256 hex digest as 8 unsigned 32-bit words: a MetricRecord carries numbers, not text."""
    return [int(hex_digest[i:i + 8], 16) for i in range(0, 64, 8)]
