"""Checkpoints as named items; inference restores without an optimizer; the earlier format still loads."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from cnnpipe.config import OptimizerConfig
from cnnpipe.models.cnn import build_model
from cnnpipe.training import steps
from cnnpipe.training.checkpoint import Checkpoints, NoCheckpointError

LAYERS = [{"type": "conv", "filters": 4}, {"type": "batch_norm"}, {"type": "relu"}, {"type": "max_pool"},
          {"type": "flatten"}]


def fresh(seed=0):
    model = build_model(LAYERS, in_channels=3, num_classes=5, input_size=(8, 8), bit_depth=8, rngs=nnx.Rngs(seed))
    tx = steps.make_optimizer(OptimizerConfig(), 100)
    return steps.create_train_state(model, tx, seed)


def trained():
    """A state whose every part differs from a fresh one: params, batch-norm statistics, Adam moments, step."""
    graphdef, state = fresh()
    tx = steps.make_optimizer(OptimizerConfig(), 100)
    step = steps.make_train_step(graphdef, tx, steps.make_mesh(1))
    x = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), np.uint8)
    for _ in range(3):
        state, _ = step(state, x, np.arange(4, dtype=np.int32))
    return state


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def same(a, b):
    la, lb = leaves(a), leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.mark.parametrize("asynchronous", [False, True])
def test_named_items_round_trip_and_inference_needs_no_optimizer(tmp_path, asynchronous):
    state = trained()
    with Checkpoints(tmp_path / "ck", asynchronous=asynchronous) as ck:
        ck.save(3, state, {"epoch": 1, "step_in_epoch": 0, "step": 3}, val_accuracy=0.5)
    assert {p.name for p in (tmp_path / "ck" / "3").iterdir()} >= {"params", "model_state", "opt_state", "position"}
    with Checkpoints(tmp_path / "ck", read_only=True) as ck:
        restored, position, step = ck.restore(fresh(seed=1)[1])
        assert step == 3 and position["epoch"] == 1 and position["step"] == 3
        assert same(restored, state) and int(restored.step) == 3
        # inference: an abstract model (no values, no optimizer) is enough to restore into
        abstract = nnx.eval_shape(lambda: build_model(LAYERS, in_channels=3, num_classes=5, input_size=(8, 8),
                                                      bit_depth=8, rngs=nnx.Rngs(0)))
        _, ms = steps.split_model(abstract)
        params, model_state, _ = ck.restore_model(ms.params, ms.model_state)
    assert same(params, state.params) and same(model_state, state.model_state)
    assert not same(state.model_state, fresh()[1].model_state)   # batch-norm statistics did change


def test_a_checkpoint_of_the_earlier_format_still_loads_both_ways(tmp_path):
    state = trained()
    # the earlier layout: every train-state leaf in one "state" item, numbered, plus "meta"
    flat = {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(state))}
    with ocp.CheckpointManager(tmp_path / "ck", item_names=("state", "meta")) as manager:
        manager.save(6, args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                                meta=ocp.args.JsonSave({"epoch": 2, "step_in_epoch": 0, "step": 6})))
    with Checkpoints(tmp_path / "ck", read_only=True) as ck:
        restored, meta, _ = ck.restore(fresh()[1])
        _, like = fresh()
        params, model_state, _ = ck.restore_model(like.params, like.model_state)
    assert same(restored, state) and meta["epoch"] == 2
    assert same(params, state.params) and same(model_state, state.model_state)


def test_a_checkpoint_of_another_model_is_refused_with_its_path(tmp_path):
    with Checkpoints(tmp_path / "ck") as ck:
        ck.save(1, trained(), {"step": 1})
    other = build_model([{"type": "conv", "filters": 6}, {"type": "flatten"}], in_channels=3, num_classes=5,
                        input_size=(8, 8), bit_depth=8, rngs=nnx.Rngs(0))
    _, like = steps.create_train_state(other, steps.make_optimizer(OptimizerConfig(), 100), 0)
    with Checkpoints(tmp_path / "ck", read_only=True) as ck, pytest.raises(ValueError, match=str(tmp_path / "ck" / "1")):
        ck.restore_model(like.params, like.model_state)
    with pytest.raises(NoCheckpointError, match="no checkpoints folder"):
        Checkpoints(tmp_path / "none", read_only=True)


def test_a_run_trained_on_two_devices_is_evaluated_in_a_one_device_process(tmp_path):
    """`cnnpipe train` on 2 CPU devices; this test process has 1: the model must still load."""
    import json
    import subprocess
    import sys

    from cnnpipe.runs.evaluate import evaluate_run
    from cnnpipe.runs.load import load_run

    settings = ["data.size=[16,16]", "data.num_train=64", "data.num_val=32", "train.batch_size=16",
                "train.eval_batch_size=16", "train.epochs=1", "train.num_devices=2",
                "model=[{type: conv, filters: 4}, {type: batch_norm}, {type: relu}, {type: flatten}]"]
    cmd = [sys.executable, "-m", "cnnpipe.cli", "train", "--workdir", str(tmp_path / "run"),
           *[a for s in settings for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["devices"] == 2 and len(jax.local_devices()) == 1
    result, _ = evaluate_run(load_run(tmp_path / "run"))
    assert result["accuracy"] == summary["final_val_accuracy"]
