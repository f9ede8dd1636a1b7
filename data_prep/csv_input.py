"""Finding and reading the Frankenstein CSV, with nothing dropped or changed without a word.

`locate_csv` finds it (or downloads it), `verify_checksum` checks it, `read_rows` returns the
`text` column: read with pandas, every row checked against Python's csv module, control
characters refused. What that means for the user: data_prep/prepare.py's docstring.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
import shutil
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from core.files import sha256_of, staged_file

LOG = logging.getLogger("data_prep")

REPO_ROOT = Path(__file__).resolve().parents[1]
CSV_NAME = "frankenstein_chunks.csv"
EXPECTED_SHA256 = "5b2759e5cf46249f096edeb2aa866218ede6786e494d55fbbef39b4dda69c9ed"
SOURCE_URL = (
    "https://raw.githubusercontent.com/Rakshith-rak69/Finetuning-Mistral7B-QLoRA/"
    "main/dataset/frankenstein_chunks.csv"
)
RAW_DIR = REPO_ROOT / "data" / "raw"
# The original rows are ~900 characters; a row this long means a wrong or corrupted file.
DEFAULT_MAX_ROW_CHARS = 20_000


def download_csv(target: Path, url: str = SOURCE_URL, timeout: float = 60.0) -> Path:
    """Download the original CSV into `target` (atomically)."""
    LOG.info("downloading %s", url)
    try:
        with staged_file(target) as tmp, tmp.open("wb") as out, \
                urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(
            f"{url}: download failed ({exc}); put {CSV_NAME} in {RAW_DIR} or pass --csv PATH"
        ) from exc
    return target


def locate_csv(csv_arg: Path | None, raw_dir: Path = RAW_DIR) -> Path:
    """--csv, else data/raw/, else downloaded into data/raw/."""
    if csv_arg is not None:
        if not csv_arg.is_file():
            raise UserError(f"{csv_arg}: file not found; check the --csv path")
        return csv_arg
    local = raw_dir / CSV_NAME
    if local.is_file():
        return local
    return download_csv(local)


def read_csv_text(path: Path) -> str:
    """The CSV's text: UTF-8, byte-order mark dropped, CRLF and CR line endings made LF."""
    raw = path.read_bytes()
    try:
        decoded = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
            "re-save the file as UTF-8"
        ) from exc
    return decoded.replace("\r\n", "\n").replace("\r", "\n")


def input_sha256(path: Path) -> str:
    """sha256 of the normalised text: the same for the book saved with any line endings or a
    byte-order mark (and the file's own sha256 for the original, which has neither)."""
    return hashlib.sha256(read_csv_text(path).encode("utf-8")).hexdigest()


def verify_checksum(path: Path, expected: str = EXPECTED_SHA256) -> str:
    actual = sha256_of(path)
    if actual == expected:
        return actual
    try:
        normalised = input_sha256(path)
    except UserError:  # not even UTF-8: certainly another file
        normalised = None
    if normalised != expected:
        raise UserError(
            f"{path}: sha256 {actual[:12]}… does not match the original CSV ({expected[:12]}…); "
            "re-download it, or pass --skip-checksum if this is deliberately another CSV"
        )
    return normalised


# Control characters that are not line or tab whitespace (C0 but TAB/LF/CR, DEL, C1): never in
# a text, and pandas' C parser cuts a field at a NUL.
CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
C0_NAMES = ["NUL", "SOH", "STX", "ETX", "EOT", "ENQ", "ACK", "BEL", "BS", "HT", "LF", "VT", "FF",
            "CR", "SO", "SI", "DLE", "DC1", "DC2", "DC3", "DC4", "NAK", "SYN", "ETB", "CAN", "EM",
            "SUB", "ESC", "FS", "GS", "RS", "US"]
QUOTING_FIX = ('each `"` inside a quoted field written as `""`, and a field holding a comma or '
               "a line break quoted")


def control_character_name(char: str) -> str:
    code = ord(char)
    name = C0_NAMES[code] if code < 32 else "DEL" if code == 127 else "a C1 control character"
    return f"U+{code:04X} ({name})"


def refuse_control_characters(text: str, path: Path) -> None:
    """One line naming the first control character that is not whitespace (NUL, BEL, VT, ...),
    by line and column: such a byte means a damaged or non-text file, never the book's text."""
    found = CONTROL_CHARACTER.search(text)
    if found is None:
        return
    line = text.count("\n", 0, found.start()) + 1
    column = found.start() - (text.rfind("\n", 0, found.start()) + 1) + 1
    raise UserError(
        f"{path}: line {line}, column {column} holds the control character "
        f"{control_character_name(found[0])}; delete it (a control byte in a CSV means a "
        "damaged or non-text file) and re-save the file as UTF-8 text"
    )


