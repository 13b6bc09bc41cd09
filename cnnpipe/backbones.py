"""Public API for pretrained backbones: ``cnnpipe.backbones.load(name, weights, ...)``.

A facade over `cnnpipe.models.backbones` (where the code lives, in the models stage):
timm's ResNet and ConvNeXt families in Flax NNX, loading timm/torchvision weights
without torch.

    from cnnpipe import backbones
    model = backbones.load("resnet18", "resnet18.safetensors", num_classes=5, in_channels=1)
"""

from __future__ import annotations

from cnnpipe.config import BACKBONES
from cnnpipe.models.backbones import create, load
from cnnpipe.models.weights import IMAGENET_MEAN, IMAGENET_STD, WeightsError, adapt_input_conv, read_state_dict

__all__ = ["BACKBONES", "load", "create", "read_state_dict", "adapt_input_conv", "WeightsError",
           "IMAGENET_MEAN", "IMAGENET_STD"]
