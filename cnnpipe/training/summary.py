"""The end of a run: its result checkpoint, plots and `summary.json`; and what the model saw.

`finish_run` writes the plots and the summary of a finished (or early-stopped) run.
With early stopping the run's result is its best checkpoint: `best_result` evaluates
it (from memory when that epoch ran in this process, else restored from disk), and
the summary's per-class figures describe it. `augment_examples` draws the training
augmentation exactly as the train step does (same keys, same code) for plots/augment.png.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.config import Config
from cnnpipe.files import write_atomic
from cnnpipe.training.loop import Monitor, Position
from cnnpipe.training.runlog import json_safe

__all__ = ["finish_run", "best_result", "augment_examples", "write_augment_plot", "probe_feature_maps"]

_EXAMPLE_ROWS, _EXAMPLE_DRAWS = 6, 6


def best_result(parts: Any, ckpts: Any, pos: Position, cfg: Config, remembered: dict[int, dict[str, Any]]
                ) -> dict[str, Any] | None:
    """The evaluation of the best checkpoint (`pos.best_step`), or None without one.

    `remembered` maps steps evaluated in this process to their results; any other
    step is restored from `ckpts` (parameters and model state only) and evaluated.
    """
    import dataclasses

    from cnnpipe.training.steps import replicate

    if pos.best_step is None:
        return None
    if pos.best_step in remembered:
        return remembered[pos.best_step]
    ckpts.wait()   # the best may be the save still in flight
    params, model_state, _ = ckpts.restore_model(parts.state.params, parts.state.model_state, pos.best_step)
    # the eval step was compiled for a whole train state: the current one with the best parameters
    state = replicate(parts.mesh, dataclasses.replace(parts.state, params=params, model_state=model_state))
    return parts.evaluate(state)


def augment_examples(images: np.ndarray, rng: Any, cfg: Config, steps: range) -> np.ndarray:
    """The first train batch as the train step at each of `steps` would augment it: (len(steps), N, H, W, C).

    The train step's own code (`cnnpipe.training.steps.augmented_inputs`), mixup/cutmix
    included, so what is shown is what the model gets. It runs a few times on one batch, so
    only its compile time counts: XLA's backend optimisations are off (every op of the full
    augmentation compiled in 3.6 s at the default level, 2.5 s without, on a 2-core CPU);
    integer and random-bit work is exact either way, float rounding may differ in the last bit.
    """
    import jax

    from cnnpipe.training.steps import augmented_inputs

    x = jax.device_put(np.asarray(images), jax.local_devices()[0])
    draw = jax.jit(lambda x, step: augmented_inputs(x, rng, step, cfg.augment)[0]).lower(x, np.int32(0)).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return np.stack([np.asarray(draw(x, np.int32(s))) for s in steps])


def write_augment_plot(parts: Any, cfg: Config, path: Path) -> None:
    """plots/augment.png: the first training images, stored and as the first steps augmented them."""
    import jax

    from cnnpipe.datasets.batches import train_batches
    from cnnpipe.training.plots import plot_augment

    images, _ = next(iter(train_batches(parts.ds.train, cfg.train.batch_size, seed=cfg.seed, epoch=0,
                                             sampler=cfg.train.sampler)))
    rng = jax.random.PRNGKey(cfg.seed)   # the train state's key (create_train_state)
    drawn = augment_examples(images, rng, cfg, range(_EXAMPLE_DRAWS))[:, :_EXAMPLE_ROWS]
    plot_augment(images[:_EXAMPLE_ROWS], drawn, [f"step {s + 1}" for s in range(_EXAMPLE_DRAWS)], path)


def _summary(cfg: Config, parts: Any, run_dir: Path, final: dict[str, Any], result: dict[str, Any],
             counts: dict[str, int], pos: Position, resume: bool, watch: Any) -> dict[str, Any]:
    import jax

    from cnnpipe.training.task_run import task_summary

    ds, monitor = parts.ds, Monitor.of(cfg.train, parts.ds.task)
    images, step_seconds = counts["images"], watch.seconds.get("steps", 0.0)
    timings = watch.report()
    es = cfg.train.early_stopping
    if ds.task.is_classification:
        scores = {
            "final_val_accuracy": final["accuracy"], "final_val_loss": final["loss"],
            "best_val_accuracy": pos.best_val_accuracy if pos.best_val_accuracy is not None else final["accuracy"]}
    else:
        scores = {"final_val_loss": final["loss"]}
    scores.update(best_step=pos.best_step, best_metric=monitor.metric, best_value=pos.best_value,
                  result_step=result.get("step", pos.step))   # the run's result: the best checkpoint with early
    if ds.task.is_classification:                              # stopping, else the last
        scores.update({"val_accuracy": result["accuracy"], "val_loss": result["loss"],
                       "balanced_accuracy": result["balanced_accuracy"],
                       "per_class_accuracy": dict(zip(ds.classes, result["per_class_accuracy"])),
                       "confusion_matrix": result["confusion"].tolist()})
    else:
        scores.update(task_summary(ds.task, result, parts.pos_weight))
    return {
        "run_dir": str(run_dir), **scores,
        "early_stopping": None if es is None else {**es.model_dump(), "stopped": pos.stopped,
                                                    "epochs_run": pos.epoch},
        "class_weights": None if parts.class_weights is None
        else dict(zip(ds.classes, map(float, parts.class_weights))), "param_count": parts.num_params,
        "train_images_per_sec": images / step_seconds if images and step_seconds else None,
        "compile_seconds": round(watch.compile_seconds, 3), "wall_seconds": timings["total"],
        "seconds": timings, "steps": pos.step, "epochs": pos.epoch, "epochs_configured": cfg.train.epochs,
        "nonfinite_steps": counts["nonfinite"], "devices": parts.mesh.size,
        "processes": jax.process_count(), "resumed": bool(resume),
    }


def finish_run(cfg: Config, parts: Any, run_dir: Path, final: dict[str, Any], result: dict[str, Any],
               counts: dict[str, Any], pos: Position, resume: bool, watch: Any, log: Callable[[str], None],
               write: bool = True) -> dict[str, Any]:
    """Plots and `summary.json` of a finished run (written by the primary alone); returns the summary.

    `final` is the last evaluation, `result` the run's result (the best checkpoint's
    evaluation with early stopping, else `final`; its "step" key names the checkpoint).
    """
    from cnnpipe.training.augment import is_active
    from cnnpipe.training.compile_cache import quiet_cache_loads
    from cnnpipe.training.plots import plot_curves
    from cnnpipe.training.task_run import curve_keys, done_line

    task = parts.ds.task
    if write:
        with watch.phase("plots"):
            plot_curves(run_dir / "metrics.jsonl", run_dir / "plots", curve_keys(task))
            plot_result(task, result, parts.ds.val.labels, run_dir / "plots")
            if is_active(cfg.augment):
                with quiet_cache_loads():   # the augmentation program, from the compile cache on a warm run
                    write_augment_plot(parts, cfg, run_dir / "plots" / "augment.png")
    summary = json_safe(_summary(cfg, parts, run_dir, final, result, counts, pos, resume, watch))
    if write:
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    speed = (f"{summary['train_images_per_sec']:.0f} train images/s" if summary["train_images_per_sec"]
             else "train images/s not measured (no steps ran)")
    # with early stopping the result is the best checkpoint, not the last epoch
    head = done_line(task, result, final, summary,
                     monitor_text(cfg, pos, task) if cfg.train.early_stopping is not None else None)
    log(f"{head}, {summary['wall_seconds']:.1f}s wall, {summary['compile_seconds']:.1f}s compiling, {speed} "
        f"-> {run_dir}")
    return summary


def monitor_text(cfg: Config, pos: Position, task: Any = None) -> str:
    """E.g. "val_loss 0.1234" for the run's monitored metric at its best checkpoint."""
    return f"{Monitor.of(cfg.train, task).metric} {pos.best_value:.4f}" if pos.best_value is not None else "none"


def plot_result(task: Any, result: dict[str, Any], targets: np.ndarray, plots: Path) -> None:
    """The result's plot: confusion_matrix.png (classification), precision_recall.png (multilabel,
    per label) or predicted_vs_true.png (regression, per target)."""
    from cnnpipe.training.plots import plot_confusion, plot_precision_recall, plot_predicted_vs_true

    if task.is_classification:
        plot_confusion(result["confusion"], task.names, plots / "confusion_matrix.png")
    elif task.kind == "multilabel":
        plot_precision_recall(targets, result["outputs"], task.names, plots / "precision_recall.png")
    else:
        plot_predicted_vs_true(targets, result["outputs"], task.names, plots / "predicted_vs_true.png")


def probe_feature_maps(tb: Any, graphdef: Any, state: Any, ds: Any, step: int) -> None:
    """Feature maps of the first validation image to TensorBoard, one grid per spatial layer."""
    from cnnpipe.training.plots import probe_grids
    from cnnpipe.training.steps import state_to_model

    for name, grid in probe_grids(state_to_model(graphdef, state), ds.val.images[0]).items():
        tb.add_image(f"feature_maps/{name}", grid, step)
