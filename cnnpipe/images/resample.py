"""Antialiased bicubic resampling of (h, w, C) pixels by Pillow, exactly as `Image.resize` computes it.

`cnnpipe.images.transform` resizes through `resample`. 8-bit RGB goes through Pillow's
8-bit resampler; every other integer image is resampled a plane at a time in float32
(Pillow's "F" mode) and rounded back, so 16-bit values never pass through 8 bits.

The float planes are handed to Pillow's C core directly (`_resize_f`): one float32
conversion of all planes at once, each plane mapped into Pillow without a copy, and the
reduce + resize calls that `Image.resize(..., reducing_gap=...)` makes, in the same order
with the same arguments. `Image.fromarray`/`np.asarray` would copy every plane twice and
cost more than the resampling itself for the small images users' folders are full of.
When a large image is first box-reduced, only the region the reduce reads is converted
(a centre crop of a photo leaves its sides unread).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["resample", "REDUCING_GAP"]

# Shrinking by >= 2x this gap first box-reduces by an integer factor, then applies
# bicubic over the rest (Pillow's reducing_gap): antialiased like one bicubic pass, ~1.7x faster.
REDUCING_GAP = 2.0
_MAX_8BIT_REDUCE = 128  # largest integer reduce factor Pillow's 8-bit path keeps exact (see resample)
_BICUBIC = Image.Resampling.BICUBIC


def resample(planes: np.ndarray, out_hw: tuple[int, int], box: tuple[float, float, float, float],
             promote16: bool = False) -> np.ndarray:
    """Resize (h, w, C) uint8/uint16/int16/float32 to (H, W, C) of the same dtype, antialiased bicubic over `box`.

    uint8 goes through Pillow's 8-bit resampler (RGB at once, other counts a
    plane at a time: the same fixed-point filter per plane); uint16 per plane
    in float32 ("F" mode), rounded back, so nothing passes through 8 bits.
    `promote16`: uint8 planes give exactly what their x257 uint16 promotion gives (uint16),
    without making the promoted copy (v * 257 is exact in float32).
    """
    oh, ow = out_hw
    h, w, c = planes.shape
    # float rounding can put a computed box a hair outside the image; Pillow refuses that
    x0, y0, x1, y1 = box
    box = (min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h))
    # Pillow's 8-bit box reduce loses precision past a factor of about 200 (a constant 255
    # comes out 254), so such shrinks of 8-bit images take the float path, as 16-bit does
    exact_8bit = max((box[2] - box[0]) / ow, (box[3] - box[1]) / oh) / REDUCING_GAP <= _MAX_8BIT_REDUCE
    if planes.dtype == np.uint8 and exact_8bit and not promote16:
        if c == 3:
            im = Image.fromarray(np.ascontiguousarray(planes), "RGB")
            return np.asarray(im.resize((ow, oh), _BICUBIC, box=box, reducing_gap=REDUCING_GAP))
        out = np.empty((oh, ow, c), planes.dtype)
        for i in range(c):
            im = Image.fromarray(np.ascontiguousarray(planes[:, :, i]), "L")
            out[:, :, i] = np.asarray(im.resize((ow, oh), _BICUBIC, box=box, reducing_gap=REDUCING_GAP))
        return out
    if planes.dtype.kind == "f":
        return _resample_floats(planes, (ow, oh), box)
    plan = _reduce_plan((w, h), (ow, oh), box)
    if plan is not None:   # the reduce reads only its region: the rest is never converted
        rx0, ry0, rx1, ry1 = plan.region
        planes, plan = planes[ry0:ry1, rx0:rx1], _Reduce(plan.factors, (0, 0, rx1 - rx0, ry1 - ry0), plan.box)
    # one conversion of every plane, each then a contiguous (h, w) float32 block Pillow can map
    chw = np.ascontiguousarray(planes.transpose(2, 0, 1), dtype=np.float32)
    if promote16:
        chw *= np.float32(257)   # exact: at most 65535
    res = np.empty((oh, ow, c), np.float32)
    for i in range(c):   # integers hold no NaN
        res[:, :, i] = _resize_f(chw[i], (ow, oh), box, plan)
    # integer stores round to their type (elementwise: the same for all planes at once as for each)
    info = np.iinfo(np.uint16 if promote16 else planes.dtype)
    np.clip(res, float(info.min), float(info.max), out=res)
    return np.rint(res, out=res).astype(info.dtype)


@dataclass(frozen=True)
class _Reduce:
    """The integer box reduce `Image.resize` does first: by `factors` over `region` of the image it is
    given, then the bicubic resize over `box`, in the reduced image's coordinates."""

    factors: tuple[int, int]
    region: tuple[int, int, int, int]
    box: tuple[float, float, float, float]


