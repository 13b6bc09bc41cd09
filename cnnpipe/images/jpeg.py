"""JPEG: header parsing and the decoders for every JPEG process cnnpipe reads.

The frame header (SOFn marker) says which JPEG process a file uses and its
sample precision, so the route is chosen before any decoding:

- 8-bit baseline / extended / progressive, gray or YCbCr: libjpeg-turbo through
  imagecodecs at full size, or Pillow's draft mode (a DCT-domain 1/2, 1/4 or 1/8
  decode) when the caller asks for a reduced size.
- 12-bit lossy (baseline, extended, progressive) and lossless JPEG (SOF3, 2-16
  bits): libjpeg-turbo 3 through `imagecodecs.jpeg8_decode`, always at full size.
  Samples keep their values: a 12-bit file gives uint16 values 0..4095.
- JPEG-LS (SOF55, 2-16 bits): CharLS through `imagecodecs.jpegls_decode`, exact.
- CMYK/YCCK and arithmetic-coded 8-bit files: Pillow, which converts them.
- Hierarchical processes (SOF5-7, SOF13-15) and lossless arithmetic (SOF11) are
  refused as *unsupported*, naming the process.

libjpeg-turbo fills a truncated scan with gray instead of failing, so the
full-size routes first check that an end-of-image marker follows the first scan.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnpipe.images.formats import Decoded, DecodeError, check_pixels, exif_orientation_value

__all__ = ["JpegHeader", "jpeg_header", "decode_jpeg", "SOF_NAMES"]

SOF_NAMES = {
    0xC0: "baseline (SOF0)", 0xC1: "extended sequential (SOF1)", 0xC2: "progressive (SOF2)",
    0xC3: "lossless (SOF3)", 0xC5: "hierarchical sequential (SOF5)", 0xC6: "hierarchical progressive (SOF6)",
    0xC7: "hierarchical lossless (SOF7)", 0xC9: "arithmetic extended sequential (SOF9)",
    0xCA: "arithmetic progressive (SOF10)", 0xCB: "arithmetic lossless (SOF11)",
    0xCD: "arithmetic hierarchical sequential (SOF13)", 0xCE: "arithmetic hierarchical progressive (SOF14)",
    0xCF: "arithmetic hierarchical lossless (SOF15)", 0xF7: "JPEG-LS (SOF55)",
}
_UNSUPPORTED_SOF = frozenset({0xC5, 0xC6, 0xC7, 0xCB, 0xCD, 0xCE, 0xCF})
_DCT_HUFFMAN = frozenset({0xC0, 0xC1, 0xC2})


@dataclass(frozen=True)
class JpegHeader:
    """What the markers before the first scan say.

    Attributes:
      width, height, components: the frame's size and sample count (1 gray, 3 colour, 4 CMYK).
      precision: bits per sample (8, 12, or 2-16 for lossless and JPEG-LS).
      sof: the frame marker's second byte (0xC0 baseline, ..., 0xF7 JPEG-LS).
      orientation: the raw EXIF orientation entry, or None.
      scan_start: offset of the first start-of-scan marker, or -1 if none was reached.
    """

    width: int
    height: int
    components: int
    precision: int
    sof: int
    orientation: Any
    scan_start: int = -1

    @property
    def fast(self) -> bool:
        """8-bit Huffman DCT gray or YCbCr: the route with reduced-size decoding."""
        return self.sof in _DCT_HUFFMAN and self.precision == 8 and self.components in (1, 3)

    def process(self) -> str:
        """E.g. "JPEG lossless (SOF3), 16-bit"."""
        name = SOF_NAMES.get(self.sof, f"SOF marker 0x{self.sof:02X}")
        return f"{name if self.sof == 0xF7 else 'JPEG ' + name}, {self.precision}-bit"


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The frame header and EXIF orientation from the markers before the scan, or None if unreadable.

    A few hundred bytes of marker walking instead of a full ``Image.open``.
    """
    pos, orientation, n, frame = 2, None, len(data), None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\x00\x00" and orientation is None:
            orientation = exif_orientation_value(data[pos + 10:pos + 2 + length])
        elif marker in SOF_NAMES and frame is None:
            if pos + 10 > n:
                return None
            precision = data[pos + 4]
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            frame = (width, height, data[pos + 9], precision, marker)
        elif marker == 0xDA or marker == 0xD9:
            return JpegHeader(*frame, orientation, pos) if frame and marker == 0xDA else None
        pos += 2 + length
    return JpegHeader(*frame, orientation) if frame else None


