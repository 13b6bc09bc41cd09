"""The training loop end to end on tiny data: run directory, exact resume, non-finite guard, sources."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from cnnpipe.config import load_config
from cnnpipe.datasets.shapes import SHAPE_CLASSES, make_shapes
from cnnpipe.runs.load import load_run
from cnnpipe.training import feed as feed_mod
from cnnpipe.training import steps as steps_mod
from cnnpipe.training.metrics import confusion_matrix
from cnnpipe.training.train import NonFiniteLossError, train_and_evaluate

# 96 train images / batch 16 = 6 steps per epoch; 40 val images = 3 eval batches, the last padded
TINY = ["data.size=[16,16]", "data.num_train=96", "data.num_val=40", "train.batch_size=16",
        "train.eval_batch_size=16", "train.epochs=2", "train.log_every_steps=2",
        "train.checkpoint_every_steps=4", "train.keep_checkpoints=10", "train.probe_feature_maps=true",
        "train.steps_per_dispatch=2",   # auto is 1 on a CPU (dispatch.max_chunk): the multi-step program on purpose
        "model=[{type: conv, filters: 4}, {type: relu}, {type: max_pool}, {type: flatten}]"]
# every augmentation, mixing and loss option at once: the resume test then shows they resume exactly
AUGMENTED = ["augment.flip=true", "augment.vflip=true", "augment.rot90=true", "augment.crop_padding=2",
             "augment.random_resized_crop={scale: [0.5, 1.0]}", "augment.brightness=0.2", "augment.contrast=0.2",
             "augment.gamma=0.2", "augment.noise=0.01", "augment.random_erasing=0.5", "augment.mixup=0.4",
             "augment.cutmix=1.0", "train.label_smoothing=0.1", "train.class_weights=auto",
             "train.sampler=balanced"]
# conv 3x3x3->4 (+bias) = 112; pool -> 8x8x4 = 256 features; dense 256->6 (+bias) = 1542
TINY_PARAMS = 112 + 1542


def tiny_cfg(*extra: str):
    return load_config(None, [*TINY, *AUGMENTED, *extra])


def plain_cfg(*extra: str):
    """TINY without augmentation: for tests of data sources and guards, where compiling every
    augmentation op (~5 s, and ~4 s more for plots/augment.png on a 2-core CPU) checks nothing."""
    return load_config(None, [*TINY, *extra])


def quiet(_: str) -> None:
    pass


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted tiny run; the step functions it built are kept to count compilations."""
    built: dict = {}

    def counted(kind, real):
        def make(*a, **k):
            fn = real(*a, **k)
            compile_now, calls = fn.compile, built.setdefault(f"{kind}_compiles", [])
            fn.compile = lambda *args: (calls.append(args), compile_now(*args))[1]
            return built.setdefault(kind, fn)
        return make

    mp = pytest.MonkeyPatch()
    mp.setattr(steps_mod, "make_train_step", counted("train", steps_mod.make_train_step))
    mp.setattr(steps_mod, "make_eval_step", counted("eval", steps_mod.make_eval_step))
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    lines: list[str] = []
    try:
        summary = train_and_evaluate(tiny_cfg(), run_dir, log=lines.append)
    finally:
        mp.undo()
    return run_dir, summary, built, lines


