"""Float and signed pixels from files to stores, models, predict and export (issue 30).

Files are made here the way the fields write them: float32 GeoTIFF-like bands in dB with NaN
stripes, an Inf and a GDAL_NODATA value; int16 CT slices in Hounsfield units; float16 and
float64 planes; folders mixing integer and float files. Every stored value is checked against
the file's own values read back by tifffile (an independent reader), never against cnnpipe's
earlier output.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnpipe.datasets.preprocess import PreprocessError, preprocess
from cnnpipe.images.pixel_types import store_dtype_for, widen
from cnnpipe.images.transform import ImageSpec, prepare_bytes, resize_image

NODATA = -9999.0


def _geotiff(path, bands: np.ndarray, nodata: float | None = NODATA) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tags = [(42113, "s", 0, f"{nodata:g}", True)] if nodata is not None else []
    tifffile.imwrite(path, bands, planarconfig="contig" if bands.ndim == 3 else None, extratags=tags)


def _s1_band(rng, h: int, w: int, level: float) -> np.ndarray:
    """Two float32 backscatter bands in dB (VV, VH), with a NaN stripe, an Inf and nodata pixels."""
    a = rng.normal(level, 3.0, (h, w, 2)).astype(np.float32)
    a[1] = np.nan                     # a row outside the swath
    a[2, 0, 0] = NODATA
    a[h - 1, w - 1, 1] = np.inf
    return a


def _expected(bands: np.ndarray) -> np.ndarray:
    out = bands.astype(np.float32).copy()
    out[~np.isfinite(out) | (out == NODATA)] = np.nan
    return out


def test_float_geotiffs_round_trip_into_a_float32_store_with_nodata_counted(tmp_path):
    rng = np.random.default_rng(0)
    files = {}
    for c, level in (("water", -18.0), ("land", -6.0)):
        for i in range(6):
            files[f"{c}/t{i}.tif"] = _s1_band(rng, 7 + i % 2, 9, level)   # two sizes: padded, never resampled
            _geotiff(tmp_path / "src" / c / f"t{i}.tif", files[f"{c}/t{i}.tif"])
    store = preprocess(tmp_path / "src", tmp_path / "store", size=(8, 9), resize="pad", channels="native",
                       workers=1, progress=False, val_fraction=0.34)
    assert store.dtype == np.float32 and store.meta["bit_depth"] == 32 and store.channels == 2
    rows = []
    for split in store.splits:
        for row, src in zip(store.images(split), store.sources(split)):
            want = _expected(tifffile.imread(tmp_path / "src" / src))   # the file's own values, read by tifffile
            top = (8 - want.shape[0]) // 2
            assert np.array_equal(row[top:top + want.shape[0]], want, equal_nan=True), src
            assert np.isnan(row[:top]).all() and np.isnan(row[top + want.shape[0]:]).all()   # padding: no data
            if split == "train":
                rows.append(row)
    counts = store.report["nodata"]
    for name, bands in files.items():
        assert counts[name] == {"nan": int(np.isnan(bands).sum()), "inf": 1, "nodata": 1, "out_of_range": 0,
                                "inexact_in_float32": 0, "samples": bands.size}
    train = np.stack(rows).reshape(-1, 2).astype(np.float64)   # statistics over the valid values only
    np.testing.assert_allclose(store.mean, np.nanmean(train, 0), rtol=1e-12)
    np.testing.assert_allclose(store.std, np.nanstd(train, 0), rtol=1e-9)


def test_ct_slices_keep_their_type_until_a_resize_needs_fractions(tmp_path):
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        for i in range(3):
            ct = rng.integers(-1024, 3072, (12, 12)).astype(np.int16)
            tifffile.imwrite((tmp_path / "src" / c).mkdir(parents=True, exist_ok=True) or
                             tmp_path / "src" / c / f"s{i}.tif", ct)
    Image.fromarray(np.full((12, 12), 200, np.uint8)).save(tmp_path / "src" / "a" / "u8.png")
    exact = preprocess(tmp_path / "src", tmp_path / "exact", size=12, channels="gray", workers=1, progress=False)
    assert exact.dtype == np.int16 and exact.meta["bit_depth"] == 16
    for split in exact.splits:
        for row, src in zip(exact.images(split), exact.sources(split)):
            file = tmp_path / "src" / src
            want = np.asarray(Image.open(file)) if src.endswith(".png") else tifffile.imread(file)
            assert np.array_equal(row[..., 0], want.astype(np.int16)), src   # uint8 kept as is (no x257)
    cropped = preprocess(tmp_path / "src", tmp_path / "crop", size=(10, 12), channels="gray", workers=1,
                         progress=False)
    assert cropped.dtype == np.int16   # cutting is exact: still integers
    shrunk = preprocess(tmp_path / "src", tmp_path / "small", size=6, channels="gray", workers=2, progress=False)
    assert shrunk.dtype == np.float32   # resampled HU are not integers: float32, never rounded or clipped
    row = shrunk.images("train")[0]
    assert row.min() < -1024 or row.max() > 3071 or not np.array_equal(row, np.rint(row))
    padded = preprocess(tmp_path / "src", tmp_path / "pad", size=(14, 12), resize="pad", channels="gray", workers=1,
                        progress=False)
    rows = padded.images("train")   # padding is no data, not 0 HU (water): NaN in a float32 store
    assert padded.dtype == np.float32 and np.isnan(rows[:, 0]).all() and not np.isnan(rows[:, 1:13]).any()
    tifffile.imwrite(tmp_path / "src" / "b" / "air.tif", np.full((12, 12), -2000, np.int16),
                     extratags=[(42113, "s", 0, "-2000", True)])   # all nodata: skipped, and decides nothing
    again = preprocess(tmp_path / "src", tmp_path / "again", size=12, channels="gray", workers=1, progress=False)
    assert again.dtype == np.int16 and {s["path"]: s["kind"] for s in again.report["skipped"]} == {"b/air.tif": "no_data"}


def test_a_model_of_int16_slices_takes_slices_of_any_size_as_float32():
    import io

    from cnnpipe.images.transform import spec_for_model

    ct = np.random.default_rng(3).integers(-1024, 3072, (12, 12)).astype(np.int16)
    buf = io.BytesIO()
    tifffile.imwrite(buf, ct)
    same = prepare_bytes(buf.getvalue(), spec_for_model(1, 16, (12, 12), dtype="int16"), "s.tif").pixels
    assert same.dtype == np.int16 and np.array_equal(same[..., 0], ct)   # the store's row, bit for bit
    small = prepare_bytes(buf.getvalue(), spec_for_model(1, 16, (6, 6), dtype="int16"), "s.tif").pixels
    assert small.dtype == np.float32   # what a float32 store of it would hold: the model computes in float32
    np.testing.assert_array_equal(small, prepare_bytes(buf.getvalue(), ImageSpec((6, 6), "crop", "gray", 32,
                                                                                 dtype="float32"), "s.tif").pixels)


def test_a_window_outside_signed_data_is_refused_by_its_values(tmp_path):
    from types import SimpleNamespace

    from cnnpipe.config import load_config
    from cnnpipe.training.normalize import input_window

    images = np.array([-1024, 3071, 0, 40], np.int16).reshape(1, 2, 2, 1)
    ds = SimpleNamespace(channels=1, bit_depth=16, train=SimpleNamespace(images=images))
    spec = load_config(None, ["data.normalize={window: [5000, 6000]}"]).data.normalize
    with pytest.raises(ValueError, match=r"\[5000, 6000\] for plane 0; its training values are -1024..3071 "
                                         r"\(int16\), so a window outside them"):
        input_window(spec, ds)
    lung = load_config(None, ["data.normalize={window: [-1000, 400]}"]).data.normalize
    assert input_window(lung, ds)[:2] == ((-1000.0,), (400.0,))


def test_float16_is_exact_and_float64_is_rounded_with_a_warning(tmp_path):
    half = (np.arange(30, dtype=np.float16).reshape(5, 6) - 15) / np.float16(7)
    wide = np.linspace(-1, 1, 30).reshape(5, 6) + 1e-12   # not float32 values
    huge = np.full((5, 6), 2.5)
    huge[0, :2] = 1e39, -1e300   # beyond float32: no data, counted, never +-Inf in a store
    for c, arr in (("half", half), ("wide", wide)):
        for i in range(2):
            _geotiff(tmp_path / "src" / c / f"{i}.tif", arr + i, nodata=None)
    _geotiff(tmp_path / "src" / "wide" / "huge.tif", huge, nodata=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no numpy overflow warning on the terminal
        store = preprocess(tmp_path / "src", tmp_path / "store", size=(5, 6), channels="gray", workers=1,
                           progress=False, val_fraction=0.5)
    assert store.dtype == np.float32 and np.isfinite(store.mean + store.std).all()
    assert store.report["nodata"]["wide/huge.tif"]["out_of_range"] == 2
    for split in store.splits:
        for row, src in zip(store.images(split), store.sources(split)):
            want = tifffile.imread(tmp_path / "src" / src)
            if src.endswith("huge.tif"):
                assert np.isnan(row[0, :2]).all() and (row[0, 2:] == 2.5).all() and (row[1:] == 2.5).all()
                continue
            assert np.array_equal(row[..., 0], want.astype(np.float32))
            assert (row[..., 0].astype(np.float64) == want).all() == src.startswith("half")
    warned = {w["path"]: w["warnings"] for w in store.report["warnings"]}
    assert any("30 float64 value(s) not exact in float32" in x for x in warned["wide/0.tif"])
    changed = tifffile.imread(tmp_path / "src" / "wide" / "1.tif")
    changed = int((changed.astype(np.float32).astype(np.float64) != changed).sum())
    assert "half/0.tif" not in warned and store.report["nodata"]["wide/1.tif"]["inexact_in_float32"] == changed


def test_a_mixed_folder_is_refused_by_name_unless_float32_is_asked(tmp_path, capsys):
    from cnnpipe.cli import main

    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "b").mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "src" / "a" / "bright.png")
    _geotiff(tmp_path / "src" / "b" / "dark.tif", np.full((4, 4), -0.5, np.float32), nodata=None)
    with pytest.raises(PreprocessError, match=r"mixes integer and float images \(a/bright.png is uint8, "
                                              r"b/dark.tif is float32\): preprocess --dtype float32"):
        preprocess(tmp_path / "src", tmp_path / "no", size=4, channels="gray", workers=1, progress=False)
    assert main(["preprocess", str(tmp_path / "src"), str(tmp_path / "no"), "--size", "4", "--channels", "gray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("cnnpipe preprocess: error: SRC mixes integer and float images")
    assert "Traceback" not in err and not (tmp_path / "no").exists()
    store = preprocess(tmp_path / "src", tmp_path / "yes", size=4, channels="gray", workers=1, progress=False,
                       dtype="float32", val_fraction=0.0)
    values = {src: float(row[0, 0, 0]) for row, src in zip(store.images("train"), store.sources("train"))}
    assert store.dtype == np.float32 and values == {"a/bright.png": 255.0, "b/dark.tif": -0.5}


def test_a_file_that_is_all_nodata_is_skipped_and_reported(tmp_path, capsys):
    from cnnpipe.cli import main

    rng = np.random.default_rng(2)
    for c in ("a", "b"):
        for i in range(3):
            _geotiff(tmp_path / "src" / c / f"{i}.tif", rng.normal(0, 1, (5, 5)).astype(np.float32))
    _geotiff(tmp_path / "src" / "a" / "empty.tif", np.full((5, 5), NODATA, np.float32))
    _geotiff(tmp_path / "src" / "b" / "nan.tif", np.full((5, 5), np.nan, np.float32))
    rc = main(["preprocess", str(tmp_path / "src"), str(tmp_path / "store"), "--size", "5", "--workers", "1",
               "--channels", "gray"])
    assert rc == 1
    skipped = {s["path"]: s for s in json.loads((tmp_path / "store" / "report.json").read_text())["skipped"]}
    assert {p: s["kind"] for p, s in skipped.items()} == {"a/empty.tif": "no_data", "b/nan.tif": "no_data"}
    assert "every one of its 25 samples is NaN, Inf or the nodata value -9999" in skipped["a/empty.tif"]["reason"]


def test_resampling_leaves_nodata_where_it_was_and_constants_constant():
    plane = np.full((40, 30, 1), 5.0, np.float32)
    plane[10:12] = np.nan
    out = resize_image(plane, (20, 15), "stretch")
    valid = ~np.isnan(out)
    assert valid.sum() >= out.size - 3 * 15   # the stripe, not the whole image (bicubic support alone would)
    np.testing.assert_allclose(out[valid], 5.0, rtol=1e-6)
    assert np.isnan(out[5]).all() and valid[:4].all() and valid[8:].all()


@settings(max_examples=60, deadline=None)
@given(a=st.sampled_from(["uint8", "uint16", "int16", "float32"]), b=st.sampled_from(["uint8", "uint16", "int16",
                                                                                      "float32"]))
def test_the_store_type_of_two_files_holds_both_exactly(a, b):
    c = widen(a, b)
    assert c == widen(b, a) and widen(c, a) == c
    for t in (a, b):
        info = np.iinfo(t) if t != "float32" else None
        if info is not None and c != "float32":
            assert np.iinfo(c).min <= info.min and info.max <= np.iinfo(c).max
        if info is not None and c == "float32":
            assert info.max < 2 ** 24 and info.min > -2 ** 24   # float32 holds every such integer
    assert store_dtype_for("int16", resampled=True) == "float32" and store_dtype_for("uint16", resampled=True) \
        == "uint16" and store_dtype_for("uint8", nodata=True) == "float32"


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), size=st.integers(1, 9), mode=st.sampled_from(["crop", "pad",
                                                                                                  "stretch"]),
       seed=st.integers(0, 2 ** 16))
def test_predict_and_the_store_share_one_path_for_float_images(h, w, size, mode, seed):
    rng = np.random.default_rng(seed)
    arr = rng.normal(-3, 10, (h, w, 3)).astype(np.float32)
    arr[rng.random((h, w, 3)) < 0.1] = np.nan
    import io

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, planarconfig="contig", photometric="rgb")
    spec = ImageSpec((size, size), mode, "rgb", 32, dtype="float32")
    a = prepare_bytes(buf.getvalue(), spec, "x.tif").pixels
    b = prepare_bytes(buf.getvalue(), spec, "x.tif").pixels
    assert a.dtype == np.float32 and a.shape == (size, size, 3) and np.array_equal(a, b, equal_nan=True)
    if (h, w) == (size, size):
        assert np.array_equal(a, arr, equal_nan=True)
    assert not np.isinf(a).any()


def test_the_model_fills_no_data_with_the_plane_mean():
    import jax.numpy as jnp
    from flax import nnx

    from cnnpipe.models.cnn import build_model

    model = build_model([{"type": "conv", "filters": 4}, {"type": "global_avg_pool"}, {"type": "dense", "units": 2}],
                        num_classes=2, in_channels=2, input_size=(5, 5), bit_depth=32, rngs=nnx.Rngs(0),
                        mean=[-10.0, 3.0], std=[2.0, 4.0])
    x = np.random.default_rng(0).normal(0, 5, (1, 5, 5, 2)).astype(np.float32)
    filled = x.copy()
    x[0, 1, :, 0], x[0, 3, 3, 1] = np.nan, np.nan
    filled[0, 1, :, 0], filled[0, 3, 3, 1] = -10.0, 3.0
    assert np.array_equal(np.asarray(model(jnp.asarray(x))), np.asarray(model(jnp.asarray(filled))))
    assert np.isfinite(np.asarray(model(jnp.full((1, 5, 5, 2), np.nan, jnp.float32)))).all()


def test_intensity_augmentation_is_relative_to_each_planes_range_and_keeps_nodata():
    import jax.numpy as jnp

    from cnnpipe.training.augment import adjust_brightness, adjust_contrast, adjust_gamma

    x = np.array([[-1024, -500], [0, 3071]], np.int16)[..., None]
    for op in (adjust_brightness, adjust_contrast, adjust_gamma):   # the identity settings: bit for bit
        assert np.array_equal(np.asarray(op(jnp.asarray(x), 1.0)), x)
    g = np.asarray(adjust_gamma(jnp.asarray(x), 2.0))[..., 0]
    assert g[0, 0] == -1024 and g[1, 1] == 3071 and -1024 < g[1, 0] < 0   # the range kept, the order kept
    f = np.array([[-20.0, np.nan], [-10.0, 0.0]], np.float32)[..., None]
    for op, v in ((adjust_brightness, 1.5), (adjust_contrast, 0.5), (adjust_gamma, 0.7)):
        out = np.asarray(op(jnp.asarray(f), v))[..., 0]
        assert np.isnan(out[0, 1]) and np.isfinite(np.delete(out.ravel(), 1)).all(), op.__name__
    assert np.asarray(adjust_brightness(jnp.asarray(f), 1.5))[0, 0, 0] == -20.0   # the minimum is black


def test_inspect_shows_signed_planes_in_their_own_units():
    from cnnpipe.inspect.report import plot_planes

    x = np.array([[-1024, 0], [500, 3071]], np.int16)[..., None]
    fig = plot_planes(x, ["L"], 16)[0]
    assert fig.axes[0].get_title(loc="left") == "plane L: int16 values -1024..3071"
    lo, hi = fig.axes[0].images[0].get_clim()
    assert (lo, hi) == (-1024, 3071)
    f = np.array([[0.25, np.nan]], np.float32)[..., None]
    assert plot_planes(f, ["S0"], 32)[0].axes[0].get_title(loc="left").endswith("1 no data")


def _digits(root, kind: str) -> None:
    """Four classes of scikit-learn's real digit scans, as float32 "reflectance" in [-1, 1] (kind "float")
    or the same values rescaled by hand to uint16 0..65535 (kind "uint16")."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.flatnonzero(d.target < 4)[:480]
    for i in keep:
        f = (d.images[i] / 16.0 * 2.0 - 1.0).astype(np.float32)
        arr = f if kind == "float" else np.rint((f + 1.0) / 2.0 * 65535).astype(np.uint16)
        path = root / str(d.target[i]) / f"{i:04d}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, arr)


