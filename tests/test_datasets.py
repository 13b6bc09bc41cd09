"""Data sources and batching: shapes generator, store/folder/tfds sources, deterministic order."""

from __future__ import annotations

import hashlib
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cnnpipe.datasets.batches import epoch_permutation, eval_batches, prefetch, steps_per_epoch, train_batches
from cnnpipe.datasets.dataset import Split, store_dataset
from cnnpipe.datasets.shapes import SHAPE_CLASSES, _mean_std, _shape_masks, make_shapes, shapes_dataset
from cnnpipe.datasets.sources import folder_cache_key, folder_dataset, load_dataset
from cnnpipe.files import default_cache_dir


def write_shapes_folder(root, per_class: int = 6, classes=(0, 1, 2), size=(20, 20), seed=0):
    """SRC/<class>/<i>.png from the shapes generator (8-bit RGB PNGs)."""
    images, labels = make_shapes(per_class * len(SHAPE_CLASSES) * 3, size=size, seed=seed)
    for k in classes:
        d = root / SHAPE_CLASSES[k]
        d.mkdir(parents=True)
        for i, img in enumerate(images[labels == k][:per_class]):
            Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


# ---------------------------------------------------------------- shapes

def test_shape_masks_match_hand_computed_grid():
    # offsets in units of the radius on a 5x5 grid: -1, -0.5, 0, 0.5, 1
    g = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    dx, dy = g[None, None, :], g[None, :, None]
    circle = np.array([[0, 0, 1, 0, 0],
                       [0, 1, 1, 1, 0],
                       [1, 1, 1, 1, 1],
                       [0, 1, 1, 1, 0],
                       [0, 0, 1, 0, 0]], bool)
    square = np.array([[0, 0, 0, 0, 0],
                       [0, 1, 1, 1, 0],
                       [0, 1, 1, 1, 0],
                       [0, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0]], bool)
    cross = np.array([[0, 0, 1, 0, 0],
                      [0, 0, 1, 0, 0],
                      [1, 1, 1, 1, 1],
                      [0, 0, 1, 0, 0],
                      [0, 0, 1, 0, 0]], bool)
    # ring: 0.6 <= r <= 1 drops the centre and the four points at distance 0.5
    ring = np.array([[0, 0, 1, 0, 0],
                     [0, 1, 0, 1, 0],
                     [1, 0, 0, 0, 1],
                     [0, 1, 0, 1, 0],
                     [0, 0, 1, 0, 0]], bool)
    # triangle apex up: |dx| <= 0.6 (dy + 1) and dy <= 0.8 -> rows dy=-1: x=0; -0.5: |dx|<=0.3; 0: <=0.6; 0.5: <=0.9
    triangle = np.array([[0, 0, 1, 0, 0],
                         [0, 0, 1, 0, 0],
                         [0, 1, 1, 1, 0],
                         [0, 1, 1, 1, 0],
                         [0, 0, 0, 0, 0]], bool)
    # diamond |dx| + |dy| <= 1 covers the same lattice points as the circle on this grid
    for k, want in [(0, circle), (1, square), (2, triangle), (3, cross), (4, ring), (5, circle)]:
        got = _shape_masks(np.array([k]), dx, dy)[0]
        np.testing.assert_array_equal(got, want, err_msg=SHAPE_CLASSES[k])


def test_shapes_are_deterministic_and_seeded():
    a, la = make_shapes(64, size=(16, 16), seed=3)
    b, lb = make_shapes(64, size=(16, 16), seed=3)
    c, _ = make_shapes(64, size=(16, 16), seed=4)
    v, _ = make_shapes(64, size=(16, 16), seed=3, split="val")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c) and not np.array_equal(a, v)
    assert a.shape == (64, 16, 16, 3) and a.dtype == np.uint8 and la.dtype == np.int32
    assert set(np.unique(la)) <= set(range(len(SHAPE_CLASSES)))


def test_shapes_bytes_are_pinned():
    # Only exactly rounded float operations and PCG64 bits: the same bytes on any machine.
    img, lab = make_shapes(8, size=(16, 16), seed=0)
    assert lab.tolist() == make_shapes(8, size=(16, 16), seed=0)[1].tolist()
    digest = hashlib.sha256(img.tobytes() + lab.tobytes()).hexdigest()
    assert digest == PINNED_SHAPES_SHA256


PINNED_SHAPES_SHA256 = "923e38cb85dacf30a09585a2fa1ca603efd1c70ac11deb3f6964d873594b63fa"


def test_shapes_16bit_uses_full_range_not_x257():
    x16, l16 = make_shapes(200, size=(16, 16), bit_depth=16, seed=0)
    x8, l8 = make_shapes(200, size=(16, 16), bit_depth=8, seed=0)
    assert x16.dtype == np.uint16
    np.testing.assert_array_equal(l16, l8)  # same scenes at both depths
    assert np.mean(x16 % 257 != 0) > 0.9     # real 16-bit values, not 8-bit ones promoted
    assert x16.max() > 60000 and x16.min() < 5000
    # the same scene quantised at 8 bits: within one 8-bit step
    assert np.max(np.abs(x16 / 65535.0 - x8 / 255.0)) <= 0.5 / 255 + 0.5 / 65535 + 1e-12


