"""`SequentialNet`: what every cnnpipe model shares, whatever its layers.

A model is a list of named top-level layers run in order (`layers`, `layer_names`,
`layer_kinds`). Training, predict, export and inspect use only this interface, so a
configured CNN and a pretrained ResNet or ConvNeXt go through the same code:

- `normalize` turns RAW pixels (uint8/uint16/int16/float32 values, as decoded) into the
  network's input on the device: (x - mean) / std in raw pixel units, or
  x / (2**bit_depth - 1) without statistics. NaN (no data in a float32 store) becomes
  the plane's `mean`, i.e. 0 after normalisation. Nothing upstream rescales pixels, so
  training and serving feed identical arrays.
- `features` returns named layer outputs; Grad-CAM splits the forward pass at a
  layer because the layers are sequential.

Layer kinds: the config's layer types (conv, max_pool, dense, residual, relu, ...), and
for pretrained backbones "stem" and "stage" (spatial blocks) and "head_norm".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["SequentialNet", "SPATIAL_KINDS", "CONV_KINDS"]

# layers whose output is a spatial (N, H, W, C) feature map worth showing
SPATIAL_KINDS = ("conv", "max_pool", "avg_pool", "residual", "stem", "stage")
# layers holding convolutions (Grad-CAM targets, first-conv kernels)
CONV_KINDS = ("conv", "residual", "stem", "stage")
# the first layer kind whose output is no longer spatial
_FLAT_KINDS = ("flatten", "global_avg_pool", "dense")


class SequentialNet(nnx.Module):
    """Named layers run in order over normalised raw pixels; subclasses build `layers`.

    Attributes:
      in_channels, num_classes: planes in, classes out.
      bit_depth: 8 or 16 (raw unsigned pixel input; int16 input is 16 too), 32 (float32 input), or
        None: the input is already normalised (timm's convention; `cnnpipe.backbones.load` without
        statistics). Only a model without statistics uses it, to scale by 1 / (2**bit_depth - 1).
      input_size: (H, W) the model was built for, or None (any size).
      mean, std: per-plane statistics in raw pixel units, or None.
    """

    def _set_io(self, *, in_channels: int, num_classes: int, bit_depth: int | None,
                input_size: tuple[int, int] | None, mean: Sequence[float] | None,
                std: Sequence[float] | None) -> None:
        if bit_depth not in (8, 16, 32, None):
            raise ValueError(f"bit_depth: got {bit_depth!r}; expected 8, 16 or 32")
        for label, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label}: got {value!r}; expected an integer >= 1")
        self.in_channels, self.num_classes, self.bit_depth = in_channels, num_classes, bit_depth
        self.input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        # static floats: jit folds them into the program
        self.mean, self.std = _per_channel("mean", mean, in_channels), _per_channel("std", std, in_channels)
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std: got {list(self.std)}; every channel's std must be > 0")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must be given together (both in raw pixel units) or not at all")

    def _set_layers(self, modules: Sequence[nnx.Module], names: Sequence[str], kinds: Sequence[str]) -> None:
        dup = sorted({n for n in names if list(names).count(n) > 1})
        if dup:
            raise ValueError(f"layer name {dup[0]!r} is used by more than one layer; give unique names")
        self.layers = nnx.List(list(modules))
        self._names, self._kinds = tuple(names), tuple(kinds)

    @property
    def layer_names(self) -> list[str]:
        return list(self._names)

    @property
    def layer_kinds(self) -> list[str]:
        """The kind of each layer (conv, max_pool, dense, residual, relu, stem, stage, ...), in order."""
        return list(self._kinds)

    @property
    def feature_layer_names(self) -> list[str]:
        """The layers with spatial feature maps (conv, pool, residual blocks, stem and stages)."""
        return [n for n, k in zip(self._names, self._kinds) if k in SPATIAL_KINDS]

    @property
    def head_index(self) -> int:
        """Index of the classifier head (the last layer, a dense layer of `num_classes` units)."""
        return len(self._names) - 1

    def set_input_clip(self, low: Sequence[float], high: Sequence[float]) -> None:
        """Clip each plane's raw values to [low, high] before the statistics are applied: a fixed window
        (CT's lung or bone window) or the training split's percentiles (`data.normalize`). Static floats,
        like `mean` and `std`, so evaluate, predict, inspect and exported models apply it too."""
        lo, hi = _per_channel("low", low, self.in_channels), _per_channel("high", high, self.in_channels)
        if any(a >= b for a, b in zip(lo, hi)):
            raise ValueError(f"input clip: every low must be below its high, got {list(lo)} and {list(hi)}")
        self.clip = (lo, hi)

    def normalize(self, x: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """Raw pixel values -> network input (float32, or wider when the params are): NaN replaced by
        the plane's mean (0 after normalisation: no data says nothing), clipped to the input window when
        one is set (`set_input_clip`), then ``(x - mean) / std``."""
        x = jnp.asarray(x)
        floating = jnp.issubdtype(x.dtype, jnp.floating)   # static: integer inputs compile without the rest
        if floating:
            fill = jnp.asarray(self.mean if self.mean is not None else 0.0, x.dtype)
            x = jnp.where(jnp.isnan(x), fill, x)
        x = x.astype(dtype)
        if getattr(self, "clip", None) is not None:
            x = jnp.clip(x, jnp.asarray(self.clip[0], dtype), jnp.asarray(self.clip[1], dtype))
        if self.mean is not None and floating:   # x / std - mean / std: no overflow for values near 3.4e38
            return (x * jnp.asarray([1.0 / s for s in self.std], dtype)
                    - jnp.asarray([m / s for m, s in zip(self.mean, self.std)], dtype))
        if self.mean is not None:
            return (x - jnp.asarray(self.mean, dtype)) * jnp.asarray([1.0 / s for s in self.std], dtype)
        if self.bit_depth in (None, 32):
            return x
        return x * (1.0 / (2 ** self.bit_depth - 1))

    def _run(self, x: jax.Array, keep: set[str] | None, rngs: nnx.Rngs | None) -> tuple[jax.Array, dict]:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            what = "normalised" if self.bit_depth is None else "raw pixel"
            raise ValueError(f"input: got shape {tuple(x.shape)}; expected (N, H, W, {self.in_channels}) "
                             f"{what} values (NHWC)")
        compute = self.first_kernel().dtype   # bf16 when the train step casts the params
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
          x: raw pixels (N, H, W, C) (normalised values when `bit_depth` is None).
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

    def first_kernel(self) -> Any:
        """The first convolution's kernel variable (its dtype is the compute dtype)."""
        for layer in self.layers:
            conv = input_conv(layer)
            if conv is not None:
                return conv.kernel
        head = self.layers[self.head_index]
        return head.kernel

    def _spatial_names(self) -> list[str]:
        out = []
        for name, kind in zip(self._names, self._kinds):
            if kind in _FLAT_KINDS:
                break
            out.append(name)
        return out


def input_conv(layer: nnx.Module) -> Any:
    """The convolution that sees a layer's input first (the layer itself, a block's conv1,
    a stem's first conv), or None for a layer without one."""
    if hasattr(layer, "input_conv"):
        return layer.input_conv
    if hasattr(layer, "conv1"):
        return layer.conv1
    kernel = getattr(layer, "kernel", None)
    return layer if kernel is not None and getattr(kernel, "ndim", 0) == 4 else None


def _per_channel(label: str, value: Sequence[float] | None, channels: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    vals = tuple(float(v) for v in value)
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{label}: got {list(vals)}; expected {channels} finite per-channel values")
    return vals
