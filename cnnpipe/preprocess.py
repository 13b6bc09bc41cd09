"""Image folder -> dataset store: scan, stable split, parallel decode + resize, report.

Two passes over the files:

1. *probe*, in this process while the worker pool starts: read the first
   bytes of each file, recognise it by magic bytes, note its bit depth from
   the header. This fixes the store's dtype (uint16 as soon as one file is
   16-bit) and the classes before anything is written.
2. *convert*, in worker processes: read each file once, hash its bytes (for
   the duplicate report), decode (JPEGs that shrink >= 2x at reduced DCT
   scale), promote 8-bit to
   16-bit exactly (x257) when needed, resize (antialiased when shrinking;
   16-bit in float32, no trip through 8 bits) and stream the rows to the
   store's .npy files, so memory does not grow with the number of images.

The split of a file is a pure function of (seed, class, path relative to the
class folder): the same files give the same split on any machine, and adding
files never moves old ones. The store is built beside OUT and renamed into
place when complete (`cnnpipe.store.StoreWriter`).

Worker processes import only this module, `cnnpipe.store` and `cnnpipe.decode`
(numpy, Pillow, imagecodecs), never jax.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import multiprocessing
import os
import signal
import stat
import struct
import sys
import time
import types
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.decode import DEFAULT_MAX_PIXELS, DecodeError, check_format, read_image, sniff_format
from cnnpipe.store import SPLIT_NAMES, Store, StoreWriter, build_meta, check_output, load_store
from cnnpipe.transform import RESIZE_MODES, promote_to_16bit, resize_image

__all__ = ["PreprocessError", "preprocess", "format_summary", "parse_size", "assign_split", "resize_image"]

log = logging.getLogger(__name__)

_PROBE_CHUNK = 64
_HEAD_BYTES = 64  # enough for sniffing and the PNG IHDR
_CONVERT_CHUNK = 8


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
    return hw  # type: ignore[return-value]


def assign_split(seed: int, class_name: str, relpath: str, val_fraction: float, test_fraction: float) -> str:
    """The split of one file: a hash of (seed, class, relative path) mapped into [0, 1).

    Uses blake2b rather than Python's `hash()` (salted per process) so it is the
    same on every machine and run; each file's split depends on nothing else.
    """
    digest = hashlib.blake2b(f"{seed}\x00{class_name}\x00{relpath}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


# ---------------------------------------------------------------- scan

@dataclass(slots=True)  # one per file: keep the per-file bookkeeping small
class _Candidate:
    path: str  # absolute path as walked (symlinks kept)
    rel: str  # relative to SRC, posix
    class_rel: str  # relative to the class folder, posix (the split hash key)
    class_name: str
    split: str | None  # the folder's own split in the split layout
    digest: str = ""
    bit_depth: int = 8


@dataclass
class _Scan:
    layout: str  # "classes" or "splits"
    candidates: list[_Candidate] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    class_dirs: list[tuple[str, str, str | None]] = field(default_factory=list)  # (rel, class, split)


def _skip(scan: _Scan, rel: str, kind: str, reason: str) -> None:
    scan.skipped.append({"path": rel, "kind": kind, "reason": reason})


def _skipped_dotfile(scan: _Scan, entry: os.DirEntry, rel: str) -> bool:
    """Skip (and report) AppleDouble `._*` files and hidden entries; True when skipped."""
    if entry.name.startswith("._"):
        _skip(scan, rel, "appledouble", f"{entry.path}: AppleDouble metadata file (._*), not an image")
        return True
    if entry.name.startswith("."):
        _skip(scan, rel, "hidden", f"{entry.path}: hidden {'folder' if entry.is_dir() else 'file'}")
        return True
    return False


def _walk_files(root: Path, rel_root: str, scan: _Scan, visited: set[tuple[int, int]],
                ancestors: tuple[tuple[int, int], ...]) -> Iterator[tuple[str, str]]:
    """Yield (absolute path, path relative to SRC) of regular files under `root`, sorted.

    Follows symbolic links; a directory already seen (a loop, or a second link
    to the same folder) is skipped and reported instead of walked again.
    """
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        _skip(scan, rel_root, "unreadable", f"{root}: cannot list directory: {exc.strerror or exc}")
        return
    for entry in entries:
        rel = f"{rel_root}/{entry.name}" if rel_root else entry.name
        if _skipped_dotfile(scan, entry, rel):
            continue
        try:
            st = os.stat(entry.path)  # follows symlinks
        except OSError:
            if entry.is_symlink():
                _skip(scan, rel, "broken_link", f"{entry.path}: broken symbolic link")
            else:
                _skip(scan, rel, "unreadable", f"{entry.path}: cannot stat file")
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in ancestors:
                _skip(scan, rel, "symlink_loop", f"{entry.path}: symbolic link loop (points to a parent folder)")
                continue
            if key in visited:
                _skip(scan, rel, "symlink_repeat", f"{entry.path}: folder already scanned through another link")
                continue
            visited.add(key)
            yield from _walk_files(Path(entry.path), rel, scan, visited, ancestors + (key,))
        elif stat.S_ISREG(st.st_mode):
            yield entry.path, rel
        else:
            _skip(scan, rel, "not_regular", f"{entry.path}: not a regular file")


def _subdirs(root: Path) -> list[str]:
    out = []
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if not e.name.startswith(".") and e.is_dir():  # is_dir follows symlinks
            out.append(e.name)
    return out


def scan_folder(src: Path) -> _Scan:
    """Find candidate files in SRC/<class>/** or SRC/<split>/<class>/**; nothing is read yet."""
    top = _subdirs(src)
    is_split_layout = bool(top) and set(top) <= set(SPLIT_NAMES)
    scan = _Scan(layout="splits" if is_split_layout else "classes")
    root_st = os.stat(src)
    visited = {(root_st.st_dev, root_st.st_ino)}
    roots: list[tuple[Path, str, str | None]]  # (folder holding class folders, rel, split)
    if is_split_layout:
        roots = [(src / s, s, s) for s in SPLIT_NAMES if s in top]
        for entry in sorted(os.scandir(src), key=lambda e: e.name):
            if not entry.is_dir():
                kind = "appledouble" if entry.name.startswith("._") else (
                    "hidden" if entry.name.startswith(".") else "outside_class")
                _skip(scan, entry.name, kind, f"{entry.path}: not inside a split/class folder")
    else:
        roots = [(src, "", None)]
    for base, base_rel, split in roots:
        base_st = os.stat(base)
        visited.add((base_st.st_dev, base_st.st_ino))
        ancestors = ((root_st.st_dev, root_st.st_ino), (base_st.st_dev, base_st.st_ino))
        for entry in sorted(os.scandir(base), key=lambda e: e.name):
            rel = f"{base_rel}/{entry.name}" if base_rel else entry.name
            if _skipped_dotfile(scan, entry, rel):
                continue
            if not entry.is_dir():
                _skip(scan, rel, "outside_class", f"{entry.path}: not inside a class folder")
                continue
            st = os.stat(entry.path)
            key = (st.st_dev, st.st_ino)
            if key in ancestors:
                _skip(scan, rel, "symlink_loop", f"{entry.path}: symbolic link loop (points to a parent folder)")
                continue
            visited.add(key)
            scan.class_dirs.append((rel, entry.name, split))
            for path, frel in _walk_files(Path(entry.path), rel, scan, visited, ancestors + (key,)):
                class_rel = frel[len(rel) + 1:]
                scan.candidates.append(_Candidate(path, frel, class_rel, entry.name, split))
    return scan


# ---------------------------------------------------------------- workers

def _probe_one(path: str) -> tuple[str | None, int]:
    """(error or None, bit depth from the header) of one file, reading only its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError as exc:
        return f"{path}: cannot read file: {exc.strerror or exc}", 8
    try:
        fmt = check_format(head, path)  # the decoder's own wording (it names known unsupported formats)
    except DecodeError as exc:
        return str(exc), 8
    return None, _header_bit_depth(fmt, head, path)


def _header_bit_depth(fmt: str, head: bytes, path: str) -> int:
    """16 if the header says more than 8 bits per sample, else 8 (a guess the decoder may correct)."""
    if fmt == "PNG":
        return 16 if len(head) > 24 and head[24] == 16 else 8
    if fmt == "TIFF":
        try:
            import tifffile

            with tifffile.TiffFile(path) as tif:  # reads the first directory only
                return 16 if int(tif.pages.first.bitspersample) > 8 else 8
        except Exception:
            return 8
    return 8


@dataclass(frozen=True)
class _ConvertSettings:
    size: tuple[int, int]
    resize: str
    channels: str
    dtype: str  # "uint8" or "uint16"


class _NeedsUint16(Exception):
    """A file decoded as 16-bit although its header suggested 8: the store must be uint16."""


def _read_jpeg_reduced(data: bytes, path: str, cfg: _ConvertSettings) -> np.ndarray | None:
    """Decode an 8-bit JPEG at 1/2, 1/4 or 1/8 scale when the target is that much smaller.

    libjpeg scales in the DCT domain (an area average: it antialiases) and
    skips most of the work, so shrinking photos costs a fraction of a full
    decode. Returns (h, w, C) uint8 with EXIF orientation applied, or None
    whenever the plain decode should be used instead (no 2x reduction
    possible, CMYK, gray from colour, oversized, truncated or damaged files:
    `read_image` then decides and words any error).
    """
    from PIL import Image, ImageOps

    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None
    try:
        im = Image.open(io.BytesIO(data), formats=["JPEG"])
    except Exception:
        return None
    with im:
        if im.mode not in ("L", "RGB") or (cfg.channels == "gray" and im.mode != "L"):
            return None
        if im.width * im.height > DEFAULT_MAX_PIXELS:
            return None
        orientation = im.getexif().get(0x0112) or 1
        w, h = im.size
        transposed = orientation in (5, 6, 7, 8)
        oh, ow = (w, h) if transposed else (h, w)
        rh, rw = _needed_source_size(oh, ow, cfg.size, cfg.resize)
        if transposed:
            rh, rw = rw, rh
        if min(w // rw, h // rh) < 2:
            return None
        try:
            im.draft(im.mode, (rw, rh))
            im.load()
            if orientation != 1:
                im = ImageOps.exif_transpose(im)
            arr = np.asarray(im)
        except Exception:
            return None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if cfg.channels == "rgb" and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr


def _needed_source_size(h: int, w: int, size: tuple[int, int], mode: str) -> tuple[int, int]:
    """The smallest (h, w) the source may be reduced to before the final resize to `size`."""
    th, tw = size
    if mode == "stretch":
        return th, tw
    s = max(th / h, tw / w) if mode == "crop" else min(th / h, tw / w)
    return max(1, math.ceil(h * s)), max(1, math.ceil(w * s))


def _convert_one(path: str, want_stats: bool, cfg: _ConvertSettings) -> tuple:
    """Read, hash, decode and resize one file.

    Returns ("ok", (H, W, C) image, channel sums or None, channel sums of
    squares or None, content hash), ("error", reason) or ("needs16", path).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return ("error", f"{path}: cannot read file: {exc.strerror or exc}")
    digest = hashlib.sha256(data).hexdigest()[:32]
    img = None
    if sniff_format(data[:32]) == "JPEG":
        img = _read_jpeg_reduced(data, path, cfg)
    if img is None:
        try:
            img = read_image(data, channels=cfg.channels, alpha="drop").hwc()
        except DecodeError as exc:  # decoded from bytes: put the file's name on the reason
            return ("error", str(DecodeError(path, exc.reason)))
        except Exception as exc:  # anything else is reported, not fatal
            return ("error", f"{path}: {type(exc).__name__}: {exc}")
    if img.dtype == np.uint16 and cfg.dtype == "uint8":
        return ("needs16", path)
    if img.dtype == np.uint8 and cfg.dtype == "uint16":
        img = promote_to_16bit(img)
    img = np.ascontiguousarray(resize_image(img, cfg.size, cfg.resize))
    if not want_stats:
        return ("ok", img, None, None, digest)
    flat = img.reshape(-1, img.shape[2]).astype(np.uint64)
    # integer sums are exact, so the mean/std do not depend on order or chunking
    return ("ok", img, [int(v) for v in flat.sum(0)], [int(v) for v in np.einsum("ij,ij->j", flat, flat)],
            digest)


def _convert_chunk(args: tuple[list[tuple[str, bool]], _ConvertSettings]) -> list[tuple]:
    items, cfg = args
    return [_convert_one(path, want, cfg) for path, want in items]


def _worker_init() -> None:
    # Ctrl-C goes to the whole process group; the parent alone handles it and
    # terminates the pool, so workers must not die mid-result with tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _chunks(seq: Sequence[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(seq), n):
        yield list(seq[i:i + n])


def _ordered_map(pool: Any, fn: Callable[[Any], Any], jobs: Iterable[Any], window: int) -> Iterator[Any]:
    """`fn` over `jobs` in order with at most `window` jobs in flight.

    Unlike `Pool.imap`, results never pile up faster than the caller consumes
    them, which keeps the parent's memory bounded.
    """
    it = iter(jobs)
    if pool is None:
        yield from map(fn, it)
        return
    pending: deque = deque(pool.apply_async(fn, (job,)) for job in _take(it, window))
    while pending:
        result = pending.popleft().get()
        for job in _take(it, 1):
            pending.append(pool.apply_async(fn, (job,)))
        yield result


def _take(it: Iterator[Any], n: int) -> list[Any]:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


_WORKER_PRELOAD = ["cnnpipe.preprocess", "imagecodecs", "tifffile", "PIL.JpegImagePlugin", "PIL.PngImagePlugin",
                   "PIL.TiffImagePlugin", "PIL.BmpImagePlugin", "PIL.GifImagePlugin", "PIL.WebPImagePlugin"]


def _make_pool(workers: int) -> Any:
    """A pool of `workers` processes that import this module but never the caller's script.

    Never fork (the parent may hold jax/XLA threads). Under forkserver/spawn a
    child normally re-runs the parent's main script to unpickle functions
    defined there; ours live in this module, so the script is hidden while the
    workers start: a training script that imports jax does not drag jax into
    every decoding worker.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # the fork server imports the whole decoding stack once (codecs and Pillow's
        # plugins are otherwise imported lazily, on each worker's first file); workers
        # fork from it ready
        ctx.set_forkserver_preload(_WORKER_PRELOAD)
    else:
        ctx = multiprocessing.get_context("spawn")
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        return ctx.Pool(workers, initializer=_worker_init)
    finally:
        if main is not None:
            sys.modules["__main__"] = main


# ---------------------------------------------------------------- progress

class _Progress:
    """A tqdm bar on an interactive terminal; otherwise a log line every 10 s and at the end."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self.total, self.desc, self.done, self.skipped = total, desc, 0, 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="file", dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int, skipped: int) -> None:
        self.done += n
        self.skipped += skipped
        if self.bar is not None:
            self.bar.update(n)
            if skipped:
                self.bar.set_postfix(skipped=self.skipped, refresh=False)
        elif self.done >= self.total or time.perf_counter() - self.last >= 10.0:
            self.last = time.perf_counter()
            rate = self.done / max(self.last - self.t0, 1e-9)
            log.info("%s: %d/%d files, %.0f files/s, %d skipped", self.desc, self.done, self.total, rate,
                     self.skipped)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- main entry

def _check_settings(val_fraction: float, test_fraction: float, resize: str, channels: str) -> None:
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
            raise PreprocessError(f"{name}: expected a number in [0, 1), got {v!r}")
    if val_fraction + test_fraction >= 1.0:
        raise PreprocessError(f"val_fraction + test_fraction must be below 1 (no train images left), "
                              f"got {val_fraction} + {test_fraction}")
    if resize not in RESIZE_MODES:
        raise PreprocessError(f"resize: expected one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if channels not in ("rgb", "gray"):
        raise PreprocessError(f"channels: expected 'rgb' or 'gray', got {channels!r}")


def _check_paths(src: Path, out: Path) -> None:
    if not src.exists():
        raise PreprocessError(f"SRC: folder not found: {src}")
    if not src.is_dir():
        raise PreprocessError(f"SRC: not a folder: {src}")
    rs, ro = src.resolve(), out.resolve()
    if ro == rs or rs in ro.parents or ro in rs.parents:
        raise PreprocessError(f"OUT ({out}) must not be SRC ({src}), inside it, or contain it")


def preprocess(src: str | os.PathLike, out: str | os.PathLike, *, size: int | str | Sequence[int],
               resize: str = "crop", val_fraction: float = 0.1, test_fraction: float = 0.0, seed: int = 0,
               workers: int | None = None, channels: str = "rgb", overwrite: bool = False,
               progress: bool | None = None) -> Store:
    """Decode an image folder once into a dataset store at `out` and return it.

    Args:
      src: SRC/<class>/**/<image>, or SRC/<split>/<class>/**/<image> with split
        folders train/val/test (then the folder's own split is kept and the
        fractions are ignored).
      out: the store directory; must not exist unless `overwrite`.
      size: target H or (H, W) / "HxW".
      resize: "crop" (cover, centre crop), "pad" (fit, zero padding) or "stretch".
      val_fraction, test_fraction: share of each class assigned to val/test by
        a hash of (seed, class, relative path).
      seed: split seed.
      workers: decoding processes; None or 0 = every core, 1 = in this process.
      channels: "rgb" (3 planes) or "gray" (1 luma plane).
      overwrite: replace an existing store at `out` (only once the new one is complete).
      progress: show a progress bar; None = only on an interactive terminal.

    Returns:
      The written `Store`.

    Raises:
      PreprocessError (a ValueError): SRC missing, no images, fewer than two
      classes, a class without a single decodable image, bad settings.
    """
    t0 = time.perf_counter()
    src_p, out_p = Path(src), Path(out)
    hw = parse_size(size)
    _check_settings(val_fraction, test_fraction, resize, channels)
    _check_paths(src_p, out_p)
    check_output(out_p.absolute(), overwrite)
    if workers is not None and int(workers) < 0:
        raise PreprocessError(f"workers: expected a positive number (or 0 for every core), got {workers!r}")
    n_workers = int(workers) if workers else (os.cpu_count() or 1)
    show = sys.stderr.isatty() if progress is None else bool(progress)

    scan = scan_folder(src_p)
    if not scan.candidates:
        raise PreprocessError(f"SRC: no image files found in {src_p} (expected SRC/<class>/<image> or "
                              f"SRC/<train|val|test>/<class>/<image>; {len(scan.skipped)} entries skipped)")
    # The pool starts (imports numpy/Pillow/imagecodecs in the workers) while
    # this process reads the headers: pass 1 is a few bytes per file.
    starter = pool_future = None
    if n_workers > 1 and len(scan.candidates) > n_workers:
        starter = ThreadPoolExecutor(1, thread_name_prefix="cnnpipe-pool-start")
        pool_future = starter.submit(_make_pool, n_workers)
    try:
        # ---- pass 1: what is there
        bar = _Progress(show, len(scan.candidates), "scanning")
        ok: list[_Candidate] = []
        for chunk in _chunks(scan.candidates, _PROBE_CHUNK):
            bad = 0
            for cand in chunk:
                err, cand.bit_depth = _probe_one(cand.path)
                if err is None:
                    ok.append(cand)
                else:
                    bad += 1
                    kind = "empty" if err.endswith("empty file (0 bytes)") else "not_image"
                    _skip(scan, cand.rel, kind, err)
            bar.update(len(chunk), bad)
        bar.close()
        classes = sorted({c.class_name for c in ok})
        if not classes:
            raise PreprocessError(f"SRC: no images in {src_p}: {len(scan.candidates)} files, none a "
                                  f"recognised image ({_reason_counts(scan.skipped)})")
        if len(classes) < 2:
            raise PreprocessError(f"SRC: only one class ({classes[0]!r}) in {src_p}; a classifier needs at "
                                  "least two class folders")
        for cand in ok:
            if cand.split is None:
                cand.split = assign_split(seed, cand.class_name, cand.class_rel, val_fraction, test_fraction)
        dtype = "uint16" if any(c.bit_depth == 16 for c in ok) else "uint8"

        # ---- pass 2: decode, resize, write
        while True:
            try:
                pool = pool_future.result() if pool_future is not None else None
                return _convert_and_write(scan, ok, classes, dtype, hw, resize, channels, src_p, out_p,
                                          overwrite, pool, n_workers, show, t0,
                                          dict(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction))
            except _NeedsUint16 as exc:
                if dtype == "uint16":
                    raise
                log.info("%s decoded as 16-bit; restarting with a uint16 store", exc)
                dtype = "uint16"
    finally:
        if starter is not None:
            try:
                pool = pool_future.result()  # waits if still starting, so no worker outlives us
            except Exception:
                pool = None
            if pool is not None:
                pool.terminate()
                pool.join()
            starter.shutdown()


def _reason_counts(skipped: Sequence[dict[str, str]]) -> str:
    counts = Counter(s["kind"] for s in skipped)
    return ", ".join(f"{k}: {v}" for k, v in counts.most_common()) or "none"


def _split_order(scan: _Scan) -> list[str]:
    if scan.layout == "splits":
        present = {d[2] for d in scan.class_dirs}
        return [s for s in SPLIT_NAMES if s in present]
    return list(SPLIT_NAMES)


def _convert_and_write(scan: _Scan, ok: list[_Candidate], classes: list[str], dtype: str, hw: tuple[int, int],
                       resize: str, channels: str, src: Path, out: Path, overwrite: bool, pool: Any,
                       n_workers: int, show: bool, t0: float, split_cfg: dict[str, Any]) -> Store:
    class_index = {c: i for i, c in enumerate(classes)}
    splits = _split_order(scan)
    if scan.layout == "classes":
        splits = [s for s in splits if s == "train" or split_cfg[f"{s}_fraction"] > 0]
    order = {s: i for i, s in enumerate(splits)}
    todo = sorted(ok, key=lambda c: (order[c.split], class_index[c.class_name], c.class_rel))
    capacity = Counter(c.split for c in todo)
    n_ch = 3 if channels == "rgb" else 1
    cfg = _ConvertSettings(hw, resize, channels, dtype)
    stats_split = "train" if capacity.get("train") else None  # None: every split (no train images)
    jobs = ((chunk, cfg) for chunk in _chunks([(c.path, stats_split in (None, c.split)) for c in todo],
                                              _CONVERT_CHUNK))
    sums, sumsq, n_pix = [0] * n_ch, [0] * n_ch, 0
    per_class = {s: Counter() for s in splits}
    decode_failed: list[tuple[_Candidate, str]] = []
    bar = _Progress(show, len(todo), "decoding")
    with StoreWriter(out, overwrite=overwrite) as writer:
        for s in splits:
            writer.create_split(s, capacity.get(s, 0), hw, n_ch, dtype)
        i = 0
        for chunk in _ordered_map(pool, _convert_chunk, jobs, 4 * n_workers):
            bad = 0
            for res in chunk:
                cand = todo[i]
                i += 1
                if res[0] == "needs16":
                    raise _NeedsUint16(cand.rel)
                if res[0] == "error":
                    decode_failed.append((cand, res[1]))
                    bad += 1
                    continue
                _, img, s1, s2, cand.digest = res
                writer.append(cand.split, img, class_index[cand.class_name], cand.rel)
                per_class[cand.split][cand.class_name] += 1
                if s1 is not None:
                    sums = [a + b for a, b in zip(sums, s1)]
                    sumsq = [a + b for a, b in zip(sumsq, s2)]
                    n_pix += img.shape[0] * img.shape[1]
            bar.update(len(chunk), bad)
        bar.close()

        for cand, reason in decode_failed:
            _skip(scan, cand.rel, "decode_error", reason)
        stored = Counter()
        for s in splits:
            stored.update(per_class[s])
        missing = [c for c in classes if not stored[c]]
        if missing:
            examples = "; ".join(r for c, r in decode_failed if c.class_name in missing[:3])[:600]
            raise PreprocessError(f"no image could be decoded for class(es) {', '.join(missing)} "
                                  f"(every class needs at least one): {examples}")
        mean, std = _mean_std(sums, sumsq, n_pix, n_ch)
        counts = {s: {"total": sum(per_class[s].values()),
                      "per_class": {c: per_class[s][c] for c in classes}} for s in splits}
        elapsed = time.perf_counter() - t0
        report = _build_report(scan, ok, classes, counts, src, elapsed)
        channel_names = ["R", "G", "B"] if n_ch == 3 else ["L"]
        meta = build_meta(classes=classes, dtype=dtype, size=hw, channel_names=channel_names, splits=splits,
                          counts=counts, mean=mean, std=std,
                          stats_split=stats_split or "all", layout=scan.layout, resize=resize,
                          source=str(src.absolute()), num_images=sum(stored.values()), **split_cfg)
        writer.commit(meta, report)
    return load_store(out)


def _mean_std(sums: list[int], sumsq: list[int], n: int, n_ch: int) -> tuple[list[float], list[float]]:
    if n == 0:
        return [0.0] * n_ch, [1.0] * n_ch
    mean = [s / n for s in sums]
    # n * sumsq - sum^2 is exact in Python integers: no cancellation error
    std = [math.sqrt(max(n * q - s * s, 0)) / n for s, q in zip(sums, sumsq)]
    return mean, std


def _build_report(scan: _Scan, ok: list[_Candidate], classes: list[str], counts: dict[str, Any], src: Path,
                  elapsed: float) -> dict[str, Any]:
    by_hash: dict[str, list[_Candidate]] = {}
    for c in ok:
        if c.digest:  # stored images only
            by_hash.setdefault(c.digest, []).append(c)
    duplicates = []
    for digest, group in by_hash.items():
        if len(group) < 2:
            continue
        duplicates.append({
            "hash": f"sha256-128:{digest}",
            "files": [{"path": c.rel, "class": c.class_name, "split": c.split} for c in group],
            "cross_split": len({c.split for c in group}) > 1,
            "cross_class": len({c.class_name for c in group}) > 1,
        })
    duplicates.sort(key=lambda d: d["files"][0]["path"])
    # a class folder with no image in it is reported, not a class
    with_images = {(c.class_name, c.split if scan.layout == "splits" else None) for c in ok}
    empty = [rel for rel, name, split in scan.class_dirs if (name, split) not in with_images]
    skipped = sorted(scan.skipped, key=lambda s: s["path"])
    return {
        "source": str(src.absolute()),
        "layout": scan.layout,
        "counts": {
            "files_found": len(scan.candidates),
            "images_stored": sum(v["total"] for v in counts.values()),
            "skipped": len(skipped),
            "skipped_by_kind": dict(Counter(s["kind"] for s in skipped).most_common()),
            "duplicate_groups": len(duplicates),
            "duplicate_files": sum(len(d["files"]) for d in duplicates),
            "cross_split_duplicate_groups": sum(d["cross_split"] for d in duplicates),
            "empty_class_folders": len(empty),
        },
        "skipped": skipped,
        "empty_class_folders": empty,
        "duplicates": duplicates,
        "cross_split_duplicates": [d for d in duplicates if d["cross_split"]],
        "elapsed_s": round(elapsed, 3),
    }


def format_summary(store: Store) -> str:
    """A short human summary of a store: images per split and class, skipped files, duplicates, time."""
    meta, report = store.meta, store.report
    h, w = store.size
    lines = [f"{store.path}: {meta['num_images']} images, {len(store.classes)} classes, "
             f"{h}x{w}x{store.channels} {meta['dtype']} ({report['layout']} layout)"]
    width = max(len("class"), *(len(c) for c in store.classes))
    lines.append(f"  {'class':<{width}}  " + "  ".join(f"{s:>7}" for s in store.splits))
    for c in store.classes:
        lines.append(f"  {c:<{width}}  " + "  ".join(f"{meta['counts'][s]['per_class'][c]:>7}"
                                                     for s in store.splits))
    lines.append(f"  {'total':<{width}}  " + "  ".join(f"{meta['counts'][s]['total']:>7}" for s in store.splits))
    rc = report["counts"]
    kinds = ", ".join(f"{k} {v}" for k, v in rc["skipped_by_kind"].items())
    lines.append(f"skipped {rc['skipped']} files" + (f" ({kinds})" if kinds else "")
                 + (f"; empty class folders: {', '.join(report['empty_class_folders'])}"
                    if report["empty_class_folders"] else ""))
    lines.append(f"duplicates: {rc['duplicate_groups']} groups, {rc['duplicate_files']} files, "
                 f"{rc['cross_split_duplicate_groups']} crossing splits")
    lines.append(f"done in {report['elapsed_s']:.1f} s; details in {store.path / 'report.json'}")
    return "\n".join(lines)
