"""What a training run records while it runs: metrics lines, the metrics sink, the stopwatch.

- `MetricsLog`: `metrics.jsonl` (one JSON object per line) plus TensorBoard scalars.
- `MetricsSink`: takes each train step's device metrics and reads them one step late,
  so the host never waits for the step it just queued; averages them over a log
  window; counts non-finite steps and stops the run after too many in a row.
- `Stopwatch`: where a run's wall time goes (data, compile, steps, eval, checkpoints,
  plots), plus the seconds JAX itself spends tracing and compiling.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cnnpipe.files import write_atomic

__all__ = ["MetricsLog", "MetricsSink", "NonFiniteLossError", "Stopwatch", "tensorboard_writer", "json_safe"]


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the message names the step range and last checkpoint."""


def tensorboard_writer(logdir: str | Path) -> Any:
    """A `tensorboardX.SummaryWriter` for `logdir`, imported without PyTorch.

    tensorboardX imports torch at module level when it is installed, only to accept
    torch tensors (which cnnpipe never passes): 1.0-1.5 s of every run's start on a
    machine that has torch. Hiding torch during that one import skips it; a torch
    imported before is left alone.
    """
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter(str(logdir))


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a killed process counts as past every step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class _NoWriter:
    """TensorBoard's writer interface, writing nothing (processes other than the primary)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities (a diverged run's loss) as None, in nested dicts and lists too:
    metrics.jsonl and summary.json stay standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


class MetricsLog:
    """metrics.jsonl (truncated to `resume_step` on resume, emptied otherwise) plus TensorBoard scalars.

    With `enabled=False` (every process of a multi-process run but the primary) it
    writes nothing and `tb` is a writer that drops everything.
    """

    def __init__(self, run_dir: Path, resume_step: int | None, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._file: Any = None
        if not enabled:
            self.tb: Any = _NoWriter()
            return
        if resume_step is not None and self.path.exists():
            # a killed run may have logged past its last checkpoint; those steps run again
            try:
                lines = self.path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"{self.path}: cannot read the run's metrics log "
                                 f"({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
            kept = [line for line in lines if _step_of(line) <= resume_step]
            write_atomic(self.path, "".join(line + "\n" for line in kept))
        # a fresh run in a reused directory starts a fresh log
        self._file = open(self.path, "w" if resume_step is None else "a", encoding="utf-8")
        self.tb = tensorboard_writer(run_dir / "tensorboard")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (it must have "step"); numeric fields also go to TensorBoard."""
        if self._file is None:
            return
        self._file.write(json.dumps(json_safe(record)) + "\n")
        self._file.flush()
        prefix = record.get("split", "train")
        for key, value in record.items():
            if key not in ("step", "epoch", "split") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool) and math.isfinite(value):
                self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        """Close the file and flush TensorBoard."""
        if self._file is not None:
            self._file.close()
        self.tb.close()


