"""The accelerator path on whatever backend jax has: compute rate, MFU, and the host input pipeline.

Compute: the reference CNN (benchmarks/bench_train.py) and `resnet_small` at 32x32x3,
fp32 and bf16, at growing batch sizes until one does not fit (or the list ends), built
and stepped exactly as `cnnpipe train` does (one jitted step, batch over every local
device). FLOPs per step are counted from the step's jaxpr (2 x multiply-adds of every
convolution and dot, forward and backward; the same count on every backend, where
XLA's cost analysis misses cuDNN's convolutions on GPU); MFU is the achieved rate over the peak of the device kind:

  * GPU/TPU: the vendor's dense peak per chip (PEAKS below): the bf16 tensor-core rate
    for bf16; for fp32 the TF32 tensor-core rate, since XLA's default precision runs fp32
    convolutions and matmuls as TF32 on NVIDIA GPUs since Ampere;
  * CPU: no vendor figure applies (clock and vector units vary), so the peak is
    measured: XLA's own large matmul (4096^2, per precision) on all cores of this host.

Host pipeline: a uint8 store on disk (page cache) -> shuffled batches of this
process's rows -> device (`shard_batch`), with `prefetch`, in images/s at 32x32x3 and
224x224x3: the gather alone, the gather + device copy, and, with --processes 2, the
real multi-process path (2 processes on 127.0.0.1, each reading its half of every
global batch and building global arrays with `make_array_from_process_local_data`).
Finally the overlap: the reference CNN trained from the pipeline vs from one
resident batch.

    .venv/bin/python benchmarks/bench_accel.py                  # everything, 1 process
    .venv/bin/python benchmarks/bench_accel.py --processes 2    # + the 2-process pipeline
    .venv/bin/python benchmarks/bench_accel.py --pipeline-only --processes 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# dense peak TFLOP/s per chip (vendor data sheets, SXM parts): (fp32 as TF32, bf16)
PEAKS = {
    "H100": (494.7, 989.4), "H200": (494.7, 989.4), "A100": (156.0, 312.0), "L4": (60.0, 121.0),
    "TPU v4": (None, 275.0), "TPU v5 lite": (None, 197.0), "TPU v5e": (None, 197.0), "TPU v5p": (None, 459.0),
}
REFERENCE = [
    {"type": "conv", "filters": 32, "kernel": 3}, {"type": "relu"}, {"type": "max_pool", "window": 2},
    {"type": "conv", "filters": 64, "kernel": 3}, {"type": "relu"}, {"type": "max_pool", "window": 2},
    {"type": "flatten"}, {"type": "dense", "units": 128}, {"type": "relu"}, {"type": "dense", "units": 10},
]
SHAPES = {"32x32x3": ((32, 32, 3), 50_000, 256), "224x224x3": ((224, 224, 3), 3_000, 64)}


def _median_rate(fn, blocks: int) -> float:
    return statistics.median(fn() for _ in range(blocks))


# ---------------------------------------------------------------- compute

def measured_cpu_peak(precision: str) -> float:
    """TFLOP/s of XLA's 4096x4096 matmul on this host, in `precision` (the CPU 'peak')."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    a = jnp.ones((4096, 4096), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()

    def once() -> float:
        t = time.perf_counter()
        f(a).block_until_ready()
        return 2 * 4096 ** 3 / (time.perf_counter() - t) / 1e12

    return max(once() for _ in range(5))


def device_peak(precision: str) -> tuple[float | None, str]:
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return measured_cpu_peak(precision) * 1.0, "measured 4096^2 matmul, all cores"
    for name, (fp32, bf16) in PEAKS.items():
        if name.lower() in dev.device_kind.lower():
            peak = bf16 if precision == "bf16" else fp32
            return (None if peak is None else peak * len(jax.local_devices())), f"{name} data sheet x devices"
    return None, f"unknown device kind {dev.device_kind!r}"


def matmul_flops(jaxpr) -> float:
    """2 x multiply-adds of every convolution and dot in `jaxpr` (sub-jaxprs included): the same
    count on every backend (XLA's cost analysis misses cuDNN's convolutions, or returns None)."""
    import numpy as np

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            k = np.prod([eqn.invars[0].aval.shape[d] for d in lhs_contract])
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial) axes
            window = np.prod([rhs[d] for d in spec[1:]])  # in features per group x kernel window
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * window
        for sub in jax_core_subjaxprs(eqn):
            total += matmul_flops(sub)
    return total


def jax_core_subjaxprs(eqn):
    from jax.extend.core import ClosedJaxpr, Jaxpr

    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, Jaxpr):
                yield v


