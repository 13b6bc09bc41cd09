"""Which store type holds a file's values, and float32 rows with nodata as NaN.

A dataset store (and a model's input) has one pixel type, the narrowest of these
that holds every stored file's values exactly as the image path prepares them:

=========  ==========================================================================
uint8      8-bit files
uint16     16-bit files, and 8-bit files beside them (promoted exactly, x257)
int16      signed 8/16-bit files, and 8-bit unsigned files beside them, when no file
           needs resampling (a resampled value is not an integer) nor holds nodata
float32    float16/32/64 files, 32-bit integer files, and every mix above that no
           integer type holds: values as they are (no x257), nodata as NaN
=========  ==========================================================================

float32 holds every integer up to 2^24 and float16 exactly; float64 and 32-bit integers
beyond that are rounded to the nearest float32, and the file's report entry says how
many values were. NaN, +-Inf and a file's nodata value (GeoTIFF's GDAL_NODATA tag) all
become NaN, which the model replaces on the device (`cnnpipe.models.sequential`); so do
float64 values beyond float32's range (+-3.4e38), counted apart as out of range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["STORE_DTYPES", "NoData", "store_dtype_for", "widen", "is_float_file", "to_float32", "has_nodata",
           "all_missing"]

STORE_DTYPES = ("uint8", "uint16", "int16", "float32")


def store_dtype_for(file_dtype: np.dtype | str, *, resampled: bool = False, nodata: bool = False) -> str:
    """The narrowest store type (one of `STORE_DTYPES`) holding one file of `file_dtype` exactly.

    `resampled`: the file is resized by interpolation; `nodata`: it holds a nodata value. Both
    need NaN or fractions, so signed integers then need float32 (unsigned 16-bit rounds its
    resampled values, as it always has; unsigned nodata needs float32 too).
    """
    d = np.dtype(file_dtype)
    if nodata:
        return "float32"
    if d == np.uint8:
        return "uint8"
    if d == np.uint16:
        return "uint16"
    if d in (np.dtype(np.int8), np.dtype(np.int16)) and not resampled:
        return "int16"
    return "float32"


def widen(a: str, b: str) -> str:
    """The store type holding values of both store types `a` and `b` exactly."""
    if a == b:
        return a
    pair = {a, b}
    if pair == {"uint8", "uint16"}:
        return "uint16"
    if pair == {"uint8", "int16"}:
        return "int16"
    return "float32"


def is_float_file(file_dtype: np.dtype | str) -> bool:
    """True for float16/32/64 samples: a folder mixing them with integer files is refused by default."""
    return np.dtype(file_dtype).kind == "f"


@dataclass(frozen=True)
class NoData:
    """Pixels of one file that are not numbers the model can use, counted before any resize.

    Attributes:
      nan, inf: NaN and +-Inf samples; nodata: samples equal to the file's nodata value;
      inexact: finite samples float32 cannot hold exactly (float64, 32-bit integers past 2^24);
      total: every sample of the file; out_of_range: finite float64 samples beyond float32's range.
    """

    nan: int = 0
    inf: int = 0
    nodata: int = 0
    inexact: int = 0
    total: int = 0
    out_of_range: int = 0

    @property
    def missing(self) -> int:
        """Samples stored as NaN."""
        return self.nan + self.inf + self.nodata + self.out_of_range

    def record(self) -> dict[str, int]:
        """The report's per-file entry."""
        return {"nan": self.nan, "inf": self.inf, "nodata": self.nodata, "out_of_range": self.out_of_range,
                "inexact_in_float32": self.inexact, "samples": self.total}


def _missing_mask(img: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """Where `img` is NaN, +-Inf or `nodata` (None: nowhere, for integers without a nodata value)."""
    mask = ~np.isfinite(img) if img.dtype.kind == "f" else None
    if nodata is not None and not np.isnan(nodata):
        mask = (img == nodata) if mask is None else mask | (img == nodata)
    return mask


def has_nodata(img: np.ndarray, nodata: float | None) -> bool:
    """Whether (H, W, C) `img` holds NaN, +-Inf or the value `nodata`."""
    mask = _missing_mask(img, nodata)
    return mask is not None and bool(mask.any())


def all_missing(img: np.ndarray, nodata: float | None) -> bool:
    """Whether every sample of `img` is NaN, +-Inf or `nodata` (such a file has nothing to learn from)."""
    if img.dtype.kind != "f" and nodata is None:
        return False
    head = np.ravel(img, order="K")[:4096]   # a view in memory order: most files answer here
    mask = _missing_mask(head, nodata)
    if mask is not None and not mask.all():
        return False
    mask = _missing_mask(img, nodata)
    return mask is not None and bool(mask.all())


def to_float32(img: np.ndarray, nodata: float | None) -> tuple[np.ndarray, NoData]:
    """(H, W, C) samples of any type -> float32 with NaN for NaN, +-Inf and `nodata`, and the counts.

    Finite values are converted to the nearest float32 (exact for every type up to 16 bits and
    float32 itself); `NoData.inexact` counts those that changed.
    """
    with np.errstate(over="ignore"):   # float64 beyond float32's range: counted below, stored as NaN
        out = img.astype(np.float32)
    nan = inf = 0
    bad = None
    if img.dtype.kind == "f":
        bad = ~np.isfinite(img)
        n_bad = int(np.count_nonzero(bad))
        nan = int(np.count_nonzero(np.isnan(img[bad]))) if n_bad else 0
        inf = n_bad - nan
        bad = bad if n_bad else None
    n_nodata = 0
    if nodata is not None and not np.isnan(nodata):
        at = img == nodata   # never NaN or Inf itself (GDAL writes a finite value or "nan")
        n_nodata = int(np.count_nonzero(at))
        bad = at if bad is None else bad | at
    inexact = overflow = 0
    if img.dtype.itemsize > 2 and img.dtype != np.float32:   # the types float32 may round
        with np.errstate(invalid="ignore", over="ignore"):
            changed = out.astype(img.dtype) != img
        if img.dtype == np.float64:
            over = np.isinf(out) & np.isfinite(img)
            overflow = int(np.count_nonzero(over))
            changed &= ~over
            bad = over if bad is None else bad | over
        inexact = int(np.count_nonzero(changed if bad is None else changed & ~bad))
    if bad is not None:
        out[bad] = np.nan
    return out, NoData(nan, inf, n_nodata, inexact, int(img.size), overflow)
