"""N-plane images end to end: `--channels native` from 16-bit TIFF files to per-plane attribution.

The dataset: 5-plane 16-bit TIFFs in which every plane holds one of three shapes (a
horizontal bar, a vertical bar, a square) on a noisy background, and only plane S2
holds the shape of the image's class; the other four hold shapes drawn at random.
A model can only be right by reading S2, and every plane looks alike to a model that
has not learned which one matters.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cnnpipe.cli import main
from cnnpipe.config import load_config
from cnnpipe.datasets.native_planes import choose_plane_count
from cnnpipe.datasets.store import load_store
from cnnpipe.images.decode import read_image
from cnnpipe.training.train import train_and_evaluate

CLASSES = ("bar_h", "bar_v", "square")
INFORMATIVE = 2


def _plane(rng, k, size):
    plane = (2000 + rng.integers(0, 4000, (size, size))).astype(np.uint16)
    cy, cx = rng.integers(6, size - 6, 2)
    if k == 0:
        plane[cy - 2:cy + 2, 2:-2] = 60000
    elif k == 1:
        plane[2:-2, cx - 2:cx + 2] = 60000
    else:
        plane[cy - 4:cy + 4, cx - 4:cx + 4] = 60000
    return plane


def five_plane_image(rng, k, size=24):
    return np.stack([_plane(rng, k if p == INFORMATIVE else int(rng.integers(0, 3)), size) for p in range(5)], -1)


def write_folder(root: Path, per_class=60, seed=0):
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            tifffile.imwrite(root / name / f"{i:03d}.tif", five_plane_image(rng, k), photometric="minisblack",
                             planarconfig="contig")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("planes")
    folder = write_folder(root / "images")
    assert main(["preprocess", str(folder), str(root / "store"), "--size", "24", "--channels", "native",
                 "--val-fraction", "0.25", "--workers", "1"]) == 0
    cfg = load_config(None, ["data.source=store", f"data.path={root / 'store'}", "train.epochs=20",
                             "train.batch_size=16", "train.eval_batch_size=16", "train.num_devices=1"])
    summary = train_and_evaluate(cfg, root / "run", log=lambda _: None)
    return root, summary


def test_the_store_and_the_run_keep_five_named_16bit_planes(trained):
    root, _ = trained
    store = load_store(root / "store")
    assert store.meta["channel_names"] == ["S0", "S1", "S2", "S3", "S4"]
    assert store.channels == 5 and store.bit_depth == 16 and len(store.mean) == 5
    info = json.loads((root / "run" / "dataset.json").read_text())
    assert info["planes"] == ["S0", "S1", "S2", "S3", "S4"] and info["channels"] == 5
    assert "channels: native" in (root / "run" / "config.yaml").read_text()


def test_attribution_goes_to_the_one_informative_plane(trained):
    """Thresholds: accuracy >= 0.8 (chance is 1/3); S2 has the largest share for >= 90% of the
    validation images and a mean share >= 1.5x any other plane's (equal planes would give 1x).
    Gradient x input never gives the distractor planes exactly 0: the first layer's weights on
    them shrink during training but do not vanish, so "most of the share" is read as the largest
    share by a clear margin. Measured: S2 first for every image, 0.33-0.35 against <= 0.18."""
    from cnnpipe.datasets.dataset import store_dataset
    from cnnpipe.inspect import featuremaps as fm
    from cnnpipe.runs.load import load_run

    root, summary = trained
    assert summary["final_val_accuracy"] >= 0.8
    ds = store_dataset(root / "store")
    model = load_run(root / "run", "latest").model()
    shares, _ = fm.plane_attribution(model, np.asarray(ds.val.images), np.asarray(ds.val.labels))
    np.testing.assert_allclose(shares.sum(1), 1.0, rtol=1e-9)
    assert (shares.argmax(1) == INFORMATIVE).mean() >= 0.9
    mean = shares.mean(0)
    assert mean[INFORMATIVE] >= 1.5 * np.delete(mean, INFORMATIVE).max()


def test_evaluate_predict_and_inspect_take_the_planes_and_refuse_others(trained, capsys):
    root, summary = trained
    run = str(root / "run")
    assert main(["evaluate", run, "--checkpoint", "latest"]) == 0
    assert f"accuracy: {summary['final_val_accuracy']:.4f}" in capsys.readouterr().out
    image = root / "images" / "bar_v" / "000.tif"
    assert main(["predict", run, str(image)]) == 0
    capsys.readouterr()
    rgb = root / "rgb.png"
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(rgb)
    assert main(["predict", run, str(rgb)]) == 1  # a batch job: the file gets its reason, the run goes on
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and out.startswith(f"{rgb}: error: ")
    assert "image has 3 plane(s) R/G/B at 8-bit; the model expects 5 plane(s) at 16-bit, 24x24" in out
    assert main(["inspect", run, str(image), "--out", str(root / "inspect")]) == 0
    page = json.loads((root / "inspect" / "summary.json").read_text())
    entry = page["images"][0]
    assert entry["planes"] == ["S0", "S1", "S2", "S3", "S4"]
    assert list(entry["attribution"]["shares"]) == ["S0", "S1", "S2", "S3", "S4"]
    assert page["kernels"]["planes"] == ["S0", "S1", "S2", "S3", "S4"] and page["kernels"]["shape"][0] == 5
    assert len(entry["pictures"]["planes"]) == 5  # one picture per plane, each with its own colour bar


def test_a_folder_mixing_plane_counts_stores_the_majority_and_reports_the_rest(tmp_path):
    rng = np.random.default_rng(1)
    for k, name in enumerate(("a", "b")):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(6):
            tifffile.imwrite(tmp_path / "src" / name / f"{i}.tif", five_plane_image(rng, k, 16),
                             photometric="minisblack", planarconfig="contig")
    for name in ("a", "b"):  # the minority: 16-bit RGB
        tifffile.imwrite(tmp_path / "src" / name / "rgb.tif", np.full((16, 16, 3), 7, np.uint16), photometric="rgb")
    assert main(["preprocess", str(tmp_path / "src"), str(tmp_path / "out"), "--size", "16",
                 "--channels", "native", "--workers", "1"]) == 1   # stored; the two RGB files are reported
    store = load_store(tmp_path / "out")
    assert store.channels == 5 and sum(store.count(s) for s in store.splits) == 12
    skipped = [s for s in store.report["skipped"] if s["kind"] == "plane_count"]
    assert sorted(s["path"] for s in skipped) == ["a/rgb.tif", "b/rgb.tif"]
    assert skipped[0]["reason"].endswith("rgb.tif: 3 plane(s) R/G/B; the store takes 5 plane(s) "
                                         "S0/S1/S2/S3/S4 (12 of 14 files have 5)")


def test_plane_names_and_the_majority_rule(tmp_path):
    tifffile.imwrite(tmp_path / "five.tif", np.zeros((4, 4, 5), np.uint16), photometric="minisblack",
                     planarconfig="contig")
    assert read_image(tmp_path / "five.tif", channels="native").channels == ("S0", "S1", "S2", "S3", "S4")
    tifffile.imwrite(tmp_path / "la.tif", np.zeros((4, 4, 2), np.uint8), photometric="minisblack",
                     extrasamples=[2])
    assert read_image(tmp_path / "la.tif", channels="native", alpha="keep").channels == ("L", "A")
    three, five = ("R", "G", "B"), tuple(f"S{i}" for i in range(5))
    choice = choose_plane_count([three, five, five])
    assert (choice.count, choice.names, choice.files, choice.total) == (5, five, 2, 3)
    assert choose_plane_count([five, three]).count == 5  # a tie: the earliest file's count
    with pytest.raises(ValueError, match="no readable image"):
        choose_plane_count([])


def test_worst_page_finds_mislabelled_images_and_counts_the_confusions(tmp_path, capsys):
    from cnnpipe.datasets.shapes import SHAPE_CLASSES, make_shapes
    from cnnpipe.runs.evaluate import evaluate_run
    from cnnpipe.runs.load import load_run

    classes = SHAPE_CLASSES[:3]
    for split, n, seed in (("train", 240, 1), ("val", 60, 2)):
        images, labels = make_shapes(n * 2, size=(20, 20), seed=seed)
        keep = labels < 3
        for i, (img, k) in enumerate(zip(images[keep][:n], labels[keep][:n])):
            d = tmp_path / "src" / split / classes[k]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:03d}.png")
    # three validation images filed under a wrong class: the model will be confidently "wrong"
    wrong = []
    for k, name in enumerate(classes):
        src = sorted((tmp_path / "src" / "val" / name).iterdir())[0]
        dst = tmp_path / "src" / "val" / classes[(k + 1) % 3] / f"mislabelled-{src.name}"
        src.rename(dst)
        wrong.append(f"val/{classes[(k + 1) % 3]}/{dst.name}")
    assert main(["preprocess", str(tmp_path / "src"), str(tmp_path / "store"), "--size", "20", "--workers", "1"]) == 0
    cfg = load_config(None, ["data.source=store", f"data.path={tmp_path / 'store'}", "train.epochs=20",
                             "train.batch_size=16", "train.eval_batch_size=20", "train.num_devices=1"])
    summary = train_and_evaluate(cfg, tmp_path / "run", log=lambda _: None)
    assert summary["final_val_accuracy"] >= 0.8  # 3 of 59 labels are wrong on purpose
    assert main(["inspect", str(tmp_path / "run"), "--worst", "8"]) == 0
    page = json.loads((tmp_path / "run" / "worst" / "summary.json").read_text())
    sources = [e["source"] for e in page["images"]]
    assert len(sources) == 8 and set(wrong) <= set(sources)
    assert page["worst"]["losses"] == sorted(page["worst"]["losses"], reverse=True)
    # the table's counts are the confusion matrix's off-diagonal cells, for the same checkpoint
    cm = evaluate_run(load_run(tmp_path / "run"))[0]["confusion"]
    counts = {(p["true"], p["predicted"]): p["count"] for p in page["worst"]["confused_pairs"]}
    assert counts == {(classes[t], classes[p]): int(cm[t, p]) for t in range(3) for p in range(3)
                      if t != p and cm[t, p]}
    html_page = (tmp_path / "run" / "worst" / "index.html").read_text()
    assert "Most-confused class pairs" in html_page and 'href="#img-1"' in html_page
    assert all((tmp_path / "run" / "worst" / e["pictures"]["grad_cam_heat"]["file"]).is_file() for e in page["images"])
    assert main(["inspect", str(tmp_path / "run")]) == 2
    assert "give IMAGE files or --worst N" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["imagej", "ome", "unnamed", "zstack"])
def test_multi_page_channel_stacks_are_read_as_planes(tmp_path, kind):
    """ImageJ and OME hyperstacks store each channel as a page ("CYX"): all pages are the planes,
    named as the file names them; a z-stack ("ZYX") keeps its first page, as before."""
    data = (np.arange(4 * 6 * 7).reshape(4, 6, 7) * 300).astype(np.uint16)
    labels = ["DAPI", "GFP", "RFP", "Cy5"]
    path = tmp_path / f"{kind}.tif"
    if kind == "imagej":
        tifffile.imwrite(path, data, imagej=True, metadata={"axes": "CYX", "Labels": labels})
    elif kind == "ome":
        tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX", "Channel": {"Name": labels}})
    elif kind == "unnamed":
        tifffile.imwrite(path, data, imagej=True, metadata={"axes": "CYX"})
    else:
        tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZYX"})
    planes = read_image(path, channels="native")
    if kind == "zstack":
        assert planes.channels == ("L",)
        np.testing.assert_array_equal(planes.data[0], data[0])
        return
    want = tuple(labels) if kind in ("imagej", "ome") else ("S0", "S1", "S2", "S3")
    assert planes.channels == want and planes.bit_depth == 16
    np.testing.assert_array_equal(planes.data, data)  # every value, every channel


def test_a_folder_source_with_native_channels_trains_on_every_plane(tmp_path):
    from cnnpipe.datasets.sources import folder_dataset

    rng = np.random.default_rng(2)
    for k, name in enumerate(CLASSES):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(4):
            tifffile.imwrite(tmp_path / "src" / name / f"{i}.tif", five_plane_image(rng, k, 16),
                             photometric="minisblack", planarconfig="contig")
    ds = folder_dataset(tmp_path / "src", size=(12, 12), channels="native", val_fraction=0.25,
                        cache_dir=tmp_path / "cache")
    assert ds.channels == 5 and ds.plane_names == ("S0", "S1", "S2", "S3", "S4") and ds.bit_depth == 16
    assert ds.size == (12, 12) and len(ds.train) + len(ds.val) == 12


# ---------------------------------------------------------------- a run takes its own files, any plane count

@pytest.fixture(scope="module", params=[1, 3, 5])
def native_run(request, tmp_path_factory):
    """A run trained on a --channels native store of N-sample 16-bit TIFFs (1: L, 3: S0..S2, 5: S0..S4)."""
    n = request.param
    root = tmp_path_factory.mktemp(f"native{n}")
    rng = np.random.default_rng(n)
    for k, name in enumerate(CLASSES):
        (root / "images" / name).mkdir(parents=True)
        for i in range(6):
            img = five_plane_image(rng, k, 16)[..., :n]
            tifffile.imwrite(root / "images" / name / f"{i}.tif", img[..., 0] if n == 1 else img,
                             photometric="minisblack", planarconfig="contig")
    assert main(["preprocess", str(root / "images"), str(root / "store"), "--size", "12", "--channels", "native",
                 "--val-fraction", "0.3", "--workers", "1"]) == 0
    cfg = load_config(None, ["data.source=store", f"data.path={root / 'store'}", "train.epochs=1",
                             "train.batch_size=8", "train.eval_batch_size=8", "train.num_devices=1"])
    train_and_evaluate(cfg, root / "run", log=lambda _: None)
    return n, root


def test_a_native_run_predicts_evaluates_inspects_and_exports_its_own_files(native_run, capsys, tmp_path):
    from cnnpipe.runs.load import load_run

    n, root = native_run
    names = ["L"] if n == 1 else [f"S{i}" for i in range(n)]
    store = load_store(root / "store")
    assert store.meta["channel_names"] == names
    run = load_run(root / "run")
    # Run.prepare gives each stored file's row exactly (the one image path, tolerance 0)
    for split in store.splits:
        for rel, row in zip(store.sources(split), store.images(split)):
            np.testing.assert_array_equal(run.prepare(root / "images" / rel), row)
    files = sorted(str(p) for p in (root / "images").rglob("*.tif"))
    out = tmp_path / "p.csv"
    assert main(["predict", str(root / "run"), str(root / "images"), "--out", str(out), "--workers", "1"]) == 0
    rows = out.read_text().splitlines()[1:]
    assert len(rows) == 3 * len(files) and all(r.endswith(",") for r in rows)  # top-3 rows each, no error
    capsys.readouterr()
    assert main(["evaluate", str(root / "run"), "--data", str(root / "images")]) == 0
    assert "validation images" in capsys.readouterr().out
    assert main(["inspect", str(root / "run"), files[0], "--out", str(tmp_path / "insp")]) == 0
    page = json.loads((tmp_path / "insp" / "summary.json").read_text())
    assert page["images"][0]["planes"] == names
    assert main(["export", str(root / "run"), "--format", "stablehlo", "--out", str(tmp_path / "m.stablehlo")]) == 0
    facts = json.loads((tmp_path / "m.stablehlo.json").read_text())
    assert facts["planes"] == names and facts["channels"] == n
    assert ("keep the file's own planes" in facts["preparation"]) == (n != 1)
