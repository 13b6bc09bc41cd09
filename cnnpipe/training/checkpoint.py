"""Orbax checkpoints of a run, as named items; the last K kept plus the best.

A checkpoint holds four items:

    params        the trainable parameters, one entry per layer variable ("layers.0.kernel")
    model_state   the model's other variables (batch-norm statistics); may be empty
    opt_state     the optimizer state, one entry per leaf ("inner_state.0.0.mu.layers.0.kernel")
    position      JSON: epoch, step in epoch, step, best accuracy so far, the run's rng key

so evaluate, predict and inspect restore a model from `params` and `model_state`
alone (`restore_model`), without building an optimizer; `--resume` restores all four
(`restore`). Checkpoints of the earlier format (one flat "state" item of every
train-state leaf, plus "meta") still load both ways.

Orbax writes each step into a temporary directory and renames it when complete, so
a process killed mid-save leaves the previous checkpoint as the latest complete one.
With `asynchronous=True` (training), `save` returns once the arrays are copied off the
device and the files are written in a background thread while training goes on;
`close` (always called, also on errors) waits for the last one, so a finished
checkpoint is never lost at exit.
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

from cnnpipe.training.compile_cache import quiet_cache_loads

__all__ = ["Checkpoints", "NoCheckpointError", "flat_names"]

_ARRAY_ITEMS = ("params", "model_state", "opt_state")
_LEGACY_ITEMS = ("state", "meta")


class _QuietExpected(logging.Filter):
    # expected by design: mid-epoch checkpoints have no validation accuracy, and
    # evaluate/predict open the checkpoints read-only
    _EXPECTED = ("did not provide metrics", "read_only=True", "directory is read only",
                 "Metadata file does not exist")  # the earlier format's items have none

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self._EXPECTED)


logging.getLogger("absl").addFilter(_QuietExpected())


class NoCheckpointError(FileNotFoundError):
    """A run directory without a complete checkpoint."""


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def flat_names(tree: Any) -> list[str]:
    """A name per leaf of `tree`, from its path: ``layers.0.kernel`` (flax's ``.value`` dropped)."""
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        names.append(name[: -len(".value")] if name.endswith(".value") else name)
    if len(set(names)) != len(names):  # a pytree whose paths collide: number the leaves instead
        names = [f"{i:05d}" for i in range(len(names))]
    return names


def _flatten(tree: Any) -> dict[str, Any]:
    leaves = jax.tree.leaves(tree)
    return {n: jax.random.key_data(x) if _is_key(x) else x for n, x in zip(flat_names(tree), leaves)}


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    """Where and how a restored leaf should live: like the leaf of a fresh (or abstract) state.

    A leaf without a placement (an abstract model's, a numpy array) goes to this
    process's first device: Orbax refuses to guess one when the checkpoint was written
    by another device count (a run trained on 2 CPU devices, predicted on 1).
    """
    if isinstance(x, jax.ShapeDtypeStruct):
        if _is_key(x):
            x = jax.eval_shape(jax.random.key_data, x)
        return x if x.sharding is not None else _on_first_device(x.shape, x.dtype)
    if _is_key(x):
        x = jax.random.key_data(x)
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    x = np.asarray(x)
    return _on_first_device(x.shape, x.dtype)


def _on_first_device(shape: Any, dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))


def _unflatten_like(like: Any, values: list[Any], where: Path) -> Any:
    """`values` (one per leaf of `like`, in order) as a pytree shaped like `like`.

    `like` may hold arrays or `jax.ShapeDtypeStruct`s (a model made with `nnx.eval_shape`).
    PRNG keys are rewrapped with jax's default implementation, the only one cnnpipe uses.
    """
    leaves, treedef = jax.tree.flatten(like)
    if len(values) != len(leaves):
        raise ValueError(f"{where}: checkpoint has {len(values)} arrays, this model needs {len(leaves)}")
    out = []
    for i, (x, value) in enumerate(zip(leaves, values)):
        if _is_key(x):
            value = jax.random.wrap_key_data(value)
        elif tuple(np.shape(value)) != tuple(x.shape if hasattr(x, "shape") else np.shape(x)):
            raise ValueError(f"{where}: array {i} has shape {tuple(np.shape(value))}, "
                             f"this model needs {tuple(np.shape(x))}")
        out.append(value)
    return jax.tree.unflatten(treedef, out)


