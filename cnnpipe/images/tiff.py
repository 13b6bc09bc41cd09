"""TIFF: every kind of page cnnpipe reads, exactly, and a precise reason for the rest.

Routes, chosen from the first page's tags before decoding:

- 8/16-bit gray and RGB(A): libtiff through `imagecodecs.tiff_decode` (fast); if
  libtiff cannot decode the compression, tifffile with imagecodecs' codecs
  (JPEG 8/12-bit, JPEG 2000, JPEG XL, JPEG-LS, WebP, Zstandard, LZMA, LERC, ...).
- 9-15-bit gray and RGB (packed 10/12/14-bit, 12-bit JPEG): tifffile; values are
  kept as stored in uint16 (a 12-bit sample stays 0..4095).
- Palette (1/2/4/8-bit indices): indices through the colour map with tifffile. TIFF colour maps hold
  16-bit entries; a map whose entries are all 8-bit values scaled by 256 or 257
  gives 8-bit RGB (entry >> 8, as Pillow reads it), any other map gives 16-bit RGB
  with the entries exactly.
- CMYK, YCbCr, CIELab and 1/2/4-bit gray: Pillow, which converts them exactly (8-bit).
- Multi-page files: pages that are channels (ImageJ/OME axes "CYX") are read as
  planes named as the file names them; with ``pages="planes"`` any pages of one
  sample each and one shape and type are read as planes S0..Sn. Otherwise page 1
  is kept and the note says so ("3 pages; page 1 kept").
- A strip or tile whose byte count runs past the end of the file is *truncated*, except
  an uncompressed one whose needed bytes are all there: tifffile reads it (libtiff
  refuses it), with a warning.
- Signed 8/16/32-bit, unsigned 32-bit and float 16/32/64-bit gray or multi-sample pages (strips or
  tiles, any compression, predictors 2 and 3): tifffile, values exactly as stored; GDAL's nodata
  tag (42113) is read by `nodata_value`.
- Refused as *unsupported*, naming the feature: complex samples, other sample sizes,
  compressions no codec here decodes, other photometric interpretations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnpipe.images.formats import (
    SAMPLE_DTYPES,
    Decoded,
    DecodeError,
    check_pixels,
    orient,
    pillow_pixels,
    reason_of,
)

__all__ = ["decode_tiff", "PAGE_MODES", "nodata_value"]

PAGE_MODES = ("first", "planes")
_MINISWHITE, _MINISBLACK, _RGB, _PALETTE = 0, 1, 2, 3
_PILLOW_PHOTOMETRIC = {5: "CMYK", 6: "YCbCr", 8: "CIELab", 9: "ICCLab", 10: "ITULab"}
# Pillow applies a TIFF's orientation on load; these undo it (2-5 and 7 are their own inverse).
_INVERSE_ORIENTATION = {2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


@dataclass(frozen=True)
class _Page:
    """The first page's tags that choose the route."""

    width: int
    height: int
    spp: int
    bits: int
    fmt: int
    photometric: int
    compression: Any
    extras: tuple[int, ...]
    planar_separate: bool
    orientation: Any

    @classmethod
    def of(cls, page: Any) -> _Page:
        return cls(int(page.imagewidth), int(page.imagelength), int(page.samplesperpixel), int(page.bitspersample),
                   int(page.sampleformat), int(page.photometric), page.compression,
                   tuple(int(e) for e in page.extrasamples), int(page.planarconfig) == 2, page.tags.valueof(274))


