"""Per-item hooks for pool workers (`cnnpipe.datasets.workers`): deadlines and the test hooks.

`start_item` arms a per-item deadline inside a worker; `die_here_if_asked` lets a test kill or
hang a worker on a chosen file, as the OOM killer or a codec's endless loop would.
"""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace
from typing import Any

__all__ = ["KILL_ENV", "HANG_ENV", "DEADLINE", "die_here_if_asked", "start_item", "enter_worker"]

KILL_ENV = "CNNPIPE_TEST_KILL_WORKER_ON"
HANG_ENV = "CNNPIPE_TEST_HANG_WORKER_ON"
# `how` of a worker stopped by its deadline (no SIGALRM, as on Windows: no deadline, never this)
_ALARM = getattr(signal, "SIGALRM", None)
DEADLINE = f"killed by signal {_ALARM.value} (SIGALRM)" if _ALARM is not None else "stopped by its deadline"

# in_worker: True only inside a pool worker process; current: there, the shared index of the item
# of its job now running (-1: none), which the parent reads when the worker dies
_state = SimpleNamespace(in_worker=False, current=None)


def enter_worker(current: Any) -> None:
    """Called once by a worker process as it starts: `current` is its shared item index."""
    _state.in_worker, _state.current = True, current


def die_here_if_asked(name: str) -> None:
    """Test hook: SIGKILL this process if it is a pool worker and `name` contains $CNNPIPE_TEST_KILL_WORKER_ON.

    Per-item functions call it with the item's path, so a test can kill a worker as the OOM killer
    would, on a chosen file; never in the parent or with `pool=None`, nor if the variable is unset
    or empty. It is read in the worker, whose environment is the fork server's: the server starts
    once per parent process, with the parent's environment then, so set the variable before the
    process's first pool starts, or run the pool in a subprocess."""
    marker = os.environ.get(KILL_ENV)
    if _state.in_worker and marker and marker in name:
        os.kill(os.getpid(), signal.SIGKILL)
    marker = os.environ.get(HANG_ENV)   # the same, hanging (as a codec's endless loop would) instead of dying
    if _state.in_worker and marker and marker in name:
        while True:
            time.sleep(3600)


def start_item(index: int, seconds: float) -> None:
    """Inside a pool worker: item `index` of the current job starts now and must end within `seconds`
    (0: no deadline). Past it, SIGALRM's default action ends the process, wherever it is, and the
    parent reports the item with `DEADLINE` as `how`. Outside a worker (`pool=None`) it does nothing:
    only a process of its own can be stopped safely."""
    if not _state.in_worker or _ALARM is None:
        return
    _state.current.value = index
    signal.setitimer(signal.ITIMER_REAL, max(0.0, float(seconds)))
