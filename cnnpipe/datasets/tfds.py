"""TensorFlow Datasets -> a store cache, streamed once through the one image path.

`tfds_dataset` reads a tfds image classification dataset with `tfds.data_source`
(random access, no TensorFlow) one record at a time, prepares every image with
`transform.prepare_planes` (the chain preprocess and predict use, so sizes vary
freely and gray stays gray or becomes RGB as asked), and writes the rows straight
into a store (`store.StoreWriter`: temp dir + rename). Nothing holds a split in
memory, so peak memory does not grow with the dataset; training then memory-maps
the store like any other. The cache is keyed like the folder cache: the dataset's
full name (version included), data dir, splits and their lengths, the settings and
the image path's version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.datasets.dataset import Dataset, store_dataset
from cnnpipe.datasets.store import exact_mean_std
from cnnpipe.files import default_cache_dir
from cnnpipe.images.decode import Planes
from cnnpipe.images.transform import IMAGE_PATH_VERSION, ImageSpec, prepare_planes

__all__ = ["tfds_dataset", "tfds_cache_dir", "PLANE_NAMES", "plane_names"]

# plane names of an (H, W, C) record by C: how `transform` knows gray from colour and alpha
PLANE_NAMES = {1: ("L",), 2: ("L", "A"), 3: ("R", "G", "B"), 4: ("R", "G", "B", "A")}


def plane_names(count: int) -> tuple[str, ...]:
    """Names of a record's planes: gray/colour/alpha up to 4, else "S0".."S<count-1>" (spectral bands)."""
    return PLANE_NAMES.get(count) or tuple(f"S{i}" for i in range(count))
_SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class _Source:
    """The opened dataset: one data source per store split, its features and keys."""

    name: str
    splits: dict[str, tuple[str, Any]]   # store split -> (tfds split, data source)
    info: Any
    image_key: str
    label_key: str

    @property
    def image_feature(self) -> Any:
        return self.info.features[self.image_key]


def _open(name: str, split_train: str, split_val: str) -> _Source:
    import tensorflow_datasets as tfds

    splits = {}
    for store_split, split in zip(_SPLITS, (split_train, split_val)):
        try:
            src = tfds.data_source(name, split=split)
        except Exception as exc:  # tfds raises many types; name the dataset and split
            raise ValueError(f"data.name: cannot open tfds dataset {name!r} split {split!r}: "
                             f"{' '.join(str(exc).split())}") from None
        if len(src) == 0:
            raise ValueError(f"tfds dataset {name!r} split {split!r} is empty")
        splits[store_split] = (split, src)
    info = splits["train"][1].dataset_info
    image_key, label_key = info.supervised_keys or ("image", "label")
    if image_key not in info.features or label_key not in info.features:
        raise ValueError(f"data.name: tfds dataset {name!r} is not an image classification dataset "
                         f"(features: {', '.join(info.features)})")
    return _Source(name, splits, info, image_key, label_key)


def _classes(src: _Source) -> list[str]:
    names = getattr(src.info.features[src.label_key], "names", None)
    if names:
        return [str(n) for n in names]
    num = getattr(src.info.features[src.label_key], "num_classes", None)
    if not num:
        raise ValueError(f"data.name: tfds dataset {src.name!r}: label {src.label_key!r} has no class count")
    return [str(i) for i in range(int(num))]


def _spec(src: _Source, size: tuple[int, int] | None, resize: str, channels: str | None) -> ImageSpec:
    """The store's spec: `size` or the dataset's own fixed size; `channels` or the dataset's own (1: gray)."""
    shape = tuple(src.image_feature.shape)
    dtype = np.dtype(src.image_feature.np_dtype)
    if dtype not in (np.uint8, np.uint16):
        raise ValueError(f"data.name: tfds dataset {src.name!r} has {dtype} images; cnnpipe reads uint8 or uint16")
    if size is None:
        if None in shape[:2]:
            raise ValueError(f"data.size: tfds dataset {src.name!r} has images of varying sizes {shape}; "
                             "set data.size, e.g. --set data.size=[64,64]")
        size = (int(shape[0]), int(shape[1]))
    if channels is None:
        channels = "gray" if shape[-1] in (1, 2) else "rgb" if shape[-1] in (3, 4) else "native"
    planes = int(shape[-1]) if channels == "native" else None
    return ImageSpec((int(size[0]), int(size[1])), resize, channels, 16 if dtype == np.uint16 else 8, planes)


def tfds_cache_dir(src: _Source, spec: ImageSpec, cache_dir: str | os.PathLike | None) -> Path:
    """Where the store for `src` prepared to `spec` lives: ``<cache>/tfds/<name>-<key>``."""
    key = {"dataset": src.info.full_name, "data_dir": str(src.info.data_dir),
           "splits": {k: [split, len(s)] for k, (split, s) in src.splits.items()},
           "spec": dataclasses.asdict(spec), "image_path": IMAGE_PATH_VERSION, "format": 1}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / "tfds" / f"{src.name.replace('/', '_').replace(':', '_')}-{digest}"


