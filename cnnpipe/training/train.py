"""The training loop: config -> run directory (checkpoints, metrics, plots, summary).

`train_and_evaluate(cfg, workdir)` is what `cnnpipe train` and the notebooks call.
The step functions come from `cnnpipe.training.steps` (one jitted train step, one eval
step; fixed shapes, so each compiles once per run, ahead of the first step, both at
once, through JAX's persistent cache: `cnnpipe.training.compile_cache`). This module only
wires the parts: `cnnpipe.training.loop.EpochLoop` trains an epoch, `cnnpipe.training.runlog` holds the
metrics sink, log and stopwatch, `cnnpipe.training.metrics.evaluate_split` evaluates after
every epoch, `cnnpipe.training.checkpoint` saves asynchronously (Orbax) and resumes exactly:
data order, rng and optimizer state.

Run directory::

    config.yaml      the resolved config         dataset.json   what inference needs
    metrics.jsonl    one JSON object per line    tensorboard/   event files
    checkpoints/     Orbax steps                 plots/         loss, accuracy, confusion matrix
    summary.json     final/best accuracy, per-class accuracy, params, speed, times
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.config import Config, dump_config, load_config
from cnnpipe.datasets.batches import steps_per_epoch
from cnnpipe.datasets.dataset import Dataset
from cnnpipe.datasets.sources import load_dataset
from cnnpipe.files import write_atomic
from cnnpipe.training import task_run
from cnnpipe.training.feed import compile_ahead, epoch_batches
from cnnpipe.training.loop import EpochLoop, Monitor, Position
from cnnpipe.training.runlog import MetricsLog, MetricsSink, NonFiniteLossError, Stopwatch

__all__ = ["train_and_evaluate", "NonFiniteLossError", "default_run_dir"]


def default_run_dir(name: str, root: str | os.PathLike = "runs") -> Path:
    """`runs/<name>-<YYYYmmdd-HHMMSS>` (a numeric suffix if that exists already)."""
    base = Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def resolve_data(cfg: Config, ds: Dataset) -> Config:
    """`cfg` with `data.size` and `data.channels` set to the data's own (what config.yaml records).

    A run's saved config then says what it trained on, so `evaluate --data` on another
    folder prepares images at the run's size and planes, whatever the defaults were.
    """
    names = ds.plane_names or {1: ("L",), 3: ("R", "G", "B")}.get(ds.channels)
    channels = {("L",): "gray", ("R", "G", "B"): "rgb"}.get(names or (), "native")  # e.g. S0..S4
    data = cfg.data.model_copy(update={"size": tuple(ds.size), "channels": channels})
    return cfg.model_copy(update={"data": data})


def _prepare_run_dir(cfg: Config, run_dir: Path, ds: Dataset, resume: bool, write: bool,
                     normalization: dict[str, Any] | None = None) -> None:
    """Check a resumed run's config (every process); with `write` (the primary) create the run dir files."""
    config_text = dump_config(cfg)
    if resume and (run_dir / "config.yaml").exists():
        # compared through the schema, so keys added since the run was written (at their
        # defaults) do not make an older run's config differ
        if dump_config(load_config(run_dir / "config.yaml")) != config_text:
            raise ValueError(f"{run_dir / 'config.yaml'}: differs from the config given to resume this run")
    elif write:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.yaml", config_text)
    if write:
        (run_dir / "plots").mkdir(exist_ok=True)
        # `normalization`: what the model does to raw pixels (the data's statistics, or the weights')
        info = {**ds.info(), **({"normalization": normalization} if normalization else {})}
        write_atomic(run_dir / "dataset.json", json.dumps(info, indent=2) + "\n")


