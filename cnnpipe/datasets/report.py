"""The preprocess report: what was stored, every file skipped and why, warnings, duplicates.

`build_report` makes the `report.json` mapping a store carries; `format_summary`
the short text `cnnpipe preprocess` prints.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cnnpipe.datasets.folders import Candidate, FolderScan
from cnnpipe.datasets.store import Store
from cnnpipe.images.formats import display_path

__all__ = ["build_report", "format_summary", "reason_counts", "failed_files", "IGNORED_KINDS"]

# entries skipped by design, not inputs that failed: hidden and AppleDouble files, a folder reached
# again through a link, loose files beside the class folders, sockets and other non-files; a label
# table's files it does not list, rows naming a file again with the same label, empty rows
IGNORED_KINDS = frozenset({"hidden", "appledouble", "symlink_repeat", "outside_class", "not_regular",
                           "no_row", "duplicate_row", "empty_row"})


def failed_files(report: dict[str, Any]) -> int:
    """How many entries of a store's report are input files that could not be used (decode errors,
    unreadable files, broken links, wrong plane counts, ...): every skipped kind but `IGNORED_KINDS`."""
    return sum(1 for s in report["skipped"] if s["kind"] not in IGNORED_KINDS)


def reason_counts(skipped: Sequence[dict[str, str]]) -> str:
    """E.g. "not_image: 3, empty: 1" (most common first), or "none"."""
    counts = Counter(s["kind"] for s in skipped)
    return ", ".join(f"{k}: {v}" for k, v in counts.most_common()) or "none"


def _natural(text: str) -> list:
    """Sort key that orders numbers by value: "t.csv row 23" before "t.csv row 202"."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", text)]


