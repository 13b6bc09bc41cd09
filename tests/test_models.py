"""Layers against hand-computed answers, the CPU conv path against lax, gradients, presets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.test_util import check_grads

from cnnpipe.models.cnn import (
    CNN,
    PRESETS,
    Conv,
    avg_pool,
    build_model,
    count_params,
)

GRID = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)   # 1 2 3 / 4 5 6 / 7 8 9


def conv(x, k, stride=1, padding="SAME", bias=None):
    """cnnpipe's Conv layer with the given kernel (and bias)."""
    layer = Conv(k.shape[2], k.shape[3], k.shape[:2], stride, padding, use_bias=bias is not None,
                 rngs=nnx.Rngs(0))
    layer.kernel = nnx.Param(k)   # a new Param keeps k's dtype (float64 in the x64 checks)
    if bias is not None:
        layer.bias = nnx.Param(bias)
    return layer(x)


def lax_conv(x, k, stride=1, padding="SAME"):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


# ---------------------------------------------------------------- pooling

def test_max_pool_of_arange_written_out():
    x = jnp.arange(36.0).reshape(1, 6, 6, 1)
    expected = [[7, 9, 11], [19, 21, 23], [31, 33, 35]]   # bottom-right of each 2x2 block
    np.testing.assert_array_equal(max_pool_nhwc(x, 2)[0, :, :, 0], expected)


def test_avg_pool_of_arange_written_out():
    x = jnp.arange(36.0).reshape(1, 6, 6, 1)
    # block (a, b) holds 12a+2b + {0, 1, 6, 7}: mean 12a + 2b + 3.5
    expected = [[3.5, 5.5, 7.5], [15.5, 17.5, 19.5], [27.5, 29.5, 31.5]]
    np.testing.assert_array_equal(avg_pool(x, 2)[0, :, :, 0], expected)


def test_max_pool_window_3_and_overlapping_fallback():
    x = jnp.arange(36.0).reshape(1, 6, 6, 1)
    np.testing.assert_array_equal(max_pool_nhwc(x, 3)[0, :, :, 0], [[14, 17], [32, 35]])
    y = jnp.arange(16.0).reshape(1, 4, 4, 1)   # window 3, stride 1: reduce_window path
    np.testing.assert_array_equal(max_pool_nhwc(y, 3, 1)[0, :, :, 0], [[10, 11], [14, 15]])
    np.testing.assert_array_equal(avg_pool(y, 3, 1)[0, :, :, 0], [[5, 6], [9, 10]])


def max_pool_nhwc(x, window, stride=None):
    from cnnpipe.models.cnn import max_pool
    return max_pool(x, window, stride)


@pytest.mark.parametrize("shape,window,stride", [((2, 8, 8, 3), 2, 2), ((1, 6, 9, 2), 3, 3),
                                                 ((2, 7, 7, 1), 2, 2), ((1, 8, 8, 4), 3, 2)])
def test_pools_equal_reduce_window_reference(shape, window, stride):
    x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
    dims, strides = (1, window, window, 1), (1, stride, stride, 1)
    ref_max = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, "VALID")
    ref_avg = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, "VALID") / window**2
    np.testing.assert_array_equal(max_pool_nhwc(x, window, stride), ref_max)
    np.testing.assert_allclose(avg_pool(x, window, stride), ref_avg, rtol=1e-6)


def test_max_pool_gradient_matches_reduce_window():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 4, 3)), jnp.float32)
    ref = jax.grad(lambda v: jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                                   (1, 2, 2, 1), "VALID").sum())(x)
    np.testing.assert_array_equal(jax.grad(lambda v: max_pool_nhwc(v, 2).sum())(x), ref)


# ---------------------------------------------------------------- convolution

