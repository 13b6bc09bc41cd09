"""Finished (or interrupted) runs: rebuild the model from a run directory, predict images.

`load_run` needs only the run directory (`config.yaml`, `dataset.json`,
`checkpoints/`) and restores the model's parameters and state (batch-norm
statistics), never an optimizer: `cnnpipe evaluate`, `predict` and `inspect` start
here. Predicted images go through the same decode and resize as the training data
(`cnnpipe.images.transform.prepare_bytes` with `spec_for_run`, shared with `cnnpipe inspect`
and `cnnpipe predict`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Run", "load_run", "prepare_for_run", "predict_images", "spec_for_run"]


@dataclass
class Run:
    """A run's model rebuilt from its directory: config, dataset info, graphdef, state, checkpoint step.

    `state` is a `cnnpipe.training.steps.ModelState` (parameters and model state; no optimizer).
    """

    run_dir: Path
    cfg: Any
    info: dict[str, Any]
    graphdef: Any
    state: Any
    step: int

    @property
    def classes(self) -> list[str]:
        """The classes, labels (multilabel) or targets (regression), in output order."""
        return list(self.info["classes"])

    @property
    def task(self) -> Any:
        """The run's `cnnpipe.tasks.Task` (dataset.json "task"; absent: single-label classification)."""
        from cnnpipe.tasks import Task

        return Task.from_meta(self.info)

    @functools.cached_property
    def thresholds(self) -> np.ndarray | None:
        """A multi-label run's decision thresholds (L,) float32 for this checkpoint: those fitted on the
        validation split when it was evaluated in training (thresholds.json), or the run's fixed
        ``train.thresholds``; 0.5 for every label when none was recorded for this step (`threshold_note`
        says so). None for other tasks."""
        return self._thresholds()[0]

    @functools.cached_property
    def threshold_note(self) -> str | None:
        """Why the thresholds are 0.5 (no thresholds recorded for this checkpoint), else None."""
        return self._thresholds()[1]

    def _thresholds(self) -> tuple[np.ndarray | None, str | None]:
        from cnnpipe.training.task_run import read_thresholds

        task = self.task
        if task.kind != "multilabel":
            return None, None
        spec = self.cfg.train.thresholds
        if spec != "f1":
            return task.thresholds_for(spec)[0], None
        fitted = read_thresholds(self.run_dir).get(str(self.step))
        if fitted is None:
            return np.full(len(task.names), 0.5, np.float32), (
                f"no thresholds were fitted for checkpoint {self.step} (only for checkpoints saved at the end of "
                "an epoch); 0.5 used for every label")
        return np.array([float(fitted.get(n, 0.5)) for n in task.names], np.float32), None

    def model(self) -> Any:
        """The CNN (eval mode) with this checkpoint's parameters."""
        from cnnpipe.training.steps import state_to_model

        return state_to_model(self.graphdef, self.state)

    def prepare(self, path: str | os.PathLike) -> np.ndarray:
        """The raw pixels (H, W, C) uint8/uint16/int16/float32 (the run's store type) the model sees for `path`.

        Exactly the row `cnnpipe preprocess` stores for that file (the one image path).
        Raises DecodeError (unreadable or not an image) or ValueError (planes the model
        does not take; the message says what it expects).
        """
        return prepare_for_run(path, self.info).pixels

    def predict(self, x: Sequence[str | os.PathLike] | np.ndarray, batch_size: int = 64,
                tta: bool = False) -> np.ndarray:
        """Class probabilities (N, K) float32, K = len(classes), in `classes` order; for a multi-label
        run each label's sigmoid probability (decide with `thresholds`), for a regression run the
        predicted values in the data's units (`cnnpipe.tasks.Task.outputs`).

        `x` is an image path or a sequence of them (each prepared by `prepare`; an unreadable file
        raises) or raw pixels (N, H, W, C) in the store's units (its values, any numeric
        dtype; NaN is no data). For folders and files that may be bad, use `cnnpipe predict`
        (`cnnpipe.runs.predict.predict_files`): it reports them instead. `tta` averages over
        the run's test-time augmentation views (`cnnpipe.training.augment.tta_views`).
        """
        from flax import nnx

        from cnnpipe.training.augment import tta_views
        from cnnpipe.training.steps import predict_probs

        want = (*tuple(self.info["size"]), int(self.info["channels"]))
        if isinstance(x, (str, os.PathLike)):
            x = [x]  # one path
        if hasattr(x, "__array__"):  # numpy or jax pixels; a list is paths
            pixels = np.asarray(x)
            if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
                raise ValueError(f"x: got shape {pixels.shape}; the model takes raw pixels (N, {want[0]}, "
                                 f"{want[1]}, {want[2]})")
        else:
            pixels = np.stack([self.prepare(p) for p in x]) if len(x) else np.zeros((0, *want))
        graphdef, state = nnx.split(self.model())
        views = tta_views(self.cfg.augment) if tta else ()
        task = None if self.task.is_classification else self.task   # classification: the softmax as always
        out = np.zeros((len(pixels), len(self.classes)), np.float32)
        batch = np.zeros((batch_size, *want), np.float32)  # one compiled shape, the last batch padded
        for start in range(0, len(pixels), batch_size):
            n = min(batch_size, len(pixels) - start)
            batch[:n] = pixels[start:start + n]
            out[start:start + n] = np.asarray(predict_probs(graphdef, (state,), batch.copy(), views, task))[:n]
        return out


