"""Look inside a trained CNN: activations, kernels per input plane, Grad-CAM, per-plane attribution.

Everything here takes a `cnnpipe.models.cnn.CNN` and RAW pixel batches (N, H, W, C)
(uint8/uint16 as decoded; the model normalises them itself). The heavy parts are
pure functions of (graphdef, state) from `nnx.split`, jitted once per model and
batch shape, with gradients taken by `jax.grad` (flax performance guide).
`cnnpipe.inspect.report` draws the numbers (matplotlib figures) and writes the page.

The models are sequential (`model.layers` in `model.layer_names` order), so a
Grad-CAM target layer splits the forward pass in two: layers up to and including
it give the activation A, the rest map A to the logits, and d logit / d A is a
plain `jax.grad` -- no hooks.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cnnpipe.images.transform import InputImage, prepare_image  # re-exported: the notebooks' API

__all__ = ["InputImage", "prepare_image", "capture_activations", "predict_proba", "grad_cam",
           "default_cam_layer", "plane_attribution", "activation_stats", "first_conv_kernels",
           "TILE_NORMALISATION", "ATTRIBUTION_METHOD"]

TILE_NORMALISATION = ("per-tile min-max: each channel scaled to its own [min, max] "
                      "(viridis: dark purple = that channel's min, yellow = its max)")
ATTRIBUTION_METHOD = ("|gradient x (input - baseline)|, the baseline being each plane at its training mean "
                      "(what the model normalises to 0; black for a model without statistics; the window's low "
                      "end under data.normalize's window or percentiles), summed over each plane's pixels, as a "
                      "share of the total over all planes")


# ---------------------------------------------------------------- model plumbing

def _apply(layers: Sequence[Any], kinds: Sequence[str], x: Any) -> Any:
    """Run `layers` in order exactly as `CNN._run` does in eval mode (kinds: `model.layer_kinds`)."""
    for layer, kind in zip(layers, kinds):
        if kind == "dense" and x.ndim > 2:
            x = x.reshape(x.shape[0], -1)
        x = layer(x)
    return x


def _check_images(model: Any, images: Any) -> Any:
    import jax.numpy as jnp

    x = images if hasattr(images, "shape") and hasattr(images, "dtype") else np.asarray(images)
    want = (*model.input_size, model.in_channels)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise ValueError(f"images: got shape {tuple(x.shape)}; the model expects (N, {want[0]}, {want[1]}, "
                         f"{want[2]}) raw {model.bit_depth}-bit pixel values")
    if np.dtype(x.dtype) == np.uint16 and model.bit_depth == 8:
        raise ValueError("images: uint16 pixels for an 8-bit model; the model expects 8-bit values 0..255")
    if np.dtype(x.dtype) == np.uint8 and model.bit_depth == 16:
        raise ValueError("images: uint8 pixels for a 16-bit model; promote them first (x257, see prepare_image)")
    return jnp.asarray(x)


def _split(model: Any) -> tuple[Any, Any]:
    from flax import nnx

    model.eval()  # inspection never wants dropout or batch statistics
    return nnx.split(model)


def _layer_index(model: Any, name: str) -> int:
    names = model.layer_names
    if name not in names:
        raise ValueError(f"unknown layer name {name!r}; available: {', '.join(names)}")
    return names.index(name)


@functools.lru_cache(maxsize=None)
def _jitted(kind: str) -> Any:
    """The jitted pure function `kind`; graphdef and layer choices are static arguments."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def cam(graphdef, state, x, cls, idx):
        model = nnx.merge(graphdef, state)
        layers, kinds = list(model.layers), model.layer_kinds
        a = _apply(layers[:idx + 1], kinds[:idx + 1], model.normalize(x))

        def score(a):
            logits = _apply(layers[idx + 1:], kinds[idx + 1:], a).astype(jnp.float32)
            return jnp.take_along_axis(logits, cls[:, None], axis=1).sum()

        grads = jax.grad(score)(a)
        weights = grads.mean(axis=(1, 2))                       # (N, C): alpha_k of Grad-CAM
        heat = jax.nn.relu(jnp.einsum("nhwc,nc->nhw", a, weights))
        heat = jax.image.resize(heat, (x.shape[0], x.shape[1], x.shape[2]), "bilinear")
        top = heat.max(axis=(1, 2), keepdims=True)
        return jnp.where(top > 0, heat / jnp.where(top > 0, top, 1.0), 0.0)

    def gxi(graphdef, state, x, cls):
        model = nnx.merge(graphdef, state)
        x = x.astype(jnp.float32)

        def score(x):
            return jnp.take_along_axis(model(x), cls[:, None], axis=1).sum()

        # baseline: each plane at its training mean (0 after the model's normalisation), or
        # black for a model without statistics. A black baseline credited any plane with a
        # large offset (a noise plane around 32768) for "being bright", not for informing the
        # decision; see ATTRIBUTION_METHOD
        base = jnp.zeros(x.shape[-1]) if model.mean is None else jnp.asarray(model.mean, jnp.float32)
        return jax.grad(score)(x) * (x - base)                   # (N, H, W, C), raw units

    fn = {"cam": cam, "gxi": gxi}[kind]
    static = {"cam": (0, 4), "gxi": (0,)}[kind]
    return jax.jit(fn, static_argnums=static)


