"""Data augmentation on the device: batched ops on raw pixels of any type, bit depth and plane count.

Every op takes and returns an (N, H, W, C) batch of the data's own dtype (uint8,
uint16, int16; float32 passes through unclipped, NaN (no data) stays NaN): intensities are computed in float32, which
holds every uint16 value exactly, then rounded and clipped to the dtype's range, so
16-bit data is never squeezed to 8 bits and an op at its identity setting returns
its input bit for bit. Each image draws its own randomness from its own key,
``fold_in(step key, index in the batch)`` and then the op's fixed id, so a draw
depends only on the step (resume is exact) and switching one op on or off leaves
the others' draws as they were.

The ops run in a fixed order (the config only switches them): random resized crop,
padded crop, horizontal flip, vertical flip, rot90, brightness, contrast, gamma,
noise, random erasing; mixup and cutmix come after, in `cnnpipe.training.loss`,
because they change the labels too. Intensity ops are relative to each image's own
planes (a factor, the plane's mean or its peak), so one setting means the same for
8-bit photographs, 16-bit and 12-bit-in-16-bit microscopy. Unsigned planes run from
black (0) to their peak; signed and float planes (CT in HU, backscatter in dB) have no
fixed black, so each runs from its own minimum to its maximum in the image: brightness
scales the distance from the minimum, gamma acts on the plane's range mapped to [0, 1]
and back, noise is a fraction of that range.

Test-time augmentation (`tta_views`, `apply_view`) uses the same flips and
rotations, so training and inference transform pixels with one piece of code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from cnnpipe.config import AugmentConfig

__all__ = ["augment_batch", "is_active", "check_augment", "image_keys", "apply_op", "OP_NAMES", "pixel_normal",
           "resized_crop", "adjust_brightness", "adjust_contrast", "adjust_gamma", "tta_views", "apply_view",
           "VIEWS"]

# timm's RandomErasing defaults: erased area 2% to 1/3 of the image, aspect 0.3 to 3.3
ERASE_AREA = (0.02, 1 / 3)
ERASE_RATIO = (0.3, 1 / 0.3)
_ATTEMPTS = 10   # torchvision's RandomResizedCrop and timm's RandomErasing try 10 boxes


# ---------------------------------------------------------------- exact integer output

def _to_dtype(x: jax.Array, dtype: Any) -> jax.Array:
    """Float pixels back to `dtype`: rounded to nearest (half to even) and clipped to its range; float
    pixels clipped to their finite range (noise on values near 3.4e38 must not make Inf), NaN kept."""
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        return jnp.clip(jnp.round(x), info.min, info.max).astype(dtype)
    top = float(jnp.finfo(dtype).max)
    return jnp.clip(x, -top, top).astype(dtype)


def _peak(x: jax.Array) -> jax.Array:
    """Each plane's brightest value in one image (H, W, C), float32 (1, 1, C), at least 1 unit.

    The max runs over (H*W, C) rows in the pixels' own dtype: XLA:CPU reduces a uint8 image
    that way 7x faster than over (H, W) in float32.
    """
    peak = jnp.max(x.reshape(-1, x.shape[-1]), axis=0).astype(jnp.float32).reshape(1, 1, -1)
    return jnp.where(peak > 0, peak, 1.0)


def _unsigned(x: jax.Array) -> bool:
    return bool(jnp.issubdtype(x.dtype, jnp.unsignedinteger))


def _black_span(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(black, span) of each plane of one image (H, W, C) as float32 (1, 1, C): 0 and the peak for unsigned
    pixels; the plane's minimum and max - min (at least 1 unit when 0) for signed and float ones, NaN left out."""
    if _unsigned(x):
        return jnp.zeros((1, 1, x.shape[-1]), jnp.float32), _peak(x)
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    low, high = jnp.nanmin(rows, axis=0), jnp.nanmax(rows, axis=0)
    span = jnp.where(high > low, high - low, 1.0)
    return low.reshape(1, 1, -1), span.reshape(1, 1, -1)


