"""Inside a Dask worker: the task of `cnnpipe preprocess --engine dask`, and the pools it runs in.

A task (a range of up to 256 files) runs the engine's job function in a one-process `WorkerPool`
beside its Dask worker thread, exactly as the local engine runs it (a deadline per file, a file that
kills its process retried once in a fresh one, then reported), streams the prepared rows into a
shard file and returns the per-file results without pixels (`cnnpipe.datasets.dask_engine` reads
them back). Pools are kept from task to task; `stop_tasks` ends the tasks of a stopped run at once.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import secrets
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnnpipe.datasets.convert import Prepared
from cnnpipe.datasets.dask_connect import VERSIONED, mismatch
from cnnpipe.datasets.preprocess_settings import PreprocessError
from cnnpipe.datasets.store import RowStream
from cnnpipe.datasets.workers import PoolStopped, WorkerPool, chunks, ordered_map

__all__ = ["KILL_DASK_ENV", "run_task", "stop_tasks", "start_pools", "start_local_pools", "close_idle_pools"]

KILL_DASK_ENV = "CNNPIPE_TEST_KILL_DASK_WORKER_ON"   # test hook: SIGKILL a Dask worker (once) on a task

_STOPPED: set[str] = set()            # keys of maps (and engines) whose tasks must end now
_RUNNING: dict[int, tuple] = {}       # id of a running task's pool -> (its stop keys, the pool)
_IDLE: list[WorkerPool] = []          # one-process pools no task is using (`_pool`)
_LOCK = threading.Lock()              # guards the three: a pool is running, idle or stopped, never two
_IN_CLIENT = False                    # this process is a client whose local cluster's workers are threads


def run_task(fn: Callable[[list], list], items: list, job_size: int, on_death: Callable[[Any, str], Any],
             shard: str, stop_keys: tuple[str, ...], cwd: str | None, versions: dict
             ) -> tuple[str | None, list] | None:
    """`fn` over `items` in a one-process `WorkerPool` (the per-file rules), the prepared rows streamed to
    `shard` (an .npy renamed into place when complete), the results returned without pixels. None if
    the run was stopped (`stop_tasks`); `cwd`: the client's folder, for relative paths.

    Raises:
      PreprocessError: this worker's versions are not the client's `versions` (a worker that joined
        after the engine's check)."""
    if (problem := mismatch(f"worker {socket.gethostname()}", versions, _versions_here(), VERSIONED)) is not None:
        raise PreprocessError(problem)
    _kill_here_if_asked(items, shard)
    rows, pool = _Shard(shard, len(items)), _pool(_scratch())
    with _LOCK:
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
        rows.discard()
        with _LOCK:   # stop_tasks either saw it running (and stopped it) or never will
            del _RUNNING[id(pool)]
            if not pool.stopping:
                _IDLE.append(pool)
        if pool.stopping:
            pool.close()


def stop_tasks(key: str) -> None:
    """Run by `Client.run` on each worker (in its event loop, beside the running tasks): the tasks of
    `key` end at their next file, their pool processes killed at once."""
    with _LOCK:
        _STOPPED.add(key)
        for keys, pool in _RUNNING.values():
            if key in keys:
                pool.stopping = True
                for pid in pool.pids:
                    os.kill(pid, signal.SIGKILL)


def start_pools(dask_worker: Any) -> None:
    """Run by `Client.run` as the engine starts: a pool per worker thread, started in the background so
    that the fork server's imports overlap the client's scan of the files, ready for the first task."""
    threading.Thread(target=_start_pools, args=(dask_worker.state.nthreads, dask_worker.local_directory),
                     name="cnnpipe-pool-start", daemon=True).start()


def start_local_pools(n: int) -> None:
    """Up to `n` idle pools in this process (a local cluster's worker threads run in the client)."""
    global _IN_CLIENT
    _IN_CLIENT = True
    _start_pools(n, None)


def _start_pools(n: int, scratch: str | None) -> None:
    for _ in range(max(0, n - len(_IDLE))):
        pool = _pool(scratch)
        with _LOCK:
            _IDLE.append(pool)


def close_idle_pools() -> None:
    """Close the idle pools (a local cluster's, when its engine closes)."""
    with _LOCK:
        pools, _IDLE[:] = list(_IDLE), []
    for pool in pools:
        pool.close()


@functools.cache
def _versions_here() -> dict[str, str | None]:
    from distributed.versions import get_package_info

    return get_package_info(VERSIONED)


def _pool(scratch: str | None) -> WorkerPool:
    """An idle one-process pool of this process, or a new one. Pools are kept from task to task (a fork
    per task, and a cold process, would cost more than Dask's own per-task overhead); their processes
    end with the worker (`workers._receive`). `scratch`: the Dask worker's own folder, or None."""
    with _LOCK:
        if _IDLE:
            return _IDLE.pop()
    # Dask starts its worker processes as daemonic, and multiprocessing refuses to let a daemonic process
    # start children; the flag means nothing else inside the worker itself (its nanny holds the real one),
    # and our pool's processes are daemonic themselves, so they end with the worker.
    config = multiprocessing.current_process()._config
    config["daemon"] = False
    # the fork server's socket folder (pymp-*) goes in the Dask worker's scratch folder, which Dask removes
    # even after the worker was killed; in TMPDIR it would outlive a worker ended by a signal. Not in the
    # client's process (a local cluster): its scratch goes with the engine, the fork server stays.
    # (A socket's path is at most 107 bytes: a deep scratch folder keeps TMPDIR.)
    folder = Path(scratch or "") / "cnnpipe-mp"
    if scratch is not None and not _IN_CLIENT and config.get("tempdir") is None and len(str(folder)) < 64:
        folder.mkdir(exist_ok=True)
        config["tempdir"] = str(folder)
    return WorkerPool(1)


def _scratch() -> str | None:
    """This Dask worker's own folder (None outside one)."""
    try:
        from distributed import get_worker

        return get_worker().local_directory
    except (ImportError, ValueError):
        return None


def _in_folder(cwd: str | None, fn: Callable[[list], list], job: list) -> list:
    """`fn(job)` in folder `cwd` (the client's, for relative paths): the process is this task's alone."""
    if cwd is not None:
        os.chdir(cwd)
    return fn(job)


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
