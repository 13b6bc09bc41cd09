"""Training configs: YAML -> typed, validated, frozen `Config` (`load_config(path, overrides)`).

Owns the schema (one commented field per option), YAML loading, `--set a.b=value` overrides and
the error messages. Every mistake is one `ConfigError` that names the full dotted key, the value
received and what was expected; an unknown key also suggests the nearest valid one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cnnpipe.config_errors import ConfigError, describe, short, suggest
from cnnpipe.config_normalize import check_normalize

__all__ = [
    "ConfigError", "Config", "DataConfig", "AugmentConfig", "RandomResizedCropConfig", "TrainConfig",
    "EarlyStoppingConfig", "OptimizerConfig", "PretrainedConfig", "PRESETS", "BACKBONES", "LAYER_TYPES",
    "load_config", "dump_config", "parse_overrides", "validate_layers", "default_config_path", "config_from_dict",
]

PRESETS = ("simple_cnn", "lenet5", "vgg_small", "resnet_small")
# timm architectures cnnpipe rebuilds exactly (cnnpipe.models.backbones); pretrained weights load into them
BACKBONES = ("resnet18", "resnet34", "resnet50", "test_resnet",
             "convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny", "test_convnext")


class _Schema(BaseModel):   # frozen: a resolved config is a value; forbid: a typo is an error, not a new key
    model_config = ConfigDict(extra="forbid", frozen=True)


def _not_a_bool(value: Any) -> Any:
    # YAML reads true/yes/on as booleans, which pydantic takes as 1.0 (`random_erasing: true` erased every image)
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


Number = Annotated[float, BeforeValidator(_not_a_bool)]   # a float, an int, never a bool
PosInt = Annotated[StrictInt, Field(ge=1)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]


# ---------------------------------------------------------------- model layers
# One schema per layer type; `validate_layers` picks it by `type`, so an error names the layer's index.

class _Layer(_Schema):
    name: str | None = None     # feature-map name; default: type + running number


class ConvLayer(_Layer):
    type: Literal["conv"]
    filters: PosInt             # output channels
    kernel: PosInt | tuple[PosInt, PosInt] = 3
    stride: PosInt = 1
    padding: Literal["same", "valid"] = "same"


class PoolLayer(_Layer):
    type: Literal["max_pool", "avg_pool"]
    window: PosInt = 2
    stride: PosInt | None = None    # None = window (non-overlapping)


class BatchNormLayer(_Layer):
    type: Literal["batch_norm"]
    momentum: Annotated[Number, Field(gt=0.0, lt=1.0)] = 0.9
    epsilon: Annotated[Number, Field(gt=0.0)] = 1e-5


class DropoutLayer(_Layer):
    type: Literal["dropout"]
    rate: Annotated[Number, Field(ge=0.0, lt=1.0)]


class DenseLayer(_Layer):
    type: Literal["dense"]
    units: PosInt


class ResidualLayer(_Layer):
    # conv-bn-relu-conv-bn + shortcut (1x1 conv when the shape changes), then relu
    type: Literal["residual"]
    filters: PosInt
    stride: PosInt = 1


class PlainLayer(_Layer):
    type: Literal["relu", "gelu", "tanh", "sigmoid", "global_avg_pool", "flatten"]


_LAYER_SCHEMAS: dict[str, type[_Layer]] = {
    "conv": ConvLayer, "max_pool": PoolLayer, "avg_pool": PoolLayer,
    "batch_norm": BatchNormLayer, "dropout": DropoutLayer, "dense": DenseLayer,
    "residual": ResidualLayer, **{t: PlainLayer for t in
                                  ("relu", "gelu", "tanh", "sigmoid", "global_avg_pool", "flatten")},
}
LAYER_TYPES = tuple(_LAYER_SCHEMAS)


def validate_layers(layers: Sequence[Any], *, where: str = "model") -> tuple[dict[str, Any], ...]:
    """Check a layer list; return each layer as a dict with every option filled in.

    Errors name the layer by index (``model[2].filters``) and the offending key.
    """
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ConfigError(f"{where}: got {layers!r}; expected a preset name or a list of layers")
    if not layers:
        raise ConfigError(f"{where}: got an empty layer list; expected at least one layer")
    out = []
    for i, layer in enumerate(layers):
        at = f"{where}[{i}]"
        if not isinstance(layer, Mapping):
            raise ConfigError(f"{at}: got {layer!r}; expected a mapping with a 'type' key")
        kind = layer.get("type")
        if kind not in _LAYER_SCHEMAS:
            hint = suggest(str(kind), LAYER_TYPES)
            raise ConfigError(f"{at}.type: got {kind!r}; expected one of {', '.join(LAYER_TYPES)}{hint}")
        try:
            spec = _LAYER_SCHEMAS[kind].model_validate(dict(layer))
        except ValidationError as exc:
            raise ConfigError(describe(exc, _LAYER_SCHEMAS[kind], prefix=at, sep=".")) from None
        out.append(spec.model_dump())
    names = [d["name"] for d in out if d["name"] is not None]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: layer name {dup[0]!r} is used more than once; names must be unique")
    return tuple(out)


# ---------------------------------------------------------------- the schema

class WindowConfig(_Schema):       # data.normalize: clip to [low, high] (one pair, or one per plane), scale to [0, 1]
    window: tuple[Number, Number] | tuple[tuple[Number, Number], ...]
class PercentileConfig(_Schema):   # data.normalize: the same with each plane's training-split percentiles
    percentile: tuple[Number, Number] = (2.0, 98.0)


class DataConfig(_Schema):
    source: Literal["store", "folder", "tfds", "shapes"] = "shapes"
    path: str | None = None             # store dir (store) or image folder (folder)
    name: str | None = None             # tfds dataset name, e.g. mnist, cifar10 (tfds)
    split_train: str = "train"          # tfds split names
    split_val: str = "test"
    # H, W of every image; null: 32x32 for shapes and folders, a tfds dataset's own size
    size: tuple[PosInt, PosInt] | None = None
    resize: Literal["crop", "pad", "stretch"] = "crop"   # folder, tfds
    # folder, tfds; null: rgb (tfds: the dataset's own); native: each file's own planes (any count)
    channels: Literal["rgb", "gray", "native"] | None = None
    pages: Literal["first", "planes"] = "first"   # folder: multi-page TIFF, page 1 or every page a plane
    val_fraction: Annotated[Number, Field(ge=0.0, lt=1.0)] = 0.1   # folder
    # folder: a label table (CSV, TSV, JSON Lines, Parquet) instead of class folders, and its columns
    labels: str | None = None
    path_col: str | None = None
    label_col: str | tuple[str, ...] | None = None   # several: one 0/1 column per label (multi-label)
    label_delim: str | None = None      # one label column of delimited labels ("|", " "): multi-label
    target_col: str | tuple[str, ...] | None = None   # numeric target column(s): regression
    # classification (one class each), multilabel or regression; null: from the columns given
    task: Literal["classification", "multilabel", "regression"] | None = None
    split_col: str | None = None
    group_col: str | None = None
    fold_col: str | None = None
    # folder: stratified (default), group (default with a group_col) or hash (cnnpipe.datasets.splits)
    split: Literal["stratified", "group", "hash"] | None = None
    folds: Annotated[StrictInt, Field(ge=2, le=100)] | None = None   # folder: deal the files into K folds
    fold: NonNegInt | None = None       # store/folder made with folds: the validation fold (cnnpipe cv sets it)
    dtype: Literal["float32"] | None = None   # folder: every file's values as they are (mixed int and float files)
    file_timeout: Annotated[Number, Field(ge=0.0)] = 300.0   # folder: seconds per file in a worker (0: none)
    engine: Literal["local", "dask"] | None = None   # folder: where files are prepared (null: local)
    scheduler: str | None = None        # folder, engine dask: the scheduler's address (null: a local cluster)
    scheduler_file: str | None = None   # or the file `dask scheduler --scheduler-file` wrote
    bit_depth: Literal[8, 16] = 8       # shapes only
    num_train: PosInt = 4000            # shapes only
    num_val: PosInt = 400               # shapes only
    cache_dir: str | None = None        # folder and tfds caches (default ~/.cache/cnnpipe)
    # the training split on the devices once: auto = when it fits in 40% of the free device (or host) memory
    on_device: Literal["auto"] | StrictBool = "auto"
    normalize: Literal["zscore"] | WindowConfig | PercentileConfig = "zscore"   # per-plane (x - mean) / std

    _normalize_form = field_validator("normalize", mode="before")(lambda cls, value: check_normalize(value))

    @model_validator(mode="after")
    def _keys_of_the_source(self) -> DataConfig:
        """A key the source does not read is an error, not silently ignored (data.fold with shapes)."""
        folder_only = ("labels", "path_col", "label_col", "split_col", "group_col", "fold_col", "split", "folds",
                       "label_delim", "target_col", "task", "dtype", "engine", "scheduler", "scheduler_file")
        used = {"folder": (*folder_only, "fold"), "store": ("fold",)}.get(self.source, ())
        for key in (*folder_only, "fold"):
            if getattr(self, key) is not None and key not in used:
                where = "data.source folder" if key in folder_only else "data.source store or folder"
                raise ConfigError(f"data.{key}: only used with {where} (data.source is {self.source!r})")
        return self


class RandomResizedCropConfig(_Schema):
    # torchvision's RandomResizedCrop: a crop of `scale` x the area and `ratio` (w/h) aspect, resized back
    scale: tuple[Annotated[Number, Field(gt=0.0, le=1.0)], Annotated[Number, Field(gt=0.0, le=1.0)]] = (0.08, 1.0)
    ratio: tuple[Annotated[Number, Field(gt=0.0)], Annotated[Number, Field(gt=0.0)]] = (3 / 4, 4 / 3)

    @model_validator(mode="after")
    def _ordered(self) -> RandomResizedCropConfig:
        for key in ("scale", "ratio"):
            lo, hi = getattr(self, key)
            if lo > hi:
                raise ConfigError(f"augment.random_resized_crop.{key}: got [{lo:g}, {hi:g}]; expected [low, high]")
        return self


Strength = Annotated[Number, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class AugmentConfig(_Schema):
    # on the device, on raw pixels of any bit depth and plane count, a draw per image; 0/false/null: off
    flip: StrictBool = False            # random horizontal flip (p = 0.5)
    vflip: StrictBool = False           # random vertical flip (p = 0.5)
    rot90: StrictBool = False           # random multiple of 90 degrees (square images)
    crop_padding: NonNegInt = 0         # padded random crop (zeros), pixels per side
    random_resized_crop: RandomResizedCropConfig | None = None
    brightness: Strength = 0.0          # x * U(1 - b, 1 + b)
    contrast: Strength = 0.0            # (x - plane mean) * U(1 - c, 1 + c) + plane mean
    gamma: Annotated[Number, Field(ge=0.0, lt=1.0, allow_inf_nan=False)] = 0.0   # peak * (x / peak) ** U(1-g, 1+g)
    noise: Strength = 0.0               # Gaussian, std = noise x the plane's peak in the image
    random_erasing: Strength = 0.0      # probability of erasing a rectangle (timm's reprob) with noise
    mixup: Annotated[Number, Field(ge=0.0, allow_inf_nan=False)] = 0.0   # Beta(alpha, alpha) blend with another image
    cutmix: Annotated[Number, Field(ge=0.0, allow_inf_nan=False)] = 0.0  # Beta(alpha, alpha) pasted box


class EarlyStoppingConfig(_Schema):
    # the task's (cnnpipe.tasks.CHECKPOINT_METRICS): classification val_loss, val_accuracy, balanced_accuracy;
    metric: Literal["val_loss", "val_accuracy", "balanced_accuracy", "val_map", "val_macro_f1", "val_micro_f1",
                    "val_macro_auroc", "val_rmse", "val_mae", "val_r2"] = "val_loss"   # multilabel val_map, ...
    patience: PosInt = 5                # epochs without an improvement before the run stops
    min_delta: Annotated[Number, Field(ge=0.0, allow_inf_nan=False)] = 0.0   # smaller changes are no improvement


class TrainConfig(_Schema):
    epochs: PosInt = 10
    batch_size: PosInt = 64
    eval_batch_size: PosInt = 256
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16: bf16 compute, fp32 params and optimizer state
    checkpoint_every_steps: NonNegInt = 0   # 0 = only at epoch end
    keep_checkpoints: PosInt = 3
    max_nonfinite_steps: PosInt = 5     # that many non-finite losses in a row stop the run
    log_every_steps: PosInt = 20
    # train steps per call with the data on the devices; auto: ~0.2 s of steps, 1 on a CPU (dispatch.max_chunk)
    steps_per_dispatch: Literal["auto"] | PosInt = "auto"
    num_devices: NonNegInt = 0          # 0 = all local devices
    probe_feature_maps: StrictBool = False   # feature maps of a probe image to TensorBoard
    # imbalance: loss weight per class (auto: inverse frequency, mean 1), and/or class-balanced batches
    class_weights: Literal["auto"] | dict[str, Annotated[Number, Field(ge=0.0, allow_inf_nan=False)]] | None = None
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    label_smoothing: Annotated[Number, Field(ge=0.0, lt=1.0)] = 0.0
    # null: the task's (cross_entropy, bce, mse); multilabel: bce | asymmetric (timm's); regression: mse | mae | huber
    loss: Literal["cross_entropy", "bce", "asymmetric", "mse", "mae", "huber"] | None = None
    # multilabel: weight of each label's positives in bce (auto: negatives/positives on the training split)
    pos_weight: Literal["auto"] | dict[str, Annotated[Number, Field(gt=0.0, allow_inf_nan=False)]] | None = None
    # multilabel decision thresholds: f1 (fitted per label on the validation split), one number, or per label
    thresholds: Literal["f1"] | Annotated[Number, Field(gt=0.0, lt=1.0)] | dict[
        str, Annotated[Number, Field(gt=0.0, lt=1.0)]] = "f1"
    early_stopping: EarlyStoppingConfig | None = None   # stop when the metric stops improving; keep the best

    @field_validator("class_weights", "pos_weight", "thresholds", mode="before")
    @classmethod
    def _class_names(cls, value: Any) -> Any:
        # YAML reads a folder named 3 as the int 3: class names are strings
        return {str(k): v for k, v in value.items()} if isinstance(value, Mapping) else value


class OptimizerConfig(_Schema):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: Annotated[Number, Field(gt=0.0, allow_inf_nan=False)] = 0.001
    schedule: Literal["constant", "warmup_cosine"] = "constant"
    warmup_steps: NonNegInt = 0
    weight_decay: Annotated[Number, Field(ge=0.0)] = 0.0
    momentum: Annotated[Number, Field(ge=0.0, lt=1.0)] = 0.9   # sgd
    grad_clip: Annotated[Number, Field(gt=0.0)] | None = None   # global-norm clip


class PretrainedConfig(_Schema):
    # a timm/torchvision state dict (.safetensors, .pth), hf-hub:timm/<name>.<tag>, or a cnnpipe run directory
    weights: str | None = None
    freeze_epochs: NonNegInt = 0        # epochs training only the new head (backbone and its batch norm frozen)
    backbone_lr_scale: Annotated[Number, Field(gt=0.0, allow_inf_nan=False)] = 1.0   # x optimizer's learning rate


class Config(_Schema):
    seed: StrictInt = 0
    data: DataConfig = DataConfig()
    # a preset name, a backbone name (BACKBONES: resnet18, ...), or a list of layer mappings (defaults filled in)
    model: str | tuple[dict[str, Any], ...] = "simple_cnn"
    pretrained: PretrainedConfig = PretrainedConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    optimizer: OptimizerConfig = OptimizerConfig()

    @field_validator("model", mode="before")
    @classmethod
    def _check_model(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in PRESETS + BACKBONES:
                raise ConfigError(f"model: got {value!r}; expected a preset ({', '.join(PRESETS)}), a backbone "
                                  f"({', '.join(BACKBONES)}) or a list of layers{suggest(value, PRESETS + BACKBONES)}")
            return value
        return validate_layers(value)

    @model_validator(mode="after")
    def _check_pretrained(self) -> Config:
        pre = self.pretrained
        if pre.weights is None and (pre.freeze_epochs or pre.backbone_lr_scale != 1.0):
            raise ConfigError("pretrained.freeze_epochs and pretrained.backbone_lr_scale need pretrained.weights "
                              "(a weights file, hf-hub:timm/<name> or a cnnpipe run directory)")
        if pre.freeze_epochs and pre.freeze_epochs >= self.train.epochs:
            raise ConfigError(f"pretrained.freeze_epochs: got {pre.freeze_epochs}; it must be less than "
                              f"train.epochs ({self.train.epochs}), or the backbone never trains")
        return self


# ---------------------------------------------------------------- loading

def default_config_path() -> Path:
    """The packaged default config (so `cnnpipe train` works from any directory)."""
    return Path(str(resources.files("cnnpipe") / "configs" / "default.yaml"))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply `a.b=value` overrides, validate.

    Args:
      path: a YAML file; None reads the packaged default.
      overrides: ``"a.b=value"`` strings (``--set``); the value is parsed as YAML, so
        ``train.epochs=3`` is an int and ``model=lenet5`` a string.
    Returns:
      The frozen, validated `Config`. Keys the file leaves out take their defaults.
    Raises:
      ConfigError: unreadable YAML, an unknown key (with the nearest valid key), a
        wrong type or an out-of-range value (with the key, the value and what was expected).
      FileNotFoundError: `path` does not exist.
    """
    path = default_config_path() if path is None else Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    set_keys = parse_overrides(overrides, raw)
    # with no file of the user's, name what they gave: --set keys on the packaged defaults
    packaged = path.resolve() == default_config_path().resolve()
    return _validate(raw, source="the default config" if packaged else str(path), set_keys=set_keys)


