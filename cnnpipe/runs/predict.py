"""`cnnpipe predict` at scale: files, folders and @lists -> one row per file, streamed in input order.

Inputs are expanded lazily (a folder is walked as preprocess walks a class folder:
recursively, sorted, hidden and AppleDouble files skipped, any extension: magic
bytes decide), prepared in the worker pool through the one image path (the pixels
a store holds for the file, tolerance 0), and batched to the device while the
workers prepare the next files. A file that cannot be read, decoded or matched to
the model gets its reason and the run goes on; a worker that dies is replaced and
its files retried (`cnnpipe.datasets.workers`). Nothing per file is kept beyond
its output row, so memory stays flat however many files there are.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnpipe.datasets.convert import DEFAULT_FILE_TIMEOUT, Failure, NeedsDtype, Prepared, convert_items, worker_died
from cnnpipe.datasets.workers import chunks, make_pool, ordered_map
from cnnpipe.images.transform import ImageSpec
from cnnpipe.runs.load import Run, spec_for_run

__all__ = ["Prediction", "expand_sources", "predict_files"]

_CHUNK = 16  # files per pool job: small files cost more in round trips than in decoding


@dataclass(frozen=True)
class Prediction:
    """One input file's outcome: its top-k (class, probability), most likely first, or its error.

    A multi-label or regression run's file has `outputs` instead: every label's probability (and
    `chosen`, the labels at or above their thresholds) or every target's predicted value.
    """

    path: str
    top: tuple[tuple[str, float], ...] = ()
    error: str | None = None
    outputs: tuple[float, ...] = ()
    chosen: tuple[str, ...] = ()


def expand_sources(sources: Sequence[str], nonempty: bool = False) -> Iterator[str]:
    """Every input file, in order: files as given, folders walked, ``@LIST`` files read (one path per line).

    A path that does not exist is yielded as it is: its row then says why it was not read.
    List files are read as bytes, so names that are not UTF-8 work; empty lines and lines
    starting with ``#`` (after any spaces) are skipped; relative paths are relative to the working directory.

    Raises:
      FileNotFoundError: with `nonempty`, when no source exists.
      ValueError: with `nonempty`, when the sources hold no file at all (empty folders, lists of
        no path): one line naming each, raised before anything is predicted or written.
      OSError: a list file cannot be read.
    """
    files = _expand(sources)
    if not nonempty:
        return files
    if not any(os.path.exists(s[1:] if s.startswith("@") else s) for s in sources):
        raise FileNotFoundError(f"{sources[0]}: no input exists (give image files, folders or @LIST files)")
    first = next(files, None)
    if first is None:
        raise ValueError("no input file found: " + "; ".join(
            f"{s}: {'lists no path' if s.startswith('@') else 'holds no file (hidden ones are skipped)'}"
            for s in sources))
    return itertools.chain([first], files)


def _expand(sources: Sequence[str]) -> Iterator[str]:
    for src in sources:
        if src.startswith("@") and len(src) > 1:
            with open(src[1:], "rb") as f:  # an unreadable list is an input error (exit 2)
                for raw in f:
                    raw = raw.rstrip(b"\r\n")
                    if raw.strip() and not raw.lstrip().startswith(b"#"):
                        yield from _walk(os.fsdecode(raw))
        else:
            yield from _walk(src)


def _walk(path: str) -> Iterator[str]:
    if not os.path.isdir(path):
        yield path
        return
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):  # hidden files and AppleDouble ._* metadata
                yield os.path.join(root, name)


def predict_files(run: Run, paths: Iterable[str], *, top_k: int = 3, batch_size: int = 64,
                  workers: int | None = None, tta: bool = False,
                  file_timeout: float = DEFAULT_FILE_TIMEOUT) -> Iterator[Prediction]:
    """A `Prediction` per path, in input order, streamed.

    Args:
      workers: preparing processes; None or 0 = every core, 1 = in this process.
      batch_size: images per device batch (the last one is padded, so the program compiles once).
      tta: average the probabilities over the test-time augmentation views of the run
        (`cnnpipe.training.augment.tta_views`).
      file_timeout: seconds a worker process may spend on one file (0: none); past it the file's row is
        a timeout error and the process is replaced (not enforced with `workers` 1: this process).
    """
    from flax import nnx

    from cnnpipe.training.augment import tta_views
    from cnnpipe.training.steps import predict_probs

    if top_k < 1 or batch_size < 1:
        raise ValueError(f"--top-k and --batch-size must be >= 1, got {top_k} and {batch_size}")
    spec, k = spec_for_run(run.info), min(top_k, len(run.classes))
    task = None if run.task.is_classification else run.task
    if task is not None:   # every label's probability (and the chosen set) or every target's value
        k = _Outputs(task, run.thresholds)
    graphdef, state = nnx.split(run.model())
    state, put, batch_size = _over_local_devices(state, batch_size)
    workers = int(workers) if workers else (os.cpu_count() or 1)
    pool = make_pool(workers) if workers > 1 else None
    try:
        views = tta_views(run.cfg.augment) if tta else ()
        step = lambda x: predict_probs(graphdef, (state,), put(x), views, task)  # noqa: E731
        yield from _batched(_prepared(pool, paths, spec, workers, file_timeout), spec, step, run.classes, k,
                            batch_size)
    finally:
        if pool is not None:
            pool.close()


def _prepared(pool, paths: Iterable[str], spec: ImageSpec, workers: int, timeout: float = 0.0
              ) -> Iterator[tuple[tuple, Prepared | Failure | NeedsDtype]]:
    """(item, result) in input order; the pool prepares the files ahead of the caller."""
    sent: deque[list[tuple]] = deque()

    def jobs() -> Iterator[list[tuple]]:
        for job in chunks(((p, False, spec) for p in paths), _CHUNK):
            sent.append(job)
            yield job

    for out in ordered_map(pool, functools.partial(convert_items, timeout=timeout), jobs(), 4 * workers,
                           on_death=functools.partial(worker_died, timeout=timeout)):
        yield from zip(sent.popleft(), out)


def _over_local_devices(state: Any, batch_size: int) -> tuple[Any, Callable[[np.ndarray], Any], int]:
    """(state, batch placement, batch size) for data-parallel inference over every local device.

    The training mesh (`cnnpipe.training.mesh`): the batch split over the devices (its size
    rounded up to a multiple of their count), the parameters replicated.
    """
    from cnnpipe.training.mesh import make_mesh, replicate, shard_batch

    mesh = make_mesh(0)
    batch_size = -(-batch_size // mesh.size) * mesh.size
    return replicate(mesh, state), lambda x: shard_batch(mesh, x)[0], batch_size


def _batched(results: Iterator[tuple[tuple, Prepared | Failure | NeedsDtype]], spec: ImageSpec,
             step: Callable[[np.ndarray], Any], classes: Sequence[str], k: int, batch_size: int
             ) -> Iterator[Prediction]:
    """Device batches of the prepared images; each batch's rows come out while the next one is prepared."""
    x = np.zeros((batch_size, *spec.size, spec.num_planes), np.float32)  # raw values; the model normalises
    pending: list[tuple[str, Prepared | Failure | NeedsDtype]] = []
    n_ok, in_flight = 0, None
    for item, res in results:
        pending.append((item[0], res))
        if isinstance(res, Prepared):
            x[n_ok] = res.pixels
            n_ok += 1
        if n_ok == batch_size:
            probs = step(x.copy())  # dispatched, not waited for
            if in_flight is not None:
                yield from _rows(*in_flight, classes, k)
            in_flight, pending, n_ok = (pending, probs), [], 0
    if in_flight is not None:
        yield from _rows(*in_flight, classes, k)
    if pending:
        probs = step(x.copy()) if n_ok else None
        yield from _rows(pending, probs, classes, k)


