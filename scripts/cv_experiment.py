"""k-fold cross-validation on real data, with the two commands a user runs: scikit-learn's handwritten digits.

The 1,797 digits (8x8, values 0-16, 13 writers' worth of scans) are written as 8-bit
grayscale PNGs, values kept exactly, into one flat folder named by an id, with a
Kaggle-style ``labels.csv`` (``id,label``; ids without the extension, rows shuffled).
Then, as a user would:

    cnnpipe preprocess digits/ store --size 16 --resize stretch --channels gray --labels labels.csv --folds 5
    cnnpipe cv cv.yaml --workdir cv

with a config training the default CNN for `--epochs` epochs on the store. Prints the
`cnnpipe cv` table (every metric per fold, mean and sample std) and the wall time of each
command.

    .venv/bin/python scripts/cv_experiment.py [--epochs 10] [--folds 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CNNPIPE = [sys.executable, "-m", "cnnpipe.cli"]


def write_digits(root: Path) -> Path:
    """root/digits/<id>.png and root/labels.csv; returns the table's path."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    (root / "digits").mkdir(parents=True)
    rows = []
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        Image.fromarray(img.astype(np.uint8), mode="L").save(root / "digits" / f"d{i:04d}.png")
        rows.append(f"d{i:04d},{label}")
    np.random.default_rng(0).shuffle(rows)
    (root / "labels.csv").write_text("id,label\n" + "\n".join(rows) + "\n")
    return root / "labels.csv"


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--keep", metavar="DIR", help="work here (kept) instead of a temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cv_experiment_") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        table = write_digits(root)
        t_pre = timed([*CNNPIPE, "preprocess", str(root / "digits"), str(root / "store"), "--size", "16",
                       "--resize", "stretch", "--channels", "gray", "--labels", str(table),
                       "--folds", str(args.folds), "--overwrite"])
        (root / "cv.yaml").write_text(f"data: {{source: store, path: {root / 'store'}}}\n"
                                      f"train: {{epochs: {args.epochs}, batch_size: 32}}\n")
        t_cv = timed([*CNNPIPE, "cv", str(root / "cv.yaml"), "--workdir", str(root / "cv")])
        print(f"preprocess {t_pre:.1f} s, cv ({args.folds} folds x {args.epochs} epochs) {t_cv:.1f} s wall")


if __name__ == "__main__":
    main()
