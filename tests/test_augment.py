"""Device augmentation, mixing, class weights and test-time augmentation (cnnpipe.training.augment, .loss).

Property tests over the images users have: 8- and 16-bit, 1 to 5 planes, sizes from 1x1;
references are numpy's own rot90/flip, a per-pixel bilinear loop and the formulas the
docstrings state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnpipe.config import AugmentConfig, RandomResizedCropConfig
from cnnpipe.datasets.batches import balanced_order
from cnnpipe.models.cnn import build_model
from cnnpipe.training.augment import (
    OP_NAMES,
    VIEWS,
    adjust_brightness,
    adjust_contrast,
    adjust_gamma,
    apply_op,
    augment_batch,
    image_keys,
    pixel_normal,
    resized_crop,
    tta_views,
)
from cnnpipe.training.loss import class_weight_vector, mix_batch, mix_like, soft_targets, weighted_cross_entropy
from cnnpipe.training.steps import predict_probs

# each op at a strength that changes images, and at the strength that must leave them alone
ON = {"random_resized_crop": RandomResizedCropConfig(scale=(0.3, 0.9)), "crop_padding": 2, "flip": True,
      "vflip": True, "rot90": True, "brightness": 0.5, "contrast": 0.5, "gamma": 0.5, "noise": 0.05,
      "random_erasing": 1.0}
OFF = {"crop_padding": 0, "brightness": 0.0, "contrast": 0.0, "gamma": 0.0, "noise": 0.0, "random_erasing": 0.0,
       # the whole image: all of its area at its own aspect ratio (w / h)
       "random_resized_crop": lambda h, w: RandomResizedCropConfig(scale=(1.0, 1.0), ratio=(w / h, w / h))}
SETTINGS = settings(max_examples=6, deadline=None)
# a few shapes, 1x1 up, so the jitted ops compile a few times rather than once per example
SHAPES = [(1, 1, 1), (1, 6, 3), (5, 3, 2), (7, 7, 5), (8, 8, 3)]


@st.composite
def batches(draw, square=False, min_side=1):
    """(4, H, W, C) uint8 or uint16 over the dtype's full range; 16-bit values well above 255."""
    dtype = draw(st.sampled_from([np.uint8, np.uint16]))
    h, w, c = draw(st.sampled_from([s for s in SHAPES if min(s[:2]) >= min_side and (s[0] == s[1] or not square)]))
    seed = draw(st.integers(0, 2**16))
    x = np.random.default_rng(seed).integers(0, np.iinfo(dtype).max, (4, h, w, c), endpoint=True)
    return x.astype(dtype)


def keys_for(n, seed=0):
    return image_keys(jax.random.PRNGKey(seed), n)


@pytest.mark.parametrize("name", OP_NAMES)
@SETTINGS
@given(data=st.data())
def test_each_op_keeps_dtype_shape_planes_and_range(name, data):
    x = data.draw(batches(square=name == "rot90"))
    out = np.asarray(apply_op(name, jnp.asarray(x), keys_for(len(x)), ON[name]))
    assert out.dtype == x.dtype and out.shape == x.shape
    # geometric ops move values, they never make new ones
    if name in ("flip", "vflip", "rot90"):
        for o, i in zip(out, x):
            assert sorted(o.ravel()) == sorted(i.ravel())


@pytest.mark.parametrize("name", sorted(OFF))
@SETTINGS
@given(data=st.data())
def test_each_op_is_the_identity_at_zero_strength(name, data):
    x = data.draw(batches())
    off = OFF[name](*x.shape[1:3]) if callable(OFF[name]) else OFF[name]
    out = np.asarray(apply_op(name, jnp.asarray(x), keys_for(len(x)), off))
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("name", OP_NAMES)
def test_each_op_draws_differently_for_each_image_of_a_batch(name):
    rng = np.random.default_rng(1)
    for dtype in (np.uint8, np.uint16):
        one = rng.integers(1, np.iinfo(dtype).max, (1, 12, 12, 3), endpoint=True).astype(dtype)
        x = np.repeat(one, 8, axis=0)   # eight copies of one image
        out = np.asarray(apply_op(name, jnp.asarray(x), keys_for(8), ON[name]))
        assert len({o.tobytes() for o in out}) > 1, f"{name}: every image got the same draw"
        again = np.asarray(apply_op(name, jnp.asarray(x), keys_for(8), ON[name]))
        np.testing.assert_array_equal(out, again)   # same key, same draw


