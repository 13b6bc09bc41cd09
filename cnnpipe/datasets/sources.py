"""Training data sources (`data.source`) -> one `Dataset`.

`shapes` (built-in synthetic images, no files needed), `store` (the output of
`cnnpipe preprocess`, memory-mapped), `folder` (a raw image folder,
preprocessed once into a cache keyed by its contents and the settings) and
`tfds` (a TensorFlow Datasets name read with `tfds.data_source`, no TensorFlow,
streamed once into a store cache: `cnnpipe.datasets.tfds`). Pixels stay
integers (uint8/uint16) on the host; the model normalises them on the device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cnnpipe.datasets.dataset import DEFAULT_SIZE, Dataset, store_dataset
from cnnpipe.datasets.shapes import shapes_dataset
from cnnpipe.files import default_cache_dir


def load_dataset(data: Any, seed: int = 0) -> Dataset:
    """Load the dataset described by a `DataConfig` (`cfg.data`).

    `seed` is the run seed; it only affects the synthetic `shapes` data.
    """
    source = data.source
    size = tuple(getattr(data, "size", None) or DEFAULT_SIZE)
    if source == "shapes":
        h, w = size
        return shapes_dataset(data.num_train, data.num_val, size=(h, w),
                              bit_depth=data.bit_depth, seed=seed)
    if source == "store":
        if not data.path:
            raise ValueError("data.path: required when data.source is 'store' (a `cnnpipe preprocess` output dir)")
        return store_dataset(data.path, fold=data.fold)
    if source == "folder":
        if not data.path:
            raise ValueError("data.path: required when data.source is 'folder' (a folder of class sub-folders)")
        return folder_dataset(data.path, size=size, resize=data.resize,
                              channels=data.channels or "rgb", val_fraction=data.val_fraction,
                              cache_dir=data.cache_dir, pages=data.pages, labels=_label_table(data),
                              split=data.split, folds=data.folds, fold=data.fold, dtype=data.dtype,
                              file_timeout=data.file_timeout, engine=data.engine or "local",
                              scheduler=data.scheduler, scheduler_file=data.scheduler_file)
    if source == "tfds":
        if not data.name:
            raise ValueError("data.name: required when data.source is 'tfds' (e.g. mnist, cifar10)")
        from cnnpipe.datasets.tfds import tfds_dataset

        return tfds_dataset(data.name, split_train=data.split_train, split_val=data.split_val,
                            size=tuple(data.size) if data.size else None, resize=data.resize,
                            channels=data.channels, cache_dir=data.cache_dir)
    raise ValueError(f"data.source: unknown source {source!r}; expected one of shapes, store, folder, tfds")


def _label_table(data: Any) -> Any:
    """`data.labels` and its columns as a `LabelTable`, or None (class folders)."""
    from cnnpipe.datasets.table_scan import LabelTable
    from cnnpipe.datasets.tables import find_metadata

    table = data.labels
    if not table:
        keys = [k for k in ("path_col", "label_col", "split_col", "group_col", "fold_col", "label_delim", "target_col",
                            "task") if getattr(data, k)]
        if not keys:
            return None
        table = find_metadata(Path(data.path)) if data.path and Path(data.path).is_dir() else None
        if table is None:   # the columns of the folder's Hugging Face metadata, or of nothing
            raise ValueError(f"data.{keys[0]}: only used with data.labels (a label table) or a Hugging Face "
                             "metadata.csv|jsonl|parquet in data.path")
    return LabelTable(str(table), data.path_col, data.label_col, data.split_col, data.group_col, data.fold_col,
                      from_config=True, label_delim=data.label_delim, target_col=data.target_col, task=data.task)


def folder_cache_key(folder: str | os.PathLike, settings: dict[str, Any], table: bool = False) -> tuple[str, int]:
    """(hash of the folder's listing (relative path, size, mtime) and the settings, file count).

    The listing is `cnnpipe preprocess`'s own scan, so the key covers exactly the
    files it would read: symlinked class folders are followed, and broken links,
    hidden files and loops are left out as preprocess leaves them out. With a label
    `table`, every file under the folder is listed (the table's bytes are in `settings`).
    """
    from cnnpipe.datasets.folders import FolderScan, scan_folder, walk_files
    from cnnpipe.images.transform import IMAGE_PATH_VERSION

    # the image path's version is part of the key: pixels from an older chain are never reused
    h = hashlib.sha256(json.dumps({**settings, "image_path": IMAGE_PATH_VERSION}, sort_keys=True).encode())
    if table:
        st = os.stat(folder)
        listing = [rel for _, rel in walk_files(Path(folder), "", FolderScan("table"), {(st.st_dev, st.st_ino)},
                                                ((st.st_dev, st.st_ino),))]
    else:
        listing = [c.rel for c in scan_folder(Path(folder)).candidates]
    for rel in listing:
        try:
            st = os.stat(os.path.join(folder, rel))
        except OSError:  # gone since the scan: preprocess will report it
            continue
        h.update(os.fsencode(rel) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())  # name bytes: any name
    return h.hexdigest()[:20], len(listing)


def _table_settings(root: Path, labels: Any) -> tuple[Any, dict[str, Any]]:
    """The label table to use (data.labels, or the folder's Hugging Face metadata file) and its cache-key part."""
    from cnnpipe.datasets.table_scan import LabelTable
    from cnnpipe.datasets.tables import find_metadata

    if labels is None and (found := find_metadata(root)) is not None:
        labels = LabelTable(str(found))
    if labels is None:
        return None, {}
    try:
        digest = hashlib.sha256(Path(labels.path).read_bytes()).hexdigest()
    except OSError as exc:
        raise FileNotFoundError(exc.errno, f"data.labels: cannot read the label table ({exc.strerror})",
                                labels.path) from None
    return labels, {"labels": {**dataclasses.asdict(labels), "path": digest}}


def folder_dataset(folder: str | os.PathLike, *, size: tuple[int, int], resize: str = "crop",
                   channels: str = "rgb", val_fraction: float = 0.1,
                   cache_dir: str | os.PathLike | None = None, pages: str = "first", labels: Any = None,
                   split: str | None = None, folds: int | None = None, fold: int | None = None,
                   dtype: str | None = None, file_timeout: float = 300.0, engine: str = "local",
                   scheduler: str | None = None, scheduler_file: str | None = None) -> Dataset:
    """A raw image folder, preprocessed once into `cache_dir` and reused while unchanged.

    `labels` (a `LabelTable`), `split`, `folds`, `dtype`, `file_timeout`, `engine`, `scheduler` and
    `scheduler_file` are `cnnpipe.datasets.preprocess.preprocess`'s (the timeout and the engine are
    not part of the cache key: every engine builds the same store);
    `fold` picks the validation fold of a cache made with folds (`store_dataset`).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path: image folder not found: {root}")
    settings = {"size": [int(size[0]), int(size[1])], "resize": resize, "channels": channels,
                "val_fraction": float(val_fraction), "seed": 0, "format": 2}  # 2: stratified splits
    if pages != "first":  # only then part of the key, so existing caches stay valid
        settings["pages"] = pages
    table, key_part = _table_settings(root, labels)
    settings.update(key_part)
    if split is not None or folds is not None:
        settings.update(split=split, folds=folds)
    if dtype is not None:
        settings["dtype"] = dtype
    key, num_files = folder_cache_key(root, settings, table=table is not None)
    out = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    out = out / "folders" / f"{root.resolve().name}-{key}"
    if not (out / "meta.json").is_file():
        from cnnpipe.datasets.preprocess import preprocess

        out.parent.mkdir(parents=True, exist_ok=True)
        # a process pool only pays off past a few hundred files
        try:
            preprocess(root, out, size=tuple(settings["size"]), resize=resize, val_fraction=val_fraction,
                       seed=0, channels=channels, overwrite=False,
                       workers=1 if num_files < 256 and engine == "local" else None, pages=pages, labels=table,
                       split=split, folds=folds, dtype=dtype, file_timeout=file_timeout, engine=engine,
                       scheduler=scheduler, scheduler_file=scheduler_file)
        except ValueError:
            if not (out / "meta.json").is_file():  # not merely another process finishing first
                raise
    hint = (f"data.val_fraction is {val_fraction:g} and no image of {root} is in the validation split: "
            "raise it or add images")
    which = f", validating on fold {fold}" if fold is not None else ""
    from cnnpipe.datasets.report import failed_files
    from cnnpipe.datasets.store import load_store

    failed = failed_files(load_store(out).report)   # said in the run's log: a folder's rows can fail silently
    which += f"; {failed} input files or table rows failed: see {out / 'report.json'}" if failed else ""
    try:
        ds = store_dataset(out, hint, fold=fold)
    except ValueError as exc:   # a fold error names the folder the user gave, not its cache
        if not str(exc).startswith("data.fold:"):
            raise
        raise ValueError(str(exc).replace(str(out), f"{root} (data.folds: {folds})")) from None
    return dataclasses.replace(ds, description=f"folder {root}{which} (cache {out})", resize=resize)


__all__ = ["load_dataset", "folder_cache_key", "folder_dataset"]
