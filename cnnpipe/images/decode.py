"""Decode stage: image bytes -> exact channel planes (`Planes`).

Every pixel value comes out exactly as stored. The per-format decoders live in
`cnnpipe.images.formats` (16-bit PNG/TIFF through libpng/libtiff, since Pillow keeps
only the high byte of 16-bit colour); this module recognises the format,
applies the orientation once for every format, then the channel and alpha
policies. Metadata problems (an orientation tag that is not 1-8, codec
warnings) never cost the pixels: they are returned in `Planes.warnings`.

Formats are recognised by magic bytes from an allow-list, never by extension. No global state
of Pillow is touched: the pixel limit is our own check and truncated files are errors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cnnpipe.images.formats import (
    SAMPLE_DTYPES,
    UNSIGNED_DTYPES,
    Decoded,
    DecodeError,
    codec_messages,
    decode_jpeg2000,
    decode_pillow,
    decode_png,
    orient,
    reason_of,
)
from cnnpipe.images.jpeg import decode_jpeg, jpeg_header
from cnnpipe.images.tiff import PAGE_MODES, decode_tiff

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_FORMATS",
    "PAGE_MODES",
    "DecodeError",
    "Planes",
    "check_format",
    "convert_planes",
    "jpeg_size",
    "read_file",
    "read_image",
    "sniff_format",
]

# Pillow's own default bomb limit; ours is a parameter, Pillow's global is left alone.
DEFAULT_MAX_PIXELS: int = 89_478_485

IMAGE_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF", "JPEG2000"})

ChannelPolicy = Literal["rgb", "native", "gray"]
AlphaPolicy = Literal["drop", "keep", "composite"]

# Recognised but refused: naming them turns "not an image" into a precise reason.
_KNOWN_UNSUPPORTED: tuple[tuple[bytes, str], ...] = (
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"%PDF", "PDF"),
    (b"qoif", "QOI"),
    (b"8BPS", "Photoshop PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"DDS ", "DDS"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"#?RADIANCE", "Radiance HDR"),
    (b"P1", "Netpbm"), (b"P2", "Netpbm"), (b"P3", "Netpbm"),
    (b"P4", "Netpbm"), (b"P5", "Netpbm"), (b"P6", "Netpbm"),
)

_SUPPORTED_TEXT = "PNG, JPEG, TIFF, BMP, WebP, GIF, JPEG 2000"


@dataclass(frozen=True)
class Planes:
    """An image split into channel matrices, values exactly as stored.

    Attributes:
      data: (C, H, W) array, read-only: uint8 or uint16, or from TIFF and JPEG 2000 also
        int8/int16/int32/uint32/float16/float32/float64, values exactly as stored. It may be a
        strided view of the decoder's interleaved (H, W, C) buffer (no copy is made);
        use ``np.ascontiguousarray(planes.data)`` for planar memory.
      bit_depth: 8 or 16 for unsigned 8/16-bit data (a 12-bit TIFF is 16: its uint16 container);
        for the other types, the sample size in bits (use `dtype` to tell them apart).
      channels: plane names, e.g. ("R", "G", "B"), ("L",), ("R", "G", "B", "A").
      source: the file path, or None for bytes input.
      warnings: what went wrong without costing pixels (an orientation tag that
        is not 1-8, codec warnings such as a bad CRC in an ancillary chunk),
        one line each; empty for a clean file.
      nodata: the file's nodata value (a TIFF's GDAL_NODATA tag), or None.
    """

    data: np.ndarray
    bit_depth: int
    channels: tuple[str, ...]
    source: str | None = None
    warnings: tuple[str, ...] = ()
    nodata: float | None = None

    dtype = property(lambda self: self.data.dtype, doc="The samples' type (`data.dtype`).")

    @property
    def height(self) -> int:
        """Image height in pixels."""
        return int(self.data.shape[1])

    @property
    def width(self) -> int:
        """Image width in pixels."""
        return int(self.data.shape[2])

    @property
    def max_value(self) -> int:
        """Full-scale value of unsigned 8/16-bit data: 255 or 65535."""
        return (1 << self.bit_depth) - 1

    def plane(self, name: str) -> np.ndarray:
        """The (H, W) matrix of one channel, e.g. ``planes.plane("G")``."""
        try:
            return self.data[self.channels.index(name)]
        except ValueError:
            raise KeyError(f"no plane {name!r}; this image has {self.channels}") from None

    def __getitem__(self, name: str) -> np.ndarray:
        return self.plane(name)

    def hwc(self) -> np.ndarray:
        """A (H, W, C) view of the same values (no copy)."""
        return self.data.transpose(1, 2, 0)


def sniff_format(head: bytes) -> str | None:
    """The allow-listed format named by a file's first bytes, or None.

    Returns one of "PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF", "JPEG2000".
    """
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:2] == b"BM" and len(head) >= 26:
        return "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG2000"
    return None


def check_format(head: bytes, source: str | None = None) -> str:
    """The allow-listed format of a file from its first bytes (32 suffice), as `sniff_format`.

    Raises:
      DecodeError: naming `source` and why: empty, a known unsupported format, or not an image.
    """
    if not head:
        raise DecodeError(source, "empty file (0 bytes)", kind="empty")
    fmt = sniff_format(head[:32])
    if fmt is None:
        other = _unsupported_name(head[:32])
        if other:
            raise DecodeError(source, f"unsupported image format {other}; supported: {_SUPPORTED_TEXT}",
                              kind="unsupported")
        raise DecodeError(source, f"not a recognised image (first bytes {head[:8]!r}); "
                                  f"supported: {_SUPPORTED_TEXT}", kind="not_image")
    return fmt


def _unsupported_name(head: bytes) -> str | None:
    for magic, name in _KNOWN_UNSUPPORTED:
        if head.startswith(magic):
            return name
    if head[4:12] in (b"ftypavif", b"ftypheic", b"ftypheix", b"ftypmif1"):
        return "AVIF/HEIF"
    return None


def read_image(
    src: str | os.PathLike[str] | bytes,
    *,
    channels: ChannelPolicy = "rgb",
    alpha: AlphaPolicy = "drop",
    background: float = 0.0,
    exif_orientation: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    reduce: int = 1,
    pages: str = "first",
    source: str | None = None,
) -> Planes:
    """Decode one image into exact channel planes.

    Args:
      src: a path, or the file's bytes.
      channels: "rgb" (default) gives R, G, B planes, gray images expanded to
        three equal planes; "native" keeps the file's own planes (L or R, G, B);
        "gray" gives one luma plane "L" (ITU-R 601 weights, as Pillow's
        ``convert("L")``, computed at the file's bit depth).
      alpha: "drop" (default) discards an alpha plane; "keep" appends it as
        "A"; "composite" blends the colour planes over ``background``. A PNG
        tRNS colour key counts as alpha. Associated (premultiplied) TIFF alpha
        is composited as such (colour + background x (1 - alpha)); with "drop"
        or "keep" its colour planes are returned as stored, i.e. premultiplied
        (already composited over black).
      background: composite background as a fraction of full scale (0 black, 1 white).
      exif_orientation: apply the EXIF/TIFF orientation tag (default True).
        Only the EXIF entry (JPEG APP1, PNG eXIf, WebP EXIF) or the TIFF tag
        counts; an orientation given only in XMP is ignored, for every format
        alike. A tag that is not a number 1-8 keeps the pixels as stored and
        is noted in ``Planes.warnings``.
      max_pixels: refuse images with more pixels, or more than 4 samples per
        pixel of the limit (decompression-bomb guard); None disables the check.
      reduce: 1, 2, 4 or 8. A gray or YCbCr JPEG is decoded at 1/reduce of its
        size in the DCT domain (libjpeg's scaled decode: an area average, much
        less work); other files ignore it. `cnnpipe.images.transform` uses it when the
        target size is that much smaller.
      pages: multi-page TIFF. "first" (default) reads page 1 and notes "N pages; page 1
        kept" in ``Planes.warnings``, unless the pages are channels (ImageJ/OME axes
        CYX), which are always read as planes; "planes" reads every page as a plane
        S0..Sn when each page has one sample and all share shape and type.
      source: the name to give bytes input in errors and `Planes.source`.

    Returns:
      `Planes` with uint8 data (bit_depth 8) or uint16 data (bit_depth 16); a TIFF or JPEG 2000 of
      signed, 32-bit or float samples gives them as stored (see `Planes`).

    Raises:
      DecodeError: empty, truncated, corrupt, non-image, unsupported or oversized input;
        its ``kind`` says which ("unsupported" names the feature, e.g. "JPEG hierarchical").

    Example:
      >>> planes = read_image("scan.tif")          # doctest: +SKIP
      >>> planes.bit_depth, planes.channels         # doctest: +SKIP
      (16, ('R', 'G', 'B'))
    """
    _check_options(channels, alpha, background, reduce, pages)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        source = os.fspath(src)
        data = read_file(source)
    with codec_messages() as notes:
        dec = _decode_format(data, source, max_pixels, reduce, pages)
    _check_decoded(dec, source)
    notes = [*dec.notes, *notes]
    orientation = _orientation(dec.orientation, notes)
    arr = orient(dec.arr, orientation) if exif_orientation and orientation != 1 else dec.arr
    arr, names = _apply_policies(arr, dec.names, channels, alpha, background, source, dec.associated_alpha)
    return _planes(arr, names, source, tuple(notes), dec.nodata)


def _check_options(channels: str, alpha: str, background: float, reduce: int, pages: str) -> None:
    """ValueError naming the first bad `read_image` option (checked before any file is read)."""
    if channels not in ("rgb", "native", "gray"):
        raise ValueError(f"channels must be 'rgb', 'native' or 'gray', got {channels!r}")
    if alpha not in ("drop", "keep", "composite"):
        raise ValueError(f"alpha must be 'drop', 'keep' or 'composite', got {alpha!r}")
    if not 0.0 <= background <= 1.0:  # checked here, not only when an image happens to have alpha
        raise ValueError(f"background must be in [0, 1], got {background}")
    if reduce not in (1, 2, 4, 8):
        raise ValueError(f"reduce must be 1, 2, 4 or 8, got {reduce!r}")
    if pages not in PAGE_MODES:
        raise ValueError(f"pages must be 'first' or 'planes', got {pages!r}")


def read_file(path: str | os.PathLike[str]) -> bytes:
    """A file's bytes; DecodeError naming it if it is a directory or cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except IsADirectoryError:
        raise DecodeError(os.fspath(path), "is a directory, not an image file", kind="unreadable") from None
    except OSError as exc:
        raise DecodeError(os.fspath(path), f"cannot read file: {exc.strerror or type(exc).__name__}",
                          kind="unreadable") from None


