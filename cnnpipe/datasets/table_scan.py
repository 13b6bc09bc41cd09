"""A label table + an image folder -> the candidates `cnnpipe preprocess` stores, every row and file accounted for.

A row names its file by a path relative to SRC (or to the table's folder), an absolute
path, or an id without its extension (matched to the one file under SRC with that stem).
Nothing is read here but the table and directory entries. Each row that cannot become a
candidate is recorded with a kind and reason (`folders.skip`), as is each file under SRC
that no row names; the run goes on. Only a table that cannot be used at all stops it
(`TableError`): unreadable or malformed, no rows, a column that is not there, a label
column with one class, a group column with one group.
"""

from __future__ import annotations

import os
import posixpath
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnpipe.datasets.folders import Candidate, FolderScan, skip, walk_files
from cnnpipe.datasets.store import SPLIT_NAMES
from cnnpipe.datasets.tables import HF_METADATA, PATH_COLUMNS, Table, TableError, pick_column, read_table
from cnnpipe.images.formats import display_path, path_from_display
from cnnpipe.tasks.targets import (
    TargetError,
    flag_value,
    is_list_cell,
    list_labels,
    multi_hot,
    number_value,
    split_labels,
    target_text,
)

__all__ = ["LabelTable", "scan_table", "SPLIT_VALUES"]

# what a split column may say (case-insensitive); a column of booleans is fastai's `is_valid`
SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "dev": "val", "test": "test", "testing": "test"}
# what an id without its extension prefers when other files share its stem (0046.png beside 0046.txt)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".jp2", ".j2k",
                            ".jpx", ".jxl", ".pgm", ".ppm", ".pbm", ".pnm", ".npy"})
_BOOLEANS = {"true": "val", "false": "train", "1": "val", "0": "train", "yes": "val", "no": "train"}


def _from_cp1252(text: str) -> str:
    """`text` whose bytes were not UTF-8 (surrogate escapes), read as Windows Excel's default "CSV" writes
    them: cp1252 (latin-1 for its five unassigned bytes). Text without escapes is returned as it is."""
    if not any("\udc80" <= ch <= "\udcff" for ch in text):
        return text
    raw = text.encode("utf-8", "surrogateescape")
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


@dataclass(frozen=True)
class LabelTable:
    """Where labels come from: a table and its columns (None: the default column, or no such column)."""

    path: str
    path_col: str | None = None
    label_col: str | tuple[str, ...] | None = None   # several: one 0/1 column per label (multi-label)
    split_col: str | None = None
    group_col: str | None = None
    fold_col: str | None = None
    from_config: bool = False   # errors name data.label_col, not --label-col
    label_delim: str | None = None   # labels joined in one cell: multi-label
    target_col: str | tuple[str, ...] | None = None   # numeric columns: regression
    task: str | None = None   # classification, multilabel, regression; None: from the columns

    def option(self, key: str) -> str:
        """The setting `key` as the user named it: a command-line flag or a config key."""
        return f"data.{key}" if self.from_config else f"--{key.replace('_', '-')}"

    def record(self, table: Table, cols: dict[str, Any]) -> dict[str, Any]:
        """What meta.json records of the table: its path, the columns used and its row count (and, for a
        multi-label or regression task, the target columns and how the targets are written)."""
        keys = ("path", "label", "split", "group", "fold")
        rec = {"table": display_path(Path(self.path).absolute()), **{f"{k}_col": cols[k] for k in keys},
               "rows": len(table)}
        if cols["form"] != "class":
            rec.update(target_cols=cols["targets"], form=cols["form"], label_delim=self.label_delim)
        return rec


