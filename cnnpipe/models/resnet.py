"""timm's ResNet family in Flax NNX: resnet18, resnet34, resnet50 and the tiny test_resnet.

Ported from timm `models/resnet.py` (v1.0.31: `BasicBlock`, `Bottleneck`, `downsample_conv`,
`downsample_avg`, `make_blocks`, the plain 7x7 and the 'deep' 3x3 stems). Paddings are
PyTorch's explicit symmetric ones, so outputs match timm's for any input size, odd ones
included. Batch norm is `nnx.BatchNorm` with PyTorch's eps 1e-5 and momentum 0.1 (flax 0.9).

The model is sequential at the top (`stem`, `layer1`..`layer4`, `global_pool`, `fc`), so
inspect's feature maps and Grad-CAM see the four stages. `torch_modules` pairs each
module with its timm/torchvision state-dict prefix for `cnnpipe.models.weights`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from cnnpipe.models.layers import Conv, avg_pool_ceil, max_pool_padded
from cnnpipe.models.sequential import SequentialNet

__all__ = ["ResNet", "RESNETS", "torch_modules", "first_conv_key", "make_head"]

# name -> (block per stage, blocks per stage, stage widths, stem width, deep stem, avg_down)
RESNETS: dict[str, tuple[Sequence[str], Sequence[int], Sequence[int], int, bool, bool]] = {
    "resnet18": (("basic",) * 4, (2, 2, 2, 2), (64, 128, 256, 512), 64, False, False),
    "resnet34": (("basic",) * 4, (3, 4, 6, 3), (64, 128, 256, 512), 64, False, False),
    "resnet50": (("bottleneck",) * 4, (3, 4, 6, 3), (64, 128, 256, 512), 64, False, False),
    "test_resnet": (("basic", "basic", "bottleneck", "basic"), (1, 1, 1, 1), (32, 48, 48, 96), 16, True, True),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}
# kaiming normal, fan_out, as timm's ResNet.init_weights
_KAIMING = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(cin: int, cout: int, k: int, stride: int, rngs: nnx.Rngs) -> Conv:
    p = k // 2
    return Conv(cin, cout, (k, k), stride, ((p, p), (p, p)), use_bias=False, kernel_init=_KAIMING, rngs=rngs)


def _bn(c: int, rngs: nnx.Rngs) -> BatchNorm2d:
    return BatchNorm2d(c, momentum=0.9, epsilon=1e-5, rngs=rngs)


class BatchNorm2d(nnx.BatchNorm):
    """`nnx.BatchNorm` over (N*H*W, C) rows: XLA:CPU reduced over (N, H, W) several times
    slower than over one row axis (the statistics and the scale/bias gradients), same values."""

    def __call__(self, x: jax.Array, **kwargs) -> jax.Array:
        return super().__call__(x.reshape(-1, x.shape[-1]), **kwargs).reshape(x.shape)


class Downsample(nnx.Module):
    """The shortcut's projection: 1x1 conv (strided) + bn, or 2x2 ceil avg pool + 1x1 conv + bn (avg_down)."""

    def __init__(self, cin: int, cout: int, stride: int, avg: bool, rngs: nnx.Rngs):
        self.avg = avg   # timm's downsample_avg: the pool (an Identity at stride 1) is Sequential index 0
        self.pool = avg and stride != 1
        self.conv = _conv(cin, cout, 1, 1 if avg else stride, rngs)
        self.bn = _bn(cout, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(avg_pool_ceil(x) if self.pool else x))


class BasicBlock(nnx.Module):
    """3x3 conv-bn-relu, 3x3 conv-bn, + shortcut, relu (stride on the first conv)."""

    def __init__(self, cin: int, planes: int, stride: int, down: Downsample | None, rngs: nnx.Rngs):
        self.conv1, self.bn1 = _conv(cin, planes, 3, stride, rngs), _bn(planes, rngs)
        self.conv2, self.bn2 = _conv(planes, planes, 3, 1, rngs), _bn(planes, rngs)
        self.downsample = down

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return jax.nn.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nnx.Module):
    """1x1 conv-bn-relu, 3x3 conv-bn-relu (strided), 1x1 conv-bn to 4x planes, + shortcut, relu."""

    def __init__(self, cin: int, planes: int, stride: int, down: Downsample | None, rngs: nnx.Rngs):
        out = planes * 4
        self.conv1, self.bn1 = _conv(cin, planes, 1, 1, rngs), _bn(planes, rngs)
        self.conv2, self.bn2 = _conv(planes, planes, 3, stride, rngs), _bn(planes, rngs)
        self.conv3, self.bn3 = _conv(planes, out, 1, 1, rngs), _bn(out, rngs)
        self.downsample = down

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return jax.nn.relu(y + (x if self.downsample is None else self.downsample(x)))


