"""`cnnpipe cv`: one ordinary run per fold, cv.json's figures are the runs' own, a rerun reads finished folds."""

from __future__ import annotations

import json
import shutil
import statistics

import numpy as np
import pytest
from PIL import Image

from cnnpipe.config import load_config
from cnnpipe.datasets.preprocess import preprocess
from cnnpipe.datasets.shapes import make_shapes
from cnnpipe.runs.cv import format_cv, run_cv

SMALL = ["data.source=store", "train.batch_size=16", "train.eval_batch_size=16", "train.epochs=1",
         "train.log_every_steps=2", "model=[{type: conv, filters: 4}, {type: relu}, {type: max_pool}, {type: flatten}]"]


@pytest.fixture(scope="module")
def folds_store(tmp_path_factory):
    """60 shapes images in one flat folder, labelled by a CSV of ids, dealt into 2 folds."""
    root = tmp_path_factory.mktemp("cv")
    images, labels = make_shapes(60, size=(16, 16), seed=3)
    (root / "flat").mkdir()
    rows = ["id,label"]
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(root / "flat" / f"{i:03d}.png")
        rows.append(f"{i:03d},{'abc'[label % 3]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    preprocess(root / "flat", root / "store", size=16, labels=root / "labels.csv", folds=2, workers=1, progress=False)
    return root / "store"


def test_each_fold_is_a_run_and_cv_json_holds_their_figures(folds_store, tmp_path):
    shutil.copytree(folds_store, tmp_path / "store")   # rebuilt below
    store = tmp_path / "store"
    cfg = load_config(None, [*SMALL, f"data.path={store}"])
    lines: list[str] = []
    result = run_cv(cfg, None, tmp_path / "cv", log=lines.append)
    assert result["folds"] == 2 and result["runs"] == ["fold-0", "fold-1"]
    assert json.loads((tmp_path / "cv" / "cv.json").read_text()) == result
    summaries = [json.loads((tmp_path / "cv" / f"fold-{i}" / "summary.json").read_text()) for i in range(2)]
    folds = np.load(store / "train" / "folds.npy")
    for i, summary in enumerate(summaries):
        info = json.loads((tmp_path / "cv" / f"fold-{i}" / "dataset.json").read_text())
        assert info["num_val"] == int((folds == i).sum()) and info["num_train"] == int((folds != i).sum())
        assert sum(map(sum, summary["confusion_matrix"])) == info["num_val"]
    for metric in ("val_accuracy", "balanced_accuracy", "val_loss"):
        row = result["metrics"][metric]
        values = [s[metric] for s in summaries]
        assert row["per_fold"] == values
        assert row["mean"] == pytest.approx(statistics.mean(values))
        assert row["std"] == pytest.approx(statistics.stdev(values))   # the sample standard deviation
    assert set(result["metrics"]) >= {"accuracy[a]", "accuracy[b]", "accuracy[c]"}
    table = format_cv(result).splitlines()
    assert table[0].split() == ["metric", "fold", "0", "fold", "1", "mean", "std"]
    first = table[1].split()
    assert first[0] == "val_accuracy" and float(first[1]) == pytest.approx(summaries[0]["val_accuracy"], abs=1e-4)
    # a rerun reads the finished folds back: nothing is trained again
    stamp = (tmp_path / "cv" / "fold-0" / "metrics.jsonl").stat().st_mtime_ns
    again: list[str] = []
    assert run_cv(cfg, 2, tmp_path / "cv", log=again.append) == result
    assert again == [f"cv: fold {i} ({i + 1} of 2) already done ({tmp_path / 'cv' / f'fold-{i}' / 'summary.json'})"
                     for i in range(2)]
    assert (tmp_path / "cv" / "fold-0" / "metrics.jsonl").stat().st_mtime_ns == stamp
    changed = load_config(None, [*SMALL, f"data.path={store}", "train.epochs=2"])
    with pytest.raises(ValueError, match=r"fold-0/config.yaml: this fold ran with another config "
                                         r"\(train.epochs differs\)"):
        run_cv(changed, None, tmp_path / "cv", log=again.append)
    # the store rebuilt with other folds: the finished folds are not mixed with new ones
    root = folds_store.parent
    preprocess(root / "flat", store, size=16, labels=root / "labels.csv", folds=2, seed=1, workers=1,
               progress=False, overwrite=True)
    with pytest.raises(ValueError, match=r"fold-0: this fold was trained on other data"):
        run_cv(cfg, None, tmp_path / "cv", log=again.append)


def test_cv_refuses_data_without_folds_in_one_line(folds_store, tmp_path, capsys):
    from cnnpipe.cli import main

    base = ["cv", "--workdir", str(tmp_path / "cv")]
    for extra, text in (([], "data.source: cnnpipe cv needs a store made with --folds or a folder, got 'shapes'"),
                        (["--set", "data.source=store", "--set", f"data.path={folds_store}", "--folds", "3"],
                         "--folds: 3 asked for, but the store"),
                        (["--set", "data.source=store", "--set", f"data.path={folds_store}", "--set", "data.fold=1"],
                         "data.fold: cnnpipe cv sets it for each fold; leave it out")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("cnnpipe cv: error: ") and text in err and err.count("\n") == 1, err
    assert not (tmp_path / "cv").exists()
