"""`cnnpipe predict` at scale: files, folders and @lists, bad files reported, rows in input order."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cnnpipe.cli import main
from cnnpipe.datasets.shapes import make_shapes
from cnnpipe.datasets.workers import HANG_ENV, KILL_ENV
from cnnpipe.images.formats import display_path, path_from_display
from cnnpipe.runs.evaluate import evaluate_run
from cnnpipe.runs.load import load_run
from cnnpipe.runs.predict import predict_files

SETTINGS = ["data.size=[16,16]", "data.num_train=96", "data.num_val=32", "train.batch_size=16",
            "train.eval_batch_size=16", "train.epochs=1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    args = ["train", "--workdir", str(root / "run"), "--compile-cache", "off"]
    for s in SETTINGS:
        args += ["--set", s]
    assert main(args) == 0
    return root / "run"


@pytest.fixture
def folder(tmp_path):
    """photos/: 8 good 8-bit PNGs (one named in Latin-1, some in sub-folders), two bad files and a hidden one."""
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    images, _ = make_shapes(7, size=(20, 24), seed=3, split="val")
    good = []
    for i, img in enumerate(images):
        path = root / ("sub" if i % 2 else "") / ("deeper" if i == 5 else "") / f"img{i}.png"
        Image.fromarray(img).save(path)
        good.append(str(path))
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "empty.png").write_bytes(b"")
    (root / ".hidden.png").write_bytes(b"skipped: hidden")
    latin1 = os.path.join(os.fsencode(root), b"caf\xe9.png")
    Image.fromarray(images[0]).save(os.fsdecode(latin1))
    good.append(os.fsdecode(latin1))
    return root, sorted(good)


def _csv_rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_a_folder_with_bad_files_gives_every_file_once_with_the_single_file_probabilities(run_dir, folder, tmp_path,
                                                                                          capsys):
    root, good = folder
    missing = str(tmp_path / "missing.png")
    listing = tmp_path / "list.txt"
    listing.write_bytes(os.fsencode(good[0]) + b"\n# a comment\n\n" + os.fsencode(missing) + b"\n")
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(run_dir), str(root), f"@{listing}", "--out", str(out), "--workers", "2",
                 "--batch-size", "3", "--top-k", "6"]) == 1  # written, with failed files
    assert capsys.readouterr().err.splitlines()[-1].startswith("predicted 9 files, 3 failed")
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    paths = [path_from_display(r["path"]) for r in rows]
    walked = sorted(good + [str(root / "notes.txt"), str(root / "sub" / "empty.png")],
                    key=lambda p: (os.path.dirname(p) != str(root), p))
    assert sorted(paths) == sorted(walked + [good[0], missing])  # every input once, hidden files skipped
    run = load_run(run_dir)
    for row, path in zip(rows, paths):
        if path in good:
            assert row["error"] is None
            want = run.predict([path])[0]
            got = {p["class"]: p["probability"] for p in row["predictions"]}
            np.testing.assert_allclose([got[c] for c in run.classes], want, atol=1e-6)
        else:
            assert row["predictions"] == [] and display_path(path) in row["error"]


def test_csv_has_an_error_column_and_rows_in_input_order(run_dir, folder, tmp_path):
    root, good = folder
    files = [good[2], str(root / "notes.txt"), good[1]]
    out = tmp_path / "p.csv"
    assert main(["predict", str(run_dir), *files, "--out", str(out), "--workers", "1", "--top-k", "2"]) == 1
    rows = _csv_rows(out)
    assert [r["path"] for r in rows] == [good[2], good[2], str(root / "notes.txt"), good[1], good[1]]
    assert rows[2]["rank"] == "" and "not a recognised image" in rows[2]["error"]
    assert [r["rank"] for r in rows if not r["error"]] == ["1", "2", "1", "2"]


def test_pixels_are_the_training_pixels(run_dir, folder):
    from cnnpipe.datasets.convert import convert_file
    from cnnpipe.runs.load import spec_for_run

    run = load_run(run_dir)
    _, good = folder
    for path in good:
        np.testing.assert_array_equal(convert_file(path, False, spec_for_run(run.info)).pixels, run.prepare(path))


def test_python_api_predicts_paths_and_pixel_arrays_alike(run_dir, folder):
    import cnnpipe

    run = cnnpipe.load_run(run_dir, checkpoint="best")
    _, good = folder
    x = np.stack([run.prepare(p) for p in good])
    by_path, by_pixels = run.predict(good), run.predict(x, batch_size=4)
    assert by_path.shape == (len(good), len(run.classes))
    np.testing.assert_array_equal(by_path, by_pixels)
    np.testing.assert_allclose(by_path.sum(1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="raw pixels"):
        run.predict(x[:, :8])


def test_a_file_that_hangs_gets_a_timeout_row_and_the_rest_are_predicted(run_dir, folder, tmp_path):
    root, good = folder
    out = tmp_path / "p.csv"
    env = {**os.environ, HANG_ENV: "img3.png"}
    proc = subprocess.run([sys.executable, "-m", "cnnpipe.cli", "predict", str(run_dir), str(root), "--out", str(out),
                           "--workers", "2", "--top-k", "1", "--file-timeout", "2"], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr
    rows = _csv_rows(out)
    assert len(rows) == 10
    (hung,) = [r for r in rows if "img3.png" in r["path"]]
    assert "took longer than the file timeout of 2 s" in hung["error"]
    assert sum(1 for r in rows if not r["error"]) == len(good) - 1


def test_a_worker_that_dies_loses_no_row(run_dir, folder, tmp_path):
    root, good = folder
    out = tmp_path / "p.csv"
    env = {**os.environ, KILL_ENV: "img3.png"}
    proc = subprocess.run([sys.executable, "-m", "cnnpipe.cli", "predict", str(run_dir), str(root), "--out", str(out),
                           "--workers", "2", "--top-k", "1"], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr  # the output is complete; 3 files failed
    rows = _csv_rows(out)
    assert len(rows) == 10  # 8 good + 2 bad files, one row each (top-1)
    (died,) = [r for r in rows if "img3.png" in r["path"]]
    assert "killed by signal 9 (SIGKILL)" in died["error"]
    assert sum(1 for r in rows if not r["error"]) == len(good) - 1


@pytest.mark.parametrize("case", ["no_input", "bad_out", "empty_folder", "empty_list", "no_run"])
def test_nothing_to_do_is_one_line_exit_2(run_dir, folder, tmp_path, capsys, case):
    root, good = folder
    (tmp_path / "empty folder" / ".hidden").mkdir(parents=True)  # only hidden entries: no input file
    (tmp_path / "empty.txt").write_text("# nothing listed\n\n   # an indented comment\n")
    args = {"no_input": ["predict", str(run_dir), str(tmp_path / "nothing-here")],
            "bad_out": ["predict", str(run_dir), good[0], "--out", str(tmp_path / "no-dir" / "p.csv")],
            "empty_folder": ["predict", str(run_dir), str(tmp_path / "empty folder"), "--out",
                             str(tmp_path / "p.csv")],
            "empty_list": ["predict", str(run_dir), f"@{tmp_path / 'empty.txt'}", "--out", str(tmp_path / "p.csv")],
            "no_run": ["predict", str(tmp_path / "no-run"), good[0], "--out", str(tmp_path / "p.csv")]}[case]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    named = {"no_input": "nothing-here", "bad_out": "no-dir",
             "empty_folder": "empty folder: holds no file (hidden ones are skipped)",
             "empty_list": "empty.txt: lists no path", "no_run": "no-run"}[case]
    assert len(err.splitlines()) == 1 and named in err, err
    assert not (tmp_path / "p.csv").exists() and not list(tmp_path.glob("**/.p.csv.tmp*"))


@pytest.mark.parametrize("case", ["all_good", "some_failed", "all_failed"])
def test_exit_status_0_only_when_every_file_has_a_prediction(run_dir, folder, tmp_path, capsys, case):
    root, good = folder
    files = {"all_good": good[:2], "some_failed": [good[0], str(root / "notes.txt")],
             "all_failed": [str(root / "notes.txt"), str(root / "sub" / "empty.png")]}[case]
    out = tmp_path / "p.csv"
    assert main(["predict", str(run_dir), *files, "--out", str(out), "--workers", "1", "--top-k", "1"]) == (
        0 if case == "all_good" else 1)
    rows = _csv_rows(out)
    assert [path_from_display(r["path"]) for r in rows] == files  # every file has its row, in input order
    failed = {"all_good": 0, "some_failed": 1, "all_failed": 2}[case]
    assert sum(1 for r in rows if r["error"]) == failed
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"predicted {len(files) - failed} files, {failed} failed")


# ---------------------------------------------------------------- export

def _store_rows(run):
    """Validation rows of the run's own data, the pixels the model was evaluated on."""
    from cnnpipe.datasets.shapes import make_shapes

    images, _ = make_shapes(37, size=tuple(run.info["size"]), seed=5, split="val")
    return images.astype(np.float32)


