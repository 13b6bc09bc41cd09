"""Per-plane percentiles of a split's pixels, exactly, streaming over the rows.

`data.normalize: {percentile: [2, 98]}` (torchgeo's rule for multispectral imagery) clips
each plane to its training split's 2nd and 98th percentiles and scales that range to
[0, 1]. Unsigned 8/16-bit pixels are counted in one histogram per plane, a few rows at a
time, so the split is never loaded whole and the result is exactly NumPy's
``np.percentile(values, q)`` (its default "linear" method: the value at rank
``q / 100 * (n - 1)``, interpolated between the two order statistics around it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["plane_percentiles", "plane_range", "per_plane"]

_ROWS_PER_READ = 256


def _histograms(images: Any) -> np.ndarray:
    """(C, 2**bits) int64 counts of each value per plane over every pixel of `images` (N, H, W, C);
    int16 values are counted at value + 32768."""
    levels = 1 << (8 * np.dtype(images.dtype).itemsize)
    offset = 32768 if np.dtype(images.dtype) == np.int16 else 0
    c = int(images.shape[-1])
    hist = np.zeros((c, levels), np.int64)
    for start in range(0, len(images), _ROWS_PER_READ):
        block = np.asarray(images[start:start + _ROWS_PER_READ])
        for k in range(c):
            plane = block[..., k].reshape(-1)
            hist[k] += np.bincount(plane.astype(np.int32) + offset if offset else plane, minlength=levels)
    return hist


def _percentile_from_counts(counts: np.ndarray, q: float, offset: int = 0) -> float:
    """``np.percentile(values, q)`` ("linear") of the values whose count per value is `counts`
    (value v counted at index v + `offset`)."""
    cum = np.cumsum(counts)
    n = int(cum[-1])
    rank = q / 100.0 * (n - 1)
    below = int(np.floor(rank))
    frac = rank - below
    v0 = int(np.searchsorted(cum, below + 1)) - offset   # the value holding order statistic `below` (0-based)
    v1 = int(np.searchsorted(cum, min(below + 2, n))) - offset
    return float(v0 + frac * (v1 - v0))


def plane_percentiles(images: Any, low: float, high: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(low percentile per plane, high percentile per plane) of `images` (N, H, W, C) (an array, memmap
    or `RowView`), each exactly ``np.percentile(images[..., c], q)``: uint8, uint16 and int16 by
    histogram, a few rows at a time; float32 (NaN, no data, left out) by ``np.nanpercentile`` over
    the whole split in memory.

    Raises ValueError for percentiles outside 0..100 or not increasing, or an empty split.
    """
    if not 0 <= low < high <= 100:
        raise ValueError(f"data.normalize.percentile: got [{low}, {high}]; expected 0 <= low < high <= 100")
    if len(images) == 0:
        raise ValueError("data.normalize.percentile: the training split has no images")
    if np.dtype(images.dtype) not in (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16)):
        flat = np.asarray(images, np.float64).reshape(-1, images.shape[-1])
        empty = np.flatnonzero(np.isnan(flat).all(axis=0))
        if empty.size:
            raise ValueError(f"data.normalize.percentile: plane {int(empty[0])} has no valid training value (every "
                             "pixel is no data); use zscore or a window for it")
        lo, hi = np.nanpercentile(flat, [low, high], axis=0)
        return tuple(map(float, lo)), tuple(map(float, hi))
    hist = _histograms(images)
    offset = 32768 if np.dtype(images.dtype) == np.int16 else 0
    return (tuple(_percentile_from_counts(h, low, offset) for h in hist),
            tuple(_percentile_from_counts(h, high, offset) for h in hist))


def plane_range(images: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(minimum per plane, maximum per plane) of `images` (N, H, W, C), NaN (no data) left out, a few
    rows at a time; a plane with no value at all gives (nan, nan)."""
    c = int(images.shape[-1])
    low, high = np.full(c, np.inf), np.full(c, -np.inf)
    for start in range(0, len(images), _ROWS_PER_READ):
        block = np.asarray(images[start:start + _ROWS_PER_READ]).reshape(-1, c).astype(np.float64)
        valid = ~np.isnan(block)
        low = np.minimum(low, np.where(valid, block, np.inf).min(axis=0, initial=np.inf))
        high = np.maximum(high, np.where(valid, block, -np.inf).max(axis=0, initial=-np.inf))
    empty = np.isinf(low)
    return tuple(np.where(empty, np.nan, low).tolist()), tuple(np.where(empty, np.nan, high).tolist())


def per_plane(value: Sequence[Any], channels: int, what: str) -> list[Any]:
    """`value` given once for every plane or once per plane, as a list of `channels` entries."""
    if len(value) == 1:
        return list(value) * channels
    if len(value) != channels:
        raise ValueError(f"{what}: got {len(value)} entries for {channels} planes; give one, or one per plane")
    return list(value)
