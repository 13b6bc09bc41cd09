"""A run's plots: loss and accuracy curves from metrics.jsonl, the confusion matrix, feature-map grids.

matplotlib is imported inside each function (object-oriented API, Agg canvas, no
pyplot state), so modules that only might plot do not pay for importing it.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.files import atomic_path

__all__ = ["import_in_background", "plot_curves", "plot_confusion", "plot_precision_recall",
           "plot_predicted_vs_true", "plot_augment", "display_rgb", "display_range", "feature_grid", "probe_grids"]


def import_in_background() -> threading.Thread:
    """Start importing matplotlib's figure and Agg canvas in a thread; join it before plotting.

    The import is about half a run's plotting time (0.5-0.6 s of about 1 s on a 2-core
    CPU); done while the run trains, it is off the path to the result.
    """
    def load() -> None:
        import matplotlib.figure  # noqa: F401
        from matplotlib.backends import backend_agg  # noqa: F401

    thread = threading.Thread(target=load, name="cnnpipe-import-matplotlib", daemon=True)
    thread.start()
    return thread


def _save_figure(fig: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def plot_curves(metrics_path: str | os.PathLike, plots_dir: str | os.PathLike,
                keys: tuple[str, str, str] = ("accuracy", "accuracy", "accuracy")) -> None:
    """loss.png and a score plot (train per log line, validation per epoch) from metrics.jsonl.

    `keys`: (train record key, validation record key, axis label) of the score
    (`cnnpipe.training.task_run.curve_keys`): accuracy.png for classification, else named
    after the validation key (map.png, mae.png).
    """
    from matplotlib.figure import Figure

    train_key, val_key, score_label = keys
    train: dict[str, list[float]] = {"step": [], "loss": [], "score": []}
    val: dict[str, list[float]] = {"step": [], "loss": [], "score": []}
    for line in Path(metrics_path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("loss") is None:  # non-finite step
            continue
        into, score = (val, val_key) if rec.get("split") == "val" else (train, train_key)
        into["step"].append(rec["step"])
        into["loss"].append(rec["loss"])
        into["score"].append(math.nan if rec.get(score) is None else rec[score])   # undefined: a gap
    name = "accuracy" if val_key == "accuracy" else val_key
    for key, label, file in (("loss", "loss", "loss"), ("score", score_label, name)):
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot(train["step"], train[key], label="train")
        ax.plot(val["step"], val[key], "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        _save_figure(fig, Path(plots_dir) / f"{file}.png")


def _panels(n: int) -> tuple[Any, list[Any]]:
    """A figure of `n` small square panels, up to 4 a row, and its axes."""
    from matplotlib.figure import Figure

    cols = min(n, 4)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.2 * cols, 3.0 * rows))
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def plot_precision_recall(targets: np.ndarray, probs: np.ndarray, labels: Sequence[str],
                          path: str | os.PathLike, limit: int = 24) -> None:
    """Per-label precision-recall curves of a multi-label validation split (known entries only; the first
    `limit` labels), each titled with its average precision."""
    from cnnpipe.tasks.metrics import average_precision

    names = list(labels)[:limit]
    fig, axes = _panels(len(names))
    for j, (ax, name) in enumerate(zip(axes, names)):
        known = ~np.isnan(targets[:, j])
        y, p = targets[known, j], probs[known, j]
        order = np.argsort(-p, kind="stable")
        tp = np.cumsum(y[order] == 1)
        precision = tp / np.arange(1, len(order) + 1)
        recall = tp / max(int(tp[-1]) if len(tp) else 0, 1)
        ax.step(recall, precision, where="post")
        ap = average_precision(y, p) if len(y) else math.nan
        ax.set_title(f"{name}: AP {ap:.3f}" if math.isfinite(ap) else f"{name}: no positives", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, Path(path))


def plot_predicted_vs_true(targets: np.ndarray, predictions: np.ndarray, names: Sequence[str],
                           path: str | os.PathLike) -> None:
    """Predicted against true values per regression target (the diagonal: perfect), in the data's units."""
    fig, axes = _panels(len(names))
    for j, (ax, name) in enumerate(zip(axes, names)):
        known = ~np.isnan(targets[:, j])
        y, p = targets[known, j], predictions[known, j]
        ax.scatter(y, p, s=6, alpha=0.5)
        lo, hi = (float(min(y.min(), p.min())), float(max(y.max(), p.max()))) if len(y) else (0.0, 1.0)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("true", fontsize=8)
        ax.set_ylabel("predicted", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, Path(path))


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: str | os.PathLike) -> None:
    """The confusion matrix as an annotated heat map (rows: true class)."""
    from matplotlib.figure import Figure

    n = len(classes)
    fig = Figure(figsize=(1.2 + 0.6 * n, 1.0 + 0.6 * n))
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        top = cm.max(initial=0)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > top / 2 else "black")
    _save_figure(fig, Path(path))