def _names(value: str | tuple[str, ...] | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _task_form(table: Table, spec: LabelTable) -> tuple[str, str, list[str]]:
    """(task, how its targets are written: class | delimited | list | flags | numbers, the target columns).
    TableError for options that contradict each other or the column."""
    where, opt = display_path(table.path), spec.option
    if spec.target_col is not None and (spec.label_col is not None or spec.label_delim is not None):
        given = opt("label_col") if spec.label_col is not None else opt("label_delim")
        raise TableError(f"{opt('target_col')}: regression targets; {given} is for class or label columns: "
                         "give one or the other")
    if spec.label_delim is not None and not spec.label_delim:
        raise TableError(f"{opt('label_delim')}: empty; give the character that joins the labels ('|', ' ')")
    names = _names(spec.target_col if spec.target_col is not None else spec.label_col)
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise TableError(f"{opt('target_col' if spec.target_col is not None else 'label_col')}: {twice!r} is "
                         "named twice")
    if spec.target_col is not None or spec.task == "regression":
        if spec.task not in (None, "regression"):
            raise TableError(f"{opt('task')}: {spec.task} does not take {opt('target_col')} (regression targets)")
        return "regression", "numbers", [pick_column(table, n, opt("target_col")) for n in names] or [
            pick_column(table, spec.label_col, opt("label_col"), ("label",))]
    label_cols = [pick_column(table, n, opt("label_col")) for n in names] or [
        pick_column(table, None, opt("label_col"), ("label",))]
    values = [v for v in table.columns[label_cols[0]] if v is not None]
    # a list-valued column (Parquet list, JSON array): its non-list cells are bad rows, not classes
    lists = len(label_cols) == 1 and values and 2 * sum(map(is_list_cell, values)) >= len(values)
    if spec.task == "classification" and (len(label_cols) > 1 or spec.label_delim is not None or lists):
        raise TableError(f"{opt('task')}: classification takes one class per image: one {opt('label_col')} of "
                         f"single labels and no {opt('label_delim')}")
    if len(label_cols) > 1:
        if spec.label_delim is not None:
            raise TableError(f"{opt('label_delim')}: with several label columns each is a 0/1 column; "
                             "give one column of delimited labels, or several 0/1 columns")
        return "multilabel", "flags", label_cols
    if lists and spec.label_delim is not None:
        raise TableError(f"{opt('label_delim')}: column {label_cols[0]!r} holds lists of labels, not delimited text; "
                         f"leave {opt('label_delim')} out")
    if spec.label_delim is not None:
        return "multilabel", "delimited", label_cols
    if lists:
        return "multilabel", "list", label_cols
    if spec.task == "multilabel":
        raise TableError(f"{where}: {opt('task')} multilabel: column {label_cols[0]!r} holds one label per row; "
                         f"give {opt('label_delim')} (e.g. '|'), a list-valued column or several "
                         f"{opt('label_col')} columns (one 0/1 column per label)")
    return "classification", "class", label_cols


def _columns(table: Table, spec: LabelTable) -> dict[str, Any]:
    kind, form, targets = _task_form(table, spec)
    cols: dict[str, Any] = {"path": pick_column(table, spec.path_col, spec.option("path_col"), PATH_COLUMNS),
                            "label": targets[0], "task": kind, "form": form, "targets": targets,
                            "delim": spec.label_delim}
    for key, name in (("split", spec.split_col), ("group", spec.group_col), ("fold", spec.fold_col)):
        cols[key] = pick_column(table, name, spec.option(f"{key}_col")) if name is not None else None
    where = display_path(table.path)
    labels = {v for v in table.columns[cols["label"]] if v is not None}
    if form == "class" and len(labels) < 2:
        raise TableError(f"{where}: label column {cols['label']!r} holds "
                         f"{'one class (' + repr(next(iter(labels))) + ')' if labels else 'no labels'}; "
                         "a classifier needs at least two")
    if cols["group"] is not None and len({v for v in table.columns[cols["group"]] if v is not None}) < 2:
        raise TableError(f"{where}: group column {cols['group']!r} holds one group; grouping needs at least two")
    return cols


class _Files:
    """SRC's regular files by relative path and by path without its extension (for ids)."""

    def __init__(self, src: Path, scan: FolderScan, exclude: Path, table_dir: Path) -> None:
        self.src = src
        self.by_rel: dict[str, str] = {}
        self.by_stem: dict[str, list[str]] = defaultdict(list)
        self.by_name: dict[str, list[str]] = defaultdict(list)   # an id in any subfolder: its base name
        # the table itself (a metadata.csv inside SRC) is not an image without a row
        skip_rel = os.path.relpath(os.path.realpath(exclude), os.path.realpath(src)).replace(os.sep, "/")
        self.table_dir = None if table_dir.resolve() == src.resolve() else table_dir  # resolved once, not per row
        root_st = os.stat(src)
        root = (root_st.st_dev, root_st.st_ino)
        for path, rel in walk_files(src, "", scan, {root}, (root,)):
            if rel != skip_rel and not (rel in HF_METADATA and exclude.name in HF_METADATA):
                self.by_rel[rel] = os.path.abspath(path)   # one spelling per file, however SRC or a row names it
                stem = posixpath.splitext(rel)[0]
                self.by_stem[stem].append(rel)
                self.by_name[posixpath.basename(stem)].append(rel)

    def find(self, value: str) -> tuple[str, str] | tuple[None, str]:
        """(absolute path, path relative to SRC) of the file `value` names, or (None, why not): a path
        under SRC, an id (a path without its extension) under SRC, a path beside the table, an absolute path."""
        tries = [value]
        if _from_cp1252(value) != value:   # a cp1252 table naming UTF-8 files: its raw bytes are tried first
            tries.append(_from_cp1252(value))
        if "\\" in value:   # a Windows path, or cnnpipe's own escaped form of a name that is not UTF-8
            tries.append(value.replace("\\", "/"))
            try:
                tries.append(path_from_display(value))
            except UnicodeEncodeError:   # not a display form: it holds bytes that are not UTF-8 itself
                pass
        for v in tries:
            if os.path.isabs(v):
                if os.path.isfile(v):
                    return os.path.normpath(v), self._rel(v)
                continue
            rel = posixpath.normpath(v)
            if rel in self.by_rel:
                return self.by_rel[rel], rel
            stems = self.by_stem.get(rel) or ([] if "/" in rel else self.by_name.get(rel, []))
            if len(stems) > 1:   # 0046.png beside 0046.txt: the image is meant
                stems = [r for r in stems if posixpath.splitext(r)[1].lower() in IMAGE_SUFFIXES] or stems
            if len(stems) == 1:
                return self.by_rel[stems[0]], stems[0]
            if len(stems) > 1:
                names = ", ".join(map(display_path, stems[:3]))
                return None, f"ambiguous id: {len(stems)} files have this name ({names})"
            for base in (self.src, self.table_dir):   # a path on disk outside SRC's listing (../other/x.png)
                if base is not None and (base / v).is_file():
                    return os.path.abspath(base / v), self._rel(str(base / v))
        return None, "no such file under SRC or beside the table"

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.src).replace(os.sep, "/")


