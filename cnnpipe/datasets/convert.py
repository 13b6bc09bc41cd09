"""One file at a time, in a worker: probe its header, or read, hash and prepare it. Never raises.

These are the functions `cnnpipe preprocess` runs in its worker pool
(`cnnpipe.datasets.workers`). Every failure becomes a result that names the file
(in `display_path` form), the reason and its kind, so one bad file is reported
and the run goes on. Workers import this module and the image path (numpy,
Pillow, imagecodecs), never jax.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from cnnpipe.datasets.workers import die_here_if_asked
from cnnpipe.images.decode import DecodeError, check_format, read_file
from cnnpipe.images.formats import codec_messages, display_path, reason_of
from cnnpipe.images.transform import ImageSpec, NeedsSixteenBit, prepare_bytes

__all__ = ["Failure", "Prepared", "NeedsUint16", "probe_file", "convert_file", "convert_items", "worker_died",
           "HEAD_BYTES"]

HEAD_BYTES = 64  # enough for sniffing and the PNG IHDR


@dataclass(frozen=True)
class Failure:
    """Why a file was not used: `message` names the file; `kind` is the report's kind."""

    message: str
    kind: str


@dataclass(frozen=True)
class Prepared:
    """One file's store row and what the report and statistics need.

    Attributes:
      pixels: (H, W, C) uint8/uint16, the spec's shape and bit depth.
      sums, sumsq: per-plane exact integer sums of values and squares, or None (not asked for).
      digest: 128 bits of the file's SHA-256 (duplicate report).
      warnings: problems that cost no pixels.
      decoded_bit_depth: the file's own bit depth (8 or 16) before any promotion.
    """

    pixels: np.ndarray
    sums: list[int] | None
    sumsq: list[int] | None
    digest: str
    warnings: tuple[str, ...]
    decoded_bit_depth: int


class NeedsUint16:
    """A 16-bit image for an 8-bit store: the run restarts with a uint16 store."""


def probe_file(path: str) -> tuple[Failure | None, int]:
    """(failure or None, bit depth the header suggests) of one file, reading only its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError as exc:
        return Failure(f"{display_path(path)}: cannot read file: {exc.strerror or type(exc).__name__}",
                       "unreadable"), 8
    try:
        fmt = check_format(head, path)  # the decoder's own wording (it names known unsupported formats)
    except DecodeError as exc:
        return Failure(str(exc), exc.kind), 8
    return None, _header_bit_depth(fmt, head, path)


def _header_bit_depth(fmt: str, head: bytes, path: str) -> int:
    """16 if the header says more than 8 bits per sample, else 8: a guess, corrected after decoding."""
    if fmt == "PNG":
        return 16 if len(head) > 24 and head[24] == 16 else 8
    if fmt == "TIFF":
        try:
            import tifffile

            # codec_messages: tifffile logs what it finds wrong; that belongs to the decode, not the terminal
            with codec_messages(), tifffile.TiffFile(path) as tif:  # reads the first directory only
                return 16 if int(tif.pages.first.bitspersample) > 8 else 8
        except Exception:
            return 8
    return 8


def convert_file(path: str, want_stats: bool, spec: ImageSpec) -> Prepared | Failure | NeedsUint16:
    """Read, hash and prepare one file through the one image path (`prepare_bytes`)."""
    die_here_if_asked(path)
    try:
        data = read_file(path)
        img = prepare_bytes(data, spec, path)
    except NeedsSixteenBit:
        return NeedsUint16()
    except DecodeError as exc:  # its message names the file
        return Failure(str(exc), exc.kind)
    except ValueError as exc:  # the image's planes do not match the spec
        return Failure(f"{display_path(path)}: {reason_of(exc).removeprefix(f'{path}: ')}", "planes")
    except MemoryError:
        return Failure(f"{display_path(path)}: too large: not enough memory to prepare this image", "too_large")
    except Exception as exc:  # a bug or a codec surprise: one file is reported, the run goes on
        return Failure(f"{display_path(path)}: {type(exc).__name__}: {reason_of(exc)}", "corrupt")
    digest = hashlib.sha256(data).hexdigest()[:32]
    sums = sumsq = None
    if want_stats:
        flat = img.pixels.reshape(-1, img.pixels.shape[2]).astype(np.uint64)
        # integer sums are exact, so the mean/std do not depend on order or chunking
        sums = [int(v) for v in flat.sum(0)]
        sumsq = [int(v) for v in np.einsum("ij,ij->j", flat, flat)]
    return Prepared(img.pixels, sums, sumsq, digest, img.warnings, img.decoded_bit_depth)


def convert_items(items: list[tuple[str, bool, ImageSpec]]) -> list[Prepared | Failure | NeedsUint16]:
    """`convert_file` over (path, want_stats, spec) items: one pool job."""
    return [convert_file(path, want, spec) for path, want, spec in items]


def worker_died(item: tuple[str, ...], how: str) -> Failure:
    """The result of a file whose worker process died twice while preparing it (see `workers.ordered_map`)."""
    return Failure(f"{display_path(item[0])}: the worker process preparing this file died ({how}), and again "
                   "on the retry in a fresh worker; skipped", "worker_died")
