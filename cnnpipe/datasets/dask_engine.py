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
import functools
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.datasets.convert import Prepared
from cnnpipe.datasets.preprocess_settings import NEEDS_DASK, PreprocessError
from cnnpipe.datasets.store import RowStream, temp_name
from cnnpipe.datasets.workers import PoolStopped, WorkerPool, chunks, ordered_map

__all__ = ["DaskEngine", "KILL_DASK_ENV"]

log = logging.getLogger("cnnpipe.datasets.preprocess")

KILL_DASK_ENV = "CNNPIPE_TEST_KILL_DASK_WORKER_ON"   # test hook: SIGKILL a Dask worker (once) on a task
_TASK_MAX = 256      # files per task: Dask's per-task cost is milliseconds; 1,024 left workers idle at the end
_CONNECT_S = 30      # seconds to reach a scheduler, and for its first worker to connect
# the packages whose versions decide a store's bytes (decoders) or whether tasks run at all
_VERSIONED = ("cnnpipe", "dask", "distributed", "numpy", "pillow", "imagecodecs", "tifffile")


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
            threading.Thread(target=_start_pools, args=(workers,), name="cnnpipe-pool-start", daemon=True).start()
        try:
            import distributed
        except ImportError:
            raise PreprocessError(NEEDS_DASK) from None
        self._cluster, self._maps, self._key, self.client = None, [], secrets.token_hex(6), None
        out = out.absolute()
        self.shards = out.parent / temp_name(out, "shards")
        self.shards.mkdir(parents=True)   # first: a local cluster's workers keep their scratch files in it
        try:
            self.client = _connect(distributed, workers, scheduler, scheduler_file, self.shards / "dask-workers")
            self._cluster = self.client.cluster if local else None
            self._versions = _check_versions(self.client)
            self.workers = sum(w["nthreads"] for w in self.client.scheduler_info()["workers"].values())
            self._require_visible(self.shards, "OUT's folder")
            if not local:
                self.client.run(start_pools)
            self._cwd_checked = False
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
                for i, task in _take(todo, 3 * self.workers + 1 - len(futures)):
                    shard = self.shards / f"{stop_key}-{i:07d}.npy"
                    futures.append(self.client.submit(
                        run_task, fn, task, job_size, on_death, str(shard), (self._key, stop_key), cwd,
                        self._versions, key=f"cnnpipe-{stop_key}-{i}"))
                if not futures:
                    return
                yield from _read_back(_result(futures[0]))
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
        try:
            self.client.cancel(futures)
            self.client.run(stop_tasks, key)
        except Exception as exc:   # a cluster going away: nothing left running there to stop
            log.debug("stopping the Dask tasks: %r", exc)

    def close(self) -> None:
        """Stop this engine's tasks, close the client (and the local cluster), remove the shards."""
        try:
            if self.client is None:
                return
            if self._maps:
                self._stop(self._key, [])
            self.client.close(timeout=10)
            if self._cluster is not None:
                self._cluster.close(timeout=10)
                _close_idle_pools()   # its workers were threads of this process: their pools are ours
        except Exception as exc:
            log.debug("closing the Dask client: %r", exc)
        finally:
            shutil.rmtree(self.shards, ignore_errors=True)


