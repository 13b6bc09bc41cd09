"""Decode stage: image bytes -> exact channel planes (`Planes`).

Every pixel value comes out exactly as stored. Pillow (even 13.0) keeps only
the high byte of 16-bit RGB/RGBA PNG and TIFF files, so those go through
imagecodecs (libpng / libtiff), which is lossless and also faster than Pillow
for 8-bit PNG, JPEG and TIFF. Pillow handles what it decodes exactly (palette
images, BMP, GIF, WebP, CMYK JPEG, APNG) and parses headers and EXIF.

Formats are recognised by magic bytes from an allow-list, never by extension.
No global state of Pillow is touched: the pixel limit is our own check and
truncated files are errors (``LOAD_TRUNCATED_IMAGES`` is never set).
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_FORMATS",
    "DecodeError",
    "Planes",
    "check_format",
    "convert_planes",
    "read_image",
    "sniff_format",
]

# Pillow's own default bomb limit; ours is a parameter, Pillow's global is left alone.
DEFAULT_MAX_PIXELS: int = 89_478_485

IMAGE_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF"})

ChannelPolicy = Literal["rgb", "native", "gray"]
AlphaPolicy = Literal["drop", "keep", "composite"]

# Recognised but refused: naming them turns "not an image" into a precise reason.
_KNOWN_UNSUPPORTED: tuple[tuple[bytes, str], ...] = (
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
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

_SUPPORTED_TEXT = "PNG, JPEG, TIFF, BMP, WebP, GIF"


class DecodeError(ValueError):
    """An image could not be decoded; the message names the file and the reason."""

    def __init__(self, source: str | None, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source or '<bytes>'}: {reason}")


@dataclass(frozen=True)
class Planes:
    """An image split into channel matrices, values exactly as stored.

    Attributes:
      data: (C, H, W) array, uint8 or uint16, read-only. It may be a strided
        view of the decoder's interleaved (H, W, C) buffer (no copy is made);
        use ``np.ascontiguousarray(planes.data)`` for planar memory.
      bit_depth: 8 or 16.
      channels: plane names, e.g. ("R", "G", "B"), ("L",), ("R", "G", "B", "A").
      source: the file path, or None for bytes input.
    """

    data: np.ndarray
    bit_depth: int
    channels: tuple[str, ...]
    source: str | None = None

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
        """Full-scale value of the dtype: 255 or 65535."""
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

    Returns one of "PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF".
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
    return None


def check_format(head: bytes, source: str | None = None) -> str:
    """The allow-listed format of a file from its first bytes (32 suffice), as `sniff_format`.

    Raises:
      DecodeError: naming `source` and why: empty, a known unsupported format, or not an image.
    """
    if not head:
        raise DecodeError(source, "empty file (0 bytes)")
    fmt = sniff_format(head[:32])
    if fmt is None:
        other = _unsupported_name(head[:32])
        if other:
            raise DecodeError(source, f"unsupported image format {other}; supported: {_SUPPORTED_TEXT}")
        raise DecodeError(source, f"not a recognised image (first bytes {head[:8]!r}); "
                                  f"supported: {_SUPPORTED_TEXT}")
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
        tRNS colour key counts as alpha.
      background: composite background as a fraction of full scale (0 black, 1 white).
      exif_orientation: apply the EXIF/TIFF orientation tag (default True).
      max_pixels: refuse images with more pixels (decompression-bomb guard);
        None disables the check.

    Returns:
      `Planes` with uint8 data (bit_depth 8) or uint16 data (bit_depth 16).

    Raises:
      DecodeError: empty, truncated, corrupt, non-image, unsupported or oversized input.

    Example:
      >>> planes = read_image("scan.tif")          # doctest: +SKIP
      >>> planes.bit_depth, planes.channels         # doctest: +SKIP
      (16, ('R', 'G', 'B'))
    """
    if channels not in ("rgb", "native", "gray"):
        raise ValueError(f"channels must be 'rgb', 'native' or 'gray', got {channels!r}")
    if alpha not in ("drop", "keep", "composite"):
        raise ValueError(f"alpha must be 'drop', 'keep' or 'composite', got {alpha!r}")
    if not 0.0 <= background <= 1.0:  # checked here, not only when an image happens to have alpha
        raise ValueError(f"background must be in [0, 1], got {background}")
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, source = bytes(src), None
    else:
        source = os.fspath(src)
        try:
            with open(source, "rb") as f:
                data = f.read()
        except IsADirectoryError:
            raise DecodeError(source, "is a directory, not an image file") from None
        except OSError as exc:
            raise DecodeError(source, f"cannot read file: {exc.strerror or exc}") from None
    return _decode(data, source, channels, alpha, background, exif_orientation, max_pixels)


