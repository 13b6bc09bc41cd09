"""The Dask engine of `cnnpipe preprocess`: the files prepared on a Dask cluster, the store written here.

Dask has no per-task timeout, cannot stop a running task, and gives every task a dead worker held a
strike, so it cannot tell which file killed a worker. The per-file rules therefore stay in cnnpipe's
own pool, inside each task: a task (a range of a few hundred files) runs the job function in a
`WorkerPool` of one process beside its Dask worker, exactly as the local engine does (deadline per
file, a file that kills its process retried once in a fresh one, then reported). Dask only places the
tasks and runs a task again elsewhere when its worker dies.

Each task writes its rows to a shard, an .npy file in a folder beside OUT (`.OUT.shards-HOST-PID-...`),
and returns the per-file results without pixels. This process reads the shards back in file order
and appends the rows to the store, so the store equals the local engine's byte for byte and no
machine holds more than a few tasks' rows. Shards are deleted as they are read, and the folder when
the engine closes; a killed run's folder is removed by the next run (`store.remove_stale_temporaries`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import secrets
import shutil
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.datasets.convert import Prepared
from cnnpipe.datasets.dask_connect import check_versions, connect, scheduler_address, within
from cnnpipe.datasets.dask_tasks import close_idle_pools, run_task, start_local_pools, start_pools, stop_tasks
from cnnpipe.datasets.preprocess_settings import NEEDS_DASK, PreprocessError
from cnnpipe.datasets.store import temp_name
from cnnpipe.datasets.workers import chunks

__all__ = ["DaskEngine"]

log = logging.getLogger("cnnpipe.datasets.preprocess")

_STOP_S = 10         # seconds to stop a run's tasks on the cluster before giving up on it
_TASK_MAX = 256      # files per task: Dask's per-task cost is milliseconds; 1,024 left workers idle at the end


class DaskEngine:
    """A Dask client: of the cluster at `scheduler` / `scheduler_file`, else of a local cluster of
    `workers` worker threads started here. Checks the workers' versions and that they see OUT's folder.

    Raises:
      PreprocessError: Dask is not installed, the scheduler cannot be reached or has no worker, a
        worker's versions differ from this process's, or a worker cannot see OUT's folder.
      OSError: the shard folder cannot be made beside OUT.
    """

    name = "dask"

    def __init__(self, out: Path, *, workers: int, scheduler: str | None = None,
                 scheduler_file: str | None = None) -> None:
        local = scheduler is None and scheduler_file is None
        if local:   # its worker threads are in this process: their pools start while Dask is imported
            threading.Thread(target=start_local_pools, args=(workers,), name="cnnpipe-pool-start",
                             daemon=True).start()
        try:
            import distributed
        except ImportError:
            raise PreprocessError(NEEDS_DASK) from None
        self._cluster, self._maps, self._key, self.client = None, [], secrets.token_hex(6), None
        self._cwd_checked, self._local = False, local
        out = out.absolute()
        self.shards = out.parent / temp_name(out, "shards")
        try:
            address = scheduler_address(scheduler_file) if scheduler_file is not None else scheduler
            if local:   # first: the local cluster keeps its scratch files in it
                self.shards.mkdir(parents=True)
            self.client = connect(distributed, workers, address, self.shards / "dask-workers")
            self.shards.mkdir(parents=True, exist_ok=True)
            self._cluster = self.client.cluster if local else None
            self._versions = check_versions(self.client)
            self.workers = sum(w["nthreads"] for w in self.client.scheduler_info()["workers"].values())
            self._require_visible(self.shards, "OUT's folder")
            if not local:
                self.client.run(start_pools)
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        where = "a local cluster" if self._cluster is not None else "the cluster"
        return f"dask engine, {self.workers} worker thread{'s' * (self.workers != 1)} on {where}"

    def map(self, fn: Callable[[list], list], items: Iterable, job_size: int, on_death: Callable[[Any, str], Any]
            ) -> Iterator[Any]:
        """`fn` over `items` on the cluster, tasks of up to 256 files; one result per item, in order
        (see `Engine.map`). Leaving the loop early stops this map's tasks on the cluster."""
        items = list(items)
        cwd = self._relative_paths_folder(items)
        size = max(job_size, min(_TASK_MAX, math.ceil(len(items) / (4 * max(1, self.workers)))))
        stop_key = f"{self._key}-{len(self._maps)}"
        self._maps.append(stop_key)
        futures: deque = deque()
        todo = enumerate(chunks(items, size))
        try:
            while True:
                for i, task in itertools.islice(todo, max(0, 3 * self.workers + 1 - len(futures))):
                    shard = self.shards / f"{stop_key}-{i:07d}.npy"
                    futures.append(self.client.submit(
                        run_task, fn, task, job_size, on_death, str(shard), (self._key, stop_key), cwd,
                        self._versions, key=f"cnnpipe-{stop_key}-{i}"))
                if not futures:
                    return
                done = _result(futures[0])
                if done is None:   # a bug guard: only a stopped run's tasks end early
                    raise PreprocessError(f"engine 'dask': task {futures[0].key} of a running map was stopped")
                yield from _read_back(done)
                futures.popleft()
        finally:
            if futures:
                self._stop(stop_key, list(futures))

    def _relative_paths_folder(self, items: list) -> str | None:
        """This process's folder when some item's path is relative (the workers then work in it), else None."""
        if not any(isinstance(it, tuple) and isinstance(it[0], str) and not os.path.isabs(it[0]) for it in items):
            return None
        if not self._cwd_checked:
            self._require_visible(Path.cwd(), "the current folder (SRC is a relative path)")
            self._cwd_checked = True
        return os.getcwd()

    def _require_visible(self, folder: Path, what: str) -> None:
        seen = self.client.run(os.path.isdir, str(folder))
        blind = sorted(addr for addr, ok in seen.items() if not ok)
        if blind:
            raise PreprocessError(f"engine 'dask': worker {blind[0]} cannot see {what} {folder}; every worker "
                                  "must mount it at the same path (a shared filesystem)")

    def _stop(self, key: str, futures: list) -> None:
        """Cancel `futures` and stop the tasks of `key` already running (Dask itself cannot)."""
        try:   # bounded: a cluster that does not answer must not hold up Ctrl-C
            within(_STOP_S, lambda: (self.client.cancel(futures), self.client.run(stop_tasks, key)))
        except Exception as exc:   # a cluster going away (or gone): nothing left running there to stop
            log.debug("stopping the Dask tasks: %r", exc)

    def close(self) -> None:
        """Stop this engine's tasks, close the client (and the local cluster), remove the shards."""
        try:
            if self.client is not None:
                if self._maps:
                    self._stop(self._key, [])
                self.client.close(timeout=10)
            if self._cluster is not None:
                self._cluster.close(timeout=10)
        except Exception as exc:
            log.debug("closing the Dask client: %r", exc)
        finally:
            if self._local:   # its workers were threads of this process: their pools are ours
                close_idle_pools()
            shutil.rmtree(self.shards, ignore_errors=True)


