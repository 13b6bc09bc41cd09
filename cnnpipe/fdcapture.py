"""Capture what C libraries write to file descriptor 2 while a block runs.

Codecs (libpng, libtiff) and XLA print through the C runtime, which Python's
`sys.stderr` never sees; redirecting descriptor 2 to an unlinked temporary file
catches it. Descriptor 2 is process-wide, so blocks are serialised by a lock.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["stderr_lines"]

_lock = threading.Lock()
_sink: Any = None  # an unlinked temporary file (nothing left on disk), made once per process
_MAX_BYTES = 64 * 1024


@contextlib.contextmanager
def stderr_lines() -> Iterator[list[str]]:
    """Yield a list that holds, after the block, the lines written to descriptor 2 during it (first 64 KiB)."""
    global _sink
    lines: list[str] = []
    with _lock:
        if _sink is None:
            _sink = tempfile.TemporaryFile()
            atexit.register(_sink.close)
        saved = _redirect(2, _sink.fileno())
        try:
            yield lines
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
                lines.extend(_drain(_sink))


def _redirect(fd: int, target: int) -> int | None:
    try:
        saved = os.dup(fd)
    except OSError:  # no stderr at all (a daemon): nothing to protect
        return None
    os.dup2(target, fd)
    return saved


def _drain(sink: Any) -> list[str]:
    size = os.fstat(sink.fileno()).st_size
    if not size:
        return []
    sink.seek(0)
    text = sink.read(min(size, _MAX_BYTES)).decode("utf-8", "replace")
    sink.seek(0)
    sink.truncate(0)
    return text.splitlines()