def _decode(data: bytes, source: str | None, channels: ChannelPolicy, alpha: AlphaPolicy,
            background: float, exif_orientation: bool, max_pixels: int | None) -> Planes:
    fmt = check_format(data, source)
    try:
        if fmt == "PNG":
            arr, names, orientation = _decode_png(data, source, max_pixels)
        elif fmt == "TIFF":
            arr, names, orientation = _decode_tiff(data, source, max_pixels)
        else:
            arr, names, orientation = _decode_pillow(data, source, fmt, max_pixels)
    except DecodeError:
        raise
    except Exception as exc:  # the codecs raise many types; all mean "bad data"
        raise DecodeError(source, f"corrupt {fmt} data: {_reason(exc)}") from exc
    if exif_orientation and orientation not in (None, 1):
        arr = _orient(arr, orientation)
    arr, names = _apply_policies(arr, names, channels, alpha, background, source)
    return _planes(arr, names, source)


def _planes(arr: np.ndarray, names: tuple[str, ...], source: str | None) -> Planes:
    view = arr.transpose(2, 0, 1).view()  # (C, H, W) over the decoder's buffer, no copy
    view.flags.writeable = False  # Planes are values, not buffers to scribble on
    return Planes(data=view, bit_depth=16 if arr.dtype == np.uint16 else 8, channels=names, source=source)


def convert_planes(planes: Planes, *, channels: ChannelPolicy = "rgb", alpha: AlphaPolicy = "drop",
                   background: float = 0.0) -> Planes:
    """Apply `read_image`'s channel and alpha policies to already decoded planes.

    ``convert_planes(read_image(p, channels="native", alpha="keep"), channels=c, alpha=a)``
    equals ``read_image(p, channels=c, alpha=a)`` without decoding the file again.

    Raises:
      DecodeError: the planes cannot be mapped as asked (e.g. luma of planes other than R, G, B).
    """
    arr, names = _apply_policies(planes.hwc(), planes.channels, channels, alpha, background, planes.source)
    return _planes(arr, names, planes.source)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _check_pixels(source: str | None, width: int, height: int, max_pixels: int | None) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(source, f"invalid image size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise DecodeError(source, f"image is {width}x{height} = {width * height:,} pixels, over the "
                                  f"limit of {max_pixels:,} (max_pixels); raise the limit if you trust this file")


# ---------------------------------------------------------------- PNG

_PNG_GRAY, _PNG_RGB, _PNG_PALETTE, _PNG_GRAY_ALPHA, _PNG_RGBA = 0, 2, 3, 4, 6
_libpng_stderr_lock = threading.Lock()


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


def _decode_png(data: bytes, source: str | None, max_pixels: int | None):
    import imagecodecs

    if len(data) < 33 or data[12:16] != b"IHDR":
        raise DecodeError(source, "corrupt PNG: missing IHDR header")
    width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    _check_pixels(source, width, height, max_pixels)
    chunks = _png_chunks(data, source)
    if b"IDAT" not in chunks:
        raise DecodeError(source, "corrupt PNG: no image data (IDAT chunk)")
    orientation = _png_orientation(data, chunks)
    if b"acTL" in chunks and chunks[b"acTL"] < chunks[b"IDAT"] and depth <= 8:
        # Animated 8-bit PNG: Pillow picks the first frame (and composes it) exactly.
        arr, names, _ = _decode_pillow(data, source, "PNG", max_pixels)
        return arr, names, orientation
    if interlace:
        # libpng warns on stderr for interlaced input through imagecodecs'
        # simple read path (the result is correct); keep user output clean.
        with _libpng_stderr_lock, _silence_fd(2):
            arr = imagecodecs.png_decode(data)
    else:
        arr = imagecodecs.png_decode(data)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype not in (np.uint8, np.uint16):
        raise DecodeError(source, f"unsupported PNG sample type {arr.dtype}")
    # libpng expands palette -> RGB(A), 1/2/4-bit gray -> 8-bit by bit replication
    # (PNG spec 13.12), and a tRNS colour key -> an alpha plane.
    names = {1: ("L",), 2: ("L", "A"), 3: ("R", "G", "B"), 4: ("R", "G", "B", "A")}[arr.shape[2]]
    return arr, names, orientation


