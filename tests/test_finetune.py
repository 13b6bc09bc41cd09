"""Fine-tuning through configs: timm weights on 3-plane 8-bit and 5-plane 16-bit data, freezing,
the learning-rate split, transfer from an earlier run, and the run tools on the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_native_planes import write_folder

from cnnpipe import backbones
from cnnpipe.cli import main
from cnnpipe.config import ConfigError, config_from_dict
from cnnpipe.runs.load import load_run
from cnnpipe.training.train import train_and_evaluate

FIXTURE = Path(__file__).parent / "fixtures" / "timm" / "test_resnet.safetensors"
QUIET = {"num_devices": 1, "log_every_steps": 1000}


def _flat(model) -> dict:
    from flax import nnx

    return {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """test_resnet from timm weights on shapes (3 planes, 8-bit): 1 frozen epoch, then 1 at half the rate."""
    root = tmp_path_factory.mktemp("ft")
    cfg = config_from_dict({"model": "test_resnet", "data": {"source": "shapes", "num_train": 128, "num_val": 64},
                            "pretrained": {"weights": str(FIXTURE), "freeze_epochs": 1, "backbone_lr_scale": 0.5},
                            "train": {"epochs": 2, "batch_size": 32, "eval_batch_size": 64, **QUIET}})
    lines: list[str] = []
    train_and_evaluate(cfg, root / "run", log=lines.append)
    return root / "run", lines


def test_freezing_changes_only_the_head_then_the_backbone_trains(frozen_run):
    run_dir, lines = frozen_run
    assert any("head alone for 1 epoch(s), then the backbone too; backbone at 0.5x the learning rate" in ln
               for ln in lines)
    start = _flat(backbones.load("test_resnet", FIXTURE, num_classes=6))
    epoch1, epoch2 = (_flat(load_run(run_dir, str(step)).model()) for step in (4, 8))
    head = [p for p in start if p[:2] == ("layers", 6)]
    body = [p for p in start if p[:2] != ("layers", 6)]
    assert len(body) > 50 and len(head) == 2
    for p in body:   # weights and batch-norm statistics exactly as loaded
        np.testing.assert_array_equal(epoch1[p], start[p], err_msg=str(p))
    assert all(not np.array_equal(epoch1[p], epoch2[p]) for p in head)
    moved = [p for p in body if not np.array_equal(epoch1[p], epoch2[p])]
    assert len(moved) == len(body)   # every backbone weight and statistic trains after the freeze


def test_the_run_records_the_weights_normalisation(frozen_run):
    run_dir, _ = frozen_run
    info = json.loads((run_dir / "dataset.json").read_text())
    norm = info["normalization"]
    # timm's test_resnet weights use (0.5, 0.5, 0.5) for both (its pretrained_cfg); resnet18's are ImageNet's
    assert norm["from"].startswith("weights: the pretrained weights' RGB mean/std (timm's test_resnet default)")
    np.testing.assert_allclose(norm["mean"], [127.5] * 3)
    np.testing.assert_allclose(norm["std"], [127.5] * 3)
    assert load_run(run_dir).model().mean == tuple(norm["mean"])


def test_a_five_plane_16bit_store_fine_tunes_and_the_run_tools_work(tmp_path, capsys):
    folder = write_folder(tmp_path / "images", per_class=8)
    assert main(["preprocess", str(folder), str(tmp_path / "store"), "--size", "16", "--channels", "native",
                 "--val-fraction", "0.25", "--workers", "1"]) == 0
    cfg = config_from_dict({"model": "test_resnet", "data": {"source": "store", "path": str(tmp_path / "store")},
                            "pretrained": {"weights": str(FIXTURE)},
                            "train": {"epochs": 1, "batch_size": 6, "eval_batch_size": 6, **QUIET}})
    train_and_evaluate(cfg, tmp_path / "run", log=lambda _: None)
    run = load_run(tmp_path / "run")
    model = run.model()
    assert model.in_channels == 5 and model.bit_depth == 16
    assert json.loads((tmp_path / "run" / "dataset.json").read_text())["normalization"]["from"].startswith("data")
    capsys.readouterr()
    files = sorted(str(p) for p in folder.rglob("*.tif"))[:4]
    assert main(["evaluate", str(tmp_path / "run")]) == 0
    assert main(["predict", str(tmp_path / "run"), *files, "--out", str(tmp_path / "p.csv")]) == 0
    assert main(["inspect", str(tmp_path / "run"), files[0], "--out", str(tmp_path / "insp")]) == 0
    report = json.loads((tmp_path / "insp" / "summary.json").read_text())
    assert "layer4" in json.dumps(report)   # Grad-CAM and feature maps at the stages
    assert main(["export", str(tmp_path / "run"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    import onnxruntime as ort

    x = np.stack([run.prepare(f) for f in files[:2]])
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    onnx_probs = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]
    np.testing.assert_allclose(onnx_probs, run.predict(x), atol=1e-5)


def test_an_earlier_run_beats_scratch_on_related_data(tmp_path):
    """Source: 1000 8-bit shapes, 3 epochs. Target: 60 fresh 16-bit shapes, 5 epochs, 400 held out; 24x24
    pixels (32x32 gives the same margin in 1.5x the time). Measured: scratch 0.19, from the run 0.57
    (scripts/transfer_experiment.py at full size, 3000 images and 4 epochs at 32x32: 0.190 vs 0.815)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from transfer_experiment import run

    acc = run("test_resnet", 1000, 3, 60, 5, tmp_path, size=24)
    assert acc["transfer"] > acc["scratch"] + 0.3, acc


def test_bad_pretrained_settings_are_one_line_errors(tmp_path, frozen_run, capsys):
    run_dir, _ = frozen_run
    base = {"data": {"source": "shapes", "num_train": 32, "num_val": 32},
            "train": {"epochs": 1, "batch_size": 16, "eval_batch_size": 32, **QUIET}}
    cases = [
        ({"model": "simple_cnn", "pretrained": {"weights": str(FIXTURE)}}, "needs a backbone model"),
        ({"model": "simple_cnn", "pretrained": {"weights": str(run_dir)}}, "transfer needs the same architecture"),
        ({"model": "test_resnet", "pretrained": {"weights": str(tmp_path)}}, "not a cnnpipe run directory"),
        ({"model": "test_convnext", "pretrained": {"weights": str(FIXTURE)}}, "key 'stem.0.weight' is missing"),
        ({"model": "test_resnet", "pretrained": {"weights": str(tmp_path / "w.safetensors")}}, "not found"),
    ]
    for i, (extra, message) in enumerate(cases):
        with pytest.raises((ConfigError, ValueError), match=message):
            train_and_evaluate(config_from_dict({**base, **extra}), tmp_path / f"r{i}", log=lambda _: None)
    (tmp_path / "c.yaml").write_text(f"model: simple_cnn\npretrained: {{weights: {FIXTURE}}}\n")
    assert main(["train", str(tmp_path / "c.yaml"), "--workdir", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs a backbone model" in err
