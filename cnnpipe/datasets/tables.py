"""Label tables: CSV, TSV, JSON Lines and Parquet files read into columns of text.

Parquet is read with pyarrow. CSV and TSV are read with Python's `csv` module (Excel's
dialect: quoted fields with commas, quotes and newlines, CRLF, a byte-order mark, blank
lines; `;`-separated and UTF-16 files are recognised): it needs no import (pyarrow's
takes 0.15 s, a tenth of preprocessing 2,000 images), numbers malformed rows as a
spreadsheet does, and reads bytes that are not UTF-8 as surrogate escapes, so a path
written by a Latin-1 tool still names its file exactly. JSON Lines are read line by line
with Python's `json`: pyarrow's JSON reader refuses a column whose type changes between
rows (``1`` then ``"01"``), which a label column may do.

Every value becomes text as written (``"01"`` stays ``"01"``: a label is a name,
never a number parsed and printed again) or None when empty. Errors are one line
naming the table and the row, line or column (`TableError`).
"""

from __future__ import annotations

import csv
import difflib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnpipe.images.formats import display_path

__all__ = ["TABLE_SUFFIXES", "PATH_COLUMNS", "HF_METADATA", "Table", "TableError", "read_table",
           "find_metadata", "pick_column"]

# .txt: Excel's "Unicode Text" (UTF-16, tab-separated); the delimiter is read from the header line anyway
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                  ".parquet": "parquet", ".pq": "parquet"}
# the path column when --path-col is not given: the first of these the table has (Hugging Face's
# imagefolder `file_name`, fastai's and Keras's usual names, Kaggle's `id`)
PATH_COLUMNS = ("file_name", "path", "filename", "image", "id")
HF_METADATA = ("metadata.csv", "metadata.jsonl", "metadata.parquet")


class TableError(ValueError):
    """A label table that cannot be used: unreadable, malformed, empty, or a column that is not there."""


@dataclass
class Table:
    """A label table's columns as text: ``columns[name][i]`` is row i's value (None if empty).

    `where(i)` names row i for reports: the table's file name and ``row N`` as a spreadsheet
    numbers it (the header is row 1) for CSV, TSV and Parquet, ``line N`` for JSON Lines.
    """

    path: Path
    columns: dict[str, list[str | None]]
    row_names: list[str]

    @property
    def names(self) -> list[str]:
        return list(self.columns)

    def __len__(self) -> int:
        return len(self.row_names)

    def where(self, i: int) -> str:
        return f"{display_path(self.path.name)} {self.row_names[i]}"  # the name alone: reports are relocatable


def _text(v: Any) -> str | None:
    """A cell as text, None when empty: bytes as the file system would name them, numbers as written."""
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "surrogateescape")
    elif isinstance(v, bool):
        v = "true" if v else "false"
    elif not isinstance(v, str):
        v = str(v)
    return v if v != "" else None