def config_from_dict(raw: Mapping[str, Any], overrides: Sequence[str] = (),
                     *, source: str = "config") -> Config:
    """Validate a config given as a (nested) mapping, e.g. from a notebook or a test."""
    raw = _deep_copy(raw)
    set_keys = parse_overrides(overrides, raw)
    return _validate(raw, source=source, set_keys=set_keys)


def parse_overrides(overrides: Sequence[str], raw: dict[str, Any]) -> dict[str, str]:
    """Apply ``a.b=value`` overrides to `raw` in place; return {dotted key: override text}.

    A list (a layer list) is indexed by number: ``model.0.filters=8``.
    """
    applied: dict[str, str] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.epochs=3")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({' '.join(str(exc).split())})") from None
        parts = key.split(".")
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            here = ".".join(parts[: depth + 1])
            if isinstance(node, dict):
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                node = child
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth]) or 'config'} has no key "
                                  f"{part!r} (it is {short(node)}); cannot set {here}")
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {item!r}: {here} is {short(node)}, not a mapping; "
                                  f"cannot set {key}")
        last = parts[-1]
        if isinstance(node, list):
            if not (last.isdigit() and int(last) < len(node)):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:-1])} has {len(node)} entries; "
                                  f"{last!r} is not an index")
            node[int(last)] = value
        else:
            node[last] = value
        applied[key] = item
    return applied


def dump_config(cfg: Config) -> str:
    """YAML of the resolved config (every key, defaults included); `load_config` reads it back."""
    data = cfg.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------- error messages

def _validate(raw: dict[str, Any], *, source: str, set_keys: Mapping[str, str]) -> Config:
    try:
        return Config.model_validate(raw)
    except ConfigError as exc:   # raised by our own validators outside pydantic's wrapping
        raise ConfigError(f"{source}: {exc}") from None
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe(exc, Config, set_keys=set_keys)}") from None


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_deep_copy(v) for v in value]
    return value
