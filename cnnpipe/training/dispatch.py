"""How jitted steps are called: compiled ahead, one call in flight on CPU meshes, several steps per call.

A train step called once per batch pays a Python dispatch and a host read of its
metrics every step; on an accelerator whose step takes a millisecond that is a
visible share of the run. With the training split on the devices
(`cnnpipe.training.resident`) the step needs nothing from the host but a step number,
so `repeating` runs up to K of them in one program (a `lax.fori_loop` whose trip count
is an argument: one compile serves every chunk length) and returns each step's
metrics. `Chunks` decides each call's length: never past the next log line,
checkpoint or epoch end (so those keep their meaning), and with
``train.steps_per_dispatch: auto`` about `TARGET_SECONDS` of work, measured from the
steps already run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnnpipe.training.mesh import DATA_AXIS

__all__ = ["InFlightGuard", "ahead_of_time", "take_rows", "gathering", "repeating", "jit_train_step", "max_chunk", "describe", "Chunks",
           "TARGET_SECONDS"]

# auto: a call's length in seconds of steps. Long enough that the per-call cost (a Python
# dispatch, a host read of the metrics) is under 1% of it; short enough that the progress bar
# moves and Ctrl-C answers within a fraction of a second.
TARGET_SECONDS = 0.2


class InFlightGuard:
    """At most one call in flight on a multi-device CPU mesh.

    XLA:CPU runs each device's part of a call on a shared thread pool (one thread per
    core) and its all-reduce waits for every device's part. With several calls queued,
    the pool can fill up with parts of later calls waiting on a part that has no thread
    left: jax 0.10.1 then aborts the process after 40 s ("Termination timeout for all
    reduce"). 300 unsynchronised train steps on 2 devices reproduced it; waiting for the
    previous call before returning the next keeps the pipelining and never hung, at the
    same speed.
    """

    def __init__(self, mesh: Mesh):
        self.active = mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"
        self.last: Any = None

    def __call__(self, out: Any) -> Any:
        if self.active:
            if self.last is not None:
                jax.block_until_ready(self.last)
            self.last = out[1] if isinstance(out, tuple) else out   # metrics; the state is donated later
        return out


def ahead_of_time(jitted: Any, impl: list[Any]) -> Callable[..., None]:
    """``compile(*args)``: compile `jitted` for these arguments (arrays or `batch_spec`s) now, into `impl[0]`.

    Later calls use the compiled executable, so the first step does not stop to
    compile; train and eval steps can compile at once in threads (XLA releases the
    GIL while compiling). Arguments of another shape then raise instead of recompiling.
    """
    def compile_now(*args: Any) -> None:
        impl[0] = jitted.lower(*args).compile()

    return compile_now


def take_rows(a: jax.Array, idx: jax.Array, batched: NamedSharding) -> jax.Array:
    """Rows `idx` of a device-resident array, placed as a batch is (split over "data")."""
    return jax.lax.with_sharding_constraint(jnp.take(a, idx, axis=0), batched)


def gathering(step: Callable[..., Any], batched: NamedSharding) -> Callable[..., Any]:
    """`step` on a batch gathered on the device: ``(state, images, labels, order, i)`` trains on rows
    ``order[i]`` of the device-resident split (`cnnpipe.training.resident`)."""
    def step_on_gathered(state: Any, images: jax.Array, labels: jax.Array, order: jax.Array, i: jax.Array):
        idx = jax.lax.dynamic_index_in_dim(order, i, keepdims=False)
        return step(state, take_rows(images, idx, batched), take_rows(labels, idx, batched))

    return step_on_gathered


def repeating(gathered: Callable[..., Any], k: int) -> Callable[..., Any]:
    """``(state, images, labels, order, start, n) -> (state, metrics)``: `gathered` for steps
    ``start .. start + n - 1`` of the epoch's `order` in one program (1 <= n <= k).

    Each metric comes back as a (k,) array whose first `n` entries are the steps' own;
    the rest are zeros. Every step runs the same loop body, so how steps are split into
    calls changes nothing, bit for bit; XLA compiles that body apart from the one-step
    program, so the two agree up to float rounding (both tested).
    """
    def steps_repeated(state: Any, images: jax.Array, labels: jax.Array, order: jax.Array, start: jax.Array,
                 n: jax.Array):
        shapes = jax.eval_shape(gathered, state, images, labels, order, start)[1]
        buffer = jax.tree.map(lambda s: jnp.zeros((k, *s.shape), s.dtype), shapes)

        def body(j: jax.Array, carry: tuple[Any, Any]) -> tuple[Any, Any]:
            st, buf = carry
            st, metrics = gathered(st, images, labels, order, start + j)
            return st, jax.tree.map(lambda b, m: b.at[j].set(m), buf, metrics)

        return jax.lax.fori_loop(0, n, body, (state, buffer))

    return steps_repeated


def jit_train_step(step: Callable[..., Any], mesh: Mesh, resident: bool, k: int) -> Any:
    """`step` ``(state, images, labels) -> (state, metrics)`` jitted, the state donated: on host batches
    sharded over "data"; with `resident`, gathering its batch (`gathering`); with `k` > 1 too, up to
    `k` steps per call (`repeating`). The state and metrics are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    batched = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    order = NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))
    if resident and k > 1:   # (state, images, labels, order, first step in epoch, steps to run)
        return jax.jit(repeating(gathering(step, batched), k), donate_argnums=0,
                       in_shardings=(replicated,) * 3 + (order, replicated, replicated),
                       out_shardings=(replicated, replicated))
    if resident:   # (state, the split's images, its labels, the epoch's order, step in epoch)
        return jax.jit(gathering(step, batched), donate_argnums=0, out_shardings=(replicated, replicated),
                       in_shardings=(replicated,) * 3 + (order, replicated))
    return jax.jit(step, in_shardings=(replicated, batched, batched), out_shardings=(replicated, replicated),
                   donate_argnums=0)