def time_step(layers, precision: str, batch: int, steps: int, blocks: int) -> dict:
    """Step time, images/s and XLA's FLOPs of one train step of `layers` at 32x32x3."""
    import jax
    import numpy as np
    from flax import nnx

    from cnnpipe.config import OptimizerConfig
    from cnnpipe.models.cnn import build_model
    from cnnpipe.training.steps import (
        create_train_state,
        make_mesh,
        make_optimizer,
        make_train_step,
        replicate,
        shard_batch,
    )

    mesh = make_mesh(0)
    model = build_model(layers, in_channels=3, num_classes=10, input_size=(32, 32), bit_depth=8, rngs=nnx.Rngs(0))
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-3), 10**6)
    graphdef, state = create_train_state(model, tx, 0)
    state = replicate(mesh, state)
    step = make_train_step(graphdef, tx, mesh, precision=precision)
    rng = np.random.default_rng(0)
    x, y = shard_batch(mesh, rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8),
                       rng.integers(0, 10, batch).astype(np.int32))
    flops = matmul_flops(jax.make_jaxpr(step.jitted)(state, x, y).jaxpr)
    state, m = step(state, x, y)
    jax.block_until_ready(m["loss"])
    holder = [state]

    def block() -> float:
        s = holder[0]
        t = time.perf_counter()
        for _ in range(steps):
            s, met = step(s, x, y)
        jax.block_until_ready(met["loss"])
        holder[0] = s
        return (time.perf_counter() - t) / steps

    seconds = _median_rate(block, blocks)
    return {"step_ms": seconds * 1e3, "images_per_s": batch / seconds, "tflops": flops / seconds / 1e12,
            "gflop_per_step": flops / 1e9}


def compute_section(args) -> None:
    import jax

    from cnnpipe.models.cnn import preset_layers

    dev = jax.devices()[0]
    print(f"backend {dev.platform}, {len(jax.local_devices())} x {dev.device_kind}")
    models = {"reference": REFERENCE, "resnet_small": preset_layers("resnet_small")}
    for precision in args.precisions:
        peak, source = device_peak(precision)
        print(f"\n{precision}: peak {'%.3f TFLOP/s' % peak if peak else 'unknown'} ({source})")
        print(f"  {'model':13s} {'batch':>6s} {'step ms':>9s} {'images/s':>10s} {'GFLOP/step':>11s} "
              f"{'TFLOP/s':>8s} {'MFU':>6s}")
        for name in args.models:
            for batch in args.batches:
                try:
                    r = time_step(models[name], precision, batch, args.steps, args.blocks)
                except Exception as exc:  # out of device memory: the largest batch that fits was the last
                    if "RESOURCE_EXHAUSTED" in str(exc) or "out of memory" in str(exc).lower():
                        print(f"  {name:13s} {batch:6d} does not fit")
                        break
                    raise
                mfu = f"{100 * r['tflops'] / peak:5.1f}%" if peak else "   - "
                print(f"  {name:13s} {batch:6d} {r['step_ms']:9.2f} {r['images_per_s']:10.0f} "
                      f"{r['gflop_per_step']:11.3f} {r['tflops']:8.3f} {mfu:>6s}")


# ---------------------------------------------------------------- host pipeline

def make_store(root: Path, shape: tuple[int, int, int], n: int) -> Path:
    """A train split of `n` random uint8 images (the store's images.npy layout), written once."""
    import numpy as np

    path = root / f"images-{'x'.join(map(str, shape))}-{n}.npy"
    if not path.exists():
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, *shape))
        rng = np.random.default_rng(0)
        for i in range(0, n, 1000):
            arr[i:i + 1000] = rng.integers(0, 256, (min(1000, n - i), *shape), dtype=np.uint8)
        arr.flush()
        del arr
    return path


def pipeline_rates(path: Path, batch: int, seconds: float) -> dict[str, float]:
    """Images/s of this process's rows: gathered alone, and gathered + placed on the device with prefetch."""
    import jax
    import numpy as np

    from cnnpipe.datasets.batches import prefetch, train_batches
    from cnnpipe.datasets.dataset import Split
    from cnnpipe.training.mesh import make_mesh, process_rows, shard_batch

    images = np.load(path, mmap_mode="r")
    split = Split(images, np.zeros(len(images), np.int32))
    mesh = make_mesh(0)
    rows = process_rows(mesh, batch)
    mine = rows.stop - rows.start
    np.asarray(images).sum(dtype=np.uint64)  # into the page cache

    def run(place: bool) -> float:
        done, t0, epoch = 0, time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            it = train_batches(split, batch, seed=0, epoch=epoch, rows=rows)
            gen = (shard_batch(mesh, x, y) for x, y in it) if place else it
            with prefetch(gen, size=2) as batches:
                for out in batches:
                    if place:
                        jax.block_until_ready(out)
                    done += mine
                    if time.perf_counter() - t0 >= seconds:
                        break
            epoch += 1
        return done / (time.perf_counter() - t0)

    return {"gather": run(False), "gather+device": run(True), "rows": mine}


def pipeline_section(args, root: Path) -> dict:
    import jax

    results = {}
    for label, (shape, n, batch) in SHAPES.items():
        r = pipeline_rates(make_store(root, shape, n), batch, args.seconds)
        results[label] = r
        if jax.process_index() == 0:
            who = f"process 0 of {jax.process_count()}, {r['rows']} of {batch} rows"
            print(f"  {label:10s} gather {r['gather']:10,.0f} img/s   gather+device {r['gather+device']:10,.0f} "
                  f"img/s   ({who})")
    return results


