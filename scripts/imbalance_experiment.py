"""Class weights and the balanced sampler on real, imbalanced data: scikit-learn's handwritten digits.

The issue's setup: the training split keeps 14 images of each of the digits 0-4 and
every image of 5-9 (about 138 each); the validation split is balanced, 40 per class.
The 8x8 images (values 0-16) are scaled to 8-bit and enlarged 4x (nearest) to 32x32,
written as a cnnpipe store, and trained with `cnnpipe train`'s default CNN for 15
epochs, plain, with ``train.class_weights: auto`` and with ``train.sampler: balanced``,
over several seeds. Prints the rare and common classes' mean recall and the balanced
accuracy of each run, and the medians.

Needs scikit-learn (only for the data: ``pip install scikit-learn``).

    .venv/bin/python scripts/imbalance_experiment.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np

RARE_KEEP, VAL_PER_CLASS = 14, 40


def write_digits_store(out: Path, split_seed: int = 0, layout: str = "enlarge") -> Path:
    """The imbalanced digits store (32x32 gray 8-bit, values 0-255); returns its path.

    `layout`: "enlarge" scales each 8x8 digit 4x (nearest); "pad" centres it at 8x8 in a
    black 32x32 image (``cnnpipe preprocess --resize pad`` of an 8x8 file does that), a harder task.
    """
    from sklearn.datasets import load_digits

    from cnnpipe.datasets.store import StoreWriter, build_meta

    digits = load_digits()
    values = np.rint(digits.images * 255 / 16).astype(np.uint8)
    if layout == "pad":
        images = np.zeros((len(values), 32, 32, 1), np.uint8)
        images[:, 12:20, 12:20, 0] = values
    else:
        images = np.kron(values, np.ones((4, 4), np.uint8))[..., None]
    labels = digits.target.astype(np.int32)
    rng = np.random.default_rng(split_seed)
    rows: dict[str, list[int]] = {"train": [], "val": []}
    for k in range(10):
        idx = rng.permutation(np.flatnonzero(labels == k))
        rows["val"] += idx[:VAL_PER_CLASS].tolist()
        rest = idx[VAL_PER_CLASS:]
        rows["train"] += (rest[:RARE_KEEP] if k < 5 else rest).tolist()
    classes = [str(k) for k in range(10)]
    counts = {s: {"total": len(r), "per_class": {c: int((labels[r] == k).sum()) for k, c in enumerate(classes)}}
              for s, r in rows.items()}
    train = images[rows["train"]].astype(np.float64)
    with StoreWriter(out) as w:
        for split, r in rows.items():
            w.create_split(split, len(r), (32, 32), 1, "uint8")
            for i in r:
                w.append(split, images[i], int(labels[i]), f"{labels[i]}/{i}.png")
        w.commit(build_meta(classes=classes, dtype="uint8", size=(32, 32), channel_names=["L"],
                            splits=["train", "val"], counts=counts, mean=[train.mean()], std=[train.std()]),
                 {"skipped": []})
    return out


def run(store: Path, workdir: Path, seed: int, extra: list[str], epochs: int) -> dict[str, float]:
    from cnnpipe.config import load_config
    from cnnpipe.training.train import train_and_evaluate

    cfg = load_config(None, ["data.source=store", f"data.path={store}", f"seed={seed}", f"train.epochs={epochs}",
                             *extra])
    summary = train_and_evaluate(cfg, workdir, log=lambda _: None, compile_cache="off")
    recall = summary["per_class_accuracy"]
    return {"rare": float(np.mean([recall[str(k)] for k in range(5)])),
            "common": float(np.mean([recall[str(k)] for k in range(5, 10)])),
            "balanced": summary["balanced_accuracy"], "accuracy": summary["val_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--layout", choices=["enlarge", "pad"], default="enlarge",
                        help="8x8 digits enlarged 4x (default) or centred in a black 32x32 image")
    args = parser.parse_args()
    variants = {"plain": [], "class_weights: auto": ["train.class_weights=auto"],
                "sampler: balanced": ["train.sampler=balanced"]}
    with tempfile.TemporaryDirectory() as tmp:
        store = write_digits_store(Path(tmp) / "digits", layout=args.layout)
        results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        for seed in args.seeds:
            for name, extra in variants.items():
                r = run(store, Path(tmp) / f"{name.replace(': ', '-')}-{seed}", seed, extra, args.epochs)
                results[name].append(r)
                print(f"seed {seed} {name:<20} rare recall {r['rare']:.3f}  common recall {r['common']:.3f}  "
                      f"balanced accuracy {r['balanced']:.3f}  accuracy {r['accuracy']:.3f}", flush=True)
    print(f"\nmedians over seeds {args.seeds} ({args.epochs} epochs, layout {args.layout}):")
    print("| variant | rare classes' mean recall | common classes' mean recall | balanced accuracy |")
    print("| --- | --- | --- | --- |")
    for name, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("rare", "common", "balanced")}
        print(f"| {name} | {med['rare']:.3f} | {med['common']:.3f} | {med['balanced']:.3f} |")


if __name__ == "__main__":
    main()
