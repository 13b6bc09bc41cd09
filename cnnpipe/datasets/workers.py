"""Worker processes for `cnnpipe preprocess`: a pool that never imports jax and survives its workers' deaths.

Workers are started by a fork server (never a plain fork: the parent may hold jax/XLA threads)
that has already imported the decoding stack; they ignore Ctrl-C: the parent alone handles it.

A worker can die hard (the OOM killer's SIGKILL, a segfault in a C codec, os._exit), and
`multiprocessing.Pool` then waits forever for the result it lost. So the pool is our own: one
duplex pipe per worker, the parent waiting on every pipe and process sentinel at once, so a
death is seen the moment it happens. The parent knows which jobs each worker holds (at most
two, so it never idles) and which one was running: the oldest, since a worker runs its jobs in
order. A dead worker is replaced; the job it was running is retried item by item, the jobs it
had not started are sent again, results it had sent are kept. An item that kills a worker
alone too gets `on_death(item, how)` as its result, and the run goes on.

Deadlines: a per-item function may call `start_item(i, seconds)` before each item. The worker
then records which item of its job is running (shared memory the parent reads when it dies) and
arms a SIGALRM timer whose default action kills the process even inside C code (a codec's
endless loop, a read from a stalled mount): Python never sees the signal, so nothing can catch
or delay it. An item whose worker died of its deadline gets `on_death(item, how)` at once, not a
second wait; the job's other items are retried.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import pickle
import queue
import signal
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any, TypeVar

from cnnpipe.datasets import deadlines
from cnnpipe.datasets.deadlines import DEADLINE, HANG_ENV, KILL_ENV, die_here_if_asked, start_item
from cnnpipe.datasets.process_start import context, main_hidden

__all__ = ["KILL_ENV", "HANG_ENV", "DEADLINE", "PoolStopped", "WorkerDied", "in_daemon_thread", "WorkerPool", "chunks", "die_here_if_asked",
           "make_pool", "ordered_map", "start_item"]

log = logging.getLogger("cnnpipe.datasets.preprocess")

T, R = TypeVar("T"), TypeVar("R")

_HELD = 2          # jobs a worker holds at once: the running one and the next, so it never idles
_JOIN_S = 5.0      # a worker that closed its pipe is exiting; past this it is killed



class PoolStopped(RuntimeError):
    """A worker of a pool whose owner is stopping it (`WorkerPool.stopping`) died: no retry, no replacement."""


class WorkerDied(RuntimeError):
    """A worker process died running one item, and again running that item alone."""

    def __init__(self, item: Any, how: str) -> None:
        super().__init__(f"a worker process died on {item!r}: {how}")
        self.item, self.how = item, how


class _RemoteTraceback(Exception):
    """The worker's traceback text: the `__cause__` of an exception from `fn`, re-raised here."""


def in_daemon_thread(fn: Callable[[], Any], name: str) -> Future:
    """`fn()` started in a daemon thread; its Future. A daemon: a call that hangs (a peer that never
    answers) must not keep the process alive at exit."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def chunks(items: Iterable[T], n: int) -> Iterator[list[T]]:
    """`items` in consecutive lists of `n` (the last may be shorter), lazily: any iterable, even an endless one."""
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


# ---------------------------------------------------------------- inside a worker

def _worker_init() -> None:
    # Ctrl-C goes to the whole process group; the parent alone handles it and
    # closes the pool, so workers must not die mid-result with tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _receive(conn: Connection, inbox: queue.SimpleQueue) -> None:
    """Move jobs from the pipe to `inbox` as they arrive. Once the parent hangs up (closed the pool, or was
    killed: a Dask worker) nobody can take an answer, so the process ends now, even mid-file: a file hanging
    with no deadline must not keep it (and the fork server, alive while any child is) running forever."""
    try:
        while True:
            inbox.put(conn.recv_bytes())
    except (EOFError, OSError):
        os._exit(0)


def _worker_main(conn: Connection, current: Any) -> None:
    """A worker's life: run the jobs in the order they arrive and answer each; end when the parent hangs up."""
    deadlines.enter_worker(current)
    _worker_init()
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    # a thread empties the pipe while this one works: a parent sending a job never waits on a worker
    # that is itself waiting to send a large result (both blocked: a deadlock)
    threading.Thread(target=_receive, args=(conn, inbox), name="cnnpipe-worker-inbox", daemon=True).start()
    while raw := inbox.get():
        try:
            fn, job = pickle.loads(raw)  # here, not in the thread: a job that cannot load is answered
            reply: tuple = ("ok", fn(job), "")
        except Exception as exc:
            reply = ("error", exc, traceback.format_exc())
        finally:   # a deadline covers an item, never the answer or the wait for the next job
            if hasattr(signal, "setitimer"):
                signal.setitimer(signal.ITIMER_REAL, 0)
            current.value = -1
        try:
            conn.send(reply)
        except OSError:
            return  # the parent is gone
        except Exception as exc:  # a result or exception that does not pickle: say so instead
            what = "its result" if reply[0] == "ok" else f"{type(reply[1]).__name__}: {reply[1]!s:.200}"
            conn.send(("error", RuntimeError(f"a worker could not send back {what} ({exc!r:.200})"), reply[2]))


