"""Fixed-shape, deterministic host batches from a `Split`.

Batch order is a pure function of (seed, epoch), so a resumed run continues
from (epoch, step in epoch) with exactly the order an uninterrupted run sees.
Each process of a multi-process run reads only its rows of every global batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from cnnpipe.datasets.dataset import Split


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full train batches per epoch (the remainder is dropped, so shapes stay fixed)."""
    steps = num_examples // batch_size
    if steps == 0:
        raise ValueError(f"train.batch_size (={batch_size}) is larger than the train split "
                         f"(={num_examples} images)")
    return steps


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the train split in `epoch`: a pure function of (seed, epoch, n)."""
    return np.random.default_rng([int(seed), int(epoch), 0xDA7A]).permutation(n)


def balanced_order(seed: int, epoch: int, labels: np.ndarray) -> np.ndarray:
    """`len(labels)` indices drawn with replacement, each class equally likely (`train.sampler: balanced`).

    Each image's chance is 1 / (classes present x its class's count), PyTorch's
    ``WeightedRandomSampler`` with inverse-frequency weights; a pure function of
    (seed, epoch, labels), so resume continues the same draw.
    """
    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels)
    p = 1.0 / (np.count_nonzero(counts) * counts[labels])
    rng = np.random.default_rng([int(seed), int(epoch), 0xBA1A])
    return rng.choice(len(labels), size=len(labels), replace=True, p=p / p.sum())


def epoch_order(labels: np.ndarray, batch_size: int, *, seed: int, epoch: int, sampler: str = "shuffle"
                ) -> np.ndarray:
    """The rows of every train batch of `epoch`, (steps, batch_size) int64: the permutation (or, with
    `sampler` "balanced", `balanced_order`) cut into full batches. The one order of the host and device paths."""
    n = len(labels)
    perm = balanced_order(seed, epoch, labels) if sampler == "balanced" else epoch_permutation(seed, epoch, n)
    steps = steps_per_epoch(n, batch_size)
    return perm[:steps * batch_size].reshape(steps, batch_size)


def train_batches(split: Split, batch_size: int, *, seed: int, epoch: int, start_step: int = 0,
                  rows: slice = slice(None), sampler: str = "shuffle") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled (images, labels) batches of exactly `batch_size`, from `start_step` of `epoch`.

    `rows` selects this process's part of every global batch (`mesh.process_rows`):
    only those images are read, and the parts of all processes, concatenated in
    process order, are the single-process batch. `sampler` "balanced" draws the epoch
    with `balanced_order` instead of a permutation.
    """
    batches = epoch_order(split.labels, batch_size, seed=seed, epoch=epoch, sampler=sampler)
    for step in range(start_step, len(batches)):
        idx = batches[step][rows]
        # sorted reads are sequential on a memmap; the batch itself keeps the epoch's order
        order = np.argsort(idx, kind="stable")
        images = np.empty((len(idx), *split.images.shape[1:]), split.images.dtype)
        images[order] = split.images[idx[order]]
        yield images, split.labels[idx]


def eval_batches(split: Split, batch_size: int, *,
                 rows: slice = slice(None)) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(images, labels, mask) batches in order, all of `batch_size`; the last one zero-padded, mask False.

    `rows` selects this process's part of every global batch, as for `train_batches`.
    """
    n = len(split)
    lo, hi, _ = rows.indices(batch_size)
    for start in range(0, n, batch_size):
        first, stop = min(start + lo, n), min(start + hi, n)
        images = np.zeros((hi - lo, *split.images.shape[1:]), split.images.dtype)
        labels = np.zeros((hi - lo, *split.labels.shape[1:]), split.labels.dtype)   # class indices or targets
        mask = np.zeros(hi - lo, bool)
        images[:stop - first] = split.images[first:stop]
        labels[:stop - first] = split.labels[first:stop]
        mask[:stop - first] = True
        yield images, labels, mask


class prefetch:  # noqa: N801 - used like a generator function
    """Iterate `it` in a background thread, `size` items ahead (host I/O overlaps device work)."""

    _END = object()

    def __init__(self, it: Iterable[Any], size: int = 2) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iter(it),), daemon=True)
        self._thread.start()

    def _fill(self, it: Iterator[Any]) -> None:
        try:
            for item in it:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as exc:  # re-raised in the consumer thread
            self._put(exc)

    def _put(self, item: Any) -> bool:
        """Queue `item`, waiting in short slices so a stop request is seen; False once stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> prefetch:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the background thread (safe to call twice)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["steps_per_epoch", "epoch_permutation", "balanced_order", "epoch_order", "train_batches", "eval_batches", "prefetch"]