@pytest.fixture(scope="module")
def digit_runs(tmp_path_factory):
    from cnnpipe.config import load_config
    from cnnpipe.training.train import train_and_evaluate

    root = tmp_path_factory.mktemp("digits")
    out = {}
    for kind in ("float", "uint16"):
        _digits(root / kind, kind)
        store = preprocess(root / kind, root / f"{kind}.store", size=8, channels="gray", workers=1,
                           progress=False, val_fraction=0.25)
        cfg = load_config(None, ["data.source=store", f"data.path={store.path}", "train.epochs=6",
                                 "train.batch_size=32", "optimizer.learning_rate=0.003", "augment.flip=false",
                                 "augment.crop_padding=0", "model=[{type: conv, filters: 16}, {type: relu}, "
                                 "{type: max_pool}, {type: flatten}, {type: dense, units: 4}]"])
        summary = train_and_evaluate(cfg, root / f"{kind}.run", log=lambda _: None, compile_cache="off")
        out[kind] = (store, summary, root / f"{kind}.run")
    return root, out


def test_float_data_trains_as_well_as_the_same_data_rescaled_to_uint16(digit_runs):
    _, runs = digit_runs
    (fs, f_sum, _), (us, u_sum, _) = runs["float"], runs["uint16"]
    assert fs.dtype == np.float32 and us.dtype == np.uint16
    assert fs.sources("val") == us.sources("val")   # the same split of the same scans
    assert f_sum["val_accuracy"] > 0.9
    assert abs(f_sum["val_accuracy"] - u_sum["val_accuracy"]) <= 0.01


