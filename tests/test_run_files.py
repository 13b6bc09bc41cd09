"""A damaged file of a run directory: exit status 2 and one line naming it, never a traceback.

One tiny run (two epochs: checkpoints at steps 2 and 4) is trained once; each case damages
a copy and runs the CLI in this process.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnpipe.cli import main
from cnnpipe.config import load_config
from cnnpipe.training.train import train_and_evaluate

SETTINGS = ["data.size=[8,8]", "data.num_train=32", "data.num_val=16", "train.batch_size=16",
            "train.eval_batch_size=16", "train.epochs=2", "train.num_devices=1",
            "model=[{type: conv, filters: 2}, {type: flatten}]"]
LATEST = "4"  # 32 images in batches of 16: 2 steps an epoch
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run_files") / "run"
    train_and_evaluate(load_config(None, SETTINGS), run_dir, log=lambda _: None)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", LATEST]
    return run_dir


@pytest.fixture
def run(trained, tmp_path):
    """A fresh copy of the trained run, to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return path


def _garbage(path: Path, n: int = 64) -> None:
    rng = random.Random(path.name)
    path.write_bytes(bytes(rng.randrange(256) for _ in range(n)))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _argv(command: str, run: Path, image: Path, *more: str) -> list[str]:
    return {"evaluate": ["evaluate", str(run)],
            "predict": ["predict", str(run), str(image)],
            "inspect": ["inspect", str(run), str(image), "--out", str(run.parent / "inspect")],
            "worst": ["inspect", str(run), "--worst", "2"],
            "resume": ["train", "--resume", str(run)]}[command] + list(more)


def _one_error_line(argv: list[str], capfd, path: Path, *words: str) -> str:
    """Runs the CLI: exit status 2 and exactly one stderr line, naming `path`, holding `words`."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith(f"cnnpipe {argv[0]}: error: {path}"), line
    assert all(w in line for w in words) and " at 0x" not in line, line
    return line


CHECKPOINT_DAMAGE = {
    "every file random bytes": lambda step: [_garbage(p) for p in _files(step)],
    "every file truncated": lambda step: [p.write_bytes(b"") for p in _files(step)],
    "params folder deleted": lambda step: shutil.rmtree(step / "params"),
    "array data random bytes": lambda step: [_garbage(p) for p in _files(step / "params" / "ocdbt.process_0")],
}
INFERENCE = ["evaluate", "predict", "inspect", "worst"]


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
@pytest.mark.parametrize("command", INFERENCE + ["resume"])
def test_a_damaged_checkpoint_names_its_step_and_the_other_steps(run, image, capfd, command, damage):
    CHECKPOINT_DAMAGE[damage](run / "checkpoints" / LATEST)
    more = () if command == "resume" else ("--checkpoint", "latest")
    hint = "(move" if command == "resume" else "(pass --checkpoint STEP)"
    _one_error_line(_argv(command, run, image, *more), capfd, run / "checkpoints" / LATEST,
                    "corrupt checkpoint", "other saved steps: 2 ", hint)


def test_in_a_fresh_process_too_nothing_follows_the_line(run):
    """Reads abandoned by a failed restore finish on other threads, maybe only at exit."""
    CHECKPOINT_DAMAGE["array data random bytes"](run / "checkpoints" / LATEST)
    proc = subprocess.run([sys.executable, "-m", "cnnpipe.cli", "evaluate", str(run), "--checkpoint", "latest"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"cnnpipe evaluate: error: {run / 'checkpoints' / LATEST}: corrupt checkpoint")


@pytest.mark.parametrize("path, needle", [
    ("params/_METADATA", "params: not UTF-8 text"), ("params/manifest.ocdbt", "params: DATA_LOSS"),
    ("params/array_metadatas/process_0", "params: not UTF-8 text"),
    ("_CHECKPOINT_METADATA", "_CHECKPOINT_METADATA: not UTF-8 text")])
def test_damaged_orbax_metadata_names_the_item(run, image, capfd, path, needle):
    _garbage(run / "checkpoints" / LATEST / path)
    _one_error_line(_argv("evaluate", run, image, "--checkpoint", "latest"), capfd,
                    run / "checkpoints" / LATEST, "corrupt checkpoint", needle)


@pytest.mark.parametrize("damage, needle", [
    (lambda pos: shutil.rmtree(pos), "position: missing"),
    (lambda pos: _garbage(pos / "metadata"), "position: not UTF-8 text"),
    (lambda pos: (pos / "metadata").write_text('{"epoch": 1, "step": 4}'), "position: key 'rng' is missing"),
    (lambda pos: (pos / "metadata").write_text('{"epoch": "two", "step_in_epoch": 0, "step": 4, "rng": [0, 0], '
                                               '"rng_dtype": "uint32"}'), "position: not step counts"),
    (lambda pos: shutil.rmtree(pos.parent / "opt_state"), "opt_state: missing"),
], ids=["deleted", "random bytes", "no rng", "wrong type", "no opt_state"])
def test_resume_names_a_damaged_position_or_optimizer_state(run, capfd, damage, needle):
    damage(run / "checkpoints" / LATEST / "position")
    _one_error_line(["train", "--resume", str(run)], capfd, run / "checkpoints" / LATEST,
                    needle, f"move {run / 'checkpoints' / LATEST} away to resume from step 2")


@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_a_step_with_damaged_metrics_is_named(run, image, capfd, command):
    """`best` (the default) and training read every step's validation accuracy."""
    _garbage(run / "checkpoints" / "2" / "metrics" / "metrics")
    _one_error_line(_argv(command, run, image), capfd, run / "checkpoints" / "2", "metrics: not UTF-8 text",
                    f"other saved steps: {LATEST}")