def _decode_format(data: bytes, source: str | None, max_pixels: int | None, reduce: int, pages: str) -> Decoded:
    """The format's decoder; any codec exception becomes a DecodeError of kind "corrupt"."""
    fmt = check_format(data, source)
    try:
        if fmt == "PNG":
            return decode_png(data, source, max_pixels)
        if fmt == "TIFF":
            return decode_tiff(data, source, max_pixels, pages)
        if fmt == "JPEG2000":
            return decode_jpeg2000(data, source, max_pixels)
        if fmt == "JPEG":
            dec = decode_jpeg(data, source, max_pixels, reduce)
            if dec is not None:
                return dec
        return decode_pillow(data, source, fmt, max_pixels)
    except DecodeError:
        raise
    except MemoryError:
        raise DecodeError(source, "too large: not enough memory to decode this image", kind="too_large") from None
    except Exception as exc:  # the codecs raise many types; all mean "bad data"
        raise DecodeError(source, f"corrupt {fmt} data: {reason_of(exc)}") from None


def _check_decoded(dec: Decoded, source: str | None) -> None:
    """Every decoder's contract, checked once: (H, W, C) of a `SAMPLE_DTYPES` type with one name per plane."""
    arr = dec.arr
    if arr.ndim != 3 or arr.dtype not in SAMPLE_DTYPES or arr.shape[2] != len(dec.names) \
            or min(arr.shape) < 1:
        raise DecodeError(source, f"corrupt image: decoded {arr.dtype} array of shape {arr.shape} for planes "
                                  f"{'/'.join(dec.names)}")


