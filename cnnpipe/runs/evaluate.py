"""`cnnpipe evaluate`: a run's accuracy on its own validation data or on other data.

The metrics themselves are `cnnpipe.training.metrics`; the run comes from `cnnpipe.runs.load.load_run`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.datasets.dataset import Dataset
from cnnpipe.runs.load import Run, spec_for_run
from cnnpipe.training.metrics import evaluate_split

__all__ = ["data_overrides", "evaluate_run", "check_compatible", "describe_views", "format_task_result"]


def data_overrides(spec: str, info: Mapping[str, Any] | None = None) -> list[str]:
    """`--data` for evaluate -> config overrides: a store dir, an image folder, "shapes" or "tfds:NAME".

    An image folder is prepared as the run's own data was (`info`, its dataset.json: size, resize,
    planes by name and count, page mode), through `spec_for_run`, as predict prepares files.
    """
    if spec == "shapes":
        return ["data.source=shapes"]
    if spec.startswith("tfds:"):
        return ["data.source=tfds", f"data.name={json.dumps(spec[5:])}"]
    path = Path(spec)
    if (path / "meta.json").is_file():
        return ["data.source=store", f"data.path={json.dumps(str(path))}"]
    if path.is_dir():
        folder = ["data.source=folder", f"data.path={json.dumps(str(path))}"]
        if info is None:
            return folder
        run_spec = spec_for_run(info)
        return [*folder, f"data.size=[{run_spec.size[0]}, {run_spec.size[1]}]", f"data.resize={run_spec.resize}",
                f"data.channels={run_spec.channels}", f"data.pages={run_spec.pages}"]
    raise FileNotFoundError(f"--data: {spec} is not a store, an image folder, 'shapes' or 'tfds:NAME'")


def _in_run_order(ds: Dataset, task: Any) -> Dataset:
    """`ds` with its multi-label or regression targets' columns in the run's order, when it holds the same
    names in another order (a 0/1-column table keeps its columns' order, a delimited one sorts the labels)."""
    if task.is_classification or ds.classes == list(task.names) or sorted(ds.classes) != sorted(task.names):
        return ds
    import dataclasses

    from cnnpipe.datasets.dataset import Split

    order = [ds.classes.index(n) for n in task.names]
    val = Split(ds.val.images, np.asarray(ds.val.labels)[:, order], ds.val.sources)
    train = Split(ds.train.images, np.asarray(ds.train.labels)[:, order], ds.train.sources)
    return dataclasses.replace(ds, classes=list(task.names), train=train, val=val)


def check_compatible(run: Run, ds: Dataset) -> None:
    """ValueError naming what differs when `ds` is not data the run's model can take."""
    info = run.info
    have_type = str(np.dtype(ds.train.images.dtype))
    want_type = str(info.get("dtype") or {16: "uint16"}.get(int(info["bit_depth"]), "uint8"))
    # int16 and float32 hold values in the data's own units (HU, dB): a model of one takes the other
    same_units = {have_type, want_type} <= {"int16", "float32"}
    for what, have, want in ((run.task.noun, ds.classes, info["classes"]), ("image size", list(ds.size), info["size"]),
                             ("channels", ds.channels, info["channels"]),
                             ("pixel type", have_type, want_type if not same_units else have_type)):
        if have != want:
            raise ValueError(f"{ds.description}: {what} {have} do not match the run's {what} {want}")


def evaluate_run(run: Run, overrides: Sequence[str] = (), *, tta: bool = False) -> tuple[dict[str, Any], Dataset]:
    """Evaluate `run` on the validation split of its data, or of the data `overrides` select.

    `tta`: average the probabilities over the views `cnnpipe.training.augment.tta_views`
    gives for the run's training augmentation (the result's "views" names them).
    Returns `cnnpipe.training.metrics.evaluate_split`'s result (plus "views") and the data.
    """
    from cnnpipe.config import config_from_dict
    from cnnpipe.datasets.sources import load_dataset
    from cnnpipe.training import steps
    from cnnpipe.training.augment import tta_views

    cfg, task = run.cfg, run.task
    if overrides:
        cfg = config_from_dict(cfg.model_dump(mode="json"), overrides, source="--data/--set")
    ds = _in_run_order(load_dataset(cfg.data, seed=cfg.seed), task)
    check_compatible(run, ds)
    mesh = steps.make_mesh(0)
    batch = -(-cfg.train.eval_batch_size // mesh.size) * mesh.size
    state = steps.replicate(mesh, run.state)
    views = tta_views(run.cfg.augment) if tta else ()
    if task.is_classification:
        result = evaluate_split(steps.make_eval_step(run.graphdef, mesh, views), state, ds.val, batch, mesh,
                                ds.num_classes)
        return {**result, "views": views}, ds
    from cnnpipe.training.task_steps import make_task_eval_step

    # the run's own thresholds (fitted on its validation split in training), never refitted on this data
    thresholds = None if run.thresholds is None else dict(zip(task.names, map(float, run.thresholds)))
    eval_step = make_task_eval_step(run.graphdef, mesh, task, cfg.train.loss, views)
    result = evaluate_split(eval_step, state, ds.val, batch, mesh, ds.num_classes, task, thresholds)
    return {**result, "views": views, "threshold_note": run.threshold_note}, ds


def format_task_result(run: Run, result: dict[str, Any]) -> str:
    """`cnnpipe evaluate`'s report of a multi-label or regression run: the task's metrics, then a table
    per label (AP, AUROC, F1, precision, recall, support, threshold) or target (RMSE, MAE, R2, r, count)."""
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    task = run.task
    lines = []
    if task.kind == "multilabel":
        lines.append(f"mAP: {f(result['map'])}  macro F1: {f(result['macro_f1'])}  micro F1: {f(result['micro_f1'])}  "
                     f"macro AUROC: {f(result['macro_auroc'])}  subset accuracy: {f(result['subset_accuracy'])}  "
                     f"Hamming loss: {f(result['hamming_loss'])}  loss: {result['loss']:.4f}")
        if len(result.get("views", ())) > 1:
            lines.append("loss: binary cross-entropy of the probabilities averaged over the views")
        if result.get("threshold_note"):
            lines.append(f"warning: {result['threshold_note']}")
        cols, per = ("ap", "auroc", "f1", "precision", "recall", "threshold"), result["per_label"]
        lines.append(f"  {'label':<16} " + " ".join(f"{c:>9}" for c in cols) + f" {'support':>8}")
        lines += [f"  {n:<16} " + " ".join(f"{f(per[n][c]):>9}" for c in cols) + f" {per[n]['support']:>8}"
                  for n in task.names]
    else:
        lines.append(f"RMSE: {f(result['rmse'])}  MAE: {f(result['mae'])}  R2: {f(result['r2'])}  Pearson r: "
                     f"{f(result['pearson'])}  loss: {result['loss']:.4f}  (means over targets; data units)")
        cols, per = ("rmse", "mae", "r2", "pearson"), result["per_target"]
        lines.append(f"  {'target':<16} " + " ".join(f"{c:>9}" for c in cols) + f" {'count':>8}")
        lines += [f"  {n:<16} " + " ".join(f"{f(per[n][c]):>9}" for c in cols) + f" {per[n]['count']:>8}"
                  for n in task.names]
    return "\n".join(lines)


def describe_views(views: Sequence[str]) -> str:
    """E.g. "test-time augmentation over 2 views (identity, hflip)" for evaluate's header."""
    if len(views) <= 1:
        return "test-time augmentation over 1 view (the run trained without flips or rotations)"
    return f"test-time augmentation over {len(views)} views ({', '.join(views)})"
