"""The on-disk dataset store written by `cnnpipe preprocess`, and its atomic writer.

Layout of a store directory::

    OUT/meta.json             classes, dtype, bit depth, size, channels, counts, mean/std
    OUT/report.json           skipped files with reasons, duplicates, counts
    OUT/<split>/images.npy    (N, H, W, C) uint8 or uint16, read memory-mapped
    OUT/<split>/labels.npy    (N,) int32 class indices into meta["classes"]; a multi-label or regression
                              store (meta["task"]): (N, L) float32 multi-hot or values, NaN unknown
    OUT/<split>/sources.json  the N source files (relative to SRC), row order
    OUT/train/folds.npy       (N,) int8 cross-validation fold of each row (a store made with --folds)

A store is complete or absent: `StoreWriter` builds it in a hidden temporary
directory beside OUT and renames it into place only once everything is written.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.tasks import Task

FORMAT_VERSION = 1
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
_DTYPES = {"uint8": 8, "uint16": 16, "int16": 16, "float32": 32}  # dtype -> meta.json "bit_depth"


class Store:
    """A read-only view of a store directory; arrays are memory-mapped on demand."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not self.path.is_dir():
            raise ValueError(f"{self.path}: not a dataset store (directory not found)")
        if not meta_path.is_file():
            raise ValueError(f"{self.path}: not a dataset store (meta.json is missing)")
        self.meta: dict[str, Any] = _read_json(meta_path, "metadata")
        for key in ("classes", "dtype", "bit_depth", "size", "channels", "splits", "counts", "mean", "std"):
            if key not in self.meta:
                raise ValueError(f"{meta_path}: corrupt store metadata (key {key!r} is missing)")
        if self.meta["dtype"] not in _DTYPES:
            raise ValueError(f"{meta_path}: unsupported dtype {self.meta['dtype']!r}; expected "
                             f"{', '.join(_DTYPES)}")
        self._report: dict[str, Any] | None = None
        self.built_by: str | None = None   # set by the run that just built it: "dask engine, 4 worker threads"

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @property
    def bit_depth(self) -> int:
        return int(self.meta["bit_depth"])

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.meta["size"]
        return int(h), int(w)

    @property
    def channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def mean(self) -> list[float]:
        return [float(m) for m in self.meta["mean"]]

    @property
    def std(self) -> list[float]:
        return [float(s) for s in self.meta["std"]]

    @property
    def report(self) -> dict[str, Any]:
        if self._report is None:
            path = self.path / "report.json"
            if not path.is_file():
                raise ValueError(f"{self.path}: store is incomplete (report.json is missing)")
            self._report = _read_json(path, "report")
        return self._report

    def _check_split(self, split: str) -> Path:
        if split not in self.meta["splits"]:
            raise ValueError(f"{self.path}: no split {split!r} in this store (splits: {', '.join(self.splits)})")
        return self.path / split

    def count(self, split: str) -> int:
        """Number of images in `split` (from meta.json; nothing is loaded)."""
        self._check_split(split)
        return int(self.meta["counts"][split]["total"])

    def _array(self, split: str, name: str, row_shape: tuple[int, ...], dtype: np.dtype, mmap: bool) -> np.ndarray:
        """Load `split`/`name` and check it is (count, *row_shape) of `dtype`, as meta.json says."""
        path = self._check_split(split) / name
        n = self.count(split)
        if not path.is_file():
            raise ValueError(f"{self.path}: store is incomplete ({path.relative_to(self.path)} is missing)")
        try:
            # an empty file cannot be memory-mapped, so empty splits load normally
            arr = np.load(path, mmap_mode="r" if mmap and n > 0 else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: corrupt store array ({exc})") from None
        expected = (n, *row_shape)
        if arr.shape != expected or arr.dtype != dtype:
            raise ValueError(f"{path}: corrupt store array (shape {arr.shape} {arr.dtype}, "
                             f"meta.json says {expected} {dtype})")
        return arr

    def images(self, split: str) -> np.ndarray:
        """(N, H, W, C) uint8/uint16 images of `split`, memory-mapped read-only."""
        return self._array(split, "images.npy", (*self.size, self.channels), self.dtype, mmap=True)

    @property
    def task(self) -> Task:
        """The store's task (meta.json "task"; absent: single-label classification)."""
        try:
            return Task.from_meta(self.meta)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self.path / 'meta.json'}: corrupt store metadata ({exc})") from None

    def labels(self, split: str) -> np.ndarray:
        """(N,) int32 class indices of `split`, or its (N, L) float32 targets (`task`)."""
        task = self.task
        return self._array(split, "labels.npy", task.target_shape, task.target_dtype, mmap=False)

    @property
    def num_folds(self) -> int | None:
        """K of a store made with --folds, else None."""
        folds = self.meta.get("folds")
        return int(folds["k"]) if isinstance(folds, dict) else None

    def folds(self, split: str = "train") -> np.ndarray:
        """(N,) int8 cross-validation fold of each row of `split` (a store made with --folds)."""
        if self.num_folds is None:
            raise ValueError(f"{self.path}: this store has no cross-validation folds (preprocess it with --folds K)")
        return self._array(split, "folds.npy", (), np.dtype(np.int8), mmap=False)

    def sources(self, split: str) -> list[str]:
        """The source file of each row of `split` (path relative to SRC), or [] if not recorded."""
        path = self._check_split(split) / "sources.json"
        if not path.is_file():
            return []
        return list(_read_json(path, "file"))

    def __len__(self) -> int:
        return sum(self.count(s) for s in self.splits)

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.count(s)}" for s in self.splits)
        h, w = self.size
        return (f"Store({str(self.path)!r}: {len(self.meta['classes'])} classes, {h}x{w}x{self.channels} "
                f"{self.meta['dtype']}, {counts})")


