"""A label table's multi-label or regression targets in `cnnpipe preprocess`: task, strata, counts.

Splits are stratified (DESIGN.md, "Splits"), and what a stratum is depends on the task:
single-label files by their class (`cnnpipe.datasets.splits`); multi-label files by
iterative stratification over their label sets (`cnnpipe.datasets.multilabel_splits`,
Sechidis et al. 2011), so each label's positives are spread over the splits and folds
in proportion; regression files by quantile bin of their (first) target, so each split
covers the range of values. With a group column, or the hash method, the groups or keys
alone decide (a multi-label file has no one class to balance by).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cnnpipe.datasets.folders import Candidate
from cnnpipe.datasets.multilabel_splits import iterative_folds, iterative_split
from cnnpipe.datasets.splits import deal_folds, split_files
from cnnpipe.tasks import Task

__all__ = ["task_of", "set_strata", "targets_of", "counted_names", "QUANTILE_BINS", "split_for_task",
           "folds_for_task"]

QUANTILE_BINS = 5   # regression strata: quintiles of the first target (fewer with fewer than 10 files a bin)


def task_of(table_record: dict[str, Any] | None) -> Task:
    """The task a label table's scan found (`cnnpipe.datasets.table_scan.scan_table`'s record "task")."""
    rec = (table_record or {}).get("task")
    if not rec:
        return Task()
    return Task(str(rec["type"]), tuple(str(n) for n in rec["names"]))


def set_strata(cands: Sequence[Candidate], task: Task) -> None:
    """Each candidate's `class_name` set to its stratum (see the module doc); class candidates keep their class."""
    if task.is_classification:
        return
    if task.kind == "multilabel":
        for c in cands:
            c.class_name = ""
        return
    values = np.array([c.target[0] for c in cands], np.float64)   # type: ignore[index]
    known = values[~np.isnan(values)]
    bins = max(1, min(QUANTILE_BINS, len(known) // 10))
    edges = np.quantile(known, np.linspace(0, 1, bins + 1)[1:-1]) if len(known) and bins > 1 else np.zeros(0)
    for c, v in zip(cands, values):
        c.class_name = "missing" if np.isnan(v) else f"q{int(np.searchsorted(edges, v, side='right'))}"


def targets_of(cands: Sequence[Candidate], task: Task) -> np.ndarray:
    """The candidates' targets (N, outputs) float32, NaN unknown."""
    if not cands:
        return np.zeros((0, task.num_outputs), np.float32)
    return np.asarray([c.target for c in cands], np.float32)


def counted_names(task: Task, cand: Candidate) -> list[str]:
    """The names a stored file counts for in meta.json's per-class counts: its class; the labels it is
    positive for (multilabel); the targets it has a value for (regression)."""
    if task.is_classification:
        return [cand.class_name]
    target = cand.target or ()
    if task.kind == "multilabel":
        return [n for n, v in zip(task.names, target) if v == 1.0]
    return [n for n, v in zip(task.names, target) if v == v]


def split_for_task(task: Task, cands: Sequence[Candidate], *, method: str, val_fraction: float,
                   test_fraction: float, seed: int, grouped: bool) -> list[str]:
    """The split of each candidate: iterative stratification for a multi-label task split "stratified",
    else `cnnpipe.datasets.splits.split_files` over the strata (`set_strata`) and groups."""
    keys = [c.class_rel for c in cands]
    if task.kind == "multilabel" and method == "stratified" and not grouped:
        return iterative_split(keys, targets_of(cands, task), val_fraction, test_fraction, seed)
    return split_files(keys, [c.class_name for c in cands], method=method, val_fraction=val_fraction,
                       test_fraction=test_fraction, seed=seed,
                       groups=[c.group or "" for c in cands] if grouped else None)[0]


def folds_for_task(task: Task, cands: Sequence[Candidate], k: int, seed: int, grouped: bool
                   ) -> tuple[list[str], np.ndarray]:
    """(split, fold) of each candidate: its non-test files dealt into `k` folds (all "train"), multi-label
    ones by iterative stratification unless grouped; `cnnpipe.datasets.splits.deal_folds` otherwise."""
    splits = [c.split or "train" for c in cands]
    keys, labels = [c.class_rel for c in cands], [c.class_name for c in cands]
    if task.kind != "multilabel" or grouped:
        return deal_folds(splits, keys, labels, k, seed, [c.group or "" for c in cands] if grouped else None)
    rest = [i for i, s in enumerate(splits) if s != "test"]
    fold = np.full(len(cands), -1, np.int64)
    fold[rest] = iterative_folds([keys[i] for i in rest], targets_of([cands[i] for i in rest], task), k, seed)
    return ["test" if s == "test" else "train" for s in splits], fold
