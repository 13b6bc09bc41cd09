"""What preprocess learns from the rows it stores: counts per class and fold, plane sums, failures, nodata."""

from __future__ import annotations

from collections import Counter
from typing import Any

from cnnpipe.datasets.convert import Failure, Prepared
from cnnpipe.datasets.folders import Candidate
from cnnpipe.datasets.store import exact_mean_std
from cnnpipe.datasets.task_targets import counted_names
from cnnpipe.images.formats import display_path
from cnnpipe.tasks import Task

__all__ = ["Accumulator"]


class Accumulator:
    """Per-class counts, channel sums (per fold too), failures, warnings and nodata counts of the rows stored.

    Sums are exact Python integers for integer stores and float64 sums of the valid (non-NaN) values
    for float32 stores, with a count per plane (`cnnpipe.datasets.convert.Prepared`).
    """

    def __init__(self, planes: int, splits: list[str], folds: int = 0, task: Task | None = None) -> None:
        self.planes, self.task = planes, task or Task()
        self.sums, self.sumsq, self.n_pix = [0] * planes, [0] * planes, [0] * planes
        self.per_class: dict[str, Counter] = {s: Counter() for s in splits}
        self.per_fold = [Counter() for _ in range(folds)]
        self.fold_sums = [([0] * planes, [0] * planes, [0] * planes) for _ in range(folds)]
        self.failed: list[tuple[Candidate, Failure]] = []
        self.warnings: list[dict[str, Any]] = []
        self.nodata: dict[str, dict[str, int]] = {}   # report.json "nodata": per file, where any

    def add(self, cand: Candidate, res: Prepared) -> None:
        names = counted_names(self.task, cand)   # its class; its positive labels; its known targets
        self.per_class[cand.split].update(names)
        self.per_class[cand.split]["_files"] += 1
        if cand.fold >= 0:
            self.per_fold[cand.fold].update(names)
            self.per_fold[cand.fold]["_files"] += 1
        if res.warnings:
            self.warnings.append({"path": display_path(cand.rel), "warnings": list(res.warnings)})
        if res.nodata is not None and (res.nodata.missing or res.nodata.inexact):
            self.nodata[display_path(cand.rel)] = res.nodata.record()
        if res.sums is not None:
            _add_to(self.sums, self.sumsq, self.n_pix, res)
            if cand.fold >= 0:
                _add_to(*self.fold_sums[cand.fold], res)

    def fold_record(self, classes: list[str]) -> dict[str, Any]:
        """meta.json "folds": K, images per fold and class, and each fold's training statistics (every
        other fold's pixels: what a run validating on that fold normalises with, exactly)."""
        mean, std = [], []
        for held_sums, held_sumsq, held_n in self.fold_sums:
            m, s = exact_mean_std([a - b for a, b in zip(self.sums, held_sums)],
                                  [a - b for a, b in zip(self.sumsq, held_sumsq)],
                                  [a - b for a, b in zip(self.n_pix, held_n)])
            mean.append(m)
            std.append(s)
        # a multi-label or regression fold's counts are positives or values, so its images are given too
        images = {} if self.task.is_classification else {"images": [f["_files"] for f in self.per_fold]}
        return {"k": len(self.fold_sums), "per_class": [{c: f[c] for c in classes} for f in self.per_fold],
                **images, "train_mean": mean, "train_std": std}


def _add_to(sums: list, sumsq: list, counts: list[int], res: Prepared) -> None:
    """Add one row's per-plane sums, sums of squares and value counts to running totals, in place."""
    sums[:] = [a + b for a, b in zip(sums, res.sums)]
    sumsq[:] = [a + b for a, b in zip(sumsq, res.sumsq)]
    counts[:] = [a + b for a, b in zip(counts, res.counts)]