def _result(future: Any) -> Any:
    """A task's result; a cluster that lost the task's workers again and again is one PreprocessError line."""
    try:
        return future.result()
    except ImportError as exc:   # a worker without cnnpipe (one that joined after the version check)
        raise PreprocessError(f"engine 'dask': a worker cannot run cnnpipe's tasks ({type(exc).__name__}: "
                              f"{exc}); install the client's cnnpipe on every worker") from None
    except Exception as exc:
        if type(exc).__name__ in ("KilledWorker", "FutureCancelledError", "CancelledError"):
            raise PreprocessError(f"engine 'dask': the cluster lost task {getattr(future, 'key', '?')} "
                                  f"({type(exc).__name__}): the Dask workers running it died again and again "
                                  "(out of memory?), or the cluster closed") from None
        raise


def _read_back(done: tuple[str | None, list]) -> Iterator[Any]:
    """A task's results with their pixels read back from its shard, which is then deleted."""
    shard, results = done
    rows = np.load(shard, mmap_mode="r") if shard is not None else None
    k = 0
    try:
        for r in results:
            if isinstance(r, Prepared):
                r = dataclasses.replace(r, pixels=np.array(rows[k]))
                k += 1
            yield r
    finally:
        del rows
        if shard is not None:
            Path(shard).unlink(missing_ok=True)