def test_conv_ones_kernel_sums_neighbourhoods():
    k = jnp.ones((3, 3, 1, 1))
    np.testing.assert_array_equal(conv(GRID, k)[0, :, :, 0], [[12, 21, 16], [27, 45, 33], [24, 39, 28]])
    np.testing.assert_array_equal(conv(GRID, k, padding="VALID")[0, :, :, 0], [[45]])
    # stride 2, SAME: output 2x2, one pixel of padding each side, corners of the table above
    np.testing.assert_array_equal(conv(GRID, k, stride=2)[0, :, :, 0], [[12, 16], [24, 28]])


def test_conv_is_cross_correlation_not_convolution():
    k = jnp.zeros((3, 3, 1, 1)).at[0, 0, 0, 0].set(1.0)   # top-left tap: y[i, j] = x[i-1, j-1]
    np.testing.assert_array_equal(conv(GRID, k)[0, :, :, 0], [[0, 0, 0], [0, 1, 2], [0, 4, 5]])


def test_conv_layer_with_hand_set_kernel_and_channels():
    model = build_model([{"type": "conv", "filters": 2, "kernel": 3, "name": "c"}], in_channels=1,
                        num_classes=2, input_size=(3, 3), bit_depth=8, rngs=nnx.Rngs(0))
    c = model.layers[0]
    c.kernel[...] = jnp.stack([jnp.ones((3, 3, 1)), -jnp.ones((3, 3, 1))], axis=-1)
    c.bias[...] = jnp.array([1.0, 0.0])
    raw = GRID * 255   # the model divides 8-bit input by 255 itself
    _, feats = model.features(raw, ["c"])
    sums = np.array([[12, 21, 16], [27, 45, 33], [24, 39, 28]], np.float32)
    np.testing.assert_allclose(feats["c"][0, :, :, 0], sums + 1, rtol=1e-6)
    np.testing.assert_allclose(feats["c"][0, :, :, 1], -sums, rtol=1e-6)


@pytest.mark.parametrize("cin,cout,k,stride,padding", [(3, 4, 3, 1, "SAME"), (3, 5, 3, 2, "VALID"),
                                                       (8, 3, 5, 2, "SAME"), (4, 6, 1, 1, "SAME")])
