"""Named pretrained backbones: build timm's ResNets and ConvNeXts and load their weights.

`load` is the public entry (re-exported as `cnnpipe.backbones.load`); training uses
`create` (fresh weights, for `model: resnet18`) and `load_pretrained_into` (weights
into a model built for a run's planes and classes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from cnnpipe.config import BACKBONES
from cnnpipe.models import convnext, resnet
from cnnpipe.models.sequential import SequentialNet
from cnnpipe.models.weights import WeightsError, adapt_input_conv, copy_weights, read_state_dict

__all__ = ["BACKBONES", "create", "load", "load_pretrained_into", "head_key", "timm_state_dict"]


def _family(name: str) -> Any:
    if name in resnet.RESNETS:
        return resnet
    if name in convnext.CONVNEXTS:
        return convnext
    raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")


def create(name: str, *, in_channels: int = 3, num_classes: int = 1000, input_size: tuple[int, int] | None = None,
           bit_depth: int | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           rngs: nnx.Rngs | None = None) -> SequentialNet:
    """A backbone with freshly initialised weights (timm's initialisers); arguments as `ResNet`."""
    family = _family(name)
    cls = resnet.ResNet if family is resnet else convnext.ConvNeXt
    return cls(name, num_classes=num_classes, in_channels=in_channels, bit_depth=bit_depth, input_size=input_size,
               mean=mean, std=std, rngs=rngs or nnx.Rngs(0))


def head_key(name: str) -> str:
    """The classifier's state-dict prefix (timm's `pretrained_cfg['classifier']`)."""
    return "fc" if _family(name) is resnet else "head.fc"


def load(name: str, weights: str | os.PathLike | None = None, *, num_classes: int | None = None,
         in_channels: int = 3) -> SequentialNet:
    """A timm architecture in Flax NNX, in eval mode, optionally with pretrained weights.

    Args:
      name: one of `BACKBONES` (resnet18, resnet34, resnet50, test_resnet, convnext_atto,
        convnext_femto, convnext_pico, convnext_nano, convnext_tiny, test_convnext).
      weights: None (fresh weights), a timm/torchvision state dict (.safetensors; .pth/.bin
        with torch installed) or ``hf-hub:timm/<name>.<tag>`` (needs `cnnpipe[hub]`).
      num_classes: classifier outputs; None keeps the weights' head (1000 without weights).
        A different count gets a new, freshly initialised head (timm's `num_classes=`).
      in_channels: input planes; 3-plane weights adapt as timm's `in_chans` (1 plane: RGB
        kernels summed; N: repeated and scaled by 3/N).
    Returns:
      The model. Called on (N, H, W, in_channels) float32 normalised as the weights expect
      (timm's `pretrained_cfg` mean/std over [0, 1] values), it returns timm's eval-mode
      logits (N, num_classes) for the same input in NCHW.
    Raises:
      ValueError (`WeightsError`): an unknown name, an unreadable file, or weights of
        another architecture (the message names the key or shape that does not fit).
    """
    _family(name)
    sd = timm_state_dict(name, weights) if weights is not None else None
    stem = "conv1" if _family(name) is resnet else "stem."
    if (sd is not None and num_classes is None and head_key(name) + ".weight" not in sd
            and any(k.startswith(stem) for k in sd)):   # this architecture's weights, without a head
        raise WeightsError(f"{weights}: holds no classifier ({head_key(name)}.weight; a headless export?); "
                           "pass num_classes for a new head")
    src_classes = sd[head_key(name) + ".weight"].shape[0] if sd and head_key(name) + ".weight" in sd else 1000
    classes = src_classes if num_classes is None else num_classes
    if sd is None:
        model = create(name, in_channels=in_channels, num_classes=classes)
    else:   # shapes only, then the file's values: no initialiser runs for weights that are replaced
        model = nnx.eval_shape(lambda: create(name, in_channels=in_channels, num_classes=classes))
        new_head = classes != src_classes
        load_pretrained_into(model, sd, source=str(weights), new_head=new_head)
        if new_head:
            model.layers[model.head_index] = _family(name).make_head(model.num_features, classes, nnx.Rngs(0))
        if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(model))):
            raise WeightsError(f"{weights}: does not hold every weight of {name}")   # not reached for timm files
    model.eval()
    return model


def timm_state_dict(name: str, weights: str | os.PathLike) -> dict[str, np.ndarray]:
    """A weights file's state dict in timm's key names (torchvision and official ConvNeXt keys renamed)."""
    sd = read_state_dict(weights)
    if _family(name) is convnext:
        sd = _convnext_keys(sd)
    return sd


def load_pretrained_into(model: SequentialNet, sd: Mapping[str, np.ndarray], *, source: str,
                         new_head: bool, check_only: bool = False) -> None:
    """Copy a timm state dict into `model` (a backbone), adapting the first conv to its planes.

    `new_head`: leave the classifier as initialised (the run has its own classes);
    `check_only`: check every key and shape, copy nothing (`model` may be abstract).
    Raises WeightsError when a key is missing, a shape does not fit, or keys are left over.
    """
    family = _family(model.architecture)
    first = family.first_conv_key(model) + ".weight"
    sd = dict(sd)
    if first in sd and sd[first].shape[1] != model.in_channels:
        sd[first] = adapt_input_conv(model.in_channels, sd[first])
    head = head_key(model.architecture)
    if not new_head and sd.get(head + ".weight", np.zeros((0,))).shape[:1] != (model.num_classes,):
        new_head = True
    left = copy_weights(family.torch_modules(model), sd, source=source, skip=[head] if new_head else [],
                        check_only=check_only)
    if left:
        raise WeightsError(f"{source}: {len(left)} keys are not used by {model.architecture} (first: {left[0]!r}); "
                           "the file holds another architecture's weights")


def _convnext_keys(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision's (features.*, classifier.*) and the official (downsample_layers.*, dwconv) names -> timm's."""
    if any(k.startswith("features.") for k in sd):
        return {_torchvision_convnext(k): v for k, v in sd.items()}
    if any(k.startswith("downsample_layers.") for k in sd):
        out = {}
        for k, v in sd.items():
            k = k.replace("downsample_layers.0.", "stem.")
            k = re.sub(r"^stages\.(\d+)\.(\d+)", r"stages.\1.blocks.\2", k)
            k = re.sub(r"^downsample_layers\.(\d+)\.(\d+)", r"stages.\1.downsample.\2", k)
            k = k.replace("dwconv", "conv_dw").replace("pwconv", "mlp.fc")
            k = re.sub(r"^head\.", "head.fc.", k)
            k = re.sub(r"^norm\.", "head.norm.", k)
            out[k] = v
        return out
    return dict(sd)


def _torchvision_convnext(key: str) -> str:
    m = re.match(r"features\.(\d+)\.(\d+)\.(.*)$", key)
    if key.startswith("classifier."):
        return key.replace("classifier.0.", "head.norm.").replace("classifier.2.", "head.fc.")
    if not m:
        return key
    f, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    if f == 0:
        return f"stem.{j}.{rest}"
    if f % 2 == 0:   # features.2, .4, .6: LayerNorm + conv downsample of stage f/2
        return f"stages.{f // 2}.downsample.{j}.{rest}"
    part = {"block.0": "conv_dw", "block.2": "norm", "block.3": "mlp.fc1", "block.5": "mlp.fc2"}
    for old, new in part.items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old):]
    return f"stages.{f // 2}.blocks.{j}.{rest.replace('layer_scale', 'gamma')}"
