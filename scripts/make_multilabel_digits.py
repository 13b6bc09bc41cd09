"""A multi-label and regression image set built from real scans: 2x2 mosaics of scikit-learn's digits.

Why: multi-label training (sets of labels, unknown entries, list-valued Parquet cells) and
regression targets need a data set whose answers are known exactly, without downloads. This
one is made of real handwriting -- the 1,797 8x8 scans bundled with scikit-learn
(``sklearn.datasets.load_digits()``, values 0-16, works offline) -- and its label sets are
known by construction: each 16x16 image is a 2x2 mosaic whose quadrants each hold a random
scan with probability 0.55 or are blank, so the labels are exactly the digit classes placed.

Pixels are the scans' values x 15 (0..240, exact integers), written as 8-bit grayscale PNGs
with Pillow. OUT receives:

- ``images/<id>.png``, ids ``m00000``, ``m00001``, ...
- ``labels.csv`` (``id,labels,count,ink``), rows in a seeded shuffled order: ``labels`` the
  present digit names ("d0".."d9") sorted and joined by ``|`` (empty for a blank mosaic),
  ``count`` the number of non-blank quadrants, ``ink`` the mean pixel value of the PNG as
  written (read back) / 255, 6 decimals -- two regression targets.
- ``labels_cols.csv`` (``id,d0,...,d9``), one 0/1 column per digit, in id order; like
  CheXpert's unknowns, ~5% of the cells (seeded) are ``-1`` and ~3% are left empty.
- ``labels.parquet``: ``id`` (string) and ``labels`` (list<string>), in id order.

Same arguments, byte-identical outputs. Prints a one-line summary.

    .venv/bin/python scripts/make_multilabel_digits.py OUT [--n 3000] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

P_FILLED = 0.55
P_MINUS_ONE, P_EMPTY = 0.05, 0.03
SCALE = 15
NAMES = [f"d{k}" for k in range(10)]


def build(out: Path, n: int = 3000, seed: int = 0) -> dict[str, int]:
    """Writes the set into `out`; returns the label frequencies (and the blank count under "blank")."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans = np.rint(digits.images).astype(np.uint8) * SCALE  # (1797, 8, 8), 0..240
    targets = digits.target.astype(int)
    rng_mosaic, rng_order, rng_unknown = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))

    (out / "images").mkdir(parents=True, exist_ok=True)
    ids = [f"m{i:05d}" for i in range(n)]
    label_sets: list[list[str]] = []
    counts: list[int] = []
    inks: list[float] = []
    for ident in ids:
        filled = rng_mosaic.random(4) < P_FILLED
        picks = rng_mosaic.integers(0, len(scans), size=4)
        img = np.zeros((16, 16), dtype=np.uint8)
        present: set[int] = set()
        for q in range(4):
            if filled[q]:
                r, c = divmod(q, 2)
                img[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = scans[picks[q]]
                present.add(int(targets[picks[q]]))
        path = out / "images" / f"{ident}.png"
        Image.fromarray(img).save(path, format="PNG")
        with Image.open(path) as im:
            written = np.asarray(im)
        assert written.dtype == np.uint8 and np.array_equal(written, img), path
        label_sets.append([NAMES[k] for k in sorted(present)])
        counts.append(int(filled.sum()))
        inks.append(float(written.mean()) / 255)

    order = rng_order.permutation(n)
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "labels", "count", "ink"])
        for i in order:
            w.writerow([ids[i], "|".join(label_sets[i]), counts[i], f"{inks[i]:.6f}"])

    u = rng_unknown.random((n, len(NAMES)))
    with open(out / "labels_cols.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", *NAMES])
        for i, ident in enumerate(ids):
            cells = []
            for k, name in enumerate(NAMES):
                if u[i, k] < P_MINUS_ONE:
                    cells.append("-1")
                elif u[i, k] < P_MINUS_ONE + P_EMPTY:
                    cells.append("")
                else:
                    cells.append("1" if name in label_sets[i] else "0")
            w.writerow([ident, *cells])

    table = pa.table({"id": pa.array(ids, type=pa.string()),
                      "labels": pa.array(label_sets, type=pa.list_(pa.string()))})
    pq.write_table(table, out / "labels.parquet")

    freq = {name: sum(name in s for s in label_sets) for name in NAMES}
    freq["blank"] = sum(not s for s in label_sets)
    return freq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    freq = build(args.out, args.n, args.seed)
    blank = freq.pop("blank")
    print(f"{args.n} images ({blank} blank) in {args.out}; label frequencies: "
          + " ".join(f"{k}={v}" for k, v in freq.items()))


if __name__ == "__main__":
    main()