@dataclass
class _Row:
    index: int
    path: str
    rel: str
    values: tuple[str, str | None, str | None, int]  # label (a target as text), split, group, fold
    target: Any = None   # multi-label: a label set or a (L,) tuple; regression: a (T,) tuple


def _target(table: Table, cols: dict[str, Any], i: int) -> Any:
    """Row `i`'s multi-label or regression target (TargetError if a cell is not one; None: no target)."""
    form = cols["form"]
    cells = [table.columns[c][i] for c in cols["targets"]]
    if form == "delimited":
        return split_labels(_from_cp1252(cells[0]) if cells[0] is not None else None, cols["delim"])
    if form == "list":
        return list_labels(cells[0])
    values = tuple(flag_value(c) if form == "flags" else number_value(c) for c in cells)
    return None if all(v != v for v in values) else values   # every value unknown or missing: no target


def _split_values(table: Table, col: str | None) -> dict[str, str]:
    """A split column's values -> "train" / "val" / "test" (once per table, not per row); a column of
    booleans only is fastai's `is_valid`. Values not in the map are bad."""
    if col is None:
        return {}
    values = {v for v in table.columns[col] if v is not None}
    words = _BOOLEANS if all(v.strip().lower() in _BOOLEANS for v in values) else SPLIT_VALUES
    return {v: words[v.strip().lower()] for v in values if v.strip().lower() in words}