def load_run(run_dir: str | os.PathLike, checkpoint: str = "best") -> Run:
    """Rebuild a run's model from its directory and restore a checkpoint.

    Args:
      checkpoint: "best" (highest validation accuracy; the latest if none was
        evaluated), "latest", or a step number.
    Raises:
      FileNotFoundError: not a run directory, or no complete checkpoint (the message names it).
      ValueError: config.yaml, dataset.json or the checkpoint cannot be read or do not fit
        together; a damaged checkpoint (`CorruptCheckpointError`) names its step folder and the
        other saved steps.
    """
    from cnnpipe.training.pretrained import restore_run_model

    cfg, info, graphdef, state, step = restore_run_model(run_dir, checkpoint)
    return Run(Path(run_dir), cfg, info, graphdef, state, step)


def spec_for_run(info: Mapping[str, Any]) -> Any:
    """The `ImageSpec` of a run's model (`info`: its dataset.json): size, planes (by name and count),
    bit depth, resize and page mode of its training data. Predict, inspect, evaluate on a folder,
    export and `Run.prepare` all use it."""
    from cnnpipe.images.transform import spec_for_model

    names = info.get("planes")
    return spec_for_model(int(info["channels"]), int(info["bit_depth"]), tuple(info["size"]),
                          str(info.get("resize") or "crop"), str(info.get("pages") or "first"),
                          [str(n) for n in names] if isinstance(names, list) else None,
                          str(info.get("dtype") or "") or None)


def prepare_for_run(path: str | os.PathLike, info: Mapping[str, Any]) -> Any:
    """Decode and resize one image exactly as a run's training data (`info`: its dataset.json).

    Returns a `cnnpipe.images.transform.InputImage` (raw pixels (H, W, C) of the store's type, planes, notes);
    used by `cnnpipe inspect` and `Run.prepare`. The rules are `prepare_bytes`'s: an
    8-bit image for a 16-bit model is promoted exactly (x257); a 16-bit image for an 8-bit
    model is refused, since nothing in cnnpipe drops 16-bit values to 8 bits.
    """
    from cnnpipe.images.decode import read_file
    from cnnpipe.images.transform import prepare_bytes

    path = os.fspath(path)
    return prepare_bytes(read_file(path), spec_for_run(info), path)


def predict_images(run: Run, paths: Sequence[str | os.PathLike], top_k: int = 3,
                   batch_size: int = 64) -> list[list[tuple[str, float]]]:
    """Top-k (class, probability) for each image, most likely first (`Run.predict` ranked)."""
    if top_k < 1:
        raise ValueError(f"--top-k: got {top_k}; expected an integer >= 1")
    k = min(top_k, len(run.classes))
    probs = run.predict(list(paths), batch_size=batch_size)
    return [[(run.classes[j], float(row[j])) for j in np.argsort(-row, kind="stable")[:k]] for row in probs]