def max_chunk(steps_per_dispatch: int | str, resident: bool, steps_per_epoch: int, log_every: int,
              checkpoint_every: int, platform: str = "gpu") -> int:
    """K, the most steps one call may run: 1 for host batches (each is its own copy), else the
    configured count or (auto) up to the next event, whichever is less.

    auto on a CPU is 1: XLA:CPU (jaxlib 0.10.1) runs a convolution's weight gradient inside
    a loop about 60x slower than outside one (a 3x3 conv of 64x32x32x16: 3.0 s against
    50 ms; the forward conv and dots are not affected), so the default CNN's step took
    550 ms in the loop against 25 ms alone, and a CPU has no dispatch cost worth saving
    (25.2 ms a step with 4 steps unrolled in one call against 25.9 ms one per call).
    """
    if not resident:
        return 1
    events = min(steps_per_epoch, log_every, checkpoint_every or steps_per_epoch)
    if isinstance(steps_per_dispatch, int):
        return max(1, min(events, steps_per_dispatch))
    return 1 if platform == "cpu" else events


def describe(setting: int | str, k: int, resident: bool, platform: str) -> str:
    """The run log's words on steps per call (empty for one step per call as configured)."""
    asked = setting if isinstance(setting, int) else None
    if asked is not None and asked > 1 and not resident:
        return f"; train.steps_per_dispatch {asked} does not apply to host batches (one step per call)"
    capped = (f" (train.steps_per_dispatch {asked}, capped by the log interval, checkpoint interval or epoch length)"
              if asked is not None and asked > k else "")
    if k == 1:
        return f"; one step per call{capped}" if capped else ""
    slow = ("; note: XLA:CPU runs convolution gradients in a multi-step call far slower (auto is 1 on a CPU)"
            if platform == "cpu" else "")
    return f"; up to {k} steps per call{capped}{slow}"


class Chunks:
    """Each call's number of steps: up to `k`, never past the next event (log line, checkpoint,
    epoch end); with `auto`, about `TARGET_SECONDS` of steps, from the step time measured so far
    (the first call of a run is one step, then each call may double)."""

    def __init__(self, k: int, auto: bool):
        self.k, self.auto = k, auto
        self.step_seconds: float | None = None
        self.reached = 0   # the longest call so far

    def measured(self, steps: int, seconds: float) -> None:
        """Record that `steps` steps took `seconds` of wall time (a window between two host reads)."""
        if steps > 0 and seconds > 0:
            self.step_seconds = seconds / steps

    def next(self, to_event: int) -> int:
        """The next call's step count, given `to_event` steps to the next event (>= 1)."""
        n = min(self.k, to_event)
        if self.auto:
            timed = self.k if self.step_seconds is None else max(1, math.floor(TARGET_SECONDS / self.step_seconds))
            n = min(n, timed, max(1, 2 * self.reached))
        self.reached = max(self.reached, n)
        return n
