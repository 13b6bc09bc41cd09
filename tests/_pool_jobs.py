"""Per-job functions for tests/test_workers.py.

They must be importable by pool workers: tests/ is on the parent's sys.path (pytest
puts it there, tests/ being no package) and a forkserver or spawn child starts with
the parent's sys.path, so `_pool_jobs.square` unpickles in the workers.
"""

from __future__ import annotations

import os
import signal
import time

from cnnpipe.datasets.workers import die_here_if_asked


def square(job: list[int]) -> list[int]:
    return [x * x for x in job]


def slow_square(job: list[int]) -> list[int]:
    """`square`, 10 ms per item: slow enough for a test to kill a worker mid-job."""
    out = []
    for x in job:
        time.sleep(0.01)
        out.append(x * x)
    return out


def shout(job: list[str]) -> list[str]:
    """Upper-cased names; a worker dies on a name containing $CNNPIPE_TEST_KILL_WORKER_ON."""
    out = []
    for name in job:
        die_here_if_asked(name)
        out.append(name.upper())
    return out


def exit3_on_13(job: list[int]) -> list[int]:
    """`square`, but the worker exits with status 3 on item 13."""
    if 13 in job:
        os._exit(3)
    return square(job)


def segfault_on_13(job: list[int]) -> list[int]:
    """`square`, but the worker segfaults on item 13 (as a C codec might)."""
    if 13 in job:
        import ctypes

        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return square(job)


def logged_sigkill_on_10(job: list[tuple[str, int]]) -> list[int]:
    """Append each item to the log file it names before working on it; SIGKILL on item 10."""
    out = []
    for log, x in job:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{x}\n".encode())
        os.close(fd)
        if x == 10:
            os.kill(os.getpid(), signal.SIGKILL)
        out.append(x * x)
    return out


def boom_on_5(job: list[int]) -> list[int]:
    if 5 in job:
        raise ValueError("boom on 5")
    return square(job)


def wrong_length(job: list[int]) -> list[int]:
    return job[1:]


def hang_on_13(job: list[int]) -> list[int]:
    """`square` with a 1-second deadline per item (`start_item`); item 13 hangs in C (a sleep) forever."""
    from cnnpipe.datasets.workers import start_item

    out = []
    for i, x in enumerate(job):
        start_item(i, 1.0)
        if x == 13:
            time.sleep(3600)
        out.append(x * x)
    return out


def logged_hang_on_13_sigkill_on_14(job: list[tuple[str, int]]) -> list[int]:
    """Items within a 1-second deadline each (`start_item`), logged as they start: 13 hangs, 14 SIGKILLs."""
    from cnnpipe.datasets.workers import start_item

    out = []
    for i, (log, x) in enumerate(job):
        start_item(i, 1.0)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{x}\n".encode())
        os.close(fd)
        if x == 13:
            time.sleep(3600)
        if x == 14:
            os.kill(os.getpid(), signal.SIGKILL)
        out.append(x * x)
    return out
