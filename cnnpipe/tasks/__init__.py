"""Tasks: single-label, multi-label and regression; what each means, in one place.

A run learns one task (DESIGN.md, "Tasks: one definition each"). `Task` says, for it,
how a target is stored, what the model's outputs mean, the loss, the metrics and the
main metric, and how an output becomes a decision; the store (meta.json "task"), the
run (dataset.json "task"), training, evaluate, predict, export and inspect all read it.

==============  =========================  ============================  ==================
task            target row (store, batch)  output the model reports       decision
==============  =========================  ============================  ==================
classification  int32 class index          softmax probabilities (K,)      argmax
multilabel      float32 multi-hot (L,);    sigmoid probabilities (L,)      p >= the label's
                NaN: unknown, masked                                        fitted threshold
regression      float32 values (T,);       values in the data's units     the values
                NaN: missing, masked       (standardised inside)
==============  =========================  ============================  ==================

Single-label classification is the default and keeps its own code paths unchanged
(`cnnpipe.training.loss`), so its runs stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["KINDS", "Task", "MAIN_METRIC", "CHECKPOINT_METRICS", "lower_is_better", "result_key", "TaskError"]

KINDS = ("classification", "multilabel", "regression")
# the metric that picks a run's best checkpoint unless early stopping names another
MAIN_METRIC = {"classification": "val_accuracy", "multilabel": "val_map", "regression": "val_rmse"}
# what a checkpoint is saved with (and so may be ranked by), per task
CHECKPOINT_METRICS = {
    "classification": ("val_accuracy", "balanced_accuracy", "val_loss"),
    "multilabel": ("val_map", "val_macro_f1", "val_micro_f1", "val_macro_auroc", "val_loss"),
    "regression": ("val_rmse", "val_mae", "val_r2", "val_loss"),
}
_LOWER = frozenset({"val_loss", "val_rmse", "val_mae", "val_hamming_loss"})


class TaskError(ValueError):
    """A setting that does not fit the run's task (the message names the key)."""


def lower_is_better(metric: str) -> bool:
    """Whether a smaller `metric` (a `CHECKPOINT_METRICS` name) is better."""
    return metric in _LOWER


def result_key(metric: str) -> str:
    """The key of `metric` in an evaluation result: "val_map" -> "map"; "balanced_accuracy" as it is."""
    return metric[4:] if metric.startswith("val_") else metric