def test_predict_equals_the_store_row_and_exports_agree_on_float_data(digit_runs, tmp_path):
    import jax
    import onnxruntime as ort

    from cnnpipe.runs.export import export_run
    from cnnpipe.runs.load import load_run
    from cnnpipe.runs.predict import predict_files

    root, runs = digit_runs
    store, _, run_dir = runs["float"]
    run = load_run(run_dir, "best")
    val, sources = store.images("val"), store.sources("val")
    files = [str(root / "float" / s) for s in sources[:48]]
    for f, row in zip(files, val):
        assert np.array_equal(run.prepare(f), row)   # tolerance 0: the one image path
    x = np.array(val[:48], np.float32)
    x[:, 0, :, 0] = np.nan   # no data on the first row of every image: filled inside every model alike
    probs = run.predict(x)
    assert np.isfinite(probs).all()
    preds = list(predict_files(run, files, workers=1, top_k=4))   # the files, through the one image path
    want = run.predict(val[:48])
    for p, row in zip(preds, want):
        assert p.error is None and [c for c, _ in p.top] == [run.classes[i] for i in np.argsort(-row)]
        np.testing.assert_allclose([v for _, v in p.top], np.sort(row)[::-1], atol=1e-6)
    path = export_run(run, "stablehlo", tmp_path / "m.stablehlo")
    np.testing.assert_allclose(np.asarray(jax.export.deserialize(path.read_bytes()).call(x)), probs, atol=1e-5)
    session = ort.InferenceSession(str(export_run(run, "onnx", tmp_path / "m.onnx")))
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, probs, atol=1e-5)
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert meta["dtype"] == "float32" and math.isclose(meta["bit_depth"], 32)


