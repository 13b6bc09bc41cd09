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

Unreadable checkpoint files raise `CorruptCheckpointError` (one line: the step folder,
the damaged item, the other saved steps); read-only managers read a step's files only
when it is used, so one damaged step never stops another from loading.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from cnnpipe.tasks import CHECKPOINT_METRICS, lower_is_better
from cnnpipe.training.checkpoint_errors import CorruptCheckpointError, _quiet_failed_reads, _reason
from cnnpipe.training.compile_cache import quiet_cache_loads

__all__ = ["Checkpoints", "BEST_METRICS", "CorruptCheckpointError", "NoCheckpointError", "flat_names"]

_ARRAY_ITEMS = ("params", "model_state", "opt_state")
_LEGACY_ITEMS = ("state", "meta")


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


def _differs(item_dir: Path, target: Mapping[str, Any]) -> str | None:
    """How the arrays saved in `item_dir` differ from `target` (name -> shape), if their metadata reads."""
    try:
        with ocp.StandardCheckpointer() as reader:
            saved = reader.metadata(item_dir)
        saved = dict(getattr(saved, "item_metadata", saved) or {})
    except Exception:  # noqa: BLE001 - unreadable metadata: damage, not another model
        return None
    for name in sorted(set(target) | set(saved)) if saved else ():  # none: Orbax could not read it
        if name not in saved or name not in target:
            have, need = ("lacks", "needs") if name not in saved else ("has", "does not have")
            return f"the checkpoint {have} {name!r}, this model {need} it"
        shape, needed = tuple(getattr(saved[name], "shape", ()) or ()), tuple(target[name].shape)
        if shape != needed:
            return f"{name!r} has shape {shape} in the checkpoint, this model needs {needed}"
    return None


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


# the metrics a checkpoint can be chosen by, and which way is better
BEST_METRICS = {m: "min" if lower_is_better(m) else "max" for metrics in CHECKPOINT_METRICS.values() for m in metrics}


