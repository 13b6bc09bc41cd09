"""How a run's model turns raw pixels into network inputs: `data.normalize`.

- ``zscore`` (the default): per plane ``(x - mean) / std`` with the training split's statistics.
- ``{window: [low, high]}`` (or one pair per plane): clip to the window, then scale it to [0, 1],
  as MONAI's ``ScaleIntensityRange(clip=True)`` does for a CT window.
- ``{percentile: [2, 98]}``: the same with each plane's training-split percentiles as the
  window (torchgeo's rule for multispectral imagery; `cnnpipe.datasets.plane_stats`).

A window is ``clip(x, low, high)`` then ``(x - low) / (high - low)``: the model's clip and its
mean/std (`cnnpipe.models.sequential.SequentialNet.set_input_clip`), so the run's
dataset.json records it and evaluate, predict, inspect and exported models apply it. With
pretrained 3-plane weights the weights' mean and std (fractions of full scale) apply to the
windowed [0, 1] values: mean ``low + m (high - low)``, std ``s (high - low)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["input_window", "window_init"]


def input_window(spec: Any, ds: Any) -> tuple[tuple[float, ...], tuple[float, ...], str] | None:
    """(low per plane, high per plane, where it comes from) of `data.normalize` on `ds`, or None (zscore).

    Raises ValueError: a window of the wrong plane count, or whose low is not below its high.
    """
    from cnnpipe.datasets.plane_stats import per_plane, plane_percentiles

    if spec == "zscore":
        return None
    if hasattr(spec, "percentile"):
        low, high = plane_percentiles(ds.train.images, *spec.percentile)
        # a constant plane has no range: a window of one raw unit keeps it finite (0 after scaling)
        high = tuple(h if h > lo else lo + 1.0 for lo, h in zip(low, high))
        return low, high, (f"data.normalize: each plane's percentiles {spec.percentile[0]:g} and "
                           f"{spec.percentile[1]:g} on the training split")
    pairs = [spec.window] if not isinstance(spec.window[0], (tuple, list)) else list(spec.window)
    pairs = per_plane(pairs, ds.channels, "data.normalize.window")
    if any(lo >= hi for lo, hi in pairs):
        raise ValueError(f"data.normalize.window: got {[list(p) for p in pairs]}; each low must be below its high")
    top = 2 ** ds.bit_depth - 1   # what an unsigned store can hold: a window beyond it sees a constant
    if np.dtype(ds.train.images.dtype).kind == "u":
        if any(hi <= 0 or lo >= top for lo, hi in pairs):
            raise ValueError(f"data.normalize.window: got {[list(p) for p in pairs]}; the data's values are "
                             f"0..{top} ({ds.bit_depth}-bit), so a window outside them makes every pixel one value")
    else:   # signed and float data have no fixed range: the training split's own
        _outside_the_data(pairs, ds)
    return (tuple(float(lo) for lo, _ in pairs), tuple(float(hi) for _, hi in pairs),
            "data.normalize: the window " + ", ".join(f"[{lo:g}, {hi:g}]" for lo, hi in pairs))


def _outside_the_data(pairs: list, ds: Any) -> None:
    """ValueError when a window misses every training value of its plane (signed and float stores)."""
    from cnnpipe.datasets.plane_stats import plane_range

    low, high = plane_range(ds.train.images)
    for k, ((lo, hi), a, b) in enumerate(zip(pairs, low, high)):
        if not a <= b:
            raise ValueError(f"data.normalize.window: plane {k} has no valid training value (every pixel is "
                             "no data)")
        if hi <= a or lo >= b:
            raise ValueError(f"data.normalize.window: got [{lo:g}, {hi:g}] for plane {k}; its training values "
                             f"are {a:g}..{b:g} ({np.dtype(ds.train.images.dtype)}), so a window outside them "
                             "makes every pixel one value")


def window_init(window: tuple[tuple[float, ...], tuple[float, ...], str], weights_stats: Any = None
                ) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, description) that scale the window to [0, 1], or, with pretrained weights' (mean, std)
    in fractions of full scale, to those weights' normalised range."""
    low, high, where = window
    span = [h - lo for lo, h in zip(low, high)]
    if weights_stats is None:
        return tuple(low), tuple(span), where
    m, s = weights_stats
    return (tuple(lo + mi * sp for lo, mi, sp in zip(low, m, span)), tuple(si * sp for si, sp in zip(s, span)),
            where + ", then the pretrained weights' mean/std")
