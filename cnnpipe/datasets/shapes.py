"""`shapes`: the built-in synthetic dataset, so `cnnpipe train` runs with no files.

Six classes of one shape each on a contrasting background with noise, 8- or
16-bit, bit-identical on every machine (only exactly rounded arithmetic).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cnnpipe.datasets.dataset import Dataset, Split

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
_SPLIT_SEEDS = {"train": 0, "val": 1}


def _mean_std(images: Any, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in raw units, float64, in chunks (memmaps stay paged)."""
    n, c = len(images), images.shape[-1]
    s = np.zeros(c, np.float64)
    ss = np.zeros(c, np.float64)
    count = 0
    for i in range(0, n, chunk):
        x = np.asarray(images[i:i + chunk], dtype=np.float64).reshape(-1, c)
        s += x.sum(0)
        ss += np.square(x).sum(0)
        count += x.shape[0]
    mean = s / max(count, 1)
    std = np.sqrt(np.maximum(ss / max(count, 1) - mean ** 2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(v) for v in std)


def _shape_masks(label: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Boolean (N, H, W) masks; dx, dy are pixel offsets from the centre in units of the radius.

    Only +, *, sqrt, abs and comparisons: all exactly rounded in IEEE arithmetic,
    so the images are bit-identical on every machine.
    """
    dx, dy = np.broadcast_arrays(dx, dy)
    ax, ay = np.abs(dx), np.abs(dy)
    r2 = dx * dx + dy * dy
    mask = np.zeros(dx.shape, bool)
    k = label[:, None, None]
    mask |= (k == 0) & (r2 <= 1.0)
    mask |= (k == 1) & (np.maximum(ax, ay) <= 0.8)
    mask |= (k == 2) & (dy <= 0.8) & (ax <= (dy + 1.0) * 0.6)
    mask |= (k == 3) & (((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0)))
    mask |= (k == 4) & (r2 <= 1.0) & (r2 >= 0.36)
    mask |= (k == 5) & (ax + ay <= 1.0)
    return mask


def make_shapes(n: int, *, size: tuple[int, int] = (32, 32), bit_depth: int = 8,
                seed: int = 0, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Deterministic labelled RGB images of simple shapes.

    Returns (images (n, H, W, 3) uint8|uint16, labels (n,) int32); classes are
    `SHAPE_CLASSES`. Each image is one shape at a random position, size and
    colour on a random contrasting background with uniform noise; 16-bit images
    use the full uint16 range (not 8-bit values times 257).
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"data.bit_depth: expected 8 or 16, got {bit_depth!r}")
    h, w = int(size[0]), int(size[1])
    if min(h, w) < 8:
        raise ValueError(f"data.size: shapes need images of at least 8x8, got {h}x{w}")
    rng = np.random.default_rng([int(seed), _SPLIT_SEEDS.get(split, 2), 0x5A4E])
    labels = rng.integers(0, len(SHAPE_CLASSES), n).astype(np.int32)
    short = min(h, w)
    radius = short * (0.2 + 0.18 * rng.random(n))
    cy = radius + (h - 1 - 2 * radius) * rng.random(n)
    cx = radius + (w - 1 - 2 * radius) * rng.random(n)
    # colours in [0, 1]: one side dark, the other light, swapped at random
    dark = 0.45 * rng.random((n, 3))
    light = 0.55 + 0.45 * rng.random((n, 3))
    swap = rng.random(n) < 0.5
    fg = np.where(swap[:, None], dark, light)
    bg = np.where(swap[:, None], light, dark)
    ys = np.arange(h, dtype=np.float64)[None, :, None]
    xs = np.arange(w, dtype=np.float64)[None, None, :]
    inv = 1.0 / radius[:, None, None]
    mask = _shape_masks(labels, (xs - cx[:, None, None]) * inv, (ys - cy[:, None, None]) * inv)
    img = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :])
    # triangular noise from uniforms (platform-independent, unlike a Gaussian sampler)
    img += 0.08 * (rng.random(img.shape) - rng.random(img.shape))
    maxval = (1 << bit_depth) - 1
    out = np.rint(np.clip(img, 0.0, 1.0) * maxval).astype(np.uint8 if bit_depth == 8 else np.uint16)
    return out, labels


def shapes_dataset(num_train: int, num_val: int, *, size: tuple[int, int] = (32, 32),
                   bit_depth: int = 8, seed: int = 0) -> Dataset:
    """The built-in synthetic dataset (see `make_shapes`)."""
    xtr, ytr = make_shapes(num_train, size=size, bit_depth=bit_depth, seed=seed, split="train")
    xva, yva = make_shapes(num_val, size=size, bit_depth=bit_depth, seed=seed, split="val")
    mean, std = _mean_std(xtr)
    return Dataset(list(SHAPE_CLASSES), Split(xtr, ytr), Split(xva, yva), bit_depth, mean, std,
                   f"shapes ({bit_depth}-bit, {size[0]}x{size[1]}, seed {seed})", plane_names=("R", "G", "B"))


__all__ = ["SHAPE_CLASSES", "make_shapes", "shapes_dataset"]