def _mean_std(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, std) of each plane of one image (H, W, C) as float32 (1, 1, C), NaN left out."""
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if _unsigned(x) or jnp.issubdtype(x.dtype, jnp.integer):
        mean = jnp.mean(rows, axis=0)
        std = jnp.sqrt(jnp.mean(jnp.square(rows - mean), axis=0))
    else:
        mean = jnp.nanmean(rows, axis=0)
        std = jnp.sqrt(jnp.nanmean(jnp.square(rows - mean), axis=0))
    return mean.reshape(1, 1, -1), std.reshape(1, 1, -1)


def _fmix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: every input bit changes each output bit with probability ~1/2."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def pixel_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal float32 noise of `shape` for one image, from `key`.

    Per-pixel noise is the one large random draw of augmentation, and jax's threefry
    bits take ~30 ns a value on XLA:CPU (140 ms for a batch of 32 224x224x3 images).
    Here the key gives two 32-bit seeds and a counter hashed with MurmurHash3's
    finaliser gives the uniform bits (50x cheaper); the normal is then jax's own
    transform of them, ``sqrt(2) * erfinv(u)`` with u uniform in (-1, 1).
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    count = jax.lax.iota(jnp.uint32, math.prod(shape))
    bits = _fmix(_fmix(count * jnp.uint32(0x9E3779B1) + seed[0]) ^ seed[1])
    u = ((bits >> 8).astype(jnp.float32) + 0.5) * (2.0 / (1 << 24)) - 1.0   # in (-1, 1), never an end
    return (math.sqrt(2.0) * jax.lax.erf_inv(u)).reshape(shape)


# ---------------------------------------------------------------- parametrised ops (one image)

def adjust_brightness(x: jax.Array, factor: jax.Array) -> jax.Array:
    """`x` (H, W, C) times `factor` (torchvision's ColorJitter brightness); 1.0 is the identity.

    Signed and float planes: their distance from the plane's minimum times `factor`."""
    if _unsigned(x):
        return _to_dtype(x.astype(jnp.float32) * factor, x.dtype)
    black, _ = _black_span(x)
    return _to_dtype(black + (x.astype(jnp.float32) - black) * factor, x.dtype)


def adjust_contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
    """Each plane of `x` (H, W, C) stretched about its own mean by `factor`; 1.0 is the identity."""
    mean, _ = _mean_std(x)
    return _to_dtype((x.astype(jnp.float32) - mean) * factor + mean, x.dtype)


def adjust_gamma(x: jax.Array, gamma: jax.Array) -> jax.Array:
    """``peak * (x / peak) ** gamma`` per plane of `x` (H, W, C), `peak` the plane's brightest value.

    Relative to the image's own peak, not the dtype's maximum, so 12-bit data in a
    16-bit file keeps its range; black stays black, the peak stays the peak; 1.0 is the identity.
    Signed and float planes: ``low + span * ((x - low) / span) ** gamma`` over the plane's range
    [low, low + span] in the image, so negative values (HU, dB) keep their order and range.
    """
    if not _unsigned(x):
        low, span = _black_span(x)
        r = jnp.clip((x.astype(jnp.float32) - low) / span, 0.0, 1.0)
        # r * 0: 0 stays 0 and NaN (no data) stays NaN
        powered = jnp.where(r > 0, jnp.exp(gamma * jnp.log(jnp.where(r > 0, r, 1.0))), r * 0.0)
        return _to_dtype(low + span * powered, x.dtype)
    peak = _peak(x)
    r = x.astype(jnp.float32) / peak
    # |r| ** gamma as exp(gamma * log|r|): XLA:CPU's pow is 4x slower; the sign keeps float pixels < 0
    powered = jnp.where(r != 0, jnp.exp(gamma * jnp.log(jnp.where(r != 0, jnp.abs(r), 1.0))), 0.0)
    return _to_dtype(peak * jnp.sign(r) * powered, x.dtype)


def resized_crop(x: jax.Array, top: jax.Array, left: jax.Array, h: jax.Array, w: jax.Array) -> jax.Array:
    """The box (`top`, `left`, `h`, `w`) of `x` (H, W, C), bilinearly resized to (H, W).

    Half-pixel centres with edges clamped to the box (PyTorch's
    ``interpolate(mode="bilinear", align_corners=False)`` on the crop). Boxes are
    never larger than the image, so this only magnifies and needs no antialiasing;
    the whole image maps every output pixel onto one input pixel exactly (identity).
    """
    size_h, size_w = x.shape[0], x.shape[1]

    def axis(start: jax.Array, length: jax.Array, size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        pos = (jnp.arange(size, dtype=jnp.float32) + 0.5) * (length / size) - 0.5
        pos = jnp.clip(pos, 0.0, length - 1.0)
        lo = jnp.floor(pos)
        frac = pos - lo
        lo = lo.astype(jnp.int32)
        hi = jnp.minimum(lo + 1, length.astype(jnp.int32) - 1)
        return start + lo, start + hi, frac

    y0, y1, fy = axis(top, h.astype(jnp.float32), size_h)
    x0, x1, fx = axis(left, w.astype(jnp.float32), size_w)
    f = x.astype(jnp.float32)
    rows = f[y0] * (1 - fy)[:, None, None] + f[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return _to_dtype(out, x.dtype)


# ---------------------------------------------------------------- random ops (one image, its key)

def _box(key: jax.Array, size_h: int, size_w: int, area: tuple[float, float], ratio: tuple[float, float],
         strict: bool) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """(found, top, left, h, w): the first of 10 random boxes of `area` x the image and aspect
    `ratio` (w / h, log-uniform) that fits (`strict`: smaller than the image, timm's erasing rule)."""
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    target = size_h * size_w * jax.random.uniform(k_area, (_ATTEMPTS,), minval=area[0], maxval=area[1])
    aspect = jnp.exp(jax.random.uniform(k_ratio, (_ATTEMPTS,), minval=math.log(ratio[0]),
                                        maxval=math.log(ratio[1])))
    w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (h >= 1) & (w >= 1) & ((h < size_h) & (w < size_w) if strict else (h <= size_h) & (w <= size_w))
    first = jnp.argmax(fits)
    found = jnp.any(fits)
    h = jnp.where(found, h[first], size_h)
    w = jnp.where(found, w[first], size_w)
    top = jax.random.randint(k_top, (), 0, size_h - h + 1)
    left = jax.random.randint(k_left, (), 0, size_w - w + 1)
    return found, top, left, h, w


def _random_resized_crop(x: jax.Array, key: jax.Array, cfg: Any) -> jax.Array:
    # torchvision's RandomResizedCrop; after 10 misses it keeps the whole image
    _, top, left, h, w = _box(key, x.shape[0], x.shape[1], tuple(cfg.scale), tuple(cfg.ratio), strict=False)
    return resized_crop(x, top, left, h, w)


def _padded_crop(x: jax.Array, key: jax.Array, pad: int) -> jax.Array:
    # the border is no data: NaN for float pixels (as the image path pads), black (0) for unsigned ones and
    # each plane's minimum for signed ones (0 HU would be water; the minimum, -1024, is air)
    off = jax.random.randint(key, (2,), 0, 2 * pad + 1)
    if jnp.issubdtype(x.dtype, jnp.signedinteger):
        low = jnp.min(x.reshape(-1, x.shape[-1]), axis=0)
        inside = jnp.pad(jnp.ones(x.shape[:2], bool), pad)[..., None]
        padded = jnp.where(inside, jnp.pad(x, ((pad, pad), (pad, pad), (0, 0))), low)
    else:
        fill = jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else 0
        padded = jnp.pad(x, ((pad, pad), (pad, pad), (0, 0)), constant_values=fill)
    return jax.lax.dynamic_slice(padded, (off[0], off[1], 0), x.shape)


def _hflip(x: jax.Array, key: jax.Array, _: Any) -> jax.Array:
    return jnp.where(jax.random.bernoulli(key), x[:, ::-1], x)


def _vflip(x: jax.Array, key: jax.Array, _: Any) -> jax.Array:
    return jnp.where(jax.random.bernoulli(key), x[::-1], x)


def _rot90(x: jax.Array, key: jax.Array, _: Any) -> jax.Array:
    # np.rot90(x, k) as transpose and flips: k=1 transposed then flipped top-bottom, k=2 both flips,
    # k=3 transposed then flipped left-right
    k = jax.random.randint(key, (), 0, 4)
    x = jnp.where(k % 2 == 1, jnp.swapaxes(x, 0, 1), x)
    x = jnp.where((k == 1) | (k == 2), x[::-1], x)
    return jnp.where(k >= 2, x[:, ::-1], x)


def _brightness(x: jax.Array, key: jax.Array, b: float) -> jax.Array:
    return adjust_brightness(x, jax.random.uniform(key, minval=1 - b, maxval=1 + b))


def _contrast(x: jax.Array, key: jax.Array, c: float) -> jax.Array:
    return adjust_contrast(x, jax.random.uniform(key, minval=1 - c, maxval=1 + c))


def _gamma(x: jax.Array, key: jax.Array, g: float) -> jax.Array:
    return adjust_gamma(x, jax.random.uniform(key, minval=1 - g, maxval=1 + g))


def _noise(x: jax.Array, key: jax.Array, sigma: float) -> jax.Array:
    _, span = _black_span(x)   # unsigned: the peak
    return _to_dtype(x.astype(jnp.float32) + sigma * span * pixel_normal(key, x.shape), x.dtype)


def _random_erasing(x: jax.Array, key: jax.Array, p: float) -> jax.Array:
    # timm's RandomErasing (mode "pixel"): a box filled with noise of the image's own plane statistics
    k_apply, k_box, k_fill = jax.random.split(key, 3)
    found, top, left, h, w = _box(k_box, x.shape[0], x.shape[1], ERASE_AREA, ERASE_RATIO, strict=True)
    rows, cols = jnp.arange(x.shape[0])[:, None, None], jnp.arange(x.shape[1])[None, :, None]
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    mean, std = _mean_std(x)
    fill = _to_dtype(mean + std * pixel_normal(k_fill, x.shape), x.dtype)
    return jnp.where(inside & found & jax.random.bernoulli(k_apply, p), fill, x)


def _scaled(op: Callable[[jax.Array, jax.Array, Any], jax.Array]) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
    """An intensity op that, on float images, runs on x / s and scales back, s the power of two just under the
    image's largest |value|: the ops are linear in the values, and a plane spanning -3.4e38..3.4e38 (a fill
    value with no nodata tag) would overflow float32 in max - min or a mean. Integer images run as they are."""
    def run(x: jax.Array, key: jax.Array, setting: Any) -> jax.Array:
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return op(x, key, setting)
        big = jnp.nanmax(jnp.abs(x.astype(jnp.float32)))
        s = jnp.where(jnp.isfinite(big) & (big > 0), jnp.exp2(jnp.ceil(jnp.log2(big)) - 1.0), 1.0)
        return _to_dtype(op(x / s.astype(x.dtype), key, setting).astype(jnp.float32) * s, x.dtype)
    return run


# name -> (fixed id for the key, op(image, key, setting)); the order is the order they run in
_OPS: dict[str, tuple[int, Callable[[jax.Array, jax.Array, Any], jax.Array]]] = {
    "random_resized_crop": (1, _random_resized_crop), "crop_padding": (2, _padded_crop),
    "flip": (3, _hflip), "vflip": (4, _vflip), "rot90": (5, _rot90), "brightness": (6, _scaled(_brightness)),
    "contrast": (7, _scaled(_contrast)), "gamma": (8, _scaled(_gamma)), "noise": (9, _scaled(_noise)),
    "random_erasing": (10, _scaled(_random_erasing)),
}
OP_NAMES = tuple(_OPS)


def _on(value: Any) -> bool:
    return value is not None and value is not False and value != 0


def is_active(cfg: AugmentConfig) -> bool:
    """Whether `cfg` changes any pixel (mixup and cutmix included)."""
    return any(_on(getattr(cfg, name)) for name in (*OP_NAMES, "mixup", "cutmix"))


def check_augment(cfg: AugmentConfig, size: tuple[int, int]) -> None:
    """ValueError naming the key when `cfg` cannot run on images of `size` (H, W)."""
    if cfg.rot90 and size[0] != size[1]:
        raise ValueError(f"augment.rot90: needs square images; the data's size is {size[0]}x{size[1]} "
                         "(set data.size to a square, or use augment.flip / augment.vflip)")


def image_keys(key: jax.Array, n: int) -> jax.Array:
    """One key per image of a batch of `n`: ``fold_in(key, i)``, independent of the batch's layout."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(n))


def apply_op(name: str, images: jax.Array, keys: jax.Array, setting: Any) -> jax.Array:
    """Op `name` (one of `OP_NAMES`) on a batch (N, H, W, C) with per-image `keys` (N, 2) at `setting`."""
    op_id, op = _OPS[name]
    return jax.vmap(lambda im, k: op(im, jax.random.fold_in(k, op_id), setting))(images, keys)


def augment_batch(images: jax.Array, key: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Every op `cfg` switches on, in order, over a batch (N, H, W, C); same key, same result.

    Returns the batch in its own dtype and shape. Mixup and cutmix are not applied here
    (`cnnpipe.training.loss.mix_batch`: they change the targets too).
    """
    keys = image_keys(key, images.shape[0])
    for name in OP_NAMES:
        setting = getattr(cfg, name)
        if _on(setting):
            images = apply_op(name, images, keys, setting)
    return images


# ---------------------------------------------------------------- test-time augmentation

# each view of a batch (N, H, W, C); rotations are np.rot90's (counter-clockwise)
VIEWS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda x: x,
    "hflip": lambda x: x[:, :, ::-1],
    "vflip": lambda x: x[:, ::-1],
    "rot180": lambda x: x[:, ::-1, ::-1],
    "rot90": lambda x: jnp.swapaxes(x, 1, 2)[:, ::-1],
    "rot270": lambda x: jnp.swapaxes(x, 1, 2)[:, :, ::-1],
    "transpose": lambda x: jnp.swapaxes(x, 1, 2),
    "antitranspose": lambda x: jnp.swapaxes(x, 1, 2)[:, ::-1, ::-1],
}


def tta_views(cfg: AugmentConfig) -> tuple[str, ...]:
    """The views test-time augmentation averages over: the flips and rotations the run trained with.

    The image itself; its mirror image with ``flip``; upside down with ``vflip`` (both:
    also turned 180 degrees); the four rotations with ``rot90``, and their mirror images
    too when it also trained with a flip (the square's 8 symmetries). A run trained with
    none of them has the image alone: a view it never learned (a mirrored letter) could
    change the class, which is why a user turns a flip off.
    """
    flips = [f for f, on in (("hflip", cfg.flip), ("vflip", cfg.vflip)) if on]
    if cfg.rot90:
        return tuple(VIEWS) if flips else ("identity", "rot90", "rot180", "rot270")
    if len(flips) == 2:
        return ("identity", "hflip", "vflip", "rot180")
    return ("identity", *flips)


def apply_view(images: jax.Array, view: str) -> jax.Array:
    """`images` (N, H, W, C) seen as `view` (a key of `VIEWS`)."""
    return VIEWS[view](images)
