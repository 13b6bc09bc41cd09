"""Multi-process runs: `jax.distributed` set up from flags, environment variables or the cluster.

Every process of a run executes the same program: it reads its own rows of every
global batch (`mesh.process_rows`), and the mesh spans every device of every
process. Process 0 (the primary) alone writes logs, metrics, plots and the summary;
Orbax coordinates checkpoints across processes itself. JAX does the work: this module
only chooses the arguments of `jax.distributed.initialize`, picks gloo for CPU
collectives, and offers the few agreements a run needs (one run directory name,
data caches built once).

A process that dies makes the others stop at once with one line (`PeerWatch`).
JAX alone notices a dead process only by its missing heartbeats, and then aborts
the survivors with a C++ stack trace; a survivor waiting in an Orbax barrier (not
a collective, which would fail at once) sat there for the whole heartbeat timeout.
So each process holds one TCP connection to the primary, which the operating system
closes the moment a process dies, even by SIGKILL: end of stream without a goodbye
means that process crashed. Host or network loss still falls to JAX's heartbeat.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from cnnpipe.training.compile_cache import quiet_cache_loads

__all__ = ["ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "Cluster", "cluster_from", "initialize", "coordinator_host",
           "process_count", "is_primary", "agree", "barrier", "primary_first", "is_peer_failure", "PeerWatch"]

ENV_COORDINATOR = "CNNPIPE_COORDINATOR"
ENV_NUM_PROCESSES = "CNNPIPE_NUM_PROCESSES"
ENV_PROCESS_ID = "CNNPIPE_PROCESS_ID"
# JAX's coordination service declares a silent process dead after this long (its default is
# 100 s); a crashed one is noticed sooner, by the next collective.
HEARTBEAT_SECONDS = 30
INIT_TIMEOUT_SECONDS = 120
T = TypeVar("T")


@dataclass(frozen=True)
class Cluster:
    """How to join a run: explicit (coordinator, process count, process id) or `auto` (SLURM, TPU, MPI)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    def describe(self) -> str:
        if self.auto:
            return "cluster auto-detected by jax"
        return f"process {self.process_id} of {self.num_processes}, coordinator {self.coordinator}"