@dataclass(frozen=True)
class Record:
    """One record of Python's `csv` module: the lines it starts and ends on, its fields."""

    first_line: int
    last_line: int
    fields: list[str]


def csv_records(text: str) -> list[Record]:
    """Every record of the text as Python's csv module reads it (a blank line: no fields), the
    header included; the parse data_prep's reading is checked against."""
    reader = csv.reader(io.StringIO(text, newline=""))
    records, last = [], 0
    limit = csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))  # no field cut
    try:
        for fields in reader:
            records.append(Record(last + 1, reader.line_num, fields))
            last = reader.line_num
    finally:
        csv.field_size_limit(limit)
    return records


def pandas_text_column(text: str, path: Path, records: list[Record]) -> list[str] | None:
    """The `text` column as pandas reads it (every field a string, "" and "NA" kept as text, a
    record for each blank line), or None when the header names no `text` column; only that
    column is parsed, so extra or missing fields elsewhere in a row do not matter."""
    import pandas as pd

    options = dict(dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=False,
                   index_col=False, usecols=lambda name: name == "text")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            frame = pd.read_csv(io.StringIO(text), **options)
    except pd.errors.EmptyDataError:
        return None
    except pd.errors.ParserError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        if "EOF inside string" in reason and len(records) > 1:
            raise UserError(
                f"{path}: a quoted field in the row starting on line {records[-1].first_line} is "
                "never closed (its quote runs to the end of the file); close it, and write "
                'each `"` inside a quoted field as `""`'
            ) from exc
        raise UserError(f"{path}: malformed CSV ({reason}); check the quoting: {QUOTING_FIX}"
                        ) from exc
    if "text" not in frame.columns:
        return None
    return list(frame["text"])


def excerpt(value: str | None, limit: int = 40) -> str:
    """A field as shown in an error line: its first `limit` characters, repr'd."""
    if value is None:
        return "nothing"
    return repr(value[:limit]) + ("…" if len(value) > limit else "")


def read_rows(path: Path, max_row_chars: int = DEFAULT_MAX_ROW_CHARS) -> list[str]:
    """The `text` column, validated: UTF-8, no control characters, non-empty, no blank or
    oversized rows, and exactly what Python's csv module reads from the same text (every row,
    each with the same text), so that no row is dropped or changed without a word."""
    text = read_csv_text(path)
    if not text.strip():
        raise UserError(f"{path}: the file is empty; expected a CSV with a `text` column")
    refuse_control_characters(text, path)
    records = csv_records(text)
    header = records[0].fields
    column = pandas_text_column(text, path, records)
    if column is None or "text" not in header:
        raise UserError(
            f"{path}: no `text` column (found {', '.join(map(repr, header)) or 'a blank line'}); "
            "the first line must be a header naming a `text` column"
        )
    index = header.index("text")
    rows = []
    for i, record in enumerate(records[1:]):
        got = column[i] if i < len(column) else None
        if not record.fields and got in ("", None):
            continue  # a blank line between rows, not a row (pandas may skip trailing ones)
        expected = record.fields[index] if index < len(record.fields) else ""
        if got != expected or not record.fields:
            raise UserError(
                f"{path}: row ending on line {record.last_line} reads as {excerpt(got)} with "
                f"pandas but as {excerpt(expected if record.fields else None)} with Python's "
                f"csv module; check the quoting there: {QUOTING_FIX}"
            )
        if not expected.strip():
            raise UserError(
                f"{path}: row ending on line {record.last_line} has an empty `text`; remove "
                "blank rows"
            )
        if len(expected) > max_row_chars:
            raise UserError(
                f"{path}: row ending on line {record.last_line} has {len(expected):,} "
                f"characters, over the {max_row_chars:,} limit; check the file (or raise "
                "--max-row-chars)"
            )
        rows.append(expected)
    extra = [value for value in column[len(records) - 1:] if value]
    if extra:
        raise UserError(
            f"{path}: pandas reads a row {excerpt(extra[0])} after the last line Python's csv "
            f"module reads (line {records[-1].last_line}); check the quoting there: "
            f"{QUOTING_FIX}"
        )
    if not rows:
        raise UserError(f"{path}: has a header but no rows")
    return rows