class Stem(nnx.Module):
    """7x7/2 conv (or the deep stem: 3x3/2, 3x3, 3x3 convs with bn-relu between), bn, relu, 3x3/2 max pool."""

    def __init__(self, cin: int, width: int, deep: bool, rngs: nnx.Rngs):
        if deep:
            self.convs = nnx.List([_conv(cin, width, 3, 2, rngs), _conv(width, width, 3, 1, rngs),
                                   _conv(width, 2 * width, 3, 1, rngs)])
            self.bns = nnx.List([_bn(width, rngs), _bn(width, rngs)])
            out = 2 * width
        else:
            self.convs = nnx.List([Conv(cin, 64, (7, 7), 2, ((3, 3), (3, 3)), use_bias=False,
                                        kernel_init=_KAIMING, rngs=rngs)])
            self.bns = nnx.List([])
            out = 64
        self.bn1 = _bn(out, rngs)
        self.out_channels = out

    @property
    def input_conv(self) -> Conv:
        return self.convs[0]

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.bns):
                x = jax.nn.relu(self.bns[i](x))
        return max_pool_padded(jax.nn.relu(self.bn1(x)), 3, 2, 1)


class Stage(nnx.Module):
    """A run of residual blocks (timm's `layerN`)."""

    def __init__(self, blocks: Sequence[nnx.Module]):
        self.blocks = nnx.List(list(blocks))

    @property
    def input_conv(self) -> Conv:
        return self.blocks[0].conv1

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


class GlobalAvgPool(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return x.mean(axis=(1, 2))


class ResNet(SequentialNet):
    """A timm ResNet (`RESNETS`) as a `SequentialNet`: stem, layer1..layer4, global_pool, fc.

    Input (N, H, W, in_channels): raw pixels normalised with `mean`/`std` (raw units) or
    by the bit depth, or, with `bit_depth=None` and no statistics, values already
    normalised as the weights expect (timm's convention). Any H, W >= 1 works.
    """

    def __init__(self, name: str, *, num_classes: int = 1000, in_channels: int = 3,
                 bit_depth: int | None = None, input_size: tuple[int, int] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, rngs: nnx.Rngs):
        if name not in RESNETS:
            raise ValueError(f"unknown ResNet {name!r}; expected one of {', '.join(RESNETS)}")
        self._set_io(in_channels=in_channels, num_classes=num_classes, bit_depth=bit_depth,
                     input_size=input_size, mean=mean, std=std)
        self.architecture = name
        kinds, depths, widths, stem_width, deep, avg_down = RESNETS[name]
        stem = Stem(in_channels, stem_width, deep, rngs)
        modules, cin = [stem], stem.out_channels
        for i, (kind, depth, planes) in enumerate(zip(kinds, depths, widths)):
            stride, out = (1 if i == 0 else 2), planes * _EXPANSION[kind]
            down = Downsample(cin, out, stride, avg_down, rngs) if stride != 1 or cin != out else None
            block = BasicBlock if kind == "basic" else Bottleneck
            blocks = [block(cin, planes, stride, down, rngs)]
            blocks += [block(out, planes, 1, None, rngs) for _ in range(depth - 1)]
            modules.append(Stage(blocks))
            cin = out
        self.num_features = cin
        self._set_layers([*modules, GlobalAvgPool(), make_head(cin, num_classes, rngs)],
                         ["stem", "layer1", "layer2", "layer3", "layer4", "global_pool", "fc"],
                         ["stem", "stage", "stage", "stage", "stage", "global_avg_pool", "dense"])


def make_head(features: int, num_classes: int, rngs: nnx.Rngs) -> nnx.Linear:
    """The classifier: PyTorch's `nn.Linear` init, U(+-1/sqrt(fan_in)) for weights and bias, as timm's."""
    bound = features ** -0.5
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
    return nnx.Linear(features, num_classes, kernel_init=uniform, bias_init=uniform, rngs=rngs)


def torch_modules(model: ResNet) -> list[tuple[str, Any]]:
    """(timm state-dict prefix, module) for every module with weights, in timm's order."""
    stem = model.layers[0]
    pairs: list[tuple[str, Any]] = []
    if len(stem.convs) == 3:   # deep stem: conv1 is a Sequential (conv, bn, relu, conv, bn, relu, conv)
        pairs += [("conv1.0", stem.convs[0]), ("conv1.1", stem.bns[0]), ("conv1.3", stem.convs[1]),
                  ("conv1.4", stem.bns[1]), ("conv1.6", stem.convs[2])]
    else:
        pairs.append(("conv1", stem.convs[0]))
    pairs.append(("bn1", stem.bn1))
    for s in range(4):
        for b, block in enumerate(model.layers[1 + s].blocks):
            at = f"layer{s + 1}.{b}"
            convs = [n for n in ("conv1", "conv2", "conv3") if hasattr(block, n)]
            for n in convs:
                pairs += [(f"{at}.{n}", getattr(block, n)), (f"{at}.bn{n[-1]}", getattr(block, f"bn{n[-1]}"))]
            down = block.downsample
            if down is not None:
                first = 1 if down.avg else 0
                pairs += [(f"{at}.downsample.{first}", down.conv), (f"{at}.downsample.{first + 1}", down.bn)]
    pairs.append(("fc", model.layers[model.head_index]))
    return pairs


def first_conv_key(model: ResNet) -> str:
    """timm's `pretrained_cfg['first_conv']`: the conv `in_chans` adaptation changes."""
    return "conv1.0" if len(model.layers[0].convs) == 3 else "conv1"

