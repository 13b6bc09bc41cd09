"""Start the preprocess worker pool in a thread while the parent reads the files' headers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cnnpipe.datasets.workers import make_pool

__all__ = ["pool_started_early"]


@contextlib.contextmanager
def pool_started_early(workers: int, num_files: int) -> Iterator[Callable[[], Any]]:
    """Start the worker pool in a thread; yields a function that waits for it (None: no pool).

    The pool starts (imports numpy/Pillow/imagecodecs in the workers) while this
    process reads the headers: pass 1 is a few bytes per file. On exit the pool is
    waited for and terminated, so no worker outlives the run.
    """
    if workers <= 1 or num_files <= workers:
        yield lambda: None
        return
    starter = ThreadPoolExecutor(1, thread_name_prefix="cnnpipe-pool-start")
    future = starter.submit(make_pool, workers)
    try:
        yield future.result
    finally:
        try:
            pool = future.result()
        except Exception:
            pool = None
        if pool is not None:
            pool.close()
        starter.shutdown()
