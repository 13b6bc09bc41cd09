"""Hand-made classic TIFF files, byte by byte, for kinds tifffile's writer will not make.

tifffile writes palette images only with a 2**8 or 2**16-entry colour map and never
writes a strip byte count that disagrees with the data; files from scanners, fax
software and old GIS tools do both. `craft_tiff` writes what it is told: uncompressed
strips, any tag values, pages chained one after another (little-endian, classic TIFF 6.0).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Page", "craft_tiff", "pack_bits"]

_SHORT, _LONG = 3, 4


def pack_bits(samples: np.ndarray, bits: int) -> bytes:
    """(H, W) integer samples < 2**bits -> rows packed MSB first, each row padded to a whole byte (TIFF 6.0)."""
    h, w = samples.shape
    bits_of = ((samples[..., None].astype(np.uint32) >> np.arange(bits - 1, -1, -1)) & 1).astype(np.uint8)
    rows = bits_of.reshape(h, w * bits)
    return np.packbits(rows, axis=1).tobytes()


@dataclass
class Page:
    """One page: (H, W) samples of `bits` bits, photometric interpretation, optional colour map (3, 2**bits)."""

    samples: np.ndarray
    bits: int
    photometric: int
    colormap: np.ndarray | None = None
    rows_per_strip: int | None = None
    # strip k's StripByteCounts value is the true count plus this (an overshooting count)
    extra_byte_counts: Sequence[int] = field(default_factory=tuple)


def _strips(page: Page) -> list[bytes]:
    h = page.samples.shape[0]
    rps = page.rows_per_strip or h
    data = page.samples.astype("<u2").tobytes() if page.bits == 16 else (
        page.samples.astype(np.uint8).tobytes() if page.bits == 8 else pack_bits(page.samples, page.bits))
    row = len(data) // h
    return [data[r * row:min(r + rps, h) * row] for r in range(0, h, rps)]


def craft_tiff(pages: Sequence[Page], *, data_last: bool = False) -> bytes:
    """The file's bytes: the header, then pixel data and page directories (directories first with
    `data_last`, so that the last strip ends the file, as many writers lay files out)."""
    strips = [_strips(page) for page in pages]
    data = b"".join(b"".join(s) for s in strips)
    if data_last:
        dirs = _directories(pages, strips, data_at=0, start=8)  # offsets do not change the directories' size
        data_at = 8 + len(dirs)
        return b"II*\x00" + struct.pack("<I", 8) + _directories(pages, strips, data_at, 8) + data
    data += b"\0" * (len(data) % 2)
    return b"II*\x00" + struct.pack("<I", 8 + len(data)) + data + _directories(pages, strips, 8, 8 + len(data))


def _directories(pages: Sequence[Page], strips: list[list[bytes]], data_at: int, start: int) -> bytes:
    """Every page's directory, chained, placed at file offset `start`; the strips lie from `data_at` on."""
    out, at = bytearray(), data_at
    for i, (page, page_strips) in enumerate(zip(pages, strips)):
        offsets = []
        for s in page_strips:
            offsets.append(at)
            at += len(s)
        counts = [len(s) + (page.extra_byte_counts[k] if k < len(page.extra_byte_counts) else 0)
                  for k, s in enumerate(page_strips)]
        h, w = page.samples.shape
        tags: list[tuple[int, int, list[int]]] = [
            (256, _LONG, [w]), (257, _LONG, [h]), (258, _SHORT, [page.bits]), (259, _SHORT, [1]),
            (262, _SHORT, [page.photometric]), (273, _LONG, offsets), (277, _SHORT, [1]),
            (278, _LONG, [page.rows_per_strip or h]), (279, _LONG, counts)]
        if page.colormap is not None:
            tags.append((320, _SHORT, [int(v) for v in np.asarray(page.colormap, np.uint16).ravel()]))
        out += _directory(tags, start + len(out), last=i == len(pages) - 1)
    return bytes(out)


def _directory(tags: list[tuple[int, int, list[int]]], at: int, last: bool) -> bytes:
    """One directory at file offset `at`: entries, the next directory's offset, then values too long for
    an entry (each even-aligned); the next directory follows right after."""
    entries, values = [], bytearray()
    values_at = at + 2 + 12 * len(tags) + 4
    for tag, typ, vals in sorted(tags):
        raw = struct.pack("<" + ("H" if typ == _SHORT else "I") * len(vals), *vals)
        if len(raw) <= 4:
            entries.append(struct.pack("<HHI", tag, typ, len(vals)) + raw.ljust(4, b"\0"))
        else:
            entries.append(struct.pack("<HHII", tag, typ, len(vals), values_at + len(values)))
            values += raw + b"\0" * (len(raw) % 2)
    end = values_at + len(values)
    return (struct.pack("<H", len(tags)) + b"".join(entries) + struct.pack("<I", 0 if last else end)
            + bytes(values))
