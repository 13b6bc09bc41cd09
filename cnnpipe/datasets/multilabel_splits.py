"""Multi-label splits and folds by iterative stratification.

Sechidis, Tsoumakas & Vlahavas (2011), "On the stratification of multi-label data"
(ECML PKDD), Algorithm 1: the algorithm behind the `iterative-stratification`
package's `IterativeStratification` and scikit-multilearn's `iterative_train_test_split`.
Subset j wants ``fractions[j] * N`` rows and ``fractions[j] * n_l`` of the ``n_l``
positives of each label l. The label with the fewest positives not yet dealt (ties: the
lower label index) goes next: each of its rows not yet dealt goes to the subset that
still wants the most positives of that label, ties to the subset that still wants the
most rows, and every subset the row is dealt to wants one row and one positive of each
of the row's labels less. Rows with no positive label are dealt last, by the rows each
subset still wants (same ties). A subset asked for a fraction of 0 gets nothing.

Targets are ``(N, L)`` float arrays: 1 positive, 0 negative, NaN unknown (counts as not positive).

Like `cnnpipe.datasets.splits`, everything here is a pure function of the multiset of
(key, target row) pairs and the seed, never of row order: rows are dealt in the order of
`hash_unit(seed, "multilabel", key)` (then the key, then the row's positives and unknowns),
so permuting the rows permutes the answer the same way. Where the paper breaks the last
ties at random, the tie here goes to the first tied subset counted cyclically (over the
subsets of non-zero share, by index) from one picked by a second keyed hash of the row's key
(`hash_unit(seed, "multilabel-tie", key)`): deterministic, and not biased towards subset 0.

The greedy deal guarantees no bound in general. With at most one positive per row it keeps
every label's positives in each subset within 1 of the fraction asked for and each subset's
size within L + 1 (see the tests); on typical multi-label data both stay within a few rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cnnpipe.datasets.splits import SplitError, hash_unit

__all__ = ["iterative_assign", "iterative_split", "iterative_folds"]

_SPLITS = ("train", "val", "test")


def _positives(keys: Sequence[str], targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positive, unknown) boolean ``(N, L)`` masks of `targets`, checked against `keys`."""
    t = np.asarray(targets)
    if t.ndim != 2 or t.shape[0] != len(keys):
        raise SplitError(f"multi-label split: targets must be (rows, labels) with {len(keys)} rows, "
                         f"got shape {t.shape}")
    t = t.astype(np.float64, copy=False)
    unknown = np.isnan(t)
    bad = ~(unknown | (t == 0) | (t == 1))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise SplitError(f"multi-label split: targets must be 0, 1 or NaN; row {r} label {c} is {t[r, c]!r}")
    return t == 1, unknown


def _fractions(fractions: Sequence[float]) -> list[float]:
    frac = [float(f) for f in fractions]
    if not frac or any(not np.isfinite(f) or f < 0 for f in frac) or abs(sum(frac) - 1) > 1e-6:
        raise SplitError(f"multi-label split: fractions must be non-negative and sum to 1, got {list(fractions)}")
    return frac


def _order(keys: Sequence[str], pos: np.ndarray, unknown: np.ndarray, seed: int) -> np.ndarray:
    """Row indices in the seed's order: `hash_unit` of the key, then the key, then the row itself."""
    pb, ub = np.packbits(pos, axis=1), np.packbits(unknown, axis=1)
    return np.array(sorted(range(len(keys)), key=lambda i: (hash_unit(seed, "multilabel", keys[i]), keys[i],
                                                             pb[i].tobytes(), ub[i].tobytes())), dtype=np.int64)


def _pick(want: list[float], total: list[float], order: list[int]) -> int:
    """The subset of `order` that wants the most (`want`, then `total`); ties to the first in `order`."""
    best, bw, bt = order[0], want[order[0]], total[order[0]]
    for j in order[1:]:
        w = want[j]
        if w > bw or (w == bw and total[j] > bt):
            best, bw, bt = j, w, total[j]
    return best


