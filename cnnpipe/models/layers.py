"""Building blocks shared by every model: convolution, pooling, layer norm, GELU.

Layouts are NHWC with HWIO kernels. Pooling with window == stride on divisible sizes is
a reshape + max/mean: XLA:CPU runs that ~2.4x faster than `lax.reduce_window` for the
reference CNN (0.86x vs 0.36x PyTorch); other windows fall back to `reduce_window`.
The padded and ceil-mode pools are PyTorch's `MaxPool2d(3, 2, padding=1)` and
`AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)`, which timm's ResNets use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["Conv", "LayerNorm", "max_pool", "avg_pool", "max_pool_padded", "avg_pool_ceil", "layer_norm", "Padding"]

# "SAME", "VALID", or explicit (low, high) padding per spatial axis, as PyTorch's `padding=p`
Padding = str | Sequence[tuple[int, int]]


# ---------------------------------------------------------------- pooling

def _pool_fast(x: jax.Array, window: int, stride: int) -> bool:
    return window == stride and x.shape[1] % window == 0 and x.shape[2] % window == 0


def max_pool(x: jax.Array, window: int = 2, stride: int | None = None) -> jax.Array:
    """Max pool (NHWC, VALID padding)."""
    stride = window if stride is None else stride
    if _pool_fast(x, window, stride):
        n, h, w, c = x.shape
        return x.reshape(n, h // window, window, w // window, window, c).max(axis=(2, 4))
    # Python scalars: jax then uses reduce_window_max, which has a gradient (see max_pool_padded)
    init = -float("inf") if jnp.issubdtype(x.dtype, jnp.floating) else int(jnp.iinfo(x.dtype).min)
    return jax.lax.reduce_window(x, init, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID")


def avg_pool(x: jax.Array, window: int = 2, stride: int | None = None) -> jax.Array:
    """Average pool (NHWC, VALID padding)."""
    stride = window if stride is None else stride
    if _pool_fast(x, window, stride):
        n, h, w, c = x.shape
        return x.reshape(n, h // window, window, w // window, window, c).mean(axis=(2, 4))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, window, window, 1), (1, stride, stride, 1), "VALID")
    return total / (window * window)


def _windows(x: jax.Array, window: int, stride: int, out_h: int, out_w: int) -> list[jax.Array]:
    """The window*window strided views whose elementwise max / sum is the pool (no reduce_window:
    jax2onnx turns a padded reduce_window into a MaxPool that onnxruntime rejects)."""
    return [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]
            for i in range(window) for j in range(window)]


def max_pool_padded(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
    """PyTorch's ``MaxPool2d(window, stride, padding)`` on NHWC floats (padding never wins the max)."""
    n, h, w, c = x.shape
    out_h, out_w = (h + 2 * padding - window) // stride + 1, (w + 2 * padding - window) // stride + 1
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
    views = _windows(xp, window, stride, out_h, out_w)
    out = views[0]
    for v in views[1:]:
        out = jnp.maximum(out, v)
    return out


