"""What a run's task changes in the training loop: its steps, log lines, checkpoint metrics, summary.

`cnnpipe.training.train` asks this module, never ``task.kind``, so a single-label run
keeps exactly its lines, records and summary, and the other tasks have theirs in one
place. The task itself (targets, loss, metrics) is `cnnpipe.tasks`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.files import write_atomic
from cnnpipe.tasks import CHECKPOINT_METRICS, Task, result_key

__all__ = ["make_steps", "loss_weights", "train_score_name", "epoch_record", "epoch_line", "checkpoint_metrics",
           "task_summary",
           "record_thresholds", "read_thresholds", "describe_task", "THRESHOLDS_FILE", "curve_keys", "done_line"]

THRESHOLDS_FILE = "thresholds.json"   # multilabel: {checkpoint step: {label: threshold}}


def make_steps(task: Task, graphdef: Any, tx: Any, mesh: Any, cfg: Any, loss_args: dict[str, Any], head: Any,
               pos_weight: Any, resident_val: bool) -> tuple[Any, Any, Any]:
    """(train step, frozen-backbone train step or None, eval step) for the run's task."""
    from cnnpipe.training import steps

    if task.is_classification:
        train_step = steps.make_train_step(graphdef, tx, mesh, **loss_args)
        frozen = steps.make_train_step(graphdef, tx, mesh, frozen_backbone=head, **loss_args) \
            if cfg.pretrained.freeze_epochs else None
        return train_step, frozen, steps.make_eval_step(graphdef, mesh, resident=resident_val)
    from cnnpipe.training.task_steps import make_task_eval_step, make_task_train_step

    args = {**loss_args, "loss": cfg.train.loss, "pos_weight": pos_weight}
    train_step = make_task_train_step(graphdef, tx, mesh, task, **args)
    frozen = make_task_train_step(graphdef, tx, mesh, task, frozen_backbone=head, **args) \
        if cfg.pretrained.freeze_epochs else None
    return train_step, frozen, make_task_eval_step(graphdef, mesh, task, cfg.train.loss, resident=resident_val)


def loss_weights(ds: Any, train_cfg: Any) -> tuple[Any, Any]:
    """(class weights (K,) of a single-label run, pos_weight (L,) of a multi-label one), each None when unset
    (`cnnpipe.training.loss.class_weight_vector`, `cnnpipe.tasks.losses.pos_weight_vector`)."""
    from cnnpipe.tasks.losses import pos_weight_vector
    from cnnpipe.training.loss import class_weight_vector

    if ds.task.is_classification:
        return class_weight_vector(train_cfg.class_weights, ds.train.labels, ds.classes), None
    if ds.task.kind == "multilabel":
        return None, pos_weight_vector(train_cfg.pos_weight, ds.train.labels, ds.classes)
    return None, None


def train_score_name(task: Task) -> str:
    """The name of the train log's second number: accuracy (classification), label_accuracy, mae."""
    return {"classification": "accuracy", "multilabel": "label_accuracy", "regression": "mae"}[task.kind]


def curve_keys(task: Task) -> tuple[str, str, str]:
    """(train record key, val record key, axis label) of the second curve in plots/."""
    return {"classification": ("accuracy", "accuracy", "accuracy"),
            "multilabel": ("label_accuracy", "map", "label accuracy (train) / mAP (val)"),
            "regression": ("mae", "mae", "mean absolute error")}[task.kind]


def _headline(task: Task, result: dict[str, Any]) -> dict[str, Any]:
    """The task's scalar metrics of an evaluation, by result key (None where undefined)."""
    keys = {"multilabel": ("map", "macro_f1", "micro_f1", "macro_auroc", "subset_accuracy", "hamming_loss"),
            "regression": ("rmse", "mae", "r2", "pearson")}[task.kind]
    return {k: result.get(k) for k in keys}


def epoch_record(task: Task, result: dict[str, Any]) -> dict[str, Any]:
    """The task's part of an epoch's validation line in metrics.jsonl."""
    if task.is_classification:
        return {"accuracy": result["accuracy"], "balanced_accuracy": result["balanced_accuracy"],
                "per_class_recall": dict(zip(task.names, result["per_class_accuracy"]))}
    per = "per_label" if task.kind == "multilabel" else "per_target"
    return {**_headline(task, result), per: result[per],
            **({"thresholds": result["thresholds"]} if task.kind == "multilabel" else {})}


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def epoch_line(task: Task, result: dict[str, Any]) -> str:
    """The log's words for an epoch's evaluation (after "val loss ...")."""
    if task.is_classification:
        return f"val accuracy {result['accuracy']:.4f}, balanced {result['balanced_accuracy']:.4f}"
    if task.kind == "multilabel":
        return (f"mAP {_fmt(result['map'])}, macro F1 {_fmt(result['macro_f1'])}, micro F1 "
                f"{_fmt(result['micro_f1'])}, AUROC {_fmt(result['macro_auroc'])}")
    return f"RMSE {_fmt(result['rmse'])}, MAE {_fmt(result['mae'])}, R2 {_fmt(result['r2'])}"


