"""How `cnnpipe.datasets.workers` starts its processes: from a fork server that has imported the decoding
stack, never re-running the caller's script, never interrupted by a Ctrl-C meant for the parent."""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import sys
import types
from collections.abc import Iterator
from multiprocessing import resource_tracker
from typing import Any

__all__ = ["WORKER_PRELOAD", "context", "main_hidden"]

WORKER_PRELOAD = ["cnnpipe.datasets.convert", "cnnpipe.datasets.native_planes", "imagecodecs", "tifffile",
                  "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "PIL.TiffImagePlugin", "PIL.BmpImagePlugin",
                  "PIL.GifImagePlugin", "PIL.WebPImagePlugin"]


def context() -> Any:
    """The forkserver context preloading WORKER_PRELOAD (spawn where there is no forkserver)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # the fork server imports the whole decoding stack once (codecs and Pillow's
        # plugins are otherwise imported lazily, on each worker's first file); workers
        # fork from it ready. Only the first pool of a process starts the server.
        ctx.set_forkserver_preload(WORKER_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


@contextlib.contextmanager
def main_hidden() -> Iterator[None]:
    """Hide the caller's script while workers start (a forkserver/spawn child re-runs it, and a script
    importing jax would drag jax into every worker), with SIGINT blocked in this thread: a new fork server
    inherits the mask, so a Ctrl-C to the process group cannot break its imports (a traceback). The
    resource tracker starts first: its own start unblocks SIGINT in the calling thread."""
    main, sys.modules["__main__"] = sys.modules.get("__main__"), types.ModuleType("__main__")
    resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if hasattr(signal, "pthread_sigmask") else None
    try:
        yield
    finally:
        if blocked is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if main is not None:
            sys.modules["__main__"] = main
