"""Training data: sources -> one `Dataset` -> fixed-shape, deterministic host batches.

Sources (`data.source`): `shapes` (built-in synthetic images, no files needed),
`store` (the output of `cnnpipe preprocess`, memory-mapped), `folder` (a raw
image folder, preprocessed once into a cache keyed by its contents and the
settings) and `tfds` (a TensorFlow Datasets name read with `tfds.data_source`,
no TensorFlow, streamed once into a store cache: `cnnpipe.tfds_source`). Pixels stay integers (uint8/uint16) on the host; the model
normalises them on the device.

Batch order is a pure function of (seed, epoch), so a resumed run continues
from (epoch, step in epoch) with exactly the order an uninterrupted run sees.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
_SPLIT_SEEDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class Split:
    """One split: images (N, H, W, C) uint8/uint16 (array or memmap), int32 labels (N,) and,
    for a store, each row's source file (relative to the folder it was made from)."""

    images: Any
    labels: np.ndarray
    sources: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)


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

    def __post_init__(self) -> None:
        # A channel that is constant over the training set (say, the blue plane of
        # red-only images) has std 0, and the model normalises by 1/std. Flooring at one
        # raw pixel unit maps such a channel to (x - mean), i.e. 0 on the training data,
        # instead of failing the run; the store's meta.json keeps the true statistics.
        object.__setattr__(self, "std", tuple(max(float(s), MIN_STD) for s in self.std))

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
                "planes": list(self.plane_names) if self.plane_names else None}


# ---------------------------------------------------------------- sources

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
        return store_dataset(data.path)
    if source == "folder":
        if not data.path:
            raise ValueError("data.path: required when data.source is 'folder' (a folder of class sub-folders)")
        return folder_dataset(data.path, size=size, resize=data.resize,
                              channels=data.channels or "rgb", val_fraction=data.val_fraction,
                              cache_dir=data.cache_dir)
    if source == "tfds":
        if not data.name:
            raise ValueError("data.name: required when data.source is 'tfds' (e.g. mnist, cifar10)")
        from cnnpipe.tfds_source import tfds_dataset

        return tfds_dataset(data.name, split_train=data.split_train, split_val=data.split_val,
                            size=tuple(data.size) if data.size else None, resize=data.resize,
                            channels=data.channels, cache_dir=data.cache_dir)
    raise ValueError(f"data.source: unknown source {source!r}; expected one of shapes, store, folder, tfds")


def _mean_std(images: Any, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in raw units, float64, in chunks (memmaps stay paged)."""
    n, c = len(images), images.shape[-1]
    s = np.zeros(c, np.float64)
    ss = np.zeros(c, np.float64)
    count = 0
    for i in range(0, n, chunk):
        x = np.asarray(images[i:i + chunk], dtype=np.float64).reshape(-1, c)
        s += x.sum(0)
        ss += np.square(x).sum(0)
        count += x.shape[0]
    mean = s / max(count, 1)
    std = np.sqrt(np.maximum(ss / max(count, 1) - mean ** 2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(v) for v in std)


def _shape_masks(label: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Boolean (N, H, W) masks; dx, dy are pixel offsets from the centre in units of the radius.

    Only +, *, sqrt, abs and comparisons: all exactly rounded in IEEE arithmetic,
    so the images are bit-identical on every machine.
    """
    dx, dy = np.broadcast_arrays(dx, dy)
    ax, ay = np.abs(dx), np.abs(dy)
    r2 = dx * dx + dy * dy
    mask = np.zeros(dx.shape, bool)
    k = label[:, None, None]
    mask |= (k == 0) & (r2 <= 1.0)
    mask |= (k == 1) & (np.maximum(ax, ay) <= 0.8)
    mask |= (k == 2) & (dy <= 0.8) & (ax <= (dy + 1.0) * 0.6)
    mask |= (k == 3) & (((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0)))
    mask |= (k == 4) & (r2 <= 1.0) & (r2 >= 0.36)
    mask |= (k == 5) & (ax + ay <= 1.0)
    return mask


def make_shapes(n: int, *, size: tuple[int, int] = (32, 32), bit_depth: int = 8,
                seed: int = 0, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Deterministic labelled RGB images of simple shapes.

    Returns (images (n, H, W, 3) uint8|uint16, labels (n,) int32); classes are
    `SHAPE_CLASSES`. Each image is one shape at a random position, size and
    colour on a random contrasting background with uniform noise; 16-bit images
    use the full uint16 range (not 8-bit values times 257).
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"data.bit_depth: expected 8 or 16, got {bit_depth!r}")
    h, w = int(size[0]), int(size[1])
    if min(h, w) < 8:
        raise ValueError(f"data.size: shapes need images of at least 8x8, got {h}x{w}")
    rng = np.random.default_rng([int(seed), _SPLIT_SEEDS.get(split, 2), 0x5A4E])
    labels = rng.integers(0, len(SHAPE_CLASSES), n).astype(np.int32)
    short = min(h, w)
    radius = short * (0.2 + 0.18 * rng.random(n))
    cy = radius + (h - 1 - 2 * radius) * rng.random(n)
    cx = radius + (w - 1 - 2 * radius) * rng.random(n)
    # colours in [0, 1]: one side dark, the other light, swapped at random
    dark = 0.45 * rng.random((n, 3))
    light = 0.55 + 0.45 * rng.random((n, 3))
    swap = rng.random(n) < 0.5
    fg = np.where(swap[:, None], dark, light)
    bg = np.where(swap[:, None], light, dark)
    ys = np.arange(h, dtype=np.float64)[None, :, None]
    xs = np.arange(w, dtype=np.float64)[None, None, :]
    inv = 1.0 / radius[:, None, None]
    mask = _shape_masks(labels, (xs - cx[:, None, None]) * inv, (ys - cy[:, None, None]) * inv)
    img = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :])
    # triangular noise from uniforms (platform-independent, unlike a Gaussian sampler)
    img += 0.08 * (rng.random(img.shape) - rng.random(img.shape))
    maxval = (1 << bit_depth) - 1
    out = np.rint(np.clip(img, 0.0, 1.0) * maxval).astype(np.uint8 if bit_depth == 8 else np.uint16)
    return out, labels


