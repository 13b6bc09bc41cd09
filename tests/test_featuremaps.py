"""featuremaps + report + `cnnpipe inspect`: known answers on hand-set tiny models, files, bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from cnnpipe.images.transform import resize_image
from cnnpipe.inspect import featuremaps as fm
from cnnpipe.inspect import report
from cnnpipe.models.cnn import build_model
from cnnpipe.training.plots import feature_grid, probe_grids

EXAMPLE16 = Path(__file__).resolve().parent.parent / "cnnpipe" / "examples" / "gradient16.png"


def _model(layers, *, in_channels=3, num_classes=2, size=(16, 16), bit_depth=8, seed=0):
    return build_model(layers, in_channels=in_channels, num_classes=num_classes, input_size=size,
                       bit_depth=bit_depth, rngs=nnx.Rngs(seed))


def _set(param, value):
    param[...] = np.asarray(value, np.float32).reshape(param.shape)


# ---------------------------------------------------------------- known answers

def test_grad_cam_peaks_on_the_bright_square():
    # conv1 averages the 3x3x3 neighbourhood minus 0.5: positive only on the (normalised = 1) square
    model = _model([{"type": "conv", "filters": 1, "kernel": 3}, {"type": "relu"}, {"type": "max_pool"},
                    {"type": "global_avg_pool"}], size=(32, 32))
    conv, head = model.layers[0], model.layers[-1]
    _set(conv.kernel, np.full((3, 3, 3, 1), 1 / 27))
    _set(conv.bias, [-0.5])
    _set(head.kernel, [[-1.0, 1.0]])
    _set(head.bias, [0.0, 0.0])
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[0, 4:12, 18:28] = 255
    inside = np.zeros((32, 32), bool)
    inside[4:12, 18:28] = True

    assert fm.default_cam_layer(model) == "relu1"
    cam = fm.grad_cam(model, img, class_index=1)
    assert cam.shape == (1, 32, 32)
    assert cam.max() == pytest.approx(1.0)
    peak = np.unravel_index(cam[0].argmax(), (32, 32))
    assert inside[peak]
    # by hand: 1 where the whole 3x3 window is bright, (6/9 - 1/2) / (1/2) = 1/3 along the edges,
    # 0 at the corners and everywhere outside
    core = np.zeros((32, 32), bool)
    core[5:11, 19:27] = True
    np.testing.assert_allclose(cam[0][core], 1.0, atol=1e-5)
    np.testing.assert_allclose(cam[0][5:11, 18], 1 / 3, atol=1e-5)
    assert cam[0][~inside].max() == 0.0
    # the other class has a negative weight on the only channel: relu leaves nothing
    assert fm.grad_cam(model, img, class_index=0).max() == 0.0


@pytest.mark.parametrize("plane", [0, 2])
def test_a_model_reading_one_plane_gets_nearly_all_attribution(plane):
    model = _model([{"type": "conv", "filters": 6, "kernel": 3}, {"type": "relu"}, {"type": "max_pool"},
                    {"type": "conv", "filters": 8, "kernel": 3}, {"type": "relu"}, {"type": "flatten"}],
                   num_classes=4, seed=1)
    k = np.asarray(model.layers[0].kernel[...]).copy()
    k[:, :, [p for p in range(3) if p != plane], :] = 0.0
    _set(model.layers[0].kernel, k)
    rng = np.random.default_rng(0)
    imgs = rng.integers(30, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    shares, signed = fm.plane_attribution(model, imgs, class_index=[0, 1, 2])
    assert shares.shape == (3, 3)
    np.testing.assert_allclose(shares.sum(axis=1), 1.0, rtol=1e-9)
    assert (shares[:, plane] > 0.95).all()
    assert np.all(signed[:, [p for p in range(3) if p != plane]] == 0.0)


def test_split_forward_used_by_grad_cam_matches_the_model():
    model = _model([{"type": "conv", "filters": 4, "kernel": 3}, {"type": "batch_norm"}, {"type": "relu"},
                    {"type": "max_pool"}, {"type": "dropout", "rate": 0.5}, {"type": "flatten"},
                    {"type": "dense", "units": 5}, {"type": "relu"}], num_classes=3)
    model.eval()
    x = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    ours = fm._apply(list(model.layers), model.layer_kinds, model.normalize(x))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(model(x)), rtol=1e-5, atol=1e-5)


def test_activation_stats_match_a_hand_computation():
    # 1x1 conv: channels 0 and 2 are constant -1 (never active), 1 = R + 0.1, 3 = 0.5 - R
    model = _model([{"type": "conv", "filters": 4, "kernel": 1}], size=(4, 4))
    w = np.zeros((3, 4), np.float32)
    w[0, 1], w[0, 3] = 1.0, -1.0
    b = np.array([-1.0, 0.1, -1.0, 0.5], np.float32)
    _set(model.layers[0].kernel, w)
    _set(model.layers[0].bias, b)
    img = np.random.default_rng(2).integers(0, 256, (1, 4, 4, 3)).astype(np.uint8)
    img[0, 0, 0, 0] = 0  # guarantees 0.5 - R > 0 somewhere
    want = (img.astype(np.float64) / 255) @ w + b

    acts = fm.capture_activations(model, img)
    assert list(acts) == ["conv1"]
    stats = fm.activation_stats(acts)["conv1"]
    assert stats["never_active_channels"] == [0, 2] and stats["never_active_fraction"] == 0.5
    assert stats["mean"] == pytest.approx(want.mean(), abs=1e-6)
    assert stats["max"] == pytest.approx(want.max(), abs=1e-6)
    assert stats["min"] == pytest.approx(-1.0, abs=1e-6)
    assert stats["shape"] == [4, 4, 4]


def test_feature_grid_has_one_min_max_tile_per_channel():
    fmap = np.random.default_rng(3).normal(size=(5, 4, 10)).astype(np.float32)
    fmap[..., 7] = 3.0  # constant channel -> zeros
    grid, rows, cols = feature_grid(fmap)
    assert (rows, cols) == (3, 4)
    assert grid.shape == (3 * 6 - 1, 4 * 5 - 1)
    tiles = [grid[r * 6:r * 6 + 5, q * 5:q * 5 + 4] for r in range(rows) for q in range(cols)]
    full = [t for t in tiles if not np.isnan(t).any()]
    assert len(full) == 10 and all(np.isnan(t).all() for t in tiles[10:])
    for k in range(10):
        ch = fmap[..., k]
        want = np.zeros_like(ch) if k == 7 else (ch - ch.min()) / (ch.max() - ch.min())
        np.testing.assert_allclose(tiles[k], want, atol=1e-6)


def test_probe_grids_for_tensorboard():
    model = _model("simple_cnn", num_classes=4)
    img = np.random.default_rng(6).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    grids = probe_grids(model, img)
    assert list(grids) == ["conv1", "pool1", "conv2", "pool2"]
    acts = fm.capture_activations(model, img[None])
    for name, grid in grids.items():
        np.testing.assert_array_equal(grid[0], feature_grid(acts[name][0], fill=0.0)[0])
    assert grids["conv1"].shape == (1, 4 * 17 - 1, 4 * 17 - 1) and grids["pool2"].shape == (1, 6 * 5 - 1, 6 * 5 - 1)
    assert all(0.0 <= g.min() and g.max() <= 1.0 for g in grids.values())


def test_kernel_grid_is_grouped_by_input_plane():
    model = _model("simple_cnn", num_classes=4)
    name, kernels = fm.first_conv_kernels(model)
    hwio = np.asarray(model.layers[0].kernel[...])
    assert name == "conv1" and kernels.shape == (3, 16, 3, 3)
    np.testing.assert_array_equal(kernels[1, 5], hwio[:, :, 1, 5])   # G plane, filter 5
    fig = report.plot_kernels(kernels, ("R", "G", "B"), name)
    grids = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(grids) == 3 and all(g.shape == (7, 31) for g in grids)  # a 2 x 8 block per plane
    for p, grid in enumerate(grids):
        tiles = [grid[(q // 8) * 4:(q // 8) * 4 + 3, (q % 8) * 4:(q % 8) * 4 + 3] for q in range(16)]
        assert all(np.ma.getdata(t).shape == (3, 3) for t in tiles)
        np.testing.assert_allclose(np.ma.getdata(tiles[9]), kernels[p, 9])


# ---------------------------------------------------------------- input rules

def _png(path, array, mode=None):
    Image.fromarray(array, mode).save(path)
    return str(path)


def test_prepare_image_follows_the_preprocess_rules(tmp_path):
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, np.full((20, 24), 9, np.uint8)])
    gray = rgb[..., 0].copy()
    size = (16, 16)

    im = fm.prepare_image(_png(tmp_path / "rgb.png", rgb), in_channels=3, bit_depth=8, size=size)
    np.testing.assert_array_equal(im.pixels, resize_image(rgb, size, "crop"))
    assert im.planes == ("R", "G", "B") and any("resized from 24x20" in n for n in im.notes)

    im = fm.prepare_image(_png(tmp_path / "rgba.png", rgba), in_channels=3, bit_depth=8, size=(20, 24))
    np.testing.assert_array_equal(im.pixels, rgb)
    assert any("alpha" in n for n in im.notes)

    im = fm.prepare_image(_png(tmp_path / "gray.png", gray), in_channels=3, bit_depth=16, size=(20, 24))
    assert im.pixels.dtype == np.uint16
    np.testing.assert_array_equal(im.pixels, np.repeat(gray[..., None], 3, -1).astype(np.uint16) * 257)
    assert any("x257" in n for n in im.notes) and any("expanded" in n for n in im.notes)

    with pytest.raises(ValueError,
                       match=r"gradient16.png: 16-bit image; the model expects 3 plane\(s\) R/G/B at 8-bit"):
        fm.prepare_image(EXAMPLE16, in_channels=3, bit_depth=8, size=size)
    with pytest.raises(ValueError, match=r"rgb.png: image has 3 plane\(s\) R/G/B at 8-bit; the model expects 4"):
        fm.prepare_image(tmp_path / "rgb.png", in_channels=4, bit_depth=8, size=size)
    assert fm.prepare_image(tmp_path / "rgba.png", in_channels=4, bit_depth=8, size=size).planes == tuple("RGBA")


def test_unknown_layer_and_wrong_images_are_errors_naming_what_is_expected():
    model = _model("simple_cnn", num_classes=4)
    x = np.zeros((1, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown layer name 'conv9'; available: conv1, relu1, pool1, conv2"):
        fm.capture_activations(model, x, ["conv1", "conv9"])
    with pytest.raises(ValueError, match="unknown layer name 'nope'"):
        fm.grad_cam(model, x, 0, layer="nope")
    with pytest.raises(ValueError, match="is not spatial"):
        fm.grad_cam(model, x, 0, layer="dense1")
    with pytest.raises(ValueError, match=r"expects \(N, 16, 16, 3\) raw 8-bit"):
        fm.capture_activations(model, np.zeros((1, 16, 16, 1), np.uint8))
    with pytest.raises(ValueError, match="uint16 pixels for an 8-bit model"):
        fm.capture_activations(model, x.astype(np.uint16))
    with pytest.raises(ValueError, match="the model has 4 classes"):
        fm.plane_attribution(model, x, 4)


# ---------------------------------------------------------------- report files

def test_inspect_images_writes_pages_pngs_and_summary(tmp_path):
    model = _model([{"type": "conv", "filters": 4, "kernel": 1}, {"type": "relu"}, {"type": "max_pool"}],
                   size=(4, 4), num_classes=3)
    w = np.zeros((3, 4), np.float32)
    w[0, 1], w[0, 3] = 1.0, -1.0
    _set(model.layers[0].kernel, w)
    _set(model.layers[0].bias, [-1.0, 0.1, -1.0, 0.5])
    rng = np.random.default_rng(5)
    pixels = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(2)]
    pixels[1][0, 0, 0] = 0
    images = [fm.InputImage(p, ("R", "G", "B"), 8, f"/data/{name}", ("a <note> & more",))
              for p, name in zip(pixels, ["plain.png", "a&b<c>.png"])]
    out = tmp_path / "rep"
    summary = report.inspect_images(model, images, out, classes=["x", "y", "z"], top_k=2,
                                    layers=["conv1", "pool1"], class_name="y")
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))

    for entry, px in zip(on_disk["images"], pixels):
        conv = (px.astype(np.float64) / 255) @ w + np.array([-1.0, 0.1, -1.0, 0.5])
        st = entry["layers"]["conv1"]
        assert st["mean"] == pytest.approx(conv.mean(), abs=1e-6)
        assert st["max"] == pytest.approx(conv.max(), abs=1e-6)
        dead = [k for k in range(4) if conv[..., k].max() <= 0]
        assert st["never_active_channels"] == dead
        assert st["never_active_fraction"] == len(dead) / 4
        pool = np.maximum(conv, 0).reshape(2, 2, 2, 2, 4).max(axis=(1, 3))
        assert entry["layers"]["pool1"]["max"] == pytest.approx(pool.max(), abs=1e-6)
        assert [p["class"] for p in entry["predictions"]] and len(entry["predictions"]) == 2
        assert entry["explained_class"] == "y"
        assert sum(entry["attribution"]["shares"].values()) == pytest.approx(1.0)
        assert [f["tiles"] for f in entry["pictures"]["feature_maps"]] == [4, 4]
        assert list(entry["layers"]) == ["conv1", "pool1"]

    # every picture exists, opens and has the recorded (figsize x DPI) size
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(on_disk["files"])
    # kernels + per image: 3 planes, 2 layers, Grad-CAM over the image and alone, attribution
    assert len(pngs) == 1 + 2 * (3 + 2 + 3)
    for name, size in on_disk["files"].items():
        with Image.open(out / name) as im:
            im.load()
            assert im.format == "PNG" and im.size == (size["width"], size["height"])
    for entry in on_disk["images"]:
        for plane in entry["pictures"]["planes"]:
            assert (plane["width"], plane["height"]) == (290, 235)  # 2.9 x 2.35 in at 100 dpi
    page = (out / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(srcs) == pngs
    assert "a&amp;b&lt;c&gt;.png" in page and "<c>" not in page and "&lt;note&gt;" in page
    assert "per-tile min-max" in page
    assert not list(out.glob(".*"))  # no temporary files left


# ---------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from cnnpipe.config import load_config
    from cnnpipe.training.train import train_and_evaluate

    run = tmp_path_factory.mktemp("run")
    layers = ('[{type: conv, filters: 4, kernel: 3}, {type: relu}, {type: max_pool}, '
              '{type: conv, filters: 6, kernel: 3}, {type: relu}, {type: max_pool}, {type: flatten}]')
    cfg = load_config(None, [f"model={layers}", "train.epochs=1", "data.num_train=32", "data.num_val=16",
                             "train.batch_size=16", "train.eval_batch_size=16", "data.size=[16, 16]"])
    train_and_evaluate(cfg, run, log=lambda _: None)
    return run


def _cli(argv, capsys):
    from cnnpipe.cli import main

    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_inspect_end_to_end(tiny_run, tmp_path, capsys):
    img = np.zeros((24, 24, 3), np.uint8)
    img[6:18, 6:18] = (250, 40, 40)
    path = _png(tmp_path / "square.png", img)
    gray = _png(tmp_path / "gray.png", img[..., 0].copy())
    out = tmp_path / "page"
    rc, stdout, err = _cli(["inspect", str(tiny_run), path, gray, "--out", str(out), "--top-k", "2"], capsys)
    assert rc == 0, err
    assert "index.html" in stdout
    page = (out / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 1 + 2 * (3 + 4 + 3)   # conv1, pool1, conv2, pool2
    for src in srcs:
        assert not Path(src).is_absolute()
        with Image.open(out / src) as im:
            im.load()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == ["circle", "square", "triangle", "cross", "ring", "diamond"]
    assert [len(e["predictions"]) for e in summary["images"]] == [2, 2]
    assert any("expanded" in n for n in summary["images"][1]["notes"])

    rc, _, _ = _cli(["inspect", str(tiny_run), path, "--layers", "conv2", "--class", "ring"], capsys)
    assert rc == 0
    default = json.loads((tiny_run / "inspect" / "summary.json").read_text())
    assert default["images"][0]["explained_class"] == "ring"
    assert [f["layer"] for f in default["images"][0]["pictures"]["feature_maps"]] == ["conv2"]


def test_cli_inspect_bad_input(tiny_run, tmp_path, capsys):
    path = _png(tmp_path / "a.png", np.zeros((16, 16, 3), np.uint8))
    cases = [
        (["--layers", "conv7"], "unknown layer name 'conv7'; available: conv1, relu1, pool1, conv2"),
        (["--class", "hexagon"], "unknown class 'hexagon'; classes: circle, square"),
        (["--top-k", "0"], "--top-k: got 0"),
    ]
    for extra, message in cases:
        rc, _, err = _cli(["inspect", str(tiny_run), path, *extra], capsys)
        assert rc == 2 and message in err and err.count("\n") == 1, err
    rc, _, err = _cli(["inspect", str(tiny_run), str(EXAMPLE16)], capsys)
    assert rc == 2 and "the model expects 3 plane(s) R/G/B at 8-bit" in err
    bare = tmp_path / "bare_run"
    bare.mkdir()
    for name in ("config.yaml", "dataset.json"):
        shutil.copy(tiny_run / name, bare / name)
    rc, _, err = _cli(["inspect", str(bare), path], capsys)
    assert rc == 2 and str(bare) in err and "checkpoint" in err and err.count("\n") == 1
