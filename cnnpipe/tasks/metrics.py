"""Evaluation metrics for single-label, multi-label and regression tasks, in plain NumPy.

Each function matches a scikit-learn metric (named in its docstring) to floating-point
rounding; scikit-learn is only the reference in the tests, never imported here.
Targets may hold NaN = unknown: a metric ignores those entries exactly, so a per-label
(per-target) metric is the one computed on the rows whose label (target) is known.
Scores / probabilities / predictions must be finite. Everything is float64 inside.
Undefined results are NaN from the 1-D functions and None in the report dicts (JSON-friendly).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["average_precision", "roc_auc", "precision_recall_f1", "fit_threshold", "fit_thresholds",
           "multilabel_metrics", "regression_metrics"]


def _known(y_true: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of 1-D {0,1,NaN} targets that are known, as float64, with the matching `other` values."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(other, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"targets and scores differ in length: {y.size} vs {s.size}")
    keep = ~np.isnan(y)
    y, s = y[keep], s[keep]
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("targets must be 0, 1 or NaN (unknown)")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite on the rows whose target is known")
    return y, s


def _curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct thresholds descending, true positives, false positives) at `score >= threshold`.

    sklearn's `_binary_clf_curve`: tied scores form one step, so ties never depend on row order.
    """
    order = np.argsort(s, kind="stable")[::-1]
    s, y = s[order], y[order]
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last row of each run of equal scores
    tps = np.cumsum(y)[ends]
    return s[ends], tps, ends + 1 - tps


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of 1-D targets (N,) in {0, 1, NaN} given float scores (N,); NaN targets are dropped.

    Equals `sklearn.metrics.average_precision_score`: sum over distinct thresholds (descending) of
    (recall step) x precision, no interpolation. NaN when no known positive (sklearn warns and returns 0).
    """
    y, s = _known(y_true, scores)
    if y.size == 0 or not y.any():
        return float("nan")
    _, tps, fps = _curve(y, s)
    recall = tps / tps[-1]
    return float(max(0.0, np.sum(np.diff(recall, prepend=0.0) * (tps / (tps + fps)))))


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of 1-D targets (N,) in {0, 1, NaN} given float scores (N,); NaN targets dropped.

    Equals `sklearn.metrics.roc_auc_score`: trapezoids between the (FPR, TPR) points of the distinct
    thresholds, so tied scores count half. NaN when only one class is known (sklearn raises).
    """
    y, s = _known(y_true, scores)
    n_pos = y.sum()
    if n_pos == 0 or n_pos == y.size:
        return float("nan")
    _, tps, fps = _curve(y, s)
    return float(np.trapezoid(np.r_[0.0, tps / tps[-1]], np.r_[0.0, fps / fps[-1]]))


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    """Precision, recall, F1 from counts with sklearn's zero_division=0 (0/0 -> 0)."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0  # sklearn's form: no rounding via P and R
    return float(precision), float(recall), float(f1)


def precision_recall_f1(y_true: np.ndarray, predicted: np.ndarray) -> tuple[float, float, float]:
    """Binary (precision, recall, F1) of 1-D targets (N,) in {0, 1, NaN} and decisions (N,) (bool or 0/1).

    NaN targets are dropped. Equals `sklearn.metrics.precision_recall_fscore_support(average="binary",
    zero_division=0)`: an undefined ratio (0/0) is 0.
    """
    y, p = _known(y_true, predicted)
    y, p = y == 1, p != 0
    tp = float(np.sum(y & p))
    return _prf(tp, float(np.sum(~y & p)), float(np.sum(y & ~p)))


def fit_threshold(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold t, F1) maximising F1 of the decision `score >= t` on 1-D targets (N,) {0, 1, NaN}, scores (N,).

    NaN targets are dropped. Candidates are the distinct known scores; among those with the maximal F1
    (sklearn `f1_score`, zero_division=0) the largest wins (fewest positives predicted), and t is that
    score itself. One sort and cumulative sums: O(N log N). Raises ValueError when no target is known.
    """
    y, s = _known(y_true, scores)
    if y.size == 0:
        raise ValueError("fit_threshold needs at least one known target")
    thresholds, tps, fps = _curve(y, s)
    # 2tp / (2tp + fp + fn) with fn = P - tp; equal rationals divide to equal floats, so ties are exact
    f1 = 2 * tps / (tps + fps + tps[-1])
    best = int(np.argmax(f1))  # first maximum = largest threshold, since thresholds descend
    return float(thresholds[best]), float(f1[best])


