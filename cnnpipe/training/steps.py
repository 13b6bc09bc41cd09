"""Optimizer, train state, the one jitted train step and the eval step.

The train step follows the flax performance guide and big_vision: the model is split
once into a static graphdef and array state; the step is a pure function of
(`TrainState`, images, labels) under `jax.jit(donate_argnums=0)`, with `nnx.merge`
inside, so the whole run compiles it once. The batch is sharded over the mesh axis
"data" and the state is replicated (data parallel over every local device).

Devices, the mesh and placement live in `cnnpipe.training.mesh` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnnpipe.config import AugmentConfig, OptimizerConfig
from cnnpipe.models.cnn import CNN
from cnnpipe.tasks import Task
from cnnpipe.training.augment import apply_view, augment_batch
from cnnpipe.training.dispatch import InFlightGuard, ahead_of_time, jit_train_step, take_rows
from cnnpipe.training.loss import mix_batch, mix_like, soft_targets, weighted_cross_entropy
from cnnpipe.training.mesh import (
    DATA_AXIS,
    batch_spec,
    check_divisible,
    make_mesh,
    process_rows,
    replicate,
    setup_cpu_devices,
    shard_batch,
    usable_cores,
)

__all__ = ["TrainState", "ModelState", "split_model", "abstract_train_state", "make_optimizer", "make_schedule",
           "make_mesh", "check_divisible", "create_train_state", "make_train_step", "make_eval_step",
           "state_to_model", "forward", "predict_probs", "augmented_inputs", "shard_batch", "replicate", "batch_spec",
           "setup_cpu_devices", "usable_cores", "resolve_precision", "process_rows", "train_forward",
           "update_state", "learning_rate_of", "over_batches", "wrap_train_step", "wrap_eval_step"]


# ---------------------------------------------------------------- optimizer

def make_schedule(opt: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer step: constant (after optional linear warmup) or warmup-cosine to 0."""
    lr, warm = float(opt.learning_rate), int(opt.warmup_steps)
    if opt.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(int(total_steps), warm + 1), 0.0)
    if warm > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])
    return optax.constant_schedule(lr)


def make_optimizer(opt: OptimizerConfig, total_steps: int, *, head: Any = None, backbone_lr_scale: float = 1.0,
                   freeze_steps: int = 0) -> optax.GradientTransformation:
    """optax transformation from the config: Adam (default), AdamW or SGD with momentum.

    Global-norm clipping runs first when `grad_clip` is set. For adam and sgd a nonzero
    `weight_decay` is classic L2 (added to the gradient); adamw decouples it. The
    learning rate is an injected hyperparameter, so the train step can report it.

    `head` (a tree of bools shaped like the params, True for the classifier head) splits
    the optimizer in two for fine-tuning: the head at the configured rate, the backbone
    at `backbone_lr_scale` times it, each with its own state ({"head", "backbone"}), so
    the backbone's Adam moments and bias correction start when it starts training.
    Its schedule is the head's shifted by `freeze_steps` (the steps the frozen train
    step leaves it untouched), so both follow one curve over the run.
    """
    def build(learning_rate: Any, clip: bool = True) -> optax.GradientTransformation:
        parts = [] if opt.grad_clip is None or not clip else [optax.clip_by_global_norm(float(opt.grad_clip))]
        wd = float(opt.weight_decay)
        if opt.name == "adamw":
            parts.append(optax.adamw(learning_rate, weight_decay=wd))
        else:
            if wd > 0:
                parts.append(optax.add_decayed_weights(wd))
            parts.append(optax.adam(learning_rate) if opt.name == "adam"
                         else optax.sgd(learning_rate, momentum=float(opt.momentum) or None))
        return optax.chain(*parts)

    schedule = make_schedule(opt, total_steps)
    if head is None:
        return optax.inject_hyperparams(build)(learning_rate=schedule)
    scale, shift = float(backbone_lr_scale), int(freeze_steps)
    head_tx = optax.masked(optax.inject_hyperparams(build, static_args="clip")(learning_rate=schedule, clip=False),
                           head)
    body_tx = optax.masked(optax.inject_hyperparams(build, static_args="clip")(
        learning_rate=lambda count: scale * schedule(count + shift), clip=False), jax.tree.map(lambda m: not m, head))
    clip = None if opt.grad_clip is None else optax.clip_by_global_norm(float(opt.grad_clip))

    def init(params: Any) -> dict[str, Any]:
        return {"head": head_tx.init(params), "backbone": body_tx.init(params)}

    def update(grads: Any, state: dict[str, Any], params: Any = None) -> tuple[Any, dict[str, Any]]:
        if clip is not None:   # one global norm over head and backbone, as without the split
            grads, _ = clip.update(grads, optax.EmptyState())
        head_updates, head_state = head_tx.update(grads, state["head"], params)
        body_updates, body_state = body_tx.update(grads, state["backbone"], params)
        updates = jax.tree.map(lambda m, a, b: a if m else b, head, head_updates, body_updates)
        return updates, {"head": head_state, "backbone": body_state}

    return optax.GradientTransformation(init, update)


