"""The task metrics (cnnpipe.tasks.metrics) against scikit-learn, the reference, to 1e-9: random sizes,
heavy ties, NaN-masked targets, labels without positives; the threshold fit against a brute-force search."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import pearsonr
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    r2_score,
    roc_auc_score,
)

from cnnpipe.tasks.metrics import (
    average_precision,
    fit_threshold,
    fit_thresholds,
    multilabel_metrics,
    precision_recall_f1,
    regression_metrics,
    roc_auc,
)

TOL = 1e-9
fast = settings(max_examples=50, deadline=None, derandomize=True)
seeds = st.integers(0, 2**32 - 1)


def approx(x):
    return pytest.approx(x, abs=TOL, rel=TOL)


def multilabel_data(seed: int, n: int, n_labels: int, ties: bool, mask: float):
    """Targets (n, L) in {0, 1} with NaN at `mask` of the entries, and probabilities (rounded when `ties`)."""
    rng = np.random.default_rng(seed)
    prevalence = rng.choice([0.0, 0.05, 0.3, 0.5, 0.9, 1.0], size=n_labels)
    y = (rng.random((n, n_labels)) < prevalence).astype(np.float64)
    # scores that carry some signal, so thresholds and curves are not all trivial
    p = np.clip(0.35 * y + rng.random((n, n_labels)) * 0.65, 0.0, 1.0)
    if ties:
        p = np.round(p, 1)
    if mask:
        y[rng.random((n, n_labels)) < mask] = np.nan
    return y, p


# ---------------------------------------------------------------- binary ranking and counts

@fast
@given(seeds, st.integers(2, 200), st.booleans(), st.sampled_from([0.0, 0.3]))
def test_binary_metrics_match_sklearn(seed, n, ties, mask):
    y, s = multilabel_data(seed, n, 1, ties, mask)
    y, s = y[:, 0], s[:, 0]
    known = ~np.isnan(y)
    yk, sk = y[known].astype(int), s[known]
    if yk.sum() > 0:
        assert average_precision(y, s) == approx(average_precision_score(yk, sk))
    else:
        assert np.isnan(average_precision(y, s))
    if 0 < yk.sum() < yk.size:
        assert roc_auc(y, s) == approx(roc_auc_score(yk, sk))
    else:
        assert np.isnan(roc_auc(y, s))
    pred = s >= 0.5
    if not known.any():  # sklearn refuses empty input; zero_division=0 makes every ratio 0
        assert precision_recall_f1(y, pred) == (0.0, 0.0, 0.0)
        return
    ref = precision_recall_fscore_support(yk, pred[known].astype(int), average="binary", zero_division=0)[:3]
    assert precision_recall_f1(y, pred) == approx(tuple(float(v) for v in ref))


def test_binary_metrics_on_hand_examples():
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    assert average_precision(y, s) == approx(average_precision_score(y, s))  # 0.8333...
    assert roc_auc(y, s) == approx(0.75)
    tied = np.full(4, 0.5)  # one threshold: AP is the prevalence, AUC a half
    assert average_precision(y, tied) == approx(0.5)
    assert roc_auc(y, tied) == approx(0.5)
    assert precision_recall_f1(np.zeros(3), np.zeros(3)) == (0.0, 0.0, 0.0)  # zero_division=0
    with pytest.raises(ValueError):
        average_precision(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError):
        roc_auc(np.array([0, 1]), np.array([np.nan, 0.2]))


# ---------------------------------------------------------------- thresholds

def brute_force_threshold(y: np.ndarray, s: np.ndarray) -> tuple[float, Fraction]:
    """Every distinct score tried as `s >= t`; maximal F1 (exact fractions), ties to the larger threshold."""
    best = None
    for t in np.unique(s):
        pred = s >= t
        tp, fp, fn = int(np.sum(pred & (y == 1))), int(np.sum(pred & (y == 0))), int(np.sum(~pred & (y == 1)))
        f1 = Fraction(2 * tp, 2 * tp + fp + fn) if tp + fp + fn else Fraction(0)
        if best is None or f1 >= best[1]:  # ascending t: `>=` keeps the largest among equals
            best = (float(t), f1)
    return best


@fast
@given(seeds, st.integers(2, 200), st.booleans(), st.sampled_from([0.0, 0.3]))
def test_fit_threshold_matches_brute_force(seed, n, ties, mask):
    y, s = multilabel_data(seed, n, 1, ties, mask)
    y, s = y[:, 0], s[:, 0]
    known = ~np.isnan(y)
    if not known.any():
        with pytest.raises(ValueError):
            fit_threshold(y, s)
        return
    t, f1 = fit_threshold(y, s)
    t_ref, f1_ref = brute_force_threshold(y[known], s[known])
    assert t == t_ref
    assert f1 == approx(float(f1_ref))
    assert f1 == approx(f1_score(y[known].astype(int), (s[known] >= t).astype(int), zero_division=0))


def test_fit_thresholds_falls_back_to_half():
    nan = np.nan
    targets = np.array([
        # 1 positive | all positive | all unknown | fittable | 2 positives, rest unknown but one negative
        [1, 1, nan, 1, 1],
        [0, 1, nan, 1, 1],
        [0, 1, nan, 0, 0],
        [0, nan, nan, 0, nan],
    ])
    probs = np.array([[0.9, 0.2, 0.1, 0.7, 0.6],
                      [0.1, 0.3, 0.2, 0.6, 0.4],
                      [0.2, 0.4, 0.3, 0.2, 0.5],
                      [0.3, 0.5, 0.4, 0.1, 0.9]], dtype=np.float32)
    thresholds, fallback = fit_thresholds(targets, probs)
    assert thresholds.dtype == np.float32 and thresholds.shape == (5,)
    assert fallback == [0, 1, 2]
    assert thresholds[:3].tolist() == [0.5, 0.5, 0.5]
    # midway between the fitted score and the next lower known one: 0.6 over 0.2, 0.4 over... none below
    assert thresholds[3] == np.float32(0.4)
    assert thresholds[4] == np.float32(0.4)  # the unknown row with 0.9 takes no part; 0.4 is the lowest known
    assert fit_thresholds(targets, probs, min_positives=1)[1] == [1, 2]


def test_fit_thresholds_keeps_float64_scores_selected():
    # float32(0.1) > 0.1: the stored threshold rounds down so the fitted float64 score still passes
    targets = np.array([[1.0], [1.0], [0.0], [0.0]])
    probs = np.array([[0.3], [0.1], [0.05], [0.01]])
    thresholds, fallback = fit_thresholds(targets, probs)
    assert fallback == [] and fit_threshold(targets[:, 0], probs[:, 0])[0] == 0.1
    assert ((probs[:, 0] >= thresholds[0]) == (probs[:, 0] >= 0.1)).all()


# ---------------------------------------------------------------- multi-label

labels_data = st.tuples(seeds, st.integers(2, 200), st.integers(1, 6), st.booleans())


@fast
@given(labels_data)
def test_multilabel_matches_sklearn_unmasked(args):
    seed, n, n_labels, ties = args
    y, p = multilabel_data(seed, n, n_labels, ties, 0.0)
    rng = np.random.default_rng(seed + 1)
    thresholds = rng.choice([0.3, 0.5, 0.65], size=n_labels).astype(np.float32)
    names = [f"label{k}" for k in range(n_labels)]
    out = multilabel_metrics(y, p, thresholds, names)
    json.dumps(out, allow_nan=False)
    yi, pred = y.astype(int), (p >= thresholds).astype(int)

    has_pos = yi.sum(axis=0) > 0
    both = has_pos & (yi.sum(axis=0) < n)
    if has_pos.sum() >= 2:
        assert out["map"] == approx(average_precision_score(yi[:, has_pos], p[:, has_pos], average="macro"))
    elif has_pos.sum() == 1:
        assert out["map"] == approx(average_precision_score(yi[:, has_pos][:, 0], p[:, has_pos][:, 0]))
    else:
        assert out["map"] is None
    if both.sum() >= 2:
        assert out["macro_auroc"] == approx(roc_auc_score(yi[:, both], p[:, both], average="macro"))
    elif both.sum() == 1:
        assert out["macro_auroc"] == approx(roc_auc_score(yi[:, both][:, 0], p[:, both][:, 0]))
    else:
        assert out["macro_auroc"] is None
    if n_labels == 1:  # sklearn reads one column as binary, not multilabel
        if has_pos.all():
            assert out["macro_f1"] == approx(f1_score(yi[:, 0], pred[:, 0], zero_division=0))
            assert out["micro_f1"] == approx(f1_score(yi[:, 0], pred[:, 0], zero_division=0))
        assert out["subset_accuracy"] == approx(accuracy_score(yi[:, 0], pred[:, 0]))
    else:
        if has_pos.all():
            assert out["macro_f1"] == approx(f1_score(yi, pred, average="macro", zero_division=0))
        if yi.any() or pred.any():
            assert out["micro_f1"] == approx(f1_score(yi, pred, average="micro", zero_division=0))
        assert out["subset_accuracy"] == approx(accuracy_score(yi, pred))
    assert out["hamming_loss"] == approx(hamming_loss(yi, pred))

    prec, rec, f1, support = precision_recall_fscore_support(yi, pred, average=None, labels=[1], zero_division=0) \
        if n_labels == 1 else precision_recall_fscore_support(yi, pred, average=None, zero_division=0)
    for k, name in enumerate(names):
        rep = out["per_label"][name]
        assert rep["support"] == int(support[k]) and rep["threshold"] == float(thresholds[k])
        assert rep["f1"] == (approx(f1[k]) if yi[:, k].any() or pred[:, k].any() else None)
        assert rep["precision"] == (approx(prec[k]) if pred[:, k].any() else None)
        assert rep["recall"] == (approx(rec[k]) if yi[:, k].any() else None)
        assert rep["ap"] == (approx(average_precision_score(yi[:, k], p[:, k])) if has_pos[k] else None)
        assert rep["auroc"] == (approx(roc_auc_score(yi[:, k], p[:, k])) if both[k] else None)


@fast
@given(labels_data, st.sampled_from([0.2, 0.5, 0.9]))
def test_multilabel_masked_matches_sklearn_on_known_rows(args, mask):
    seed, n, n_labels, ties = args
    y, p = multilabel_data(seed, n, n_labels, ties, mask)
    thresholds = np.full(n_labels, 0.5, dtype=np.float32)
    names = [f"l{k}" for k in range(n_labels)]
    out = multilabel_metrics(y, p, thresholds, names)
    json.dumps(out, allow_nan=False)
    known = ~np.isnan(y)

    aps, aucs, f1s = [], [], []
    for k, name in enumerate(names):
        yk, pk = y[known[:, k], k].astype(int), p[known[:, k], k]
        rep = out["per_label"][name]
        assert rep["support"] == int(yk.sum())
        if yk.any():
            aps.append(average_precision_score(yk, pk))
            assert rep["ap"] == approx(aps[-1])
        else:
            assert rep["ap"] is None
        if 0 < yk.sum() < yk.size:
            aucs.append(roc_auc_score(yk, pk))
            assert rep["auroc"] == approx(aucs[-1])
        else:
            assert rep["auroc"] is None
        if yk.any() or (pk >= 0.5).any():
            f1s.append(f1_score(yk, (pk >= 0.5).astype(int), zero_division=0))
            assert rep["f1"] == approx(f1s[-1])
        else:
            assert rep["f1"] is None
    for key, values in (("map", aps), ("macro_auroc", aucs), ("macro_f1", f1s)):
        assert out[key] == (approx(np.mean(values)) if values else None)

    yf, pf = y[known].astype(int), (p[known] >= 0.5).astype(int)  # every known entry, flattened
    if not known.any():
        assert out["hamming_loss"] is None and out["subset_accuracy"] is None and out["micro_f1"] is None
        return
    assert out["hamming_loss"] == approx(hamming_loss(yf, pf))
    assert out["micro_f1"] == (approx(f1_score(yf, pf, zero_division=0)) if yf.any() or pf.any() else None)
    rows = [accuracy_score(y[i, known[i]].astype(int), (p[i, known[i]] >= 0.5).astype(int)) == 1.0
            for i in range(n) if known[i].any()]
    assert out["subset_accuracy"] == approx(np.mean(rows))


def test_multilabel_rejects_mismatched_names():
    with pytest.raises(ValueError):
        multilabel_metrics(np.zeros((3, 2)), np.zeros((3, 2)), np.full(2, 0.5), ["only-one"])


# ---------------------------------------------------------------- regression

@fast
@given(seeds, st.integers(2, 200), st.integers(1, 6), st.sampled_from([0.0, 0.3, 0.95]))
def test_regression_matches_sklearn(seed, n, n_targets, mask):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, n_targets)) * rng.uniform(0.1, 100, size=n_targets)
    preds = y + rng.normal(size=(n, n_targets)) * rng.uniform(0.01, 50, size=n_targets)
    if n_targets > 1:  # a constant target, predicted exactly or not, and a constant prediction
        y[:, 0] = 2.0
        preds[:, 0] = 2.0 if seed % 2 else 2.0 + rng.normal(size=n)
        preds[:, 1] = 0.25
    y[rng.random(y.shape) < mask] = np.nan
    names = [f"t{k}" for k in range(n_targets)]
    out = regression_metrics(y, preds, names)
    json.dumps(out, allow_nan=False)

    means: dict[str, list[float]] = {"rmse": [], "mae": [], "r2": [], "pearson": []}
    for k, name in enumerate(names):
        known = ~np.isnan(y[:, k])
        yk, pk = y[known, k], preds[known, k]
        rep = out["per_target"][name]
        assert rep["count"] == int(known.sum())
        if yk.size == 0:
            assert rep["rmse"] is None and rep["mae"] is None
            continue
        ref = {"rmse": np.sqrt(mean_squared_error(yk, pk)), "mae": mean_absolute_error(yk, pk)}
        if yk.size >= 2:
            ref["r2"] = r2_score(yk, pk)
        if yk.size >= 2 and np.ptp(yk) > 0 and np.ptp(pk) > 0:
            ref["pearson"] = np.corrcoef(yk, pk)[0, 1]
            assert ref["pearson"] == approx(pearsonr(yk, pk).statistic)
        for key in means:
            if key in ref:
                assert rep[key] == approx(ref[key]), key
                means[key].append(ref[key])
            else:
                assert rep[key] is None, key
    for key, values in means.items():
        assert out[key] == (approx(np.mean(values)) if values else None)


def test_regression_constant_target_follows_sklearn():
    y = np.array([[3.0, 1.0], [3.0, 2.0], [3.0, np.nan]])
    exact = regression_metrics(y, np.array([[3.0, 1.0], [3.0, 2.0], [3.0, 5.0]]), ["c", "v"])
    assert exact["per_target"]["c"]["r2"] == 1.0 == r2_score(y[:, 0], y[:, 0])
    assert exact["per_target"]["c"]["pearson"] is None
    assert exact["per_target"]["v"] == {"rmse": 0.0, "mae": 0.0, "r2": 1.0, "pearson": 1.0, "count": 2}
    off = regression_metrics(y, np.array([[3.0, 1.0], [3.5, 2.0], [3.0, 0.0]]), ["c", "v"])
    assert off["per_target"]["c"]["r2"] == 0.0 == r2_score(y[:, 0], [3.0, 3.5, 3.0])
    one = regression_metrics(np.array([[1.0], [np.nan]]), np.array([[2.0], [0.0]]), ["x"])
    assert one["per_target"]["x"] == {"rmse": 1.0, "mae": 1.0, "r2": None, "pearson": None, "count": 1}
    assert one["r2"] is None and one["rmse"] == 1.0