def _float32_in_gap(chosen: float, scores: np.ndarray) -> np.float32:
    """A float32 threshold t with ``lower < t <= chosen``, `lower` the largest score below `chosen` (if any):
    the midpoint of the gap, so the decisions ``score >= t`` on these rows are the fitted ones, and a score
    that moves by a rounding error (another device, batch or export) does not cross it."""
    below = scores[scores < chosen]
    if below.size == 0:
        t = np.float32(chosen)
        # compare in float64: against a Python float, NumPy 2 would compare in float32 and see no difference
        return np.nextafter(t, np.float32(-np.inf)) if float(t) > chosen else t
    lower = float(below.max())
    t = np.float32((lower + chosen) / 2)
    if float(t) <= lower:
        t = np.nextafter(np.float32(lower), np.float32(np.inf))
        if float(t) <= lower:   # float32(lower) rounded down
            t = np.nextafter(t, np.float32(np.inf))
    if float(t) > chosen:   # the two scores are adjacent in float32: keep the chosen one selected
        t = np.float32(chosen)
        t = np.nextafter(t, np.float32(-np.inf)) if float(t) > chosen else t
    return t


def fit_thresholds(targets: np.ndarray, probs: np.ndarray, min_positives: int = 2) -> tuple[np.ndarray, list[int]]:
    """Per-label F1-maximising thresholds (`fit_threshold`) for targets (N, L) in {0, 1, NaN} and probs (N, L).

    Each label uses its known rows only; its threshold lies midway between the fitted score and the next
    lower score (`_float32_in_gap`), giving the same decisions on these rows. A label with fewer than
    `min_positives` known positives, or
    no known negative, cannot be fitted meaningfully: it gets 0.5 and its index is in the returned
    list (for the caller to warn about by name). Returns (float32 thresholds (L,), fallback indices).
    """
    y, p = _as_2d(targets, probs)
    out = np.full(y.shape[1], 0.5, dtype=np.float32)
    fallback: list[int] = []
    for label in range(y.shape[1]):
        known = ~np.isnan(y[:, label])
        n_pos = int(np.sum(y[known, label] == 1))
        if n_pos < min_positives or n_pos == int(known.sum()):
            fallback.append(label)
            continue
        out[label] = _float32_in_gap(fit_threshold(y[known, label], p[known, label])[0], p[known, label])
    return out, fallback