def _sniff(path: Path, delimiter: str) -> tuple[str, str]:
    """(delimiter, encoding): a header line without the expected delimiter but with ',', ';' or a tab uses
    that one (European Excel saves CSV with ';'); a UTF-16 byte-order mark (Excel's "Unicode text") is read."""
    with open(path, "rb") as f:
        head = f.read(65536)
    encoding = "utf-16" if head[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"   # -sig: a BOM is not a name
    lines = [line for line in head.decode(encoding, "replace").splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if first.lower().startswith("sep=") and len(first) == 5:
        return first[4], encoding
    if delimiter not in first:
        delimiter = next((d for d in (",", ";", "\t") if d in first), delimiter)
    return delimiter, encoding


def _read_csv(path: Path, delimiter: str) -> Table:
    """CSV or TSV with Python's `csv` (Excel's dialect): quoted fields, CRLF, blank lines skipped. Bytes
    that are not UTF-8 become surrogate escapes, the form `os.fsdecode` gives the same bytes in a file name."""
    delimiter, encoding = _sniff(path, delimiter)
    with open(path, newline="", encoding=encoding, errors="surrogateescape") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header, number = [], 0
        for number, header in enumerate(reader, 1):   # blank lines above the header are skipped
            if header and header[0].lower().startswith("sep=") and not any(header[1:]):
                continue   # Excel's "sep=;" line: `_sniff` took the delimiter from it
            if any(cell.strip() for cell in header):
                break
        header = [cell.strip() for cell in header]   # "file_name, label": the space is not in the name
        named = [n for n in header if n != ""]   # Excel's trailing empty columns have no name: not columns
        if len(set(named)) != len(named):
            dup = next(n for n in named if named.count(n) > 1)
            raise TableError(f"{display_path(path)}: column {dup!r} appears twice in the header")
        keep = [(i, n) for i, n in enumerate(header) if n != ""]
        columns: dict[str, list[str | None]] = {n: [] for _, n in keep}
        rows: list[str] = []
        for number, row in enumerate(reader, number + 1):   # a spreadsheet's numbering: the header's row first
            if not row:
                continue   # a blank line
            if len(row) != len(header):
                raise TableError(f"{display_path(path)} row {number}: expected {len(header)} columns "
                                 f"({delimiter!r}-separated), got {len(row)} ({delimiter.join(row)[:60]!r})")
            for i, n in keep:
                columns[n].append(_text(row[i]))
            rows.append(f"row {number}")
    return Table(path, columns, rows)


def _read_jsonl(path: Path) -> Table:
    columns: dict[str, list[str | None]] = {}
    rows: list[str] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = raw.decode("utf-8", "surrogateescape").lstrip("\ufeff").strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TableError(f"{display_path(path)} line {n}: not JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise TableError(f"{display_path(path)} line {n}: expected a JSON object, got {type(rec).__name__}")
            for key in rec:
                columns.setdefault(key, [None] * len(rows))
            for key, col in columns.items():
                v = rec.get(key)
                col.append(_text(json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v))
            rows.append(f"line {n}")
    return Table(path, columns, rows)


def _read_parquet(path: Path) -> Table:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    # a list-valued cell (list<string>: BigEarthNet's labels) as a JSON array, as JSON Lines gives it
    columns = {n: [_text(json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v)
                   for v in table.column(n).to_pylist()] for n in table.column_names}
    return Table(path, columns, [f"row {i + 2}" for i in range(table.num_rows)])


def read_table(path: str | os.PathLike) -> Table:
    """Read a label table (format by suffix: `TABLE_SUFFIXES`).

    Returns:
      A `Table` of text columns in the file's column order.

    Raises:
      TableError: unknown suffix, a malformed row (naming its row or line), a header
        naming a column twice, no rows.
      OSError: the file cannot be read (the error names it).
    """
    p = Path(path)
    kind = TABLE_SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise TableError(f"{display_path(p)}: unknown table format {p.suffix or '(no suffix)'!r}; expected "
                         f"{', '.join(sorted(TABLE_SUFFIXES))}")
    if not p.is_file():
        raise FileNotFoundError(2, "label table not found", str(p))
    try:
        if kind == "jsonl":
            table = _read_jsonl(p)
        elif kind == "parquet":
            table = _read_parquet(p)
        else:
            table = _read_csv(p, "," if kind == "csv" else "\t")
    except (ValueError, UnicodeError, csv.Error) as exc:   # pyarrow's errors are ValueErrors too
        if isinstance(exc, TableError):
            raise
        text = " ".join(str(exc).split())
        raise TableError(f"{display_path(p)}: cannot read this {kind} table ({text[:200]})") from None
    if not len(table):
        raise TableError(f"{display_path(p)}: the table has no rows (columns: {', '.join(table.names) or 'none'})")
    return table


def pick_column(table: Table, name: str | None, option: str, defaults: Sequence[str] = ()) -> str:
    """The column `name`, or the first of `defaults` the table has.

    Raises:
      TableError: naming the table, the option and every column, with a did-you-mean.
    """
    listing = ", ".join(display_path(n)[:40] for n in table.names[:30]) + (", ..." if len(table.names) > 30 else "")
    if name is not None and name in table.columns:
        return name
    if name is None:
        found = next((d for d in defaults if d in table.columns), None)
        if found is not None:
            return found
        wanted = " or ".join(repr(d) for d in defaults)
        close = [n for n in table.names if n.strip().lower() in defaults]
        hint = f"; did you mean {option} {close[0]!r}?" if close else ""
        raise TableError(f"{display_path(table.path)}: no {option} column ({wanted}); pass {option} NAME "
                         f"(columns: {listing}){hint}")
    close = difflib.get_close_matches(name, table.names, n=1, cutoff=0.6) or [
        n for n in table.names if n.lower() == name.lower()]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise TableError(f"{display_path(table.path)}: {option} {name!r}: no such column (columns: {listing}){hint}")


def _has_file_name(p: Path) -> bool:
    try:
        return "file_name" in read_table(p).columns
    except (TableError, OSError):
        return True  # a metadata file that cannot be read is an error to show, not a folder to walk


def find_metadata(src: Path) -> Path | None:
    """SRC's Hugging Face `imagefolder` metadata file (metadata.csv / .jsonl / .parquet with a
    `file_name` column), or None.

    Raises:
      TableError: SRC holds two of them, or one per split folder (train/metadata.jsonl, ...),
        which are to be merged into one table first.
    """
    found = [src / n for n in HF_METADATA if (src / n).is_file() and _has_file_name(src / n)]
    if len(found) > 1:
        raise TableError(f"{display_path(src)}: holds {' and '.join(p.name for p in found)}; keep one "
                         "(or pass --labels TABLE)")
    if found:
        return found[0]
    per_split = [src / d / n for d in ("train", "validation", "val", "test") for n in HF_METADATA
                 if (src / d / n).is_file()]
    if per_split:
        listed = ", ".join(str(p.relative_to(src)) for p in per_split)
        raise TableError(f"{display_path(src)}: Hugging Face metadata per split ({listed}): "
                         "merge them into one table with paths relative to SRC (train/..., test/...) and pass "
                         "--labels TABLE; the split folders are kept")
    return None