def shapes_dataset(num_train: int, num_val: int, *, size: tuple[int, int] = (32, 32),
                   bit_depth: int = 8, seed: int = 0) -> Dataset:
    """The built-in synthetic dataset (see `make_shapes`)."""
    xtr, ytr = make_shapes(num_train, size=size, bit_depth=bit_depth, seed=seed, split="train")
    xva, yva = make_shapes(num_val, size=size, bit_depth=bit_depth, seed=seed, split="val")
    mean, std = _mean_std(xtr)
    return Dataset(list(SHAPE_CLASSES), Split(xtr, ytr), Split(xva, yva), bit_depth, mean, std,
                   f"shapes ({bit_depth}-bit, {size[0]}x{size[1]}, seed {seed})", plane_names=("R", "G", "B"))


def store_dataset(path: str | os.PathLike) -> Dataset:
    """A `cnnpipe preprocess` store: train split + its "val" (or else "test") split, memory-mapped."""
    from cnnpipe.store import load_store

    store = load_store(path)
    # counts come from meta.json; Store.labels checks each loaded array against them
    val_name = next((s for s in ("val", "test") if s in store.splits and store.count(s)), None)
    if "train" not in store.splits or not store.count("train"):
        raise ValueError(f"{store.path}: store has no train images (splits: {', '.join(store.splits)})")
    if val_name is None:
        raise ValueError(f"{store.path}: store has no validation split (splits: {', '.join(store.splits)}); "
                         "preprocess it with a validation fraction > 0")
    train = Split(store.images("train"), store.labels("train"))
    val = Split(store.images(val_name), store.labels(val_name), tuple(store.sources(val_name)) or None)
    names = store.meta.get("channel_names")
    return Dataset(store.classes, train, val, store.bit_depth, tuple(store.mean), tuple(store.std),
                   f"store {store.path}", str(store.meta.get("resize", "crop")),
                   tuple(str(n) for n in names) if isinstance(names, list) and len(names) == store.channels else None)


def default_cache_dir() -> Path:
    """~/.cache/cnnpipe, or $XDG_CACHE_HOME/cnnpipe."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cnnpipe"


def folder_cache_key(folder: str | os.PathLike, settings: dict[str, Any]) -> tuple[str, int]:
    """(hash of the folder's listing (relative path, size, mtime) and the settings, file count).

    The listing is `cnnpipe preprocess`'s own scan, so the key covers exactly the
    files it would read: symlinked class folders are followed, and broken links,
    hidden files and loops are left out as preprocess leaves them out.
    """
    from cnnpipe.folders import scan_folder
    from cnnpipe.transform import IMAGE_PATH_VERSION

    # the image path's version is part of the key: pixels from an older chain are never reused
    h = hashlib.sha256(json.dumps({**settings, "image_path": IMAGE_PATH_VERSION}, sort_keys=True).encode())
    candidates = scan_folder(Path(folder)).candidates
    for cand in candidates:
        try:
            st = os.stat(cand.path)
        except OSError:  # gone since the scan: preprocess will report it
            continue
        h.update(f"{cand.rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20], len(candidates)


def folder_dataset(folder: str | os.PathLike, *, size: tuple[int, int], resize: str = "crop",
                   channels: str = "rgb", val_fraction: float = 0.1,
                   cache_dir: str | os.PathLike | None = None) -> Dataset:
    """A raw image folder, preprocessed once into `cache_dir` and reused while unchanged."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path: image folder not found: {root}")
    settings = {"size": [int(size[0]), int(size[1])], "resize": resize, "channels": channels,
                "val_fraction": float(val_fraction), "seed": 0, "format": 1}
    key, num_files = folder_cache_key(root, settings)
    out = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    out = out / "folders" / f"{root.resolve().name}-{key}"
    if not (out / "meta.json").is_file():
        from cnnpipe.preprocess import preprocess

        out.parent.mkdir(parents=True, exist_ok=True)
        # a process pool only pays off past a few hundred files
        try:
            preprocess(root, out, size=tuple(settings["size"]), resize=resize, val_fraction=val_fraction,
                       seed=0, channels=channels, overwrite=False, workers=1 if num_files < 256 else None)
        except ValueError:
            if not (out / "meta.json").is_file():  # not merely another process finishing first
                raise
    return dataclasses.replace(store_dataset(out), description=f"folder {root} (cache {out})", resize=resize)


