"""One file at a time, in a worker: probe its header, or read, hash and prepare it. Never raises.

These are the functions `cnnpipe preprocess` runs in its worker pool
(`cnnpipe.datasets.workers`). Every failure becomes a result that names the file
(in `display_path` form), the reason and its kind, so one bad file is reported
and the run goes on. Workers import this module and the image path (numpy,
Pillow, imagecodecs), never jax.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from cnnpipe.datasets.deadlines import DEADLINE, die_here_if_asked, start_item
from cnnpipe.images.decode import DecodeError, check_format, read_file
from cnnpipe.images.formats import codec_messages, display_path, reason_of
from cnnpipe.images.pixel_types import NoData
from cnnpipe.images.transform import ImageSpec, NeedsWiderType, prepare_bytes

__all__ = ["Failure", "Prepared", "NeedsDtype", "probe_file", "convert_file", "convert_items", "worker_died",
           "DEFAULT_FILE_TIMEOUT",
           "HEAD_BYTES"]

HEAD_BYTES = 64  # enough for sniffing and the PNG IHDR
# seconds one file may take in a worker: a 100-megapixel TIFF on a slow network disk takes well under a
# minute to read and prepare; 5 minutes is a hang, not a big file
DEFAULT_FILE_TIMEOUT = 300.0
_EXACT_FLOAT64 = 2 ** 53  # integers up to this are exact in float64


@dataclass(frozen=True)
class Failure:
    """Why a file was not used: `message` names the file; `kind` is the report's kind."""

    message: str
    kind: str


@dataclass(frozen=True)
class Prepared:
    """One file's store row and what the report and statistics need.

    Attributes:
      pixels: (H, W, C) the spec's shape and pixel type (uint8/uint16/int16/float32).
      sums, sumsq: per-plane sums of values and squares, or None (not asked for): exact Python
        integers for integer pixels, float64 sums over the finite values of float32 pixels.
      digest: 128 bits of the file's SHA-256 (duplicate report).
      warnings: problems that cost no pixels.
      decoded_bit_depth: the file's own bit depth (8 or 16) before any promotion.
      counts: per-plane count of the values summed (NaN, no data, left out), or None.
      decoded_dtype: the file's own sample type.
      nodata: the file's NaN/Inf/nodata/inexact counts (float32 stores), or None.
    """

    pixels: np.ndarray
    sums: list[int] | list[float] | None
    sumsq: list[int] | list[float] | None
    digest: str
    warnings: tuple[str, ...]
    decoded_bit_depth: int
    counts: list[int] | None = None
    decoded_dtype: str = "uint8"
    nodata: NoData | None = None


@dataclass(frozen=True)
class NeedsDtype:
    """An image the store's pixel type cannot hold: the run restarts with a `dtype` store.

    Attributes:
      dtype: the store type holding both; message: why, naming the file.
    """

    dtype: str
    message: str