def build_report(scan: FolderScan, ok: list[Candidate], counts: dict[str, Any], src: Path,
                 warnings: Sequence[dict[str, Any]] = (), table: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report.json mapping: counts, every skipped entry with its kind and reason, files stored with
    warnings (metadata or codec problems that cost no pixels), duplicate groups, empty class folders.

    Deterministic: two runs over the same folder give the same mapping, however SRC was
    spelled ("src", "./src", its absolute path): every path, reasons included, is relative to
    SRC and in `display_path` form (names that are not UTF-8 escaped); timings are not in it.
    """
    by_hash: dict[str, list[Candidate]] = {}
    for c in ok:
        if c.digest:  # stored images only
            by_hash.setdefault(c.digest, []).append(c)
    duplicates = []
    for digest, group in by_hash.items():
        if len(group) < 2:
            continue
        duplicates.append({
            "hash": f"sha256-128:{digest}",
            "files": [{"path": display_path(c.rel), "class": display_path(c.class_name), "split": c.split}
                      for c in group],
            "cross_split": len({c.split for c in group}) > 1,
            "cross_class": len({c.class_name for c in group}) > 1,
        })
    duplicates.sort(key=lambda d: d["files"][0]["path"])
    # a class folder with no image in it is reported, not a class
    with_images = {(c.class_name, c.split if scan.layout == "splits" else None) for c in ok}
    empty = [display_path(rel) for rel, name, split in scan.class_dirs if (name, split) not in with_images]
    # how a scanned path starts ("src/", "/data/src/"; a table's files are named absolutely)
    prefixes = sorted({display_path(os.path.join(src, "")), display_path(os.path.join(src.absolute(), ""))},
                      key=len, reverse=True)

    def relative(reason: str) -> str:
        for prefix in prefixes:
            if reason.startswith(prefix):
                return reason[len(prefix):]
        return reason

    skipped = sorted(({**s, "reason": relative(s["reason"])} for s in scan.skipped),
                     key=lambda s: _natural(s["path"]))
    return {
        "source": display_path(src.absolute()),
        "layout": scan.layout,
        "labels": table,
        "counts": {
            "files_found": len(scan.candidates),   # with a label table: files its rows name
            **({"table_rows": table["rows"]} if table else {}),
            "images_stored": sum(v["total"] for v in counts.values()),
            "skipped": len(skipped),
            "skipped_by_kind": dict(Counter(s["kind"] for s in skipped).most_common()),
            "duplicate_groups": len(duplicates),
            "duplicate_files": sum(len(d["files"]) for d in duplicates),
            "cross_split_duplicate_groups": sum(d["cross_split"] for d in duplicates),
            "empty_class_folders": len(empty),
            "files_with_warnings": len(warnings),
        },
        "skipped": skipped,
        "warnings": sorted(warnings, key=lambda w: w["path"]),
        "empty_class_folders": empty,
        "duplicates": duplicates,
        "cross_split_duplicates": [d for d in duplicates if d["cross_split"]],
    }


def _target_words(table: dict[str, Any]) -> str:
    """E.g. "labels 'label'", "labels 'tags' split at '|'", "targets 'count', 'ink'" for the summary."""
    form, cols = table.get("form", "class"), table.get("target_cols") or [table["label_col"]]
    named = ", ".join(map(repr, cols))
    if form == "numbers":
        return f"targets {named}"
    how = {"delimited": f" split at {table.get('label_delim')!r}", "list": " (lists)",
           "flags": " (0/1 columns; empty or -1: unknown)"}.get(form, "")
    return f"labels {named}{how}"


def format_summary(store: Store, elapsed_s: float | None = None, engine: str | None = None) -> str:
    """A short human summary of a store: images per split and class, skipped files, duplicates and, when
    given, the time it took (`elapsed_s`: timings are not part of the store, which reruns reproduce byte for
    byte) and where (`engine`: "local engine, 2 worker processes")."""
    meta, report = store.meta, store.report
    h, w = store.size
    task = store.task
    # multi-label rows count each label's positives, regression rows each target's known values
    noun = {"classification": "class", "multilabel": "label (positives)", "regression": "target (values)"}[task.kind]
    lines = [f"{display_path(store.path)}: {meta['num_images']} images, {len(store.classes)} {task.noun}"
             + ("" if task.is_classification else f" ({task.kind})")
             + f", {h}x{w}x{store.channels} {meta['dtype']} ({report['layout']} layout)"]
    width = max(len(noun), *(len(c) for c in store.classes))
    lines.append(f"  {noun:<{width}}  " + "  ".join(f"{s:>7}" for s in store.splits))
    for c in store.classes:
        lines.append(f"  {c:<{width}}  " + "  ".join(f"{meta['counts'][s]['per_class'][c]:>7}"
                                                     for s in store.splits))
    lines.append(f"  {'total':<{width}}  " + "  ".join(f"{meta['counts'][s]['total']:>7}" for s in store.splits))
    rc = report["counts"]
    folds = meta.get("folds")
    split = meta.get("split") or {}
    table = report.get("labels")
    if folds:
        values = (table or {}).get("fold_values")
        named = f" = column values {', '.join(map(str, values))}" if values else ""
        lines.append(f"  folds (data.fold 0-{folds['k'] - 1}{named}): "
                     + ", ".join(map(str, folds.get("images") or [sum(f.values()) for f in folds["per_class"]]))
                     + " images")
    if table or split:
        lines.append((f"labels: {display_path(table['table'])} ({table['rows']} rows, paths {table['path_col']!r}, "
                      f"{_target_words(table)}); " if table else "")
                     + f"split: {split.get('method', 'hash')}")
    for key, what in (("groups_in_two_splits", "splits"), ("groups_in_two_folds", "folds")):
        crossing = report.get(key) or []
        if crossing:
            lines.append(f"warning: {len(crossing)} groups ({table['group_col']!r}) are in two {what} as the table or "
                         f"folders give them: {', '.join(crossing[:5])}{', ...' if len(crossing) > 5 else ''}")
    kinds = ", ".join(f"{k} {v}" for k, v in rc["skipped_by_kind"].items())
    lines.append(f"skipped {rc['skipped']} {'files or rows' if table else 'files'}" + (f" ({kinds})" if kinds else "")
                 + (f"; empty class folders: {', '.join(report['empty_class_folders'])}"
                    if report["empty_class_folders"] else ""))
    if rc.get("files_with_warnings"):
        lines.append(f"stored with warnings (pixels kept): {rc['files_with_warnings']} files")
    lines.append(f"duplicates: {rc['duplicate_groups']} groups, {rc['duplicate_files']} files, "
                 f"{rc['cross_split_duplicate_groups']} crossing splits")
    failed = failed_files(report)
    lines.append((f"done in {elapsed_s:.1f} s" + (f" ({engine})" if engine else "") + "; "
                  if elapsed_s is not None else "")
                 + (f"{failed} input file(s) failed; " if failed else "")
                 + f"details in {display_path(store.path / 'report.json')}")
    return "\n".join(lines)
