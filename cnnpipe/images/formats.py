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
import os
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnnpipe.fdcapture import stderr_lines

__all__ = ["DecodeError", "DECODE_ERROR_KINDS", "Decoded", "codec_messages", "decode_png", "decode_pillow", "decode_jpeg2000",
           "display_path", "path_from_display", "exif_orientation_value", "MAX_SAMPLES_PER_PIXEL", "reason_of",
           "check_pixels", "orient", "pillow_pixels"]

# The pixel limit bounds samples too: at most this many samples per pixel of the
# limit (an RGBA image at the limit), so a many-sample TIFF cannot get past it.
MAX_SAMPLES_PER_PIXEL = 4


DECODE_ERROR_KINDS = ("unsupported", "corrupt", "too_large", "empty", "not_image", "unreadable", "planes",
                      "no_data")


class DecodeError(ValueError):
    """An image could not be decoded; the message names the file and the reason.

    Attributes:
      source: the path (surrogate-escaped str for names that are not UTF-8), or None for bytes.
      reason: the reason alone, deterministic (no object addresses or temporary paths).
      kind: "unsupported" (a valid file using a feature cnnpipe does not decode; the
        reason names it), "corrupt" (damaged or truncated data), "too_large" (over
        max_pixels), "empty", "not_image", "unreadable" (the file cannot be read) or
        "planes" (the image's planes cannot be given as asked) or
        "no_data" (every sample is NaN, Inf or the file's nodata value).
    """

    def __init__(self, source: str | None, reason: str, kind: str = "corrupt") -> None:
        if kind not in DECODE_ERROR_KINDS:
            raise ValueError(f"DecodeError kind: got {kind!r}; expected one of {DECODE_ERROR_KINDS}")
        self.source = source
        self.reason = reason
        self.kind = kind
        super().__init__(f"{display_path(source) if source else '<bytes>'}: {reason}")


def display_path(path: str | os.PathLike) -> str:
    r"""A path as text that can always be printed and read back (`path_from_display`).

    File names are bytes to the operating system; Python gives names that are not
    valid UTF-8 as surrogate escapes, which cannot be encoded for a terminal, a JSON
    file or a CSV. Here every byte that is not part of valid UTF-8, and every control
    character (newline, ESC), becomes ``\xNN``, and a backslash becomes ``\\``: the
    Latin-1 name ``b"caf\xe9.png"`` reads ``caf\xe9.png``. Valid UTF-8 names without
    backslashes or control characters are unchanged.
    """
    raw = os.fsencode(path).replace(b"\\", b"\\\\")
    # control characters (a newline, an ESC sequence in a name) are escaped as well
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", raw.decode("utf-8", "backslashreplace"))


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def path_from_display(text: str) -> str:
    """The path `display_path` gave `text` for (surrogate-escaped str, as `os.fsdecode` gives)."""
    raw = re.sub(rb"\\(\\|x[0-9a-f]{2})",
                 lambda m: b"\\" if m.group(1) == b"\\" else bytes([int(m.group(1)[1:], 16)]),
                 text.encode("utf-8"))
    return os.fsdecode(raw)


@dataclass
class Decoded:
    """One decoder's output, before orientation and channel policies.

    Attributes:
      arr: (H, W, C) pixels as stored: uint8/uint16, or a type of `SCIENTIFIC_DTYPES` (TIFF, JPEG 2000).
      names: one name per plane, e.g. ("R", "G", "B", "A").
      orientation: the raw EXIF/TIFF orientation value (any type; `decode` validates it), or None.
      associated_alpha: the colour planes are premultiplied by "A" (TIFF ExtraSamples = 1).
      notes: what the decoder chose without costing pixels (e.g. "3 pages; page 1 kept").
    """

    arr: np.ndarray
    names: tuple[str, ...]
    orientation: Any = None
    associated_alpha: bool = False
    notes: tuple[str, ...] = ()
    nodata: float | None = None   # a TIFF's GDAL_NODATA value


_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def reason_of(exc: BaseException) -> str:
    """First line of an exception's text (at most 200 characters), or its type name.

    Object reprs with addresses (``<_io.BytesIO object at 0x7f...>``) become
    ``<_io.BytesIO object>``: a reason must read the same in every run.
    """
    text = _OBJECT_REPR.sub(r"<\1 object>", str(exc).strip()) or type(exc).__name__
    return text.splitlines()[0][:200]


