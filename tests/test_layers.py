"""The rewritten building blocks equal XLA's own ops (values and gradients) on random shapes.

`Conv` takes other routes than `lax.conv_general_dilated` for speed on XLA:CPU (im2col
for outputs of at most 4 positions, shifted sums for depthwise convs); the pools are
written as strided slices for ONNX. Each is checked here against the plain op, or
against PyTorch's definition written out with numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnpipe.models.layers import Conv, avg_pool_ceil, max_pool_padded


def _lax_conv(x, k, stride, padding, groups=1):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)


def _check_conv(conv: Conv, x: np.ndarray) -> None:
    graphdef, state = nnx.split(conv)
    kernel = conv.kernel[...]

    def ours(state, x):
        return (nnx.merge(graphdef, state)(x) ** 2).sum()

    def ref(k, x):
        return (_lax_conv(x, k, conv.stride[0], conv.padding, conv.groups) ** 2).sum()

    got = nnx.merge(graphdef, state)(x)
    want = _lax_conv(x, kernel, conv.stride[0], conv.padding, conv.groups)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    g_state, g_x = jax.grad(ours, argnums=(0, 1))(state, x)
    r_k, r_x = jax.grad(ref, argnums=(0, 1))(kernel, x)
    scale = float(jnp.abs(r_k).max()) + 1e-6
    np.testing.assert_allclose(np.asarray(g_state["kernel"][...]) / scale, np.asarray(r_k) / scale, atol=2e-5)
    np.testing.assert_allclose(np.asarray(g_x), np.asarray(r_x), rtol=2e-4, atol=2e-4 * float(jnp.abs(r_x).max()))


@settings(max_examples=4, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.sampled_from([1, 3]), st.integers(1, 2), st.integers(1, 6))
def test_small_output_convs_equal_xla(size, cin, k, stride, cout):
    """Outputs of at most 4 positions take the im2col route."""
    x = np.random.default_rng(size * 7 + cin).standard_normal((2, size, size, cin)).astype(np.float32)
    p = k // 2
    conv = Conv(cin, cout, (k, k), stride, ((p, p), (p, p)), use_bias=False, rngs=nnx.Rngs(size))
    _check_conv(conv, x)


@settings(max_examples=4, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 5), st.sampled_from([3, 7]))
def test_depthwise_convs_equal_xla(h, w, c, k):
    x = np.random.default_rng(h * 31 + w).standard_normal((2, h, w, c)).astype(np.float32)
    p = k // 2
    conv = Conv(c, c, (k, k), 1, ((p, p), (p, p)), groups=c, rngs=nnx.Rngs(c))
    conv.bias = None   # the kernel alone (the bias path is the plain one)
    _check_conv(conv, x)


def _torch_max_pool(x: np.ndarray) -> np.ndarray:
    """MaxPool2d(3, 2, padding=1) written out: -inf padding, every window's max."""
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return np.stack([np.stack([xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2)) for j in range(ow)], 1)
                     for i in range(oh)], 1)


def _torch_avg_pool_ceil(x: np.ndarray) -> np.ndarray:
    """AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) written out."""
    n, h, w, c = x.shape
    return np.stack([np.stack([x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
                               for j in range(-(-w // 2))], 1) for i in range(-(-h // 2))], 1)


@settings(max_examples=6, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9))
def test_pools_equal_pytorchs_definitions(h, w):
    x = np.random.default_rng(h * 10 + w).standard_normal((2, h, w, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(max_pool_padded(jnp.asarray(x))), _torch_max_pool(x), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(avg_pool_ceil(jnp.asarray(x))), _torch_avg_pool_ceil(x), rtol=1e-5,
                               atol=1e-6)
