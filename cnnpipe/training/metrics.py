"""Classification metrics of a model on a split: loss, accuracy, per-class accuracy, confusion matrix.

`evaluate_split` is the per-epoch evaluation of the training loop and the body of
`cnnpipe evaluate`; the rest are plain numpy functions of labels and predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cnnpipe.datasets.batches import eval_batches, prefetch
from cnnpipe.datasets.dataset import Split

__all__ = ["confusion_matrix", "per_class_accuracy", "balanced_accuracy", "evaluate_split", "evaluate_resident",
           "format_confusion", "task_result"]


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return cm


def per_class_accuracy(cm: np.ndarray) -> list[float | None]:
    """Recall of each class (None for a class without examples)."""
    totals = cm.sum(1)
    return [float(cm[i, i] / t) if t else None for i, t in enumerate(totals)]


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes that have examples (scikit-learn's ``balanced_accuracy_score``)."""
    recalls = [r for r in per_class_accuracy(cm) if r is not None]
    return float(np.mean(recalls)) if recalls else 0.0


def evaluate_split(eval_step: Any, state: Any, split: Split, batch_size: int, mesh: Any,
                   num_classes: int, task: Any = None, thresholds: Any = "f1") -> dict[str, Any]:
    """Loss, accuracy, balanced accuracy, per-class accuracy (recall) and confusion matrix of `state` on `split`.

    Batches all have `batch_size` rows (the last one padded and masked), so the
    eval step compiles once. A multi-label or regression `task` (its eval step is
    `cnnpipe.training.task_steps.make_task_eval_step`'s) gives `task_result`'s result instead.
    """
    import jax

    from cnnpipe.training.mesh import process_rows, shard_batch

    pending = []
    rows = process_rows(mesh, batch_size)   # this process's rows of every batch (all of them in one process)
    with prefetch((shard_batch(mesh, x, y, m) for x, y, m in eval_batches(split, batch_size, rows=rows)),
                  size=2) as batches:
        for images, labels, mask in batches:
            pending.append(eval_step(state, images, labels, mask))
    outs = [jax.device_get(out) for out in pending]   # replicated: every process has the whole batch's results
    if task is not None and not task.is_classification:
        return task_result(outs, split.labels, task, thresholds)
    sums = [[float(out[k]) for out in outs] for k in ("loss_sum", "correct", "count")]
    return _result(*sums, [np.asarray(out["predictions"]) for out in outs], split.labels, num_classes)


def evaluate_resident(eval_step: Any, state: Any, placed: Any, labels: np.ndarray, num_classes: int,
                      task: Any = None, thresholds: Any = "f1") -> dict[str, Any]:
    """`evaluate_split`'s result for a split on the devices (`cnnpipe.training.resident.place_eval`),
    evaluated in one program (`cnnpipe.training.steps.make_eval_step(resident=True)`); `labels`: the
    split's labels on the host. The batches and their order are `evaluate_split`'s."""
    import jax

    out = jax.device_get(eval_step(state, placed.split.images, placed.split.labels, placed.order, placed.mask))
    if task is not None and not task.is_classification:   # per batch, stacked: as separate batches' outputs
        return task_result([{k: v[b] for k, v in out.items()} for b in range(len(out["count"]))], labels, task,
                           thresholds)
    sums = [[float(v) for v in out[k]] for k in ("loss_sum", "correct", "count")]
    return _result(*sums, list(np.asarray(out["predictions"])), labels, num_classes)


def _result(loss_sums: list[float], corrects: list[float], counts: list[float], predictions: list[np.ndarray],
            labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """The evaluation of per-batch sums (added in order, in float64) and predictions (padding at the end)."""
    loss_sum, correct, count = (float(sum(v, 0.0)) for v in (loss_sums, corrects, counts))
    predictions = np.concatenate(predictions)[:len(labels)] if predictions else np.zeros(0, np.int32)
    cm = confusion_matrix(labels, predictions, num_classes)
    return {"loss": loss_sum / max(count, 1.0), "accuracy": correct / max(count, 1.0), "count": int(count),
            "balanced_accuracy": balanced_accuracy(cm), "per_class_accuracy": per_class_accuracy(cm),
            "confusion": cm, "predictions": predictions}


def task_result(outs: list[dict[str, Any]], targets: np.ndarray, task: Any, thresholds: Any) -> dict[str, Any]:
    """The evaluation of a multi-label or regression split from its eval step's per-batch outputs.

    "loss" (mean over the known entries), "count" (images), the task's metrics
    (`cnnpipe.tasks.Task.metrics`: for multilabel at the thresholds ``train.thresholds``
    gives, fitted on these rows for "f1"; "low_positive_labels" fell back to 0.5), and
    "outputs" (N, outputs) and "row_loss" (N,) for every image in order.
    """
    n = len(targets)
    loss_sum = float(sum((float(o["loss_sum"]) for o in outs), 0.0))
    known = float(sum((float(o["known"]) for o in outs), 0.0))
    outputs = np.concatenate([np.asarray(o["outputs"]) for o in outs])[:n] if outs else np.zeros((0, task.num_outputs))
    row_loss = np.concatenate([np.asarray(o["row_loss"]) for o in outs])[:n] if outs else np.zeros(0)
    # a diverged model's NaN outputs: its loss says so; the metrics are of outputs 0 (not an error)
    finite = np.nan_to_num(outputs.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    result: dict[str, Any] = {"loss": loss_sum / max(known, 1.0) if known else float("nan"), "count": n}
    if task.kind == "multilabel":
        t, low = task.thresholds_for(thresholds, targets, finite)
        result.update(task.metrics(targets, finite, t), low_positive_labels=low)
    else:
        result.update(task.metrics(targets, finite))
    return {**result, "outputs": outputs, "row_loss": row_loss}


def format_confusion(cm: np.ndarray, classes: Sequence[str]) -> str:
    """The confusion matrix as a text table (rows: true class, columns: predicted)."""
    width = max(6, max(len(c) for c in classes) + 1, len(str(int(cm.max(initial=0)))) + 1)
    head = "true \\ pred".ljust(width) + "".join(c[:width - 1].rjust(width) for c in classes)
    rows = [c.ljust(width) + "".join(str(int(v)).rjust(width) for v in row) for c, row in zip(classes, cm)]
    return "\n".join([head, *rows])