def test_values_near_float32s_limits_stay_finite_through_augmentation_and_the_model():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cnnpipe.config import AugmentConfig
    from cnnpipe.models.cnn import build_model
    from cnnpipe.training.augment import augment_batch
    from cnnpipe.training.loss import mix_batch

    top = float(np.finfo(np.float32).max)
    x = np.random.default_rng(4).normal(-10, 3, (4, 6, 6, 1)).astype(np.float32)
    x[:, :, :2] = -top   # a fill value with no nodata tag (the setting lived in a sidecar file)
    x[1] = top * 0.9
    cfg = AugmentConfig(noise=0.05, random_erasing=1.0, brightness=0.3, contrast=0.3, gamma=0.3)
    out = np.asarray(jax.jit(lambda im, k: augment_batch(im, k, cfg))(jnp.asarray(x), jax.random.key(0)))
    assert np.isfinite(out).all()
    model = build_model([{"type": "conv", "filters": 2}, {"type": "global_avg_pool"}, {"type": "dense", "units": 2}],
                        num_classes=2, in_channels=1, input_size=(6, 6), bit_depth=32, rngs=nnx.Rngs(0),
                        mean=[top * 0.1], std=[top * 0.5])
    assert np.isfinite(np.asarray(model(jnp.asarray(np.concatenate([x, -x]))))).all()   # (x - mean) would overflow
    a = np.full((2, 4, 4, 1), 7.0, np.float32)
    a[0, 0] = np.nan
    mixed, _ = jax.jit(lambda im, k: mix_batch(im, k, mixup=1.0, cutmix=0.0))(jnp.asarray(a), jax.random.key(1))
    assert not np.isnan(np.asarray(mixed)).any()   # no data in one image: the other's value stands


