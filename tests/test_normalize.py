"""`data.normalize`: exact per-plane percentiles, fixed windows, and the window travelling with the run
into evaluate, predict and exported models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnpipe.config import ConfigError, load_config
from cnnpipe.datasets.dataset import RowView
from cnnpipe.datasets.plane_stats import plane_percentiles


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 600), c=st.integers(1, 4),
       kind=st.sampled_from(["uint8", "uint16", "int16"]), q=st.tuples(st.floats(0, 49), st.floats(51, 100)))
def test_percentiles_are_numpys_exactly(seed, n, c, kind, q):
    rng = np.random.default_rng(seed)
    info = np.iinfo(kind)
    low_end = int(rng.integers(info.min, 1)) if kind == "int16" else 0   # CT: -1024 and below
    images = rng.integers(low_end, rng.integers(low_end + 1, info.max + 1, endpoint=True), (n, 3, 2, c),
                          dtype=kind, endpoint=True)
    view = RowView(images, np.arange(0, n, 2))   # a fold's rows, read through a view
    low, high = plane_percentiles(view, *q)
    subset = images[::2]
    for k in range(c):
        assert low[k] == pytest.approx(np.percentile(subset[..., k], q[0]), abs=1e-9)
        assert high[k] == pytest.approx(np.percentile(subset[..., k], q[1]), abs=1e-9)


def test_normalize_settings_are_checked_in_one_line():
    assert load_config(None, ["data.normalize={window: [-1000, 400]}"]).data.normalize.window == (-1000.0, 400.0)
    with pytest.raises(ConfigError, match="data.normalize: got 'minmax'; expected zscore"):
        load_config(None, ["data.normalize=minmax"])
    for bad in ("{window: []}", "{window: [.nan, 100]}", '{window: ["1", "100"]}', "{window: [0, 1.0e+39]}",
                "{window: [[0, 1], [3, 2]]}", "{percentile: [2, 98, 99]}", "{percentile: [-1, 50]}"):
        with pytest.raises(ConfigError, match=r"data\.normalize\.(window|percentile): got "):
            load_config(None, [f"data.normalize={bad}"])
    from types import SimpleNamespace

    from cnnpipe.training.normalize import input_window

    ds = SimpleNamespace(channels=3, bit_depth=8, train=SimpleNamespace(images=np.zeros((1, 1, 1, 3), np.uint8)))
    spec = load_config(None, ["data.normalize={window: [300, 1000]}"]).data.normalize
    with pytest.raises(ValueError, match=r"0\.\.255 \(8-bit\)"):   # every pixel would be one value
        input_window(spec, ds)
    with pytest.raises(ValueError, match="percentile"):
        plane_percentiles(np.zeros((2, 1, 1, 1), np.uint8), 98, 2)


def test_a_windowed_run_carries_its_window_into_predict_and_export(tmp_path):
    import jax

    from cnnpipe.runs.export import export_run
    from cnnpipe.runs.load import load_run
    from cnnpipe.training.train import train_and_evaluate

    cfg = load_config(None, ["data.source=shapes", "data.bit_depth=16", "data.num_train=64", "data.num_val=32",
                             "data.size=[16, 16]", "train.epochs=1", "train.batch_size=16",
                             "data.normalize={window: [[0, 40000], [1000, 30000], [0, 65535]]}"])
    train_and_evaluate(cfg, tmp_path / "run", log=lambda _: None, compile_cache="off")
    norm = json.loads((tmp_path / "run" / "dataset.json").read_text())["normalization"]
    assert norm["clip"] == [[0.0, 1000.0, 0.0], [40000.0, 30000.0, 65535.0]]
    assert norm["mean"] == [0.0, 1000.0, 0.0] and norm["std"] == [40000.0, 29000.0, 65535.0]
    run = load_run(tmp_path / "run")
    model = run.model()
    x = np.array([[[[50000.0, 500.0, 65535.0]]]], np.float32)   # outside the first two windows
    np.testing.assert_allclose(np.asarray(model.normalize(x)), [[[[1.0, 0.0, 1.0]]]], atol=1e-7)
    pixels = np.random.default_rng(0).integers(0, 65536, (8, 16, 16, 3)).astype(np.float32)
    path = export_run(run, "stablehlo", tmp_path / "m.stablehlo")
    exported = np.asarray(jax.export.deserialize(path.read_bytes()).call(pixels))
    np.testing.assert_allclose(exported, run.predict(pixels), atol=1e-5)
    # fine-tuned from that run with another window: the window asked for, the run's weights
    tuned = cfg.model_copy(update={"pretrained": cfg.pretrained.model_copy(update={"weights": str(tmp_path / "run")}),
                                   "data": cfg.data.model_copy(update={"normalize": load_config(
                                       None, ["data.normalize={window: [100, 60000]}"]).data.normalize})})
    train_and_evaluate(tuned, tmp_path / "tuned", log=lambda _: None, compile_cache="off")
    again = json.loads((tmp_path / "tuned" / "dataset.json").read_text())["normalization"]
    assert again["clip"] == [[100.0] * 3, [60000.0] * 3] and again["from"].startswith("data.normalize")


def test_pretrained_statistics_apply_to_the_windowed_values():
    from cnnpipe.training.normalize import window_init

    mean, std, _ = window_init(((-1000.0, 0.0), (400.0, 255.0), "w"), ((0.485, 0.456), (0.229, 0.224)))
    x = np.array([-1200.0, -300.0, 100.0, 900.0])
    for k, (lo, hi, m, s) in enumerate(((-1000.0, 400.0, 0.485, 0.229), (0.0, 255.0, 0.456, 0.224))):
        scaled = (np.clip(x, lo, hi) - lo) / (hi - lo)   # the window to [0, 1], then the weights' statistics
        np.testing.assert_allclose((np.clip(x, lo, hi) - mean[k]) / std[k], (scaled - m) / s, rtol=1e-12)