def _classes(class_index: int | Sequence[int], n: int, num_classes: int) -> Any:
    import jax.numpy as jnp

    cls = np.broadcast_to(np.asarray(class_index, np.int32), (n,))
    if cls.min() < 0 or cls.max() >= num_classes:
        raise ValueError(f"class_index: got {cls.tolist()}; the model has {num_classes} classes (0..{num_classes - 1})")
    return jnp.asarray(cls)


# ---------------------------------------------------------------- analyses

def capture_activations(model: Any, images: Any, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Named layer outputs for a batch of raw images: {name: (N, H, W, C)} (dense layers (N, units)).

    `names` None means every conv and pool layer (`model.feature_layer_names`).
    Raises ValueError for an unknown name, listing the available ones.
    """
    return predict_proba(model, images, names)[1]


def predict_proba(model: Any, images: Any, names: Sequence[str] | None = None, task: Any = None
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(class probabilities (N, num_classes), activations as `capture_activations`) in one pass; a
    multi-label or regression `task`: its outputs (sigmoid probabilities, values) instead."""
    names = tuple(model.feature_layer_names if names is None else names)
    for name in names:
        _layer_index(model, name)
    from cnnpipe.training.steps import forward

    x = _check_images(model, images)
    graphdef, state = _split(model)
    probs, feats = forward(graphdef, (state,), x, names, None if task is None or task.is_classification else task)
    # jit returns dicts with sorted keys; keep the layer order
    return np.asarray(probs), {k: np.asarray(feats[k]) for k in names}


def default_cam_layer(model: Any) -> str:
    """The Grad-CAM layer: the last conv (or residual) block, with the batch norm and activation after it;
    for a pretrained backbone, its last stage (layer4 of a ResNet, stages.3 of a ConvNeXt)."""
    from cnnpipe.models.sequential import CONV_KINDS

    kinds = model.layer_kinds
    convs = [i for i, k in enumerate(kinds) if k in CONV_KINDS]
    if not convs:
        raise ValueError("the model has no conv layer for Grad-CAM")
    i = convs[-1]
    while i + 1 < len(kinds) and kinds[i + 1] in ("batch_norm", "relu", "gelu", "tanh", "sigmoid"):
        i += 1
    return model.layer_names[i]


def grad_cam(model: Any, images: Any, class_index: int | Sequence[int], layer: str | None = None) -> np.ndarray:
    """Grad-CAM heat maps (N, H, W) at input size, each scaled to [0, 1] by its maximum.

    relu(sum_k alpha_k A_k) with alpha_k the spatial mean of d logit[class] / d A_k
    (Selvaraju et al. 2017), A the output of `layer` (default: `default_cam_layer`),
    upsampled bilinearly to the input size. An all-zero map stays zero.
    """
    layer = default_cam_layer(model) if layer is None else layer
    idx = _layer_index(model, layer)
    from cnnpipe.training.steps import forward

    x = _check_images(model, images)
    graphdef, state = _split(model)
    # the layer's output shape, traced without running the model
    probe = forward.eval_shape(graphdef, (state,), x[:1], (layer,))[1][layer]
    if len(probe.shape) != 4:
        raise ValueError(f"Grad-CAM layer {layer!r} is not spatial (output {tuple(probe.shape)}); "
                         f"choose one of {', '.join(model.feature_layer_names)}")
    cls = _classes(class_index, x.shape[0], model.num_classes)
    return np.asarray(_jitted("cam")(graphdef, state, x, cls, idx))


def plane_attribution(model: Any, images: Any, class_index: int | Sequence[int]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per-plane shares of the decision for `class_index`: (shares (N, C) summing to 1, signed sums (N, C)).

    Gradient of the class logit with respect to the raw pixels, times the input's
    distance from a baseline: each plane at its training mean (the model's own zero
    after normalisation), or black for a model without statistics. Shares use the
    absolute products summed over each plane's pixels; the signed sums keep the
    direction. All-zero gradients give equal shares.
    """
    x = _check_images(model, images)
    graphdef, state = _split(model)
    cls = _classes(class_index, x.shape[0], model.num_classes)
    gx = np.asarray(_jitted("gxi")(graphdef, state, x, cls), np.float64)
    mag = np.abs(gx).sum(axis=(1, 2))
    total = mag.sum(axis=1, keepdims=True)
    shares = np.where(total > 0, mag / np.where(total > 0, total, 1.0), 1.0 / gx.shape[-1])
    return shares, gx.sum(axis=(1, 2))


def activation_stats(activations: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per layer over every image and position: mean, min, max and the channels that never activate.

    A channel "never activates" when its value is <= 0 everywhere (a relu after it would
    output only zeros).
    """
    out = {}
    for name, act in activations.items():
        a = np.asarray(act, np.float64)
        chan_max = a.reshape(-1, a.shape[-1]).max(axis=0)
        dead = np.flatnonzero(chan_max <= 0)
        out[name] = {"shape": list(a.shape[1:]), "channels": int(a.shape[-1]), "mean": float(a.mean()),
                     "min": float(a.min()), "max": float(a.max()),
                     "never_active_fraction": float(len(dead) / a.shape[-1]),
                     "never_active_channels": [int(i) for i in dead]}
    return out


def first_conv_kernels(model: Any, layer: str | None = None) -> tuple[str, np.ndarray]:
    """(layer name, kernels (in_planes, filters, kh, kw)) of the first conv layer (or `layer`).

    For a block, stem or stage: the convolution that sees its input first (a ConvNeXt
    stage's depthwise kernels have one input plane each).
    """
    from cnnpipe.models.sequential import CONV_KINDS, input_conv

    names, kinds = model.layer_names, model.layer_kinds
    idx = _layer_index(model, layer) if layer is not None else next(
        (i for i, k in enumerate(kinds) if k in CONV_KINDS), None)
    if idx is None:
        raise ValueError(f"the model has no conv layer; layers: {', '.join(names)}")
    if kinds[idx] not in CONV_KINDS:
        raise ValueError(f"layer {names[idx]!r} is not a conv layer; conv layers: "
                         f"{', '.join(n for n, k in zip(names, kinds) if k in CONV_KINDS)}")
    kernel = np.asarray(input_conv(model.layers[idx]).kernel[...], np.float32)   # HWIO
    return names[idx], np.transpose(kernel, (2, 3, 0, 1))