@dataclass
class _Parts:
    """What a run is built from: data, mesh, model split into graphdef and train state, the steps."""

    ds: Dataset
    mesh: Any
    graphdef: Any
    state: Any
    train_step: Any
    eval_step: Any
    num_params: int
    steps_per_epoch: int
    init: Any = None          # cnnpipe.training.pretrained.Init: normalisation and first weights
    frozen_step: Any = None   # the train step of the first `pretrained.freeze_epochs` epochs
    class_weights: Any = None  # (K,) loss weight per class, or None
    resident: Any = None       # cnnpipe.training.resident.ResidentSplit: the training split on the devices
    resident_reason: str = ""  # why it is (not) there, for the log
    steps_per_dispatch: int = 1  # the most train steps one call runs (`cnnpipe.training.dispatch`)
    resident_val: Any = None   # cnnpipe.training.resident.ResidentEval: the validation split on the devices
    eval_batch_size: int = 0
    pos_weight: Any = None     # multilabel: (L,) weight of each label's positives, or None
    thresholds: Any = "f1"     # multilabel: train.thresholds

    def evaluate(self, state: Any) -> dict[str, Any]:
        """`state`'s evaluation on the validation split (`cnnpipe.training.metrics.evaluate_split`'s
        result): one program over the split on the devices, or host batches."""
        from cnnpipe.training.metrics import evaluate_resident, evaluate_split

        task = self.ds.task
        if self.resident_val is not None:
            return evaluate_resident(self.eval_step, state, self.resident_val, self.ds.val.labels, self.ds.num_classes,
                                     task, self.thresholds)
        return evaluate_split(self.eval_step, state, self.ds.val, self.eval_batch_size, self.mesh, self.ds.num_classes,
                              task, self.thresholds)


def _build(cfg: Config, watch: Stopwatch, resumed_from: Path | None = None) -> _Parts:
    """Data, mesh, model and steps; the steps compile (and the model initialises) at once, in threads.

    The steps are compiled for the train state's shapes and placement alone (an
    abstract state from `nnx.eval_shape`), so compiling them does not wait for the
    initialiser, itself one jitted program instead of one per layer initialiser.
    """
    from flax import nnx

    from cnnpipe.models.cnn import build_model, count_params
    from cnnpipe.training import distributed, steps
    from cnnpipe.training.augment import check_augment
    from cnnpipe.training.compile_cache import quiet_cache_loads
    from cnnpipe.training.dispatch import max_chunk
    from cnnpipe.training.pretrained import head_mask, resolve_pretrained
    from cnnpipe.training.resident import place_eval, place_split, resident_decision

    tc, pre = cfg.train, cfg.pretrained
    with watch.phase("data"):
        # folder and tfds caches are built by the primary; the others then read them
        ds = distributed.primary_first(lambda: load_dataset(cfg.data, seed=cfg.seed), "data")
    with watch.phase("build"):
        check_augment(cfg.augment, ds.size)
        ds.task.check_train(tc)   # a setting the task has no meaning for: one line
        Monitor.of(tc, ds.task)   # an early-stopping metric of another task: before any file is written
        weights, pos_weight = task_run.loss_weights(ds, tc)
        # reads the weights once, so a bad file fails before any compile; a resumed run has
        # its weights in the checkpoint and its normalisation in dataset.json
        init = resolve_pretrained(cfg, ds, resumed_from)
        mesh = steps.make_mesh(tc.num_devices)
        for key, size in (("train.batch_size", tc.batch_size), ("train.eval_batch_size", tc.eval_batch_size)):
            steps.check_divisible(mesh, size, key)
        spe = steps_per_epoch(len(ds.train), tc.batch_size)

        def make() -> Any:
            return build_model(cfg.model, in_channels=ds.channels, num_classes=ds.num_classes, input_size=ds.size,
                               bit_depth=ds.bit_depth, rngs=nnx.Rngs(cfg.seed), mean=init.mean, std=init.std,
                               clip=init.clip)

        abstract = nnx.eval_shape(make)
        if init.copy is not None:
            init.copy(abstract, check_only=True)
        split = pre.weights is not None and (pre.freeze_epochs > 0 or pre.backbone_lr_scale != 1.0)
        head = head_mask(steps.split_model(abstract)[1].params, abstract.head_index) if split else None
        tx = steps.make_optimizer(cfg.optimizer, spe * tc.epochs, head=head,
                                  backbone_lr_scale=pre.backbone_lr_scale, freeze_steps=spe * pre.freeze_epochs)
        graphdef, abstract_state = steps.abstract_train_state(abstract, tx, mesh)
        resident, why = resident_decision(cfg.data.on_device, sum(a.nbytes for split in (ds.train, ds.val)
                                                                  for a in (split.images, split.labels)), mesh)
        resident_val = resident and len(ds.val) > 0   # the validation split goes with it
        k = max_chunk(tc.steps_per_dispatch, resident, spe, tc.log_every_steps, tc.checkpoint_every_steps,
                      mesh.devices.flat[0].platform)
        loss_args = dict(precision=tc.precision, augment=cfg.augment, class_weights=weights,
                         label_smoothing=tc.label_smoothing, resident=resident, steps_per_dispatch=k)
        train_step, frozen_step, eval_step = task_run.make_steps(ds.task, graphdef, tx, mesh, cfg, loss_args, head,
                                                        pos_weight, resident_val)

    def initialise() -> Any:
        return _initial_state(make, abstract, init, tx, cfg.seed, mesh)

    with watch.phase("compile"), quiet_cache_loads(), ThreadPoolExecutor(3) as pool:
        state = pool.submit(initialise)
        # the split goes to the devices while the steps compile (a store is read from disk here)
        placed = pool.submit(place_split, ds.train.images, ds.train.labels, mesh) if resident else None
        placed_val = pool.submit(place_eval, ds.val.images, ds.val.labels, tc.eval_batch_size,
                                 mesh) if resident_val else None
        for done in compile_ahead([train_step, frozen_step], eval_step, abstract_state, mesh, ds, cfg, pool,
                                   resident, k):
            done.result()
        state = state.result()
        placed = placed.result() if placed is not None else None
        placed_val = placed_val.result() if placed_val is not None else None
    return _Parts(ds, mesh, graphdef, state, train_step, eval_step, count_params(abstract), spe, init, frozen_step,
                  weights, placed, why, k, placed_val, tc.eval_batch_size, pos_weight, tc.thresholds)


