"""timm's ConvNeXt family in Flax NNX: convnext_atto, _femto, _pico, _nano, _tiny and test_convnext.

Ported from timm `models/convnext.py` (v1.0.31: `ConvNeXtBlock`, `ConvNeXtStage`, the
'patch' stem and `NormMlpClassifierHead`). A block is a 7x7 depthwise conv, LayerNorm
over channels, Linear (4x) - GELU - Linear, a per-channel layer scale, plus the input.
timm's `conv_mlp` variants (atto..nano) use 1x1 convs and `LayerNorm2d` there; both
are the same arithmetic in NHWC, so one block serves both. GELU is exact (erf) as
PyTorch's `nn.GELU`, except test_convnext's 'gelu_tanh'.

The model is sequential at the top (`stem`, `stages.0`..`stages.3`, `global_pool`,
`head_norm`, `fc`), so inspect sees the four stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from cnnpipe.models.layers import Conv, LayerNorm
from cnnpipe.models.sequential import SequentialNet

__all__ = ["ConvNeXt", "CONVNEXTS", "torch_modules", "first_conv_key", "make_head"]

# name -> (blocks per stage, stage widths, LayerNorm eps, tanh GELU)
CONVNEXTS: dict[str, tuple[Sequence[int], Sequence[int], float, bool]] = {
    "convnext_atto": ((2, 2, 6, 2), (40, 80, 160, 320), 1e-6, False),
    "convnext_femto": ((2, 2, 6, 2), (48, 96, 192, 384), 1e-6, False),
    "convnext_pico": ((2, 2, 6, 2), (64, 128, 256, 512), 1e-6, False),
    "convnext_nano": ((2, 2, 8, 2), (80, 160, 320, 640), 1e-6, False),
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768), 1e-6, False),
    "test_convnext": ((1, 2, 4, 2), (24, 32, 48, 64), 1e-5, True),
}
# trunc_normal(std=0.02) as timm's _init_weights
_TRUNC = nnx.initializers.truncated_normal(0.02)


def _linear(cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(cin, cout, kernel_init=_TRUNC, rngs=rngs)


class Block(nnx.Module):
    """depthwise 7x7 conv, LayerNorm, fc1 (4x) - GELU - fc2, times `gamma`, plus the input."""

    def __init__(self, dim: int, eps: float, tanh_gelu: bool, rngs: nnx.Rngs):
        self.conv_dw = Conv(dim, dim, (7, 7), 1, ((3, 3), (3, 3)), groups=dim, kernel_init=_TRUNC, rngs=rngs)
        self.norm = LayerNorm(dim, eps)
        self.fc1, self.fc2 = _linear(dim, 4 * dim, rngs), _linear(4 * dim, dim, rngs)
        self.gamma = nnx.Param(jax.numpy.full((dim,), 1e-6, jax.numpy.float32))   # timm's ls_init_value
        self.tanh_gelu = tanh_gelu

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv_dw(x)
        # per-position work on (N*H*W, C): XLA:CPU reduced the parameter gradients over
        # (N, H, W) 3-5x slower than over one row axis (a block at 16x16x40: 63 vs 13 ms)
        y = self.norm(y.reshape(-1, y.shape[-1]))
        y = self.fc2(jax.nn.gelu(self.fc1(y), approximate=self.tanh_gelu))
        return x + (y * self.gamma[...].astype(y.dtype)).reshape(x.shape)


class Stage(nnx.Module):
    """LayerNorm + 2x2/2 conv (stages 1-3; stage 0 has no downsample), then the blocks."""

    def __init__(self, cin: int, dim: int, depth: int, downsample: bool, eps: float, tanh_gelu: bool,
                 rngs: nnx.Rngs):
        if downsample:
            self.down_norm = LayerNorm(cin, eps)
            self.down_conv = Conv(cin, dim, (2, 2), 2, "VALID", kernel_init=_TRUNC, rngs=rngs)
        else:
            self.down_norm = self.down_conv = None
        self.blocks = nnx.List([Block(dim, eps, tanh_gelu, rngs) for _ in range(depth)])

    @property
    def input_conv(self) -> Conv:
        return self.down_conv if self.down_conv is not None else self.blocks[0].conv_dw

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.down_conv is not None:
            x = self.down_conv(self.down_norm(x.reshape(-1, x.shape[-1])).reshape(x.shape))
        for block in self.blocks:
            x = block(x)
        return x


class Stem(nnx.Module):
    """4x4/4 patch conv + LayerNorm."""

    def __init__(self, cin: int, dim: int, eps: float, rngs: nnx.Rngs):
        self.conv = Conv(cin, dim, (4, 4), 4, "VALID", kernel_init=_TRUNC, rngs=rngs)
        self.norm = LayerNorm(dim, eps)

    @property
    def input_conv(self) -> Conv:
        return self.conv

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(x)
        return self.norm(y.reshape(-1, y.shape[-1])).reshape(y.shape)


class GlobalAvgPool(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return x.mean(axis=(1, 2))


class ConvNeXt(SequentialNet):
    """A timm ConvNeXt (`CONVNEXTS`) as a `SequentialNet`: stem, stages.0..3, global_pool, head_norm, fc.

    Input as `cnnpipe.models.resnet.ResNet`. H and W must be >= 32 (a 4x4/4 stem and
    three 2x2/2 downsamples; timm's model fails on smaller inputs too); sizes that are
    not multiples of 32 drop the last rows and columns at each stride, as timm's does.
    """

    def __init__(self, name: str, *, num_classes: int = 1000, in_channels: int = 3,
                 bit_depth: int | None = None, input_size: tuple[int, int] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, rngs: nnx.Rngs):
        if name not in CONVNEXTS:
            raise ValueError(f"unknown ConvNeXt {name!r}; expected one of {', '.join(CONVNEXTS)}")
        if input_size is not None and min(input_size) < 32:
            raise ValueError(f"{name}: input size {input_size[0]}x{input_size[1]} is too small; "
                             "ConvNeXt needs at least 32x32 (set data.size)")
        self._set_io(in_channels=in_channels, num_classes=num_classes, bit_depth=bit_depth,
                     input_size=input_size, mean=mean, std=std)
        self.architecture = name
        depths, dims, eps, tanh_gelu = CONVNEXTS[name]
        modules, cin = [Stem(in_channels, dims[0], eps, rngs)], dims[0]
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            modules.append(Stage(cin, dim, depth, i > 0, eps, tanh_gelu, rngs))
            cin = dim
        self.num_features = cin
        self._set_layers([*modules, GlobalAvgPool(), LayerNorm(cin, eps), make_head(cin, num_classes, rngs)],
                         ["stem", "stages.0", "stages.1", "stages.2", "stages.3", "global_pool", "head_norm", "fc"],
                         ["stem", "stage", "stage", "stage", "stage", "global_avg_pool", "head_norm", "dense"])

    def _run(self, x: jax.Array, keep: set[str] | None, rngs: nnx.Rngs | None) -> tuple[jax.Array, dict]:
        if x.ndim == 4 and min(x.shape[1], x.shape[2]) < 32:   # timm's model fails on these too
            raise ValueError(f"{self.architecture}: input {x.shape[1]}x{x.shape[2]} is too small; ConvNeXt needs "
                             "at least 32x32 (its last stage would be empty and the logits NaN)")
        return super()._run(x, keep, rngs)


def make_head(features: int, num_classes: int, rngs: nnx.Rngs) -> nnx.Linear:
    """The classifier: trunc_normal(0.02) weights, zero bias (timm's `_init_weights`, head_init_scale 1)."""
    return _linear(features, num_classes, rngs)


def torch_modules(model: ConvNeXt) -> list[tuple[str, Any]]:
    """(timm state-dict prefix, module or param) for every weight, in timm's order."""
    stem = model.layers[0]
    pairs: list[tuple[str, Any]] = [("stem.0", stem.conv), ("stem.1", stem.norm)]
    for s in range(4):
        stage = model.layers[1 + s]
        if stage.down_conv is not None:
            pairs += [(f"stages.{s}.downsample.0", stage.down_norm), (f"stages.{s}.downsample.1", stage.down_conv)]
        for b, block in enumerate(stage.blocks):
            at = f"stages.{s}.blocks.{b}"
            pairs += [(f"{at}.conv_dw", block.conv_dw), (f"{at}.norm", block.norm),
                      (f"{at}.mlp.fc1", block.fc1), (f"{at}.mlp.fc2", block.fc2), (f"{at}.gamma", block.gamma)]
    pairs += [("head.norm", model.layers[-2]), ("head.fc", model.layers[-1])]
    return pairs


def first_conv_key(model: ConvNeXt) -> str:
    """timm's `pretrained_cfg['first_conv']`."""
    return "stem.0"
