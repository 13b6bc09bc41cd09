"""Flax NNX CNNs built from a layer list or a named preset; named feature maps.

The model takes RAW integer-valued pixels (N, H, W, C) (uint8/uint16 arrays, or floats
holding those values) and normalises on the device, so training, `predict` and
`inspect` all feed decoded planes directly and nothing upstream rescales 16-bit data.

Layouts are NHWC with HWIO kernels. Pooling with window == stride on divisible sizes is
a reshape + max/mean: XLA:CPU runs that ~2.4x faster than `lax.reduce_window` for the
reference CNN (0.86x vs 0.36x PyTorch); other windows fall back to `reduce_window`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cnnpipe.config import PRESETS, validate_layers

__all__ = ["CNN", "Conv", "build_model", "count_params", "preset_layers", "max_pool", "avg_pool", "PRESETS"]


def preset_layers(name: str) -> list[dict[str, Any]]:
    """The layer list of a preset (without the classifier head, which `build_model` adds)."""
    conv = lambda f, k=3, **kw: {"type": "conv", "filters": f, "kernel": k, **kw}  # noqa: E731
    relu, bn = {"type": "relu"}, {"type": "batch_norm"}
    if name == "simple_cnn":
        # small enough that the default run (shapes, 32x32) trains in well under a minute on 2 cores
        return [conv(16), relu, {"type": "max_pool"}, conv(32), relu, {"type": "max_pool"},
                {"type": "flatten"}, {"type": "dense", "units": 64}, relu]
    if name == "lenet5":
        return [conv(6, 5, padding="valid"), relu, {"type": "avg_pool"},
                conv(16, 5, padding="valid"), relu, {"type": "avg_pool"}, {"type": "flatten"},
                {"type": "dense", "units": 120}, relu, {"type": "dense", "units": 84}, relu]
    if name == "vgg_small":
        return [conv(32), bn, relu, conv(32), bn, relu, {"type": "max_pool"},
                conv(64), bn, relu, conv(64), bn, relu, {"type": "max_pool"},
                conv(128), bn, relu, {"type": "max_pool"}, {"type": "global_avg_pool"},
                {"type": "dropout", "rate": 0.3}]
    if name == "resnet_small":
        return [conv(16), bn, relu, {"type": "residual", "filters": 16},
                {"type": "residual", "filters": 32, "stride": 2},
                {"type": "residual", "filters": 64, "stride": 2}, {"type": "global_avg_pool"}]
    raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}")


# ---------------------------------------------------------------- pooling

def _pool_fast(x: jax.Array, window: int, stride: int) -> bool:
    return window == stride and x.shape[1] % window == 0 and x.shape[2] % window == 0


def max_pool(x: jax.Array, window: int = 2, stride: int | None = None) -> jax.Array:
    """Max pool (NHWC, VALID padding)."""
    stride = window if stride is None else stride
    if _pool_fast(x, window, stride):
        n, h, w, c = x.shape
        return x.reshape(n, h // window, window, w // window, window, c).max(axis=(2, 4))
    init = jnp.array(-jnp.inf, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
    return jax.lax.reduce_window(x, init, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID")


def avg_pool(x: jax.Array, window: int = 2, stride: int | None = None) -> jax.Array:
    """Average pool (NHWC, VALID padding)."""
    stride = window if stride is None else stride
    if _pool_fast(x, window, stride):
        n, h, w, c = x.shape
        return x.reshape(n, h // window, window, w // window, window, c).mean(axis=(2, 4))
    total = jax.lax.reduce_window(x, jnp.array(0, x.dtype), jax.lax.add,
                                  (1, window, window, 1), (1, stride, stride, 1), "VALID")
    return total / (window * window)


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
    """2-D convolution over NHWC input: ``kernel`` (kh, kw, in, out) and ``bias`` (out,) params."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int], stride: int = 1,
                 padding: str = "SAME", *, use_bias: bool = True, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (*kernel, in_ch, out_ch), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_ch,), jnp.float32)) if use_bias else None
        self.stride, self.padding = (stride, stride), padding

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        dtype = jnp.result_type(x.dtype, kernel.dtype)
        y = jax.lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), self.stride, self.padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if self.bias is None else _add_bias(y, self.bias[...].astype(dtype))


