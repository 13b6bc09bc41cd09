"""Reaching a Dask cluster for `cnnpipe preprocess --engine dask`, and checking that it can serve.

Every way this can go wrong ends in one `PreprocessError` line: a scheduler file that is not one, an
address that does not answer as a Dask scheduler (within `CONNECT_S`, even one that accepts the
connection and never replies), a scheduler without workers, and workers whose versions differ from
this process's (decoders of other versions could store other pixels).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnnpipe.datasets.preprocess_settings import PreprocessError
from cnnpipe.datasets.workers import in_daemon_thread

__all__ = ["CONNECT_S", "VERSIONED", "connect", "check_versions", "mismatch", "scheduler_address", "within"]

CONNECT_S = 30      # seconds to reach a scheduler, and for its first worker to connect
# the packages whose versions decide a store's bytes (decoders) or whether tasks run at all
VERSIONED = ("cnnpipe", "dask", "distributed", "numpy", "pillow", "imagecodecs", "tifffile")


def scheduler_address(scheduler_file: str) -> str:
    """The address in a scheduler file (`dask scheduler --scheduler-file PATH`); PreprocessError if none."""
    try:
        info = json.loads(Path(scheduler_file).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PreprocessError(f"scheduler_file: {scheduler_file}: cannot read it ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        info = None
    address = info.get("address") if isinstance(info, dict) else None
    if not isinstance(address, str) or not address:
        raise PreprocessError(f"scheduler_file: {scheduler_file}: not a Dask scheduler file (JSON with an "
                              "\"address\", as `dask scheduler --scheduler-file PATH` writes)")
    return address


def connect(distributed: Any, workers: int, address: str | None, scratch: Path) -> Any:
    """A client of the scheduler at `address`, or of a new local cluster of `workers` worker threads
    (their files in `scratch`); PreprocessError in one line if none can be had."""
    if address is None:
        return _local_client(distributed, workers, scratch)
    try:
        client = within(1.2 * CONNECT_S, lambda: distributed.Client(address, timeout=CONNECT_S,
                                                                   set_as_default=False))
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else str(exc).splitlines()[0][:200]
        raise PreprocessError(f"engine 'dask': cannot connect to the Dask scheduler {address} ({why}; "
                              f"waited {CONNECT_S} s)") from None
    try:
        client.wait_for_workers(1, timeout=CONNECT_S)
    except (TimeoutError, OSError):
        client.close()
        raise PreprocessError(f"engine 'dask': no worker joined the scheduler {address} within {CONNECT_S} s"
                              ) from None
    return client


def _local_client(distributed: Any, workers: int, scratch: Path) -> Any:
    import dask

    # worker threads, not processes: the files are prepared in cnnpipe's own pool processes (one per
    # thread) either way, and worker processes would add start-up time and a second copy of each row
    with dask.config.set({"temporary-directory": str(scratch)}), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # "Port 8787 is already in use": no dashboard is wanted
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=False,
                                           dashboard_address=None, silence_logs=logging.CRITICAL)
    return distributed.Client(cluster, set_as_default=False)


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """`fn()`, or TimeoutError after `seconds`: a peer that accepts the connection and never answers
    would otherwise hold Dask's client forever (its own timeout does not cover that)."""
    return in_daemon_thread(fn, "cnnpipe-dask-call").result(timeout=seconds)


def check_versions(client: Any) -> dict[str, str | None]:
    """This process's versions of `VERSIONED` (and Python); PreprocessError naming the first worker whose
    versions differ (or that lacks cnnpipe): the store must not depend on where a file was prepared.
    Workers that join later are checked by each task (`cnnpipe.datasets.dask_tasks.run_task`)."""
    found = client.get_versions(packages=list(VERSIONED))
    mine = found["client"]["packages"]
    hosts = [(f"the scheduler {client.scheduler.address}", found["scheduler"]["packages"], ("dask", "distributed"))]
    hosts += [(f"worker {a}", v["packages"], VERSIONED) for a, v in sorted(found["workers"].items())]
    for where, theirs, names in hosts:
        if (problem := mismatch(where, mine, theirs, names)) is not None:
            raise PreprocessError(problem)
    return {k: mine.get(k) for k in ("python", *VERSIONED)}


def mismatch(where: str, mine: dict, theirs: dict, names: tuple[str, ...]) -> str | None:
    """Why `theirs` (versions by package, as `distributed.versions` gives them) cannot serve `mine`, or None."""
    py_mine, py_theirs = ".".join(mine["python"].split(".")[:2]), ".".join(theirs["python"].split(".")[:2])
    if py_mine != py_theirs:
        return f"engine 'dask': {where} runs Python {py_theirs}, this process {py_mine}"
    for pkg in names:
        if theirs.get(pkg) != mine.get(pkg):
            has = "does not have it" if theirs.get(pkg) is None else f"has {pkg} {theirs[pkg]}"
            return (f"engine 'dask': {where} {has}, this process has {pkg} {mine.get(pkg)}; install the same "
                    "versions everywhere (decoders decide a store's pixels)")
    return None