def tfds_dataset(name: str, *, split_train: str = "train", split_val: str = "test",
                 size: tuple[int, int] | None = None, resize: str = "crop", channels: str | None = None,
                 cache_dir: str | os.PathLike | None = None) -> Dataset:
    """A tfds image classification dataset, written once into a store cache and memory-mapped.

    Args:
      name: a tfds name, e.g. "mnist", "cifar10", "tf_flowers" (already prepared in the tfds data dir).
      split_train, split_val: tfds split strings; slices such as "train[:90%]" work.
      size: (H, W) every image is resized to (as folders, by `resize`); None keeps the
        dataset's own fixed size and is an error for datasets of varying sizes.
      channels: "rgb" or "gray"; None keeps gray datasets gray and colour ones RGB.
      cache_dir: the cache root (default `cnnpipe.files.default_cache_dir()`).
    Raises:
      ValueError: the dataset cannot be opened, is empty, is not image classification,
        or has varying sizes and no `size`. Records that cannot be prepared are
        skipped and listed in the store's report.json.
    """
    src = _open(name, split_train, split_val)
    spec = _spec(src, size, resize, channels)
    out = tfds_cache_dir(src, spec, cache_dir)
    if not (out / "meta.json").is_file():
        try:
            _write(src, spec, out)
        except ValueError:
            if not (out / "meta.json").is_file():  # not merely another process finishing first
                raise
    ds = store_dataset(out)
    return dataclasses.replace(ds, description=f"tfds {name} ({split_train}/{split_val}, cache {out})",
                               resize=resize)


def _planes(image: Any, source: str) -> Planes:
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] < 1:
        raise ValueError(f"{source}: image of shape {img.shape}; expected (H, W, planes)")
    return Planes(img.transpose(2, 0, 1), 16 if img.dtype == np.uint16 else 8, plane_names(img.shape[-1]), source)


def _mean_std(hist: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-plane mean and std from (planes, levels) value histograms, exactly (`store.exact_mean_std`).

    The sums are Python integers: 16-bit squares over billions of pixels overflow int64.
    """
    sums, sumsq = [], []
    for row in hist:
        levels = np.flatnonzero(row)
        sums.append(sum(int(v) * int(c) for v, c in zip(levels, row[levels])))
        sumsq.append(sum(int(v) * int(v) * int(c) for v, c in zip(levels, row[levels])))
    return exact_mean_std(sums, sumsq, int(hist[0].sum()))


def _write(src: _Source, spec: ImageSpec, out: Path) -> None:
    """Stream every record through `prepare_planes` into a new store at `out` (complete or absent)."""
    from tqdm import tqdm

    from cnnpipe.datasets.store import StoreWriter, build_meta

    classes, dtype = _classes(src), "uint16" if spec.bit_depth == 16 else "uint8"
    # per-plane histograms of the train split: exact integer statistics, and a bincount
    # is ~10x faster than a float64 sum over a (H*W, C) array per record
    hist = np.zeros((spec.num_planes, 1 << spec.bit_depth), np.int64)
    skipped: list[dict[str, str]] = []
    counts: dict[str, dict[str, Any]] = {}
    per_class = {k: np.zeros(len(classes), np.int64) for k in src.splits}
    total = sum(len(s) for _, s in src.splits.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    with StoreWriter(out) as writer, tqdm(total=total, unit="img", desc=f"caching {src.name}", leave=False,
                                          disable=not sys.stderr.isatty()) as bar:
        for store_split, (split, records) in src.splits.items():
            writer.create_split(store_split, len(records), spec.size, spec.num_planes, dtype)
            for i in range(len(records)):
                source = f"tfds:{src.name}/{split}[{i}]"
                try:
                    rec = records[i]
                    label = int(rec[src.label_key])
                    if not 0 <= label < len(classes):
                        raise ValueError(f"{source}: label {label} outside the {len(classes)} classes")
                    pixels = prepare_planes(_planes(rec[src.image_key], source), spec, source).pixels
                except Exception as exc:  # one bad record never stops the job: skipped and reported
                    skipped.append({"source": source, "reason": " ".join(str(exc).split())})
                    continue
                finally:
                    bar.update()
                writer.append(store_split, pixels, label, source)
                per_class[store_split][label] += 1
                if store_split == "train":
                    for c in range(spec.num_planes):
                        hist[c] += np.bincount(pixels[..., c].ravel(), minlength=hist.shape[1])
            counts[store_split] = {"total": writer.count(store_split), "tfds_split": split,
                                   "per_class": dict(zip(classes, per_class[store_split].tolist()))}
        empty = [k for k in counts if not counts[k]["total"]]
        if empty:
            raise ValueError(f"tfds dataset {src.name!r}: no image could be prepared for {empty[0]} "
                             f"({len(skipped)} skipped, first: {skipped[0]['reason'] if skipped else '-'})")
        mean, std = _mean_std(hist)
        names = {"rgb": PLANE_NAMES[3], "gray": ("L",)}.get(spec.channels) or plane_names(spec.num_planes)
        meta = build_meta(classes=classes, dtype=dtype, size=spec.size, channel_names=names,
                          splits=list(counts), counts=counts, mean=mean, std=std,
                          resize=spec.resize, source=f"tfds:{src.info.full_name}")
        writer.commit(meta, {"skipped": skipped, "counts": {k: v["total"] for k, v in counts.items()}})
