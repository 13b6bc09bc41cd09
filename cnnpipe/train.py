"""The training loop: config -> run directory (checkpoints, metrics, plots, summary).

`train_and_evaluate(cfg, workdir)` is what `cnnpipe train` and the notebooks call.
The step functions come from `cnnpipe.steps` (one jitted train step, one eval
step; fixed shapes, so each compiles once per run); this module feeds them
batches, evaluates after every epoch, checkpoints (Orbax, see
`cnnpipe.checkpoint`) and resumes exactly: data order, rng and optimizer state.

Run directory::

    config.yaml      the resolved config         dataset.json   what inference needs
    metrics.jsonl    one JSON object per line    tensorboard/   event files
    checkpoints/     Orbax steps                 plots/         loss, accuracy, confusion matrix
    summary.json     final/best accuracy, per-class accuracy, params, speed, times
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.config import Config, dump_config
from cnnpipe.data import Dataset, load_dataset, prefetch, steps_per_epoch, train_batches
from cnnpipe.evaluate import write_atomic  # re-exported: part of this module's API

__all__ = ["train_and_evaluate", "NonFiniteLossError", "default_run_dir", "write_atomic"]


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the message names the step range and last checkpoint."""


def default_run_dir(name: str, root: str | os.PathLike = "runs") -> Path:
    """`runs/<name>-<YYYYmmdd-HHMMSS>` (a numeric suffix if that exists already)."""
    base = Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