def _reduce_plan(size: tuple[int, int], out_wh: tuple[int, int], box: tuple[float, ...]) -> _Reduce | None:
    """What `Image.resize(out_wh, BICUBIC, box, reducing_gap=REDUCING_GAP)` of a `size` image (w, h)
    reduces first (Pillow 9-13: shrinking by REDUCING_GAP or more, over the box widened by the
    filter's support, as `Image._get_safe_box`), or None when it resizes directly."""
    (w, h), (ow, oh) = size, out_wh
    factor_x = int((box[2] - box[0]) / ow / REDUCING_GAP) or 1
    factor_y = int((box[3] - box[1]) / oh / REDUCING_GAP) or 1
    if factor_x == 1 and factor_y == 1:
        return None
    support = Image._filters_support[_BICUBIC] - 0.5
    support_x, support_y = support * ((box[2] - box[0]) / ow), support * ((box[3] - box[1]) / oh)
    region = (max(0, int(box[0] - support_x)), max(0, int(box[1] - support_y)),
              min(w, math.ceil(box[2] + support_x)), min(h, math.ceil(box[3] + support_y)))
    return _Reduce((factor_x, factor_y), region,
                   ((box[0] - region[0]) / factor_x, (box[1] - region[1]) / factor_y,
                    (box[2] - region[0]) / factor_x, (box[3] - region[1]) / factor_y))


def _resize_f(plane: np.ndarray, out_wh: tuple[int, int], box: tuple[float, ...],
              plan: _Reduce | None) -> np.ndarray:
    """``Image.fromarray(plane, "F").resize(out_wh, BICUBIC, box=box, reducing_gap=REDUCING_GAP)`` as an array.

    `plane` is a C-contiguous (h, w) float32 array; `plan` is `_reduce_plan` of the image (with a
    region in `plane`'s coordinates: `plane` may hold only the region). The steps are `Image.resize`'s
    for a float image: a copy when nothing changes; else the reduce `plan` asks for, if any, then
    the bicubic resize.
    """
    h, w = plane.shape
    ow, oh = out_wh
    if plan is None and (w, h) == (ow, oh) and box == (0, 0, w, h):
        return plane.copy()
    core = Image.core.map_buffer(plane, (w, h), "raw", 0, ("F", 0, 1))   # shares the array's memory
    if plan is not None:
        core, box = core.reduce(plan.factors, plan.region), plan.box
    return _f_array(core.resize((ow, oh), _BICUBIC, box))


def _f_array(core) -> np.ndarray:
    """A Pillow core image of mode "F" as a read-only (h, w) float32 array (`Image.tobytes`'s raw encoder)."""
    w, h = core.size
    encoder = Image.core.raw_encoder("F", "F")
    encoder.setimage(core, (0, 0, w, h))
    chunks = []
    while True:
        _, code, data = encoder.encode(max(w * h * 4, 65536))
        chunks.append(data)
        if code:
            break
    if code < 0:
        raise RuntimeError(f"Pillow encoder error {code} reading a resized plane")
    return np.frombuffer(b"".join(chunks), np.float32).reshape(h, w)


def _resample_floats(planes: np.ndarray, out_wh: tuple[int, int], box: tuple[float, ...]) -> np.ndarray:
    """(h, w, C) float32 -> (H, W, C) float32 a plane at a time (`_resample_float`); the filter's values are
    kept, overshoot included. Whole planes: whether a plane holds NaN anywhere decides its route."""
    ow, oh = out_wh
    c = planes.shape[2]
    chw = np.ascontiguousarray(planes.transpose(2, 0, 1), dtype=np.float32)
    plan = _reduce_plan(planes.shape[1::-1], out_wh, box)
    out = np.empty((oh, ow, c), planes.dtype)
    masks: dict = {}   # bands of one scene share their no-data mask: its filtered validity is computed once
    for i in range(c):
        out[:, :, i] = _resample_float(chw[i], out_wh, box, plan, masks)
    return out


def _resample_float(plane: np.ndarray, out_wh: tuple[int, int], box: tuple[float, ...], plan: _Reduce | None,
                    masks: dict) -> np.ndarray:
    """One float32 plane (h, w) resized by Pillow's "F" mode; NaN (no data) by normalised convolution.

    A NaN inside the filter's support would make every output it touches NaN (a whole
    image, when shrinking): so valid values are filtered with the NaN weight given to 0 and
    divided by the filtered validity, and an output is NaN where less than half of its
    weight fell on valid pixels (GDAL's rule for resampling with nodata, in spirit). `masks` carries
    the last plane's mask and filtered validity to the next plane (bands share their no-data mask).
    """
    missing = np.isnan(plane)
    if not missing.any():
        return _resize_f(plane, out_wh, box, plan)
    if "missing" in masks and np.array_equal(masks["missing"], missing):
        valid = masks["valid"]   # the previous plane's mask: the same filtered validity
    else:
        valid = _resize_f((~missing).astype(np.float32), out_wh, box, plan)
        masks.update(missing=missing, valid=valid)
    total = _resize_f(np.where(missing, np.float32(0), plane), out_wh, box, plan)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(valid >= 0.5, total / valid, np.nan).astype(np.float32)
