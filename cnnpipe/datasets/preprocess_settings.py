"""`cnnpipe preprocess` settings: the target size, how images are fitted, how files are split; checked
before any work, each error naming the setting."""

from __future__ import annotations

import errno
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.datasets.splits import SPLIT_METHODS
from cnnpipe.datasets.table_scan import LabelTable
from cnnpipe.images.decode import DEFAULT_MAX_PIXELS
from cnnpipe.images.tiff import PAGE_MODES
from cnnpipe.images.transform import RESIZE_MODES, ImageSpec

__all__ = ["ENGINES", "NEEDS_DASK", "PreprocessError", "Settings", "parse_size", "check_paths"]

ENGINES = ("local", "dask")   # where files are prepared (`cnnpipe.datasets.engines`)
NEEDS_DASK = "engine 'dask' needs Dask: pip install 'cnnpipe[dask]' (or use --engine local)"


class PreprocessError(ValueError):
    """Bad input to `preprocess` (missing folder, no images, one class, bad setting)."""


# ---------------------------------------------------------------- settings

def parse_size(size: int | str | Sequence[int]) -> tuple[int, int]:
    """`32`, `"32"`, `"32x48"` or `(32, 48)` -> (H, W), both positive."""
    try:
        if isinstance(size, str):
            parts = size.lower().replace(" ", "").split("x")
            if len(parts) not in (1, 2):
                raise ValueError
            hw = tuple(int(p) for p in parts)
        elif isinstance(size, (int, np.integer)):
            hw = (int(size),)
        else:
            hw = tuple(int(s) for s in size)
        if len(hw) == 1:
            hw = hw * 2
        if len(hw) != 2 or min(hw) <= 0:
            raise ValueError
    except (TypeError, ValueError):
        raise PreprocessError(f"size: expected H or HxW with positive integers (e.g. 64 or 64x48), "
                              f"got {size!r}") from None
    if hw[0] * hw[1] > DEFAULT_MAX_PIXELS:  # no decoded file may be that large either: refused before any work
        raise PreprocessError(f"size: {hw[0]}x{hw[1]} is {hw[0] * hw[1]:,} pixels per image, over the "
                              f"{DEFAULT_MAX_PIXELS:,}-pixel limit of a decoded image")
    return hw  # type: ignore[return-value]


