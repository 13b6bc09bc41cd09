"""Per-format decoders: file bytes -> `Decoded` (interleaved pixels, plane names, raw orientation).

Each decoder returns the pixels exactly as stored (no orientation applied,
no channel policy), so `cnnpipe.images.decode` applies orientation and policies in
one place for every format. 16-bit PNG and TIFF go through imagecodecs
(libpng / libtiff), because Pillow keeps only the high byte of 16-bit colour;
gray/YCbCr JPEG through imagecodecs' libjpeg-turbo (the same library and
defaults as Pillow, without its copies); palette, CMYK, bilevel and 2/4-bit
TIFF, BMP, GIF, WebP and APNG through Pillow, which converts them exactly.

What the codecs say while decoding (libpng/libtiff/libjpeg on the C stderr,
Python warnings, tifffile's log) is captured by `codec_messages` and returned
as text, never printed raw.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from cnnpipe.fdcapture import stderr_lines

__all__ = ["DecodeError", "Decoded", "codec_messages", "decode_png", "decode_tiff", "decode_pillow",
           "jpeg_header", "exif_orientation_value", "MAX_SAMPLES_PER_PIXEL"]

# The pixel limit bounds samples too: at most this many samples per pixel of the
# limit (an RGBA image at the limit), so a many-sample TIFF cannot get past it.
MAX_SAMPLES_PER_PIXEL = 4


class DecodeError(ValueError):
    """An image could not be decoded; the message names the file and the reason."""

    def __init__(self, source: str | None, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source or '<bytes>'}: {reason}")


@dataclass
class Decoded:
    """One decoder's output, before orientation and channel policies.

    Attributes:
      arr: (H, W, C) uint8/uint16 pixels as stored.
      names: one name per plane, e.g. ("R", "G", "B", "A").
      orientation: the raw EXIF/TIFF orientation value (any type; `decode` validates it), or None.
      associated_alpha: the colour planes are premultiplied by "A" (TIFF ExtraSamples = 1).
    """

    arr: np.ndarray
    names: tuple[str, ...]
    orientation: Any = None
    associated_alpha: bool = False


def reason_of(exc: BaseException) -> str:
    """First line of an exception's text (at most 200 characters), or its type name."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def check_pixels(source: str | None, width: int, height: int, max_pixels: int | None, samples: int = 1) -> None:
    """DecodeError for a non-positive size, over `max_pixels` pixels, or over 4x that many samples."""
    if width <= 0 or height <= 0:
        raise DecodeError(source, f"invalid image size {width}x{height}")
    if max_pixels is None:
        return
    if width * height > max_pixels:
        raise DecodeError(source, f"image is {width}x{height} = {width * height:,} pixels, over the "
                                  f"limit of {max_pixels:,} (max_pixels); raise the limit if you trust this file")
    if width * height * samples > max_pixels * MAX_SAMPLES_PER_PIXEL:
        raise DecodeError(source, f"image is {width}x{height} with {samples} samples per pixel, over the limit "
                                  f"of {max_pixels * MAX_SAMPLES_PER_PIXEL:,} samples ({MAX_SAMPLES_PER_PIXEL} "
                                  "per pixel of max_pixels); raise the limit if you trust this file")


# ---------------------------------------------------------------- codec messages

_MAX_MESSAGES = 5
# imagecodecs logs libpng/libtiff warnings ("PNG warning: tEXt: CRC error"); tifffile logs its own
_CODEC_LOGGERS = ("imagecodecs", "tifffile")


class _ListHandler(logging.Handler):
    def __init__(self, out: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record.getMessage())


@contextlib.contextmanager
def codec_messages() -> Iterator[list[str]]:
    """Collect what codecs print or warn while the block runs, instead of letting it reach stderr.

    Yields a list that holds, after the block, the distinct messages (at most 5,
    one line each): C-level stderr output of libpng/libtiff/libjpeg, Python
    warnings (Pillow's EXIF warnings) and imagecodecs'/tifffile's log records. File
    descriptor 2 is process-wide, so blocks are serialised by a lock; cnnpipe
    decodes in worker processes, not threads, so this costs no parallelism.
    """
    raw: list[str] = []
    out: list[str] = []
    handler = _ListHandler(raw)
    loggers = [logging.getLogger(name) for name in _CODEC_LOGGERS]
    printed: list[str] = []
    caught: list[Any] = []
    try:
        with stderr_lines() as printed, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            propagate = [lg.propagate for lg in loggers]
            for lg in loggers:
                lg.addHandler(handler)
                lg.propagate = False
            try:
                yield out
            finally:
                for lg, prop in zip(loggers, propagate):
                    lg.removeHandler(handler)
                    lg.propagate = prop
    finally:
        for line in [*raw, *printed, *(str(w.message) for w in caught)]:
            line = " ".join(line.split())[:200]
            if line and line not in out and len(out) < _MAX_MESSAGES:
                out.append(line)