# ---------------------------------------------------------------- in the parent

@dataclass(slots=True, eq=False)
class _Job:
    """One job of a map: its items and its results so far (`missing` of them still out)."""

    items: Any
    result: Any = None
    missing: int = 1


@dataclass(slots=True, eq=False)
class _Task:
    """What a worker is asked to run: a whole job (slot None) or one item of it, after a death."""

    run: _Run
    job: _Job
    slot: int | None = None
    retry: bool = False

    @property
    def payload(self) -> Any:
        return self.job.items if self.slot is None else [self.job.items[self.slot]]


class _Run:
    """One `ordered_map` call's state; a map left early still has tasks out, whose answers are dropped."""

    def __init__(self, fn: Callable, on_death: Callable[[Any, str], Any] | None) -> None:
        self.fn, self.on_death, self.abandoned = fn, on_death, False
        self.ready: deque[_Task] = deque()  # waiting for a worker; retries go first
        self.error: BaseException | None = None

    def done(self, task: _Task, result: Any) -> None:
        """A worker's answer for `task`."""
        if self.abandoned:
            return
        want = task.payload
        if isinstance(want, list) and (not isinstance(result, (list, tuple)) or len(result) != len(want)):
            got = len(result) if isinstance(result, (list, tuple)) else repr(result)[:50]
            self.error = ValueError(f"{self.fn!r:.80} returned {got} results for {len(want)} items")
        elif task.slot is None:
            task.job.result, task.job.missing = result, 0
        else:
            task.job.result[task.slot] = result[0]
            task.job.missing -= 1

    def failed(self, exc: BaseException, remote_tb: str) -> None:
        """`fn` raised in a worker: re-raised here with the worker's traceback as its cause."""
        if not self.abandoned and self.error is None:
            exc.__cause__ = _RemoteTraceback(remote_tb)
            self.error = exc

    def died(self, task: _Task, how: str, index: int = -1) -> None:
        """`task` was running when its worker died, on item `index` of it when known (`start_item`).

        A whole job is split into its items: the one it was on is the suspect and gets one more try
        (none after its deadline: a hang is given up at once, never waited for twice), the others
        were not to blame and keep theirs; when the item is not known, each gets one more try. An
        item, or a job that is not a list, that dies on its last try gets `on_death`.
        """
        if self.abandoned:
            return
        job = task.job
        if task.slot is None and isinstance(job.items, list):
            job.result, job.missing = [None] * len(job.items), len(job.items)
            known = 0 <= index < len(job.items)
            hung = known and how == DEADLINE
            if hung:
                self._give_up(_Task(self, job, index, retry=True), how)
            self.ready.extendleft(reversed([_Task(self, job, i, retry=not known or i == index)
                                            for i in range(len(job.items)) if not (hung and i == index)]))
        elif not task.retry and how != DEADLINE:
            self.ready.appendleft(_Task(self, job, task.slot, retry=True))
        else:
            self._give_up(task, how)

    def _give_up(self, task: _Task, how: str) -> None:
        """`task`'s item (or whole job) killed its worker on its last try: `on_death`'s result, or WorkerDied."""
        item = task.job.items if task.slot is None else task.job.items[task.slot]
        if self.on_death is None:
            self.error = WorkerDied(item, how)
        else:
            self.done(task, self.on_death(item, how) if task.slot is None else [self.on_death(item, how)])