@SETTINGS
@given(x=batches(square=True))
def test_flips_and_rot90_are_numpys(x):
    keys = keys_for(len(x))
    for name, allowed in (("flip", lambda i: [i, i[:, ::-1]]), ("vflip", lambda i: [i, i[::-1]]),
                          ("rot90", lambda i: [np.rot90(i, k) for k in range(4)])):
        out = np.asarray(apply_op(name, jnp.asarray(x), keys, True))
        for o, i in zip(out, x):
            assert any(np.array_equal(o, a) for a in allowed(i)), name


def bilinear_reference(x, top, left, h, w):
    """Half-pixel bilinear resize of the box to x's size, one output pixel at a time (float64)."""
    H, W, _ = x.shape
    out = np.zeros(x.shape, np.float64)
    for i in range(H):
        for j in range(W):
            y = min(max((i + 0.5) * h / H - 0.5, 0), h - 1)
            z = min(max((j + 0.5) * w / W - 0.5, 0), w - 1)
            y0, z0 = int(np.floor(y)), int(np.floor(z))
            y1, z1 = min(y0 + 1, h - 1), min(z0 + 1, w - 1)
            fy, fz = y - y0, z - z0
            px = lambda a, b: x[top + a, left + b].astype(np.float64)  # noqa: E731
            out[i, j] = ((1 - fy) * ((1 - fz) * px(y0, z0) + fz * px(y0, z1))
                         + fy * ((1 - fz) * px(y1, z0) + fz * px(y1, z1)))
    return out


@SETTINGS
@given(x=batches(min_side=2), data=st.data())
def test_resized_crop_is_bilinear_over_the_box(x, data):
    img = x[0]
    H, W, _ = img.shape
    h, w = data.draw(st.integers(1, H)), data.draw(st.integers(1, W))
    top, left = data.draw(st.integers(0, H - h)), data.draw(st.integers(0, W - w))
    out = np.asarray(resized_crop(jnp.asarray(img), jnp.int32(top), jnp.int32(left), jnp.int32(h), jnp.int32(w)))
    ref = bilinear_reference(img, top, left, h, w)
    assert np.abs(out.astype(np.float64) - ref).max() <= 0.5 + 1e-3 * np.iinfo(img.dtype).max / 255
    whole = resized_crop(jnp.asarray(img), jnp.int32(0), jnp.int32(0), jnp.int32(H), jnp.int32(W))
    np.testing.assert_array_equal(np.asarray(whole), img)


@SETTINGS
@given(x=batches(), f=st.floats(0.0, 2.0))
def test_intensity_ops_follow_their_formulas_in_the_datas_own_units(x, f):
    img = x[0]
    top = np.iinfo(img.dtype).max
    v = img.astype(np.float64)
    mean, peak = v.mean(axis=(0, 1)), np.maximum(v.max(axis=(0, 1)), 1)
    for op, ref in ((adjust_brightness, v * f), (adjust_contrast, (v - mean) * f + mean),
                    (adjust_gamma, peak * (v / peak) ** max(f, 0.05))):
        arg = max(f, 0.05) if op is adjust_gamma else f
        out = np.asarray(op(jnp.asarray(img), jnp.float32(arg))).astype(np.float64)
        # float32 arithmetic, rounded: within a unit of the exact value, clipped to the dtype
        assert np.abs(out - np.clip(ref, 0, top)).max() <= 1 + 2e-7 * top
    for op in (adjust_brightness, adjust_contrast, adjust_gamma):
        np.testing.assert_array_equal(np.asarray(op(jnp.asarray(img), jnp.float32(1.0))), img)


def test_16bit_values_survive_every_op():
    x = np.random.default_rng(3).integers(20000, 60000, (8, 10, 10, 2)).astype(np.uint16)
    cfg = AugmentConfig(**{k: v for k, v in ON.items()})
    out = np.asarray(augment_batch(jnp.asarray(x), jax.random.PRNGKey(0), cfg))
    assert out.dtype == np.uint16 and out.max() > 255 * 4 and len(np.unique(out)) > 1000