def _png_orientation(data: bytes, chunks: dict[bytes, int]) -> int | None:
    pos = chunks.get(b"eXIf")
    if pos is None:
        return None
    length = struct.unpack(">I", data[pos:pos + 4])[0]
    return _exif_orientation(data[pos + 8:pos + 8 + length])


def _exif_orientation(raw: bytes) -> int | None:
    """The orientation tag of a raw EXIF block (TIFF header onwards), or None."""
    exif = Image.Exif()
    try:
        exif.load(raw)
        return exif.get(0x0112)
    except Exception:
        return None  # broken optional metadata is not worth refusing the pixels


class _silence_fd:
    """Temporarily point a file descriptor at /dev/null (C-level warnings)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        try:
            self.saved = os.dup(self.fd)
        except OSError:
            self.saved = None
            return
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self.fd)
        os.close(null)

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            os.dup2(self.saved, self.fd)
            os.close(self.saved)


# ---------------------------------------------------------------- TIFF

def _decode_tiff(data: bytes, source: str | None, max_pixels: int | None):
    import imagecodecs
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        if not tif.pages:
            raise DecodeError(source, "corrupt TIFF: no image directory")
        page = tif.pages.first
        width, height = int(page.imagewidth), int(page.imagelength)
        _check_pixels(source, width, height, max_pixels)
        bits = int(page.bitspersample)
        fmt = int(page.sampleformat)
        photometric = int(page.photometric)
        spp = int(page.samplesperpixel)
        extras = tuple(int(e) for e in page.extrasamples)
        planar_separate = int(page.planarconfig) == 2
        orientation = page.tags.valueof(274)
    if fmt != 1 or bits not in (1, 8, 16):
        kind = {1: "unsigned", 2: "signed", 3: "float"}.get(fmt, f"format {fmt}")
        raise DecodeError(source, f"unsupported TIFF samples: {bits}-bit {kind} "
                                  "(cnnpipe reads 8- and 16-bit unsigned images)")
    MINISWHITE, MINISBLACK, RGB = 0, 1, 2
    if photometric not in (MINISWHITE, MINISBLACK, RGB) or bits == 1:
        # Palette, CMYK, YCbCr/JPEG, bilevel: Pillow converts these exactly, at 8 bits.
        if bits == 16:
            raise DecodeError(source, f"unsupported 16-bit TIFF photometric interpretation {photometric} "
                                      "(16-bit TIFF must be gray or RGB)")
        arr, names, _ = _decode_pillow(data, source, "TIFF", max_pixels)
        return arr, names, orientation
    arr = imagecodecs.tiff_decode(data, index=0)
    if planar_separate and arr.ndim == 3 and arr.shape[0] == spp and arr.shape[-1] != spp:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[:2] != (height, width):
        raise DecodeError(source, f"corrupt TIFF: decoded shape {arr.shape} does not match {width}x{height}")
    if photometric == MINISWHITE:
        arr = np.iinfo(arr.dtype).max - arr
    color = 3 if photometric == RGB else 1
    names = ("R", "G", "B")[:color] if color == 3 else ("L",)
    n_extra = arr.shape[2] - color
    # ExtraSamples 1/2 = associated/unassociated alpha; anything else is just a plane.
    extra_names = tuple("A" if i == 0 and extras and extras[0] in (1, 2) else f"S{color + i}"
                        for i in range(n_extra))
    return arr, names + extra_names, orientation


# ---------------------------------------------------------------- Pillow (JPEG, BMP, GIF, WebP, ...)

def _decode_pillow(data: bytes, source: str | None, fmt: str, max_pixels: int | None):
    if fmt == "JPEG":
        fast = _decode_jpeg_fast(data, source, max_pixels)
        if fast is not None:
            return fast
    with warnings.catch_warnings():
        # Our own max_pixels check replaces Pillow's bomb warning; Pillow's hard
        # limit (2x its default) still raises and is reported below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=[fmt])
        except Image.DecompressionBombError as exc:
            raise DecodeError(source, f"image over Pillow's hard pixel limit: {_reason(exc)}") from None
        except Exception as exc:
            raise DecodeError(source, _pillow_reason(fmt, exc)) from None
        with im:
            _check_pixels(source, im.width, im.height, max_pixels)
            orientation = im.getexif().get(0x0112)
            try:
                im.seek(0)  # animated GIF / WebP / APNG: the first frame
                im.load()
            except Exception as exc:
                raise DecodeError(source, _pillow_reason(fmt, exc)) from None
            arr, names = _pillow_to_array(im, source)
    return arr, names, orientation


def _jpeg_header(data: bytes) -> tuple[int, int, int, int | None] | None:
    """(width, height, components, orientation) from the markers before the scan, or None.

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
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\x00\x00":
            orientation = _exif_orientation(data[pos + 10:pos + 2 + length])
        elif marker in (0xC0, 0xC1, 0xC2):  # baseline, extended, progressive Huffman
            if pos + 10 > n:
                return None
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height, data[pos + 9], orientation
        elif marker in (0xDA, 0xD9) or 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return None  # scan before frame, or lossless/arithmetic: leave it to Pillow
        pos += 2 + length
    return None