@dataclass(slots=True, eq=False)  # hashed by identity: a dict key in _step
class _Worker:
    """One worker process, the parent's end of its pipe, and the tasks it holds, oldest first."""

    proc: Any
    conn: Connection
    current: Any   # shared: the item of its running job that it is on (`start_item`), -1 if unknown
    held: deque[_Task] = field(default_factory=deque)


def _reap(proc: Any) -> str:
    """Reap an exiting worker (killed if it lingers): 'killed by signal 9 (SIGKILL)', 'exited with status 3'."""
    proc.join(_JOIN_S)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    code = proc.exitcode
    proc.close()
    if code >= 0:
        return f"exited with status {code}"
    name = {s.value: s.name for s in signal.Signals}.get(-code, "?")  # real-time signals have no name
    return f"killed by signal {-code} ({name})"


def _each(fn: Callable[[Any], Any], job: list[Any]) -> list[Any]:
    return [fn(x) for x in job]


class WorkerPool:
    """`workers` processes started from a forkserver that preloads WORKER_PRELOAD (spawn where
    there is no forkserver); never imports jax; survives worker deaths. Use it with `ordered_map`;
    close it (or use it as a context manager) when done."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers: expected at least 1, got {workers!r}")
        self._ctx, self._workers, self._closed = context(), [], False
        self.stopping = False   # its owner is killing the workers on purpose (a stopped Dask task): PoolStopped
        try:
            for _ in range(workers):
                self._workers.append(self._start())
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        """The live workers' process ids."""
        return [w.proc.pid for w in self._workers if w.proc.is_alive()]

    def close(self) -> None:
        """Terminate and reap every worker; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        workers, self._workers = self._workers, []
        for w in workers:  # all told first, then each waited for
            w.conn.close()
            w.proc.terminate()
        for w in workers:
            _reap(w.proc)

    def map(self, fn: Callable[[T], R], items: Iterable[T], chunksize: int = 1) -> list[R]:
        """`[fn(x) for x in items]`, run in the workers (the `multiprocessing.Pool.map` call)."""
        jobs = chunks(list(items), max(1, chunksize))
        return [r for out in ordered_map(self, functools.partial(_each, fn), jobs, 2 * _HELD * len(self._workers))
                for r in out]

    def _start(self, retry: bool = True) -> _Worker:
        ours, theirs = self._ctx.Pipe(duplex=True)
        current = self._ctx.RawValue("l", -1)
        proc = self._ctx.Process(target=_worker_main, args=(theirs, current), name="cnnpipe-worker", daemon=True)
        try:
            with main_hidden():
                proc.start()
        except (EOFError, OSError) as exc:  # the fork server itself died (killed): start a new one, once
            ours.close()
            if not retry or self._ctx.get_start_method() != "forkserver":
                raise OSError(f"cannot start a worker process ({type(exc).__name__}: {exc})") from None
            from multiprocessing import forkserver

            forkserver._forkserver._stop()
            return self._start(retry=False)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker has its own copy: its death now reads as end-of-file here
        return _Worker(proc, ours, current)

    def _results(self, run: _Run, jobs: Iterator[Any], window: int) -> Iterator[Any]:
        pending: deque[_Job] = deque()  # the jobs in flight, oldest first
        while True:
            if run.error is not None:
                raise run.error
            for job in itertools.islice(jobs, window - len(pending)):
                pending.append(_Job(job))
                run.ready.append(_Task(run, pending[-1]))
            if not pending:
                return
            self._dispatch(run)  # before yielding: the workers keep busy while the caller works
            if pending[0].missing == 0:
                yield pending.popleft().result
            else:
                self._step()

    def _dispatch(self, run: _Run) -> None:
        """Hand `run`'s waiting tasks to workers with room, idle workers first."""
        for room in range(1, _HELD + 1):
            for i in range(len(self._workers)):
                while run.ready and len(self._workers[i].held) < room:
                    w = self._workers[i]
                    try:
                        w.conn.send_bytes(ForkingPickler.dumps((run.fn, run.ready[0].payload)))
                    except OSError:  # it has died: replaced now, so _step never waits with no job out
                        self._take_answers(w)
                        self._replace(w)
                    else:
                        w.held.append(run.ready.popleft())

    def _step(self) -> None:
        """Wait until some worker answers or dies, and take in what happened."""
        if self._closed or not self._workers:
            raise RuntimeError("the worker pool is closed")
        if not any(w.held for w in self._workers):  # a bookkeeping slip must not wait forever
            raise RuntimeError("ordered_map: waiting for answers, but no worker holds a job")
        by_handle: dict[Any, _Worker] = {}
        for w in self._workers:
            by_handle[w.conn] = by_handle[w.proc.sentinel] = w
        ready = wait(list(by_handle))
        for w in dict.fromkeys(by_handle[h] for h in ready):
            # answers first, even from a dead worker: results it sent before dying are kept
            if not self._take_answers(w) or w.proc.sentinel in ready:
                self._replace(w)

    def _take_answers(self, w: _Worker) -> bool:
        """Read every answer `w` has sent; False if its pipe has closed (it died)."""
        while w.conn.poll():
            try:
                raw = w.conn.recv_bytes()
            except (EOFError, OSError):  # a message cut short by the death is no answer
                return False
            except BaseException:  # Ctrl-C mid-message: the pipe is out of step, so the worker goes
                w.proc.kill()
                raise
            task = w.held.popleft()
            try:
                kind, value, remote_tb = pickle.loads(raw)
            except Exception as exc:  # an answer that cannot load here is that task's error
                kind, value, remote_tb = "error", exc, traceback.format_exc()
            if kind == "ok":
                task.run.done(task, value)
            else:
                task.run.failed(value, remote_tb)
        return True

    def _replace(self, w: _Worker) -> None:
        """`w` died (its answers taken in): start a worker in its place, deal out the tasks it held."""
        how, held, i = _reap(w.proc), list(w.held), self._workers.index(w)
        if self.stopping:   # killed on purpose by its owner: its jobs are not wanted any more
            w.conn.close()
            del self._workers[i]
            raise PoolStopped(f"a worker process {how} while its pool was being stopped")
        index = int(w.current.value)   # shared memory outlives the process: the item it was on
        w.conn.close()
        del self._workers[i]
        if how == DEADLINE:   # its file is reported as timeout, not tried again
            log.warning("a worker process was stopped at the file deadline (--file-timeout); a fresh one takes "
                        "its other files")
        else:
            log.warning("a worker process %s; %d job(s) it held go to the other workers", how, len(held))
        # it ran its tasks in order, so only the oldest was started; the others go back unchanged
        for task in reversed(held[1:]):
            if not task.run.abandoned:
                task.run.ready.appendleft(task)
        try:
            if held:
                held[0].run.died(held[0], how, index)  # on_death may raise
        finally:
            self._workers.insert(i, self._start())