def avg_pool_ceil(x: jax.Array) -> jax.Array:
    """PyTorch's ``AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)`` on NHWC.

    An odd side's last window holds one row (or column) and averages only what it holds.
    """
    n, h, w, c = x.shape
    if h % 2 == 0 and w % 2 == 0:
        return avg_pool(x, 2)
    out_h, out_w = -(-h // 2), -(-w // 2)
    xp = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    total = sum(_windows(xp, 2, 2, out_h, out_w))
    rows = np.minimum(2, h - 2 * np.arange(out_h))   # elements each window holds: static
    cols = np.minimum(2, w - 2 * np.arange(out_w))
    count = (rows[:, None] * cols[None, :]).astype(np.float32)[None, :, :, None]
    return total * jnp.asarray(1.0 / count, x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis with the two-pass variance (as `torch.nn.functional.layer_norm`).

    Statistics are taken in at least float32, so bf16 activations normalise as fp32 ones do.
    """
    wide = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(wide)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(wide) + bias.astype(wide)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over channels (the last axis): ``scale`` and ``bias`` params of shape (C,)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.eps = float(eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


# ---------------------------------------------------------------- convolution
# XLA:CPU turns the bias gradient of a conv, a sum over (N, H, W), into a reduce-window
# that ran ~7x slower than the same sum written as a matrix-vector product (6.9 vs 1.1 ms
# for a 64x32x32x32 batch on one core): `_add_bias` gives the bias its gradient as that
# product. The conv itself is `lax.conv_general_dilated` (NHWC, HWIO).


@jax.custom_vjp
def _add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, None


def _add_bias_bwd(_, dy):
    rows = dy.reshape(-1, dy.shape[-1])
    return dy, (jnp.ones((1, rows.shape[0]), rows.dtype) @ rows).reshape(dy.shape[-1])


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Conv(nnx.Module):
    """2-D convolution over NHWC input: ``kernel`` (kh, kw, in / groups, out) and ``bias`` (out,) params.

    `padding` is "SAME", "VALID" or explicit ((top, bottom), (left, right)) as PyTorch's
    symmetric ``padding=p`` (which differs from "SAME" for even inputs at stride 2).
    `groups` == in_ch == out_ch is a depthwise convolution.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int], stride: int = 1,
                 padding: Padding = "SAME", *, use_bias: bool = True, groups: int = 1,
                 kernel_init: Callable[..., Any] | None = None, rngs: nnx.Rngs):
        init = kernel_init or nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (*kernel, in_ch // groups, out_ch), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_ch,), jnp.float32)) if use_bias else None
        self.stride = (stride, stride)
        self.padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
        self.groups = groups

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        dtype = jnp.result_type(x.dtype, kernel.dtype)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        if self.groups == 1 and not isinstance(self.padding, str) and _out_positions(x, kernel, self) <= 4:
            y = _conv_as_matmul(x, kernel, self.stride[0], self.padding)
        elif self.groups == x.shape[-1] == kernel.shape[-1] and self._same_depthwise(kernel):
            y = depthwise_conv(x, kernel)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, self.stride, self.padding,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             feature_group_count=self.groups)
        return y if self.bias is None else _add_bias(y, self.bias[...].astype(dtype))


    def _same_depthwise(self, kernel: jax.Array) -> bool:
        kh, kw = kernel.shape[:2]
        return (self.stride == (1, 1) and kh % 2 == 1 and kw % 2 == 1
                and self.padding == ((kh // 2, kh // 2), (kw // 2, kw // 2)))


# XLA:CPU's depthwise (grouped) convolution ran 50-70x slower than the same sum of 49
# shifted, per-channel-scaled copies (a 7x7 ConvNeXt block at 16x16x40, batch 32: 81 vs
# 1.4 ms forward), and its input gradient is that sum again with the kernel flipped. Only
# the kernel gradient stays XLA's own (its batch-grouped conv was as fast as any rewrite
# tried). A ConvNeXt train step ran 6-9x faster per block (benchmarks/bench_backbones.py).

def _shift_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """sum over kernel taps of the shifted input times the tap's per-channel weight; one
    stacked multiply-reduce per kernel row (1.7x faster than 49 separate multiply-adds)."""
    kh, kw = kernel.shape[:2]
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = None
    for i in range(kh):
        taps = jnp.stack([xp[:, i:i + h, j:j + w, :] for j in range(kw)], axis=-2)   # (N, H, W, kw, C)
        row = (taps * kernel[i, :, 0, :]).sum(axis=-2)
        out = row if out is None else out + row
    return out


def _xla_depthwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
    kh, kw = kernel.shape[:2]
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


@jax.custom_vjp
def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 depthwise conv with odd kernel (kh, kw, 1, C) and 'same' symmetric padding, NHWC."""
    return _shift_sum(x, kernel)


def _depthwise_fwd(x, kernel):
    return _shift_sum(x, kernel), (x, kernel)


def _depthwise_bwd(res, dy):
    x, kernel = res
    dx = _shift_sum(dy, kernel[::-1, ::-1])
    dk = jax.vjp(lambda k: _xla_depthwise(x, k), kernel)[1](dy)[0]
    return dx, dk


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


# XLA:CPU's convolution is pathological on tiny feature maps with many channels: a 3x3
# conv over a 2x2x512 map (a ResNet's last stage at 64x64 input) took 514 ms for a batch
# of 32 where the same arithmetic as one matmul took 6 ms, and the stride-2 4x4 -> 2x2
# conv trained 85 vs 12 ms. At 4x4 outputs and above XLA's own conv is as fast or faster
# (benchmarks/bench_backbones.py), so outputs of at most 4 positions go through im2col.

def _out_hw(x: jax.Array, kernel: jax.Array, stride: int, padding: Sequence[tuple[int, int]]) -> tuple[int, int]:
    (pt, pb), (pl, pr) = padding
    return ((x.shape[1] + pt + pb - kernel.shape[0]) // stride + 1,
            (x.shape[2] + pl + pr - kernel.shape[1]) // stride + 1)


def _out_positions(x: jax.Array, kernel: jax.Array, conv: Conv) -> int:
    oh, ow = _out_hw(x, kernel, conv.stride[0], conv.padding)
    return oh * ow


def _conv_as_matmul(x: jax.Array, kernel: jax.Array, stride: int, padding: Sequence[tuple[int, int]]) -> jax.Array:
    """The convolution as im2col + one matmul (same result as `conv_general_dilated` up to rounding)."""
    kh, kw, cin, cout = kernel.shape
    oh, ow = _out_hw(x, kernel, stride, padding)
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
                            for i in range(kh) for j in range(kw)], axis=-1)
    return (cols.reshape(-1, kh * kw * cin) @ kernel.reshape(kh * kw * cin, cout)).reshape(x.shape[0], oh, ow, cout)