def _deal(pos: np.ndarray, frac: list[float], spins: list[float]) -> list[int]:
    """Algorithm 1 on rows already in the seed's order: the subset of each row.

    `pos` is ``(N, L)`` bool; `spins[i]` in [0, 1) picks where row i's last tie-break starts.
    """
    n, n_labels = pos.shape
    subsets = [j for j, f in enumerate(frac) if f > 0]
    rotations = [subsets[s:] + subsets[:s] for s in range(len(subsets))]
    turn = [rotations[int(u * len(subsets))] for u in spins]
    counts = pos.sum(axis=0).tolist()
    total = [f * n for f in frac]
    want = [[f * c for f in frac] for c in counts]
    rows, cols = np.nonzero(pos)  # row-major: each row's labels, in label order
    bounds = np.searchsorted(rows, np.arange(n + 1)).tolist()
    cols_list = cols.tolist()
    labels_of = [cols_list[bounds[i]:bounds[i + 1]] for i in range(n)]
    lab_rows, lab_cols = np.nonzero(pos.T)  # label-major: each label's rows, in the seed's order
    lab_bounds = np.searchsorted(lab_rows, np.arange(n_labels + 1)).tolist()
    members = lab_cols.tolist()
    out = [-1] * n
    left = list(counts)
    while any(left):
        lab = min((lab for lab in range(n_labels) if left[lab]), key=lambda lab: (left[lab], lab))
        for i in members[lab_bounds[lab]:lab_bounds[lab + 1]]:
            if out[i] >= 0:
                continue
            j = out[i] = _pick(want[lab], total, turn[i])
            total[j] -= 1
            for other in labels_of[i]:
                want[other][j] -= 1
                left[other] -= 1
    for i in range(n):
        if out[i] < 0:  # no positive label: by the rows each subset still wants
            j = out[i] = _pick(total, total, turn[i])
            total[j] -= 1
    return out


def _assign(keys: Sequence[str], targets: np.ndarray, fractions: Sequence[float], seed: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(subset of each row, positive mask, each row's rank in the seed's order)."""
    frac = _fractions(fractions)
    pos, unknown = _positives(keys, targets)
    order = _order(keys, pos, unknown, seed)
    spins = [hash_unit(seed, "multilabel-tie", keys[i]) for i in order.tolist()]
    subset = np.empty(len(keys), np.int64)
    subset[order] = _deal(pos[order], frac, spins)
    rank = np.empty(len(keys), np.int64)
    rank[order] = np.arange(len(keys))
    return subset, pos, rank


def iterative_assign(keys: Sequence[str], targets: np.ndarray, fractions: Sequence[float], seed: int) -> np.ndarray:
    """The subset (an index into `fractions`) of each row by iterative stratification (see the module doc).

    Args:
      keys: ``N`` row keys (file paths); they and `seed` fix the order rows are dealt in.
      targets: ``(N, L)`` float (float32 usually): 1 positive, 0 negative, NaN unknown (not positive).
      fractions: each subset's share of the rows, non-negative and summing to 1 (``[0.8, 0.1, 0.1]``,
        or k equal parts); a subset of share 0 gets no row.
      seed: the order rows are dealt in and how the last ties break.

    Returns:
      int64 ``(N,)``: each row's subset. Permuting the rows permutes it the same way.

    Raises:
      SplitError: `targets` not ``(N, L)`` or holding anything but 0, 1 and NaN, or bad `fractions`.
    """
    return _assign(keys, targets, fractions, seed)[0]


def iterative_split(keys: Sequence[str], targets: np.ndarray, val_fraction: float, test_fraction: float,
                    seed: int) -> list[str]:
    """"train" / "val" / "test" for each row: `iterative_assign` with ``[1 - val - test, val, test]``.

    A label with two or more positives keeps at least one in train: where the deal left it
    none, one of its positives moves back to train, from the held-out subset holding more
    of them (test on a tie), the one with the fewest positive labels (then the earliest in
    the seed's order), so other labels move as little as possible. Moving a row into train
    never takes a positive out of train, so one such move per label is enough.

    Raises:
      SplitError: fractions negative or leaving train no share, or bad `targets` (`iterative_assign`).
    """
    if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
        raise SplitError(f"multi-label split: val ({val_fraction}) and test ({test_fraction}) fractions must be "
                         "non-negative and leave train a share")
    subset, pos, rank = _assign(keys, targets, [1 - val_fraction - test_fraction, val_fraction, test_fraction],
                                seed)
    n_pos = pos.sum(axis=1)
    for lab in range(pos.shape[1]):
        rows = np.flatnonzero(pos[:, lab])
        if len(rows) < 2 or (subset[rows] == 0).any():
            continue
        held = np.bincount(subset[rows], minlength=3)
        source = max((1, 2), key=lambda s: (held[s], s))
        from_source = rows[subset[rows] == source].tolist()
        subset[min(from_source, key=lambda i: (n_pos[i], rank[i]))] = 0
    return [_SPLITS[s] for s in subset.tolist()]


def iterative_folds(keys: Sequence[str], targets: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The fold (int64, 0 to k-1) of each row: `iterative_assign` into `k` equal shares.

    Raises:
      SplitError: `k` < 2, fewer rows than folds, or bad `targets`.
    """
    if k < 2:
        raise SplitError(f"folds: expected 2 or more, got {k}")
    if len(keys) < k:
        raise SplitError(f"folds: {k} folds need at least {k} rows; there are {len(keys)}")
    return iterative_assign(keys, targets, [1.0 / k] * k, seed)