def overlap_section(args, root: Path) -> None:
    """The reference CNN stepped from one resident batch vs fed by the host pipeline (prefetch 2)."""
    import jax
    import numpy as np
    from flax import nnx

    from cnnpipe.config import OptimizerConfig
    from cnnpipe.datasets.batches import prefetch, train_batches
    from cnnpipe.datasets.dataset import Split
    from cnnpipe.models.cnn import build_model
    from cnnpipe.training.steps import (
        create_train_state,
        make_mesh,
        make_optimizer,
        make_train_step,
        replicate,
        shard_batch,
    )

    shape, n, batch = SHAPES["32x32x3"]
    images = np.load(make_store(root, shape, n), mmap_mode="r")
    split = Split(images, np.random.default_rng(0).integers(0, 10, n).astype(np.int32))
    mesh = make_mesh(0)
    model = build_model(REFERENCE, in_channels=3, num_classes=10, input_size=(32, 32), bit_depth=8, rngs=nnx.Rngs(0))
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-3), 10**6)
    graphdef, state = create_train_state(model, tx, 0)
    holder = [replicate(mesh, state)]
    step = make_train_step(graphdef, tx, mesh)
    resident = shard_batch(mesh, *next(train_batches(split, batch, seed=0, epoch=0)))
    # an epoch's worth on an accelerator (0.6 ms a step on an H200: a short run would time the start)
    steps = min(n // batch, 20 if jax.default_backend() == "cpu" else 190)

    def from_resident() -> float:
        s, t = holder[0], time.perf_counter()
        for _ in range(steps):
            s, m = step(s, *resident)
        jax.block_until_ready(m["loss"])
        holder[0] = s
        return steps * batch / (time.perf_counter() - t)

    def from_pipeline(size: int = 2) -> float:
        s, t = holder[0], time.perf_counter()
        gen = (shard_batch(mesh, x, y) for x, y in train_batches(split, batch, seed=0, epoch=1))
        with prefetch(gen, size=size) as batches:
            for _ in range(steps):
                s, m = step(s, *next(batches))
        jax.block_until_ready(m["loss"])
        holder[0] = s
        return steps * batch / (time.perf_counter() - t)

    from_resident()
    from_pipeline()
    a = _median_rate(from_resident, args.blocks)
    rates = {size: _median_rate(lambda: from_pipeline(size), args.blocks) for size in (2, 8)}
    print(f"  reference CNN, batch {batch}: {a:,.0f} img/s from a resident batch; fed by the pipeline "
          + ", ".join(f"{r:,.0f} img/s with prefetch {k} ({r / a:.2f}x)" for k, r in rates.items()))


# ---------------------------------------------------------------- processes

def worker(args) -> None:
    """One process of a --processes N pipeline run (started by `main`)."""
    from cnnpipe.training import distributed

    distributed.initialize(distributed.Cluster(args.coordinator, args.processes, args.process_id))
    results = pipeline_section(args, Path(args.root))
    print("RESULT " + json.dumps(results), flush=True)


def multi_process(args, root: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--root", str(root), "--processes",
                               str(args.processes), "--process-id", str(i), "--coordinator", f"127.0.0.1:{port}",
                               "--seconds", str(args.seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(args.processes)]
    outs = [p.communicate(timeout=900) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        if p.returncode:
            raise SystemExit(f"process {i} failed:\n{err[-2000:]}")
        res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        for label, r in res.items():
            print(f"  {label:10s} gather {r['gather']:10,.0f} img/s   gather+device {r['gather+device']:10,.0f} "
                  f"img/s   (process {i} of {args.processes}, {r['rows']} of {SHAPES[label][2]} rows)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["reference", "resnet_small"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="batch sizes (default: 64 128 256 on CPU, 128 ... 8192 on accelerators)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0, help="per pipeline measurement")
    ap.add_argument("--processes", type=int, default=1, help="also measure the pipeline in N local processes")
    ap.add_argument("--pipeline-only", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--coordinator", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from cnnpipe.training.mesh import setup_cpu_devices

    setup_cpu_devices()  # what `cnnpipe train` does on CPU (harmless elsewhere)
    import jax

    if args.batches is None:
        args.batches = [64, 128, 256] if jax.default_backend() == "cpu" else [128, 512, 2048, 8192]
    with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-") as tmp:
        root = Path(tmp)
        if not args.pipeline_only:
            compute_section(args)
        print(f"\nhost pipeline, 1 process ({len(jax.local_devices())} local device(s)), prefetch 2:")
        pipeline_section(args, root)
        if args.processes > 1:
            print(f"host pipeline, {args.processes} processes on 127.0.0.1 (1 CPU device each, gloo):")
            multi_process(args, root)
        if not args.pipeline_only:
            print("\noverlap (1 process):")
            overlap_section(args, root)


if __name__ == "__main__":
    main()
