"""Training on imbalanced data and early stopping, end to end (cnnpipe.training.train)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cnnpipe.config import load_config
from cnnpipe.datasets.shapes import SHAPE_CLASSES, make_shapes
from cnnpipe.datasets.store import StoreWriter, build_meta
from cnnpipe.runs.evaluate import evaluate_run
from cnnpipe.runs.load import load_run
from cnnpipe.training.train import train_and_evaluate

RARE, COMMON = 8, 120   # training images of the first three classes, and of the other three
VAL = 30                # validation images of every class


def write_imbalanced_store(out, size=16):
    """Shapes at 16x16 8-bit: classes 0-2 keep 8 training images, 3-5 keep 120; validation balanced."""
    pools = {split: make_shapes(1600 if split == "train" else 400, size=(size, size), seed=seed, split=split)
             for split, seed in (("train", 0), ("val", 1))}
    keep = {"train": lambda k: RARE if k < 3 else COMMON, "val": lambda k: VAL}
    counts = {}
    with StoreWriter(out) as w:
        for split, (images, labels) in pools.items():
            rows = np.concatenate([np.flatnonzero(labels == k)[:keep[split](k)] for k in range(6)])
            w.create_split(split, len(rows), (size, size), 3, "uint8")
            for i in rows:
                w.append(split, images[i], int(labels[i]), f"{SHAPE_CLASSES[labels[i]]}/{i}.png")
            per_class = {c: int((labels[rows] == k).sum()) for k, c in enumerate(SHAPE_CLASSES)}
            counts[split] = {"total": len(rows), "per_class": per_class}
        w.commit(build_meta(classes=SHAPE_CLASSES, dtype="uint8", size=(size, size), channel_names=["R", "G", "B"],
                            splits=["train", "val"], counts=counts, mean=[128.0] * 3, std=[64.0] * 3),
                 {"skipped": []})
    return out


BASE = ["train.epochs=10", "train.batch_size=32", "train.eval_batch_size=60", "train.num_devices=1"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_imbalanced_store(tmp_path_factory.mktemp("imbalanced") / "store")


def test_class_weights_auto_raise_the_rare_classes_recall(store, tmp_path):
    recalls = {}
    for name, extra in (("plain", []), ("auto", ["train.class_weights=auto"])):
        cfg = load_config(None, [*BASE, "data.source=store", f"data.path={store}", *extra])
        summary = train_and_evaluate(cfg, tmp_path / name, log=lambda _: None)
        per_class = summary["per_class_accuracy"]
        recalls[name] = (np.mean([per_class[c] for c in SHAPE_CLASSES[:3]]), summary["balanced_accuracy"])
    # seeded: rare-class mean recall 0.000 -> 0.278, balanced accuracy 0.428 -> 0.494 when written
    assert recalls["auto"][0] >= recalls["plain"][0] + 0.15, recalls
    assert recalls["auto"][1] >= recalls["plain"][1], recalls


def test_early_stopping_stops_and_the_best_checkpoint_is_the_result(store, tmp_path):
    # val_loss must improve by 10 to count: no epoch after the first does, so patience 2 stops after epoch 3
    es = ["train.early_stopping={metric: val_loss, patience: 2, min_delta: 10}", "optimizer.learning_rate=0.03"]
    cfg = load_config(None, [*BASE, "data.source=store", f"data.path={store}", *es])
    lines: list[str] = []
    summary = train_and_evaluate(cfg, tmp_path / "es", log=lines.append)
    val = [json.loads(line) for line in (tmp_path / "es" / "metrics.jsonl").read_text().splitlines()
           if '"split": "val"' in line]
    assert len(val) == 3 and summary["steps"] == val[-1]["step"] == 3 * val[0]["step"]
    assert summary["early_stopping"]["stopped"] and summary["early_stopping"]["epochs_run"] == 3
    assert summary["epochs"] == 3 and summary["epochs_configured"] == 10  # epochs run, and those asked for
    assert any(line.startswith("early stopping: val_loss has not improved by more than 10 for 2 epoch(s)")
               for line in lines)
    best = min(val, key=lambda r: (r["loss"], r["step"]))
    assert best["step"] != val[-1]["step"]   # seeded: epoch 1 is the best, so the result is not the last state
    assert summary["result_step"] == summary["best_step"] == best["step"] and summary["best_metric"] == "val_loss"
    assert summary["val_loss"] == pytest.approx(best["loss"]) and summary["val_accuracy"] == best["accuracy"]
    assert summary["balanced_accuracy"] == pytest.approx(best["balanced_accuracy"])
    assert summary["final_val_loss"] == pytest.approx(val[-1]["loss"])
    # evaluate reports that checkpoint by default ("best" is by the run's own metric)
    run = load_run(tmp_path / "es")
    assert run.step == best["step"]
    result, _ = evaluate_run(run)
    assert result["accuracy"] == pytest.approx(summary["val_accuracy"])
    assert result["balanced_accuracy"] == pytest.approx(summary["balanced_accuracy"])
    # resuming a stopped run trains no further and keeps its result
    again = train_and_evaluate(cfg, tmp_path / "es", resume=True, log=lambda _: None)
    assert again["steps"] == summary["steps"] and again["result_step"] == summary["result_step"]