class _CompileClock:
    """Seconds JAX spends tracing, lowering and compiling while the run is active."""

    _EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
               "/jax/core/compile/backend_compile_duration")

    def __init__(self) -> None:
        self.seconds = 0.0
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if event in self._EVENTS:
            self.seconds += duration

    def stop(self) -> None:
        import jax.monitoring

        jax.monitoring.unregister_event_duration_listener(self._listen)


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a killed process counts as past every step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class _Log:
    """metrics.jsonl (truncated to `resume_step` on resume, emptied otherwise) plus TensorBoard scalars."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from tensorboardX import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # a killed run may have logged past its last checkpoint; those steps run again
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            write_atomic(self.path, "".join(line + "\n" for line in kept))
        # a fresh run in a reused directory starts a fresh log
        self._file = open(self.path, "w" if resume_step is None else "a", encoding="utf-8")
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        prefix = record.get("split", "train")
        for key, value in record.items():
            if key not in ("step", "epoch", "split") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool) and math.isfinite(value):
                self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        self.tb.close()


def _prepare_run_dir(cfg: Config, run_dir: Path, ds: Dataset, resume: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plots").mkdir(exist_ok=True)
    config_text = dump_config(cfg)
    if resume and (run_dir / "config.yaml").exists():
        if (run_dir / "config.yaml").read_text() != config_text:
            raise ValueError(f"{run_dir / 'config.yaml'}: differs from the config given to resume this run")
    else:
        write_atomic(run_dir / "config.yaml", config_text)
    write_atomic(run_dir / "dataset.json", json.dumps(ds.info(), indent=2) + "\n")


def train_and_evaluate(cfg: Config, workdir: str | os.PathLike | None = None, *, name: str = "default",
                       resume: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `cfg` into the run directory `workdir`; return the summary (also `summary.json`).

    Args:
      cfg: a validated config (`cnnpipe.config.load_config`).
      workdir: the run directory; None makes `runs/<name>-<time>`.
      name: the config's name, for the default run directory.
      resume: continue from the latest checkpoint in `workdir` (exactly: data order,
        rng and optimizer state); without a checkpoint the run starts from step 0.
      log: where progress lines go (default: print).
    Raises:
      NonFiniteLossError: `train.max_nonfinite_steps` non-finite losses in a row.
      ValueError: bad data, a batch size that does not divide over the devices, or a
        `workdir` that already holds checkpoints without `resume`.
    """
    wall_start = time.perf_counter()
    clock = _CompileClock()
    import jax
    from flax import nnx

    from cnnpipe import steps
    from cnnpipe.checkpoint import Checkpoints
    from cnnpipe.evaluate import evaluate_split, plot_confusion, plot_curves
    from cnnpipe.models import build_model, count_params

    run_dir = Path(workdir) if workdir is not None else default_run_dir(name)
    if not resume and (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise ValueError(f"{run_dir}: already holds checkpoints; resume it with --resume {run_dir} "
                         "or choose another --workdir")
    tc = cfg.train
    ds = load_dataset(cfg.data, seed=cfg.seed)
    mesh = steps.make_mesh(tc.num_devices)
    for key, size in (("train.batch_size", tc.batch_size), ("train.eval_batch_size", tc.eval_batch_size)):
        steps.check_divisible(mesh, size, key)
    spe = steps_per_epoch(len(ds.train), tc.batch_size)
    total_steps = spe * tc.epochs
    _prepare_run_dir(cfg, run_dir, ds, resume)

    model = build_model(cfg.model, in_channels=ds.channels, num_classes=ds.num_classes, input_size=ds.size,
                        bit_depth=ds.bit_depth, rngs=nnx.Rngs(cfg.seed), mean=ds.mean, std=ds.std)
    num_params = count_params(model)
    log(f"run {run_dir}: {ds.description}, {len(ds.train)} train / {len(ds.val)} val images, "
        f"{ds.num_classes} classes")
    log(f"model: {cfg.model if isinstance(cfg.model, str) else 'custom'}, {num_params:,} parameters; "
        f"{mesh.size} device(s) ({jax.devices()[0].platform})")
    tx = steps.make_optimizer(cfg.optimizer, total_steps)
    graphdef, state = steps.create_train_state(model, tx, cfg.seed)
    state = steps.replicate(mesh, state)
    train_step = steps.make_train_step(graphdef, tx, mesh, precision=tc.precision, augment=cfg.augment)
    eval_step = steps.make_eval_step(graphdef, mesh)

    ckpts = Checkpoints(run_dir / "checkpoints", keep=tc.keep_checkpoints)
    meta: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best_val_accuracy": None,
                            "best_step": None}
    if resume and ckpts.latest_step() is not None:
        state, meta, _ = ckpts.restore(state)
        log(f"resuming from checkpoint {meta['step']} (epoch {meta['epoch'] + 1}, step {meta['step_in_epoch']})")
    elif resume:
        log(f"{run_dir}: no complete checkpoint yet; starting from step 0")
    logger = _Log(run_dir, meta["step"] if resume else None)

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=meta["step"], unit="step", dynamic_ncols=True, leave=False,
               disable=not sys.stderr.isatty())
    step = meta["step"]
    best, best_step = meta.get("best_val_accuracy"), meta.get("best_step")
    last_ckpt = ckpts.latest_step()
    nonfinite_total, run_start, run_len = 0, None, 0
    train_images, train_seconds = 0, 0.0
    result: dict[str, Any] = {}

    def handle(done_step: int, epoch: int, m: dict[str, Any], acc: dict[str, float]) -> None:
        nonlocal nonfinite_total, run_start, run_len
        if bool(m["nonfinite"]):
            nonfinite_total += 1
            run_start, run_len = (done_step if run_len == 0 else run_start), run_len + 1
            logger.write({"step": done_step, "epoch": epoch + 1, "nonfinite": True, "loss": None,
                          "learning_rate": float(m["learning_rate"])})
            if run_len >= tc.max_nonfinite_steps:
                where = run_dir / "checkpoints" / str(last_ckpt) if last_ckpt is not None else "none"
                raise NonFiniteLossError(
                    f"loss was non-finite for {run_len} steps in a row (steps {run_start}-{done_step}); "
                    f"stopping. Last good checkpoint: {where}")
            return
        run_len = 0
        acc["loss"] += float(m["loss"])
        acc["accuracy"] += float(m["accuracy"])
        acc["n"] += 1
        acc["learning_rate"] = float(m["learning_rate"])

    try:
        for epoch in range(meta["epoch"], tc.epochs):
            start = meta["step_in_epoch"] if epoch == meta["epoch"] else 0
            batches = prefetch((steps.shard_batch(mesh, x, y) for x, y in
                                train_batches(ds.train, tc.batch_size, seed=cfg.seed, epoch=epoch,
                                              start_step=start)), size=2)
            acc = {"loss": 0.0, "accuracy": 0.0, "n": 0}
            pending: tuple[int, Any] | None = None
            t_mark, steps_since = None, 0  # throughput clock starts after the first (compiling) step
            with batches:
                for i in range(start, spe):
                    images, labels = next(batches)
                    state, metrics = train_step(state, images, labels)
                    step += 1
                    if pending is not None:  # read the previous step's metrics: one step in flight
                        handle(pending[0], epoch, jax.device_get(pending[1]), acc)
                    pending = (step, metrics)
                    bar.update(1)
                    if t_mark is None:
                        jax.block_until_ready(metrics)
                        t_mark, steps_since = time.perf_counter(), 0
                    else:
                        steps_since += 1
                    if step % tc.log_every_steps == 0 or i == spe - 1:
                        handle(pending[0], epoch, jax.device_get(pending[1]), acc)
                        pending = None
                        now = time.perf_counter()
                        ips = steps_since * tc.batch_size / (now - t_mark) if steps_since else None
                        train_seconds += now - t_mark
                        train_images += steps_since * tc.batch_size
                        t_mark, steps_since = now, 0
                        if acc["n"]:
                            record = {"step": step, "epoch": epoch + 1, "loss": acc["loss"] / acc["n"],
                                      "accuracy": acc["accuracy"] / acc["n"], "learning_rate": acc["learning_rate"],
                                      "images_per_sec": ips}
                            logger.write(record)
                            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
                        acc = {"loss": 0.0, "accuracy": 0.0, "n": 0}
                    if tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0 and i < spe - 1:
                        if pending is not None:
                            handle(pending[0], epoch, jax.device_get(pending[1]), acc)
                            pending = None
                        ckpts.save(step, state, {"epoch": epoch, "step_in_epoch": i + 1, "step": step,
                                                 "best_val_accuracy": best, "best_step": best_step})
                        last_ckpt = step
                        t_mark = time.perf_counter()  # saving is not training time
            t_eval = time.perf_counter()
            result = evaluate_split(eval_step, state, ds.val, tc.eval_batch_size, mesh, ds.num_classes)
            is_best = best is None or result["accuracy"] > best
            if is_best:
                best, best_step = result["accuracy"], step
            logger.write({"step": step, "epoch": epoch + 1, "split": "val", "loss": result["loss"],
                          "accuracy": result["accuracy"]})
            ckpts.save(step, state, {"epoch": epoch + 1, "step_in_epoch": 0, "step": step,
                                     "best_val_accuracy": best, "best_step": best_step},
                       val_accuracy=result["accuracy"])
            last_ckpt = step
            if tc.probe_feature_maps:
                _probe_feature_maps(logger.tb, graphdef, state, ds, step)
            log(f"epoch {epoch + 1}/{tc.epochs}: val loss {result['loss']:.4f}, val accuracy "
                f"{result['accuracy']:.4f}{' (best)' if is_best else ''} [{time.perf_counter() - t_eval:.1f}s eval]")
    finally:
        bar.close()
        logger.close()
        ckpts.close()
        clock.stop()

    if not result:  # resumed a run that had already finished: evaluate its final state
        result = evaluate_split(eval_step, state, ds.val, tc.eval_batch_size, mesh, ds.num_classes)
    plot_curves(run_dir / "metrics.jsonl", run_dir / "plots")
    plot_confusion(result["confusion"], ds.classes, run_dir / "plots" / "confusion_matrix.png")
    summary = {
        "run_dir": str(run_dir), "final_val_accuracy": result["accuracy"], "final_val_loss": result["loss"],
        "best_val_accuracy": best if best is not None else result["accuracy"], "best_step": best_step,
        "per_class_accuracy": dict(zip(ds.classes, result["per_class_accuracy"])),
        "confusion_matrix": result["confusion"].tolist(), "param_count": num_params,
        "train_images_per_sec": train_images / train_seconds if train_seconds else None,
        "compile_seconds": round(clock.seconds, 3), "wall_seconds": round(time.perf_counter() - wall_start, 3),
        "steps": step, "epochs": tc.epochs, "nonfinite_steps": nonfinite_total, "devices": mesh.size,
        "resumed": bool(resume),
    }
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    log(f"done: val accuracy {summary['final_val_accuracy']:.4f} (best {summary['best_val_accuracy']:.4f}), "
        f"{summary['wall_seconds']:.1f}s wall, {summary['compile_seconds']:.1f}s compiling, "
        + (f"{summary['train_images_per_sec']:.0f} train images/s" if summary["train_images_per_sec"]
           else "train images/s not measured (needs 2+ steps per epoch)") + f" -> {run_dir}")
    return summary


def _probe_feature_maps(tb: Any, graphdef: Any, state: Any, ds: Dataset, step: int) -> None:
    """Feature maps of the first validation image to TensorBoard, one grid per spatial layer."""
    import jax

    from cnnpipe.evaluate import feature_grid
    from cnnpipe.steps import forward

    _, feats = forward(graphdef, (state.params, state.model_state), np.asarray(ds.val.images[:1]), None)
    for name, fmap in jax.device_get(feats).items():
        tb.add_image(f"feature_maps/{name}", feature_grid(fmap[0], fill=0.0)[0][None], step)