def _row(table: Table, cols: dict[str, Any], i: int, files: _Files, codes: tuple[dict, dict],
         scan: FolderScan, seen: set[str]) -> _Row | None:
    """Row `i` as a `_Row`, or None after recording why it cannot be used (`codes`: the split and fold
    columns' values -> split and fold number)."""
    def value(key: str) -> str | None:
        return table.columns[cols[key]][i] if cols[key] is not None else None

    splits, folds = codes
    where, path, label = table.where(i), value("path"), value("label")
    label = _from_cp1252(label) if label is not None else None   # "spécial" from Windows Excel, as written
    if label is not None and not label.strip():
        label = None   # a label of spaces is no label
    target, bad_target = None, None
    if cols["form"] != "class":   # multi-label or regression: the target, whatever `label` says
        try:
            target = _target(table, cols, i)
        except TargetError as exc:
            bad_target = str(exc)
        label = None if target is None and bad_target is None else "target"   # None: empty_label below
    if all(col[i] is None for col in table.columns.values()):
        skip(scan, where, "empty_row", f"{where}: an empty row")
        return None
    if path is None or not path.strip():
        skip(scan, where, "empty_path", f"{where}: no file named in column {cols['path']!r}")
        return None
    found, rel_or_why = files.find(path)
    if found is not None:
        seen.add(found)  # absolute and normalised: named by a row, used or not: never also "not in the table"
    split, fold, group = value("split"), value("fold"), value("group")
    checks = ((found is None, "missing_file", lambda: rel_or_why),
              (bad_target is not None, "bad_label", lambda: f"{bad_target} ({', '.join(map(repr, cols['targets']))})"),
              (label is None, "empty_label", lambda: f"empty label ({', '.join(map(repr, cols['targets']))})"),
              (cols["split"] is not None and split not in splits, "bad_split",
               lambda: "empty split" if split is None else f"split {split!r} is not train, val(id/idation) or test"),
              (cols["group"] is not None and group is None, "empty_group", lambda: f"empty group ({cols['group']!r})"),
              (cols["fold"] is not None and fold not in folds, "bad_fold",
               lambda: "empty fold" if fold is None else f"fold {fold!r} is not a fold (an integer >= 0)"))
    for bad, kind, reason in checks:
        if bad:   # the message is only made for a failing row: 2,000 rows cost 0.01 s, not 0.06
            skip(scan, where, kind, f"{where}: {display_path(path)}: {reason()}")
            return None
    text = display_path(label) if target is None else target_text(target)  # type: ignore[arg-type]
    return _Row(i, found, rel_or_why, (text, splits.get(split), group, folds[fold] if cols["fold"] else -1), target)


def _split_dirs(src: Path) -> list[str]:
    """SRC's train/val/test folders when those are its only folders (the split layout), else []."""
    top = [e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith(".")]
    return top if top and set(top) <= set(SPLIT_NAMES) else []


def _fold_numbers(table: Table, col: str | None) -> dict[str, int]:
    """A fold column's integer values -> fold 0 to K-1 in numeric order ("1".."5" -> 0..4)."""
    if col is None:
        return {}
    values = {}
    for v in table.columns[col]:
        if v is not None:
            try:
                number = float(v.strip())   # 2 or 2.0 (a pandas column with a gap is float)
            except ValueError:
                continue
            if not number.is_integer():
                continue
            values[v] = int(number)
            if values[v] < 0:   # -1: Kaggle's "in no fold"
                del values[v]
    order = sorted(set(values.values()))
    return {v: order.index(n) for v, n in values.items()}


def _encode_targets(scan: FolderScan, cols: dict[str, Any], table: Table) -> list[str]:
    """The task's output names; each candidate's target as a (names,) tuple (label sets made multi-hot,
    in sorted label order). TableError when a multi-label table names no label at all."""
    if cols["form"] not in ("delimited", "list"):
        _check_names(list(cols["targets"]), table)
        return list(cols["targets"])
    names = sorted(set().union(*(c.target for c in scan.candidates)))
    if not names:
        bad = sum(1 for s in scan.skipped if s["kind"] == "bad_label")
        raise TableError(f"{display_path(table.path)}: label column {cols['label']!r} names no label in any "
                         "usable row; a multi-label classifier needs at least one"
                         + (f" ({bad} rows have cells that are not labels; see the first: "
                            f"{next(s['reason'] for s in scan.skipped if s['kind'] == 'bad_label')})" if bad else ""))
    _check_names(names, table)
    for c in scan.candidates:
        c.target = multi_hot(c.target, names)
    return names