def test_shapes_each_image_has_a_contrasting_shape():
    x, lab = make_shapes(300, size=(32, 32), seed=1)
    f = x.astype(np.float64).mean(-1)
    # foreground and background differ by >= 0.1 of full scale on average, noise is <= 0.08
    spread = np.percentile(f.reshape(300, -1), 95, axis=1) - np.percentile(f.reshape(300, -1), 5, axis=1)
    assert spread.min() > 0.1 * 255
    assert np.bincount(lab, minlength=6).min() > 30


def test_shapes_dataset_fast_and_stats():
    import time

    t = time.perf_counter()
    ds = shapes_dataset(2000, 400, size=(32, 32), seed=0)
    assert time.perf_counter() - t < 5  # generous; the budget is "well under a second"
    assert ds.classes == list(SHAPE_CLASSES) and ds.num_classes == 6
    assert ds.size == (32, 32) and ds.channels == 3 and ds.bit_depth == 8
    x = ds.train.images.astype(np.float64)
    np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(ds.std, x.std(axis=(0, 1, 2)), rtol=1e-9)
    with pytest.raises(ValueError, match="bit_depth"):
        make_shapes(4, bit_depth=12)


def test_mean_std_chunked_equals_direct():
    x = np.random.default_rng(0).integers(0, 65536, (11, 3, 2, 2)).astype(np.uint16)
    mean, std = _mean_std(x, chunk=3)
    xf = x.astype(np.float64)
    np.testing.assert_allclose(mean, xf.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std, xf.std(axis=(0, 1, 2)), rtol=1e-9)


# ---------------------------------------------------------------- batching

def _toy_split(n=10, h=2):
    images = np.arange(n * h * h * 1, dtype=np.uint8).reshape(n, h, h, 1)
    return Split(images, np.arange(n, dtype=np.int32))


def test_epoch_order_is_a_function_of_seed_and_epoch():
    p = epoch_permutation(0, 1, 10)
    assert sorted(p.tolist()) == list(range(10))
    np.testing.assert_array_equal(p, epoch_permutation(0, 1, 10))
    assert not np.array_equal(p, epoch_permutation(0, 2, 10))
    assert not np.array_equal(p, epoch_permutation(1, 1, 10))


def test_train_batches_fixed_shape_drop_remainder_and_resume_order():
    split = _toy_split(10)
    batches = list(train_batches(split, 3, seed=5, epoch=2))
    assert len(batches) == 3 == steps_per_epoch(10, 3)
    perm = epoch_permutation(5, 2, 10)
    for i, (x, y) in enumerate(batches):
        assert x.shape == (3, 2, 2, 1) and x.dtype == np.uint8
        np.testing.assert_array_equal(y, perm[3 * i:3 * i + 3])
        np.testing.assert_array_equal(x, split.images[perm[3 * i:3 * i + 3]])
    # resuming at step 1 of the epoch gives exactly the rest of the uninterrupted order
    resumed = list(train_batches(split, 3, seed=5, epoch=2, start_step=1))
    for (xa, ya), (xb, yb) in zip(batches[1:], resumed):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert len(resumed) == 2
    with pytest.raises(ValueError, match=r"train.batch_size \(=11\).*\(=10 images\)"):
        steps_per_epoch(10, 11)


def test_eval_batches_pad_and_mask_the_last_batch():
    split = _toy_split(7)
    batches = list(eval_batches(split, 3))
    assert [b[0].shape[0] for b in batches] == [3, 3, 3]
    masks = np.concatenate([m for _, _, m in batches])
    assert masks.tolist() == [True] * 7 + [False] * 2
    images = np.concatenate([x for x, _, _ in batches])[:7]
    np.testing.assert_array_equal(images, split.images)
    assert not batches[-1][0][1:].any()  # padding is zeros


def test_prefetch_keeps_order_propagates_errors_and_closes():
    assert list(prefetch(iter(range(20)), size=2)) == list(range(20))

    def boom():
        yield 1
        raise RuntimeError("bad batch")

    it = prefetch(boom())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="bad batch"):
        next(it)
    before = threading.active_count()
    with prefetch(iter(range(10**6)), size=2) as p:
        next(p)
    assert threading.active_count() <= before


# ---------------------------------------------------------------- sources

