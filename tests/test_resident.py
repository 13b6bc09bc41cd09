"""Device-resident training data (cnnpipe.training.resident); its batches equal the host path's (test_train)."""

from __future__ import annotations

import numpy as np

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
