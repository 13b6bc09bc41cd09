"""Training data on the device: a split's raw pixels placed once, each step's batch gathered there.

When a split fits in a share of the devices' memory (``data.on_device``: auto, true,
false), its uint8/uint16 images and int32 labels go to the devices once, replicated
(each process places, from its own memory, the copy its own devices hold: no
cross-host copy). An epoch's order (the host path's permutation or balanced draw,
`cnnpipe.datasets.batches.epoch_order`) goes to the devices as one (steps, batch) int32
array, its columns split over the mesh like a batch, and the train step gathers its
batch there (`cnnpipe.training.steps.make_train_step(resident=True)`). No per-step host
gather and no per-step host-to-device copy; the batches are the host path's exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cnnpipe.training.mesh import DATA_AXIS, process_rows

__all__ = ["RESIDENT_SHARE", "ResidentSplit", "ResidentEval", "memory_budget", "resident_decision", "place_split",
           "place_order", "place_eval", "eval_order"]

# the share of a device's free memory (a CPU host's available memory) the training split may take:
# the rest is for the model, its activations and the optimizer
RESIDENT_SHARE = 0.4


@dataclass
class ResidentSplit:
    """A split on the devices: images (N, H, W, C) and labels (N,) or targets (N, L), replicated over the mesh."""

    images: jax.Array
    labels: jax.Array


@dataclass
class ResidentEval:
    """A split to evaluate on the devices: `split`, and its (batches, batch) row `order` and
    `mask` (1 for real rows, 0 for the short last batch's padding), placed as a batch is."""

    split: ResidentSplit
    order: jax.Array
    mask: jax.Array


def memory_budget(device: Any) -> int | None:
    """Bytes free on `device` (an accelerator's allocator limit minus use; a CPU: the host's available memory)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory statistics
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def resident_decision(mode: Any, nbytes: int, mesh: Any) -> tuple[bool, str]:
    """(place the split on the devices?, why) for ``data.on_device`` `mode` (auto, True, False).

    The split is replicated: on a CPU host every local device's copy is in the same
    memory, so the need is `nbytes` times the local device count there.
    """
    if mode is False:
        return False, "data.on_device is false"
    if mode is True:
        return True, "data.on_device is true"
    local = mesh.local_devices
    cpu = local[0].platform == "cpu"
    need = nbytes * (len(local) if cpu else 1)
    budget = memory_budget(local[0])
    if budget is None:
        return False, "the devices do not report their memory"
    limit = int(RESIDENT_SHARE * budget)
    fits = need <= limit
    return fits, (f"{need / 2**20:.1f} MiB {'within' if fits else 'over'} {RESIDENT_SHARE:.0%} of the "
                  f"{'host' if cpu else 'device'}'s {budget / 2**20:.0f} MiB free")


def place_split(images: np.ndarray, labels: np.ndarray, mesh: Any) -> ResidentSplit:
    """`images` and `labels` (host arrays, the whole split) replicated on every device of the mesh."""
    sharding = NamedSharding(mesh, PartitionSpec())
    # class indices as int32; multi-label and regression targets (float32 (N, L)) as they are
    labels = np.asarray(labels, np.int32) if np.asarray(labels).ndim == 1 else np.asarray(labels, np.float32)
    if jax.process_count() == 1:
        return ResidentSplit(jax.device_put(np.asarray(images), sharding), jax.device_put(labels, sharding))
    return ResidentSplit(jax.make_array_from_process_local_data(sharding, np.asarray(images)),
                         jax.make_array_from_process_local_data(sharding, labels))


def place_order(order: np.ndarray, mesh: Any) -> jax.Array:
    """An epoch's (steps, batch) row indices on the mesh, each step's row split over "data" as a batch is."""
    order = np.ascontiguousarray(order, np.int32)
    sharding = NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))
    if jax.process_count() == 1:
        return jax.device_put(order, sharding)
    rows = process_rows(mesh, order.shape[1])
    return jax.make_array_from_process_local_data(sharding, order[:, rows], order.shape)


def eval_order(n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, mask), each (ceil(n / batch_size), batch_size) int32: the rows of `n` in order in
    batches, the last one padded with the last row (mask 0): `cnnpipe.datasets.batches.eval_batches`'s
    batches (which pad with zeros; padding is masked out of every sum)."""
    batches = -(-n // batch_size)
    rows = np.arange(batches * batch_size, dtype=np.int32).reshape(batches, batch_size)
    return np.minimum(rows, n - 1), (rows < n).astype(np.int32)


def place_eval(images: np.ndarray, labels: np.ndarray, batch_size: int, mesh: Any) -> ResidentEval:
    """A non-empty split placed for `cnnpipe.training.steps.make_eval_step(resident=True)`."""
    order, mask = eval_order(len(labels), batch_size)
    return ResidentEval(place_split(images, labels, mesh), place_order(order, mesh), place_order(mask, mesh))
