"""Where a run's first weights come from: fresh, a timm weights file, or an earlier cnnpipe run.

`resolve_pretrained(cfg, ds)` reads `cfg.pretrained` once, before anything compiles, and
returns an `Init`: the model's input normalisation and how to copy the weights into a
freshly initialised model. Pixels keep their one path (`SequentialNet.normalize`):
raw integers on the device, scaled by the bit depth's maximum, then

- timm weights on 3 planes: the weights' own mean/std (timm's `pretrained_cfg`,
  ImageNet's for every listed architecture), because the pretrained filters expect them;
- any other plane count, or fresh weights: the training split's per-plane statistics,
  because RGB statistics mean nothing for a 5-band or 16-bit microscopy plane (the
  adapted first convolution sums or averages the RGB filters over the planes, so
  zero-mean, unit-variance planes feed it what it saw in ImageNet);
- an earlier cnnpipe run with the same planes and bit depth: that run's statistics.

`restore_run_model` rebuilds a saved run's model (also `cnnpipe.runs.load.load_run`'s core).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.config import BACKBONES, Config, ConfigError
from cnnpipe.datasets.dataset import Dataset, read_dataset_info

__all__ = ["Init", "resolve_pretrained", "restore_run_model", "model_for_run", "run_normalization", "head_mask",
           "is_run_dir"]


@dataclass(frozen=True)
class Init:
    """A run's starting point: the model's normalisation (raw pixel units) and its weights.

    copy: ``copy(model, check_only=False)`` copies the weights into a concrete model, or
    with `check_only` runs the same checks on an abstract one, before any compile
    (None: keep the fresh weights).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalization: str
    copy: Callable[..., None] | None = None
    clip: tuple[tuple[float, ...], tuple[float, ...]] | None = None   # a window (data.normalize), raw units

    def info(self) -> dict[str, Any]:
        """The `normalization` entry of a run's dataset.json."""
        clip = {} if self.clip is None else {"clip": [list(self.clip[0]), list(self.clip[1])]}
        return {"mean": list(self.mean), "std": list(self.std), **clip, "from": self.normalization}

    @classmethod
    def of_record(cls, norm: Mapping[str, Any], where: str, copy: Callable[..., None] | None = None) -> Init:
        """The `Init` a dataset.json `normalization` record describes (its clip included)."""
        clip = norm.get("clip")
        return cls(tuple(norm["mean"]), tuple(norm["std"]), where, copy,
                   None if clip is None else (tuple(clip[0]), tuple(clip[1])))


def is_run_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.yaml").is_file()


