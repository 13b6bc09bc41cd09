"""Orbax checkpoints of a run: train state + data position, last K kept plus the best.

A checkpoint is the train state's leaves (flattened, so any pytree the train
step uses round-trips; typed PRNG keys are stored as their key data) and a
JSON `meta` item with the data position (epoch, step in epoch) and the run's
bookkeeping. Orbax writes each step into a temporary directory and renames it
when complete, so a process killed mid-save leaves the previous checkpoint as
the latest complete one. Saves are synchronous: nothing is in flight at exit.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

__all__ = ["Checkpoints", "NoCheckpointError"]


class _QuietExpected(logging.Filter):
    # expected by design: mid-epoch checkpoints have no validation accuracy, and
    # evaluate/predict open the checkpoints read-only
    _EXPECTED = ("did not provide metrics", "read_only=True", "directory is read only")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self._EXPECTED)


logging.getLogger("absl").addFilter(_QuietExpected())


class NoCheckpointError(FileNotFoundError):
    """A run directory without a complete checkpoint."""


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flatten(state: Any) -> dict[str, Any]:
    leaves = jax.tree.leaves(state)
    return {f"{i:05d}": jax.random.key_data(x) if _is_key(x) else x for i, x in enumerate(leaves)}


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    """Where and how a restored leaf should live: like the leaf of a fresh state."""
    if _is_key(x):
        x = jax.random.key_data(x)
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


class Checkpoints:
    """The `checkpoints/` folder of a run (an Orbax `CheckpointManager`).

    Keeps the `keep` most recent checkpoints and, besides them, the one with the
    best validation accuracy (checkpoints saved with a `val_accuracy`).
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, *, read_only: bool = False) -> None:
        self.directory = Path(directory).absolute()
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: m["val_accuracy"], reverse=False, n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False, preservation_policy=policy,
            # best_fn makes Orbax write the metrics; `policy` alone decides what is kept
            best_fn=lambda m: m["val_accuracy"], best_mode="max",
            cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only)
        if read_only and not self.directory.is_dir():
            raise NoCheckpointError(f"{self.directory}: no complete checkpoint "
                                    "(no checkpoints folder: the run has not saved one yet)")
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept checkpoint with the highest validation accuracy (None if none has one)."""
        best = None
        for step in self.steps():
            acc = (self._manager.metrics(step) or {}).get("val_accuracy")
            if acc is not None and (best is None or acc > best[0]):
                best = (acc, step)
        return None if best is None else best[1]

    def save(self, step: int, state: Any, meta: dict[str, Any], *,
             val_accuracy: float | None = None) -> None:
        """Save `state` and `meta` as checkpoint `step` (atomically, synchronously)."""
        metrics = None if val_accuracy is None else {"val_accuracy": float(val_accuracy)}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_flatten(state)), meta=ocp.args.JsonSave(dict(meta))),
            metrics=metrics, force=True)
        self._manager.wait_until_finished()

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
        """(state, meta, step) of checkpoint `step` (default: latest), placed like `like`.

        Raises:
          NoCheckpointError: there is no complete checkpoint.
          ValueError: the checkpoint does not match `like` (another model or optimizer).
        """
        if step is None:
            step = self.latest_step()
        if step is None or step not in self._manager.all_steps():
            what = "no complete checkpoint" if step is None else f"no checkpoint for step {step}"
            raise NoCheckpointError(f"{self.directory}: {what}")
        leaves, treedef = jax.tree.flatten(like)
        target = {f"{i:05d}": _abstract(x) for i, x in enumerate(leaves)}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.directory / str(step)}: checkpoint does not match this model/optimizer "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        flat = restored["state"]
        out = []
        for i, x in enumerate(leaves):
            value = flat[f"{i:05d}"]
            if _is_key(x):
                value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(x))
            elif tuple(value.shape) != tuple(np.shape(x)):
                raise ValueError(f"{self.directory / str(step)}: leaf {i} has shape {value.shape}, "
                                 f"this model needs {np.shape(x)}")
            out.append(value)
        return jax.tree.unflatten(treedef, out), dict(restored["meta"]), int(step)

    def close(self) -> None:
        """Finish pending work (deletions) and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
