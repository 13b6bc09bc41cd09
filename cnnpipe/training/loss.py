"""The training loss: class weights, label smoothing, mixup and cutmix.

`class_weight_vector` turns ``train.class_weights`` into one weight per class;
`mix_batch` blends images with a partner (timm's Mixup in its per-image "elem" mode:
image i with image N-1-i); `weighted_cross_entropy` is the loss of the train step.

With class weights the loss is the weighted mean ``sum(w_i * l_i) / sum(w_i)``,
``w_i`` the weight of image i's class (PyTorch's ``CrossEntropyLoss(weight=...)``),
so the loss keeps its scale and the learning rate its meaning; a mixed image's
weight and target are its two classes' in the mixing proportion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnpipe.training.augment import image_keys

__all__ = ["class_weight_vector", "soft_targets", "mix_batch", "mix_like", "weighted_cross_entropy", "describe_weights"]

_MIX_KEY = 11   # the per-image key's id for mixing (augment's ops use 1-10)


def class_weight_vector(spec: str | Mapping[str, float] | None, labels: np.ndarray,
                        classes: Sequence[str]) -> np.ndarray | None:
    """``train.class_weights`` as float32 (num_classes,), or None for unweighted.

    "auto": inverse class frequency in `labels` (the training split), normalised to
    mean 1 over the classes it holds (a class without training images gets 1). A
    mapping names classes; the ones it leaves out weigh 1 (Keras's ``class_weight``).
    Raises ValueError for a class name the data does not have, or weights all zero.
    """
    if spec is None:
        return None
    k = len(classes)
    if spec == "auto":
        counts = np.bincount(np.asarray(labels, np.int64), minlength=k).astype(np.float64)
        present = counts > 0
        inv = np.where(present, 1.0 / np.maximum(counts, 1), 0.0)
        weights = np.where(present, inv / inv[present].mean(), 1.0)
        return weights.astype(np.float32)
    weights = np.ones(k, np.float32)
    for name, w in spec.items():
        if name not in classes:
            raise ValueError(f"train.class_weights: no class {name!r} in the data (classes: "
                             f"{', '.join(classes)})")
        weights[list(classes).index(name)] = w
    if not weights.any():
        raise ValueError("train.class_weights: every weight is 0; nothing would be learned")
    return weights


def describe_weights(weights: np.ndarray, classes: Sequence[str], limit: int = 12) -> str:
    """E.g. "a 3.21, b 0.35, ..." for the log (the first `limit` classes)."""
    parts = [f"{c} {w:.3g}" for c, w in zip(classes, weights)]
    return ", ".join(parts[:limit]) + (f", ... ({len(parts)} classes)" if len(parts) > limit else "")


def soft_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """One-hot (N, K) float32 targets, `smoothing` spread evenly (timm: ``1 - s + s / K`` on the label)."""
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return one_hot * (1.0 - smoothing) + smoothing / num_classes


def _cut_box(key: jax.Array, lam: jax.Array, h: int, w: int) -> tuple[jax.Array, jax.Array]:
    """(mask (H, W, 1) of the pasted box, the partner's share of the area); timm's rand_bbox."""
    cut = jnp.sqrt(1.0 - lam)
    ch, cw = (h * cut).astype(jnp.int32), (w * cut).astype(jnp.int32)
    ky, kx = jax.random.split(key)
    cy, cx = jax.random.randint(ky, (), 0, h), jax.random.randint(kx, (), 0, w)
    y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
    x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
    rows, cols = jnp.arange(h)[:, None, None], jnp.arange(w)[None, :, None]
    mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    return mask, ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)


def mix_batch(images: jax.Array, key: jax.Array, *, mixup: float, cutmix: float) -> tuple[jax.Array, jax.Array]:
    """Mixup and/or cutmix of a batch (N, H, W, C): (mixed images, each image's own share `lam` (N,)).

    Image i is mixed with image N-1-i in proportion ``lam ~ Beta(alpha, alpha)``,
    drawn per image (timm's "elem" mode). With both on, each image takes one of the
    two at random (timm's switch probability 0.5). Cutmix pastes a box of the partner
    and sets ``lam`` to the area actually kept. Mixup rounds the blend back to the
    images' dtype (integers stay integers; at most half a unit off; where one float image has no
    data, NaN, the other's value is taken). Targets and
    weights follow with `mix_like`. With both off: the images and ``lam = 1``.
    """
    if not (mixup or cutmix):
        return images, jnp.ones(images.shape[:1], jnp.float32)
    keys = image_keys(key, images.shape[0])
    h, w = images.shape[1], images.shape[2]

    def one(x: jax.Array, other: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        k_choose, k_mix, k_cut, k_box = jax.random.split(jax.random.fold_in(k, _MIX_KEY), 4)
        use_cut = jnp.asarray(bool(cutmix)) if not (mixup and cutmix) else jax.random.bernoulli(k_choose)
        lam_mix = jax.random.beta(k_mix, mixup, mixup) if mixup else jnp.float32(1.0)
        lam_cut = jax.random.beta(k_cut, cutmix, cutmix) if cutmix else jnp.float32(1.0)
        mask, area = _cut_box(k_box, lam_cut, h, w)
        blend = x.astype(jnp.float32) * lam_mix + other.astype(jnp.float32) * (1 - lam_mix)
        if jnp.issubdtype(x.dtype, jnp.integer):
            blend = jnp.round(blend)
        else:   # no data in one image is not no data in the blend: the other image's value stands
            blend = jnp.where(jnp.isnan(x), other, jnp.where(jnp.isnan(other), x, blend))
        mixed = jnp.where(use_cut, jnp.where(mask, other, x), blend.astype(x.dtype))
        return mixed, jnp.where(use_cut, 1.0 - area, lam_mix).astype(jnp.float32)

    return jax.vmap(one)(images, images[::-1], keys)


def mix_like(values: jax.Array, lam: jax.Array) -> jax.Array:
    """Per-image `values` (N, ...) mixed as `mix_batch` mixed the images: ``lam * v + (1 - lam) * v[::-1]``."""
    lam = lam.reshape(lam.shape + (1,) * (values.ndim - 1))
    return lam * values + (1 - lam) * values[::-1]


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None) -> jax.Array:
    """Mean softmax cross-entropy of `logits` (N, K) against soft `targets` (N, K);
    weighted by `weights` (N,) as ``sum(w * l) / sum(w)`` when given."""
    per_image = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    if weights is None:
        return per_image.mean()
    return jnp.sum(per_image * weights) / jnp.maximum(jnp.sum(weights), 1e-12)
