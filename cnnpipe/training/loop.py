"""One epoch of training, and where a run is: the parts `train_and_evaluate` wires together.

`Position` is the run's place (epoch, step in epoch, step, best checkpoint so far,
early stopping's count), saved with every checkpoint and restored on resume;
`Monitor` is the metric that ranks checkpoints and stops a run early. `EpochLoop.run` feeds one
epoch's batches to the train step, hands the metrics to a `MetricsSink`, logs every
`log_every` steps with the window's images/s, and saves mid-epoch checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cnnpipe.tasks import CHECKPOINT_METRICS, Task, TaskError, lower_is_better, result_key
from cnnpipe.training.dispatch import Chunks
from cnnpipe.training.runlog import MetricsSink, Stopwatch

__all__ = ["Monitor", "Position", "EpochLoop"]


@dataclass(frozen=True)
class Monitor:
    """The metric that picks a run's best checkpoint and, with `patience`, stops it early.

    metric: the task's main metric without early stopping (val_accuracy, val_map, val_rmse:
    `cnnpipe.tasks.MAIN_METRIC`), else early stopping's (`cnnpipe.tasks.CHECKPOINT_METRICS` of
    the task, val_loss for every task); an improvement must beat the reference by more than
    `min_delta` (Keras's ``EarlyStopping``); after `patience` epochs without one the
    run stops (None: never).
    """

    metric: str = "val_accuracy"
    min_delta: float = 0.0
    patience: int | None = None

    @classmethod
    def of(cls, train_cfg: Any, task: Task | None = None) -> Monitor:
        """The monitor of a run's ``train`` config (its ``early_stopping``, if any) and task.
        Raises TaskError when early stopping names a metric the task does not have."""
        task = task or Task()
        es = train_cfg.early_stopping
        if es is None:
            return cls(task.main_metric)
        if es.metric not in CHECKPOINT_METRICS[task.kind]:
            raise TaskError(f"train.early_stopping.metric: {es.metric!r} is not a metric of a {task.kind} run "
                            f"(expected {', '.join(CHECKPOINT_METRICS[task.kind])})")
        return cls(es.metric, float(es.min_delta), int(es.patience))

    @property
    def lower_is_better(self) -> bool:
        return lower_is_better(self.metric)

    def value(self, result: dict[str, Any]) -> float:
        """The metric's value in an evaluation result (`cnnpipe.training.metrics.evaluate_split`);
        NaN where it is undefined (a multi-label split without positives)."""
        value = result.get(result_key(self.metric))
        return float("nan") if value is None else float(value)

    def beats(self, value: float, reference: float | None, margin: float = 0.0) -> bool:
        """Whether `value` is better than `reference` by more than `margin`; a non-finite value
        (a diverged epoch's NaN loss) never is, and any finite value beats None or a non-finite one."""
        if not math.isfinite(value):
            return False
        if reference is None or not math.isfinite(reference):
            return True
        return value < reference - margin if self.lower_is_better else value > reference + margin


@dataclass
class Position:
    """Where a run is: `epoch` (0-based, the one being trained), `step_in_epoch`, `step` (total);
    the highest validation accuracy so far (`best_val_accuracy`); the best checkpoint so far by
    the run's `Monitor` (`best_step`, its `best_value`); and early stopping's state: `reference`
    (the value an improvement must beat by min_delta), `wait` (epochs since one) and `stopped`."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    best_val_accuracy: float | None = None
    best_step: int | None = None
    best_value: float | None = None
    reference: float | None = None
    wait: int = 0
    stopped: bool = False
    log_window: dict[str, Any] | None = None   # `MetricsSink.window()` when saved mid-window

    def as_dict(self) -> dict[str, Any]:
        """The JSON form stored in a checkpoint's `position` item."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Position:
        """From a checkpoint's position (other keys, such as the rng key, are ignored)."""
        pos = cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
        if "best_value" not in d:   # saved before early stopping: its best was by val accuracy
            pos.best_value = pos.reference = pos.best_val_accuracy
        return pos

    def end_epoch(self, result: dict[str, Any], monitor: Monitor = Monitor()) -> bool:
        """Move to the next epoch's start and record its evaluation `result`; return whether it is
        the best so far. Sets `stopped` once `monitor.patience` epochs passed without an improvement."""
        value, accuracy = monitor.value(result), result.get("accuracy")   # no accuracy: multilabel, regression
        best = monitor.beats(value, self.best_value)
        if best:
            self.best_value, self.best_step = value, self.step
        if accuracy is not None and (self.best_val_accuracy is None or accuracy > self.best_val_accuracy):
            self.best_val_accuracy = float(accuracy)   # the highest, whatever the metric
        if monitor.beats(value, self.reference, monitor.min_delta):
            self.reference, self.wait = value, 0
        else:
            self.wait += 1
        self.stopped = monitor.patience is not None and self.wait >= monitor.patience
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return best


@dataclass
class EpochLoop:
    """Runs the train step over one epoch's batches.

    train_step: ``(state, images, labels) -> (state, metrics)``; save: called as
    ``save(state, position)`` for a mid-epoch checkpoint every `checkpoint_every`
    steps (0 = never; the epoch-end checkpoint is the caller's); bar: a tqdm-like
    object with `update` and `set_postfix` (or None).
    """

    train_step: Callable[..., tuple[Any, Any]]
    sink: MetricsSink
    watch: Stopwatch
    batch_size: int
    steps_per_epoch: int
    log_every: int
    checkpoint_every: int = 0
    save: Callable[[Any, Position], None] | None = None
    bar: Any = None
    chunks: Chunks = dataclasses.field(default_factory=lambda: Chunks(1, auto=False))   # steps per call
    images_trained: int = 0  # over every `run`: the run's train images/s is this over the "steps" phase

    def run(self, state: Any, batches: Callable[[int, int], tuple[Any, ...]], pos: Position) -> Any:
        """Train from `pos` to the end of its epoch; advances `pos`; returns the new state.

        `batches(i, n)`: the train step's arguments for steps ``i .. i + n - 1`` of the epoch
        (`cnnpipe.training.feed.epoch_batches`); `n` is 1 unless `chunks` allows more per call.
        """
        t0 = window = time.perf_counter()
        steps_in_window, saving, first = 0, 0.0, pos.step_in_epoch
        many = self.chunks.k > 1
        while pos.step_in_epoch < self.steps_per_epoch:
            n = self.chunks.next(self._to_event(pos))
            state, metrics = self.train_step(state, *batches(pos.step_in_epoch, n))
            pos.step, pos.step_in_epoch = pos.step + n, pos.step_in_epoch + n
            self.sink.push(pos.step, pos.epoch, metrics, n if many else None)
            steps_in_window += n
            if self.bar is not None:
                self.bar.update(n)
            last = pos.step_in_epoch == self.steps_per_epoch
            if pos.step % self.log_every == 0 or last:
                self.sink.settle()   # waits for the window's last step: the window's time is its steps'
                now = time.perf_counter()
                self.chunks.measured(steps_in_window, now - window)
                record = self.sink.flush(pos.step, pos.epoch, steps_in_window * self.batch_size / (now - window))
                if record is not None and self.bar is not None:
                    self.bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
                window, steps_in_window = time.perf_counter(), 0
            if self.checkpoint_every and pos.step % self.checkpoint_every == 0 and not last and self.save:
                self.sink.settle()  # the stop rule sees every step before a checkpoint is called good
                t_save = time.perf_counter()
                self.save(state, pos)
                saving += time.perf_counter() - t_save
                window = time.perf_counter()  # saving is not training time
        self.images_trained += (pos.step_in_epoch - first) * self.batch_size
        self.watch.add("checkpoints", saving)
        self.watch.add("steps", time.perf_counter() - t0 - saving)
        return state

    def _to_event(self, pos: Position) -> int:
        """Steps from `pos` to the next log line, mid-epoch checkpoint or epoch end, whichever is first."""
        left = [self.steps_per_epoch - pos.step_in_epoch, self.log_every - pos.step % self.log_every]
        if self.checkpoint_every:
            left.append(self.checkpoint_every - pos.step % self.checkpoint_every)
        return min(left)
