"""Network definitions in Flax NNX (stage 3).

Owns: `sequential` (the base every model shares), `layers` (conv, pools, layer norm),
`cnn` (the configurable conv / pool / dense / residual CNN and its presets), `resnet` and
`convnext` (timm's architectures), `weights` (reading timm/torchvision state dicts) and
`backbones` (names -> models with pretrained weights).
Models take raw uint8/uint16 pixels (N, H, W, C) and normalise them on the device.

May import: images, datasets, and the top-level foundation modules.

This `__init__` imports nothing, so importing one module of the package never
imports the rest (and never jax where a module does not need it).
"""
