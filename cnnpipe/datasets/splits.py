"""Which split (train / val / test) and which cross-validation fold each file is in.

Every function here is a pure function of the files' keys (their paths), labels,
groups and the seed, never of the order they are given in or of a worker count:
inputs are put in a canonical order first. Methods (`--split`, `data.split`):

- ``stratified`` (the default): per class, files are ordered by a keyed hash of
  (seed, class, key) and the first ``round(n * test_fraction)`` go to test, the next
  ``round(n * val_fraction)`` to val, so each class's share of a split is within one
  image of the fraction asked for; a class of two or more images always has a
  validation image (when `val_fraction` > 0) and keeps at least one training image.
- ``group``: no group (patient, slide, scene) is in two splits, classes as balanced as
  the groups allow: scikit-learn's `StratifiedGroupKFold` (shuffled with the seed) into
  ``round(1 / fraction)`` folds (at most one per group), of which the one nearest the share
  asked for that leaves every class a training image is held out.
- ``hash``: each file by its own hash (`assign_split`), or each group by its name's: a
  file's split never moves as files are added, at the price of per-class shares that wander.

k folds (`kfold`) are stratified the same way (grouped with groups); test files are
held out first and the folds partition the rest.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

__all__ = ["SPLIT_METHODS", "SplitError", "assign_split", "hash_unit", "stratified_split", "group_split",
           "kfold", "deal_folds", "split_files"]

SPLIT_METHODS = ("stratified", "group", "hash")


class SplitError(ValueError):
    """A split that cannot be made (too few groups or images for the folds asked for)."""


def hash_unit(seed: int, class_name: str, key: str) -> float:
    """A keyed hash of (seed, class, key) mapped into [0, 1): the same on every machine and run.

    blake2b rather than Python's `hash()` (salted per process). Names are hashed as
    bytes (`os.fsencode`), so a name that is not valid UTF-8 hashes like any other.
    """
    raw = b"\x00".join((str(seed).encode(), os.fsencode(class_name), os.fsencode(key)))
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big") / 2.0**64


def assign_split(seed: int, class_name: str, key: str, val_fraction: float, test_fraction: float) -> str:
    """The ``hash`` split of one file: `hash_unit` below `test_fraction` is test, then val, else train."""
    u = hash_unit(seed, class_name, key)
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def _round(x: float) -> int:
    return math.floor(x + 0.5)  # half up: Python's round() sends 2.5 to 2


def _class_orders(keys: Sequence[str], labels: Sequence[str], seed: int) -> dict[str, list[int]]:
    """Each class's indices, ordered by `hash_unit` (ties by key): independent of input order."""
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(labels):
        by_class[c].append(i)
    return {c: sorted(idx, key=lambda i: (hash_unit(seed, c, keys[i]), keys[i]))
            for c, idx in sorted(by_class.items())}


def _take_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(val, test) image counts for a class of `n`: rounded shares, one val image from 2 up, one train kept."""
    n_test, n_val = _round(n * test_fraction), _round(n * val_fraction)
    if val_fraction > 0 and n >= 2 and n_val == 0:
        n_val = 1
    while n_test + n_val > n - 1 and n_test + n_val > 0:  # at least one training image
        if n_test > 0 and (n_test >= n_val or n_val <= 1):
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def stratified_split(keys: Sequence[str], labels: Sequence[str], val_fraction: float, test_fraction: float,
                     seed: int) -> list[str]:
    """"train" / "val" / "test" for each file, per class in `hash_unit` order (see the module doc)."""
    out = ["train"] * len(keys)
    for order in _class_orders(keys, labels, seed).values():
        n_val, n_test = _take_counts(len(order), val_fraction, test_fraction)
        for rank, i in enumerate(order):
            out[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def _canonical(keys: Sequence[str], labels: Sequence[str], groups: Sequence[str]) -> list[int]:
    return sorted(range(len(keys)), key=lambda i: (groups[i], labels[i], keys[i]))


def _group_folds(idx: list[int], labels: Sequence[str], groups: Sequence[str], k: int, seed: int) -> np.ndarray:
    """scikit-learn's `StratifiedGroupKFold(k, shuffle=True, random_state=seed)` fold of each of `idx`
    (in canonical order, so the answer does not depend on the caller's order)."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.array([labels[i] for i in idx], dtype=object)
    g = np.array([groups[i] for i in idx], dtype=object)
    folds = np.empty(len(idx), np.int64)
    with warnings.catch_warnings():  # "the least populated class has fewer members than n_splits": expected
        warnings.simplefilter("ignore", UserWarning)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed % 2**32)
        for f, (_, held) in enumerate(splitter.split(np.zeros(len(idx)), y, g)):
            folds[held] = f
    return folds