def test_store_source_is_memory_mapped(tmp_path):
    from cnnpipe.datasets.preprocess import preprocess

    src = write_shapes_folder(tmp_path / "src", per_class=10)
    preprocess(src, tmp_path / "store", size=(16, 16), val_fraction=0.3, workers=1)
    ds = store_dataset(tmp_path / "store")
    assert isinstance(ds.train.images, np.memmap)
    assert ds.classes == ["circle", "square", "triangle"] and ds.size == (16, 16) and ds.channels == 3
    assert len(ds.train) + len(ds.val) == 30 and len(ds.val) > 0
    x = np.asarray(ds.train.images, np.float64)
    np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 1, 2)), rtol=1e-9)
    cfg = SimpleNamespace(source="store", path=None)
    with pytest.raises(ValueError, match="data.path"):
        load_dataset(cfg)


def test_store_without_validation_split_is_an_error(tmp_path):
    from cnnpipe.datasets.preprocess import preprocess

    src = write_shapes_folder(tmp_path / "src", per_class=3)
    preprocess(src, tmp_path / "store", size=(16, 16), val_fraction=0.0, workers=1)
    with pytest.raises(ValueError, match=r"no validation images \(images per split: train 9\); "
                       "preprocess it with a validation fraction > 0"):
        store_dataset(tmp_path / "store")
    # a folder: the hint names the config key, not a preprocess step the user never ran
    with pytest.raises(ValueError, match=r"data.val_fraction is 0 and no image of .* is in the validation"):
        folder_dataset(src, size=(16, 16), val_fraction=0.0, cache_dir=tmp_path / "cache")


def test_folder_source_caches_by_contents_and_settings(tmp_path, monkeypatch):
    import cnnpipe.datasets.preprocess as pp

    src = write_shapes_folder(tmp_path / "src", per_class=8)
    calls = []
    real = pp.preprocess

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(pp, "preprocess", counting)
    kw = dict(size=(16, 16), val_fraction=0.25, cache_dir=tmp_path / "cache")
    a = folder_dataset(src, **kw)
    b = folder_dataset(src, **kw)
    assert len(calls) == 1  # unchanged folder and settings: the cache is reused
    np.testing.assert_array_equal(a.train.images, b.train.images)
    folder_dataset(src, **{**kw, "size": (12, 12)})  # other settings: another cache entry
    assert len(calls) == 2
    extra = src / "circle" / "999.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(extra)
    c = folder_dataset(src, **kw)  # changed contents: preprocessed again
    assert len(calls) == 3 and len(c.train) + len(c.val) == 25
    os.utime(extra, ns=(1, 1))      # same names and sizes, another mtime: also a new key
    folder_dataset(src, **kw)
    assert len(calls) == 4
    with pytest.raises(FileNotFoundError, match="not-there"):
        folder_dataset(tmp_path / "not-there", **kw)



def test_folder_cache_key_covers_the_files_preprocess_reads(tmp_path):
    real = write_shapes_folder(tmp_path / "real", per_class=2)
    linked = tmp_path / "linked"
    linked.mkdir()
    for d in sorted(real.iterdir()):
        os.symlink(d, linked / d.name)  # class folders as symbolic links: followed, as preprocess does
    key, count = folder_cache_key(linked, {})
    assert count == 6 and (key, count) == folder_cache_key(real, {})
    os.symlink(tmp_path / "nowhere", real / "circle" / "broken.png")  # skipped by preprocess, not a crash
    assert folder_cache_key(linked, {}) == (key, count)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(real / "circle" / "new.png")
    assert folder_cache_key(linked, {})[0] != key

def test_unknown_or_incomplete_source_settings():
    with pytest.raises(ValueError, match="data.name"):
        load_dataset(SimpleNamespace(source="tfds", name=None))
    with pytest.raises(ValueError, match="data.source"):
        load_dataset(SimpleNamespace(source="webdataset"))
    assert default_cache_dir().name == "cnnpipe"


def test_constant_channel_std_is_floored_so_the_model_builds(tmp_path):
    from flax import nnx

    from cnnpipe.datasets.preprocess import preprocess
    from cnnpipe.models.cnn import build_model

    # red-only images: G and B are 0 everywhere, so their std over the train split is 0
    rng = np.random.default_rng(0)
    for cls in ("dim", "bright"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(6):
            img = np.zeros((8, 8, 3), np.uint8)
            img[:, :, 0] = rng.integers(0, 128, (8, 8)) + (127 if cls == "bright" else 0)
            Image.fromarray(img).save(tmp_path / "src" / cls / f"{i}.png")
    store = preprocess(tmp_path / "src", tmp_path / "store", size=(8, 8), val_fraction=0.3, workers=1)
    assert store.std[1] == 0.0 and store.std[2] == 0.0  # the store keeps the true statistics
    ds = store_dataset(tmp_path / "store")
    assert ds.std[0] == pytest.approx(store.std[0]) and ds.std[1:] == (1.0, 1.0)
    model = build_model("simple_cnn", in_channels=3, num_classes=2, input_size=(8, 8), bit_depth=8,
                        rngs=nnx.Rngs(0), mean=ds.mean, std=ds.std)
    assert np.isfinite(np.asarray(model(np.asarray(ds.train.images[:2])))).all()
