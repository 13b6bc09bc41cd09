"""Users' folders: every valid image stored, every bad one reported, and the store's pixels equal,
bit for bit, what predict feeds the model for the same file."""

from __future__ import annotations

import numpy as np
import pytest
from messy_folder import make_messy_folder

from cnnpipe.cli import main
from cnnpipe.datasets.store import load_store
from cnnpipe.images.transform import prepare_image


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    return make_messy_folder(tmp_path_factory.mktemp("messy") / "src", per_class=24)


def _assert_rows_equal_predict_path(store, root, in_channels):
    checked = 0
    for split in store.splits:
        images = store.images(split)
        for i, rel in enumerate(store.sources(split)):
            served = prepare_image(root / rel, in_channels=in_channels, bit_depth=store.bit_depth,
                                   size=store.size, resize=store.meta["resize"])
            np.testing.assert_array_equal(images[i], served.pixels, err_msg=rel)  # tolerance 0
            checked += 1
    return checked


def test_default_settings_store_every_valid_file_and_report_every_bad_one(messy, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(["preprocess", str(messy.root), str(out), "--size", "48"]) == 1   # stored, bad files reported
    store = load_store(out)
    stored = {rel for s in store.splits for rel in store.sources(s)}
    assert stored == set(messy.valid)
    skipped = {s["path"]: s["reason"] for s in store.report["skipped"]}
    assert set(skipped) == set(messy.bad)
    for rel, reason in skipped.items():
        assert reason.startswith(rel + ": "), reason   # relative to SRC, however SRC was spelled
    [tiff_reason] = [r for p, r in skipped.items() if p.endswith("bad_rgb_tiff_one_sample.tif")]
    assert "photometric RGB with 1 sample" in tiff_reason
    assert store.dtype == np.uint16 and store.size == (48, 48)  # 16-bit files make the store 16-bit
    assert _assert_rows_equal_predict_path(store, messy.root, 3) == len(messy.valid)
    out_text = capsys.readouterr().out
    assert f"skipped {len(messy.bad)} files" in out_text


def test_gray_and_pad_rows_equal_the_predict_path_too(messy, tmp_path):
    from cnnpipe.datasets.preprocess import preprocess

    store = preprocess(messy.root, tmp_path / "gray", size=(31, 45), resize="pad", channels="gray", workers=2,
                       progress=False)
    assert store.channels == 1
    assert _assert_rows_equal_predict_path(store, messy.root, 1) == len(messy.valid)


def test_8bit_store_with_stretch(tmp_path):
    """Only 8-bit files: a uint8 store; every odd size stretched."""
    folder = make_messy_folder(tmp_path / "src", per_class=10, classes=2, big_every=5, seed=3)
    eight = [r for r in folder.valid if not any(k in r for k in ("png16", "tiff16", "gray16"))]
    for rel in set(folder.valid) - set(eight):
        (folder.root / rel).unlink()
    from cnnpipe.datasets.preprocess import preprocess

    store = preprocess(folder.root, tmp_path / "s", size=(17, 23), resize="stretch", workers=1, progress=False)
    assert store.dtype == np.uint8
    assert {r for s in store.splits for r in store.sources(s)} == set(eight)
    assert _assert_rows_equal_predict_path(store, folder.root, 3) == len(eight)


def test_predict_and_evaluate_agree_image_for_image(messy, tmp_path):
    """Train briefly on the messy store; predict on each validation file gives the probabilities the
    model gives the store's row for that file, and evaluate's accuracy is predict's accuracy."""
    from flax import nnx

    from cnnpipe.config import load_config
    from cnnpipe.datasets.preprocess import preprocess
    from cnnpipe.runs.evaluate import evaluate_run
    from cnnpipe.runs.load import load_run, predict_images
    from cnnpipe.training.steps import forward
    from cnnpipe.training.train import train_and_evaluate

    store = preprocess(messy.root, tmp_path / "store", size=24, val_fraction=0.3, workers=2, progress=False)
    cfg = load_config(None, ["data.source=store", f"data.path={store.path}", "train.epochs=2",
                             "train.batch_size=8", "train.eval_batch_size=8", "train.num_devices=1",
                             "model=[{type: conv, filters: 4}, {type: relu}, {type: max_pool}, {type: flatten}]"])
    train_and_evaluate(cfg, tmp_path / "run", log=lambda _: None)
    run = load_run(tmp_path / "run")
    files = [messy.root / rel for rel in store.sources("val")]
    preds = predict_images(run, files, top_k=len(store.classes))
    graphdef, state = nnx.split(run.model())
    rows = np.asarray(store.images("val"), np.float32)
    probs = np.asarray(forward(graphdef, (state,), rows)[0])
    for i, top in enumerate(preds):
        got = dict(top)
        np.testing.assert_allclose([got[c] for c in store.classes], probs[i], rtol=1e-6, atol=1e-7)
    labels = store.labels("val")
    predicted = [store.classes.index(top[0][0]) for top in preds]
    result, _ = evaluate_run(run)
    assert result["count"] == len(files)
    assert result["accuracy"] == pytest.approx(np.mean(np.array(predicted) == labels))


def test_folder_cache_key_changes_with_the_image_path_version(tmp_path, monkeypatch):
    """A folder cache built by an older image chain is rebuilt, never reused."""
    import cnnpipe.images.transform as transform
    from cnnpipe.datasets.sources import folder_cache_key

    folder = make_messy_folder(tmp_path / "src", per_class=2, classes=2)
    settings = {"size": [8, 8], "resize": "crop"}
    key, n = folder_cache_key(folder.root, settings)
    assert n == len(folder.valid) + len(folder.bad)
    monkeypatch.setattr(transform, "IMAGE_PATH_VERSION", transform.IMAGE_PATH_VERSION + 1)
    assert folder_cache_key(folder.root, settings)[0] != key