def _orientation(value: Any, notes: list[str]) -> int:
    """A valid orientation 1-8 from a raw tag value; anything else keeps the pixels as stored, noted."""
    if value is None:
        return 1
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 1 <= value <= 8:
        return int(value)
    notes.append(f"orientation tag {str(value)[:40]!r} is not a number 1-8; pixels kept as stored")
    return 1


def _planes(arr: np.ndarray, names: tuple, source: str | None, notes: tuple = (), nodata: Any = None) -> Planes:
    view = arr.transpose(2, 0, 1).view()  # (C, H, W) over the decoder's buffer, no copy
    view.flags.writeable = False  # Planes are values, not buffers to scribble on
    return Planes(data=view, bit_depth=8 * arr.dtype.itemsize, channels=names, source=source, warnings=notes,
                  nodata=nodata)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of an 8-bit gray or YCbCr JPEG as `read_image` returns it (orientation applied),
    read from its header alone; None for other files (the JPEGs that are never decoded at a reduced size)."""
    header = jpeg_header(data) if data[:3] == b"\xff\xd8\xff" else None
    if header is None or not header.fast:
        return None
    return (header.width, header.height) if _orientation(header.orientation, []) in (5, 6, 7, 8) \
        else (header.height, header.width)


def convert_planes(planes: Planes, *, channels: ChannelPolicy = "rgb", alpha: AlphaPolicy = "drop",
                   background: float = 0.0) -> Planes:
    """Apply `read_image`'s channel and alpha policies to already decoded planes.

    ``convert_planes(read_image(p, channels="native", alpha="keep"), channels=c, alpha=a)``
    equals ``read_image(p, channels=c, alpha=a)`` without decoding the file again.

    Associated (premultiplied) alpha is not known here: a TIFF with it composites
    correctly only through `read_image(..., alpha="composite")`.

    Raises:
      DecodeError: the planes cannot be mapped as asked (e.g. luma of planes other than R, G, B).
    """
    arr, names = _apply_policies(planes.hwc(), planes.channels, channels, alpha, background, planes.source)
    return _planes(arr, names, planes.source, planes.warnings)


# ---------------------------------------------------------------- policies

def _apply_policies(arr: np.ndarray, names: Sequence[str], channels: ChannelPolicy, alpha: AlphaPolicy,
                    background: float, source: str | None,
                    associated: bool = False) -> tuple[np.ndarray, tuple[str, ...]]:
    names = tuple(names)
    a_idx = names.index("A") if "A" in names else None
    alpha_plane = arr[:, :, a_idx:a_idx + 1] if a_idx is not None else None
    if a_idx is None:
        color, color_names = arr, names
    elif a_idx == len(names) - 1:
        color, color_names = arr[:, :, :a_idx], names[:a_idx]  # a view: the usual layout
    else:
        color, color_names = np.delete(arr, a_idx, axis=2), names[:a_idx] + names[a_idx + 1:]
    if alpha_plane is not None and alpha == "composite":
        if arr.dtype not in UNSIGNED_DTYPES:   # no full scale to blend against
            raise DecodeError(source, f"unsupported: alpha compositing of {arr.dtype} samples; use alpha drop "
                                      "or keep", kind="unsupported")
        color = _composite(color, alpha_plane, background, associated)
    if channels == "rgb" and color_names == ("L",):
        color, color_names = np.broadcast_to(color, color.shape[:2] + (3,)), ("R", "G", "B")
    elif channels == "rgb" and color_names[:3] == ("R", "G", "B"):
        color, color_names = color[:, :, :3], ("R", "G", "B")
    elif channels == "rgb" and len(color_names) > 1:
        raise DecodeError(source, f"cannot map planes {color_names} to R, G, B; use channels native "
                                  "(--channels native)",
                          kind="planes")
    elif channels == "gray" and color_names != ("L",):
        if arr.dtype not in UNSIGNED_DTYPES:   # luma is defined here in exact integer arithmetic
            raise DecodeError(source, f"cannot compute luma of {arr.dtype} planes {color_names}; use channels "
                                      "native (--channels native)", kind="planes")
        if color_names[:3] != ("R", "G", "B"):
            raise DecodeError(source, f"cannot compute luma from planes {color_names}; use channels native "
                                      "(--channels native)",
                              kind="planes")
        color, color_names = _luma(color[:, :, :3]), ("L",)
    if alpha_plane is not None and alpha == "keep":
        color = np.concatenate([color, alpha_plane], axis=2)
        color_names = color_names + ("A",)
    return color, color_names


_ROWS_ELEMENTS = 1 << 18  # pixels per block of rows for integer temporaries (a few MB)


def _composite(color: np.ndarray, alpha: np.ndarray, background: float, associated: bool) -> np.ndarray:
    """Blend over a constant background in exact integer arithmetic (round half up).

    uint32 is enough: c * a + bg * (top - a) + top // 2 <= 65535 * 65535 + 32767 < 2**32.
    Works a block of rows at a time, so memory stays near the output's size.
    Associated (premultiplied) alpha: the colour already holds c * a, so only the
    background's share is added.
    """
    top = int(np.iinfo(color.dtype).max)
    bg = int(round(background * top))
    h, w, _ = color.shape
    out = np.empty(color.shape, color.dtype)
    step = max(1, _ROWS_ELEMENTS // max(w, 1))
    for y in range(0, h, step):
        c = color[y:y + step].astype(np.uint32)
        a = alpha[y:y + step].astype(np.uint32)
        under = (np.uint32(top) - a) * np.uint32(bg) + np.uint32(top // 2)
        if associated:
            c += under // np.uint32(top)
            np.minimum(c, top, out=c)  # premultiplied colour above its alpha is invalid: clip
        else:
            c *= a
            c += under
            c //= np.uint32(top)
        out[y:y + step] = c
    return out


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma with Pillow's fixed-point weights (they sum to 65536).

    uint32 is enough: 65535 * 65536 + 32768 < 2**32; a block of rows at a time.
    """
    h, w, _ = rgb.shape
    out = np.empty((h, w, 1), rgb.dtype)
    step = max(1, _ROWS_ELEMENTS // max(w, 1))
    for y in range(0, h, step):
        block = rgb[y:y + step]
        acc = block[:, :, 0].astype(np.uint32) * np.uint32(19595)
        acc += block[:, :, 1].astype(np.uint32) * np.uint32(38470)
        acc += block[:, :, 2].astype(np.uint32) * np.uint32(7471)
        acc += np.uint32(0x8000)
        acc >>= np.uint32(16)
        out[y:y + step, :, 0] = acc
    return out