@pytest.mark.parametrize("fmt", ["stablehlo", "onnx"])
def test_exported_model_gives_predicts_probabilities_at_batch_1_and_37(run_dir, tmp_path, capsys, fmt):
    run = load_run(run_dir)
    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(out)]) == 0
    info = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    assert info["classes"] == run.classes and info["size"] == [16, 16] and info["bit_depth"] == 8
    x = _store_rows(run)
    want = run.predict(x)
    if fmt == "stablehlo":
        from jax import export

        exported = export.deserialize(bytearray(out.read_bytes()))
        call = lambda a: np.asarray(exported.call(a))  # noqa: E731
    else:
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(out))
        name = session.get_inputs()[0].name
        call = lambda a: session.run(None, {name: a})[0]  # noqa: E731
    np.testing.assert_allclose(call(x), want, atol=1e-5)
    np.testing.assert_allclose(call(x[:1]), want[:1], atol=1e-5)


@pytest.mark.parametrize("preset", ["simple_cnn", "lenet5", "vgg_small", "resnet_small"])
def test_every_preset_exports_to_onnx_and_stablehlo(preset, tmp_path):
    import jax
    from flax import nnx
    from jax import export

    from cnnpipe.models.cnn import build_model
    from cnnpipe.runs.export import export_model

    ort = pytest.importorskip("onnxruntime")
    model = build_model(preset, in_channels=2, num_classes=3, input_size=(32, 32), bit_depth=16,
                        rngs=nnx.Rngs(0), mean=[1000.0, 2000.0], std=[300.0, 500.0])
    model.eval()
    x = np.random.default_rng(1).integers(0, 65536, (5, 32, 32, 2)).astype(np.float32)
    want = np.asarray(jax.nn.softmax(model(x), axis=-1))
    export_model(model, "stablehlo", tmp_path / "m.stablehlo")
    got = np.asarray(export.deserialize(bytearray((tmp_path / "m.stablehlo").read_bytes())).call(x))
    np.testing.assert_allclose(got, want, atol=1e-5)
    export_model(model, "onnx", tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_two_local_devices_give_the_one_device_probabilities(run_dir, folder, tmp_path):
    root, _ = folder
    outs = {}
    for devices in (1, 2):
        out = tmp_path / f"p{devices}.jsonl"
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        proc = subprocess.run([sys.executable, "-m", "cnnpipe.cli", "predict", str(run_dir), str(root), "--out",
                               str(out), "--workers", "1", "--batch-size", "3"], env=env, capture_output=True,
                              text=True, timeout=180)
        assert proc.returncode == 1, proc.stderr  # the folder's two bad files
        outs[devices] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["path"] for r in outs[1]] == [r["path"] for r in outs[2]]
    for a, b in zip(outs[1], outs[2]):
        np.testing.assert_allclose([p["probability"] for p in a["predictions"]],
                                   [p["probability"] for p in b["predictions"]], atol=1e-6)