def resolve_pretrained(cfg: Config, ds: Dataset, resumed_from: Path | None = None) -> Init:
    """The `Init` for `cfg.pretrained` on `ds` (see the module docstring for the normalisation).

    `resumed_from`: a run directory being resumed from a checkpoint: its recorded
    normalisation, and no weights to copy (the checkpoint has them), so a weights file
    moved since does not matter.

    Raises:
      ConfigError: timm weights for a model that is not a backbone, or a run of another architecture.
      ValueError (`WeightsError`): an unreadable weights file or one of another architecture.
    """
    from cnnpipe.training.normalize import input_window, window_init

    weights = cfg.pretrained.weights
    window = input_window(cfg.data.normalize, ds)
    data = Init(tuple(ds.mean), tuple(ds.std), "data: per-plane statistics of the training split") \
        if window is None else Init(*window_init(window), clip=window[:2])
    if resumed_from is not None and (resumed_from / "dataset.json").is_file():
        norm = read_dataset_info(resumed_from).get("normalization")
        if norm is not None:
            return Init.of_record(norm, str(norm.get("from", "the resumed run")))
    if weights is None:
        return data
    if not weights.strip():
        raise ConfigError("pretrained.weights: got an empty path; expected a weights file, hf-hub:timm/<name> "
                          "or a cnnpipe run directory (or null)")
    if not weights.startswith("hf-hub:"):
        weights = str(Path(weights).expanduser())
    if Path(weights).is_dir():
        if not is_run_dir(weights):
            raise ConfigError(f"pretrained.weights: {weights} is a folder but not a cnnpipe run directory "
                              "(no config.yaml)")
        return _from_run(cfg, ds, Path(weights), data)
    if cfg.model not in BACKBONES:
        raise ConfigError(f"pretrained.weights: {weights} is a weights file, which needs a backbone model "
                          f"({', '.join(BACKBONES)}); got model: {_model_name(cfg.model)}")
    from cnnpipe.models.backbones import load_pretrained_into, timm_state_dict
    from cnnpipe.models.weights import weights_config

    copy = functools.partial(load_pretrained_into, sd=timm_state_dict(cfg.model, weights), source=str(weights),
                             new_head=True)
    unsigned = np.dtype(ds.train.images.dtype).kind == "u"
    if ds.channels != 3 or (not unsigned and window is None):   # no full scale: the data's own statistics
        return dataclasses.replace(data, copy=copy)
    wc, top = weights_config(weights, cfg.model), 2 ** ds.bit_depth - 1
    if window is not None:   # the weights' statistics on the windowed [0, 1] values
        return Init(*window_init(window, (wc["mean"], wc["std"])), copy=copy, clip=window[:2])
    return Init(tuple(m * top for m in wc["mean"]), tuple(s * top for s in wc["std"]),
                f"weights: the pretrained weights' RGB mean/std ({wc['from']}) at the data's bit depth", copy)


def _model_name(model: Any) -> str:
    return model if isinstance(model, str) else "a layer list"


def _from_run(cfg: Config, ds: Dataset, run_dir: Path, data: Init) -> Init:
    src_cfg, info, graphdef, state, step = restore_run_model(run_dir, "best")
    if src_cfg.model != cfg.model:
        raise ConfigError(f"pretrained.weights: {run_dir} trained model {_model_name(src_cfg.model)}, this config's "
                          f"model is {_model_name(cfg.model)}; transfer needs the same architecture")
    import jax
    from flax import nnx

    model = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.model_state))
    flat = {tuple(path): np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model))}
    copy = functools.partial(copy_from_run, source=flat, where=f"{run_dir} (step {step})")
    # another kind of data, or a window this config asks for: its own normalisation, the run's weights
    same = (int(info["channels"]), int(info["bit_depth"]), info.get("dtype", str(np.dtype(ds.train.images.dtype)))) \
        == (ds.channels, ds.bit_depth, str(np.dtype(ds.train.images.dtype)))
    if not same or data.clip is not None:
        return dataclasses.replace(data, copy=copy)
    return Init.of_record(run_normalization(info), f"run: the statistics of {run_dir.name} (step {step})", copy)


def copy_from_run(model: Any, source: Mapping[tuple, np.ndarray], where: str, *, check_only: bool = False) -> None:
    """Copy an earlier run's weights and batch-norm statistics into `model`, all but the head.

    The first convolution adapts to a different plane count as timm's `in_chans` does.
    Raises ConfigError naming the first variable whose shape does not fit.
    """
    import jax.numpy as jnp
    from flax import nnx

    from cnnpipe.models.weights import adapt_input_conv

    first = model.first_kernel()
    plan = []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        path = tuple(path)
        if path[:2] == ("layers", model.head_index):
            continue   # the new head, sized to this run's classes
        value = source.get(path)
        if value is not None and var is first and value.shape[2] != var.shape[2]:
            try:
                value = adapt_input_conv(var.shape[2], value.transpose(3, 2, 0, 1)).transpose(2, 3, 1, 0)
            except ValueError as exc:
                raise ConfigError(f"pretrained.weights: {where}: {exc}") from None
        if value is None or tuple(value.shape) != tuple(var.shape):
            got = "missing" if value is None else f"shape {list(value.shape)}"
            raise ConfigError(f"pretrained.weights: {where}: {'.'.join(map(str, path))} is {got}, this model needs "
                              f"{list(var.shape)} (a different data.size or layer list?)")
        plan.append((var, value))
    if not check_only:
        for var, value in plan:
            var.set_value(jnp.asarray(value, var.dtype))