def decode_tiff(data: bytes, source: str | None, max_pixels: int | None, pages: str = "first") -> Decoded:
    """Decode a TIFF's first page (or its pages as planes); see the module docstring for the routes.

    Raises:
      DecodeError: kind "unsupported" naming the feature, "too_large", "planes" (``pages="planes"``
        with pages that differ), or "corrupt".
    """
    import tifffile

    with _page_chain_errors() as broken, tifffile.TiffFile(io.BytesIO(data)) as tif:
        if not tif.pages:
            raise DecodeError(source, "corrupt TIFF: no image directory")
        first = tif.pages.first
        info = _Page.of(first)
        check_pixels(source, info.width, info.height, max_pixels, samples=info.spp)
        count = len(tif.pages)  # reads every page directory: a broken chain is logged here
        if broken:
            raise DecodeError(source, f"corrupt TIFF: broken page chain ({broken[0]}) after page {count}")
        stack = _pages_as_planes(tif, source, max_pixels, pages) if count > 1 else None
        if stack is not None:
            arr, names, warnings = stack
            return Decoded(_invert(arr, info.bits) if info.photometric == _MINISWHITE else arr, names,
                           info.orientation, notes=warnings)
        _check_supported(info, source)
        nodata = _nodata_of(first)   # from the directory already parsed, not a second parse of the file
        overshoot = _check_complete([first], len(data), source)
        notes = ((f"{count} pages; page 1 kept",) if count > 1 else ()) + overshoot
        if info.photometric == _PALETTE and info.spp == 1:
            return Decoded(*_palette(first, source), info.orientation, notes=notes)
        # libtiff refuses a strip whose byte count runs past the file's end; tifffile reads what is there
        if info.photometric in (_MINISWHITE, _MINISBLACK, _RGB) and info.bits >= 8 and (
                info.bits not in (8, 16) or overshoot or info.fmt != 1):
            return dataclasses.replace(_finish(_tifffile_pixels(first, source), info, source, notes), nodata=nodata)
    if info.photometric not in (_MINISWHITE, _MINISBLACK, _RGB) or info.bits < 8:
        arr, names, applied = pillow_pixels(data, source, "TIFF", max_pixels)
        undo = _INVERSE_ORIENTATION.get(applied) if isinstance(applied, int) else None
        return Decoded(orient(arr, undo) if undo else arr, names, info.orientation, notes=notes)
    return dataclasses.replace(_finish(_libtiff_pixels(data, source, info), info, source, notes), nodata=nodata)


@contextlib.contextmanager
def _page_chain_errors() -> Iterator[list[str]]:
    """Collect tifffile's warnings that the chain of page directories is broken.

    tifffile stops at an invalid page offset and only logs it; the file would then
    read as fewer pages (a damaged 3-channel stack as one gray page), so it is corrupt.
    """
    found: list[str] = []
    handler, logger = _ChainHandler(found), logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield found
    finally:
        logger.removeHandler(handler)