def probe_file(path: str) -> tuple[Failure | None, str]:
    """(failure or None, the sample type the header suggests) of one file, reading only its first bytes
    (a TIFF's first directory)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError as exc:
        return Failure(f"{display_path(path)}: cannot read file: {exc.strerror or type(exc).__name__}",
                       "unreadable"), "uint8"
    try:
        fmt = check_format(head, path)  # the decoder's own wording (it names known unsupported formats)
    except DecodeError as exc:
        return Failure(str(exc), exc.kind), "uint8"
    return None, _header_dtype(fmt, head, path)


def _header_dtype(fmt: str, head: bytes, path: str) -> str:
    """The sample type the header suggests ("uint16" for more than 8 bits, a TIFF's own type):
    a guess, corrected after decoding."""
    if fmt == "PNG":
        return "uint16" if len(head) > 24 and head[24] == 16 else "uint8"
    if fmt == "TIFF":
        plain = _plain_tiff_dtype(head, path)
        if plain is not None:
            return plain
        try:
            import tifffile

            # codec_messages: tifffile logs what it finds wrong; that belongs to the decode, not the terminal
            with codec_messages(), tifffile.TiffFile(path) as tif:  # reads the first directory only
                page = tif.pages.first
                if page.sampleformat in (2, 3) or int(page.bitspersample) > 16:   # signed, float, 32-bit
                    return str(np.dtype(page.dtype))
                return "uint16" if int(page.bitspersample) > 8 else "uint8"
        except Exception:
            return "uint8"
    return "uint8"


def _plain_tiff_dtype(head: bytes, path: str) -> str | None:
    """"uint8" or "uint16" for a classic TIFF whose first directory plainly has unsigned samples of at most
    16 bits, read from the directory's entries alone; None for anything else (tifffile then decides).

    The parent probes every file before any worker starts, so a TIFF costs a few reads here instead
    of tifffile's parse and a stderr capture. Where a value is not plain (BigTIFF, a repeated tag,
    samples of unequal size, a SampleFormat other than unsigned, LSM, old-style JPEG) tifffile
    decides, so the answer is the one tifffile gives for every file it can open. (A file tifffile
    cannot open, which then fails to decode too, may be guessed 16-bit here instead of 8: the guess
    only chooses which files `confirm_dtype` decodes first; the store type comes from decoded files.)
    """
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(head[:4])
    if order is None or len(head) < 8:
        return None
    try:
        with open(path, "rb") as f:
            tags = _ifd_entries(f, order, struct.unpack(order + "I", head[4:8])[0])
            if tags is None or _LSM_INFO in tags or _short(tags.get(_COMPRESSION), order) == 6:
                return None
            bits = _shorts(f, tags.get(_BITS_PER_SAMPLE), order)
            formats = _shorts(f, tags.get(_SAMPLE_FORMAT), order) if _SAMPLE_FORMAT in tags else (1,)
    except (OSError, struct.error):
        return None
    if not bits or not formats or len(set(bits)) != 1 or set(formats) != {1} or not 0 < bits[0] <= 16:
        return None
    return "uint16" if bits[0] > 8 else "uint8"


_BITS_PER_SAMPLE, _COMPRESSION, _SAMPLE_FORMAT, _LSM_INFO = 258, 259, 339, 34412
_SHORT = 3   # the TIFF field type of BitsPerSample, Compression and SampleFormat


def _ifd_entries(f: BinaryIO, order: str, offset: int) -> dict[int, tuple[int, int, bytes]] | None:
    """{tag: (type, count, value or offset field)} of the directory at `offset`; None if cut or a tag repeats."""
    f.seek(offset)
    raw = f.read(2)
    if len(raw) < 2:
        return None
    n = struct.unpack(order + "H", raw)[0]
    raw = f.read(12 * n)
    if n == 0 or len(raw) < 12 * n:
        return None
    tags = {}
    for code, typ, count, value in struct.iter_unpack(order + "HHI4s", raw):
        if code in tags:
            return None
        tags[code] = (typ, count, value)
    return tags


def _shorts(f: BinaryIO, entry: tuple[int, int, bytes] | None, order: str) -> tuple[int, ...] | None:
    """The SHORT values of one directory entry (read from its offset when they do not fit in it)."""
    if entry is None or entry[0] != _SHORT or not 0 < entry[1] <= 64:
        return None
    typ, count, value = entry
    if count > 2:
        f.seek(struct.unpack(order + "I", value)[0])
        value = f.read(2 * count)
        if len(value) < 2 * count:
            return None
    return struct.unpack(f"{order}{count}H", value[:2 * count])


def _short(entry: tuple[int, int, bytes] | None, order: str) -> int | None:
    """The value of a one-SHORT entry (None without the tag or for another shape)."""
    if entry is None or entry[0] != _SHORT or entry[1] != 1:
        return None
    return struct.unpack(order + "H", entry[2][:2])[0]


def convert_file(path: str, want_stats: bool, spec: ImageSpec) -> Prepared | Failure | NeedsDtype:
    """Read, hash and prepare one file through the one image path (`prepare_bytes`)."""
    die_here_if_asked(path)
    try:
        data = read_file(path)
        img = prepare_bytes(data, spec, path)
    except NeedsWiderType as exc:
        return NeedsDtype(exc.dtype, str(exc))
    except DecodeError as exc:  # its message names the file
        return Failure(str(exc), exc.kind)
    except ValueError as exc:  # the image's planes do not match the spec
        return Failure(f"{display_path(path)}: {reason_of(exc).removeprefix(f'{path}: ')}", "planes")
    except MemoryError:
        return Failure(f"{display_path(path)}: too large: not enough memory to prepare this image", "too_large")
    except Exception as exc:  # a bug or a codec surprise: one file is reported, the run goes on
        return Failure(f"{display_path(path)}: {type(exc).__name__}: {reason_of(exc)}", "corrupt")
    digest = hashlib.sha256(data).hexdigest()[:32]
    sums, sumsq, counts = _plane_sums(img.pixels) if want_stats else (None, None, None)
    warnings = img.warnings
    if img.nodata is not None and img.nodata.inexact:
        warnings += (f"{img.nodata.inexact} {img.decoded_dtype} value(s) not exact in float32: stored as the "
                     "nearest float32",)
    return Prepared(img.pixels, sums, sumsq, digest, warnings, img.decoded_bit_depth, counts, img.decoded_dtype,
                    img.nodata)


def _plane_sums(pixels: np.ndarray) -> tuple[list, list, list[int]]:
    """Per-plane (sums, sums of squares, counts) of (H, W, C) pixels, NaN left out.

    Integer sums are exact Python integers, so the mean/std do not depend on order or chunking;
    float32 values are summed in float64 (deterministic: the same rows in the same order give the
    same statistics, whatever the worker count).
    """
    c = pixels.shape[2]
    if pixels.dtype.kind != "f":
        n = pixels.size // c
        info = np.iinfo(pixels.dtype)
        if n * max(-int(info.min), int(info.max)) ** 2 < _EXACT_FLOAT64:
            # every partial sum is an integer below 2**53, so float64 (and BLAS, in any order, with FMA)
            # is exact; a matrix product is many times faster than numpy's integer reductions
            planes = pixels.reshape(-1, c).T.astype(np.float64)
            return [int(v) for v in planes @ np.ones(n)], [int(np.dot(p, p)) for p in planes], [n] * c
        flat = pixels.reshape(-1, c).astype(np.int64 if pixels.dtype.kind == "i" else np.uint64)
        return [int(v) for v in flat.sum(0)], [int(v) for v in np.einsum("ij,ij->j", flat, flat)], [n] * c
    flat = pixels.reshape(-1, c).astype(np.float64)
    ok = ~np.isnan(flat)
    vals = np.where(ok, flat, 0.0)
    return [float(v) for v in vals.sum(0)], [float(v) for v in (vals * vals).sum(0)], [int(v) for v in ok.sum(0)]


def convert_items(items: list[tuple[str, bool, ImageSpec]], timeout: float = 0.0
                  ) -> list[Prepared | Failure | NeedsDtype]:
    """`convert_file` over (path, want_stats, spec) items: one pool job. In a pool worker each file
    must be done within `timeout` seconds (0: no deadline; `cnnpipe.datasets.deadlines.start_item`)."""
    out: list[Prepared | Failure | NeedsDtype] = []
    for i, (path, want, spec) in enumerate(items):
        start_item(i, timeout)
        out.append(convert_file(path, want, spec))
    return out


def _load_codecs() -> None:
    """Load what imagecodecs, tifffile and Pillow otherwise load on first use: each worker would pay it
    (about 10 ms) on its first PNG, TIFF and JPEG of every run; workers start from a fork server that has
    imported this module (`cnnpipe.datasets.workers`), so they start with them loaded."""
    try:
        import imagecodecs
        import tifffile
        from PIL import Image

        for name in ("png_decode", "tiff_decode", "jpeg8_decode", "zlib_decode", "deflate_decode", "lzw_decode"):
            getattr(imagecodecs, name)
        _ = tifffile.TIFF.DECOMPRESSORS   # the table tiff.py checks compressions against
        Image.preinit()
    except Exception:   # a codec missing from this build: it is reported when a file needs it
        pass


_load_codecs()


def worker_died(item: tuple[str, ...], how: str, timeout: float = 0.0) -> Failure:
    """The result of a file whose worker process died twice while preparing it (see `workers.ordered_map`),
    or was stopped by its deadline (`timeout` seconds; kind "timeout")."""
    if how == DEADLINE:
        return Failure(f"{display_path(item[0])}: took longer than the file timeout of {timeout:g} s; stopped, "
                       "and the process preparing it replaced (--file-timeout sets the deadline)", "timeout")
    return Failure(f"{display_path(item[0])}: the worker process preparing this file died ({how}), and again "
                   "on the retry in a fresh worker; skipped", "worker_died")