class Checkpoints:
    """The `checkpoints/` folder of a run (an Orbax `CheckpointManager`).

    Keeps the `keep` most recent checkpoints and, besides them, the one with the
    best validation accuracy (checkpoints saved with a `val_accuracy`).
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, *, read_only: bool = False,
                 asynchronous: bool = False) -> None:
        self.directory = Path(directory).absolute()
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: m["val_accuracy"], reverse=False, n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=asynchronous, preservation_policy=policy,
            # best_fn makes Orbax write the metrics; `policy` alone decides what is kept
            best_fn=lambda m: m["val_accuracy"], best_mode="max",
            cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only)
        if read_only and not self.directory.is_dir():
            raise NoCheckpointError(f"{self.directory}: no complete checkpoint "
                                    "(no checkpoints folder: the run has not saved one yet)")
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (None if there is none)."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept checkpoint with the highest validation accuracy (None if none has one)."""
        best = None
        for step in self.steps():
            acc = (self._manager.metrics(step) or {}).get("val_accuracy")
            if acc is not None and (best is None or acc > best[0]):
                best = (acc, step)
        return None if best is None else best[1]

    def save(self, step: int, state: Any, position: dict[str, Any], *,
             val_accuracy: float | None = None) -> None:
        """Save a `TrainState` and the run `position` as checkpoint `step`.

        Synchronous unless the manager is asynchronous; then the call returns once the
        arrays are copied, and the previous save (if still writing) is waited for first.
        """
        metrics = None if val_accuracy is None else {"val_accuracy": float(val_accuracy)}
        rng = np.asarray(jax.random.key_data(state.rng) if _is_key(state.rng) else state.rng)
        position = {**position, "rng": rng.tolist(), "rng_dtype": str(rng.dtype)}
        items = {name: ocp.args.StandardSave(_flatten(getattr(state, name))) for name in _ARRAY_ITEMS
                 if jax.tree.leaves(getattr(state, name))}  # Orbax refuses an empty tree
        # in a multi-process run Orbax slices replicated arrays with small jitted programs,
        # which the compile cache may load (and XLA then prints its false SIGILL alarm)
        with quiet_cache_loads():
            self._manager.save(step, args=ocp.args.Composite(position=ocp.args.JsonSave(position), **items),
                               metrics=metrics, force=True)

    def _step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
        if step is None or step not in self._manager.all_steps():
            what = "no complete checkpoint" if step is None else f"no checkpoint for step {step}"
            raise NoCheckpointError(f"{self.directory}: {what}")
        return int(step)

    def _is_legacy(self, step: int) -> bool:
        return (self.directory / str(step) / "state").is_dir()

    def _restore(self, step: int, **args: Any) -> dict[str, Any]:
        try:
            return dict(self._manager.restore(step, args=ocp.args.Composite(**args)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.directory / str(step)}: checkpoint does not match this model/optimizer "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None

    def _restore_items(self, step: int, likes: dict[str, Any], **more: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the named array items `likes` (name -> pytree like the saved one) shaped like them, every
        restored item as Orbax gives it): one restore for those and the `more` items (name -> args)."""
        args = {name: ocp.args.StandardRestore({n: _abstract(x) for n, x in _flatten(like).items()})
                for name, like in likes.items() if jax.tree.leaves(like)}
        restored = self._restore(step, **args, **more) if args or more else {}
        where = self.directory / str(step)
        items = {name: _unflatten_like(like, [restored[name][n] for n in flat_names(like)] if name in args
                                       else [], where)
                 for name, like in likes.items()}
        return items, restored

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
        """(train state, position, step) of checkpoint `step` (default: latest), placed like `like`.

        Raises:
          NoCheckpointError: there is no complete checkpoint.
          ValueError: the checkpoint does not match `like` (another model or optimizer).
        """
        step = self._step(step)
        if self._is_legacy(step):
            return self._restore_legacy(like, step)
        items, restored = self._restore_items(step, {name: getattr(like, name) for name in _ARRAY_ITEMS},
                                              position=ocp.args.JsonRestore())
        position = dict(restored["position"])
        rng = np.asarray(position.pop("rng"), position.pop("rng_dtype"))
        state = type(like)(**items, step=jax.numpy.asarray(position["step"], like.step.dtype),
                           rng=rng if not _is_key(like.rng) else jax.random.wrap_key_data(rng))
        return state, position, step

    def restore_model(self, params: Any, model_state: Any, step: int | None = None) -> tuple[Any, Any, int]:
        """(params, model_state, step): only what inference needs, no optimizer; shaped like the arguments."""
        step = self._step(step)
        if self._is_legacy(step):
            with ocp.StandardCheckpointer() as reader:
                saved = reader.metadata(self.directory / str(step) / "state")
            saved = getattr(saved, "item_metadata", saved)
            target = {k: _on_first_device(m.shape, m.dtype) for k, m in saved.items()}
            flat = self._restore(step, state=ocp.args.StandardRestore(target))["state"]
            values = [flat[k] for k in sorted(flat)]  # train-state leaf order: params, model_state, ...
            n = len(jax.tree.leaves(params))
            where = self.directory / str(step)
            p = _unflatten_like(params, values[:n], where)
            return p, _unflatten_like(model_state, values[n:n + len(jax.tree.leaves(model_state))], where), step
        items, _ = self._restore_items(step, {"params": params, "model_state": model_state})
        return items["params"], items["model_state"], step

    def _restore_legacy(self, like: Any, step: int) -> tuple[Any, dict[str, Any], int]:
        """A checkpoint of the earlier format: every train-state leaf in one "state" item."""
        leaves = jax.tree.leaves(like)
        target = {f"{i:05d}": _abstract(x) for i, x in enumerate(leaves)}
        restored = self._restore(step, state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        flat = restored["state"]
        state = _unflatten_like(like, [flat[k] for k in sorted(flat)], self.directory / str(step))
        return state, dict(restored["meta"]), step

    def close(self) -> None:
        """Finish pending work (saves in flight, deletions) and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