def _as_2d(targets: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(targets, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if y.ndim != 2 or y.shape != v.shape:
        raise ValueError(f"expected two (N, L) arrays of one shape, got {y.shape} and {v.shape}")
    return y, v


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean of the defined values; None when there are none."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _defined(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def _label_report(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """One label's report on its known rows: y (n,) in {0, 1}, p (n,) probs. Undefined (0/0) values are None."""
    pos, pred = y == 1, p >= threshold
    tp, fp, fn = float(np.sum(pos & pred)), float(np.sum(~pos & pred)), float(np.sum(pos & ~pred))
    precision, recall, f1 = _prf(tp, fp, fn)
    return {"ap": _defined(average_precision(y, p)), "auroc": _defined(roc_auc(y, p)),
            "f1": f1 if tp + fp + fn else None, "precision": precision if tp + fp else None,
            "recall": recall if tp + fn else None, "support": int(tp + fn), "threshold": float(threshold)}


def multilabel_metrics(targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray,
                       names: Sequence[str]) -> dict:
    """Multi-label report for targets (N, L) in {0, 1, NaN}, probs (N, L), thresholds (L,), one name per label.

    Decisions are `probs >= thresholds[l]`; NaN targets are unknown and ignored entry by entry. Keys:
    "map" (macro AP over labels with a known positive), "macro_f1" (over labels with a known or
    predicted positive), "micro_f1" (over all known entries), "macro_auroc" (over labels with both
    classes known), "subset_accuracy" (over rows with a known label: all known labels right),
    "hamming_loss" (wrong known entries / known entries), and "per_label" {name: {"ap", "auroc", "f1",
    "precision", "recall", "support" (known positives), "threshold"}}. Undefined values are None.
    With nothing masked these equal sklearn's average_precision_score / roc_auc_score(average="macro")
    on the labels counted, f1_score(average="macro" | "micro", zero_division=0) when every label has
    a positive, accuracy_score and hamming_loss.
    """
    y, p = _as_2d(targets, probs)
    thr = np.asarray(thresholds, dtype=np.float64).ravel()
    if thr.size != y.shape[1] or len(names) != y.shape[1]:
        raise ValueError(f"{y.shape[1]} labels but {thr.size} thresholds and {len(names)} names")
    known = ~np.isnan(y)
    per_label = {str(name): _label_report(y[known[:, k], k], p[known[:, k], k], thr[k])
                 for k, name in enumerate(names)}
    pos, pred = y == 1, p >= thr  # NaN == 1 is False; `known` masks the unknown entries below
    tp = float(np.sum(pos & pred & known))
    fp = float(np.sum(~pos & pred & known))
    fn = float(np.sum(pos & ~pred & known))
    wrong = (pos != pred) & known
    rows = known.any(axis=1)  # a row with no known label says nothing about subset accuracy
    reports = list(per_label.values())
    return {
        "map": _mean([r["ap"] for r in reports]),
        "macro_f1": _mean([r["f1"] for r in reports]),
        "micro_f1": _prf(tp, fp, fn)[2] if tp + fp + fn else None,
        "macro_auroc": _mean([r["auroc"] for r in reports]),
        "subset_accuracy": float(np.mean(~wrong[rows].any(axis=1))) if rows.any() else None,
        "hamming_loss": float(wrong.sum() / known.sum()) if known.any() else None,
        "per_label": per_label,
    }


def _target_report(y: np.ndarray, p: np.ndarray) -> dict:
    """One target's errors on its known rows y (n,), predictions p (n,); undefined values are None."""
    n = int(y.size)
    report: dict = {"rmse": None, "mae": None, "r2": None, "pearson": None, "count": n}
    if n == 0:
        return report
    err = y - p
    report["rmse"] = float(np.sqrt(np.mean(err**2)))
    report["mae"] = float(np.mean(np.abs(err)))
    if n < 2:  # sklearn's r2_score is NaN below two samples; a correlation needs two points too
        return report
    ss_res = float(np.sum(err**2))
    dy = y - np.mean(y)
    ss_tot = 0.0 if np.ptp(y) == 0 else float(np.sum(dy**2))  # exact constant test: the mean may round
    if ss_tot:
        report["r2"] = 1.0 - ss_res / ss_tot
    else:  # sklearn's force_finite=True: a perfect fit of a constant is 1, anything else 0
        report["r2"] = 1.0 if ss_res == 0 else 0.0
    if np.ptp(y) > 0 and np.ptp(p) > 0:
        dp = p - np.mean(p)
        r = np.sum(dy * dp) / np.sqrt(np.sum(dy**2) * np.sum(dp**2))
        report["pearson"] = float(np.clip(r, -1.0, 1.0))
    return report


def regression_metrics(targets: np.ndarray, preds: np.ndarray, names: Sequence[str]) -> dict:
    """Regression report for targets (N, T) float (NaN = unknown), preds (N, T) finite, one name per target.

    Per target on its known rows: "rmse" (sqrt of sklearn mean_squared_error), "mae"
    (mean_absolute_error), "r2" (r2_score with force_finite=True: a constant target scores 1.0 if
    predicted exactly, else 0.0; None below two rows), "pearson" (scipy.stats.pearsonr / np.corrcoef;
    None if either side is constant), "count" (known rows). Top-level "rmse", "mae", "r2", "pearson"
    are means over the targets where defined (None if nowhere); "per_target" holds {name: report}.
    """
    y, p = _as_2d(targets, preds)
    if len(names) != y.shape[1]:
        raise ValueError(f"{y.shape[1]} targets but {len(names)} names")
    known = ~np.isnan(y)
    if not np.all(np.isfinite(p[known])):
        raise ValueError("predictions must be finite where the target is known")
    per_target = {str(name): _target_report(y[known[:, k], k], p[known[:, k], k]) for k, name in enumerate(names)}
    reports = list(per_target.values())
    out: dict = {key: _mean([r[key] for r in reports]) for key in ("rmse", "mae", "r2", "pearson")}
    out["per_target"] = per_target
    return out