def _decode_jpeg_fast(data: bytes, source: str | None, max_pixels: int | None):
    """Gray and YCbCr JPEG through imagecodecs' libjpeg-turbo (same library and
    defaults as Pillow, so the same pixels) without Pillow's extra copies."""
    import imagecodecs

    header = _jpeg_header(data)
    if header is None or header[2] not in (1, 3):
        return None  # CMYK/YCCK and unusual streams: Pillow converts them
    width, height, components, orientation = header
    _check_pixels(source, width, height, max_pixels)
    if not data[-64:].rstrip(b"\x00").endswith(b"\xff\xd9"):
        # Truncated, or valid with trailing bytes after EOI (some cameras append
        # data): Pillow tells the two apart and names a truncation as such.
        return None
    arr = imagecodecs.jpeg8_decode(data)
    if arr.dtype != np.uint8:
        raise DecodeError(source, f"unsupported JPEG sample precision ({arr.dtype}); cnnpipe reads 8-bit JPEG")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape != (height, width, components):
        raise DecodeError(source, f"corrupt JPEG: decoded shape {arr.shape} does not match header")
    return arr, (("L",) if components == 1 else ("R", "G", "B")), orientation


def _pillow_reason(fmt: str, exc: BaseException) -> str:
    text = _reason(exc)
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
        im = im.convert(target)
    arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    names = {"L": ("L",), "LA": ("L", "A"), "RGB": ("R", "G", "B"), "RGBA": ("R", "G", "B", "A")}[target]
    return arr, names


# ---------------------------------------------------------------- policies

def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an (H, W, C) array, as Pillow's exif_transpose does."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
        8: lambda a: np.rot90(a, 1),
    }
    op = ops.get(int(orientation))
    return op(arr) if op else arr


def _apply_policies(arr: np.ndarray, names: Sequence[str], channels: ChannelPolicy, alpha: AlphaPolicy,
                    background: float, source: str | None) -> tuple[np.ndarray, tuple[str, ...]]:
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
        color = _composite(color, alpha_plane, background)
    if channels == "rgb" and color_names == ("L",):
        color, color_names = np.broadcast_to(color, color.shape[:2] + (3,)), ("R", "G", "B")
    elif channels == "rgb" and color_names[:3] == ("R", "G", "B"):
        color, color_names = color[:, :, :3], ("R", "G", "B")
    elif channels == "rgb" and len(color_names) > 1:
        raise DecodeError(source, f"cannot map planes {color_names} to R, G, B; use channels='native'")
    elif channels == "gray" and color_names != ("L",):
        if color_names[:3] != ("R", "G", "B"):
            raise DecodeError(source, f"cannot compute luma from planes {color_names}; use channels='native'")
        color, color_names = _luma(color[:, :, :3]), ("L",)
    if alpha_plane is not None and alpha == "keep":
        color = np.concatenate([color, alpha_plane], axis=2)
        color_names = color_names + ("A",)
    return color, color_names


def _composite(color: np.ndarray, alpha: np.ndarray, background: float) -> np.ndarray:
    """Blend over a constant background in exact integer arithmetic (round half up)."""
    top = int(np.iinfo(color.dtype).max)
    bg = int(round(background * top))
    c = color.astype(np.uint64)
    a = alpha.astype(np.uint64)
    out = (c * a + bg * (top - a) + top // 2) // top
    return out.astype(color.dtype)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma with Pillow's fixed-point weights (they sum to 65536)."""
    w = rgb.astype(np.uint64)
    y = (w[:, :, 0] * 19595 + w[:, :, 1] * 38470 + w[:, :, 2] * 7471 + 0x8000) >> 16
    return y.astype(rgb.dtype)[:, :, None]