def head_mask(params: Any, head_index: int) -> Any:
    """A tree of bools shaped like `params` (an nnx params state): True for the classifier head's leaves."""
    import jax

    def is_head(path: tuple, _leaf: Any) -> bool:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        return keys[:2] == ["layers", head_index]

    return jax.tree_util.tree_map_with_path(is_head, params)


def run_normalization(info: Mapping[str, Any]) -> Mapping[str, Any]:
    """{'mean', 'std'} (raw pixel units) a run's model applies: dataset.json's `normalization`,
    or for runs written before it existed, the data's statistics."""
    return info.get("normalization") or {"mean": info["mean"], "std": info["std"]}


def model_for_run(cfg: Config, info: Mapping[str, Any], seed: int | None = None) -> Any:
    """The model of a run, abstract (shapes only, nothing initialised), from its config and dataset.json."""
    from flax import nnx

    from cnnpipe.models.cnn import build_model

    norm = run_normalization(info)
    return nnx.eval_shape(lambda: build_model(
        cfg.model, in_channels=int(info["channels"]), num_classes=len(info["classes"]),
        input_size=tuple(info["size"]), bit_depth=int(info["bit_depth"]),
        rngs=nnx.Rngs(cfg.seed if seed is None else seed), mean=norm["mean"], std=norm["std"],
        clip=None if norm.get("clip") is None else (norm["clip"][0], norm["clip"][1])))


def restore_run_model(run_dir: str | os.PathLike, checkpoint: str = "best") -> tuple[Config, dict, Any, Any, int]:
    """(config, dataset.json, graphdef, `ModelState`, step) of a saved run's checkpoint.

    `checkpoint`: "best" (by the run's main metric; the latest if none was
    evaluated), "latest", or a step number. Raises FileNotFoundError / ValueError as
    `cnnpipe.runs.load.load_run` documents.
    """
    from cnnpipe.config import load_config
    from cnnpipe.training import steps
    from cnnpipe.training.checkpoint import Checkpoints
    from cnnpipe.training.loop import Monitor

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: not a cnnpipe run directory (config.yaml is missing)")
    if not (run_dir / "config.yaml").read_bytes().strip():  # a run's resolved config is never empty
        raise ValueError(f"{run_dir / 'config.yaml'}: empty run file (damaged?)")
    cfg = load_config(run_dir / "config.yaml")
    info = read_dataset_info(run_dir)
    # shapes only: every value comes from the checkpoint, so nothing is initialised or compiled
    graphdef, state = steps.split_model(model_for_run(cfg, info))  # parameters and model state: no optimizer
    from cnnpipe.tasks import Task

    # "best" is by the run's own metric (its early-stopping metric, else the task's: accuracy, mAP, RMSE)
    best = Monitor.of(cfg.train, Task.from_meta(info)).metric
    ckpts = Checkpoints(run_dir / "checkpoints", read_only=True, best_metric=best)
    try:
        if checkpoint == "best":
            step = ckpts.best_step() or ckpts.latest_step()
        elif checkpoint == "latest":
            step = ckpts.latest_step()
        elif str(checkpoint).isdigit():
            step = int(checkpoint)
        else:
            raise ValueError(f"--checkpoint: got {checkpoint!r}; expected best, latest or a step number "
                             f"(saved: {', '.join(map(str, ckpts.steps())) or 'none'})")
        params, model_state, step = ckpts.restore_model(state.params, state.model_state, step)
    finally:
        ckpts.close()
    return cfg, info, graphdef, steps.ModelState(params, model_state), step