@dataclass(frozen=True)
class Settings:
    """How a folder becomes a store (see `preprocess` for each field); validated by `check`."""

    size: tuple[int, int]
    resize: str = "crop"
    channels: str = "rgb"
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    seed: int = 0
    workers: int = 1
    overwrite: bool = False
    progress: bool = False
    pages: str = "first"
    labels: LabelTable | None = None  # a label table (None: class folders)
    split: str | None = None  # SPLIT_METHODS; None: "group" with a group column, else "stratified"
    folds: int | None = None  # k-fold cross-validation: every non-test file in one of `folds` folds
    dtype: str | None = None  # "float32": every file's values as they are in a float32 store; None: from the files
    file_timeout: float = 300.0  # seconds a worker may spend on one file (0: none); see preprocess
    engine: str = "local"  # "local" or "dask" (cnnpipe.datasets.engines)
    scheduler: str | None = None  # the Dask scheduler's address (engine "dask"; None: a local cluster)
    scheduler_file: str | None = None  # or the file `dask scheduler --scheduler-file` wrote

    def check(self) -> None:
        """PreprocessError naming the first bad setting."""
        for name, v in (("val_fraction", self.val_fraction), ("test_fraction", self.test_fraction)):
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise PreprocessError(f"{name}: expected a number in [0, 1), got {v!r}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise PreprocessError(f"val_fraction + test_fraction must be below 1 (no train images left), "
                                  f"got {self.val_fraction} + {self.test_fraction}")
        if self.resize not in RESIZE_MODES:
            raise PreprocessError(f"resize: expected one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.channels not in ("rgb", "gray", "native"):
            raise PreprocessError(f"channels: expected 'rgb', 'gray' or 'native', got {self.channels!r}")
        if self.pages not in PAGE_MODES:
            raise PreprocessError(f"pages: expected 'first' or 'planes', got {self.pages!r}")
        if self.split is not None and self.split not in SPLIT_METHODS:
            raise PreprocessError(f"split: expected one of {', '.join(SPLIT_METHODS)}, got {self.split!r}")
        if self.folds is not None and not (type(self.folds) is int and 2 <= self.folds <= 100):
            raise PreprocessError(f"folds: expected an integer from 2 to 100, got {self.folds!r}")
        t = self.file_timeout
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < 1e7):
            raise PreprocessError(f"file_timeout: expected seconds from 0 (no deadline) up to 1e7, got {t!r}")
        if self.engine not in ENGINES:
            raise PreprocessError(f"engine: expected one of {', '.join(map(repr, ENGINES))}, got {self.engine!r}")
        if self.engine != "dask" and (self.scheduler is not None or self.scheduler_file is not None):
            raise PreprocessError("scheduler: a Dask scheduler is only used with the dask engine (--engine dask; "
                                  "config data.engine: dask)")
        for name in ("scheduler", "scheduler_file"):
            if getattr(self, name) is not None and not (isinstance(getattr(self, name), str) and getattr(self, name)):
                raise PreprocessError(f"{name}: expected an address or a path, got {getattr(self, name)!r}")
        if self.scheduler and self.scheduler_file:
            raise PreprocessError("scheduler: give the scheduler's address or its scheduler file, not both")
        if self.engine == "dask":   # before any file is read
            if importlib.util.find_spec("distributed") is None:
                raise PreprocessError(NEEDS_DASK)
            if self.scheduler_file is not None and not os.path.isfile(self.scheduler_file):
                raise PreprocessError(f"scheduler_file: {self.scheduler_file}: no such file (written by `dask "
                                      "scheduler --scheduler-file PATH`)")
        if self.dtype not in (None, "float32"):
            raise PreprocessError(f"dtype: expected 'float32' (or leave it out: the files decide), got {self.dtype!r}")
        if self.split == "group" and (self.labels is None or self.labels.group_col is None):
            raise PreprocessError("split: 'group' needs a label table with a group column (--labels TABLE "
                                  "--group-col NAME)")

    def method(self) -> str:
        """The split method: the one asked for, else "group" with a group column, else "stratified"."""
        if self.split is not None:
            return self.split
        return "group" if self.labels is not None and self.labels.group_col is not None else "stratified"

    def spec(self, dtype: str, planes: int | None = None) -> ImageSpec:
        """The image spec every stored row matches (`planes`: the count of a native store)."""
        bits = {"uint8": 8, "uint16": 16, "int16": 16}.get(dtype, 32)
        return ImageSpec(self.size, self.resize, self.channels, bits, planes, pages=self.pages,
                         dtype=None if dtype in ("uint8", "uint16") else dtype)

    def split_config(self) -> dict[str, Any]:
        return {"seed": self.seed, "val_fraction": self.val_fraction, "test_fraction": self.test_fraction,
                "pages": self.pages}


def check_paths(src: Path, out: Path) -> None:
    if not src.exists():
        raise PreprocessError(f"SRC: folder not found: {src}")
    if not src.is_dir():
        raise PreprocessError(f"SRC: not a folder: {src}")
    rs, ro = src.resolve(), out.resolve()
    if ro == rs or rs in ro.parents or ro in rs.parents:
        raise PreprocessError(f"OUT ({out}) must not be SRC ({src}), inside it, or contain it")
    # fail before any work if OUT cannot be made: its nearest existing ancestor must be a writable folder
    ancestor = out.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder, so OUT cannot be created under it", str(ancestor))
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "Permission denied (cannot create OUT here)", str(ancestor))