def _int(value: Any, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected an integer, got {value!r}") from None


def cluster_from(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                 mode: str | None = None, environ: Mapping[str, str] = os.environ) -> Cluster | None:
    """The cluster a run joins, or None for a single-process run.

    Flags win over the environment variables CNNPIPE_COORDINATOR, CNNPIPE_NUM_PROCESSES
    and CNNPIPE_PROCESS_ID. `mode` "auto" lets jax detect the cluster (SLURM, TPU pod,
    Open MPI); "off" ignores the environment.

    Raises:
      ValueError: an incomplete or inconsistent setting; the message names the flag.
    """
    if mode == "off":
        return None
    if mode == "auto":
        return Cluster(auto=True)
    if mode is not None:
        raise ValueError(f"--distributed: got {mode!r}; expected auto or off")
    coordinator = coordinator or environ.get(ENV_COORDINATOR) or None
    num = num_processes if num_processes is not None else _int(environ.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _int(environ.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    if coordinator is None and num is None and pid is None:
        return None
    if coordinator is None or num is None or pid is None:
        raise ValueError("--coordinator, --num-processes and --process-id go together (or their CNNPIPE_* "
                         f"environment variables); got coordinator={coordinator!r}, num_processes={num!r}, "
                         f"process_id={pid!r}")
    if not re.fullmatch(r"\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}", coordinator):
        raise ValueError(f"--coordinator: expected HOST:PORT, got {coordinator!r}")
    if num < 1:
        raise ValueError(f"--num-processes: expected at least 1, got {num}")
    if not 0 <= pid < num:
        raise ValueError(f"--process-id: expected 0 to {num - 1}, got {pid}")
    return Cluster(coordinator, num, pid)


def initialize(cluster: Cluster) -> None:
    """Join the run: gloo for CPU collectives, then `jax.distributed.initialize`.

    Call before anything starts jax's backend. Raises ValueError (one line) when
    the cluster cannot be formed: no coordinator reachable, nothing to auto-detect.
    """
    import jax

    # CPU processes need a collectives implementation to share a mesh; GPU (NCCL) and
    # TPU ignore this setting
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {"heartbeat_timeout_seconds": HEARTBEAT_SECONDS,
                              "initialization_timeout": INIT_TIMEOUT_SECONDS}
    if not cluster.auto:
        kwargs.update(coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
                      process_id=cluster.process_id)
        host = cluster.coordinator.rsplit(":", 1)[0].strip("[]")  # type: ignore[union-attr]
        if host in ("127.0.0.1", "localhost", "::1"):  # jax would listen on every interface
            kwargs["coordinator_bind_address"] = cluster.coordinator
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as exc:
        if cluster.auto and "coordinator_address" in str(exc):
            raise ValueError("--distributed auto: jax found no cluster to join (SLURM, TPU pod, Open MPI); "
                             "give --coordinator HOST:PORT --num-processes N --process-id I instead") from None
        raise ValueError(f"cannot join the distributed run ({cluster.describe()}): "
                         f"{' '.join(str(exc).split())[:400]}") from None


def coordinator_host(cluster: Cluster) -> str:
    """The host process 0 runs on (from the flags, or what jax detected)."""
    address = cluster.coordinator
    if address is None:
        from jax._src import distributed as jax_distributed  # the detected address is not public API

        address = jax_distributed.global_state.coordinator_address or socket.gethostname()
    return address.rsplit(":", 1)[0].strip("[]")


def process_count() -> int:
    """Processes in this run (1 unless `initialize` joined several)."""
    import jax

    return jax.process_count()


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    import jax

    return jax.process_index() == 0


def agree(text: str, limit: int = 4096) -> str:
    """The primary's `text`, on every process (e.g. a run directory named after the time)."""
    if process_count() == 1:
        return text
    import numpy as np
    from jax.experimental import multihost_utils

    raw = text.encode("utf-8")
    if len(raw) > limit:
        raise ValueError(f"cannot share {len(raw)} bytes between processes (limit {limit})")
    buf = np.zeros(limit + 4, np.uint8)
    buf[:4] = np.frombuffer(len(raw).to_bytes(4, "little"), np.uint8)
    buf[4:4 + len(raw)] = np.frombuffer(raw, np.uint8)
    with quiet_cache_loads():  # a small program, maybe from the compile cache
        out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(out[4:4 + int.from_bytes(out[:4].tobytes(), "little")]).decode("utf-8")


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (a no-op in one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        with quiet_cache_loads():
            multihost_utils.sync_global_devices(f"cnnpipe:{name}")


def primary_first(fn: Callable[[], T], name: str) -> T:
    """Run `fn` on the primary, then on the others (which then find what it wrote, e.g. a data cache)."""
    if process_count() == 1:
        return fn()
    if is_primary():
        out = fn()
        barrier(name)
        return out
    barrier(name)
    return fn()


_PEER_LOST = ("gloo", "connection reset", "connection closed", "broken pipe", "heartbeat", "unavailable",
              "coordination service", "task has failed", "socket closed")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` looks like another process of a multi-process run having stopped."""
    if process_count() == 1:
        return False
    text = str(exc).lower()
    return any(k in text for k in _PEER_LOST)


_BYE = b"bye"


class PeerWatch:
    """Stops this process with one line as soon as another process of the run dies.

    Every process but the primary connects to a socket the primary opens on the
    coordinator's host (its port shared with `agree`); each side reads until end of
    stream. Call `close()` before leaving on purpose (done or a reported error): it says
    goodbye, so the others do not take the exit for a crash.
    """

    def __init__(self, host: str, on_lost: Callable[[str], None] | None = None) -> None:
        import jax

        self.me, self.count = jax.process_index(), jax.process_count()
        # the terminal's stderr, kept now: when a peer dies, fd 2 may be redirected to a capture
        # (`quiet_cache_loads` around a checkpoint save) that os._exit would never pass on
        self._stderr = os.dup(2)
        self.on_lost = on_lost or self._exit
        self.closing = threading.Event()
        self.conns: list[socket.socket] = []
        server = None
        if self.me == 0:
            server = socket.create_server((host, 0))
            address = f"{host}:{server.getsockname()[1]}"
        address = agree(address if server is not None else "")
        if server is not None:
            for _ in range(self.count - 1):
                conn, _ = server.accept()
                peer = int.from_bytes(conn.recv(4), "little")
                self._watch(conn, peer)
            server.close()
        else:
            where, port = address.rsplit(":", 1)
            conn = socket.create_connection((where, int(port)))
            conn.sendall(self.me.to_bytes(4, "little"))
            self._watch(conn, 0)

    def _watch(self, conn: socket.socket, peer: int) -> None:
        self.conns.append(conn)
        threading.Thread(target=self._read, args=(conn, peer), daemon=True, name=f"cnnpipe-peer-{peer}").start()

    def _read(self, conn: socket.socket, peer: int) -> None:
        try:
            data = conn.recv(len(_BYE))
        except OSError:
            data = b""
        if data != _BYE and not self.closing.is_set():
            self.on_lost(f"process {self.me} of {self.count}: process {peer} stopped (killed or crashed); "
                         "stopping this one too")

    def _exit(self, message: str) -> None:
        os.write(self._stderr, f"cnnpipe train: error: {message}\n".encode())
        os._exit(1)  # the main thread may be blocked in a collective or a barrier

    def close(self) -> None:
        """Say goodbye to the other processes and stop watching them."""
        self.closing.set()
        os.close(self._stderr)
        for conn in self.conns:
            try:
                conn.sendall(_BYE)
                conn.close()
            except OSError:
                pass