def load_store(path: str | os.PathLike) -> Store:
    """Open the store at `path`; ValueError naming the path and what is missing if it is not one."""
    return Store(path)


def _npy_shrink(path: Path, n: int) -> None:
    """Cut an .npy file to its first `n` rows in place, keeping the data offset.

    The rewritten header is padded with spaces to its old length, so the data
    stays where it was and nothing is copied.
    """
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
        new_shape = (n, *shape[1:])
        fields = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran, "shape": new_shape}
        # spelled as numpy spells it (sorted keys, a comma after each), so the file equals np.save's
        header = ("{" + "".join(f"'{k}': {v!r}, " for k, v in sorted(fields.items())) + "}").encode("latin1")
        len_size = 2 if version == (1, 0) else 4
        prefix = 6 + 2 + len_size  # magic string + version bytes + header length field
        body_len = offset - prefix
        if len(header) + 1 > body_len:  # cannot happen: the shape only got shorter
            raise RuntimeError(f"{path}: cannot shrink .npy header in place")
        body = header + b" " * (body_len - len(header) - 1) + b"\n"
        f.seek(prefix - len_size)
        f.write(body_len.to_bytes(len_size, "little"))
        f.write(body)
        f.truncate(offset + n * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


def _named(exc: OSError, path: Path) -> OSError:
    """The same error naming the file: a failed write (disk full, I/O error) names none by itself."""
    return exc if exc.filename else OSError(exc.errno, exc.strerror or str(exc), str(path))


class RowStream:
    """Append-only writer of an .npy array's rows with plain file writes.

    The header is written for `capacity` rows up front; rows go to disk as
    they come (nothing is kept in memory, nothing is mapped, so the writer's
    memory does not grow with the store) and `close()` cuts unused rows.
    """

    def __init__(self, path: Path, capacity: int, row_shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.capacity, self.row_shape, self.dtype = path, capacity, row_shape, np.dtype(dtype)
        self.n = 0
        self.f = open(path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (capacity, *row_shape)}
        try:
            np.lib.format.write_array_header_1_0(self.f, header)
        except OSError as exc:
            raise _named(exc, path) from None

    def write(self, row: np.ndarray) -> None:
        if row.shape != self.row_shape or row.dtype != self.dtype:
            raise ValueError(f"{self.path}: row {self.n} is {row.shape} {row.dtype}, expected "
                             f"{self.row_shape} {self.dtype}")
        if self.n >= self.capacity:
            raise ValueError(f"{self.path}: more than the {self.capacity} rows allocated")
        try:
            self.f.write(np.ascontiguousarray(row).data)
        except OSError as exc:
            raise _named(exc, self.path) from None
        self.n += 1

    def close(self) -> None:
        if self.f.closed:
            return
        self.f.close()
        if self.n < self.capacity:
            _npy_shrink(self.path, self.n)


class StoreWriter:
    """Builds a store in a temporary directory beside `out`; `commit()` renames it into place.

    Use as a context manager: leaving the block without `commit()` (an
    exception, KeyboardInterrupt) removes the temporary directory, so OUT is
    either the complete new store or untouched.
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.out = Path(out).absolute()
        self.overwrite = overwrite
        check_output(self.out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out)
        self.tmp = self.out.parent / temp_name(self.out, "tmp")
        try:
            self.tmp.mkdir()
        except OSError as exc:  # name OUT, not the temporary folder beside it
            raise OSError(exc.errno, f"cannot create the store here ({exc.strerror or type(exc).__name__})",
                          str(self.out)) from None
        self._images: dict[str, RowStream] = {}
        self._labels: dict[str, RowStream] = {}
        self._sources: dict[str, list[str]] = {}
        self._folds: dict[str, RowStream] = {}
        self.committed = False

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_split(self, split: str, capacity: int, size: tuple[int, int], channels: int,
                     dtype: np.dtype | str, folds: bool = False, task: Task | None = None) -> None:
        """Start (at most `capacity`) rows of (H, W, C) images and labels for `split` (and int8 folds):
        int32 class indices, or `task`'s target rows."""
        d = self.tmp / split
        d.mkdir()
        self._images[split] = RowStream(d / "images.npy", capacity, (int(size[0]), int(size[1]), int(channels)),
                                         np.dtype(dtype))
        task = task or Task()
        self._labels[split] = RowStream(d / "labels.npy", capacity, task.target_shape, task.target_dtype)
        self._sources[split] = []
        if folds:
            self._folds[split] = RowStream(d / "folds.npy", capacity, (), np.dtype(np.int8))

    def append(self, split: str, image: np.ndarray, label: Any, source: str = "", fold: int = -1) -> int:
        """Write one (H, W, C) image, its label (a class index or a target row), source name (and fold)
        as the next row of `split`."""
        i = self._images[split].n
        self._images[split].write(image)
        self._labels[split].write(np.asarray(label, self._labels[split].dtype))
        if split in self._folds:
            self._folds[split].write(np.asarray(fold, np.int8))
        self._sources[split].append(source)
        return i

    def count(self, split: str) -> int:
        return self._images[split].n

    def commit(self, meta: Mapping[str, Any], report: Mapping[str, Any]) -> Path:
        """Finish the arrays (cut unused rows), write meta/report and rename the store into place."""
        for stream in self._folds.values():
            stream.close()
        for split in self._images:
            self._images[split].close()
            self._labels[split].close()
            (self.tmp / split / "sources.json").write_text(json.dumps(self._sources[split], indent=0) + "\n")
        _write_json(self.tmp / "report.json", report)
        _write_json(self.tmp / "meta.json", meta)
        check_output(self.out, self.overwrite)  # OUT may have appeared while we worked
        old = None
        if self.out.exists() or self.out.is_symlink():
            old = self.out.parent / temp_name(self.out, "old")
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        self.committed = True
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        return self.out

    def close(self) -> None:
        """Drop the temporary directory unless the store was committed."""
        for stream in (*self._images.values(), *self._labels.values(), *self._folds.values()):
            stream.f.close()
        if not self.committed and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def temp_name(out: Path, kind: str) -> str:
    """`.OUT.tmp-HOST-PID-RANDOM`: the host and process say whether a leftover is still being written."""
    return f".{out.name}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its folder
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete temporary folders a killed writer left beside `out`; returns what was removed.

    Only folders named by `StoreWriter` for this OUT, made on this host, whose
    process no longer runs: a writer still at work (here or on another host
    sharing the folder) is never touched.
    """
    removed = []
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return removed
    for kind in ("tmp", "old", "shards"):   # shards: a Dask run's (cnnpipe.datasets.dask_engine)
        prefix = f".{out.name}.{kind}-{_host()}-"
        for entry in entries:
            if not entry.name.startswith(prefix) or entry.is_symlink():
                continue
            pid = entry.name[len(prefix):].split("-")[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if kind == "old" and not (out.exists() or out.is_symlink()):
                os.rename(entry.path, out)  # killed mid-commit: the previous store is put back, not lost
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def check_output(out: Path, overwrite: bool) -> None:
    """ValueError unless `out` may be (re)written: absent, empty, or a store and `overwrite`."""
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return  # an empty directory holds nothing to lose
    if not overwrite:
        raise ValueError(f"{out}: output already exists; pass --overwrite (overwrite=True) to replace it")
    if out.is_dir() and not out.is_symlink():
        # never delete a directory that is not one of ours
        if (out / "meta.json").is_file():
            return
        raise ValueError(f"{out}: exists and is not a dataset store (no meta.json); refusing to overwrite it")
    raise ValueError(f"{out}: exists and is not a directory; refusing to overwrite it")


def _read_json(path: Path, what: str) -> Any:
    """Parse a store's JSON file; ValueError naming the file if it is unreadable or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: corrupt store {what} ({exc})") from None


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


def exact_mean_std(sums: Sequence[int | float], sumsq: Sequence[int | float], n: int | Sequence[int]
                   ) -> tuple[list[float], list[float]]:
    """Per-plane mean and std from sums of values and of squares over `n` pixels (or `n` per plane).

    With integer sums n * sumsq - sum^2 is exact in Python integers: no cancellation error,
    even for 16-bit values over billions of pixels. Float sums (float32 stores, NaN left out)
    use sumsq / n - mean^2 in float64. A plane with no values: mean 0, std 1.
    """
    counts = list(n) if isinstance(n, (list, tuple)) else [n] * len(sums)
    mean, std = [], []
    for s, q, k in zip(sums, sumsq, counts):
        if k == 0:
            mean.append(0.0)
            std.append(1.0)
        elif isinstance(s, int) and isinstance(q, int):
            mean.append(s / k)
            std.append(math.sqrt(max(k * q - s * s, 0)) / k)
        else:
            m = s / k
            mean.append(m)
            std.append(math.sqrt(max(q / k - m * m, 0.0)))
    return mean, std


def build_meta(*, classes: Sequence[str], dtype: str, size: tuple[int, int], channel_names: Sequence[str],
               splits: Sequence[str], counts: Mapping[str, Mapping[str, Any]], mean: Sequence[float],
               std: Sequence[float], **extra: Any) -> dict[str, Any]:
    """The meta.json mapping, with the keys `Store` relies on first."""
    return {"format_version": FORMAT_VERSION, "classes": list(classes), "dtype": dtype,
            "bit_depth": _DTYPES[dtype], "size": [int(size[0]), int(size[1])],
            "channels": len(channel_names), "channel_names": list(channel_names), "splits": list(splits),
            "counts": counts, "mean": [float(m) for m in mean], "std": [float(s) for s in std], **extra}
