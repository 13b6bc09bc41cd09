"""Multi-label and regression runs end to end, on mosaics of real scans with known answers.

Each image is a 2x2 mosaic of scikit-learn's digit scans (real handwriting, 8x8, values 0-16),
a quadrant blank or holding a random scan. Its label set (the digits present) and its
measured targets (digit count, mean ink) are known by construction. One run per task is
trained once and shared: the store's targets, the metrics, thresholds, evaluate, predict,
export and inspect are all checked on it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cnnpipe.config import load_config
from cnnpipe.datasets.preprocess import preprocess
from cnnpipe.datasets.store import load_store
from cnnpipe.training.train import train_and_evaluate

N = 320
RUN = ["data.source=store", "train.batch_size=32", "train.eval_batch_size=64", "train.log_every_steps=5",
       "train.epochs=12", "optimizer.learning_rate=0.003"]


def _mosaics(n: int, seed: int = 0) -> tuple[np.ndarray, list[set[int]]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    images, sets = np.zeros((n, 16, 16), np.uint8), []
    for i in range(n):
        present = set()
        for q in range(4):
            if rng.random() < 0.55:
                k = int(rng.integers(len(digits.images)))
                y, x = 8 * (q // 2), 8 * (q % 2)
                images[i, y:y + 8, x:x + 8] = digits.images[k].astype(np.uint8) * 15
                present.add(int(digits.target[k]))
        sets.append(present)
    return images, sets


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory):
    """The images, one flat folder, and three tables of the same labels: delimited, list cells, 0/1 columns."""
    root = tmp_path_factory.mktemp("mosaics")
    images, sets = _mosaics(N)
    (root / "img").mkdir()
    names = [f"d{k}" for k in range(10)]
    rows, cols, jsonl, reg = ["id,labels"], ["id," + ",".join(names)], [], ["filename,count,ink"]
    for i, (img, s) in enumerate(zip(images, sets)):
        Image.fromarray(img).save(root / "img" / f"m{i:03d}.png")
        rows.append(f"m{i:03d},{'|'.join(f'd{k}' for k in sorted(s))}")
        flags = ["1" if k in s else "0" for k in range(10)]
        if i % 7 == 0:
            flags[i % 10] = "-1" if i % 2 else ""   # CheXpert's uncertain, and an empty cell: unknown
        cols.append(f"m{i:03d}," + ",".join(flags))
        jsonl.append(json.dumps({"file_name": f"m{i:03d}.png", "tags": [f"d{k}" for k in sorted(s)]}))
        reg.append(f"m{i:03d}.png,{int((img.reshape(2, 8, 2, 8).max((1, 3)) > 0).sum())},{img.mean() / 255:.6f}")
    for name, lines in (("delim.csv", rows), ("cols.csv", cols), ("list.jsonl", jsonl), ("reg.csv", reg)):
        (root / name).write_text("\n".join(lines) + "\n")
    return root, images, sets


def _store(mosaics, name: str, **kw):
    root = mosaics[0]
    out = root / f"store-{name}"
    if not out.exists():
        preprocess(root / "img", out, size=16, channels="gray", workers=1, progress=False, **kw)
    return load_store(out)


def test_every_table_form_gives_the_label_sets_known_by_construction(mosaics):
    from cnnpipe.datasets.table_scan import LabelTable

    root, _, sets = mosaics
    truth = {f"m{i:03d}.png": s for i, s in enumerate(sets)}
    for table in (LabelTable(str(root / "delim.csv"), label_delim="|", label_col="labels"),
                  LabelTable(str(root / "list.jsonl"), label_col="tags"),
                  LabelTable(str(root / "cols.csv"), label_col=tuple(f"d{k}" for k in range(10)))):
        store = _store(mosaics, table.path.rsplit("/", 1)[1].split(".")[0], labels=table)
        assert store.task.kind == "multilabel" and store.classes[:3] == ["d0", "d1", "d2"]
        for split in store.splits:
            y = store.labels(split)
            assert y.dtype == np.float32 and y.shape == (store.count(split), len(store.classes))
            for row, src in zip(y, store.sources(split)):
                expected = np.array([float(int(c[1:]) in truth[src]) for c in store.classes])
                known = ~np.isnan(row)
                assert (row[known] == expected[known]).all()
                assert known.all() or "cols" in table.path   # only the 0/1 columns hold unknowns
        # iterative stratification: each label's validation share within 2 images of 10%
        val, total = store.labels("val"), np.concatenate([store.labels(s) for s in store.splits])
        assert np.all(np.abs(np.nansum(val == 1, 0) - 0.1 * np.nansum(total == 1, 0)) <= 2)


def test_a_bad_cell_is_reported_and_the_run_goes_on(mosaics, tmp_path):
    from cnnpipe.datasets.table_scan import LabelTable

    root = mosaics[0]
    lines = (root / "reg.csv").read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",lots"   # not a number
    lines[4] = lines[4].split(",")[0] + ",,"          # no target at all
    (tmp_path / "reg.csv").write_text("\n".join(lines) + "\n")
    store = preprocess(root / "img", tmp_path / "s", size=16, channels="gray", workers=1, progress=False,
                       labels=LabelTable(str(tmp_path / "reg.csv"), target_col=("count", "ink")))
    kinds = {s["kind"]: s for s in store.report["skipped"]}
    assert set(kinds) == {"bad_label", "empty_label"} and "'lots' is not a number" in kinds["bad_label"]["reason"]
    assert sum(store.count(s) for s in store.splits) == N - 2


def test_tables_that_contradict_the_options_stop_in_one_line_and_odd_cells_are_bad_rows(mosaics, tmp_path):
    from cnnpipe.datasets.table_scan import LabelTable, scan_table
    from cnnpipe.datasets.tables import TableError

    root = mosaics[0]
    lines = (root / "list.jsonl").read_text().splitlines()
    lines[5] = json.dumps({"file_name": "m005.png", "tags": "d3"})   # one plain cell in a list column
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    scan, record = scan_table(root / "img", LabelTable(str(tmp_path / "list.jsonl"), label_col="tags"))
    assert record["task"]["type"] == "multilabel" and record["task"]["names"] == [f"d{k}" for k in range(10)]
    assert [s["kind"] for s in scan.skipped] == ["bad_label"] and "m005.png" in scan.skipped[0]["reason"]
    bad = {"--label-delim": LabelTable(str(tmp_path / "list.jsonl"), label_col="tags", label_delim="|"),
           "--task": LabelTable(str(tmp_path / "list.jsonl"), label_col="tags", task="classification"),
           "named twice": LabelTable(str(root / "cols.csv"), label_col=("d1", "d1")),
           "--target-col": LabelTable(str(root / "reg.csv"), label_col="count", target_col="ink")}
    for words, table in bad.items():
        with pytest.raises(TableError, match=words):
            scan_table(root / "img", table)
    (tmp_path / "r.csv").write_text("filename,error\nm000.png,1\n")
    with pytest.raises(TableError, match="'error' is one of predict's own columns"):
        scan_table(root / "img", LabelTable(str(tmp_path / "r.csv"), target_col="error"))


@pytest.fixture(scope="module")
def multilabel_run(mosaics, tmp_path_factory):
    from cnnpipe.datasets.table_scan import LabelTable

    store = _store(mosaics, "cols", labels=LabelTable(str(mosaics[0] / "cols.csv"),
                                                      label_col=tuple(f"d{k}" for k in range(10))))
    run_dir = tmp_path_factory.mktemp("mlrun") / "run"
    summary = train_and_evaluate(load_config(None, [*RUN, f"data.path={store.path}", "train.pos_weight=auto"]),
                                 run_dir, log=lambda _: None, compile_cache="off")
    return run_dir, summary, store


def test_a_multilabel_run_learns_the_label_sets_and_records_its_thresholds(multilabel_run):
    run_dir, summary, store = multilabel_run
    assert summary["task"] == "multilabel" and summary["best_metric"] == "val_map"
    assert summary["val_map"] > 0.6   # chance is each label's frequency, about 0.2
    thresholds = json.loads((run_dir / "thresholds.json").read_text())
    assert str(summary["result_step"]) in thresholds and set(thresholds[str(summary["result_step"])]) == set(
        store.classes)
    assert (run_dir / "plots" / "precision_recall.png").is_file() and (run_dir / "plots" / "map.png").is_file()
    record = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["split"] == "val" and record["map"] == pytest.approx(summary["val_map"])


def test_evaluate_predict_and_export_agree_with_the_run(multilabel_run, mosaics, tmp_path):
    from cnnpipe.runs.evaluate import evaluate_run
    from cnnpipe.runs.export import export_run
    from cnnpipe.runs.load import load_run
    from cnnpipe.runs.predict import predict_files

    run_dir, summary, store = multilabel_run
    run = load_run(run_dir, "latest")
    result, _ = evaluate_run(run)   # the run's own thresholds, not refitted
    for key in ("map", "macro_f1", "micro_f1", "macro_auroc"):
        assert result[key] == pytest.approx(summary[f"val_{key}"], abs=1e-9), key
    from cnnpipe.datasets.table_scan import LabelTable

    # the same labels in another column order: matched by name
    flipped = _store(mosaics, "flipped", labels=LabelTable(str(mosaics[0] / "cols.csv"),
                                                           label_col=tuple(f"d{k}" for k in range(9, -1, -1))))
    assert flipped.classes[0] == "d9"
    again, _ = evaluate_run(run, ["data.source=store", f"data.path={flipped.path}"])
    targets = flipped.labels("val")[:, [flipped.classes.index(n) for n in run.classes]]
    expected = run.task.metrics(targets, run.predict(flipped.images("val")).astype(np.float64), run.thresholds)
    assert again["map"] == pytest.approx(expected["map"], abs=1e-6)
    val = store.images("val")
    outputs = run.predict(val)
    assert outputs.shape == (len(val), 10) and (outputs >= 0).all() and (outputs <= 1).all()
    np.testing.assert_allclose(outputs, result["outputs"], atol=1e-6)
    files = [str(store.path.parent / "img" / s) for s in store.sources("val")[:40]]
    preds = list(predict_files(run, files, workers=1))   # the files themselves, through the one image path
    np.testing.assert_allclose(np.array([p.outputs for p in preds]), outputs[:40], atol=1e-6)
    t = run.thresholds
    assert all(set(p.chosen) == {n for n, v, th in zip(run.classes, p.outputs, t) if v >= th} for p in preds)
    path = export_run(run, "stablehlo", tmp_path / "m.stablehlo")
    import jax

    exported = jax.export.deserialize(path.read_bytes()).call(val[:40].astype(np.float32))
    np.testing.assert_allclose(np.asarray(exported), outputs[:40], atol=1e-5)
    meta = json.loads((tmp_path / "m.stablehlo.json").read_text())
    assert meta["task"] == "multilabel" and meta["thresholds"] == dict(zip(run.classes, map(float, t)))


def test_a_multilabel_run_refuses_class_weights_in_one_line(multilabel_run, tmp_path):
    store = multilabel_run[2]
    with pytest.raises(ValueError, match="train.class_weights: only for single-label"):
        train_and_evaluate(load_config(None, [*RUN, f"data.path={store.path}", "train.class_weights=auto"]),
                           tmp_path / "r", log=lambda _: None, compile_cache="off")


def test_a_regression_run_measures_ink_in_the_datas_units(mosaics, tmp_path):
    from cnnpipe.datasets.table_scan import LabelTable
    from cnnpipe.runs.load import load_run

    store = _store(mosaics, "reg", labels=LabelTable(str(mosaics[0] / "reg.csv"), target_col=("count", "ink")))
    assert store.task.kind == "regression" and store.classes == ["count", "ink"]
    cfg = load_config(None, [*RUN, f"data.path={store.path}", "train.loss=huber", "train.epochs=6"])
    summary = train_and_evaluate(cfg, tmp_path / "run", log=lambda _: None, compile_cache="off")
    y = store.labels("val")
    assert summary["task"] == "regression" and summary["best_metric"] == "val_rmse"
    for j, name in enumerate(store.classes):   # well below predicting the mean (RMSE = the targets' std)
        assert summary["per_target"][name]["rmse"] < 0.5 * y[:, j].std(), name
    run = load_run(tmp_path / "run", "latest")   # the summary is the last epoch's (no early stopping)
    pred = run.predict(store.images("val"))
    rmse = np.sqrt(((pred - y) ** 2).mean(0))   # in the data's units: the summary's own figures
    assert rmse.tolist() == pytest.approx([summary["per_target"][n]["rmse"] for n in store.classes], rel=1e-4)
    import onnxruntime as ort

    from cnnpipe.runs.export import export_run

    path = export_run(run, "onnx", tmp_path / "m.onnx")   # values in the data's units, inside the model
    session = ort.InferenceSession(str(path))
    x = store.images("val")[:32].astype(np.float32)
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0], pred[:32], atol=1e-5,
                               rtol=1e-5)
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert meta["targets"] == ["count", "ink"] and meta["target_mean"] == pytest.approx(list(run.task.target_mean))