def test_conv_layer_matches_lax_forward_and_gradients(cin, cout, k, stride, padding):
    # the layer's bias has a hand-written gradient (a matrix-vector product): check it
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 7, 8, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(cout,)), jnp.float32)
    ref = lambda x, w, b: lax_conv(x, w, stride, padding) + b  # noqa: E731
    np.testing.assert_allclose(conv(x, w, stride, padding, b), ref(x, w, b), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, w, b: jnp.sum(jnp.sin(f(x, w, b)))  # noqa: E731
    got = jax.grad(loss(lambda x, w, b: conv(x, w, stride, padding, b)), (0, 1, 2))(x, w, b)
    for g, r in zip(got, jax.grad(loss(ref), (0, 1, 2))(x, w, b)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_conv_gradients_numerically_in_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        x = jnp.asarray(rng.normal(size=(2, 5, 5, 3)))
        w = jnp.asarray(rng.normal(size=(3, 3, 3, 2)))
        b = jnp.asarray(rng.normal(size=(2,)))
        check_grads(lambda x, w, b: conv(x, w, 2, "SAME", b), (x, w, b), order=1, modes=("rev",))


# ---------------------------------------------------------------- loss gradients

def test_loss_gradient_matches_finite_differences_float64():
    with jax.enable_x64(True):
        model = build_model([{"type": "conv", "filters": 3, "kernel": 3}, {"type": "tanh"},
                             {"type": "avg_pool"}, {"type": "conv", "filters": 2, "kernel": 3},
                             {"type": "gelu"}, {"type": "max_pool"}, {"type": "dense", "units": 4},
                             {"type": "sigmoid"}],
                            in_channels=2, num_classes=3, input_size=(4, 4), bit_depth=16, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        rng = np.random.default_rng(5)
        x = jnp.asarray(rng.integers(0, 65536, (3, 4, 4, 2)), jnp.float64)
        y = jnp.array([0, 2, 1])

        def loss(p):
            logits = nnx.merge(graphdef, p, rest, copy=True)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        check_grads(jax.jit(loss), (params,), order=1, modes=("rev",), eps=1e-5)


def test_cross_entropy_known_value():
    # uniform logits over 4 classes: loss = log 4
    model = build_model([{"type": "global_avg_pool"}, {"type": "dense", "units": 4}], in_channels=1,
                        num_classes=4, input_size=(2, 2), bit_depth=8, rngs=nnx.Rngs(0))
    model.layers[1].kernel[...] = jnp.zeros_like(model.layers[1].kernel[...])
    logits = model(jnp.full((1, 2, 2, 1), 200, jnp.uint8))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([3]))
    np.testing.assert_allclose(loss, [np.log(4.0)], rtol=1e-6)


# ---------------------------------------------------------------- model structure

def abstract(spec, **kw):
    """The model with shapes only (nnx.eval_shape): no initialisation work."""
    return nnx.eval_shape(lambda: build_model(spec, rngs=nnx.Rngs(0), **kw))


def test_simple_cnn_param_count_pinned():
    model = abstract("simple_cnn", in_channels=3, num_classes=10, input_size=(32, 32), bit_depth=8)
    # conv1 3x3x3x16 + 16 = 448; conv2 3x3x16x32 + 32 = 4,640;
    # two 2x2 pools: 32x32 -> 8x8x32 = 2,048 features; dense1 2,048x64 + 64 = 131,136;
    # head 64x10 + 10 = 650.  Total 136,874.
    assert count_params(model) == 448 + 4640 + 131136 + 650 == 136874


def test_param_count_excludes_batch_norm_statistics():
    model = build_model([{"type": "conv", "filters": 4, "kernel": 1}, {"type": "batch_norm"}],
                        in_channels=1, num_classes=2, input_size=(4, 4), bit_depth=8, rngs=nnx.Rngs(0))
    # conv 1*4 = 4 (no bias: batch norm follows); bn scale + bias = 8; head (4*4*4)*2 + 2 = 130
    assert count_params(model) == 4 + 8 + 130
    assert model.layers[0].bias is None


def test_layer_and_feature_names_and_shapes():
    model = build_model("simple_cnn", in_channels=3, num_classes=10, input_size=(32, 32), bit_depth=8,
                        rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda st, x, names=None: nnx.merge(graphdef, st).features(x, names), static_argnums=2)
    assert model.layer_names == ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten1",
                                 "dense1", "relu3", "dense2"]
    assert model.feature_layer_names == ["conv1", "pool1", "conv2", "pool2"]
    x = jnp.zeros((2, 32, 32, 3), jnp.uint8)
    logits, feats = run(state, x)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert set(feats) == {"conv1", "relu1", "pool1", "conv2", "relu2", "pool2"}   # jit sorts dict keys
    assert feats["pool2"].shape == (2, 8, 8, 32)
    _, some = run(state, x, ("conv2", "dense1"))
    assert set(some) == {"conv2", "dense1"} and some["dense1"].shape == (2, 64)
    np.testing.assert_array_equal(jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, x), logits)


def test_unknown_feature_name_lists_available():
    model = abstract("lenet5", in_channels=1, num_classes=10, input_size=(28, 28), bit_depth=8)
    with pytest.raises(ValueError, match=r"unknown layer name 'conv3'; available: conv1, relu1, pool1"):
        model.features(jnp.zeros((1, 28, 28, 1)), ["conv3"])


def test_user_names_are_used():
    model = build_model([{"type": "conv", "filters": 2, "name": "edges"}, {"type": "relu"}], in_channels=1,
                        num_classes=2, input_size=(4, 4), bit_depth=8, rngs=nnx.Rngs(0))
    assert model.layer_names == ["edges", "relu1", "dense1"]