def _hold_out_groups(idx: list[int], labels: Sequence[str], groups: Sequence[str], fraction: float,
                     seed: int) -> set[int]:
    """About `fraction` of `idx` by whole groups: one of ``round(1 / fraction)`` stratified group folds."""
    n_groups = len({groups[i] for i in idx})
    if fraction * len(idx) < 0.5 or n_groups < 2:   # under half an image: none, as `_take_counts` rounds
        return set()
    k = min(max(2, _round(1 / fraction)), n_groups)
    if max(Counter(labels[i] for i in idx).values()) < k:
        # scikit-learn refuses when every class is smaller than k: too few images to stratify, so
        # the groups alone are dealt (one label for all)
        labels = [""] * len(labels)
    folds = _group_folds(idx, labels, groups, k, seed)
    classes = {labels[i] for i in idx}

    def classes_lost(f: int) -> int:   # classes that would keep no image outside the held-out fold
        return len(classes - {labels[i] for i, g in zip(idx, folds) if g != f})

    target = fraction * len(idx)
    sizes = np.bincount(folds, minlength=k)
    # the fold that keeps every class in training and is nearest the share asked for (few or uneven
    # groups make folds of very different sizes); ties go to the seed's order of scikit-learn's folds
    held = min(range(k), key=lambda f: (classes_lost(f), abs(sizes[f] - target), f))
    return {i for i, f in zip(idx, folds) if f == held}


def group_split(keys: Sequence[str], labels: Sequence[str], groups: Sequence[str], val_fraction: float,
                test_fraction: float, seed: int) -> list[str]:
    """"train" / "val" / "test" for each file with no group in two splits (scikit-learn's StratifiedGroupKFold)."""
    idx = _canonical(keys, labels, groups)
    test = _hold_out_groups(idx, labels, groups, test_fraction, seed)
    rest = [i for i in idx if i not in test]
    val = _hold_out_groups(rest, labels, groups, val_fraction / (1 - test_fraction), seed) if rest else set()
    return ["test" if i in test else "val" if i in val else "train" for i in range(len(keys))]


def kfold(keys: Sequence[str], labels: Sequence[str], k: int, seed: int, groups: Sequence[str] | None = None
          ) -> np.ndarray:
    """The fold (0 to k-1) of each file: stratified, and grouped when `groups` is given.

    Without groups, each class's files (in `hash_unit` order) are dealt round the folds
    starting where the previous class stopped, so every class's fold sizes differ by at
    most one and so do the folds' totals (scikit-learn's StratifiedKFold gives the same
    counts). With groups: `StratifiedGroupKFold`.

    Raises:
      SplitError: `k` < 2, more folds than the smallest class has images (naming the
        class), or than there are groups.
    """
    if k < 2:
        raise SplitError(f"folds: expected 2 or more, got {k}")
    counts: dict[str, int] = defaultdict(int)
    for c in labels:
        counts[c] += 1
    small = min(sorted(counts), key=lambda c: counts[c]) if counts else None
    if small is not None and counts[small] < k:
        raise SplitError(f"folds: {k} folds need at least {k} images of every class; class {small!r} has "
                         f"{counts[small]}")
    if groups is not None:
        n_groups = len(set(groups))
        if n_groups < k:
            raise SplitError(f"folds: {k} folds need at least {k} groups; there are {n_groups}")
        idx = _canonical(keys, labels, groups)
        out = np.empty(len(keys), np.int64)
        out[idx] = _group_folds(idx, labels, groups, k, seed)
        return out
    out = np.empty(len(keys), np.int64)
    start = 0
    for order in _class_orders(keys, labels, seed).values():
        for rank, i in enumerate(order):
            out[i] = (start + rank) % k
        start = (start + len(order)) % k
    return out


def split_files(keys: Sequence[str], labels: Sequence[str], *, method: str, val_fraction: float,
                test_fraction: float, seed: int, groups: Sequence[str] | None = None,
                folds: int | None = None) -> tuple[list[str], np.ndarray | None]:
    """(split of each file, fold of each file or None) by `method` (`SPLIT_METHODS`).

    With `folds`, the test files are held out as `method` says and the others are
    dealt into `folds` folds (all "train"; `data.fold` picks the validation fold).
    """
    if method == "group" and groups is None:
        raise SplitError("split: 'group' needs a group column (--group-col)")
    if method == "stratified" and groups is not None:
        raise SplitError("split: 'stratified' would put one group's files in two splits; with a group column "
                         "use 'group' (the default) or 'hash' (a group's split by its name)")
    val = 0.0 if folds else val_fraction
    if method == "group":
        splits = group_split(keys, labels, groups, val, test_fraction, seed)  # type: ignore[arg-type]
    elif method == "hash" and groups is not None:   # the group's hash: a whole group moves together
        splits = [assign_split(seed, "", g, val, test_fraction) for g in groups]
    elif method == "hash":
        splits = [assign_split(seed, c, k, val, test_fraction) for k, c in zip(keys, labels)]
    else:
        splits = stratified_split(keys, labels, val, test_fraction, seed)
    if not folds:
        return splits, None
    return deal_folds(splits, keys, labels, folds, seed, groups)


def deal_folds(splits: Sequence[str], keys: Sequence[str], labels: Sequence[str], k: int, seed: int,
               groups: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Every file not in "test" dealt into `k` folds (`kfold`) and made "train"; test files get fold -1."""
    rest = [i for i, s in enumerate(splits) if s != "test"]
    fold = np.full(len(keys), -1, np.int64)
    fold[rest] = kfold([keys[i] for i in rest], [labels[i] for i in rest], k, seed,
                       [groups[i] for i in rest] if groups is not None else None)
    return ["test" if s == "test" else "train" for s in splits], fold