def test_sparse_files_and_empty_planes_are_named_not_silently_nan(tmp_path):
    from types import SimpleNamespace

    from cnnpipe.datasets.plane_stats import plane_percentiles

    rng = np.random.default_rng(5)
    for c in ("a", "b"):
        for i in range(3):
            _geotiff(tmp_path / "src" / c / f"{i}.tif", rng.normal(0, 1, (48, 48)).astype(np.float32), nodata=None)
    sparse = rng.normal(0, 1, (48, 48)).astype(np.float32)
    sparse[rng.random((48, 48)) < 0.97] = np.nan
    _geotiff(tmp_path / "src" / "a" / "sparse.tif", sparse, nodata=None)
    store = preprocess(tmp_path / "src", tmp_path / "store", size=4, resize="stretch", channels="gray", workers=1,
                       progress=False)
    (skip,) = store.report["skipped"]
    assert skip["path"] == "a/sparse.tif" and skip["kind"] == "no_data" and "after resizing" in skip["reason"]
    images = np.zeros((2, 2, 2, 2), np.float32)
    images[..., 1] = np.nan
    with pytest.raises(ValueError, match="plane 1 has no valid training value"):
        plane_percentiles(images, 2, 98)
    from cnnpipe.config import load_config
    from cnnpipe.training.normalize import input_window

    ds = SimpleNamespace(channels=2, bit_depth=32, train=SimpleNamespace(images=images))
    with pytest.raises(ValueError, match="plane 1 has no valid training value"):
        input_window(load_config(None, ["data.normalize={window: [-1, 1]}"]).data.normalize, ds)
