"""Task streams: the ordered tasks a continual learner meets, and each client's share.

A stream is a plain ``list[Task]``; ``Task(name, train_records, test_records)``
holds records in `fedcl.data`'s format. Builders:

- `by_period(records, column, period)`: domain-incremental by time, one task per
  year, quarter or month of the date in ``record["meta"][column]``, in time order.
- `by_label_groups(records, groups)`: class-incremental, one task per group of labels.
- `from_files(paths, cfg)`: one task per data file, in the order given
  (`by_file` cuts a run's dataset of ``data.task_files`` the same way).

Without separate test records, each task holds out `test_fraction` of its own
records (stratified by label, seeded). `client_share` gives one client its part
of every task; like `fedcl.data.client_split` it is a pure function of its
arguments, so every client process computes the same split. This module
imports neither torch nor flwr.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Sequence

import numpy as np

from fedcl.config import DataConfig
from fedcl.data import TASK_FILE_KEY, DataError, split_holdout, task_file_records

PERIODS = ("year", "quarter", "month")
_SALT_SHARE = 101  # keeps client_share's draws apart from fedcl.data's


class StreamError(DataError):
    """A stream cannot be built from these records; the message names the record and value."""


@dataclass(frozen=True)
class Task:
    name: str
    train_records: list[dict]
    test_records: list[dict]


# -- dates -------------------------------------------------------------------------

_MONTH_FIRST = ("%B %d, %Y", "%b %d, %Y", "%B %d %Y", "%b %d %Y", "%d %B %Y", "%d %b %Y",
                "%B %Y", "%b %Y", "%Y/%m/%d", "%Y.%m.%d")
_YEAR_MONTH = re.compile(r"^(\d{4})-(\d{1,2})$")
_YEAR = re.compile(r"^(\d{4})$")


def parse_date(value: str) -> date:
    """A date from "May 30, 2011", ISO ("2011-05-30", "2011-05-30T10:00"), "2020-07" or "2020".

    Year-month and year-only values fall on the first day of their period.
    Raises ValueError for anything else (ambiguous forms such as 05/30/2011 too).
    """
    text = value.strip()
    match = _YEAR_MONTH.match(text)
    if match:
        return date(int(match[1]), int(match[2]), 1)
    if _YEAR.match(text):
        return date(int(text), 1, 1)
    try:
        return datetime.fromisoformat(text).date()
    except ValueError:
        pass
    for fmt in _MONTH_FIRST:
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ValueError(f"not a date: {value!r}")


def period_key(day: date, period: str) -> tuple[str, tuple[int, int]]:
    """(task name, sort key) of the period holding `day`: "2011", "2011-Q2" or "2011-05"."""
    if period == "year":
        return f"{day.year}", (day.year, 0)
    if period == "quarter":
        quarter = (day.month - 1) // 3 + 1
        return f"{day.year}-Q{quarter}", (day.year, quarter)
    return f"{day.year}-{day.month:02d}", (day.year, day.month)


def _record_date(record: dict, index: int, column: str, source: str) -> date:
    meta = record.get("meta") or {}
    if column not in meta:
        found = ", ".join(repr(k) for k in meta) or "none"
        raise StreamError(f"{source}, record {index}: no column {column!r} in its meta (columns: {found})")
    try:
        return parse_date(str(meta[column]))
    except ValueError:
        raise StreamError(
            f"{source}, record {index}: column {column!r} holds {meta[column]!r}, which is not a date; "
            "expected e.g. 'May 30, 2011', '2011-05-30' or '2020-07'") from None


def _bucket_by_period(records: list[dict], column: str, period: str, source: str) -> dict:
    buckets: dict[tuple, tuple[str, list[dict]]] = {}
    for index, record in enumerate(records):
        name, key = period_key(_record_date(record, index, column, source), period)
        buckets.setdefault(key, (name, []))[1].append(record)
    return buckets


# -- builders ----------------------------------------------------------------------

def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise StreamError(f"test_fraction: got {test_fraction!r}, expected a float in (0, 1)")


def _task_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) & 0xFFFF_FFFF


def _assemble(named: list[tuple[str, list[dict], list[dict] | None]], test_fraction: float,
              seed: int) -> list[Task]:
    """Tasks from (name, records, test records or None); None holds `test_fraction` out."""
    tasks = []
    for index, (name, records, test) in enumerate(named):
        if test is None:
            records, test = split_holdout(records, test_fraction, _task_seed(seed, index))
        tasks.append(Task(name, records, test))
    return tasks


def by_period(records: list[dict], column: str, period: str = "year", *,
              test_records: list[dict] | None = None, test_fraction: float = 0.2,
              seed: int = 0) -> list[Task]:
    """One task per `period` ("year", "quarter", "month") of the dates in `meta[column]`, oldest first.

    `test_records`, when given, are bucketed the same way (a period with none gets
    an empty test list; test records of a period without training records are
    left out); otherwise each task holds out `test_fraction` of its records.
    """
    if period not in PERIODS:
        raise StreamError(f"period: got {period!r}, expected one of {', '.join(PERIODS)}")
    _check_fraction(test_fraction)
    if not records:
        raise StreamError("by_period: no records")
    train = _bucket_by_period(records, column, period, "training records")
    test = _bucket_by_period(test_records, column, period, "test records") if test_records is not None else {}
    named = [(name, recs, (test.get(key, (name, []))[1] if test_records is not None else None))
             for key, (name, recs) in sorted(train.items())]
    return _assemble(named, test_fraction, seed)


def _check_groups(groups: Sequence[Sequence[str]]) -> None:
    if not groups or any(not group for group in groups):
        raise StreamError(f"groups: got {groups!r}, expected a non-empty list of non-empty label lists")
    seen: dict[str, int] = {}
    for index, group in enumerate(groups):
        for label in group:
            if label in seen:
                raise StreamError(f"groups: label {label!r} is in group {seen[label]} and group {index}; "
                                  "each label belongs to one task")
            seen[label] = index


def _split_by_group(records: list[dict], groups: Sequence[Sequence[str]], source: str) -> list[list[dict]]:
    owner = {label: i for i, group in enumerate(groups) for label in group}
    parts: list[list[dict]] = [[] for _ in groups]
    for index, record in enumerate(records):
        if "label" not in record:
            raise StreamError(f"{source}, record {index}: has no label; label groups need a classification task")
        if record["label"] not in owner:
            raise StreamError(f"{source}, record {index}: label {record['label']!r} is in no group "
                              f"(groups: {[list(g) for g in groups]}); add it to one or filter the records")
        parts[owner[record["label"]]].append(record)
    return parts


def by_label_groups(records: list[dict], groups: Sequence[Sequence[str]], *,
                    test_records: list[dict] | None = None, test_fraction: float = 0.2,
                    seed: int = 0) -> list[Task]:
    """Class-incremental: task i holds the records whose label is in `groups[i]`.

    Every label must be in exactly one group and every group must have records.
    The classifier should still know all labels from the start (the verbalizer
    scores every label word); only the data arrive group by group.
    """
    _check_groups(groups)
    _check_fraction(test_fraction)
    parts = _split_by_group(records, groups, "training records")
    for group, part in zip(groups, parts):
        if not part:
            raise StreamError(f"groups: no training record has a label in {list(group)}")
    tests = _split_by_group(test_records, groups, "test records") if test_records is not None else None
    named = [("+".join(group), part, tests[i] if tests is not None else None)
             for i, (group, part) in enumerate(zip(groups, parts))]
    return _assemble(named, test_fraction, seed)


def by_file(records: list[dict], test_records: list[dict], paths: Sequence[str | Path]) -> list[Task]:
    """One task per file, in order, from records `fedcl.data.task_file_records` tagged with it.

    A run's dataset (``data.task_files``) is cut this way after its caps; a task
    is named by its file's stem (numbered when two stems are the same).
    """
    names = [Path(p).stem for p in paths]
    names = [n if names.count(n) == 1 else f"{i + 1}-{n}" for i, n in enumerate(names)]
    tasks = []
    for index, name in enumerate(names):
        train = [r for r in records if r.get("meta", {}).get(TASK_FILE_KEY) == index]
        if not train:
            raise StreamError(f"{paths[index]}: no training records left "
                              "(after the test split and data.max_records)")
        tasks.append(Task(name, train, [r for r in test_records if r.get("meta", {}).get(TASK_FILE_KEY) == index]))
    return tasks


def from_files(paths: Sequence[str | Path], cfg: DataConfig, *,
               test_paths: Sequence[str | Path] | None = None, seed: int = 0) -> list[Task]:
    """One task per file, in order, read with `fedcl.data` (named by the file stem).

    `test_paths`, when given, pairs one test file with each task; otherwise each
    task holds out `cfg.test_fraction` of its file.
    """
    if not paths:
        raise StreamError("from_files: no paths given")
    if test_paths is not None and len(test_paths) != len(paths):
        raise StreamError(f"from_files: {len(paths)} training files but {len(test_paths)} test files; "
                          "give one test file per task or none")
    train, test = task_file_records(paths, cfg, seed, test_paths or ())
    return by_file(train, test, paths)


# -- clients -----------------------------------------------------------------------

def _holders(rng: np.random.Generator, num_clients: int, presence: float) -> list[int]:
    """The clients that hold a task: each with probability `presence`, at least one."""
    held = [c for c in range(num_clients) if rng.random() < presence]
    return held or [int(rng.integers(num_clients))]


def _share(records: list[dict], holders: list[int], client_id: int, rng: np.random.Generator) -> list[dict]:
    if client_id not in holders:
        return []
    parts = np.array_split(rng.permutation(len(records)), len(holders))
    return [records[i] for i in sorted(parts[holders.index(client_id)])]


def client_share(stream: list[Task], client_id: int, num_clients: int, seed: int, *,
                 presence: float = 1.0) -> list[Task]:
    """Client `client_id`'s part of every task (same names and order; a share may be empty).

    Each task is held by each client with probability `presence` (at least one
    client holds it), and its train and test records are split IID among the
    holders. A client with fewer records than holders, or not holding a task,
    gets an empty share: it skips that task's training but keeps the stream's order.
    """
    if not 0 <= client_id < num_clients:
        raise StreamError(f"client id {client_id} is out of range for {num_clients} clients")
    if not 0.0 < presence <= 1.0:
        raise StreamError(f"presence: got {presence!r}, expected a float in (0, 1]")
    shares = []
    for index, task in enumerate(stream):
        rng = np.random.default_rng([seed & 0xFFFF_FFFF_FFFF_FFFF, _SALT_SHARE, index])
        holders = _holders(rng, num_clients, presence)
        shares.append(Task(task.name, _share(task.train_records, holders, client_id, rng),
                           _share(task.test_records, holders, client_id, rng)))
    return shares