# ---------------------------------------------------------------- EXIF

def exif_orientation_value(raw: bytes | None) -> Any:
    """The orientation entry of a raw EXIF block (with or without the "Exif\\0\\0" prefix), or None.

    The value is returned as found (it may be text, bytes or out of range);
    `cnnpipe.images.decode` validates it. Broken EXIF gives None: optional metadata is
    never a reason to refuse the pixels.
    """
    if not raw:
        return None
    exif = Image.Exif()
    try:
        exif.load(raw)
        return exif.get(0x0112)
    except Exception:
        return None


# ---------------------------------------------------------------- PNG

def _png_chunks(data: bytes, source: str | None) -> dict[bytes, int]:
    """Walk chunk headers (not their CRCs; libpng checks those) to name truncation precisely."""
    pos, seen = 8, {}
    while True:
        if pos + 8 > len(data):
            raise DecodeError(source, f"truncated PNG: file ends at byte {len(data)} before the IEND chunk")
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            name = ctype.decode("latin-1", "replace")
            raise DecodeError(source, f"truncated PNG: file ends at byte {len(data)} inside chunk {name} "
                                      f"(needs {end} bytes)")
        seen.setdefault(ctype, pos)
        if ctype == b"IEND":
            return seen
        pos = end


def decode_png(data: bytes, source: str | None, max_pixels: int | None) -> Decoded:
    """PNG of every colour type and depth; libpng expands palette, low-depth gray and tRNS."""
    import imagecodecs

    if len(data) < 33 or data[12:16] != b"IHDR":
        raise DecodeError(source, "corrupt PNG: missing IHDR header")
    width, height, depth = struct.unpack(">IIB", data[16:25])
    check_pixels(source, width, height, max_pixels)
    chunks = _png_chunks(data, source)
    if b"IDAT" not in chunks:
        raise DecodeError(source, "corrupt PNG: no image data (IDAT chunk)")
    orientation = None
    if b"eXIf" in chunks:
        pos = chunks[b"eXIf"]
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        orientation = exif_orientation_value(data[pos + 8:pos + 8 + length])
    if b"acTL" in chunks and chunks[b"acTL"] < chunks[b"IDAT"] and depth <= 8:
        # Animated 8-bit PNG: Pillow picks the first frame (and composes it) exactly.
        return Decoded(*_pillow_pixels(data, source, "PNG", max_pixels)[:2], orientation)
    arr = imagecodecs.png_decode(data)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype not in (np.uint8, np.uint16):
        raise DecodeError(source, f"unsupported PNG sample type {arr.dtype}")
    # libpng expands palette -> RGB(A), 1/2/4-bit gray -> 8-bit by bit replication
    # (PNG spec 13.12), and a tRNS colour key -> an alpha plane.
    names = {1: ("L",), 2: ("L", "A"), 3: ("R", "G", "B"), 4: ("R", "G", "B", "A")}[arr.shape[2]]
    return Decoded(arr, names, orientation)


# ---------------------------------------------------------------- TIFF