class MetricsSink:
    """Train-step metrics in, averaged log records and the non-finite stop rule out.

    `push(step, epoch, metrics)` hands over a step's device metrics and reads the
    previous step's (one step in flight); `flush(...)` reads the pending one and
    writes the window's average. A non-finite step is logged on its own line and
    left out of the average; `max_nonfinite` of them in a row raise
    `NonFiniteLossError`, naming `last_checkpoint()`.
    """

    def __init__(self, write: Callable[[dict[str, Any]], None], max_nonfinite: int,
                 last_checkpoint: Callable[[], str], score_name: str = "accuracy") -> None:
        self._write, self._max, self._last_checkpoint = write, max_nonfinite, last_checkpoint
        self._score_name = score_name   # the log's name for the step's "accuracy" metric (the task's)
        self._pending: tuple[int, int, Any, int | None] | None = None
        self._sums = {"loss": 0.0, "accuracy": 0.0, "n": 0}
        self._lr = math.nan
        self._run_start = self._run_len = 0
        self.nonfinite_total = 0

    def window(self) -> dict[str, Any]:
        """The unlogged part of the log window and the current run of non-finite steps, as JSON
        (saved with a checkpoint, so a resumed run logs and stops exactly as an uninterrupted one)."""
        return {**self._sums, "run_start": self._run_start, "run_len": self._run_len}

    def resume(self, window: dict[str, Any] | None) -> None:
        """Continue from a saved `window` (None: a fresh one)."""
        if window:
            self._sums = {k: window[k] for k in ("loss", "accuracy", "n")}
            self._run_start, self._run_len = int(window["run_start"]), int(window["run_len"])

    def push(self, step: int, epoch: int, metrics: Any, n: int | None = None) -> None:
        """Queue `metrics` (device scalars) of `step`; read the previous call's. With `n`, the metrics
        are (K,) arrays of one call's steps ``step - n + 1 .. step`` (`cnnpipe.training.dispatch`)."""
        self._read_pending()
        self._pending = (step, epoch, metrics, n)

    def flush(self, step: int, epoch: int, images_per_sec: float | None) -> dict[str, Any] | None:
        """Read the pending step and write the window's average as `step`'s record (None if empty)."""
        self._read_pending()
        sums, self._sums = self._sums, {"loss": 0.0, "accuracy": 0.0, "n": 0}
        if not sums["n"]:
            return None
        record = {"step": step, "epoch": epoch + 1, "loss": sums["loss"] / sums["n"],
                  self._score_name: sums["accuracy"] / sums["n"], "learning_rate": self._lr,
                  "images_per_sec": images_per_sec}
        self._write(record)
        return record

    def settle(self) -> None:
        """Read the pending step (before a checkpoint, so the stop rule has seen every step)."""
        self._read_pending()

    def _read_pending(self) -> None:
        if self._pending is None:
            return
        import jax

        step, epoch, metrics, n = self._pending
        self._pending = None
        metrics = jax.device_get(metrics)
        if n is None:
            self._handle(step, epoch, metrics)
            return
        for j in range(n):   # the call's steps in order: the stop rule counts each
            self._handle(step - n + 1 + j, epoch, {k: v[j] for k, v in metrics.items()})

    def _handle(self, step: int, epoch: int, m: dict[str, Any]) -> None:
        self._lr = float(m["learning_rate"])
        if not bool(m["nonfinite"]):
            self._run_len = 0
            self._sums["loss"] += float(m["loss"])
            self._sums["accuracy"] += float(m["accuracy"])
            self._sums["n"] += 1
            return
        self.nonfinite_total += 1
        self._run_start, self._run_len = (step if self._run_len == 0 else self._run_start), self._run_len + 1
        self._write({"step": step, "epoch": epoch + 1, "nonfinite": True, "loss": None, "learning_rate": self._lr})
        if self._run_len >= self._max:
            raise NonFiniteLossError(
                f"loss was non-finite for {self._run_len} steps in a row (steps {self._run_start}-{step}); "
                f"stopping. Last good checkpoint: {self._last_checkpoint()}")


class Stopwatch:
    """Seconds per phase of a run, and the seconds JAX spends tracing, lowering and compiling.

    `with watch.phase("eval"): ...` adds the block's wall time to "eval"; phases may
    repeat. `compile_seconds` is the wall time during which JAX was tracing, lowering or
    compiling (persistent-cache hits included) while the stopwatch listened: the union
    of its events' spans, so compiles running at once in threads, or a trace nested in
    another, count once and the figure never exceeds the run's wall time.
    """

    _EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
               "/jax/core/compile/backend_compile_duration")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._spans: list[tuple[float, float]] = []
        self._listening = False

    def listen(self) -> None:
        """Start counting JAX compile events (imports jax)."""
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._listen)
        self._listening = True

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if event in self._EVENTS:  # reported when the event ends
            end = time.perf_counter()
            self._spans.append((end - duration, end))

    @property
    def compile_seconds(self) -> float:
        """Wall seconds covered by at least one JAX compile event."""
        total, reach = 0.0, -math.inf
        for start, end in sorted(self._spans):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the block's wall time to phase `name`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        """Add `seconds` to phase `name`."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def elapsed(self) -> float:
        """Seconds since the stopwatch was made."""
        return time.perf_counter() - self.start

    def report(self) -> dict[str, float]:
        """Rounded seconds per phase, "other" for the rest of the elapsed time, and "total"."""
        total = self.elapsed()
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["other"] = round(max(0.0, total - sum(self.seconds.values())), 3)
        out["total"] = round(total, 3)
        return out

    def stop(self) -> None:
        """Stop counting compile events."""
        if self._listening:
            import jax.monitoring

            jax.monitoring.unregister_event_duration_listener(self._listen)
            self._listening = False