def test_pixel_noise_is_standard_normal_and_keyed():
    z = np.asarray(pixel_normal(jax.random.PRNGKey(0), (200, 200, 5)), np.float64).ravel()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    for k, share in ((1, 0.6827), (2, 0.9545), (3, 0.9973)):   # the normal's mass within k std
        assert abs(np.mean(np.abs(z) < k) - share) < 0.003
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.01   # neighbours independent
    np.testing.assert_array_equal(pixel_normal(jax.random.PRNGKey(0), (3, 4)), pixel_normal(jax.random.PRNGKey(0), (3, 4)))
    assert not np.array_equal(pixel_normal(jax.random.PRNGKey(0), (3, 4)), pixel_normal(jax.random.PRNGKey(1), (3, 4)))


def test_augment_batch_at_defaults_is_the_identity():
    x = np.random.default_rng(0).integers(0, 65535, (4, 5, 7, 3)).astype(np.uint16)
    np.testing.assert_array_equal(np.asarray(augment_batch(jnp.asarray(x), jax.random.PRNGKey(0),
                                                           AugmentConfig())), x)


# ---------------------------------------------------------------- mixup, cutmix, loss

@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixed_images_come_from_the_pair_and_targets_follow(mixup, cutmix):
    x = np.random.default_rng(0).integers(0, 65535, (8, 6, 6, 2)).astype(np.uint16)
    out, lam = mix_batch(jnp.asarray(x), jax.random.PRNGKey(5), mixup=mixup, cutmix=cutmix)
    out, lam = np.asarray(out), np.asarray(lam)
    assert out.dtype == np.uint16 and out.shape == x.shape and ((lam >= 0) & (lam <= 1)).all()
    partner = x[::-1].astype(np.float64)
    lo, hi = np.minimum(x, partner), np.maximum(x, partner)
    assert ((out >= lo - 0.5) & (out <= hi + 0.5)).all()   # between the two images
    if not mixup:   # cutmix: each pixel is one image's or the other's; lam is the share kept
        for o, a, b, share in zip(out, x, x[::-1], lam):
            from_self = (o == a).all(-1)
            assert ((o == a).all(-1) | (o == b).all(-1)).all()
            assert share == pytest.approx(from_self.mean(), abs=1 / 36 + 1e-6) or (a == b).all()
    t = mix_like(soft_targets(jnp.arange(8) % 3, 3, 0.0), jnp.asarray(lam))
    np.testing.assert_allclose(np.asarray(t).sum(-1), 1.0, rtol=1e-6)
    none, lam1 = mix_batch(jnp.asarray(x), jax.random.PRNGKey(5), mixup=0.0, cutmix=0.0)
    np.testing.assert_array_equal(np.asarray(none), x)
    assert (np.asarray(lam1) == 1).all()


def test_weighted_loss_is_plain_cross_entropy_with_equal_weights_and_pytorchs_weighted_mean():
    logits = jax.random.normal(jax.random.PRNGKey(0), (6, 4))
    labels = jnp.array([0, 1, 2, 3, 0, 1])
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    t = soft_targets(labels, 4, 0.0)
    np.testing.assert_allclose(weighted_cross_entropy(logits, t, None), plain.mean(), rtol=1e-6)
    np.testing.assert_allclose(weighted_cross_entropy(logits, t, jnp.full(6, 3.0)), plain.mean(), rtol=1e-6)
    w = jnp.array([2.0, 1.0, 0.5, 4.0])[labels]   # torch.nn.CrossEntropyLoss(weight=...): sum(w l) / sum(w)
    np.testing.assert_allclose(weighted_cross_entropy(logits, t, w), (w * plain).sum() / w.sum(), rtol=1e-6)
    smooth = soft_targets(labels, 4, 0.2)   # timm: 1 - s + s/K on the label, s/K elsewhere
    np.testing.assert_allclose(np.asarray(smooth)[0], [0.85, 0.05, 0.05, 0.05], rtol=1e-6)


