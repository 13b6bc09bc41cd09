"""The train and eval steps of multi-label and regression runs (`cnnpipe.tasks`).

They are `cnnpipe.training.steps`' steps with the task's targets, loss and outputs: the
same forward pass (`train_forward`), optimizer update, augmentation and mixing draws,
jit placement and ahead-of-time compile, so everything but the loss is shared with
single-label runs, whose steps stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from cnnpipe.config import AugmentConfig
from cnnpipe.tasks import Task
from cnnpipe.tasks.losses import (
    asymmetric_loss,
    binary_cross_entropy,
    masked_mean,
    mix_targets,
    regression_loss,
    smooth_multi_hot,
)
from cnnpipe.training.augment import apply_view
from cnnpipe.training.steps import (
    TrainState,
    augmented_inputs,
    learning_rate_of,
    resolve_precision,
    train_forward,
    update_state,
    wrap_eval_step,
    wrap_train_step,
)

__all__ = ["make_task_train_step", "make_task_eval_step", "per_entry_loss"]


def per_entry_loss(task: Task, loss: str, logits: jax.Array, targets: jax.Array,
                   pos_weight: jax.Array | None = None) -> jax.Array:
    """The loss of each (image, output) entry (N, outputs) for `task`'s loss `loss`; 0 where unknown."""
    if task.kind == "multilabel":
        return asymmetric_loss(logits, targets) if loss == "asymmetric" else binary_cross_entropy(
            logits, targets, pos_weight)
    return regression_loss(loss, logits, task.standardise(targets))


def _step_score(task: Task, logits: jax.Array, targets: jax.Array) -> jax.Array:
    """The train log's second number: label accuracy at 0.5 (multilabel), mean absolute error in the
    data's units (regression); over the known entries."""
    if task.kind == "multilabel":
        right = (logits >= 0).astype(jnp.float32) == (jnp.nan_to_num(targets) >= 0.5)
        return masked_mean(right.astype(jnp.float32), targets)
    return masked_mean(jnp.abs(task.outputs(logits) - jnp.nan_to_num(targets)), targets)


def make_task_train_step(graphdef: Any, tx: optax.GradientTransformation, mesh: Mesh, task: Task, *,
                         loss: str | None = None, pos_weight: Any = None, precision: str = "fp32",
                         augment: AugmentConfig | None = None, frozen_backbone: Any = None,
                         label_smoothing: float = 0.0, resident: bool = False, steps_per_dispatch: int = 1,
                         **_unused: Any) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """`cnnpipe.training.steps.make_train_step` for a multi-label or regression `task`:
    ``step(state, images, targets) -> (state, metrics)``, targets float32 (N, outputs), NaN unknown.

    The loss is `loss` (the task's default when None: bce, mse) over the known entries,
    `pos_weight` (L,) weighing bce's positives; mixup/cutmix mix the targets as the images
    (`mix_targets`), `label_smoothing` smooths multi-hot targets (`smooth_multi_hot`). The
    metrics are make_train_step's, "accuracy" being `_step_score`.
    """
    aug = augment or AugmentConfig()
    head = frozen_backbone
    bf16 = resolve_precision(precision) == "bf16"
    name = task.loss_name(loss)
    weights = None if pos_weight is None else jnp.asarray(pos_weight, jnp.float32)
    mixing = aug.mixup > 0 or aug.cutmix > 0

    def loss_fn(params, model_state, images, targets, dropout_key):
        logits, new_model_state = train_forward(graphdef, params, model_state, images, dropout_key, head, bf16)
        value = masked_mean(per_entry_loss(task, name, logits.astype(jnp.float32), targets, weights), targets)
        return value, (logits, new_model_state)

    def step(state: TrainState, images: jax.Array, targets: jax.Array):
        images, lam, drop_key = augmented_inputs(images, state.rng, state.step, aug)
        t = mix_targets(targets, lam) if mixing else targets
        if label_smoothing:
            t = smooth_multi_hot(t, label_smoothing)
        (value, (logits, new_ms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.model_state, images, t, drop_key)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        new_state = update_state(state, grads, new_ms, finite, tx, head)
        metrics = {"loss": value, "accuracy": _step_score(task, logits.astype(jnp.float32), t),
                   "grad_norm": grad_norm, "learning_rate": learning_rate_of(new_state.opt_state),
                   "nonfinite": ~finite}
        return new_state, metrics

    return wrap_train_step(step, mesh, resident, steps_per_dispatch)


def _eval_outputs(task: Task, loss: str, model: Any, images: jax.Array, targets: jax.Array,
                  views: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    """(outputs (N, outputs) float32 averaged over `views`, per-entry loss (N, outputs)). With one view the
    loss is the training loss's (unweighted); over several, of the averaged output (BCE of the mean
    probability; the loss of the mean standardised value)."""
    if len(views) <= 1:
        logits = model(images).astype(jnp.float32)
        return task.outputs(logits), per_entry_loss(task, loss, logits, targets)
    outs = sum(task.outputs(model(apply_view(images, v)).astype(jnp.float32)) for v in views) / len(views)
    if task.kind == "multilabel":
        p, y = jnp.clip(outs, 1e-7, 1 - 1e-7), jnp.nan_to_num(targets)
        return outs, -(y * jnp.log(p) + (1 - y) * jnp.log1p(-p))
    std_out = task.standardise(outs)
    return outs, regression_loss(loss, std_out, task.standardise(targets))


def make_task_eval_step(graphdef: Any, mesh: Mesh, task: Task, loss: str | None = None, views: Sequence[str] = (),
                        resident: bool = False) -> Callable[..., dict[str, jax.Array]]:
    """`cnnpipe.training.steps.make_eval_step` for a multi-label or regression `task`:
    ``eval_step(state, images, targets, mask) -> {loss_sum, known, count, outputs, row_loss}``.

    loss_sum: the loss summed over the known entries of the real rows; known: their number;
    count: the real rows; outputs (N, outputs): probabilities or values for every row
    (padding included); row_loss (N,): each row's mean loss over its known entries (for
    `inspect --worst`). `resident` as make_eval_step's.
    """
    name = task.loss_name(loss)

    def step(state: Any, images, targets, mask):
        model = nnx.merge(graphdef, state.params, state.model_state)
        model.eval()
        outs, per_entry = _eval_outputs(task, name, model, images, targets, views)
        known = (~jnp.isnan(targets)) & mask[:, None]
        per_entry = jnp.where(known, per_entry, 0.0)
        k = known.astype(jnp.float32)
        return {"loss_sum": jnp.sum(per_entry), "known": jnp.sum(k), "count": jnp.sum(mask.astype(jnp.float32)),
                "outputs": outs, "row_loss": jnp.sum(per_entry, -1) / jnp.maximum(jnp.sum(k, -1), 1.0)}

    return wrap_eval_step(step, mesh, resident)
