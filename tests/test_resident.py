"""Device-resident training data (cnnpipe.training.resident); its batches equal the host path's (test_train)."""

from __future__ import annotations

import numpy as np
import pytest

from cnnpipe.datasets.batches import epoch_order, train_batches
from cnnpipe.datasets.dataset import Split
from cnnpipe.training.mesh import make_mesh
from cnnpipe.training.resident import memory_budget, place_order, place_split, resident_decision


def test_auto_places_what_fits_and_true_false_decide():
    mesh = make_mesh(0)
    assert memory_budget(mesh.local_devices[0]) > 0   # a CPU host: its available memory
    assert resident_decision("auto", 10**6, mesh)[0]
    fits, why = resident_decision("auto", 10**15, mesh)
    assert not fits and "over 40% of the host's" in why
    assert resident_decision(True, 10**15, mesh) == (True, "data.on_device is true")
    assert resident_decision(False, 1, mesh) == (False, "data.on_device is false")


def test_the_device_order_gathers_the_host_batches():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 65535, (50, 3, 2, 5)).astype(np.uint16)
    labels = rng.integers(0, 4, 50).astype(np.int32)
    mesh = make_mesh(0)
    placed = place_split(images, labels, mesh)
    for sampler in ("shuffle", "balanced"):
        order = epoch_order(labels, 8, seed=3, epoch=2, sampler=sampler)
        assert order.shape == (6, 8)   # full batches only
        device_order = np.asarray(place_order(order, mesh))
        host = list(train_batches(Split(images, labels), 8, seed=3, epoch=2, sampler=sampler))
        for i, (x, y) in enumerate(host):
            np.testing.assert_array_equal(np.asarray(placed.images)[device_order[i]], x)
            np.testing.assert_array_equal(np.asarray(placed.labels)[device_order[i]], y)


def test_one_program_over_the_resident_split_evaluates_as_host_batches():
    from flax import nnx

    from cnnpipe.config import OptimizerConfig
    from cnnpipe.models.cnn import build_model
    from cnnpipe.training.metrics import evaluate_resident, evaluate_split
    from cnnpipe.training.resident import eval_order, place_eval
    from cnnpipe.training.steps import create_train_state, make_eval_step, make_optimizer, replicate

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 37).astype(np.int32)   # 37 rows: batches of 8, the last padded
    images = (rng.integers(0, 9000, (37, 6, 5, 2)) + 20000 * labels[:, None, None, None]).astype(np.uint16)
    model = build_model([{"type": "conv", "filters": 4, "kernel": 3}, {"type": "relu"}, {"type": "batch_norm"},
                         {"type": "global_avg_pool"}], in_channels=2, num_classes=3, input_size=(6, 5),
                        bit_depth=16, rngs=nnx.Rngs(0))
    mesh = make_mesh(0)
    graphdef, state = create_train_state(model, make_optimizer(OptimizerConfig(), 10), 0)
    state = replicate(mesh, state)
    order, mask = eval_order(37, 8)
    assert order.shape == (5, 8) and mask.sum() == 37 and order[-1].tolist() == [32, 33, 34, 35, 36, 36, 36, 36]
    host = evaluate_split(make_eval_step(graphdef, mesh), state, Split(images, labels), 8, mesh, 3)
    step = make_eval_step(graphdef, mesh, resident=True)
    device = evaluate_resident(step, state, place_eval(images, labels, 8, mesh), labels, 3)
    assert step.jitted._cache_size() == 1
    np.testing.assert_array_equal(device["predictions"], host["predictions"])
    np.testing.assert_array_equal(device["confusion"], host["confusion"])
    assert device["count"] == host["count"] == 37 and device["accuracy"] == host["accuracy"]
    assert device["loss"] == pytest.approx(host["loss"], rel=1e-6)