# ---------------------------------------------------------------- batching

def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full train batches per epoch (the remainder is dropped, so shapes stay fixed)."""
    steps = num_examples // batch_size
    if steps == 0:
        raise ValueError(f"train.batch_size (={batch_size}) is larger than the train split "
                         f"(={num_examples} images)")
    return steps


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the train split in `epoch`: a pure function of (seed, epoch, n)."""
    return np.random.default_rng([int(seed), int(epoch), 0xDA7A]).permutation(n)


def train_batches(split: Split, batch_size: int, *, seed: int, epoch: int, start_step: int = 0,
                  rows: slice = slice(None)) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled (images, labels) batches of exactly `batch_size`, from `start_step` of `epoch`.

    `rows` selects this process's part of every global batch (`mesh.process_rows`):
    only those images are read, and the parts of all processes, concatenated in
    process order, are the single-process batch.
    """
    perm = epoch_permutation(seed, epoch, len(split))
    for step in range(start_step, steps_per_epoch(len(split), batch_size)):
        idx = perm[step * batch_size:(step + 1) * batch_size][rows]
        # sorted reads are sequential on a memmap; the batch itself keeps `perm` order
        order = np.argsort(idx, kind="stable")
        images = np.empty((len(idx), *split.images.shape[1:]), split.images.dtype)
        images[order] = split.images[idx[order]]
        yield images, split.labels[idx]


def eval_batches(split: Split, batch_size: int, *,
                 rows: slice = slice(None)) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(images, labels, mask) batches in order, all of `batch_size`; the last one zero-padded, mask False.

    `rows` selects this process's part of every global batch, as for `train_batches`.
    """
    n = len(split)
    lo, hi, _ = rows.indices(batch_size)
    for start in range(0, n, batch_size):
        first, stop = min(start + lo, n), min(start + hi, n)
        images = np.zeros((hi - lo, *split.images.shape[1:]), split.images.dtype)
        labels = np.zeros(hi - lo, np.int32)
        mask = np.zeros(hi - lo, bool)
        images[:stop - first] = split.images[first:stop]
        labels[:stop - first] = split.labels[first:stop]
        mask[:stop - first] = True
        yield images, labels, mask


class prefetch:  # noqa: N801 - used like a generator function
    """Iterate `it` in a background thread, `size` items ahead (host I/O overlaps device work)."""

    _END = object()

    def __init__(self, it: Iterable[Any], size: int = 2) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iter(it),), daemon=True)
        self._thread.start()

    def _fill(self, it: Iterator[Any]) -> None:
        try:
            for item in it:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as exc:  # re-raised in the consumer thread
            self._put(exc)

    def _put(self, item: Any) -> bool:
        """Queue `item`, waiting in short slices so a stop request is seen; False once stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> prefetch:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the background thread (safe to call twice)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_dataset_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The `dataset.json` a run saved (classes, size, channels, bit depth, mean/std)."""
    path = Path(run_dir) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {run_dir} a cnnpipe run directory?")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable or corrupt run file ({' '.join(str(exc).split())})") from None
    missing = [k for k in ("classes", "size", "channels", "bit_depth", "mean", "std")
               if not isinstance(info, dict) or k not in info]
    if missing:
        raise ValueError(f"{path}: corrupt run file (key {missing[0]!r} is missing)")
    return info


__all__ = [
    "SHAPE_CLASSES", "Split", "Dataset", "load_dataset", "make_shapes", "shapes_dataset",
    "store_dataset", "folder_dataset", "folder_cache_key", "DEFAULT_SIZE", "default_cache_dir",
    "steps_per_epoch", "epoch_permutation", "train_batches", "eval_batches", "prefetch",
    "read_dataset_info",
]
