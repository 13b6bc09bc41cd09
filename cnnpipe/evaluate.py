"""Evaluation and inference on runs: accuracy, per-class accuracy, confusion matrix, plots, predict.

`evaluate_split` is the per-epoch evaluation of the training loop; `load_run`
rebuilds a finished (or interrupted) run's model from its directory alone
(`config.yaml`, `dataset.json`, `checkpoints/`), which `cnnpipe evaluate` and
`cnnpipe predict` use. Predicted images go through the same decode and resize
as the training data (`cnnpipe.transform.prepare_image`, shared with `cnnpipe inspect`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.data import Dataset, Split, eval_batches, prefetch, read_dataset_info, steps_per_epoch

__all__ = ["atomic_path", "write_atomic", "evaluate_split", "confusion_matrix", "per_class_accuracy", "format_confusion", "plot_curves",
           "plot_confusion", "feature_grid", "Run", "load_run", "evaluate_run", "data_overrides", "prepare_for_run", "predict_images"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed onto `path` when the block succeeds.

    Readers see the old file or the complete new one, never a half-written one; a
    failed write removes the temporary file. The suffix is kept, so writers that pick
    a format from the name (matplotlib) still do.

    Example:
      with atomic_path(run_dir / "loss.png") as tmp:
          fig.savefig(tmp)
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_path` (never half-written)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return cm


def per_class_accuracy(cm: np.ndarray) -> list[float | None]:
    """Recall of each class (None for a class without examples)."""
    totals = cm.sum(1)
    return [float(cm[i, i] / t) if t else None for i, t in enumerate(totals)]


def evaluate_split(eval_step: Any, state: Any, split: Split, batch_size: int, mesh: Any,
                   num_classes: int) -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and confusion matrix of `state` on `split`.

    Batches all have `batch_size` rows (the last one padded and masked), so the
    eval step compiles once.
    """
    import jax

    from cnnpipe.steps import shard_batch

    loss_sum, correct, count = 0.0, 0.0, 0.0
    preds, pending = [], []
    with prefetch((shard_batch(mesh, x, y, m) + (m,) for x, y, m in eval_batches(split, batch_size)),
                  size=2) as batches:
        for images, labels, mask, host_mask in batches:
            pending.append((eval_step(state, images, labels, mask), host_mask))
    for out, host_mask in pending:
        out = jax.device_get(out)
        loss_sum += float(out["loss_sum"])
        correct += float(out["correct"])
        count += float(out["count"])
        preds.append(np.asarray(out["predictions"])[host_mask])
    predictions = np.concatenate(preds) if preds else np.zeros(0, np.int32)
    cm = confusion_matrix(split.labels, predictions, num_classes)
    return {"loss": loss_sum / max(count, 1.0), "accuracy": correct / max(count, 1.0), "count": int(count),
            "per_class_accuracy": per_class_accuracy(cm), "confusion": cm, "predictions": predictions}


def format_confusion(cm: np.ndarray, classes: Sequence[str]) -> str:
    """The confusion matrix as a text table (rows: true class, columns: predicted)."""
    width = max(6, max(len(c) for c in classes) + 1, len(str(int(cm.max(initial=0)))) + 1)
    head = "true \\ pred".ljust(width) + "".join(c[:width - 1].rjust(width) for c in classes)
    rows = [c.ljust(width) + "".join(str(int(v)).rjust(width) for v in row) for c, row in zip(classes, cm)]
    return "\n".join([head, *rows])


