"""The jitted train/eval steps, optimizers and device sharding (cnnpipe.training.steps); augmentation: test_augment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cnnpipe.config import AugmentConfig, OptimizerConfig
from cnnpipe.models.cnn import build_model
from cnnpipe.training.steps import (
    create_train_state,
    make_eval_step,
    make_mesh,
    make_optimizer,
    make_schedule,
    make_train_step,
    replicate,
    resolve_precision,
    setup_cpu_devices,
    shard_batch,
    state_to_model,
)

TINY = [{"type": "conv", "filters": 4, "kernel": 3}, {"type": "relu"}, {"type": "max_pool"},
        {"type": "flatten"}, {"type": "dense", "units": 8}, {"type": "relu"}]
# batch norm after the activation: a conv bias right before batch norm has a zero gradient
# up to rounding, which Adam would blow up to full-size, device-count-dependent steps
TINY_BN = [{"type": "conv", "filters": 4, "kernel": 3}, {"type": "relu"}, {"type": "batch_norm"},
           {"type": "max_pool"}, {"type": "dropout", "rate": 0.25}, {"type": "global_avg_pool"}]


def batch(n=8, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).astype(np.int32)
    # class-dependent brightness, so a few steps learn something
    x = (rng.integers(0, 60, (n, 8, 8, 2)) + 90 * y[:, None, None, None]).astype(np.uint8)
    return x, y


def setup(layers=TINY, opt=None, total_steps=100, augment=None, seed=0):
    model = build_model(layers, in_channels=2, num_classes=3, input_size=(8, 8), bit_depth=8, rngs=nnx.Rngs(seed))
    tx = make_optimizer(opt or OptimizerConfig(learning_rate=0.01), total_steps)
    mesh = make_mesh(0)
    graphdef, state = create_train_state(model, tx, seed)
    state = replicate(mesh, state)
    return graphdef, state, tx, mesh, make_train_step(graphdef, tx, mesh, augment=augment)


def leaves(tree):
    return [np.asarray(v) for v in jax.tree.leaves(tree)]


# ---------------------------------------------------------------- the train step

def test_train_step_compiles_once_and_learns():
    graphdef, state, tx, mesh, step = setup()
    x, y = shard_batch(mesh, *batch())
    losses = []
    for i in range(3):
        x2, y2 = shard_batch(mesh, *batch(seed=i))   # new data, same shapes
        state, metrics = step(state, x2, y2)
        losses.append(float(metrics["loss"]))
    assert step.jitted._cache_size() == 1
    assert int(state.step) == 3
    for _ in range(20):
        state, metrics = step(state, x, y)
    assert step.jitted._cache_size() == 1
    assert float(metrics["loss"]) < losses[0]
    assert set(metrics) == {"loss", "accuracy", "grad_norm", "learning_rate", "nonfinite"}
    assert not bool(metrics["nonfinite"]) and float(metrics["learning_rate"]) == pytest.approx(0.01)


def test_compile_log_shows_one_compile(caplog):
    # the optax alias_test way: jax logs every compilation when log_compiles is on
    graphdef, state, tx, mesh, step = setup()
    x, y = shard_batch(mesh, *batch())
    with jax.log_compiles(True), caplog.at_level("WARNING", logger="jax"):
        for _ in range(3):
            state, metrics = step(state, x, y)
        jax.block_until_ready(metrics)
    compiles = [r for r in caplog.records if "Compiling" in r.getMessage() and "step" in r.getMessage()]
    assert len(compiles) == 1, [r.getMessage() for r in compiles]


def test_nan_skips_the_update_and_is_flagged():
    graphdef, state, tx, mesh, step = setup()
    x, y = batch()
    bad = x.astype(np.float32)
    bad[0, 0, 0, 0] = np.inf   # (NaN is no data, which the model fills; Inf is a broken input)
    xs, ys = shard_batch(mesh, bad, y)
    before = leaves((state.params, state.opt_state, state.model_state))
    state, metrics = step(state, xs, ys)
    assert bool(metrics["nonfinite"]) and not np.isfinite(float(metrics["loss"]))
    for a, b in zip(before, leaves((state.params, state.opt_state, state.model_state))):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 1   # the step counter still advances
    good = shard_batch(mesh, x.astype(np.float32), y)
    state, metrics = step(state, *good)
    assert not bool(metrics["nonfinite"])
    assert any(not np.array_equal(a, b) for a, b in zip(before[:2], leaves(state.params)[:2]))


def test_same_seed_identical_parameters():
    results = []
    for _ in range(2):
        graphdef, state, tx, mesh, step = setup(TINY_BN, augment=AugmentConfig(flip=True, crop_padding=2))
        x, y = shard_batch(mesh, *batch())
        for _ in range(3):
            state, _ = step(state, x, y)
        results.append(leaves((state.params, state.model_state)))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_batch_norm_statistics_update_and_dropout_runs():
    graphdef, state, tx, mesh, step = setup(TINY_BN)
    mean0 = leaves(state.model_state)
    x, y = shard_batch(mesh, *batch())
    state, metrics = step(state, x, y)
    assert np.isfinite(float(metrics["loss"]))
    assert any(not np.array_equal(a, b) for a, b in zip(mean0, leaves(state.model_state)))
    # eval mode: deterministic (no dropout), running statistics
    model = state_to_model(graphdef, state)
    np.testing.assert_array_equal(model(x), model(x))


def test_eval_step_masks_padding():
    graphdef, state, tx, mesh, step = setup()
    evaluate = make_eval_step(graphdef, mesh)
    x, y = batch(8, seed=3)
    ref = evaluate(state, *shard_batch(mesh, x, y, np.ones(8, np.float32)))
    # the same 5 real rows in two padded batches of 4 must give the same sums as unpadded rows 0..4
    xp = np.concatenate([x[:5], np.zeros((3, 8, 8, 2), np.uint8)])
    yp = np.concatenate([y[:5], np.zeros(3, np.int32)])
    mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
    out = evaluate(state, *shard_batch(mesh, xp, yp, mask))
    pred = np.asarray(ref["predictions"])
    loss_rows = optax.softmax_cross_entropy_with_integer_labels(
        state_to_model(graphdef, state)(x), y)
    assert float(out["count"]) == 5
    assert float(out["correct"]) == float(np.sum(pred[:5] == y[:5]))
    np.testing.assert_allclose(float(out["loss_sum"]), float(np.sum(loss_rows[:5])), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["predictions"])[:5], pred[:5])
    assert evaluate.jitted._cache_size() == 1


# ---------------------------------------------------------------- optimizers

def test_warmup_cosine_learning_rate_reported():
    opt = OptimizerConfig(name="adamw", learning_rate=0.1, schedule="warmup_cosine", warmup_steps=2,
                          weight_decay=1e-4)
    graphdef, state, tx, mesh, step = setup(opt=opt, total_steps=10)
    x, y = shard_batch(mesh, *batch())
    lrs = []
    for _ in range(7):
        state, metrics = step(state, x, y)
        lrs.append(float(metrics["learning_rate"]))
    # linear warmup 0 -> 0.1 over 2 steps, then cosine over the remaining 8 steps:
    # step 6 is halfway: 0.1 * (1 + cos(pi / 2)) / 2 = 0.05
    np.testing.assert_allclose(lrs[:3], [0.0, 0.05, 0.1], atol=1e-7)
    np.testing.assert_allclose(lrs[6], 0.05, atol=1e-7)
    sched = make_schedule(opt, 10)
    np.testing.assert_allclose(lrs, [float(sched(i)) for i in range(7)], atol=1e-7)


def test_constant_schedule_with_warmup():
    sched = make_schedule(OptimizerConfig(learning_rate=0.2, warmup_steps=4), 100)
    np.testing.assert_allclose([float(sched(i)) for i in (0, 2, 4, 50)], [0.0, 0.1, 0.2, 0.2], atol=1e-7)


def test_sgd_step_with_global_norm_clipping_is_exact():
    # plain SGD (momentum 0) with lr 1 and clip c moves the parameters by exactly c in global norm
    opt = OptimizerConfig(name="sgd", learning_rate=1.0, momentum=0.0, grad_clip=1e-3)
    graphdef, state, tx, mesh, step = setup(opt=opt)
    before = leaves(state.params)
    state, metrics = step(state, *shard_batch(mesh, *batch()))
    assert float(metrics["grad_norm"]) > 1e-3   # clipping was active
    delta = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(before, leaves(state.params))))
    np.testing.assert_allclose(delta, 1e-3, rtol=1e-4)


def test_adam_first_step_matches_optax_reference():
    graphdef, state, tx, mesh, step = setup(opt=OptimizerConfig(learning_rate=0.01))
    params0 = jax.tree.map(np.asarray, state.params)
    x, y = batch()

    @jax.jit
    def reference(params, rest):   # plain optax Adam on the plain loss gradient
        def loss(p):
            logits = nnx.merge(graphdef, p, rest, copy=True)(jnp.asarray(x))
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()
        g = jax.grad(loss)(params)
        ref_tx = optax.adam(0.01)
        updates, _ = ref_tx.update(g, ref_tx.init(g), params)
        return optax.apply_updates(params, updates)

    expected = reference(params0, state.model_state)
    state, _ = step(state, *shard_batch(mesh, x, y))
    for a, b in zip(leaves(expected), leaves(state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- devices and precision

def test_bf16_runs_on_every_backend_with_fp32_params_and_optimizer_state():
    model = build_model(TINY_BN, in_channels=2, num_classes=3, input_size=(8, 8), bit_depth=8, rngs=nnx.Rngs(0))
    tx = make_optimizer(OptimizerConfig(learning_rate=0.01), 100)
    mesh = make_mesh(0)
    graphdef, state = create_train_state(model, tx, 0)
    state = replicate(mesh, state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no silent fallback to fp32, on CPU included
        step = make_train_step(graphdef, tx, mesh, precision="bf16")
    x, y = shard_batch(mesh, *batch(16))
    # the compiled program really convolves in bf16 (not fp32 under a bf16 label)
    hlo = step.jitted.lower(state, x, y).as_text()
    assert any("convolution" in line and "bf16" in line for line in hlo.splitlines())
    losses = []
    for _ in range(15):
        state, metrics = step(state, x, y)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0]
    for tree in (state.params, state.opt_state, state.model_state):
        floats = [a for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)]
        assert floats and all(a.dtype == jnp.float32 for a in floats)
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="train.precision"):
        resolve_precision("fp16")


def test_setup_cpu_devices_is_a_no_op_once_jax_started(monkeypatch):
    jax.devices()
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert setup_cpu_devices(2) is False and "XLA_FLAGS" not in os.environ


def test_too_many_devices_is_an_error():
    with pytest.raises(ValueError, match=r"train.num_devices: got 99; this host has \d+"):
        make_mesh(99)


TWO_DEVICES = textwrap.dedent("""
    import json, sys
    import numpy as np, jax
    from flax import nnx
    from cnnpipe.config import AugmentConfig, OptimizerConfig, RandomResizedCropConfig
    from cnnpipe.models.cnn import build_model
    from cnnpipe.training.steps import *
    assert jax.device_count() == 2, jax.devices()
    # every augmentation and loss option: per-image draws must not depend on how the batch is split
    aug = AugmentConfig(flip=True, vflip=True, rot90=True, crop_padding=1, brightness=0.2, contrast=0.2,
                        gamma=0.2, noise=0.02, random_erasing=0.5, mixup=0.4, cutmix=1.0,
                        random_resized_crop=RandomResizedCropConfig(scale=(0.5, 1.0)))
    layers = %r
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 8).astype(np.int32)
    x = (rng.integers(0, 60, (8, 8, 8, 2)) + 90 * y[:, None, None, None]).astype(np.uint8)

    def run(n):
        model = build_model(layers, in_channels=2, num_classes=3, input_size=(8, 8), bit_depth=8,
                            rngs=nnx.Rngs(0))
        tx = make_optimizer(OptimizerConfig(learning_rate=0.01), 100)
        mesh = make_mesh(n)
        graphdef, state = create_train_state(model, tx, 0)
        state = replicate(mesh, state)
        step = make_train_step(graphdef, tx, mesh, augment=aug, class_weights=np.array([1.0, 2.0, 0.5]),
                               label_smoothing=0.1)
        xs, ys = shard_batch(mesh, x, y)
        for _ in range(4):
            state, m = step(state, xs, ys)
        ev = make_eval_step(graphdef, mesh)(state, *shard_batch(mesh, x, y, np.ones(8, np.float32)))
        return state, xs, float(ev["loss_sum"])

    s1, _, e1 = run(1)
    s2, xs2, e2 = run(2)
    # many calls queued without waiting: XLA:CPU's collectives could deadlock (see
    # steps._InFlightGuard); the process would abort after 40 s
    mesh2 = make_mesh(2)
    graphdef2 = create_train_state(build_model(layers, in_channels=2, num_classes=3, input_size=(8, 8),
                                               bit_depth=8, rngs=nnx.Rngs(0)), make_optimizer(
                                       OptimizerConfig(), 10), 0)[0]
    ev2 = make_eval_step(graphdef2, mesh2)
    batch2 = shard_batch(mesh2, x, y, np.ones(8, np.float32))
    jax.block_until_ready([ev2(s2, *batch2) for _ in range(300)])
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)))
    try:
        shard_batch(make_mesh(2), x[:7])
        err = None
    except ValueError as exc:
        err = str(exc)
    print(json.dumps({"diff": diff, "eval": [e1, e2], "error": err,
                      "shards": len(xs2.sharding.device_set)}))
""")


def test_two_simulated_devices_match_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", TWO_DEVICES % (TINY_BN,)], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shards"] == 2
    # batch-norm statistics are over the whole (global) batch in both cases, so only
    # float summation order differs
    assert out["diff"] < 1e-5
    np.testing.assert_allclose(out["eval"][0], out["eval"][1], rtol=1e-5)
    assert out["error"] == ("batch size (7) must be divisible by the number of devices (2); "
                            "pick a multiple of 2 or set train.num_devices")


def test_setup_cpu_devices_before_jax_starts():
    code = ("import os; from cnnpipe.training.steps import setup_cpu_devices; added = setup_cpu_devices(3); "
            "import jax; print(added, jax.device_count(), repr(os.environ['XLA_FLAGS']))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ("True 3 '--xla_force_host_platform_device_count=3 "
                                   "--xla_cpu_experimental_ynn_fusion_type='")