def test_run_directory_has_everything(finished):
    run_dir, summary, _, lines = finished
    for name in ("config.yaml", "dataset.json", "metrics.jsonl", "summary.json",
                 "plots/loss.png", "plots/accuracy.png", "plots/confusion_matrix.png", "plots/augment.png"):
        assert (run_dir / name).is_file(), name
    for png in (run_dir / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(p.name.startswith("events.out.tfevents") and p.stat().st_size
               for p in (run_dir / "tensorboard").iterdir())
    # the saved config round-trips, resolved: the data's own size and planes filled in
    assert load_config(run_dir / "config.yaml") == tiny_cfg("data.channels=rgb")
    info = json.loads((run_dir / "dataset.json").read_text())
    assert info["classes"] == list(SHAPE_CLASSES) and info["size"] == [16, 16] and info["channels"] == 3
    assert info["bit_depth"] == 8 and len(info["mean"]) == 3

    records = read_metrics(run_dir)
    train = [r for r in records if "split" not in r]
    val = [r for r in records if r.get("split") == "val"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
    assert [(r["step"], r["epoch"]) for r in val] == [(6, 1), (12, 2)]
    for r in train:
        assert set(r) == {"step", "epoch", "loss", "accuracy", "learning_rate", "images_per_sec"}
        assert np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1
        assert r["learning_rate"] == pytest.approx(0.001)

    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert summary["param_count"] == TINY_PARAMS
    assert any(f"{TINY_PARAMS:,} parameters" in line for line in lines)
    assert summary["final_val_accuracy"] == val[-1]["accuracy"]
    assert summary["best_val_accuracy"] == max(r["accuracy"] for r in val)
    for r in val:   # balanced accuracy: the mean recall over the classes with images
        recalls = [v for v in r["per_class_recall"].values() if v is not None]
        assert set(r["per_class_recall"]) == set(SHAPE_CLASSES) and r["balanced_accuracy"] == pytest.approx(
            np.mean(recalls))
    assert summary["balanced_accuracy"] == val[-1]["balanced_accuracy"] and summary["result_step"] == 12
    assert summary["early_stopping"] is None and summary["best_metric"] == "val_accuracy"
    weights = np.array(list(summary["class_weights"].values()))  # auto: inverse frequency, mean 1
    assert weights.mean() == pytest.approx(1.0) and any("class weights (auto" in line for line in lines)
    cm = np.array(summary["confusion_matrix"])
    assert cm.sum() == 40 and np.trace(cm) / 40 == pytest.approx(summary["final_val_accuracy"])
    for i, name in enumerate(SHAPE_CLASSES):
        if cm[i].sum():
            assert summary["per_class_accuracy"][name] == pytest.approx(cm[i, i] / cm[i].sum())
    assert summary["steps"] == 12 and summary["nonfinite_steps"] == 0
    assert summary["compile_seconds"] > 0 and summary["wall_seconds"] > summary["compile_seconds"]
    assert summary["train_images_per_sec"] > 0
    # saved every 4 steps inside an epoch and at each epoch end
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6, 8, 12]


def _event_tags(tb_dir) -> set[tuple[str, str]]:
    """(tag, kind) of every summary value in TensorBoard event files (TFRecord framing)."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = set()
    for path in tb_dir.iterdir():
        raw, i = path.read_bytes(), 0
        while i < len(raw):
            (n,) = struct.unpack("<Q", raw[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(raw[i + 12:i + 12 + n])
            i += 12 + n + 4
            tags |= {(v.tag, v.WhichOneof("value")) for v in event.summary.value}
    return tags


def test_tensorboard_scalars_and_probe_feature_maps(finished):
    tags = _event_tags(finished[0] / "tensorboard")
    for tag in ("train/loss", "train/accuracy", "train/learning_rate", "train/images_per_sec",
                "val/loss", "val/accuracy"):
        assert (tag, "simple_value") in tags
    assert {("feature_maps/conv1", "image"), ("feature_maps/pool1", "image")} <= tags


def test_each_step_function_compiles_once_per_run(finished):
    _, _, built, _ = finished
    # 12 train steps over two epochs and 6 eval batches (a padded one included): one program
    # each, compiled ahead of the first call; the jit path itself never compiles
    assert len(built["train_compiles"]) == 1 and len(built["eval_compiles"]) == 1
    assert built["train"].jitted._cache_size() == 0
    assert built["eval"].jitted._cache_size() == 0


def test_eval_matches_a_direct_forward_pass(finished):
    run_dir, summary, _, _ = finished
    run = load_run(run_dir, "latest")
    assert run.step == 12
    images, labels = make_shapes(40, size=(16, 16), seed=0, split="val")
    pred = np.asarray(jax.numpy.argmax(run.model()(images), -1))
    assert float(np.mean(pred == labels)) == pytest.approx(summary["final_val_accuracy"])
    np.testing.assert_array_equal(confusion_matrix(labels, pred, 6), np.array(summary["confusion_matrix"]))


def test_resume_continues_exactly(finished, tmp_path):
    run_dir, summary, _, _ = finished
    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    # as if killed after the mid-epoch checkpoint at step 8 (epoch 2, step 2), during the next save
    shutil.rmtree(copy / "checkpoints" / "12")
    partial = copy / "checkpoints" / "12.orbax-checkpoint-tmp-1234567"
    shutil.copytree(run_dir / "checkpoints" / "12", partial)
    for f in partial.rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    (copy / "summary.json").unlink()
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 14, "epo')  # a line cut short by the kill
    resumed = train_and_evaluate(tiny_cfg(), copy, resume=True, log=quiet)
    assert resumed["steps"] == 12 and resumed["final_val_accuracy"] == summary["final_val_accuracy"]
    a, b = load_run(run_dir, "latest"), load_run(copy, "latest")
    for x, y in zip(leaves(a.state), leaves(b.state)):
        np.testing.assert_array_equal(x, y)  # bit-identical on CPU: same batches, rng, optimizer state
    # same losses at the same steps: the data order continued exactly; nothing logged twice
    strip = lambda rs: [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rs]  # noqa: E731
    assert strip(read_metrics(copy)) == strip(read_metrics(run_dir))


def test_host_batches_train_exactly_as_device_resident_data(finished, tmp_path):
    run_dir, summary, _, lines = finished
    assert any("training data on the devices" in line and "up to 2 steps per call" in line for line in lines)
    host = train_and_evaluate(tiny_cfg("data.on_device=false"), tmp_path / "host", log=quiet)
    one = train_and_evaluate(tiny_cfg("train.steps_per_dispatch=1"), tmp_path / "one", log=quiet)
    assert host["final_val_loss"] == one["final_val_loss"]
    a, b, c = (load_run(d, "latest") for d in (tmp_path / "one", tmp_path / "host", run_dir))
    for x, y in zip(leaves(a.state), leaves(b.state)):
        np.testing.assert_array_equal(x, y)   # same batches, same augmentation draws, bit for bit on CPU
    strip = lambda rs: [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rs]  # noqa: E731
    assert strip(read_metrics(tmp_path / "host")) == strip(read_metrics(tmp_path / "one"))
    # two steps per call: one program loops over them; XLA fuses its body differently from the
    # one-step program, so the run is the same up to float rounding (test_dispatch: bit for bit
    # however the steps are split into calls)
    for x, y in zip(leaves(c.state), leaves(b.state)):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)
    assert summary["final_val_loss"] == pytest.approx(host["final_val_loss"], rel=1e-4)
    assert summary["final_val_accuracy"] == host["final_val_accuracy"]


def test_checkpoints_present_without_resume_is_an_error(finished):
    run_dir = finished[0]
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume"):
        train_and_evaluate(tiny_cfg(), run_dir, log=quiet)


def test_nonfinite_loss_is_skipped_logged_and_stops_after_n(tmp_path, monkeypatch):
    poison = {3, 7, 8, 9}  # global step numbers (1-based) whose batch is all NaN
    real = feed_mod.train_batches

    def poisoned(split, batch_size, *, seed, epoch, start_step=0, rows=slice(None), sampler="shuffle"):
        for i, (x, y) in enumerate(real(split, batch_size, seed=seed, epoch=epoch, start_step=start_step,
                                        rows=rows, sampler=sampler)):
            x = x.astype(np.float32)  # the model takes floats holding raw values too
            if epoch * 6 + start_step + i + 1 in poison:
                x[:] = np.inf   # NaN would be no data, filled by the model
            yield x, y

    monkeypatch.setattr(feed_mod, "train_batches", poisoned)
    run_dir = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError) as err:
        train_and_evaluate(plain_cfg("train.max_nonfinite_steps=3", "data.on_device=false"), run_dir, log=quiet)
    msg = str(err.value)
    assert "non-finite for 3 steps in a row (steps 7-9)" in msg
    assert f"Last good checkpoint: {run_dir / 'checkpoints' / '8'}" in msg
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if r.get("nonfinite")] == [3, 7, 8, 9]
    assert all(r["loss"] is None for r in records if r.get("nonfinite"))
    # the single NaN at step 3 did not stop the run (epoch 1 was evaluated), and skipped
    # steps leave the parameters alone: checkpoint 8 (after skipped 7, 8) equals checkpoint 6
    assert any(r.get("split") == "val" and r["step"] == 6 for r in records)
    s6, s8 = load_run(run_dir, "6").state, load_run(run_dir, "8").state
    for x, y in zip(leaves(s6.params), leaves(s8.params)):
        np.testing.assert_array_equal(x, y)
    assert all(np.isfinite(x).all() for x in leaves(s8.params))


def test_tfds_source_smoke(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = plain_cfg("data.source=tfds", "data.name=mnist", "train.epochs=1", f"data.cache_dir={tmp_path / 'cache'}")
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        summary = train_and_evaluate(cfg, tmp_path / "mnist", log=quiet)
    info = json.loads((tmp_path / "mnist" / "dataset.json").read_text())
    assert info["size"] == [16, 16] and info["channels"] == 1 and len(info["classes"]) == 10  # data.size=16x16
    assert summary["steps"] == 2 and 0 <= summary["final_val_accuracy"] <= 1
    assert sum(map(sum, summary["confusion_matrix"])) == 40


def _shapes_folder(root, per_class=16):
    images, labels = make_shapes(per_class * 8, size=(20, 20), seed=1)
    for k in (0, 1, 3):
        d = root / SHAPE_CLASSES[k]
        d.mkdir(parents=True)
        for i, img in enumerate(images[labels == k][:per_class]):
            Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def test_folder_and_store_sources_smoke(tmp_path):
    src = _shapes_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    extra = ["data.val_fraction=0.25", f"data.cache_dir={cache}", "train.epochs=1", "train.batch_size=8",
             "train.eval_batch_size=8"]
    summary = train_and_evaluate(plain_cfg("data.source=folder", f"data.path={src}", *extra),
                                 tmp_path / "folder_run", log=quiet)
    info = json.loads((tmp_path / "folder_run" / "dataset.json").read_text())
    assert info["classes"] == ["circle", "cross", "square"] and info["size"] == [16, 16]
    assert info["num_train"] + info["num_val"] == 48 and summary["steps"] == info["num_train"] // 8
    (store,) = list((cache / "folders").iterdir())  # the folder was preprocessed once, here
    summary = train_and_evaluate(plain_cfg("data.source=store", f"data.path={store}", *extra),
                                 tmp_path / "store_run", log=quiet)
    assert json.loads((tmp_path / "store_run" / "dataset.json").read_text())["classes"] == info["classes"]
    assert sum(map(sum, summary["confusion_matrix"])) == info["num_val"]