def _initial_state(make: Callable[[], Any], abstract: Any, init: Any, tx: Any, seed: int, mesh: Any) -> Any:
    """The first train state, placed: one program, compiled for speed of compiling (it runs once)."""
    import jax
    from flax import nnx

    from cnnpipe.training import steps
    from cnnpipe.training.compile_cache import run_once

    if init.copy is None:
        state = run_once(lambda: steps.create_train_state(make(), tx, seed)[1])
    else:   # pretrained weights are copied into the initialised model, then the optimizer starts
        model = nnx.merge(nnx.graphdef(abstract), run_once(lambda: nnx.state(make())))
        init.copy(model)
        _, state = steps.create_train_state(model, tx, seed)
    return jax.block_until_ready(steps.replicate(mesh, state))


def _bar_safe(log: Callable[[str], None], bar: Any) -> Callable[[str], None]:
    """`log`, clearing the progress bar for the line and redrawing it after (no line split by the bar)."""
    def say(line: str) -> None:
        if bar.disable:
            log(line)
            return
        with bar.external_write_mode():
            log(line)

    return say


def train_and_evaluate(cfg: Config, workdir: str | os.PathLike | None = None, *, name: str = "default",
                       resume: bool = False, log: Callable[[str], None] = print,
                       compile_cache: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train `cfg` into the run directory `workdir`; return the summary (also `summary.json`).

    Args:
      cfg: a validated config (`cnnpipe.config.load_config`).
      workdir: the run directory; None makes `runs/<name>-<time>`.
      name: the config's name, for the default run directory.
      resume: continue from the latest checkpoint in `workdir` (exactly: data order,
        rng and optimizer state); without a checkpoint the run starts from step 0.
      log: where progress lines go (default: print).
      compile_cache: JAX's persistent compilation cache directory, "off", or None for
        `$CNNPIPE_COMPILE_CACHE` or the user cache directory (`cnnpipe.training.compile_cache`).
    Raises:
      NonFiniteLossError: `train.max_nonfinite_steps` non-finite losses in a row.
      ValueError: bad data, a batch size that does not divide over the devices, or a
        `workdir` that already holds checkpoints without `resume`.
    """
    watch = Stopwatch()
    with watch.phase("imports"):
        import jax  # noqa: F401 - its import time is the "imports" phase's

        from cnnpipe.training import distributed
        from cnnpipe.training.checkpoint import Checkpoints
        from cnnpipe.training.compile_cache import enable_compile_cache, quiet_cache_loads
        from cnnpipe.training.plots import import_in_background
        from cnnpipe.training.summary import finish_run
    watch.listen()
    primary = distributed.is_primary()
    if not primary:  # one process speaks for the run
        log = _silent
    # every process uses the primary's run directory (the default one is named after the time)
    run_dir = Path(distributed.agree(str(workdir if workdir is not None else default_run_dir(name))))
    has_checkpoints = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    if not resume and has_checkpoints:
        raise ValueError(f"{run_dir}: already holds checkpoints; resume it with --resume {run_dir} "
                         "or choose another --workdir")
    distributed.barrier("checked")  # no process creates checkpoints/ before every process has looked
    enable_compile_cache(compile_cache)
    parts = _build(cfg, watch, run_dir if resume and has_checkpoints else None)
    cfg = resolve_data(cfg, parts.ds)
    _prepare_run_dir(cfg, run_dir, parts.ds, resume, write=primary, normalization=parts.init.info())
    _log_start(cfg, parts, run_dir, log)
    monitor = Monitor.of(cfg.train, parts.ds.task)
    ckpts = Checkpoints(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints, asynchronous=True,
                        best_metric=monitor.metric)
    # the plots' matplotlib imports while the run trains (joined before anything else runs after it)
    plotting = import_in_background() if primary else None
    try:
        with quiet_cache_loads():   # restoring runs small cached programs (dtype conversions)
            pos = _restore(parts, ckpts, resume, run_dir, log)
        final, counts, remembered = _train(cfg, parts, ckpts, pos, run_dir, resume, watch, log)
        with watch.phase("eval"):
            final, result = _results(cfg, parts, ckpts, pos, final, remembered)
    finally:
        with watch.phase("checkpoints"):
            ckpts.close()  # waits for a save in flight: a finished checkpoint is never lost
        if plotting is not None:
            plotting.join()
        watch.stop()
    return finish_run(cfg, parts, run_dir, final, result, counts, pos, resume, watch, log, write=primary)


def _log_start(cfg: Config, parts: _Parts, run_dir: Path, log: Callable[[str], None]) -> None:
    """The run's first lines: data, model, devices, where the training data lives, fine-tuning, weights."""
    import jax

    from cnnpipe.training.dispatch import describe

    processes = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    log(f"run {run_dir}: {parts.ds.description}, {len(parts.ds.train)} train / {len(parts.ds.val)} val images, "
        f"{parts.ds.num_classes} {parts.ds.task.noun}")
    log(f"model: {cfg.model if isinstance(cfg.model, str) else 'custom'}, {parts.num_params:,} parameters; "
        f"{parts.mesh.size} device(s) ({jax.devices()[0].platform}){processes}; training data "
        f"{'on the devices' if parts.resident is not None else 'from the host'} ({parts.resident_reason})"
        + describe(cfg.train.steps_per_dispatch, parts.steps_per_dispatch, parts.resident is not None,
                   parts.mesh.devices.flat[0].platform))
    pre = cfg.pretrained
    if pre.weights is not None:
        plan = (f"; head alone for {pre.freeze_epochs} epoch(s), then the backbone too" if pre.freeze_epochs
                else "; head and backbone train together")
        scale = f"; backbone at {pre.backbone_lr_scale:g}x the learning rate" if pre.backbone_lr_scale != 1.0 else ""
        log(f"pretrained: {pre.weights} (new {parts.ds.num_classes}-class head{plan}{scale}); "
            f"input normalisation from the {parts.init.normalization}")
    if not parts.ds.task.is_classification:   # its loss, label counts and warnings
        return task_run.describe_task(parts.ds.task, parts.ds.train.labels, parts.pos_weight, cfg, log)
    per_class = np.bincount(parts.ds.train.labels, minlength=parts.ds.num_classes)
    if not per_class.all():   # e.g. a class whose only image went to the validation split
        log(f"warning: no training images of class {', '.join(c for c, n in zip(parts.ds.classes, per_class) if not n)}; "
            "the model cannot learn it (class weights and the balanced sampler cannot help)")
    if parts.init.clip is not None and pre.weights is None:   # data.normalize: a window or percentiles
        log(f"input: clipped to and scaled by {parts.init.normalization}")
    if parts.class_weights is not None:
        from cnnpipe.training.loss import describe_weights

        log(f"class weights ({'auto: inverse frequency' if cfg.train.class_weights == 'auto' else 'given'}): "
            f"{describe_weights(parts.class_weights, parts.ds.classes)}")


def _results(cfg: Config, parts: _Parts, ckpts: Any, pos: Position, final: dict[str, Any],
             remembered: dict[int, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the last evaluation, the run's result): the result is the best checkpoint's evaluation
    with early stopping, else the last one; its "step" names the checkpoint."""
    from cnnpipe.training.summary import best_result

    if not final:  # resumed a run that had already finished: evaluate its final state
        final = parts.evaluate(parts.state)
    if cfg.train.early_stopping is not None:
        best = best_result(parts, ckpts, pos, cfg, remembered)
        if best is not None:
            return final, {**best, "step": pos.best_step}
    return final, {**final, "step": pos.step}


def _silent(_line: str) -> None:
    """The log of processes other than the primary."""


def _restore(parts: _Parts, ckpts: Any, resume: bool, run_dir: Path, log: Callable[[str], None]) -> Position:
    """The run's position; on resume, also the train state restored into `parts`."""
    if resume and ckpts.latest_step() is not None:
        from cnnpipe.training.steps import replicate

        state, saved, _ = ckpts.restore(parts.state)
        parts.state = replicate(parts.mesh, state)  # every leaf placed as the compiled steps expect
        pos = Position.from_dict(saved)
        log(f"resuming from checkpoint {pos.step} (epoch {pos.epoch + 1}, step {pos.step_in_epoch})" if not pos.stopped
            else f"early stopping already ended this run after epoch {pos.epoch}; nothing left to train")
        return pos
    if resume:
        log(f"{run_dir}: no complete checkpoint yet; starting from step 0")
    return Position()


def _train(cfg: Config, parts: _Parts, ckpts: Any, pos: Position, run_dir: Path, resume: bool,
           watch: Stopwatch, log: Callable[[str], None]
           ) -> tuple[dict[str, Any], dict[str, Any], dict[int, dict[str, Any]]]:
    """Every remaining epoch (until early stopping stops the run): train, evaluate, checkpoint.

    Returns the last evaluation (empty if no epoch ran), counts (images trained,
    non-finite steps) and {step: evaluation} of the best checkpoint if it was evaluated here.
    """
    from tqdm import tqdm

    from cnnpipe.training import distributed, steps
    from cnnpipe.training.dispatch import Chunks

    tc, mesh = cfg.train, parts.mesh
    monitor = Monitor.of(tc, parts.ds.task)
    rows = steps.process_rows(mesh, tc.batch_size)  # this process reads only its rows of each batch
    logger = MetricsLog(run_dir, pos.step if resume else None, enabled=distributed.is_primary())
    bar = tqdm(total=parts.steps_per_epoch * tc.epochs, initial=pos.step, unit="step", dynamic_ncols=True,
               leave=False, disable=not (distributed.is_primary() and sys.stderr.isatty()))
    say = _bar_safe(log, bar)
    last_ckpt = [ckpts.latest_step()]

    def save(state: Any, at: Position, result: dict[str, Any] | None = None) -> None:
        metrics = None if result is None else task_run.checkpoint_metrics(parts.ds.task, result)
        at.log_window = sink.window()   # the stop rule settled every step before a save
        ckpts.save(at.step, state, at.as_dict(), metrics=metrics)
        last_ckpt[0] = at.step

    sink = MetricsSink(logger.write, tc.max_nonfinite_steps,
                       lambda: str(run_dir / "checkpoints" / str(last_ckpt[0])) if last_ckpt[0] is not None else "none",
                       task_run.train_score_name(parts.ds.task))
    sink.resume(pos.log_window)
    loop = EpochLoop(parts.train_step, sink, watch, tc.batch_size, parts.steps_per_epoch, tc.log_every_steps,
                     tc.checkpoint_every_steps, save, None if bar.disable else bar,
                     Chunks(parts.steps_per_dispatch, auto=tc.steps_per_dispatch == "auto"))
    result: dict[str, Any] = {}
    remembered: dict[int, dict[str, Any]] = {}
    try:
        for epoch in range(pos.epoch, tc.epochs if not pos.stopped else pos.epoch):
            batches = epoch_batches(cfg, parts, epoch, pos.step_in_epoch, rows)
            # the first pretrained.freeze_epochs epochs train the head alone
            loop.train_step = parts.frozen_step if epoch < cfg.pretrained.freeze_epochs else parts.train_step
            with batches as step_args:
                parts.state = loop.run(parts.state, step_args, pos)
            result, is_best = _end_epoch(cfg, parts, pos, monitor, logger, watch, save, say, run_dir)
            if is_best:
                remembered = {pos.step: result}
            if pos.stopped:
                say(f"early stopping: {monitor.metric} has not improved by more than {monitor.min_delta:g} for "
                    f"{monitor.patience} epoch(s); stopped after epoch {epoch + 1}/{tc.epochs}; the run's result "
                    f"is its best checkpoint, step {pos.best_step} ({monitor.metric} {pos.best_value:.4f})")
                break
    finally:
        bar.close()
        logger.close()
    return result, {"images": loop.images_trained, "nonfinite": sink.nonfinite_total}, remembered


def _end_epoch(cfg: Config, parts: _Parts, pos: Position, monitor: Monitor, logger: MetricsLog, watch: Stopwatch,
               save: Callable[..., None], say: Callable[[str], None], run_dir: Path) -> tuple[dict[str, Any], bool]:
    """Evaluate the epoch just trained, log it, checkpoint it: (its evaluation, whether it is the best)."""
    from cnnpipe.training import distributed
    from cnnpipe.training.compile_cache import quiet_cache_loads
    from cnnpipe.training.summary import probe_feature_maps

    tc, ds = cfg.train, parts.ds
    t_eval = time.perf_counter()
    with watch.phase("eval"):
        result = parts.evaluate(parts.state)
    is_best = pos.end_epoch(result, monitor)
    logger.write({"step": pos.step, "epoch": pos.epoch, "split": "val", "loss": result["loss"],
                  **task_run.epoch_record(ds.task, result)})
    if distributed.is_primary():   # multilabel: this checkpoint's thresholds, for evaluate/predict/export
        task_run.record_thresholds(run_dir, pos.step, result)
    eval_seconds = time.perf_counter() - t_eval
    with watch.phase("checkpoints"):
        save(parts.state, pos, result)
    if tc.probe_feature_maps:
        with quiet_cache_loads():
            probe_feature_maps(logger.tb, parts.graphdef, parts.state, ds, pos.step)
    say(f"epoch {pos.epoch}/{tc.epochs}: val loss {result['loss']:.4f}, {task_run.epoch_line(ds.task, result)}"
        f"{' (best)' if is_best else ''} [{eval_seconds:.1f}s eval]")
    return result, is_best