class _ChainHandler(logging.Handler):
    """Appends tifffile's "invalid page offset" warnings to `found` (a class made once, not per file)."""

    def __init__(self, found: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        hit = _CHAIN_BROKEN.search(record.getMessage())
        if hit:
            self.found.append(hit.group(0))


_CHAIN_BROKEN = re.compile(r"invalid (page offset|offset to first page) \S+")


def _check_supported(info: _Page, source: str | None) -> None:
    """DecodeError (kind "unsupported") naming what a valid file uses that cnnpipe does not read."""
    import tifffile

    if (info.fmt, info.bits) not in _SCIENTIFIC and (info.fmt != 1 or info.bits > 16):
        kind = {1: "unsigned integer", 2: "signed integer", 3: "float", 6: "complex float"}.get(
            info.fmt, f"sample format {info.fmt}")
        raise DecodeError(source, f"unsupported: TIFF, {info.bits}-bit {kind} samples (cnnpipe reads unsigned "
                                  "1-16 and 32-bit, signed 8/16/32-bit and 16/32/64-bit float samples)",
                          kind="unsupported")
    if (info.fmt, info.bits) in _SCIENTIFIC and info.photometric not in (_MINISBLACK, _RGB):
        raise DecodeError(source, f"unsupported: TIFF, {info.bits}-bit {_SCIENTIFIC[info.fmt, info.bits]} samples "
                                  f"with {_photometric_name(info.photometric)} (read as gray or RGB values only)",
                          kind="unsupported")
    if info.compression not in tifffile.TIFF.DECOMPRESSORS:
        name = getattr(info.compression, "name", str(info.compression))
        raise DecodeError(source, f"unsupported: TIFF, {name} compression ({int(info.compression)}); no codec "
                                  "here decodes it", kind="unsupported")
    photometric_ok = (_MINISWHITE, _MINISBLACK, _RGB, _PALETTE, *_PILLOW_PHOTOMETRIC)
    if info.photometric not in photometric_ok or (info.photometric in _PILLOW_PHOTOMETRIC and info.bits > 8):
        name = _PILLOW_PHOTOMETRIC.get(info.photometric) or _photometric_name(info.photometric)
        raise DecodeError(source, f"unsupported: TIFF, {info.bits}-bit {name} photometric interpretation "
                                  "(cnnpipe reads gray, RGB and palette up to 16 bits; CMYK, YCbCr and Lab at "
                                  "8 bits)", kind="unsupported")
    if info.photometric == _RGB and info.spp < 3:
        raise DecodeError(source, f"corrupt TIFF: photometric RGB with {info.spp} sample(s) per pixel (needs 3)")


# (SampleFormat, BitsPerSample) of the scientific sample types: values as stored, through tifffile
_SCIENTIFIC = {(2, 8): "signed integer", (2, 16): "signed integer", (2, 32): "signed integer",
               (1, 32): "unsigned integer", (3, 16): "float", (3, 32): "float", (3, 64): "float"}


def nodata_value(data: bytes) -> float | None:
    """A TIFF's GDAL_NODATA tag (42113, ASCII) as a number; None without the tag or for a value that is not one."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            return _nodata_of(tif.pages.first)
    except Exception:   # the decode itself reports a damaged file
        return None


def _nodata_of(page: Any) -> float | None:
    """`nodata_value` of a parsed first page."""
    try:
        raw = page.tags.valueof(42113)
    except Exception:   # the decode itself reports a damaged file
        return None
    try:
        return float(str(raw).strip().strip("\x00")) if raw is not None else None
    except ValueError:
        return None


def _photometric_name(value: int) -> str:
    import tifffile

    try:
        return f"{tifffile.PHOTOMETRIC(value).name} ({value})"
    except ValueError:
        return f"photometric {value}"


def _invert(arr: np.ndarray, bits: int) -> np.ndarray:
    """MinIsWhite -> MinIsBlack within the stored bit depth (a 12-bit sample inverts within 0..4095)."""
    top = (1 << bits) - 1 if bits < 16 and arr.dtype == np.uint16 else np.iinfo(arr.dtype).max
    return (top - arr).astype(arr.dtype)


# compressions the libtiff in imagecodecs decodes (the fast route); others go to tifffile
_LIBTIFF_COMPRESSIONS = frozenset({1, 2, 3, 4, 5, 7, 8, 32773, 32946, 34887, 34925, 50000, 50001})


def _libtiff_pixels(data: bytes, source: str | None, info: _Page) -> np.ndarray:
    """8/16-bit pages through libtiff, or tifffile for compressions libtiff lacks (JPEG 2000, JPEG XL, 16-bit
    JPEG, ...). A libtiff failure on a compression it has means damaged data: no second decoder is tried,
    since another may accept what libtiff rightly refused (a short strip, filled with gray)."""
    import imagecodecs
    import tifffile

    lossless_jpeg16 = int(info.compression) == 7 and info.bits == 16
    if int(info.compression) in _LIBTIFF_COMPRESSIONS and not lossless_jpeg16:
        try:
            return imagecodecs.tiff_decode(data, index=0)
        except Exception as exc:
            raise DecodeError(source, f"corrupt TIFF data: {_clean(reason_of(exc))}") from None
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        return _tifffile_pixels(tif.pages.first, source)


def _check_complete(pages: Any, size: int, source: str | None) -> tuple[str, ...]:
    """DecodeError (corrupt) when a strip or tile of `pages` lies beyond the file's end; else the warnings.

    Decoders fill what is missing with gray instead of failing (tifffile, libjpeg),
    so a truncated file is recognised from its own byte counts before decoding. An
    uncompressed strip or tile whose byte count overshoots the file while every byte
    the image needs from it is present (rows x row bytes, as TIFF 6.0 lays them out)
    decodes, as in libtiff, Pillow and tifffile, with a warning; a compressed one
    cannot be checked that way and stays truncated.
    """
    warnings: list[str] = []
    for n, page in enumerate(pages, 1):
        for k, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
            if not count or offset + count <= size:
                continue
            part = f"page {n}, {'tile' if page.is_tiled else 'strip'} {k}"
            needed = _uncompressed_bytes(page, k)
            if needed is None or offset + needed > size:
                raise DecodeError(source, f"truncated TIFF: {part} ends at byte {offset + count}, the file has "
                                          f"{size} bytes")
            warnings.append(f"{part}: its byte count ({count}) runs past the end of the file ({size} bytes); "
                            f"the {needed} bytes the image needs are present and were read")
    return tuple(warnings)


def _uncompressed_bytes(page: Any, k: int) -> int | None:
    """The bytes uncompressed strip or tile `k` of `page` holds (rows padded to whole bytes); None if compressed."""
    if int(page.compression) != 1:
        return None
    samples = 1 if int(page.planarconfig) == 2 else int(page.samplesperpixel)
    bits = int(page.bitspersample) * samples
    if page.is_tiled:
        return int(page.tilelength) * -(-int(page.tilewidth) * bits // 8)
    height, rows = int(page.imagelength), int(page.rowsperstrip) or int(page.imagelength)
    per_plane = -(-height // min(rows, height))
    first_row = (k % per_plane) * rows
    return max(0, min(rows, height - first_row)) * -(-int(page.imagewidth) * bits // 8)


def _tifffile_pixels(page: Any, source: str | None, indices: bool = False) -> np.ndarray:
    """A page's samples through tifffile; `indices`: palette indices, where 1-bit ones (bool) become uint8 0/1."""
    try:
        arr = page.asarray()
    except MemoryError:
        raise
    except Exception as exc:
        raise DecodeError(source, f"corrupt TIFF data: {_clean(reason_of(exc))}") from None
    if indices and arr.dtype == np.bool_:  # tifffile gives 1-bit samples as bool; as indices they are 0 and 1
        arr = arr.view(np.uint8)
    if arr.dtype not in SAMPLE_DTYPES:
        raise DecodeError(source, f"unsupported: TIFF decoded to {arr.dtype} samples", kind="unsupported")
    return arr


def _clean(text: str) -> str:
    """A codec's message without the run-dependent parts (temporary file names, addresses)."""
    return re.sub(r"(/tmp|/var/folders)/\S+", "<temporary file>", text)


def _finish(arr: np.ndarray, info: _Page, source: str | None, notes: tuple[str, ...]) -> Decoded:
    """Gray/RGB pixels from libtiff or tifffile -> (H, W, C) with plane names (alpha and extra samples)."""
    spp = info.spp
    if info.planar_separate and arr.ndim == 3 and arr.shape[0] == spp and arr.shape[-1] != spp:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    color = 3 if info.photometric == _RGB else 1
    if arr.shape[:2] != (info.height, info.width) or arr.shape[2] < color:
        raise DecodeError(source, f"corrupt TIFF: decoded shape {arr.shape} does not match "
                                  f"{info.width}x{info.height} with {spp} sample(s) per pixel")
    if info.photometric == _MINISWHITE:
        arr = _invert(arr, info.bits)
    names = ("R", "G", "B") if color == 3 else ("L",)
    n_extra = arr.shape[2] - color
    # ExtraSamples 1/2 = associated/unassociated alpha; anything else is just a plane.
    has_alpha = bool(info.extras) and info.extras[0] in (1, 2)
    extra_names = tuple("A" if i == 0 and has_alpha else f"S{color + i}" for i in range(n_extra))
    if color == 1 and n_extra >= 2 and not has_alpha:
        # a multi-channel gray stack (microscopy, spectral bands): no plane is "the" luma
        names, extra_names = ("S0",), tuple(f"S{i}" for i in range(1, arr.shape[2]))
    return Decoded(arr, names + extra_names, info.orientation,
                   associated_alpha=has_alpha and info.extras[0] == 1, notes=notes)


def _palette(page: Any, source: str | None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Palette indices through the colour map: 8-bit RGB for 8-bit maps, else exact 16-bit RGB."""
    cmap = page.colormap
    index = _tifffile_pixels(page, source, indices=True)
    if cmap is None or cmap.ndim != 2 or cmap.shape[0] != 3:
        raise DecodeError(source, "corrupt TIFF: palette image without a 3-row colour map")
    if index.ndim == 3:
        index = index[:, :, 0]
    if int(index.max(initial=0)) >= cmap.shape[1]:
        raise DecodeError(source, f"corrupt TIFF: palette index {int(index.max())} beyond the colour map's "
                                  f"{cmap.shape[1]} entries")
    cmap = cmap.astype(np.uint16)
    high, low = cmap >> 8, cmap & 0xFF
    if np.all(low == 0) or np.all(low == high):  # 8-bit values stored x256 or x257
        cmap = high.astype(np.uint8)
    return np.ascontiguousarray(cmap.T[index]), ("R", "G", "B")


def _pages_as_planes(tif: Any, source: str | None, max_pixels: int | None, pages: str
                     ) -> tuple[np.ndarray, tuple[str, ...], tuple[str, ...]] | None:
    """Pages that are planes: an ImageJ/OME channel stack ("CYX"), or every page with ``pages="planes"``.

    Channel names come from the file (OME-XML channel names, ImageJ labels) when there
    is one per channel, else "S0".."Sn". Returns (pixels (H, W, C), names, warnings), or None when
    page 1 alone is to be read.
    """
    series = tif.series[0]
    if series.axes == "CYX" and series.dtype in SAMPLE_DTYPES:
        c, h, w = (int(n) for n in series.shape)
        check_pixels(source, w, h, max_pixels, samples=c)
        warnings = _check_complete(series.pages, tif.filehandle.size, source)
        return np.ascontiguousarray(series.asarray().transpose(1, 2, 0)), _channel_names(tif, c), warnings
    if pages != "planes":
        return None
    def describe(page: Any) -> str:
        return (f"{int(page.imagewidth)}x{int(page.imagelength)}, {int(page.samplesperpixel)} sample(s) of "
                f"{int(page.bitspersample)}-bit {_photometric_name(int(page.photometric))}")

    first = tif.pages.first
    for i, page in enumerate(tif.pages):
        kind = (int(page.sampleformat), int(page.bitspersample))
        plain_gray = int(page.samplesperpixel) == 1 and (
            (kind in ((1, 8), (1, 16)) and int(page.photometric) in (_MINISWHITE, _MINISBLACK))
            or (kind in _SCIENTIFIC and int(page.photometric) == _MINISBLACK))
        if not plain_gray or (i and describe(page) != describe(first)):
            raise DecodeError(source, f"pages='planes': page {i + 1} is {describe(page)}"
                                      + (f", page 1 is {describe(first)}" if i else "")
                                      + "; pages are read as planes only when every page is gray with one "
                                      "sample (unsigned 8/16-bit, or a signed, 32-bit or float type) and all "
                                      "share shape and type", kind="planes")
    check_pixels(source, int(first.imagewidth), int(first.imagelength), max_pixels, samples=len(tif.pages))
    warnings = _check_complete(tif.pages, tif.filehandle.size, source)
    arr = np.stack([_tifffile_pixels(p, source) for p in tif.pages], axis=-1)
    return arr, tuple(f"S{i}" for i in range(arr.shape[-1])), warnings


def _channel_names(tif: Any, c: int) -> tuple[str, ...]:
    names: list[str] = []
    if tif.is_ome:
        names = re.findall(r'<Channel\b[^>]*\bName="([^"]*)"', tif.ome_metadata or "")
    elif tif.is_imagej:
        names = [str(x) for x in (tif.imagej_metadata or {}).get("Labels") or []]
    names = [n.strip() for n in names]
    if len(names) != c or len(set(names)) != c or not all(names) or "A" in names:
        names = [f"S{i}" for i in range(c)]
    return tuple(names)
