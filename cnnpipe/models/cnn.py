"""Flax NNX CNNs built from a layer list or a named preset.

The model takes RAW integer-valued pixels (N, H, W, C) (uint8/uint16 arrays, or floats
holding those values) and normalises on the device (`SequentialNet.normalize`), so
training, `predict` and `inspect` all feed decoded planes directly and nothing upstream
rescales 16-bit data. `build_model` also builds the pretrained backbones
(`cnnpipe.models.backbones`) by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cnnpipe.config import BACKBONES, PRESETS, validate_layers
from cnnpipe.models.layers import Conv, avg_pool, max_pool
from cnnpipe.models.sequential import SequentialNet

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

class CNN(SequentialNet):
    """A sequential CNN over raw integer pixels; see `build_model`.

    Attributes (besides `SequentialNet`'s):
      layer_names: one name per layer, in order (e.g. conv1, relu1, pool1, ..., dense2).
    """

    def __init__(self, layers: Sequence[Mapping[str, Any]], *, in_channels: int, num_classes: int,
                 input_size: tuple[int, int], bit_depth: int, rngs: nnx.Rngs,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        if bit_depth not in (8, 16, 32):
            raise ValueError(f"bit_depth: got {bit_depth!r}; expected 8, 16 or 32 (float32 input)")
        self._set_io(in_channels=in_channels, num_classes=num_classes, bit_depth=bit_depth,
                     input_size=input_size, mean=mean, std=std)
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
        self._set_layers(modules, names, kinds)


def build_model(spec: str | Sequence[Mapping[str, Any]], *, in_channels: int, num_classes: int,
                input_size: tuple[int, int], bit_depth: int, rngs: nnx.Rngs,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                clip: tuple[Sequence[float], Sequence[float]] | None = None) -> SequentialNet:
    """Build a model from a preset name, a backbone name or a layer list (the config's `model`).

    A dense classifier head with `num_classes` units is appended unless the list already
    ends with one. `mean`/`std` are per-channel statistics in raw pixel units (as
    `Store.mean`/`Store.std`); without them inputs are scaled by 1 / (2**bit_depth - 1).
    A backbone name (`cnnpipe.config.BACKBONES`: resnet18, convnext_atto, ...) builds
    that architecture with fresh weights (`cnnpipe.models.backbones`). `clip` (low, high), per
    channel in raw pixel units, clips the input first (`SequentialNet.set_input_clip`).

    Example:
      model = build_model("simple_cnn", in_channels=3, num_classes=10, input_size=(32, 32),
                          bit_depth=8, rngs=nnx.Rngs(0))
    """
    if isinstance(spec, str) and spec in BACKBONES:
        from cnnpipe.models.backbones import create

        model = create(spec, in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                       bit_depth=bit_depth, rngs=rngs, mean=mean, std=std)
    else:
        layers = preset_layers(spec) if isinstance(spec, str) else spec
        model = CNN(layers, in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                    bit_depth=bit_depth, rngs=rngs, mean=mean, std=std)
    if clip is not None:
        model.set_input_clip(*clip)
    return model


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (batch-norm statistics not counted)."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))))
