"""Decoded pixels -> model-ready pixels: resizing and matching an image to a model's input.

Shared by `cnnpipe preprocess` (the training data), `cnnpipe predict` and
`cnnpipe inspect`, so an image is prepared for a trained model exactly as its
training data was. Precision is kept: 16-bit planes are resampled in float32
and rounded back to 16 bits, never through an 8-bit intermediate.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cnnpipe.decode import convert_planes, read_image

__all__ = ["RESIZE_MODES", "resize_image", "promote_to_16bit", "InputImage", "prepare_image"]

RESIZE_MODES = ("crop", "pad", "stretch")


_REDUCING_GAP = 2.0


def _resample(planes: np.ndarray, out_hw: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """Resize (h, w, C) uint8/uint16 to (H, W, C) of the same dtype, antialiased.

    uint8 goes through Pillow's 8-bit resampler (exact to within rounding at
    8 bits); uint16 is resampled per plane in float32 ("F" mode) and rounded
    back, so no precision is lost to an 8-bit or fixed-point intermediate.
    Shrinking by 4x or more first box-reduces by an integer factor and then
    applies bicubic over the remaining >= 2x (Pillow's `reducing_gap=2`): the
    result is antialiased like a single bicubic pass and ~1.7x faster.
    """
    from PIL import Image

    oh, ow = out_hw
    bicubic = Image.Resampling.BICUBIC
    c = planes.shape[2]
    if planes.dtype == np.uint8 and c in (1, 3):
        src = planes[:, :, 0] if c == 1 else planes
        im = Image.fromarray(np.ascontiguousarray(src), "L" if c == 1 else "RGB")
        out = np.asarray(im.resize((ow, oh), bicubic, box=box, reducing_gap=_REDUCING_GAP))
        return out.reshape(oh, ow, c)
    top = float(np.iinfo(planes.dtype).max)
    out = np.empty((oh, ow, c), planes.dtype)
    for i in range(c):
        im = Image.fromarray(planes[:, :, i].astype(np.float32), "F")
        res = np.asarray(im.resize((ow, oh), bicubic, box=box, reducing_gap=_REDUCING_GAP))
        out[:, :, i] = np.rint(np.clip(res, 0.0, top))
    return out


def promote_to_16bit(img: np.ndarray) -> np.ndarray:
    """uint8 -> uint16 exactly, x257 (0 -> 0, 255 -> 65535: full scale stays full scale)."""
    return img.astype(np.uint16) * np.uint16(257)


def resize_image(img: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """(h, w, C) -> (H, W, C) by `mode`; an image already (H, W) is returned unchanged.

    crop: scale so the image covers the target, keep the centre; pad: scale so
    it fits inside, centre it on zeros; stretch: scale each side independently.
    """
    h, w, c = img.shape
    th, tw = size
    if (h, w) == (th, tw):
        return img
    if mode == "stretch":
        return _resample(img, (th, tw), (0.0, 0.0, float(w), float(h)))
    if mode == "crop":
        s = max(th / h, tw / w)
        if s == 1.0:  # only cutting is needed: slice exactly, no resampling
            y0, x0 = (h - th) // 2, (w - tw) // 2
            return img[y0:y0 + th, x0:x0 + tw]
        bh, bw = th / s, tw / s  # source box with the target's aspect ratio
        y0, x0 = (h - bh) / 2, (w - bw) / 2
        return _resample(img, (th, tw), (x0, y0, x0 + bw, y0 + bh))
    if mode == "pad":
        s = min(th / h, tw / w)
        nh, nw = min(th, max(1, round(h * s))), min(tw, max(1, round(w * s)))
        inner = img if (nh, nw) == (h, w) else _resample(img, (nh, nw), (0.0, 0.0, float(w), float(h)))
        out = np.zeros((th, tw, c), img.dtype)
        y0, x0 = (th - nh) // 2, (tw - nw) // 2
        out[y0:y0 + nh, x0:x0 + nw] = inner
        return out
    raise ValueError(f"resize: expected one of {', '.join(RESIZE_MODES)}, got {mode!r}")


@dataclass(frozen=True)
class InputImage:
    """One image prepared exactly as the run's training data, ready for the model.

    Attributes:
      pixels: (H, W, C) uint8/uint16 at the model's input size and bit depth.
      planes: plane names after conversion, e.g. ("R", "G", "B") or ("L",).
      bit_depth: 8 or 16 (the model's).
      source: the file path.
      notes: the conversions applied (plain sentences, shown in the report).
    """

    pixels: np.ndarray
    planes: tuple[str, ...]
    bit_depth: int
    source: str
    notes: tuple[str, ...] = ()


def _expects(in_channels: int, bit_depth: int, size: Sequence[int]) -> str:
    return f"the model expects {in_channels} plane(s) at {bit_depth}-bit, {size[0]}x{size[1]}"


def prepare_image(path: str | os.PathLike, *, in_channels: int, bit_depth: int, size: Sequence[int],
                  resize: str = "crop") -> InputImage:
    """Decode and resize one image the way `cnnpipe preprocess` prepared the training data.

    Rules (the same as preprocess): an alpha plane is dropped; a gray image is expanded
    to three equal planes for a 3-plane model, a colour image becomes luma for a 1-plane
    model; an 8-bit image for a 16-bit model is promoted exactly (x257, 255 -> 65535).
    A 16-bit image for an 8-bit model is refused (nothing in cnnpipe drops 16-bit values
    to 8 bits), and a model with another plane count needs exactly that many planes.

    Raises:
      DecodeError: the file is not a readable image.
      ValueError: the image cannot be matched to the model; the message says what it expects.
    """
    path = str(path)
    native = read_image(path, channels="native", alpha="keep")
    names, notes = native.channels, []
    colour = [n for n in names if n != "A"]
    data = native.data
    if "A" in names and in_channels in (1, 3):
        notes.append("alpha plane dropped (as in preprocessing)")
        data = data[[i for i, n in enumerate(names) if n != "A"]]
    if in_channels == 3 and tuple(colour) == ("L",):
        data, planes = np.repeat(data, 3, axis=0), ("R", "G", "B")
        notes.append("gray image expanded to three equal planes R = G = B")
    elif in_channels == 3 and tuple(colour) == ("R", "G", "B"):
        planes = ("R", "G", "B")
    elif in_channels == 1 and tuple(colour) == ("L",):
        planes = ("L",)
    elif in_channels == 1 and tuple(colour) == ("R", "G", "B"):
        data, planes = convert_planes(native, channels="gray").data, ("L",)
        notes.append("colour image converted to one luma plane L (as preprocess --channels gray)")
    elif in_channels not in (1, 3) and len(names) == in_channels:
        planes = tuple(names)
    else:
        raise ValueError(f"{path}: image has {len(names)} plane(s) {'/'.join(names)} at {native.bit_depth}-bit; "
                         f"{_expects(in_channels, bit_depth, size)}")
    if native.bit_depth == 16 and bit_depth == 8:
        raise ValueError(f"{path}: 16-bit image; {_expects(in_channels, bit_depth, size)} (cnnpipe never "
                         "drops 16-bit values to 8 bits: convert the file, or train on 16-bit data)")
    img = data.transpose(1, 2, 0)  # (H, W, C) view; the promotion/resize/final copy make new arrays
    if native.bit_depth == 8 and bit_depth == 16:
        img = promote_to_16bit(img)
        notes.append("8-bit image promoted exactly to 16-bit (x257, as in preprocessing)")
    if img.shape[:2] != tuple(size):
        notes.append(f"resized from {img.shape[1]}x{img.shape[0]} to {size[1]}x{size[0]} (W x H) by {resize}")
        img = resize_image(img, (int(size[0]), int(size[1])), resize)
    return InputImage(np.ascontiguousarray(img), planes, bit_depth, path, tuple(notes))