def test_onnx_without_the_extra_names_it(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # as if not installed
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cnnpipe[export]" in err
    assert not (tmp_path / "m.onnx").exists()


def test_out_that_is_a_folder_a_device_or_a_link(run_dir, folder, tmp_path, capsys):
    import stat

    _, good = folder
    (tmp_path / "dir.csv").mkdir()
    assert main(["predict", str(run_dir), good[0], "--out", str(tmp_path / "dir.csv")]) == 2
    assert "dir.csv: is a folder" in capsys.readouterr().err and not list(tmp_path.glob(".*tmp*"))
    # a device is written to, never replaced by a file
    assert main(["predict", str(run_dir), good[0], "--out", "/dev/null"]) == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    # a symbolic link: its target gets the rows, the link stays a link
    target, link = tmp_path / "real.csv", tmp_path / "link.csv"
    target.write_text("old")
    link.symlink_to(target)
    assert main(["predict", str(run_dir), good[0], "--out", str(link)]) == 0
    assert link.is_symlink() and target.read_text().startswith("path,rank,class,probability,error")


def test_api_takes_one_path_and_lists_skip_blank_lines(run_dir, folder, tmp_path, capsys):
    from cnnpipe.runs.predict import expand_sources

    run = load_run(run_dir)
    _, good = folder
    np.testing.assert_array_equal(run.predict(good[0]), run.predict([good[0]]))
    listing = tmp_path / "l.txt"
    listing.write_bytes(b"   \r\n" + os.fsencode(good[1]) + b"\r\n\t\n")
    assert list(expand_sources([f"@{listing}"])) == [good[1]]


def test_tta_rows_are_the_mean_over_flipped_pixels_and_evaluate_agrees(run_dir, folder, tmp_path, capsys):
    root, good = folder
    run = load_run(run_dir)
    x = np.stack([run.prepare(good[0]), run.prepare(good[1])])
    # the run trained without flips: TTA has the image alone, so it changes nothing
    np.testing.assert_array_equal(run.predict(x, tta=True), run.predict(x))
    # as if it had trained with horizontal flips (the weights do not matter to what TTA averages)
    run.cfg = run.cfg.model_copy(update={"augment": run.cfg.augment.model_copy(update={"flip": True})})
    mean = (run.predict(x) + run.predict(x[:, :, ::-1])) / 2
    np.testing.assert_allclose(run.predict(x, tta=True), mean, atol=1e-6)
    rows = [list(predict_files(run, [good[0], str(root / "notes.txt"), good[1]], top_k=6, workers=1, tta=True))]
    rows = rows[0]
    assert [r.error is None for r in rows] == [True, False, True]   # a bad file is still its own row
    for row, want in zip([rows[0], rows[2]], mean):
        got = dict(row.top)
        np.testing.assert_allclose([got[c] for c in run.classes], want, atol=1e-6)
    result, ds = evaluate_run(run, tta=True)
    assert result["views"] == ("identity", "hflip")
    np.testing.assert_array_equal(result["predictions"], run.predict(ds.val.images, tta=True).argmax(-1))
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--tta"]) == 0
    text = capsys.readouterr().out
    assert "test-time augmentation over 1 view (the run trained without flips or rotations)" in text
    assert "balanced accuracy:" in text
