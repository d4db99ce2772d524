"""Rows from data files: UTF-8 text, JSON Lines and CSV, and the error every reader raises.

`fedcl.data` builds records from these rows for the user's files and
`fedcl.demo_data` for the built-in datasets; both report a bad file through
`DataError`, whose message names the file, the line and the column.

Files as people have them: UTF-8 with or without a BOM, UTF-16 with a BOM
(decoded), UTF-16 without one (refused by name: every other byte is NUL), and
control characters inside values, which `clean_text` removes, and labels that
mean "no value" (`is_missing`); `report_hygiene` counts both for the log.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import re
from typing import Iterator

logger = logging.getLogger("fedcl.data")


class DataError(ValueError):
    """A data file, value or split request is wrong; the message names the file, line and column."""


# A sample this long tells UTF-16 (a NUL in every other byte for Latin text) from
# UTF-8 with a stray NUL; the share is well above what binary junk in a text file gives.
_SNIFF_BYTES = 4096
_UTF16_NUL_SHARE = 0.3


def _utf16_without_bom(data: bytes) -> str | None:
    """"UTF-16 LE"/"UTF-16 BE" when NULs fill one byte position of each pair, else None."""
    sample = data[:_SNIFF_BYTES]
    pairs = len(sample) // 2
    if pairs < 2:
        return None
    even = sample[0:2 * pairs:2].count(0) / pairs  # high bytes first: big-endian
    odd = sample[1:2 * pairs:2].count(0) / pairs
    if max(even, odd) < _UTF16_NUL_SHARE or min(even, odd) > 0.1:
        return None
    return "UTF-16 LE" if odd > even else "UTF-16 BE"


def decode_text(data: bytes, source: str) -> str:
    """Text of `data`: UTF-8 (a leading BOM dropped) or UTF-16 with a BOM; bad bytes reported by line.

    UTF-16 without a BOM cannot be told apart from UTF-8 with NULs by decoding,
    so it is recognised by its NUL pattern and refused with the likely encoding.
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")  # the BOM says which byte order
        except UnicodeDecodeError as err:
            raise DataError(f"{source}: starts with a UTF-16 byte-order mark but is not valid UTF-16 "
                            f"(byte {err.start}: {err.reason}); save the file as UTF-8") from None
    guess = _utf16_without_bom(data)
    if guess:
        code = guess.replace(" ", "")  # iconv's name: UTF-16LE
        raise DataError(f"{source}: looks like {guess} text without a byte-order mark (every other byte "
                        f"is NUL), not UTF-8; re-save it as UTF-8 (e.g. iconv -f {code} -t UTF-8 "
                        f"{source} > fixed.csv)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{source}, line {line}, column {column}: not valid UTF-8 (byte 0x{data[err.start]:02x}); "
            "save the file as UTF-8 (a single byte like this is often Windows-1252 or Latin-1: "
            f"iconv -f WINDOWS-1252 -t UTF-8 {source} > fixed.csv)"
        ) from None


# C0 control characters other than tab, newline and carriage return, and DEL: NUL
# and the like come from binary exports and copy-paste, carry no meaning for the
# model, and some tokenizers map them to odd tokens.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_text(text: str) -> tuple[str, bool]:
    """(`text` without control characters, whether any were removed)."""
    cleaned = _CONTROL.sub("", text)
    return cleaned, len(cleaned) != len(text)


# Spellings of "no value" that exports write into a label column (R and pandas
# NA, SQL dumps' \N, spreadsheets' #N/A). A label the user declares (data.labels,
# data.label_words) is a label, never a marker.
MISSING_MARKERS = frozenset({"", "\\N", "NA", "N/A", "n/a", "#N/A", "<NA>", "NaN", "nan", "NULL", "null"})
_SHOWN_LINES = 10  # line numbers listed in a message; the count covers the rest