_MINISWHITE, _MINISBLACK, _RGB = 0, 1, 2
# Pillow applies a TIFF's orientation on load; these undo it (2-5 and 7 are their own inverse).
_INVERSE_ORIENTATION = {2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


def decode_tiff(data: bytes, source: str | None, max_pixels: int | None) -> Decoded:
    """8/16-bit gray and RGB(A) TIFF through libtiff; palette, CMYK, YCbCr, Lab and 1/2/4-bit through Pillow."""
    import imagecodecs
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        if not tif.pages:
            raise DecodeError(source, "corrupt TIFF: no image directory")
        page = tif.pages.first
        width, height = int(page.imagewidth), int(page.imagelength)
        spp = int(page.samplesperpixel)
        check_pixels(source, width, height, max_pixels, samples=spp)
        bits, fmt, photometric = int(page.bitspersample), int(page.sampleformat), int(page.photometric)
        extras = tuple(int(e) for e in page.extrasamples)
        planar_separate = int(page.planarconfig) == 2
        orientation = page.tags.valueof(274)
        stack = _channel_stack(tif, source, max_pixels) if len(tif.pages) > 1 and spp == 1 else None
    if stack is not None:
        arr, names = stack
        if photometric == _MINISWHITE:
            arr = np.iinfo(arr.dtype).max - arr
        return Decoded(arr, names, orientation)
    if fmt != 1 or bits not in (1, 2, 4, 8, 16):
        kind = {1: "unsigned", 2: "signed", 3: "float"}.get(fmt, f"format {fmt}")
        raise DecodeError(source, f"unsupported TIFF samples: {bits}-bit {kind} "
                                  "(cnnpipe reads 1/2/4/8-bit and 16-bit unsigned images)")
    if photometric not in (_MINISWHITE, _MINISBLACK, _RGB) or bits < 8:
        if bits == 16:
            raise DecodeError(source, f"unsupported 16-bit TIFF photometric interpretation {photometric} "
                                      "(16-bit TIFF must be gray or RGB)")
        arr, names, applied = _pillow_pixels(data, source, "TIFF", max_pixels)
        undo = _INVERSE_ORIENTATION.get(applied) if isinstance(applied, int) else None
        return Decoded(orient(arr, undo) if undo else arr, names, orientation)
    color = 3 if photometric == _RGB else 1
    if spp < color:
        raise DecodeError(source, f"corrupt TIFF: photometric RGB with {spp} sample(s) per pixel (needs 3)")
    arr = imagecodecs.tiff_decode(data, index=0)
    if planar_separate and arr.ndim == 3 and arr.shape[0] == spp and arr.shape[-1] != spp:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[:2] != (height, width) or arr.shape[2] < color:
        raise DecodeError(source, f"corrupt TIFF: decoded shape {arr.shape} does not match {width}x{height} "
                                  f"with {spp} sample(s) per pixel")
    if photometric == _MINISWHITE:
        arr = np.iinfo(arr.dtype).max - arr
    names = ("R", "G", "B") if color == 3 else ("L",)
    n_extra = arr.shape[2] - color
    # ExtraSamples 1/2 = associated/unassociated alpha; anything else is just a plane.
    has_alpha = bool(extras) and extras[0] in (1, 2)
    extra_names = tuple("A" if i == 0 and has_alpha else f"S{color + i}" for i in range(n_extra))
    if color == 1 and n_extra >= 2 and not has_alpha:
        # a multi-channel gray stack (microscopy, spectral bands): no plane is "the" luma
        names, extra_names = ("S0",), tuple(f"S{i}" for i in range(1, arr.shape[2]))
    return Decoded(arr, names + extra_names, orientation, associated_alpha=has_alpha and extras[0] == 1)


def _channel_stack(tif: Any, source: str | None, max_pixels: int | None
                   ) -> tuple[np.ndarray, tuple[str, ...]] | None:
    """A multi-page TIFF whose pages are channels (ImageJ or OME axes "CYX"): (H, W, C) and plane names.

    Names come from the file (OME-XML channel names, ImageJ labels) when there is one per
    channel, else "S0".."Sn". Other multi-page files (z-stacks, time series, pages without
    axes) keep their first page, as before.
    """
    series = tif.series[0]
    if series.axes != "CYX" or series.dtype not in (np.uint8, np.uint16):
        return None
    c, h, w = (int(n) for n in series.shape)
    check_pixels(source, w, h, max_pixels, samples=c)
    names: list[str] = []
    if tif.is_ome:
        names = re.findall(r'<Channel\b[^>]*\bName="([^"]*)"', tif.ome_metadata or "")
    elif tif.is_imagej:
        names = [str(x) for x in (tif.imagej_metadata or {}).get("Labels") or []]
    names = [n.strip() for n in names]
    if len(names) != c or len(set(names)) != c or not all(names) or "A" in names:
        names = [f"S{i}" for i in range(c)]
    return np.ascontiguousarray(series.asarray().transpose(1, 2, 0)), tuple(names)


# ---------------------------------------------------------------- JPEG and Pillow

def jpeg_header(data: bytes) -> tuple[int, int, int, Any] | None:
    """(width, height, components, raw orientation) from the markers before the scan, or None.

    A few hundred bytes of marker walking instead of a full ``Image.open``,
    which costs more than decoding a small JPEG's header should.
    """
    pos, orientation, n = 2, None, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\x00\x00" and orientation is None:
            orientation = exif_orientation_value(data[pos + 10:pos + 2 + length])
        elif marker in (0xC0, 0xC1, 0xC2):  # baseline, extended, progressive Huffman
            if pos + 10 > n:
                return None
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height, data[pos + 9], orientation
        elif marker in (0xDA, 0xD9) or 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return None  # scan before frame, or lossless/arithmetic: leave it to Pillow
        pos += 2 + length
    return None


def _decode_jpeg_fast(data: bytes, source: str | None, max_pixels: int | None, reduce: int) -> Decoded | None:
    """Gray and YCbCr JPEG: libjpeg-turbo through imagecodecs at full size, Pillow's draft mode
    (a DCT-domain 1/2, 1/4 or 1/8 decode) when `reduce` > 1; None leaves the file to Pillow."""
    import imagecodecs

    header = jpeg_header(data)
    if header is None or header[2] not in (1, 3):
        return None  # CMYK/YCCK and unusual streams: Pillow converts them
    width, height, components, orientation = header
    check_pixels(source, width, height, max_pixels, samples=components)
    if not data[-64:].rstrip(b"\x00").endswith(b"\xff\xd9"):
        # Truncated, or valid with trailing bytes after EOI (some cameras append
        # data): Pillow tells the two apart and names a truncation as such.
        return None
    names = ("L",) if components == 1 else ("R", "G", "B")
    if reduce > 1:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
            im.draft(im.mode, (max(1, width // reduce), max(1, height // reduce)))
            im.load()
            arr = np.asarray(im)
        return Decoded(arr[:, :, None] if arr.ndim == 2 else arr, names, orientation)
    arr = imagecodecs.jpeg8_decode(data)
    if arr.dtype != np.uint8:
        raise DecodeError(source, f"unsupported JPEG sample precision ({arr.dtype}); cnnpipe reads 8-bit JPEG")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape != (height, width, components):
        raise DecodeError(source, f"corrupt JPEG: decoded shape {arr.shape} does not match header")
    return Decoded(arr, names, orientation)


def decode_pillow(data: bytes, source: str | None, fmt: str, max_pixels: int | None, reduce: int = 1) -> Decoded:
    """JPEG (gray/YCbCr fast, CMYK through Pillow), BMP, GIF, WebP: the first frame, exactly as Pillow gives it."""
    if fmt == "JPEG":
        fast = _decode_jpeg_fast(data, source, max_pixels, reduce)
        if fast is not None:
            return fast
    arr, names, exif = _pillow_pixels(data, source, fmt, max_pixels)
    return Decoded(arr, names, exif)


def _pillow_pixels(data: bytes, source: str | None, fmt: str,
                   max_pixels: int | None) -> tuple[np.ndarray, tuple[str, ...], Any]:
    """(pixels, names, orientation) through Pillow. For TIFF the orientation is the one
    Pillow has already applied on load; for other formats the raw EXIF entry (XMP is ignored)."""
    with warnings.catch_warnings():
        # Our own max_pixels check replaces Pillow's bomb warning; Pillow's hard
        # limit (2x its default) still raises and is reported below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=[fmt])
        except Image.DecompressionBombError as exc:
            raise DecodeError(source, f"image over Pillow's hard pixel limit: {reason_of(exc)}") from None
        except Exception as exc:
            raise DecodeError(source, _pillow_reason(fmt, exc)) from None
        with im:
            check_pixels(source, im.width, im.height, max_pixels, samples=len(im.getbands()))
            if fmt == "TIFF":
                orientation = im.getexif().get(0x0112)  # what Pillow's load will apply
            else:
                orientation = exif_orientation_value(im.info.get("exif"))
            try:
                im.seek(0)  # animated GIF / WebP / APNG: the first frame
                im.load()
            except Exception as exc:
                raise DecodeError(source, _pillow_reason(fmt, exc)) from None
            arr, names = _pillow_to_array(im, source)
    return arr, names, orientation


def _pillow_reason(fmt: str, exc: BaseException) -> str:
    text = reason_of(exc)
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"truncated {fmt}: {text}"
    return f"corrupt {fmt} data: {text}"


def _pillow_to_array(im: Image.Image, source: str | None) -> tuple[np.ndarray, tuple[str, ...]]:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(im).astype(np.uint16, copy=False)[:, :, None], ("L",)
    if mode in ("I", "F", "I;32"):
        raise DecodeError(source, f"unsupported pixel mode {mode} (32-bit); cnnpipe reads 8- and 16-bit images")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    if mode in ("1", "L"):
        target = "LA" if "transparency" in im.info else "L"
    elif mode in ("LA", "La"):
        target = "LA"
    else:
        target = "RGBA" if has_alpha else "RGB"
    if mode != target:
        try:
            im = im.convert(target)
        except ValueError as exc:  # e.g. LAB: Pillow has no exact conversion to RGB
            raise DecodeError(source, f"unsupported pixel mode {mode} ({reason_of(exc)})") from None
    arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    names = {"L": ("L",), "LA": ("L", "A"), "RGB": ("R", "G", "B"), "RGBA": ("R", "G", "B", "A")}[target]
    return arr, names


def orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an (H, W, C) array, as Pillow's exif_transpose does (a view)."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
        8: lambda a: np.rot90(a, 1),
    }
    op = ops.get(orientation)
    return op(arr) if op else arr