@dataclass(frozen=True)
class Task:
    """A run's task: its kind, the names of its outputs and, for regression, the training targets' statistics.

    names: the classes (classification), labels (multilabel) or targets (regression), in output order.
    target_mean / target_std: regression only, per target in the data's units (the training
    split's, NaN ignored; a constant target has std 1): the model learns standardised values
    ``(y - mean) / std`` and `outputs` maps them back.
    """

    kind: str = "classification"
    names: tuple[str, ...] = ()
    target_mean: tuple[float, ...] | None = None
    target_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TaskError(f"task: got {self.kind!r}; expected one of {', '.join(KINDS)}")

    # ------------------------------------------------------------ records

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Task:
        """The task of a store's meta.json or a run's dataset.json ("task" absent: classification)."""
        rec = meta.get("task") or {}
        names = tuple(str(n) for n in meta.get("classes", ()))
        if not isinstance(rec, Mapping):
            raise TaskError(f"task: a JSON object expected, got {type(rec).__name__}")
        mean, std = rec.get("target_mean"), rec.get("target_std")
        return cls(str(rec.get("type", "classification")), names,
                   None if mean is None else tuple(float(m) for m in mean),
                   None if std is None else tuple(float(s) for s in std))

    def record(self) -> dict[str, Any]:
        """What meta.json and dataset.json hold under "task" (the names are their "classes")."""
        rec: dict[str, Any] = {"type": self.kind}
        if self.target_mean is not None:
            rec.update(target_mean=list(self.target_mean), target_std=list(self.target_std or ()))
        return rec

    def with_target_stats(self, train_targets: np.ndarray) -> Task:
        """A regression task with the statistics of `train_targets` (N, T) float32; other tasks as they are."""
        if self.kind != "regression":
            return self
        y = np.asarray(train_targets, np.float64)
        known = ~np.isnan(y)
        count = known.sum(0)
        mean = np.where(count > 0, np.nansum(y, 0) / np.maximum(count, 1), 0.0)
        var = np.where(count > 0, np.nansum((y - mean) ** 2, 0) / np.maximum(count, 1), 1.0)
        std = np.sqrt(var)
        std = np.where(std > 1e-12, std, 1.0)   # a constant target: outputs are offsets from it
        return Task(self.kind, self.names, tuple(float(m) for m in mean), tuple(float(s) for s in std))

    # ------------------------------------------------------------ shapes

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"

    @property
    def num_outputs(self) -> int:
        return len(self.names)

    @property
    def target_shape(self) -> tuple[int, ...]:
        """One row of the store's labels.npy: () for a class index, (L,) otherwise."""
        return () if self.is_classification else (len(self.names),)

    @property
    def target_dtype(self) -> np.dtype:
        return np.dtype(np.int32) if self.is_classification else np.dtype(np.float32)

    @property
    def main_metric(self) -> str:
        return MAIN_METRIC[self.kind]

    @property
    def noun(self) -> str:
        """"classes", "labels" or "targets" (for messages)."""
        return {"classification": "classes", "multilabel": "labels", "regression": "targets"}[self.kind]

    # ------------------------------------------------------------ outputs (traced under jit)

    def outputs(self, logits: Any) -> Any:
        """What the model reports (N, outputs) float32 from its logits: softmax, sigmoid, or values in the
        data's units (``logits * std + mean``). The one definition for evaluate, predict, inspect, export
        and the training loop's probe (`cnnpipe.training.steps.forward`, `predict_probs`)."""
        import jax
        import jax.numpy as jnp

        x = logits.astype(jnp.float32)
        if self.kind == "classification":
            return jax.nn.softmax(x, axis=-1)
        if self.kind == "multilabel":
            return jax.nn.sigmoid(x)
        return x * jnp.asarray(self.target_std, jnp.float32) + jnp.asarray(self.target_mean, jnp.float32)

    def standardise(self, targets: Any) -> Any:
        """Regression targets in the model's units, ``(y - mean) / std``; other targets as they are."""
        if self.kind != "regression":
            return targets
        import jax.numpy as jnp

        return (targets - jnp.asarray(self.target_mean, jnp.float32)) / jnp.asarray(self.target_std, jnp.float32)

    # ------------------------------------------------------------ settings

    def check_train(self, train: Any) -> None:
        """TaskError naming the key when a train setting has no meaning for this task."""
        if self.is_classification:
            if train.thresholds != "f1":
                raise TaskError("train.thresholds: decision thresholds of a multi-label task; a single-label "
                                "run decides by the most probable class")
            if train.pos_weight is not None:
                raise TaskError("train.pos_weight: only for a multi-label task (class_weights weighs classes)")
            if train.loss not in (None, "cross_entropy"):
                raise TaskError(f"train.loss: {train.loss!r} is not a loss of single-label classification "
                                "(cross_entropy)")
            return
        if train.class_weights is not None:
            hint = "train.pos_weight weighs each label's positives" if self.kind == "multilabel" else "remove it"
            raise TaskError(f"train.class_weights: only for single-label classification; {hint}")
        if train.sampler == "balanced":
            raise TaskError(f"train.sampler: balanced draws classes evenly, which a {self.kind} task does not have; "
                            "use shuffle" + (" (and train.pos_weight for rare labels)" if self.kind == "multilabel"
                                             else ""))
        allowed = {"multilabel": ("bce", "asymmetric"), "regression": ("mse", "mae", "huber")}[self.kind]
        if train.loss is not None and train.loss not in allowed:
            raise TaskError(f"train.loss: {train.loss!r} is not a {self.kind} loss (expected "
                            f"{' or '.join(allowed)})")
        if self.kind != "multilabel" and train.thresholds != "f1":
            raise TaskError("train.thresholds: decision thresholds of a multi-label task; a regression run has none")
        if self.kind == "regression":
            if train.label_smoothing:
                raise TaskError("train.label_smoothing: only for classification; regression targets are values")
            if train.pos_weight is not None:
                raise TaskError("train.pos_weight: only for a multi-label task")
        if self.kind == "multilabel" and train.pos_weight is not None and train.loss == "asymmetric":
            raise TaskError("train.pos_weight: weighs bce's positives; the asymmetric loss has its own focusing "
                            "(gamma_neg, gamma_pos): use one or the other")
        if self.kind == "multilabel" and isinstance(train.pos_weight, Mapping):
            self.check_names(train.pos_weight, "train.pos_weight")
        if self.kind == "multilabel" and isinstance(train.thresholds, Mapping):
            self.check_names(train.thresholds, "train.thresholds")

    def check_names(self, mapping: Mapping[str, Any], key: str) -> None:
        """TaskError when `mapping` names a label the data does not have."""
        for name in mapping:
            if name not in self.names:
                raise TaskError(f"{key}: no label {name!r} in the data (labels: {', '.join(self.names[:20])})")

    def loss_name(self, configured: str | None) -> str:
        """The training loss: `configured` or the task's default (cross_entropy, bce, mse)."""
        return configured or {"classification": "cross_entropy", "multilabel": "bce", "regression": "mse"}[self.kind]

    def decide(self, outputs: np.ndarray, thresholds: Sequence[float] | None = None) -> np.ndarray:
        """Decisions from outputs (N, outputs): class indices (N,), a bool multi-hot (N, L) at
        `thresholds` (0.5 where None), or the values themselves."""
        out = np.asarray(outputs)
        if self.kind == "classification":
            return np.argmax(out, -1)
        if self.kind == "multilabel":
            t = np.full(out.shape[-1], 0.5, np.float32) if thresholds is None else np.asarray(thresholds, np.float32)
            return out >= t
        return out

    # ------------------------------------------------------------ metrics (host)

    def thresholds_for(self, spec: Any, targets: np.ndarray | None = None, probs: np.ndarray | None = None
                       ) -> tuple[np.ndarray, list[str]]:
        """Multi-label decision thresholds (L,) float32 for ``train.thresholds`` `spec` and the names of the
        labels that fell back to 0.5. "f1": fitted per label on these rows to maximise its F1
        (`cnnpipe.tasks.metrics.fit_thresholds`; fewer than 2 known positives or no known negative:
        0.5); a number: that for every label; a mapping: per label, 0.5 for the labels it leaves out.
        `targets` (N, L) and `probs` (N, L) are only read for "f1"."""
        from cnnpipe.tasks.metrics import fit_thresholds

        if spec == "f1":
            t, low = fit_thresholds(targets, probs)
            return t, [self.names[i] for i in low]
        if isinstance(spec, Mapping):
            return np.array([float(spec.get(n, 0.5)) for n in self.names], np.float32), []
        return np.full(len(self.names), float(spec), np.float32), []

    def metrics(self, targets: np.ndarray, outputs: np.ndarray, thresholds: Any = None) -> dict[str, Any]:
        """The validation metrics of a multi-label or regression task (`cnnpipe.tasks.metrics`): for
        multilabel, at `thresholds` (L,) (0.5 when None), with "thresholds" by label; else per target."""
        from cnnpipe.tasks.metrics import multilabel_metrics, regression_metrics

        if self.kind == "multilabel":
            t = np.full(len(self.names), 0.5, np.float32) if thresholds is None else np.asarray(thresholds)
            return {**multilabel_metrics(targets, outputs, t, self.names),
                    "thresholds": {n: float(v) for n, v in zip(self.names, t)}}
        if self.kind == "regression":
            return regression_metrics(targets, outputs, self.names)
        raise TaskError("Task.metrics: single-label metrics are cnnpipe.training.metrics'")
