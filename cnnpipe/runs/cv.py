"""`cnnpipe cv`: k-fold cross-validation, one ordinary run per fold, and the table of their metrics.

Each fold i trains the config with ``data.fold: i`` (fold i validates, the others
train) into ``WORKDIR/fold-<i>``: a normal run directory, so `evaluate`, `predict`
and `inspect` work on it and an interrupted fold resumes from its last checkpoint
when the command is run again with the same WORKDIR; a finished fold (its `summary.json`)
is read, not retrained. A fold's `cv_fold.json` holds a fingerprint of its data, so a
rerun after the store, folder or table changed is refused rather than mixing old and
new folds. ``WORKDIR/cv.json`` holds every metric per fold with the mean and the
sample standard deviation (n - 1: K runs are a sample of the runs the data could
give), the figure scikit-learn users compare settings by.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnnpipe.config import Config, load_config
from cnnpipe.files import write_atomic

__all__ = ["CV_METRICS", "fold_count", "data_fingerprint", "run_cv", "format_cv"]

# the runs' summary.json keys the table shows, in order (per-class accuracy follows)
CV_METRICS = ("val_accuracy", "balanced_accuracy", "val_loss", "best_val_accuracy", "final_val_accuracy",
              "final_val_loss", "epochs")


# the same for multi-label and regression runs (their summary.json's "task")
TASK_CV_METRICS = {
    "multilabel": ("val_map", "val_macro_f1", "val_micro_f1", "val_macro_auroc", "val_subset_accuracy",
                   "val_hamming_loss", "val_loss", "epochs"),
    "regression": ("val_rmse", "val_mae", "val_r2", "val_pearson", "val_loss", "epochs")}


def fold_count(cfg: Config, folds: int | None) -> tuple[Config, int]:
    """(the config with its data's folds set, K): K from `folds`, the store's folds or data.folds.

    Raises:
      ValueError: a data source without folds, a `folds` that differs from the store's, data.fold set.
    """
    data = cfg.data
    if data.fold is not None:
        raise ValueError(f"data.fold: cnnpipe cv sets it for each fold; leave it out (got {data.fold})")
    if data.source == "store":
        from cnnpipe.datasets.store import load_store

        k = load_store(data.path).num_folds if data.path else None
        if k is None:
            raise ValueError(f"data.path: {data.path} has no cross-validation folds; preprocess it with --folds K")
        if folds is not None and folds != k:
            raise ValueError(f"--folds: {folds} asked for, but the store {data.path} holds {k} folds")
        return cfg, k
    if data.source == "folder":
        k = folds or data.folds
        if k is None:
            raise ValueError("--folds: how many folds? (--folds K, or data.folds in the config)")
        if k < 2:
            raise ValueError(f"--folds: expected 2 or more, got {k}")
        return cfg.model_copy(update={"data": data.model_copy(update={"folds": k})}), k
    raise ValueError(f"data.source: cnnpipe cv needs a store made with --folds or a folder, got {data.source!r} "
                     "(set data.source and data.path)")


def _difference(a: Any, b: Any, key: str = "") -> str | None:
    """The first config key whose value differs between two `model_dump`s, e.g. "train.epochs"."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            found = _difference(a.get(k), b.get(k), f"{key}.{k}" if key else k)
            if found:
                return found
        return None
    return key if a != b else None


def data_fingerprint(cfg: Config) -> str:
    """A hash of what fold `cfg.data.fold` trains and validates on: classes, labels, validation files, statistics."""
    import hashlib

    from cnnpipe.datasets.sources import load_dataset

    ds = load_dataset(cfg.data, cfg.seed)
    h = hashlib.sha256(json.dumps([ds.classes, list(ds.mean), list(ds.std), ds.size, ds.channels]).encode())
    for part in (ds.train.labels, ds.val.labels):
        h.update(part.tobytes())
    h.update("\n".join(ds.val.sources or ()).encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def _finished(cfg: Config, run_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """A fold's summary if it finished with this config and data; ValueError if it ran with others."""
    saved_cfg, summary, mark = run_dir / "config.yaml", run_dir / "summary.json", run_dir / "cv_fold.json"
    changed_data = mark.is_file() and json.loads(mark.read_text()).get("data") != fingerprint
    if not saved_cfg.is_file():
        if changed_data:
            raise ValueError(f"{run_dir}: this fold was begun on other data; use another --workdir")
        return None
    saved = load_config(saved_cfg)
    # size and channels were resolved from the data when the run was written
    resolved = cfg.data.model_copy(update={"size": saved.data.size, "channels": saved.data.channels})
    key = _difference(cfg.model_copy(update={"data": resolved}).model_dump(), saved.model_dump())
    if key is not None:
        raise ValueError(f"{saved_cfg}: this fold ran with another config ({key} differs); use another --workdir")
    if changed_data:   # the config is the same: the store, folder or table changed
        raise ValueError(f"{run_dir}: this fold was trained on other data (the store, folder or table changed "
                         "since); use another --workdir")
    if not summary.is_file():
        return None
    return json.loads(summary.read_text())


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def _table(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """{metric: {"per_fold": [...], "mean": m, "std": s}} for `CV_METRICS` and each class's accuracy."""
    classes = list(summaries[0].get("per_class_accuracy", {}))
    metrics = TASK_CV_METRICS.get(summaries[0].get("task", ""), CV_METRICS)
    rows: dict[str, list[Any]] = {m: [s.get(m) for s in summaries] for m in metrics}
    for c in classes:
        rows[f"accuracy[{c}]"] = [s["per_class_accuracy"].get(c) for s in summaries]
    for per, key in (("per_label", "ap"), ("per_target", "rmse")):   # multilabel AP, regression RMSE
        for name in summaries[0].get(per, {}):
            rows[f"{key}[{name}]"] = [s[per][name][key] for s in summaries]
    out = {}
    for metric, values in rows.items():
        mean, std = _stats(values)
        out[metric] = {"per_fold": values, "mean": mean, "std": std}
    return out


def run_cv(cfg: Config, folds: int | None, workdir: str | os.PathLike, *, name: str = "cv",
           compile_cache: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `cfg` once per fold into `workdir`/fold-<i>; write and return `workdir`/cv.json's mapping.

    Returns:
      {"folds": K, "runs": ["fold-0", ...], "metrics": `_table`, "std": "sample (n - 1)"}.

    Raises:
      ValueError: see `fold_count`; a fold directory written with another config.
      NonFiniteLossError: a fold's loss diverged (that fold's run says where).
    """
    from cnnpipe.training.train import train_and_evaluate

    cfg, k = fold_count(cfg, folds)
    root = Path(workdir)
    summaries = []
    for i in range(k):
        fold_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"fold": i})})
        run_dir = root / f"fold-{i}"
        fingerprint = data_fingerprint(fold_cfg)
        summary = _finished(fold_cfg, run_dir, fingerprint)
        if summary is None:
            log(f"cv: fold {i} ({i + 1} of {k}) -> {run_dir}")
            fresh = not run_dir.exists()
            run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(run_dir / "cv_fold.json", json.dumps({"fold": i, "data": fingerprint}) + "\n")
            try:
                summary = train_and_evaluate(fold_cfg, run_dir, name=f"{name}-fold-{i}", resume=True, log=log,
                                             compile_cache=compile_cache)
            except ValueError:   # a config or data the run refuses: no fold folder left behind for nothing
                if fresh and not (run_dir / "config.yaml").exists():
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise
        else:
            log(f"cv: fold {i} ({i + 1} of {k}) already done ({run_dir / 'summary.json'})")
        summaries.append(summary)
    result = {"folds": k, "runs": [f"fold-{i}" for i in range(k)], "std": "sample (n - 1)",
              "metrics": _table(summaries)}
    write_atomic(root / "cv.json", json.dumps(result, indent=2) + "\n")
    return result


def format_cv(result: dict[str, Any]) -> str:
    """The cross-validation table: a row per metric, a column per fold, then mean and std."""
    k = result["folds"]
    width = max(len(m) for m in result["metrics"])
    folds = "  ".join(f"{'fold ' + str(i):>8}" for i in range(k))
    head = f"{'metric':<{width}}  {folds}  {'mean':>8}  {'std':>8}"
    lines = [head]

    def cell(v: Any) -> str:
        return f"{'-':>8}" if v is None else f"{v:>8d}" if isinstance(v, int) else f"{v:>8.4f}"

    for metric, row in result["metrics"].items():
        lines.append(f"{metric:<{width}}  " + "  ".join(cell(v) for v in row["per_fold"])
                     + f"  {cell(row['mean'])}  {cell(row['std'])}")
    return "\n".join(lines)