RESERVED_NAMES = frozenset({"path", "labels", "error"})   # predict's own CSV columns


def _check_names(names: list[str], table: Table) -> None:
    """TableError for a label or target name predict's CSV could not hold: one of its own columns, or
    one holding "|" (which joins a file's predicted labels)."""
    for n in names:
        if n in RESERVED_NAMES or "|" in n:
            why = ("is one of predict's own columns" if n in RESERVED_NAMES
                   else "holds '|', which joins predicted labels")
            raise TableError(f"{display_path(table.path)}: label or target {n!r} {why}; rename it in the table")


def scan_table(src: Path, spec: LabelTable) -> tuple[FolderScan, dict[str, Any]]:
    """The candidates a label table names under SRC, and what meta.json records of the table.

    Every row becomes a candidate or a skipped entry (missing_file, empty_label, bad_split,
    empty_group, bad_fold, conflicting_labels; duplicate_row and empty_row are noted, not
    failures); every file under SRC that no row names is skipped as ``no_row``. Candidates
    are in path order, whatever the table's row order.

    Raises:
      TableError: the table cannot be used (see the module doc). OSError: it cannot be read.
    """
    table = read_table(spec.path)
    cols = _columns(table, spec)
    scan = FolderScan(layout="table")
    files = _Files(src, scan, table.path, table.path.parent)
    folds = _fold_numbers(table, cols["fold"])
    codes = (_split_values(table, cols["split"]), folds)
    split_dirs = _split_dirs(src) if cols["split"] is None else []
    by_file: dict[str, list[_Row]] = defaultdict(list)
    named: set[str] = set()
    for i in range(len(table)):
        row = _row(table, cols, i, files, codes, scan, named)
        if row is not None:
            by_file[row.path].append(row)
    for rows in by_file.values():
        first = rows[0]
        if any(r.values != first.values for r in rows):
            listed = "; ".join(f"{table.row_names[r.index]}: {r.values[0]!r}" for r in rows[:4])
            for r in rows:
                skip(scan, table.where(r.index), "conflicting_labels",
                     f"{table.where(r.index)}: {display_path(first.rel)} is listed {len(rows)} times with different "
                     f"labels, splits, groups or folds ({listed})")
            continue
        for r in rows[1:]:
            skip(scan, table.where(r.index), "duplicate_row",
                 f"{table.where(r.index)}: {display_path(r.rel)} is listed again (as {table.row_names[first.index]})")
        label, split, group, fold = first.values
        scan.candidates.append(Candidate(first.path, first.rel, first.rel, label, split, group=group, fold=fold,
                                         target=first.target))
    in_dirs = {d: [c for c in scan.candidates if c.rel.startswith(d + "/")] for d in split_dirs}
    if sum(1 for v in in_dirs.values() if v) >= 2:   # SRC/train/..., SRC/test/...: the folders' splits, as
        for d, cands in in_dirs.items():             # without a table (Kaggle's unlabelled test/ alone: drawn)
            for c in cands:
                c.split = d
    for rel, path in files.by_rel.items():
        if path not in named:
            skip(scan, rel, "no_row", f"{display_path(rel)}: not in the label table {display_path(table.path.name)}")
    scan.candidates.sort(key=lambda c: c.rel)
    record = spec.record(table, cols)
    if cols["form"] != "class":
        record["task"] = {"type": cols["task"], "names": _encode_targets(scan, cols, table)}
    if cols["fold"] is not None:   # data.fold i is the i-th of the column's values, in numeric order
        record["fold_values"] = sorted({int(float(v.strip())) for v in folds})
    return scan, record