def _take(it: Iterator, n: int) -> list:
    out = []
    for _ in range(max(0, n)):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def _connect(distributed: Any, workers: int, scheduler: str | None, scheduler_file: str | None,
             scratch: Path) -> Any:
    """A client of the scheduler, or of a new local cluster (its workers' files in `scratch`, removed with
    the shards); PreprocessError in one line if none can be had."""
    try:
        if scheduler is None and scheduler_file is None:
            import dask

            # worker threads, not processes: the files are prepared in cnnpipe's own pool processes (one per
            # thread) either way, and worker processes would add start-up time and a second copy of each row
            with dask.config.set({"temporary-directory": str(scratch)}):   # its scratch and lock files
                cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=False,
                                                   dashboard_address=None, silence_logs=logging.ERROR)
            return distributed.Client(cluster)
        client = distributed.Client(scheduler, scheduler_file=scheduler_file, timeout=_CONNECT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        where = scheduler or scheduler_file or "a local cluster"
        raise PreprocessError(f"engine 'dask': cannot connect to {where}: {str(exc).splitlines()[0][:200]}"
                              ) from None
    try:
        client.wait_for_workers(1, timeout=_CONNECT_S)
    except (TimeoutError, OSError):
        client.close()
        raise PreprocessError(f"engine 'dask': no worker joined the scheduler {client.scheduler.address} "
                              f"within {_CONNECT_S} s") from None
    return client


def _check_versions(client: Any) -> dict[str, str | None]:
    """This process's versions of `_VERSIONED` (and Python); PreprocessError naming the first worker
    whose versions differ (or that lacks cnnpipe): decoders of other versions could store other pixels,
    and the store must not depend on where a file was prepared. Workers that join later are checked by
    each task (`run_task`)."""
    found = client.get_versions(packages=list(_VERSIONED))
    mine = found["client"]["packages"]
    hosts = [(f"the scheduler {client.scheduler.address}", found["scheduler"]["packages"], ("dask", "distributed"))]
    hosts += [(f"worker {a}", v["packages"], _VERSIONED) for a, v in sorted(found["workers"].items())]
    for where, theirs, names in hosts:
        if (problem := _mismatch(where, mine, theirs, names)) is not None:
            raise PreprocessError(problem)
    return {k: mine.get(k) for k in ("python", *_VERSIONED)}


def _mismatch(where: str, mine: dict, theirs: dict, names: tuple[str, ...]) -> str | None:
    """Why `theirs` (versions by package, as `distributed.versions` gives them) cannot serve `mine`, or None."""
    py_mine, py_theirs = ".".join(mine["python"].split(".")[:2]), ".".join(theirs["python"].split(".")[:2])
    if py_mine != py_theirs:
        return f"engine 'dask': {where} runs Python {py_theirs}, this process {py_mine}"
    for pkg in names:
        if theirs.get(pkg) != mine.get(pkg):
            has = "lacks it" if theirs.get(pkg) is None else f"has {theirs[pkg]}"
            return (f"engine 'dask': {where} {has}, this process has {pkg} {mine.get(pkg)}; install the same "
                    "versions everywhere (decoders decide a store's pixels)")
    return None


def _result(future: Any) -> Any:
    """A task's result; a cluster that lost the task's workers again and again is one PreprocessError line."""
    try:
        return future.result()
    except ImportError as exc:   # a worker without cnnpipe (one that joined after the version check)
        raise PreprocessError(f"engine 'dask': a worker cannot run cnnpipe's tasks ({type(exc).__name__}: "
                              f"{exc}); install the client's cnnpipe on every worker") from None
    except Exception as exc:
        if type(exc).__name__ in ("KilledWorker", "FutureCancelledError", "CancelledError"):
            raise PreprocessError(f"engine 'dask': the cluster lost a task ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200]}); Dask workers died running it again and "
                                  "again (memory?), or the cluster closed") from None
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


# ---------------------------------------------------------------- inside a Dask worker

_STOPPED: set[str] = set()            # keys of maps (and engines) whose tasks must end now
_RUNNING: dict[int, tuple] = {}       # id of a running task's pool -> (its stop keys, the pool)
_IDLE: list[WorkerPool] = []          # one-process pools no task is using (`_pool`)
_IDLE_LOCK = threading.Lock()


def stop_tasks(key: str) -> None:
    """Run by `Client.run` on each worker (in its event loop, beside the running tasks): the tasks of
    `key` end at their next file, their pool processes killed at once."""
    _STOPPED.add(key)
    for keys, pool in list(_RUNNING.values()):
        if key in keys:
            pool.stopping = True
            for pid in pool.pids:
                os.kill(pid, signal.SIGKILL)


def _allow_children() -> None:
    # Dask starts its workers as daemonic processes, and multiprocessing refuses to let a daemonic
    # process start children; the flag means nothing else inside the worker itself (its nanny holds the
    # real one), and our pool's processes are themselves daemonic, so they end with the worker.
    import multiprocessing

    multiprocessing.current_process()._config["daemon"] = False


@functools.cache
def _versions_here() -> dict[str, str | None]:
    from distributed.versions import get_package_info

    return get_package_info(_VERSIONED)


def _pool() -> WorkerPool:
    """An idle one-process pool of this worker process, or a new one. Pools are kept from task to task
    (a fork per task, and a cold process, would cost more than Dask's own per-task overhead); their
    processes end with the worker (`workers._receive`)."""
    with _IDLE_LOCK:
        if _IDLE:
            return _IDLE.pop()
    _allow_children()
    return WorkerPool(1)


def start_pools(dask_worker: Any) -> None:
    """Run by `Client.run` as the engine starts: a pool per worker thread, started in the background so
    that the fork server's imports overlap the client's scan of the files, ready for the first task."""
    threading.Thread(target=_start_pools, args=(dask_worker.state.nthreads,), name="cnnpipe-pool-start",
                     daemon=True).start()


def _close_idle_pools() -> None:
    with _IDLE_LOCK:
        pools, _IDLE[:] = list(_IDLE), []
    for pool in pools:
        pool.close()


def _start_pools(n: int) -> None:
    for _ in range(max(0, n - len(_IDLE))):
        pool = _pool()
        with _IDLE_LOCK:
            _IDLE.append(pool)


def _in_folder(cwd: str | None, fn: Callable[[list], list], job: list) -> list:
    """`fn(job)` in folder `cwd` (the client's, for relative paths): the process is this task's alone."""
    if cwd is not None:
        os.chdir(cwd)
    return fn(job)


def run_task(fn: Callable[[list], list], items: list, job_size: int, on_death: Callable[[Any, str], Any],
             shard: str, stop_keys: tuple[str, ...], cwd: str | None, versions: dict
             ) -> tuple[str | None, list] | None:
    """One Dask task: `fn` over `items` in a one-process `WorkerPool` (the per-file rules), the prepared
    rows streamed to `shard` (an .npy renamed into place when complete), the results returned without
    pixels. None if the run was stopped (`stop_tasks`).

    Raises:
      PreprocessError: this worker's versions are not the client's `versions` (a worker that joined
        after the engine's check)."""
    if (problem := _mismatch(f"worker {socket.gethostname()}", versions, _versions_here(),
                             _VERSIONED)) is not None:
        raise PreprocessError(problem)
    _kill_here_if_asked(items, shard)
    rows, pool = _Shard(shard, len(items)), _pool()
    _RUNNING[id(pool)] = (stop_keys, pool)
    try:
        results = []
        for out in ordered_map(pool, functools.partial(_in_folder, cwd, fn), chunks(items, job_size), 3,
                               on_death=on_death):
            if any(k in _STOPPED for k in stop_keys):
                return None
            results += [rows.add(r) if isinstance(r, Prepared) else r for r in out]
        return rows.finish(), results
    except PoolStopped:   # stop_tasks killed its process
        return None
    finally:
        del _RUNNING[id(pool)]
        rows.discard()
        if pool.stopping:   # dropped: the next task starts another
            pool.close()
        else:
            with _IDLE_LOCK:
                _IDLE.append(pool)


class _Shard:
    """A task's rows, streamed to a temporary .npy beside `path` as they come (a task's memory does not
    grow with its size) and renamed to `path` when complete: a reader never sees part of a shard, and a
    task run twice (its worker presumed dead) writes the same rows."""

    def __init__(self, path: str, capacity: int) -> None:
        self.path, self.capacity = path, capacity
        self.tmp = Path(f"{path}.part-{os.getpid()}-{secrets.token_hex(4)}.npy")
        self.stream: RowStream | None = None

    def add(self, r: Prepared) -> Prepared:
        """Write `r`'s pixels as the next row; `r` without them."""
        if self.stream is None:
            self.stream = RowStream(self.tmp, self.capacity, r.pixels.shape, r.pixels.dtype)
        self.stream.write(r.pixels)
        return dataclasses.replace(r, pixels=None)

    def finish(self) -> str | None:
        """The shard's path (None: no rows)."""
        if self.stream is None:
            return None
        self.stream.close()
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        """Drop what was not finished."""
        if self.stream is not None:
            self.stream.f.close()
        self.tmp.unlink(missing_ok=True)


def _kill_here_if_asked(items: list, shard: str) -> None:
    """Test hook: SIGKILL this Dask worker, once per run, on the first task holding a path that contains
    $CNNPIPE_TEST_KILL_DASK_WORKER_ON (as the OOM killer or a lost machine would)."""
    marker = os.environ.get(KILL_DASK_ENV)
    if not marker or not any(isinstance(it, tuple) and marker in str(it[0]) for it in items):
        return
    try:
        os.close(os.open(Path(shard).parent / "killed-a-worker", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