def check_pixels(source: str | None, width: int, height: int, max_pixels: int | None, samples: int = 1) -> None:
    """DecodeError for a non-positive size, over `max_pixels` pixels, or over 4x that many samples."""
    if width <= 0 or height <= 0:
        raise DecodeError(source, f"invalid image size {width}x{height}")
    if max_pixels is None:
        return
    if width * height > max_pixels:
        raise DecodeError(source, f"too large: image is {width}x{height} = {width * height:,} pixels, over the "
                                  f"limit of {max_pixels:,} (max_pixels); raise the limit if you trust this file",
                          kind="too_large")
    if width * height * samples > max_pixels * MAX_SAMPLES_PER_PIXEL:
        raise DecodeError(source, f"too large: image is {width}x{height} with {samples} samples per pixel, over "
                                  f"the limit of {max_pixels * MAX_SAMPLES_PER_PIXEL:,} samples "
                                  f"({MAX_SAMPLES_PER_PIXEL} per pixel of max_pixels); raise the limit if you trust "
                                  "this file", kind="too_large")


# ---------------------------------------------------------------- codec messages

_MAX_MESSAGES = 5
# imagecodecs logs libpng/libtiff warnings ("PNG warning: tEXt: CRC error"); tifffile logs its own
_CODEC_LOGGERS = ("imagecodecs", "tifffile")
# Python warnings are caught process-wide: only those raised from these packages are the image's
_CODEC_PACKAGES = ("PIL", "tifffile", "imagecodecs", "cnnpipe")


def _from_codec(w: warnings.WarningMessage) -> bool:
    """Whether a caught warning came from decoding (not from another thread or the garbage collector)."""
    parts = os.path.normpath(w.filename or "").split(os.sep)
    return not issubclass(w.category, ResourceWarning) and any(p in parts for p in _CODEC_PACKAGES)


class _ListHandler(logging.Handler):
    def __init__(self, out: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record.getMessage())


# blocks are serialised by `stderr_lines`' lock: one block at a time has this handler on the codec loggers
_HANDLER = _ListHandler([])


@contextlib.contextmanager
def codec_messages() -> Iterator[list[str]]:
    """Collect what codecs print or warn while the block runs, instead of letting it reach stderr.

    Yields a list that holds, after the block, the distinct messages (at most 5,
    one line each): C-level stderr output of libpng/libtiff/libjpeg, Python
    warnings raised in Pillow, tifffile, imagecodecs or cnnpipe (Pillow's EXIF
    warnings) and imagecodecs'/tifffile's log records. Other warnings caught meanwhile
    (another thread's, an unclosed file's ResourceWarning) are issued again, not kept.
    File descriptor 2 is process-wide, so blocks are serialised by a lock; cnnpipe
    decodes in worker processes, not threads, so this costs no parallelism.
    """
    raw: list[str] = []
    out: list[str] = []
    handler = _HANDLER
    loggers = [logging.getLogger(name) for name in _CODEC_LOGGERS]
    printed: list[str] = []
    caught: list[Any] = []
    try:
        with stderr_lines() as printed, warnings.catch_warnings(record=True) as caught:
            handler.out = raw   # one handler for every block (making one per file costs more than the block)
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
        for w in caught:
            if not _from_codec(w):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        for line in [*raw, *printed, *(str(w.message) for w in caught if _from_codec(w))]:
            line = " ".join(line.split())[:200]
            if "parsing GDAL_NODATA tag" in line:   # tifffile's own parse; cnnpipe reads the tag itself (tiff.py)
                continue
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
        return Decoded(*pillow_pixels(data, source, "PNG", max_pixels)[:2], orientation)
    arr = imagecodecs.png_decode(data)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype not in (np.uint8, np.uint16):
        raise DecodeError(source, f"unsupported: PNG sample type {arr.dtype}", kind="unsupported")
    # libpng expands palette -> RGB(A), 1/2/4-bit gray -> 8-bit by bit replication
    # (PNG spec 13.12), and a tRNS colour key -> an alpha plane.
    names = {1: ("L",), 2: ("L", "A"), 3: ("R", "G", "B"), 4: ("R", "G", "B", "A")}[arr.shape[2]]
    return Decoded(arr, names, orientation)