@dataclass(frozen=True)
class _Outputs:
    """How a multi-label or regression run's outputs become a `Prediction` (in place of top-k)."""

    task: Any
    thresholds: Any

    def __call__(self, path: str, row: np.ndarray) -> Prediction:
        chosen = ()
        if self.task.kind == "multilabel":
            chosen = tuple(n for n, hit in zip(self.task.names, self.task.decide(row[None], self.thresholds)[0]) if hit)
        return Prediction(path, outputs=tuple(float(v) for v in row), chosen=chosen)


def _rows(entries: list, probs, classes: Sequence[str], k: Any) -> Iterator[Prediction]:
    p = np.asarray(probs) if probs is not None else None
    i = 0
    for path, res in entries:
        if isinstance(res, Prepared) and isinstance(k, _Outputs):
            yield k(path, p[i])
            i += 1
        elif isinstance(res, Prepared):
            order = np.argsort(-p[i], kind="stable")[:k]
            yield Prediction(path, tuple((classes[j], float(p[i, j])) for j in order))
            i += 1
        else:
            yield Prediction(path, error=res.message)


def summary_line(done: int, failed: int, seconds: float) -> str:
    """E.g. "predicted 2000 files, 3 failed, 4.1 s, 488 images/s"."""
    return (f"predicted {done} files, {failed} failed, {seconds:.1f} s, "
            f"{done / max(seconds, 1e-9):.0f} images/s")


def timed(predictions: Iterable[Prediction]) -> tuple[Iterator[Prediction], dict[str, float]]:
    """`predictions` passed through, counting files, failures and seconds into the returned dict."""
    stats = {"done": 0, "failed": 0, "seconds": 0.0}
    t0 = time.perf_counter()

    def gen() -> Iterator[Prediction]:
        for pred in predictions:
            stats["failed" if pred.error else "done"] += 1
            yield pred
        stats["seconds"] = time.perf_counter() - t0

    return gen(), stats
