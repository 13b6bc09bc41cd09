"""`cnnpipe train / evaluate / predict` from the command line: SIGKILL + resume, outputs, errors."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from cnnpipe.cli import build_parser, main
from cnnpipe.config import default_config_path, load_config
from cnnpipe.datasets.shapes import SHAPE_CLASSES, make_shapes
from cnnpipe.runs.load import load_run
from cnnpipe.training.train import train_and_evaluate

# 3 epochs x 6 steps, a checkpoint after every step: long enough to be killed mid-run
SETTINGS = ["data.size=[16,16]", "data.num_train=96", "data.num_val=40", "train.batch_size=16",
            "train.eval_batch_size=16", "train.epochs=3", "train.log_every_steps=3",
            "train.checkpoint_every_steps=1", "train.num_devices=1",
            "model=[{type: conv, filters: 4}, {type: relu}, {type: max_pool}, {type: flatten}]"]


def _set_args(settings):
    return [arg for s in settings for arg in ("--set", s)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An uninterrupted run of SETTINGS (in this process)."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    summary = train_and_evaluate(load_config(None, SETTINGS), run_dir, log=lambda _: None)
    return run_dir, summary


def _params(run_dir):
    return [np.asarray(x) for x in jax.tree.leaves(load_run(run_dir, "latest").state)]


def test_sigkill_mid_run_then_resume_finishes_identically(tmp_path):
    cmd = [sys.executable, "-m", "cnnpipe.cli", "train", *_set_args(SETTINGS)]
    # The reference runs through the CLI too: `cnnpipe train` sets XLA's CPU device count
    # and kernel flags, which this test process (one device, default flags) does not share,
    # and bit-identical parameters are only promised under the same flags.
    ref_dir = tmp_path / "reference"
    ref = subprocess.run([*cmd, "--workdir", str(ref_dir)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_summary = json.loads((ref_dir / "summary.json").read_text())
    # from another directory, no CONFIG: the packaged default config, run dir under ./runs
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    ckpt_root = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = [p for p in tmp_path.glob("runs/default-*/checkpoints/*") if p.name.isdigit()]
        if found:
            ckpt_root = found[0].parent
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert ckpt_root is not None, err.decode()[-2000:]
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    run_dir = ckpt_root.parent
    assert not (run_dir / "summary.json").exists()

    done = subprocess.run([sys.executable, "-m", "cnnpipe.cli", "train", "--resume", str(run_dir)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from checkpoint" in done.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 18 and summary["resumed"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "split" not in json.loads(line)]
    assert steps == [3, 6, 9, 12, 15, 18]  # every log step once: nothing lost, nothing twice
    for a, b in zip(_params(run_dir), _params(ref_dir)):
        np.testing.assert_array_equal(a, b)  # same parameters as the uninterrupted run
    assert summary["final_val_accuracy"] == ref_summary["final_val_accuracy"]


def test_train_without_arguments_reads_the_packaged_default():
    args = build_parser().parse_args(["train"])
    assert args.config is None and args.overrides == [] and args.resume is None
    assert default_config_path().is_file()
    assert load_config(None).data.source == "shapes"


def test_evaluate_prints_accuracy_per_class_and_confusion(run, capsys):
    run_dir, summary = run
    assert main(["evaluate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    acc = summary["best_val_accuracy"]  # evaluate uses the best checkpoint by default
    assert f"accuracy: {acc:.4f} ({round(acc * 40)}/40)" in out
    for name in SHAPE_CLASSES:
        assert f"\n  {name} " in out
    assert "confusion matrix" in out and "true \\ pred" in out
    # other data: the shapes generator with fewer validation images
    assert main(["evaluate", str(run_dir), "--data", "shapes", "--set", "data.num_val=20",
                 "--checkpoint", "latest"]) == 0
    assert "/20)" in capsys.readouterr().out


def test_predict_top_k_matches_the_model_and_writes_csv(run, tmp_path, capsys):
    run_dir, _ = run
    images, _ = make_shapes(3, size=(16, 16), seed=0, split="val")
    paths = []
    for i, img in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(img).save(paths[-1])
    out_csv = tmp_path / "preds.csv"
    assert main(["predict", str(run_dir), *paths, "--top-k", "2", "--out", str(out_csv)]) == 0
    assert "predicted 3 files, 0 failed" in capsys.readouterr().err
    assert main(["predict", str(run_dir), *paths, "--top-k", "2"]) == 0  # no --out: one line per file
    printed = capsys.readouterr().out.splitlines()
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 6 and rows[0].keys() == {"path", "rank", "class", "probability", "error"}
    model = load_run(run_dir).model()
    probs = np.asarray(jax.nn.softmax(model(images), -1))
    for i, path in enumerate(paths):
        mine = [r for r in rows if r["path"] == path]
        assert [r["rank"] for r in mine] == ["1", "2"]
        order = np.argsort(-probs[i])
        assert [r["class"] for r in mine] == [SHAPE_CLASSES[j] for j in order[:2]]
        assert float(mine[0]["probability"]) == pytest.approx(probs[i, order[0]], abs=1e-5)
        assert printed[i].startswith(f"{path}: {SHAPE_CLASSES[order[0]]} ")


def test_predict_refuses_16bit_image_for_8bit_run(run, tmp_path, capsys):
    import imagecodecs

    run_dir, _ = run
    images, _ = make_shapes(1, size=(16, 16), seed=0, split="val")
    big = tmp_path / "16bit.png"
    big.write_bytes(imagecodecs.png_encode(images[0].astype(np.uint16) * 257))
    assert main(["predict", str(run_dir), str(big)]) == 1  # a batch job: the file gets its reason, exit 1
    out = capsys.readouterr()
    assert out.out.startswith(f"{big}: error: {big}: 16-bit image") and "8-bit" in out.out
    assert "predicted 0 files, 1 failed" in out.err


def test_predict_resizes_like_the_training_data(run, tmp_path, capsys):
    from cnnpipe.images.transform import resize_image

    run_dir, _ = run
    img, _ = make_shapes(1, size=(40, 30), seed=2)
    Image.fromarray(img[0]).save(tmp_path / "big.png")
    small = resize_image(img[0], (16, 16), "crop")
    Image.fromarray(small).save(tmp_path / "small.png")
    assert main(["predict", str(run_dir), str(tmp_path / "big.png"), str(tmp_path / "small.png"),
                 "--top-k", "6"]) == 0
    big_line, small_line = capsys.readouterr().out.splitlines()
    assert big_line.split(": ", 1)[1] == small_line.split(": ", 1)[1]


def _one_error_line(capsys):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, needle", [
    (["train", "--set", "train.epochs=0"], "train.epochs"),
    (["train", "--set", "train.epoch=3"], "did you mean 'train.epochs'"),
    (["train", "no-such-config.yaml"], "no-such-config.yaml"),
    (["train", "--resume", "no-such-run"], "no-such-run"),
    (["train", "--resume", "RUN", "--set", "train.epochs=2"], "--resume"),
    (["evaluate", "RUN", "--set", "train.epochs=1"], "data.*"),
    (["evaluate", "RUN", "--set", "data.size=[12,12]"], "image size"),
    (["evaluate", "RUN", "--checkpoint", "sometime"], "--checkpoint"),
    (["predict", "RUN", "missing.png"], "missing.png"),
    (["predict", "RUN", "IMG", "--top-k", "0"], "--top-k"),
    (["evaluate", "EMPTY"], "no complete checkpoint"),
])
def test_cli_errors_are_one_line_and_exit_2(run, tmp_path, capsys, argv, needle):
    run_dir, _ = run
    empty = tmp_path / "empty_run"
    empty.mkdir()
    for name in ("config.yaml", "dataset.json"):
        (empty / name).write_bytes((run_dir / name).read_bytes())
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    subst = {"RUN": str(run_dir), "EMPTY": str(empty), "IMG": str(img)}
    assert main([subst.get(a, a) for a in argv]) == 2
    err = _one_error_line(capsys)
    assert needle in err
    if argv[-1] == "EMPTY":
        assert str(empty) in err