make_pool = WorkerPool   # the name callers use: `make_pool(n)`, n processes that never import the caller's script


def ordered_map(pool: WorkerPool | None, fn: Callable[[list[T]], list[R]], jobs: Iterable[list[T]], window: int,
                on_death: Callable[[T, str], R] | None = None) -> Iterator[list[R]]:
    """`fn(job)` for each job, yielded in job order, with at most `window` jobs in flight.

    Unlike `Pool.imap`, results never pile up faster than the caller consumes them: the
    parent's memory stays bounded. `fn` (module-level, or a `functools.partial` of one) maps
    a list of items to a list of results, one per item; `pool=None` runs it here. When a
    worker dies, the job it was running is retried item by item; an item whose worker dies
    again gets `on_death(item, how)` as its result, `how` being e.g. "killed by signal 9
    (SIGKILL)" or "exited with status 3"; without `on_death`, `WorkerDied` is raised (the pool
    stays usable). A job that is not a list is retried whole, `on_death(job, how)` then being
    its result. An exception from `fn` is raised here. Leaving the loop early is safe.
    """
    if pool is None:
        yield from map(fn, jobs)
        return
    run = _Run(fn, on_death)
    try:
        yield from pool._results(run, iter(jobs), max(1, int(window)))
    finally:
        run.abandoned = True
        run.ready.clear()