def display_rgb(pixels: np.ndarray, peak: Any, low: Any = 0.0) -> np.ndarray:
    """Raw pixels (..., C) as RGB floats in [0, 1] for display: each plane from `low` to its `peak` (C,)
    (so 12-bit data in 16-bit files is not near black; signed and float planes from their minimum);
    NaN (no data) black; 3 planes as RGB, any other count as their mean."""
    low = np.asarray(low, np.float32)
    x = (np.asarray(pixels, np.float32) - low) / np.maximum(np.asarray(peak, np.float32) - low, 1e-12)
    x = np.clip(np.nan_to_num(x, nan=0.0), 0, 1)
    return x if x.shape[-1] == 3 else np.repeat(x.mean(axis=-1, keepdims=True), 3, axis=-1)


def display_range(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low, peak) per plane of raw (H, W, C) pixels for `display_rgb`: 0 and the peak for unsigned
    pixels, the plane's minimum and maximum (NaN left out) for signed and float ones."""
    from cnnpipe.datasets.plane_stats import plane_range

    x = np.asarray(pixels)
    if x.dtype.kind == "u":
        return np.zeros(x.shape[-1], np.float32), x.max(axis=(0, 1)).astype(np.float32)
    low, high = (np.asarray(v, np.float32) for v in plane_range(x[None]))
    empty = np.isnan(low)   # a plane of no data at all: shown as 0..1
    return np.where(empty, 0.0, low).astype(np.float32), np.where(empty, 1.0, high).astype(np.float32)


def plot_augment(original: np.ndarray, augmented: np.ndarray, titles: Sequence[str],
                 path: str | os.PathLike) -> None:
    """A grid of what the model sees: one row per image (N), the stored image then M augmented draws.

    original: (N, H, W, C) raw pixels; augmented: (M, N, H, W, C), draw m of image n at [m, n];
    titles: the M column titles. Each row is scaled by its stored image's per-plane peak,
    so brightness, contrast and gamma changes show as they are.
    """
    from matplotlib.figure import Figure

    n, m = original.shape[0], augmented.shape[0]
    fig = Figure(figsize=(1.1 * (m + 1), 1.1 * n + 0.3))
    if original.shape[-1] != 3:   # display_rgb shows any other plane count as the planes' mean
        fig.suptitle(f"shown: the mean of the {original.shape[-1]} planes, each over its peak", fontsize=7)
    for i in range(n):
        low, peak = display_range(original[i])
        for j, img in enumerate([original[i], *augmented[:, i]]):
            ax = fig.add_subplot(n, m + 1, i * (m + 1) + j + 1)
            ax.imshow(display_rgb(img, peak, low), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("stored" if j == 0 else titles[j - 1], fontsize=7)
    _save_figure(fig, Path(path))


def feature_grid(fmap: np.ndarray, cols: int | None = None, pad: int = 1,
                 fill: float = float("nan")) -> tuple[np.ndarray, int, int]:
    """Tile (H, W, C) channels into one 2-D image, each tile min-max scaled to [0, 1].

    Returns (grid, rows, cols); tile k sits at row k // cols, column k % cols, and
    separators/empty tiles hold `fill` (NaN shows as background; use 0 for TensorBoard).
    A constant channel becomes all zeros.
    """
    fmap = np.asarray(fmap, np.float32)
    if fmap.ndim != 3:
        raise ValueError(f"feature map: got shape {fmap.shape}; expected (H, W, C)")
    h, w, c = fmap.shape
    cols = cols or int(math.ceil(math.sqrt(c)))
    rows = int(math.ceil(c / cols))
    lo, hi = fmap.min(axis=(0, 1)), fmap.max(axis=(0, 1))
    scaled = (fmap - lo) / np.where(hi > lo, hi - lo, 1.0)
    grid = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad), fill, np.float32)
    for k in range(c):
        r, q = divmod(k, cols)
        grid[r * (h + pad):r * (h + pad) + h, q * (w + pad):q * (w + pad) + w] = scaled[..., k]
    return grid, rows, cols


def probe_grids(model: Any, image: Any) -> dict[str, np.ndarray]:
    """Feature-map grids of one raw image (H, W, C) for TensorBoard: {layer: (1, H', W') float32 in [0, 1]}.

    One grid per conv, pool and residual layer (`model.feature_layer_names`), tiles as
    `feature_grid` with black gaps; the (C, H, W) layout is what
    `SummaryWriter.add_image` takes by default. Meant for the training loop's optional
    per-epoch probe (`train.probe_feature_maps`).
    """
    from flax import nnx

    from cnnpipe.training.steps import forward

    names = tuple(model.feature_layer_names)
    graphdef, state = nnx.split(model)
    _, feats = forward(graphdef, (state,), np.asarray(image)[None], names)
    return {name: feature_grid(np.asarray(feats[name][0]), fill=0.0)[0][None] for name in names}