def _save_figure(fig: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def plot_curves(metrics_path: str | os.PathLike, plots_dir: str | os.PathLike) -> None:
    """loss.png and accuracy.png (train per log line, validation per epoch) from metrics.jsonl."""
    from matplotlib.figure import Figure

    train: dict[str, list[float]] = {"step": [], "loss": [], "accuracy": []}
    val: dict[str, list[float]] = {"step": [], "loss": [], "accuracy": []}
    for line in Path(metrics_path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("loss") is None:  # non-finite step
            continue
        into = val if rec.get("split") == "val" else train
        for key in into:
            into[key].append(rec[key])
    for key, label in (("loss", "loss"), ("accuracy", "accuracy")):
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot(train["step"], train[key], label="train")
        ax.plot(val["step"], val[key], "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        _save_figure(fig, Path(plots_dir) / f"{key}.png")


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


# ---------------------------------------------------------------- finished runs

@dataclass
class Run:
    """A run's model rebuilt from its directory: config, dataset info, graphdef, state, checkpoint step."""

    run_dir: Path
    cfg: Any
    info: dict[str, Any]
    graphdef: Any
    state: Any
    step: int

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    def model(self) -> Any:
        """The CNN (eval mode) with this checkpoint's parameters."""
        from cnnpipe.steps import state_to_model

        return state_to_model(self.graphdef, self.state)


def load_run(run_dir: str | os.PathLike, checkpoint: str = "best") -> Run:
    """Rebuild a run's model from its directory and restore a checkpoint.

    Args:
      checkpoint: "best" (highest validation accuracy; the latest if none was
        evaluated), "latest", or a step number.
    Raises:
      FileNotFoundError: not a run directory, or no complete checkpoint (the message names it).
    """
    from flax import nnx

    from cnnpipe import steps
    from cnnpipe.checkpoint import Checkpoints
    from cnnpipe.config import load_config
    from cnnpipe.models import build_model

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: not a cnnpipe run directory (config.yaml is missing)")
    cfg = load_config(run_dir / "config.yaml")
    info = read_dataset_info(run_dir)
    model = build_model(cfg.model, in_channels=int(info["channels"]), num_classes=len(info["classes"]),
                        input_size=tuple(info["size"]), bit_depth=int(info["bit_depth"]),
                        rngs=nnx.Rngs(cfg.seed), mean=info["mean"], std=info["std"])
    total = steps_per_epoch(int(info["num_train"]), cfg.train.batch_size) * cfg.train.epochs
    tx = steps.make_optimizer(cfg.optimizer, total)
    graphdef, state = steps.create_train_state(model, tx, cfg.seed)
    ckpts = Checkpoints(run_dir / "checkpoints", read_only=True)
    try:
        if checkpoint == "best":
            step = ckpts.best_step() or ckpts.latest_step()
        elif checkpoint == "latest":
            step = ckpts.latest_step()
        elif str(checkpoint).isdigit():
            step = int(checkpoint)
        else:
            raise ValueError(f"--checkpoint: got {checkpoint!r}; expected best, latest or a step number "
                             f"(saved: {', '.join(map(str, ckpts.steps())) or 'none'})")
        state, _, step = ckpts.restore(state, step)
    finally:
        ckpts.close()
    return Run(run_dir, cfg, info, graphdef, state, step)


def data_overrides(spec: str) -> list[str]:
    """`--data` for evaluate -> config overrides: a store dir, an image folder, "shapes" or "tfds:NAME"."""
    if spec == "shapes":
        return ["data.source=shapes"]
    if spec.startswith("tfds:"):
        return ["data.source=tfds", f"data.name={json.dumps(spec[5:])}"]
    path = Path(spec)
    if (path / "meta.json").is_file():
        return ["data.source=store", f"data.path={json.dumps(str(path))}"]
    if path.is_dir():
        return ["data.source=folder", f"data.path={json.dumps(str(path))}"]
    raise FileNotFoundError(f"--data: {spec} is not a store, an image folder, 'shapes' or 'tfds:NAME'")


def _check_compatible(run: Run, ds: Dataset) -> None:
    info = run.info
    for what, have, want in (("classes", ds.classes, info["classes"]), ("image size", list(ds.size), info["size"]),
                             ("channels", ds.channels, info["channels"]), ("bit depth", ds.bit_depth,
                                                                           info["bit_depth"])):
        if have != want:
            raise ValueError(f"{ds.description}: {what} {have} do not match the run's {what} {want}")


def evaluate_run(run: Run, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], Dataset]:
    """Evaluate `run` on the validation split of its data, or of the data `overrides` select."""
    from cnnpipe import steps
    from cnnpipe.config import config_from_dict
    from cnnpipe.data import load_dataset

    cfg = run.cfg
    if overrides:
        cfg = config_from_dict(cfg.model_dump(mode="json"), overrides, source="--data/--set")
    ds = load_dataset(cfg.data, seed=cfg.seed)
    _check_compatible(run, ds)
    mesh = steps.make_mesh(0)
    batch = -(-cfg.train.eval_batch_size // mesh.size) * mesh.size
    state = steps.replicate(mesh, run.state)
    result = evaluate_split(steps.make_eval_step(run.graphdef, mesh), state, ds.val, batch, mesh,
                            ds.num_classes)
    return result, ds


def prepare_for_run(path: str | os.PathLike, info: Mapping[str, Any]) -> Any:
    """Decode and resize one image exactly as a run's training data (`info`: its dataset.json).

    Returns a `cnnpipe.transform.InputImage` (raw integer pixels (H, W, C), planes, notes);
    used by `cnnpipe predict` and `cnnpipe inspect`. The rules are `prepare_image`'s: an
    8-bit image for a 16-bit model is promoted exactly (x257); a 16-bit image for an 8-bit
    model is refused, since nothing in cnnpipe drops 16-bit values to 8 bits.
    """
    from cnnpipe.transform import prepare_image

    return prepare_image(path, in_channels=int(info["channels"]), bit_depth=int(info["bit_depth"]),
                         size=tuple(info["size"]), resize=str(info.get("resize") or "crop"))


def predict_images(run: Run, paths: Sequence[str | os.PathLike], top_k: int = 3,
                   batch_size: int = 64) -> list[list[tuple[str, float]]]:
    """Top-k (class, probability) for each image, most likely first."""
    from flax import nnx

    from cnnpipe.steps import forward

    if top_k < 1:
        raise ValueError(f"--top-k: got {top_k}; expected an integer >= 1")
    k = min(top_k, len(run.classes))
    graphdef, state = nnx.split(run.model())
    out: list[list[tuple[str, float]]] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        x = np.zeros((batch_size, *tuple(run.info["size"]), int(run.info["channels"])), np.float32)
        for i, p in enumerate(chunk):
            x[i] = prepare_for_run(p, run.info).pixels
        pr = np.asarray(forward(graphdef, (state,), x)[0])[:len(chunk)]
        for row in pr:
            order = np.argsort(-row, kind="stable")[:k]
            out.append([(run.classes[j], float(row[j])) for j in order])
    return out
