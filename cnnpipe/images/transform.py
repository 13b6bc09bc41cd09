"""The one image path: file bytes -> model-ready pixels, for training data and serving alike.

`prepare_bytes` is the single chain decode -> match planes -> promote bit
depth -> resize. `cnnpipe preprocess` (and the folder cache built with it)
runs it in its workers to fill the store; the tfds cache (`cnnpipe.datasets.tfds`),
whose records arrive decoded, enters at `prepare_planes`, the chain after decode; `cnnpipe predict` and
`cnnpipe inspect` run it through `prepare_image`. The pixels a store holds for
a file are therefore bit for bit what predict feeds the model for that file.

Precision is kept: 16-bit planes are resampled in float32 and rounded back to
16 bits, never through an 8-bit intermediate; 8-bit images for a 16-bit store
or model are promoted exactly (x257). Signed and float images go to int16 or
float32 stores (`cnnpipe.images.pixel_types`), resampled without rounding or
clipping, nodata as NaN. Pixels stay (H, W, C) inside the chain.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cnnpipe.images.decode import Planes, convert_planes, jpeg_size, read_file, read_image
from cnnpipe.images.formats import DecodeError
from cnnpipe.images.pixel_types import NoData, all_missing, has_nodata, store_dtype_for, to_float32, widen
from cnnpipe.images.resample import resample as _resample

__all__ = ["RESIZE_MODES", "CHANNEL_MODES", "IMAGE_PATH_VERSION", "ImageSpec", "InputImage", "NeedsSixteenBit", "NeedsWiderType", "resamples", "prepare_bytes",
           "prepare_planes", "prepare_image", "promote_to_16bit", "resize_image", "spec_for_model"]

RESIZE_MODES = ("crop", "pad", "stretch")
CHANNEL_MODES = ("rgb", "gray", "native")
# Bumped whenever the chain can give other pixels for the same file and spec: stores and
# folder caches record it, so a cache built by an older chain is rebuilt, never reused.
IMAGE_PATH_VERSION = 5  # 5: signed and float files into int16/float32 stores, nodata as NaN (4: 12-bit JPEG, --pages)

# ---------------------------------------------------------------- resize

def promote_to_16bit(img: np.ndarray) -> np.ndarray:
    """uint8 -> uint16 exactly, x257 (0 -> 0, 255 -> 65535: full scale stays full scale)."""
    return img.astype(np.uint16) * np.uint16(257)


def resize_image(img: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """(h, w, C) -> (H, W, C) by `mode`, for any h, w, H, W >= 1; an image already (H, W) is returned unchanged.

    crop: scale so the image covers the target, keep the centre; pad: scale so
    it fits inside, centre it on zeros; stretch: scale each side independently.
    """
    return _resize(img, size, mode, False)


def _resize(img: np.ndarray, size: tuple[int, int], mode: str, promote16: bool) -> np.ndarray:
    """`resize_image`; `promote16`: of uint8 `img` promoted to 16 bits (`promote_to_16bit`), promoting
    only what is kept (cut, padded and resampled pixels are the same either way: x257 is exact)."""
    h, w, c = img.shape
    th, tw = int(size[0]), int(size[1])
    promote = promote_to_16bit if promote16 else (lambda a: a)
    if min(h, w, th, tw) < 1:
        raise ValueError(f"resize: sizes must be at least 1x1, got {h}x{w} -> {th}x{tw}")
    if (h, w) == (th, tw):
        return promote(img)
    if mode == "stretch":
        return _resample(img, (th, tw), (0.0, 0.0, float(w), float(h)), promote16)
    if mode == "crop":
        s = max(th / h, tw / w)
        if s == 1.0:  # only cutting is needed: slice exactly, no resampling
            y0, x0 = (h - th) // 2, (w - tw) // 2
            return promote(img[y0:y0 + th, x0:x0 + tw])
        bh, bw = th / s, tw / s  # source box with the target's aspect ratio
        y0, x0 = (h - bh) / 2, (w - bw) / 2
        return _resample(img, (th, tw), (x0, y0, x0 + bw, y0 + bh), promote16)
    if mode == "pad":
        s = min(th / h, tw / w)
        nh, nw = min(th, max(1, round(h * s))), min(tw, max(1, round(w * s)))
        inner = promote(img) if (nh, nw) == (h, w) else _resample(img, (nh, nw), (0.0, 0.0, float(w), float(h)),
                                                                  promote16)
        # padding is no data: 0 in an integer store, NaN in a float one (the model fills it on the device)
        out = np.full((th, tw, c), np.nan if img.dtype.kind == "f" else 0, inner.dtype)
        y0, x0 = (th - nh) // 2, (tw - nw) // 2
        out[y0:y0 + nh, x0:x0 + nw] = inner
        return out
    raise ValueError(f"resize: expected one of {', '.join(RESIZE_MODES)}, got {mode!r}")


def resamples(hw: tuple[int, int], size: tuple[int, int], mode: str) -> bool:
    """Whether `resize_image` interpolates an (h, w) image to `size` (else it copies, cuts or pads)."""
    h, w = hw
    th, tw = int(size[0]), int(size[1])
    if (h, w) == (th, tw):
        return False
    if mode == "crop":
        return max(th / h, tw / w) != 1.0
    if mode == "pad":
        s = min(th / h, tw / w)
        return (min(th, max(1, round(h * s))), min(tw, max(1, round(w * s)))) != (h, w)
    return True


def _needed_source_size(h: int, w: int, size: tuple[int, int], mode: str) -> tuple[int, int]:
    """The smallest (h, w) a source may be reduced to before the final resize to `size`."""
    th, tw = size
    if mode == "stretch":
        return th, tw
    s = max(th / h, tw / w) if mode == "crop" else min(th / h, tw / w)
    return max(1, math.ceil(h * s)), max(1, math.ceil(w * s))


# ---------------------------------------------------------------- the chain

@dataclass(frozen=True)
class ImageSpec:
    """What a store or a model takes; every image is made to match it.

    Attributes:
      size: (H, W) of the output.
      resize: "crop", "pad" or "stretch" (see `resize_image`).
      channels: "rgb" (3 planes, gray expanded), "gray" (1 luma plane) or
        "native" (the file's own planes; then `planes` is the count required).
      bit_depth: 8 or 16 for unsigned pixels (8-bit images are promoted exactly for 16); the
        item size in bits otherwise (16 for int16, 32 for float32).
      planes: for "native", the number of planes every image must have.
      target: who takes the pixels, for error messages ("the store takes", "the model expects").
      pages: multi-page TIFF, "first" or "planes" (see `cnnpipe.images.decode.read_image`).
      dtype: the pixel type, one of `cnnpipe.images.pixel_types.STORE_DTYPES`; None: unsigned
        integers of `bit_depth` bits.
      float_ok: a model's spec for int16: an image whose values need float32 (resampled or padded
        signed data, no data, float files) is given as float32 instead of refused. Never a store's.
    """

    size: tuple[int, int]
    resize: str = "crop"
    channels: str = "rgb"
    bit_depth: int = 8
    planes: int | None = None
    target: str = "the store takes"
    pages: str = "first"
    dtype: str | None = None
    float_ok: bool = False

    @property
    def pixel_dtype(self) -> np.dtype:
        """The dtype of every output image."""
        return np.dtype(self.dtype or ("uint16" if self.bit_depth == 16 else "uint8"))

    @property
    def num_planes(self) -> int:
        """Planes of every output image."""
        return {"rgb": 3, "gray": 1}.get(self.channels) or int(self.planes or 0)

    def describe(self) -> str:
        """E.g. "the model expects 3 plane(s) R/G/B at 8-bit, 32x32" (native: the count alone)."""
        names = {"rgb": " R/G/B", "gray": " L"}.get(self.channels, "")
        depth = f"{self.bit_depth}-bit" if self.pixel_dtype.kind == "u" else str(self.pixel_dtype)
        return f"{self.target} {self.num_planes} plane(s){names} at {depth}, {self.size[0]}x{self.size[1]}"


@dataclass(frozen=True)
class InputImage:
    """One image prepared exactly as the store's (or run's) training data.

    Attributes:
      pixels: (H, W, C) of the spec's pixel type (uint8/uint16/int16/float32) and size, C-contiguous.
      planes: plane names after conversion, e.g. ("R", "G", "B") or ("L",).
      bit_depth: 8 or 16 (the spec's).
      source: the file path (or the name given for bytes).
      notes: the conversions applied (plain sentences, shown in reports).
      warnings: problems that cost no pixels (bad orientation tag, codec warnings, pages not read).
      decoded_bit_depth: the file's own bit depth (8 or 16) before any promotion.
      decoded_dtype: the file's own sample type, e.g. "uint8", "int16", "float64".
      nodata: for a float32 spec, the file's NaN, Inf, nodata and inexact samples (`NoData`); else None.
    """

    pixels: np.ndarray
    planes: tuple[str, ...]
    bit_depth: int
    source: str
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    decoded_bit_depth: int = 8
    decoded_dtype: str = "uint8"
    nodata: NoData | None = None


class NeedsWiderType(ValueError):
    """An image whose values the spec's pixel type cannot hold exactly; `dtype` is the store type
    that would (`cnnpipe.images.pixel_types.widen` of both). cnnpipe never narrows values."""

    def __init__(self, message: str, dtype: str) -> None:
        super().__init__(message)
        self.dtype = dtype


class NeedsSixteenBit(NeedsWiderType):
    """A 16-bit image for an 8-bit spec: cnnpipe never drops 16-bit values to 8 bits."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "uint16")


def _jpeg_reduce(data: bytes, spec: ImageSpec) -> int:
    """The largest DCT scale-down (1, 2, 4 or 8) that keeps a JPEG at least as large as the resize needs."""
    hw = jpeg_size(data)
    if hw is None:
        return 1
    h, w = hw
    nh, nw = _needed_source_size(h, w, spec.size, spec.resize)
    k = 8
    while k > 1 and (h // k < nh or w // k < nw):
        k //= 2
    return k


def _match_planes(names: tuple[str, ...], spec: ImageSpec, source: str,
                  bit_depth: int) -> tuple[str, str, list[str]]:
    """The `read_image` channel and alpha policies that give `spec`'s planes, and the notes.

    "native" keeps every plane of the file, alpha included (a 4-plane model may
    take RGBA); "rgb" and "gray" drop alpha and any planes after R, G, B.

    Raises:
      ValueError: no policy gives the spec's planes; the message says what is expected.
    """
    if spec.channels == "native":
        if len(names) == spec.num_planes:
            return "native", "keep", []
        raise ValueError(f"{source}: image has {len(names)} plane(s) {'/'.join(names)} at {bit_depth}-bit; "
                         f"{spec.describe()}")
    colour = tuple(n for n in names if n != "A")
    notes = ["alpha plane dropped"] if "A" in names else []
    if colour[:3] == ("R", "G", "B") and len(colour) > 3:
        notes.append(f"extra plane(s) {'/'.join(colour[3:])} dropped")
        colour = colour[:3]
    if colour == ("L",) and spec.channels == "rgb":
        notes.append("gray image expanded to three equal planes R = G = B")
    elif colour == ("R", "G", "B") and spec.channels == "gray":
        notes.append("colour image converted to one luma plane L")
    elif colour not in (("L",), ("R", "G", "B")):
        hint = " (--channels native keeps each file's own planes)" if spec.target == "the store takes" else ""
        raise ValueError(f"{source}: image has {len(colour)} plane(s) {'/'.join(colour)} at {bit_depth}-bit; "
                         f"{spec.describe()}{hint}")
    return spec.channels, "drop", notes


def prepare_bytes(data: bytes, spec: ImageSpec, source: str) -> InputImage:
    """Decode one file's bytes and make them match `spec`: the chain shared by training and serving.

    Steps: decode (a JPEG much larger than needed at a reduced DCT scale), drop
    alpha (except for "native"), match planes (gray -> R = G = B, colour -> luma), promote 8 -> 16
    bits exactly, resize. Deterministic: the same bytes and spec give the same
    pixels in a preprocess worker and in predict.

    Raises:
      DecodeError: not a readable image.
      NeedsSixteenBit: a 16-bit image for an 8-bit spec.
      ValueError: the image's planes cannot be matched to the spec.
    """
    native = read_image(data, channels="native", alpha="keep", reduce=_jpeg_reduce(data, spec), pages=spec.pages,
                        source=source)
    return prepare_planes(native, spec, source)


def prepare_planes(native: Planes, spec: ImageSpec, source: str) -> InputImage:
    """Make decoded planes (every plane, alpha kept) match `spec`: `prepare_bytes` after its decode.

    Sources that hand over pixels instead of files (a tfds dataset) enter the
    chain here, so their rows are prepared by the same code as preprocess's and predict's.
    Into a uint16 spec 8-bit files are promoted (x257); into int16 and float32 every value
    is kept as it is, and into float32 NaN, +-Inf and the file's nodata value become NaN.

    Raises:
      NeedsWiderType (NeedsSixteenBit for 16-bit into 8): the spec's type cannot hold the values.
      DecodeError: kind "no_data" when every sample of a file is NaN, Inf or nodata.
      ValueError: the image's planes cannot be matched to the spec.
    """
    channels, alpha, notes = _match_planes(native.channels, spec, source, native.bit_depth)
    if all_missing(native.data, native.nodata):   # before the type: such a file decides nothing
        what = f"NaN, Inf or the nodata value {native.nodata:g}" if native.nodata is not None else "NaN or Inf"
        raise DecodeError(source, f"no data: every one of its {native.data.size} samples is {what}", kind="no_data")
    dtype = _check_type(native, spec, source)
    planes = convert_planes(native, channels=channels, alpha=alpha)  # type: ignore[arg-type]
    img, nodata, promote16 = planes.hwc(), None, False
    if dtype == np.float32:
        img, nodata = to_float32(img, native.nodata)
        if nodata.missing == nodata.total:   # values beyond float32's range only
            raise DecodeError(source, f"no data: none of its {nodata.total} samples fits float32",
                              kind="no_data")
        if native.dtype != np.float32:
            notes.append(f"{native.dtype} values stored as float32")
    elif img.dtype != dtype:
        # 8-bit into 16: promoted by the resize below, which promotes only the pixels it keeps
        promote16 = dtype == np.uint16 and img.dtype == np.uint8
        if not promote16:
            img = promote_to_16bit(img) if dtype == np.uint16 else img.astype(dtype)
        notes.append("8-bit image promoted exactly to 16-bit (x257)" if dtype == np.uint16
                     else f"{native.dtype} values stored as {dtype}")
    if img.shape[:2] != tuple(spec.size):
        notes.append(f"resized from {img.shape[1]}x{img.shape[0]} to {spec.size[1]}x{spec.size[0]} (W x H) "
                     f"by {spec.resize}")
        img = _resize(img, spec.size, spec.resize, promote16)
        if nodata is not None and np.isnan(img).all():   # sparse data: no output had enough valid weight
            raise DecodeError(source, f"no data after resizing: {nodata.missing} of its {nodata.total} samples are "
                                      f"NaN, Inf or nodata, and none of the {spec.size[1]}x{spec.size[0]} outputs "
                                      "has valid pixels for half of its weight", kind="no_data")
    elif promote16:
        img = promote_to_16bit(img)
    pixels = np.ascontiguousarray(img)
    want = (*spec.size, spec.num_planes)
    if pixels.shape != want or pixels.dtype != dtype:
        raise ValueError(f"{source}: prepared pixels are {pixels.shape} {pixels.dtype}, expected {want} "
                         f"{dtype}")  # a bug guard: a bad row never reaches a store
    return InputImage(pixels, planes.channels, spec.bit_depth, source, tuple(notes), native.warnings,
                      native.bit_depth, str(native.dtype), nodata)


def _check_type(native: Planes, spec: ImageSpec, source: str) -> np.dtype:
    """The pixel type `native` is prepared in: the spec's, when it holds the values exactly as prepared.

    A model taking int16 (`ImageSpec.float_ok`) is given float32 where the values need it (a
    slice to resample or pad): the same units, computed in float32 inside the model anyway.

    Raises:
      NeedsWiderType: the spec's type cannot hold them; its `dtype` can.
    """
    want = str(spec.pixel_dtype)
    if want == "float32":
        return spec.pixel_dtype
    # signed data resampled has fractions; padded, it has no data to mark (0 is water in HU)
    changed = resamples(native.data.shape[1:], spec.size, spec.resize) or (
        spec.resize == "pad" and tuple(native.data.shape[1:]) != tuple(spec.size))
    nodata = native.dtype.kind != "u" or native.nodata is not None   # only then can it hold any
    need = store_dtype_for(native.dtype, resampled=changed, nodata=nodata and has_nodata(native.hwc(),
                                                                                          native.nodata))
    wider = widen(want, need)
    if wider == want:
        return spec.pixel_dtype
    if spec.float_ok and wider == "float32":
        return np.dtype(np.float32)
    if want == "uint8" and need == "uint16":
        raise NeedsSixteenBit(f"{source}: 16-bit image; {spec.describe()} (cnnpipe never drops 16-bit "
                              "values to 8 bits: convert the file, or train on 16-bit data)")
    why = ""
    if store_dtype_for(native.dtype, resampled=changed) != need:
        why = " that holds NaN, Inf or nodata values"
    elif store_dtype_for(native.dtype) != need:
        why = " that needs resampling or padding (its values would need fractions or NaN)"
    raise NeedsWiderType(f"{source}: {native.dtype} image{why}; {spec.describe()} "
                         f"(cnnpipe never rounds, clips or rescales values to fit: a {wider} "
                         "store or model holds them)", wider)


def spec_for_model(in_channels: int, bit_depth: int, size: Sequence[int], resize: str = "crop",
                   pages: str = "first", planes: Sequence[str] | None = None, dtype: str | None = None) -> ImageSpec:
    """The `ImageSpec` of a model taking `in_channels` planes named `planes` (its data's plane names).

    Planes R, G, B give "rgb" (a gray file expanded, alpha dropped), L gives "gray" and any other
    names "native" (the file's own planes, `in_channels` of them): a 3-band S0/S1/S2 model takes
    3-band files as its store did, never as RGB. Without names (runs that did not record them):
    3 planes are RGB, 1 is luma, other counts native. `dtype`: the store's pixel type (None: unsigned
    integers of `bit_depth` bits, as runs before float stores recorded).
    """
    if planes is not None and len(planes) == int(in_channels):
        channels = {("R", "G", "B"): "rgb", ("L",): "gray"}.get(tuple(planes), "native")
    else:
        channels = {3: "rgb", 1: "gray"}.get(int(in_channels), "native")
    return ImageSpec((int(size[0]), int(size[1])), resize, channels, int(bit_depth),
                     None if channels != "native" else int(in_channels), "the model expects", pages,
                     dtype if dtype not in ("uint8", "uint16") else None, dtype == "int16")


def prepare_image(path: str | os.PathLike, *, in_channels: int, bit_depth: int, size: Sequence[int],
                  resize: str = "crop", pages: str = "first", planes: Sequence[str] | None = None,
                  dtype: str | None = None) -> InputImage:
    """Read one image file and prepare it exactly as `cnnpipe preprocess` prepared the training data.

    Raises:
      DecodeError: the file is unreadable or not an image.
      ValueError: the image cannot be matched to the model; the message says what it expects.
    """
    path = os.fspath(path)
    return prepare_bytes(read_file(path), spec_for_model(in_channels, bit_depth, size, resize, pages, planes, dtype),
                         path)