def test_class_weights_auto_named_and_wrong():
    labels = np.array([0] * 10 + [1] * 30 + [2] * 60)
    auto = class_weight_vector("auto", labels, ["a", "b", "c"])
    assert auto.mean() == pytest.approx(1.0)
    assert auto[0] / auto[2] == pytest.approx(6.0) and auto[1] / auto[2] == pytest.approx(2.0)
    absent = class_weight_vector("auto", np.array([0, 0, 1]), ["a", "b", "c"])
    assert absent[2] == 1.0 and absent[:2].mean() == pytest.approx(1.0)
    np.testing.assert_array_equal(class_weight_vector({"b": 3.0}, labels, ["a", "b", "c"]), [1.0, 3.0, 1.0])
    assert class_weight_vector(None, labels, ["a", "b", "c"]) is None
    with pytest.raises(ValueError, match="no class 'z'.*a, b, c"):
        class_weight_vector({"z": 2.0}, labels, ["a", "b", "c"])
    with pytest.raises(ValueError, match="every weight is 0"):
        class_weight_vector({"a": 0, "b": 0, "c": 0}, labels, ["a", "b", "c"])


def test_balanced_sampler_draws_classes_equally_and_deterministically():
    labels = np.array([0] * 10 + [1] * 90 + [2] * 900)
    order = np.concatenate([balanced_order(0, e, labels) for e in range(20)])
    share = np.bincount(labels[order], minlength=3) / len(order)
    np.testing.assert_allclose(share, 1 / 3, atol=0.02)
    np.testing.assert_array_equal(balanced_order(0, 3, labels), balanced_order(0, 3, labels))
    assert not np.array_equal(balanced_order(0, 3, labels), balanced_order(0, 4, labels))


# ---------------------------------------------------------------- test-time augmentation

def test_views_are_the_eight_symmetries_of_the_square_as_numpy_writes_them():
    x = np.random.default_rng(0).integers(0, 255, (2, 5, 5, 1))
    ref = {"identity": x, "hflip": x[:, :, ::-1], "vflip": x[:, ::-1], "rot180": np.rot90(x, 2, (1, 2)),
           "rot90": np.rot90(x, 1, (1, 2)), "rot270": np.rot90(x, 3, (1, 2)), "transpose": x.transpose(0, 2, 1, 3),
           "antitranspose": np.rot90(x, 1, (1, 2))[:, :, ::-1]}
    assert set(ref) == set(VIEWS)
    for name, want in ref.items():
        np.testing.assert_array_equal(np.asarray(VIEWS[name](jnp.asarray(x))), want, err_msg=name)
    assert len({np.asarray(VIEWS[n](jnp.asarray(x))).tobytes() for n in VIEWS}) == 8
    assert tta_views(AugmentConfig()) == ("identity",)   # nothing the run did not learn
    assert tta_views(AugmentConfig(flip=True)) == ("identity", "hflip")
    assert tta_views(AugmentConfig(vflip=True)) == ("identity", "vflip")
    assert tta_views(AugmentConfig(flip=True, vflip=True)) == ("identity", "hflip", "vflip", "rot180")
    assert tta_views(AugmentConfig(rot90=True)) == ("identity", "rot90", "rot180", "rot270")
    assert len(tta_views(AugmentConfig(rot90=True, vflip=True))) == 8


def test_tta_on_a_model_symmetric_by_construction_equals_no_tta():
    # 1x1 convolutions then a global average: every flip and rotation gives the same logits
    layers = [{"type": "conv", "filters": 8, "kernel": 1}, {"type": "relu"}, {"type": "global_avg_pool"}]
    model = build_model(layers, in_channels=3, num_classes=4, input_size=(6, 6), bit_depth=8, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = np.random.default_rng(0).integers(0, 255, (5, 6, 6, 3)).astype(np.float32)
    plain = np.asarray(predict_probs(graphdef, (state,), x, ()))
    for cfg in (AugmentConfig(flip=True), AugmentConfig(rot90=True, flip=True)):
        np.testing.assert_allclose(np.asarray(predict_probs(graphdef, (state,), x, tta_views(cfg))), plain,
                                   rtol=1e-6, atol=1e-7)
    # a model that sees position does change under TTA (the check above is not vacuous)
    conv = [{"type": "conv", "filters": 4, "kernel": 3}, {"type": "flatten"}]
    graphdef, state = nnx.split(build_model(conv, in_channels=3, num_classes=4, input_size=(6, 6), bit_depth=8,
                                            rngs=nnx.Rngs(0)))
    assert not np.allclose(predict_probs(graphdef, (state,), x, ()),
                           predict_probs(graphdef, (state,), x, tta_views(AugmentConfig(rot90=True, flip=True))))