def test_explicit_head_is_not_duplicated():
    model = build_model([{"type": "flatten"}, {"type": "dense", "units": 3}], in_channels=1, num_classes=3,
                        input_size=(2, 2), bit_depth=8, rngs=nnx.Rngs(0))
    assert model.layer_names == ["flatten1", "dense1"]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_build_and_run(preset):
    model = build_model(preset, in_channels=3, num_classes=7, input_size=(16, 16), bit_depth=16,
                        rngs=nnx.Rngs(0))
    model.eval()
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, jnp.full((2, 16, 16, 3), 999, jnp.uint16))
    assert out.shape == (2, 7) and bool(jnp.all(jnp.isfinite(out)))


def test_resnet_small_has_residual_blocks():
    model = abstract("resnet_small", in_channels=3, num_classes=10, input_size=(32, 32), bit_depth=8)
    assert [n for n in model.layer_names if n.startswith("res")] == ["res1", "res2", "res3"]
    assert model.layers[4].proj is not None and model.layers[3].proj is None   # shape change -> 1x1 shortcut


def test_normalisation_uses_bit_depth_and_statistics():
    m8 = build_model([{"type": "flatten"}], in_channels=2, num_classes=2, input_size=(1, 1), bit_depth=8,
                     rngs=nnx.Rngs(0))
    m16 = build_model([{"type": "flatten"}], in_channels=2, num_classes=2, input_size=(1, 1), bit_depth=16,
                      rngs=nnx.Rngs(0))
    np.testing.assert_allclose(m8.normalize(jnp.array([[[[255, 51]]]], jnp.uint8)), [[[[1.0, 0.2]]]])
    np.testing.assert_allclose(m16.normalize(jnp.array([[[[65535, 13107]]]], jnp.uint16)), [[[[1.0, 0.2]]]])
    ms = build_model([{"type": "flatten"}], in_channels=2, num_classes=2, input_size=(1, 1), bit_depth=8,
                     rngs=nnx.Rngs(0), mean=[100.0, 10.0], std=[50.0, 5.0])
    np.testing.assert_allclose(ms.normalize(jnp.array([[[[200, 0]]]], jnp.uint8)), [[[[2.0, -2.0]]]])


def test_model_errors_name_the_problem():
    kw = dict(in_channels=3, num_classes=10, bit_depth=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"layer 5 \(pool2\).*shrinks to 0x0 for a 2x2 input"):
        build_model([{"type": "conv", "filters": 2}, {"type": "relu"}, {"type": "max_pool"},
                         {"type": "conv", "filters": 2}, {"type": "relu"}, {"type": "max_pool"}],
                        input_size=(2, 2), **kw)
    with pytest.raises(ValueError, match="already flattened"):
        build_model([{"type": "flatten"}, {"type": "conv", "filters": 2}], input_size=(4, 4), **kw)
    with pytest.raises(ValueError, match="bit_depth: got 12"):
        build_model("simple_cnn", input_size=(8, 8), in_channels=3, num_classes=2, bit_depth=12,
                    rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"std: got \[1.0, 0.0, 1.0\]"):
        build_model("simple_cnn", input_size=(8, 8), mean=[0, 0, 0], std=[1, 0, 1], **kw)
    model = build_model("simple_cnn", input_size=(8, 8), **kw)
    with pytest.raises(ValueError, match=r"got shape \(1, 8, 8, 1\); expected \(N, H, W, 3\)"):
        model(jnp.zeros((1, 8, 8, 1)))


def test_same_seed_same_parameters():
    a, b = (nnx.state(build_model("simple_cnn", in_channels=3, num_classes=4, input_size=(8, 8), bit_depth=8,
                                  rngs=nnx.Rngs(7)), nnx.Param) for _ in range(2))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert isinstance(abstract("simple_cnn", in_channels=1, num_classes=2, input_size=(8, 8), bit_depth=8), CNN)
