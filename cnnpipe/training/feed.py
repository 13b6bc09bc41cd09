"""What the train step is fed: each epoch's step arguments, and their shapes for compiling ahead.

Device-resident data (`cnnpipe.training.resident`): the split, the epoch's order placed
once, and the step number; otherwise host batches, gathered and placed a few steps
ahead in a thread (`cnnpipe.datasets.batches.prefetch`). Both follow
`cnnpipe.datasets.batches.epoch_order`, so they train on the same batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from cnnpipe.config import Config
from cnnpipe.datasets.batches import prefetch, steps_per_epoch, train_batches
from cnnpipe.datasets.dataset import Dataset

__all__ = ["epoch_batches", "compile_ahead", "prefetch_depth"]


def compile_ahead(train_steps: list[Any], eval_step: Any, state: Any, mesh: Any, ds: Dataset, cfg: Config,
                  pool: ThreadPoolExecutor, resident: bool = False, steps_per_dispatch: int = 1) -> list[Future]:
    """Submit the train steps' (None ones skipped) and eval step's compiles for `state` (abstract)
    and batches like the loop's.

    The abstract batches take their shapes and dtypes from a first batch of each kind,
    so they are exactly what the loop will pass; a resident train step takes the whole
    split, the epoch's order and a step number (`cnnpipe.training.resident`), and the
    number of steps to run when it runs several per call.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from cnnpipe.datasets.batches import eval_batches
    from cnnpipe.training.mesh import DATA_AXIS, batch_spec

    tc = cfg.train  # the first global batch of each kind (rows of every process): the compiled shapes
    spec = lambda shape, dtype, *axes: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=NamedSharding(mesh, PartitionSpec(*axes)))
    if resident:   # no host batch to read: the step takes the placed split itself
        steps = steps_per_epoch(len(ds.train), tc.batch_size)
        labels = ds.train.labels   # class indices (N,) int32 or targets (N, L) float32
        train_args = [spec(ds.train.images.shape, ds.train.images.dtype), spec(labels.shape, labels.dtype),
                      spec((steps, tc.batch_size), "int32", None, DATA_AXIS), spec((), "int32")]
        train_args += [spec((), "int32")] if steps_per_dispatch > 1 else []   # the steps to run
    else:
        train_batch = next(iter(train_batches(ds.train, tc.batch_size, seed=cfg.seed, epoch=0)), None)
        train_args = [batch_spec(mesh, a.shape, a.dtype) for a in train_batch] if train_batch is not None else None
    eval_batch = next(iter(eval_batches(ds.val, tc.eval_batch_size)), None)
    jobs = [pool.submit(step.compile, state, *train_args) for step in train_steps
            if step is not None and train_args is not None]
    if eval_batch is not None and resident:   # the validation split on the devices: one program over it
        batches = (-(-len(ds.val) // tc.eval_batch_size), tc.eval_batch_size)
        eval_args = [spec(ds.val.images.shape, ds.val.images.dtype), spec(ds.val.labels.shape, ds.val.labels.dtype),
                     spec(batches, "int32", None, DATA_AXIS), spec(batches, "int32", None, DATA_AXIS)]
        jobs.append(pool.submit(eval_step.compile, state, *eval_args))
    elif eval_batch is not None:
        jobs.append(pool.submit(eval_step.compile, state, *[batch_spec(mesh, a.shape, a.dtype) for a in eval_batch]))
    return jobs


def prefetch_depth(mesh: Any) -> int:
    """Batches prepared ahead of the step: 2 on CPU, 8 on accelerators.

    On an H200 the reference CNN at batch 256 (0.9 ms a step) trained at 0.63x its
    resident-batch rate with 2 batches ahead and 0.86x with 8 (benchmarks/bench_accel.py):
    the host copy jitters more than a short step can absorb. On CPU the step is the
    bottleneck and 2 is enough (0.98x).
    """
    return 2 if mesh.devices.flat[0].platform == "cpu" else 8


def epoch_batches(cfg: Config, parts: Any, epoch: int, start: int, rows: slice) -> Any:
    """A context manager giving ``args(i, n)``: the train step's arguments for steps ``i .. i + n - 1``
    of `epoch` (from step `start` on, in order).

    Device-resident data: the split, the epoch's order (placed once) and the first step
    (and `n`, for a step running several per call, `cnnpipe.training.dispatch`);
    otherwise the next host batch (n is 1), gathered and placed a few steps ahead in a thread.
    """
    from cnnpipe.datasets.batches import epoch_order
    from cnnpipe.training import steps
    from cnnpipe.training.resident import place_order

    tc, mesh = cfg.train, parts.mesh
    if parts.resident is not None:
        order = place_order(epoch_order(parts.ds.train.labels, tc.batch_size, seed=cfg.seed, epoch=epoch,
                                        sampler=tc.sampler), mesh)
        split, many = parts.resident, parts.steps_per_dispatch > 1

        def resident_args(i: int, n: int) -> tuple[Any, ...]:
            return (split.images, split.labels, order, np.int32(i)) + ((np.int32(n),) if many else ())

        return contextlib.nullcontext(resident_args)
    host = prefetch((steps.shard_batch(mesh, x, y) for x, y in
                     train_batches(parts.ds.train, tc.batch_size, seed=cfg.seed, epoch=epoch, start_step=start,
                                   rows=rows, sampler=tc.sampler)), size=prefetch_depth(mesh))
    return _host_args(host)


@contextlib.contextmanager
def _host_args(prefetched: Any) -> Iterator[Callable[[int, int], tuple[Any, ...]]]:
    """``args(i, n)`` over prefetched host batches: the next one (one step per call)."""
    with prefetched as batches:
        def host_args(i: int, n: int) -> tuple[Any, ...]:
            assert n == 1, "host batches train one step per call"
            return next(batches)

        yield host_args