# ---------------------------------------------------------------- JPEG 2000

def _jpeg2000_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JP2 file's ihdr box or a J2K codestream's SIZ marker."""
    if data[:4] == b"\xff\x4f\xff\x51" and len(data) >= 42:
        xs, ys, xo, yo = struct.unpack(">IIII", data[8:24])
        return xs - xo, ys - yo, struct.unpack(">H", data[40:42])[0]
    at = data.find(b"ihdr", 0, 4096)
    if at >= 0 and len(data) >= at + 14:
        height, width, comps = struct.unpack(">IIH", data[at + 4:at + 14])
        return width, height, comps
    return None


# what a decoder may return: unsigned 8/16-bit (every container), and the scientific types TIFF and
# JPEG 2000 hold (signed integers, unsigned 32-bit, floats), values as stored
UNSIGNED_DTYPES = frozenset({np.dtype(np.uint8), np.dtype(np.uint16)})
SCIENTIFIC_DTYPES = frozenset(np.dtype(t) for t in (np.int8, np.int16, np.int32, np.uint32, np.float16, np.float32,
                                                    np.float64))
SAMPLE_DTYPES = UNSIGNED_DTYPES | SCIENTIFIC_DTYPES


def decode_jpeg2000(data: bytes, source: str | None, max_pixels: int | None) -> Decoded:
    """JPEG 2000 (JP2 file or J2K codestream) through OpenJPEG (imagecodecs), values as stored.

    Precisions up to 8 bits give uint8, 9-16 bits uint16 (a 12-bit band stays 0..4095); signed
    components give int8/int16/int32 as OpenJPEG decodes them; 1/2/3/4 components are L / LA /
    RGB / RGBA, more are planes S0..Sn (multispectral).
    """
    import imagecodecs

    size = _jpeg2000_size(data)
    if size is None:
        raise DecodeError(source, "corrupt JPEG 2000: no image header (ihdr box or SIZ marker)")
    check_pixels(source, size[0], size[1], max_pixels, samples=size[2])
    arr = imagecodecs.jpeg2k_decode(data)
    if arr.dtype not in SAMPLE_DTYPES:
        raise DecodeError(source, f"unsupported: JPEG 2000 with {arr.dtype} samples", kind="unsupported")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    c = arr.shape[2]
    names = {1: ("L",), 2: ("L", "A"), 3: ("R", "G", "B"), 4: ("R", "G", "B", "A")}.get(c)
    return Decoded(arr, names or tuple(f"S{i}" for i in range(c)))


# ---------------------------------------------------------------- Pillow

def decode_pillow(data: bytes, source: str | None, fmt: str, max_pixels: int | None) -> Decoded:
    """BMP, GIF, WebP, and the JPEG and TIFF kinds Pillow converts exactly: the first frame, as Pillow gives it."""
    arr, names, exif = pillow_pixels(data, source, fmt, max_pixels)
    return Decoded(arr, names, exif)


def pillow_pixels(data: bytes, source: str | None, fmt: str,
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
            raise DecodeError(source, f"too large: over Pillow's hard pixel limit: {reason_of(exc)}",
                              kind="too_large") from None
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
    if isinstance(exc, UnidentifiedImageError):  # its text holds the stream's repr: say what it means
        return f"corrupt {fmt} data: no decodable {fmt} image in the file"
    text = reason_of(exc)
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"truncated {fmt}: {text}"
    return f"corrupt {fmt} data: {text}"


def _pillow_to_array(im: Image.Image, source: str | None) -> tuple[np.ndarray, tuple[str, ...]]:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(im).astype(np.uint16, copy=False)[:, :, None], ("L",)
    if mode in ("I", "F", "I;32"):
        raise DecodeError(source, f"unsupported: 32-bit pixel mode {mode}; cnnpipe reads 8- and 16-bit images",
                          kind="unsupported")
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
            raise DecodeError(source, f"unsupported: pixel mode {mode} ({reason_of(exc)})",
                              kind="unsupported") from None
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
