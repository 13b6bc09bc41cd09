"""Multi-label and regression tasks, unit by unit: losses against the formulas PyTorch and timm document,
masked (unknown) targets ignored exactly, mixing and smoothing of multi-hot targets, the task record,
thresholds placed so decisions survive rounding, and the table cells that become targets."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnpipe.tasks import Task, TaskError
from cnnpipe.tasks.losses import (
    asymmetric_loss,
    binary_cross_entropy,
    masked_mean,
    mix_targets,
    pos_weight_vector,
    regression_loss,
    smooth_multi_hot,
)
from cnnpipe.tasks.metrics import fit_threshold, fit_thresholds
from cnnpipe.tasks.targets import TargetError, flag_value, list_labels, number_value, split_labels

fast = settings(max_examples=30, deadline=None, derandomize=True)


def _data(seed: int, n: int = 12, labels: int = 4, unknown: float = 0.25):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, labels)).astype(np.float32)
    y = (rng.random((n, labels)) < 0.4).astype(np.float32)
    y[rng.random((n, labels)) < unknown] = np.nan
    return logits, y


def _torch_bce(x: np.ndarray, y: np.ndarray, pw: np.ndarray) -> np.ndarray:
    """BCEWithLogitsLoss(pos_weight=pw, reduction="none") as PyTorch documents it, in float64:
    l = -[pw * y * log(sigmoid(x)) + (1 - y) * log(1 - sigmoid(x))]."""
    x = x.astype(np.float64)
    s = 1.0 / (1.0 + np.exp(-x))
    return -(pw * y * np.log(s) + (1.0 - y) * np.log(1.0 - s))


@fast
@given(st.integers(0, 10_000))
def test_bce_with_pos_weight_is_pytorchs_formula_over_the_known_entries(seed):
    x, y = _data(seed)
    pw = np.random.default_rng(seed).uniform(0.2, 5, y.shape[1]).astype(np.float32)
    known = ~np.isnan(y)
    ref = _torch_bce(x, np.nan_to_num(y), pw)[known].mean()
    got = float(masked_mean(binary_cross_entropy(jnp.asarray(x), jnp.asarray(y), jnp.asarray(pw)), jnp.asarray(y)))
    assert got == pytest.approx(ref, rel=1e-5)
    plain = float(masked_mean(binary_cross_entropy(jnp.asarray(x), jnp.asarray(y)), jnp.asarray(y)))
    assert plain == pytest.approx(_torch_bce(x, np.nan_to_num(y), 1.0)[known].mean(), rel=1e-5)


def test_an_unknown_target_changes_neither_the_loss_nor_its_gradient():
    import jax

    x, y = _data(3, unknown=0.0)
    masked = y.copy()
    masked[0, 1] = masked[4, 2] = np.nan
    keep = ~np.isnan(masked)

    def loss(logits, targets):
        return masked_mean(binary_cross_entropy(logits, targets), targets)

    g = np.asarray(jax.grad(loss)(jnp.asarray(x), jnp.asarray(masked)))
    assert g[0, 1] == 0.0 and g[4, 2] == 0.0   # no gradient through an unknown label
    assert float(loss(jnp.asarray(x), jnp.asarray(masked))) == pytest.approx(
        _torch_bce(x, y, 1.0)[keep].mean(), rel=1e-5)   # the mean over the known entries only


def _timm_asl(x: np.ndarray, y: np.ndarray, gamma_neg=4.0, gamma_pos=1.0, clip=0.05, eps=1e-8) -> np.ndarray:
    """timm.loss.AsymmetricLossMultiLabel.forward, transcribed to NumPy element by element (timm sums them)."""
    xs_pos = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    xs_neg = np.minimum(1.0 - xs_pos + clip, 1.0)
    los_pos = y * np.log(np.maximum(xs_pos, eps))
    los_neg = (1 - y) * np.log(np.maximum(xs_neg, eps))
    loss = los_pos + los_neg
    pt = xs_pos * y + xs_neg * (1 - y)
    w = np.power(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
    return -(loss * w)


def test_asymmetric_loss_is_timms_with_its_defaults():
    x, y = _data(7, unknown=0.0)
    got = np.asarray(asymmetric_loss(jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(got, _timm_asl(x, y), rtol=2e-5, atol=1e-7)


def test_regression_losses_are_their_formulas_and_skip_missing_values():
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=(9, 2)).astype(np.float32), rng.normal(size=(9, 2)).astype(np.float32)
    t[2, 0] = np.nan
    known = ~np.isnan(t)
    d = (p - np.nan_to_num(t))[known].astype(np.float64)
    for name, ref in (("mse", d * d), ("mae", np.abs(d)),
                      ("huber", np.where(np.abs(d) <= 1, 0.5 * d * d, np.abs(d) - 0.5))):
        got = float(masked_mean(regression_loss(name, jnp.asarray(p), jnp.asarray(t)), jnp.asarray(t)))
        assert got == pytest.approx(ref.mean(), rel=1e-5), name


def test_pos_weight_auto_is_negatives_over_positives_clipped():
    y = np.array([[1, 0, np.nan], [0, 0, 1], [0, 0, 1], [0, np.nan, 1]], np.float32)
    w = pos_weight_vector("auto", y, ["a", "b", "c"])
    # a: 3 negatives / 1 positive; b: no positive, 1; c: no negative, clipped at 1/100
    assert w.tolist() == pytest.approx([3.0, 1.0, 1 / 100])
    assert pos_weight_vector({"b": 2.5}, y, ["a", "b", "c"]).tolist() == [1.0, 2.5, 1.0]
    assert pos_weight_vector(None, y, ["a", "b", "c"]) is None


def test_mixed_targets_blend_and_stay_unknown_where_a_contributor_is():
    y = jnp.asarray([[1.0, np.nan, 0.0], [0.0, 1.0, 1.0]])
    lam = jnp.asarray([0.75, 1.0])   # image 1 keeps itself whole: its partner's unknown does not touch it
    mixed = np.asarray(mix_targets(y, lam))
    assert mixed[0, 0] == pytest.approx(0.75) and np.isnan(mixed[0, 1]) and mixed[0, 2] == pytest.approx(0.25)
    assert mixed[1].tolist() == [0.0, 1.0, 1.0]
    smoothed = np.asarray(smooth_multi_hot(y, 0.1))
    assert smoothed[1].tolist() == pytest.approx([0.05, 0.95, 0.95]) and np.isnan(smoothed[0, 1])


def test_task_record_standardisation_and_outputs_round_trip():
    t = Task("regression", ("count", "area")).with_target_stats(
        np.array([[1.0, 10.0], [3.0, np.nan], [5.0, 30.0]], np.float32))
    assert t.target_mean == pytest.approx((3.0, 20.0)) and t.target_std == pytest.approx((math.sqrt(8 / 3), 10.0))
    back = Task.from_meta({"classes": ["count", "area"], "task": t.record()})
    assert back == t
    y = jnp.asarray([[2.0, 25.0]])
    np.testing.assert_allclose(np.asarray(t.outputs(t.standardise(y))), [[2.0, 25.0]], rtol=1e-6)
    assert Task.from_meta({"classes": ["a", "b"]}).is_classification
    with pytest.raises(TaskError, match="task"):
        Task("ranking")


@fast
@given(st.integers(0, 10_000), st.booleans())
def test_fitted_thresholds_give_the_fitted_decisions_and_sit_between_scores(seed, ties):
    rng = np.random.default_rng(seed)
    p = rng.random((40, 3)).astype(np.float32)
    if ties:
        p = np.round(p, 1).astype(np.float32)
    y = (rng.random((40, 3)) < 0.4).astype(np.float32)
    y[rng.random((40, 3)) < 0.1] = np.nan
    thresholds, fallback = fit_thresholds(y, p)
    for j in range(3):
        if j in fallback:
            continue
        known = ~np.isnan(y[:, j])
        t_score, _ = fit_threshold(y[known, j], p[known, j])
        decided = p[known, j] >= thresholds[j]
        assert (decided == (p[known, j] >= t_score)).all()
        below = p[known, j][p[known, j] < t_score]
        if below.size:   # strictly above the next lower score: a rounding error cannot flip it
            assert thresholds[j] > below.max()


def test_target_cells():
    assert split_labels("Effusion|Atelectasis", "|") == {"Effusion", "Atelectasis"}
    assert split_labels(" a  b ", " ") == {"a", "b"} and split_labels(None, "|") == frozenset()
    assert list_labels('["water", "forest"]') == {"water", "forest"} and list_labels("[]") == frozenset()
    with pytest.raises(TargetError):
        list_labels('{"a": 1}')
    assert [flag_value(v) for v in ("1", "0.0", "True", "no")] == [1.0, 0.0, 1.0, 0.0]
    assert all(math.isnan(flag_value(v)) for v in (None, "-1", "-1.0", "uncertain"))
    with pytest.raises(TargetError, match="'2'"):
        flag_value("2")
    assert number_value("3.25") == 3.25 and math.isnan(number_value(None))
    for bad in ("abc", "inf", "nan", "1_000", "1,5", "\u0661\u0662"):   # float() takes the last three
        with pytest.raises(TargetError):
            number_value(bad)