def checkpoint_metrics(task: Task, result: dict[str, Any]) -> dict[str, float]:
    """What a checkpoint is saved with (`cnnpipe.tasks.CHECKPOINT_METRICS`), undefined values left out."""
    out = {}
    for metric in CHECKPOINT_METRICS[task.kind]:
        value = result.get(result_key(metric))
        if value is not None and np.isfinite(value):
            out[metric] = float(value)
    return out


def done_line(task: Task, result: dict[str, Any], final: dict[str, Any], summary: dict[str, Any],
              best_text: str | None) -> str:
    """The run's last line, before its times (`best_text`: early stopping's best, or None)."""
    if task.is_classification:
        if best_text is not None:
            return (f"done: the run's result is checkpoint {summary['result_step']} (best {best_text}): "
                    f"val accuracy {result['accuracy']:.4f}, balanced accuracy {result['balanced_accuracy']:.4f}; "
                    f"last epoch: val accuracy {final['accuracy']:.4f}")
        return (f"done: val accuracy {final['accuracy']:.4f} (best {summary['best_val_accuracy']:.4f}), "
                f"balanced accuracy {final['balanced_accuracy']:.4f}")
    which = f"checkpoint {summary['result_step']} (best {best_text})" if best_text is not None else "last epoch"
    extra = ""
    if task.kind == "multilabel" and result.get("low_positive_labels"):
        extra = f"; threshold 0.5 (too few validation positives): {', '.join(result['low_positive_labels'])}"
    return f"done ({which}): {epoch_line(task, result)}{extra}"


def task_summary(task: Task, result: dict[str, Any], pos_weight: Any) -> dict[str, Any]:
    """summary.json's task part of a multi-label or regression run: its metrics as ``val_<name>``, per label
    or target, thresholds, pos_weight and (regression) the targets' training statistics."""
    out: dict[str, Any] = {"task": task.kind, "val_loss": result["loss"],
                           **{f"val_{k}": v for k, v in _headline(task, result).items()}}
    if task.kind == "multilabel":
        out.update(per_label=result["per_label"], thresholds=result["thresholds"],
                   thresholds_fallback=result.get("low_positive_labels", []),
                   pos_weight=None if pos_weight is None else dict(zip(task.names, map(float, pos_weight))))
    else:
        out.update(per_target=result["per_target"],
                   target_mean=dict(zip(task.names, task.target_mean or ())),
                   target_std=dict(zip(task.names, task.target_std or ())))
    return out


def record_thresholds(run_dir: Path, step: int, result: dict[str, Any]) -> None:
    """Add checkpoint `step`'s fitted thresholds to the run's thresholds.json (multilabel results only)."""
    if "thresholds" not in result:
        return
    known = read_thresholds(run_dir)
    known[str(step)] = result["thresholds"]
    ordered = dict(sorted(known.items(), key=lambda kv: int(kv[0])))
    write_atomic(run_dir / THRESHOLDS_FILE, json.dumps(ordered, indent=1) + "\n")


def read_thresholds(run_dir: Path) -> dict[str, dict[str, float]]:
    """{step: {label: threshold}} of a multi-label run ({} when it has none). ValueError naming the file
    when it is not such a mapping."""
    path = Path(run_dir) / THRESHOLDS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ok = isinstance(data, dict) and all(isinstance(v, dict) and all(
            isinstance(t, (int, float)) and not isinstance(t, bool) for t in v.values()) for v in data.values())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable or corrupt run file ({' '.join(str(exc).split())[:80]})") from None
    if not ok:
        raise ValueError(f"{path}: corrupt run file (expected {{step: {{label: threshold}}}})")
    return data


def describe_task(task: Task, train_targets: np.ndarray, pos_weight: Any, cfg: Any,
                  say: Callable[[str], None]) -> None:
    """The start-of-run lines of a multi-label or regression run: its loss, label counts, warnings."""
    if task.is_classification:
        return
    from cnnpipe.training.loss import describe_weights

    y = np.asarray(train_targets, np.float64)
    loss = task.loss_name(cfg.train.loss)
    if task.kind == "multilabel":
        pos = np.nansum(y == 1, 0).astype(int)
        unknown = int(np.isnan(y).sum())
        say(f"task: multi-label, {len(task.names)} labels, loss {loss}; training positives per label: "
            + ", ".join(f"{n} {p}" for n, p in list(zip(task.names, pos))[:12])
            + (", ..." if len(task.names) > 12 else "") + (f"; {unknown} unknown entries masked" if unknown else ""))
        if not pos.all():
            say(f"warning: no training positives of label {', '.join(n for n, p in zip(task.names, pos) if not p)}; "
                "the model cannot learn it")
        if pos_weight is not None:
            say(f"pos_weight ({'auto: negatives/positives' if cfg.train.pos_weight == 'auto' else 'given'}): "
                f"{describe_weights(pos_weight, task.names)}")
        return
    say(f"task: regression of {', '.join(task.names)}, loss {loss} on standardised targets (training mean "
        + ", ".join(f"{m:.4g}" for m in task.target_mean or ()) + ", std "
        + ", ".join(f"{s:.4g}" for s in task.target_std or ()) + ")")
    constant = [n for n, col in zip(task.names, y.T) if np.nanmax(col, initial=0) == np.nanmin(col, initial=0)]
    if constant:
        say(f"warning: target {', '.join(constant)} has one value on the training split; the model can only "
            "learn that value")
