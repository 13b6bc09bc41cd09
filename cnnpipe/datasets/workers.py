"""Worker processes and progress for `cnnpipe preprocess`: a pool that never imports jax,
an in-order map with bounded memory, and a progress display.

Workers are started by a fork server (never a plain fork: the parent may hold
jax/XLA threads) that has already imported the decoding stack, and they
ignore Ctrl-C: the parent alone handles it and terminates the pool.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
import time
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

__all__ = ["Progress", "chunks", "make_pool", "ordered_map"]

log = logging.getLogger("cnnpipe.datasets.preprocess")


def _worker_init() -> None:
    # Ctrl-C goes to the whole process group; the parent alone handles it and
    # terminates the pool, so workers must not die mid-result with tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def chunks(seq: Sequence[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(seq), n):
        yield list(seq[i:i + n])


def ordered_map(pool: Any, fn: Callable[[Any], Any], jobs: Iterable[Any], window: int) -> Iterator[Any]:
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


WORKER_PRELOAD = ["cnnpipe.datasets.preprocess", "imagecodecs", "tifffile", "PIL.JpegImagePlugin", "PIL.PngImagePlugin",
                   "PIL.TiffImagePlugin", "PIL.BmpImagePlugin", "PIL.GifImagePlugin", "PIL.WebPImagePlugin"]


def make_pool(workers: int) -> Any:
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
        ctx.set_forkserver_preload(WORKER_PRELOAD)
    else:
        ctx = multiprocessing.get_context("spawn")
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        return ctx.Pool(workers, initializer=_worker_init)
    finally:
        if main is not None:
            sys.modules["__main__"] = main


class Progress:
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
