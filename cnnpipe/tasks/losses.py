"""The training losses of multi-label and regression tasks, with unknown targets masked.

Targets are float32 (N, outputs) with NaN for an unknown label or a missing value; a
mixed image's target is its pair's blend (`cnnpipe.training.loss.mix_like`), unknown
where either was. Every loss here is the mean over the known entries of the batch, so
its scale (and the learning rate's meaning) does not change with the batch size, the
number of labels or how many are unknown.

- `binary_cross_entropy`: PyTorch's ``BCEWithLogitsLoss(pos_weight=...)``:
  ``-[p_w * y * log(sigmoid(x)) + (1 - y) * log(1 - sigmoid(x))]`` per entry (optax's
  sigmoid_binary_cross_entropy when p_w = 1).
- `asymmetric_loss`: timm's ``AsymmetricLossMultiLabel`` (Ridnik et al. 2021, "Asymmetric
  Loss For Multi-Label Classification") with its defaults gamma_neg=4, gamma_pos=1,
  clip=0.05, eps=1e-8; timm sums over the batch, here it is the mean (see above).
- `regression_loss`: mse, mae or huber (delta 1, optax's ``huber_loss``), on standardised targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["binary_cross_entropy", "asymmetric_loss", "regression_loss", "masked_mean", "pos_weight_vector",
           "smooth_multi_hot", "mix_targets", "AUTO_POS_WEIGHT_MAX"]

AUTO_POS_WEIGHT_MAX = 100.0   # `pos_weight: auto` clips negatives/positives to [1/100, 100]


def masked_mean(per_entry: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean of `per_entry` (N, L) over the entries whose target is known (not NaN), each row weighted by
    `weights` (N,) if given (padding rows: 0); 0 when nothing is known."""
    known = ~jnp.isnan(targets)
    w = known.astype(jnp.float32) if weights is None else known * weights[:, None].astype(jnp.float32)
    return jnp.sum(jnp.where(known, per_entry, 0.0) * w) / jnp.maximum(jnp.sum(w), 1.0)


def binary_cross_entropy(logits: jax.Array, targets: jax.Array, pos_weight: jax.Array | None = None) -> jax.Array:
    """Per-entry (N, L) binary cross-entropy with logits; `pos_weight` (L,) multiplies the positive term
    (PyTorch's ``BCEWithLogitsLoss(pos_weight=)``). Unknown (NaN) targets give 0, not NaN."""
    x = logits.astype(jnp.float32)
    y = jnp.nan_to_num(targets, nan=0.0)
    if pos_weight is None:
        return optax.sigmoid_binary_cross_entropy(x, y)
    # log(sigmoid(x)) and log(1 - sigmoid(x)) = log(sigmoid(-x)), stable for large |x|
    return -(pos_weight * y * jax.nn.log_sigmoid(x) + (1.0 - y) * jax.nn.log_sigmoid(-x))


def asymmetric_loss(logits: jax.Array, targets: jax.Array, gamma_neg: float = 4.0, gamma_pos: float = 1.0,
                    clip: float = 0.05, eps: float = 1e-8) -> jax.Array:
    """Per-entry (N, L) asymmetric loss, timm's ``AsymmetricLossMultiLabel.forward`` entry by entry:
    the negative probability shifted by `clip`, then focusing ``(1 - p_t) ** gamma`` (gamma_pos for
    positives, gamma_neg for negatives; the focusing weight carries no gradient, timm's default)."""
    y = jnp.nan_to_num(targets, nan=0.0)
    p = jax.nn.sigmoid(logits.astype(jnp.float32))
    p_neg = jnp.minimum(1.0 - p + clip, 1.0) if clip > 0 else 1.0 - p
    loss = y * jnp.log(jnp.maximum(p, eps)) + (1.0 - y) * jnp.log(jnp.maximum(p_neg, eps))
    pt = p * y + p_neg * (1.0 - y)
    gamma = gamma_pos * y + gamma_neg * (1.0 - y)
    focus = jax.lax.stop_gradient(jnp.power(1.0 - pt, gamma))
    return -loss * focus


def regression_loss(name: str, predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-entry (N, T) loss `name` (mse, mae, huber) of standardised predictions; NaN targets give 0."""
    diff = predictions.astype(jnp.float32) - jnp.nan_to_num(targets, nan=0.0)
    if name == "mse":
        return diff * diff
    if name == "mae":
        return jnp.abs(diff)
    if name == "huber":
        return optax.huber_loss(diff, delta=1.0)
    raise ValueError(f"train.loss: got {name!r}; expected mse, mae or huber")


def mix_targets(targets: jax.Array, lam: jax.Array) -> jax.Array:
    """Targets (N, L) mixed as `cnnpipe.training.loss.mix_batch` mixed their images (image i with N-1-i,
    own share `lam` (N,)): ``lam * y_i + (1 - lam) * y_partner``; unknown (NaN) where an image's own
    target is unknown, or its partner's is and the partner contributed (lam < 1)."""
    own, other = targets, targets[::-1]
    share = lam[:, None]
    mixed = share * jnp.nan_to_num(own) + (1.0 - share) * jnp.nan_to_num(other)
    unknown = jnp.isnan(own) | (jnp.isnan(other) & (share < 1.0))
    return jnp.where(unknown, jnp.nan, mixed)


def smooth_multi_hot(targets: jax.Array, smoothing: float) -> jax.Array:
    """Label smoothing of binary targets: ``y * (1 - s) + s / 2`` (each label a two-class problem, as
    timm's BinaryCrossEntropy smooths); unknown entries stay NaN."""
    return targets * (1.0 - smoothing) + smoothing / 2.0


def pos_weight_vector(spec: str | Mapping[str, float] | None, train_targets: np.ndarray,
                      names: Sequence[str]) -> np.ndarray | None:
    """``train.pos_weight`` as float32 (L,), or None (unweighted).

    "auto": negatives / positives of each label among the training split's known entries,
    clipped to [1/AUTO_POS_WEIGHT_MAX, AUTO_POS_WEIGHT_MAX] (a label without positives gets 1).
    A mapping names labels; the ones it leaves out weigh 1.
    """
    if spec is None:
        return None
    weights = np.ones(len(names), np.float32)
    if spec == "auto":
        y = np.asarray(train_targets, np.float64)
        pos, neg = np.nansum(y == 1, 0), np.nansum(y == 0, 0)
        ratio = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
        return np.clip(ratio, 1.0 / AUTO_POS_WEIGHT_MAX, AUTO_POS_WEIGHT_MAX).astype(np.float32)
    for name, w in spec.items():
        weights[list(names).index(name)] = w
    return weights