def learning_rate_of(opt_state: Any) -> jax.Array:
    """The (head's) learning rate of this step, from the injected hyperparameters."""
    if isinstance(opt_state, dict):
        opt_state = opt_state["head"].inner_state
    hyper = getattr(opt_state, "hyperparams", {})
    return jnp.asarray(hyper.get("learning_rate", jnp.nan), jnp.float32)


# ---------------------------------------------------------------- state

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (no graphdef).

    params: trainable `nnx.Param` state; model_state: the rest (batch-norm statistics);
    opt_state: optax state; step: int32 scalar, steps taken (skipped ones included);
    rng: raw uint32[2] key, folded with `step` for augmentation and dropout.
    """
    params: Any
    model_state: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelState:
    """What inference needs of a `TrainState`: the parameters and the model's other state."""
    params: Any
    model_state: Any


def split_model(model: CNN) -> tuple[Any, ModelState]:
    """Split `model` once (in train mode: the graphdef the train step merges) into graphdef and state."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, ModelState(params=params, model_state=rest)


def create_train_state(model: CNN, tx: optax.GradientTransformation, seed: int) -> tuple[Any, TrainState]:
    """Split `model` once (in train mode) into a graphdef and a fresh `TrainState`."""
    graphdef, ms = split_model(model)
    state = TrainState(params=ms.params, model_state=ms.model_state, opt_state=tx.init(ms.params),
                       step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(seed))
    return graphdef, state


def abstract_train_state(model: CNN, tx: optax.GradientTransformation, mesh: Mesh) -> tuple[Any, TrainState]:
    """(graphdef, a `TrainState` of `jax.ShapeDtypeStruct`s placed as `replicate` places the real one).

    `model` may be abstract (`nnx.eval_shape`): enough to compile the steps before any
    parameter exists.
    """
    graphdef, ms = split_model(model)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = TrainState(params=ms.params, model_state=ms.model_state, opt_state=jax.eval_shape(tx.init, ms.params),
                       step=jax.ShapeDtypeStruct((), jnp.int32), rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)


def state_to_model(graphdef: Any, state: TrainState | ModelState) -> CNN:
    """A model in eval mode with the state's parameters (for evaluate, predict, inspect)."""
    model = nnx.merge(graphdef, state.params, state.model_state)
    model.eval()
    return model


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def forward(graphdef: Any, states: tuple[Any, ...], images: Any, names: Sequence[str] | None = (),
            task: Task | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(class probabilities (N, classes), named layer outputs) of a split model, in eval mode; a
    multi-label or regression `task`: its outputs (`cnnpipe.tasks.Task.outputs`) in place of the softmax.

    `states` are the states `nnx.split` gave beside `graphdef` (e.g. ``(state,)`` or
    ``(state.params, state.model_state)`` of a `TrainState`); `names` (a hashable tuple,
    or None for every spatial layer) as `CNN.features`. One jitted function for
    predict, inspect and the training loop's probe, so each compiles once per model
    and input shape instead of once per call.
    """
    model = nnx.merge(graphdef, *states)
    model.eval()
    logits, feats = model.features(images, None if names is None else list(names))
    return (task or Task()).outputs(logits), feats


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def predict_probs(graphdef: Any, states: tuple[Any, ...], images: Any, views: Sequence[str] = (),
                  task: Task | None = None) -> jax.Array:
    """Class probabilities (N, classes) float32 of a split model in eval mode (states as `forward`'s),
    averaged over test-time augmentation `views` (a hashable tuple; () is the images as they are).
    A multi-label or regression `task`: its outputs instead (`cnnpipe.tasks.Task.outputs`: sigmoid
    probabilities, or values in the data's units), averaged over the views likewise."""
    model = nnx.merge(graphdef, *states)
    model.eval()
    if len(views) > 1:
        return _average_views(model, images, views, task)
    return (task or Task()).outputs(model(images))


def _average_views(model: Any, images: jax.Array, views: Sequence[str], task: Task | None = None) -> jax.Array:
    """Mean softmax (or `task`'s outputs) of `model` over `views` of `images` (`cnnpipe.training.augment.VIEWS`)."""
    total = 0.0
    for view in views:
        total = total + (task or Task()).outputs(model(apply_view(images, view)))
    return total / len(views)


# ---------------------------------------------------------------- steps

def augmented_inputs(images: jax.Array, rng: jax.Array, step: jax.Array, aug: AugmentConfig
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What train step `step` feeds the model: (augmented and mixed images, each image's mixing
    share (N,), the dropout key), all from ``fold_in(rng, step)``. Also draws plots/augment.png."""
    aug_key, mix_key, drop_key = jax.random.split(jax.random.fold_in(rng, step), 3)
    images, lam = mix_batch(augment_batch(images, aug_key, aug), mix_key, mixup=aug.mixup, cutmix=aug.cutmix)
    return images, lam, drop_key


def resolve_precision(precision: str) -> str:
    """Check `train.precision`: "fp32", or "bf16" (bf16 compute, fp32 params) on every backend.

    bf16 runs on CPU too (slower there than fp32: XLA:CPU has few native bf16
    kernels), so the accelerator path is exercised wherever the tests run.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision: got {precision!r}; expected fp32 or bf16")
    return precision


def _cast_floats(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def train_forward(graphdef: Any, params: Any, model_state: Any, images: jax.Array, dropout_key: jax.Array,
                  head: Any, bf16: bool) -> tuple[jax.Array, Any]:
    """(logits, the model state after the step) of the train step's forward pass: bf16 compute if asked,
    no gradient below the head and eval mode with a frozen backbone (`head`, a mask), dropout from `dropout_key`."""
    if bf16:  # bf16 copies for compute; the gradient flows back to the fp32 params through the cast
        params = _cast_floats(params, jnp.bfloat16)
    if head is not None:   # frozen backbone: no gradient below the head
        params = jax.tree.map(lambda m, p: p if m else jax.lax.stop_gradient(p), head, params)
    # batch-norm running statistics stay fp32: flax reduces the batch statistics in fp32
    model = nnx.merge(graphdef, params, model_state, copy=True)
    if head is not None:
        model.eval()
    logits = model(images, rngs=nnx.Rngs(dropout=dropout_key))
    _, _, new_model_state = nnx.split(model, nnx.Param, ...)
    return logits, new_model_state


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, mesh: Mesh, *,
                    precision: str = "fp32", augment: AugmentConfig | None = None, frozen_backbone: Any = None,
                    class_weights: Any = None, label_smoothing: float = 0.0, resident: bool = False,
                    steps_per_dispatch: int = 1) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The one jitted train step: ``step(state, images, labels) -> (state, metrics)``.

    `images` are raw pixels (N, H, W, C) and `labels` int (N,), placed with `shard_batch`;
    the state is donated. Metrics (device scalars): loss, accuracy, grad_norm, learning_rate,
    nonfinite. A non-finite loss or gradient keeps params, optimizer and batch-norm state
    (the step counter still advances). `.jitted` is the jitted function, `.compile(...)`
    compiles it ahead of the first call.

    Augmentation, mixing and dropout draw from ``fold_in(state.rng, state.step)``
    (`augmented_inputs`). `class_weights` (K,) and `label_smoothing` shape the loss
    (`cnnpipe.training.loss`); without them or mixing it is integer-label cross-entropy.

    `resident`: the step takes ``(state, images, labels, order, i)``, the split on the devices
    (`cnnpipe.training.resident`) and an epoch's (steps, batch) order, and gathers batch `i`.
    With `steps_per_dispatch` K > 1 too, it takes ``(state, images, labels, order, start, n)``
    and runs steps ``start .. start + n - 1`` (n <= K) in one call, each metric a (K,) array
    (`cnnpipe.training.dispatch.repeating`).

    `frozen_backbone` (the head mask of a split optimizer, see `make_optimizer`) makes
    the step of a frozen backbone: the model runs in eval mode (batch-norm statistics
    used, not updated), gradients stop at the head (XLA drops the backbone's backward
    pass), and the backbone's parameters and optimizer state are left as they are.
    """
    aug = augment or AugmentConfig()
    head = frozen_backbone
    bf16 = resolve_precision(precision) == "bf16"
    weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)
    soft = weights is not None or label_smoothing > 0 or aug.mixup > 0 or aug.cutmix > 0

    def loss_fn(params, model_state, images, labels, dropout_key):
        logits, new_model_state = train_forward(graphdef, params, model_state, images, dropout_key, head, bf16)
        if soft:  # labels: (integer labels, each image's mixing share)
            classes, lam = labels
            t = mix_like(soft_targets(classes, logits.shape[-1], label_smoothing), lam)
            loss = weighted_cross_entropy(logits, t, None if weights is None else mix_like(weights[classes], lam))
        else:
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, new_model_state)

    def step(state: TrainState, images: jax.Array, labels: jax.Array):
        images, lam, drop_key = augmented_inputs(images, state.rng, state.step, aug)
        (loss, (logits, new_ms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.model_state, images, (labels, lam) if soft else labels, drop_key)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = update_state(state, grads, new_ms, finite, tx, head)
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
                   "grad_norm": grad_norm, "learning_rate": learning_rate_of(new_state.opt_state),
                   "nonfinite": ~finite}
        return new_state, metrics

    return wrap_train_step(step, mesh, resident, steps_per_dispatch)


def wrap_train_step(step: Callable[..., Any], mesh: Mesh, resident: bool, k: int) -> Callable[..., Any]:
    """`step` jitted (`cnnpipe.training.dispatch.jit_train_step`) and guarded: the train step callers use,
    with `.jitted` and `.compile(...)` (ahead of the first call)."""
    jitted = jit_train_step(step, mesh, resident, k)
    guard = InFlightGuard(mesh)
    impl: list[Any] = [jitted]

    def train_step(state: TrainState, *batch: Any):
        check_divisible(mesh, batch[2].shape[1] if resident else batch[0].shape[0])
        return guard(impl[0](state, *batch))

    train_step.jitted = jitted  # type: ignore[attr-defined]
    train_step.compile = ahead_of_time(jitted, impl)  # type: ignore[attr-defined]
    return train_step


def update_state(state: TrainState, grads: Any, new_model_state: Any, finite: jax.Array,
            tx: optax.GradientTransformation, head: Any) -> TrainState:
    """The state after one optimizer step; unchanged but for the step count when not `finite`.

    With a frozen backbone (`head`, a mask) only the head's parameters and optimizer state move.
    """
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    if head is not None:   # the backbone stays exactly as it was, its optimizer state too
        new_params = jax.tree.map(lambda m, a, b: a if m else b, head, new_params, state.params)
        new_opt = {"head": new_opt["head"], "backbone": state.opt_state["backbone"]}
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    return TrainState(params=keep(new_params, state.params), model_state=keep(new_model_state, state.model_state),
                      opt_state=keep(new_opt, state.opt_state), step=state.step + 1, rng=state.rng)


def make_eval_step(graphdef: Any, mesh: Mesh, views: Sequence[str] = (), resident: bool = False
                   ) -> Callable[..., dict[str, jax.Array]]:
    """Jitted ``eval_step(state, images, labels, mask) -> {loss_sum, correct, count, predictions}``.

    `views` (test-time augmentation, `cnnpipe.training.augment.tta_views`): the loss and
    predictions are of the class probabilities averaged over these views of each image.

    `mask` (N,) is 1 for real rows and 0 for the padding of a short last batch, so every
    batch has the same shape and the step compiles once; sums count real rows only.
    `predictions` (N,) are argmax classes for every row (padding included).

    `resident`: one program over a whole split on the devices, ``(state, images, labels,
    order, mask)`` with the (batches, batch) `order` and `mask` of
    `cnnpipe.training.resident.place_eval`; each output gains a leading batch axis
    (sums per batch, so the host adds them up as it adds up the batches' sums).
    """
    def step(state: TrainState | ModelState, images, labels, mask):
        model = nnx.merge(graphdef, state.params, state.model_state)
        model.eval()
        m = mask.astype(jnp.float32)
        if len(views) > 1:
            probs = _average_views(model, images, views)
            loss = -jnp.log(jnp.take_along_axis(probs, labels[:, None], -1)[:, 0])
            pred = jnp.argmax(probs, -1).astype(jnp.int32)
        else:
            logits = model(images)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            pred = jnp.argmax(logits, -1).astype(jnp.int32)
        return {"loss_sum": jnp.sum(loss * m), "correct": jnp.sum((pred == labels) * m),
                "count": jnp.sum(m), "predictions": pred}

    return wrap_eval_step(step, mesh, resident)


def wrap_eval_step(step: Callable[..., Any], mesh: Mesh, resident: bool) -> Callable[..., Any]:
    """An eval `step` ``(state, images, labels, mask) -> outputs`` jitted (on host batches, or with `resident`
    over a whole device-resident split, `over_batches`) and guarded, with `.jitted` and `.compile(...)`."""
    replicated = NamedSharding(mesh, PartitionSpec())
    batched = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    if resident:
        jitted = jax.jit(over_batches(step, batched), out_shardings=replicated,
                         in_shardings=(replicated,) * 3 + (NamedSharding(mesh, PartitionSpec(None, DATA_AXIS)),) * 2)
    else:
        jitted = jax.jit(step, in_shardings=(replicated, batched, batched, batched), out_shardings=replicated)
    guard = InFlightGuard(mesh)
    impl: list[Any] = [jitted]

    def eval_step(state: TrainState, *args: Any):
        check_divisible(mesh, args[2].shape[1] if resident else args[0].shape[0], "eval batch size")
        return guard(impl[0](state, *args))

    eval_step.jitted = jitted  # type: ignore[attr-defined]
    eval_step.compile = ahead_of_time(jitted, impl)  # type: ignore[attr-defined]
    return eval_step


def over_batches(step: Callable[..., Any], batched: NamedSharding) -> Callable[..., Any]:
    """`step` over every batch of a device-resident split in one program (`lax.map`): rows
    ``order[b]`` of `images` and `labels`, masked by ``mask[b]``; outputs stacked per batch."""
    def eval_step_over_batches(state: Any, images: jax.Array, labels: jax.Array, order: jax.Array, mask: jax.Array):
        def one(idx_mask: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
            idx, m = idx_mask
            return step(state, take_rows(images, idx, batched), take_rows(labels, idx, batched),
                        jax.lax.with_sharding_constraint(m, batched))

        return jax.lax.map(one, (order, mask))

    return eval_step_over_batches