def _complete(data: bytes, header: JpegHeader) -> bool:
    """An end-of-image marker follows the first scan. Entropy-coded data stuffs 0xFF bytes
    (FF 00), so FF D9 after the scan starts is the real end (or trailing data after it);
    an EXIF thumbnail's own end marker comes before the scan and does not count."""
    return header.scan_start >= 0 and data.find(b"\xff\xd9", header.scan_start) >= 0


def decode_jpeg(data: bytes, source: str | None, max_pixels: int | None, reduce: int = 1) -> Decoded | None:
    """Decode a JPEG by its process; None leaves the file to Pillow (CMYK, 8-bit arithmetic, unparsable headers).

    Raises:
      DecodeError: kind "unsupported" (hierarchical, lossless arithmetic), "too_large", or "corrupt".
    """
    header = jpeg_header(data)
    if header is None:
        return None
    if header.sof in _UNSUPPORTED_SOF:
        raise DecodeError(source, f"unsupported: {header.process()}; cnnpipe reads baseline, extended, "
                                  "progressive and lossless JPEG and JPEG-LS", kind="unsupported")
    check_pixels(source, header.width, header.height, max_pixels, samples=header.components)
    if header.fast:
        return _decode_fast(data, source, header, reduce)
    if header.sof == 0xF7 or header.precision != 8 or header.sof == 0xC3:
        return _decode_full(data, source, header)
    return None


def _names(components: int) -> tuple[str, ...]:
    return ("L",) if components == 1 else ("R", "G", "B")


def _decode_fast(data: bytes, source: str | None, header: JpegHeader, reduce: int) -> Decoded | None:
    """8-bit gray/YCbCr: libjpeg-turbo at full size, Pillow's draft mode at 1/reduce."""
    import imagecodecs
    from PIL import Image

    if not data[-64:].rstrip(b"\x00").endswith(b"\xff\xd9"):
        # Truncated, or valid with trailing bytes after EOI (some cameras append
        # data): Pillow tells the two apart and names a truncation as such.
        return None
    if reduce > 1:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
            im.draft(im.mode, (max(1, header.width // reduce), max(1, header.height // reduce)))
            im.load()
            arr = np.asarray(im)
        return Decoded(arr[:, :, None] if arr.ndim == 2 else arr, _names(header.components), header.orientation)
    arr = imagecodecs.jpeg8_decode(data)
    return _checked(arr, source, header)


def _decode_full(data: bytes, source: str | None, header: JpegHeader) -> Decoded:
    """12-bit, lossless and JPEG-LS files, always at full size, values as stored."""
    import imagecodecs

    if header.components not in (1, 3):
        raise DecodeError(source, f"unsupported: {header.process()} with {header.components} components "
                                  "(cnnpipe reads gray and colour)", kind="unsupported")
    if not _complete(data, header):
        raise DecodeError(source, f"truncated JPEG: no end-of-image marker after the scan ({header.process()})")
    try:
        arr = (imagecodecs.jpegls_decode if header.sof == 0xF7 else imagecodecs.jpeg8_decode)(data)
    except Exception as exc:
        raise DecodeError(source, f"corrupt JPEG data ({header.process()}): {' '.join(str(exc).split())[:160]}"
                          ) from None
    return _checked(arr, source, header)


def _checked(arr: np.ndarray, source: str | None, header: JpegHeader) -> Decoded:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    want = np.uint8 if header.precision <= 8 else np.uint16
    if arr.shape != (header.height, header.width, header.components) or arr.dtype != want:
        raise DecodeError(source, f"corrupt JPEG: decoded {arr.dtype} {arr.shape} does not match the header "
                                  f"({header.process()}, {header.width}x{header.height}x{header.components})")
    return Decoded(arr, _names(header.components), header.orientation)