class Checkpoints:
    """The `checkpoints/` folder of a run (an Orbax `CheckpointManager`).

    Keeps the `keep` most recent checkpoints and, besides them, the best one by
    `best_metric` (a key of `BEST_METRICS`: the run's early-stopping metric, else
    validation accuracy) among those saved with metrics; of equals, the earliest.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, *, read_only: bool = False,
                 asynchronous: bool = False, best_metric: str = "val_accuracy") -> None:
        self.directory = Path(directory).absolute()
        if best_metric not in BEST_METRICS:
            raise ValueError(f"best_metric: got {best_metric!r}; expected one of {', '.join(BEST_METRICS)}")
        self.best_metric = best_metric
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=self._rank, reverse=False, n=1, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=asynchronous, preservation_policy=policy,
            # best_fn makes Orbax write the metrics; `policy` alone decides what is kept
            best_fn=lambda m: m.get("val_accuracy", 0.0), best_mode="max",
            cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only,
            # Orbax would read every step's metrics here and fail on a damaged one without
            # naming it: `best_step` reads them instead, one step at a time, when asked
            lightweight_initialize=True)
        self._read_only = read_only
        if read_only and not self.directory.is_dir():
            raise NoCheckpointError(f"{self.directory}: no complete checkpoint "
                                    "(no checkpoints folder: the run has not saved one yet)")
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        if not read_only:  # training: the preservation policy needs every step's metrics (to keep the best)
            self.best_step()  # a damaged one is named
            self._manager.reload()

    def _rank(self, metrics: Mapping[str, Any]) -> tuple[float, int]:
        """Higher is better: (the metric, signed so; earlier step first); a checkpoint without it ranks last."""
        value = metrics.get(self.best_metric)
        if value is None:
            return (-math.inf, 0)
        return (float(value) if BEST_METRICS[self.best_metric] == "max" else -float(value),
                -int(metrics.get("step", 0)))

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (None if there is none)."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept checkpoint best by `best_metric` (None if none was saved with it)."""
        best = None
        for step in self.steps():
            try:
                metrics = self._manager.metrics(step) or {}
            except (OSError, ValueError) as exc:
                raise self._damaged(step, f"metrics: {_reason(exc, self.directory / str(step))}") from None
            if not isinstance(metrics, Mapping):
                raise self._damaged(step, f"metrics: a JSON object expected, got {type(metrics).__name__}")
            for key in BEST_METRICS:
                value = metrics.get(key)
                if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                    raise self._damaged(step, f"metrics: {key} is {value!r}, not a number")
            if metrics.get(self.best_metric) is not None:
                rank = self._rank({**metrics, "step": step})
                if best is None or rank > best[0]:
                    best = (rank, step)
        return None if best is None else best[1]

    def save(self, step: int, state: Any, position: dict[str, Any], *,
             val_accuracy: float | None = None, metrics: Mapping[str, float] | None = None) -> None:
        """Save a `TrainState` and the run `position` as checkpoint `step`, with its validation
        `metrics` (keys of `BEST_METRICS`; `val_accuracy=` alone is short for that one), if evaluated.

        Synchronous unless the manager is asynchronous; then the call returns once the
        arrays are copied, and the previous save (if still writing) is waited for first.
        """
        metrics = {**({} if val_accuracy is None else {"val_accuracy": val_accuracy}), **(metrics or {})}
        metrics = {k: float(v) for k, v in metrics.items()} | {"step": int(step)} if metrics else None
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
            what = ("no complete checkpoint" if step is None else f"no checkpoint for step {step} "
                    f"(saved: {', '.join(map(str, self.steps())) or 'none'})")
            raise NoCheckpointError(f"{self.directory}: {what}")
        return int(step)

    def _is_legacy(self, step: int) -> bool:
        return (self.directory / str(step) / "state").is_dir()

    def _saved_steps(self) -> list[int]:
        """Every step folder on disk (also one Orbax could not read), oldest first."""
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())

    def _damaged(self, step: int, what: str) -> CorruptCheckpointError:
        """The error for checkpoint `step`, damaged as `what` says, with the steps to use instead."""
        where = self.directory / str(step)
        others = [s for s in self._saved_steps() if s != step]
        if not others:
            tail = "no other step is saved" + ("" if self._read_only else f" (move {where} away to start over)")
        elif self._read_only:
            tail = f"other saved steps: {', '.join(map(str, others))} (pass --checkpoint STEP)"
        else:  # resuming starts from the newest step: moving the damaged one away uses the next
            tail = f"other saved steps: {', '.join(map(str, others))} (move {where} away to resume from step {others[-1]})"
        return CorruptCheckpointError(f"{where}: corrupt checkpoint ({what}); {tail}")

    def _check_step_metadata(self, step: int) -> None:
        """CorruptCheckpointError if the step's own metadata file is there but unreadable (Orbax only logs it)."""
        path = self.directory / str(step) / "_CHECKPOINT_METADATA"
        try:
            if path.exists() and not isinstance(json.loads(path.read_text(encoding="utf-8")), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise self._damaged(step, f"{path.name}: {_reason(exc, path.parent)}") from None

    def _restore(self, step: int, **args: Any) -> dict[str, Any]:
        """Items `args` (name -> Orbax restore args) of checkpoint `step`; CorruptCheckpointError
        for unreadable files, ValueError for sound files of another model or optimizer."""
        self._check_step_metadata(step)
        with _quiet_failed_reads() as settle:
            try:
                return dict(self._manager.restore(step, args=ocp.args.Composite(**args)))
            # damaged files raise anything: a bare Exception (tensorstore reads), ValueError,
            # OSError, UnicodeDecodeError, JSONDecodeError, KeyError (an item folder gone)
            except Exception as exc:  # noqa: BLE001
                absl, drop_all = logging.getLogger("absl"), (lambda _record: False)
                absl.addFilter(drop_all)  # looking into it logs too; the one error line says it all
                try:
                    error = self._restore_error(step, args, exc)
                finally:
                    absl.removeFilter(drop_all)
            settle()
        raise error

    def _restore_error(self, step: int, args: dict[str, Any], exc: Exception) -> ValueError:
        """Why restoring `args` of `step` failed: each item restored alone names the one at fault."""
        where = self.directory / str(step)
        for name, arg in args.items():
            if not (where / name).is_dir():
                return self._damaged(step, f"{name}: missing")
            try:
                self._manager.restore(step, args=ocp.args.Composite(**{name: arg}))
                continue
            except Exception as item_exc:  # noqa: BLE001 - as in `_restore`
                reason = _reason(item_exc, where)
            differs = _differs(where / name, arg.item) if isinstance(arg, ocp.args.StandardRestore) else None
            if differs:
                return ValueError(f"{where}: checkpoint does not match this model/optimizer ({name}: {differs})")
            return self._damaged(step, f"{name}: {reason}")
        return self._damaged(step, _reason(exc, where))

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
          CorruptCheckpointError: its files cannot be read (the message names the step folder).
        """
        step = self._step(step)
        if self._is_legacy(step):
            return self._restore_legacy(like, step)
        items, restored = self._restore_items(step, {name: getattr(like, name) for name in _ARRAY_ITEMS},
                                              position=ocp.args.JsonRestore())
        position, rng = self._position(step, restored["position"], _abstract(like.rng).shape)
        state = type(like)(**items, step=jax.numpy.asarray(position["step"], like.step.dtype),
                           rng=rng if not _is_key(like.rng) else jax.random.wrap_key_data(rng))
        return state, position, step

    def _position(self, step: int, saved: Any, rng_shape: tuple[int, ...]) -> tuple[dict[str, Any], np.ndarray]:
        """(position without the rng, rng key data) of a restored `position` item, checked: a run
        resumed from a damaged one would fail epochs later, or silently train on from a wrong step."""
        if not isinstance(saved, Mapping):
            raise self._damaged(step, f"position: a JSON object expected, got {type(saved).__name__}")
        position, problem = dict(saved), None
        try:
            rng = np.asarray(position.pop("rng"), position.pop("rng_dtype"))
            counts = [position[key] for key in ("epoch", "step_in_epoch", "step")] + [position.get("best_step") or 0]
        except KeyError as exc:
            raise self._damaged(step, f"position: key {exc.args[0]!r} is missing") from None
        except (TypeError, ValueError) as exc:
            raise self._damaged(step, f"position: rng: {' '.join(str(exc).split())[:120]}") from None
        best = position.get("best_val_accuracy")
        if rng.shape != tuple(rng_shape):
            problem = f"rng has shape {rng.shape}, expected {tuple(rng_shape)}"
        elif any(type(v) is not int or v < 0 for v in counts) or type(best) not in (int, float, type(None)):
            problem = f"not step counts and an accuracy: {repr(position)[:120]}"
        if problem:
            raise self._damaged(step, f"position: {problem}")
        return position, rng

    def restore_model(self, params: Any, model_state: Any, step: int | None = None) -> tuple[Any, Any, int]:
        """(params, model_state, step): only what inference needs, no optimizer; shaped like the
        arguments. Raises as `restore`."""
        step = self._step(step)
        if self._is_legacy(step):
            try:
                with ocp.StandardCheckpointer() as reader:
                    saved = reader.metadata(self.directory / str(step) / "state")
            except Exception as exc:  # noqa: BLE001 - as in `_restore`
                raise self._damaged(step, f"state: {_reason(exc, self.directory / str(step))}") from None
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

    def wait(self) -> None:
        """Wait for a save in flight to be complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending work (saves in flight, deletions) and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
