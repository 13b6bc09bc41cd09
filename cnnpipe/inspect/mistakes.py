"""What a trained run gets wrong: the highest-loss validation images and the most-confused class pairs.

`cnnpipe inspect RUN --worst N` calls `inspect_worst`: the run's own validation
split (its data config, prepared exactly as in training: the rows of its store),
every image's loss and probabilities, the N images with the highest loss shown on
the inspect page with their true and predicted class, Grad-CAM over the image and
per-plane attribution, and a table of the most-confused (true, predicted) pairs,
each linking to its examples on the page.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["per_image_losses", "worst_indices", "confused_pairs", "inspect_worst", "RANKED_BY"]

# what --worst ranks a multi-label or regression run's images by (whatever its training loss)
RANKED_BY = {"multilabel": "binary cross-entropy over the image's known labels",
             "regression": "squared error in standardised units (error / the target's training std), "
                           "mean over the image's known targets"}


def per_image_losses(model: Any, images: Any, labels: np.ndarray, batch: int = 256, task: Any = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(loss (N,), outputs (N, outputs)) of `model` on raw `images`: cross-entropy and class probabilities;
    for a multi-label `task` the mean binary cross-entropy over each image's known labels and the
    probabilities; for regression the mean squared error in standardised units over its known
    targets and the predicted values."""
    from cnnpipe.inspect.featuremaps import predict_proba

    probs = np.concatenate([predict_proba(model, np.asarray(images[i:i + batch]), (), task)[0]
                            for i in range(0, len(labels), batch)]).astype(np.float64)
    if task is not None and not task.is_classification:
        y = np.asarray(labels, np.float64)
        known = ~np.isnan(y)
        if task.kind == "multilabel":
            p = np.clip(probs, 1e-7, 1 - 1e-7)
            per = -(np.nan_to_num(y) * np.log(p) + (1 - np.nan_to_num(y)) * np.log1p(-p))
        else:
            per = ((probs - np.nan_to_num(y)) / np.asarray(task.target_std)) ** 2
        return np.where(known, per, 0.0).sum(1) / np.maximum(known.sum(1), 1), probs
    picked = probs[np.arange(len(labels)), np.asarray(labels)]
    return -np.log(np.maximum(picked, np.finfo(np.float64).tiny)), probs


def worst_indices(losses: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` highest losses, highest first (ties: the earlier image first)."""
    return np.argsort(-np.asarray(losses), kind="stable")[:n]


def confused_pairs(labels: np.ndarray, predictions: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]:
    """Off-diagonal (true, predicted) pairs with their count and image indices, most frequent first.

    The counts are the confusion matrix's off-diagonal cells
    (`metrics.confusion_matrix(labels, predictions)[t, p]`).
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    pairs = []
    for t in range(len(classes)):
        for p in range(len(classes)):
            idx = np.flatnonzero((labels == t) & (predictions == p))
            if t != p and len(idx):
                pairs.append({"true": classes[t], "predicted": classes[p], "count": int(len(idx)),
                              "indices": [int(i) for i in idx]})
    return sorted(pairs, key=lambda d: (-d["count"], d["true"], d["predicted"]))


def inspect_worst(run_dir: str | os.PathLike, n: int, *, out: str | os.PathLike | None = None,
                  layers: Sequence[str] | None = None, top_k: int = 5, checkpoint: str = "best") -> Path:
    """Write the inspect page of the run's `n` highest-loss validation images (default RUN_DIR/worst).

    Raises:
      ValueError: `n` < 1, or the run's data is not available or no longer matches the run.
    """
    from cnnpipe.datasets.sources import load_dataset
    from cnnpipe.images.transform import InputImage
    from cnnpipe.inspect.report import inspect_images
    from cnnpipe.runs.evaluate import check_compatible
    from cnnpipe.runs.load import load_run

    if n < 1:
        raise ValueError(f"--worst: got {n}; expected an integer >= 1")
    run = load_run(run_dir, checkpoint)
    ds = load_dataset(run.cfg.data, seed=run.cfg.seed)
    check_compatible(run, ds)
    model = run.model()
    val = ds.val
    task = run.task
    losses, probs = per_image_losses(model, val.images, val.labels, task=task)
    chosen = worst_indices(losses, n)
    planes = tuple(ds.plane_names or run.info.get("planes") or [f"S{i}" for i in range(ds.channels)])
    images = [InputImage(np.ascontiguousarray(val.images[i]), planes, ds.bit_depth, _source(val, i),
                         (f"validation image {i}: {_truth_and_guess(run, ds.classes, val.labels[i], probs[i])}, "
                          f"loss {losses[i]:.4f}",)) for i in chosen]
    if not task.is_classification:
        out_dir = Path(out) if out is not None else Path(run_dir) / "worst"
        context = {"run_dir": str(run_dir), "checkpoint_step": run.step,
                   "worst": {"n": len(chosen), "validation_images": len(val), "data": ds.description,
                             "losses": [float(losses[i]) for i in chosen], "ranked_by": RANKED_BY[task.kind]}}
        inspect_images(model, images, out_dir, classes=run.classes, layers=layers, top_k=top_k, context=context,
                       task=task)
        return out_dir / "index.html"
    predictions = probs.argmax(1)
    pairs = confused_pairs(val.labels, predictions, ds.classes)
    shown = {int(i): k + 1 for k, i in enumerate(chosen)}
    for pair in pairs:
        pair["on_page"] = sorted(shown[i] for i in pair["indices"] if i in shown)
        pair["sources"] = [_source(val, i) for i in pair["indices"][:20]]
    out_dir = Path(out) if out is not None else Path(run_dir) / "worst"
    context = {"run_dir": str(run_dir), "checkpoint_step": run.step,
               "worst": {"n": len(chosen), "validation_images": len(val), "data": ds.description,
                         "losses": [float(losses[i]) for i in chosen],
                         "true_classes": [ds.classes[val.labels[i]] for i in chosen],
                         "confused_pairs": pairs}}
    inspect_images(model, images, out_dir, classes=run.classes, layers=layers, top_k=top_k, context=context)
    return out_dir / "index.html"


def _truth_and_guess(run: Any, names: Sequence[str], target: Any, outputs: np.ndarray) -> str:
    """E.g. "true class cat, predicted dog"; "true labels a, b, predicted b"; "true count 3, predicted 2.71"."""
    task = run.task
    if task.is_classification:
        return f"true class {names[int(target)]}, predicted {names[int(np.argmax(outputs))]}"
    if task.kind == "multilabel":
        true = [n for n, v in zip(names, target) if v == 1] or ["none"]
        unknown = [n for n, v in zip(names, target) if v != v]
        hit = task.decide(outputs[None], run.thresholds)[0]
        guess = [n for n, h in zip(names, hit) if h] or ["none"]
        return (f"true labels {', '.join(true)}" + (f" (unknown: {', '.join(unknown)})" if unknown else "")
                + f", predicted {', '.join(guess)}")
    return "; ".join(f"true {n} {'?' if t != t else f'{t:.4g}'}, predicted {p:.4g}"
                     for n, t, p in zip(names, target, outputs))


def _source(split: Any, i: int) -> str:
    return split.sources[i] if split.sources else f"validation image {i}"
