"""`Dataset`: what training needs to know about its data, whatever the source.

A `Dataset` holds two `Split`s (images (N, H, W, C) uint8/uint16, arrays or
memmaps, and int32 labels), the class names, bit depth, per-plane mean/std in
raw pixel units and plane names. `store_dataset` builds one from a
`cnnpipe preprocess` store; `Dataset.info()` is what a run saves as
`dataset.json`, read back by `read_dataset_info`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.tasks import Task


@dataclass(frozen=True)
class Split:
    """One split: images (N, H, W, C) uint8/uint16 (array or memmap), int32 labels (N,) and,
    for a store, each row's source file (relative to the folder it was made from)."""

    images: Any
    labels: np.ndarray
    sources: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)


class RowView:
    """Rows `rows` (sorted) of an (N, ...) array or memmap, indexed like an array without copying it:
    a cross-validation fold's training rows. `view[i]`, `view[a:b]`, `view[idx]` read only those rows."""

    def __init__(self, base: Any, rows: np.ndarray) -> None:
        self.base, self.rows = base, np.asarray(rows, np.int64)
        self.shape = (len(self.rows), *base.shape[1:])
        self.dtype = base.dtype
        self.ndim = len(self.shape)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.base[self.rows[key]]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.base[self.rows]
        return out if dtype is None else out.astype(dtype)


DEFAULT_SIZE = (32, 32)  # (H, W) of shapes and folder images when data.size is not set
MIN_STD = 1.0  # raw pixel units: one quantisation step at the data's bit depth


@dataclass(frozen=True)
class Dataset:
    """Everything training needs to know about the data, whatever its source."""

    classes: list[str]
    train: Split
    val: Split
    bit_depth: int
    mean: tuple[float, ...]  # per channel, raw pixel units, train split
    std: tuple[float, ...]   # the model divides by it: floored at MIN_STD (see __post_init__)
    description: str
    resize: str = "crop"  # how images of another size are fitted (predict uses the same)
    plane_names: tuple[str, ...] | None = None  # e.g. ("R", "G", "B"), ("S0", ..., "S4"); None: unnamed
    pages: str = "first"  # multi-page TIFF: "first" or "planes" (predict reads files the same way)
    task: Task = Task()   # classification (labels int32 (N,)), multilabel or regression (float32 (N, L))

    def __post_init__(self) -> None:
        # A channel that is constant over the training set (say, the blue plane of
        # red-only images) has std 0, and the model normalises by 1/std. Flooring at one
        # raw pixel unit maps such a channel to (x - mean), i.e. 0 on the training data,
        # instead of failing the run; the store's meta.json keeps the true statistics.
        # Float data has no quantisation step (NDVI's std is 0.3): only a zero std is replaced, by 1.
        floor = 0.0 if np.dtype(self.train.images.dtype).kind == "f" else MIN_STD
        object.__setattr__(self, "std", tuple(max(float(s), floor) or 1.0 for s in self.std))
        if tuple(self.task.names) != tuple(self.classes):   # the task names its outputs: the classes
            object.__setattr__(self, "task", Task(self.task.kind, tuple(self.classes), self.task.target_mean,
                                                  self.task.target_std))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.train.images.shape[1:3])  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[3])

    def info(self) -> dict[str, Any]:
        """What inference needs without the data (saved as `dataset.json` in a run)."""
        return {"classes": list(self.classes), "size": list(self.size), "channels": self.channels,
                "bit_depth": self.bit_depth, "dtype": str(np.dtype(self.train.images.dtype)),
                "mean": list(self.mean), "std": list(self.std),
                "num_train": len(self.train), "num_val": len(self.val),
                "resize": self.resize, "description": self.description,
                "planes": list(self.plane_names) if self.plane_names else None, "pages": self.pages,
                **({} if self.task.is_classification else {"task": self.task.record()})}



def store_dataset(path: str | os.PathLike, no_val_hint: str = "preprocess it with a validation fraction > 0",
                  fold: int | None = None) -> Dataset:
    """A `cnnpipe preprocess` store: train split + its "val" (or else "test") split, memory-mapped.

    `fold` (a store made with --folds K): fold `fold` of the train split validates and the
    other folds train, normalised with their own statistics (meta.json "folds").

    Raises ValueError, naming the store and each split's size, when a split is empty;
    `no_val_hint` says what to do about an empty validation split; naming data.fold when a
    fold is asked of a store without folds, or none of a store with them, or it is out of range.
    """
    from cnnpipe.datasets.store import load_store

    store = load_store(path)
    k = store.num_folds
    if fold is not None or k is not None:
        return _fold_dataset(store, fold)
    # counts come from meta.json; Store.labels checks each loaded array against them
    val_name = next((s for s in ("val", "test") if s in store.splits and store.count(s)), None)
    sizes = ", ".join(f"{s} {store.count(s)}" for s in store.splits) or "none"
    if "train" not in store.splits or not store.count("train"):
        raise ValueError(f"{store.path}: store has no train images (images per split: {sizes})")
    if val_name is None:
        raise ValueError(f"{store.path}: no validation images (images per split: {sizes}); {no_val_hint}")
    train = Split(store.images("train"), store.labels("train"))
    val = Split(store.images(val_name), store.labels(val_name), tuple(store.sources(val_name)) or None)
    return _dataset(store, train, val, tuple(store.mean), tuple(store.std), f"store {store.path}")


