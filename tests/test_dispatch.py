"""Several train steps per call (cnnpipe.training.dispatch): the same steps as one per call, bit for bit."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from cnnpipe.config import AugmentConfig, OptimizerConfig
from cnnpipe.datasets.batches import epoch_order
from cnnpipe.models.cnn import build_model
from cnnpipe.training.dispatch import TARGET_SECONDS, Chunks, describe, max_chunk
from cnnpipe.training.resident import place_order, place_split
from cnnpipe.training.steps import create_train_state, make_mesh, make_optimizer, make_train_step, replicate

LAYERS = [{"type": "conv", "filters": 4, "kernel": 3}, {"type": "relu"}, {"type": "batch_norm"},
          {"type": "max_pool"}, {"type": "dropout", "rate": 0.25}, {"type": "global_avg_pool"}]


@functools.lru_cache(maxsize=None)
def _setup(k: int, augment: AugmentConfig):
    """(train step running up to `k` steps per call, the initial state on the host, mesh); built once."""
    model = build_model(LAYERS, in_channels=2, num_classes=3, input_size=(8, 8), bit_depth=16, rngs=nnx.Rngs(0))
    tx = make_optimizer(OptimizerConfig(learning_rate=0.01), 100)
    mesh = make_mesh(0)
    graphdef, state = create_train_state(model, tx, 0)
    step = make_train_step(graphdef, tx, mesh, augment=augment, resident=True, steps_per_dispatch=k,
                           label_smoothing=0.1)
    return step, jax.device_get(state), mesh


def _run(k: int, chunks: list[int], augment: AugmentConfig, x: np.ndarray, y: np.ndarray):
    """Train one epoch of 8 steps in calls of `chunks` steps; (final state, metrics of every step, the step)."""
    step, initial, mesh = _setup(k, augment)
    state = replicate(mesh, initial)   # a fresh copy: the step donates it
    split = place_split(x, y, mesh)
    order = place_order(epoch_order(y, 8, seed=0, epoch=0), mesh)
    metrics, start = [], 0
    for n in chunks:
        if k == 1:
            state, m = step(state, split.images, split.labels, order, np.int32(start))
            metrics.append(jax.device_get(m))
        else:
            state, m = step(state, split.images, split.labels, order, np.int32(start), np.int32(n))
            m = jax.device_get(m)
            metrics += [{key: v[j] for key, v in m.items()} for j in range(n)]
            assert all(not np.any(v[n:]) for v in m.values())   # past n: untouched zeros
        start += n
    return state, metrics, step


def _same(a, b):
    return {k: np.asarray(v).tolist() for k, v in a.items()} == {k: np.asarray(v).tolist() for k, v in b.items()}


@pytest.mark.parametrize("augment", [AugmentConfig(), AugmentConfig(flip=True, crop_padding=2, brightness=0.2,
                                                                      random_erasing=0.5, mixup=0.4)])
def test_how_steps_are_split_into_calls_changes_nothing(augment):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 64).astype(np.int32)
    x = (rng.integers(0, 4000, (64, 8, 8, 2)) + 20000 * y[:, None, None, None]).astype(np.uint16)
    ref, m_ref, _ = _run(8, [1] * 8, augment, x, y)
    for chunks in ([5, 3], [1, 2, 4, 1], [8]):
        many, m, step = _run(8, chunks, augment, x, y)
        assert step.jitted._cache_size() == 1   # one program for every chunk length
        assert int(many.step) == 8
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(many)):   # every step runs the same loop body:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # bit for bit, so resume is exact
        assert all(_same(a, b) for a, b in zip(m_ref, m))
    # the one-step program is compiled on its own: XLA fuses it differently, equal up to float rounding
    one, m_one, _ = _run(1, [1] * 8, augment, x, y)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert [bool(m["nonfinite"]) for m in m_one] == [bool(m["nonfinite"]) for m in m_ref] == [False] * 8
    np.testing.assert_allclose([m["loss"] for m in m_one], [m["loss"] for m in m_ref], rtol=1e-5)


def test_max_chunk_stops_at_every_event_and_host_batches_take_one():
    assert max_chunk("auto", False, 100, 20, 0) == 1
    assert max_chunk("auto", True, 100, 20, 0) == 20
    assert max_chunk("auto", True, 100, 50, 7) == 7
    assert max_chunk("auto", True, 6, 20, 0) == 6
    assert max_chunk(4, True, 100, 20, 0) == 4
    assert max_chunk(64, True, 100, 20, 0) == 20
    assert max_chunk("auto", True, 100, 20, 0, "cpu") == 1   # XLA:CPU: conv gradients in a loop are slow
    assert max_chunk(4, True, 100, 20, 0, "cpu") == 4        # asked for: done


def test_auto_chunks_ramp_up_then_follow_the_step_time():
    c = Chunks(20, auto=True)
    assert [c.next(20 - s) for s in (0, 1, 3)] == [1, 2, 4]
    assert c.next(3) == 3              # the next event comes first
    assert c.next(20) == 8             # the ramp continues from the longest call
    c.measured(10, 10 * TARGET_SECONDS / 5)   # 5 steps make TARGET_SECONDS
    assert c.next(20) == 5
    c.measured(10, 10.0)               # slow steps: one per call
    assert c.next(20) == 1
    fixed = Chunks(6, auto=False)
    assert [fixed.next(t) for t in (20, 20, 4)] == [6, 6, 4]


def test_the_log_says_when_an_explicit_count_is_capped_or_does_not_apply():
    assert describe("auto", 1, True, "cpu") == ""
    assert describe("auto", 20, True, "gpu") == "; up to 20 steps per call"
    assert describe(4, 1, False, "gpu") == "; train.steps_per_dispatch 4 does not apply to host batches (one step per call)"
    assert describe(4, 1, True, "gpu").startswith("; one step per call (train.steps_per_dispatch 4, capped by the log")
    assert describe(100, 3, True, "gpu").startswith("; up to 3 steps per call (train.steps_per_dispatch 100, capped")
    assert "XLA:CPU" in describe(2, 2, True, "cpu")


def test_several_steps_per_call_on_two_devices_match_one_device():
    """The loop body's all-reduce on a 2-device CPU mesh (one call in flight, `dispatch.InFlightGuard`)."""
    code = (f"import sys, json, numpy as np, jax; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from test_dispatch import _run\nfrom cnnpipe.config import AugmentConfig\n"
            "rng = np.random.default_rng(0)\ny = rng.integers(0, 3, 64).astype(np.int32)\n"
            "x = (rng.integers(0, 4000, (64, 8, 8, 2)) + 20000 * y[:, None, None, None]).astype(np.uint16)\n"
            "st, m, _ = _run(8, [3, 5], AugmentConfig(flip=True, crop_padding=2, mixup=0.4), x, y)\n"
            "print(json.dumps({'devices': len(jax.devices()), 'loss': [float(v['loss']) for v in m],\n"
            "  'params': [np.asarray(a).ravel().tolist() for a in jax.tree.leaves(st.params)]}))\n")
    runs = []
    for count in (1, 2):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}", JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert [r["devices"] for r in runs] == [1, 2]
    np.testing.assert_allclose(runs[0]["loss"], runs[1]["loss"], rtol=1e-5)
    for a, b in zip(runs[0]["params"], runs[1]["params"]):   # only float summation order differs
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
