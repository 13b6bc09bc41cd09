"""Where `cnnpipe preprocess` prepares its files: this machine's worker pool, or a Dask cluster.

An engine maps a per-job function over a file list, a range ("job") of files at a time, and
yields one result per file in file order. Both engines run the same job function in the same
kind of worker process (`cnnpipe.datasets.workers.WorkerPool`), so the per-file rules are one
piece of code: each file within `--file-timeout`, a file that kills its process retried once
in a fresh one, then reported. The engines differ only in where those pools run:

- `LocalEngine`: one pool of `--workers` processes on this machine; pixels come back over pipes.
- `cnnpipe.datasets.dask_engine.DaskEngine`: a pool of one process per Dask worker thread; each
  task (a range of a few hundred files) writes its rows to a shard file beside OUT, and this
  process reads them back in file order, so the store is the local engine's, byte for byte.

The pool, or the Dask cluster, starts in a thread while this process reads the files' headers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from cnnpipe.datasets.preprocess_settings import ENGINES
from cnnpipe.datasets.workers import WorkerPool, chunks, in_daemon_thread, make_pool, ordered_map

__all__ = ["ENGINES", "Engine", "LocalEngine", "engine_started_early"]

_START_WAIT_S = 15   # a local pool or cluster starts in a second or two; a remote one may hang forever


class Engine(Protocol):
    """What `preprocess` needs of an engine."""

    name: str
    workers: int

    def map(self, fn: Callable[[list], list], items: list, job_size: int, on_death: Callable[[Any, str], Any]
            ) -> Iterator[Any]:
        """`fn` over `items`, `job_size` at a time; one result per item, in order. An item whose worker
        process died on it (twice, or once past its deadline) gets `on_death(item, how)`."""
        ...

    def describe(self) -> str:
        """'local engine, 2 worker processes', for the progress line and the summary."""
        ...

    def close(self) -> None:
        """Stop its workers (and tasks), remove what it wrote; a second call does nothing."""
        ...


class LocalEngine:
    """This machine's worker pool (None: the files are prepared in this process)."""

    name = "local"

    def __init__(self, pool: WorkerPool | None, workers: int) -> None:
        self.pool, self.workers = pool, workers if pool is not None else 1

    def map(self, fn: Callable[[list], list], items: Iterable, job_size: int, on_death: Callable[[Any, str], Any]
            ) -> Iterator[Any]:
        # 4 jobs per worker in flight: each has one running, one queued, and results wait to be stored
        for out in ordered_map(self.pool, fn, chunks(items, job_size), 4 * self.workers, on_death=on_death):
            yield from out

    def describe(self) -> str:
        return f"local engine, {self.workers} worker process{'es' if self.workers != 1 else ''}"

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


@contextlib.contextmanager
def engine_started_early(name: str, workers: int, num_files: int, out: Path, *, scheduler: str | None = None,
                         scheduler_file: str | None = None) -> Iterator[Callable[[], Engine]]:
    """Start an engine in a thread; yields a function that waits for it.

    Local: a pool of `workers` processes (none for one worker or as few files as workers). Dask: a
    client of the cluster at `scheduler` / `scheduler_file`, or of a local cluster of `workers`
    worker threads; its shard folder is made beside `out`. On exit the engine is closed (workers
    terminated, tasks cancelled, shards removed), whether it was used or not.

    Raises (from the function it yields): PreprocessError (a ValueError) for a cluster that cannot
    be used, with one line saying why; OSError where the shard folder cannot be made.
    """
    def start() -> Any:
        if name == "dask":
            from cnnpipe.datasets.dask_engine import DaskEngine  # dask is an optional extra

            return DaskEngine(out, workers=workers, scheduler=scheduler, scheduler_file=scheduler_file)
        use_pool = workers > 1 and num_files > workers
        return LocalEngine(make_pool(workers) if use_pool else None, workers)

    future = in_daemon_thread(start, "cnnpipe-engine-start")
    try:
        yield future.result
    finally:
        try:   # an engine still starting (Ctrl-C came early) is waited for, a while, to be closed
            engine = future.result(timeout=_START_WAIT_S)
        except BaseException:
            engine = None
        if engine is not None:
            engine.close()
