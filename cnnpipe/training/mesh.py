"""Devices: one XLA device per CPU core, the data-parallel mesh, and placing batches and state on it.

One process uses every local device: the batch is split over the mesh axis "data"
and the train state is replicated. In a multi-process run (`cnnpipe.training.distributed`)
the mesh spans every device of every process; each process holds the rows of a
global batch that its own devices take (`process_rows`) and `shard_batch` assembles
the global array from those local rows (`jax.make_array_from_process_local_data`).

CPU hosts: XLA:CPU gives a process one device that spreads each op over the cores;
one device per core, data parallel, trains the reference CNN ~1.35x faster on 2 cores,
and XLA's own conv kernels beat YNNPACK's here. `setup_cpu_devices()`, called before jax
initialises its backend, sets both up (see benchmarks/bench_train.py for the figures).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["DATA_AXIS", "CPU_TUNING_FLAGS", "setup_cpu_devices", "usable_cores", "make_mesh", "check_divisible",
           "process_rows", "shard_batch", "replicate", "batch_spec"]

DATA_AXIS = "data"


# ---------------------------------------------------------------- CPU devices

# XLA:CPU hands convolutions and dots to YNNPACK by default; for these CNNs its conv
# weight gradients ran several times slower than XLA's own (Eigen) kernels: the reference
# CNN of benchmarks/bench_train.py trained 1.75x faster on one device without it.
CPU_TUNING_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def setup_cpu_devices(count: int | None = None, *, tune: bool = True) -> bool:
    """One XLA CPU device per core (data parallel over cores) and faster CPU kernels.

    Call before jax starts its backend (the flags are read once, at backend start).
    Appends ``--xla_force_host_platform_device_count=<count>`` (default: the cores this
    process may use) and, with `tune`, `CPU_TUNING_FLAGS` to ``XLA_FLAGS``, skipping any
    flag already set there. Both only affect the CPU platform, so they are harmless on
    GPU/TPU hosts. Returns whether anything was added; False once jax's backend started.
    """
    if _backend_started():
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    added = []
    if "xla_force_host_platform_device_count" not in flags:
        added.append(f"--xla_force_host_platform_device_count={max(1, int(count or usable_cores()))}")
    if tune:
        added += [f for f in CPU_TUNING_FLAGS if f.split("=")[0] not in flags]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return bool(added)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(getattr(xla_bridge, "_backends", {}))
    except ImportError:  # private module moved: assume started, so we never half-apply the flag
        return True


# ---------------------------------------------------------------- the mesh

def make_mesh(num_devices: int = 0) -> Mesh:
    """1-D mesh with axis "data": the first `num_devices` local devices (0 = all).

    In a multi-process run the mesh holds every device of every process, and
    `num_devices` may only be 0 or this process's device count.
    """
    local = jax.local_devices()
    if num_devices < 0 or num_devices > len(local):
        raise ValueError(f"train.num_devices: got {num_devices}; this host has {len(local)} "
                         f"{local[0].platform} device(s) (0 = all)")
    if jax.process_count() > 1:
        if num_devices not in (0, len(local)):
            raise ValueError(f"train.num_devices: got {num_devices}; a multi-process run uses every device "
                             f"of every process (set 0)")
        return Mesh(np.array(jax.devices()), (DATA_AXIS,))
    return Mesh(local[: num_devices or len(local)], (DATA_AXIS,))


def check_divisible(mesh: Mesh, n: int, what: str = "batch size") -> None:
    """Raise ValueError naming `what`, `n` and the device count unless `n` divides over the mesh."""
    if n % mesh.size:
        raise ValueError(f"{what} ({n}) must be divisible by the number of devices ({mesh.size}); "
                         f"pick a multiple of {mesh.size} or set train.num_devices")


def process_rows(mesh: Mesh, n: int) -> slice:
    """The rows of an `n`-row global batch that this process's devices hold (all of them in one process).

    Each process reads only these rows from the store; in the global batch they sit
    where a single process would have put them, so the batch order does not depend
    on the process count.
    """
    check_divisible(mesh, n)
    if jax.process_count() == 1:
        return slice(0, n)
    held = NamedSharding(mesh, PartitionSpec(DATA_AXIS)).addressable_devices_indices_map((n,))
    spans = sorted((ix[0].start or 0, ix[0].stop if ix[0].stop is not None else n) for ix in held.values())
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError(f"this process's devices hold rows {spans} of the batch: not one contiguous block")
    return slice(spans[0][0], spans[-1][1])


def shard_batch(mesh: Mesh, *arrays: Any) -> tuple[jax.Array, ...]:
    """Place host arrays with their leading (batch) axis split over the mesh axis "data".

    One process: `arrays` are whole batches. Several processes: they are this
    process's rows (`process_rows`), and the result is the global batch. Always
    returns a tuple. Raises ValueError naming both numbers when the batch does not
    divide over the devices.
    """
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    out = []
    for a in arrays:
        if jax.process_count() == 1:
            check_divisible(mesh, a.shape[0])
            out.append(jax.device_put(a, sharding))
        else:
            rows = a.shape[0] * mesh.size // len(mesh.local_devices)  # the global batch
            check_divisible(mesh, rows)
            out.append(jax.make_array_from_process_local_data(sharding, np.asarray(a), (rows, *a.shape[1:])))
    return tuple(out)


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Place a pytree (e.g. a `TrainState`) fully replicated on every device of the mesh.

    In a multi-process run every process must pass the same values; leaves already
    replicated on the mesh are kept, others go through the host.
    """
    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def place(x: Any) -> Any:
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        return jax.device_put(np.asarray(x), sharding)  # a committed local array cannot be put directly

    return jax.tree.map(place, tree)


def batch_spec(mesh: Mesh, shape: Sequence[int], dtype: Any) -> jax.ShapeDtypeStruct:
    """An abstract global batch (no data) placed as `shard_batch` places it, for ahead-of-time compiles."""
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=NamedSharding(mesh, PartitionSpec(DATA_AXIS)))