def _dataset(store: Any, train: Split, val: Split, mean: tuple, std: tuple, description: str) -> Dataset:
    names = store.meta.get("channel_names")
    # regression targets are standardised with the training rows' statistics (a fold's own)
    return Dataset(store.classes, train, val, store.bit_depth, mean, std, description,
                   str(store.meta.get("resize", "crop")),
                   tuple(str(n) for n in names) if isinstance(names, list) and len(names) == store.channels else None,
                   str(store.meta.get("pages", "first")), store.task.with_target_stats(train.labels))


def _fold_dataset(store: Any, fold: int | None) -> Dataset:
    """Fold `fold` of a store's train split as validation, the other folds as training."""
    k = store.num_folds
    if k is None:
        raise ValueError(f"data.fold: {store.path} has no cross-validation folds; preprocess it with "
                         "--folds K (data.folds for a folder), or leave data.fold out")
    if fold is None:
        raise ValueError(f"data.fold: {store.path} holds {k} cross-validation folds; set data.fold "
                         f"(0-{k - 1}) to pick the validation fold, or run them all with `cnnpipe cv`")
    if not 0 <= fold < k:
        raise ValueError(f"data.fold: got {fold}; {store.path} holds folds 0-{k - 1}")
    folds = store.folds("train")
    held = np.flatnonzero(folds == fold)
    kept = np.flatnonzero(folds != fold)
    images, labels = store.images("train"), store.labels("train")
    sources = store.sources("train")
    train = Split(RowView(images, kept), labels[kept])
    val = Split(RowView(images, held), labels[held], tuple(sources[i] for i in held) if sources else None)
    stats = store.meta["folds"]
    return _dataset(store, train, val, tuple(stats["train_mean"][fold]), tuple(stats["train_std"][fold]),
                    f"store {store.path} fold {fold} of {k}")


def read_dataset_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The `dataset.json` a run saved (classes, size, channels, bit depth, mean/std).

    Raises ValueError naming the file when it cannot be read, is not JSON, or a key is missing
    or of the wrong type.
    """
    path = Path(run_dir) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {run_dir} a cnnpipe run directory?")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())
        raise ValueError(f"{path}: unreadable or corrupt run file ({why})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: corrupt run file (a JSON object expected, got {type(info).__name__})")
    missing = [k for k in ("classes", "size", "channels", "bit_depth", "mean", "std") if k not in info]
    if missing:
        raise ValueError(f"{path}: corrupt run file (key {missing[0]!r} is missing)")

    # checked here so a damaged file is named, not met later as a bare TypeError inside the model
    def count(v: Any) -> bool:
        return type(v) is int and v > 0

    def numbers(v: Any) -> bool:
        return (isinstance(v, list) and len(v) == info["channels"]
                and all(type(x) in (int, float) for x in v))

    checks = (
        ("classes", lambda v: isinstance(v, list) and v and all(isinstance(c, str) for c in v), "class names"),
        ("size", lambda v: isinstance(v, list) and len(v) == 2 and all(map(count, v)), "[height, width]"),
        ("channels", count, "a positive integer"),
        ("bit_depth", lambda v: type(v) is int and v in (8, 16, 32), "8, 16 or 32"),
        ("dtype", lambda v: v in ("uint8", "uint16", "int16", "float32"), "uint8, uint16, int16 or float32"),
        ("mean", numbers, "one number per channel"),
        ("std", numbers, "one number per channel"),
    )
    for key, ok, expected in checks:
        if key in info and not ok(info[key]):
            raise ValueError(f"{path}: corrupt run file ({key!r} is {repr(info[key])[:60]}; expected {expected})")
    try:   # a multi-label or regression run's task, when written
        task = Task.from_meta(info)
        if task.kind == "regression" and (task.target_mean is None or len(task.target_mean) != len(info["classes"])):
            raise ValueError("target_mean/target_std missing or not one per target")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: corrupt run file ('task': {' '.join(str(exc).split())[:80]})") from None
    norm = info.get("normalization")   # the model's own statistics (pretrained runs), when written
    clip = norm.get("clip") if isinstance(norm, dict) else None
    if norm is not None and not (isinstance(norm, dict) and numbers(norm.get("mean")) and numbers(norm.get("std"))
                                 and (clip is None or (isinstance(clip, list) and len(clip) == 2
                                                       and all(map(numbers, clip))))):
        raise ValueError(f"{path}: corrupt run file ('normalization' is {repr(norm)[:60]}; "
                         "expected {'mean': [...], 'std': [...]} with one number per channel)")
    return info


__all__ = ["RowView", "Split", "Dataset", "DEFAULT_SIZE", "MIN_STD", "store_dataset", "read_dataset_info"]