def test_the_only_step_damaged_says_no_other_is_saved(run, image, capfd):
    shutil.rmtree(run / "checkpoints" / "2")
    shutil.rmtree(run / "checkpoints" / LATEST / "params")
    line = _one_error_line(_argv("predict", run, image), capfd, run / "checkpoints" / LATEST, "params: missing")
    assert line.endswith("no other step is saved")


def test_the_other_step_it_names_still_loads(run, image, capfd):
    for p in _files(run / "checkpoints" / LATEST):
        _garbage(p)
    assert main(_argv("predict", run, image, "--checkpoint", "2")) == 0
    assert capfd.readouterr().out.startswith(str(image))


CONFIG_DAMAGE = {
    "random bytes": (lambda p: _garbage(p), "cannot read config"),
    "invalid YAML": (lambda p: p.write_text("train: [1,\n"), "invalid YAML"),
    "not a mapping": (lambda p: p.write_text("- 1\n- 2\n"), "expected a mapping"),
    "invalid value": (lambda p: p.write_text(p.read_text().replace("epochs: 2", "epochs: -1")), "train.epochs: got -1"),
}


@pytest.mark.parametrize("damage", list(CONFIG_DAMAGE))
@pytest.mark.parametrize("command", INFERENCE + ["resume"])
def test_a_damaged_config_is_named(run, image, capfd, command, damage):
    write, needle = CONFIG_DAMAGE[damage]
    write(run / "config.yaml")
    _one_error_line(_argv(command, run, image), capfd, run / "config.yaml", needle)


DATASET_DAMAGE = {
    "random bytes": (lambda p: _garbage(p), "unreadable or corrupt"),
    "not JSON": (lambda p: p.write_text("{classes"), "unreadable or corrupt"),
    "not an object": (lambda p: p.write_text("[1, 2]"), "a JSON object expected"),
    "missing key": (lambda p: p.write_text('{"size": [8, 8]}'), "key 'classes' is missing"),
    "classes not a list": (lambda p: p.write_text(p.read_text().replace('"classes": [', '"classes": 5, "x": [')),
                           "'classes' is 5"),
    "size a string": (lambda p: p.write_text(p.read_text().replace('"size": [', '"size": "8x8", "x": [')),
                      "'size' is '8x8'"),
    "mean too short": (lambda p: p.write_text(p.read_text().replace('"mean": [', '"mean": [1], "x": [')),
                       "'mean' is [1]"),
}


@pytest.mark.parametrize("damage", list(DATASET_DAMAGE))
@pytest.mark.parametrize("command", INFERENCE)
def test_a_damaged_dataset_json_is_named(run, image, capfd, command, damage):
    write, needle = DATASET_DAMAGE[damage]
    write(run / "dataset.json")
    _one_error_line(_argv(command, run, image), capfd, run / "dataset.json", needle)


@pytest.mark.skipif(IS_ROOT, reason="root reads files whatever their mode")
@pytest.mark.parametrize("path, command", [("config.yaml", "evaluate"), ("dataset.json", "predict"),
                                           ("config.yaml", "resume"), (f"checkpoints/{LATEST}/params/_METADATA",
                                                                       "evaluate")])
def test_an_unreadable_file_is_named(run, image, capfd, path, command):
    (run / path).chmod(0)
    named = run / "checkpoints" / LATEST if path.startswith("checkpoints") else run / path
    more = ("--checkpoint", "latest") if command == "evaluate" else ()
    _one_error_line(_argv(command, run, image, *more), capfd, named)


@pytest.mark.parametrize("name, command", [("config.yaml", "evaluate"), ("config.yaml", "resume"),
                                           ("dataset.json", "predict")])
def test_a_read_refused_is_named(run, image, capfd, monkeypatch, name, command):
    """Simulated, so it runs as root too."""
    real = Path.read_text

    def refused(self, *args, **kwargs):
        if self == run / name:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refused)
    _one_error_line(_argv(command, run, image), capfd, run / name, "Permission denied")


def test_files_a_command_does_not_read_do_not_stop_it(run, image, capfd):
    _garbage(run / "summary.json")
    _garbage(run / "metrics.jsonl")
    _garbage(run / "checkpoints" / LATEST / "opt_state" / "_METADATA")  # inference restores no optimizer
    assert main(_argv("predict", run, image, "--checkpoint", "latest")) == 0


def test_resume_names_a_damaged_metrics_log(run, capfd):
    _garbage(run / "metrics.jsonl", 300)
    _one_error_line(["train", "--resume", str(run)], capfd, run / "metrics.jsonl")


def test_checkpoints_reopened_for_training_still_keep_the_best(tmp_path):
    """Steps' metrics are read after the manager opens (so a damaged one is named): the
    preservation policy must still see them, or resuming would delete the best checkpoint."""
    from flax import nnx

    from cnnpipe.config import OptimizerConfig
    from cnnpipe.models.cnn import build_model
    from cnnpipe.training import steps
    from cnnpipe.training.checkpoint import Checkpoints

    model = build_model([{"type": "conv", "filters": 2}, {"type": "flatten"}], in_channels=3, num_classes=2,
                        input_size=(4, 4), bit_depth=8, rngs=nnx.Rngs(0))
    _, state = steps.create_train_state(model, steps.make_optimizer(OptimizerConfig(), 10), 0)
    with Checkpoints(tmp_path / "ck", keep=1) as ck:
        ck.save(1, state, {"step": 1}, val_accuracy=0.9)
        ck.save(2, state, {"step": 2}, val_accuracy=0.1)
    with Checkpoints(tmp_path / "ck", keep=1) as ck:
        ck.save(3, state, {"step": 3}, val_accuracy=0.2)
        assert ck.steps() == [1, 3] and ck.best_step() == 1