def is_missing(value: object, declared: set[str]) -> bool:
    """Whether a label value means "no value": JSON null or a marker, unless it is in `declared`."""
    if value is None:
        return True
    if isinstance(value, (dict, list)):
        return False  # reported as not text
    text = clean_text(as_str(value))[0].strip()
    return text in MISSING_MARKERS and text not in declared


def _lines(numbers: list[int]) -> str:
    """"line 4" or "lines 4, 9, ... and 3 more"."""
    shown = ", ".join(map(str, numbers[:_SHOWN_LINES]))
    more = f" and {len(numbers) - _SHOWN_LINES} more" if len(numbers) > _SHOWN_LINES else ""
    return ("line " if len(numbers) == 1 else "lines ") + shown + more


def report_hygiene(source: str, column: str, missing: list[int], cleaned: int, *, refuse: bool) -> None:
    """Refuse (`refuse`) or log the lines whose label is missing; log how many records lost control characters."""
    if missing and refuse:
        count = f"{len(missing)} record has" if len(missing) == 1 else f"{len(missing)} records have"
        raise DataError(f"{source}: {count} no label (empty or a missing-value marker such as \\N or NA "
                        f"in column {column!r}), {_lines(missing)}; fill them in, or set "
                        'data.missing_labels = "skip" to leave them out')
    if missing:
        logger.warning("%s: skipped %d records without a label (empty or a missing-value marker such as "
                       "\\N or NA in column %r), %s; data.missing_labels = \"error\" refuses them instead",
                       source, len(missing), column, _lines(missing))
    if cleaned:
        logger.warning("%s: removed control characters (NUL and other C0 codes besides tab and newline) "
                       "from %d records", source, cleaned)


def as_str(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"  # JSON's spelling, not Python's
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return str(value)


def missing_column(source: str, where: str, column: str, found: list[str], key: str) -> DataError:
    """The error for a missing column; `key` is the config field naming it ("label" -> data.label_column)."""
    listed = ", ".join(repr(name) for name in found) or "none"
    return DataError(f"{source}{where}: missing column {column!r} (columns found: {listed}); "
                     f"set data.{key}_column to the right one")


def iter_json_rows(text: str, source: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of JSON Lines text."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, strict=False)  # raw control characters: removed later, counted
        except json.JSONDecodeError as err:
            hint = ""
            if text.lstrip().startswith("["):
                hint = "; expected one JSON object per line (JSON Lines), not a JSON array"
            raise DataError(f"{source}, line {number}, column {err.colno}: invalid JSON: {err.msg}{hint}") from None
        if not isinstance(row, dict):
            raise DataError(f"{source}, line {number}: expected a JSON object (one per line), "
                            f"got {type(row).__name__} {line.strip()[:40]!r}")
        yield number, row


def iter_csv_rows(text: str, source: str, delimiter: str,
                  required: dict[str, str] | None = None) -> Iterator[tuple[int, dict]]:
    """(line where the record starts, {column: value}) for each data row; the header is line 1.

    `required` maps each column the header must have to the config key that names it.
    """
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
    except csv.Error as err:
        raise DataError(f"{source}, line 1: cannot read the header: {err}") from None
    if not header or not any(name.strip() for name in header):
        return
    header = [name.strip() for name in header]
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataError(f"{source}, line 1: duplicate column names in the header: {', '.join(map(repr, duplicates))}")
    for column, key in (required or {}).items():
        if column not in header:  # said once here, not on every row
            raise missing_column(source, ", line 1", column, header, key)
    last_line = reader.line_num
    while True:
        start = last_line + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(f"{source}, line {start}: cannot read the row: {err}") from None
        last_line = reader.line_num
        if not fields:  # a blank line
            continue
        if len(fields) != len(header):
            hint = "; a quoted field may lack its closing quote" if any("\n" in f for f in fields) else ""
            raise DataError(f"{source}, line {start}: expected {len(header)} fields (as in the header), "
                            f"found {len(fields)}{hint}")
        yield start, dict(zip(header, fields))