# ---------------------------------------------------------------- layers

class _Pool(nnx.Module):
    def __init__(self, kind: str, window: int, stride: int | None):
        self.kind, self.window, self.stride = kind, window, stride or window

    def __call__(self, x: jax.Array) -> jax.Array:
        return (max_pool if self.kind == "max_pool" else avg_pool)(x, self.window, self.stride)


_ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid}


class _Fn(nnx.Module):
    """A parameter-free layer: an activation, flatten or global average pool."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "flatten":
            return x.reshape(x.shape[0], -1)
        if self.kind == "global_avg_pool":
            return x.mean(axis=(1, 2))
        return _ACTIVATIONS[self.kind](x)


class _Residual(nnx.Module):
    """conv-bn-relu-conv-bn plus a shortcut (1x1 strided conv + bn when the shape changes), relu."""

    def __init__(self, in_ch: int, filters: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = Conv(in_ch, filters, (3, 3), stride, "SAME", use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(filters, momentum=0.9, rngs=rngs)
        self.conv2 = Conv(filters, filters, (3, 3), 1, "SAME", use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(filters, momentum=0.9, rngs=rngs)
        if stride != 1 or in_ch != filters:
            self.proj = Conv(in_ch, filters, (1, 1), stride, "SAME", use_bias=False, rngs=rngs)
            self.proj_bn = nnx.BatchNorm(filters, momentum=0.9, rngs=rngs)
        else:
            self.proj = self.proj_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        short = x if self.proj is None else self.proj_bn(self.proj(x))
        return jax.nn.relu(y + short)


_NAME_STEM = {"conv": "conv", "max_pool": "pool", "avg_pool": "pool", "batch_norm": "bn",
              "dropout": "dropout", "dense": "dense", "residual": "res", "global_avg_pool": "gap",
              "flatten": "flatten"}


def _make_layer(spec: Mapping[str, Any], shape: tuple[int, int, int, int | None], *, before_bn: bool,
                rngs: nnx.Rngs) -> tuple[nnx.Module, tuple[int, int, int, int | None]]:
    """One layer from its validated spec -> (module, output shape).

    `shape` is (H, W, C, flat) of the layer's input, `flat` being the feature count
    once the input has been flattened (else None); `before_bn`: a batch norm follows.
    """
    h, w, c, flat = shape
    kind = spec["type"]
    if kind == "conv":
        k = spec["kernel"] if isinstance(spec["kernel"], tuple) else (spec["kernel"],) * 2
        s = spec["stride"]
        if spec["padding"] == "same":
            h, w = -(-h // s), -(-w // s)
        else:
            h, w = (h - k[0]) // s + 1, (w - k[1]) // s + 1
        # a bias right before batch norm is cancelled by its mean subtraction; its
        # gradient is rounding noise that Adam would blow up into full-size steps
        mod = Conv(c, spec["filters"], k, s, spec["padding"].upper(), use_bias=not before_bn, rngs=rngs)
        c = spec["filters"]
    elif kind in ("max_pool", "avg_pool"):
        s = spec["stride"] or spec["window"]
        h, w = (h - spec["window"]) // s + 1, (w - spec["window"]) // s + 1
        mod = _Pool(kind, spec["window"], s)
    elif kind == "residual":
        mod = _Residual(c, spec["filters"], spec["stride"], rngs=rngs)
        h, w, c = -(-h // spec["stride"]), -(-w // spec["stride"]), spec["filters"]
    elif kind == "batch_norm":
        mod = nnx.BatchNorm(flat or c, momentum=spec["momentum"], epsilon=spec["epsilon"], rngs=rngs)
    elif kind == "dropout":
        mod = nnx.Dropout(spec["rate"])   # rngs are passed at call time (train step)
    elif kind == "dense":
        fan_in = flat if flat is not None else h * w * c
        mod = nnx.Linear(fan_in, spec["units"], rngs=rngs)
        flat = spec["units"]
    else:
        mod = _Fn(kind)
        if kind == "flatten":
            flat = h * w * c
        elif kind == "global_avg_pool":
            flat = c
    return mod, (h, w, c, flat)


# ---------------------------------------------------------------- the model

class CNN(nnx.Module):
    """A sequential CNN over raw integer pixels; see `build_model`.

    Attributes:
      layer_names: one name per layer, in order (e.g. conv1, relu1, pool1, ..., dense2).
      feature_layer_names: the conv, pool and residual layers (spatial feature maps).
      in_channels, bit_depth, num_classes, input_size: what the model was built for.
    """

    def __init__(self, layers: Sequence[Mapping[str, Any]], *, in_channels: int, num_classes: int,
                 input_size: tuple[int, int], bit_depth: int, rngs: nnx.Rngs,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        if bit_depth not in (8, 16):
            raise ValueError(f"bit_depth: got {bit_depth!r}; expected 8 or 16")
        for label, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label}: got {value!r}; expected an integer >= 1")
        self.in_channels, self.num_classes, self.bit_depth = in_channels, num_classes, bit_depth
        self.input_size = (int(input_size[0]), int(input_size[1]))
        # normalisation constants are static floats: (x - mean) / std in raw pixel units,
        # or x / (2**bit_depth - 1) when no statistics are given
        self.mean, self.std = _per_channel("mean", mean, in_channels), _per_channel("std", std, in_channels)
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std: got {list(self.std)}; every channel's std must be > 0")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must be given together (both in raw pixel units) or not at all")

        specs = list(validate_layers(layers))
        last = specs[-1]
        if not (last["type"] == "dense" and last["units"] == num_classes):
            specs.append({"type": "dense", "units": num_classes, "name": None})
        modules, names, kinds, counters = [], [], [], {}
        h, w, c = self.input_size[0], self.input_size[1], in_channels
        flat = None   # feature count once the input has been flattened
        for i, spec in enumerate(specs):
            kind = spec["type"]
            stem = _NAME_STEM.get(kind, kind)
            counters[stem] = counters.get(stem, 0) + 1
            name = spec["name"] or f"{stem}{counters[stem]}"
            where = f"layer {i} ({name})"
            if kind in ("conv", "max_pool", "avg_pool", "residual", "global_avg_pool") and flat is not None:
                raise ValueError(f"{where}: {kind} needs a spatial (N, H, W, C) input but the "
                                 "features were already flattened by an earlier layer")
            before_bn = i + 1 < len(specs) and specs[i + 1]["type"] == "batch_norm"
            mod, (h, w, c, flat) = _make_layer(spec, (h, w, c, flat), before_bn=before_bn, rngs=rngs)
            if h < 1 or w < 1:
                raise ValueError(f"{where}: the feature map shrinks to {h}x{w} for a "
                                 f"{self.input_size[0]}x{self.input_size[1]} input; "
                                 "use a larger input_size or fewer pooling/valid layers")
            modules.append(mod)
            names.append(name)
            kinds.append(kind)
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"layer name {dup[0]!r} is used by more than one layer; give unique names")
        self.layers = nnx.List(modules)
        self._names, self._kinds = tuple(names), tuple(kinds)

    @property
    def layer_names(self) -> list[str]:
        return list(self._names)

    @property
    def layer_kinds(self) -> list[str]:
        """The config type of each layer (conv, max_pool, dense, residual, relu, ...), in order."""
        return list(self._kinds)

    @property
    def feature_layer_names(self) -> list[str]:
        return [n for n, k in zip(self._names, self._kinds) if k in ("conv", "max_pool", "avg_pool", "residual")]

    def normalize(self, x: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """Raw pixel values -> network input (float32, or wider when the params are)."""
        x = jnp.asarray(x).astype(dtype)
        if self.mean is None:
            return x * (1.0 / (2 ** self.bit_depth - 1))
        return (x - jnp.asarray(self.mean, dtype)) * jnp.asarray([1.0 / s for s in self.std], dtype)

    def _run(self, x: jax.Array, keep: set[str] | None, rngs: nnx.Rngs | None) -> tuple[jax.Array, dict]:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"input: got shape {tuple(x.shape)}; expected (N, H, W, {self.in_channels}) "
                             "raw pixel values (NHWC)")
        compute = self._compute_dtype()   # bf16 when the train step casts the params
        wide = jnp.promote_types(compute, jnp.float32)
        x = self.normalize(x, wide).astype(compute)
        feats = {}
        for name, kind, layer in zip(self._names, self._kinds, self.layers):
            if kind == "dense" and x.ndim > 2:
                x = x.reshape(x.shape[0], -1)
            # rngs only when given (training): eval-mode dropout is the identity and needs none
            x = layer(x, rngs=rngs) if kind == "dropout" and rngs is not None else layer(x)
            if keep is None or name in keep:
                feats[name] = x
        return x.astype(wide), feats

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits (N, num_classes) in float32. `rngs` (a 'dropout' stream) is needed for dropout in train mode."""
        return self._run(x, set(), rngs)[0]

    def features(self, x: jax.Array, names: Sequence[str] | None = None, *,
                 rngs: nnx.Rngs | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits and named layer outputs.

        Args:
          x: raw pixels (N, H, W, C).
          names: layer names to return; None returns every layer whose output is spatial
            (N, H, W, C). A named dense layer gives (N, units).
        Raises:
          ValueError: an unknown name; the message lists the available names.
        """
        if names is None:
            keep = set(self._spatial_names())
        else:
            unknown = [n for n in names if n not in self._names]
            if unknown:
                raise ValueError(f"unknown layer name {unknown[0]!r}; available: {', '.join(self._names)}")
            keep = set(names)
        logits, feats = self._run(x, keep, rngs)
        order = names if names is not None else [n for n in self._names if n in keep]
        return logits, {n: feats[n] for n in order}

    def _compute_dtype(self) -> Any:
        for layer in self.layers:
            kernel = getattr(layer, "kernel", None) or getattr(getattr(layer, "conv1", None), "kernel", None)
            if kernel is not None:
                return kernel.dtype
        return jnp.float32

    def _spatial_names(self) -> list[str]:
        out = []
        for name, kind in zip(self._names, self._kinds):
            if kind in ("flatten", "global_avg_pool", "dense"):
                break
            out.append(name)
        return out


def _per_channel(label: str, value: Sequence[float] | None, channels: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    vals = tuple(float(v) for v in value)
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{label}: got {list(vals)}; expected {channels} finite per-channel values")
    return vals


def build_model(spec: str | Sequence[Mapping[str, Any]], *, in_channels: int, num_classes: int,
                input_size: tuple[int, int], bit_depth: int, rngs: nnx.Rngs,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> CNN:
    """Build a CNN from a preset name or a layer list (as in the config's `model`).

    A dense classifier head with `num_classes` units is appended unless the list already
    ends with one. `mean`/`std` are per-channel statistics in raw pixel units (as
    `Store.mean`/`Store.std`); without them inputs are scaled by 1 / (2**bit_depth - 1).

    Example:
      model = build_model("simple_cnn", in_channels=3, num_classes=10, input_size=(32, 32),
                          bit_depth=8, rngs=nnx.Rngs(0))
    """
    layers = preset_layers(spec) if isinstance(spec, str) else spec
    return CNN(layers, in_channels=in_channels, num_classes=num_classes, input_size=input_size,
               bit_depth=bit_depth, rngs=rngs, mean=mean, std=std)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (batch-norm statistics not counted)."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))))
